"""The format registry: NF4 against QLoRA's definition, double-quantized scales, fp8/nf4 through
every consumer, and a new format made to work everywhere by one ``register`` call."""

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import quant
from jaxslim.quant import QuantSpec, formats
from jaxslim.quant._dot import blocked_path_applies

JIT = [lambda f: f, jax.jit]
NF4 = QuantSpec(fmt="nf4", axis=-1, group_size=64)  # QLoRA: absmax blocks of 64


def _nf4_from_the_paper() -> np.ndarray:
    """QLoRA's NormalFloat-4, built from its definition (bitsandbytes' ``create_normal_map``).

    Quantiles of N(0, 1) at evenly spaced probabilities, asymmetric so that 0 is exact: 8
    positive values (9 points from ``offset`` down to 0.5, the last dropped), 7 negative ones
    (8 points), and 0; normalized by the largest so the ends are +-1. ``offset`` is the mean of
    ``1 - 1/(2 * 15)`` and ``1 - 1/(2 * 16)``: the outermost quantile of a 15- and a 16-level
    grid.
    """
    nd = NormalDist()
    offset = 1 - (1 / 30 + 1 / 32) / 2
    pos = [nd.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-nd.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    v = np.sort(np.array(pos + [0.0] + neg))
    return v / v.max()


def test_nf4_codebook_is_the_qlora_normal_float():
    want = _nf4_from_the_paper()
    got = np.asarray(formats.NF4_CODEBOOK)
    assert got.shape == (16,) and np.all(np.diff(got) > 0)
    assert got[0] == -1.0 and got[-1] == 1.0 and got[7] == 0.0  # exact ends and exact zero
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-7)
    # 8 values above 0, 7 below: the asymmetric construction.
    assert (got > 0).sum() == 8 and (got < 0).sum() == 7


@pytest.mark.parametrize("wrap", JIT)
def test_nf4_encode_is_the_nearest_entry(wrap):
    table = np.asarray(formats.NF4_CODEBOOK, np.float32)
    mids = (table[1:] + table[:-1]) / np.float32(2)
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.uniform(-1.2, 1.2, 500), mids, table]).astype(np.float32)
    f = formats.FORMATS["nf4"]
    codes, inside = wrap(lambda y: f.encode(y, 0, -1.0, 1.0))(jnp.asarray(y))
    d = np.abs(y[:, None].astype(np.float64) - table[None, :])
    want = np.argmin(d, axis=1)  # the nearest entry, in exact arithmetic
    # A value exactly at a (float32) midpoint takes the lower entry, as bitsandbytes' `x > mid`.
    want[500:515] = np.arange(15)
    np.testing.assert_array_equal(np.asarray(codes).astype(int), want)
    np.testing.assert_array_equal(np.asarray(inside), np.abs(y) <= 1)
    np.testing.assert_array_equal(np.asarray(f.decode(codes, 0)), table[want])


