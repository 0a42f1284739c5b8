"""One table of primitive rules, read by ``trace``, ``count_flops`` and ``find_foldable``.

Each primitive has one :class:`Rule` record in ``RULES``:

* ``axes(w, eqn, ins) -> outs``: how the axes of its inputs map to the axes of its outputs
  (:func:`jaxslim.splice.trace`). It gets the walker ``w`` (with the union-find ``w.axes``), the
  equation and the node lists of its inputs (one node per axis, ``None`` for a literal) and
  returns one node list per output. ``w.fresh(var)`` makes new, unconnected nodes for an output.
  A primitive without an ``axes`` rule is handled by :func:`unsupported`: every axis it touches is
  tagged with the reason, so a channel group that flows through it is reported as not removable
  rather than guessed.
* ``flops(eqn) -> int``: its FLOPs (:func:`jaxslim.splice.count_flops`); ``None`` counts 0.
* ``fold``: its role in fold detection (:func:`jaxslim.splice.find_foldable`): ``"linear"`` (a
  layer: ``dot_general``, convolution), ``"layout"`` (reshape-like), ``"cast"`` (value
  preserving), ``"affine"`` (``add sub mul div neg``: extends an affine chain), ``"vector"`` (an
  element-wise op allowed on per-channel parameter vectors, e.g. ``rsqrt(var + eps)``: evaluated
  by binding the primitive), or ``None`` (ends a chain).

Control flow (``scan``, ``while``, ``cond``, ``jit`` and other calls) is not in the table: the
shared walker (:mod:`jaxslim._jaxpr`) handles it. Add a rule with :func:`register_rule`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from jaxslim._checks import public

ELEMENTWISE = frozenset(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp complex conj
    convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor
    ge gt igamma imag integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg
    nextafter not or pow real reduce_precision rem round rsqrt select_n sign sin sinh sqrt square
    stop_gradient sub tan tanh xor sharding_constraint mesh_cast pvary""".split()
)
REDUCTIONS = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or".split())
CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())

FIXED = "it is an axis of fixed size created inside fn (a broadcast or iota)"
GROUPED = "grouped convolution"
INDEXED = (
    "its entries are taken one by one ({prim} of length 1: a fused axis such as the (2, ...) of "
    "a gate/up or key/value kernel), so it is not a channel axis"
)
IOTA = (
    "an iota runs along it: values computed from channel positions (RoPE frequencies, position "
    "masks) change for the kept channels unless the last ones are removed"
)
STACKED = (
    "values are stacked along it ({prim}): its size is the number of values (the (..., 2) of "
    "interleaved RoPE pairs), so it is not a channel axis"
)
STRIDED = (
    "its entries are taken one by one by a stride-{stride} slice (the even and odd entries of "
    "interleaved RoPE pairs), so it is not a channel axis"
)
SPATIAL = "it is a spatial axis whose size follows the input's (a convolution or pooling output)"

AxesRule = Callable[..., list]
FlopsRule = Callable[[Any], int]
FOLD_ROLES = ("linear", "layout", "cast", "affine", "vector")


@dataclasses.dataclass(frozen=True)
class Rule:
    """What the splice walkers know about one primitive (see the module docstring)."""

    axes: AxesRule | None = None
    flops: FlopsRule | None = None
    fold: str | None = None


RULES: dict[str, Rule] = {}


def _set(name: str, **changes: Any) -> None:
    RULES[name] = dataclasses.replace(RULES.get(name, Rule()), **changes)


def rule(*names: str) -> Callable[[AxesRule], AxesRule]:
    """Registers an ``axes`` rule for built-in primitives (no checks; see :func:`register_rule`)."""

    def register(fn: AxesRule) -> AxesRule:
        for name in names:
            _set(name, axes=fn)
        return fn

    return register


