"""The quantization primitive and scales from data, with PyTorch's ("torch-exact") numerics.

For a scale ``s``, an integer zero point ``z`` and the grid ``[qmin, qmax]``::

    q = clip(round_half_even(x * (1 / s)) + z, qmin, qmax)
    y = (q - z) * s

computed in float32 (float16/bfloat16 inputs are upcast, the result cast back). The reciprocal is
taken once and multiplied, as PyTorch's kernels do: ``x * (1/s)`` and ``x / s`` differ on ties.
``jnp.round`` rounds half to even (``lax.round`` does not). This equals
``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine`` element for
element.

Scales from a range ``[lo, hi]`` (first widened to contain 0):

* symmetric: ``s = max(-lo, hi) / ((qmax - qmin) / 2)`` (``/ 127.5`` for int8), ``z = 0`` (signed)
  or the mid-point (unsigned: 128 for uint8, ``(qmin + qmax) // 2`` otherwise);
* affine: ``s = (hi - lo) / (qmax - qmin)``, ``z = clip(qmin - round(lo / s), qmin, qmax)``;

and ``s`` is floored at float32 ``eps`` (``1.19e-7``), so an all-zero tensor has ``s = eps``
and quantizes to exact zeros, never NaN. Ranges ignore non-finite entries. An affine range wider
than float32 (``hi - lo`` overflows, e.g. ``[-3e38, 3e38]``) takes ``hi / d - lo / d`` instead of
``(hi - lo) / d``, so its scale stays finite.

Non-finite inputs: ``+inf``/``-inf`` clip to ``qmax``/``qmin``; NaN stays NaN through
``fake_quant_affine`` (its gradient is 0) and becomes the zero point (so 0.0) in integer codes.
A result beyond the input dtype's finite range (the code ``-128`` of a symmetric int8 grid is
``-128/127.5`` of the range: past the largest float16 when the range is the float16 maximum)
saturates at that dtype's largest finite value instead of becoming ``+-inf``.

Scales and zero points passed in are checked when concrete: a scale must be finite and > 0, a
zero point an integer inside ``[qmin, qmax]`` (``ValueError`` naming the function and value).
Under ``jit`` they cannot be checked; an invalid traced scale makes the result NaN (never a silent
zero).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim._checks import caller, count_nonfinite, leaf_path, public
from jaxslim.quant._spec import QuantSpec, layout

EPS = float(jnp.finfo(jnp.float32).eps)


def compute_dtype(dtype) -> jnp.dtype:
    """float32 for float16/bfloat16/float32 inputs (wider floats keep their dtype)."""
    dtype = jnp.dtype(dtype)
    return dtype if dtype.itemsize > 4 else jnp.dtype(jnp.float32)


def is_concrete(*xs: Any) -> bool:
    """True when none of ``xs`` is a tracer (its values can be read without ``jit`` breaking)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_scale(scale: Any, path: str = "") -> None:
    """Raises ``ValueError`` when a concrete ``scale`` has an entry that is not finite and > 0."""
    if scale is None or not is_concrete(scale):
        return
    s = np.asarray(jax.device_get(scale)).astype(np.float64)
    bad = ~(np.isfinite(s) & (s > 0))
    if bad.any():
        raise ValueError(
            f"{caller()}: scale must be finite and > 0, got {float(s[bad].reshape(-1)[0])!r} "
            f"({int(bad.sum())} of {s.size} entries) for {path or 'the input'!r}; take scales "
            "from quant.qparams or an observer"
        )


def check_zero_point(zero_point: Any, qmin: float, qmax: float, path: str = ""):
    """Raises ``ValueError`` when a concrete zero point is not an integer in ``[qmin, qmax]``."""
    if zero_point is None or not is_concrete(zero_point):
        return
    z = np.asarray(jax.device_get(zero_point)).astype(np.float64)
    bad = ~(np.isfinite(z) & (z == np.round(z)) & (z >= qmin) & (z <= qmax))
    if bad.any():
        raise ValueError(
            f"{caller()}: zero_point must be an integer in [{qmin}, {qmax}], got "
            f"{float(z[bad].reshape(-1)[0])!r} for {path or 'the input'!r}"
        )


