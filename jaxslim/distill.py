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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxslim._checks import hyper, public

__all__ = ["kd_loss", "hint_loss", "attention_transfer_loss"]


def _float(fn: str, name: str, x) -> jax.Array:
    try:
        x = jnp.asarray(x)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an array, got {type(x).__name__}") from None
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: {name} must be floating-point, got dtype {x.dtype}")
    return x.astype(jnp.float64 if x.dtype.itemsize > 4 else jnp.float32)


def _mean(x: jax.Array) -> jax.Array:
    """Mean over all entries; ``0`` for an empty array (finite gradient)."""
    return jnp.sum(x) / max(x.size, 1)


def _h(lam: jax.Array) -> jax.Array:
    """``(lam e^lam - e^lam + 1) / lam^2`` by its series, for ``|lam| < 0.1`` (``h(0) = 1/2``)."""
    return 0.5 + lam * (1 / 3 + lam * (1 / 8 + lam * (1 / 30 + lam * (1 / 144 + lam / 840))))


def _soft_rows(s: jax.Array, t: jax.Array, temperature) -> jax.Array:
    """``T^2 KL(softmax(t/T) || softmax(s/T))`` per row, stable for every ``T > 0``.

    With ``d = t - s``, ``mu = d - T log E_ps[exp(d/T)]`` and ``lam = mu / T = log pt - log ps``,
    ``KL = sum_c ps g(lam)``, ``g(lam) = lam e^lam - e^lam + 1 >= 0`` (no cancellation between
    classes). ``T^2 ps g(lam) = ps mu^2 h(lam)`` by a series where ``|lam| < 0.1`` (this is what
    keeps ``T = 1e30`` finite: the limit is ``Var_ps(t - s) / 2``, Hinton et al. 2015 sec. 2.1),
    and ``T^2 (pt lam - pt + ps)`` elsewhere. Teacher ``-inf`` classes contribute ``T^2 ps``; a
    row with a ``+inf`` teacher logit is one-hot on its ``+inf`` classes; a row whose teacher
    logits are all ``-inf`` has no distribution and gives 0 (gradient 0); a student ``-inf`` where
    the teacher has mass gives ``+inf``.
    """
    T = temperature
    pinf = t == jnp.inf
    t = jnp.where(jnp.any(pinf, -1, keepdims=True), jnp.where(pinf, 0.0, -jnp.inf), t)
    neg = t == -jnp.inf
    dead = jnp.all(neg, -1, keepdims=True)
    neg = neg & ~dead
    t = jnp.where(dead, jnp.zeros_like(t), t)
    log_ps = jax.nn.log_softmax(s / T, axis=-1)
    ps = jnp.exp(log_ps)
    d = jnp.where(neg, jnp.zeros_like(t), t - s)
    x = d / T
    # T log E_ps[e^{d/T}] = T (lse(t/T) - lse(s/T)): by log1p/expm1 when every |d/T| < 1/2 (exact
    # to float precision however large T is), else by logsumexp (no overflow).
    near = jnp.all(neg | (jnp.abs(x) < 0.5), -1, keepdims=True)
    e = jnp.where(neg, -1.0, jnp.expm1(jnp.where(near, x, 0.0)))
    c_near = T * jnp.log1p(jnp.sum(ps * e, -1, keepdims=True))
    t_far = jnp.where(neg | near, -jnp.inf, t / T)
    t_far = jnp.where(near, jnp.zeros_like(t), t_far)  # finite logsumexp in the unused branch
    c_far = T * (
        jax.nn.logsumexp(t_far, -1, keepdims=True) - jax.nn.logsumexp(s / T, -1, keepdims=True)
    )
    mu = d - jnp.where(near, c_near, c_far)
    lam = mu / T
    small = ~neg & (jnp.abs(lam) < 0.1)
    term_small = ps * mu * mu * _h(jnp.where(small, lam, 0.0))
    big = ~neg & ~small
    lam_b = jnp.where(big, lam, 1.0)
    t_b = jnp.where(big, T, 1.0)
    pt = jnp.exp(log_ps + lam_b)
    term_big = (pt * lam_b - pt + ps) * t_b * t_b
    t_n = jnp.where(neg, T, 1.0)
    term_neg = ps * t_n * t_n
    term = jnp.where(neg, term_neg, jnp.where(small, term_small, term_big))
    # A student logit of -inf (probability 0) where the teacher has mass: KL is +inf, exactly.
    impossible = jnp.any((s == -jnp.inf) & ~neg, -1) & ~dead[..., 0]
    rows = jnp.where(dead[..., 0], 0.0, jnp.sum(term, -1))
    return jnp.where(impossible, jnp.inf, rows)


