"""MX (OCP Microscaling v1.0) and NVFP4 block formats: mxfp8, mxfp4, nvfp4.

Checked bit for bit against a NumPy reference built from ``ml_dtypes`` casts (``float4_e2m1fn``,
``float8_e4m3fn``, ``float8_e8m0fnu``) and the OCP rules: the shared scale
``X = 2^(floor(log2 amax) - emax_elem)`` (emax 2 for E2M1, 8 for E4M3; exponent clipped to
``[-126, 127]``, see ``quant.formats``), elements ``round_half_even(v / X)`` saturated at 6 / 448;
NVFP4: ``s = amax / 6`` per 16 values, stored as E4M3 of ``s / ts`` with ``ts = max(s) / 448``
(float32). Random data with zeros, subnormals, huge values, exact ties; packing; bytes;
NaN/inf; RTN, fake-quant, ``qdot_general`` / ``quantized``, GPTQ.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxslim import quant
from jaxslim.quant import QuantSpec, formats
from jaxslim.quant._spec import layout

F32 = np.float32
JIT = [lambda f: f, jax.jit]
DN = (((1,), (0,)), ((), ()))
ELEM = {"mxfp8": (ml_dtypes.float8_e4m3fn, 448.0, 8), "mxfp4": (ml_dtypes.float4_e2m1fn, 6.0, 2)}


def _data(shape, seed=0):
    """Normal values at wildly different magnitudes per block of 16 rows, with zero blocks,
    subnormal entries, huge values and exact E2M1 / E4M3 ties."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(F32)
    mag = 10.0 ** rng.uniform(-30, 30, size=(shape[0] // 16 + 1, shape[1]))
    x = x * np.repeat(mag, 16, axis=0)[: shape[0]].astype(F32)
    x[:32, 0] = 0.0  # an all-zero block
    x[32:64, 1] = F32(1e-40) * rng.integers(-3, 4, 32).astype(F32)  # subnormal only
    x[40, 2] = F32(1e-41)  # a subnormal next to normal values
    x[33, 3] = F32(3.0e38)  # near the float32 max
    x[34, 3] = F32(-3.3e38)
    # ties: amax 4 (X = 1 for E2M1), values exactly between two E2M1 values
    x[64:96, 4] = 0.0
    x[64:80, 4] = F32([4, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -2.5, -5, 0, 1, 2, 3])
    return x


def _blocks(x, g):
    """(K, N) -> (K/g, g, N)."""
    return x.reshape(x.shape[0] // g, g, x.shape[1])


def _mx_reference(x, fmt):
    """``(element codes, element values, scale bytes, dequantized)`` by ml_dtypes casts."""
    dtype, fmax, emax = ELEM[fmt]
    v = _blocks(_flushed(x), 32)
    amax = np.max(np.abs(v), axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(amax.astype(np.float64))), -1000)
    k = np.clip(e - emax, -126, 127)
    scale = (2.0**k).astype(F32)
    elems = np.clip(v / scale, -fmax, fmax).astype(F32).astype(dtype)  # v / X: exact (X = 2^k)
    codes = elems.view(np.uint8)
    deq = elems.astype(F32) * scale
    scale_bytes = scale.astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)
    return codes.reshape(x.shape), elems.reshape(x.shape), scale_bytes, deq.reshape(x.shape)


def _nvfp4_reference(x):
    v = _blocks(_flushed(x), 16)
    amax = np.max(np.abs(v), axis=1, keepdims=True)
    s = amax / F32(6)
    ts = np.maximum(np.max(s) / F32(448), np.finfo(F32).tiny).astype(F32)
    s_code = np.clip(s / ts, 0, 448).astype(ml_dtypes.float8_e4m3fn)
    sd = s_code.astype(F32) * ts
    with np.errstate(divide="ignore"):
        inv = np.where(sd == 0, F32(0), F32(1) / sd).astype(F32)
    elems = np.clip(v * inv, -6, 6).astype(ml_dtypes.float4_e2m1fn)
    deq = elems.astype(F32) * sd
    return elems.view(np.uint8).reshape(x.shape), s_code, ts, deq.reshape(x.shape)


def _flushed(a):
    """XLA flushes float32 subnormals to zero (CPU and GPU), inputs and results: the reference
    reads and writes them the same way (a subnormal becomes a zero of its sign)."""
    a = np.asarray(a, F32)
    return np.where(np.abs(a) < np.finfo(F32).tiny, np.copysign(F32(0), a), a)


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_mx_is_bit_exact_against_ml_dtypes(fmt, wrap):
    x = _data((128, 12))
    codes, elems, scale_bytes, deq = _mx_reference(x, fmt)
    q = wrap(lambda a: quant.quantize(a, QuantSpec(fmt=fmt)))(jnp.asarray(x))
    assert q.scale.dtype == jnp.uint8 and q.scale.shape == (4, 1, 12)
    np.testing.assert_array_equal(np.asarray(q.scale), scale_bytes)
    if fmt == "mxfp8":
        assert q.values.dtype == jnp.float8_e4m3fn
        np.testing.assert_array_equal(np.asarray(q.values).view(np.uint8), codes)
    else:
        np.testing.assert_array_equal(np.asarray(q.codes()), codes)
    got = np.asarray(q.dequantize())
    np.testing.assert_array_equal(got, _flushed(deq))
    # The ties: E2M1 rounds half to even (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
    # 3.5 -> 4, 5 -> 4).
    if fmt == "mxfp4":
        want = [4, 0, 1, 1, 2, 2, 4, 4, -0.0, -1, -2, -4, 0, 1, 2, 3]
        np.testing.assert_array_equal(got[64:80, 4], want)


@pytest.mark.parametrize("wrap", JIT)
def test_nvfp4_is_bit_exact_against_ml_dtypes(wrap):
    x = _data((128, 12), seed=1) * F32(1e-20)  # keep the per-tensor ratio E4M3 can store
    x[3, 5] = F32(2.0)  # and one block far below the tensor's max: its E4M3 scale is 0
    x[32:48, 5] = F32(1e-9)
    codes, s_code, ts, deq = _nvfp4_reference(x)
    q = wrap(lambda a: quant.quantize(a, QuantSpec(fmt="nvfp4")))(jnp.asarray(x))
    assert q.scale.dtype == jnp.float8_e4m3fn and q.scale.shape == (8, 1, 12)
    assert q.scale_scale.dtype == jnp.float32 and q.scale_scale.shape == (1,)
    np.testing.assert_array_equal(np.asarray(q.scale_scale), [ts])
    np.testing.assert_array_equal(np.asarray(q.scale).view(np.uint8), s_code.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), _flushed(deq))
    assert float(np.max(s_code.astype(F32))) == 448.0  # the largest block uses all of E4M3


