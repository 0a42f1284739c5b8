"""find_foldable / fold_all / fuse_all: batch norms folded and linear pairs fused from a trace."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxslim import splice
from jaxslim.flax import splice as fsplice

TRANSFORMS = [lambda f: f, jax.jit]
EPS = 1e-5


def rnd(seed, *shape, scale=1.0):
    return jax.random.normal(jax.random.key(seed), shape) * scale


def bn_params(seed, c):
    return {
        "scale": rnd(seed, c),
        "bias": rnd(seed + 1, c),
        "mean": rnd(seed + 2, c),
        "var": jnp.abs(rnd(seed + 3, c)) + 0.5,
    }


def batchnorm(h, s, eps=1e-3):
    return (h - s["mean"][None]) * jax.lax.rsqrt(s["var"][None] + eps) * s["scale"][None] + s[
        "bias"
    ][None]


PLAIN = {
    "l1": {"kernel": rnd(0, 5, 6), "bias": rnd(1, 6)},
    "bn": bn_params(2, 6),
    "l2": {"kernel": rnd(6, 6, 4)},
    "l3": {"kernel": rnd(7, 4, 3), "bias": rnd(8, 3)},
}


def plain_fn(p, x):
    h = jax.nn.relu(batchnorm(x @ p["l1"]["kernel"] + p["l1"]["bias"][None], p["bn"]))
    h = h @ p["l2"]["kernel"]
    return h @ p["l3"]["kernel"] + p["l3"]["bias"][None]


def rebuilt_plain_fn(p, x):
    """The model without the norm and with l2, l3 as one layer: written independently."""
    h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"][None])
    return h @ p["l2"]["kernel"] + p["l2"]["bias"][None]


def test_find_foldable_plain_function_records():
    found = splice.find_foldable(plain_fn, PLAIN, jnp.ones((2, 5)))
    assert found == [
        splice.Fold("l1/kernel", "l1/bias", ("bn/bias", "bn/mean", "bn/scale", "bn/var")),
        splice.Fuse(("l2/kernel", None), ("l3/kernel", "l3/bias"), ()),
    ]


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_fold_all_then_fuse_all_preserves_function_and_matches_formula(transform):
    x = rnd(9, 7, 5)
    found = splice.find_foldable(plain_fn, PLAIN, x)
    new = transform(lambda p: splice.fuse_all(splice.fold_all(p, found), found))(PLAIN)
    assert jax.tree.map(jnp.shape, new) == {
        "l1": {"kernel": (5, 6), "bias": (6,)},
        "l2": {"kernel": (6, 3), "bias": (3,)},
    }
    np.testing.assert_allclose(rebuilt_plain_fn(new, x), plain_fn(PLAIN, x), atol=EPS, rtol=EPS)
    bn = {k: np.asarray(v, np.float64) for k, v in PLAIN["bn"].items()}
    s = bn["scale"] / np.sqrt(bn["var"] + 1e-3)
    np.testing.assert_allclose(new["l1"]["kernel"], np.asarray(PLAIN["l1"]["kernel"]) * s, 1e-5)
    ref_b = (np.asarray(PLAIN["l1"]["bias"]) - bn["mean"]) * s + bn["bias"]
    np.testing.assert_allclose(new["l1"]["bias"], ref_b, rtol=1e-5, atol=1e-6)
    w2, w3 = np.asarray(PLAIN["l2"]["kernel"]), np.asarray(PLAIN["l3"]["kernel"])
    np.testing.assert_allclose(new["l2"]["kernel"], w2 @ w3, rtol=1e-5, atol=1e-6)


class LinenNet(nn.Module):
    """Conv (no bias) -> BN -> relu -> Dense -> BN -> Dense; ``folded`` is the rebuilt model."""

    folded: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3,), use_bias=self.folded, name="c0")(x)
        if not self.folded:
            x = nn.BatchNorm(use_running_average=True, name="bn0")(x)
        x = nn.relu(x)
        if self.folded:  # d1 -> bn1 -> d2 collapses into one Dense under d1's name
            return nn.Dense(3, name="d1")(x)
        x = nn.BatchNorm(use_running_average=True, name="bn1")(nn.Dense(5, name="d1")(x))
        return nn.Dense(3, name="d2")(x)


def randomize(tree, seed=0):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for i, (path, x) in enumerate(leaves):
        x = x + 0.5 * rnd(seed + i, *x.shape)
        out.append(jnp.abs(x) + 0.5 if "var" in jax.tree_util.keystr(path) else x)
    return jax.tree.unflatten(treedef, out)


def test_linen_conv_bn_and_dense_bn_dense_rebuilt_without_bn():
    model = LinenNet()
    x = rnd(1, 2, 7, 2)
    v = randomize(model.init(jax.random.key(0), x))
    fn = lambda v, x: model.apply(v, x)
    found = splice.find_foldable(fn, v, x)
    assert [type(r).__name__ for r in found] == ["Fold", "Fuse"]
    assert found[0].kernel == "params/c0/kernel" and found[0].bias is None
    assert set(found[1].absorbed) == {
        "batch_stats/bn1/mean",
        "batch_stats/bn1/var",
        "params/bn1/scale",
        "params/bn1/bias",
    }
    new = splice.fuse_all(splice.fold_all(v, found), found)
    assert set(new) == {"params"} and set(new["params"]) == {"c0", "d1"}
    out = LinenNet(folded=True).apply(new, x)
    np.testing.assert_allclose(out, fn(v, x), atol=EPS, rtol=EPS)


class ResNet(nnx.Module):
    """Conv/BN stem, one residual block (conv-BN-relu-conv-BN + skip), two linear heads."""

    def __init__(self, c=6, rngs=None):
        bn = lambda n: nnx.BatchNorm(n, use_running_average=True, rngs=rngs)
        self.stem, self.bn0 = nnx.Conv(1, c, (3,), use_bias=False, rngs=rngs), bn(c)
        self.c1, self.bn1 = nnx.Conv(c, c, (3,), rngs=rngs), bn(c)
        self.c2, self.bn2 = nnx.Conv(c, c, (3,), rngs=rngs), bn(c)
        self.fc1 = nnx.Linear(c, 5, rngs=rngs)
        self.fc2 = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.bn0(self.stem(x)))
        h = jax.nn.relu(h + self.bn2(self.c2(jax.nn.relu(self.bn1(self.c1(h))))))
        return self.fc2(self.fc1(h.mean(1)))


def first_kernel(record):
    return record.kernel if isinstance(record, splice.Fold) else record.first[0]


def randomize_module(model, seed=0):
    _, state = nnx.split(model)
    nnx.update(model, randomize(state, seed))


def test_nnx_resnet_fold_all_module_preserves_function():
    model = ResNet(rngs=nnx.Rngs(0))
    randomize_module(model, seed=4)
    x = rnd(2, 3, 9, 1)
    y = model(x)
    found = fsplice.fold_all_module(model, x)
    assert [(type(r).__name__, first_kernel(r)) for r in found] == [
        ("Fold", "stem/kernel"),
        ("Fold", "c1/kernel"),
        ("Fold", "c2/kernel"),
        ("Fuse", "fc1/kernel"),
    ]
    for name in ("bn0", "bn1", "bn2", "fc2"):
        assert isinstance(getattr(model, name), fsplice.Identity)
    assert model.stem.use_bias and model.stem.bias.get_value().shape == (6,)
    assert (model.fc1.in_features, model.fc1.out_features) == (6, 3)
    np.testing.assert_allclose(model(x), y, atol=EPS, rtol=EPS)
    assert splice.find_foldable(*fsplice.module_fn(model), x) == []


def test_nnx_sequential_linear_bn_linear():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(
        nnx.Linear(4, 6, rngs=rngs),
        nnx.BatchNorm(6, use_running_average=True, rngs=rngs),
        jax.nn.relu,
        nnx.Linear(6, 2, rngs=rngs),
    )
    randomize_module(model, seed=8)
    x = rnd(3, 5, 4)
    y = model(x)
    found = fsplice.fold_all_module(model, x)
    assert [type(r).__name__ for r in found] == ["Fold"]
    assert isinstance(model.layers[1], fsplice.Identity)
    np.testing.assert_allclose(model(x), y, atol=EPS, rtol=EPS)


@pytest.mark.parametrize(
    "fn, why",
    [
        (lambda p, x: jax.nn.relu(x @ p["w"]) @ p["v"], "relu between the layers"),
        (lambda p, x: (x @ p["w"] @ p["v"]) @ p["v"].T @ p["v"], "v used by two layers"),
        (lambda p, x: ((h := x @ p["w"]) * p["s"][None] + h) @ p["u"], "h used twice"),
        (lambda p, x: jax.nn.relu(x @ p["w"] * x[:, :1]) @ p["u"], "data-dependent scale"),
        (lambda p, x: jax.nn.relu(x @ p["w"] * p["s"][None]) @ p["u"] + p["s"].sum(), "s reused"),
    ],
    ids=["relu", "shared_kernel", "fanout", "data_scale", "shared_param"],
)
def test_nothing_reported_where_a_rewrite_would_be_inexact(fn, why):
    p = {"w": rnd(0, 3, 4), "v": rnd(1, 4, 4), "s": rnd(2, 4), "u": rnd(3, 4, 2)}
    found = splice.find_foldable(fn, p, jnp.ones((2, 3)))
    assert [first_kernel(r) for r in found if first_kernel(r) == "w"] == [], why


def test_conv_followed_by_3x3_conv_is_not_fused_but_by_1x1_is():
    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
        )

    p = {"a": rnd(0, 3, 2, 4), "b": rnd(1, 3, 4, 4), "c": rnd(2, 1, 4, 3)}
    x = rnd(3, 2, 8, 2)
    fn = lambda p, x: conv(conv(conv(x, p["a"]), p["b"]), p["c"])
    found = splice.find_foldable(fn, p, x)
    assert found == [splice.Fuse(("b", None), ("c", None), ())]
    new = splice.fuse_all(p, found)
    assert new["b"].shape == (3, 4, 3) and "c" not in new
    np.testing.assert_allclose(
        conv(conv(x, new["a"]), new["b"]) + new["bias"][None, None], fn(p, x), atol=EPS, rtol=EPS
    )


def test_bad_input_raises():
    found = splice.find_foldable(plain_fn, PLAIN, jnp.ones((1, 5)))
    with pytest.raises(TypeError, match="Fold/Fuse records"):
        splice.fold_all(PLAIN, [("l1/kernel", "bn")])
    folded = splice.fold_all(PLAIN, found)
    with pytest.raises(ValueError, match="no leaf 'bn/"):
        splice.fold_all(folded, found)
    with pytest.raises(ValueError, match="no kernel 'l3/kernel'"):
        splice.fuse_all({"l2": PLAIN["l2"]}, found)


def test_fold_found_inside_jit_and_through_a_registered_vector_primitive():
    from jax.interpreters import mlir

    from jaxslim.splice import _rules as rules

    name = "jaxslim_test_softplus_fold"
    prim = jax.extend.core.Primitive(name)
    prim.def_impl(jax.nn.softplus)
    prim.def_abstract_eval(lambda x: x)
    mlir.register_lowering(prim, mlir.lower_fun(jax.nn.softplus, multiple_results=False))
    p = {"w": rnd(0, 3, 4), "g": rnd(1, 4), "v": rnd(2, 4, 2)}

    def fn(p, x):
        h = jax.jit(lambda x, w, g: (x @ w) * prim.bind(g)[None])(x, p["w"], p["g"])
        return jax.nn.relu(h) @ p["v"]

    x = rnd(3, 2, 3)
    assert splice.find_foldable(fn, p, x) == []  # no rule: the chain stops at the primitive
    try:
        splice.register_rule(prim, fold="vector")(lambda w, eqn, ins: [list(ins[0])])
        found = splice.find_foldable(fn, p, x)
        assert found == [splice.Fold("w", None, ("g",))]
        new = splice.fold_all(p, found)
        np.testing.assert_allclose(new["w"], p["w"] * jax.nn.softplus(p["g"])[None], rtol=1e-6)
        ref = jax.nn.relu(x @ new["w"] + new["bias"][None]) @ new["v"]
        np.testing.assert_allclose(ref, fn(p, x), atol=EPS, rtol=EPS)
    finally:
        del rules.RULES[name]


def test_fold_inside_scan_body_is_exact_and_stacked_kernels_are_left_alone():
    p = {"w": rnd(0, 4, 4, scale=0.5), "mean": rnd(1, 4), "var": jnp.abs(rnd(2, 4)) + 0.5}

    def fn(p, x):
        def body(c, _):
            h = (c @ p["w"] - p["mean"][None]) * jax.lax.rsqrt(p["var"] + 1e-5)[None]
            return jnp.tanh(h), None

        return jax.lax.scan(body, x, length=3)[0]

    x = rnd(3, 2, 4)
    found = splice.find_foldable(fn, p, x)
    assert found == [splice.Fold("w", None, ("mean", "var"))]
    new = splice.fold_all(p, found)
    ref = jax.lax.scan(lambda c, _: (jnp.tanh(c @ new["w"] + new["bias"][None]), None), x, length=3)
    np.testing.assert_allclose(ref[0], fn(p, x), atol=EPS, rtol=EPS)

    stacked = {"w": jnp.stack([p["w"]] * 3), "mean": p["mean"], "var": p["var"]}

    def fn_stacked(p, x):
        def body(c, w):
            return jnp.tanh((c @ w - p["mean"][None]) * jax.lax.rsqrt(p["var"] + 1e-5)[None]), None

        return jax.lax.scan(body, x, p["w"])[0]

    assert splice.find_foldable(fn_stacked, stacked, x) == []
