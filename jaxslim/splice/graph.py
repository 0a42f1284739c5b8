"""``trace``: which parameter axes must shrink together when one channel goes.

``trace(fn, params, *args)`` runs ``jax.make_jaxpr`` on shapes only (``jax.ShapeDtypeStruct``
inputs: nothing is computed) and walks the equations with one rule per primitive
(:mod:`jaxslim.splice.rules`), uniting the axes that carry the same channel. Sub-jaxprs of
``jit``, ``custom_jvp``/``custom_vjp``, ``remat``, ``cond``, ``scan`` and ``while`` are walked too.
The result is a list of :class:`Group`: the ``(path, axis)`` pairs of one channel family, whether
it can be removed and, if not, why.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core

from jaxslim import _tree
from jaxslim.splice import rules
from jaxslim.splice._axes import Axes

__all__ = ["Member", "Group", "trace", "count_flops"]


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


class _Walker:
    def __init__(self) -> None:
        self.axes = Axes()

    def fresh(self, v) -> list[int]:
        return [self.axes.new(s) for s in getattr(v.aval, "shape", ())]

    def read(self, env: dict, v) -> list[int] | None:
        if isinstance(v, jex_core.Literal):
            return None
        return env[v]

    def walk(self, jaxpr, ins: list, consts_reason: str = "a constant captured by the function"):
        """Walks an open ``Jaxpr`` whose invars get the node lists ``ins``; returns the outs."""
        env: dict = {}
        for v in jaxpr.constvars:
            env[v] = self.fresh(v)
            for n in env[v]:
                self.axes.tag(n, f"couples to {consts_reason}")
        for v, nodes in zip(jaxpr.invars, ins, strict=True):
            env[v] = nodes if nodes is not None else self.fresh(v)
        for eqn in jaxpr.eqns:
            vals = [self.read(env, v) for v in eqn.invars]
            outs = self.equation(eqn, vals)
            for v, nodes in zip(eqn.outvars, outs, strict=True):
                env[v] = nodes
        return [self.read(env, v) or self.fresh(v) for v in jaxpr.outvars]

    def equation(self, eqn, ins: list) -> list:
        name = eqn.primitive.name
        if name in rules.RULES:
            return rules.RULES[name](self, eqn, ins)
        if name == "scan":
            return self.scan(eqn, ins)
        if name == "while":
            return self.while_loop(eqn, ins)
        if name == "cond":
            return self.cond(eqn, ins)
        sub = _call_jaxpr(eqn)
        if sub is not None:
            return self.walk(sub, ins)
        return rules.unsupported(self, eqn, ins)

    def _unite_all(self, a: list, b: list) -> None:
        for x, y in zip(a, b, strict=True):
            self.axes.unite(x, y)

    def scan(self, eqn, ins):
        p = eqn.params
        nc, ncarry = p["num_consts"], p["num_carry"]
        consts, carry, xs = ins[:nc], ins[nc : nc + ncarry], ins[nc + ncarry :]
        length = self.axes.new(p["length"])
        self.axes.tag(length, "it is the layer axis of a scan (drop a layer with drop_layer)")
        xs_inner = []
        for v, nodes in zip(eqn.invars[nc + ncarry :], xs, strict=True):
            nodes = nodes if nodes is not None else self.fresh(v)
            self.axes.unite(length, nodes[0])
            xs_inner.append(nodes[1:])
        carry = [
            c if c is not None else self.fresh(v)
            for v, c in zip(eqn.invars[nc : nc + ncarry], carry, strict=True)
        ]
        body = p["jaxpr"]
        outs = self.walk_closed(body, list(consts) + carry + xs_inner)
        for c, o in zip(carry, outs[:ncarry], strict=True):
            self._unite_all(c, o)
        ys = [[length, *o] for o in outs[ncarry:]]
        return list(carry) + ys

    def while_loop(self, eqn, ins):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts, carry = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]
        carry = [
            c if c is not None else self.fresh(v)
            for v, c in zip(eqn.invars[cn + bn :], carry, strict=True)
        ]
        self.walk_closed(p["cond_jaxpr"], list(cconsts) + carry)
        outs = self.walk_closed(p["body_jaxpr"], list(bconsts) + carry)
        for c, o in zip(carry, outs, strict=True):
            self._unite_all(c, o)
        return carry

    def cond(self, eqn, ins):
        outs = [self.fresh(v) for v in eqn.outvars]
        for branch in eqn.params["branches"]:
            bouts = self.walk_closed(branch, list(ins[1:]))
            for o, b in zip(outs, bouts, strict=True):
                self._unite_all(o, b)
        return outs

    def walk_closed(self, closed, ins):
        return self.walk(closed.jaxpr, ins)


def _call_jaxpr(eqn):
    """The sub-jaxpr of a call-like primitive (``jit``, ``custom_jvp_call``, ``remat``, ...) whose
    inputs and outputs are the equation's own, else None."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        sub = getattr(sub, "jaxpr", sub)
        if not hasattr(sub, "eqns"):
            continue
        if len(sub.invars) != len(eqn.invars) or len(sub.outvars) != len(eqn.outvars):
            continue
        same = all(
            getattr(a.aval, "shape", None) == getattr(b.aval, "shape", None)
            for a, b in zip(sub.invars, eqn.invars, strict=True)
        )
        if same:
            return sub
    return None


