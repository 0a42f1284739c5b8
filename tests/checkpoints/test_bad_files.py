"""Bad checkpoints: every one a ValueError naming the file, the tensor if any, and the fix."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxslim import checkpoints

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match=r"open: .*nowhere.* does not exist; pass a Hugging Face"):
        checkpoints.open(tmp_path / "nowhere")


def test_directory_without_config(tmp_path, config, helpers):
    path = helpers.write_hf(tmp_path / "m", helpers.hf_weights(config), config)
    os.remove(path / "config.json")
    with pytest.raises(ValueError, match=r"'.*m': has no config.json; copy the model's config"):
        checkpoints.open(path)


def test_pytorch_pickles_are_refused_not_unpickled(tmp_path):
    d = tmp_path / "torch"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 would-be pickle, never loaded")
    with pytest.raises(
        ValueError, match=r"pytorch_model.bin.*never unpickles; convert .*safetensors"
    ):
        checkpoints.open(d)


def test_empty_directory(tmp_path):
    with pytest.raises(ValueError, match="has no model.safetensors and no model.safetensors.index"):
        checkpoints.open(tmp_path)


def test_missing_shard(tmp_path, config, helpers):
    path = helpers.write_hf(tmp_path / "m", helpers.hf_weights(config), config, shards=3)
    os.remove(path / "model-00002-of-00003.safetensors")
    with pytest.raises(
        ValueError,
        match=r"model.safetensors.index.json': lists shard 'model-00002-of-00003.safetensors'"
        r".*does not exist; download the missing shard",
    ):
        checkpoints.open(path)


def test_index_names_a_tensor_its_shard_lacks(tmp_path, config, helpers):
    path = helpers.write_hf(tmp_path / "m", helpers.hf_weights(config), config, shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match=r"00001-of-00002.safetensors': has no tensor 'model.layers.9"
    ):
        checkpoints.open(path)


def test_truncated_safetensors(tmp_path, config, helpers):
    path = helpers.write_hf(tmp_path / "m", helpers.hf_weights(config), config)
    file = path / "model.safetensors"
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 100)
    with pytest.raises(ValueError, match=r"model.safetensors': truncated or corrupt .*download it"):
        checkpoints.open(path)


def test_not_a_safetensors_file(tmp_path, config):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").write_bytes(b"<html>404 Not Found</html>" * 10)
    with pytest.raises(ValueError, match=r"model.safetensors': .*(corrupt|truncated)"):
        checkpoints.open(d)


def test_shape_disagrees_with_config(tmp_path, config, helpers):
    weights = helpers.hf_weights(config)
    q = "model.layers.1.self_attn.q_proj.weight"
    weights[q] = weights[q][:32]  # 2 heads of 16, config says 4
    path = helpers.write_hf(tmp_path / "m", weights, config)
    with pytest.raises(
        ValueError,
        match=rf"tensor '{q}' has shape \(32, 64\) but the config .* says "
        r"\(64, 64\).*fix config.json",
    ):
        checkpoints.open(path)
    with checkpoints.open(path, check=False) as src:  # the escape hatch the message names
        assert src.shape(q) == (32, 64)


def test_layer_beyond_num_hidden_layers(tmp_path, config, helpers):
    weights = helpers.hf_weights(config | {"num_hidden_layers": 3})
    path = helpers.write_hf(tmp_path / "m", weights, config)
    with pytest.raises(ValueError, match=r"'model.layers.2.*num_hidden_layers=2"):
        checkpoints.open(path)


def test_gguf_shape_disagrees_with_metadata(tmp_path, config, helpers):
    weights = helpers.hf_weights(config | {"intermediate_size": 64})
    helpers.write_gguf(tmp_path / "m.gguf", weights, config)
    with pytest.raises(ValueError, match=r"m.gguf'.*mlp.*has shape .* but the config"):
        checkpoints.open(tmp_path / "m.gguf")


def test_truncated_gguf(tmp_path, config, helpers):
    path = tmp_path / "m.gguf"
    helpers.write_gguf(path, helpers.hf_weights(config), config)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    with pytest.raises(
        ValueError, match=r"m.gguf': the file is truncated: tensor '.*' needs bytes"
    ):
        checkpoints.open(path)
    with open(path, "r+b") as f:
        f.truncate(200)  # inside the metadata
    with pytest.raises(ValueError, match=r"m.gguf': corrupt or truncated GGUF .*download it again"):
        checkpoints.open(path)


def test_wrong_magic(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ValueError, match=r"m.gguf': not a GGUF file \(it starts with b'GGML'"):
        checkpoints.open(path)
    other = tmp_path / "weights.npz"
    other.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"weights.npz' is neither a directory nor a GGUF file"):
        checkpoints.open(other)


def test_unknown_gguf_tensor_type(tmp_path, config, helpers):
    path = tmp_path / "m.gguf"
    helpers.write_gguf(path, helpers.hf_weights(config), config)
    field = next(t.field for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_up.weight")
    offset = field.offset + sum(int(p.nbytes) for p in field.parts[:4])
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.uint32(99).tobytes())
    with pytest.raises(
        ValueError, match=r"tensor 'blk.1.ffn_up.weight' has GGML type id 99.*upgrade"
    ):
        checkpoints.open(path)


def test_gguf_type_that_gguf_cannot_dequantize(tmp_path):
    for qtype in Q:
        if qtype in gguf.GGML_QUANT_SIZES and not qtype.name.startswith(("F", "I", "BF")):
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            try:
                gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
            except NotImplementedError:
                break
    else:
        pytest.skip("this gguf dequantizes every type it knows")
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((2, 2 * size), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        ValueError, match=rf"'blk.0.ffn_up.weight' is {qtype.name}, which .* cannot"
    ):
        checkpoints.open(tmp_path / "m.gguf")


def test_unknown_architecture(tmp_path, config, helpers):
    path = tmp_path / "m.gguf"
    helpers.write_gguf(path, {}, config, arch="gpt2")
    with pytest.raises(
        ValueError, match=r"m.gguf': architecture 'gpt2' is not supported \(known: "
    ):
        checkpoints.open(path)


def test_tensor_without_hf_name(tmp_path, config, helpers):
    path = tmp_path / "m.gguf"
    helpers.write_gguf(
        path, {}, config, extra={"blk.0.ffn_gate_exps.weight": (np.zeros(4, np.float32), None)}
    )
    with pytest.raises(
        ValueError, match=r"tensor 'blk.0.ffn_gate_exps.weight' has no Hugging Face"
    ):
        checkpoints.open(path)


def test_closed_gguf_source(tmp_path, config, helpers):
    path = tmp_path / "m.gguf"
    helpers.write_gguf(path, helpers.hf_weights(config), config)
    src = checkpoints.open(path)
    src.close()
    with pytest.raises(ValueError, match="was closed; open it again"):
        src.read("model.norm.weight")


@pytest.mark.parametrize(("module", "kind"), [("gguf", "gguf"), ("safetensors", "hf")])
def test_missing_optional_dependency(tmp_path, config, helpers, monkeypatch, module, kind):
    weights = helpers.hf_weights(config)
    if kind == "gguf":
        path = tmp_path / "m.gguf"
        helpers.write_gguf(path, weights, config)
    else:
        path = helpers.write_hf(tmp_path / "m", weights, config)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(
        ImportError, match=rf"needs the '{module}' package.*pip install 'jaxslim\[models\]'"
    ):
        checkpoints.open(path)


def test_import_does_not_load_optional_dependencies():
    code = (
        "import sys, jaxslim.checkpoints; "
        "bad = [m for m in ('safetensors', 'gguf', 'tokenizers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env=os.environ | {"JAX_PLATFORMS": "cpu"}
    )
