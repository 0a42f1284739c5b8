"""The pruning transforms: ``pruner`` (scheduled masks) and ``keep_mask`` (a fixed mask).

Both go **last** in ``optax.chain``. They return ``u' = where(mask, u, -p)``, so that
``optax.apply_updates(p, u')`` lands pruned weights on exact zeros and keeps them there — with
``flax.training.train_state.TrainState.apply_gradients`` and ``flax.nnx.Optimizer.update`` as they
are, with no extra call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxslim import _tree
from jaxslim._checks import public, scalar
from jaxslim.prune._masks import (
    apply_mask,
    check_leaf_structure,
    check_mask_leaf,
    check_sparsity,
    check_structure,
    check_where,
    explicitly_sharded,
    flat_index,
    is_sparsity_tree,
    lowest_k,
    num_to_prune,
    per_leaf_sparsity,
    topk_mask,
)
from jaxslim.prune._schedules import SparsitySchedule, constant_schedule
from jaxslim.prune._scores import magnitude
from jaxslim.structures import NM, Structure, Unstructured, float_keys


class PrunerState(NamedTuple):
    """State of ``pruner``: the step count and the current mask tree."""

    count: jax.Array
    masks: optax.Params


class MaskState(NamedTuple):
    """State of ``keep_mask``: the fixed mask tree."""

    masks: optax.Params


class SparseState(NamedTuple):
    """State of the sparse-training transforms (``rigl``, ``set_sparse``, ``static_sparse``,
    ``ste``, ``sr_ste``): the step count, the mask tree, the PRNG key and the state of a wrapped
    ``optimizer`` (``None`` without one)."""

    count: jax.Array
    masks: optax.Params
    key: jax.Array
    inner: Any


def _masked_updates(fn: str, updates, params, masks):
    if params is None:
        raise ValueError(f"{fn}: params are required (call tx.update(grads, state, params))")

    def one(path, u, p, m):
        if m is None:
            return u
        name = _tree.path_str(path)
        check_mask_leaf(fn, name, p, m)
        return jnp.where(m, u, -p).astype(u.dtype)

    return jax.tree_util.tree_map_with_path(one, updates, params, masks)


def lowest_k_leaf(key: jax.Array, k) -> jax.Array:
    """Marks the ``k`` lowest of one leaf's ``uint32`` keys (ties by flat index): ``lowest_k([key],
    k)[0]``, written small.

    The mask update runs under ``lax.cond`` in every step's program, and on XLA:CPU each step pays
    for every buffer of the program, the untaken branch's included (about 0.1 us each). So the
    radix select's passes (4 of 256 bins below 65536 keys, else 2 of 65536) are one ``fori_loop``
    body, the prefix sum is an ``associative_scan`` and the bin lookup a ``searchsorted``
    (elementwise: no reduction buffers), and the cut among keys equal to the threshold is a
    ``while_loop`` that does not run when all of them go (the usual case). Same result, no
    gather (histograms are scatter-adds into a replicated array); under a mesh with ``Explicit``
    axes it defers to ``lowest_k``.
    """
    if explicitly_sharded(key):
        return lowest_k([key], k)[0]
    k = jnp.asarray(k, jnp.int32)
    bits = 8 if key.size < 1 << 16 else 16  # 4 passes of 256 bins or 2 of 65536
    bins, digit_mask = 1 << bits, jnp.uint32((1 << bits) - 1)

    def radix(i, carry):  # pass i histograms digit i (from the top) of the keys that match t above
        t, rank, _ = carry
        shift = jnp.uint32(32 - bits) - i.astype(jnp.uint32) * jnp.uint32(bits)
        above = shift + jnp.uint32(bits)  # 32 in pass 0: every key matches
        live = (i == 0) | ((key >> above) == (t >> above))
        digit = jnp.where(live, ((key >> shift) & digit_mask).astype(jnp.int32), bins)
        h = jnp.zeros(bins, jnp.int32).at[digit].add(jnp.int32(1), mode="drop")
        c = lax.associative_scan(jnp.add, h)
        b = jnp.searchsorted(c, rank, side="left", method="scan_unrolled").astype(jnp.int32)
        b = jnp.minimum(b, bins - 1)  # the first bin whose cumulative count reaches `rank`
        return t | (b.astype(jnp.uint32) << shift), rank - (c[b] - h[b]), h[b]

    init = (jnp.uint32(0), jnp.maximum(k, 1), jnp.int32(0))
    t, need, n_eq = lax.fori_loop(0, 32 // bits, radix, init)  # t: the k-th key; prune `need`
    flat = flat_index(key.shape)

    def cut_step(lohi):  # the smallest cut with #{key == t, flat < cut} >= need
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = jnp.sum((key == t) & (flat < mid), dtype=jnp.int32) >= need
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo = jnp.where(need >= n_eq, jnp.int32(key.size), 0)
    _, cut = lax.while_loop(lambda lohi: lohi[0] < lohi[1], cut_step, (lo, jnp.int32(key.size)))
    return ((key < t) | ((key == t) & (flat < cut))) & (k > 0)


def _layer_masks(fn: str, scores, sparsity, structure: Structure, where) -> optax.Params:
    """``topk_mask(scores, sparsity, structure=structure, scope="layer", where=where)`` for a
    non-``NM`` structure, each leaf selected by ``lowest_k_leaf``: the same groups, counts and
    order, in a smaller program (see ``lowest_k_leaf``)."""
    paths = _tree.selected_paths(scores, where)
    per_leaf = per_leaf_sparsity(fn, sparsity, scores, paths, "layer")

    def one(path, x):
        groups = structure.reduce(x)
        s = sparsity if per_leaf is None else per_leaf[path]
        k = num_to_prune(s, groups.size, what=f" for {path!r}")
        pruned = lowest_k_leaf(float_keys(groups), k)
        return _tree.match_sharding(structure.expand(~pruned, x.shape), x)

    return _tree.map_selected(one, scores, where=where, unselected=lambda *_: None)


def _step(t) -> str:
    return "(traced)" if isinstance(t, jax.core.Tracer) else str(int(t))


@public("prune.pruner")
def pruner(
    schedule: SparsitySchedule | float,
    *,
    score: Callable[[optax.Params], optax.Params] = magnitude,
    structure: Structure = Unstructured(),
    scope: str = "layer",
    where: _tree.Where = None,
) -> optax.GradientTransformation:
    """Prunes during training on a sparsity schedule (Zhu & Gupta 2017), last in ``optax.chain``.

    At step ``t`` (its own count) the transform recomputes the masks when ``t == 0`` or the
    scheduled sparsity changes, ``s(t) != s(t-1)``: ``topk_mask(score(apply_mask(p, masks)), s(t),
    ...)`` from the current parameters ``p`` (the result of all earlier updates), under
    ``lax.cond``, so steps between updates only apply the mask. It returns ``where(mask, u, -p)``:
    after ``optax.apply_updates`` every pruned weight is exactly zero at the end of the step that
    pruned it, and stays zero. Weights pruned once stay pruned under magnitude-like scores (they
    are scored at 0).

    A schedule value that is out of range is handled by whether it is concrete: in an eager
    ``update`` (step and schedule concrete) a sparsity outside ``[0, 1]`` or NaN raises
    ``ValueError`` naming the step; under ``jit`` it is guarded instead: clipped to ``[0, 1]``,
    and a NaN sparsity keeps the current masks (no recompute) until the schedule is finite again.

    A NaN or infinite weight ranks lowest/highest as in ``topk_mask``, but ``p + (-p)`` is not 0
    for it: a pruned non-finite weight stays non-finite after ``apply_updates``; clear it with
    ``apply_mask``.

    Scoring ``p`` rather than ``p + u`` is deliberate: a ``lax.cond`` that reads ``u`` forces XLA
    to materialize the whole update, which costs ~10 % of a small MLP's Adam step on CPU; reading
    ``p`` costs ~2 %.

    Args:
      schedule: ``step -> sparsity`` (``polynomial_schedule``, ``one_shot_schedule``, ...), a
        number (Python, NumPy or 0-d array) for a constant sparsity from step 0, or a per-leaf
        tree of constant sparsities (``erk(params, 0.9)``, ``uniform``; ``scope="layer"``).
      score: ``params -> scores`` (``magnitude``; ``functools.partial(random, key)``).
      structure, scope, where: as in ``topk_mask``.

    Returns:
      An ``optax.GradientTransformation`` whose state is a ``PrunerState``; read its masks with
      ``masks_of(opt_state)``.

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.array([[1.0, -4.0], [0.5, 2.0]])}
    >>> tx = optax.chain(optax.sgd(0.0), pruner(0.5))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([[ 0., -4.],
           [ 0.,  2.]], dtype=float32)
    """
    fn = "prune.pruner"
    per_leaf = None
    if is_sparsity_tree(schedule):  # per-leaf constant sparsities (erk, uniform)
        per_leaf = schedule
        for path, v in _tree.leaves_with_paths(schedule):
            check_sparsity(v, fn=fn, what=f" for {path!r}")
        schedule = constant_schedule(0.0)
    elif not callable(schedule):
        try:
            schedule = constant_schedule(schedule)
        except TypeError:
            raise TypeError(
                f"{fn}: schedule must be a number in [0, 1] or a callable step -> sparsity, "
                f"got {schedule!r}"
            ) from None
        except ValueError as e:
            raise ValueError(f"{fn}: {e}") from None
    if not callable(score):
        raise TypeError(f"{fn}: score must be a callable params -> scores, got {score!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"{fn}: scope must be 'layer' or 'global', got {scope!r}")
    check_structure(fn, structure)
    check_where(fn, where)

    def init_fn(params):
        paths = _tree.selected_paths(params, where)
        for path, leaf in _tree.leaves_with_paths(params):
            if path in paths:
                check_leaf_structure(fn, structure, path, leaf.shape)
        masks = _tree.map_selected(
            lambda _, p: jnp.ones(p.shape, jnp.bool_),
            params,
            where=where,
            unselected=lambda *_: None,
        )
        return PrunerState(count=jnp.zeros([], jnp.int32), masks=masks)

    def _scheduled(t):
        s = schedule(t)
        c = scalar(fn, "the scheduled sparsity", s)
        if c is not None and not 0.0 <= c <= 1.0:
            raise ValueError(
                f"{fn}: the schedule gave sparsity {c!r} at step {_step(t)}; it must be in [0, 1]"
            )
        return jnp.asarray(s, jnp.float32)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{fn}: params are required (call tx.update(grads, state, params))")
        if not isinstance(state, PrunerState):
            raise TypeError(f"{fn}: state must be the PrunerState from init, got {state!r:.80}")
        t = state.count
        s = _scheduled(t)
        s_prev = _scheduled(jnp.maximum(t - 1, 0))
        ok = jnp.isfinite(s)  # a traced NaN sparsity keeps the current masks
        s = jnp.clip(jnp.where(ok, s, 0), 0, 1)
        recompute = ((t == 0) | (s != jnp.clip(s_prev, 0, 1))) & ok

        if per_leaf is not None:
            recompute = t == 0

        def new_masks():
            scores = score(apply_mask(params, state.masks))
            sparsity = s if per_leaf is None else per_leaf
            if scope == "global" or isinstance(structure, NM):
                return topk_mask(scores, sparsity, structure=structure, scope=scope, where=where)
            return _layer_masks(fn, scores, sparsity, structure, where)

        masks = lax.cond(recompute, new_masks, lambda: state.masks)
        new_updates = _masked_updates(fn, updates, params, masks)
        return new_updates, PrunerState(count=optax.safe_increment(t), masks=masks)

    return optax.GradientTransformation(public(fn)(init_fn), public(fn)(update_fn))


@public("prune.keep_mask")
def keep_mask(mask: optax.Params) -> optax.GradientTransformation:
    """Holds a fixed mask, last in ``optax.chain``: pruned weights become and stay exactly zero.

    Use it to fine-tune after one-shot pruning: ``mask = topk_mask(magnitude(params), 0.9)``.

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> tx = optax.chain(optax.sgd(0.1), keep_mask({"w": jnp.array([True, False])}))
    >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([0.9, 0. ], dtype=float32)
    """
    fn = "prune.keep_mask"

    def init_fn(params):
        _tree.check_same_structure(params, mask)
        jax.tree_util.tree_map_with_path(
            lambda path, p, m: m is None or check_mask_leaf(fn, _tree.path_str(path), p, m),
            params,
            mask,
        )
        # copies: a train step that donates its state must not delete the caller's mask arrays
        return MaskState(masks=jax.tree.map(jnp.copy, mask))

    def update_fn(updates, state, params=None):
        return _masked_updates(fn, updates, params, state.masks), state

    return optax.GradientTransformation(public(fn)(init_fn), public(fn)(update_fn))


def _unwrap(x: Any) -> Any:
    # Optimizer states held by flax.nnx wrap arrays in Variables; return the arrays.
    return x.get_value() if hasattr(x, "get_value") else getattr(x, "value", x)


@public("prune.masks_of")
def masks_of(opt_state: Any) -> optax.Params:
    """The mask tree held by the first ``pruner``, ``keep_mask`` or sparse-training transform
    (``rigl``, ``set_sparse``, ``static_sparse``, ``ste``, ``sr_ste``) inside ``opt_state``.

    Works on any optimizer state (nested ``optax.chain`` tuples, ``optax.inject_hyperparams``,
    ``TrainState.opt_state``, ``nnx.Optimizer.opt_state``). Raises ``ValueError`` if none is found.
    """
    found = jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, PrunerState | MaskState | SparseState)
    )
    for node in found:
        if isinstance(node, PrunerState | MaskState | SparseState):
            is_var = lambda x: (
                hasattr(x, "get_value")
                or (  # noqa: E731
                    hasattr(x, "value") and not isinstance(x, jax.Array)
                )
            )
            return jax.tree.map(_unwrap, node.masks, is_leaf=is_var)
    raise ValueError("prune.masks_of: no pruner or keep_mask state found in opt_state")