def test_element_rounding_equals_the_ml_dtypes_cast_everywhere():
    # Every float32 bit pattern step through [-8, 8] and beyond: round_minifloat == ml_dtypes.
    y = np.concatenate(
        [np.linspace(-8, 8, 200001, dtype=F32), np.asarray(formats.E2M1_VALUES, F32) * 1.0001]
    )
    mids = np.asarray(formats.E2M1_VALUES[:8], F32)
    y = np.concatenate([y, (mids[1:] + mids[:-1]) / 2, -(mids[1:] + mids[:-1]) / 2])
    got = np.asarray(formats.round_minifloat(jnp.asarray(y), 1, 0, 6.0))
    want = np.clip(y, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(F32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    f = formats.FORMATS["mxfp4"]
    codes = np.asarray(f.encode(jnp.asarray(y), 0, -6.0, 6.0)[0]).astype(np.uint8)
    np.testing.assert_array_equal(
        codes, np.clip(y, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    )
    np.testing.assert_array_equal(np.asarray(f.decode(jnp.asarray(codes), 0)), want)


def test_e8m0_codec_is_ml_dtypes_float8_e8m0fnu():
    k = np.arange(-127, 128)
    s = (2.0**k).astype(F32)
    codes = np.asarray(formats.E8M0.encode(jnp.asarray(s), None))
    np.testing.assert_array_equal(codes, s.astype(ml_dtypes.float8_e8m0fnu).view(np.uint8))
    dec = np.asarray(formats.E8M0.decode(jnp.asarray(np.arange(256, dtype=np.uint8)), None))
    want = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(F32)
    np.testing.assert_array_equal(dec, want)  # 255 is NaN in both: assert_array_equal allows
    # A given scale that is not a power of two rounds up (never clips more than asked).
    assert np.asarray(formats.E8M0.encode(jnp.asarray([0.3, 1.5], F32), None)).tolist() == [
        126,
        128,
    ]


def test_packing_two_e2m1_codes_a_byte_low_nibble_first():
    x = _data((128, 6), seed=2)[:64]
    for fmt in ("mxfp4", "nvfp4"):
        q = quant.quantize(jnp.asarray(x), QuantSpec(fmt=fmt))
        codes = np.asarray(q.codes())
        assert q.values.shape == (64, 3) and q.values.dtype == jnp.uint8
        np.testing.assert_array_equal(np.asarray(q.values), codes[:, 0::2] | (codes[:, 1::2] << 4))
        np.testing.assert_array_equal(quant.unpack(q.values, 4, (64, 6), signed=False), codes)


@pytest.mark.parametrize(
    "fmt, want",
    [
        ("mxfp8", 4096 * 4096 + 4096 * 4096 // 32),  # 8.25 bits a value
        ("mxfp4", 4096 * 4096 // 2 + 4096 * 4096 // 32),  # 4.25
        ("nvfp4", 4096 * 4096 // 2 + 4096 * 4096 // 16 + 4),  # 4.5, + the per-tensor float32
    ],
)
def test_bytes_of_a_4096_square_kernel(fmt, want):
    q = jax.eval_shape(
        lambda w: quant.quantize(w, QuantSpec(fmt=fmt)),
        jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16),
    )
    assert q.nbytes == want


def test_spec_defaults_and_layout():
    assert QuantSpec(fmt="mxfp8").group_size == 32 and QuantSpec(fmt="mxfp4").bits == 4
    assert QuantSpec(fmt="nvfp4", axis=-1).group_size == 16
    assert QuantSpec(fmt="mxfp4", group_size=64).group_size == 64
    lay = layout(QuantSpec(fmt="mxfp4"), (3, 3, 64, 8))  # a conv kernel: per block of 32 inputs
    assert lay.scale_shape == (3, 3, 2, 1, 8)
    assert layout(QuantSpec(fmt="mxfp4", axis=-1), (64, 8)).scale_shape == (2, 1, 8)
    with pytest.raises(ValueError, match="symmetric=True"):
        QuantSpec(fmt="mxfp4", symmetric=False)
    with pytest.raises(ValueError, match="bits=4"):
        QuantSpec(8, fmt="nvfp4")


def test_padded_last_block_uses_its_real_entries():
    x = _data((128, 6), seed=3)[:48, :4]  # 48 = 32 + 16: the last block is 16 long
    q = quant.quantize(jnp.asarray(x), QuantSpec(fmt="mxfp4"))
    assert q.scale.shape == (2, 1, 4) and q.values.shape == (48, 2)
    alone = quant.quantize(jnp.asarray(x[32:]), QuantSpec(fmt="mxfp4"))
    np.testing.assert_array_equal(np.asarray(q.scale)[1:], np.asarray(alone.scale))
    np.testing.assert_array_equal(np.asarray(q.dequantize())[32:], np.asarray(alone.dequantize()))


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
def test_round_trip_is_a_fixed_point_and_fake_quant_agrees(fmt):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(96, 8)).astype(F32))
    spec = QuantSpec(fmt=fmt)
    q = quant.quantize(x, spec)
    y = q.dequantize()
    q2 = quant.quantize(y, spec)
    np.testing.assert_array_equal(np.asarray(q2.dequantize()), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(quant.fake_quant(x, spec)), np.asarray(y))
    # Quantizing on q's own (decoded) scales gives q back.
    q3 = quant.quantize(x, spec, scale=q.float_scale())
    np.testing.assert_array_equal(np.asarray(q3.values), np.asarray(q.values))
    np.testing.assert_array_equal(np.asarray(q3.dequantize()), np.asarray(y))
    g = jax.grad(lambda a: quant.fake_quant(a, spec).sum())(x)
    # Straight-through inside the grid; the OCP scale lets the top of a block saturate (an E4M3
    # block's values in [448, 512) X, E2M1's in [6, 8) X): no gradient there.
    top = spec.qmax * np.asarray(layout(spec, x.shape).expand(q.float_scale()))
    np.testing.assert_array_equal(np.asarray(g), (np.abs(np.asarray(x)) <= top).astype(F32))
    yb = quant.quantize(x.astype(jnp.bfloat16), spec).dequantize()
    assert yb.dtype == jnp.bfloat16


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
def test_non_finite_input_raises_naming_the_leaf(fmt):
    x = np.ones((32, 4), F32)
    for bad in (np.nan, np.inf):
        x[5, 1] = bad
        with pytest.raises(ValueError, match=r"'Dense_0/kernel' has 1 non-finite"):
            quant.quantize(jnp.asarray(x), QuantSpec(fmt=fmt), path="Dense_0/kernel")
        with pytest.raises(ValueError, match=r"Dense_0/kernel"):
            quant.quantize_params({"Dense_0": {"kernel": jnp.asarray(x)}}, QuantSpec(fmt=fmt))
    # Under jit nothing raises: the scale ignores the non-finite entry, inf saturates.
    x[5, 1] = np.inf
    x[6, 1] = np.nan
    y = np.asarray(jax.jit(lambda a: quant.quantize(a, QuantSpec(fmt=fmt)))(x).dequantize())
    finite = np.delete(y.ravel(), 6 * 4 + 1)
    assert np.isfinite(finite).all() and y[5, 1] == finite.max() >= 1.0  # the top of the grid


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
def test_qdot_general_and_quantized_run_on_the_dequantized_kernel(fmt):
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.normal(size=(80, 16)).astype(F32))  # 80 = 2 x 32 + 16: a short block
    x = jnp.asarray(rng.normal(size=(4, 80)).astype(F32))
    q = quant.quantize(w, QuantSpec(fmt=fmt))
    want = np.asarray(x @ q.dequantize())
    for impl in ("dequantize", "auto"):
        got = quant.qdot_general(x, q, DN, impl=impl)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=2e-5)
    g = quant.quantized(lambda p, a: a @ p["w"])
    np.testing.assert_allclose(np.asarray(jax.jit(g)({"w": q}, x)), want, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
def test_gptq_on_the_block_formats(fmt):
    rng = np.random.default_rng(6)
    mix = rng.normal(size=(64, 64)) + 3 * np.eye(64)  # correlated inputs: GPTQ has work to do
    x = jnp.asarray((rng.normal(size=(512, 64)) @ mix).astype(F32))
    w = jnp.asarray(rng.normal(size=(64, 16)).astype(F32))
    spec = QuantSpec(fmt=fmt)
    rtn = quant.quantize(w, spec)
    # An identity Hessian feeds no error forward: GPTQ is round to nearest.
    same = quant.gptq(w, jnp.eye(64), spec, damp=0.0)
    np.testing.assert_array_equal(np.asarray(same.values), np.asarray(rtn.values))
    np.testing.assert_array_equal(np.asarray(same.scale), np.asarray(rtn.scale))
    q = quant.gptq(w, quant.gptq_hessian(x), spec)
    err = lambda v: float(jnp.sum((x @ w - x @ v) ** 2))  # noqa: E731
    assert err(q.dequantize()) < 0.9 * err(rtn.dequantize())
    # The codes lie on the stored grid: re-quantizing on q's scales changes nothing.
    again = quant.quantize(q.dequantize(), spec, scale=q.float_scale())
    np.testing.assert_array_equal(np.asarray(again.values), np.asarray(q.values))
    if fmt != "nvfp4":  # powers of two
        s = np.asarray(q.float_scale())
        np.testing.assert_array_equal(s, 2.0 ** np.round(np.log2(s)))
    else:
        np.testing.assert_array_equal(np.asarray(q.scale_scale), np.asarray(rtn.scale_scale))
