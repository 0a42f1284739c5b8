"""Tiles: one scale per ``128 x 128`` block (``QuantSpec(fmt="e4m3", group_size=(128, 128))``,
DeepSeek-V3's FP8 block scales), bit-exact against ``ml_dtypes``, padded last tiles, GPTQ, the
quantized matmul, storage and recipes."""

import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxslim import checkpoints, quant, recipe
from jaxslim.quant import QuantSpec
from jaxslim.quant._spec import layout

JIT = [lambda f: f, jax.jit]
SHAPE = (576, 300)  # 576 = 4 x 128 + 64, 300 = 2 x 128 + 44: a shorter last tile on both axes


def _w(seed=0, shape=SHAPE):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _tile_amax(w, t0, t1):
    w = np.asarray(w, np.float32)
    out = np.zeros((-(-w.shape[0] // t0), -(-w.shape[1] // t1)), np.float32)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = np.abs(w[i * t0 : (i + 1) * t0, j * t1 : (j + 1) * t1]).max()
    return out


def _expand(s, t0, t1, shape):
    return np.repeat(np.repeat(s, t0, 0), t1, 1)[: shape[0], : shape[1]]


@pytest.mark.parametrize(
    "fmt, dtype, fmax",
    [("e4m3", ml_dtypes.float8_e4m3fn, 448.0), ("e5m2", ml_dtypes.float8_e5m2, 57344.0)],
)
def test_fp8_tiles_are_bit_exact_against_ml_dtypes(fmt, dtype, fmax):
    w = _w()
    q = quant.quantize(w, QuantSpec(fmt=fmt, group_size=(128, 128)))
    assert q.scale.shape == (5, 1, 3, 1) and q.values.dtype == np.dtype(dtype)
    scale = np.asarray(q.scale, np.float32).reshape(5, 3)
    np.testing.assert_allclose(scale, _tile_amax(w, 128, 128) / np.float32(fmax), rtol=1e-6)
    # codes: w / (its tile's scale), rounded to nearest even by ml_dtypes' cast (no saturation
    # needed: |w| / scale <= fmax by construction)
    s_full = _expand(scale, 128, 128, SHAPE)
    want = (np.asarray(w) / s_full).astype(dtype)
    np.testing.assert_array_equal(np.asarray(q.values).view(np.uint8), want.view(np.uint8))
    np.testing.assert_array_equal(
        np.asarray(q.dequantize()), want.astype(np.float32) * s_full.astype(np.float32)
    )


def test_int4_tiles_match_the_formula():
    w = _w(1)
    q = quant.quantize(w, QuantSpec(4, group_size=(64, 32)))
    s = _tile_amax(w, 64, 32) / np.float32(7.5)  # symmetric: max|w| / ((qmax - qmin) / 2)
    np.testing.assert_allclose(np.asarray(q.scale).reshape(s.shape), s, rtol=1e-6)
    want = np.clip(np.round(np.asarray(w) / _expand(s, 64, 32, SHAPE)), -8, 7)
    assert (np.asarray(q.codes()) == want).mean() >= 0.9999  # float32 division near-ties


def test_layout_counts_the_real_entries_of_padded_tiles():
    lay = layout(QuantSpec(fmt="e4m3", group_size=(128, 128)), SHAPE)
    assert lay.view_shape == (5, 128, 3, 128) and lay.reduce_axes == (1, 3)
    assert lay.tiles == ((0, 128, 64), (1, 128, 84)) and lay.padded_shape == (640, 384)
    counts = lay.count().reshape(5, 3)
    assert counts[0, 0] == 128 * 128 and counts[4, 2] == 64 * 44 and counts[4, 0] == 64 * 128
    assert counts.sum() == math.prod(SHAPE)
    x = np.arange(math.prod(SHAPE)).reshape(SHAPE)
    np.testing.assert_array_equal(lay.from_view(lay.to_view(x)), x)
    # a tile larger than the axis is the whole axis
    assert layout(QuantSpec(8, group_size=(1024, 16)), (64, 32)).scale_shape == (1, 1, 2, 1)


def test_tiles_store_one_float32_scale_per_tile():
    q = quant.quantize(_w(), QuantSpec(fmt="e4m3", group_size=(128, 128)))
    assert q.nbytes == math.prod(SHAPE) + 4 * 15
    q4 = quant.quantize(_w(), QuantSpec(4, group_size=(128, 128)))
    assert q4.nbytes == math.prod(SHAPE) // 2 + 4 * 15


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(fmt="e4m3", group_size=(128, 128)), QuantSpec(4, group_size=(64, 32))],
    ids=["fp8", "int4"],
)
def test_gptq_on_tiles_lowers_the_error_and_keeps_the_layout(spec):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(512, 576)), jnp.float32)
    w = _w(3)
    rtn = quant.quantize(w, spec)
    q = quant.gptq(w, quant.gptq_hessian(x), spec)
    err = lambda v: float(jnp.sum((x @ w - x @ v) ** 2))
    assert err(q.dequantize()) < 0.7 * err(rtn.dequantize())
    assert q.spec == spec and q.scale.shape == rtn.scale.shape


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize(
    "spec",
    [QuantSpec(fmt="e4m3", group_size=(128, 128)), QuantSpec(4, group_size=(64, 32))],
    ids=["fp8", "int4"],
)
def test_quantized_matmul_on_tiles_equals_the_dequantized_kernel(wrap, spec):
    x = jnp.asarray(np.random.default_rng(4).normal(size=(8, 576)), jnp.float32)
    q = quant.quantize(_w(5), spec)
    f = lambda p, x: x @ p["w"]
    got = wrap(quant.quantized(f))({"w": q}, x)
    np.testing.assert_allclose(got, x @ q.dequantize(), rtol=1e-5, atol=1e-4)


