"""schedules: step_decay and exponential_decay equal Optax's schedules and their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxslim import schedules

VARIANTS = {"eager": lambda f: f, "jit": jax.jit}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return VARIANTS[request.param]


@given(st.floats(0.0, 10.0), st.integers(1, 500), st.floats(0.1, 4.0))
def test_step_decay_equals_optax_and_formula(init, total, power):
    ts = np.arange(0, total + 20)
    got = np.asarray(jax.jit(jax.vmap(schedules.step_decay(init, total, power)))(jnp.asarray(ts)))
    ref = optax.polynomial_schedule(init, 0.0, power, total)
    ref_jit = np.asarray(jax.jit(jax.vmap(ref))(jnp.asarray(ts)))
    np.testing.assert_array_equal(got[:total], ref_jit[:total])  # the same computation as optax
    eager = np.asarray([ref(int(t)) for t in ts])  # eager optax: exactly 0 from t = T on
    np.testing.assert_array_equal(got[total:], eager[total:])
    assert np.all(got[total:] == 0.0) and np.all(got >= 0)  # no -3e-8 or NaN after T under jit
    formula = init * (1 - np.minimum(ts, total) / total) ** power  # float64 reference
    np.testing.assert_allclose(got, formula, rtol=1e-4, atol=1e-6 * max(init, 1))


@given(st.floats(0.0, 10.0), st.floats(0.5, 1.0))
def test_exponential_decay_equals_optax_and_formula(init, rate):
    ts = np.arange(0, 300)
    got = np.asarray(jax.jit(jax.vmap(schedules.exponential_decay(init, rate)))(jnp.asarray(ts)))
    ref = optax.exponential_decay(init, 1, rate)
    np.testing.assert_array_equal(got, np.asarray(jax.jit(jax.vmap(ref))(jnp.asarray(ts))))
    np.testing.assert_allclose(got, np.asarray([ref(int(t)) for t in ts]), rtol=2e-6, atol=1e-30)
    np.testing.assert_allclose(got, init * rate ** ts.astype(np.float64), rtol=1e-4, atol=1e-30)


def test_schedules_eager_and_jit_agree(variant):
    sd, ed = schedules.step_decay(0.1, 100, 2.0), schedules.exponential_decay(0.1, 0.99)
    for t in (0, 1, 50, 99, 100, 1000):
        assert float(variant(sd)(t)) == pytest.approx(0.1 * max(0.0, 1 - t / 100) ** 2, abs=1e-8)
        assert float(variant(ed)(t)) == pytest.approx(0.1 * 0.99**t, rel=1e-4)


def test_schedules_drive_an_optimizer():
    params = {"w": jnp.ones(3)}
    tx = optax.sgd(schedules.step_decay(1.0, 4, 1.0))
    state = tx.init(params)
    steps = []
    for _ in range(6):
        u, state = tx.update({"w": jnp.ones(3)}, state)
        steps.append(-float(u["w"][0]))
    np.testing.assert_allclose(steps, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0], rtol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match=r"step_decay: total_steps must be > 0, got 0"):
        schedules.step_decay(0.1, 0, 1.0)
    with pytest.raises(TypeError, match="total_steps must be an int"):
        schedules.step_decay(0.1, 10.5, 1.0)
    with pytest.raises(ValueError, match="power"):
        schedules.step_decay(0.1, 10, -1.0)
    with pytest.raises(ValueError, match="init"):
        schedules.step_decay(-0.1, 10, 1.0)
    with pytest.raises(ValueError, match=r"exponential_decay: rate must be finite and > 0"):
        schedules.exponential_decay(0.1, 0.0)
    with pytest.raises(TypeError, match="rate"):
        schedules.exponential_decay(0.1, "0.9")