@public("splice.register_rule")
def register_rule(
    primitive: Any,
    *,
    flops: FlopsRule | None = None,
    fold: str | None = None,
    override: bool = False,
) -> Callable[[AxesRule], AxesRule]:
    """Decorator: teaches :func:`~jaxslim.splice.trace` (and ``count_flops``, ``find_foldable``)
    a primitive, by name or as a ``jax.extend.core.Primitive``.

    The decorated function is the axes rule ``rule(w, eqn, ins) -> outs``:

    * ``eqn`` is the jaxpr equation (``eqn.params``, ``eqn.invars``, ``eqn.outvars``);
    * ``ins[i]`` is the list of axis nodes of input ``i`` (one ``int`` per axis), or ``None`` for
      a literal;
    * it returns one list of axis nodes per output. Reuse an input's nodes for an output axis that
      carries the same channels, make new ones with ``w.fresh(eqn.outvars[j])`` and connect them
      with ``w.axes.unite(a, b)``; ``w.axes.tag(n, reason)`` makes an axis not removable, with
      ``hazard=True`` removable with a warning.

    ``flops(eqn) -> int`` counts its FLOPs for ``count_flops`` (default 0). ``fold`` is ``None``
    (a folded chain stops here), ``"cast"`` (value preserving) or ``"vector"`` (allowed inside
    the scale and shift of a folded chain when all its inputs are per-channel parameters; it is
    re-evaluated by binding the primitive). Raises ``ValueError`` if the primitive already has a
    rule, unless ``override``.

    >>> import jax, jax.numpy as jnp
    >>> from jax.extend.core import Primitive
    >>> from jaxslim import splice
    >>> double = Primitive("doc_double")
    >>> _ = double.def_impl(lambda x: 2 * x)
    >>> _ = double.def_abstract_eval(lambda x: x)  # same shape and dtype out
    >>> @splice.register_rule(double, fold="vector")
    ... def _double(w, eqn, ins):
    ...     return [list(ins[0])]  # element-wise: every axis goes through unchanged
    >>> p = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 3))}
    >>> fn = lambda p, x: double.bind(x @ p["w1"]) @ p["w2"]
    >>> [list(g) for g in splice.trace(fn, p, jnp.ones(4)) if g.removable]
    [[('w1', 1), ('w2', 0)]]
    """
    name = getattr(primitive, "name", primitive)
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"splice.register_rule: primitive must be a name or a jax Primitive, got {primitive!r}"
        )
    if fold not in (None, "cast", "vector"):
        raise ValueError(
            f"splice.register_rule: fold must be None, 'cast' or 'vector' for {name!r}, got "
            f"{fold!r} (the 'linear', 'layout' and 'affine' roles need built-in support)"
        )
    if flops is not None and not callable(flops):
        raise TypeError(f"splice.register_rule: flops must be a callable eqn -> int, got {flops!r}")
    if name in RULES and RULES[name].axes is not None and not override:
        raise ValueError(
            f"splice.register_rule: primitive {name!r} already has a rule; pass override=True "
            "to replace it"
        )

    def register(fn: AxesRule) -> AxesRule:
        if not callable(fn):
            raise TypeError(f"splice.register_rule: the rule for {name!r} must be callable")
        RULES[name] = Rule(axes=fn, flops=flops, fold=fold)
        return fn

    return register


def flops(eqn: Any) -> int:
    """FLOPs of one equation by the table (0 for a primitive without a ``flops`` rule)."""
    r = RULES.get(eqn.primitive.name)
    return 0 if r is None or r.flops is None else int(r.flops(eqn))


def fold_role(name: str) -> str | None:
    """The ``fold`` role of a primitive (``None`` if it has none)."""
    r = RULES.get(name)
    return None if r is None else r.fold


def _shape(v) -> tuple[int, ...]:
    return tuple(getattr(v.aval, "shape", ()))


def unsupported(w, eqn, ins, reason: str | None = None) -> list:
    """Tags every axis of every input and output: the op is opaque."""
    reason = reason or f"no rule for primitive {eqn.primitive.name!r}"
    for nodes in ins:
        for n in nodes or ():
            w.axes.tag(n, reason)
    outs = [w.fresh(v) for v in eqn.outvars]
    for nodes in outs:
        for n in nodes:
            w.axes.tag(n, reason)
    return outs


def elementwise(w, eqn, ins) -> list:
    """Same-position axes of all full-rank operands and the outputs are one axis."""
    outs = [w.fresh(v) for v in eqn.outvars]
    out_shape = _shape(eqn.outvars[0])
    for v, nodes in zip(eqn.invars, ins, strict=True):
        if nodes is None or len(nodes) != len(out_shape):
            continue
        for i, n in enumerate(nodes):
            if _shape(v)[i] == out_shape[i]:
                for o in outs:
                    w.axes.unite(o[i], n)
    return outs


