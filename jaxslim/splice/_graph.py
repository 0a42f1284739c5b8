"""``trace``: which parameter axes must shrink together when one channel goes.

``trace(fn, params, *args)`` runs ``jax.make_jaxpr`` on shapes only (``jax.ShapeDtypeStruct``
inputs: nothing is computed) and walks the equations with one rule per primitive
(:mod:`jaxslim.splice._rules`), uniting the axes that carry the same channel. Sub-jaxprs of
``jit``, ``custom_jvp``/``custom_vjp``, ``remat``, ``cond``, ``scan`` and ``while`` are walked too,
by the walker shared with the FLOP count and fold detection (:class:`jaxslim._jaxpr.Walker`).
The result is a list of :class:`Group`: the ``(path, axis)`` pairs of one channel family, whether
it can be removed and, if not, why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax

from jaxslim import _jaxpr, _tree
from jaxslim._checks import public
from jaxslim.splice import _probe
from jaxslim.splice import _rules as rules
from jaxslim.splice._axes import Axes


@dataclasses.dataclass(frozen=True)
class Member:
    """One parameter axis (or one factor of it) in a group.

    ``factors`` is the axis split outer to inner (``(n,)`` when it is not split); the group's
    channel indexes factor ``factor``. A fused ``(d, heads * dim)`` kernel has output members with
    ``factors=(heads, dim)``: ``factor=0`` in the head group, ``factor=1`` in the per-head group.

    ``segments`` is set when the axis meets a concatenation: the axis is cut into pieces of these
    sizes (one per concatenated operand) and the group's channel ``i`` is index ``offset + i`` of
    the axis, in segment ``segment``. The next layer's ``(a + b, d)`` kernel after
    ``concatenate([x @ w_a, x @ w_b])`` has member ``segments=(a, b), segment=0`` in ``w_a``'s
    group and ``segment=1`` (offset ``a``) in ``w_b``'s.
    """

    path: str
    axis: int
    factors: tuple[int, ...]
    factor: int = 0
    segments: tuple[int, ...] = ()
    segment: int = 0

    @property
    def offset(self) -> int:
        """Index of the group's channel 0 on the axis (0 unless the axis is segmented)."""
        return sum(self.segments[: self.segment])


@dataclasses.dataclass(frozen=True)
class Group:
    """Coupled parameter axes: removing channel ``i`` removes index ``i`` of every member.

    Iterates as ``(path, axis)`` pairs. ``removable`` is False when the channels reach an input or
    output of the function or pass through an op without a rule; ``reasons`` say which. ``hazards``
    are removable-but-changes-the-function notes (a norm reducing over the channels).
    """

    members: tuple[Member, ...]
    size: int
    removable: bool = True
    reasons: tuple[str, ...] = ()
    hazards: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter((m.path, m.axis) for m in self.members)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.path for m in self.members))

    def __str__(self) -> str:
        pairs = ", ".join(
            f"{m.path}[{m.axis}]"
            + (f"<{m.factor} of {m.factors}>" if len(m.factors) > 1 else "")
            + (f"<at {m.offset} of {m.segments}>" if m.segments else "")
            for m in self.members
        )
        state = "removable" if self.removable else "not removable: " + "; ".join(self.reasons)
        hazards = "".join(f"; hazard: {h}" for h in self.hazards)
        return f"Group({self.size} channels: {pairs}; {state}{hazards})"


class _Nodes(list):
    """The axis nodes of one value, whether the value depends on ``fn``'s non-parameter inputs
    (``dep``: a matmul of two such values is an attention-like product), and whether it is
    *made* inside ``fn`` from literals alone (``jnp.ones((layers, heads))``, an ``iota``)."""

    def __init__(self, nodes=(), dep: bool = False, made: bool = False) -> None:
        super().__init__(nodes)
        self.dep = dep
        self.made = made


def _dep(values) -> bool:
    return any(getattr(x, "dep", False) for x in values if x is not None)


