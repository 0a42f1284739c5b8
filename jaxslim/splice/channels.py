"""``prune_channels``: score the channels of every group, remove the lowest, report what changed.

Scores (higher = more important), over all coupled arrays of a group:

* ``"l2"`` (default): ``s_c = sqrt(sum_m ||W_m[c]||_2^2)``, the 2-norm of channel ``c``'s slices
  across every member ``m`` (Li et al., 2017, "Pruning Filters for Efficient ConvNets", extended to
  coupled groups as in Fang et al., 2023, "DepGraph");
* ``"l1"``: ``s_c = sum_m ||W_m[c]||_1``;
* ``"taylor"``: ``s_c = (sum_m sum_i g_{m,c,i} w_{m,c,i})^2`` with ``grads=`` (Molchanov et al.,
  2019, "Importance Estimation for Neural Network Pruning");
* a callable ``score(params, group) -> (group.size,)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import _tree
from jaxslim.splice.graph import Group, count_flops, trace
from jaxslim.splice.remove import Plan, apply_plan, make_plan, member_view
from jaxslim.structures import Channels

__all__ = ["GroupReport", "SpliceReport", "score_group", "prune_channels", "feature_sizes"]


@dataclasses.dataclass(frozen=True)
class GroupReport:
    """One group's outcome: its paths, width before and after, the removed channel indices."""

    paths: tuple[str, ...]
    size_before: int
    size_after: int
    removed: tuple[int, ...]
    hazards: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SpliceReport:
    """What ``prune_channels`` did: per-group removals, parameter and FLOP counts, the plan.

    ``features`` maps each module to its new output width (see :func:`feature_sizes`) — the
    numbers a Linen module is rebuilt with. ``flops_after`` is ``None`` when ``fn`` cannot run on
    the smaller tree (a Linen module raises ``ScopeParamShapeError`` until rebuilt; count with
    ``count_flops`` on the rebuilt module). ``plan`` replays the removal on an optimizer state,
    masks or a checkpoint.
    """

    groups: tuple[GroupReport, ...]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int | None
    features: dict[str, int]
    plan: Plan

    def __str__(self) -> str:
        lines = [f"{'group':<48} {'before':>7} {'after':>7}"]
        for g in self.groups:
            name = ", ".join(g.paths)
            lines.append(f"{name[:48]:<48} {g.size_before:>7} {g.size_after:>7}")
        after = "?" if self.flops_after is None else f"{self.flops_after:,}"
        lines.append(
            f"params {self.params_before:,} -> {self.params_after:,}; "
            f"FLOPs {self.flops_before:,} -> {after}"
        )
        return "\n".join(lines)


def _leaf_dict(params: Any) -> dict[str, Any]:
    return dict(_tree.leaves_with_paths(params))


def score_group(params: Any, group: Group, score: str = "l2", grads: Any = None) -> jax.Array:
    """Per-channel importance of ``group``, shape ``(group.size,)``, in float32.

    ``score`` is ``"l2"``, ``"l1"`` or ``"taylor"`` (needs ``grads``, a tree like ``params``);
    see the module docstring for the formulas.

    >>> import jax.numpy as jnp
    >>> from jaxslim.splice import trace
    >>> p = {"w1": jnp.array([[3.0, 0.0]]), "w2": jnp.array([[0.0], [4.0]])}
    >>> (g,) = [g for g in trace(lambda p, x: x @ p["w1"] @ p["w2"], p, jnp.ones(1)) if g.removable]
    >>> score_group(p, g)
    Array([3., 4.], dtype=float32)
    """
    return _score_groups(params, [group], score, grads)[0]