for _name in ELEMENTWISE:
    _set(_name, axes=elementwise)


@rule("add", "sub")
def _offset(w, eqn, ins):
    """Element-wise; a parameter vector plus or minus a literal (a value computed from the
    parameters alone, neither from fn's inputs nor made from literals) is flagged: it is the
    ``1 + w`` of a Gemma-style norm, which a norm correction must scale as a whole."""
    outs = elementwise(w, eqn, ins)
    if any(x is None for x in ins):
        for x in ins:
            if x is not None and len(x) == 1 and not getattr(x, "dep", True):
                if not getattr(x, "made", True):
                    w.axes.tag(x[0], OFFSET.format(prim=eqn.primitive.name), hazard=True)
    return outs


@rule("optimization_barrier", "device_put")
def _pairwise(w, eqn, ins):
    return [
        list(nodes) if nodes is not None else w.fresh(v)
        for v, nodes in zip(eqn.outvars, ins, strict=True)
    ]


@rule("broadcast_in_dim")
def _broadcast_in_dim(w, eqn, ins):
    """Kept axes go through; a new (or size-1 expanded) axis is a fresh node. Its size is a
    constant of the jaxpr, but code almost always computes it from another array's shape
    (``jnp.where(mask, logits, -inf)``, ``jnp.repeat`` of key/value heads), so it is not pinned
    here: ``trace`` re-traces ``fn`` with every removable group one channel wider and pins the
    groups whose sizes do not follow (a literal ``jnp.zeros((64,))``)."""
    (out,) = [w.fresh(v) for v in eqn.outvars]
    src, dims = _shape(eqn.invars[0]), eqn.params["broadcast_dimensions"]
    for i, d in enumerate(dims):
        if src[i] == eqn.params["shape"][d]:
            w.axes.unite(out[d], ins[0][i])
    return [out]


@rule("transpose")
def _transpose(w, eqn, ins):
    return [[ins[0][p] for p in eqn.params["permutation"]]]


@rule("squeeze")
def _squeeze(w, eqn, ins):
    nd = len(ins[0])
    drop = {d % nd for d in eqn.params["dimensions"]}
    return [[n for i, n in enumerate(ins[0]) if i not in drop]]


