"""QArray: packing, byte counts, round trips, pytree behaviour (jit, vmap, sharding, Orbax)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxslim import quant
from jaxslim.quant import QArray, QuantSpec
from jaxslim.quant._spec import layout

JIT = [lambda f: f, jax.jit]


@settings(max_examples=12)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    signed=st.booleans(),
    shape=st.sampled_from([(1,), (7,), (3, 5), (2, 3, 8), (2, 17)]),
    seed=st.integers(0, 99),
)
def test_pack_unpack_round_trip(bits, signed, shape, seed):
    lo, hi = quant.qrange(bits, signed=signed)
    shape = list(shape)  # last axes of 1, 7, 5 and 8 codes: padded and exact bytes
    codes = np.random.default_rng(seed).integers(lo, hi + 1, size=shape)
    dtype = np.int8 if signed else np.uint8
    packed = quant.pack(jnp.asarray(codes.astype(dtype)), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == quant.packed_shape(tuple(shape), bits)
    back = quant.unpack(packed, bits, tuple(shape), signed=signed)
    np.testing.assert_array_equal(np.asarray(back), codes)


def test_int4_nibble_order():
    packed = quant.pack(jnp.array([3, -2, 0, 7], jnp.int8), 4)
    assert packed.tolist() == [3 | (0xE << 4), 0 | (7 << 4)]  # element 2i low, 2i+1 high
    assert quant.pack(jnp.array([1, 2, 3, 0], jnp.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    # 3 bits: codes 8k .. 8k+7 in the little-endian 24-bit word of bytes 3k .. 3k+2
    codes = np.array([3, -4, 0, 1, -1, 2, -2, 3, 1], np.int8)
    word = sum((int(c) & 7) << (3 * j) for j, c in enumerate(codes[:8]))
    want = [word & 255, word >> 8 & 255, word >> 16, 1, 0, 0]  # the 9th code: a padded word
    assert quant.pack(jnp.asarray(codes), 3).tolist() == want
    back = quant.unpack(jnp.asarray(want, jnp.uint8), 3, (9,), signed=True)
    assert back.tolist() == codes.tolist()


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_values_bytes_are_exact_fraction_of_float32(bits):
    # exactly `bits` bits a code (3 bits: 8 codes in 3 bytes, not a nibble each)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32))
    q = quant.quantize(x, QuantSpec(bits, axis=-1))
    assert q.values.nbytes * 8 == x.size * bits
    assert q.nbytes == x.size * bits // 8 + 48 * 4  # codes + one float32 scale per channel
    g = quant.quantize(x, QuantSpec(bits, axis=-1, group_size=16, symmetric=False))
    assert g.nbytes == x.size * bits // 8 + (64 // 16) * 48 * (4 + 1)  # + f32 scale, 1-byte zp


SPECS = [
    QuantSpec(8),
    QuantSpec(8, axis=-1),
    QuantSpec(4, axis=-1, group_size=8),
    QuantSpec(4, signed=False, symmetric=False, axis=0),
    QuantSpec(2, group_size=4),
    QuantSpec(3, axis=(0, 1)),
    QuantSpec(8, signed=False),
    QuantSpec(4, group_size=6, group_axis=-1),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_round_trip_error_at_most_half_scale(spec, wrap=jax.jit):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 16, 12)).astype(np.float32))
    q = wrap(lambda x: quant.quantize(x, spec))(x)
    y = wrap(quant.dequantize)(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    lay = layout(spec, x.shape)
    v = np.asarray(x).reshape(lay.view_shape)
    err = np.abs(np.asarray(y).reshape(lay.view_shape) - v)
    s = np.asarray(q.scale)
    z = 0 if q.zero_point is None else np.asarray(q.zero_point).astype(np.float32)
    inside = (v >= (spec.qmin - z) * s) & (v <= (spec.qmax - z) * s)
    assert inside.mean() > 0.9
    # Half a step, up to the float32 rounding of x * (1/s) near a tie.
    assert (err <= s / 2 * (1 + 1e-6) + 2 * np.spacing(np.abs(v)))[inside].all()
    # Outside the grid, values clip to its ends.
    top = np.broadcast_to((spec.qmax - z) * s, v.shape)
    np.testing.assert_allclose(np.asarray(y).reshape(lay.view_shape)[v > top], top[v > top])
    # dequantize(quantize(x)) is exactly fake_quant(x).
    np.testing.assert_array_equal(np.asarray(y), np.asarray(quant.fake_quant(x, spec)))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_jit_equals_eager(spec):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 16, 12)).astype(np.float32))
    a, b = quant.quantize(x, spec), jax.jit(lambda x: quant.quantize(x, spec))(x)
    chex_equal = jax.tree.map(lambda u, v: np.array_equal(np.asarray(u), np.asarray(v)), a, b)
    assert all(jax.tree.leaves(chex_equal))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_round_trip(fmt):
    x = jnp.asarray(np.random.default_rng(3).normal(size=(32, 8)).astype(np.float32))
    spec = QuantSpec(fmt=fmt, axis=-1)
    q = quant.quantize(x, spec)
    assert q.values.dtype == spec.storage_dtype and q.zero_point is None
    s = np.asarray(q.scale)
    want = (np.asarray(x) * (np.float32(1) / s)).astype(spec.storage_dtype).astype(np.float32) * s
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), want)
    rel = 2.0 ** -(3 if fmt == "e4m3" else 2)  # half an ulp of the mantissa
    assert (np.abs(np.asarray(quant.dequantize(q) - x)) <= rel * np.abs(np.asarray(x)) + s).all()


def test_bf16_input_keeps_dtype():
    x = jnp.linspace(-1, 1, 64).reshape(8, 8).astype(jnp.bfloat16)
    q = quant.quantize(x, QuantSpec(8, axis=-1))
    assert quant.dequantize(q).dtype == jnp.bfloat16
    assert quant.fake_quant(x, QuantSpec(8)).dtype == jnp.bfloat16


def test_vmap_over_qarrays():
    xs = jnp.asarray(np.random.default_rng(4).normal(size=(5, 8, 6)).astype(np.float32))
    spec = QuantSpec(4, axis=-1)
    qs = jax.vmap(lambda x: quant.quantize(x, spec))(xs)
    assert qs.values.shape == (5, 8, 3) and qs.shape == (8, 6)
    ys = jax.vmap(quant.dequantize)(qs)
    for i in range(5):
        np.testing.assert_array_equal(
            np.asarray(ys[i]), np.asarray(quant.dequantize(quant.quantize(xs[i], spec)))
        )


def test_sharded_device_put_over_8_devices():
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("x",))
    x = jnp.asarray(np.random.default_rng(5).normal(size=(64, 128)).astype(np.float32))
    sharding = NamedSharding(mesh, P(None, "x"))
    q = quant.quantize(x, QuantSpec(4, axis=-1))  # values (64, 64), scale (1, 128)
    qs = jax.device_put(q, sharding)
    assert isinstance(qs, QArray)
    for leaf in jax.tree.leaves(qs):
        assert leaf.sharding == sharding and len(leaf.addressable_shards) == 8
    y = jax.jit(quant.dequantize)(qs)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(quant.dequantize(q)))
    # A tree of shardings: the group scale (2, 1, 128) is sharded along its last axis.
    g = quant.quantize(x, QuantSpec(4, axis=-1, group_size=32))
    shardings = jax.tree.map(lambda a: NamedSharding(mesh, P(*[None] * (a.ndim - 1), "x")), g)
    gs = jax.device_put(g, shardings)
    assert all(len(a.addressable_shards) == 8 for a in jax.tree.leaves(gs))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(quant.dequantize)(gs)), np.asarray(quant.dequantize(g))
    )
    # Quantizing a sharded array keeps the codes sharded (no gather to one device).
    xq = jax.jit(lambda x: quant.quantize(x, QuantSpec(8, axis=-1)))(jax.device_put(x, sharding))
    assert len(xq.values.addressable_shards) == 8
    assert xq.values.sharding.is_equivalent_to(sharding, 2)


def test_orbax_save_restore(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    x = jnp.asarray(np.random.default_rng(6).normal(size=(16, 8)).astype(np.float32))
    tree = {"w": quant.quantize(x, QuantSpec(4, axis=-1, symmetric=False)), "b": jnp.ones(8)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", tree)
        ckptr.wait_until_finished()
        restored = ckptr.restore(tmp_path / "ckpt", jax.eval_shape(lambda: tree))
    assert isinstance(restored["w"], QArray) and restored["w"].spec == tree["w"].spec
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs_name_the_leaf():
    x = jnp.ones((6, 10))
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(5)
    with pytest.raises(ValueError, match="fmt"):
        QuantSpec(fmt="nf3")
    with pytest.raises(ValueError, match="needs bits=8"):
        QuantSpec(4, fmt="e4m3")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=0)
    # group_size=4 on an axis of 6: a shorter last group (6 = 4 + 2), never an error.
    assert quant.quantize(x, QuantSpec(4, group_size=4), path="layer/kernel").scale.shape[0] == 2
    with pytest.raises(ValueError, match=r"group_axis 2 is out of range.*'layer/kernel'"):
        quant.quantize(x, QuantSpec(4, group_size=4, group_axis=2), path="layer/kernel")
    with pytest.raises(ValueError, match=r"out of range.*'k'"):
        quant.quantize(x, QuantSpec(8, axis=2), path="k")
    with pytest.raises(ValueError, match=r"floating-point.*int32.*'ids'"):
        quant.quantize(jnp.ones((2, 2), jnp.int32), QuantSpec(8), path="ids")
    with pytest.raises(ValueError, match="per-channel axis cannot be cut"):
        quant.quantize(x, QuantSpec(4, axis=0, group_size=2), path="k")
    with pytest.raises(ValueError, match="scale of shape"):
        quant.quantize(x, QuantSpec(8, axis=-1), scale=jnp.ones((6, 1)))
