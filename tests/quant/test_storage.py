"""The stored form of QArrays (``checkpoints.to_checkpoint`` / ``from_checkpoint``, ``save_npz`` /
``load_npz``, formerly ``quant.storage``): QArrays survive Orbax and .npz without a restore target;
tampering raises; the deprecated ``quant.storage`` forwards with a ``DeprecationWarning``."""

import json
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxslim import _tree
from jaxslim import checkpoints as S
from jaxslim.quant import (
    QArray,
    QuantSpec,
    dequantize,
    pack,
    quantize,
    quantize_params,
    storage,
)

MARKER = storage.MARKER
X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32))

SPECS = {
    "int8_channel": (X, QuantSpec(8, axis=-1)),
    "int4_group_affine": (X, QuantSpec(4, axis=-1, group_size=4, symmetric=False, signed=False)),
    "int4_group": (X, QuantSpec(4, axis=-1, group_size=2)),
    "int3_affine": (X, QuantSpec(3, symmetric=False)),
    "int2_odd": (X[:, :5], QuantSpec(2)),
    "e4m3_bf16": (X.astype(jnp.bfloat16), QuantSpec(fmt="e4m3", axis=-1)),
    "e5m2": (X, QuantSpec(fmt="e5m2")),
    "nf4_double_quantized": (X, QuantSpec(fmt="nf4", axis=-1, group_size=4)),
}


def _q(name):
    x, spec = SPECS[name]
    return quantize(x, spec)


def _assert_same_qarray(a, b):
    assert isinstance(b, QArray), type(b)
    assert (a.spec, a.shape, jnp.dtype(a.dtype)) == (b.spec, b.shape, jnp.dtype(b.dtype))
    for name in ("values", "scale", "zero_point", "scale_scale"):
        u, v = getattr(a, name), getattr(b, name)
        if u is None:
            assert v is None, name
            continue
        assert (jnp.dtype(u.dtype), tuple(u.shape)) == (jnp.dtype(v.dtype), tuple(v.shape)), name
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=name)
    np.testing.assert_array_equal(np.asarray(dequantize(a)), np.asarray(dequantize(b)))


def _assert_same_tree(a, b):
    """Same leaves at the same path strings (Orbax turns int keys into strings)."""
    la = jax.tree_util.tree_leaves_with_path(a, is_leaf=lambda x: isinstance(x, QArray))
    lb = jax.tree_util.tree_leaves_with_path(b, is_leaf=lambda x: isinstance(x, QArray))
    da = {_tree.path_str(p): x for p, x in la}
    db = {_tree.path_str(p): x for p, x in lb}
    assert da.keys() == db.keys() and da
    for k, x in da.items():
        if isinstance(x, QArray):
            _assert_same_qarray(x, db[k])
        else:
            y = db[k]
            assert jnp.dtype(np.asarray(x).dtype) == jnp.dtype(np.asarray(y).dtype), k
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=k)


def _tree_of_all():
    return {
        "block": {name: _q(name) for name in SPECS},
        "bias": jnp.arange(6, dtype=jnp.bfloat16),
        "step": jnp.array(7, jnp.int32),
    }