def _hard(fn: str, s: jax.Array, labels) -> jax.Array:
    """Cross-entropy at temperature 1, averaged over the rows with a valid label."""
    try:
        labels = jnp.asarray(labels)
    except TypeError:
        raise TypeError(f"{fn}: labels must be an array, got {type(labels).__name__}") from None
    classes, batch = s.shape[-1], s.shape[:-1]
    if jnp.issubdtype(labels.dtype, jnp.floating) and labels.shape == s.shape:
        log_p = jax.nn.log_softmax(s, axis=-1)
        ce = -jnp.sum(jnp.where(labels == 0, 0.0, labels.astype(s.dtype) * log_p), axis=-1)
        return _mean(ce)
    if labels.shape != batch:
        raise ValueError(
            f"{fn}: labels must be integer ids of shape {batch} or probabilities of shape "
            f"{s.shape}, got {labels.dtype} {labels.shape}"
        )
    if labels.dtype == jnp.bool_ or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"{fn}: labels of shape {batch} must be integer class ids, got dtype {labels.dtype} "
            f"(cast them with labels.astype(jnp.int32))"
        )
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        bad = np.flatnonzero((np.asarray(labels) < 0) | (np.asarray(labels) >= classes))
        if bad.size:
            i = np.unravel_index(bad[0], labels.shape)
            raise ValueError(
                f"{fn}: labels must be class ids in [0, {classes}), got {int(labels[i])} at "
                f"index {tuple(int(j) for j in i)}"
            )
    valid = (labels >= 0) & (labels < classes)
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    log_p = jax.nn.log_softmax(s, axis=-1)
    ce = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
    ce = jnp.where(valid, ce, 0.0)
    return jnp.sum(ce) / jnp.maximum(jnp.sum(valid, dtype=jnp.int32), 1).astype(ce.dtype)


@public("distill.kd_loss")
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
    same scale for every ``T`` (the gradient of the KL scales as ``1 / T^2``). Computed in float32
    or wider, and finite wherever the exact value is:

    * any ``T > 0``: ``T^2 KL`` is evaluated without cancellation, so a huge ``T`` (``1e30``)
      gives its limit ``Var(t - s) / 2`` instead of ``0 * inf``;
    * a teacher logit of ``-inf`` (probability 0) contributes 0; a row whose teacher logits are
      all ``-inf`` has no distribution and contributes 0 (gradient 0); ``+inf`` teacher logits
      make the row one-hot on them;
    * an empty batch (``(0, classes)``) gives ``0`` with a zero gradient;
    * a student logit of ``-inf`` (probability 0) on a class the teacher gives mass to makes the
      KL, and the loss, ``+inf`` (never NaN).

    NaN logits give NaN (they are not hidden).

    Args:
      student_logits, teacher_logits: ``(..., classes)``, same shape, ``classes >= 1``.
      labels: integer class ids ``(...)`` or target probabilities ``(..., classes)``; required
        when ``hard_weight != 0``. Concrete ids outside ``[0, classes)`` raise ``ValueError``,
        float ids ``TypeError``. Traced ids outside the range are *ignored* (as torch's
        ``ignore_index``): such rows add 0 and the hard term averages over the valid rows (0 if
        none) — never scored as another class.
      temperature: ``T > 0``.
      soft_weight, hard_weight: the weights of the two terms, ``>= 0``.

    Concrete hyper-parameters out of range raise ``ValueError``. Traced ones cannot: a traced
    non-positive or non-finite ``temperature`` turns the soft term off, and a traced negative or
    non-finite weight counts as 0.

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
    s = _float(fn, "student_logits", student_logits)
    t = lax.stop_gradient(_float(fn, "teacher_logits", teacher_logits))
    if s.shape != t.shape:
        raise ValueError(
            f"{fn}: student_logits {s.shape} and teacher_logits {t.shape} must have the same shape"
        )
    if s.ndim < 1 or s.shape[-1] < 1:
        raise ValueError(f"{fn}: logits need a class axis with >= 1 class, got shape {s.shape}")
    temperature, t_ok = hyper(fn, "temperature", temperature, positive=True)
    soft_weight, sw_ok = hyper(fn, "soft_weight", soft_weight)
    hard_weight, hw_ok = hyper(fn, "hard_weight", hard_weight)
    use_hard = not (isinstance(hard_weight, float) and hard_weight == 0)
    if use_hard and labels is None:
        raise ValueError(f"{fn}: labels are required when hard_weight={hard_weight!r} != 0")
    loss = jnp.zeros((), s.dtype)
    if not (isinstance(soft_weight, float) and soft_weight == 0):
        soft = _mean(_soft_rows(s, t, temperature))
        on = jnp.asarray(t_ok & sw_ok)
        loss = loss + jnp.where(on, soft_weight * jnp.where(on, soft, 0.0), 0.0).astype(s.dtype)
    if use_hard:
        hard = _hard(fn, s, labels)
        loss = loss + jnp.where(hw_ok, hard_weight * hard, 0.0).astype(s.dtype)
    return loss


