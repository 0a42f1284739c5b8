"""Sparsity schedules: ``step -> sparsity`` functions, traceable under ``jit``.

Their arguments are checked when the schedule is made: a sparsity outside ``[0, 1]`` (NaN
included) raises ``ValueError``, also as a NumPy or 0-d jax array; a wrong type raises
``TypeError``. A hand-written schedule that returns a bad value later is handled by ``pruner``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxslim._checks import fraction, integer, public, scalar

SparsitySchedule = Callable[[jax.typing.ArrayLike], jax.Array]


@public("prune.polynomial_schedule")
def polynomial_schedule(
    final: float,
    begin_step: int,
    end_step: int,
    *,
    initial: float = 0.0,
    power: float = 3,
    frequency: int = 1,
) -> SparsitySchedule:
    """Gradual pruning of Zhu & Gupta (2017), "To prune, or not to prune".

    ``s_t = s_f + (s_i - s_f) * (1 - (t' - t0) / (t1 - t0))^p`` where ``t' = t0 + floor((t - t0) /
    frequency) * frequency`` is the last update step, so the sparsity is held constant between
    updates; ``s_i`` before ``t0`` and ``s_f`` from ``t1`` on.

    >>> sched = polynomial_schedule(0.9, begin_step=0, end_step=100, frequency=10)
    >>> [round(float(sched(t)), 4) for t in (0, 9, 10, 50, 100, 1000)]
    [0.0, 0.0, 0.2439, 0.7875, 0.9, 0.9]
    """
    fn = "polynomial_schedule"
    final = fraction(f"prune.{fn}", final, "final sparsity")
    initial = fraction(f"prune.{fn}", initial, "initial sparsity")
    begin_step = integer(f"prune.{fn}", "begin_step", begin_step, low=None)
    end_step = integer(f"prune.{fn}", "end_step", end_step, low=None)
    if end_step <= begin_step:
        raise ValueError(
            f"prune.polynomial_schedule: need integers end_step > begin_step, got "
            f"begin_step={begin_step!r}, end_step={end_step!r}"
        )
    frequency = integer(f"prune.{fn}", "frequency", frequency, low=1)
    p = scalar(f"prune.{fn}", "power", power)
    if p is None or not (math.isfinite(p) and p > 0):
        raise ValueError(f"prune.polynomial_schedule: power must be finite and > 0, got {power!r}")
    power = p

    def schedule(step):
        t = jnp.asarray(step, jnp.int32)
        last = begin_step + ((t - begin_step) // frequency) * frequency
        frac = jnp.clip((last - begin_step) / (end_step - begin_step), 0.0, 1.0)
        s = final + (initial - final) * (1.0 - frac.astype(jnp.float32)) ** power
        s = jnp.where(t < begin_step, initial, jnp.where(t >= end_step, final, s))
        return s.astype(jnp.float32)

    return schedule


@public("prune.constant_schedule")
def constant_schedule(sparsity: float) -> SparsitySchedule:
    """``s_t = sparsity`` for every step.

    >>> float(constant_schedule(0.5)(7))
    0.5
    """
    s = fraction("prune.constant_schedule", sparsity)
    return lambda step: jnp.full((), s, jnp.float32)


@public("prune.one_shot_schedule")
def one_shot_schedule(sparsity: float, at_step: int) -> SparsitySchedule:
    """``0`` before ``at_step``, ``sparsity`` from ``at_step`` on (prune once, then fine-tune).

    >>> sched = one_shot_schedule(0.75, at_step=10)
    >>> float(sched(9)), float(sched(10))
    (0.0, 0.75)
    """
    s = fraction("prune.one_shot_schedule", sparsity)
    at_step = integer("prune.one_shot_schedule", "at_step", at_step, low=0)
    return lambda step: jnp.where(jnp.asarray(step) >= at_step, s, 0.0).astype(jnp.float32)


# --- layer-wise sparsity distributions ----------------------------------------------------------


def _dist_args(fn: str, params, sparsity, where):
    from jaxslim import _tree  # noqa: PLC0415 (keeps this module's top imports minimal)
    from jaxslim.prune._masks import check_where  # noqa: PLC0415

    s = fraction(f"prune.{fn}", sparsity)
    check_where(f"prune.{fn}", where)
    paths = _tree.selected_paths(params, where)
    shapes = {p: tuple(leaf.shape) for p, leaf in _tree.leaves_with_paths(params) if p in paths}
    return s, shapes


def _as_tree(fn: str, params, where, values: dict):
    from jaxslim import _tree  # noqa: PLC0415

    return _tree.map_selected(
        lambda path, _: values[path],
        params,
        where=where,
        unselected=lambda *_: None,
    )


@public("prune.uniform")
def uniform(params, sparsity: float, *, where=None):
    """The same sparsity on every selected leaf: a per-leaf tree for ``topk_mask``, ``pruner``,
    ``rigl`` (``None`` on unselected leaves).

    >>> import jax.numpy as jnp
    >>> uniform({"w": jnp.zeros((4, 4)), "b": jnp.zeros(4)}, 0.5)
    {'b': None, 'w': 0.5}
    """
    s, shapes = _dist_args("uniform", params, sparsity, where)
    return _as_tree("uniform", params, where, dict.fromkeys(shapes, s))


@public("prune.erk")
def erk(params, sparsity: float, *, where=None):
    """Erdős–Rényi-Kernel layer sparsities (Evci et al. 2020, "Rigging the Lottery").

    The density of a leaf of shape ``(d_1, ..., d_k)`` (a kernel ``(*spatial, in, out)``) is
    ``1 - s_l = eps * (d_1 + ... + d_k) / (d_1 * ... * d_k)``, with ``eps`` chosen so that the
    number of pruned weights over all selected leaves is ``round(sparsity * N)``. A leaf whose
    density would exceed 1 is made dense and ``eps`` is solved again over the others (the RigL
    reference code's redistribution). The per-leaf counts ``k_l`` are integers (largest
    remainder) summing exactly to ``round(sparsity * N)``; the returned sparsities are
    ``k_l / n_l``, so ``topk_mask`` prunes exactly ``k_l`` weights of each leaf.

    Args:
      params: a tree of arrays (only shapes are used).
      sparsity: overall fraction in ``[0, 1]`` of the selected weights to prune.
      where: which leaves (default: float kernels: matrices, and
        higher-rank leaves with two axes of size > 1).

    Returns:
      A tree of ``params``' structure with a Python float on selected leaves, ``None`` elsewhere.

    >>> import jax.numpy as jnp
    >>> sp = erk({"a": jnp.zeros((40, 128)), "b": jnp.zeros((128, 10))}, 0.9)
    >>> round(sp["a"], 4), round(sp["b"], 4)
    (0.9314, 0.7742)
    """
    s, shapes = _dist_args("erk", params, sparsity, where)
    n = {p: math.prod(sh) for p, sh in shapes.items()}
    total_prune = round(s * sum(n.values()))
    raw = {p: (sum(sh) / n[p] if n[p] else 0.0) for p, sh in shapes.items()}
    dense: set = set()
    while True:
        live = [p for p in shapes if p not in dense and n[p]]
        if not live:
            break
        keep = sum(n.values()) - total_prune - sum(n[p] for p in dense)
        divisor = sum(raw[p] * n[p] for p in live)
        eps = keep / divisor if divisor else 0.0
        top = max(raw[p] for p in live)
        if eps * top > 1.0:
            dense |= {p for p in live if raw[p] == top}
        else:
            break
    exact = {p: (0.0 if p in dense or not n[p] else n[p] * (1.0 - eps * raw[p])) for p in shapes}
    exact = {p: min(max(v, 0.0), n[p]) for p, v in exact.items()}
    k = {p: math.floor(v) for p, v in exact.items()}
    left = total_prune - sum(k.values())
    order = sorted(
        (p for p in shapes if p not in dense),
        key=lambda p: (k[p] - exact[p], list(shapes).index(p)),
    )
    for p in order:  # largest remainders first
        if left <= 0:
            break
        if k[p] < n[p]:
            k[p] += 1
            left -= 1
    return _as_tree("erk", params, where, {p: (k[p] / n[p] if n[p] else 0.0) for p in shapes})