def valid_scale(scale: jax.Array) -> jax.Array:
    """``scale`` where finite and > 0, NaN elsewhere (traced scales cannot raise)."""
    ok = jnp.isfinite(scale) & (scale > 0)
    return jnp.where(ok, scale, jnp.full((), jnp.nan, scale.dtype))


def saturate(y: jax.Array, dtype: Any) -> jax.Array:
    """``y`` clipped to the finite range of the floating ``dtype`` (NaN stays NaN)."""
    big = float(jnp.finfo(dtype).max)
    return jnp.clip(y, -big, big)


def round_codes(x: jax.Array, scale: jax.Array, zero_point: jax.Array, qmin: int, qmax: int):
    """``(q, inside)``: clipped float codes ``q`` and the mask ``qmin <= round(x/s) + z <= qmax``.

    ``x`` must already be in the compute dtype and broadcast against ``scale``/``zero_point``.
    """
    inv = jnp.asarray(1, x.dtype) / scale.astype(x.dtype)
    r = jnp.round(x * inv) + zero_point.astype(x.dtype)
    inside = (r >= qmin) & (r <= qmax)
    return jnp.clip(r, qmin, qmax), inside


def _fq(x, scale, zero_point, qmin, qmax):
    cd = compute_dtype(x.dtype)
    xc = x.astype(cd)
    q, inside = round_codes(xc, scale, zero_point, qmin, qmax)
    y = (q - zero_point.astype(cd)) * scale.astype(cd)
    return saturate(y, x.dtype).astype(x.dtype), inside


@partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _fake_quant(x, scale, zero_point, qmin, qmax):
    return _fq(x, scale, zero_point, qmin, qmax)[0]


@_fake_quant.defjvp
def _fake_quant_jvp(qmin, qmax, primals, tangents):
    x, scale, zero_point = primals
    y, inside = _fq(x, scale, zero_point, qmin, qmax)
    return y, jnp.where(inside, tangents[0], jnp.zeros_like(tangents[0]))


def _check_int(v, name: str) -> int:
    if isinstance(v, jax.core.Tracer):
        raise ValueError(
            f"{caller()}: {name} must be a Python int (it fixes the grid, a static value), got a "
            f"traced value {v}; pass it as a static argument"
        )
    if isinstance(v, bool) or not isinstance(v, int) and not hasattr(v, "__index__"):
        raise ValueError(f"{caller()}: {name} must be a Python int, got {v!r}")
    return int(v)


