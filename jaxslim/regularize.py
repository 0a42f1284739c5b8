"""Sparsity regularizers as Optax transforms: L1, L2, elastic net and group lasso.

Two forms of each penalty ``R(p)``:

* **Gradient (subgradient) form** — ``add_l1``, ``add_l2``: add ``strength * grad R(p)`` to the
  gradient; put them *before* the optimizer (``optax.chain(add_l1(1e-4), optax.sgd(0.1))``).
  Weights hover around zero but never land on it.
* **Proximal form** — ``prox_l1``, ``prox_elastic_net``, ``prox_group_lasso``: after the optimizer
  has proposed ``p + u``, map it through the proximal operator of ``eta * strength * R``
  (``eta`` = the learning rate), ``p_new = prox(p + u)``. Put them **last** in ``optax.chain``; they
  return ``prox(p + u) - p`` so ``optax.apply_updates`` lands on exact zeros (ISTA / proximal
  gradient descent; with Adam it is the usual proximal-Adam heuristic).

Loss-side terms ``l1_penalty``, ``l2_penalty`` and ``group_lasso_penalty`` return ``R(params)``
with a finite gradient at zero, to add to a loss by hand.

Every strength and learning rate is a number or an ``optax.Schedule`` (``step -> value``, for a
warm-up or decay of the penalty), evaluated at the transform's own step count. A concrete value
that is negative, NaN or infinite raises ``ValueError`` (a number, also as a NumPy or 0-d jax
array, when the transform is made; a schedule's value at step 0 then too, and at every step of an
eager ``update``). Under ``jit`` a schedule's value is traced and cannot raise: a negative, NaN or
infinite strength or learning rate counts as ``0`` for that step, i.e. no penalty and no shrinkage
(weights are never zeroed or grown by a bad value).

Non-finite weights: a NaN entry of ``p + u`` stays NaN where it is (the proximal steps never turn
it into a silent 0) and does not take part in its group's norm, so one NaN neither zeroes nor
rescales the rest of its group; the penalties skip NaN entries likewise (their gradient there is
0). ``where=`` selects
leaves as everywhere in jaxslim (default: float leaves with ``ndim >= 2``, i.e. kernels, not
biases); other leaves' updates pass through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxslim import _tree
from jaxslim._checks import public, scalar
from jaxslim.structures import NM, Blocks, Channels, Structure, Unstructured

__all__ = [
    "RegularizerState",
    "add_l1",
    "add_l2",
    "prox_l1",
    "prox_elastic_net",
    "prox_group_lasso",
    "l1_penalty",
    "l2_penalty",
    "group_lasso_penalty",
]

ScalarOrSchedule = float | Callable[[jax.Array], Any]


class RegularizerState(NamedTuple):
    """State of every regularizer transform: its own step count (for scheduled strengths)."""

    count: jax.Array


def _check_value(fn: str, name: str, value: Any, step: str) -> None:
    """Raises ``ValueError`` for a concrete value that is negative or non-finite."""
    v = scalar(fn, name, value)
    if v is not None and not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{fn}: {name} must be finite and >= 0, got {v!r}{step}")


def _guard(value: Any) -> jax.Array:
    """A traced value that is negative, NaN or infinite counts as 0 (no step)."""
    v = jnp.asarray(value)
    return jnp.where(jnp.isfinite(v) & (v >= 0), v, jnp.zeros_like(v))


def _schedule(fn: str, name: str, value: ScalarOrSchedule) -> Callable[[Any], Any]:
    """``value`` as a schedule; raises for a negative, non-finite or non-numeric value.

    A schedule's value is checked at step 0 when the transform is made and at every step whose
    value is concrete (eager ``update``); a traced bad value is guarded to 0 (``_guard``).
    """
    if callable(value):
        sched = value

        def raw(t):
            # Some optax schedules mix float and int32 arithmetic; allow it under strict promotion.
            with jax.numpy_dtype_promotion("standard"):
                return sched(t)

        def scheduled(t):
            v = raw(t)
            step = " at step (traced)" if isinstance(t, jax.core.Tracer) else f" at step {int(t)}"
            _check_value(fn, name, v, f" from the schedule{step}")
            return _guard(v)

        try:  # a concrete value at step 0 can be checked eagerly
            v0 = raw(jnp.zeros([], jnp.int32))
        except jax.errors.ConcretizationTypeError:
            return scheduled
        _check_value(fn, name, v0, " from the schedule at step 0")
        return scheduled
    try:
        v = scalar(fn, name, value)
    except TypeError:
        raise TypeError(
            f"{fn}: {name} must be a float or an optax schedule, got {value!r}"
        ) from None
    if v is None:  # traced (the transform is built inside jit): guard it
        return lambda _: _guard(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{fn}: {name} must be finite and >= 0, got {value!r}")
    return lambda _: v


def _regularizer(
    fn: str,
    where: _tree.Where,
    leaf_update: Callable[[jax.Array, str, jax.Array, jax.Array], jax.Array],
    check_leaf: Callable[[str, jax.Array], None] | None = None,
) -> optax.GradientTransformation:
    """A transform mapping ``leaf_update(count, path, p, u) -> u'`` over the selected leaves."""
    _check_where(fn, where)

    def init_fn(params):
        paths = set(_tree.selected_paths(params, where))
        if check_leaf is not None:
            for path, leaf in _tree.leaves_with_paths(params):
                if path in paths:
                    check_leaf(path, leaf)
        return RegularizerState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{fn}: params are required (call tx.update(grads, state, params))")
        if not isinstance(state, RegularizerState):
            raise TypeError(
                f"{fn}: state must be the RegularizerState from init, got {state!r:.80}"
            )
        t = state.count
        new = _tree.map_selected(
            lambda path, p, u: leaf_update(t, path, p, u),
            params,
            updates,
            where=where,
            unselected=lambda p, u: u,
        )
        return new, RegularizerState(count=optax.safe_increment(t))

    return optax.GradientTransformation(public(fn)(init_fn), public(fn)(update_fn))


