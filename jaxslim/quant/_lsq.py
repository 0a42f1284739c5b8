"""Learned step size quantization (LSQ): fake-quant whose scale is a trained parameter.

Esser et al., "Learned Step Size Quantization", ICLR 2020. With ``v = x * (1/s)`` and
``r = round_half_even(v)``, the forward pass is ``fake_quant_affine(x, s, 0, qmin, qmax)`` and the
gradients are (straight-through on the rounding)::

    dy/dx = 1 if qmin <= r <= qmax else 0
    dy/ds = (r - v)  if qmin <= r <= qmax,   qmin if r < qmin,   qmax if r > qmax

the scale's gradient summed over the entries sharing it and multiplied by ``grad_scale``
(the paper's ``g = 1 / sqrt(N * qmax)``, ``N`` the number of entries sharing one scale).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim._checks import public
from jaxslim.quant._numerics import EPS, check_scale, compute_dtype, round_codes


def _lsq_fwd_impl(x, scale, qmin, qmax):
    cd = compute_dtype(x.dtype)
    xc, sc = x.astype(cd), scale.astype(cd)
    q, inside = round_codes(xc, sc, jnp.zeros((), jnp.int32), qmin, qmax)
    return (q * sc).astype(x.dtype), (xc, sc, q, inside)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _lsq(x, scale, qmin, qmax, grad_scale):
    return _lsq_fwd_impl(x, scale, qmin, qmax)[0]


def _lsq_fwd(x, scale, qmin, qmax, grad_scale):
    y, res = _lsq_fwd_impl(x, scale, qmin, qmax)
    return y, (res, scale)


def _lsq_bwd(qmin, qmax, grad_scale, res, g):
    (xc, sc, q, inside), scale = res
    v = xc * (jnp.asarray(1, xc.dtype) / sc)
    r = jnp.round(v)
    gc = g.astype(xc.dtype)
    dx = jnp.where(inside, gc, jnp.zeros_like(gc)).astype(g.dtype)
    ds_elem = jnp.where(inside, r - v, jnp.where(r < qmin, float(qmin), float(qmax))) * gc
    axes = tuple(i for i in range(ds_elem.ndim) if scale.ndim == 0 or scale.shape[i] == 1)
    ds = jnp.sum(ds_elem, axis=axes, keepdims=scale.ndim > 0).reshape(scale.shape)
    return dx, (ds * grad_scale).astype(scale.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


@public("quant.fake_quant_lsq")
def fake_quant_lsq(
    x: jax.Array,
    scale: jax.Array,
    qmin: int,
    qmax: int,
    *,
    grad_scale: float | None = None,
) -> jax.Array:
    """Fake-quantizes ``x`` with a learnable ``scale`` (LSQ; symmetric, zero point 0).

    Args:
      x: floating-point array.
      scale: positive float array: a scalar, or broadcastable against ``x`` with the same ndim
        (e.g. ``(1, out)`` for a per-output-channel scale of an ``(in, out)`` kernel).
      qmin, qmax: the integer grid, e.g. ``quant.qrange(4)``.
      grad_scale: multiplies the scale's gradient; default ``1 / sqrt(N * qmax)``.

    A concrete ``scale`` must be finite and > 0 (``ValueError``); a learned (traced) one is not
    checked.

    >>> import jax, jax.numpy as jnp
    >>> x, s = jnp.array([0.3, 5.0]), jnp.float32(1.0)
    >>> jax.grad(lambda s: fake_quant_lsq(x, s, -4, 3, grad_scale=1.0).sum())(s).item()
    2.700000047683716
    """
    x = jnp.asarray(x)
    scale = jnp.asarray(scale)
    if not jnp.issubdtype(x.dtype, jnp.floating) or not jnp.issubdtype(scale.dtype, jnp.floating):
        raise ValueError(
            f"quant.fake_quant_lsq: x and scale must be floating point, got {x.dtype}, "
            f"{scale.dtype}"
        )
    if scale.ndim not in (0, x.ndim) or any(
        s not in (1, d) for s, d in zip(scale.shape, x.shape, strict=False)
    ):
        raise ValueError(
            f"quant.fake_quant_lsq: scale shape {scale.shape} must be () or broadcast against x "
            f"{x.shape} with the same ndim"
        )
    if not qmin < qmax:
        raise ValueError(f"quant.fake_quant_lsq: need qmin < qmax, got {qmin}, {qmax}")
    check_scale(scale)
    if grad_scale is not None and not (
        isinstance(grad_scale, int | float) and math.isfinite(grad_scale)
    ):
        raise ValueError(
            f"quant.fake_quant_lsq: grad_scale must be a finite float or None, got {grad_scale!r}"
        )
    if grad_scale is None:
        n = max(x.size // max(scale.size, 1), 1)
        grad_scale = 1.0 / math.sqrt(n * max(qmax, 1))
    return _lsq(x, scale, int(qmin), int(qmax), float(grad_scale))


@public("quant.lsq_init_scale")
def lsq_init_scale(x: jax.Array, qmax: int, *, axis=None) -> jax.Array:
    """The paper's initial step size ``2 * mean(|x|) / sqrt(qmax)`` (over all but ``axis``),
    floored at float32 eps (an all-zero ``x`` gets ``eps``, not 0).

    >>> import jax.numpy as jnp
    >>> float(lsq_init_scale(jnp.array([1.0, -3.0]), 4))
    2.0
    """
    fn = "quant.lsq_init_scale"
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{fn}: x must be a floating-point array, got {x.dtype}")
    if isinstance(qmax, bool) or not isinstance(qmax, int | np.integer) or qmax < 1:
        raise ValueError(f"{fn}: qmax must be a positive int, got {qmax!r}")
    if axis is None:
        red = None
    else:
        axes = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
        if not all(-x.ndim <= a < x.ndim for a in axes):
            raise ValueError(f"{fn}: axis {axis} is out of range for x with ndim {x.ndim}")
        keep = {a % x.ndim for a in axes}
        red = tuple(i for i in range(x.ndim) if i not in keep)
    m = jnp.mean(jnp.abs(x.astype(compute_dtype(x.dtype))), axis=red, keepdims=axis is not None)
    return jnp.maximum(2.0 * m / math.sqrt(qmax), EPS)
