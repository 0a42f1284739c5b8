"""Group sizes that do not divide the axis: a shorter (padded) last group, everywhere.

576 = 4 x 128 + 64 (SmolLM2's width): ``ceil(n / g)`` groups, the last one shorter, its scale and
zero point computed from its real entries only; codes stored unpadded; ``dequantize`` returns the
original shape. Checked against NumPy references (torch-exact numerics, DESIGN.md) for RTN, GPTQ,
and against the last group quantized on its own for HQQ, AWQ's clip search and the observers;
the quantized dot on every path of ``quant._dot``; storage round trips.
"""

import dataclasses
import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxslim import quant
from jaxslim.quant import QuantSpec, formats, storage
from jaxslim.quant import _awq as awq
from jaxslim.quant import _dot as dot
from jaxslim.quant._spec import layout

JIT = [lambda f: f, jax.jit]
DN = (((1,), (0,)), ((), ()))
F32 = np.float32
EPS = np.finfo(np.float32).eps


def _w(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


# ------------------------------------------------------------------------------------ layout


def test_layout_of_576_in_groups_of_128():
    lay = layout(QuantSpec(4, axis=-1, group_size=128), (576, 1536))
    assert lay.view_shape == (5, 128, 1536) and lay.scale_shape == (5, 1, 1536)
    assert lay.pad == 64 and lay.group_axis == 0 and lay.group_size == 128
    assert lay.count()[:, 0, 0].tolist() == [128, 128, 128, 128, 64]
    x = _w((576, 3))
    lay3 = layout(QuantSpec(4, axis=-1, group_size=128), (576, 3))
    np.testing.assert_array_equal(lay3.from_view(lay3.to_view(x)), x)
    assert lay3.mask().sum() == 576 * 3


def test_group_larger_than_the_axis_is_one_group_of_the_whole_axis():
    w = _w((100, 4))
    q = quant.quantize(w, QuantSpec(4, axis=-1, group_size=128))
    lay = layout(q.spec, w.shape)
    assert lay.group_size == 100 and lay.pad == 0 and q.scale.shape == (1, 1, 4)
    per_channel = quant.quantize(w, QuantSpec(4, axis=-1))
    np.testing.assert_array_equal(q.scale.reshape(-1), per_channel.scale.reshape(-1))
    np.testing.assert_array_equal(q.dequantize(), per_channel.dequantize())


@pytest.mark.parametrize("bad", [0, -3, 2.5, "64", True])
def test_bad_group_size_raises_naming_the_value(bad):
    with pytest.raises(ValueError, match=f"group_size must be .*got {bad!r}"):
        QuantSpec(4, group_size=bad)


def test_bad_group_size_that_bypassed_the_spec_names_the_leaf():
    spec = QuantSpec(4, group_size=8)
    object.__setattr__(spec, "group_size", 0)  # as a hand-built or unpickled record might
    with pytest.raises(ValueError, match=r"group_size must be a positive int, got 0 for 'a/k'"):
        quant.quantize(jnp.ones((6, 2)), spec, path="a/k")


def test_group_size_is_normalized_to_int():
    spec = QuantSpec(4, group_size=np.int64(64))
    assert type(spec.group_size) is int and spec == QuantSpec(4, group_size=64)


# ----------------------------------------------------------------------------------- RTN


def _ref_qparams(g, spec):
    """NumPy torch-exact scale and zero point of one group ``g`` ``(rows, N)``: its real rows."""
    lo = np.minimum(g.min(0), 0).astype(F32)
    hi = np.maximum(g.max(0), 0).astype(F32)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        s = np.maximum(np.maximum(-lo, hi) / F32((qmax - qmin) / 2), F32(EPS))
        return s.astype(F32), np.full(s.shape, spec.symmetric_zero_point, np.float32)
    s = np.maximum((hi - lo) / F32(qmax - qmin), F32(EPS)).astype(F32)
    z = np.clip(qmin - np.round(lo / s), qmin, qmax).astype(F32)
    return s, z


INT_SPECS = [
    QuantSpec(b, axis=-1, group_size=128, signed=sg, symmetric=sym)
    for b in (2, 3, 4, 8)
    for sg, sym in ((True, True), (False, False), (True, False))
]


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("spec", INT_SPECS, ids=str)
def test_int_last_group_is_exact(wrap, spec):
    w = _w((576, 24), seed=1)
    q = wrap(lambda w: quant.quantize(w, spec))(w)
    assert q.scale.shape == (5, 1, 24) and q.shape == w.shape
    assert q.values.shape == quant.packed_shape(w.shape, spec.storage_bits) or spec.bits == 8
    wn = np.asarray(w)
    deq = np.asarray(q.dequantize())
    assert deq.shape == w.shape
    for i in range(5):
        g = wn[128 * i : 128 * (i + 1)]  # the last slice is the 64 real rows
        s, z = _ref_qparams(g, spec)
        np.testing.assert_array_equal(np.asarray(q.float_scale())[i, 0], s)
        zp = np.zeros_like(s) if q.zero_point is None else np.asarray(q.zero_point)[i, 0]
        np.testing.assert_array_equal(zp, z)
        codes = np.clip(np.round(g * (F32(1) / s)) + z, spec.qmin, spec.qmax)  # half to even
        np.testing.assert_array_equal(np.asarray(q.codes())[128 * i : 128 * (i + 1)], codes)
        np.testing.assert_array_equal(deq[128 * i : 128 * (i + 1)], ((codes - z) * s).astype(F32))


def test_int4_symmetric_last_group_scale_is_its_absmax_over_7_5():
    w = _w((576, 8), seed=2)
    q = quant.quantize(w, QuantSpec(4, axis=-1, group_size=128))
    want = np.abs(np.asarray(w)[512:]).max(0) / F32(7.5)  # (qmax - qmin) / 2, torch's rule
    np.testing.assert_array_equal(np.asarray(q.scale)[4, 0], want)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "int"], ids=str)
