"""Channel removal: remove_channels, prune_channels, plans replayed on optimizer state and masks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxslim import splice
from jaxslim._tree import leaves_with_paths

TRANSFORMS = [lambda f: f, jax.jit]
EPS = 1e-5


def bias(h, b):
    return h + b.reshape((1,) * (h.ndim - 1) + b.shape)


def rand_tree(shapes, seed=0):
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, s) * 0.5 for k, s in zip(keys, leaves, strict=False)]
    )


def mlp_fn(p, x):
    return bias(jax.nn.relu(bias(x @ p["w1"], p["b1"])) @ p["w2"], p["b2"])


MLP = {"w1": (4, 8), "b1": (8,), "w2": (8, 3), "b2": (3,)}


def residual_fn(p, x):
    h = bias(x @ p["stem"]["w"], p["stem"]["b"])
    for b in p["blocks"]:
        h = h + bias(jax.nn.relu(bias(h @ b["w1"], b["b1"])) @ b["w2"], b["b2"])
    return h @ p["head"]


RESIDUAL = {
    "stem": {"w": (4, 12), "b": (12,)},
    "blocks": [{"w1": (12, 10), "b1": (10,), "w2": (10, 12), "b2": (12,)}] * 2,
    "head": (12, 3),
}


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))


def batchnorm(h, s):
    r = lambda v: v.reshape(1, 1, -1)
    return (h - r(s["mean"])) * jax.lax.rsqrt(r(s["var"]) + 1e-5) * r(s["scale"]) + r(s["bias"])


def resnet_fn(p, x):
    h = jax.nn.relu(batchnorm(conv(x, p["stem"]), p["bn0"]))
    for b in p["blocks"]:
        r = jax.nn.relu(batchnorm(conv(h, b["c1"]), b["bn1"]))
        h = jax.nn.relu(h + batchnorm(conv(r, b["c2"]), b["bn2"]))
    return h.mean(1) @ p["head"]


def bn_shapes(c):
    return {"scale": (c,), "bias": (c,), "mean": (c,), "var": (c,)}


RESNET = {
    "stem": (3, 1, 8),
    "bn0": bn_shapes(8),
    "blocks": [{"c1": (3, 8, 6), "bn1": bn_shapes(6), "c2": (3, 6, 8), "bn2": bn_shapes(8)}],
    "head": (8, 3),
}


def resnet_params(seed=0):
    p = rand_tree(RESNET, seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.abs(x) + 0.5 if "var" in jax.tree_util.keystr(path) else x, p
    )


def zero_channels(params, group, idx):
    """Independent reference: sets the slices of channels ``idx`` of every member to zero."""
    flat = dict(jax.tree_util.tree_leaves_with_path(params))
    out = {}
    for path, x in flat.items():
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        a = np.array(x)
        for m in group.members:
            if m.path == name and m.segments:
                sl = [slice(None)] * a.ndim
                sl[m.axis] = [sum(m.segments[: m.segment]) + i for i in idx]
                a[tuple(sl)] = 0.0
            elif m.path == name:
                v = a.reshape(a.shape[: m.axis] + m.factors + a.shape[m.axis + 1 :])
                sl = [slice(None)] * v.ndim
                sl[m.axis + m.factor] = list(idx)
                v[tuple(sl)] = 0.0
                a = v.reshape(a.shape)
        out[path] = jnp.asarray(a)
    return jax.tree_util.tree_map_with_path(lambda p, _: out[p], params)


CASES = [
    ("mlp", mlp_fn, lambda: rand_tree(MLP), (5, 4)),
    ("residual", residual_fn, lambda: rand_tree(RESIDUAL), (5, 4)),
    ("resnet_bn", resnet_fn, resnet_params, (3, 9, 1)),
]


@pytest.mark.parametrize("name, fn, make, xshape", CASES, ids=[c[0] for c in CASES])
def test_removing_zeroed_channels_preserves_the_function(name, fn, make, xshape):
    params = make()
    x = jax.random.normal(jax.random.key(1), xshape)
    groups = [g for g in splice.trace(fn, params, x) if g.removable]
    assert groups and all(g.size % 2 == 0 for g in groups)
    drops = [list(range(0, g.size, 2)) for g in groups]  # every other channel: half of each
    zeroed = params
    for g, drop in zip(groups, drops, strict=False):
        zeroed = zero_channels(zeroed, g, drop)
    new, rep = splice.prune_channels(fn, zeroed, x, sparsity=0.5)
    assert [r.removed for r in rep.groups] == [tuple(d) for d in drops]
    jfn = jax.jit(fn)
    np.testing.assert_allclose(jfn(new, x), jfn(zeroed, x), atol=EPS, rtol=EPS)
    leaves = dict(leaves_with_paths(new))
    for g in groups:
        for m in g.members:
            assert leaves[m.path].shape[m.axis] * 2 == np.prod(m.factors)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_remove_channels_equals_numpy_take(transform):
    params = rand_tree(MLP)
    (g,) = [g for g in splice.trace(mlp_fn, params, jnp.ones((1, 4))) if g.removable]
    keep = [1, 4, 6]
    new = transform(lambda p: splice.remove_channels(p, g, keep))(params)
    np.testing.assert_array_equal(new["w1"], np.asarray(params["w1"])[:, keep])
    np.testing.assert_array_equal(new["b1"], np.asarray(params["b1"])[keep])
    np.testing.assert_array_equal(new["w2"], np.asarray(params["w2"])[keep, :])
    np.testing.assert_array_equal(new["b2"], params["b2"])


def test_head_removal_in_a_fused_kernel_takes_whole_heads():
    heads, dim, d = 3, 2, 4
    p = {
        "wqkv": jnp.arange(d * 3 * heads * dim, dtype=jnp.float32).reshape(d, -1),
        "wo": jnp.ones((heads * dim, d)),
    }

    def fn(p, x):
        b, s, _ = x.shape
        qkv = (x @ p["wqkv"]).reshape(b, s, 3, -1, dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), -1)
        return jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, s, -1) @ p["wo"]

    (g,) = [g for g in splice.trace(fn, p, jnp.ones((1, 2, d))) if g.removable and g.size == heads]
    new = splice.remove_channels(p, g, [0, 2])
    ref = np.asarray(p["wqkv"]).reshape(d, 3, heads, dim)[:, :, [0, 2]].reshape(d, -1)
    np.testing.assert_array_equal(new["wqkv"], ref)
    assert new["wo"].shape == (2 * dim, d)
    x = jax.random.normal(jax.random.key(0), (1, 2, d)) * 0.01
    assert fn(new, x).shape == (1, 2, d)


def test_prune_channels_counts_scores_and_ties():
    # n = 10 channels, scores = column norms; sparsity 0.25 -> round_half_even(2.5) = 2 removed.
    w1 = jnp.asarray(np.array([[3, 1, 1, 5, 2, 9, 1, 7, 8, 6]], np.float32))
    p = {"w1": w1, "w2": jnp.zeros((10, 1))}
    fn = lambda p, x: x @ p["w1"] @ p["w2"]
    x = jnp.ones((1, 1))
    _, rep = splice.prune_channels(fn, p, x, sparsity=0.25)
    assert rep.groups[0].removed == (1, 2)  # three ties at 1: lowest index first
    _, rep = splice.prune_channels(fn, p, x, sparsity=0.35)
    assert rep.groups[0].removed == (1, 2, 4, 6)  # round_half_even(3.5) = 4
    _, rep = splice.prune_channels(fn, p, x, sparsity=0.15)
    assert rep.groups[0].size_after == 8  # round_half_even(1.5) = 2
    _, rep = splice.prune_channels(fn, p, x, sparsity=0.5, round_to=4)
    assert rep.groups[0].size_after == 4  # 5 kept -> nearest multiple of 4
    new, rep = splice.prune_channels(fn, p, x, sparsity=0.0)
    assert rep.plan.groups == () and new["w1"].shape == (1, 10)


def test_prune_channels_l1_and_taylor_scores_match_numpy():
    p = rand_tree(MLP, seed=3)
    x = jax.random.normal(jax.random.key(2), (6, 4))
    (g,) = [g for g in splice.trace(mlp_fn, p, x) if g.removable]
    w1, b1, w2 = (np.asarray(p[k]) for k in ("w1", "b1", "w2"))
    l1 = np.abs(w1).sum(0) + np.abs(b1) + np.abs(w2).sum(1)
    np.testing.assert_allclose(splice.score_group(p, g, score="l1"), l1, rtol=1e-6)
    l2 = np.sqrt((w1**2).sum(0) + b1**2 + (w2**2).sum(1))
    np.testing.assert_allclose(splice.score_group(p, g, score="l2"), l2, rtol=1e-6)
    grads = jax.grad(lambda p: jnp.sum(mlp_fn(p, x) ** 2))(p)
    gw1, gb1, gw2 = (np.asarray(grads[k]) for k in ("w1", "b1", "w2"))
    taylor = ((gw1 * w1).sum(0) + gb1 * b1 + (gw2 * w2).sum(1)) ** 2
    np.testing.assert_allclose(
        splice.score_group(p, g, score="taylor", grads=grads), taylor, rtol=1e-4
    )
    _, rep = splice.prune_channels(mlp_fn, p, x, sparsity=0.5, score="taylor", grads=grads)
    assert rep.groups[0].removed == tuple(sorted(np.argsort(taylor, kind="stable")[:4]))


def test_prune_channels_report_counts_params_flops_and_features():
    p = rand_tree(RESIDUAL)
    x = jnp.ones((5, 4))
    new, rep = splice.prune_channels(residual_fn, p, x, sparsity=0.5)
    d, h = 6, 5
    params_after = 4 * d + d + 2 * (d * h + h + h * d + d) + d * 3
    assert rep.params_after == params_after == sum(v.size for v in jax.tree.leaves(new))
    assert rep.params_before == sum(v.size for v in jax.tree.leaves(p))
    assert rep.flops_after == 2 * 5 * (4 * d + 2 * 2 * d * h + d * 3)
    blocks = {
        f"blocks/{i}/{k}": n
        for i in range(2)
        for k, n in (("w1", h), ("b1", h), ("w2", d), ("b2", d))
    }
    assert rep.features == {"stem/w": d, "stem/b": d, **blocks}
    assert np.isfinite(residual_fn(new, x)).all()


def test_where_restricts_the_touched_groups():
    p = rand_tree(RESIDUAL)
    new, rep = splice.prune_channels(
        residual_fn, p, jnp.ones((1, 4)), sparsity=0.5, where=r"blocks/0/w1"
    )
    assert [g.paths for g in rep.groups] == [("blocks/0/b1", "blocks/0/w1", "blocks/0/w2")]
    assert new["blocks/0/w1".split("/")[0]][0]["w1"].shape == (12, 5)
    assert new["blocks"][1]["w1"].shape == (12, 10) and new["stem"]["w"].shape == (4, 12)


def test_linen_removal_and_rebuild_from_report_features():
    class Net(nn.Module):
        hidden: int = 16

        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(self.hidden)(x))
            return nn.Dense(3)(h)

    model = Net()
    x = jax.random.normal(jax.random.key(0), (4, 5))
    v = model.init(jax.random.key(1), x)
    (g,) = [g for g in splice.trace(lambda v, x: model.apply(v, x), v, x) if g.removable]
    zeroed = zero_channels(v, g, [3, 7, 11])
    new, rep = splice.prune_channels(lambda v, x: model.apply(v, x), zeroed, x, sparsity=3 / 16)
    assert rep.features == {"params/Dense_0": 13}
    rebuilt = Net(hidden=rep.features["params/Dense_0"])
    np.testing.assert_allclose(rebuilt.apply(new, x), model.apply(zeroed, x), atol=EPS)


def test_plan_replays_on_optimizer_state_and_masks():
    p = rand_tree(MLP)
    x = jnp.ones((2, 4))
    tx = optax.chain(optax.scale_by_rms(), optax.sgd(1e-2, momentum=0.9))
    state = tx.init(p)
    grads = jax.grad(lambda p: jnp.sum(mlp_fn(p, x)))(p)
    _, state = tx.update(grads, state, p)
    new, rep = splice.prune_channels(mlp_fn, p, x, sparsity=0.5)
    keep = list(rep.plan.keep[0])
    new_state = splice.apply_plan_to_opt_state(state, rep.plan, tx, p)
    np.testing.assert_array_equal(new_state[0].nu["w1"], np.asarray(state[0].nu["w1"])[:, keep])
    trace_new, trace_old = new_state[1][0].trace, state[1][0].trace
    np.testing.assert_array_equal(trace_new["w2"], np.asarray(trace_old["w2"])[keep])
    np.testing.assert_array_equal(trace_new["b2"], trace_old["b2"])
    upd, _ = tx.update(jax.tree.map(jnp.ones_like, new), new_state, new)  # training continues
    assert jax.tree.map(jnp.shape, upd) == jax.tree.map(jnp.shape, new)
    mask = {"w1": p["w1"] > 0, "b1": None, "w2": p["w2"] > 0, "b2": None}
    new_mask = splice.apply_plan(mask, rep.plan)
    assert new_mask["b1"] is None and new_mask["w1"].dtype == jnp.bool_
    np.testing.assert_array_equal(new_mask["w1"], np.asarray(mask["w1"])[:, keep])


def test_bad_input_raises_naming_the_group():
    p = rand_tree(MLP)
    groups = splice.trace(mlp_fn, p, jnp.ones((1, 4)))
    (g,) = [g for g in groups if g.removable]
    fixed = [g for g in groups if not g.removable][0]
    for s in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            splice.prune_channels(mlp_fn, p, jnp.ones((1, 4)), sparsity=s)
    with pytest.raises(ValueError, match=r"every channel.*'w1'"):
        splice.remove_channels(p, g, [])
    with pytest.raises(ValueError, match=r"index 8 is out of range \[0, 8\).*'w2'"):
        splice.remove_channels(p, g, [0, 8])
    with pytest.raises(ValueError, match="repeated"):
        splice.remove_channels(p, g, [1, 1])
    with pytest.raises(ValueError, match="not removable.*output"):
        splice.remove_channels(p, fixed, [0])
    with pytest.raises(ValueError, match=r"removes every channel.*'b1'"):
        splice.prune_channels(mlp_fn, p, jnp.ones((1, 4)), sparsity=0.95)
    with pytest.raises(ValueError, match=r"'w1' has shape \(4, 7\)"):
        splice.remove_channels({**p, "w1": jnp.ones((4, 7))}, g, [0])
    with pytest.raises(ValueError, match=r"does not have"):
        splice.remove_channels({"w1": p["w1"]}, g, [0])
    with pytest.raises(TypeError, match="splice.Group"):
        splice.remove_channels(p, [("w1", 1)], [0])


@settings(max_examples=6)
@given(st.integers(2, 9), st.data())
def test_any_keep_subset_shrinks_every_member_to_it(n, data):
    keep = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1)))
    p = {
        "w1": jnp.arange(3.0 * n).reshape(3, n),
        "b1": jnp.arange(1.0 * n),
        "w2": jnp.arange(2.0 * n).reshape(n, 2),
    }
    fn = lambda p, x: bias(x @ p["w1"], p["b1"]) @ p["w2"]
    (g,) = [g for g in splice.trace(fn, p, jnp.ones((1, 3))) if g.removable]
    new = splice.remove_channels(p, g, keep)
    np.testing.assert_array_equal(new["w1"], np.arange(3.0 * n).reshape(3, n)[:, keep])
    np.testing.assert_array_equal(new["b1"], np.arange(1.0 * n)[keep])
    np.testing.assert_array_equal(new["w2"], np.arange(2.0 * n).reshape(n, 2)[keep])


def branches_fn(p, x):
    h = jnp.concatenate([jax.nn.relu(x @ p["w_a"]), jax.nn.relu(x @ p["w_b"])], -1)
    return h @ p["w_c"]


def densenet_fn(p, x):
    h = jnp.concatenate([x, jax.nn.relu(bias(x @ p["w1"], p["b1"]))], -1)
    h = jnp.concatenate([h, jax.nn.relu(h @ p["w2"])], -1)
    a, b = jnp.split(h, [x.shape[-1] + p["w1"].shape[1]], -1)
    return h @ p["w3"] + (a @ p["wa"]) * (b @ p["wb"])


BRANCHES = {"w_a": (4, 6), "w_b": (4, 4), "w_c": (10, 3)}
DENSE = {"w1": (4, 6), "b1": (6,), "w2": (10, 4), "w3": (14, 3), "wa": (10, 3), "wb": (4, 3)}
CONCAT_CASES = [("branches", branches_fn, BRANCHES), ("densenet", densenet_fn, DENSE)]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("name, fn, shapes", CONCAT_CASES, ids=[c[0] for c in CONCAT_CASES])
def test_removing_zeroed_channels_through_concatenate_preserves_the_function(
    name, fn, shapes, transform
):
    params = rand_tree(shapes, seed=3)
    x = jax.random.normal(jax.random.key(1), (5, 4))
    groups = [g for g in splice.trace(fn, params, x) if g.removable]
    assert len(groups) == 2 and any(m.segments for g in groups for m in g.members)
    drops = [list(range(1, g.size, 2)) for g in groups]
    zeroed = params
    for g, drop in zip(groups, drops, strict=True):
        zeroed = zero_channels(zeroed, g, drop)
    new, rep = splice.prune_channels(fn, zeroed, x, sparsity=0.5)
    assert [r.removed for r in rep.groups] == [tuple(d) for d in drops]
    f = transform(fn)
    np.testing.assert_allclose(f(new, x), f(zeroed, x), atol=EPS, rtol=EPS)
    for g, drop in zip(groups, drops, strict=True):  # each group alone with remove_channels
        one = splice.remove_channels(zeroed, g, [i for i in range(g.size) if i not in drop])
        np.testing.assert_allclose(f(one, x), f(zeroed, x), atol=EPS, rtol=EPS)


def test_remove_channels_through_concatenate_equals_numpy_take_at_offsets():
    params = rand_tree(BRANCHES)
    groups = splice.trace(branches_fn, params, jnp.ones((2, 4)))
    (gb,) = [g for g in groups if ("w_b", 1) in list(g)]
    new = splice.remove_channels(params, gb, [1, 3])
    w_c = np.asarray(params["w_c"])
    np.testing.assert_array_equal(new["w_b"], np.asarray(params["w_b"])[:, [1, 3]])
    np.testing.assert_array_equal(new["w_c"], w_c[[0, 1, 2, 3, 4, 5, 7, 9]])
    np.testing.assert_array_equal(new["w_a"], params["w_a"])
    expect = np.sqrt(np.sum(np.asarray(params["w_b"]) ** 2, 0) + np.sum(w_c[6:] ** 2, 1))
    np.testing.assert_allclose(splice.score_group(params, gb), expect, rtol=1e-6)
    (ga,) = [g for g in groups if ("w_a", 1) in list(g)]
    both = splice.apply_plan(params, splice.make_plan([ga, gb], [[0, 5], [2]]))
    np.testing.assert_array_equal(both["w_c"], w_c[[0, 5, 8]])


def test_apply_plan_to_opt_state_old_argument_order_warns_and_agrees():
    p = rand_tree(MLP)
    (g,) = [g for g in splice.trace(mlp_fn, p, jnp.ones((1, 4))) if g.removable]
    plan = splice.make_plan([g], [[0, 3, 5]])
    tx = optax.adam(1e-3)
    state = tx.init(p)
    new = splice.apply_plan_to_opt_state(state, plan, tx, p)
    with pytest.warns(DeprecationWarning, match=r"apply_plan_to_opt_state\(opt_state, plan"):
        old = splice.apply_plan_to_opt_state(plan, tx, state, p)
    jax.tree.map(np.testing.assert_array_equal, old, new)
    np.testing.assert_array_equal(new[0].mu["w1"], np.asarray(state[0].mu["w1"])[:, [0, 3, 5]])
