"""One small rule per primitive: how the axes of its inputs map to the axes of its outputs.

A rule gets the walker ``w`` (with the union-find ``w.axes``), the equation and the node lists of
its inputs (one node per axis, ``None`` for a literal) and returns the node lists of its outputs.
``w.fresh(var)`` makes new, unconnected nodes for an output. A primitive without a rule is handled
by ``unsupported``: every axis it touches is tagged with the reason, so a channel group that flows
through it is reported as not removable rather than guessed.
"""

from __future__ import annotations

from collections.abc import Callable

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
SPATIAL = "it is a spatial axis whose size follows the input's (a convolution or pooling output)"

Rule = Callable[..., list]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


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
    RULES[_name] = elementwise


@rule("optimization_barrier", "device_put")
def _pairwise(w, eqn, ins):
    return [
        list(nodes) if nodes is not None else w.fresh(v)
        for v, nodes in zip(eqn.outvars, ins, strict=True)
    ]


@rule("broadcast_in_dim")
def _broadcast_in_dim(w, eqn, ins):
    (out,) = [w.fresh(v) for v in eqn.outvars]
    src, dims = _shape(eqn.invars[0]), eqn.params["broadcast_dimensions"]
    for i, d in enumerate(dims):
        if src[i] == eqn.params["shape"][d]:
            w.axes.unite(out[d], ins[0][i])
    for d, n in enumerate(out):
        if d not in dims:
            w.axes.tag(n, FIXED)
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
    "removing channels changes its statistics even when they are zero; an RMSNorm can be "
    "corrected by scaling its scale by sqrt(d_old / d_new), a LayerNorm or softmax cannot"
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
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    for i, j in zip(lc, rc, strict=True):
        w.axes.unite(lhs[i], rhs[j])
    for i, j in zip(lb, rb, strict=True):
        w.axes.unite(lhs[i], rhs[j])
    lfree = [n for i, n in enumerate(lhs) if i not in lc and i not in lb]
    rfree = [n for i, n in enumerate(rhs) if i not in rc and i not in rb]
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
        f"grouped convolution: removing a channel group changes feature_group_count={g}",
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
        elif stride != 1:
            w.axes.tag(n, f"sliced with stride {stride} by slice")
            w.axes.tag(out[d], f"sliced with stride {stride} by slice")
        else:
            parts = [w.axes.new(start), out[d], w.axes.new(shape[d] - limit)]
            w.axes.unite(n, w.axes.concat(parts), "sliced by slice")
    return [out]


@rule("dynamic_slice")
def _dynamic_slice(w, eqn, ins):
    shape = _shape(eqn.invars[0])
    return _partial(w, eqn, ins, lambda d: eqn.params["slice_sizes"][d] != shape[d], "sliced")


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


@rule("iota", "rng_bit_generator", "random_seed", "random_bits", "random_wrap", "random_unwrap")
def _source(w, eqn, ins):
    if eqn.primitive.name == "iota" or not any(ins):
        outs = [w.fresh(v) for v in eqn.outvars]
        for o in outs:
            for n in o:
                w.axes.tag(n, FIXED)
        return outs
    return unsupported(w, eqn, ins)


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