def _abstract(x: Any) -> Any:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
    return x


def _make_jaxpr(fn: Callable, params: Any, args: tuple) -> Any:
    abstract = jax.tree.map(_abstract, (params, args))
    return jax.make_jaxpr(lambda p, a: fn(p, *a))(*abstract)


def trace(fn: Callable[..., Any], params: Any, *example_args: Any) -> list[Group]:
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

    Paths are the ``/``-joined strings of :func:`jaxslim._tree.path_str` (``"block/w2"``,
    ``"params/Dense_0/kernel"``). Size-1 axes and convolution kernels' spatial axes are not
    channels and are left out. For Linen pass ``lambda v, x: model.apply(v, x)`` and
    ``{"params": ...}`` (eval mode: no mutable collections in the output).

    Args:
      fn: ``fn(params, *example_args)``; its outputs are the model outputs.
      params: pytree of arrays (or ``ShapeDtypeStruct``).
      *example_args: inputs (arrays or ``ShapeDtypeStruct``), used for their shapes only.

    Returns:
      A list of :class:`Group`, in the order of the first parameter leaf they touch.

    >>> import jax.numpy as jnp
    >>> params = {"w1": jnp.ones((4, 8)), "b1": jnp.ones(8), "w2": jnp.ones((8, 3))}
    >>> fn = lambda p, x: jnp.maximum(x @ p["w1"] + p["b1"], 0) @ p["w2"]
    >>> [list(g) for g in trace(fn, params, jnp.ones(4)) if g.removable]
    [[('b1', 0), ('w1', 1), ('w2', 0)]]
    """
    closed = _make_jaxpr(fn, params, example_args)
    jaxpr = closed.jaxpr
    param_leaves = _tree.leaves_with_paths(params)
    arg_leaves = _tree.leaves_with_paths(list(example_args))
    if len(param_leaves) + len(arg_leaves) != len(jaxpr.invars):
        raise ValueError(
            f"splice.trace: fn's jaxpr has {len(jaxpr.invars)} inputs but params and args have "
            f"{len(param_leaves) + len(arg_leaves)} leaves"
        )
    w = _Walker()
    ins = [w.fresh(v) for v in jaxpr.invars]
    for (path, _), nodes in zip(arg_leaves, ins[len(param_leaves) :], strict=True):
        for a, n in enumerate(nodes):
            w.axes.tag(n, f"couples to axis {a} of input args[{path}]")
    outs = w.walk(jaxpr, ins)
    for i, nodes in enumerate(outs):
        for a, n in enumerate(nodes):
            w.axes.tag(n, f"reaches axis {a} of output {i} of fn")
    return _groups(w.axes, param_leaves, ins[: len(param_leaves)])


def _groups(axes: Axes, leaves: list, nodes: list) -> list[Group]:
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
        groups.append(
            Group(
                members=tuple(sorted(members, key=lambda m: (m.path, m.axis, m.factor, m.segment))),
                size=axes.size[root],
                removable=not reasons,
                reasons=tuple(reasons),
                hazards=tuple(axes.hazards.get(root, {})),
            )
        )
    return groups


def count_flops(fn: Callable[..., Any], params: Any, *example_args: Any) -> int:
    """FLOPs of ``fn(params, *args)``: ``2 x`` the multiply-adds of its matmuls and convolutions.

    Counted from the jaxpr on shapes only; ``scan`` bodies count ``length`` times. Element-wise
    ops are not counted.

    >>> import jax.numpy as jnp
    >>> count_flops(lambda p, x: x @ p, jnp.ones((4, 8)), jnp.ones((2, 4)))
    128
    """
    return _flops(_make_jaxpr(fn, params, example_args).jaxpr)


def _flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            per_out = math.prod(rhs) // rhs[dn.rhs_spec[0]]
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_out
        elif name == "scan":
            total += eqn.params["length"] * _flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(_flops(b.jaxpr) for b in eqn.params["branches"])
        elif name == "while":
            total += _flops(eqn.params["body_jaxpr"].jaxpr)
        else:
            sub = _call_jaxpr(eqn)
            if sub is not None:
                total += _flops(sub)
    return total
