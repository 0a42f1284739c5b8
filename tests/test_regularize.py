"""regularize: L1/L2 gradient terms, proximal L1 / elastic net / group lasso, penalties."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state
from hypothesis import given
from hypothesis import strategies as st
from jax import lax
from sklearn.datasets import load_digits

from jaxslim import regularize as R
from jaxslim.structures import NM, Blocks, Channels, Unstructured

VARIANTS = {"eager": lambda f: f, "jit": jax.jit}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return VARIANTS[request.param]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(5), jnp.float32),
        },
        "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 4, 8)), jnp.float32)},
        "step": jnp.int32(7),
    }


def _grads(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: (
            jnp.asarray(rng.standard_normal(p.shape), p.dtype)
            if jnp.issubdtype(p.dtype, jnp.floating)
            else p
        ),
        params,
    )


def _update(tx, updates, params, variant, steps=1):
    state = tx.init(params)
    update = variant(tx.update)
    for _ in range(steps):
        out, state = update(updates, state, params)
    return out, state


def _soft(z, tau):  # numpy reference, float64
    z = np.asarray(z, np.float64)
    return np.sign(z) * np.maximum(np.abs(z) - tau, 0.0)


def _block(z, tau_g, axis=-1):  # numpy reference of the block soft threshold over `axis` groups
    z = np.asarray(z, np.float64)
    other = tuple(i for i in range(z.ndim) if i != axis % z.ndim)
    n = np.sqrt((z * z).sum(axis=other, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(n > tau_g, 1 - tau_g / n, 0.0)
    return z * scale


# --- gradient forms ---------------------------------------------------------------------------


def test_add_l1_matches_formula_and_leaves_others_alone(variant):
    params, grads = _params(), _grads(_params())
    out, state = _update(R.add_l1(0.3), grads, params, variant)
    for name in ("dense", "conv"):
        ref = np.asarray(grads[name]["kernel"]) + 0.3 * np.sign(np.asarray(params[name]["kernel"]))
        np.testing.assert_allclose(out[name]["kernel"], ref, rtol=1e-6)
    np.testing.assert_array_equal(out["dense"]["bias"], grads["dense"]["bias"])  # ndim 1: skipped
    assert out["step"].dtype == jnp.int32 and int(out["step"]) == 7  # int leaf untouched
    assert int(state.count) == 1


def test_add_l2_equals_add_decayed_weights_and_penalty_gradient(variant):
    params, grads = _params(), _grads(_params())
    out, _ = _update(R.add_l2(0.25), grads, params, variant)
    ref_tx = optax.masked(
        optax.add_decayed_weights(0.5),
        {"dense": {"kernel": True, "bias": False}, "conv": {"kernel": True}, "step": False},
    )
    ref, _ = ref_tx.update(grads, ref_tx.init(params), params)
    chex.assert_trees_all_close(out, ref, rtol=1e-6)
    # add_l2(s) adds the gradient of s * l2_penalty
    pen = jax.grad(lambda p: 0.25 * R.l2_penalty(p))({k: params[k] for k in ("dense", "conv")})
    np.testing.assert_allclose(
        out["conv"]["kernel"] - grads["conv"]["kernel"], pen["conv"]["kernel"], rtol=1e-6
    )


def test_strength_schedule_uses_own_step_count(variant):
    params = {"w": jnp.ones((2, 2))}
    zeros = {"w": jnp.zeros((2, 2))}
    sched = optax.linear_schedule(0.0, 1.0, transition_steps=4)  # 0, .25, .5, ...
    tx = R.add_l1(sched)
    state = tx.init(params)
    update = variant(tx.update)
    seen = []
    for _ in range(4):
        u, state = update(zeros, state, params)
        seen.append(float(u["w"][0, 0]))
    np.testing.assert_allclose(seen, [0.0, 0.25, 0.5, 0.75], rtol=1e-6)


def test_scheduled_prox_does_not_retrace():
    params = {"w": jnp.ones((3, 3))}
    tx = R.prox_l1(optax.linear_schedule(0.0, 1.0, 10), optax.exponential_decay(0.1, 1, 0.9))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(u, s, p):
        return tx.update(u, s, p)

    state = tx.init(params)
    for _ in range(5):
        _, state = step(params, state, params)
    assert int(state.count) == 5


# --- proximal forms ---------------------------------------------------------------------------


@jax.jit
def _prox_step(params, u, strength, lr):
    # strength and lr traced (schedules returning them): one compilation for every example
    tx = R.prox_l1(lambda _: strength, lambda _: lr)
    out, _ = tx.update(u, tx.init(params), params)
    return out


@given(st.integers(0, 2**31 - 1), st.floats(0.0, 2.0), st.floats(0.01, 1.0))
def test_prox_l1_is_soft_threshold_of_p_plus_u(seed, strength, lr):
    params, u = _params(seed), _grads(_params(seed), seed + 1)
    out = _prox_step(params, u, jnp.float32(strength), jnp.float32(lr))
    new = optax.apply_updates(params, out)
    for name in ("dense", "conv"):
        z = np.asarray(params[name]["kernel"], np.float64) + np.asarray(u[name]["kernel"])
        got = np.asarray(new[name]["kernel"])
        np.testing.assert_allclose(got, _soft(z, lr * strength), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(
            got == 0, np.abs(z.astype(np.float32)) <= np.float32(lr * strength)
        )  # exact zeros, exactly where |z| <= tau
    np.testing.assert_array_equal(out["dense"]["bias"], u["dense"]["bias"])


def test_prox_l1_schedule_and_where(variant):
    params = {"a": {"w": jnp.full((2, 2), 1.0)}, "b": {"w": jnp.full((2, 2), 1.0)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = R.prox_l1(1.0, optax.piecewise_constant_schedule(0.1, {1: 20.0}), where="^a/")
    out, _ = _update(tx, zeros, params, variant, steps=1)
    np.testing.assert_allclose(out["a"]["w"], -0.1, rtol=1e-6)  # tau = 0.1 at step 0
    np.testing.assert_array_equal(out["b"]["w"], 0.0)
    out, _ = _update(tx, zeros, params, variant, steps=2)
    np.testing.assert_array_equal(out["a"]["w"], -1.0)  # tau = 2 at step 1: exact zero


def test_prox_elastic_net_matches_formula(variant):
    params, u = _params(), _grads(_params())
    l1, l2, lr = 0.7, 0.4, 0.5
    out, _ = _update(R.prox_elastic_net(l1, l2, lr), u, params, variant)
    new = optax.apply_updates(params, out)
    z = np.asarray(params["conv"]["kernel"], np.float64) + np.asarray(u["conv"]["kernel"])
    ref = _soft(z, lr * l1) / (1 + 2 * lr * l2)
    np.testing.assert_allclose(new["conv"]["kernel"], ref, rtol=1e-5, atol=1e-6)
    assert (np.asarray(new["conv"]["kernel"]) == 0).sum() == (ref == 0).sum() > 0


@functools.partial(jax.jit, static_argnums=3)
def _group_step(params, u, strength, axis):
    tx = R.prox_group_lasso(lambda _: strength, 0.5, structure=Channels(axis=axis))
    out, _ = tx.update(u, tx.init(params), params)
    return out


@given(st.integers(0, 2**31 - 1), st.floats(0.0, 3.0), st.sampled_from([-1, -2, 0]))
def test_prox_group_lasso_block_formula_and_whole_channels(seed, strength, axis):
    params, u = _params(seed), _grads(_params(seed), seed + 1)
    lr = 0.5
    out = _group_step(params, u, jnp.float32(strength), axis)
    new = optax.apply_updates(params, out)
    for name in ("dense", "conv"):
        z = np.asarray(params[name]["kernel"], np.float64) + np.asarray(u[name]["kernel"])
        size = z.size // z.shape[axis]
        ref = _block(z, lr * strength * np.sqrt(size), axis)
        got = np.asarray(new[name]["kernel"])
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        zero = np.moveaxis(got == 0, axis, 0).reshape(got.shape[axis], -1)
        assert np.all(zero.all(axis=1) | ~zero.any(axis=1))  # a channel is all zero or none


def test_prox_group_lasso_zeros_channels_in_training(variant):
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.standard_normal((10, 6)) * [[3, 3, 3, 0.1, 0.1, 0.1]], jnp.float32)
    }
    tx = optax.chain(optax.sgd(0.1), R.prox_group_lasso(1.0, 0.1))
    state, step = tx.init(params), variant(tx.update)
    for _ in range(5):
        u, state = step({"w": jnp.zeros((10, 6))}, state, params)
        params = optax.apply_updates(params, u)
    w = np.asarray(params["w"])
    np.testing.assert_array_equal((w == 0).all(axis=0), [False] * 3 + [True] * 3)
    assert (w[:, :3] != 0).all()


def test_prox_group_lasso_blocks_and_unstructured(variant):
    params, u = _params(), _grads(_params())
    lr, s = 0.5, 0.8
    tx = R.prox_group_lasso(s, lr, structure=Blocks((2, 4)), where="conv")
    out, _ = _update(tx, u, params, variant)
    z = np.asarray(params["conv"]["kernel"], np.float64) + np.asarray(u["conv"]["kernel"])
    tiles = z.reshape(3, 2, 2, 2, 4).transpose(0, 1, 3, 2, 4)  # (3, 2, 2, [2, 4])
    n = np.sqrt((tiles**2).sum(axis=(-2, -1), keepdims=True))
    ref = (tiles * np.maximum(0, 1 - lr * s * np.sqrt(8) / n)).transpose(0, 1, 3, 2, 4)
    new = optax.apply_updates(params, out)
    np.testing.assert_allclose(new["conv"]["kernel"], ref.reshape(z.shape), rtol=1e-5, atol=1e-6)
    # Unstructured groups are single entries: the block threshold is the soft threshold
    a, _ = _update(R.prox_group_lasso(s, lr, structure=Unstructured()), u, params, variant)
    b, _ = _update(R.prox_l1(s, lr), u, params, variant)
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


def test_prox_is_the_proximal_operator_of_the_penalty():
    # p_new minimizes 1/2 ||x - z||^2 + tau * R(x): no nearby point does better
    rng = np.random.default_rng(3)
    z = {"w": jnp.asarray(rng.standard_normal((4, 6)) * 0.5, jnp.float32)}
    tau = 0.6
    cases = [
        (R.prox_l1(tau, 1.0), R.l1_penalty),
        (R.prox_group_lasso(tau, 1.0), R.group_lasso_penalty),
    ]
    for tx, pen in cases:
        zero = jax.tree.map(jnp.zeros_like, z)
        u, _ = tx.update(zero, tx.init(z), z)  # p = z, u = 0: p_new = prox(z)
        x = optax.apply_updates(z, u)["w"]

        def obj(x):
            return 0.5 * jnp.sum((x - z["w"]) ** 2) + tau * pen({"w": x})

        best = float(obj(x))
        for k in range(50):
            d = jnp.asarray(np.random.default_rng(k).standard_normal((4, 6)) * 1e-2, jnp.float32)
            assert float(obj(x + d)) >= best - 1e-5


def test_prox_dtype_preserved_bf16():
    params = {"w": jnp.asarray([[0.5, -0.01], [2.0, 0.03]], jnp.bfloat16)}
    u = {"w": jnp.zeros((2, 2), jnp.bfloat16)}
    for tx in (
        R.prox_l1(0.1, 1.0),
        R.prox_group_lasso(0.1, 1.0),
        R.prox_elastic_net(0.1, 0.1, 1.0),
        R.add_l1(0.1),
        R.add_l2(0.1),
    ):
        out, _ = jax.jit(tx.update)(u, tx.init(params), params)
        assert out["w"].dtype == jnp.bfloat16
    out, _ = R.prox_l1(0.1, 1.0).update(u, R.prox_l1(0.1, 1.0).init(params), params)
    new = optax.apply_updates(params, out)["w"]
    assert new.dtype == jnp.bfloat16 and int((new == 0).sum()) == 2


# --- the lasso: proximal vs subgradient -------------------------------------------------------


def test_lasso_support_recovery_prox_vs_subgradient():
    rng = np.random.default_rng(0)
    n, d = 200, 50
    x = rng.standard_normal((n, d))
    beta = np.zeros(d)
    support = rng.choice(d, 5, replace=False)
    beta[support] = rng.choice([-1, 1], 5) * rng.uniform(1.0, 2.0, 5)
    y = x @ beta + 0.1 * rng.standard_normal(n)
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    lam, lr = 0.1, 0.2  # lr < 1 / L with L = ||X^T X / n||_2 (about 3)

    def loss(p):
        r = xj @ p["beta"][:, 0] - yj
        return 0.5 * jnp.mean(r * r)

    def fit(tx):
        p = {"beta": jnp.zeros((d, 1), jnp.float32)}

        def body(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = lax.scan(body, (p, tx.init(p)), length=1000)
        return np.asarray(p["beta"][:, 0])

    prox = fit(optax.chain(optax.sgd(lr), R.prox_l1(lam, lr)))
    sub = fit(optax.chain(R.add_l1(lam), optax.sgd(lr)))
    np.testing.assert_array_equal(np.flatnonzero(prox), np.sort(support))  # exact support
    assert np.all(np.sign(prox[support]) == np.sign(beta[support]))
    assert np.count_nonzero(sub) == d  # the subgradient form never lands on zero
    off = np.setdiff1d(np.arange(d), support)
    assert np.abs(sub[off]).max() > 0  # it only oscillates near zero
    assert np.abs(sub[off]).max() < 5 * lr * lam


# --- loss-side penalties ----------------------------------------------------------------------


def test_penalties_match_numpy(variant):
    params = _params()
    k1, k2 = np.asarray(params["dense"]["kernel"]), np.asarray(params["conv"]["kernel"])
    np.testing.assert_allclose(
        variant(R.l1_penalty)(params), np.abs(k1).sum() + np.abs(k2).sum(), rtol=1e-5
    )
    np.testing.assert_allclose(
        variant(R.l2_penalty)(params), (k1**2).sum() + (k2**2).sum(), rtol=1e-5
    )
    gl = (
        np.sqrt(6) * np.sqrt((k1**2).sum(0)).sum()
        + np.sqrt(12) * np.sqrt((k2**2).sum((0, 1))).sum()
    )
    np.testing.assert_allclose(variant(R.group_lasso_penalty)(params), gl, rtol=1e-5)
    np.testing.assert_allclose(
        variant(lambda p: R.l1_penalty(p, where="bias"))(params),
        np.abs(np.asarray(params["dense"]["bias"])).sum(),
        rtol=1e-5,
    )


def test_penalty_gradients_finite_at_zero(variant):
    p = {"w": jnp.asarray([[0.0, 0.0, 3.0], [0.0, 0.0, -4.0]])}
    g1 = variant(jax.grad(R.l1_penalty))(p)["w"]
    np.testing.assert_array_equal(g1, [[0, 0, 1], [0, 0, -1]])  # sign(p), 0 at 0
    assert float(jax.grad(jnp.abs)(0.0)) == 1.0  # why l1_penalty does not use jnp.abs alone
    g = variant(jax.grad(R.group_lasso_penalty))(p)["w"]
    np.testing.assert_allclose(g, np.sqrt(2) * np.array([[0, 0, 0.6], [0, 0, -0.8]]), rtol=1e-6)
    gb = variant(jax.grad(lambda q: R.group_lasso_penalty(q, structure=Blocks((1, 1)))))(p)["w"]
    assert np.isfinite(np.asarray(gb)).all()


# --- Flax training loops ----------------------------------------------------------------------


def _digits():
    x, y = load_digits(return_X_y=True)
    return jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y, jnp.int32)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def test_prox_l1_exact_zeros_in_nnx_optimizer_loop():
    x, y = _digits()
    model = NnxMLP(nnx.Rngs(0))
    lr = 0.5
    opt = nnx.Optimizer(model, optax.chain(optax.sgd(lr), R.prox_l1(0.01, lr)), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        opt.update(model, nnx.grad(loss)(model))

    for i in range(150):
        sl = slice((i * 64) % 1700, (i * 64) % 1700 + 64)
        step(model, opt, x[sl], y[sl])
    k1 = np.asarray(model.l1.kernel[...])
    assert (k1 == 0).mean() > 0.5  # exact zeros, with no extra call
    assert (np.asarray(model.l1.bias[...]) != 0).any()  # biases are not selected
    acc = float(jnp.mean(jnp.argmax(model(x), -1) == y))
    assert acc > 0.8  # chance is 0.1


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32, name="hidden")(x))
        return nn.Dense(10, name="head")(h)


def test_prox_group_lasso_exact_zeros_in_linen_train_state_loop():
    x, y = _digits()
    x = x - 0.3  # no input is exactly 0, so no gradient entry of a live channel is exactly 0
    module = LinenMLP()
    params = module.init(jax.random.key(0), x[:1])["params"]
    lr = 0.1
    tx = optax.chain(optax.sgd(lr), R.prox_group_lasso(0.02, lr, where="hidden/kernel"))
    state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)

    @jax.jit
    def step(state, xb, yb):
        def loss(p):
            logits = state.apply_fn({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    for i in range(150):
        sl = slice((i * 64) % 1700, (i * 64) % 1700 + 64)
        state = step(state, x[sl], y[sl])
    k = np.asarray(state.params["hidden"]["kernel"])
    dead = (k == 0).all(axis=0)
    assert 0 < dead.sum() < 32  # whole output channels are exactly zero ...
    assert ((k == 0).any(axis=0) == dead).all()  # ... and no channel is zero in part
    assert (np.asarray(state.params["head"]["kernel"]) != 0).all()
    before = k == 0
    for _ in range(10):  # zeros stay zero under further training
        state = step(state, x[:64], y[:64])
    now = np.asarray(state.params["hidden"]["kernel"]) == 0
    assert (now | ~before).all()


# --- bad input --------------------------------------------------------------------------------


def test_bad_input():
    params = _params()
    with pytest.raises(ValueError, match=r"prox_l1: strength must be finite and >= 0, got -0.1"):
        R.prox_l1(-0.1, 0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        R.prox_group_lasso(0.1, -1.0)
    with pytest.raises(ValueError, match="add_l1: strength"):
        R.add_l1(float("nan"))
    with pytest.raises(ValueError, match="schedule at step 0"):
        R.add_l2(lambda t: -1.0)
    with pytest.raises(TypeError, match="float or an optax schedule"):
        R.prox_elastic_net("0.1", 0.1, 0.1)
    with pytest.raises(TypeError, match="structure must be"):
        R.prox_group_lasso(0.1, 0.1, structure=NM(2, 4))
    with pytest.raises(ValueError, match="ord"):
        R.prox_group_lasso(0.1, 0.1, structure=Channels(ord=1))
    with pytest.raises(ValueError, match="Blocks"):
        R.prox_group_lasso(0.1, 0.1, structure=Blocks((4, 4))).init(params)
    with pytest.raises(ValueError, match="params are required"):
        tx = R.prox_l1(0.1, 0.1)
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="selects no floating-point"):
        R.add_l1(0.1, where="nothing_here").init(params)
    with pytest.raises(ValueError, match="l1_penalty"):
        R.l1_penalty(params, where="nothing_here")


# --- bad scheduled values under jit, non-finite weights, the structure= name ------------------


def _bad_after_step_0(bad):
    return lambda t: jnp.where(t >= 1, jnp.float32(bad), jnp.float32(0.1))


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")], ids=["nan", "neg", "inf"])
@pytest.mark.parametrize(
    "make",
    [
        lambda sched: R.prox_l1(1.0, sched),
        lambda sched: R.prox_l1(sched, 0.1),
        lambda sched: R.prox_elastic_net(0.0, sched, 0.1),
        lambda sched: R.prox_group_lasso(1.0, sched),
        lambda sched: R.prox_group_lasso(sched, 0.1, structure=Blocks((2, 1))),
        lambda sched: R.add_l1(sched),
        lambda sched: R.add_l2(sched),
    ],
    ids=[
        "prox_l1-lr",
        "prox_l1-strength",
        "elastic-l2",
        "glasso-lr",
        "glasso-strength",
        "l1",
        "l2",
    ],
)
def test_traced_bad_schedule_value_is_no_step(make, bad):
    """Under jit a NaN/negative/inf value after step 0 counts as 0: no zeroing, no growth."""
    params = _params()
    tx = make(_bad_after_step_0(bad))
    state = tx.init(params)
    zeros = jax.tree.map(lambda p: jnp.zeros_like(p) if p.dtype != jnp.int32 else p, params)
    update = jax.jit(tx.update)
    _, state = update(zeros, state, params)  # step 0: a real step
    u, _ = update(zeros, state, params)  # step 1: the bad value, i.e. 0
    for path in (("dense", "kernel"), ("conv", "kernel")):
        got = u[path[0]][path[1]]
        np.testing.assert_array_equal(np.asarray(got), 0.0)  # no change at all
        assert np.isfinite(np.asarray(got)).all()


def test_prox_nan_entry_stays_and_does_not_zero_its_group(variant):
    z = np.array([[3.0, 0.1], [np.nan, 0.1], [4.0, 0.1]], np.float32)  # (in=3, out=2)
    p = {"w": jnp.asarray(z)}
    u, _ = _update(R.prox_group_lasso(0.5, 1.0), {"w": jnp.zeros((3, 2))}, p, variant)
    new = np.asarray(p["w"] + u["w"])
    assert np.isnan(new[1, 0])  # the NaN stays where it is, visible
    tau = 0.5 * np.sqrt(3)
    ref = _block(np.array([[3.0], [0.0], [4.0]]), tau)[:, 0]  # the group without its NaN
    np.testing.assert_allclose(new[[0, 2], 0], ref[[0, 2]], rtol=1e-6)
    np.testing.assert_array_equal(new[:, 1], 0.0)  # the small finite group is still zeroed
    u1, _ = _update(R.prox_l1(1.0, 0.5), {"w": jnp.zeros((3, 2))}, p, variant)
    new1 = np.asarray(p["w"] + u1["w"])
    assert np.isnan(new1[1, 0]) and new1[0, 0] == 2.5 and new1[2, 0] == 3.5


def test_group_lasso_penalty_skips_nan_entries(variant):
    w = np.array([[3.0, 1.0], [np.nan, 1.0], [4.0, 1.0]], np.float32)
    clean = np.where(np.isnan(w), 0.0, w)
    got = variant(lambda p: R.group_lasso_penalty({"w": p}))(jnp.asarray(w))
    want = np.sqrt(3) * (5.0 + np.sqrt(3))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    g = np.asarray(variant(jax.grad(lambda p: R.group_lasso_penalty({"w": p})))(jnp.asarray(w)))
    assert np.isfinite(g).all() and g[1, 0] == 0.0
    np.testing.assert_allclose(g[[0, 2], 0], np.sqrt(3) * clean[[0, 2], 0] / 5.0, rtol=1e-6)


def test_groups_is_not_an_alias_of_structure_any_more():
    """``groups=`` finished its deprecation cycle: only ``structure=`` says how weights group."""
    with pytest.raises(TypeError, match="groups"):
        R.prox_group_lasso(0.5, 0.1, groups=Channels(axis=-2))
    with pytest.raises(TypeError, match="groups"):
        R.group_lasso_penalty(_params(), groups=Blocks((2, 1)))


def test_concrete_array_strengths_equal_floats():
    params, u = _params(), _grads(_params())
    for v in (np.array(0.3), jnp.array(0.3), np.float32(0.3)):
        a, _ = R.prox_l1(v, v).update(u, R.prox_l1(v, v).init(params), params)
        b, _ = R.prox_l1(0.3, 0.3).update(u, R.prox_l1(0.3, 0.3).init(params), params)
        chex.assert_trees_all_close(a, b, rtol=1e-6)