@pytest.mark.parametrize("variant", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_stored_form_is_plain_arrays_with_metadata(variant):
    q = _q("int4_group")
    stored = variant(S.to_checkpoint)({"w": q})["w"]
    assert sorted(stored) == [MARKER, "scale", "values"]  # symmetric signed: no zero point
    meta = json.loads(np.asarray(stored[MARKER]).tobytes())
    assert meta["spec"]["bits"] == 4 and meta["spec"]["group_size"] == 2
    assert meta["shape"] == [8, 6] and meta["dtype"] == "float32"
    assert stored["values"].shape == (8, 3) and stored["values"].dtype == jnp.uint8  # packed
    _assert_same_qarray(q, S.from_checkpoint({"w": stored})["w"])
    # fp8 codes are stored as their bits (uint8), which any array store keeps.
    f8 = variant(S.to_checkpoint)(_q("e4m3_bf16"))
    assert f8["values"].dtype == jnp.uint8
    _assert_same_qarray(_q("e4m3_bf16"), S.from_checkpoint(f8))


@pytest.mark.parametrize("checkpointer", ["standard", "pytree"])
def test_orbax_restore_without_target_gives_qarrays_back(tmp_path, checkpointer):
    tree = _tree_of_all()
    cls = ocp.StandardCheckpointer if checkpointer == "standard" else ocp.PyTreeCheckpointer
    with cls() as ckpt:
        ckpt.save(tmp_path / "ck", S.to_checkpoint(tree))
    with cls() as ckpt, warnings.catch_warnings():
        # PyTreeCheckpointer warns that it reads the shardings from the checkpoint.
        warnings.filterwarnings("ignore", "Sharding info not provided", UserWarning)
        restored = ckpt.restore(tmp_path / "ck")
    back = S.from_checkpoint(restored)
    assert all(isinstance(v, QArray) for v in back["block"].values())
    _assert_same_tree(tree, back)


def test_npz_round_trip_keeps_structure_dtypes_keys_and_none(tmp_path):
    tree = {
        **_tree_of_all(),
        "layers": {0: {"kernel": _q("int8_channel")}, 1: {"kernel": jnp.ones((2, 2))}},
        "list": [jnp.zeros(2, jnp.float8_e4m3fn), None],
        "rng": jax.random.key(3),
    }
    S.save_npz(tmp_path / "p.npz", tree)
    back = S.load_npz(tmp_path / "p.npz")
    assert set(back["layers"]) == {0, 1}  # integer keys kept
    assert isinstance(back["list"], list) and back["list"][1] is None
    assert back["bias"].dtype == jnp.bfloat16 and back["list"][0].dtype == jnp.float8_e4m3fn
    key_data = jax.random.key_data
    np.testing.assert_array_equal(key_data(back["rng"]), key_data(tree["rng"]))
    _assert_same_tree({k: v for k, v in tree.items() if k != "rng"}, {**back, "rng": None})
    # Entries are named by path, so numpy alone reads the plain leaves.
    with np.load(tmp_path / "p.npz", allow_pickle=False) as f:
        np.testing.assert_array_equal(f["step"], 7)
        assert "block/int4_group/values" in f.files


def test_plain_np_savez_of_bfloat16_loads_as_bfloat16(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    np.savez(tmp_path / "p.npz", w=w, b=np.ones(3, np.float32))
    with np.load(tmp_path / "p.npz") as f:
        assert f["w"].dtype.kind == "V" and f["w"].dtype.itemsize == 2  # what numpy gives back
    back = S.load_npz(tmp_path / "p.npz")
    assert back["w"].dtype == jnp.bfloat16 and back["b"].dtype == np.float32
    np.testing.assert_array_equal(back["w"].astype(np.float32), w.astype(np.float32))


def test_nnx_pure_dict_round_trip_through_orbax_restores_the_model(tmp_path):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
            self.out = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x):
            for layer in self.layers:
                x = jax.nn.relu(layer(x))
            return self.out(x)

    pure = nnx.to_pure_dict(nnx.state(Net(nnx.Rngs(0)), nnx.Param))
    qtree, _ = quantize_params(
        pure, [("out", QuantSpec(8, axis=-1)), ("kernel", QuantSpec(4, axis=-1, group_size=4))]
    )
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ck", S.to_checkpoint(qtree))
    with ocp.StandardCheckpointer() as ckpt:
        back = S.from_checkpoint(ckpt.restore(tmp_path / "ck"))
    assert back["layers"]["0"]["kernel"].bits == 4 and back["out"]["kernel"].bits == 8
    _assert_same_tree(qtree, back)
    # The restored (string-keyed) tree loads into a fresh model and computes the same outputs.
    deq = jax.tree.map(
        lambda x: dequantize(x) if isinstance(x, QArray) else x,
        back,
        is_leaf=lambda x: isinstance(x, QArray),
    )
    ref = jax.tree.map(
        lambda x: dequantize(x) if isinstance(x, QArray) else x,
        qtree,
        is_leaf=lambda x: isinstance(x, QArray),
    )
    x = jnp.ones((2, 8))
    outs = []
    for params in (deq, ref):
        model = Net(nnx.Rngs(1))
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, params)
        nnx.update(model, state)
        outs.append(np.asarray(model(x)))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_from_checkpoint_keeps_shardings():
    mesh = jax.make_mesh((8,), ("x",))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32))
    q = jax.jit(lambda x: quantize(x, QuantSpec(8, axis=-1)))(
        jax.device_put(x, NamedSharding(mesh, P(None, "x")))
    )
    back = S.from_checkpoint(S.to_checkpoint(q))
    assert len(back.values.addressable_shards) == 8
    assert back.values.sharding.is_equivalent_to(q.values.sharding, 2)


def test_other_leaves_pass_through_untouched():
    tree = {"w": jnp.ones(3), "n": None, "i": 4, "k": jax.random.key(0), "e": jnp.zeros((0, 3))}
    for f in (S.to_checkpoint, S.from_checkpoint):
        out = f(tree)
        assert out["n"] is None and out["i"] == 4 and out["w"] is tree["w"]
        assert out["k"] is tree["k"] and out["e"].shape == (0, 3)