def _made(values) -> bool:
    return all(x is None or getattr(x, "made", False) for x in values)


class _Walker(_jaxpr.Walker):
    """The coupled-axes walker: one union-find node per axis of every value. ``records`` holds
    the output nodes of every ordinary equation by site (for the re-trace check)."""

    def __init__(self) -> None:
        super().__init__()
        self.axes = Axes()
        self.records: dict[tuple[int, ...], tuple[str, list, Any]] = {}

    def fresh(self, v, dep: bool = False) -> _Nodes:
        return _Nodes([self.axes.new(s) for s in _jaxpr.shape(v)], dep)

    def const(self, var, value) -> list[int]:
        nodes = self.fresh(var)
        for n in nodes:
            self.axes.tag(n, "couples to a constant captured by the function")
        return nodes

    def walk(self, jaxpr, ins, consts=None) -> list:
        open_, _ = _jaxpr.open_jaxpr(jaxpr, consts)
        ins = [
            x if x is not None else self.fresh(v) for v, x in zip(open_.invars, ins, strict=True)
        ]
        outs = super().walk(jaxpr, ins, consts)
        return [
            o if o is not None else self.fresh(v) for v, o in zip(open_.outvars, outs, strict=True)
        ]

    def equation(self, eqn, ins: list) -> list:
        made = _made(ins)
        if not made:
            # A value made inside fn from literals (BERT's head_mask = jnp.ones((layers,
            # heads)), a RoPE table from iota) is a fresh copy at each use: it couples nothing,
            # so the heads of different layers stay different groups. Its size is still checked
            # by trace's re-trace (a literal size pins the groups it meets).
            ins = [self._copy(x) if getattr(x, "made", False) else x for x in ins]
        r = rules.RULES.get(eqn.primitive.name)
        if r is not None and r.axes is not None:
            outs = r.axes(self, eqn, ins)
        else:
            outs = rules.unsupported(self, eqn, ins)
        dep = _dep(ins)
        outs = [_Nodes(o, dep, made) for o in outs]
        self.records[self.site] = (eqn.primitive.name, outs, eqn)
        return outs

    def _copy(self, nodes: _Nodes) -> _Nodes:
        memo: dict[int, int] = {}
        return _Nodes([self.axes.copy(n, memo) for n in nodes], nodes.dep)

    def _unite_all(self, a: list, b: list) -> None:
        for x, y in zip(a, b, strict=True):
            self.axes.unite(x, y)

    def _carry(self, vars_, vals) -> list:
        return [c if c is not None else self.fresh(v) for v, c in zip(vars_, vals, strict=True)]

    def scan(self, eqn, ins, s: _jaxpr.Scan):
        nc, ncarry = s.num_consts, s.num_carry
        consts = ins[:nc]
        carry = self._carry(eqn.invars[nc : nc + ncarry], ins[nc : nc + ncarry])
        length = self.axes.new(s.length)
        self.axes.tag(length, "it is the layer axis of a scan (drop a layer with drop_layer)")
        xs_inner = []
        for v, nodes in zip(eqn.invars[nc + ncarry :], ins[nc + ncarry :], strict=True):
            nodes = nodes if nodes is not None else self.fresh(v)
            self.axes.unite(length, nodes[0])
            xs_inner.append(_Nodes(nodes[1:], _dep([nodes])))
        outs = self.walk_sub(0, s.body, list(consts) + carry + xs_inner, s.body_consts)
        for c, o in zip(carry, outs[:ncarry], strict=True):
            self._unite_all(c, o)
        return list(carry) + [_Nodes([length, *o], _dep([o])) for o in outs[ncarry:]]

    def while_loop(self, eqn, ins, w: _jaxpr.While):
        cn, bn = w.cond_nconsts, w.body_nconsts
        carry = self._carry(eqn.invars[cn + bn :], ins[cn + bn :])
        self.walk_sub(0, w.cond, list(ins[:cn]) + carry, w.cond_consts)
        outs = self.walk_sub(1, w.body, list(ins[cn : cn + bn]) + carry, w.body_consts)
        for c, o in zip(carry, outs, strict=True):
            self._unite_all(c, o)
        return carry

    def cond(self, eqn, ins, c: _jaxpr.Cond):
        outs = [self.fresh(v, _dep(ins)) for v in eqn.outvars]
        for k, (branch, consts) in enumerate(zip(c.branches, c.branch_consts, strict=True)):
            bouts = self.walk_sub(k, branch, list(ins[1:]), consts)
            for o, b in zip(outs, bouts, strict=True):
                self._unite_all(o, b)
        return outs