def test_oneshot_gptq_with_tiles_is_gptq_on_the_kernel():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(256, 576)), jnp.float32)
    w = _w(7)
    spec = QuantSpec(fmt="e4m3", group_size=(128, 128))
    out, _ = quant.oneshot(lambda p, x: x @ p["w"], {"w": w}, [x], spec, method="gptq")
    want = quant.gptq(w, quant.gptq_hessian(x), spec)
    np.testing.assert_array_equal(np.asarray(out["w"].dequantize()), np.asarray(want.dequantize()))


def test_tiles_round_trip_through_checkpoints_and_recipes(tmp_path):
    q = quant.quantize(_w(), QuantSpec(fmt="e4m3", group_size=(128, 128)))
    checkpoints.save(os.fspath(tmp_path / "ck"), {"w": q})
    checkpoints.save_npz(os.fspath(tmp_path / "w.npz"), {"w": q})
    for back in (
        checkpoints.load(os.fspath(tmp_path / "ck")),
        checkpoints.load_npz(os.fspath(tmp_path / "w.npz")),
    ):
        assert back["w"].spec == q.spec
        np.testing.assert_array_equal(np.asarray(back["w"].dequantize()), q.dequantize())
    r = recipe.parse('[quant]\ndefault = {fmt = "e4m3", group_size = [128, 128]}\n')
    assert r.default == QuantSpec(fmt="e4m3", group_size=(128, 128))
    assert r.default.group_axis == (-2, -1)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"group_size": (128,)}, r"a tuple group_size \(tiles\) needs two or more positive ints"),
        ({"group_size": (128, 0)}, r".*needs two or more positive ints, got \(128, 0\)"),
        ({"group_size": (8, 8), "group_axis": 0}, r"group_axis must be a tuple of 2 ints"),
        ({"group_size": (32, 32), "fmt": "mxfp4"}, r"fmt='mxfp4' has its own blocks"),
        ({"group_size": (32, 32), "fmt": "nf4"}, r"fmt='nf4' has its own blocks"),
    ],
)
def test_bad_tile_specs(kw, match):
    with pytest.raises(ValueError, match=r"QuantSpec: " + match):
        QuantSpec(**kw)


def test_bad_tile_uses_name_the_leaf():
    with pytest.raises(ValueError, match=r"group_axis=\(0, 0\) names an axis twice"):
        quant.quantize(jnp.ones((8, 8)), QuantSpec(8, group_size=(4, 4), group_axis=(0, 0)))
    with pytest.raises(ValueError, match=r"also in axis=\(1,\); a per-channel axis cannot"):
        quant.quantize(jnp.ones((8, 8)), QuantSpec(8, axis=1, group_size=(4, 4)))
    conv = {"w": jnp.ones((3, 16, 8))}
    x = jnp.ones((2, 5, 16))
    f = lambda p, x: jax.lax.conv_general_dilated(
        x, p["w"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
    )
    with pytest.raises(ValueError, match=r"\(tiles\) fits a 2-D \(input, output\) kernel"):
        quant.oneshot(f, conv, [x], QuantSpec(8, group_size=(8, 8)), method="gptq")


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_padded_last_tile_is_quantized_from_its_real_entries_only(symmetric):
    # The corner tile (64 x 44 real entries) gets the scale and zero point it gets alone.
    w = _w(8) + (0.0 if symmetric else 1.5)
    spec = QuantSpec(4, group_size=(128, 128), symmetric=symmetric)
    q = quant.quantize(w, spec)
    alone = quant.quantize(w[512:, 256:], spec)
    assert alone.scale.shape == (1, 1, 1, 1)
    np.testing.assert_array_equal(np.asarray(q.scale)[4, 0, 2, 0], np.asarray(alone.scale).item())
    if not symmetric:
        np.testing.assert_array_equal(
            np.asarray(q.zero_point)[4, 0, 2, 0], np.asarray(alone.zero_point).item()
        )
    np.testing.assert_array_equal(
        np.asarray(q.dequantize())[512:, 256:], np.asarray(alone.dequantize())
    )