def test_last_group_equals_quantizing_it_alone(fmt):
    spec = QuantSpec(axis=-1, group_size=128, fmt=fmt)
    w = _w((576, 16), seed=3)
    q = quant.quantize(w, spec)
    alone = quant.quantize(w[512:], spec)  # 64 rows: one group of the whole axis
    np.testing.assert_array_equal(q.scale[4:], alone.scale)
    np.testing.assert_array_equal(q.dequantize()[512:], alone.dequantize())
    np.testing.assert_array_equal(q.dequantize()[:512], quant.quantize(w[:512], spec).dequantize())


def test_nf4_last_group_scale_is_its_absmax_double_quantized():
    spec = QuantSpec(fmt="nf4", axis=-1, group_size=128)
    w = _w((576, 12), seed=4)
    q = quant.quantize(w, spec)
    wn = np.asarray(w)
    absmax = np.stack([np.abs(wn[128 * i : 128 * (i + 1)]).max(0) for i in range(5)])[:, None]
    codes, second = formats.quantize_scale(jnp.asarray(np.maximum(absmax, F32(EPS))), 256)
    np.testing.assert_array_equal(q.scale, codes)
    np.testing.assert_array_equal(q.scale_scale, second)
    s = np.asarray(q.float_scale())[4, 0]
    idx = np.asarray(
        formats.FORMATS["nf4"].encode(jnp.asarray(wn[512:] * (F32(1) / s)), 0, -1, 1)[0]
    )
    np.testing.assert_array_equal(np.asarray(q.codes())[512:], idx)
    table = np.asarray(formats.NF4_CODEBOOK, F32)
    np.testing.assert_array_equal(np.asarray(q.dequantize())[512:], table[idx.astype(int)] * s)


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize(
    "spec",
    [INT_SPECS[6], INT_SPECS[7], QuantSpec(fmt="nf4", axis=-1, group_size=128)],
    ids=str,
)
def test_fake_quant_is_dequantize_of_quantize_with_ste(wrap, spec):
    w = _w((576, 8), seed=5)
    y = wrap(lambda w: quant.fake_quant(w, spec))(w)
    np.testing.assert_array_equal(y, quant.dequantize(quant.quantize(w, spec)))
    g = wrap(jax.grad(lambda w: jnp.sum(quant.fake_quant(w, spec))))(w)
    assert g.shape == w.shape and set(np.unique(np.asarray(g)).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("group_axis", [-1, 0, 1])
def test_padded_group_on_any_axis_and_bfloat16(group_axis):
    w = _w((3, 50, 20), seed=6).astype(jnp.bfloat16)
    spec = QuantSpec(4, group_size=16, group_axis=group_axis)
    q = quant.quantize(w, spec)
    n = w.shape[group_axis]
    assert q.scale.shape[group_axis % 3] == math.ceil(n / 16)
    y = q.dequantize()
    assert y.shape == w.shape and y.dtype == jnp.bfloat16
    bound = np.asarray(layout(spec, w.shape).expand(q.float_scale())) / 2
    err = np.abs(np.asarray(y, np.float32) - np.asarray(w, np.float32))
    rounding = np.abs(np.asarray(y, np.float32)) * 2.0**-8  # the bfloat16 result's rounding
    assert np.all(err <= bound * 1.01 + rounding + 1e-6)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    g=st.sampled_from([8, 32, 64, 128]),
    bits=st.sampled_from([2, 3, 4, 8]),
    symmetric=st.booleans(),
    cols=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(n, g, bits, symmetric, cols, seed):
    spec = QuantSpec(bits, axis=-1, group_size=g, symmetric=symmetric)
    w = _w((n, cols), seed)
    q = quant.quantize(w, spec)
    groups = math.ceil(n / g)
    assert q.scale.shape == (groups, 1, cols) and q.scale.size == groups * cols
    assert q.codes().shape == w.shape and q.dequantize().shape == w.shape
    per, nbytes = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}[spec.storage_bits]
    zp = 0 if q.zero_point is None else q.zero_point.size
    assert q.nbytes == n * math.ceil(cols / per) * nbytes + 4 * groups * cols + zp
    s = np.asarray(layout(spec, w.shape).expand(q.float_scale()), np.float64)
    err = np.abs(np.asarray(q.dequantize(), np.float64) - np.asarray(w, np.float64))
    # half a step, plus float32 rounding of the scale and of the dequantized value
    assert np.all(err <= s / 2 + 4 * EPS * np.abs(np.asarray(w, np.float64)) + 1e-30)


