"""AWQ: the scale search against a numpy brute force, the absorber search, and the float rewrite
that preserves the function (norm scale, previous linear, Equinox layout, no absorber)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import calibrate, quant
from jaxslim.quant import QuantSpec, _awq
from jaxslim.quant._awq import as_matrix, awq_loss, from_matrix

JIT = [lambda f: f, jax.jit]


def _rtn_sym(w, bits, group):
    """Symmetric signed RTN of a (K, N) matrix, groups of ``group`` rows per column (numpy)."""
    k, n = w.shape
    v = w.reshape(k // group, group, n).astype(np.float32)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    amax = np.maximum(-v.min(1, keepdims=True), v.max(1, keepdims=True)).clip(0)
    s = np.maximum(amax / np.float32((qmax - qmin) / 2), np.finfo(np.float32).eps)
    return (np.clip(np.round(v * (np.float32(1) / s)), qmin, qmax) * s).reshape(k, n)


def awq_reference(ws, x, bits, group, n_grid=20):
    """Brute-force AWQ (Lin et al. 2024): for alpha = i / n_grid, s = a^alpha normalised by
    sqrt(max min), the output error sum ||X W - X diag(1/s) Q(diag(s) W)||^2; a = rms of X."""
    x = np.asarray(x, np.float64)
    a = np.sqrt(np.mean(x**2, 0)).astype(np.float32)
    losses = []
    for i in range(n_grid):
        s = a ** np.float32(i / n_grid)
        s = s / np.sqrt(s.max() * s.min())
        loss = 0.0
        for w in ws:
            w = np.asarray(w, np.float32)
            d = w - _rtn_sym(w * s[:, None], bits, group) / s[:, None]
            loss += np.sum((x @ d) ** 2)
        losses.append(loss)
    return np.array(losses), int(np.argmin(losses)) / n_grid


def _outlier_inputs(rows=512, k=64, seed=0):
    rng = np.random.default_rng(seed)
    mag = np.exp(rng.normal(0, 1.5, k))  # a few channels 10-100x larger: AWQ's setting
    return jnp.asarray(rng.normal(size=(rows, k)) * mag, jnp.float32)


@pytest.mark.parametrize("wrap", JIT)
def test_awq_scales_match_brute_force(wrap):
    x = _outlier_inputs()
    rng = np.random.default_rng(1)
    ws = [jnp.asarray(rng.normal(size=(64, n)), jnp.float32) for n in (16, 8)]
    spec = QuantSpec(4, axis=-1, group_size=32)
    act = jnp.sqrt(jnp.mean(x**2, 0))
    s, alpha = wrap(lambda ws, h, a: quant.awq_scales(ws, h, a, spec))(ws, x.T @ x, act)
    losses, ref_alpha = awq_reference(ws, x, 4, 32)
    assert float(alpha) == pytest.approx(ref_alpha)
    ref_s = np.asarray(act) ** ref_alpha
    np.testing.assert_allclose(s, ref_s / np.sqrt(ref_s.max() * ref_s.min()), rtol=1e-5)
    # the chosen scales beat RTN (alpha = 0) on the output error
    h = x.T @ x
    assert float(awq_loss(ws, h, s, spec)) < float(awq_loss(ws, h, jnp.ones(64), spec))
    assert losses.min() < losses[0]


def _mlp(layout="flax", seed=0):
    """norm -> (a, b) -> a * b -> c: 'c' is absorbed by 'b' (previous linear), 'a'/'b' by norm."""
    k = jax.random.split(jax.random.key(seed), 4)
    p = {
        "norm": jnp.exp(jax.random.normal(k[0], (32,))),
        "a": jax.random.normal(k[1], (32, 64)) / 6,
        "b": jax.random.normal(k[2], (32, 64)) / 6,
        "c": jax.random.normal(k[3], (64, 32)) / 8,
    }
    if layout == "equinox":  # (out, in) weights
        p = {n: (v.T if v.ndim == 2 else v) for n, v in p.items()}

        def fn(p, x):
            h = x * p["norm"][None]
            return (jax.nn.relu(h @ p["a"].T) * (h @ p["b"].T)) @ p["c"].T

    else:

        def fn(p, x):
            h = x * p["norm"][None]
            return (jax.nn.relu(h @ p["a"]) * (h @ p["b"])) @ p["c"]

    return fn, p


@pytest.mark.parametrize("layout", ["flax", "equinox"])
def test_awq_oneshot_folds_and_preserves_float_function(layout):
    fn, p = _mlp(layout)
    xs = [_outlier_inputs(128, 32, seed=i) for i in range(2)]
    spec = QuantSpec(4, axis=-1, group_size=16)
    q, rep = quant.oneshot(fn, p, xs, spec, method="awq", sequential=False)
    assert rep.absorbers == {"a": "norm", "b": "norm", "c": "b"}
    # The float rewrite (absorbers rescaled, kernels before rounding) computes the same function.
    stats = calibrate.statistics(fn, p, xs)
    groups = quant.find_absorbers(fn, p, xs[0], stats, ["a", "b", "c"])
    p2 = p
    for g in groups:
        s = jnp.exp(jax.random.normal(jax.random.key(3), (g.k,)))
        p2 = quant.apply_scales(p2, g, s)
    for x in xs:
        y, y2 = fn(p, x), fn(p2, x)
        assert float(jnp.max(jnp.abs(y - y2))) <= 1e-5 * float(jnp.max(jnp.abs(y)))
    assert not np.allclose(p2["norm"], p["norm"])
    # norm in qparams is the rescaled float vector; the quantized model beats plain RTN
    qr, rep_r = quant.oneshot(fn, p, xs, spec, method="rtn", sequential=False)
    err = lambda qp: sum(
        float(jnp.sum((fn(quant.dequantize_params(qp), x) - fn(p, x)) ** 2)) for x in xs
    )
    assert err(q) < err(qr)
    assert sum(r.error for r in rep.rows) < sum(r.error for r in rep_r.rows)


def test_awq_without_absorber_keeps_scale_one():
    w = jax.random.normal(jax.random.key(0), (32, 8))
    fn = lambda p, x: x @ p["w"]  # nothing before the kernel can absorb 1/s
    xs = [_outlier_inputs(64, 32)]
    spec = QuantSpec(4, axis=-1, group_size=16)
    q, rep = quant.oneshot(fn, {"w": w}, xs, spec, method="awq")
    assert rep.absorbers == {"w": None} and rep.rows[0].method == "awq (no absorber)"
    np.testing.assert_array_equal(q["w"].dequantize(), quant.quantize(w, spec).dequantize())


def test_as_matrix_round_trip_einsum_layout():
    w = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)  # (heads, hd, d), contracted 0,1
    m = as_matrix(w, (0, 1), (2,))
    assert m.shape == (6, 4)
    np.testing.assert_array_equal(from_matrix(m, w.shape, (0, 1), (2,)), w)
    np.testing.assert_array_equal(
        as_matrix(w, (1,), (0, 2)), jnp.transpose(w, (1, 0, 2)).reshape(3, 8)
    )


def test_awq_clip_never_worse_than_no_clip_per_group():
    x = _outlier_inputs(256, 32)
    w = jnp.asarray(np.random.default_rng(4).standard_t(3, size=(32, 8)), jnp.float32)
    h = x.T @ x
    spec = QuantSpec(4, axis=-1, group_size=16)
    d_clip = w - _awq.awq_clip(w, h, spec).dequantize()
    d_rtn = w - quant.quantize(w, spec).dequantize()

    def per_group(d):  # d_g^T H_gg d_g for each group of 16 rows and column
        return jnp.stack(
            [jnp.sum(d[i:i+16] * (h[i:i+16, i:i+16] @ d[i:i+16]), axis=0) for i in (0, 16)]
        )  # fmt: skip

    assert bool(jnp.all(per_group(d_clip) <= per_group(d_rtn) * (1 + 1e-5)))
    assert float(jnp.sum(per_group(d_clip))) < float(jnp.sum(per_group(d_rtn)))
