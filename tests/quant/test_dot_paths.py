"""``qdot_general``'s weight-only paths: the rows form of ``impl="blocked"`` and ``impl="columns"``
against ``x @ dequantize(q)`` for every format, layout of scales and block split; gradients;
what ``impl="auto"`` picks; no float copy of the kernel; bad input (one row per case).

Block sizes are shrunk (``quant._dot.BLOCK_ELEMS``) so that tiny kernels span several blocks.
"""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxslim import quant
from jaxslim.quant import QuantSpec
from jaxslim.quant import _dot as dot
from jaxslim.quant._qarray import unpack_codes

JIT = [lambda f: f, jax.jit]
DN = (((1,), (0,)), ((), ()))
PATHS = ["blocked", "columns"]
# (spec, K multiple, N multiple): every scale layout the rows form reads, every packing width.
SPECS = [
    QuantSpec(8, axis=-1),  # per channel: one scale row, applied to the product at the end
    QuantSpec(8),  # per tensor
    QuantSpec(8, axis=0),  # one scale per kernel row (along the contraction)
    QuantSpec(8, axis=-1, symmetric=False),  # zero points per channel
    QuantSpec(4, axis=-1, group_size=32),  # groups of 32 rows, packed nibbles
    QuantSpec(4, axis=-1, group_size=64),
    QuantSpec(4, axis=-1, group_size=256),  # a group spans several blocks
    QuantSpec(4, axis=-1, group_size=32, signed=False, symmetric=False),  # unsigned, zero points
    QuantSpec(3, axis=-1, group_size=32),
    QuantSpec(2, axis=-1, group_size=16),  # four codes a byte
    QuantSpec(fmt="nf4", axis=-1, group_size=64),  # codebook, double-quantized scales
    QuantSpec(fmt="e4m3", axis=-1),
]


def _bound(x, w):
    """float32 rounding bound of a sum of products: a few ulps of ``|x| @ |w|``."""
    x64 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return 1e-5 * (np.abs(x64) @ np.abs(np.asarray(w, np.float64))) + 1e-6


def _check(y, x, q):
    w = np.asarray(quant.dequantize(q), np.float64)
    x64 = np.asarray(x, np.float64)
    want = (x64.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], -1)
    assert y.shape == want.shape and y.dtype == jnp.float32
    err = np.abs(np.asarray(y, np.float64) - want).reshape(-1, want.shape[-1])
    assert np.all(err <= _bound(x, w)), float(err.max())