def _check_where(fn: str, where: Any) -> None:
    """Raises ``TypeError``/``ValueError`` naming ``fn`` for a ``where=`` of the wrong kind."""
    _tree.check_where(where)


def _cast(value: Any, dtype) -> jax.Array:
    return jnp.asarray(value).astype(dtype)


def _wide(dtype) -> Any:
    """float32, or float64 for float64 leaves: the accumulation dtype of norms and sums."""
    return jnp.float64 if jnp.dtype(dtype).itemsize > 4 else jnp.float32


@public("regularize.add_l1")
def add_l1(
    strength: ScalarOrSchedule, *, where: _tree.Where = None
) -> optax.GradientTransformation:
    """Adds the L1 subgradient ``strength * sign(p)`` to the updates (before the optimizer).

    The penalty is ``strength * ||p||_1``. This subgradient form **never gives exact zeros**: a
    weight near zero flips sign every step and oscillates around it with an amplitude of about
    ``learning_rate * strength``. For exact zeros use ``prox_l1`` instead.

    Args:
      strength: ``lambda >= 0``, a float or an ``optax.Schedule``.
      where: which leaves (default: float leaves with ``ndim >= 2``).

    Returns:
      An ``optax.GradientTransformation`` with ``RegularizerState``; ``update`` needs ``params``.

    >>> import jax.numpy as jnp
    >>> p = {"w": jnp.array([[2.0, -3.0, 0.0], [1.0, 0.0, -1.0]])}
    >>> u, _ = add_l1(0.5).update({"w": jnp.zeros((2, 3))}, add_l1(0.5).init(p), p)
    >>> u["w"]
    Array([[ 0.5, -0.5,  0. ],
           [ 0.5,  0. , -0.5]], dtype=float32)
    """
    fn = "regularize.add_l1"
    strength = _schedule(fn, "strength", strength)

    def leaf(t, path, p, u):
        return u + _cast(strength(t), u.dtype) * jnp.sign(p).astype(u.dtype)

    return _regularizer(fn, where, leaf)