# ----------------------------------------------------------------------- packing, storage


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packed_codes_are_unpadded_with_odd_counts(bits):
    w = _w((77, 5), seed=7)  # 385 codes, 5 a row: the last word of a row is part empty
    spec = QuantSpec(bits, axis=-1, group_size=32)
    q = quant.quantize(w, spec)
    row = {2: 2, 3: 3, 4: 3}[bits]  # bytes a row of 5 codes: 2 x 4, one 3-byte word, 3 x 2
    assert spec.storage_bits == bits  # exact bit cost: 3 bits a code, not a nibble
    assert q.values.shape == (77, row) and q.values.dtype == jnp.uint8
    assert q.scale.shape == (3, 1, 5)
    assert q.nbytes == 77 * row + 3 * 5 * 4
    back = quant.unpack(q.values, spec.storage_bits, w.shape, signed=True)
    np.testing.assert_array_equal(back, q.codes())


def _tree():
    return {
        "a": quant.quantize(_w((576, 6), 8), QuantSpec(4, axis=-1, group_size=128)),
        "b": quant.quantize(
            _w((100, 7), 9), QuantSpec(3, axis=-1, group_size=32, symmetric=False, signed=False)
        ),
        "c": quant.quantize(_w((70, 4), 10), QuantSpec(fmt="nf4", axis=-1, group_size=64)),
        "d": quant.quantize(_w((40, 3), 11), QuantSpec(2, group_size=16, group_axis=-1)),
    }


def _assert_same(a, b):
    for k in a:
        assert b[k].spec == a[k].spec and b[k].shape == a[k].shape
        for x, y in zip(jax.tree.leaves(a[k]), jax.tree.leaves(b[k]), strict=True):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(a[k].dequantize(), b[k].dequantize())


def test_npz_round_trip_is_bit_exact(tmp_path):
    tree = _tree()
    storage.save_npz(tmp_path / "q.npz", tree)
    _assert_same(tree, storage.load_npz(tmp_path / "q.npz"))


