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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import _jaxpr, _tree
from jaxslim._checks import caller, public
from jaxslim.splice._graph import Group, count_flops, trace
from jaxslim.splice._remove import Plan, apply_plan_for, make_plan, member_view
from jaxslim.structures import Channels


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
    numbers a Linen module is rebuilt with. ``sizes`` gives every changed leaf's new shape per
    module (``{"model/layers/0/mlp/down_proj": {"kernel": (24, 32)}}``, a Linen
    ``MultiHeadDotProductAttention`` query ``{"kernel": (d, heads, head_dim)}``): every dimension
    a config needs (``intermediate_size``, heads, ``num_hidden_layers`` from the blocks left).
    ``flops_after`` is ``None`` when ``fn`` cannot run on the smaller tree (a Linen module
    raises ``ScopeParamShapeError`` until rebuilt; count with ``count_flops`` on the rebuilt
    module). ``plan`` replays the removal on an optimizer state,
    masks or a checkpoint.
    """

    groups: tuple[GroupReport, ...]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int | None
    features: dict[str, int]
    plan: Plan
    sizes: dict[str, dict[str, tuple[int, ...]]] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{'group':<48} {'before':>7} {'after':>7}"]
        for g in self.groups:
            name = ", ".join(g.paths)
            lines.append(f"{name[:48]:<48} {g.size_before:>7} {g.size_after:>7}")
        for module, leaves in self.sizes.items():
            shapes = ", ".join(f"{k} {v}" for k, v in leaves.items())
            lines.append(f"  {module}: {shapes}")
        after = "?" if self.flops_after is None else f"{self.flops_after:,}"
        lines.append(
            f"params {self.params_before:,} -> {self.params_after:,}; "
            f"FLOPs {self.flops_before:,} -> {after}"
        )
        return "\n".join(lines)


def _leaf_dict(params: Any) -> dict[str, Any]:
    return dict(_tree.leaves_with_paths(params))


@public("splice.score_group")
def score_group(params: Any, group: Group, *, score: str = "l2", grads: Any = None) -> jax.Array:
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
    if not isinstance(group, Group):
        raise TypeError(
            f"splice.score_group: group must be a splice.Group from trace(), got "
            f"{type(group).__name__}"
        )
    return _score_groups(params, [group], score, grads)[0]


def _score_groups(params: Any, groups: Sequence[Group], score: str, grads: Any) -> list:
    """Scores of every group in one jitted call (one compilation for the whole model)."""
    leaves = _leaf_dict(params)
    gleaves = _leaf_dict(grads) if grads is not None else None
    if not isinstance(score, str) or score not in ("l2", "l1", "taylor"):
        raise ValueError(
            f"{caller()}: score must be 'l2', 'l1', 'taylor' or a callable, got {score!r}"
        )
    if score == "taylor" and gleaves is None:
        raise ValueError(f"{caller()}: score='taylor' needs grads= (a tree like params)")
    paths = sorted({m.path for g in groups for m in g.members})
    for p in paths:
        if p not in leaves:
            raise ValueError(f"{caller()}: params have no leaf {p!r} of a group")
        if score == "taylor" and p not in gleaves:
            raise ValueError(f"{caller()}: grads have no leaf {p!r}; pass a tree like params")
        if score == "taylor" and jnp.shape(gleaves[p]) != jnp.shape(leaves[p]):
            raise ValueError(
                f"{caller()}: grads[{p!r}] has shape {jnp.shape(gleaves[p])} but the "
                f"parameter has {jnp.shape(leaves[p])}"
            )
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


@public("splice.feature_sizes")
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


def _shape_sizes(before: Any, after: Any) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{module: {leaf name: new shape}}`` for every leaf whose shape changed."""
    b, out = _leaf_dict(before), {}
    for path, x in _tree.leaves_with_paths(after):
        old = b.get(path)
        if old is None or not hasattr(x, "shape") or tuple(old.shape) == tuple(x.shape):
            continue
        module, _, name = path.rpartition("/")
        out.setdefault(module, {})[name] = tuple(int(n) for n in x.shape)
    return out


@functools.partial(jax.jit, static_argnums=(1,))
def _apply_jit(params: Any, plan: Plan) -> Any:
    return apply_plan_for(params, plan, suffix=False)


def _concrete_fraction(sparsity: Any) -> float:
    """``sparsity`` as a Python float in ``[0, 1)``; concrete 0-d arrays are accepted."""
    if isinstance(sparsity, bool) or not (
        isinstance(sparsity, int | float) or hasattr(sparsity, "dtype")
    ):
        raise TypeError(f"{caller()}: sparsity must be a float, got {type(sparsity).__name__}")
    try:
        arr = np.asarray(sparsity)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            f"{caller()}: sparsity must be concrete (a Python float), got a traced value: the "
            "output shapes depend on it, so prune_channels cannot run under jit"
        ) from None
    if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{caller()}: sparsity must be a scalar, got {sparsity!r}")
    value = float(arr)
    if not 0 <= value < 1:  # NaN fails too
        raise ValueError(f"{caller()}: sparsity must be in [0, 1), got {value!r}")
    return value


