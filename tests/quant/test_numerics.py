"""fake_quant_affine and scales vs an independent numpy statement of PyTorch's rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxslim import quant
from jaxslim.quant import QuantSpec

JIT = [lambda f: f, jax.jit]
# int8, uint8, int4, uint4 and their reduce-range variants.
RANGES = [(-128, 127), (0, 255), (-8, 7), (0, 15), (-64, 63), (0, 127), (-4, 3), (0, 7)]


def torch_rule(x, scale, zp, qmin, qmax):
    """PyTorch's CPU fake-quant kernel, written out in numpy float32."""
    x = np.asarray(x, np.float32)
    inv = np.float32(1.0) / np.asarray(scale, np.float32)
    r = np.round(x * inv)  # numpy rounds half to even
    q = np.clip(r + np.asarray(zp, np.float32), qmin, qmax)
    return ((q - np.asarray(zp, np.float32)) * np.asarray(scale, np.float32)).astype(np.float32)


@st.composite
def cases(draw):
    qmin, qmax = draw(st.sampled_from(RANGES))
    scale = np.float32(
        draw(st.sampled_from([1e-30, 1e-8, 1.1920929e-07, 0.003, 0.1, 0.37, 1.0, 17.0, 1e6, 3e30]))
    )
    zp = draw(st.integers(qmin, qmax))
    n = 24  # one shape: one compilation for every example
    ks = draw(st.lists(st.integers(-300, 300), min_size=n, max_size=n))
    kind = draw(st.lists(st.sampled_from(["tie", "int", "free"]), min_size=n, max_size=n))
    free = draw(st.lists(st.floats(-400, 400, width=32), min_size=n, max_size=n))
    x = [
        np.float32((k + 0.5) * scale)
        if t == "tie"
        else np.float32(k * scale)
        if t == "int"
        else np.float32(f * scale)
        for k, t, f in zip(ks, kind, free, strict=True)
    ]
    return np.array(x, np.float32), scale, zp, qmin, qmax


@pytest.mark.parametrize("wrap", JIT)
@given(case=cases())
def test_fake_quant_affine_equals_torch_rule(wrap, case):
    x, scale, zp, qmin, qmax = case
    f = wrap(lambda x, s, z: quant.fake_quant_affine(x, s, z, qmin, qmax))
    got = np.asarray(f(jnp.asarray(x), jnp.float32(scale), jnp.int32(zp)))
    np.testing.assert_array_equal(got, torch_rule(x, scale, zp, qmin, qmax))