@public("quant.fake_quant_affine")
def fake_quant_affine(
    x: jax.Array,
    scale: jax.typing.ArrayLike,
    zero_point: jax.typing.ArrayLike,
    qmin: int,
    qmax: int,
    *,
    axis: int | None = None,
) -> jax.Array:
    """Quantize-dequantize ``x`` on the grid ``[qmin, qmax]`` with PyTorch's exact numerics.

    ``y = (clip(round_half_even(x * (1/scale)) + zero_point, qmin, qmax) - zero_point) * scale``,
    in float32 for float16/bfloat16 ``x`` (the result has ``x``'s dtype).

    Args:
      x: a floating-point array.
      scale: with ``axis=None``, a scalar or an array broadcasting against ``x``; with ``axis=k``,
        a vector of length ``x.shape[k]`` (PyTorch's per-channel form).
      zero_point: integer-valued, shaped like ``scale``.
      qmin, qmax: the integer grid (static Python ints).
      axis: ``None`` or the per-channel axis.

    A concrete scale must be finite and > 0 and a concrete zero point an integer in
    ``[qmin, qmax]`` (``ValueError``); a traced invalid scale gives NaN.

    Returns:
      ``y`` with ``x``'s shape and dtype. The gradient with respect to ``x`` is the
      straight-through estimator with PyTorch's mask: 1 where ``qmin <= round(x/s) + z <= qmax``,
      else 0; ``scale`` and ``zero_point`` get no gradient (see ``fake_quant_lsq``).

    >>> import jax.numpy as jnp
    >>> fake_quant_affine(jnp.array([0.25, 0.75, 3.0]), 0.5, 0, -4, 3).tolist()
    [0.0, 1.0, 1.5]
    """
    fn = "quant.fake_quant_affine"
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{fn}: x must be a floating-point array, got dtype {x.dtype}")
    qmin, qmax = _check_int(qmin, "qmin"), _check_int(qmax, "qmax")
    if qmin >= qmax:
        raise ValueError(f"{fn}: need qmin < qmax, got qmin={qmin}, qmax={qmax}")
    scale = jnp.asarray(scale)
    zero_point = jnp.asarray(zero_point)
    if not jnp.issubdtype(scale.dtype, jnp.floating):
        raise ValueError(f"{fn}: scale must be floating point, got dtype {scale.dtype}")
    check_scale(scale)
    check_zero_point(zero_point, qmin, qmax)
    if not is_concrete(scale):
        scale = valid_scale(scale)
    if axis is not None:
        if not -x.ndim <= axis < x.ndim:
            raise ValueError(f"{fn}: axis {axis} is out of range for x with ndim {x.ndim}")
        axis %= x.ndim
        n = x.shape[axis]
        for name, v in (("scale", scale), ("zero_point", zero_point)):
            if v.shape != (n,):
                raise ValueError(
                    f"{fn}: with axis={axis}, {name} must have shape ({n},), got {v.shape}"
                )
        bshape = tuple(n if i == axis else 1 for i in range(x.ndim))
        scale, zero_point = scale.reshape(bshape), zero_point.reshape(bshape)
    else:
        for name, v in (("scale", scale), ("zero_point", zero_point)):
            try:
                jnp.broadcast_shapes(v.shape, x.shape)
            except ValueError:
                raise ValueError(
                    f"{fn}: {name} of shape {v.shape} does not broadcast against x {x.shape}"
                ) from None
            if v.ndim > x.ndim:
                raise ValueError(f"{fn}: {name} has more dims ({v.ndim}) than x ({x.ndim})")
        scale = scale.reshape((1,) * (x.ndim - scale.ndim) + scale.shape)
        zero_point = zero_point.reshape((1,) * (x.ndim - zero_point.ndim) + zero_point.shape)
    return _fake_quant(x, scale, zero_point, qmin, qmax)


def _div(a: jax.Array, c: float) -> jax.Array:
    """``a / c`` rounded exactly as IEEE division (XLA rewrites division by a constant into a
    multiply by its reciprocal, which is 1 ulp off for some inputs; PyTorch divides)."""
    # A divisor that depends on ``a`` (``c + 0 * a``, finite) is not a constant, even under vmap.
    zero = jnp.where(jnp.isfinite(a), a, jnp.zeros((), a.dtype)) * jnp.zeros((), a.dtype)
    return a / (jnp.asarray(c, a.dtype) + zero)