def _select_groups(
    where: Any, groups: list[Group], params: Any, fn: Callable[..., Any], args: tuple
) -> list[Group]:
    """The groups ``where`` selects (see :func:`prune_channels`)."""
    leaves = _leaf_dict(params)
    if isinstance(where, tuple):
        ok = len(where) == 2 and isinstance(where[1], int) and not isinstance(where[1], bool)
        if not ok:
            raise TypeError(
                f"{caller()}: a where= pair is (regex or predicate, int axis), got {where!r}"
            )
        pattern, axis = where
        _tree.check_where(pattern)
        sel = {p for p, x in leaves.items() if _tree.is_selected(pattern, p, x)}

        def holds(m) -> bool:
            nd = getattr(leaves.get(m.path), "ndim", 0)
            return m.path in sel and -nd <= axis < nd and m.axis == axis % nd

        return [g for g in groups if any(holds(m) for m in g.members)]
    _tree.check_where(where)
    sel = {p for p, x in leaves.items() if _tree.is_selected(where, p, x)}
    uses = _jaxpr.kernel_uses(fn, params, *args)
    outputs = {p: {a for u in us for a in u.output} for p, us in uses.items()}
    chosen = []
    for g in groups:
        producers = {m.path for m in g.members if m.axis in outputs.get(m.path, ())}
        if producers:
            if producers <= sel:
                chosen.append(g)
        elif any(m.path in sel and m.axis == leaves[m.path].ndim - 1 for m in g.members):
            chosen.append(g)
    return chosen


def _check_runs(fn: Callable[..., Any], new: Any, args: tuple) -> bool:
    """Re-traces ``fn`` on the pruned shapes: True if it runs, False if it is a module that
    must be rebuilt from the report (Linen's ``ScopeParamShapeError``); raises otherwise."""
    abstract = jax.tree.map(_jaxpr.abstract, (new, args))
    try:
        jax.eval_shape(lambda p, a: fn(p, *a), *abstract)
    except Exception as e:  # noqa: BLE001 - fn's own error, explained
        if type(e).__name__ == "ScopeParamShapeError":
            return False
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ValueError(
            f"{caller()}: fn cannot run on the pruned params ({type(e).__name__}: {msg}); a size "
            "in fn does not follow the parameters' shapes. Nothing was returned: trace(fn, ...) "
            "with check=True names the groups it pins; pass groups= without them"
        ) from e
    return True