class _Flops(_jaxpr.Walker):
    """Sums ``rules.flops`` over the equations; a scan body counts ``length`` times, a cond its
    most expensive branch, a while body once."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def equation(self, eqn, ins):
        self.total += rules.flops(eqn)
        return [None] * len(eqn.outvars)

    def scan(self, eqn, ins, s):
        before = self.total
        out = super().scan(eqn, ins, s)
        self.total = before + s.length * (self.total - before)
        return out

    def cond(self, eqn, ins, c):
        before, most = self.total, 0
        for k, (branch, consts) in enumerate(zip(c.branches, c.branch_consts, strict=True)):
            self.total = before
            self.walk_sub(k, branch, list(ins[1:]), consts)
            most = max(most, self.total - before)
        self.total = before + most
        return [None] * len(eqn.outvars)

    def while_loop(self, eqn, ins, w):
        cn, bn = w.cond_nconsts, w.body_nconsts
        self.walk_sub(
            1, w.body, list(ins[cn : cn + bn]) + [None] * (len(ins) - cn - bn), w.body_consts
        )
        return [None] * len(eqn.outvars)


WITHIN_HEAD = (
    "it is a within-head dimension (contracted by q @ k, or the value dimension carried by "
    "probs @ v: head_dim, RoPE pairs); model configs fix it, so it is offered only with "
    "within_heads=True"
)


@public("splice.trace")
def trace(
    fn: Callable[..., Any],
    params: Any,
    *example_args: Any,
    within_heads: bool = False,
    check: bool = True,
) -> list[Group]:
    """Groups of coupled ``(path, axis)`` pairs: the axes that must shrink together.

    ``fn(params, *example_args)`` is traced with ``jax.make_jaxpr`` on shapes only (arrays are
    replaced by ``jax.ShapeDtypeStruct``; nothing is computed). Each primitive has a rule mapping
    input axes to output axes: ``dot_general`` unites contracted axes, ``conv_general_dilated``
    feature axes (grouped convolutions by their group factor), element-wise ops (a residual add)
    unite same-position axes, ``broadcast_in_dim`` a bias with its layer's output, ``reshape``
    unites axes as products of factors (so a fused ``(d, heads * dim)`` kernel still gives a head
    group and a per-head group), ``concatenate`` makes the output axis a concatenation of the
    operands' axes, so the next layer's input rows are cut into segments at offsets, one per
    operand (``Member.segments``), and ``split`` / unit-stride ``slice`` map segments back to
    pieces (their sizes and bounds must be computed from the parameters' shapes, as reshape sizes
    must, for ``fn`` to run after removal). A concatenated axis that meets a reshape merging it
    with another axis, or a strided slice, is not mapped: its groups are not removable. Axes that
    reach an input or output of ``fn``, a captured
    constant, or an op without a rule make their group ``removable=False`` with the reason.

    **Attention heads are units.** A head group's channel is a whole head: its members index the
    head factor of fused ``(d, heads * head_dim)`` kernels, or the heads axis of explicit
    ``(d, heads, head_dim)`` ones. Grouped-query attention: the key/value head group also holds
    the query heads that share that key/value head (the ``jnp.repeat`` of key/value heads, or a
    ``(d, kv, groups, head_dim)`` query kernel), so removing one removes its query group; the
    query heads within a group form their own group, whose channel ``j`` is query head ``j`` of
    *every* key/value head (the model stays grouped-query with a uniform group size). A
    ``jnp.where(mask, logits, -inf)`` against a broadcast scalar or mask, a mask from ``iota``,
    and a ``w[0]`` / ``w[1]`` slice of a fused ``(2, ...)`` kernel axis do not pin or split the
    groups they touch (the fused axis itself is reported as not a channel axis). Hugging Face
    ``FlaxLlama`` / ``FlaxGPT2`` derive ``head_dim = hidden_size / num_attention_heads``, so their
    configs cannot express fewer heads: their head groups are found, but only a model whose
    head count and head_dim are separate (the NNX workbench, ``nnx.MultiHeadAttention`` with
    ``qkv_features``) can be rebuilt without them.

    **Within-head dimensions** (the contracted ``head_dim`` of ``q @ k``, the value head_dim
    carried through ``probs @ v``, RoPE pairs) are not removable unless ``within_heads=True``;
    then a RoPE pair ``(i, i + head_dim / 2)`` is one channel (the rotation couples the halves).

    **Sizes the code pins.** With ``check`` (default), ``fn`` is traced once more with every
    removable group twice as wide; a group whose sizes do not follow the parameters (a reshape
    by a literal ``head_dim``, ``jnp.zeros((64,))``, a config field baked into the module) is
    made not removable, the reason naming the primitive and the constant. A Linen/HF module that
    checks its parameter shapes against its config (``ScopeParamShapeError``) cannot be probed:
    rebuild it with the report's sizes.

    Paths are the ``/``-joined strings of :func:`jaxslim._tree.path_str` (``"block/w2"``,
    ``"params/Dense_0/kernel"``). Size-1 axes and convolution kernels' spatial axes are not
    channels and are left out. For Linen pass ``lambda v, x: model.apply(v, x)`` and
    ``{"params": ...}`` (eval mode: no mutable collections in the output).

    Args:
      fn: ``fn(params, *example_args)``; its outputs are the model outputs.
      params: pytree of arrays (or ``ShapeDtypeStruct``).
      *example_args: inputs (arrays or ``ShapeDtypeStruct``), used for their shapes only.
      within_heads: also offer within-head dimensions (head_dim, RoPE pairs) for removal.
      check: re-trace ``fn`` on wider shapes to find sizes the code pins.

    Returns:
      A list of :class:`Group`, in the order of the first parameter leaf they touch.

    >>> import jax.numpy as jnp
    >>> params = {"w1": jnp.ones((4, 8)), "b1": jnp.ones(8), "w2": jnp.ones((8, 3))}
    >>> fn = lambda p, x: jnp.maximum(x @ p["w1"] + p["b1"], 0) @ p["w2"]
    >>> [list(g) for g in trace(fn, params, jnp.ones(4)) if g.removable]
    [[('b1', 0), ('w1', 1), ('w2', 0)]]
    """
    t = _jaxpr.make_jaxpr(fn, params, *example_args)
    param_leaves = _tree.leaves_with_paths(params)
    n_params = len(param_leaves)
    w = _Walker()
    ins = [w.fresh(v, dep=i >= n_params) for i, v in enumerate(t.jaxpr.invars)]
    for path, nodes in zip(t.arg_paths, ins[n_params:], strict=True):
        for a, node in enumerate(nodes):
            w.axes.tag(node, f"couples to axis {a} of input args[{path}]")
    outs = w.walk(t.jaxpr, ins, t.consts)
    for i, nodes in enumerate(outs):
        for a, n in enumerate(nodes):
            w.axes.tag(n, f"reaches axis {a} of output {i} of fn")
    found = _groups(w.axes, param_leaves, ins[:n_params], within_heads)
    if check:
        # A grouped convolution's feature_group_count is a size the code must change anyway
        # (its hazard says so; NNX's sync_features does it): not probed.
        roots = [
            r
            for r, g in found
            if g.removable and not any(h.startswith(rules.GROUPED) for h in g.hazards)
        ]
        args = tuple(_jaxpr.abstract(a) for a in jax.tree.leaves(example_args))
        args = jax.tree.unflatten(jax.tree.structure(example_args), list(args))
        pinned, unprobed = _probe.probe(fn, params, args, w, ins[:n_params], roots)
        found = [
            (r, dataclasses.replace(g, removable=False, reasons=(*g.reasons, pinned[r])))
            if r in pinned
            else (r, dataclasses.replace(g, hazards=(*g.hazards, unprobed[r])))
            if r in unprobed
            else (r, g)
            for r, g in found
        ]
    return [g for _, g in found]


def _groups(
    axes: Axes, leaves: list, nodes: list, within_heads: bool = True
) -> list[tuple[int, Group]]:
    found: dict[int, list[Member]] = {}
    mixed: dict[int, list[str]] = {}
    for (path, leaf), leaf_nodes in zip(leaves, nodes, strict=True):
        if not _tree.is_float_array(leaf) and not isinstance(leaf, jax.ShapeDtypeStruct):
            continue
        for a, n in enumerate(leaf_nodes):
            if axes.size[n] <= 1:
                continue
            atoms = axes.leaves(n)
            pieces = axes.pieces(n) if len(atoms) == 1 else None
            if pieces is not None and len(pieces) > 1:
                sizes = tuple(axes.size[x] for x, _ in pieces)
                for j, (x, _) in enumerate(pieces):
                    member = Member(path, a, (axes.size[n],), 0, sizes, j)
                    found.setdefault(axes.find(x), []).append(member)
            else:
                factors = tuple(axes.size[x] for x in atoms)
                for j, x in enumerate(atoms):
                    if x not in axes.segments:
                        found.setdefault(axes.find(x), []).append(Member(path, a, factors, j))
                        continue
                    for y in axes.atoms(x):  # a concatenation inside a product: not indexable
                        mixed.setdefault(axes.find(y), []).append(
                            f"{path!r} axis {a} is a reshape of a concatenated axis: its "
                            "concatenated channels cannot be indexed"
                        )
    groups = []
    for root, members in found.items():
        if root in axes.hidden:
            continue
        reasons = list(axes.reasons.get(root, {})) + list(dict.fromkeys(mixed.get(root, [])))
        seen = {(m.path, m.axis) for m in members if not m.segments}
        if len(seen) != len([m for m in members if not m.segments]):
            reasons.append("two factors of one parameter axis are coupled to each other")
        if not within_heads and axes.within_head(root):
            reasons.append(WITHIN_HEAD)
        groups.append(
            (
                root,
                Group(
                    members=tuple(
                        sorted(members, key=lambda m: (m.path, m.axis, m.factor, m.segment))
                    ),
                    size=axes.size[root],
                    removable=not reasons,
                    reasons=tuple(reasons),
                    hazards=tuple(axes.hazards.get(root, {})),
                ),
            )
        )
    return groups


@public("splice.count_flops")
def count_flops(fn: Callable[..., Any], params: Any, *example_args: Any) -> int:
    """FLOPs of ``fn(params, *args)``: ``2 x`` the multiply-adds of its matmuls and convolutions.

    Counted from the jaxpr on shapes only; ``scan`` bodies count ``length`` times. Element-wise
    ops are not counted.

    >>> import jax.numpy as jnp
    >>> count_flops(lambda p, x: x @ p, jnp.ones((4, 8)), jnp.ones((2, 4)))
    128
    """
    t = _jaxpr.make_jaxpr(fn, params, *example_args)
    f = _Flops()
    f.walk(t.jaxpr, [None] * len(t.jaxpr.invars), t.consts)
    return f.total
