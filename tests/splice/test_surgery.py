"""Layer surgery: fold_batchnorm, fuse_linear, widen, deepen, drop_layer, block_influence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import splice

TRANSFORMS = [lambda f: f, jax.jit]
EPS = 1e-5
HI = jax.lax.Precision.HIGHEST


def rnd(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape)


def conv(x, w, b=None):
    y = jax.lax.conv_general_dilated(
        x,
        w,
        (1,) * (w.ndim - 2),
        "SAME",
        precision=HI,
        dimension_numbers=("NWC", "WIO", "NWC") if w.ndim == 3 else ("NHWC", "HWIO", "NHWC"),
    )
    return y if b is None else y + b.reshape((1,) * (y.ndim - 1) + b.shape)


def dense(x, w, b=None):
    y = jnp.matmul(x, w, precision=HI)
    return y if b is None else y + b[None]


def np_bn(y, gamma, beta, mean, var, eps):
    return gamma * (y - mean) / np.sqrt(var + eps) + beta


LAYERS = [
    ("dense", (6, 5), (4, 6), dense),
    ("conv", (3, 6, 5), (2, 7, 6), conv),
    ("conv2d", (3, 3, 6, 5), (2, 5, 5, 6), conv),
]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("name, wshape, xshape, layer", LAYERS, ids=[c[0] for c in LAYERS])
def test_fold_batchnorm_preserves_function(transform, name, wshape, xshape, layer):
    w, b, x = rnd(0, *wshape), rnd(1, 5), rnd(2, *xshape)
    gamma, beta, mean = rnd(3, 5), rnd(4, 5), rnd(5, 5)
    var = jnp.abs(rnd(6, 5)) + 0.1
    w2, b2 = transform(splice.fold_batchnorm)(w, b, gamma, beta, mean, var, eps=1e-3)
    ref = np_bn(
        np.asarray(layer(x, w, b)), *(np.asarray(a) for a in (gamma, beta, mean, var)), 1e-3
    )
    np.testing.assert_allclose(layer(x, w2, b2), ref, atol=EPS, rtol=EPS)
    w3, b3 = splice.fold_batchnorm(w, None, None, None, mean, var)
    ref = (np.asarray(layer(x, w)) - np.asarray(mean)) / np.sqrt(np.asarray(var) + 1e-5)
    np.testing.assert_allclose(layer(x, w3, b3), ref, atol=EPS, rtol=EPS)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_fuse_linear_dense_and_conv_then_1x1(transform):
    x = rnd(0, 4, 6)
    w1, b1, w2, b2 = rnd(1, 6, 5), rnd(2, 5), rnd(3, 5, 3), rnd(4, 3)
    w, b = transform(splice.fuse_linear)(w1, b1, w2, b2)
    ref = (np.asarray(x) @ np.asarray(w1) + np.asarray(b1)) @ np.asarray(w2) + np.asarray(b2)
    np.testing.assert_allclose(dense(x, w, b), ref, atol=EPS, rtol=EPS)
    xc, k1, k2 = rnd(5, 2, 7, 6), rnd(6, 3, 6, 5), rnd(7, 1, 5, 4)
    w, b = transform(splice.fuse_linear)(k1, b1, k2, None)
    np.testing.assert_allclose(conv(xc, w, b), conv(conv(xc, k1, b1), k2), atol=EPS, rtol=EPS)
    with pytest.raises(ValueError, match="does not match"):
        splice.fuse_linear(w1, b1, rnd(8, 4, 3), b2)
    with pytest.raises(ValueError, match="1x1"):
        splice.fuse_linear(k1, b1, rnd(8, 3, 5, 4), None)


@pytest.mark.parametrize("transform", [lambda f: f, lambda f: jax.jit(f, static_argnums=3)])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_widen_preserves_function(transform, kind):
    if kind == "dense":
        w1, b1, w2, x, layer = rnd(0, 6, 4), rnd(1, 4), rnd(2, 4, 3), rnd(3, 5, 6), dense
    else:
        w1, b1, w2, x, layer = rnd(0, 3, 2, 4), rnd(1, 4), rnd(2, 3, 4, 3), rnd(3, 2, 8, 2), conv
    f = lambda w1, b1, w2: layer(jax.nn.relu(layer(x, w1, b1)), w2)
    for key in (None, jax.random.key(7)):
        w1n, b1n, w2n = transform(lambda a, b, c, n: splice.widen(a, b, c, n, key=key))(
            w1, b1, w2, 9
        )
        assert w1n.shape[-1] == 9 and b1n.shape == (9,) and w2n.shape[-2] == 9
        np.testing.assert_allclose(f(w1n, b1n, w2n), f(w1, b1, w2), atol=EPS, rtol=EPS)
    w1n, b1n, w2n = splice.widen(w1, b1, w2, 9, key=jax.random.key(1), noise=0.1)
    assert not np.allclose(f(w1n, b1n, w2n), f(w1, b1, w2), atol=EPS)
    with pytest.raises(ValueError, match="new_width=3 is smaller than the width 4"):
        splice.widen(w1, b1, w2, 3)


def test_widen_map_counts():
    g = splice.widen_map(3, 8)
    assert g.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    g = splice.widen_map(4, 100, key=jax.random.key(0))
    assert g[:4].tolist() == [0, 1, 2, 3] and set(g.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("activation", ["relu", "relu6", None])
def test_deepen_identity_layer_preserves_function(transform, activation):
    act = {"relu": jax.nn.relu, "relu6": jax.nn.relu6, None: lambda v: v}[activation]
    h = act(rnd(0, 5, 6) * 4)
    w, b = transform(lambda: splice.deepen(6, activation))()
    np.testing.assert_allclose(act(dense(h, w, b)), h, atol=EPS, rtol=EPS)
    hc = act(rnd(1, 2, 7, 6))
    w, b = splice.deepen(6, activation, kernel_size=(3,))
    assert w.shape == (3, 6, 6)
    np.testing.assert_allclose(act(conv(hc, w, b)), hc, atol=EPS, rtol=EPS)
    with pytest.raises(ValueError, match="not idempotent"):
        splice.deepen(6, "tanh")
    with pytest.raises(ValueError, match="odd"):
        splice.deepen(6, "relu", kernel_size=(2,))


def res_fn(p, x):
    hs = [x]
    for b in p["blocks"]:
        hs.append(hs[-1] + jax.nn.relu(hs[-1] @ b["w1"]) @ b["w2"])
    return jnp.mean((hs[-1] @ p["head"]) ** 2), hs


def test_drop_layer_list_and_scanned_stack():
    p = {
        "blocks": [{"w1": rnd(i, 4, 8), "w2": rnd(10 + i, 8, 4)} for i in range(3)],
        "head": rnd(20, 4, 2),
    }
    x = rnd(21, 5, 4)
    small = splice.drop_layer(p, "blocks/1")
    assert len(small["blocks"]) == 2 and small["blocks"][1] is p["blocks"][2]
    ref = {"blocks": [p["blocks"][0], p["blocks"][2]], "head": p["head"]}
    np.testing.assert_allclose(res_fn(small, x)[0], res_fn(ref, x)[0], rtol=1e-6)
    stack = {"w": jnp.stack([b["w1"] for b in p["blocks"]]), "head": p["head"]}
    out = splice.drop_layer(stack, ("w", 0))
    np.testing.assert_array_equal(out["w"], np.asarray(stack["w"])[[1, 2]])
    assert out["head"] is stack["head"]
    with pytest.raises(ValueError, match="'blocks/7' is not in the tree"):
        splice.drop_layer(p, "blocks/7")
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        splice.drop_layer(stack, ("w", 5))
    with pytest.raises(ValueError, match="no leaf under 'nope'"):
        splice.drop_layer(stack, ("nope", 0))


def test_block_influence_matches_numpy():
    p = {
        "blocks": [
            {"w1": rnd(i, 4, 8) * s, "w2": rnd(10 + i, 8, 4)} for i, s in enumerate([1.0, 0.0, 0.3])
        ],
        "head": rnd(20, 4, 2),
    }
    batches = [rnd(30, 6, 4), rnd(31, 6, 4)]
    inf = splice.block_influence(res_fn, p, batches, ["blocks/0", "blocks/1", "blocks/2"])
    cos = np.zeros(3)
    for x in batches:
        hs = [np.asarray(h) for h in res_fn(p, x)[1]]
        for i in range(3):
            a, b = hs[i], hs[i + 1]
            cos[i] += (
                np.mean((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
                / 2
            )
    np.testing.assert_allclose(inf.cosine, 1 - cos, atol=1e-5)
    assert abs(inf.cosine[1]) < 1e-6 and abs(inf.ablation[1]) < 1e-5  # a zero block is identity
    base = np.mean([float(res_fn(p, x)[0]) for x in batches])
    drop0 = np.mean([float(res_fn(splice.drop_layer(p, "blocks/0"), x)[0]) for x in batches])
    np.testing.assert_allclose(inf.ablation[0], drop0 - base, rtol=1e-5)
    with pytest.raises(ValueError, match="expected 3"):
        splice.block_influence(res_fn, p, batches, ["blocks/0", "blocks/1"])


def scan_res_fn(p, x):
    """``res_fn`` with the blocks stacked on a leading axis and run by ``lax.scan``; the hidden
    states come back as one ``(layers + 1, ..., d)`` array."""

    def body(h, b):
        h = h + jax.nn.relu(h @ b["w1"]) @ b["w2"]
        return h, h

    y, ys = jax.lax.scan(body, x, p["blocks"])
    return jnp.mean((y @ p["head"]) ** 2), jnp.concatenate([x[None], ys])


def stacked(p):
    return {"blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *p["blocks"]), "head": p["head"]}


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_drop_layer_index_form_on_a_stack_equals_the_list_without_the_block(transform):
    p = {
        "blocks": [{"w1": rnd(i, 4, 8), "w2": rnd(10 + i, 8, 4)} for i in range(3)],
        "head": rnd(20, 4, 2),
    }
    s, x = stacked(p), rnd(21, 5, 4)
    for i in range(3):
        small = transform(lambda q, i=i: splice.drop_layer(q, "blocks", index=i))(s)
        assert small["blocks"]["w1"].shape == (2, 4, 8) and small["head"].shape == (4, 2)
        ref = splice.drop_layer(p, f"blocks/{i}")
        np.testing.assert_array_equal(small["blocks"]["w2"], stacked(ref)["blocks"]["w2"])
        np.testing.assert_allclose(scan_res_fn(small, x)[0], res_fn(ref, x)[0], rtol=1e-6)
        tup = splice.drop_layer(s, ("blocks", i))
        np.testing.assert_array_equal(tup["blocks"]["w1"], small["blocks"]["w1"])
    # a stack on another axis: axis=1
    t = {"w": jnp.stack([b["w1"] for b in p["blocks"]], axis=1)}
    out = transform(lambda q: splice.drop_layer(q, "w", index=1, axis=1))(t)
    np.testing.assert_array_equal(out["w"], np.asarray(t["w"])[:, [0, 2]])
    # a list of blocks, or a block whose leaves differ on axis 0, is not a stack
    with pytest.raises(ValueError, match="'blocks' holds a list of 3 blocks, not a scanned"):
        splice.drop_layer(p, "blocks", index=1)
    with pytest.raises(ValueError, match=r"'blocks/0' is not a scanned stack: .* \('blocks/0/w1'"):
        splice.drop_layer(p, "blocks/0", index=1)


def test_block_influence_on_a_scanned_stack_equals_the_list():
    p = {
        "blocks": [
            {"w1": rnd(i, 4, 8) * s, "w2": rnd(10 + i, 8, 4)} for i, s in enumerate([1.0, 0.0, 0.3])
        ],
        "head": rnd(20, 4, 2),
    }
    batches = [rnd(30, 6, 4), rnd(31, 6, 4)]
    ref = splice.block_influence(res_fn, p, batches, ["blocks/0", "blocks/1", "blocks/2"])
    specs = [("blocks", 0), ("blocks", 1), ("blocks", 2)]
    inf = splice.block_influence(scan_res_fn, stacked(p), batches, specs)
    assert inf.blocks == tuple(specs)
    np.testing.assert_allclose(inf.cosine, ref.cosine, atol=1e-6)
    np.testing.assert_allclose(inf.ablation, ref.ablation, rtol=1e-5, atol=1e-6)
    assert abs(inf.ablation[1]) < 1e-6  # the zero block is the identity
    # the layer axis may be another one: axis=1
    moved = {"blocks": jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), stacked(p)["blocks"])}
    moved["head"] = p["head"]

    def moved_fn(q, x):
        return scan_res_fn(
            {
                "blocks": jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), q["blocks"]),
                "head": q["head"],
            },
            x,
        )

    by_axis = splice.block_influence(moved_fn, moved, batches, specs, axis=1)
    np.testing.assert_allclose(by_axis.ablation, inf.ablation, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(by_axis.cosine, inf.cosine, rtol=1e-6, atol=1e-7)


BAD_BN = [
    ("var", -0.5, 0.001, r"var\[2\] = -0\.5 is negative"),
    ("var", 0.0, 0.0, r"var\[2\] \+ eps = 0\.0 \+ 0\.0 is 0"),
    ("var", np.nan, 0.001, r"var\[2\] = nan is not finite"),
    ("mean", np.inf, 0.001, r"mean\[2\] = inf is not finite"),
    ("gamma", -np.inf, 0.001, r"gamma\[2\] = -inf is not finite"),
    ("beta", np.nan, 0.001, r"beta\[2\] = nan is not finite"),
    ("b", np.nan, 0.001, r"b\[2\] = nan is not finite"),
]


@pytest.mark.parametrize("name, value, eps, match", BAD_BN, ids=[f"{r[0]}={r[1]}" for r in BAD_BN])
def test_fold_batchnorm_invalid_statistics(name, value, eps, match):
    """Concrete: ValueError naming the channel and value. Traced (jit): that channel's column
    of W' and entry of b' are NaN, the others as eager, and checkify's float_checks report it."""
    from jax.experimental import checkify

    w = rnd(0, 6, 5)
    args = {"b": rnd(1, 5), "gamma": rnd(3, 5), "beta": rnd(4, 5), "mean": rnd(5, 5)}
    args["var"] = jnp.abs(rnd(6, 5)) + 0.1
    bad = dict(args, **{name: args[name].at[2].set(value)})
    with pytest.raises(ValueError, match="splice.fold_batchnorm: " + match):
        splice.fold_batchnorm(w, **bad, eps=eps)
    f = jax.jit(lambda w, a: splice.fold_batchnorm(w, **a, eps=eps))
    w2, b2 = f(w, bad)
    ref_w, ref_b = splice.fold_batchnorm(w, **args, eps=eps)
    nan = np.arange(5) == 2
    assert np.isnan(np.asarray(w2)[:, nan]).all() and np.isnan(np.asarray(b2)[nan]).all()
    np.testing.assert_allclose(np.asarray(w2)[:, ~nan], np.asarray(ref_w)[:, ~nan], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(b2)[~nan], np.asarray(ref_b)[~nan], rtol=1e-6)
    err, _ = checkify.checkify(f, errors=checkify.float_checks)(w, bad)
    assert "nan generated by primitive" in err.get()
    err, _ = checkify.checkify(f, errors=checkify.float_checks)(w, args)
    assert err.get() is None


def test_fold_batchnorm_var_zero_with_positive_eps_is_valid_and_exact():
    w, var = jnp.ones((2, 3)), jnp.array([0.0, 1.0, 4.0])
    w2, b2 = splice.fold_batchnorm(w, None, None, None, jnp.zeros(3), var, eps=0.25)
    np.testing.assert_allclose(w2[0], 1 / np.sqrt(np.array([0.25, 1.25, 4.25])), rtol=1e-6)
    assert b2.tolist() == [0.0, 0.0, 0.0]


def test_fold_batchnorm_bf16_kernel_with_f32_statistics():
    w = rnd(0, 4, 3).astype(jnp.bfloat16)
    var, mean = jnp.array([1.0, 4.0, 0.25]), jnp.array([1.0, 0.0, -1.0])
    w2, b2 = splice.fold_batchnorm(w, None, None, None, mean, var, eps=0.0)
    assert w2.dtype == b2.dtype == jnp.bfloat16
    np.testing.assert_array_equal(b2.astype(jnp.float32), [-1.0, 0.0, 2.0])
