"""Attention heads as units, broadcast/iota/fused-slice cases, pinned sizes, importance, depth.

Each case of issue 9 on a minimal function: a ``jnp.where`` against a broadcast scalar, an iota
mask, ``w[0]``/``w[1]`` slices of a fused ``(2, d, F)`` kernel, ``where=`` by producer or by
``(path, axis)``, grouped-query attention written like Hugging Face's FlaxLlama (``jnp.repeat`` of
key/value heads), multi-query attention, the NNX workbench decoder, ``nnx.MultiHeadAttention``
and Linen ``MultiHeadDotProductAttention``, a constant head_dim that pins the within-head size,
Minitron importance against hand-computed activations, and layers dropped and renumbered.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxslim import splice
from jaxslim.demo import lm
from jaxslim.flax import splice as fsplice

TRANSFORMS = [lambda f: f, jax.jit]
ATOL = 1e-5


def rand(key, *shapes):
    keys = jax.random.split(jax.random.key(key), len(shapes))
    return [jax.random.normal(k, s) * 0.5 for k, s in zip(keys, shapes, strict=True)]


def by_paths(groups, *paths):
    return [g for g in groups if set(paths) <= set(g.paths)]


# ------------------------------------------------------------------ broadcast, iota, fused slices


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_where_against_a_broadcast_scalar_does_not_pin_the_hidden_group(transform):
    w1, w2 = rand(0, (4, 8), (8, 3))
    p = {"w1": w1, "w2": w2}
    fn = transform(lambda p, x: jnp.where(x @ p["w1"] > 0, x @ p["w1"], -1e9) @ p["w2"])
    (g,) = [g for g in splice.trace(fn, p, jnp.ones((2, 4))) if g.removable]
    assert list(g) == [("w1", 1), ("w2", 0)] and g.size == 8
    new, rep = splice.prune_channels(fn, p, jnp.ones((2, 4)), sparsity=0.25)
    assert new["w1"].shape == (4, 6) and rep.flops_after is not None


def test_iota_mask_does_not_pin_and_is_a_hazard():
    w1, w2 = rand(1, (4, 8), (8, 3))

    def fn(p, x):
        h = x @ p["w1"]
        mask = jnp.arange(h.shape[-1]) % 2 == 0  # a mask built from iota along the channels
        return jnp.where(mask, h, 0.0) @ p["w2"]

    (g,) = [g for g in splice.trace(fn, {"w1": w1, "w2": w2}, jnp.ones((2, 4))) if g.removable]
    assert g.size == 8 and any("iota" in h for h in g.hazards)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_fused_gate_up_slices_neither_pin_nor_split_the_hidden_group(transform):
    wgu, wd, emb = rand(2, (2, 6, 8), (8, 6), (6, 5))
    p = {"gate_up": wgu, "down": wd, "head": emb}

    def fn(p, x):
        h = x + jax.nn.silu(x @ p["gate_up"][0]) * (x @ p["gate_up"][1]) @ p["down"]
        return h @ p["head"]

    groups = splice.trace(transform(fn), p, jnp.ones((3, 6)))
    assert all(g.size > 1 for g in groups)  # no fake size-1 groups
    hidden = [g for g in groups if set(g.paths) == {"down", "gate_up"}]
    assert [(g.size, g.removable) for g in hidden] == [(8, True)]
    assert sorted((m.path, m.axis) for m in hidden[0].members) == [("down", 0), ("gate_up", 2)]
    (fused,) = [g for g in groups if ("gate_up", 0) in list(g)]
    assert not fused.removable and "taken one by one" in fused.reasons[0]
    new, rep = splice.prune_channels(fn, p, jnp.ones((3, 6)), sparsity=0.75)
    assert new["gate_up"].shape == (2, 6, 2) and new["down"].shape == (2, 6)
    assert new["head"].shape == (6, 5)  # the residual (6) is pinned by x: untouched
    assert fn(new, jnp.ones((3, 6))).shape == (3, 5)


def test_where_selects_by_producing_kernels_or_by_member_axis():
    wgu, wd, we, wh = rand(3, (2, 6, 8), (8, 6), (5, 6), (6, 5))
    p = {"embed": we, "mlp": {"gate_up": wgu, "down": wd}, "head": wh}

    def fn(p, x):
        h = x @ p["embed"]
        m = p["mlp"]
        h = h + jax.nn.silu(h @ m["gate_up"][0]) * (h @ m["gate_up"][1]) @ m["down"]
        return h @ p["head"]

    x = jnp.ones((3, 5))
    _, rep = splice.prune_channels(fn, p, x, sparsity=0.5, where="mlp")
    assert [g.paths for g in rep.groups] == [("mlp/down", "mlp/gate_up")]  # not the residual
    _, rep = splice.prune_channels(fn, p, x, sparsity=0.5, where=("mlp/down", 0))
    assert [g.paths for g in rep.groups] == [("mlp/down", "mlp/gate_up")]
    new, rep = splice.prune_channels(fn, p, x, sparsity=0.5, where=("embed", -1))
    assert [g.size_before for g in rep.groups] == [6] and new["head"].shape == (3, 5)
    assert rep.sizes["mlp"] == {"down": (8, 3), "gate_up": (2, 3, 8)}


# ----------------------------------------------------------------- grouped-query attention


def gqa_params(d=8, heads=4, kv=2, hd=4, seed=4):
    wq, wk, wv, wo, wh = rand(
        seed, (d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d), (d, 3)
    )
    return {"q": wq, "k": wk, "v": wv, "o": wo, "head": wh}


def gqa_fn(p, x, head_dim=4):
    """HF FlaxLlama-style: fused projections, reshape by a constant head_dim, jnp.repeat of kv
    heads by the group size (computed from the shapes), a causal mask from iota."""
    b, t, _ = x.shape
    q = (x @ p["q"]).reshape(b, t, -1, head_dim)
    k = (x @ p["k"]).reshape(b, t, -1, head_dim)
    v = (x @ p["v"]).reshape(b, t, -1, head_dim)
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(head_dim)
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1), v).reshape(b, t, -1)
    return (x + out @ p["o"]) @ p["head"]


def zero_heads(p, heads, hd):
    """Zeros the output-projection rows of query heads ``heads``: they then contribute nothing."""
    o = p["o"].reshape(-1, hd, p["o"].shape[-1]).at[jnp.asarray(heads)].set(0)
    return {**p, "o": o.reshape(p["o"].shape)}


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gqa_kv_head_takes_its_query_group_and_query_heads_go_uniformly(transform):
    p, x = gqa_params(), jax.random.normal(jax.random.key(9), (2, 5, 8))
    fn = transform(gqa_fn)
    groups = splice.trace(fn, p, x)
    (kv,) = [g for g in groups if ("k", 1) in list(g) and g.size == 2]
    assert kv.removable
    assert {(m.path, m.factors, m.factor) for m in kv.members} == {
        ("q", (2, 2, 4), 0),
        ("o", (2, 2, 4), 0),
        ("k", (2, 4), 0),
        ("v", (2, 4), 0),
    }
    (g,) = [g for g in groups if set(g.paths) == {"q", "o"}]
    assert g.removable and g.size == 2
    assert {(m.factors, m.factor) for m in g.members} == {((2, 2, 4), 1)}
    inner = [g for g in groups if g.size == 4 and "o" in g.paths]
    assert inner and all(not g.removable and "within-head" in g.reasons[0] for g in inner)
    # Query heads are (kv, group): kv head 1 serves query heads 2 and 3.
    zeroed = zero_heads(p, [2, 3], 4)
    small = splice.remove_channels(zeroed, kv, [0])
    assert small["q"].shape == (8, 8) and small["k"].shape == (8, 4) and small["o"].shape == (8, 8)
    np.testing.assert_allclose(fn(small, x), fn(zeroed, x), atol=ATOL, rtol=ATOL)
    # Query head 1 of every kv group: heads 1 and 3; the model stays GQA with groups of 1.
    zeroed = zero_heads(p, [1, 3], 4)
    small = splice.remove_channels(zeroed, g, [0])
    assert small["q"].shape == (8, 8) and small["k"].shape == (8, 8)
    np.testing.assert_allclose(fn(small, x), fn(zeroed, x), atol=ATOL, rtol=ATOL)


def test_mqa_query_heads_are_one_group_and_a_literal_head_dim_pins_within_heads():
    p, x = gqa_params(kv=1), jax.random.normal(jax.random.key(9), (2, 5, 8))
    groups = splice.trace(gqa_fn, p, x)
    (heads,) = [g for g in groups if set(g.paths) == {"q", "o"} and g.size == 4]
    assert heads.removable
    new, _ = splice.prune_channels(gqa_fn, p, x, sparsity=0.5, where="^q$")
    assert new["q"].shape == (8, 8) and new["o"].shape == (8, 8) and new["k"].shape == (8, 4)
    # Asked for within-head sizes, the reshape by the literal head_dim 4 pins them, named
    # before anything is cut (the plain-JAX model crashed after the cut).
    groups = splice.trace(gqa_fn, p, x, within_heads=True)
    inner = [g for g in groups if ("k", 1) in list(g) or ("v", 1) in list(g)]
    assert len(inner) == 2 and all(not g.removable for g in inner)
    assert all(g.reasons[-1].startswith("the code pins its size") for g in inner)
    new, _ = splice.prune_channels(gqa_fn, p, x, sparsity=0.5, within_heads=True, where="^q$")
    assert gqa_fn(new, x).shape == (2, 5, 3)


def test_pruned_params_that_fn_cannot_run_are_never_returned():
    p, x = gqa_params(), jnp.ones((2, 5, 8))
    pinned = [
        g
        for g in splice.trace(gqa_fn, p, x, within_heads=True, check=False)
        if g.removable and ("v", 1) in list(g) and g.size == 4
    ]
    assert pinned
    with pytest.raises(ValueError, match="splice.prune_channels: fn cannot run on the pruned"):
        splice.prune_channels(gqa_fn, p, x, sparsity=0.5, groups=pinned)


# ----------------------------------------------------------------- the LM workbench model


@pytest.fixture(scope="module")
def workbench():
    cfg = lm.LMConfig(dim=16, layers=2, kv_heads=2, groups=2, head_dim=4, hidden=24)
    model = lm.LM(cfg, rngs=nnx.Rngs(0))
    fn, params = lm.apply_fn(model)
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 256)
    return fn, params, tokens, model


def attn_groups(groups, layer, want):
    pre = f"blocks/{layer}/attn/"
    return [g for g in groups if set(g.paths) == {pre + w for w in want} and g.removable]


def test_workbench_query_groups_and_kv_heads_are_removable_and_exact(workbench):
    fn, params, tokens, model = workbench
    groups = splice.trace(fn, params, tokens)
    for layer in (0, 1):
        (kv,) = attn_groups(groups, layer, "qkvo")
        (g,) = attn_groups(groups, layer, "qo")
        assert (kv.size, g.size) == (2, 2)
    assert all(
        not g.removable
        for g in groups
        if g.size in (2, 4)
        and "attn/k" in str(g.paths)
        and g not in attn_groups(groups, 0, "qkvo") + attn_groups(groups, 1, "qkvo")
    )
    (g,) = attn_groups(groups, 0, "qo")
    pure = nnx.to_pure_dict(params)
    o = pure["blocks"][0]["attn"]["o"]  # (kv, groups, head_dim, dim)
    pure["blocks"][0]["attn"]["o"] = o.at[:, 1].set(0)  # query head 1 of every kv group
    zeroed = nnx.State(pure)
    small = splice.remove_channels(zeroed, g, [0])
    assert small["blocks"][0]["attn"]["q"].shape == (16, 2, 1, 4)
    np.testing.assert_allclose(fn(small, tokens), fn(zeroed, tokens), atol=ATOL, rtol=ATOL)
    assert small["blocks"][1]["attn"]["q"].shape == (16, 2, 2, 4)  # block 1 kept its groups


def test_workbench_rope_pairs_go_together_when_within_heads_is_asked(workbench):
    fn, params, tokens, model = workbench
    groups = splice.trace(fn, params, tokens, within_heads=True)
    (rope,) = [g for g in groups if ("blocks/0/attn/k", 2) in list(g)]
    assert rope.removable and rope.size == 2  # head_dim 4: pairs (0, 2) and (1, 3)
    assert {(m.path, m.offset) for m in rope.members} == {
        ("blocks/0/attn/q", 0),
        ("blocks/0/attn/q", 2),
        ("blocks/0/attn/k", 0),
        ("blocks/0/attn/k", 2),
    }
    small = splice.remove_channels(params, rope, [1])
    k = nnx.to_pure_dict(params)["blocks"][0]["attn"]["k"]
    np.testing.assert_array_equal(small["blocks"][0]["attn"]["k"][...], k[..., [1, 3]])
    assert fn(small, tokens).shape == (2, 6, 256)


def test_workbench_importance_of_heads_matches_hand_computed_attention_output(workbench):
    fn, params, tokens, model = workbench
    groups = splice.trace(fn, params, tokens)
    (kv,) = attn_groups(groups, 1, "qkvo")
    (g,) = attn_groups(groups, 1, "qo")
    scores = splice.importance(fn, params, [tokens, tokens[::-1]], [kv, g])
    # Hand-computed: the attention output of block 1 entering its output projection.
    attn = model.blocks[1].attn

    def attention_output(b):
        h = model.blocks[1].attn_norm(model.blocks[0](model.embed[...][b]))
        q = jnp.einsum("btd,dkgh->btkgh", h, attn.q[...])
        k = jnp.einsum("btd,dkh->btkh", h, attn.k[...])
        v = jnp.einsum("btd,dkh->btkh", h, attn.v[...])
        q, k = lm._rope(q, attn.rope_base), lm._rope(k, attn.rope_base)
        logits = jnp.einsum("btkgh,bskh->bkgts", q, k) / np.sqrt(q.shape[-1])
        t = b.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(logits, -1), v)

    outs = [attention_output(b) for b in (tokens, tokens[::-1])]
    out = jnp.concatenate(outs)  # (examples, t, kv, groups, head_dim)
    per_kv = jnp.sqrt(jnp.sum(out**2, axis=(3, 4))).mean(1)  # ||head block||, mean over t
    per_g = jnp.sqrt(jnp.sum(out**2, axis=(2, 4))).mean(1)
    np.testing.assert_allclose(scores[kv], jnp.sqrt(jnp.sum(per_kv**2, 0)), rtol=1e-4)
    np.testing.assert_allclose(scores[g], jnp.sqrt(jnp.sum(per_g**2, 0)), rtol=1e-4)
    new, rep = splice.prune_channels(fn, params, tokens, sparsity=0.5, score=scores, groups=[g])
    assert rep.groups[0].removed == (int(np.argmin(scores[g])),)


def test_importance_of_mlp_neurons_matches_hand_computed_activations():
    w1, w2, w3 = rand(5, (4, 6), (6, 5), (5, 2))
    p = {"w1": w1, "w2": w2, "w3": w3}

    def fn(p, x):  # x: (batch, seq, 4)
        return jax.nn.relu(jax.nn.relu(x @ p["w1"]) @ p["w2"]) @ p["w3"]

    xs = [jax.random.normal(jax.random.key(i), (3, 7, 4)) for i in range(2)]
    groups = [g for g in splice.trace(fn, p, xs[0]) if g.removable]
    for aggregate in (("l2", "mean"), ("mean", "max")):
        scores = splice.importance(fn, p, xs, aggregate=aggregate)
        h1 = jnp.concatenate([jax.nn.relu(x @ w1) for x in xs])
        h2 = jax.nn.relu(h1 @ w2)
        for g, h in zip(groups, (h1, h2), strict=True):
            per = jnp.abs(h).mean(1) if aggregate[1] == "mean" else jnp.abs(h).max(1)
            ref = jnp.sqrt(jnp.sum(per**2, 0)) if aggregate[0] == "l2" else per.mean(0)
            np.testing.assert_allclose(scores[g], ref, rtol=1e-5)


# ------------------------------------------------------------- Flax attention modules


def test_nnx_multi_head_attention_heads_removed_in_place():
    mha = nnx.MultiHeadAttention(
        4, 8, qkv_features=8, out_features=8, decode=False, rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(2), (2, 5, 8))
    groups = fsplice.trace_model(mha, x)
    (heads,) = [g for g in groups if g.removable and ("query/kernel", 1) in list(g)]
    assert heads.size == 4
    assert {(m.path, m.axis) for m in heads.members} >= {("out/kernel", 0), ("key/kernel", 1)}
    inner = [g for g in groups if ("query/kernel", 2) in list(g)]
    assert inner and not inner[0].removable
    ref = nnx.clone(mha)
    ref.out.kernel.set_value(ref.out.kernel.get_value().at[jnp.asarray([0, 2])].set(0))
    fsplice.remove_channels_model(mha, heads, [1, 3])
    assert (mha.num_heads, mha.head_dim, mha.qkv_features) == (2, 2, 4)
    np.testing.assert_allclose(mha(x), ref(x), atol=ATOL, rtol=ATOL)


def test_linen_multi_head_dot_product_attention_head_groups_and_report_sizes():
    class Net(nn.Module):
        heads: int = 4
        qkv: int = 8

        @nn.compact
        def __call__(self, x):
            return nn.MultiHeadDotProductAttention(self.heads, qkv_features=self.qkv)(x, x)

    x = jnp.ones((2, 5, 8))
    variables = Net().init(jax.random.key(0), x)
    fn = lambda v, x: Net().apply(v, x)  # noqa: E731
    groups = splice.trace(fn, variables, x)
    (heads,) = [g for g in groups if g.removable and g.size == 4]
    assert ("params/MultiHeadDotProductAttention_0/query/kernel", 1) in list(heads)
    new, rep = splice.prune_channels(fn, variables, x, sparsity=0.5, groups=[heads])
    assert rep.flops_after is None  # Linen: rebuilt from the report
    assert rep.sizes["params/MultiHeadDotProductAttention_0/query"]["kernel"] == (8, 2, 2)
    rebuilt = lambda v, x: Net(heads=2, qkv=4).apply(v, x)  # noqa: E731
    assert rebuilt(new, x).shape == (2, 5, 8)


# --------------------------------------------------------------------------------- depth


def test_drop_layer_renumbers_string_keyed_layers():
    p = {"layers": {str(i): {"w": jnp.full(2, i)} for i in range(3)}, "head": jnp.ones(2)}
    out = splice.drop_layer(p, "layers/1", renumber=True)
    assert sorted(out["layers"]) == ["0", "1"] and float(out["layers"]["1"]["w"][0]) == 2
    lin = {"layer_0": 0, "layer_1": 1, "layer_2": 2, "norm": 3}
    assert splice.drop_layer(lin, "layer_0", renumber=True) == {
        "layer_0": 1,
        "layer_1": 2,
        "norm": 3,
    }
    with pytest.raises(ValueError, match="splice.drop_layer: renumber=True needs a block key"):
        splice.drop_layer({"a": 1, "b": 2}, "a", renumber=True)


def test_drop_layer_on_nnx_scan_stacked_layers():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return x + self.lin(x)

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return Block(nnx.Rngs(key))

    stack = make(jax.random.split(jax.random.key(0), 3))

    def forward(state, x):
        graphdef = nnx.graphdef(stack)

        def body(x, s):
            return nnx.merge(graphdef, s)(x), None

        return jax.lax.scan(body, x, state)[0]

    state = nnx.state(stack)
    x = jnp.ones((2, 4))
    zeroed = jax.tree.map(lambda a: a, nnx.to_pure_dict(state))
    zeroed["lin"]["kernel"] = zeroed["lin"]["kernel"].at[1].set(0)
    zeroed["lin"]["bias"] = zeroed["lin"]["bias"].at[1].set(0)
    small = splice.drop_layer(zeroed, ("lin", 1))
    assert small["lin"]["kernel"].shape == (2, 4, 4)
    np.testing.assert_allclose(forward(small, x), forward(zeroed, x), atol=ATOL, rtol=ATOL)
