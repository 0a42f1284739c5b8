"""Hadamard matrices and the fast transform: exact matrices, orthogonality, jit, bad sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jaxslim import quant

JIT = [lambda f: f, jax.jit]
SIZES = [1, 2, 4, 64, 12, 20, 28, 36, 40, 24, 80, 112, 576, 1536]


@pytest.mark.parametrize("m", [12, 20, 28, 36, 40])
def test_order_m_matrices_are_hadamard_exactly(m):
    h = quant.hadamard_matrix(m, normalize=False)
    assert h.shape == (m, m) and set(np.unique(h)) == {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, m * np.eye(m))


@pytest.mark.parametrize("k", range(8))
def test_powers_of_two_are_sylvester(k):
    n = 2**k
    np.testing.assert_array_equal(
        quant.hadamard_matrix(n, normalize=False), scipy.linalg.hadamard(n)
    )
    np.testing.assert_allclose(quant.hadamard_matrix(n), scipy.linalg.hadamard(n) / np.sqrt(n))


@pytest.mark.parametrize("n", [576, 1536, 24 * 8, 28 * 4])
def test_composite_sizes_are_kronecker_products(n):
    h = quant.hadamard_matrix(n, normalize=False)
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))
    m = next(m for m in (12, 20, 28, 36) if n % m == 0 and (n // m) & (n // m - 1) == 0)
    want = np.kron(scipy.linalg.hadamard(n // m), quant.hadamard_matrix(m, normalize=False))
    np.testing.assert_array_equal(h, want)


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("n", SIZES)
def test_fast_transform_equals_the_explicit_matrix(wrap, n):
    x = np.random.default_rng(n).normal(size=(3, 2, n)).astype(np.float32)
    h = quant.hadamard_matrix(n)
    y = wrap(lambda x: quant.hadamard(x))(x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(y, x.astype(np.float64) @ h, atol=1e-5)
    yt = wrap(lambda x: quant.hadamard(x, transpose=True))(x)
    np.testing.assert_allclose(yt, x.astype(np.float64) @ h.T, atol=1e-5)
    np.testing.assert_allclose(quant.hadamard(y, transpose=True), x, atol=1e-5)  # H H^T = I


@pytest.mark.parametrize("n", SIZES)
def test_orthonormal_to_1e6(n):
    h = quant.hadamard_matrix(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    y = np.asarray(quant.hadamard(jnp.eye(n, dtype=jnp.float32)), np.float64)  # float32 rows
    np.testing.assert_allclose(y @ y.T, np.eye(n), atol=1e-6)


@pytest.mark.parametrize("wrap", JIT)
def test_transform_along_another_axis(wrap):
    x = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    y = wrap(lambda x: quant.hadamard(x, axis=0))(x)
    np.testing.assert_allclose(y, (x.T.astype(np.float64) @ quant.hadamard_matrix(12)).T, atol=1e-5)


def test_bfloat16_keeps_its_dtype():
    x = jnp.ones((2, 64), jnp.bfloat16)
    y = quant.hadamard(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y[0], np.float32), [8.0] + [0.0] * 63)


@pytest.mark.parametrize("n", [12, 64, 576])
def test_random_hadamard_is_orthogonal_signs_times_h(n):
    q = quant.random_hadamard(n, 3)
    assert q.shape == (n, n) and q.dtype == jnp.float32
    q64 = np.asarray(q, np.float64)  # the float32 entries, multiplied exactly
    np.testing.assert_allclose(q64 @ q64.T, np.eye(n), atol=1e-6)
    np.testing.assert_allclose(q64.T @ q64, np.eye(n), atol=1e-6)
    h = quant.hadamard_matrix(n)
    s = q64[:, 0] / h[:, 0]
    np.testing.assert_array_equal(np.abs(s).round(5), np.ones(n))
    np.testing.assert_allclose(q, s[:, None] * h, atol=1e-7)
    x = np.random.default_rng(1).normal(size=(4, n)).astype(np.float32)
    np.testing.assert_allclose(quant.hadamard(x * s[None].astype(np.float32)), x @ q, atol=1e-5)
    # the seed decides the signs, and the same seed gives the same matrix
    np.testing.assert_array_equal(quant.random_hadamard(n, 3), q)
    assert not np.array_equal(quant.random_hadamard(n, 4), q)


@pytest.mark.parametrize("n", [3, 6, 10, 44, 576 * 3, 100])
def test_unsupported_size_is_a_clear_error(n):
    with pytest.raises(ValueError, match=rf"n={n}.*2\^k and 2\^k \* m with m in \(12, 20"):
        quant.hadamard(jnp.ones((2, n)))
    with pytest.raises(ValueError, match=rf"n={n}"):
        quant.hadamard_matrix(n)
    with pytest.raises(ValueError, match=rf"n={n}"):
        quant.random_hadamard(n, 0)


def test_bad_arguments():
    with pytest.raises(TypeError, match="float array"):
        quant.hadamard(jnp.ones(4, jnp.int32))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        quant.hadamard(jnp.ones((2, 4)), axis=2)
    with pytest.raises(ValueError, match="positive int, got 0"):
        quant.hadamard_matrix(0)
    with pytest.raises(TypeError, match="seed must be an int"):
        quant.random_hadamard(4, 0.5)


def test_integer_scalar_axis_and_shape_are_accepted():
    x = jnp.arange(8.0).reshape(2, 4)
    np.testing.assert_array_equal(
        quant.hadamard(x, axis=np.int64(0)), quant.hadamard(x, axis=jnp.int32(0))
    )
    np.testing.assert_array_equal(quant.hadamard(x, axis=np.int64(-1)), quant.hadamard(x))
    codes = jnp.array([1, -1, 7], jnp.int8)
    packed = quant.pack(codes, 4)
    shape = (jnp.int32(3),)
    np.testing.assert_array_equal(quant.unpack(packed, 4, shape, signed=True), codes)
