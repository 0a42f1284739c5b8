"""A distillation training step for Flax NNX: a student learns from a frozen teacher.

The teacher is only ever called, never differentiated or updated: its logits enter ``kd_loss``
under ``stop_gradient`` and only the student's parameters are in the ``nnx.Optimizer``. Put a
teacher with dropout or batch norm in evaluation mode first (``teacher.eval()``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from flax import nnx
from jax import lax

from jaxslim._checks import hyper, public
from jaxslim.distill import kd_loss

__all__ = ["distill_step"]


@functools.partial(nnx.jit, static_argnames=("temperature", "soft_weight", "hard_weight"))
def _step(student, optimizer, x, teacher, labels, *, temperature, soft_weight, hard_weight):
    t = teacher(x) if callable(teacher) else teacher
    t = lax.stop_gradient(t)

    def loss_fn(model):
        return kd_loss(
            model(x),
            t,
            labels,
            temperature=temperature,
            soft_weight=soft_weight,
            hard_weight=hard_weight,
        )

    loss, grads = nnx.value_and_grad(loss_fn)(student)
    optimizer.update(student, grads)
    return loss


@public("flax.distill.distill_step")
def distill_step(
    student: nnx.Module,
    optimizer: nnx.Optimizer,
    x: jax.Array,
    teacher: nnx.Module | Callable[[jax.Array], jax.Array] | jax.Array,
    labels: jax.Array | None = None,
    *,
    temperature: float = 4.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
) -> jax.Array:
    """One jitted step on ``kd_loss(student(x), teacher(x), labels, ...)``; updates the student.

    Args:
      student: the NNX model being trained (updated in place).
      optimizer: ``nnx.Optimizer(student, tx, wrt=nnx.Param)``.
      x: the input batch.
      teacher: a frozen NNX model (or any callable ``x -> logits``), or the teacher's logits for
        ``x`` precomputed once (a frozen teacher's outputs never change, so they can be cached).
      labels: integer labels for the hard term (needed when ``hard_weight != 0``).
      temperature, soft_weight, hard_weight: as in ``jaxslim.distill.kd_loss`` (static: a new
        value compiles a new step).

    Returns:
      The loss before the update (a scalar).

    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> teacher, student = nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Linear(4, 3, rngs=nnx.Rngs(1))
    >>> opt = nnx.Optimizer(student, optax.sgd(0.5), wrt=nnx.Param)
    >>> x = jnp.ones((8, 4))
    >>> losses = [float(distill_step(student, opt, x, teacher)) for _ in range(50)]
    >>> losses[-1] < 0.01 * losses[0]
    True
    """
    fn = "flax.distill.distill_step"
    if not isinstance(student, nnx.Module):
        raise TypeError(f"{fn}: student must be an nnx.Module, got {type(student).__name__}")
    if not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(f"{fn}: optimizer must be an nnx.Optimizer, got {type(optimizer).__name__}")
    if not (callable(teacher) or hasattr(teacher, "shape")):
        raise TypeError(
            f"{fn}: teacher must be an NNX model, a callable x -> logits or an array of logits, "
            f"got {type(teacher).__name__}"
        )
    for name, value in (
        ("temperature", temperature),
        ("soft_weight", soft_weight),
        ("hard_weight", hard_weight),
    ):
        try:
            hash(value)
        except TypeError:
            raise TypeError(
                f"{fn}: {name} must be a Python number (it is static), got {value!r}"
            ) from None
    # static hyper-parameters: checked here, in Python, with this function's name
    hyper(fn, "temperature", temperature, positive=True)
    hyper(fn, "soft_weight", soft_weight)
    hyper(fn, "hard_weight", hard_weight)
    if labels is None and hard_weight != 0:
        raise ValueError(f"{fn}: labels are required when hard_weight={hard_weight!r} != 0")
    return _step(
        student,
        optimizer,
        x,
        teacher,
        labels,
        temperature=temperature,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
    )
