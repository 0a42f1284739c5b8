"""Learning-rate decays as Optax schedules: ``step_decay`` and ``exponential_decay``.

Both are thin, validated wrappers around Optax's own schedules, so they compose with everything
that takes an ``optax.Schedule`` (``optax.sgd(step_decay(...))``, ``prox_l1(s, step_decay(...))``)
and equal Optax's values exactly.

Arguments are checked by ``jaxslim._checks`` like every other hyper-parameter of the library.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import optax

from jaxslim import _checks
from jaxslim._checks import public

__all__ = ["step_decay", "exponential_decay"]


@public("schedules.step_decay")
def step_decay(init: float, total_steps: int, power: float = 1.0) -> optax.Schedule:
    """Polynomial decay to zero: ``lr(t) = init * (1 - min(t, T) / T) ** power``.

    Equal to ``optax.polynomial_schedule(init, 0.0, power, total_steps)`` (it calls it): the value
    falls from ``init`` at ``t = 0`` to ``0`` at ``t = T = total_steps`` and stays ``0`` after.
    ``power=1`` is linear decay. Unlike the bare Optax schedule under ``jit`` (where ``1 - T/T`` can
    round to ``-3e-8`` and a fractional ``power`` then gives ``NaN``), the value for ``t >= T`` is
    exactly ``0``.

    Args:
      init: the learning rate at step 0.
      total_steps: ``T > 0``, the step at which the rate reaches zero.
      power: the exponent ``p > 0``.

    Returns:
      An ``optax.Schedule``, ``step -> learning rate``, jit-safe with a traced step.

    >>> lr = step_decay(0.1, total_steps=100, power=2.0)
    >>> round(float(lr(50)), 6), float(lr(100)), float(lr(500))
    (0.025, 0.0, 0.0)
    """
    fn = "schedules.step_decay"
    init = _checks.number(fn, "init", init, positive=False)
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral):
        raise TypeError(f"{fn}: total_steps must be an int, got {total_steps!r}")
    total_steps = int(total_steps)
    if total_steps <= 0:
        raise ValueError(f"{fn}: total_steps must be > 0, got {total_steps!r}")
    power = _checks.number(fn, "power", power, positive=True)
    poly = optax.polynomial_schedule(
        init_value=init, end_value=0.0, power=power, transition_steps=total_steps
    )

    def schedule(count):
        # Under jit XLA may compute 1 - T/T as -3e-8, which a fractional power turns into NaN:
        # the value at and after T is pinned to the end value 0.
        return jnp.where(jnp.asarray(count) >= total_steps, jnp.zeros([], jnp.float32), poly(count))

    return schedule


@public("schedules.exponential_decay")
def exponential_decay(init: float, rate: float) -> optax.Schedule:
    """Per-step exponential decay: ``lr(t) = init * rate ** t``.

    Equal to ``optax.exponential_decay(init, transition_steps=1, decay_rate=rate)`` (it calls it).

    Args:
      init: the learning rate at step 0.
      rate: the factor per step, ``rate > 0`` (``rate < 1`` decays, ``rate > 1`` grows).

    Returns:
      An ``optax.Schedule``, ``step -> learning rate``, jit-safe with a traced step.

    >>> lr = exponential_decay(1.0, 0.5)
    >>> float(lr(0)), float(lr(3))
    (1.0, 0.125)
    """
    fn = "schedules.exponential_decay"
    init = _checks.number(fn, "init", init, positive=False)
    rate = _checks.number(fn, "rate", rate, positive=True)
    return optax.exponential_decay(init_value=init, transition_steps=1, decay_rate=rate)