@given(
    spec=st.sampled_from(SPECS),
    k=st.sampled_from([256, 512]),
    n=st.sampled_from([8, 24]),
    lead=st.sampled_from([(1,), (3,), (2, 5)]),
    impl=st.sampled_from(PATHS),
    jit=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_paths_equal_the_dequantize_reference(spec, k, n, lead, impl, jit, seed):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(k, n)).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(*lead, k)).astype(np.float32))
    q = quant.quantize(w, spec)
    dn = (((len(lead),), (0,)), ((), ()))
    assert dot.rows_path_applies(x, q, dn)
    f = lambda x, q: quant.qdot_general(x, q, dn, impl=impl)  # noqa: E731
    with mock.patch.object(dot, "BLOCK_ELEMS", 64 * n):  # 64-row blocks, n // 8+ column blocks
        y = (jax.jit(f) if jit else f)(x, q)
    _check(y, x, q)


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("impl", PATHS)
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[4], SPECS[7]], ids=str)
def test_gradient_is_the_dequantized_kernel(wrap, impl, spec):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(256, 16)).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(3, 256)).astype(np.float32))
    r = jnp.asarray(rng.normal(size=(3, 16)).astype(np.float32))
    q = quant.quantize(w, spec)
    loss = lambda x: jnp.sum(quant.qdot_general(x, q, DN, impl=impl) * r)  # noqa: E731
    with mock.patch.object(dot, "BLOCK_ELEMS", 64 * 16):
        g = wrap(jax.grad(loss))(x)
    want = np.asarray(r, np.float64) @ np.asarray(quant.dequantize(q), np.float64).T
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [SPECS[4], SPECS[7], SPECS[8], SPECS[9], SPECS[10]], ids=str)
def test_planes_are_the_unpacked_codes(spec):
    w = jnp.asarray(np.random.default_rng(2).normal(size=(64, 32)).astype(np.float32))
    q = quant.quantize(w, spec)
    planes = dot._planes(q.values, spec)
    per = {4: 2, 3: 8, 2: 4}[spec.storage_bits]  # codes per packed word (3 bits: 3 bytes)
    assert len(planes) == per and all(p.shape == (64, 32 // per) for p in planes)
    assert q.values.shape[-1] == 32 * spec.storage_bits // 8  # exactly storage_bits a code
    got = jnp.stack(planes, -1).reshape(64, 32)
    want = unpack_codes(q.values, spec, (64, 32))
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_one_block_kernel_gives_dequantize_bits():
    # A kernel that fits one block is decoded and scaled exactly as ``dequantize`` does.
    rng = np.random.default_rng(3)
    q = quant.quantize(jnp.asarray(rng.normal(size=(64, 32)).astype(np.float32)), SPECS[0])
    x = jnp.asarray(rng.normal(size=(4, 64)).astype(np.float32))
    want = np.asarray(x @ quant.dequantize(q))
    for impl in PATHS:
        np.testing.assert_array_equal(np.asarray(quant.qdot_general(x, q, DN, impl=impl)), want)


def test_auto_takes_rows_then_columns():
    rng = np.random.default_rng(4)
    q = quant.quantize(jnp.asarray(rng.normal(size=(256, 16)).astype(np.float32)), SPECS[4])
    assert jax.default_backend() == "cpu"
    with mock.patch.object(dot, "BLOCK_ELEMS", 64 * 16):
        for m, path in [(1, "blocked"), (dot.COLUMNS_MIN_ROWS["cpu"], "columns")]:
            x = jnp.asarray(rng.normal(size=(m, 256)).astype(np.float32))
            y_auto = jax.jit(lambda x: quant.qdot_general(x, q, DN))(x)
            y_path = jax.jit(lambda x, p=path: quant.qdot_general(x, q, DN, impl=p))(x)
            np.testing.assert_array_equal(np.asarray(y_auto), np.asarray(y_path))
            _check(y_auto, x, q)


def test_bfloat16_and_vmap():
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.normal(size=(256, 16)), jnp.bfloat16)
    q = quant.quantize(w, SPECS[4])
    x = jnp.asarray(rng.normal(size=(4, 2, 256)), jnp.bfloat16)
    with mock.patch.object(dot, "BLOCK_ELEMS", 64 * 16):
        for impl in PATHS:
            f = jax.vmap(lambda x, impl=impl: quant.qdot_general(x, q, DN, impl=impl))
            y = f(x)
            assert y.dtype == jnp.bfloat16 and y.shape == (4, 2, 16)
            want = np.asarray(x, np.float32) @ np.asarray(quant.dequantize(q), np.float32)
            np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("impl", PATHS)
def test_no_float_copy_of_the_kernel(impl):
    k = n = 512
    q = quant.quantize(jnp.ones((k, n)), QuantSpec(4, axis=-1, group_size=128))
    x = jnp.ones((2, k))
    with mock.patch.object(dot, "BLOCK_ELEMS", 2**15):
        c = jax.jit(lambda x: quant.qdot_general(x, q, DN, impl=impl)).lower(x).compile()
    assert c.memory_analysis().temp_size_in_bytes < k * n * 4 // 2


_Q3 = quant.quantize(jnp.ones((3, 8, 4)), QuantSpec(8))
_QG = quant.quantize(jnp.ones((8, 4)), QuantSpec(4, axis=0, group_size=2, group_axis=-1))
BAD = [
    pytest.param(
        lambda: quant.qdot_general(jnp.ones((2, 8)), _Q3, (((1,), (1,)), ((), ())), impl="columns"),
        ValueError,
        r"quant\.qdot_general: impl='columns' .* QArray\(3, 8, 4\)",
        id="columns-3d-kernel",
    ),
    pytest.param(
        lambda: quant.qdot_general(jnp.ones((2, 8)), _QG, DN, impl="columns"),
        ValueError,
        r"quant\.qdot_general: impl='columns' .*group_size=2",
        id="columns-groups-along-n",
    ),
    pytest.param(
        lambda: quant.qdot_general(jnp.ones((2, 8)), _Q3[...], DN, impl="fast"),
        ValueError,
        r"quant\.qdot_general: impl must be .*'columns'.* got 'fast'",
        id="impl-unknown",
    ),
    pytest.param(
        lambda: quant.qdot_general(
            jnp.ones((3, 2, 8)), _Q3, (((2,), (1,)), ((0,), (0,))), impl="blocked"
        ),
        ValueError,
        r"quant\.qdot_general: impl='blocked' needs",
        id="blocked-batch-dims",
    ),
]


@pytest.mark.parametrize("call, exc, match", BAD)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
