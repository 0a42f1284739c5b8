"""``TokenQuant``: dynamic per-token quantization of activations and of the KV cache.

One scale (and zero point) per vector along the last axis, computed on the fly from that vector:
a kernel's input ``(..., K)`` gets one scale per token, a key or value ``(B, T, KV, hd)`` one per
head and token. The numbers are those of ``quant.fake_quant`` under ``QuantSpec(bits,
axis=<all but the last>)`` (torch-exact rounding, straight-through gradient); ``clip < 1`` shrinks
the range first (QuaRot's clipping ratio: 0.9 for activations, 0.95 for the KV cache); a tuple of
ratios picks, per vector, the one with the least squared error; ``group_size`` gives each run of
the last axis its own scale (as MX / NVFP4 formats do for activations).
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

    For a vector ``x`` (the last axis, or each ``group_size`` run of it), with ``(qmin, qmax)``
    the ``bits``-bit signed grid and ``c`` the clipping ratio:

    * symmetric: ``scale = c * max|x| / ((qmax - qmin) / 2)``, ``zero_point = 0``;
    * affine (``symmetric=False``): ``scale = c * (max x - min x) / (qmax - qmin)`` over the
      range ``c * [min(x, 0), max(x, 0)]``, ``zero_point = qmin - round(c * min / scale)``;

    then ``y = (clip(round_half_even(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``
    (``quant.fake_quant`` with these parameters: same shape and dtype, straight-through
    gradient). With several ratios, ``clip=(c_1, c_2, ...)``, each vector takes the one whose
    ``y`` is closest to ``x`` (least ``sum (y - x)**2``; ties to the earlier ratio): a per-token
    clipping search, computed on the fly like the scale. Hashable: a static argument under
    ``jit``.

    Args:
      bits: 2 to 8 (4: QuaRot's A4 / KV4; 8: W8A8).
      symmetric: symmetric (default; activations) or affine (QuaRot's KV cache).
      clip: clipping ratio in ``(0, 1]`` (values beyond ``clip`` times the range saturate), or
        a tuple of such ratios to search per vector.
      group_size: ``None`` (one scale per token) or the length of the runs of the last axis
        that get a scale each (the activation side of MXFP4's 32 and NVFP4's 16; a last run
        shorter than ``group_size`` is padded with zeros, which change no scale).

    >>> tq = TokenQuant(4)
    >>> tq(jnp.array([[0.0, 1.0, -3.75, 7.5]])).tolist()
    [[0.0, 1.0, -4.0, 7.0]]
    >>> x = jnp.array([[0.1, -0.15, 3.0, -6.0]])  # per token, the small entries round to 0
    >>> show = lambda y: np.round(np.asarray(y, np.float64), 2).tolist()
    >>> show(TokenQuant(4)(x)), show(TokenQuant(4, group_size=2)(x))
    ([[0.0, -0.0, 3.2, -6.4]], [[0.1, -0.14, 3.2, -6.4]])
    """

    bits: int = 8
    _: dataclasses.KW_ONLY
    symmetric: bool = True
    clip: float | tuple[float, ...] = 1.0
    group_size: int | None = None

    def __post_init__(self):
        fn = "quant.TokenQuant"
        if isinstance(self.bits, bool) or not isinstance(self.bits, int | np.integer):
            raise ValueError(f"{fn}: bits must be an int in [2, 8], got {self.bits!r}")
        if not 2 <= int(self.bits) <= 8:
            raise ValueError(f"{fn}: bits must be an int in [2, 8], got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"{fn}: symmetric must be a bool, got {self.symmetric!r}")
        clips = self.clip if isinstance(self.clip, tuple | list) else (self.clip,)
        if not clips:
            raise ValueError(f"{fn}: clip must be a float in (0, 1] or a non-empty tuple of them")
        for c in clips:
            if isinstance(c, bool) or not isinstance(c, int | float) or not 0 < c <= 1:
                raise ValueError(f"{fn}: clip must be a float in (0, 1], got {c!r}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int | np.integer) or g < 1):
            raise ValueError(f"{fn}: group_size must be None or an int >= 1, got {g!r}")
        object.__setattr__(self, "bits", int(self.bits))
        clip = tuple(float(c) for c in clips)
        object.__setattr__(self, "clip", clip if isinstance(self.clip, tuple | list) else clip[0])
        object.__setattr__(self, "group_size", None if g is None else int(g))

    def _one(self, x: jax.Array, xf: jax.Array, clip: float) -> jax.Array:
        spec = QuantSpec(self.bits, symmetric=self.symmetric, axis=tuple(range(x.ndim - 1)))
        c = jnp.float32(clip)
        lo = c * jnp.min(xf, axis=-1, keepdims=True)
        hi = c * jnp.max(xf, axis=-1, keepdims=True)
        scale, zp = qparams_from_range(lo, hi, spec)
        return fake_quant(x, spec, scale=scale, zero_point=None if self.symmetric else zp)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x (..., K)`` quantized and dequantized with one scale per index of ``x[..., 0]``
        (per ``group_size`` run of the last axis with ``group_size``)."""
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim == 0:
            raise TypeError(
                f"quant.TokenQuant: x must be a float array with a last axis, got "
                f"{x.dtype} {tuple(x.shape)}"
            )
        shape, k = x.shape, x.shape[-1]
        if self.group_size is not None and self.group_size < k:
            g = self.group_size
            pad = -k % g
            if pad:
                x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
            x = x.reshape(*shape[:-1], (k + pad) // g, g)
        xf = jax.lax.stop_gradient(x.astype(jnp.float32))
        if isinstance(self.clip, float):
            y = self._one(x, xf, self.clip)
        else:
            y, err = None, None
            for c in self.clip:
                yc = self._one(x, xf, c)
                ec = jnp.sum(jnp.square(jax.lax.stop_gradient(yc).astype(jnp.float32) - xf), -1)
                if y is None:
                    y, err = yc, ec
                else:
                    better = ec < err
                    y, err = jnp.where(better[..., None], yc, y), jnp.where(better, ec, err)
        if y.shape != shape:
            y = y.reshape(*shape[:-1], -1)[..., :k]
        return y
