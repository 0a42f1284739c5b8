"""Distillation losses: ``kd_loss`` (Hinton et al.), ``hint_loss`` (FitNets) and
``attention_transfer_loss`` (Zagoruyko & Komodakis).

All three are pure functions of arrays: the teacher's outputs enter under ``lax.stop_gradient``, so
a loss can be differentiated with respect to everything without ever moving the teacher. A training
step with a frozen teacher (any framework) is::

    def loss_fn(student_params, x, y):
        t = lax.stop_gradient(teacher_apply(teacher_params, x))   # or precomputed logits
        s = student_apply(student_params, x)
        return kd_loss(s, t, y, temperature=4.0, soft_weight=0.9, hard_weight=0.1)

and only the student's parameters go to the optimizer. ``jaxslim.flax.distill.distill_step`` is
this step for Flax NNX modules.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

__all__ = ["kd_loss", "hint_loss", "attention_transfer_loss"]


def _check_nonneg(fn: str, name: str, value, *, positive: bool = False) -> None:
    """Checks a Python number eagerly; traced values pass unchecked."""
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, jax.Array | numbers.Real) and jnp.ndim(value) == 0:
        v = float(value)
        if not math.isfinite(v) or (v <= 0 if positive else v < 0):
            need = "> 0" if positive else ">= 0"
            raise ValueError(f"{fn}: {name} must be finite and {need}, got {value!r}")
        return
    raise TypeError(f"{fn}: {name} must be a scalar, got {value!r}")


def _float(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"expected floating-point logits, got dtype {x.dtype}")
    return x.astype(jnp.float64 if x.dtype.itemsize > 4 else jnp.float32)


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array | None = None,
    *,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
) -> jax.Array:
    """Knowledge-distillation loss (Hinton, Vinyals & Dean 2015), averaged over the batch.

    ``loss = hard_weight * CE(labels, s) + soft_weight * T^2 * KL(softmax(t/T) || softmax(s/T))``

    with ``s``, ``t`` the student and teacher logits of shape ``(..., classes)``, the KL summed
    over classes and averaged over all leading (batch) axes, and ``CE`` at temperature 1. The
    teacher is under ``stop_gradient``. The ``T^2`` factor keeps the soft term's gradient on the
    same scale for every ``T`` (the gradient of the KL scales as ``1 / T^2``). A teacher logit of
    ``-inf`` (probability 0) contributes 0 (``optax.kl_divergence``); computed in float32 or wider.

    Args:
      student_logits, teacher_logits: ``(..., classes)``, same shape.
      labels: integer class ids ``(...)`` or target probabilities ``(..., classes)``; required
        when ``hard_weight != 0``.
      temperature: ``T > 0``.
      soft_weight, hard_weight: the weights of the two terms, ``>= 0``.

    Returns:
      A scalar.

    >>> import jax.numpy as jnp
    >>> t = jnp.array([[2.0, 0.0, -1.0]])
    >>> float(kd_loss(t, t, temperature=4.0))  # the student already matches the teacher
    0.0
    >>> s = jnp.zeros((1, 3))  # uniform student: CE = log 3, KL = log 3 - H(teacher)
    >>> round(float(kd_loss(s, t, jnp.array([0]), hard_weight=1.0)), 4)
    1.673
    """
    fn = "distill.kd_loss"
    s, t = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    if s.shape != t.shape:
        raise ValueError(
            f"{fn}: student_logits {s.shape} and teacher_logits {t.shape} must have the same shape"
        )
    if s.ndim < 1:
        raise ValueError(f"{fn}: logits need a class axis, got shape {s.shape}")
    _check_nonneg(fn, "temperature", temperature, positive=True)
    _check_nonneg(fn, "soft_weight", soft_weight)
    _check_nonneg(fn, "hard_weight", hard_weight)
    try:
        s, t = _float(s), _float(lax.stop_gradient(t))
    except TypeError as e:
        raise TypeError(f"{fn}: {e}") from None

    log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)
    p_t = jax.nn.softmax(t / temperature, axis=-1)
    soft = jnp.mean(optax.kl_divergence(log_p_s, p_t)) * (temperature * temperature)
    loss = soft_weight * soft
    if isinstance(hard_weight, numbers.Real) and hard_weight == 0:
        return loss
    if labels is None:
        raise ValueError(f"{fn}: labels are required when hard_weight={hard_weight!r} != 0")
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer) and labels.shape == s.shape[:-1]:
        ce = optax.softmax_cross_entropy_with_integer_labels(s, labels)
    elif jnp.issubdtype(labels.dtype, jnp.floating) and labels.shape == s.shape:
        ce = optax.softmax_cross_entropy(s, labels.astype(s.dtype))
    else:
        raise ValueError(
            f"{fn}: labels must be integer ids of shape {s.shape[:-1]} or probabilities of shape "
            f"{s.shape}, got {labels.dtype} {labels.shape}"
        )
    return loss + hard_weight * jnp.mean(ce)


def hint_loss(
    student_features: jax.Array,
    teacher_features: jax.Array,
    regressor: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """FitNets hint loss (Romero et al. 2015): ``mean_b 1/2 ||t_b - r(s_b)||_2^2``.

    ``r`` (``regressor``, e.g. an ``nnx.Linear`` or a 1x1 conv mapping student to teacher width;
    identity when ``None``) is applied to the student features; the squared norm is summed over all
    axes but the first (batch) and averaged over the batch. The teacher is under
    ``stop_gradient``.

    Args:
      student_features: ``(batch, ...)``.
      teacher_features: ``(batch, ...)``, the shape of ``r(student_features)``.
      regressor: callable or ``None``.

    >>> import jax.numpy as jnp
    >>> hint_loss(jnp.zeros((2, 3)), jnp.array([[1.0, 2.0, 2.0], [0.0, 0.0, 1.0]]))
    Array(2.5, dtype=float32)
    """
    fn = "distill.hint_loss"
    s = student_features if regressor is None else regressor(student_features)
    s, t = jnp.asarray(s), lax.stop_gradient(jnp.asarray(teacher_features))
    if s.shape != t.shape or s.ndim < 1:
        what = "student_features" if regressor is None else "regressor(student_features)"
        raise ValueError(
            f"{fn}: {what} {s.shape} and teacher_features {t.shape} must have the "
            f"same shape (batch, ...); pass a regressor to map widths"
        )
    s, t = _float(s), _float(t)
    d = (t - s).reshape(s.shape[0], -1)
    return 0.5 * jnp.mean(jnp.sum(d * d, axis=-1))


def _attention_map(x: jax.Array, p: float, channel_axis: int) -> jax.Array:
    a = jnp.mean(jnp.abs(x) ** p, axis=channel_axis)  # (batch, *spatial)
    a = a.reshape(a.shape[0], -1)
    return a / optax.safe_norm(a, 1e-12, axis=-1, keepdims=True)


def attention_transfer_loss(
    student_features: jax.Array,
    teacher_features: jax.Array,
    *,
    p: float = 2.0,
    channel_axis: int = -1,
) -> jax.Array:
    """Activation-based attention transfer (Zagoruyko & Komodakis 2017).

    The attention map of features ``A`` of shape ``(batch, *spatial, channels)`` (Flax layout) is
    ``Q = mean_c |A_c|^p`` flattened over space and normalized, ``Q / ||Q||_2``; the loss is the
    mean over batch and positions of ``(Q_s - Q_t)^2`` — the authors' released code (add it to the
    task loss with their ``beta / 2``, e.g. ``1e3 / 2``). Student and teacher may have different
    channel counts but need the same batch and spatial shape. The teacher is under
    ``stop_gradient``; the normalization has a finite gradient for all-zero maps.

    Args:
      student_features, teacher_features: ``(batch, *spatial, channels)``.
      p: the exponent (``2`` in the paper), ``> 0``.
      channel_axis: the channel axis (``-1`` for Flax, ``1`` for NCHW).

    >>> import jax.numpy as jnp
    >>> a = jnp.ones((2, 4, 4, 8))
    >>> float(attention_transfer_loss(a, 3 * jnp.ones((2, 4, 4, 16))))  # same map, up to scale
    0.0
    """
    fn = "distill.attention_transfer_loss"
    _check_nonneg(fn, "p", p, positive=True)
    s, t = jnp.asarray(student_features), lax.stop_gradient(jnp.asarray(teacher_features))
    if s.ndim < 2 or t.ndim != s.ndim:
        raise ValueError(
            f"{fn}: features must be (batch, *spatial, channels) with the same ndim, "
            f"got {s.shape} and {t.shape}"
        )
    ax = channel_axis % s.ndim
    if ax == 0 or tuple(_drop_axis(s.shape, ax)) != tuple(_drop_axis(t.shape, ax)):
        raise ValueError(
            f"{fn}: student {s.shape} and teacher {t.shape} must agree on every axis but "
            f"channel_axis={channel_axis} (which must not be the batch axis)"
        )
    qs, qt = _attention_map(_float(s), p, ax), _attention_map(_float(t), p, ax)
    return jnp.mean((qs - qt) ** 2)


def _drop_axis(shape: tuple[int, ...], ax: int) -> tuple[int, ...]:
    return shape[:ax] + shape[ax + 1 :]