def test_ties_round_half_even_with_reciprocal():
    # 0.5, 1.5, 2.5 at scale 1 -> 0, 2, 2 (half to even); -0.5 -> -0.
    y = quant.fake_quant_affine(jnp.array([0.5, 1.5, 2.5, -0.5, -1.5]), 1.0, 0, -128, 127)
    np.testing.assert_array_equal(np.asarray(y), [0.0, 2.0, 2.0, -0.0, -2.0])
    # x * (1/s) and x / s differ on this input: the reciprocal form is the rule.
    s, x = np.float32(0.9128428), np.float32(57.052677)
    assert np.round(x * (np.float32(1) / s)) != np.round(x / s)
    got = quant.fake_quant_affine(jnp.array([x]), s, 0, -128, 127)
    np.testing.assert_array_equal(np.asarray(got), torch_rule([x], s, 0, -128, 127))


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("qmin,qmax", RANGES)
def test_per_channel_equals_torch_rule(wrap, qmin, qmax):
    rng = np.random.default_rng(qmax)
    x = rng.normal(size=(5, 4, 3)).astype(np.float32) * 3
    scale = np.array([0.01, 0.2, 0.07, 1.5], np.float32)
    zp = np.array([qmin, qmax, (qmin + qmax) // 2, qmin + 1], np.int32)
    x[0, :, 0] = (np.arange(4) + 0.5) * scale  # exact ties
    f = wrap(lambda x, s, z: quant.fake_quant_affine(x, s, z, qmin, qmax, axis=1))
    got = np.asarray(f(x, scale, zp))
    want = torch_rule(x, scale[None, :, None], zp[None, :, None], qmin, qmax)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_computes_in_float32(dtype):
    x = jnp.linspace(-3, 3, 101).astype(dtype)
    got = quant.fake_quant_affine(x, 0.05, 3, -128, 127)
    assert got.dtype == dtype
    want = torch_rule(np.asarray(x.astype(jnp.float32)), 0.05, 3, -128, 127)
    np.testing.assert_array_equal(
        np.asarray(got.astype(jnp.float32)),
        np.asarray(jnp.asarray(want).astype(dtype).astype(jnp.float32)),
    )


def test_ste_gradient_is_torch_mask():
    x = jnp.array([-2.0, -1.26, -1.24, 0.0, 0.3, 0.74, 0.76, 5.0])
    # scale 0.5, zp 1, grid [-2, 2]: round(x/0.5) + 1 in range iff x/0.5 rounds into [-3, 1].
    g = jax.grad(lambda x: quant.fake_quant_affine(x, 0.5, 1, -2, 2).sum())(x)
    r = np.round(np.asarray(x) * 2) + 1
    np.testing.assert_array_equal(np.asarray(g), ((r >= -2) & (r <= 2)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(g), [0, 1, 1, 1, 1, 1, 0, 0])


def test_nonfinite_inputs():
    x = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 1.0])
    y = np.asarray(quant.fake_quant_affine(x, 0.1, 0, -8, 7))
    np.testing.assert_array_equal(y[:2], np.float32([0.7, -0.8]))
    assert np.isnan(y[2])
    g = jax.grad(lambda x: quant.fake_quant_affine(x, 0.1, 0, -8, 7).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), [0, 0, 0, 0])  # 1.0 / 0.1 = 10 > 7 too
    # Under jit nothing can raise: NaN -> zero point, +-inf clip, the scale ignores them.
    q = jax.jit(lambda x: quant.quantize(x, QuantSpec(8)))(x)
    assert np.asarray(q.values).tolist() == [127, -128, 0, 127]
    assert np.asarray(q.scale).item() == np.float32(1) / np.float32(127.5)
    # A concrete input with NaN or inf has no code: it raises, naming the leaf.
    with pytest.raises(ValueError, match=r"quant.quantize: 'w' has 3 non-finite entries"):
        quant.quantize(x, QuantSpec(8), path="w")


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_scales_equal_torch_observer_formula(wrap, bits, signed, symmetric):
    rng = np.random.default_rng(bits)
    x = (rng.normal(size=(6, 5)) * 2 + 0.5).astype(np.float32)
    spec = QuantSpec(bits, signed=signed, symmetric=symmetric, axis=-1)
    s, z = wrap(lambda x: quant.qparams(x, spec))(x)
    qmin, qmax = quant.qrange(bits, signed=signed)
    lo, hi = np.minimum(x.min(0), 0), np.maximum(x.max(0), 0)
    eps = np.finfo(np.float32).eps
    if symmetric:
        want_s = np.maximum(np.maximum(-lo, hi) / np.float32((qmax - qmin) / 2), eps)
        zmid = 0 if signed else (128 if (qmin, qmax) == (0, 255) else (qmin + qmax) // 2)
        want_z = np.full(5, zmid)
    else:
        want_s = np.maximum((hi - lo) / np.float32(qmax - qmin), eps)
        want_z = np.clip(qmin - np.round(lo / want_s), qmin, qmax)
    np.testing.assert_array_equal(np.asarray(s)[0], want_s.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(z)[0], want_z)


def test_int8_symmetric_divisor_is_127_5():
    s, z = quant.qparams(jnp.array([-1.0, 2.55]), QuantSpec(8))
    assert s.item() == np.float32(2.55) / np.float32(127.5) and z.item() == 0


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(8),
        QuantSpec(4, axis=-1),
        QuantSpec(8, signed=False, symmetric=False),
        QuantSpec(4, axis=-1, group_size=2),
        QuantSpec(fmt="e4m3"),
    ],
)
def test_all_zero_tensor_gives_zeros_not_nan(spec):
    x = jnp.zeros((4, 6))
    s, _ = quant.qparams(x, spec)
    np.testing.assert_array_equal(np.asarray(s), np.finfo(np.float32).eps)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(quant.quantize(x, spec))), 0.0)
    np.testing.assert_array_equal(np.asarray(quant.fake_quant(x, spec)), 0.0)