def _nf4_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy NF4 of a (K, N) kernel, blocks of 64 along K, scales double-quantized in blocks
    of 256 (C order) to int8 with a float32 second-level scale: (dequantized, effective scale)."""
    k, n = x.shape
    v = x.reshape(k // 64, 64, n)
    s = np.maximum(np.abs(v).max(axis=1, keepdims=True), np.finfo(np.float32).eps)
    flat = s.reshape(-1)
    nb = -(-flat.size // 256)
    pad = np.zeros(nb * 256, np.float32)
    pad[: flat.size] = flat
    blocks = pad.reshape(nb, 256)
    second = (blocks.max(axis=1) / np.float32(127)).astype(np.float32)
    codes = np.clip(np.round(blocks * (np.float32(1) / second[:, None])), 1, 127)
    s_eff = (codes * second[:, None]).reshape(-1)[: flat.size].reshape(s.shape)
    s_eff = s_eff.astype(np.float32)
    table = np.asarray(formats.NF4_CODEBOOK, np.float32)
    y = v * (np.float32(1) / s_eff)
    idx = np.argmin(np.abs(y[..., None] - table), axis=-1)
    return (table[idx] * s_eff).reshape(k, n), s_eff


@pytest.mark.parametrize("wrap", JIT)
def test_nf4_round_trip_equals_numpy_reference(wrap):
    x = np.random.default_rng(1).normal(size=(128, 24)).astype(np.float32)
    q = wrap(lambda x: quant.quantize(x, NF4))(jnp.asarray(x))
    assert q.values.dtype == jnp.uint8 and q.values.shape == (128, 12)  # two codes a byte
    assert q.scale.dtype == jnp.int8 and q.scale.shape == (2, 1, 24)
    assert q.scale_scale.dtype == jnp.float32 and q.scale_scale.shape == (1,)
    assert q.zero_point is None
    assert q.nbytes == 128 * 24 // 2 + 2 * 24 + 4  # 4.03 bits per weight
    y = np.asarray(wrap(quant.dequantize)(q))
    want, s_eff = _nf4_reference(x)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(q.float_scale()), s_eff, rtol=1e-6)
    # The error of every weight is at most half the widest codebook gap times its scale.
    gap = np.diff(np.asarray(formats.NF4_CODEBOOK)).max() / 2
    err = np.abs(y - x).reshape(2, 64, 24)
    assert (err <= gap * s_eff * (1 + 1e-5)).all()
    np.testing.assert_array_equal(y, np.asarray(quant.fake_quant(jnp.asarray(x), NF4)))


def test_double_quantized_scales_over_several_blocks():
    # 2 x 300 = 600 scales: blocks of 256, 256 and 88.
    x = np.random.default_rng(2).normal(size=(128, 300)).astype(np.float32)
    x[:, :10] *= 100.0  # large scales in the first block only
    q = quant.quantize(jnp.asarray(x), NF4)
    assert q.scale_scale.shape == (3,)
    s = np.maximum(np.abs(x.reshape(2, 64, 300)).max(axis=1), np.finfo(np.float32).eps)
    flat = s.reshape(-1)
    second = np.asarray(q.scale_scale)
    for b, lo in enumerate(range(0, 600, 256)):
        blk = flat[lo : lo + 256]
        assert second[b] == np.float32(blk.max() / np.float32(127))
        got = np.asarray(q.float_scale()).reshape(-1)[lo : lo + 256]
        assert (np.abs(got - blk) <= second[b] / 2 * (1 + 1e-6)).all()  # half a second-level step
    codes = np.asarray(q.scale)
    assert codes.min() >= 1 and codes.max() == 127  # never a zero scale


@pytest.mark.parametrize("spec", [QuantSpec(fmt="e4m3", axis=-1), NF4], ids=str)
def test_gptq_works_for_every_format(spec):
    rng = np.random.default_rng(3)
    x = jnp.asarray((rng.normal(size=(256, 64)) * rng.uniform(0.1, 3, 64)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(64, 16)).astype(np.float32))
    q = quant.gptq(w, quant.gptq_hessian(x), spec)
    assert q.spec == spec and q.values.dtype == spec.storage_dtype
    err = lambda v: float(jnp.sum((x @ w - x @ v) ** 2))
    assert err(quant.dequantize(q)) < err(quant.fake_quant(w, spec))


@pytest.mark.parametrize("spec", [QuantSpec(fmt="e4m3", axis=-1), NF4], ids=str)
def test_observers_and_qdot_for_every_format(spec):
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.normal(size=(128, 16)).astype(np.float32))
    for make in (quant.minmax_observer, quant.mse_observer):
        obs = make(spec)
        s, _ = jax.jit(obs.result)(jax.jit(obs.update)(obs.init(w), w))
        assert s.shape == (2, 1, 16) if spec.group_size else s.shape == (1, 16)
        assert np.isfinite(np.asarray(s)).all() and (np.asarray(s) > 0).all()
    q = quant.quantize(w, spec)
    x = jnp.asarray(rng.normal(size=(3, 128)).astype(np.float32))
    dn = (((1,), (0,)), ((), ()))
    assert blocked_path_applies(x, q, dn)
    want = np.asarray(x @ quant.dequantize(q))
    for impl in ("blocked", "dequantize"):
        y = jax.jit(lambda x, q, impl=impl: quant.qdot_general(x, q, dn, impl=impl))(x, q)
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_vmap_and_report_of_nf4():
    xs = jnp.asarray(np.random.default_rng(5).normal(size=(3, 64, 8)).astype(np.float32))
    qs = jax.vmap(lambda x: quant.quantize(x, NF4))(xs)
    assert qs.values.shape == (3, 64, 4) and qs.scale_scale.shape == (3, 1)
    ys = jax.vmap(quant.dequantize)(qs)
    for i in range(3):
        np.testing.assert_array_equal(
            np.asarray(ys[i]), np.asarray(quant.dequantize(quant.quantize(xs[i], NF4)))
        )
    _, report = quant.quantize_params({"w": xs[0]}, NF4)
    assert "nf4 axis=-1 group=64" in str(report)


# --- one record makes a new format work everywhere --------------------------------------------

TOY3 = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)  # a 3-bit codebook, stored in nibbles


@pytest.fixture
def toy_formats():
    new = [
        formats.Format(
            name="int6",
            family="int",
            bits=6,
            storage_bits=8,
            qmin=-32,
            qmax=31,
            encode=formats.encode_int,
            decode=formats.decode_int,
            code_dtype=jnp.int8,
            unsigned=True,
            affine=True,
        ),
        formats.Format(
            name="toy3",
            family="toy3",
            bits=3,
            storage_bits=4,
            qmin=-1.0,
            qmax=1.0,
            encode=formats.encode_codebook(TOY3),
            decode=formats.decode_codebook(TOY3),
            code_dtype=jnp.uint8,
            codebook=TOY3,
        ),
    ]
    for f in new:
        formats.register(f)
    try:
        yield new
    finally:
        for f in new:
            formats.FORMATS.pop(f.name)


@pytest.mark.parametrize("wrap", JIT)
def test_registering_a_format_makes_everything_work(toy_formats, wrap):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    xj = jnp.asarray(x)

    # int6: an integer format is one record; the grid, rounding and storage follow.
    s6 = QuantSpec(6, axis=-1)
    assert (s6.qmin, s6.qmax, s6.storage_dtype) == (-32, 31, jnp.int8)
    assert QuantSpec(6, signed=False, symmetric=False).qmax == 63
    q = wrap(lambda x: quant.quantize(x, s6))(xj)
    scale = np.maximum(np.abs(x).max(0, keepdims=True) / np.float32(31.5), np.float32(1.2e-7))
    np.testing.assert_array_equal(np.asarray(q.scale), scale)
    codes = np.clip(np.round(x * (np.float32(1) / scale)), -32, 31)
    np.testing.assert_array_equal(np.asarray(q.values), codes.astype(np.int8))
    np.testing.assert_array_equal(np.asarray(wrap(quant.dequantize)(q)), codes * scale)

    # toy3: a packed codebook format is one record too.
    s3 = QuantSpec(fmt="toy3", axis=-1)
    assert s3.bits == 3 and s3.storage_bits == 4 and s3.format.codebook == TOY3
    q = wrap(lambda x: quant.quantize(x, s3))(xj)
    assert q.values.dtype == jnp.uint8 and q.values.shape == quant.packed_shape((16, 6), 4)
    amax = np.abs(x).max(0, keepdims=True)
    table = np.asarray(TOY3, np.float32)
    idx = np.argmin(np.abs((x * (np.float32(1) / amax))[..., None] - table), axis=-1)
    np.testing.assert_array_equal(np.asarray(q.codes()), idx)
    y = np.asarray(wrap(quant.dequantize)(q))
    np.testing.assert_allclose(y, table[idx] * amax, rtol=1e-6)
    np.testing.assert_array_equal(y, np.asarray(wrap(lambda x: quant.fake_quant(x, s3))(xj)))
    # Packing: the codes unpack from the nibbles, element 2i low and 2i+1 high.
    np.testing.assert_array_equal(np.asarray(quant.unpack(q.values, 4, (16, 6), signed=False)), idx)
    # Straight-through gradient: 1 inside the grid (everything, with absmax scales).
    g = jax.grad(lambda x: quant.fake_quant(x, s3).sum())(xj)
    np.testing.assert_array_equal(np.asarray(g), 1.0)
    # Observers, tree-wide rules and GPTQ read the same record.
    obs = quant.mse_observer(s3)
    st = obs.update(obs.init(xj), xj)
    assert np.isfinite(np.asarray(obs.result(st)[0])).all()
    tree, report = quant.quantize_params({"a": xj, "b": xj}, [("a", s3), ("b", s6)])
    assert "toy3 axis=-1" in str(report) and "int6 axis=-1" in str(report)
    h = quant.gptq_hessian(jnp.asarray(rng.normal(size=(64, 16)).astype(np.float32)))
    assert quant.gptq(xj, h, s3).spec == s3


def test_registry_refuses_clashes():
    f = formats.FORMATS["int4"]
    formats.register(f)  # the same record again is a no-op
    clash = formats.Format(
        "int4b", "int", 4, 4, -8, 7, formats.encode_int, formats.decode_int, jnp.int8
    )
    with pytest.raises(ValueError, match="already 'int4'"):
        formats.register(clash)
    with pytest.raises(ValueError, match="a different format 'int4'"):
        formats.register(
            formats.Format("int4", "int", 4, 4, -7, 7, formats.encode_int, formats.decode_int, "i1")
        )
    with pytest.raises(ValueError, match="storage_bits"):
        formats.Format("x", "x", 5, 4, -1, 1, formats.encode_int, formats.decode_int, "i1")
    with pytest.raises(TypeError, match="expects a Format"):
        formats.register("int4")
