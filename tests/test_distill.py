"""distill: kd_loss, hint_loss, attention_transfer_loss, NNX distill_step, the demo section."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from jaxslim.distill import attention_transfer_loss, hint_loss, kd_loss
from jaxslim.flax.distill import distill_step

VARIANTS = {"eager": lambda f: f, "jit": jax.jit}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return VARIANTS[request.param]


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _np_kd(s, t, temperature):
    """KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean, float64 with 0 log 0 = 0."""
    log_ps, log_pt = _np_log_softmax(s / temperature), _np_log_softmax(t / temperature)
    pt = np.exp(log_pt)
    with np.errstate(invalid="ignore"):  # 0 * (-inf - x) where a teacher logit is -inf
        kl = np.where(pt > 0, pt * (log_pt - log_ps), 0.0).sum(-1)
    return temperature**2 * kl.mean()


def _logits(seed, shape=(16, 10), scale=3.0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32),
        jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32),
        jnp.asarray(rng.integers(0, shape[-1], shape[:-1]), jnp.int32),
    )


# --- kd_loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5, 4.0, 20.0])
def test_kd_loss_equals_numpy_kl_times_t_squared(variant, temperature):
    s, t, y = _logits(0)
    fn = variant(lambda s, t: kd_loss(s, t, temperature=temperature))
    np.testing.assert_allclose(fn(s, t), _np_kd(s, t, temperature), rtol=1e-5)


@jax.jit
def _kd_jit(s, t, y, temperature, sw, hw):  # traced weights: one compilation for all examples
    return kd_loss(s, t, y, temperature=temperature, soft_weight=sw, hard_weight=hw)


@given(st.integers(0, 2**31 - 1), st.floats(0.5, 10.0), st.floats(0.0, 2.0), st.floats(0.0, 2.0))
def test_kd_loss_weighted_sum_with_hard_term(seed, temperature, sw, hw):
    s, t, y = _logits(seed, (4, 3, 7))  # extra leading axis: mean over all of them
    got = _kd_jit(s, t, y, *(jnp.float32(v) for v in (temperature, sw, hw)))
    ce = -np.take_along_axis(_np_log_softmax(s), np.asarray(y)[..., None], -1).mean()
    ref = hw * ce + sw * _np_kd(s, t, temperature)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_kd_loss_probability_labels(variant):
    s, t, y = _logits(1)
    onehot = jax.nn.one_hot(y, 10)
    a = variant(lambda s, t, lab: kd_loss(s, t, lab, hard_weight=0.5))(s, t, onehot)
    b = variant(lambda s, t, lab: kd_loss(s, t, lab, hard_weight=0.5))(s, t, y)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_kd_loss_teacher_gradient_is_zero(variant):
    s, t, y = _logits(2)
    g = variant(jax.grad(lambda t: kd_loss(s, t, y, temperature=4.0, hard_weight=0.3)))(t)
    np.testing.assert_array_equal(g, np.zeros_like(t))
    gs = variant(jax.grad(lambda s: kd_loss(s, t, temperature=4.0)))(s)
    assert float(jnp.abs(gs).max()) > 0


def test_kd_loss_t_squared_keeps_gradient_norms_comparable():
    norms = {}
    for seed in range(3):
        s, t, _ = _logits(seed)
        for temp in (1.0, 4.0, 20.0):
            g = jax.grad(lambda s: kd_loss(s, t, temperature=temp))(s)
            norms.setdefault(seed, {})[temp] = float(jnp.linalg.norm(g))
    for by_t in norms.values():
        values = np.array(list(by_t.values()))
        assert values.max() / values.min() < 2.0  # with T^2: same scale across T in {1, 4, 20}
        without = values / np.array([1.0, 16.0, 400.0])
        assert without.max() / without.min() > 100  # without T^2 the soft gradient vanishes


def test_kd_loss_finite_with_neg_inf_teacher_logit(variant):
    s, t, _ = _logits(3, (4, 5))
    t = t.at[:, 2].set(-jnp.inf)
    loss, g = variant(jax.value_and_grad(lambda s: kd_loss(s, t, temperature=2.0)))(s)
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(loss, _np_kd(s, t, 2.0), rtol=1e-5)


def test_kd_loss_zero_when_student_matches_and_bf16(variant):
    s, _, _ = _logits(4)
    assert float(variant(kd_loss)(s, s)) == pytest.approx(0.0, abs=1e-6)
    out = variant(kd_loss)(s.astype(jnp.bfloat16), s.astype(jnp.bfloat16))
    assert out.dtype == jnp.float32  # computed in float32


def test_kd_loss_bad_input():
    s, t, y = _logits(5)
    with pytest.raises(ValueError, match=r"kd_loss: temperature must be finite and > 0, got 0"):
        kd_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, temperature=-1.0)
    with pytest.raises(ValueError, match=r"student_logits \(16, 10\) and teacher_logits \(16, 9\)"):
        kd_loss(s, t[:, :9])
    with pytest.raises(ValueError, match="labels are required"):
        kd_loss(s, t, hard_weight=0.5)
    with pytest.raises(ValueError, match="soft_weight"):
        kd_loss(s, t, soft_weight=-1.0)
    with pytest.raises(ValueError, match="labels must be integer ids"):
        kd_loss(s, t, y[:3], hard_weight=1.0)
    with pytest.raises(TypeError, match="floating-point"):
        kd_loss(y[:, None], y[:, None])


# --- hint_loss and attention transfer ---------------------------------------------------------


def test_hint_loss_numpy_and_regressor(variant):
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.standard_normal((8, 4, 3)), jnp.float32)
    t = jnp.asarray(rng.standard_normal((8, 4, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    got = variant(lambda s, t, w: hint_loss(s, t, regressor=lambda f: f @ w))(s, t, w)
    d = np.asarray(t, np.float64) - np.asarray(s, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(got, 0.5 * (d**2).sum(axis=(1, 2)).mean(), rtol=1e-5)
    gt = jax.grad(lambda t: hint_loss(s, t, regressor=lambda f: f @ w))(t)
    np.testing.assert_array_equal(gt, np.zeros_like(t))
    with pytest.raises(ValueError, match=r"hint_loss: student_features \(8, 4, 3\) and teacher"):
        hint_loss(s, t)


def _np_at(x, p=2.0):
    a = (np.abs(np.asarray(x, np.float64)) ** p).mean(-1).reshape(x.shape[0], -1)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def test_attention_transfer_numpy(variant):
    rng = np.random.default_rng(1)
    s = jnp.asarray(rng.standard_normal((4, 6, 6, 8)), jnp.float32)
    t = jnp.asarray(rng.standard_normal((4, 6, 6, 32)), jnp.float32)
    got = variant(attention_transfer_loss)(s, t)
    np.testing.assert_allclose(got, ((_np_at(s) - _np_at(t)) ** 2).mean(), rtol=1e-5)
    nchw = variant(lambda a, b: attention_transfer_loss(a, b, channel_axis=1))(
        jnp.moveaxis(s, -1, 1), jnp.moveaxis(t, -1, 1)
    )
    np.testing.assert_allclose(nchw, got, rtol=1e-6)
    gt = jax.grad(lambda t: attention_transfer_loss(s, t))(t)
    np.testing.assert_array_equal(gt, np.zeros_like(t))
    g0 = jax.grad(lambda s: attention_transfer_loss(s, t))(jnp.zeros_like(s))
    assert np.isfinite(np.asarray(g0)).all()  # all-zero student map: no NaN
    with pytest.raises(ValueError, match="attention_transfer_loss"):
        attention_transfer_loss(s, t[:, :5])
    with pytest.raises(ValueError, match="p must be"):
        attention_transfer_loss(s, t, p=0.0)


# --- NNX distill_step -------------------------------------------------------------------------


def _toy():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 6)), jnp.float32)
    teacher = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    y = jnp.argmax(teacher(x), -1)
    return x, y, teacher


def test_distill_step_trains_student_and_leaves_teacher_frozen():
    x, y, teacher = _toy()
    before = jax.tree.map(np.asarray, nnx.state(teacher, nnx.Param))
    student = nnx.Linear(6, 4, rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(student, optax.sgd(0.5), wrt=nnx.Param)
    first = float(kd_loss(student(x), teacher(x), y, temperature=2.0, hard_weight=0.5))
    losses = [
        float(distill_step(student, opt, x, teacher, y, temperature=2.0, hard_weight=0.5))
        for _ in range(100)
    ]
    assert losses[0] == pytest.approx(first, rel=1e-5)  # the loss before the update
    assert losses[-1] < 0.3 * losses[0]
    after = jax.tree.map(np.asarray, nnx.state(teacher, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    agree = float(jnp.mean(jnp.argmax(student(x), -1) == y))
    assert agree > 0.95


def test_distill_step_precomputed_teacher_logits_match_module():
    x, y, teacher = _toy()
    a, b = nnx.Linear(6, 4, rngs=nnx.Rngs(1)), nnx.Linear(6, 4, rngs=nnx.Rngs(1))
    oa = nnx.Optimizer(a, optax.sgd(0.1), wrt=nnx.Param)
    ob = nnx.Optimizer(b, optax.sgd(0.1), wrt=nnx.Param)
    logits = teacher(x)
    for _ in range(3):
        la = distill_step(a, oa, x, teacher)
        lb = distill_step(b, ob, x, logits)
        np.testing.assert_allclose(la, lb, rtol=1e-6)
    np.testing.assert_allclose(a.kernel[...], b.kernel[...], rtol=1e-6)


# --- demo section -----------------------------------------------------------------------------


@pytest.mark.standard_promotion  # optax.adam under strict promotion
def test_demo_section_smoke():
    from jaxslim.demo import data as D
    from jaxslim.demo import distill as demo

    data = D.load_mnist1d(seed=0)
    dense = D.make_model("cnn", seed=0)
    D.train(dense, optax.sgd(0.05), data, steps=5)
    before = jax.tree.map(np.asarray, nnx.state(dense, nnx.Param))
    rows = demo.run(data, dense, steps=20, prox_steps=10, seeds=(0,), student_channels=(4, 4, 4))
    assert [r["method"].split(" ")[0] for r in rows][:2] == ["student", "student"]
    for r in rows:
        assert set(r) == {"method", "accuracy", "size", "seconds", "note"}
        assert 0.0 <= r["accuracy"] <= 1.0 and r["seconds"] >= 0
        assert isinstance(r["size"], str) and isinstance(r["note"], str)
    jax.tree.map(
        np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(dense, nnx.Param))
    )  # dense not mutated


# --- edge inputs: huge temperature, -inf teacher rows, empty batch, traced labels -------------


@pytest.mark.parametrize("temperature", [1e2, 1e4, 1e6, 1e30])
def test_kd_loss_large_temperature_is_exact_then_its_limit(variant, temperature):
    s, t, _ = _logits(7)
    got = float(variant(lambda s, t: kd_loss(s, t, temperature=temperature))(s, t))
    d = np.asarray(t, np.float64) - np.asarray(s, np.float64)
    limit = 0.5 * ((d - d.mean(-1, keepdims=True)) ** 2).mean(-1).mean()  # Hinton sec. 2.1
    ref = _np_kd(s, t, temperature) if temperature <= 1e4 else limit
    np.testing.assert_allclose(got, ref, rtol=2e-4)
    g = variant(jax.grad(lambda s: kd_loss(s, t, temperature=temperature)))(s)
    assert np.isfinite(np.asarray(g)).all()


def test_kd_loss_teacher_rows_of_neg_inf(variant):
    s, t, _ = _logits(8, shape=(4, 6))
    t = np.asarray(t).copy()
    t[0, :] = -np.inf  # no teacher distribution: contributes 0
    t[1, :4] = -np.inf  # partial
    t = jnp.asarray(t)
    got = float(variant(lambda s, t: kd_loss(s, t, temperature=2.0))(s, t))
    rows = [_np_kd(np.asarray(s)[i : i + 1], np.asarray(t)[i : i + 1], 2.0) for i in (1, 2, 3)]
    np.testing.assert_allclose(got, sum(rows) / 4, rtol=1e-5)
    g = np.asarray(variant(jax.grad(lambda s: kd_loss(s, t, temperature=2.0)))(s))
    assert np.isfinite(g).all() and (g[0] == 0).all()


def test_kd_loss_empty_batch_is_zero_with_finite_grad(variant):
    s = jnp.zeros((0, 5))
    y = jnp.zeros((0,), jnp.int32)
    f = variant(lambda s: kd_loss(s, s + 1.0, y, hard_weight=1.0, temperature=3.0))
    assert float(f(s)) == 0.0
    assert variant(jax.grad(lambda s: kd_loss(s, s, y, hard_weight=1.0)))(s).shape == (0, 5)
    assert float(hint_loss(jnp.zeros((0, 3)), jnp.zeros((0, 3)))) == 0.0
    assert float(attention_transfer_loss(jnp.zeros((0, 2, 2, 3)), jnp.zeros((0, 2, 2, 5)))) == 0


def test_kd_loss_traced_out_of_range_labels_are_ignored():
    s, t, y = _logits(9, shape=(4, 5))
    f = jax.jit(lambda y: kd_loss(s, t, y, soft_weight=0.0, hard_weight=1.0))
    ce = -_np_log_softmax(s)[np.arange(4), np.asarray(y)]
    bad = jnp.asarray(y).at[0].set(-1).at[2].set(5)  # -1 must not score as class 4
    np.testing.assert_allclose(float(f(bad)), ce[[1, 3]].mean(), rtol=1e-6)
    assert float(f(jnp.full((4,), 7, jnp.int32))) == 0.0  # no valid row
    g = jax.jit(jax.grad(lambda s, y: kd_loss(s, t, y, soft_weight=0.0, hard_weight=1.0)))(s, bad)
    assert (np.asarray(g)[[0, 2]] == 0).all()


def test_kd_loss_traced_bad_hyperparameters_turn_terms_off():
    s, t, y = _logits(10, shape=(4, 5))
    f = jax.jit(lambda T, w: kd_loss(s, t, y, temperature=T, hard_weight=w))
    hard = float(kd_loss(s, t, y, soft_weight=0.0, hard_weight=1.0))
    assert float(f(jnp.float32(0.0), jnp.float32(1.0))) == pytest.approx(hard, rel=1e-6)
    assert float(f(jnp.float32(jnp.nan), jnp.float32(1.0))) == pytest.approx(hard, rel=1e-6)
    soft = float(kd_loss(s, t, temperature=2.0))
    assert float(f(jnp.float32(2.0), jnp.float32(-1.0))) == pytest.approx(soft, rel=1e-6)


def test_attention_transfer_large_p_and_activations_are_finite(variant):
    rng = np.random.default_rng(11)
    a = jnp.asarray(rng.standard_normal((2, 3, 3, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((2, 3, 3, 6)), jnp.float32)
    base = float(attention_transfer_loss(a, b))
    # Q is scale-invariant: huge activations give the same loss instead of inf / inf
    big = float(variant(attention_transfer_loss)(a * 1e30, b * 1e25))
    np.testing.assert_allclose(big, base, rtol=1e-5)
    assert np.isfinite(float(variant(lambda a, b: attention_transfer_loss(a, b, p=200.0))(a, b)))


@pytest.mark.parametrize("variant", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_kd_loss_student_neg_inf_where_teacher_has_mass_is_plus_inf(variant):
    t = jnp.array([[1.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    s = jnp.array([[-jnp.inf, 0.0, 0.0], [0.0, 1.0, 2.0]])
    f = variant(lambda s, t: kd_loss(s, t, temperature=2.0))
    assert float(f(s, t)) == float("inf")
    # the same -inf where the teacher has no mass is fine: that class contributes 0
    t0 = t.at[0, 0].set(-jnp.inf)
    ref = float(f(s.at[0, 0].set(0.0), t0))
    assert np.isfinite(float(f(s, t0))) and np.isfinite(ref)