def test_bad_primitive_inputs():
    with pytest.raises(ValueError, match="qmin < qmax"):
        quant.fake_quant_affine(jnp.ones(3), 1.0, 0, 5, 5)
    with pytest.raises(ValueError, match="floating"):
        quant.fake_quant_affine(jnp.ones(3, jnp.int32), 1.0, 0, 0, 5)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        quant.fake_quant_affine(jnp.ones((2, 3)), jnp.ones(3), jnp.zeros(3), 0, 5, axis=0)
    with pytest.raises(ValueError, match="out of range"):
        quant.fake_quant_affine(jnp.ones((2, 3)), jnp.ones(3), jnp.zeros(3), 0, 5, axis=2)


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("signed", [True, False])
def test_affine_range_wider_than_float32_stays_finite(wrap, signed):
    # hi - lo = 6e38 overflows float32: the scale must not be inf (which made every value NaN).
    x = jnp.linspace(-3e38, 3e38, 101, dtype=jnp.float32)
    spec = QuantSpec(8, signed=signed, symmetric=False)
    s, z = wrap(lambda x: quant.qparams(x, spec))(x)
    assert np.isfinite(np.asarray(s)).all()
    want_s = np.float32(3e38) / np.float32(255) - np.float32(-3e38) / np.float32(255)
    assert s.item() == want_s
    for f in (
        lambda x: quant.dequantize(quant.quantize(x, spec)),
        lambda x: quant.fake_quant(x, spec),
    ):
        y = np.asarray(wrap(f)(x))
        assert np.isfinite(y).all()
        err = np.abs(y.astype(np.float64) - np.asarray(x, np.float64))
        # Within half a step everywhere, up to the float32 rounding of (q - z) * s.
        assert (err <= s.item() / 2 + np.spacing(np.abs(np.asarray(x)))).all()


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32], ids=str)
@pytest.mark.parametrize("symmetric", [True, False])
def test_values_at_the_dtype_max_never_dequantize_to_inf(wrap, dtype, symmetric):
    # Symmetric int8: s = max / 127.5, so -max -> -127.5 -> -128 (half to even), and
    # -128 * s = -1.0039 * max is past the dtype's largest finite value. It saturates there.
    big = float(jnp.finfo(dtype).max)
    x = jnp.array([-big, -big / 2, 0.0, big / 3, big], dtype)
    spec = QuantSpec(8, symmetric=symmetric)
    y = np.asarray(wrap(lambda x: quant.dequantize(quant.quantize(x, spec)))(x), np.float64)
    f = np.asarray(wrap(lambda x: quant.fake_quant(x, spec))(x), np.float64)
    np.testing.assert_array_equal(y, f)
    assert np.isfinite(y).all() and y.dtype == np.float64
    assert y[0] == -big and y[-1] <= big and y[2] == 0.0
    s, _ = quant.qparams(x, spec)
    err = np.abs(y - np.asarray(x, np.float64))
    ulp = np.spacing(np.abs(np.asarray(x, np.float32)[1:-1]))
    assert (err[1:-1] <= s.item() / 2 * (1 + 1e-6) + 2 * ulp.astype(np.float64)).all()
    # The primitive saturates the same way.
    p = quant.fake_quant_affine(x, jnp.float32(big / 127.5), 0, -128, 127)
    assert p.dtype == dtype and np.asarray(p, np.float64)[0] == -big


def test_fp8_and_nf4_zero_point_and_scale_rules():
    s, z = quant.qparams(jnp.array([-2.0, 448.0]), QuantSpec(fmt="e4m3"))
    assert s.item() == 1.0 and z.item() == 0  # symmetric divisor: the fp8 max
    s, z = quant.qparams(jnp.array([-3.0, 1.0]), QuantSpec(fmt="nf4"))
    assert s.item() == 3.0 and z.item() == 0  # absmax: nf4's grid is [-1, 1]