def _score_groups(params: Any, groups: Sequence[Group], score: str, grads: Any) -> list:
    """Scores of every group in one jitted call (one compilation for the whole model)."""
    leaves = _leaf_dict(params)
    gleaves = _leaf_dict(grads) if grads is not None else None
    if score == "taylor" and gleaves is None:
        raise ValueError("splice.score_group: score='taylor' needs grads= (a tree like params)")
    if score not in ("l2", "l1", "taylor"):
        raise ValueError(
            f"splice.score_group: score must be 'l2', 'l1', 'taylor' or a callable, got {score!r}"
        )
    paths = sorted({m.path for g in groups for m in g.members})
    for p in paths:
        if p not in leaves:
            raise ValueError(f"splice.score_group: params have no leaf {p!r} of a group")
    xs = {p: leaves[p] for p in paths}
    gs = {p: gleaves[p] for p in paths} if score == "taylor" else None
    spec = tuple((g.members, g.size) for g in groups)
    return list(_score_all(xs, gs, spec, score))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _score_all(xs, gs, spec, score):
    return tuple(
        _score(
            tuple(xs[m.path] for m in members),
            None if gs is None else tuple(gs[m.path] for m in members),
            members,
            size,
            score,
        )
        for members, size in spec
    )


def _score(xs, gs, members, size, score):
    total = jnp.zeros((size,), jnp.float32)
    for i, m in enumerate(members):
        x = member_view(xs[i], m).astype(jnp.float32)
        if score == "l2":
            total = total + Channels(axis=0, ord=2).reduce(x) ** 2
        elif score == "l1":
            total = total + Channels(axis=0, ord=1).reduce(x)
        else:
            total = total + jnp.sum(member_view(gs[i], m).astype(jnp.float32) * x, axis=1)
    if score == "l2":
        return jnp.sqrt(total)
    if score == "taylor":
        return total**2
    return total


def _n_keep(n: int, sparsity: float, round_to: int) -> int:
    keep = n - int(np.round(sparsity * n))  # numpy rounds half to even
    if round_to > 1:
        keep = min(max(int(np.round(keep / round_to)) * round_to, round_to), n)
    return keep


def _count(params: Any) -> int:
    return sum(
        math.prod(x.shape) for _, x in _tree.leaves_with_paths(params) if _tree.is_float_array(x)
    )


_MODULE_LEAVES = ("kernel", "bias", "scale", "embedding", "mean", "var")


def feature_sizes(before: Any, after: Any) -> dict[str, int]:
    """``{name: new width}`` for every array whose last (output-channel) axis shrank.

    Flax leaves (``kernel``, ``bias``, ``scale``, ``embedding``, ``mean``, ``var``) are named by
    their module (``"params/Dense_0"``: the ``features`` to rebuild a Linen module with); other
    leaves by their own path.
    """
    b, out = _leaf_dict(before), {}
    for path, x in _tree.leaves_with_paths(after):
        old = b.get(path)
        if old is None or getattr(old, "shape", None) == getattr(x, "shape", None) or x.ndim == 0:
            continue
        module, _, name = path.rpartition("/")
        if old.shape[-1] != x.shape[-1]:
            out[module if name in _MODULE_LEAVES and module else path] = int(x.shape[-1])
    return out


@functools.partial(jax.jit, static_argnums=(1, 2))
def _apply_jit(params: Any, plan: Plan, fn_name: str) -> Any:
    return apply_plan(params, plan, fn_name=fn_name)


def _flops_or_none(fn: Callable[..., Any], params: Any, args: tuple) -> int | None:
    try:
        return count_flops(fn, params, *args)
    except Exception:  # noqa: BLE001 - fn may need rebuilding for the new shapes (Linen)
        return None


