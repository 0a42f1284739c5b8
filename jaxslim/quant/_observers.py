"""Calibration observers: running statistics of activations (or weights) -> ``(scale, zero_point)``.

An observer is three pure functions, Optax style, all usable inside ``jit``::

    obs = quant.minmax_observer(spec)
    state = obs.init(x0)              # x0 (or any array of the same shape) fixes the stat shapes
    for x in batches:
        state = obs.update(state, x)
    scale, zero_point = obs.result(state)
    q = quant.quantize(x, spec, scale=scale, zero_point=zero_point)

Statistics have the spec's ``scale_shape`` (see ``quant._spec.layout``), so per-tensor,
per-channel and per-group calibration all work the same way, for every format of
``quant.formats``. Non-finite entries are ignored, and so is the filler of a shorter last group (a
``group_size`` that does not divide its axis): each group's statistics are its real entries'. An
observer that has seen nothing gives ``scale = eps`` (never NaN). Options are keyword-only and
checked when the observer is made (a range, a count: ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim._checks import caller, public
from jaxslim.quant._numerics import qparams_from_range
from jaxslim.quant._qarray import fake_values
from jaxslim.quant._spec import Layout, QuantSpec, layout


class RangeState(NamedTuple):
    """Running range ``[lo, hi]`` (shape ``scale_shape``) and the number of updates."""

    lo: jax.Array
    hi: jax.Array
    count: jax.Array


class Observer(NamedTuple):
    """``init(x) -> state``, ``update(state, x) -> state``, ``result(state) -> (scale, zp)``."""

    init: Callable[[jax.Array], Any]
    update: Callable[[Any, jax.Array], Any]
    result: Callable[[Any], tuple[jax.Array, jax.Array]]


def _check_spec(spec: Any) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{caller()}: spec must be a QuantSpec, got {spec!r}")


def _view(x, spec: QuantSpec) -> tuple[jax.Array, Layout]:
    if not hasattr(x, "dtype") and not isinstance(x, float):
        raise ValueError(f"{caller()}: expects a floating-point array, got {type(x).__name__}")
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
        raise ValueError(f"{caller()}: expects a floating-point array, got {jnp.asarray(x).dtype}")
    lay = layout(spec, x.shape)
    v = lay.to_view(jnp.asarray(x).astype(jnp.float32))
    return v, lay


def _is_real(v: Any) -> bool:
    """A concrete real number (a Python or numpy scalar, not a traced value)."""
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _finite(v, fill):
    return jnp.where(jnp.isfinite(v), v, fill)


def _batch_range(v, lay):
    # The filler of a shorter last group is +-inf to the reductions: only real entries count.
    lo = jnp.min(lay.masked(_finite(v, 0.0), jnp.inf), axis=lay.reduce_axes, keepdims=True)
    hi = jnp.max(lay.masked(_finite(v, 0.0), -jnp.inf), axis=lay.reduce_axes, keepdims=True)
    return lo, hi


def _observer(fn: str, init, update, result) -> Observer:
    """An ``Observer`` whose ``init`` and ``update`` name ``fn`` in errors when called later."""
    return Observer(public(fn)(init), public(fn)(update), result)


def _init(spec):
    def init(x):
        lay = layout(spec, jnp.shape(x))
        return RangeState(
            jnp.full(lay.scale_shape, jnp.inf, jnp.float32),
            jnp.full(lay.scale_shape, -jnp.inf, jnp.float32),
            jnp.zeros((), jnp.int32),
        )

    return init


def _result(spec):
    def result(state):
        lo = jnp.where(state.count > 0, state.lo, 0.0)
        hi = jnp.where(state.count > 0, state.hi, 0.0)
        return qparams_from_range(lo, hi, spec)

    return result


@public("quant.minmax_observer")
def minmax_observer(spec: QuantSpec) -> Observer:
    """Running min and max over every batch seen (PyTorch's ``MinMaxObserver``).

    >>> import jax.numpy as jnp, numpy as np
    >>> obs = minmax_observer(QuantSpec(8))
    >>> s = obs.update(obs.init(jnp.zeros(2)), jnp.array([1.0, 2.0]))
    >>> s = obs.update(s, jnp.array([-3.0, 0.0]))
    >>> bool(obs.result(s)[0].item() == np.float32(3) / np.float32(127.5))
    True
    """
    fn = "quant.minmax_observer"
    _check_spec(spec)

    def update(state, x):
        v, lay = _view(x, spec)
        lo, hi = _batch_range(v, lay)
        return RangeState(jnp.minimum(state.lo, lo), jnp.maximum(state.hi, hi), state.count + 1)

    return _observer(fn, _init(spec), update, _result(spec))


@public("quant.moving_average_observer")
def moving_average_observer(spec: QuantSpec, *, averaging_constant: float = 0.01) -> Observer:
    """Exponential moving average of per-batch min/max (PyTorch's
    ``MovingAverageMinMaxObserver``): the first batch sets the range, then
    ``lo <- lo + c * (batch_lo - lo)`` with ``c = averaging_constant`` (0.01).

    >>> import jax.numpy as jnp
    >>> obs = moving_average_observer(QuantSpec(8), averaging_constant=0.5)
    >>> s = obs.update(obs.update(obs.init(jnp.zeros(1)), jnp.array([2.0])), jnp.array([4.0]))
    >>> s.hi.item()
    3.0
    """
    fn = "quant.moving_average_observer"
    _check_spec(spec)
    if not _is_real(averaging_constant) or not 0.0 < averaging_constant <= 1.0:
        raise ValueError(f"{fn}: averaging_constant must be in (0, 1], got {averaging_constant!r}")

    def update(state, x):
        v, lay = _view(x, spec)
        lo, hi = _batch_range(v, lay)
        first = state.count == 0
        c = averaging_constant
        new_lo = jnp.where(first, lo, state.lo + c * (lo - state.lo))
        new_hi = jnp.where(first, hi, state.hi + c * (hi - state.hi))
        return RangeState(new_lo, new_hi, state.count + 1)

    return _observer(fn, _init(spec), update, _result(spec))


def _running_mean(state, lo, hi):
    n = state.count.astype(jnp.float32)
    first = state.count == 0
    new_lo = jnp.where(first, lo, state.lo + (lo - state.lo) / (n + 1))
    new_hi = jnp.where(first, hi, state.hi + (hi - state.hi) / (n + 1))
    return RangeState(new_lo, new_hi, state.count + 1)


@public("quant.percentile_observer")
def percentile_observer(spec: QuantSpec, *, percentile: float = 99.99) -> Observer:
    """Clips outliers: per batch, ``lo``/``hi`` are the ``100 - p`` and ``p`` percentiles of
    the entries sharing a scale; the result uses their mean over batches.

    >>> import jax.numpy as jnp
    >>> obs = percentile_observer(QuantSpec(8), percentile=50.0)
    >>> obs.update(obs.init(jnp.zeros(3)), jnp.array([-1.0, 2.0, 100.0])).hi.item()
    2.0
    """
    fn = "quant.percentile_observer"
    _check_spec(spec)
    if not _is_real(percentile) or not 50.0 <= percentile <= 100.0:
        raise ValueError(f"{fn}: percentile must be in [50, 100], got {percentile!r}")

    def update(state, x):
        v, lay = _view(x, spec)
        v = _finite(v, 0.0)
        ax = lay.reduce_axes
        # A shorter last group: its filler is NaN, which nanpercentile skips.
        pct = jnp.percentile if lay.mask() is None else jnp.nanpercentile
        v = lay.masked(v, jnp.nan)
        lo = pct(v, 100.0 - percentile, axis=ax, keepdims=True).astype(jnp.float32)
        hi = pct(v, percentile, axis=ax, keepdims=True).astype(jnp.float32)
        return _running_mean(state, lo, hi)

    return _observer(fn, _init(spec), update, _result(spec))


@public("quant.mse_observer")
def mse_observer(spec: QuantSpec, *, num_candidates: int = 100) -> Observer:
    """MSE-optimal clipping: per batch, searches the clip ratio ``r`` in
    ``{1/n, 2/n, ..., 1}`` (``n = num_candidates``) whose range ``r * [lo, hi]`` minimises
    ``sum((fake_quant(x) - x)^2)`` over the entries sharing a scale (each group picks its own
    ``r``); the result uses the mean of the chosen ranges over batches.

    >>> import jax.numpy as jnp
    >>> x = jnp.concatenate([jnp.linspace(-1, 1, 1001), jnp.array([10.0])])
    >>> obs = mse_observer(QuantSpec(4))
    >>> obs.update(obs.init(x), x).hi.tolist()  # the outlier 10.0 is clipped
    [3.5]
    """
    fn = "quant.mse_observer"
    _check_spec(spec)
    if (
        isinstance(num_candidates, bool)
        or not isinstance(num_candidates, int)
        or num_candidates < 1
    ):
        raise ValueError(f"{fn}: num_candidates must be a positive int, got {num_candidates!r}")

    def update(state, x):
        v, lay = _view(x, spec)
        v = _finite(v, 0.0)
        lo, hi = _batch_range(v, lay)
        ratios = jnp.arange(1, num_candidates + 1, dtype=jnp.float32) / num_candidates

        def err(r):
            s, z = qparams_from_range(r * lo, r * hi, spec)
            d = lay.masked(fake_values(v, s, z, spec)[0] - v, 0.0)  # filler: no error
            return jnp.sum(d * d, axis=lay.reduce_axes, keepdims=True)

        errs = jax.lax.map(err, ratios)  # (n, *scale_shape), one candidate at a time
        best = ratios[jnp.argmin(errs, axis=0)]
        return _running_mean(state, best * lo, best * hi)

    return _observer(fn, _init(spec), update, _result(spec))