@public("distill.hint_loss")
def hint_loss(
    student_features: jax.Array,
    teacher_features: jax.Array,
    *,
    regressor: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """FitNets hint loss (Romero et al. 2015): ``mean_b 1/2 ||t_b - r(s_b)||_2^2``.

    ``r`` (``regressor``, e.g. an ``nnx.Linear`` or a 1x1 conv mapping student to teacher width;
    identity when ``None``) is applied to the student features; the squared norm is summed over all
    axes but the first (batch) and averaged over the batch. The teacher is under
    ``stop_gradient``. An empty batch gives ``0`` (zero gradient); NaN features give NaN.

    Args:
      student_features: ``(batch, ...)``, floating-point.
      teacher_features: ``(batch, ...)``, the shape of ``r(student_features)``.
      regressor: callable or ``None`` (keyword-only).

    >>> import jax.numpy as jnp
    >>> hint_loss(jnp.zeros((2, 3)), jnp.array([[1.0, 2.0, 2.0], [0.0, 0.0, 1.0]]))
    Array(2.5, dtype=float32)
    """
    fn = "distill.hint_loss"
    if regressor is not None and not callable(regressor):
        raise TypeError(f"{fn}: regressor must be a callable or None, got {regressor!r}")
    s = student_features if regressor is None else regressor(student_features)
    what = "student_features" if regressor is None else "regressor(student_features)"
    s = _float(fn, what, s)
    t = lax.stop_gradient(_float(fn, "teacher_features", teacher_features))
    if s.shape != t.shape or s.ndim < 1:
        raise ValueError(
            f"{fn}: {what} {s.shape} and teacher_features {t.shape} must have the "
            f"same shape (batch, ...); pass a regressor to map widths"
        )
    d = t - s
    per_row = jnp.sum((d * d).reshape(s.shape[0], math.prod(s.shape[1:])), axis=-1)
    return 0.5 * _mean(per_row)


def _attention_map(x: jax.Array, p, channel_axis: int) -> jax.Array:
    # Q is invariant to a positive per-sample scale of x: divide by the sample's max |x| first,
    # so |x|^p cannot overflow (large p or large activations) or underflow to 0/0.
    a = jnp.abs(x)
    m = jnp.max(a.reshape(a.shape[0], -1), axis=-1)
    m = lax.stop_gradient(jnp.where(m > 0, m, jnp.ones_like(m)))
    a = a / m.reshape((-1,) + (1,) * (a.ndim - 1))
    a = jnp.mean(a**p, axis=channel_axis)  # (batch, *spatial)
    a = a.reshape(a.shape[0], -1)
    return a / optax.safe_norm(a, 1e-12, axis=-1, keepdims=True)


@public("distill.attention_transfer_loss")
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
    ``stop_gradient``; the normalization has a finite gradient for all-zero maps, and ``Q`` is
    computed after scaling each sample by its largest ``|A|`` (``Q`` does not change), so large
    activations or a large ``p`` do not overflow. An empty batch gives ``0``; NaN features give
    NaN.

    Args:
      student_features, teacher_features: ``(batch, *spatial, channels)``, floating-point.
      p: the exponent (``2`` in the paper), ``> 0``. A concrete bad ``p`` raises ``ValueError``;
        a traced one that is not finite and positive turns the loss off (0).
      channel_axis: the channel axis (``-1`` for Flax, ``1`` for NCHW).

    >>> import jax.numpy as jnp
    >>> a = jnp.ones((2, 4, 4, 8))
    >>> float(attention_transfer_loss(a, 3 * jnp.ones((2, 4, 4, 16))))  # same map, up to scale
    0.0
    """
    fn = "distill.attention_transfer_loss"
    p, p_ok = hyper(fn, "p", p, positive=True)
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, int | np.integer):
        raise TypeError(f"{fn}: channel_axis must be an int, got {channel_axis!r}")
    s = _float(fn, "student_features", student_features)
    t = lax.stop_gradient(_float(fn, "teacher_features", teacher_features))
    if s.ndim < 2 or t.ndim != s.ndim:
        raise ValueError(
            f"{fn}: features must be (batch, *spatial, channels) with the same ndim, "
            f"got {s.shape} and {t.shape}"
        )
    if not -s.ndim <= channel_axis < s.ndim:
        raise ValueError(f"{fn}: channel_axis={channel_axis} is out of range for ndim {s.ndim}")
    ax = channel_axis % s.ndim
    if ax == 0 or tuple(_drop_axis(s.shape, ax)) != tuple(_drop_axis(t.shape, ax)):
        raise ValueError(
            f"{fn}: student {s.shape} and teacher {t.shape} must agree on every axis but "
            f"channel_axis={channel_axis} (which must not be the batch axis)"
        )
    if s.shape[ax] == 0 or t.shape[ax] == 0:
        raise ValueError(f"{fn}: features need >= 1 channel, got {s.shape} and {t.shape}")
    if s.size == 0 or t.size == 0:  # empty batch or no positions
        return jnp.zeros((), s.dtype)
    qs, qt = _attention_map(s, p, ax), _attention_map(t, p, ax)
    loss = jnp.mean((qs - qt) ** 2)
    return jnp.where(p_ok, loss, jnp.zeros_like(loss))


def _drop_axis(shape: tuple[int, ...], ax: int) -> tuple[int, ...]:
    return shape[:ax] + shape[ax + 1 :]