@public("regularize.add_l2")
def add_l2(
    strength: ScalarOrSchedule, *, where: _tree.Where = None
) -> optax.GradientTransformation:
    """Adds the L2 gradient ``2 * strength * p`` to the updates (before the optimizer).

    The penalty is ``strength * ||p||_2^2``, so ``add_l2(s)`` equals
    ``optax.add_decayed_weights(2 * s)`` (whose penalty is ``wd / 2 * ||p||^2``). Placed before
    ``optax.adam`` this is *coupled* L2: the penalty's gradient is divided by Adam's running RMS of
    the total gradient, which itself grows with ``strength``, so the effective decay barely depends
    on ``strength`` (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"). For a
    decay that scales with its coefficient under Adam use ``optax.adamw`` (decoupled: ``p -= lr *
    wd * p`` after the Adam step).

    Args:
      strength: ``lambda >= 0``, a float or an ``optax.Schedule``.
      where: which leaves (default: float leaves with ``ndim >= 2``).

    Returns:
      An ``optax.GradientTransformation`` with ``RegularizerState``; ``update`` needs ``params``.

    >>> import jax.numpy as jnp
    >>> p = {"w": jnp.array([[2.0, -3.0], [0.0, 1.0]])}
    >>> u, _ = add_l2(0.25).update({"w": jnp.ones((2, 2))}, add_l2(0.25).init(p), p)
    >>> u["w"]
    Array([[ 2. , -0.5],
           [ 1. ,  1.5]], dtype=float32)
    """
    fn = "regularize.add_l2"
    strength = _schedule(fn, "strength", strength)

    def leaf(t, path, p, u):
        return u + (2 * _cast(strength(t), u.dtype)) * p.astype(u.dtype)

    return _regularizer(fn, where, leaf)


def _soft_threshold(z: jax.Array, tau: jax.Array, shrink: Any = None) -> jax.Array:
    """``S_tau(z) = sign(z) * max(|z| - tau, 0)`` (``/ shrink``): exact zeros where ``|z| <= tau``.

    A NaN entry of ``z`` stays NaN. The division by the scalar ``shrink`` is a multiplication
    by its reciprocal, written out: XLA rewrites ``x / broadcast(c)`` differently inside and
    outside a fusion, so a plain division made ``jit`` and eager differ by 1 ulp.
    """
    out = jnp.where(jnp.abs(z) > tau, z - jnp.sign(z) * tau, jnp.zeros_like(z))
    if shrink is not None:
        out = out * (jnp.ones((), out.dtype) / shrink)
    return jnp.where(jnp.isnan(z), z, out)


@public("regularize.prox_l1")
def prox_l1(
    strength: ScalarOrSchedule,
    learning_rate: ScalarOrSchedule,
    *,
    where: _tree.Where = None,
) -> optax.GradientTransformation:
    """Proximal L1 step (ISTA soft threshold), last in ``optax.chain``: exact zeros.

    With ``z = p + u`` the parameters the optimizer proposes, the new parameters are
    ``p_new = S_tau(z) = sign(z) * max(|z| - tau, 0)`` with
    ``tau = learning_rate(t) * strength(t)``, the proximal operator of ``tau * ||.||_1``
    (Daubechies et al. 2004; Beck & Teboulle 2009).
    It returns ``S_tau(p + u) - p``, so ``optax.apply_updates`` lands on exact zeros and keeps a
    zero weight at zero unless one step's update exceeds ``tau``. Works unchanged with
    ``TrainState.apply_gradients`` and ``nnx.Optimizer.update``.

    Args:
      strength: ``lambda >= 0`` of the penalty ``lambda * ||p||_1``; float or schedule.
      learning_rate: the optimizer's learning rate (float or the same schedule), ``eta >= 0``.
      where: which leaves (default: float leaves with ``ndim >= 2``).

    Returns:
      An ``optax.GradientTransformation`` with ``RegularizerState``; ``update`` needs ``params``.

    >>> import jax.numpy as jnp, optax
    >>> p = {"w": jnp.array([[0.5, -0.05, 0.02, -1.0], [0.1, 0.2, -0.3, 0.0]])}
    >>> tx = optax.chain(optax.sgd(0.1), prox_l1(1.0, learning_rate=0.1))
    >>> u, _ = tx.update({"w": jnp.zeros((2, 4))}, tx.init(p), p)
    >>> optax.apply_updates(p, u)["w"][0]
    Array([ 0.4,  0. ,  0. , -0.9], dtype=float32)
    """
    fn = "regularize.prox_l1"
    strength = _schedule(fn, "strength", strength)
    learning_rate = _schedule(fn, "learning_rate", learning_rate)

    def leaf(t, path, p, u):
        z = p + u.astype(p.dtype)
        tau = _cast(learning_rate(t) * strength(t), p.dtype)
        return (_soft_threshold(z, tau) - p).astype(u.dtype)

    return _regularizer(fn, where, leaf)