def prune_channels(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    sparsity: float,
    score: str | Callable[[Any, Group], Any] = "l2",
    grads: Any = None,
    where: _tree.Where = None,
    round_to: int = 1,
    groups: Sequence[Group] | None = None,
) -> tuple[Any, SpliceReport]:
    """Removes the lowest-scored ``sparsity`` fraction of channels of every removable group.

    Each group (from ``trace(fn, params, *args)`` unless ``groups`` is given) loses
    ``round_half_even(sparsity * n)`` of its ``n`` channels, lowest score first, ties by index
    (lowest first); with ``round_to=r`` the kept width is rounded to the nearest multiple of ``r``
    (at least ``r``, at most ``n``) so the smaller model stays fast and shardable. ``where``
    restricts the touched groups to those holding the output axis (last axis) of a selected leaf.
    Channels that are exactly zero (after group lasso) score 0 and go first, which leaves the
    function unchanged unless a hazard (a norm over the channels) is reported.

    Not jittable (output shapes depend on the scores); the scoring itself runs on device.

    Args:
      fn, params, *args: as for :func:`trace`.
      sparsity: fraction in ``[0, 1)`` of each group's channels to remove.
      score: ``"l2"``, ``"l1"``, ``"taylor"`` (with ``grads``) or ``score(params, group)``.
      grads: gradients of a loss w.r.t. ``params`` for ``"taylor"``.
      where: ``None`` (every removable group), a regex or a predicate over leaves.
      round_to: kept widths are multiples of this.
      groups: the groups to prune (default: all removable ones from ``trace``).

    Returns:
      ``(new_params, report)``; ``report.plan`` replays the removal on other trees.

    >>> import jax.numpy as jnp
    >>> p = {"w1": jnp.arange(8.0).reshape(2, 4), "w2": jnp.ones((4, 1))}
    >>> new, rep = prune_channels(lambda p, x: x @ p["w1"] @ p["w2"], p, jnp.ones(2), sparsity=0.5)
    >>> new["w1"], rep.groups[0].removed
    (Array([[2., 3.],
           [6., 7.]], dtype=float32), (0, 1))
    """
    if not isinstance(sparsity, int | float) or not 0 <= sparsity < 1:
        raise ValueError(f"splice.prune_channels: sparsity must be in [0, 1), got {sparsity!r}")
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"splice.prune_channels: round_to must be an int >= 1, got {round_to!r}")
    if groups is None:
        groups = [g for g in trace(fn, params, *args) if g.removable]
    leaves = _leaf_dict(params)
    if where is not None:
        outputs = {p for p, x in leaves.items() if _tree.is_selected(where, p, x)}
        groups = [
            g
            for g in groups
            if any(m.path in outputs and m.axis == leaves[m.path].ndim - 1 for m in g.members)
        ]
    if callable(score):
        scores = [score(params, g) for g in groups]
    else:
        scores = _score_groups(params, groups, score, grads)
    chosen, keeps, reports = [], [], []
    for g, s in zip(groups, scores, strict=True):
        s = np.asarray(s, dtype=np.float64)
        if s.shape != (g.size,):
            raise ValueError(
                f"splice.prune_channels: score for the group over {list(g.paths)} "
                f"has shape {s.shape}, expected ({g.size},)"
            )
        n_keep = _n_keep(g.size, sparsity, round_to)
        if n_keep == 0:
            raise ValueError(
                f"splice.prune_channels: sparsity={sparsity} removes every channel "
                f"of the group of {g.size} over {list(g.paths)}"
            )
        order = np.argsort(s, kind="stable")
        removed, keep = np.sort(order[: g.size - n_keep]), np.sort(order[g.size - n_keep :])
        reports.append(
            GroupReport(g.paths, g.size, n_keep, tuple(int(i) for i in removed), g.hazards)
        )
        if n_keep < g.size:
            chosen.append(g)
            keeps.append(keep)
    plan = make_plan(chosen, keeps)
    new = _apply_jit(params, plan, "splice.prune_channels")
    report = SpliceReport(
        groups=tuple(reports),
        params_before=_count(params),
        params_after=_count(new),
        flops_before=count_flops(fn, params, *args),
        flops_after=_flops_or_none(fn, new, args),
        features=feature_sizes(params, new),
        plan=plan,
    )
    return new, report
