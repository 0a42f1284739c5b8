"""LSQ gradients, observers, quantize_params rules, qdot_general paths and the Flax glue."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxslim import quant
from jaxslim.flax.quant import fake_quant_dot_general, qat_model, quantize_model
from jaxslim.quant import QArray, QuantSpec
from jaxslim.quant._dot import INT_MIN_ROWS

JIT = [lambda f: f, jax.jit]


@pytest.mark.parametrize("wrap", JIT)
def test_lsq_gradients_hand_derived(wrap):
    x = jnp.array([0.3, -0.8, 2.6, 5.0, -9.0])
    s = jnp.float32(0.5)  # v = x/s = 0.6, -1.6, 5.2, 10, -18; grid [-8, 7]
    gx, gs = wrap(
        jax.grad(
            lambda x, s: quant.fake_quant_lsq(x, s, -8, 7, grad_scale=1.0).sum(), argnums=(0, 1)
        )
    )(x, s)
    np.testing.assert_array_equal(np.asarray(gx), [1, 1, 1, 0, 0])
    # (r - v) inside: (1 - 0.6) + (-2 + 1.6) + (5 - 5.2); outside: qmax, qmin.
    want = (1 - 0.6) + (-2 + 1.6) + (5 - 5.2) + 7 - 8
    np.testing.assert_allclose(float(gs), want, rtol=1e-5)
    # Default gradient scale 1/sqrt(N * qmax).
    gs2 = jax.grad(lambda s: quant.fake_quant_lsq(x, s, -8, 7).sum())(s)
    np.testing.assert_allclose(float(gs2), want / np.sqrt(5 * 7), rtol=1e-5)
    y = quant.fake_quant_lsq(x, s, -8, 7)
    want_y = quant.fake_quant_affine(x, s, 0, -8, 7)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))


def test_lsq_per_channel_scale_gradient_shape():
    x = jnp.arange(12.0).reshape(3, 4) / 4
    s = jnp.full((1, 4), 0.25)
    gs = jax.grad(lambda s: quant.fake_quant_lsq(x, s, -8, 7, grad_scale=1.0).sum())(s)
    assert gs.shape == (1, 4)
    np.testing.assert_allclose(np.asarray(gs)[0], [7, 7, 7, 7])  # v = j, 4+j, 8+j: only 8+j > 7


def test_fake_quant_ste_through_spec():
    x = jnp.array([[0.1, -0.2], [0.3, 1.0]])
    g = jax.grad(lambda x: (quant.fake_quant(x, QuantSpec(4)) ** 2).sum())(x)
    np.testing.assert_allclose(np.asarray(g), 2 * np.asarray(quant.fake_quant(x, QuantSpec(4))))


@pytest.mark.parametrize("wrap", JIT)
def test_observers(wrap):
    spec = QuantSpec(8, axis=-1)
    b1 = jnp.array([[1.0, -2.0], [0.5, 0.0]])
    b2 = jnp.array([[-3.0, 4.0], [jnp.nan, jnp.inf]])
    mm = quant.minmax_observer(spec)
    st = wrap(mm.update)(wrap(mm.update)(mm.init(b1), b1), b2)
    np.testing.assert_array_equal(np.asarray(st.lo), [[-3.0, -2.0]])
    np.testing.assert_array_equal(np.asarray(st.hi), [[1.0, 4.0]])
    s, _ = mm.result(st)
    np.testing.assert_array_equal(np.asarray(s), np.float32([[3.0, 4.0]]) / np.float32(127.5))
    ma = quant.moving_average_observer(spec)
    st = ma.update(ma.update(ma.init(b1), b1), b2)
    np.testing.assert_allclose(np.asarray(st.hi), [[1.0 + 0.01 * (0.0 - 1.0), 0.0 + 0.01 * 4.0]])
    s0, _ = mm.result(mm.init(b1))  # nothing seen: eps, not NaN
    np.testing.assert_array_equal(np.asarray(s0), np.finfo(np.float32).eps)


def test_mse_observer_beats_minmax_with_outlier():
    x = jnp.concatenate([jnp.linspace(-1, 1, 2001), jnp.array([12.0])])
    spec = QuantSpec(4)
    errs = {}
    for name, make in [
        ("minmax", quant.minmax_observer),
        ("mse", quant.mse_observer),
        ("pct", lambda s: quant.percentile_observer(s, percentile=99.0)),
    ]:
        obs = make(spec)
        s, z = obs.result(jax.jit(obs.update)(obs.init(x), x))
        errs[name] = float(jnp.sum((quant.fake_quant(x, spec, scale=s, zero_point=z) - x) ** 2))
    assert errs["mse"] < errs["minmax"] and errs["mse"] <= errs["pct"] + 1e-6


def test_quantize_params_rules_first_match_wins():
    params = {
        "embed": jnp.ones((16, 8)),
        "dense": {"kernel": jnp.ones((32, 8)), "bias": jnp.ones(8)},
        "head": jnp.ones((8, 4)),
        "step": jnp.int32(3),
        "none": None,
    }
    rules = [
        ("head", None),
        ("embed", QuantSpec(8, axis=-1)),
        (None, QuantSpec(4, axis=-1, group_size=16)),
    ]
    q, report = quant.quantize_params(params, rules)
    assert isinstance(q["embed"], QArray) and q["embed"].spec.bits == 8
    assert isinstance(q["dense"]["kernel"], QArray) and q["dense"]["kernel"].spec.bits == 4
    assert q["head"] is params["head"] and q["dense"]["bias"] is params["dense"]["bias"]
    assert q["step"] is params["step"] and q["none"] is None
    sizes = {r.path: (r.bytes_before, r.bytes_after) for r in report.rows}
    assert sizes["embed"] == (512, 128 + 32)
    assert sizes["dense/kernel"] == (1024, 128 + 2 * 8 * 4)
    assert sizes["head"] == (128, 128) and sizes["dense/bias"] == (32, 32)
    assert report.bytes_before == 512 + 1024 + 128 + 32
    back = quant.dequantize_params(q)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="quantize no leaf"):
        quant.quantize_params(params, [(None, None)])
    with pytest.raises(ValueError, match="dense/kernel"):
        quant.quantize_params(params, [("dense/kernel", QuantSpec(4, group_size=5, group_axis=5))])
    with pytest.raises(TypeError, match="rule"):
        quant.quantize_params(params, [QuantSpec(8)])


DN = (((1,), (0,)), ((), ()))


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("rows", [1, 16])
def test_qdot_int_and_dequantize_paths_agree(wrap, rows):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(rows, 64)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(64, 32)).astype(np.float32))
    xq, wq = quant.quantize(x, QuantSpec(8, axis=0)), quant.quantize(w, QuantSpec(8, axis=-1))
    # Independent reference: exact integer products in numpy, then the scales.
    ref = (np.asarray(xq.codes(), np.int64) @ np.asarray(wq.codes(), np.int64)).astype(np.float64)
    ref = ref * np.asarray(xq.scale, np.float64) * np.asarray(wq.scale, np.float64)
    for impl in ["int", "dequantize", "auto"]:
        y = wrap(lambda a, b, impl=impl: quant.qdot_general(a, b, DN, impl=impl))(xq, wq)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    # Weight-only: equals the float dot with the dequantized kernel.
    y = quant.qdot_general(x, wq, DN)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ quant.dequantize(wq)), rtol=1e-6)


def test_qdot_batch_dims_and_errors():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(3, 8, 16)).astype(np.float32))
    b = jnp.asarray(rng.normal(size=(3, 16, 4)).astype(np.float32))
    dn = (((2,), (1,)), ((0,), (0,)))
    aq, bq = quant.quantize(a, QuantSpec(8, axis=(0, 1))), quant.quantize(b, QuantSpec(8))
    y_int = quant.qdot_general(aq, bq, dn, impl="int")
    y_deq = jax.lax.dot_general(quant.dequantize(aq), quant.dequantize(bq), dn)
    np.testing.assert_allclose(np.asarray(y_int), np.asarray(y_deq), rtol=1e-5, atol=1e-5)
    grouped = quant.quantize(b[0], QuantSpec(4, axis=-1, group_size=8))
    with pytest.raises(ValueError, match="impl='int'"):
        quant.qdot_general(quant.quantize(a[0], QuantSpec(8)), grouped, DN, impl="int")
    with pytest.raises(ValueError, match="impl must be"):
        quant.qdot_general(a[0], b[0], DN, impl="fast")
    assert INT_MIN_ROWS["cpu"] >= 1


def test_nnx_ptq_and_qat():
    model = nnx.Sequential(
        nnx.Linear(32, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 4, rngs=nnx.Rngs(1))
    )
    x = jax.random.normal(jax.random.key(0), (8, 32))
    want = model(x)
    ref = nnx.clone(model)
    report = quantize_model(model, [("layers/2", None), (None, QuantSpec(8, axis=-1))], act_bits=8)
    assert isinstance(model.layers[0].kernel[...], QArray)
    assert not isinstance(model.layers[2].kernel[...], QArray)
    assert report.bytes_after == 32 * 16 + 16 * 4 + 16 * 4 * 4
    y = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=0.05)
    # QAT: same forward as fake-quantized weights, finite gradients into float kernels.
    qat_model(ref, QuantSpec(4, axis=-1))
    loss = lambda m: jnp.mean(m(x) ** 2)
    grads = nnx.grad(loss)(ref)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    k0 = ref.layers[0].kernel[...]
    h = jax.nn.relu(x @ quant.fake_quant(k0, QuantSpec(4, axis=-1)) + ref.layers[0].bias[...][None])
    out = h @ quant.fake_quant(ref.layers[2].kernel[...], QuantSpec(4, axis=-1))
    np.testing.assert_allclose(
        np.asarray(ref(x)), np.asarray(out + ref.layers[2].bias[...][None]), rtol=1e-5, atol=1e-6
    )


def test_linen_dot_general():
    spec = QuantSpec(4, axis=-1)
    layer = nn.Dense(3, dot_general=fake_quant_dot_general(spec))
    x = jnp.ones((2, 8))
    params = nn.Dense(3).init(jax.random.key(0), x)
    y = layer.apply(params, x)
    k, b = params["params"]["kernel"], params["params"]["bias"]
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(x @ quant.fake_quant(k, spec) + b[None]), rtol=1e-6
    )
    with pytest.raises(TypeError, match="QuantSpec"):
        fake_quant_dot_general(4)


def test_demo_section_smoke():
    import optax

    from jaxslim.demo import quant as demo
    from jaxslim.demo.data import MLP, train

    rng = np.random.default_rng(0)
    data = (
        rng.normal(size=(256, 40)).astype(np.float32),
        rng.integers(0, 10, 256).astype(np.int32),
        rng.normal(size=(64, 40)).astype(np.float32),
        rng.integers(0, 10, 64).astype(np.int32),
    )
    # optax.adam's bias correction (float ** int32 count) needs standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        dense = train(MLP(hidden=(32,), rngs=nnx.Rngs(0)), optax.adam(1e-3), data, steps=5)
        before = nnx.state(dense, nnx.Param)
        rows = demo.run(data, dense, steps=3, calibration_size=64)
    assert [r["method"] for r in rows] == [
        "PTQ int8 per-channel",
        "PTQ int4 group-32",
        "PTQ int4 group-32 GPTQ",
        "QAT int4 group-32",
    ]
    for r in rows:
        assert set(r) == {"method", "accuracy", "size", "seconds", "note"}
        assert 0.0 <= r["accuracy"] <= 1.0 and r["size"].endswith("KiB")
    after = nnx.state(dense, nnx.Param)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )
