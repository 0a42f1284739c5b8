"""SmoothQuant: the scale formula, the function-preserving migration, and W8A8 int8 x int8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import calibrate, quant
from jaxslim.quant._smoothquant import W8_SPEC

JIT = [lambda f: f, jax.jit]


def _inputs(rows=256, k=32, seed=0):
    rng = np.random.default_rng(seed)
    mag = np.ones(k)
    mag[[3, 17]] = 50.0  # outlier channels, as in the paper
    return jnp.asarray(rng.normal(size=(rows, k)) * mag, jnp.float32)


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_smooth_scales_formula(wrap, alpha):
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.normal(size=(32, n)), jnp.float32) for n in (8, 16)]
    a = jnp.max(jnp.abs(_inputs()), axis=0)
    s = wrap(lambda ws, a: quant.smooth_scales(ws, a, alpha=alpha))(ws, a)
    wmax = np.maximum(np.abs(np.asarray(ws[0])).max(1), np.abs(np.asarray(ws[1])).max(1))
    ref = np.asarray(a, np.float64) ** alpha / wmax ** (1 - alpha)
    np.testing.assert_allclose(s, ref, rtol=2e-6)


def test_smoothquant_migration_preserves_function_and_flattens_outliers():
    k = jax.random.split(jax.random.key(0), 2)
    p = {"norm": jnp.ones(32), "w": jax.random.normal(k[0], (32, 16)) / 6}
    fn = lambda p, x: (x * p["norm"][None]) @ p["w"]
    xs = [_inputs(seed=i) for i in range(2)]
    q, rep = quant.oneshot(fn, p, xs, W8_SPEC, method=quant.SmoothQuant(alpha=0.5))
    assert rep.absorbers == {"w": "norm"} and rep.alphas == {"w": 0.5}
    assert q["w"].spec.axis == (1,) and q["w"].spec.bits == 8 and q["w"].scale.shape == (1, 16)
    a = jnp.max(jnp.stack([jnp.max(jnp.abs(x), 0) for x in xs]), 0)
    s = quant.smooth_scales([p["w"]], a, alpha=0.5)
    np.testing.assert_allclose(q["norm"], 1 / s, rtol=1e-6)
    stats = calibrate.statistics(fn, p, xs)
    (g,) = quant.find_absorbers(fn, p, xs[0], stats, ["w"])
    p2 = quant.apply_scales(p, g, s)
    for x in xs:
        y = fn(p, x)
        assert float(jnp.max(jnp.abs(fn(p2, x) - y))) <= 1e-5 * float(jnp.max(jnp.abs(y)))
    # alpha = 0.5 balances: max|X_j / s_j| == max|W_j * s_j| for every channel j
    np.testing.assert_allclose(a / s, jnp.max(jnp.abs(p2["w"]), axis=1), rtol=1e-5)
    # W8A8 (per-token int8 activations) is closer to float after smoothing than before
    w8 = lambda pp, x: quant.w8a8_dot(x * pp["norm"][None], quant.quantize(pp["w"], W8_SPEC))
    err = lambda pp: sum(float(jnp.sum((w8(pp, x) - fn(p, x)) ** 2)) for x in xs)
    assert err(p2) < 0.5 * err(p)


@pytest.mark.parametrize("wrap", JIT)
def test_w8a8_dot_is_int8_times_int8(wrap):
    x = _inputs(16, 32)
    w = jax.random.normal(jax.random.key(1), (32, 8))
    q = quant.quantize(w, W8_SPEC)
    y = wrap(lambda x, q: quant.w8a8_dot(x, q, impl="int"))(x, q)
    xn = np.asarray(x, np.float32)
    sx = np.maximum(np.abs(xn).max(1, keepdims=True) / np.float32(127.5), np.finfo(np.float32).eps)
    cx = np.clip(np.round(xn * (np.float32(1) / sx)), -128, 127).astype(np.int64)
    cw = np.asarray(q.codes(), np.int64)
    ref = (cx @ cw).astype(np.float32) * (sx * np.asarray(q.scale, np.float32))
    np.testing.assert_allclose(y, ref, rtol=1e-6)