# --- tampered or foreign data: ValueError naming the function, the path and the cause ----------


def _stored(name="int4_group_affine"):
    return S.to_checkpoint({"a": {"w": _q(name)}})


def _with_meta(edit, name="int4_group_affine"):
    tree = _stored(name)
    meta = json.loads(np.asarray(tree["a"]["w"][MARKER]).tobytes())
    edit(meta)
    tree["a"]["w"][MARKER] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return tree


def _with(key, value, name="int4_group_affine"):
    tree = _stored(name)
    tree["a"]["w"][key] = value(tree["a"]["w"].get(key))
    return tree


def _set(d, k, v):
    d[k] = v


TAMPERED = [
    pytest.param(
        lambda: _with(MARKER, lambda m: np.frombuffer(b"{not json", np.uint8)),
        "metadata is not JSON",
        id="meta-not-json",
    ),
    pytest.param(
        lambda: _with(MARKER, lambda m: np.asarray(m, np.float32)),
        "1-D uint8",
        id="meta-float",
    ),
    pytest.param(lambda: _with_meta(lambda m: _set(m, "format", "x")), "format", id="format"),
    pytest.param(
        lambda: _with_meta(lambda m: _set(m, "version", 9)),
        r"version 9 is not one of \(1, 2\)",
        id="version",
    ),
    pytest.param(lambda: _with_meta(lambda m: m.pop("shape")), "lacks", id="no-shape"),
    pytest.param(
        lambda: _with_meta(lambda m: _set(m["spec"], "bits", 5)), "spec .* is invalid", id="bits-5"
    ),
    pytest.param(
        lambda: _with_meta(lambda m: _set(m["spec"], "colour", 1)), "is invalid", id="spec-field"
    ),
    pytest.param(
        # group_size 3 fits the axis of 8 (a shorter last group) but not the stored 2 scale rows.
        lambda: _with_meta(lambda m: _set(m["spec"], "group_size", 3)),
        r"scale is float32\[2, 1, 6\], expected float32\[3, 1, 6\]",
        id="group-size",
    ),
    pytest.param(
        lambda: _with_meta(lambda m: _set(m["spec"], "group_axis", 5)),
        "does not fit shape",
        id="group-axis",
    ),
    pytest.param(
        lambda: _with_meta(lambda m: _set(m, "shape", [8, 8])),
        r"values is uint8\[8, 3\], expected uint8\[8, 4\]",
        id="shape",
    ),
    pytest.param(
        lambda: _with_meta(lambda m: _set(m, "shape", [8, -6])), "non-negative", id="neg-shape"
    ),
    pytest.param(
        lambda: _with_meta(lambda m: _set(m, "dtype", "int32")), "floating dtype", id="int-dtype"
    ),
    pytest.param(
        lambda: _with_meta(lambda m: _set(m, "dtype", "float99")), "unknown dtype", id="dtype"
    ),
    pytest.param(
        lambda: _with_meta(lambda m: _set(m, "values_dtype", "float99")),
        "values_dtype 'float99' is not uint8",
        id="values-dtype",
    ),
    pytest.param(
        lambda: _with_meta(lambda m: _set(m["spec"], "signed", True)),
        "zero_point is uint8.*expected int8",
        id="signedness",
    ),
    pytest.param(
        lambda: _with("values", lambda v: v[:-1]),
        r"values is uint8\[7, 3\], expected uint8\[8, 3\]",
        id="values-shape",
    ),
    pytest.param(
        lambda: _with("scale", lambda s: s[..., :1]), "scale is float32", id="scale-shape"
    ),
    pytest.param(
        lambda: _with("scale", lambda s: s.at[0].set(jnp.nan)), "non-finite", id="scale-nan"
    ),
    pytest.param(lambda: _with("scale", lambda s: s * 0), "zero, negative", id="scale-zero"),
    pytest.param(
        lambda: _with("zero_point", lambda z: None), "zero_point must be an array", id="zp-missing"
    ),
    pytest.param(
        lambda: _with("zero_point", lambda z: jnp.zeros((1,), jnp.int8), name="int8_channel"),
        r"zero_point is int8\[1\], expected int8\[1, 6\]",
        id="zp-shape",
    ),
    pytest.param(
        lambda: _with("zero_point", lambda z: jnp.zeros((1, 6), jnp.int8), name="e4m3_bf16"),
        "zero_point given but spec",
        id="zp-fp8",
    ),
    pytest.param(
        lambda: _with("zero_point", lambda z: z.at[0].set(200)),
        r"zero_point outside \[0, 15\]",
        id="zp-range",
    ),
    pytest.param(  # 3-bit codes: 6 a row take one 3-byte word, not 3 nibble bytes
        lambda: _with("values", lambda v: v[:, :2], name="int3_affine"),
        r"values is uint8\[8, 2\], expected uint8\[8, 3\]",
        id="int3-values-shape",
    ),
    pytest.param(lambda: _with("extra", lambda _: jnp.ones(2)), "unexpected keys", id="extra-key"),
    pytest.param(lambda: _with("values", lambda _: None), "'values' is missing", id="no-values"),
]


