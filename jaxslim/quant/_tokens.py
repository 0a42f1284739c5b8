"""``TokenQuant``: dynamic per-token quantization of activations and of the KV cache.

One scale (and zero point) per vector along the last axis, computed on the fly from that vector:
a kernel's input ``(..., K)`` gets one scale per token, a key or value ``(B, T, KV, hd)`` one per
head and token. The numbers are those of ``quant.fake_quant`` under ``QuantSpec(bits,
axis=<all but the last>)`` (torch-exact rounding, straight-through gradient); ``clip < 1`` shrinks
the range first (QuaRot's clipping ratio: 0.9 for activations, 0.95 for the KV cache).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim.quant._numerics import qparams_from_range
from jaxslim.quant._qarray import fake_quant
from jaxslim.quant._spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class TokenQuant:
    """Dynamic quantization with one scale per vector along the last axis (per token).

    For a vector ``x`` (the last axis), with ``(qmin, qmax)`` the ``bits``-bit signed grid:

    * symmetric: ``scale = clip * max|x| / ((qmax - qmin) / 2)``, ``zero_point = 0``;
    * affine (``symmetric=False``): ``scale = clip * (max x - min x) / (qmax - qmin)`` over the
      range ``clip * [min(x, 0), max(x, 0)]``, ``zero_point = qmin - round(clip * min / scale)``;

    then ``y = (clip(round_half_even(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``
    (``quant.fake_quant`` with these parameters: same shape and dtype, straight-through
    gradient). Hashable: a static argument under ``jit``.

    Args:
      bits: 2 to 8 (4: QuaRot's A4 / KV4; 8: W8A8).
      symmetric: symmetric (default; activations) or affine (QuaRot's KV cache).
      clip: clipping ratio in ``(0, 1]``: values beyond ``clip`` times the range saturate.

    >>> tq = TokenQuant(4)
    >>> tq(jnp.array([[0.0, 1.0, -3.75, 7.5]])).tolist()
    [[0.0, 1.0, -4.0, 7.0]]
    """

    bits: int = 8
    _: dataclasses.KW_ONLY
    symmetric: bool = True
    clip: float = 1.0

    def __post_init__(self):
        fn = "quant.TokenQuant"
        if isinstance(self.bits, bool) or not isinstance(self.bits, int | np.integer):
            raise ValueError(f"{fn}: bits must be an int in [2, 8], got {self.bits!r}")
        if not 2 <= int(self.bits) <= 8:
            raise ValueError(f"{fn}: bits must be an int in [2, 8], got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"{fn}: symmetric must be a bool, got {self.symmetric!r}")
        c = self.clip
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0 < c <= 1:
            raise ValueError(f"{fn}: clip must be a float in (0, 1], got {c!r}")
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "clip", float(c))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x (..., K)`` quantized and dequantized with one scale per index of ``x[..., 0]``."""
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim == 0:
            raise TypeError(
                f"quant.TokenQuant: x must be a float array with a last axis, got "
                f"{x.dtype} {tuple(x.shape)}"
            )
        spec = QuantSpec(self.bits, symmetric=self.symmetric, axis=tuple(range(x.ndim - 1)))
        xf = jax.lax.stop_gradient(x.astype(jnp.float32))
        c = jnp.float32(self.clip)
        lo = c * jnp.min(xf, axis=-1, keepdims=True)
        hi = c * jnp.max(xf, axis=-1, keepdims=True)
        scale, zp = qparams_from_range(lo, hi, spec)
        return fake_quant(x, spec, scale=scale, zero_point=None if self.symmetric else zp)
