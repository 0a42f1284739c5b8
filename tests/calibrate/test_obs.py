"""The OBS floor (jaxslim._obs): damped Hessian, inverse-Hessian Cholesky, lazy block updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxslim import _obs

JIT = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]


def _hessian(k, rows, seed, dead=()):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, k)) @ (np.eye(k) + 0.3 * rng.normal(size=(k, k)))
    x[:, list(dead)] = 0
    return (x.T @ x).astype(np.float32)


def test_damped_hessian_matches_reference_dead_inputs():
    h = _hessian(6, 40, 0, dead=(1, 4))
    hd, dead = _obs.damped_hessian(jnp.asarray(h), 0.05)
    want = h.astype(np.float64)
    want[[1, 4], [1, 4]] = 1.0  # the reference: dead diagonal set to 1 before the mean
    want += 0.05 * np.mean(np.diag(want)) * np.eye(6)
    np.testing.assert_allclose(hd, want, rtol=1e-6)
    assert dead.tolist() == [False, True, False, False, True, False]


_JIT_INVERSE_CHOLESKY = jax.jit(_obs.inverse_cholesky)


@given(
    k=st.sampled_from([1, 2, 7, 24]),
    seed=st.integers(0, 1000),
    damp=st.sampled_from([0.0, 0.01, 0.1]),
)
def test_inverse_cholesky_is_upper_factor_of_inverse(k, seed, damp):
    h = _hessian(k, 3 * k + 4, seed)
    hd, _ = _obs.damped_hessian(h, damp)
    for f in (_obs.inverse_cholesky, _JIT_INVERSE_CHOLESKY):
        u = np.asarray(f(hd), np.float64)
        assert np.all(np.tril(u, -1) == 0) and np.all(np.diag(u) > 0)
        want = np.linalg.cholesky(np.linalg.inv(np.asarray(hd, np.float64))).T
        np.testing.assert_allclose(u, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_inverse_cholesky_under_jit_is_all_nan_when_not_positive_definite():
    h = -np.eye(4, dtype=np.float32)
    u = jax.jit(_obs.inverse_cholesky)(h)
    assert bool(jnp.all(jnp.isnan(u)))
    hn = np.eye(4, dtype=np.float32)
    hn[2, 3] = np.inf
    u, dead = jax.jit(lambda h: _obs.obs_factor(h, 0.01))(hn)
    assert bool(jnp.all(jnp.isnan(u))) and not bool(jnp.any(dead))


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("b", [1, 3, 4, 12])
def test_factor_rows_are_the_rows_of_the_inverse_cholesky(wrap, b):
    """The sweep's rows of U, computed from M a block at a time, are those of the whole U (and
    of NumPy's float64 factor of the inverse); exact zeros left of the diagonal."""
    h = _hessian(12, 50, 5)
    hd, _ = _obs.damped_hessian(h, 0.01)
    m = _obs.reversed_cholesky(hd)
    want = np.linalg.cholesky(np.linalg.inv(np.asarray(hd, np.float64))).T
    rows = wrap(lambda m, i: _obs.factor_rows(m, i, b))
    got = np.concatenate([np.asarray(rows(m, i)) for i in range(0, 12, b)])
    assert np.all(np.tril(got, -1) == 0)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    np.testing.assert_allclose(got, _obs.inverse_cholesky(hd), rtol=1e-5, atol=1e-6)
    # M is the lower Cholesky factor of the reversed matrix
    np.testing.assert_allclose(np.asarray(m) @ np.asarray(m).T, np.asarray(hd)[::-1, ::-1],
                               rtol=1e-4, atol=1e-3)  # fmt: skip


def test_obs_cholesky_reports_failure_under_jit():
    m, dead, ok = jax.jit(lambda h: _obs.obs_cholesky(h, 0.0))(-np.eye(4, dtype=np.float32))
    assert not bool(ok) and not bool(jnp.any(dead))
    hn = np.eye(4, dtype=np.float32)
    hn[2, 3] = np.inf
    assert not bool(jax.jit(lambda h: _obs.obs_cholesky(h, 0.01))(hn)[2])
    assert bool(jax.jit(lambda h: _obs.obs_cholesky(h, 0.01))(np.eye(4, dtype=np.float32))[2])