def test_orbax_round_trip_is_bit_exact(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tree = _tree()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ck", storage.to_checkpoint(tree))
    with ocp.StandardCheckpointer() as ckpt:
        back = storage.from_checkpoint(ckpt.restore(tmp_path / "ck"))
    _assert_same(tree, back)


# ----------------------------------------------------------------------------------- GPTQ


def gptq_reference(w, h, bits, group, damp=0.01):
    """Algorithm 1 of Frantar et al. (2023), one row at a time, symmetric signed codes, one scale
    per column and group of ``group`` rows from the rows as they are when the group starts; the
    last group is whatever rows are left."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    k = w.shape[0]
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros_like(w)
    for i in range(k):
        if i % group == 0:
            g = w[i : i + group]
            amax = np.maximum(-np.minimum(g.min(0), 0), np.maximum(g.max(0), 0))
            s = np.maximum(amax.astype(F32) / F32((qmax - qmin) / 2), F32(EPS)).astype(np.float64)
        c = np.clip(np.round(w[i] / s), qmin, qmax)
        codes[i] = c
        e = (w[i] - c * s) / u[i, i]
        w[i + 1 :] -= np.outer(u[i, i + 1 :], e)
    return codes


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("block", [128, 256])  # (a block of whole groups: scales per group start)
def test_gptq_matches_numpy_reference_on_576(wrap, block):
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.normal(size=(1024, 576)) @ rng.normal(size=(576, 576)) / 24, jnp.float32)
    w = _w((576, 8), 13)
    h = quant.gptq_hessian(x)
    spec = QuantSpec(4, axis=-1, group_size=128)
    q = wrap(lambda w, h: quant.gptq(w, h, spec, block_size=block))(w, h)
    assert q.scale.shape == (5, 1, 8) and q.shape == w.shape
    want = gptq_reference(w, h, 4, 128)
    assert (np.asarray(q.codes()) == want).mean() >= 0.99  # float32 vs float64 near-ties


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(4, axis=-1, group_size=128),
        QuantSpec(3, axis=-1, group_size=100, symmetric=False, signed=False),
        QuantSpec(8, axis=-1, group_size=128, symmetric=False),
        QuantSpec(4, group_size=5, group_axis=-1),  # padded along the output columns
    ],
    ids=str,
)
@pytest.mark.parametrize("clip", [1, 4])
def test_gptq_with_identity_hessian_is_round_to_nearest(spec, clip):
    w = _w((576, 12), 14)
    q = quant.gptq(w, jnp.eye(576), spec, block_size=64, clip_candidates=clip)
    if clip == 1:
        want = quant.quantize(w, spec)
        for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:  # MSE clipping: each group no worse than plain rounding
        e = lambda v: np.sum((np.asarray(v) - np.asarray(w)) ** 2)  # noqa: E731
        assert e(q.dequantize()) <= e(quant.quantize(w, spec).dequantize()) * (1 + 1e-6)


def test_gptq_conv_kernel_with_padded_groups_is_rtn_under_identity():
    w = _w((3, 50, 6), 15)  # (taps, in, out): groups of 16 along ``in`` (50 = 3 x 16 + 2)
    spec = QuantSpec(4, axis=-1, group_size=16)
    q = quant.gptq(w, jnp.eye(150), spec, block_size=32)
    np.testing.assert_array_equal(q.dequantize(), quant.quantize(w, spec).dequantize())
    x = jnp.asarray(np.random.default_rng(16).normal(size=(400, 150)), jnp.float32)
    h = quant.gptq_hessian(x)
    q = quant.gptq(w, h, spec)
    w2 = np.asarray(w).reshape(150, 6)
    err = lambda v: float(np.sum((np.asarray(x) @ (w2 - np.asarray(v).reshape(150, 6))) ** 2))  # noqa: E731
    assert err(q.dequantize()) < err(quant.quantize(w, spec).dequantize())


# ------------------------------------------------------------------------ HQQ, AWQ, observers


def test_hqq_last_group_equals_hqq_on_it_alone():
    spec = QuantSpec(4, signed=False, symmetric=False, axis=-1, group_size=128)
    w = jnp.asarray(np.random.default_rng(17).standard_t(3.0, size=(576, 16)), jnp.float32)
    q = quant.hqq(w, spec)
    alone = quant.hqq(w[512:], spec)
    np.testing.assert_allclose(q.float_scale()[4:], alone.float_scale(), rtol=1e-6)
    np.testing.assert_array_equal(q.zero_point[4:], alone.zero_point)
    np.testing.assert_allclose(q.dequantize()[512:], alone.dequantize(), rtol=1e-6, atol=1e-6)
    e = lambda v: float(jnp.sum((w - v.dequantize()) ** 2))  # noqa: E731
    assert e(q) < e(quant.quantize(w, spec))


def test_awq_clip_and_loss_with_a_padded_last_group():
    rng = np.random.default_rng(18)
    x = rng.normal(size=(256, 100)) * np.linspace(0.2, 3, 100)
    h = jnp.asarray(x.T @ x, jnp.float32)
    w = _w((100, 8), 19)
    spec = QuantSpec(4, axis=-1, group_size=32)  # 100 = 3 x 32 + 4
    q = awq.awq_clip(w, h, spec)
    assert q.scale.shape == (4, 1, 8)
    alone = awq.awq_clip(w[96:], h[96:, 96:], spec)
    np.testing.assert_allclose(q.float_scale()[3:], alone.float_scale(), rtol=1e-6)
    np.testing.assert_array_equal(
        q.dequantize()[:96], awq.awq_clip(w[:96], h[:96, :96], spec).dequantize()
    )
    fake = awq._fake(w, awq.matrix_spec(spec))
    np.testing.assert_array_equal(fake, quant.fake_quant(w, awq.matrix_spec(spec)))
    s, _ = quant.awq_scales([w], h, jnp.sqrt(jnp.mean(jnp.asarray(x, jnp.float32) ** 2, 0)), spec)
    assert s.shape == (100,) and bool(jnp.all(jnp.isfinite(s)))


@pytest.mark.parametrize(
    "make,exact",
    [
        (quant.minmax_observer, True),
        (quant.moving_average_observer, True),
        (lambda s: quant.percentile_observer(s, percentile=90.0), False),
        (lambda s: quant.mse_observer(s, num_candidates=20), True),
    ],
)
def test_observers_see_only_the_real_entries_of_the_last_group(make, exact):
    spec = QuantSpec(4, axis=-1, group_size=32, symmetric=False)
    xs = [_w((100, 5), 20 + i) + 0.5 for i in range(3)]  # mostly positive: lo is not 0
    obs, alone = make(spec), make(spec)
    st_full, st_alone = obs.init(xs[0]), alone.init(xs[0][96:])
    for x in xs:
        st_full, st_alone = obs.update(st_full, x), alone.update(st_alone, x[96:])
    for a, b in ((st_full.lo[3:], st_alone.lo), (st_full.hi[3:], st_alone.hi)):
        if exact:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    s, z = obs.result(st_full)
    assert s.shape == (4, 1, 5)
    quant.quantize(xs[0], spec, scale=s, zero_point=z)


def test_percentile_observer_matches_numpy_on_the_real_entries():
    spec = QuantSpec(8, axis=-1, group_size=32)
    x = _w((100, 3), 24)
    obs = quant.percentile_observer(spec, percentile=95.0)
    hi = obs.update(obs.init(x), x).hi
    want = np.percentile(np.asarray(x)[96:], 95.0, axis=0)
    np.testing.assert_allclose(np.asarray(hi)[3, 0], want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- the quantized dot


def _check_dot(y, x, q, rtol=1e-5):
    w = np.asarray(quant.dequantize(q), np.float64)
    want = np.asarray(x, np.float64) @ w
    bound = rtol * (np.abs(np.asarray(x, np.float64)) @ np.abs(w)) + 1e-6
    assert y.shape == want.shape
    assert np.all(np.abs(np.asarray(y, np.float64) - want) <= bound)


BIG = QuantSpec(4, axis=-1, group_size=128)
_QBIG = {}


def _qbig(spec=BIG):
    if spec not in _QBIG:
        _QBIG[spec] = quant.quantize(_w((576, 1536), 25), spec)
    return _QBIG[spec]


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("impl", ["auto", "blocked", "columns", "dequantize"])
@pytest.mark.parametrize("m", [1, 300])
def test_qdot_576_by_1536_group_128_every_path(wrap, impl, m):
    q = _qbig()
    x = _w((m, 576), 26)
    assert dot.rows_path_applies(x, q, DN) and dot.blocked_path_applies(x, q, DN)
    y = wrap(lambda x, q: quant.qdot_general(x, q, DN, impl=impl))(x, q)
    _check_dot(y, x, q)


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("impl", ["blocked", "columns"])
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(4, axis=-1, group_size=64, signed=False, symmetric=False),
        QuantSpec(3, axis=-1, group_size=64),
        QuantSpec(2, axis=-1, group_size=32),
        QuantSpec(8, axis=-1, group_size=32, symmetric=False),
        QuantSpec(axis=-1, group_size=64, fmt="e4m3"),
    ],
    ids=str,
)
def test_qdot_padded_with_small_blocks(wrap, impl, spec):
    # Shrunk blocks (64 rows): the whole groups (192 rows) span several scan steps, the last
    # group (8 rows) is the tail.
    q = quant.quantize(_w((200, 16), 27), spec)
    x = _w((3, 200), 28)
    assert dot.rows_path_applies(x, q, DN)
    with mock.patch.object(dot, "BLOCK_ELEMS", 64 * 16):
        y = wrap(lambda x, q: quant.qdot_general(x, q, DN, impl=impl))(x, q)
    _check_dot(y, x, q)


def test_qdot_nf4_padded_falls_back_to_dequantize():
    q = quant.quantize(_w((200, 16), 29), QuantSpec(fmt="nf4", axis=-1, group_size=64))
    x = _w((3, 200), 30)
    assert not dot.rows_path_applies(x, q, DN) and not dot.blocked_path_applies(x, q, DN)
    _check_dot(quant.qdot_general(x, q, DN), x, q)
    with pytest.raises(ValueError, match="impl='blocked'"):
        quant.qdot_general(x, q, DN, impl="blocked")


def test_qdot_general_blocked_form_equinox_layout_and_non_contracted_padding():
    # An Equinox (N, K) weight grouped along K (the packed last axis, cut on a byte boundary).
    qe = quant.quantize(_w((16, 200), 31), QuantSpec(4, axis=0, group_size=64, group_axis=-1))
    x = _w((3, 200), 32)
    dn = (((1,), (1,)), ((), ()))
    assert dot.blocked_path_applies(x, qe, dn)
    want = np.asarray(x, np.float64) @ np.asarray(qe.dequantize(), np.float64).T
    for wrap in JIT:
        y = wrap(lambda x, q: quant.qdot_general(x, q, dn, impl="blocked"))(x, qe)
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    # Groups padded along the output axis (not contracted): the general blocked form.
    qn = quant.quantize(_w((256, 100), 33), QuantSpec(4, axis=0, group_size=32, group_axis=-1))
    x = _w((2, 256), 34)
    assert not dot.rows_path_applies(x, qn, DN) and dot.blocked_path_applies(x, qn, DN)
    with mock.patch.object(dot, "BLOCK_ELEMS", 64 * 100):
        y = jax.jit(lambda x, q: quant.qdot_general(x, q, DN, impl="blocked"))(x, qn)
    _check_dot(y, x, qn)


def test_qdot_gradient_and_dynamic_activations():
    q = quant.quantize(_w((200, 16), 35), BIG)
    x = _w((4, 200), 36)
    r = _w((4, 16), 37)
    for impl in ("blocked", "columns", "dequantize"):
        g = jax.grad(lambda x, impl=impl: jnp.sum(quant.qdot_general(x, q, DN, impl=impl) * r))(x)
        want = np.asarray(r, np.float64) @ np.asarray(q.dequantize(), np.float64).T
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-5)
    y = quant.qdot_general(x, q, DN, lhs_spec=QuantSpec(8, axis=0))
    xq = quant.dequantize(quant.quantize(x, QuantSpec(8, axis=0)))
    _check_dot(y, xq, q)


def test_quantized_function_on_a_padded_kernel():
    w = _w((576, 1536), 38)
    params = {"dense": {"kernel": w}}
    qparams = {"dense": {"kernel": _qbig()}}
    x = _w((2, 576), 39)

    def f(p, x):
        return jnp.tanh(x @ p["dense"]["kernel"])

    for wrap in JIT:
        y = wrap(quant.quantized(f))(qparams, x)
        want = f({"dense": {"kernel": quant.dequantize(qparams["dense"]["kernel"])}}, x)
        np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert params["dense"]["kernel"].shape == (576, 1536)


def test_dequantize_params_and_vmap_over_stacked_padded_layers():
    spec = QuantSpec(4, axis=-1, group_size=32)
    ws = _w((3, 100, 8), 40)
    qs = jax.vmap(lambda w: quant.quantize(w, spec))(ws)
    assert qs.scale.shape == (3, 4, 1, 8)
    back = jax.vmap(quant.dequantize)(qs)
    for i in range(3):
        np.testing.assert_array_equal(back[i], quant.quantize(ws[i], spec).dequantize())
    assert dataclasses.replace(qs.spec) == spec