@pytest.mark.parametrize("make, cause", TAMPERED)
def test_tampered_stored_qarray_raises_naming_the_path(make, cause):
    with pytest.raises(ValueError, match=rf"checkpoints.from_checkpoint: .*'a/w'.*{cause}"):
        S.from_checkpoint(make())


@pytest.mark.parametrize("signed", [True, False])
def test_version_1_int3_in_nibbles_loads_repacked(signed):
    """A version-1 checkpoint (3-bit codes one a nibble) loads with the same codes, repacked
    8 to 3 bytes; so does a spec-less one restored with like=."""
    x = jnp.asarray(np.random.default_rng(5).normal(size=(8, 13)).astype(np.float32))
    q = quantize(x, QuantSpec(3, axis=-1, group_size=4, signed=signed, symmetric=False))
    tree = S.to_checkpoint({"a": {"w": q}})
    old = tree["a"]["w"]
    meta = json.loads(np.asarray(old[MARKER]).tobytes())
    assert meta["version"] == 2 and old["values"].shape == (8, 6)  # 13 codes: two 3-byte words
    meta["version"] = 1
    old[MARKER] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    old["values"] = pack(q.codes(), 4)  # the version-1 layout: (8, 7) nibble bytes
    back = S.from_checkpoint(tree)["a"]["w"]
    np.testing.assert_array_equal(back.values, q.values)
    np.testing.assert_array_equal(back.codes(), q.codes())
    plain = {k: v for k, v in old.items() if k != MARKER}
    restored = S.restore_qarrays({"a": {"w": plain}}, like={"a": {"w": q}})
    np.testing.assert_array_equal(restored["a"]["w"].codes(), q.codes())


def test_plain_qarray_bits_only_when_one_width_fits():
    scale = np.ones((2, 1, 16), np.float32)
    for bits, m in ((8, 16), (4, 8), (3, 6), (2, 4)):
        v = np.zeros((8, m), np.uint8)
        assert S.plain_qarray_bits({"values": v, "scale": scale}) == (bits, (8, 16))
    five = np.ones((2, 1, 5), np.float32)  # 5 codes take 3 bytes at 4 bits and at 3 bits
    assert S.plain_qarray_bits({"values": np.zeros((8, 3), np.uint8), "scale": five}) == (
        None,
        None,
    )


def test_save_npz_rejects_objects_and_name_clashes(tmp_path):
    with pytest.raises(TypeError, match=r"save_npz: leaf 'a' is a object"):
        S.save_npz(tmp_path / "x.npz", {"a": object()})
    with pytest.raises(ValueError, match=r"save_npz: two leaves are both named 'a/b'"):
        S.save_npz(tmp_path / "x.npz", {"a/b": jnp.ones(1), "a": {"b": jnp.ones(1)}})


@pytest.mark.parametrize("name", ["to_checkpoint", "from_checkpoint", "save_npz", "load_npz"])
def test_quant_storage_is_a_deprecated_alias(name, tmp_path):
    """Each function of the old module warns once per call and gives what checkpoints gives."""
    tree = {"w": _q("int4_group"), "b": jnp.ones(3)}
    args = {
        "to_checkpoint": (tree,),
        "from_checkpoint": (S.to_checkpoint(tree),),
        "save_npz": (tmp_path / "a.npz", tree),
        "load_npz": (tmp_path / "b.npz",),
    }[name]
    S.save_npz(tmp_path / "b.npz", tree)
    with pytest.warns(
        DeprecationWarning,
        match=rf"quant.storage.{name} is deprecated.*"
        rf"use jaxslim.checkpoints.{name}",
    ) as record:
        got = getattr(storage, name)(*args)
    assert len(record) == 1
    want = getattr(S, name)(*(args if name != "save_npz" else (tmp_path / "c.npz", tree)))
    if name == "save_npz":
        got, want = S.load_npz(tmp_path / "a.npz"), S.load_npz(tmp_path / "c.npz")
    _assert_same_tree(
        got if name != "to_checkpoint" else S.from_checkpoint(got),
        want if name != "to_checkpoint" else S.from_checkpoint(want),
    )
    assert storage.MARKER == "__jaxslim_qarray__"