@public("splice.prune_channels")
def prune_channels(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    sparsity: float,
    score: str | Callable[[Any, Group], Any] | Mapping[Group, Any] = "l2",
    grads: Any = None,
    where: Any = None,
    round_to: int = 1,
    groups: Sequence[Group] | None = None,
    within_heads: bool = False,
) -> tuple[Any, SpliceReport]:
    """Removes the lowest-scored ``sparsity`` fraction of channels of every removable group.

    Each group (from ``trace(fn, params, *args, within_heads=...)`` unless ``groups`` is given)
    loses ``round_half_even(sparsity * n)`` of its ``n`` channels, lowest score first, ties by
    index (lowest first); with ``round_to=r`` the kept width is rounded to the nearest multiple of
    ``r`` (at least ``r``, at most ``n``) so the smaller model stays fast and shardable. A channel
    of a head group is a whole attention head (see :func:`trace`).

    ``where`` picks the groups:

    * a regex or predicate over leaves: the groups whose producing kernels (the kernels holding
      the group on an output axis, as the jaxpr shows: not contracted by their matmul) are all
      selected; a group no kernel produces is picked by the last axis of a selected leaf. So
      ``where="mlp"`` gives the MLP hidden groups but not the residual stream (which the
      attention output also writes), and ``"attn"`` the head groups, whatever the kernel layout
      (``(d, hidden)``, ``(2, d, hidden)``, ``(d, heads, head_dim)``);
    * a pair ``(regex or predicate, axis)``: the groups holding axis ``axis`` (negative counts
      from the end) of a selected leaf, e.g. ``("embed", 1)`` for the residual stream or
      ``("mlp/down", 0)`` for the MLP hidden width.

    A ``where`` that matches no group raises ``ValueError`` (like ``prune`` and ``quant``).
    Channels that are exactly zero (after group lasso) score 0 and go first, which leaves the
    function unchanged unless a hazard (a norm over the channels) is reported.

    **The result runs.** Groups whose sizes the code pins are not removable (``trace`` checks);
    and before returning, ``fn`` is traced again on the new shapes (``jax.eval_shape``): a failure
    raises ``ValueError`` and returns nothing. A Linen/HF module that checks its parameter
    shapes against its config is the exception: rebuild it from ``report.sizes`` /
    ``report.features`` (``report.flops_after`` is then ``None``).

    Not jittable (output shapes depend on the scores); the scoring itself runs on device.

    Args:
      fn, params, *args: as for :func:`trace`.
      sparsity: fraction in ``[0, 1)`` of each group's channels to remove.
      score: ``"l2"``, ``"l1"``, ``"taylor"`` (with ``grads``), ``score(params, group)``, or a
        mapping ``{group: scores}`` (what :func:`importance` returns).
      grads: gradients of a loss w.r.t. ``params`` for ``"taylor"``.
      where: ``None`` (every removable group), a regex or predicate, or ``(pattern, axis)``.
      round_to: kept widths are multiples of this.
      groups: the groups to prune (default: all removable ones from ``trace``).
      within_heads: also prune within-head dimensions (head_dim, RoPE pairs); see :func:`trace`.

    Returns:
      ``(new_params, report)``; ``report.plan`` replays the removal on other trees.

    >>> import jax.numpy as jnp
    >>> p = {"w1": jnp.arange(8.0).reshape(2, 4), "w2": jnp.ones((4, 1))}
    >>> new, rep = prune_channels(lambda p, x: x @ p["w1"] @ p["w2"], p, jnp.ones(2), sparsity=0.5)
    >>> new["w1"], rep.groups[0].removed
    (Array([[2., 3.],
           [6., 7.]], dtype=float32), (0, 1))
    """
    sparsity = _concrete_fraction(sparsity)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"{caller()}: round_to must be an int >= 1, got {round_to!r}")
    if not isinstance(where, tuple):
        _tree.check_where(where)
    if not (callable(score) or isinstance(score, str | Mapping)):
        raise TypeError(
            f"{caller()}: score must be 'l2', 'l1', 'taylor' or score(params, group) (or a "
            f"mapping {{group: scores}} from splice.importance), got {type(score).__name__}"
        )
    if groups is None:
        groups = [g for g in trace(fn, params, *args, within_heads=within_heads) if g.removable]
    else:
        groups = list(groups)
        for g in groups:
            if not isinstance(g, Group):
                raise TypeError(
                    f"{caller()}: groups must hold splice.Group from trace(), "
                    f"got {type(g).__name__}"
                )
    if where is not None:
        candidates = groups
        groups = _select_groups(where, groups, params, fn, args)
        if not groups:
            members = sorted({m.path for g in candidates for m in g.members})
            more = " ..." if len(members) > 8 else ""
            raise ValueError(
                f"{caller()}: where={where!r} matches no removable group: no group is produced "
                f"only by selected kernels (or holds the given axis of a selected leaf). Group "
                f"members are {members[:8]}{more}"
                f"{'' if candidates else ' (there is no removable group)'}"
            )
    if isinstance(score, Mapping):
        missing = [g for g in groups if g not in score]
        if missing:
            raise ValueError(
                f"{caller()}: score has no entry for the group over {list(missing[0].paths)}; "
                "compute it with splice.importance for the same groups (or pass groups=)"
            )
        scores = [score[g] for g in groups]
    elif callable(score):
        scores = [score(params, g) for g in groups]
    else:
        scores = _score_groups(params, groups, score, grads)
    chosen, keeps, reports = [], [], []
    for g, s in zip(groups, scores, strict=True):
        s = np.asarray(s, dtype=np.float64)
        if s.shape != (g.size,):
            raise ValueError(
                f"{caller()}: score for the group over {list(g.paths)} "
                f"has shape {s.shape}, expected ({g.size},)"
            )
        if not np.all(np.isfinite(s)):
            i = int(np.flatnonzero(~np.isfinite(s))[0])
            raise ValueError(
                f"{caller()}: score of channel {i} of the group over {list(g.paths)} is {s[i]}; "
                "scores must be finite (NaN or inf in the weights or grads?)"
            )
        n_keep = _n_keep(g.size, sparsity, round_to)
        if n_keep == 0:
            raise ValueError(
                f"{caller()}: sparsity={sparsity} removes every channel "
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
    new = _apply_jit(params, plan)
    runs = _check_runs(fn, new, args)
    report = SpliceReport(
        groups=tuple(reports),
        params_before=_count(params),
        params_after=_count(new),
        flops_before=count_flops(fn, params, *args),
        flops_after=count_flops(fn, new, *args) if runs else None,
        features=feature_sizes(params, new),
        plan=plan,
        sizes=_shape_sizes(params, new),
    )
    return new, report
