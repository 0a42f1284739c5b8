"""Hugging Face and compressed-tensors export: tensors read back with safetensors equal the tree
(HF names, (out, in)); compressed-tensors codes unpacked by the layout's rules give back
`quant.dequantize` exactly (float32 scales); configs; bad input. The package's own decompression
and transformers' loading are checked in tests/interop."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")
from safetensors.numpy import load_file  # noqa: E402

from jaxslim import models, quant  # noqa: E402
from jaxslim.checkpoints._export_safetensors import (  # noqa: E402
    export_compressed_tensors,
    export_hf,
    pack_int32,
)

HD = 8
HF = {"model_type": "llama", "head_dim": HD, "rope_theta": 10000.0, "rms_norm_eps": 1e-5}
KERNELS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def load_json(path):
    return json.loads(pathlib.Path(path).read_text())


@pytest.fixture
def tiny_sizes():
    """Wide enough for the 128-column groups of compressed-tensors."""
    return dict(vocab=48, d=256, layers=2, heads=16, kv=8, f=384)


def quantize_tree(params, spec):
    out = dict(params, layers=[dict(lp) for lp in params["layers"]])
    for lp in out["layers"]:
        for k in KERNELS:
            lp[k] = quant.quantize(lp[k], spec)
    return out


def test_export_hf_names_layout_and_pruned_config(tmp_path, tiny):
    params = tiny(jax.random.key(0), heads=2, kv=1, f=40, layers=3)  # a "pruned" tree
    params["layers"][1]["up"] = quant.quantize(params["layers"][1]["up"], quant.QuantSpec(8))
    d = export_hf(tmp_path / "hf", params, dict(HF, hidden_size=999, num_attention_heads=9))
    t = load_file(f"{d}/model.safetensors")
    cfg = load_json(f"{d}/config.json")
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        256,
        2,
        1,
    )
    assert (cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (40, 3, 48)
    assert len(t) == 1 + 3 * 9 + 2
    np.testing.assert_array_equal(t["model.embed_tokens.weight"], params["embed"])
    np.testing.assert_array_equal(t["lm_head.weight"], np.asarray(params["lm_head"]).T)
    np.testing.assert_array_equal(t["model.layers.2.self_attn.q_proj.weight"].shape, (16, 256))
    np.testing.assert_array_equal(
        t["model.layers.1.mlp.up_proj.weight"], np.asarray(params["layers"][1]["up"].dequantize()).T
    )
    np.testing.assert_array_equal(t["model.norm.weight"], params["norm"])


def test_export_hf_with_models_config_and_f16(tmp_path, tiny):
    cfg = models.Config(head_dim=HD, tie_word_embeddings=True)
    params = tiny(jax.random.key(1), tied=True, layers=1)
    d = export_hf(tmp_path / "hf", params, cfg, dtype="float16", tokenizer_json='{"x": 1}')
    t = load_file(f"{d}/model.safetensors")
    assert "lm_head.weight" not in t
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == np.float16
    assert load_json(f"{d}/config.json")["tie_word_embeddings"] is True
    assert pathlib.Path(f"{d}/tokenizer.json").read_text() == '{"x": 1}'


def test_export_hf_bfloat16(tmp_path, tiny):
    from safetensors import safe_open

    params = tiny(jax.random.key(2), layers=1)
    d = export_hf(tmp_path / "hf", params, HF, dtype="bfloat16")
    with safe_open(f"{d}/model.safetensors", "flax") as f:
        x = f.get_tensor("model.layers.0.self_attn.o_proj.weight")
    assert x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(x, jnp.asarray(params["layers"][0]["o"]).T.astype(jnp.bfloat16))


def unpack4(packed, cols):
    """compressed-tensors' 4-bit unpacking (`unpack_from_int32`): eight nibbles per little-endian
    int32 word, element 8w + j in nibble j, stored + 8."""
    b = np.ascontiguousarray(packed).view(np.uint8)
    n = np.stack([b & 0xF, b >> 4], axis=-1).reshape(packed.shape[0], -1)[:, :cols]
    return n.astype(np.int32) - 8


@pytest.mark.parametrize(
    "spec",
    [
        quant.QuantSpec(4, axis=-1, group_size=128),
        quant.QuantSpec(4, axis=-1, group_size=128, symmetric=False),
        quant.QuantSpec(4, axis=-1, group_size=64, signed=False, symmetric=False),
        quant.QuantSpec(4, axis=-1),
    ],
)
def test_pack_quantized_w4a16(tmp_path, spec, tiny):
    params = quantize_tree(tiny(jax.random.key(3)), spec)
    d = export_compressed_tensors(tmp_path / "ct", params, HF)
    t = load_file(f"{d}/model.safetensors")
    qc = load_json(f"{d}/config.json")["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    w = group["weights"]
    assert (w["num_bits"], w["symmetric"], group["targets"]) == (4, spec.symmetric, ["Linear"])
    assert w["strategy"] == ("group" if spec.group_size else "channel")
    assert w["group_size"] == spec.group_size and group["input_activations"] is None
    for i, lp in enumerate(params["layers"]):
        for k, stem in KERNELS.items():
            q, name = lp[k], f"model.layers.{i}.{stem}"
            out, inn = q.shape[1], q.shape[0]
            assert t[f"{name}.weight_packed"].dtype == np.int32
            assert t[f"{name}.weight_packed"].shape == (out, inn // 8)
            np.testing.assert_array_equal(t[f"{name}.weight_shape"], [out, inn])
            scale = t[f"{name}.weight_scale"]
            assert scale.shape == (out, inn // (spec.group_size or inn))
            codes = unpack4(t[f"{name}.weight_packed"], inn)
            g = spec.group_size or inn
            if spec.symmetric:
                assert f"{name}.weight_zero_point" not in t
                zp = 0
            else:
                zpk = t[f"{name}.weight_zero_point"]
                assert zpk.shape == (out // 8, inn // g)
                zp = unpack4(np.ascontiguousarray(zpk.T), out).T.repeat(g, axis=1)
            got = (codes - zp).astype(np.float32) * scale.repeat(g, axis=1)
            np.testing.assert_array_equal(got, np.asarray(q.dequantize()).T, err_msg=name)
    np.testing.assert_array_equal(t["lm_head.weight"], np.asarray(params["lm_head"]).T)


def test_int_quantized_w8a8(tmp_path, tiny):
    params = quantize_tree(tiny(jax.random.key(4), layers=1), quant.QuantSpec(8, axis=-1))
    d = export_compressed_tensors(tmp_path / "ct", params, HF, scale_dtype="float16")
    t = load_file(f"{d}/model.safetensors")
    qc = load_json(f"{d}/config.json")["quantization_config"]
    assert qc["format"] == "int-quantized"
    (group,) = qc["config_groups"].values()
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8
    a = group["input_activations"]
    assert (a["strategy"], a["dynamic"], a["num_bits"], a["symmetric"]) == ("token", True, 8, True)
    q = params["layers"][0]["gate"]
    w, s = t["model.layers.0.mlp.gate_proj.weight"], t["model.layers.0.mlp.gate_proj.weight_scale"]
    assert w.dtype == np.int8 and s.dtype == np.float16 and s.shape == (q.shape[1], 1)
    np.testing.assert_array_equal(w, np.asarray(q.codes()).T)
    # float16 scales: the export error is exactly |q| * |f16(s) - s|, relative <= 2^-11.
    want = np.asarray(q.dequantize()).T
    got = w.astype(np.float32) * s.astype(np.float32)
    s32 = np.asarray(q.scale).T
    bound = np.abs(w.astype(np.float32)) * np.abs(s.astype(np.float32) - s32)
    assert np.all(np.abs(got - want) <= bound + 2.0**-23 * np.abs(want))
    assert np.abs(got - want).max() <= 2.0**-11 * np.abs(want).max()


def _raw_tensors(path):
    """``{name: (dtype tag, shape, bytes)}`` of a .safetensors file, read by hand (numpy has no
    float8 dtype for ``safetensors.numpy``)."""
    raw = pathlib.Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n :]
    return {
        k: (v["dtype"], tuple(v["shape"]), data[slice(*v["data_offsets"])])
        for k, v in header.items()
    }


@pytest.mark.parametrize(
    "spec, strategy, block",
    [
        (quant.QuantSpec(fmt="e4m3", axis=-1), "channel", None),
        (quant.QuantSpec(fmt="e4m3"), "tensor", None),
        (quant.QuantSpec(fmt="e4m3", group_size=(128, 128)), "block", [128, 128]),
    ],
    ids=["channel", "tensor", "block"],
)
def test_float_quantized_fp8(tmp_path, spec, strategy, block, tiny):
    import ml_dtypes

    params = quantize_tree(tiny(jax.random.key(8), layers=1), spec)
    d = export_compressed_tensors(tmp_path / "ct", params, HF)
    qc = load_json(f"{d}/config.json")["quantization_config"]
    assert qc["format"] == "float-quantized"
    (group,) = qc["config_groups"].values()
    w = group["weights"]
    assert (w["type"], w["num_bits"], w["strategy"], w["block_structure"]) == (
        "float",
        8,
        strategy,
        block,
    )
    assert group["input_activations"] is None  # weight-only FP8
    t = _raw_tensors(f"{d}/model.safetensors")
    q = params["layers"][0]["gate"]  # (d, f) -> HF (f, d)
    tag, shape, data = t["model.layers.0.mlp.gate_proj.weight"]
    assert tag == "F8_E4M3" and shape == (q.shape[1], q.shape[0])
    codes = np.frombuffer(data, ml_dtypes.float8_e4m3fn).reshape(shape)
    stag, sshape, sdata = t["model.layers.0.mlp.gate_proj.weight_scale"]
    scale = np.frombuffer(sdata, np.float32).reshape(sshape)
    want_shape = {"channel": (shape[0], 1), "tensor": (1,)}.get(
        strategy, (-(-shape[0] // 128), -(-shape[1] // 128))
    )
    assert stag == "F32" and sshape == want_shape
    full = scale if strategy != "block" else np.repeat(np.repeat(scale, 128, 0), 128, 1)
    full = np.broadcast_to(full[: shape[0], : shape[1]] if strategy == "block" else full, shape)
    np.testing.assert_array_equal(codes.astype(np.float32) * full, np.asarray(q.dequantize()).T)


def test_mixed_precision_and_float_kernels(tmp_path, tiny):
    params = tiny(jax.random.key(5), layers=2)
    lp0, lp1 = params["layers"]
    for k in ("q", "k", "v", "o"):
        lp0[k] = quant.quantize(lp0[k], quant.QuantSpec(8, axis=-1))
    for k in ("gate", "up", "down"):
        lp0[k] = quant.quantize(lp0[k], quant.QuantSpec(4, axis=-1, group_size=128))
    d = export_compressed_tensors(tmp_path / "ct", params, HF)
    qc = load_json(f"{d}/config.json")["quantization_config"]
    assert qc["format"] == "mixed-precision"
    assert {g["format"] for g in qc["config_groups"].values()} == {
        "int-quantized",
        "pack-quantized",
    }
    assert "model.layers.1.mlp.up_proj" in qc["ignore"] and "lm_head" in qc["ignore"]
    t = load_file(f"{d}/model.safetensors")
    np.testing.assert_array_equal(t["model.layers.1.mlp.up_proj.weight"], np.asarray(lp1["up"]).T)


def test_pack_int32_matches_general_bit_layout():
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 5, 8):
        u = rng.integers(0, 2**bits, size=(3, 70)).astype(np.uint32)
        p = pack_int32(u, bits).view(np.uint32)
        assert p.shape == (3, -(-70 * bits // 32))
        stream = np.unpackbits(p.view(np.uint8), axis=1, bitorder="little")
        back = stream[:, : 70 * bits].reshape(3, 70, bits)
        got = (back.astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(-1)
        np.testing.assert_array_equal(got, u, err_msg=f"{bits} bits")


@pytest.mark.parametrize(
    "spec,match",
    [
        (quant.QuantSpec(4, fmt="nf4", axis=-1, group_size=64), "nf4"),
        (quant.QuantSpec(4, axis=0), "per input channel"),
        (quant.QuantSpec(4, axis=-1, group_size=96), "does not divide"),
        (quant.QuantSpec(8, axis=-1, symmetric=False), "W8A8"),
        (quant.QuantSpec(fmt="e4m3", axis=-1, group_size=64), "fp8 is stored per output"),
    ],
)
def test_unsupported_spec(tmp_path, spec, match, tiny):
    params = tiny(jax.random.key(6), layers=1)
    for k in ("gate", "up"):
        params["layers"][0][k] = quant.quantize(params["layers"][0][k], spec)
    with pytest.raises(ValueError, match=f"'layers/0/gate'.*{match}.*QuantSpec"):
        export_compressed_tensors(tmp_path / "ct", params, HF)


def test_bad_input(tmp_path, tiny):
    params = tiny(jax.random.key(7), layers=1)
    params["layers"][0]["q"] = quant.quantize(params["layers"][0]["q"], quant.QuantSpec(8, axis=-1))
    with pytest.raises(ValueError, match=r"layers/0/\{q,k,v\}.*one scheme"):
        export_compressed_tensors(tmp_path / "ct", params, HF)
    with pytest.raises(ValueError, match="does not exist"):
        export_hf(tmp_path / "a" / "b", tiny(jax.random.key(7), layers=1), HF)
    emb = dict(tiny(jax.random.key(7), layers=1))
    emb["embed"] = quant.quantize(emb["embed"], quant.QuantSpec(8, axis=0))
    with pytest.raises(ValueError, match="'embed'.*Linear weights only"):
        export_compressed_tensors(tmp_path / "ct", emb, HF)
    with pytest.raises(ValueError, match="dtype"):
        export_hf(tmp_path / "hf", emb, HF, dtype="int8")
    with pytest.raises(TypeError, match="config"):
        export_hf(tmp_path / "hf", emb, "llama")
    assert not list(tmp_path.iterdir())