@public("regularize.prox_elastic_net")
def prox_elastic_net(
    l1: ScalarOrSchedule,
    l2: ScalarOrSchedule,
    learning_rate: ScalarOrSchedule,
    *,
    where: _tree.Where = None,
) -> optax.GradientTransformation:
    """Proximal elastic-net step, last in ``optax.chain``: exact zeros plus L2 shrinkage.

    The penalty is ``l1 * ||p||_1 + l2 * ||p||_2^2`` (Zou & Hastie 2005); its proximal operator at
    step size ``eta`` is ``p_new = S_{eta * l1}(z) / (1 + 2 * eta * l2)`` with ``z = p + u``.
    Returns ``p_new - p``. ``l2 = 0`` is ``prox_l1``.

    Args:
      l1, l2: the penalty strengths (``>= 0``), floats or schedules.
      learning_rate: the optimizer's learning rate (float or schedule).
      where: which leaves (default: float leaves with ``ndim >= 2``).

    >>> import jax.numpy as jnp, optax
    >>> p = {"w": jnp.array([[0.5, -0.05], [-1.25, 0.0]])}
    >>> tx = prox_elastic_net(1.0, 2.0, learning_rate=0.25)  # (0.5 - 0.25) / (1 + 1)
    >>> u, _ = tx.update({"w": jnp.zeros((2, 2))}, tx.init(p), p)
    >>> optax.apply_updates(p, u)["w"]
    Array([[ 0.125,  0.   ],
           [-0.5  ,  0.   ]], dtype=float32)
    """
    fn = "regularize.prox_elastic_net"
    l1 = _schedule(fn, "l1", l1)
    l2 = _schedule(fn, "l2", l2)
    learning_rate = _schedule(fn, "learning_rate", learning_rate)

    def leaf(t, path, p, u):
        z = p + u.astype(p.dtype)
        eta = learning_rate(t)
        tau = _cast(eta * l1(t), p.dtype)
        shrink = _cast(1 + 2 * eta * l2(t), p.dtype)
        return (_soft_threshold(z, tau, shrink) - p).astype(u.dtype)

    return _regularizer(fn, where, leaf)


_UNSET: Any = object()


def _structure_arg(fn: str, structure: Any) -> Structure:
    """Checks ``structure=`` (default ``Channels(axis=-1)``)."""
    if structure is _UNSET:
        structure = Channels(axis=-1)
    if isinstance(structure, NM) or not isinstance(structure, Unstructured | Channels | Blocks):
        hint = ""
        if isinstance(structure, type) and issubclass(structure, Structure):
            hint = f" (a class: write {structure.__name__}())"
        raise TypeError(
            f"{fn}: structure must be Unstructured(), Channels(axis=...) or Blocks(shape), got "
            f"{structure!r}{hint}"
        )
    if isinstance(structure, Channels | Blocks) and structure.ord != 2:
        raise ValueError(
            f"{fn}: group lasso uses 2-norms of groups; got ord={structure.ord!r} in {structure!r}"
        )
    return structure


def _check_leaf(fn: str, structure: Structure, path: str, shape) -> None:
    try:
        structure.check(tuple(shape), path)
    except ValueError as e:
        raise ValueError(f"{fn}: {e}") from None