@public("quant.qparams_from_range")
def qparams_from_range(
    lo: jax.typing.ArrayLike, hi: jax.typing.ArrayLike, spec: QuantSpec
) -> tuple[jax.Array, jax.Array]:
    """``(scale, zero_point)`` for the range ``[lo, hi]`` (widened to contain 0), torch's rule.

    Concrete ``lo``/``hi`` must be finite (``ValueError``); traced non-finite ends count as 0.
    ``scale`` is float32 and floored at float32 eps; ``zero_point`` is int32 (0 for symmetric
    signed specs and formats without a zero point). The symmetric divisor is half the format's
    code range (127.5 for int8, 448 for e4m3, 1 for nf4: its absmax scale); a format with a
    ``scale_rule`` takes it instead (MX: ``2^(floor(log2 amax) - emax)``, NVFP4: ``amax / 6``).

    >>> import numpy as np
    >>> s, z = qparams_from_range(-1.0, 2.0, QuantSpec(8, signed=False, symmetric=False))
    >>> bool(s.item() == np.float32(3) / np.float32(255)), int(z)
    (True, 85)
    """
    fn = "quant.qparams_from_range"
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{fn}: spec must be a QuantSpec, got {spec!r}")
    lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
    for name, v in (("lo", lo), ("hi", hi)):
        if is_concrete(v) and count_nonfinite(v):
            raise ValueError(f"{fn}: {name} must be finite, got {np.asarray(v).tolist()}")
    # Traced non-finite ends (a NaN calibration batch) count as 0: the scale stays finite.
    lo = jnp.minimum(jnp.where(jnp.isfinite(lo), lo, 0.0), 0.0)
    hi = jnp.maximum(jnp.where(jnp.isfinite(hi), hi, 0.0), 0.0)
    qmin, qmax = spec.qmin, spec.qmax
    rule = spec.format.scale_rule
    if rule is not None:  # the format's own rule (MX: a power of two; NVFP4: amax / 6)
        scale = rule(jnp.maximum(-lo, hi))
        return scale, jnp.zeros(scale.shape, jnp.int32)
    if spec.symmetric:
        scale = jnp.maximum(_div(jnp.maximum(-lo, hi), (qmax - qmin) / 2), EPS)
        return scale, jnp.full(scale.shape, spec.symmetric_zero_point, jnp.int32)
    width = hi - lo
    d = qmax - qmin
    # A range wider than float32 (hi - lo = inf): each end divided first stays finite.
    wide = _div(hi, d) - _div(lo, d)
    scale = jnp.maximum(jnp.where(jnp.isfinite(width), _div(width, d), wide), EPS)
    zp = jnp.clip(qmin - jnp.round(lo / scale), qmin, qmax).astype(jnp.int32)
    return scale, zp


@public("quant.qparams", leaf_kwarg=True)
def qparams(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """``(scale, zero_point)`` from the min/max of ``x`` under ``spec``'s granularity.

    Both have the layout's ``scale_shape`` (see ``quant._spec.layout``); non-finite entries of
    ``x`` are ignored (a group's scale comes from its finite entries only), and so is the filler
    of a shorter last group (``group_size`` not dividing the axis). Errors name the leaf path
    that the tree-wide function calling it is working on.

    >>> import jax.numpy as jnp
    >>> s, z = qparams(jnp.array([[1.0, -2.0], [0.5, 4.0]]), QuantSpec(8, axis=-1))
    >>> s.shape, (s * 127.5).tolist()
    ((1, 2), [[1.0, 4.0]])
    """
    path = leaf_path()
    return compute_qparams(x, spec, path=path)


def compute_qparams(x, spec: QuantSpec, *, path: str) -> tuple[jax.Array, jax.Array]:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{caller()}: spec must be a QuantSpec, got {spec!r} for {path!r}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{caller()}: expects a floating-point array, got {x.dtype} for {path or 'the input'!r}"
        )
    lay = layout(spec, x.shape, path=path)
    v = lay.to_view(x)
    v = jnp.where(jnp.isfinite(v), v, jnp.zeros((), v.dtype)).astype(compute_dtype(v.dtype))
    if not v.size:
        return qparams_from_range(jnp.zeros(lay.scale_shape), jnp.zeros(lay.scale_shape), spec)
    # A padded last group: the filler is +-inf to the reductions, so only real entries count.
    lo = jnp.min(lay.masked(v, jnp.inf), axis=lay.reduce_axes, keepdims=True)
    hi = jnp.max(lay.masked(v, -jnp.inf), axis=lay.reduce_axes, keepdims=True)
    return qparams_from_range(lo, hi, spec)
