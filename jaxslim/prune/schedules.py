"""Sparsity schedules: ``step -> sparsity`` functions, traceable under ``jit``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["SparsitySchedule", "polynomial_schedule", "constant_schedule", "one_shot_schedule"]

SparsitySchedule = Callable[[jax.typing.ArrayLike], jax.Array]


def _check_fraction(name: str, value: float) -> float:
    if not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"prune.{name}: sparsity must be a number in [0, 1], got {value!r}")
    return float(value)


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
    final = _check_fraction("polynomial_schedule", final)
    initial = _check_fraction("polynomial_schedule", initial)
    if not (isinstance(begin_step, int) and isinstance(end_step, int) and end_step > begin_step):
        raise ValueError(
            f"prune.polynomial_schedule: need integers end_step > begin_step, got "
            f"begin_step={begin_step!r}, end_step={end_step!r}"
        )
    if not (isinstance(frequency, int) and frequency >= 1):
        raise ValueError(f"prune.polynomial_schedule: frequency must be >= 1, got {frequency!r}")
    if not power > 0:
        raise ValueError(f"prune.polynomial_schedule: power must be > 0, got {power!r}")

    def schedule(step):
        t = jnp.asarray(step, jnp.int32)
        last = begin_step + ((t - begin_step) // frequency) * frequency
        frac = jnp.clip((last - begin_step) / (end_step - begin_step), 0.0, 1.0)
        s = final + (initial - final) * (1.0 - frac.astype(jnp.float32)) ** power
        s = jnp.where(t < begin_step, initial, jnp.where(t >= end_step, final, s))
        return s.astype(jnp.float32)

    return schedule


def constant_schedule(sparsity: float) -> SparsitySchedule:
    """``s_t = sparsity`` for every step.

    >>> float(constant_schedule(0.5)(7))
    0.5
    """
    s = _check_fraction("constant_schedule", sparsity)
    return lambda step: jnp.full((), s, jnp.float32)


def one_shot_schedule(sparsity: float, at_step: int) -> SparsitySchedule:
    """``0`` before ``at_step``, ``sparsity`` from ``at_step`` on (prune once, then fine-tune).

    >>> sched = one_shot_schedule(0.75, at_step=10)
    >>> float(sched(9)), float(sched(10))
    (0.0, 0.75)
    """
    s = _check_fraction("one_shot_schedule", sparsity)
    if not (isinstance(at_step, int) and at_step >= 0):
        raise ValueError(f"prune.one_shot_schedule: at_step must be an int >= 0, got {at_step!r}")
    return lambda step: jnp.where(jnp.asarray(step) >= at_step, s, 0.0).astype(jnp.float32)
