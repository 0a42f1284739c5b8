"""QEP / GPTAQ error propagation: ``quant.qep_correct`` and ``GPTQ(qep=...)``.

``qep_correct`` is checked against NumPy least squares (``alpha = 1``, no damping: the kernel
that maps the compressed model's inputs closest to the float model's outputs) and the damped
formula in float64; ``quant.oneshot`` with ``GPTQ(qep=...)`` against the same steps composed by
hand and by what it is for: a deep model's outputs closer to the float model's than plain GPTQ.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxslim import calibrate, quant, recipe
from jaxslim.quant import GPTQ, QuantSpec

RNG = np.random.default_rng(0)


def _pair(n=96, k=12, noise=0.2, seed=0):
    r = np.random.default_rng(seed)
    xf = r.normal(size=(n, k)).astype(np.float32)
    xq = (xf + noise * r.normal(size=(n, k))).astype(np.float32)
    return xf, xq


def _numpy_qep(w, xq, xf, alpha, damp):
    w, xq, xf = (np.asarray(a, np.float64) for a in (w, xq, xf))
    w2 = w.reshape(-1, w.shape[-1])
    h = xq.T @ xq
    c = xq.T @ xf
    hd = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    return (w2 + alpha * np.linalg.solve(hd, (c - h) @ w2)).reshape(w.shape)


@pytest.mark.parametrize("jit", [False, True])
def test_full_correction_without_damping_is_the_least_squares_kernel(jit):
    xf, xq = _pair()
    w = RNG.normal(size=(12, 5)).astype(np.float32)
    f = jax.jit(quant.qep_correct, static_argnames=("alpha", "damp")) if jit else quant.qep_correct
    out = f(jnp.asarray(w), xq.T @ xq, xq.T @ xf, alpha=1.0, damp=0.0)
    lsq = np.linalg.lstsq(xq.astype(np.float64), xf.astype(np.float64) @ w, rcond=None)[0]
    np.testing.assert_allclose(out, lsq, rtol=1e-3, atol=1e-4)
    assert out.dtype == jnp.float32 and out.shape == w.shape


@pytest.mark.parametrize("alpha, damp", [(0.0, 0.01), (0.5, 0.0), (0.5, 0.01), (1.0, 0.1)])
def test_damped_partial_correction_equals_the_float64_formula(alpha, damp):
    xf, xq = _pair(seed=1)
    w = RNG.normal(size=(12, 5)).astype(np.float32)
    out = quant.qep_correct(w, xq.T @ xq, xq.T @ xf, alpha=alpha, damp=damp)
    np.testing.assert_allclose(out, _numpy_qep(w, xq, xf, alpha, damp), rtol=1e-3, atol=1e-4)
    if alpha == 0.0:
        np.testing.assert_array_equal(out, w)


def test_conv_kernel_is_corrected_on_its_flattened_rows():
    xf, xq = _pair(k=3 * 4, seed=2)
    w = RNG.normal(size=(3, 4, 6)).astype(np.float32)  # (taps, in, out): K = 12
    out = quant.qep_correct(w, xq.T @ xq, xq.T @ xf, alpha=0.7)
    assert out.shape == (3, 4, 6)
    np.testing.assert_allclose(out, _numpy_qep(w, xq, xf, 0.7, 0.01), rtol=1e-3, atol=1e-4)


def test_dead_input_keeps_its_row():
    xf, xq = _pair(seed=3)
    xf[:, 4] = xq[:, 4] = 0.0
    w = RNG.normal(size=(12, 5)).astype(np.float32)
    out = np.asarray(quant.qep_correct(w, xq.T @ xq, xq.T @ xf, alpha=1.0))
    np.testing.assert_array_equal(out[4], w[4])
    assert np.isfinite(out).all()


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_no_input_error_means_no_correction(seed, alpha):
    # X_q = X_f: C = H, the float kernel already fits the float outputs
    x = np.random.default_rng(seed).normal(size=(40, 6)).astype(np.float32)
    w = np.random.default_rng(seed + 1).normal(size=(6, 3)).astype(np.float32)
    h = x.T @ x
    out = quant.qep_correct(w, h, h, alpha=alpha)
    np.testing.assert_array_equal(out, w)


def test_traced_singular_hessian_returns_the_kernel_unchanged():
    w = jnp.ones((2, 3))
    h = jnp.array([[1.0, 2.0], [2.0, 1.0]])  # indefinite: no Cholesky factor
    out = jax.jit(lambda w, h: quant.qep_correct(w, h, h * 0.5, damp=0.0))(w, h)
    np.testing.assert_array_equal(out, w)


# --- GPTQ(qep=...) in quant.oneshot --------------------------------------------------------


def _deep(n_layers=4, d=32):
    keys = jax.random.split(jax.random.key(0), n_layers)
    params = {
        f"l{i}": jax.random.normal(k, (d, d)) * (1.2 / np.sqrt(d)) for i, k in enumerate(keys)
    }

    def fn(p, x):
        for i in range(n_layers):
            x = jnp.tanh(x @ p[f"l{i}"])
        return x

    return fn, params


BATCHES = [jax.random.normal(jax.random.key(9 + i), (64, 32)) for i in range(2)]
SPEC = QuantSpec(3, axis=-1, group_size=16)


def test_oneshot_qep_is_gptq_on_the_corrected_kernel_with_the_float_model_as_reference():
    fn, params = _deep(3)
    q, rep = quant.oneshot(fn, params, BATCHES, SPEC, method=GPTQ(qep=0.5))
    # the same steps by hand: each kernel's cross against the float model
    cur = dict(params)
    for path in ["l0", "l1", "l2"]:
        s = calibrate.statistics(fn, cur, BATCHES, kernels=[path], reference=params)[path]
        target = quant.qep_correct(cur[path], s.xtx, s.cross, alpha=0.5, damp=0.01)
        want = quant.gptq(target, s.xtx, SPEC)
        np.testing.assert_array_equal(q[path].dequantize(), want.dequantize())
        cur[path] = want.dequantize()
    assert [r.method for r in rep.rows] == ["gptq"] * 3


def test_oneshot_qep_brings_a_deep_model_closer_to_the_float_outputs():
    fn, params = _deep(6)
    test = [jax.random.normal(jax.random.key(99), (256, 32))]

    def output_error(qparams):
        deq = quant.dequantize_params(qparams)
        return float(
            sum(
                jnp.sum((fn(deq, x) - fn(params, x)) ** 2) / jnp.sum(fn(params, x) ** 2)
                for x in test
            )
        )

    plain = output_error(quant.oneshot(fn, params, BATCHES, SPEC, method=GPTQ())[0])
    qep = output_error(quant.oneshot(fn, params, BATCHES, SPEC, method=GPTQ(qep=0.5))[0])
    assert qep < 0.9 * plain, (qep, plain)


def test_qep_first_kernel_equals_plain_gptq():
    # nothing before the first kernel is quantized: X_q = X_f, no correction
    fn, params = _deep(2)
    a = quant.oneshot(fn, params, BATCHES, SPEC, method=GPTQ(qep=1.0))[0]["l0"]
    b = quant.oneshot(fn, params, BATCHES, SPEC, method=GPTQ())[0]["l0"]
    np.testing.assert_array_equal(a.dequantize(), b.dequantize())


def test_recipe_reads_qep_and_applies_it_as_the_python_api():
    fn, params = _deep(2)
    r = recipe.parse(
        """
[quant]
default = {bits = 3, axis = -1, group_size = 16}
method = {name = "gptq", qep = 0.5}
"""
    )
    assert r.method == GPTQ(qep=0.5)
    got, _ = recipe.apply(r, params, fn=fn, batches=BATCHES)
    want, _ = quant.oneshot(fn, params, BATCHES, SPEC, method=GPTQ(qep=0.5))
    for k in params:
        np.testing.assert_array_equal(got[k].dequantize(), want[k].dequantize())
    with pytest.raises(recipe.RecipeError, match=r"quant\.method\.qep: .*>= 0, got -1"):
        recipe.parse(
            """
[quant]
default = {bits = 3, axis = -1, group_size = 16}
method = {name = "gptq", qep = -1}
"""
        )
