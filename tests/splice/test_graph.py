"""splice.trace: coupled-axis groups, non-removable reasons, FLOP counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxslim import splice

F32 = jnp.float32


def bias(h, b):
    return h + b.reshape((1,) * (h.ndim - 1) + b.shape)


def mlp_fn(p, x):
    return bias(jax.nn.relu(bias(x @ p["w1"], p["b1"])) @ p["w2"], p["b2"])


def mlp_params(din=4, hidden=8, dout=3):
    return {
        "w1": jnp.ones((din, hidden)),
        "b1": jnp.ones(hidden),
        "w2": jnp.ones((hidden, dout)),
        "b2": jnp.ones(dout),
    }


def pairs(g):
    return sorted(g)


def find(groups, path, axis):
    (g,) = [g for g in groups if (path, axis) in list(g)]
    return g


def test_plain_mlp_hidden_group_is_exactly_w1_out_b1_w2_in():
    groups = splice.trace(mlp_fn, mlp_params(), jnp.ones((2, 4)))
    removable = [g for g in groups if g.removable]
    assert len(removable) == 1
    assert pairs(removable[0]) == [("b1", 0), ("w1", 1), ("w2", 0)]
    assert removable[0].size == 8 and removable[0].hazards == ()
    inp = find(groups, "w1", 0)
    assert not inp.removable and "input" in inp.reasons[0]
    out = find(groups, "w2", 1)
    assert not out.removable and pairs(out) == [("b2", 0), ("w2", 1)] and "output" in out.reasons[0]


def residual_params(d=16, h=32, nblocks=2, key=0):
    ks = iter(jax.random.split(jax.random.key(key), 4 * nblocks + 4))
    r = lambda *s: jax.random.normal(next(ks), s) * 0.3
    return {
        "stem": {"w": r(4, d), "b": r(d)},
        "blocks": [{"w1": r(d, h), "b1": r(h), "w2": r(h, d), "b2": r(d)} for _ in range(nblocks)],
        "head": {"w": r(d, 3), "b": r(3)},
    }


def residual_fn(p, x):
    h = bias(x @ p["stem"]["w"], p["stem"]["b"])
    for b in p["blocks"]:
        h = h + bias(jax.nn.relu(bias(h @ b["w1"], b["b1"])) @ b["w2"], b["b2"])
    return bias(h @ p["head"]["w"], p["head"]["b"])


def test_residual_stream_couples_stem_block_outputs_and_head():
    groups = splice.trace(residual_fn, residual_params(), jnp.ones((2, 4)))
    stream = find(groups, "stem/w", 1)
    assert stream.removable and stream.size == 16
    expected = [("stem/w", 1), ("stem/b", 0), ("head/w", 0)]
    for i in range(2):
        expected += [(f"blocks/{i}/w2", 1), (f"blocks/{i}/b2", 0), (f"blocks/{i}/w1", 0)]
    assert pairs(stream) == sorted(expected)
    for i in range(2):
        hidden = find(groups, f"blocks/{i}/w1", 1)
        assert hidden.removable
        assert pairs(hidden) == sorted(
            [(f"blocks/{i}/w1", 1), (f"blocks/{i}/b1", 0), (f"blocks/{i}/w2", 0)]
        )
    assert len([g for g in groups if g.removable]) == 3


def test_layernorm_over_channels_is_a_hazard():
    p = residual_params()
    p["ln"] = jnp.ones(16)

    def fn(p, x):
        h = x @ p["stem"]["w"]
        h = (h - h.mean(-1, keepdims=True)) * p["ln"][None]
        return h @ p["head"]["w"]

    g = find(splice.trace(fn, p, jnp.ones((2, 4))), "ln", 0)
    assert g.removable and any("LayerNorm" in h for h in g.hazards)


@pytest.mark.parametrize(
    "op, reason",
    [
        (lambda h, idx: jnp.fft.fft(h).real.astype(F32), "no rule for primitive 'fft'"),
        (lambda h, idx: h[:, idx], "gather"),
        (lambda h, idx: jnp.concatenate([h, h], axis=1)[:, ::2], "stride"),
    ],
)
def test_unsupported_ops_make_groups_non_removable_with_reason(op, reason):
    def fn(p, x, idx):
        return op(jax.nn.relu(bias(x @ p["w1"], p["b1"])), idx) @ p["w2"]

    groups = splice.trace(fn, mlp_params(), jnp.ones((2, 4)), jnp.arange(8)[::-1])
    g = find(groups, "w1", 1)
    assert not g.removable and g.reasons
    if reason:
        assert any(reason in r for r in g.reasons)
    assert not [g for g in groups if g.removable and ("w1", 1) in list(g)]


def test_reshape_that_mixes_axes_is_reported():
    # (b, 6*4) -> (b, 4, 6): the kernel's 24 outputs cannot be split as both 6x4 and 4x6.
    p = {"w": jnp.ones((3, 24)), "v": jnp.ones((6, 2))}

    def fn(p, x):
        h = (x @ p["w"]).reshape(x.shape[0], 6, 4).reshape(x.shape[0], 4, 6)
        return h @ p["v"]

    groups = [g for g in splice.trace(fn, p, jnp.ones((2, 3))) if ("w", 1) in list(g)]
    assert groups and all(not g.removable for g in groups)
    assert all(any("reshape" in r for r in g.reasons) for g in groups)


def test_channel_permutation_by_reshape_transpose_gives_factor_groups():
    def fn(p, x, outer=2, inner=-1):
        h = jax.nn.relu(bias(x @ p["w1"], p["b1"]))
        h = h.reshape(h.shape[0], outer, inner).transpose(0, 2, 1).reshape(h.shape[0], -1)
        return h @ p["w2"]

    p = {k: v for k, v in mlp_params().items() if k != "b2"}
    groups = [g for g in splice.trace(fn, p, jnp.ones((2, 4)), check=False) if g.removable]
    got = sorted(sorted((m.path, m.axis, m.factors, m.factor) for m in g.members) for g in groups)
    assert got == [
        [("b1", 0, (2, 4), 0), ("w1", 1, (2, 4), 0), ("w2", 0, (4, 2), 1)],
        [("b1", 0, (2, 4), 1), ("w1", 1, (2, 4), 1), ("w2", 0, (4, 2), 0)],
    ]
    # A literal pins one factor (the other follows through the -1); the re-trace finds which
    # and names the reshape and its sizes.
    for kw, pinned, sizes in (({}, 2, "(2, 2, 4)"), ({"outer": -1, "inner": 4}, 4, "(2, 2, 4)")):
        traced = splice.trace(lambda p, x: fn(p, x, **kw), p, jnp.ones((2, 4)))
        groups = {g.size: g for g in traced if ("w1", 1) in list(g)}
        assert sorted(groups) == [2, 4]
        assert not groups[pinned].removable
        assert f"reshape (new_sizes={sizes}" in groups[pinned].reasons[-1]
        assert groups[6 - pinned].removable


def test_fused_qkv_kernel_yields_head_groups():
    heads, dim, d = 4, 8, 16
    p = {"wqkv": jnp.ones((d, 3 * heads * dim)), "wo": jnp.ones((heads * dim, d))}

    def fn(p, x):
        b, s, _ = x.shape
        qkv = (x @ p["wqkv"]).reshape(b, s, 3, heads, dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), -1)
        return x + jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, s, heads * dim) @ p["wo"]

    groups = splice.trace(fn, p, jnp.ones((2, 5, d)), within_heads=True, check=False)
    head = [g for g in groups if g.removable and g.size == heads]
    assert len(head) == 1
    assert sorted(head[0].members, key=lambda m: m.path) == [
        splice.Member("wo", 0, (heads, dim), 0),
        splice.Member("wqkv", 1, (3, heads, dim), 1),
    ]
    dims = [g for g in groups if g.removable and g.size == dim]
    assert [sorted((m.path, m.factor) for m in g.members) for g in dims] == [
        [("wo", 1), ("wqkv", 2)]
    ]
    # By default: head_dim is not offered, and the literal head count pins the heads, which the
    # re-trace names; reshaping by -1 heads (a constant head_dim, as most code does) frees them.
    groups = {g.size: g for g in splice.trace(fn, p, jnp.ones((2, 5, d))) if len(g) == 2}
    assert not groups[dim].removable and "within-head" in groups[dim].reasons[0]
    assert not groups[heads].removable
    assert "cannot reshape" in groups[heads].reasons[-1]
    assert "into shape (2, 5, 3, 4, 8)" in groups[heads].reasons[-1]

    def fn_free(p, x):
        b, s, _ = x.shape
        qkv = (x @ p["wqkv"]).reshape(b, s, 3, -1, dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), -1)
        return x + jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, s, -1) @ p["wo"]

    groups = {g.size: g for g in splice.trace(fn_free, p, jnp.ones((2, 5, d))) if len(g) == 2}
    assert groups[heads].removable and not groups[dim].removable


def conv(x, w, groups=1):
    return jax.lax.conv_general_dilated(
        x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups
    )


def test_conv_groups_depthwise_and_flatten_into_head():
    p = {
        "c1": jnp.ones((3, 1, 8)),
        "b1": jnp.ones(8),
        "dw": jnp.ones((3, 1, 8)),
        "head": jnp.ones((10 * 8, 3)),
    }

    def fn(p, x):
        h = jax.nn.relu(bias(conv(x, p["c1"]), p["b1"]))
        h = conv(h, p["dw"], groups=8)
        return h.reshape(h.shape[0], -1) @ p["head"]

    groups = splice.trace(fn, p, jnp.ones((2, 10, 1)))
    g = find(groups, "c1", 2)
    assert g.removable
    assert sorted((m.path, m.axis, m.factors, m.factor) for m in g.members) == [
        ("b1", 0, (8,), 0),
        ("c1", 2, (8,), 0),
        ("dw", 2, (8,), 0),
        ("head", 0, (10, 8), 1),
    ]
    assert any("feature_group_count" in h for h in g.hazards)
    spatial = [g for g in groups if ("head", 0) in list(g) and g.size == 10]
    assert len(spatial) == 1 and not spatial[0].removable
    assert not any(("c1", 0) in list(g) for g in groups)  # kernel spatial axes are not channels


def test_scan_layer_axis_is_not_removable_and_carry_couples_layers():
    p = {"inp": jnp.ones((4, 8)), "ws": jnp.ones((3, 8, 8)), "out": jnp.ones((8, 2))}

    def fn(p, x):
        h, _ = jax.lax.scan(lambda c, w: (c + jax.nn.relu(c @ w), None), x @ p["inp"], p["ws"])
        return h @ p["out"]

    groups = splice.trace(fn, p, jnp.ones((2, 4)))
    stream = find(groups, "inp", 1)
    assert stream.removable and pairs(stream) == [("inp", 1), ("out", 0), ("ws", 1), ("ws", 2)]
    layer = find(groups, "ws", 0)
    assert not layer.removable and "scan" in layer.reasons[0]


def test_linen_and_nnx_paths_and_norm_params():
    class LinenMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.LayerNorm()(nn.Dense(8)(x)))
            return nn.Dense(3)(x)

    model = LinenMLP()
    variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
    groups = splice.trace(lambda v, x: model.apply(v, x), variables, jnp.ones((2, 4)))
    g = find(groups, "params/Dense_0/kernel", 1)
    assert pairs(g) == sorted(
        [
            ("params/Dense_0/kernel", 1),
            ("params/Dense_0/bias", 0),
            ("params/LayerNorm_0/scale", 0),
            ("params/LayerNorm_0/bias", 0),
            ("params/Dense_1/kernel", 0),
        ]
    )
    assert g.hazards

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 6, (3,), rngs=rngs)
            self.bn = nnx.BatchNorm(6, use_running_average=True, rngs=rngs)
            self.out = nnx.Linear(6, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.relu(self.bn(self.conv(x))).mean(1))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    groups = splice.trace(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.ones((2, 5, 1)))
    g = find(groups, "conv/kernel", 2)
    assert g.removable and pairs(g) == [
        ("bn/bias", 0),
        ("bn/mean", 0),
        ("bn/scale", 0),
        ("bn/var", 0),
        ("conv/bias", 0),
        ("conv/kernel", 2),
        ("out/kernel", 0),
    ]


def test_trace_is_shape_only():
    p = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), mlp_params())
    groups = splice.trace(mlp_fn, p, jax.ShapeDtypeStruct((2, 4), F32))
    assert [pairs(g) for g in groups if g.removable] == [[("b1", 0), ("w1", 1), ("w2", 0)]]


def test_count_flops_matches_formula():
    b, din, h, dout = 5, 4, 8, 3
    assert splice.count_flops(mlp_fn, mlp_params(din, h, dout), jnp.ones((b, din))) == (
        2 * b * din * h + 2 * b * h * dout
    )
    w = jnp.ones((3, 2, 7))
    n, length = 4, 10
    assert splice.count_flops(lambda w, x: conv(x, w), w, jnp.ones((n, length, 2))) == (
        2 * n * length * 7 * 3 * 2
    )


@settings(max_examples=12)
@given(st.lists(st.integers(2, 6), min_size=1, max_size=4))
def test_deep_mlp_has_one_group_per_hidden_layer(widths):
    sizes = [3, *widths, 2]
    p = [
        {"w": jnp.ones((a, b)), "b": jnp.ones(b)}
        for a, b in zip(sizes[:-1], sizes[1:], strict=False)
    ]

    def fn(p, x):
        for layer in p[:-1]:
            x = jnp.tanh(bias(x @ layer["w"], layer["b"]))
        return bias(x @ p[-1]["w"], p[-1]["b"])

    groups = [g for g in splice.trace(fn, p, jnp.ones((1, 3))) if g.removable]
    assert [g.size for g in groups] == widths
    for i, g in enumerate(groups):
        assert pairs(g) == sorted([(f"{i}/w", 1), (f"{i}/b", 0), (f"{i + 1}/w", 0)])
    np.testing.assert_equal(len(splice.trace(fn, p, jnp.ones((1, 3)))), len(widths) + 2)


def branches_fn(p, x):
    h = jnp.concatenate([jax.nn.relu(x @ p["w_a"]), jax.nn.relu(x @ p["w_b"])], -1)
    return h @ p["w_c"]


def seg(g):
    return sorted((m.path, m.axis, m.offset, m.segments) for m in g.members)


def test_concatenate_segments_the_next_kernel_at_offsets():
    p = {"w_a": jnp.ones((4, 6)), "w_b": jnp.ones((4, 4)), "w_c": jnp.ones((10, 3))}
    groups = splice.trace(branches_fn, p, jnp.ones((2, 4)))
    ga, gb = find(groups, "w_a", 1), find(groups, "w_b", 1)
    assert ga.removable and gb.removable and (ga.size, gb.size) == (6, 4)
    assert seg(ga) == [("w_a", 1, 0, ()), ("w_c", 0, 0, (6, 4))]
    assert seg(gb) == [("w_b", 1, 0, ()), ("w_c", 0, 6, (6, 4))]
    assert not find(groups, "w_c", 1).removable
    # the same operand twice: one group holds both segments of the next kernel
    twice = splice.trace(
        lambda p, x: jnp.concatenate([x @ p["w_a"], x @ p["w_a"]], -1) @ p["w_c"],
        {"w_a": jnp.ones((4, 5)), "w_c": jnp.ones((10, 3))},
        jnp.ones((2, 4)),
    )
    g = find(twice, "w_a", 1)
    assert g.removable and seg(g) == [
        ("w_a", 1, 0, ()),
        ("w_c", 0, 0, (5, 5)),
        ("w_c", 0, 5, (5, 5)),
    ]


def densenet_fn(p, x):
    h = jnp.concatenate([x, jax.nn.relu(x @ p["w1"])], -1)
    h = jnp.concatenate([h, jax.nn.relu(h @ p["w2"])], -1)
    a, b = jnp.split(h, [x.shape[-1] + p["w1"].shape[1]], -1)  # back into pieces
    return h @ p["w3"] + (a @ p["wa"]) * (b @ p["wb"])


DENSE = {"w1": (4, 6), "w2": (10, 4), "w3": (14, 3), "wa": (10, 3), "wb": (4, 3)}


def test_densenet_concat_of_input_and_layer_output_and_split_back():
    p = {k: jnp.ones(s) for k, s in DENSE.items()}
    groups = splice.trace(densenet_fn, p, jnp.ones((2, 4)))
    g_in, g1, g2 = find(groups, "w1", 0), find(groups, "w1", 1), find(groups, "w2", 1)
    assert not g_in.removable and any("input" in r for r in g_in.reasons)
    assert seg(g_in) == [
        ("w1", 0, 0, ()),
        ("w2", 0, 0, (4, 6)),
        ("w3", 0, 0, (4, 6, 4)),
        ("wa", 0, 0, (4, 6)),
    ]
    assert g1.removable and seg(g1) == [
        ("w1", 1, 0, ()),
        ("w2", 0, 4, (4, 6)),
        ("w3", 0, 4, (4, 6, 4)),
        ("wa", 0, 4, (4, 6)),
    ]
    assert g2.removable and seg(g2) == [
        ("w2", 1, 0, ()),
        ("w3", 0, 10, (4, 6, 4)),
        ("wb", 0, 0, ()),
    ]


@pytest.mark.parametrize(
    "tail, reason",
    [
        (lambda h, p: h.reshape(2, 30) @ p["w_c"], "reshape"),  # merged with another axis
        (lambda h, p: h[:, :, ::2].reshape(2, 15) @ p["w_c"][:15], "stride"),
    ],
)
def test_concatenated_axis_that_cannot_be_mapped_is_not_removable(tail, reason):
    def fn(p, x):
        return tail(jnp.concatenate([x @ p["w_a"], x @ p["w_b"]], -1), p)

    p = {"w_a": jnp.ones((4, 6)), "w_b": jnp.ones((4, 4)), "w_c": jnp.ones((30, 2))}
    groups = splice.trace(fn, p, jnp.ones((2, 3, 4)))
    for path in ("w_a", "w_b"):
        g = find(groups, path, 1)
        assert not g.removable and any(reason in r for r in g.reasons), g.reasons


def test_count_flops_scales_scan_takes_costliest_cond_branch_and_counts_while_body_once():
    w = jnp.ones((4, 4))
    one = 2 * 2 * 4 * 4  # one (2, 4) @ (4, 4)

    def fn(w, x):
        x, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, length=5)
        x = jax.lax.cond(x.sum() > 0, lambda c: c @ w @ w @ w, lambda c: c @ w, x)
        x = jax.lax.while_loop(lambda c: c.sum() < 0, lambda c: jax.jit(jnp.matmul)(c, w), x)
        return x

    assert splice.count_flops(fn, w, jnp.ones((2, 4))) == (5 + 3 + 1) * one


def test_unstack_of_a_layer_output_keeps_its_channel_group():
    # ``a, b = h`` is the ``unstack`` primitive on jax >= 0.12 and slice + squeeze before.
    p = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 3))}

    def fn(p, x):
        a, b = x @ p["w1"]
        return jax.nn.relu(a + b) @ p["w2"]

    groups = splice.trace(fn, p, jnp.ones((2, 4)))
    assert [pairs(g) for g in groups if g.removable] == [[("w1", 1), ("w2", 0)]]
    assert splice.count_flops(fn, p, jnp.ones((2, 4))) == 2 * 2 * 4 * 8 + 2 * 8 * 3


def _scale_primitive(name):
    prim = jax.extend.core.Primitive(name)
    prim.def_impl(lambda x, *, factor: x * factor)
    prim.def_abstract_eval(lambda x, *, factor: x)
    return prim


def test_register_rule_teaches_trace_and_count_flops_a_custom_primitive():
    from jaxslim.splice import _rules as rules

    name = "jaxslim_test_scale_graph"
    prim = _scale_primitive(name)
    p = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 3))}

    def fn(p, x):
        return prim.bind(x @ p["w1"], factor=2.0) @ p["w2"]

    x = jnp.ones((2, 4))
    before = splice.trace(fn, p, x)
    hidden = find(before, "w1", 1)
    assert not hidden.removable and hidden.reasons == (f"no rule for primitive {name!r}",)
    try:
        splice.register_rule(prim, flops=lambda eqn: int(np.prod(eqn.outvars[0].aval.shape)))(
            lambda w, eqn, ins: [list(ins[0])]
        )
        after = splice.trace(fn, p, x)
        assert [pairs(g) for g in after if g.removable] == [[("w1", 1), ("w2", 0)]]
        assert splice.count_flops(fn, p, x) == 2 * 2 * 4 * 8 + 2 * 8 + 2 * 2 * 8 * 3
        with pytest.raises(ValueError, match="already has a rule"):
            splice.register_rule(name)(lambda w, eqn, ins: [list(ins[0])])
        splice.register_rule(name, override=True)(rules.unsupported)
        assert not find(splice.trace(fn, p, x), "w1", 1).removable
    finally:
        del rules.RULES[name]