def _group_norms(x: jax.Array, structure: Structure) -> jax.Array:
    """2-norm of each group (shape of ``structure.reduce(x)``), zero gradient at zero.

    NaN entries are left out of their group's norm (and get a zero gradient).
    """
    x = jnp.where(jnp.isnan(x), jnp.zeros_like(x), x)
    if isinstance(structure, Unstructured):
        return x * lax.stop_gradient(jnp.sign(x))  # |x| with gradient sign(x), 0 at 0
    if isinstance(structure, Channels):
        ax = structure.axis % x.ndim
        cols = jnp.moveaxis(x, ax, -1).reshape(-1, x.shape[ax])  # (group size, channels)
        return optax.safe_norm(cols, 0.0, axis=0)
    full = (1,) * (x.ndim - len(structure.shape)) + structure.shape
    split = [d for s, b in zip(x.shape, full, strict=True) for d in (s // b, b)]
    tiles = x.reshape(split).transpose(*range(0, 2 * x.ndim, 2), *range(1, 2 * x.ndim, 2))
    return optax.safe_norm(tiles.reshape(*tiles.shape[: x.ndim], -1), 0.0, axis=-1)


@public("regularize.prox_group_lasso")
def prox_group_lasso(
    strength: ScalarOrSchedule,
    learning_rate: ScalarOrSchedule,
    *,
    structure: Structure = _UNSET,
    where: _tree.Where = None,
) -> optax.GradientTransformation:
    """Proximal group-lasso step (block soft threshold), last in chain: whole groups reach zero.

    For each group ``g`` of ``z = p + u`` (default: output channels, the last axis of a Flax
    kernel ``(in, out)`` / ``(*spatial, in, out)``; for Equinox ``(out, in, ...)`` weights pass
    ``structure=Channels(axis=0)``):
    ``p_new_g = z_g * max(0, 1 - tau_g / ||z_g||_2)`` with
    ``tau_g = learning_rate(t) * strength(t) * sqrt(|g|)``, the proximal operator of
    ``strength * sum_g sqrt(|g|) ||p_g||_2`` (Yuan & Lin 2006; ``group_lasso_penalty``). A group is
    either entirely zero or scaled as a whole, never zeroed in part — the zero channels are what
    ``splice`` removes. Returns ``p_new - p``.

    A NaN entry of ``z`` is left out of its group's norm and stays NaN; the rest of the group is
    shrunk as if it were absent. An infinite entry makes its group's norm infinite: the group is
    kept unchanged. Bad scheduled values: see the module docstring.

    Args:
      strength: ``lambda >= 0``, float or schedule.
      learning_rate: the optimizer's learning rate (float or schedule).
      structure: ``Channels(axis)`` (default ``axis=-1``), ``Blocks(shape)`` or
        ``Unstructured()`` (which is ``prox_l1``); 2-norm groups only.
      where: which leaves (default: float leaves with ``ndim >= 2``).

    >>> import jax.numpy as jnp, optax
    >>> p = {"w": jnp.array([[2.0, 0.1], [2.0, -0.1], [2.0, 0.1], [2.0, 0.1]])}  # (in=4, out=2)
    >>> tx = prox_group_lasso(1.0, learning_rate=1.0)  # tau_g = 1 * 1 * sqrt(4) = 2
    >>> u, _ = tx.update({"w": jnp.zeros((4, 2))}, tx.init(p), p)
    >>> optax.apply_updates(p, u)["w"].T  # norms 4 and 0.2: halved, and zeroed
    Array([[1., 1., 1., 1.],
           [0., 0., 0., 0.]], dtype=float32)
    """
    fn = "regularize.prox_group_lasso"
    structure = _structure_arg(fn, structure)
    strength = _schedule(fn, "strength", strength)
    learning_rate = _schedule(fn, "learning_rate", learning_rate)

    def check_leaf(path, leaf):
        _check_leaf(fn, structure, path, leaf.shape)

    def leaf(t, path, p, u):
        # one rounding, at the end: jit and eager agree for bf16 leaves
        acc = _wide(p.dtype)
        z = p.astype(acc) + u.astype(acc)
        norms = _group_norms(z, structure)
        root = math.sqrt(structure.group_size(z.shape))
        tau = _cast(learning_rate(t) * strength(t), acc) * jnp.asarray(root, acc)
        keep = norms > tau
        scale = jnp.where(keep, 1 - tau / jnp.where(keep, norms, 1), jnp.zeros_like(norms))
        scale = _tree.match_sharding(structure.expand(scale, z.shape), z)
        new = jnp.where(scale > 0, z * scale, jnp.zeros_like(z))
        new = jnp.where(jnp.isnan(z), z, new)  # a NaN stays where it is, visible
        return (new - p.astype(acc)).astype(u.dtype)

    return _regularizer(fn, where, leaf, check_leaf)


def _penalty(fn: str, params: Any, where: _tree.Where, term: Callable[[str, Any], jax.Array]):
    _check_where(fn, where)
    parts = _tree.map_selected(
        lambda path, p: term(path, p.astype(_wide(p.dtype))),
        params,
        where=where,
        unselected=lambda _: None,
    )
    leaves = jax.tree.leaves(parts)
    dtype = max((x.dtype for x in leaves), key=lambda d: jnp.dtype(d).itemsize)
    return sum((x.astype(dtype) for x in leaves[1:]), leaves[0].astype(dtype))


@public("regularize.l1_penalty")
def l1_penalty(params: Any, *, where: _tree.Where = None) -> jax.Array:
    """``sum_i |p_i|`` over the selected leaves (a scalar, float32 or wider).

    Its gradient is ``sign(p)`` — ``0`` at ``p = 0``, the same subgradient ``add_l1`` uses (plain
    ``jnp.abs`` has ``jax.grad(jnp.abs)(0.0) == 1``, which pushes zero weights off zero). Add
    ``strength * l1_penalty(params)`` to a loss.

    >>> import jax, jax.numpy as jnp
    >>> p = {"w": jnp.array([[1.0, -2.0, 0.0], [0.0, 0.0, 0.0]]), "b": jnp.array([5.0])}
    >>> l1_penalty(p), jax.grad(l1_penalty)(p)["w"][0]
    (Array(3., dtype=float32), Array([ 1., -1.,  0.], dtype=float32))
    """

    def term(path, p):
        return jnp.sum(p * lax.stop_gradient(jnp.sign(p)))

    return _penalty("regularize.l1_penalty", params, where, term)


@public("regularize.l2_penalty")
def l2_penalty(params: Any, *, where: _tree.Where = None) -> jax.Array:
    """``sum_i p_i^2`` over the selected leaves (squared 2-norm; gradient ``2 p``).

    ``jax.grad(lambda p: s * l2_penalty(p))`` is the update ``add_l2(s)`` adds.

    >>> import jax.numpy as jnp
    >>> l2_penalty({"w": jnp.array([[1.0, -2.0], [0.0, 0.0]])})
    Array(5., dtype=float32)
    """
    return _penalty("regularize.l2_penalty", params, where, lambda _, p: jnp.sum(p * p))


@public("regularize.group_lasso_penalty")
def group_lasso_penalty(
    params: Any,
    *,
    structure: Structure = _UNSET,
    where: _tree.Where = None,
) -> jax.Array:
    """``sum_g sqrt(|g|) * ||p_g||_2`` over the groups of the selected leaves (Yuan & Lin 2006).

    ``structure`` as in ``prox_group_lasso`` (whose step is the proximal operator of
    ``strength * group_lasso_penalty``). The norms use
    ``optax.safe_norm``: the gradient of an all-zero group is ``0``, not ``NaN``. NaN entries are
    left out of their group's norm (gradient 0 there), so one NaN does not turn its whole group's
    gradient into NaN.

    >>> import jax, jax.numpy as jnp
    >>> p = {"w": jnp.array([[3.0, 0.0], [4.0, 0.0]])}
    >>> group_lasso_penalty(p)  # sqrt(2) * (5 + 0)
    Array(7.071068, dtype=float32)
    >>> jax.grad(group_lasso_penalty)(p)["w"][:, 1]
    Array([0., 0.], dtype=float32)
    """
    fn = "regularize.group_lasso_penalty"
    structure = _structure_arg(fn, structure)

    def term(path, p):
        _check_leaf(fn, structure, path, p.shape)
        root = jnp.asarray(math.sqrt(structure.group_size(p.shape)), p.dtype)
        return root * jnp.sum(_group_norms(p, structure))

    return _penalty(fn, params, where, term)
