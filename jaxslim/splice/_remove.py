"""Channel removal as data: a :class:`Plan` of groups and kept indices, replayable on any tree.

A plan names, for each group from :func:`jaxslim.splice.trace`, the channel indices to keep.
``apply_plan`` shrinks every member array of a tree that has the parameters' paths (the params,
their gradients, a mask tree with ``None`` leaves); ``apply_plan_to_opt_state`` does the same on
every parameter-shaped subtree of an Optax state (``optax.tree_map_params``), so training can
continue after surgery, and a plan can be replayed on a restored checkpoint.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxslim import _tree
from jaxslim._checks import caller, public
from jaxslim.splice._graph import Group, Member


class Plan(NamedTuple):
    """Which channels of which groups survive: ``keep[i]`` are sorted indices into
    ``groups[i]``."""

    groups: tuple[Group, ...]
    keep: tuple[tuple[int, ...], ...]


def _describe(group: Group) -> str:
    return f"group of {group.size} channels over {list(group.paths)}"


def _check_keep(group: Any, keep: Any) -> tuple[int, ...]:
    if not isinstance(group, Group):
        raise TypeError(f"{caller()}: group must be a splice.Group from trace(), got {group!r}")
    if not group.removable:
        raise ValueError(
            f"{caller()}: the {_describe(group)} is not removable: {'; '.join(group.reasons)}"
        )
    arr = np.asarray(keep)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
            f"{caller()}: keep must be a 1-D sequence of integer indices, got {keep!r} for the "
            f"{_describe(group)}"
        )
    if arr.size == 0:
        raise ValueError(
            f"{caller()}: keep is empty: it would remove every channel of the {_describe(group)}"
        )
    bad = arr[(arr < 0) | (arr >= group.size)]
    if bad.size:
        raise ValueError(
            f"{caller()}: keep index {int(bad[0])} is out of range [0, {group.size}) for the "
            f"{_describe(group)}"
        )
    if np.unique(arr).size != arr.size:
        raise ValueError(
            f"{caller()}: keep has repeated indices {keep!r} for the {_describe(group)}"
        )
    return tuple(int(i) for i in np.sort(arr))


@public("splice.make_plan")
def make_plan(groups: Sequence[Group], keep: Sequence[Sequence[int]]) -> Plan:
    """Validates and packs ``(groups, keep)`` into a :class:`Plan`.

    Raises ``ValueError`` naming the group's paths for a non-removable group, an empty ``keep``
    (every channel removed), an index out of ``[0, size)`` or repeated, and for two groups that
    claim the same parameter axis factor.
    """
    if len(groups) != len(keep):
        raise ValueError(f"splice.make_plan: {len(groups)} groups but {len(keep)} keep lists")
    ks = tuple(_check_keep(g, k) for g, k in zip(groups, keep, strict=True))
    seen: dict[tuple[str, int, int], Group] = {}
    for g in groups:
        for m in g.members:
            key = (m.path, m.axis, m.factor, m.segment)
            if key in seen and seen[key] is not g:
                raise ValueError(
                    f"splice.make_plan: {m.path!r} axis {m.axis} is in two groups of the plan"
                )
            seen[key] = g
    return Plan(tuple(groups), ks)


def _per_leaf(plan: Plan) -> dict[str, dict[int, tuple[tuple, tuple, dict[int, np.ndarray]]]]:
    """path -> axis -> (factors, segments, {factor or segment: kept indices})."""
    out: dict = {}
    for g, keep in zip(plan.groups, plan.keep, strict=True):
        for m in g.members:
            axes = out.setdefault(m.path, {})
            factors, segments, picks = axes.setdefault(m.axis, (m.factors, m.segments, {}))
            if (factors, segments) != (m.factors, m.segments):
                raise ValueError(
                    f"splice.apply_plan: {m.path!r} axis {m.axis} is split as {factors} / "
                    f"{segments} in one group and {m.factors} / {m.segments} in another: trace "
                    "the function once for a plan"
                )
            picks[m.segment if m.segments else m.factor] = np.asarray(keep, dtype=np.int32)
    return out


def _take(y: Any, idx: np.ndarray, axis: int) -> Any:
    return jnp.take(y, idx, axis=axis) if isinstance(y, jax.Array) else np.take(y, idx, axis=axis)


def _shrink(
    x: Any,
    axis: int,
    factors: tuple[int, ...],
    picks: dict[int, np.ndarray],
    segments: tuple[int, ...] = (),
) -> Any:
    if segments:  # kept indices of each segment, shifted by the segment's offset
        offsets = np.cumsum((0, *segments[:-1]))
        idx = np.concatenate(
            [
                off + picks.get(j, np.arange(n))
                for j, (off, n) in enumerate(zip(offsets, segments, strict=True))
            ]
        )
        return _take(x, idx.astype(np.int32), axis)
    shape = x.shape
    y = x.reshape(shape[:axis] + factors + shape[axis + 1 :])
    new = list(factors)
    for j, idx in picks.items():
        y = (
            jnp.take(y, idx, axis=axis + j)
            if isinstance(y, jax.Array)
            else np.take(y, idx, axis=axis + j)
        )
        new[j] = idx.size
    return y.reshape(shape[:axis] + (math.prod(new),) + shape[axis + 1 :])


def _apply_leaf(path: str, leaf: Any, where: dict) -> Any:
    if leaf is None:
        return None
    for axis, (factors, segments, picks) in sorted(where.items()):
        if getattr(leaf, "ndim", 0) <= axis or leaf.shape[axis] != math.prod(factors):
            raise ValueError(
                f"{caller()}: {path!r} has shape {getattr(leaf, 'shape', None)} but the plan "
                f"expects axis {axis} of size {math.prod(factors)}"
            )
        leaf = _shrink(leaf, axis, factors, picks, segments)
    return leaf


@public("splice.apply_plan")
def apply_plan(tree: Any, plan: Plan, *, suffix: bool = False) -> Any:
    """Shrinks every leaf of ``tree`` named in ``plan`` to the kept channels.

    ``tree`` has the parameters' paths: the params, gradients, a mask tree (``None`` leaves pass
    through) or any other parameter-shaped tree. A member path missing from ``tree`` raises
    ``ValueError``. With ``suffix=True`` a leaf also matches when its path *ends* with a member
    path (``"opt_state/0/mu/" + path`` of an optimizer state) and missing paths are allowed.
    Pure: works under ``jit`` (the plan is static).

    >>> import jax.numpy as jnp
    >>> from jaxslim.splice import trace
    >>> p = {"w1": jnp.ones((2, 4)), "w2": jnp.ones((4, 1))}
    >>> (g,) = [g for g in trace(lambda p, x: x @ p["w1"] @ p["w2"], p, jnp.ones(2)) if g.removable]
    >>> jax.tree.map(jnp.shape, apply_plan(p, make_plan([g], [[0, 3]])))
    {'w1': (2, 2), 'w2': (2, 1)}
    """
    if isinstance(tree, Plan) and not isinstance(plan, Plan):
        raise TypeError(
            "splice.apply_plan: the arguments are (tree, plan): the tree first, the plan second"
        )
    return apply_plan_for(tree, plan, suffix=suffix)


def apply_plan_for(tree: Any, plan: Plan, *, suffix: bool) -> Any:
    if not isinstance(plan, Plan):
        raise TypeError(f"{caller()}: plan must be a splice.Plan, got {type(plan).__name__}")
    todo = _per_leaf(plan)
    found: set[str] = set()

    def visit(path, leaf):
        name = _tree.path_str(path)
        if name not in todo and suffix:
            ends = [p for p in todo if name.endswith("/" + p)]
            name = max(ends, key=len) if ends else name
        if name not in todo:
            return leaf
        found.add(name)
        if not hasattr(leaf, "shape"):
            return leaf
        return _apply_leaf(name, leaf, todo[name])

    out = jax.tree_util.tree_map_with_path(visit, tree, is_leaf=lambda x: x is None)
    missing = sorted(set(todo) - found)
    if missing and not suffix:
        raise ValueError(f"{caller()}: the plan names {missing} which the tree does not have")
    return out


@public("splice.apply_plan_to_opt_state")
def apply_plan_to_opt_state(
    opt_state: Any, plan: Plan, tx: optax.GradientTransformation, params: Any
) -> Any:
    """Applies ``plan`` to every parameter-shaped subtree of an Optax state (``mu``, ``nu``, ...).

    The tree first and the plan second, like :func:`apply_plan`. ``tx`` is the transformation
    that built ``opt_state`` and ``params`` the tree it was built for (before removal): it gives
    the paths. Uses ``optax.tree_map_params``, so scalars such as the step count pass through.
    The order ``(plan, tx, opt_state, params)`` of earlier versions still works, with a
    ``DeprecationWarning``.

    >>> import jax.numpy as jnp, optax
    >>> from jaxslim.splice import trace
    >>> p = {"w1": jnp.ones((2, 4)), "w2": jnp.ones((4, 1))}
    >>> (g,) = [g for g in trace(lambda p, x: x @ p["w1"] @ p["w2"], p, jnp.ones(2)) if g.removable]
    >>> tx = optax.adam(1e-3)
    >>> s = apply_plan_to_opt_state(tx.init(p), make_plan([g], [[1]]), tx, p)
    >>> s[0].mu["w1"].shape
    (2, 1)
    """
    if isinstance(opt_state, Plan) and not isinstance(plan, Plan):
        warnings.warn(
            f"{caller()}(plan, tx, opt_state, params) is deprecated: call "
            f"{caller()}(opt_state, plan, tx, params), the tree first like apply_plan",
            DeprecationWarning,
            stacklevel=2,
        )
        opt_state, plan, tx = tx, opt_state, plan
    if not isinstance(plan, Plan):
        raise TypeError(f"{caller()}: plan must be a splice.Plan, got {type(plan).__name__}")
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            f"{caller()}: tx must be the optax.GradientTransformation that built opt_state, got "
            f"{type(tx).__name__}"
        )
    todo = _per_leaf(plan)
    names = jax.tree_util.tree_map_with_path(lambda path, _: _tree.path_str(path), params)
    missing = sorted(set(todo) - set(jax.tree.leaves(names)))
    if missing:
        raise ValueError(f"{caller()}: the plan names {missing} which params do not have")

    def shrink(leaf, name):
        if name in todo and leaf is not None and hasattr(leaf, "shape"):
            return _apply_leaf(name, leaf, todo[name])
        return leaf

    return optax.tree_map_params(tx, shrink, opt_state, names, is_leaf=lambda x: x is None)


@public("splice.remove_channels")
def remove_channels(params: Any, group: Group, keep: Sequence[int]) -> Any:
    """Physically shrinks every array of ``group`` to the channels ``keep``.

    For a member ``(path, axis)`` whose axis is split into ``factors`` (a fused head kernel), the
    group's factor is indexed and the others kept whole; for a member whose axis is cut into
    ``segments`` (it meets a concatenation), index ``i`` of the group is index ``offset + i`` of
    the axis and the other segments are kept whole. Raises ``ValueError`` naming the group's
    paths if it is not removable, ``keep`` is empty or has an index outside ``[0, size)``.

    >>> import jax.numpy as jnp
    >>> from jaxslim.splice import trace
    >>> p = {"w1": jnp.ones((3, 4)), "b1": jnp.ones(4), "w2": jnp.ones((4, 2))}
    >>> fn = lambda p, x: (x @ p["w1"] + p["b1"]) @ p["w2"]
    >>> g = [g for g in trace(fn, p, jnp.ones(3)) if g.removable][0]
    >>> jax.tree.map(jnp.shape, remove_channels(p, g, [0, 2]))
    {'b1': (2,), 'w1': (3, 2), 'w2': (2, 2)}
    """
    keep = _check_keep(group, keep)
    return apply_plan_for(params, Plan((group,), (keep,)), suffix=False)


def member_view(x: Any, m: Member) -> Any:
    """``x`` with the member's channel factor moved to axis 0 and the rest flattened:
    shape ``(channels, -1)``."""
    if m.segments:
        y = jax.lax.slice_in_dim(x, m.offset, m.offset + m.segments[m.segment], axis=m.axis)
        return jnp.moveaxis(y, m.axis, 0).reshape(m.segments[m.segment], -1)
    shape = x.shape
    y = jnp.reshape(x, shape[: m.axis] + m.factors + shape[m.axis + 1 :])
    y = jnp.moveaxis(y, m.axis + m.factor, 0)
    return y.reshape(y.shape[0], -1)