@rule("reshape")
def _reshape(w, eqn, ins):
    """Aligns runs of input and output axes with equal products and unites them as products."""
    if eqn.params.get("dimensions") is not None:
        return unsupported(w, eqn, ins, "reshape with a dimension permutation")
    (out,) = [w.fresh(v) for v in eqn.outvars]
    src, dst = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    a = [i for i, s in enumerate(src) if s > 1]
    b = [i for i, s in enumerate(dst) if s > 1]
    why = f"reshape {src} -> {dst} mixes a channel axis with another axis"
    i = j = 0
    while i < len(a) and j < len(b):
        ga, gb = [a[i]], [b[j]]
        pa, pb = src[a[i]], dst[b[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                pa *= src[a[i]]
                ga.append(a[i])
                i += 1
            else:
                pb *= dst[b[j]]
                gb.append(b[j])
                j += 1
        na = w.axes.product([ins[0][k] for k in ga])
        nb = w.axes.product([out[k] for k in gb])
        w.axes.unite(na, nb, why)
    return [out]


def _reduce_like(w, eqn, ins, axes, note: str | None) -> list:
    nd = len(ins[0])
    axes = {a % nd for a in axes}
    for a in axes:
        if note:
            w.axes.tag(ins[0][a], note.format(prim=eqn.primitive.name), hazard=True)
    keep = [n for i, n in enumerate(ins[0]) if i not in axes]
    return [list(keep) for _ in eqn.outvars]


_REDUCED = (
    "reduced over by {prim}: if that is a mean, a norm or a softmax (LayerNorm, RMSNorm), "
    "removing channels changes the function even where they are zero (the mean now divides by "
    "the new width). An RMSNorm is corrected only by multiplying whatever multiplies its "
    "normalized value by sqrt(d_old / d_new): the scale w of x * w, but the whole 1 + w of "
    "Gemma's x * (1 + w) (w' = (1 + w) * sqrt(d_old / d_new) - 1); a constant computed from "
    "the width (Gemma's sqrt(hidden_size) embedding factor, a 1 / sqrt(d) scale) changes when "
    "a config rebuilds the model and needs its own correction; a LayerNorm or softmax cannot "
    "be corrected. Compare the rebuilt model's outputs"
)
OFFSET = (
    "a parameter on these channels is offset by a constant before it is used ({prim} of a "
    "literal: Gemma's RMSNorm x * (1 + w)): a correction that scales the norm's factor scales "
    "1 + w, not w"
)


@rule(*REDUCTIONS)
def _reduce(w, eqn, ins):
    return _reduce_like(w, eqn, ins, eqn.params["axes"], _REDUCED)


@rule("argmax", "argmin")
def _argmax(w, eqn, ins):
    for a in eqn.params["axes"]:
        w.axes.tag(ins[0][a], f"{eqn.primitive.name} returns channel indices")
    return _reduce_like(w, eqn, ins, eqn.params["axes"], None)


@rule(*CUMULATIVE)
def _cumulative(w, eqn, ins):
    w.axes.tag(
        ins[0][eqn.params["axis"] % len(ins[0])],
        _REDUCED.format(prim=eqn.primitive.name),
        hazard=True,
    )
    return [list(ins[0])]


@rule("dot_general")
def _dot_general(w, eqn, ins):
    """Contracted and batch axes unite. A matmul of two activations (neither operand computed
    from the parameters alone: attention's ``q @ k`` and ``probs @ v``) also records the roles
    of its axes, from which ``trace`` tells head axes from within-head axes."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    for i, j in zip(lc, rc, strict=True):
        w.axes.unite(lhs[i], rhs[j])
    for i, j in zip(lb, rb, strict=True):
        w.axes.unite(lhs[i], rhs[j])
    lfree = [n for i, n in enumerate(lhs) if i not in lc and i not in lb]
    rfree = [n for i, n in enumerate(rhs) if i not in rc and i not in rb]
    if all(getattr(x, "dep", False) for x in ins):
        dot = w.axes.new(0)  # a unique id for this matmul
        for i in lc:
            w.axes.mark(lhs[i], "contracted", dot)
        for i in lb:
            w.axes.mark(lhs[i], "batch", dot)
        for n in lfree + rfree:
            w.axes.mark(n, "free", dot)
    return [[lhs[i] for i in lb] + lfree + rfree]


@rule("conv_general_dilated")
def _conv(w, eqn, ins):
    """Input features meet the kernel's input axis, the kernel's output axis is the output's.

    With ``feature_group_count = G > 1`` the feature axes are ``G x (C / G)`` and ``G x (O / G)``:
    the group factor is shared, so a whole depthwise channel goes at once (and ``G`` changes).
    """
    p = eqn.params
    if p["batch_group_count"] != 1:
        return unsupported(w, eqn, ins, "convolution with batch_group_count > 1")
    dn = p["dimension_numbers"]
    lhs, rhs = ins
    (out,) = [w.fresh(v) for v in eqn.outvars]
    ax = w.axes
    ax.unite(out[dn.out_spec[0]], lhs[dn.lhs_spec[0]])
    for d in dn.rhs_spec[2:]:
        ax.hide(rhs[d])
    for d in dn.out_spec[2:]:
        ax.tag(out[d], SPATIAL)
    lf, ri, ro, of = (
        lhs[dn.lhs_spec[1]],
        rhs[dn.rhs_spec[1]],
        rhs[dn.rhs_spec[0]],
        out[dn.out_spec[1]],
    )
    g = p["feature_group_count"]
    if g == 1:
        ax.unite(lf, ri)
        ax.unite(ro, of)
        return [out]
    group = ax.new(g)
    ax.tag(
        group,
        f"{GROUPED}: removing a channel group changes feature_group_count={g}",
        hazard=True,
    )
    ax.unite(lf, ax.product([group, ri]))
    ax.unite(ro, ax.product([group, ax.new(ax.size[ro] // g)]))
    ax.unite(ro, of)
    return [out]


def _window(w, eqn, ins, n_operands: int):
    p = eqn.params
    outs = [w.fresh(v) for v in eqn.outvars]
    for nodes, o in zip(ins[:n_operands], outs, strict=True):
        for d, n in enumerate(nodes):
            untouched = (
                p["window_dimensions"][d] == 1
                and p["window_strides"][d] == 1
                and tuple(p["padding"][d]) == (0, 0)
                and p.get("base_dilation", (1,) * len(nodes))[d] == 1
            )
            if untouched:
                w.axes.unite(o[d], n)
            else:
                w.axes.tag(n, f"{eqn.primitive.name} pools over it", hazard=True)
                w.axes.tag(o[d], SPATIAL)
    return outs


@rule("reduce_window_sum", "reduce_window_max", "reduce_window_min", "cumsum_window")
def _reduce_window(w, eqn, ins):
    return _window(w, eqn, ins, 1)


@rule("reduce_window")
def _reduce_window_generic(w, eqn, ins):
    return _window(w, eqn, ins, len(eqn.outvars))


def _partial(w, eqn, ins, changed: Callable[[int], bool], what: str):
    """Unites unchanged axes; tags axes that are cut, padded or reversed."""
    (out,) = [w.fresh(v) for v in eqn.outvars]
    for d, n in enumerate(ins[0]):
        if changed(d):
            w.axes.tag(n, f"{what} by {eqn.primitive.name}")
            w.axes.tag(out[d], f"{what} by {eqn.primitive.name}")
        else:
            w.axes.unite(out[d], n)
    return [out]


@rule("slice")
def _slice(w, eqn, ins):
    """A unit-stride slice of an axis takes one segment out of it: the input axis is united with
    the concatenation ``[cut before, output, cut after]``, so a slice that takes back one operand
    of a concatenation maps that operand's channels to the output. The bounds must follow the
    new widths when channels are removed (compute them from the parameters' shapes)."""
    p, shape = eqn.params, _shape(eqn.invars[0])
    strides = p["strides"] or (1,) * len(shape)
    (out,) = [w.fresh(v) for v in eqn.outvars]
    for d, n in enumerate(ins[0]):
        start, limit, stride = p["start_indices"][d], p["limit_indices"][d], strides[d]
        if (start, limit, stride) == (0, shape[d], 1):
            w.axes.unite(out[d], n)
        elif limit - start == 1:  # w[0], w[1] of a fused (2, ...) gate/up or k/v axis
            w.axes.tag(n, INDEXED.format(prim="slice"))
        elif stride != 1 and _every_stride(shape[d], start, limit, stride):
            # x[..., ::2], x[..., 1::2] of interleaved RoPE: the axis is (n / stride, stride),
            # the output its outer factor, the stride index taken one by one.
            inner = w.axes.new(stride)
            w.axes.tag(inner, STRIDED.format(stride=stride))
            w.axes.unite(n, w.axes.product([out[d], inner]), f"sliced with stride {stride}")
        elif stride != 1:
            w.axes.tag(n, f"sliced with stride {stride} by slice")
            w.axes.tag(out[d], f"sliced with stride {stride} by slice")
        else:
            parts = [w.axes.new(start), out[d], w.axes.new(shape[d] - limit)]
            w.axes.unite(n, w.axes.concat(parts), "sliced by slice")
    return [out]


def _every_stride(n: int, start: int, limit: int, stride: int) -> bool:
    """Whether ``x[start:limit:stride]`` of an axis of ``n`` takes one entry of every ``stride``:
    ``n`` a multiple of ``stride``, ``start < stride`` and the slice running to the end."""
    return n % stride == 0 and start < stride and -(-(limit - start) // stride) == n // stride


@rule("dynamic_slice")
def _dynamic_slice(w, eqn, ins):
    shape, sizes = _shape(eqn.invars[0]), eqn.params["slice_sizes"]
    (out,) = [w.fresh(v) for v in eqn.outvars]
    for d, n in enumerate(ins[0]):
        if sizes[d] == shape[d]:
            w.axes.unite(out[d], n)
        elif sizes[d] == 1:
            w.axes.tag(n, INDEXED.format(prim="dynamic_slice"))
        else:
            w.axes.tag(n, "sliced by dynamic_slice")
            w.axes.tag(out[d], "sliced by dynamic_slice")
    return [out]


@rule("dynamic_update_slice")
def _dynamic_update_slice(w, eqn, ins):
    shape, upd = _shape(eqn.invars[0]), _shape(eqn.invars[1])
    out = _partial(w, eqn, ins, lambda d: upd[d] != shape[d], "updated in part")
    for d, n in enumerate(ins[1]):
        if upd[d] == shape[d]:
            w.axes.unite(out[0][d], n)
        else:
            w.axes.tag(n, "updated in part by dynamic_update_slice")
    return out


@rule("pad")
def _pad(w, eqn, ins):
    cfg = eqn.params["padding_config"]
    return _partial(w, eqn, ins, lambda d: tuple(cfg[d]) != (0, 0, 0), "padded")


@rule("rev")
def _rev(w, eqn, ins):
    dims = set(eqn.params["dimensions"])
    return _partial(w, eqn, ins, lambda d: d in dims, "reversed")


@rule("concatenate")
def _concatenate(w, eqn, ins):
    """The output's concatenated axis is the concatenation of the operands' axes (segments at
    offsets); the other axes are united position by position."""
    dim = eqn.params["dimension"]
    if all(_shape(v)[dim] == 1 for v in eqn.invars):  # jnp.stack as expand_dims + concatenate
        return _stack_along(w, eqn, ins, dim, keep_dim=True)
    (out,) = [w.fresh(v) for v in eqn.outvars]
    segs = []
    for v, nodes in zip(eqn.invars, ins, strict=True):
        if nodes is None:
            nodes = w.fresh(v)
            for n in nodes:
                w.axes.tag(n, FIXED)
        for d, n in enumerate(nodes):
            if d != dim:
                w.axes.unite(out[d], n)
        segs.append(nodes[dim])
    w.axes.unite(out[dim], w.axes.concat(segs), "concatenated along it")
    return [out]


def _stack_along(w, eqn, ins, dim: int, keep_dim: bool) -> list:
    """Operands placed side by side along a new axis ``dim`` (size: their count): the other
    axes unite position by position; the new axis is tagged (it is not a channel axis)."""
    (out,) = [w.fresh(v) for v in eqn.outvars]
    rest = [n for d, n in enumerate(out) if d != dim]
    for nodes in ins:
        if nodes is None:
            continue
        if keep_dim:
            nodes = [n for d, n in enumerate(nodes) if d != dim]
        for a, b in zip(rest, nodes, strict=True):
            w.axes.unite(a, b)
    w.axes.tag(out[dim], STACKED.format(prim=eqn.primitive.name))
    return [out]


@rule("stack")
def _stack(w, eqn, ins):
    """``jnp.stack(xs, axis)`` (one primitive in jax >= 0.10): a new axis of ``len(xs)``."""
    return _stack_along(w, eqn, ins, eqn.params["axis"] % len(_shape(eqn.outvars[0])), False)


@rule("split")
def _split(w, eqn, ins):
    """The input's split axis is the concatenation of the pieces' axes: the inverse of
    ``concatenate``. The sizes must follow the new widths when channels are removed."""
    dim = eqn.params["axis"] % len(ins[0])
    outs = [w.fresh(v) for v in eqn.outvars]
    for o in outs:
        for d, n in enumerate(o):
            if d != dim:
                w.axes.unite(n, ins[0][d])
    w.axes.unite(ins[0][dim], w.axes.concat([o[dim] for o in outs]), "split along it")
    return outs


@rule("sort")
def _sort(w, eqn, ins):
    dim = eqn.params["dimension"]
    outs = [w.fresh(v) for v in eqn.outvars]
    for nodes in ins:
        for o in outs:
            for d, n in enumerate(nodes):
                if d == dim:
                    w.axes.tag(n, "sorted along it")
                    w.axes.tag(o[d], "sorted along it")
                else:
                    w.axes.unite(o[d], n)
    return outs


@rule("top_k")
def _top_k(w, eqn, ins):
    nd = len(ins[0])
    outs = [w.fresh(v) for v in eqn.outvars]
    w.axes.tag(ins[0][nd - 1], "top_k along it")
    for o in outs:
        w.axes.tag(o[nd - 1], "top_k along it")
        for d in range(nd - 1):
            w.axes.unite(o[d], ins[0][d])
    return outs


@rule("iota")
def _iota(w, eqn, ins):
    """A fresh node per axis, not pinned (its size is checked by ``trace``'s re-trace, like a
    broadcast's); the iota's own axis is a hazard: values computed from channel positions (RoPE
    frequencies, a position mask) differ for the kept channels after removal."""
    (out,) = [w.fresh(v) for v in eqn.outvars]
    w.axes.tag(out[eqn.params["dimension"]], IOTA, hazard=True)
    return [out]


@rule("rng_bit_generator", "random_seed", "random_bits", "random_wrap", "random_unwrap")
def _source(w, eqn, ins):
    """Random values (dropout masks): fresh output nodes, sized from the code like a broadcast;
    the key's axes are not channels."""
    for nodes in ins:
        for n in nodes or ():
            w.axes.tag(n, f"it is an axis of a random key ({eqn.primitive.name})")
    return [w.fresh(v) for v in eqn.outvars]


@rule("gather")
def _gather(w, eqn, ins):
    """Operand axes taken whole (an embedding's feature axis) map to the output's offset axes;
    the indexed axes are tagged: their indices are data."""
    p = eqn.params
    dn = p["dimension_numbers"]
    operand, indices = ins
    (out,) = [w.fresh(v) for v in eqn.outvars]
    shape = _shape(eqn.invars[0])
    skipped = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
    offset_src = [d for d in range(len(shape)) if d not in skipped]
    for d in range(len(shape)):
        if d in dn.start_index_map or d in skipped or p["slice_sizes"][d] != shape[d]:
            w.axes.tag(operand[d], "indexed by gather with data-dependent indices")
    for d, o in zip(offset_src, dn.offset_dims, strict=True):
        if d not in dn.start_index_map and p["slice_sizes"][d] == shape[d]:
            w.axes.unite(out[o], operand[d])
        else:
            w.axes.tag(out[o], "indexed by gather with data-dependent indices")
    batch = [d for d in range(len(out)) if d not in dn.offset_dims]
    idx_batch = [d for d in range(len(indices)) if d != len(indices) - 1]
    if len(batch) == len(idx_batch):
        for d, i in zip(batch, idx_batch, strict=True):
            w.axes.unite(out[d], indices[i])
    else:
        for d in batch:
            w.axes.tag(out[d], "gather output axis")
    return [out]


@rule("unstack")
def _unstack(w, eqn, ins):
    """``a, b = x`` (jax >= 0.12): each output is one index of ``axis``; the other axes go through.
    The unstacked axis is tagged: its size is the number of outputs."""
    ax = eqn.params["axis"] % len(ins[0])
    outs = [w.fresh(v) for v in eqn.outvars]
    w.axes.tag(ins[0][ax], "unstacked along it (its size is the number of values it gives)")
    rest = [n for d, n in enumerate(ins[0]) if d != ax]
    for o in outs:
        for a, b in zip(o, rest, strict=True):
            w.axes.unite(a, b)
    return outs


# FLOPs: 2 x the multiply-adds of matmuls and convolutions; element-wise ops are not counted.


def _dot_flops(eqn) -> int:
    (lc, _), _ = eqn.params["dimension_numbers"]
    lhs = _shape(eqn.invars[0])
    return 2 * math.prod(_shape(eqn.outvars[0])) * math.prod(lhs[i] for i in lc)


def _conv_flops(eqn) -> int:
    rhs = _shape(eqn.invars[1])
    dn = eqn.params["dimension_numbers"]
    per_out = math.prod(rhs) // rhs[dn.rhs_spec[0]]
    return 2 * math.prod(_shape(eqn.outvars[0])) * per_out


_set("dot_general", flops=_dot_flops, fold="linear")
_set("conv_general_dilated", flops=_conv_flops, fold="linear")
for _name in ("reshape", "broadcast_in_dim", "squeeze"):
    _set(_name, fold="layout")
for _name in ("convert_element_type", "copy"):
    _set(_name, fold="cast")
for _name in "add sub mul div neg".split():
    _set(_name, fold="affine")
for _name in "rsqrt sqrt exp log abs max min integer_pow square pow".split():
    _set(_name, fold="vector")