def _obs_rounding_reference(w, h, damp):
    """Row-by-row OBS with ``q = round(w)`` (GPTQ with an integer grid), no blocks, float64."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    for i in range(len(w)):
        q = np.round(w[i])
        e = (w[i] - q) / u[i, i]
        w[i:] -= np.outer(u[i, i:], e)
        w[i] = q
    return w


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("block", [1, 4, 8, 24])
def test_obs_sweep_lazy_blocks_equal_row_by_row(wrap, block):
    k, n = 24, 5
    h = _hessian(k, 80, 3)
    w = np.random.default_rng(4).normal(size=(k, n)).astype(np.float32) * 3
    m, _, ok = _obs.obs_cholesky(h, 0.01)
    assert bool(ok)

    def process(i1, wb, ub, carry):
        def row(j, c):
            wb, qb, eb = c
            q = jnp.round(wb[j])
            wb, e = _obs.obs_row_update(wb, ub, j, q)
            return wb, qb.at[j].set(q), eb.at[j].set(e)

        z = jnp.zeros_like(wb)
        _, qb, eb = jax.lax.fori_loop(0, wb.shape[0], row, (wb, z, z))
        return qb, eb, carry + 1

    got, blocks = wrap(lambda w, m: _obs.obs_sweep(w, m, block, process, jnp.int32(0)))(w, m)
    assert int(blocks) == k // block
    want = _obs_rounding_reference(w, h, 0.01)
    assert np.mean(np.asarray(got) == want) >= 0.98  # float32 vs float64: a rare .5 flip


def _nan_hessian():
    h = np.eye(4, dtype=np.float32)
    h[1, 2] = np.nan
    return h


BAD = [
    pytest.param(
        lambda: _obs.damped_hessian(_nan_hessian(), 0.01, path="l/kernel", fn="prune.sparsegpt"),
        ValueError,
        r"prune\.sparsegpt: hessian of 'l/kernel' has 1 non-finite.*\[1, 2\] = nan",
        id="non-finite-hessian",
    ),
    pytest.param(
        lambda: _obs.damped_hessian(np.eye(3, dtype=np.float32), -0.1, path="l/kernel"),
        ValueError,
        r"obs\.damped_hessian: damp must be a finite number >= 0, got -0\.1 for 'l/kernel'",
        id="negative-damp",
    ),
    pytest.param(
        lambda: _obs.damped_hessian(np.eye(3, dtype=np.float32), np.inf, path="l/kernel"),
        ValueError,
        r"obs\.damped_hessian: damp must be a finite number >= 0, got inf for 'l/kernel'",
        id="infinite-damp",
    ),
    pytest.param(
        lambda: _obs.damped_hessian(np.ones((3, 4), np.float32), 0.01, path="l/kernel"),
        ValueError,
        r"obs\.damped_hessian: hessian of 'l/kernel' must be square \(K, K\), got \(3, 4\)",
        id="not-square",
    ),
    pytest.param(
        lambda: _obs.check_hessian(np.eye(3, dtype=np.float32), 4, path="l/kernel", fn="f"),
        ValueError,
        r"f: hessian of 'l/kernel' must have shape \(4, 4\).*got \(3, 3\)",
        id="shape-mismatch",
    ),
    pytest.param(
        lambda: _obs.check_hessian(np.eye(3, dtype=np.int32), 3, path="l/kernel", fn="f"),
        ValueError,
        r"f: hessian of 'l/kernel' must be floating point, got int32",
        id="int-hessian",
    ),
    pytest.param(
        lambda: _obs.inverse_cholesky(-np.eye(3, dtype=np.float32), path="l/kernel"),
        ValueError,
        r"obs\.inverse_cholesky: the damped hessian of 'l/kernel' is not positive definite",
        id="not-positive-definite",
    ),
    pytest.param(
        lambda: _obs.obs_cholesky(-np.eye(3, dtype=np.float32), 0.0, path="l/kernel", fn="f"),
        ValueError,
        r"f: the damped hessian of 'l/kernel' is not positive definite",
        id="obs-cholesky-not-positive-definite",
    ),
    pytest.param(
        lambda: _obs.reversed_cholesky(np.ones((2, 3), np.float32), path="l/kernel"),
        ValueError,
        r"obs\.reversed_cholesky: hessian of 'l/kernel' must be square \(K, K\), got \(2, 3\)",
        id="reversed-cholesky-not-square",
    ),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
