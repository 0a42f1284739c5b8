"""HQQ against a numpy statement of the half-quadratic iterations, and its error vs RTN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import quant
from jaxslim.quant import QuantSpec, dequantize

JIT = [lambda f: f, jax.jit]


def hqq_reference(w, bits, group, iters=20, p=0.7, beta=10.0, kappa=1.01, affine=True):
    """The HQQ updates on a Flax kernel (in, out), groups of ``group`` rows per column, in numpy
    float32, integer zero points (module docstring of quant.hqq)."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    v = w.reshape(k // group, group, n)
    if affine:
        qmin, qmax = 0.0, 2.0**bits - 1
        lo = np.minimum(v.min(1, keepdims=True), 0)
        hi = np.maximum(v.max(1, keepdims=True), 0)
        s = np.maximum((hi - lo) / np.float32(qmax - qmin), np.finfo(np.float32).eps)
        z = np.clip(qmin - np.round(lo / s), qmin, qmax).astype(np.float32)
    else:
        qmin, qmax = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
        amax = np.maximum(-v.min(1, keepdims=True), v.max(1, keepdims=True)).clip(0)
        s = np.maximum(amax / np.float32((qmax - qmin) / 2), np.finfo(np.float32).eps)
        z = np.zeros_like(s)

    def codes(s, z):
        return np.clip(np.round(v * (np.float32(1) / s)) + z, qmin, qmax)

    def err(s, z):
        return np.sum((v - (codes(s, z) - z) * s) ** 2, axis=1, keepdims=True)

    best = (s.copy(), z.copy(), err(s, z))
    for t in range(iters):
        b = np.float32(beta) * np.float32(kappa) ** np.float32(t)
        q = codes(s, z)
        x = v - (q - z) * s
        ax = np.abs(x)
        with np.errstate(divide="ignore"):
            thr = np.where(ax > 0, ax ** np.float32(p - 1), 0) / b
        target = v - np.sign(x) * np.maximum(ax - thr, 0)
        if affine:
            z = np.clip(np.round(np.mean(q - target * (np.float32(1) / s), 1, keepdims=True)),
                        qmin, qmax)  # fmt: skip
        d = q - z
        num, den = np.sum(d * target, 1, keepdims=True), np.sum(d * d, 1, keepdims=True)
        s_new = num / np.where(den > 0, den, 1)
        s = np.where((den > 0) & (s_new > np.finfo(np.float32).eps), s_new, s)
        e = err(s, z)
        better = e < best[2]
        best = (np.where(better, s, best[0]), np.where(better, z, best[1]), np.minimum(e, best[2]))
    s, z = best[0], best[1]
    return ((codes(s, z) - z) * s).reshape(k, n)


def _heavy(k=256, n=16, seed=0):
    return jax.random.t(jax.random.key(seed), 2.5, (k, n)) * 0.02


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("affine", [True, False])
def test_hqq_matches_numpy_reference(wrap, affine):
    w = _heavy(128, 8)
    spec = QuantSpec(4, signed=not affine, symmetric=not affine, axis=-1, group_size=32)
    q = wrap(lambda w: quant.hqq(w, spec))(w)
    ref = hqq_reference(w, 4, 32, affine=affine)
    got = np.asarray(dequantize(q))
    assert np.mean(np.isclose(got, ref, rtol=1e-5, atol=1e-7)) > 0.995
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-3 * float(jnp.max(jnp.abs(w))))


@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("affine", [True, False])
def test_hqq_lowers_error_vs_rtn_on_heavy_tails(group, affine):
    w = _heavy(512, 32, seed=group)
    spec = QuantSpec(4, signed=not affine, symmetric=not affine, axis=-1, group_size=group)
    dq, dr = dequantize(quant.hqq(w, spec)), dequantize(quant.quantize(w, spec))
    per_group = lambda d: jnp.sum(((w - d) ** 2).reshape(512 // group, group, 32), axis=1)
    assert bool(jnp.all(per_group(dq) <= per_group(dr)))  # never worse on any group
    assert float(jnp.sum((w - dq) ** 2)) < 0.97 * float(jnp.sum((w - dr) ** 2))


def test_hqq_equinox_layout_groups_along_input():
    w = _heavy(64, 128).T  # (out, in) = (128, 64)
    spec = QuantSpec(4, signed=False, symmetric=False, axis=0, group_size=32, group_axis=1)
    q = quant.hqq(w, spec)
    assert q.scale.shape == (128, 2, 1)  # (out, in // 32, 1)
    ref = hqq_reference(w.T, 4, 32)
    np.testing.assert_allclose(np.asarray(dequantize(q)).T, ref, rtol=1e-4, atol=1e-4)
