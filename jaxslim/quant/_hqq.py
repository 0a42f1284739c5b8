"""HQQ: calibration-free zero point and scale of every quantization group, by half-quadratic
splitting.

Badri and Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023). For one
group of weights ``w`` with codes ``q = clip(round(w / s + z), qmin, qmax)`` and reconstruction
``r = s (q - z)``, HQQ minimises a sparsity-promoting ``l_p`` norm (``p < 1``) of the error,
``||w - r||_p^p``, which lets a few large (heavy-tailed) weights keep a large error while the
bulk is fitted tightly. Splitting the error into an auxiliary ``e`` (half-quadratic) gives
alternating closed-form updates, for ``t = 0 .. iters - 1``::

    q   = clip(round(w / s + z), qmin, qmax)
    e   = shrink_p(w - s (q - z), beta)          # generalised soft threshold of the l_p prox
    z   = mean(q - (w - e) / s)                  # the zero point that fits w - e best
    s   = <w - e, q - z> / <q - z, q - z>        # optionally: the scale that fits it best
    beta = kappa * beta

with ``shrink_p(x, beta) = sign(x) max(|x| - |x|^(p-1) / beta, 0)``. The reference code keeps a
float zero point; here a ``QArray`` stores an integer one on the code grid, so ``z`` is rounded
(and clipped) after each update and the scale update carries most of the gain. Every group keeps
the ``(s, z)`` with the smallest squared error seen (the first iterate is round-to-nearest from
the min/max range), so HQQ is never worse than RTN in ``||w - r||_2`` on any group.

Symmetric specs (no zero point) optimise the scale only. Integer formats only.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxslim._checks import leaf_path, public
from jaxslim.quant import formats
from jaxslim.quant._numerics import EPS, qparams_from_range
from jaxslim.quant._qarray import QArray, check_finite, quantize
from jaxslim.quant._spec import QuantSpec, layout


def _check_num(name, v, lo, hi, fn, path, *, integer=False, open_lo=False):
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    bad = isinstance(v, bool) or not isinstance(v, kinds)
    if not bad:
        bad = not (lo < v if open_lo else lo <= v) or not v <= hi or not math.isfinite(v)
    if bad:
        rng = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
        raise ValueError(f"{fn}: {name} must be a number in {rng}, got {v!r} for {path!r}")


@public("quant.hqq", leaf_kwarg=True)
def hqq(
    w: jax.Array,
    spec: QuantSpec,
    *,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    optimize_scale: bool = True,
) -> QArray:
    """Quantizes ``w`` under ``spec`` with HQQ-optimised zero points (and scales) per group.

    Args:
      w: a float array of any shape (a kernel in any layout: the groups are ``spec``'s, see
        ``quant._spec.layout``; ``quant.oneshot`` points ``axis``/``group_axis`` at the kernel's
        output and contracted axes).
      spec: an integer ``QuantSpec`` (2-8 bits; affine specs get a zero point, e.g.
        ``QuantSpec(4, signed=False, symmetric=False, axis=-1, group_size=64)``, HQQ's setting).
      iters: half-quadratic iterations (the reference's 20).
      p: the ``l_p`` norm of the error, ``0 < p <= 1`` (the reference's 0.7).
      beta, kappa: the penalty weight and its growth per iteration (10 and 1.01). ``beta`` is in
        units of ``1 / |w|``: the shrinkage threshold is ``|x|^(p-1) / beta``.
      optimize_scale: also refit the scale of each group by least squares.

    Returns:
      A ``QArray`` with ``spec``'s layout; ``||w - dequantize(q)||_2`` is at most that of
      ``quantize(w, spec)`` on every group.

    >>> import jax, jax.numpy as jnp
    >>> from jaxslim.quant import dequantize, quantize
    >>> w = jax.random.t(jax.random.key(0), 3.0, (128, 16))  # heavy-tailed
    >>> spec = QuantSpec(4, signed=False, symmetric=False, axis=-1, group_size=64)
    >>> err = lambda q: float(jnp.sum((w - dequantize(q)) ** 2))
    >>> err(hqq(w, spec)) < err(quantize(w, spec))
    True
    """
    path = leaf_path()
    fn = "quant.hqq"
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{fn}: spec must be a QuantSpec, got {spec!r} for {path!r}")
    if spec.format.decode is not formats.decode_int or spec.format.scale_block is not None:
        raise ValueError(
            f"{fn}: HQQ needs an integer format (int2-int8), got fmt={spec.fmt!r} for {path!r}; "
            "use quant.quantize for fp8 and nf4"
        )
    if not hasattr(w, "dtype") or not jnp.issubdtype(jnp.asarray(w).dtype, jnp.floating):
        raise ValueError(f"{fn}: expects a floating-point array, got {type(w).__name__} {path!r}")
    w = jnp.asarray(w)
    _check_num("iters", iters, 1, 10_000, fn, path, integer=True)
    _check_num("p", p, 0, 1, fn, path, open_lo=True)
    _check_num("beta", beta, 0, math.inf, fn, path, open_lo=True)
    _check_num("kappa", kappa, 1, math.inf, fn, path)
    if not isinstance(optimize_scale, bool):
        raise TypeError(f"{fn}: optimize_scale must be a bool, got {optimize_scale!r}")
    layout(spec, tuple(w.shape), path=path)
    check_finite(w, path)
    s, z = _hqq(w, spec, iters, float(p), float(beta), float(kappa), optimize_scale)
    return quantize(w, spec, scale=s, zero_point=z if spec.stores_zero_point else None)


@partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _hqq(w, spec, iters, p, beta, kappa, optimize_scale):
    lay = layout(spec, tuple(w.shape))
    # A shorter last group: the view's filler is 0, which every step below ignores (its code is
    # the zero point, so it adds 0 to each error and least-squares sum); the zero point's mean
    # is taken over the real entries (``mean``).
    v = lay.to_view(w.astype(jnp.float32))
    red = lay.reduce_axes
    qmin, qmax = float(spec.qmin), float(spec.qmax)
    s, z = qparams_from_range(
        jnp.min(lay.masked(v, jnp.inf), axis=red, keepdims=True),
        jnp.max(lay.masked(v, -jnp.inf), axis=red, keepdims=True),
        spec,
    )
    if lay.mask() is None:
        mean = partial(jnp.mean, axis=red, keepdims=True)
    else:
        count = jnp.asarray(lay.count(), jnp.float32)

        def mean(a):
            return jnp.sum(lay.masked(a, 0.0), axis=red, keepdims=True) / count

    z = z.astype(jnp.float32)
    affine = spec.stores_zero_point

    def codes(s, z):
        return jnp.clip(jnp.round(v * (1 / s)) + z, qmin, qmax)

    def sq_err(s, z):
        return jnp.sum(jnp.square(v - (codes(s, z) - z) * s), axis=red, keepdims=True)

    def shrink(x, b):
        ax = jnp.abs(x)
        t = jnp.where(ax > 0, ax ** jnp.float32(p - 1), 0.0) / b
        return jnp.sign(x) * jnp.maximum(ax - t, 0.0)

    def step(t, c):
        s, z, best_s, best_z, best_e = c
        b = jnp.float32(beta) * jnp.float32(kappa) ** t.astype(jnp.float32)
        q = codes(s, z)
        target = v - shrink(v - (q - z) * s, b)
        if affine:
            z = mean(q - target * (1 / s))
            z = jnp.clip(jnp.round(z), qmin, qmax)
        if optimize_scale:
            d = q - z
            num = jnp.sum(d * target, axis=red, keepdims=True)
            den = jnp.sum(d * d, axis=red, keepdims=True)
            s_new = num / jnp.where(den > 0, den, 1.0)
            s = jnp.where((den > 0) & (s_new > EPS) & jnp.isfinite(s_new), s_new, s)
        e = sq_err(s, z)
        better = e < best_e
        return (
            s,
            z,
            jnp.where(better, s, best_s),
            jnp.where(better, z, best_z),
            jnp.where(better, e, best_e),
        )

    init = (s, z, s, z, sq_err(s, z))
    _, _, s, z, _ = lax.fori_loop(0, iters, step, init)
    return s, z.astype(jnp.int32)
