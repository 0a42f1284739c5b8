"""checkpoints.open on Hugging Face safetensors directories: names, shapes, dtypes, exact values,
shards, lazy reads."""

import json
import os
import struct
import sys

import ml_dtypes
import numpy as np
import pytest

from jaxslim import checkpoints

pytest.importorskip("safetensors")
pytest.importorskip("gguf")  # conftest's writers


def _mixed(weights):
    """The same weights stored as bf16 / f16 / f32 (one dtype per kind of tensor)."""
    out = {}
    for name, w in weights.items():
        if "proj" in name:
            out[name] = w.astype(ml_dtypes.bfloat16)
        elif "embed" in name or "lm_head" in name:
            out[name] = w.astype(np.float16)
        else:
            out[name] = w
    return out


@pytest.mark.parametrize("shards", [1, 3])
def test_names_shapes_dtypes_values(tmp_path, config, helpers, shards):
    weights = _mixed(helpers.hf_weights(config))
    path = helpers.write_hf(tmp_path / "m", weights, config, shards=shards)
    with checkpoints.open(path) as src:
        assert src.format == "hf" and src.path == str(path)
        assert src.config == config
        assert src.metadata == {"format": "pt"}
        assert sorted(src.names()) == sorted(weights)
        assert src.names().index("model.layers.1.mlp.up_proj.weight") > src.names().index(
            "model.layers.0.self_attn.v_proj.weight"
        )
        for name, w in weights.items():
            assert src.shape(name) == w.shape
            assert src.dtype(name) == w.dtype
            got = src.read(name)
            assert got.dtype == w.dtype and got.shape == w.shape
            np.testing.assert_array_equal(got.view(np.uint8), w.view(np.uint8))  # bit-exact
        q = "model.layers.0.self_attn.q_proj.weight"
        assert src.dtype(q) == np.dtype(ml_dtypes.bfloat16)
        f32 = src.read(q, dtype=np.float32)
        assert f32.dtype == np.float32
        np.testing.assert_array_equal(f32, weights[q].astype(np.float32))


def test_read_tree_and_tokenizer(tmp_path, config, helpers):
    weights = helpers.hf_weights(config)
    path = helpers.write_hf(tmp_path / "m", weights, config, tokenizer='{"version": "1.0"}')
    with checkpoints.open(path) as src:
        tree = checkpoints.read_tree(src)
        assert list(tree) == src.names()
        for name, w in weights.items():
            np.testing.assert_array_equal(tree[name], w)
        assert src.tokenizer_json() == '{"version": "1.0"}'
        tree16 = checkpoints.read_tree(src, dtype=np.float16)
        assert all(a.dtype == np.float16 for a in tree16.values())
    other = helpers.write_hf(tmp_path / "n", weights, config)
    with checkpoints.open(other) as src:
        assert src.tokenizer_json() is None


def test_read_returns_independent_writable_arrays(tmp_path, config, helpers):
    weights = helpers.hf_weights(config)
    path = helpers.write_hf(tmp_path / "m", weights, config)
    src = checkpoints.open(path)
    a = src.read("model.norm.weight")
    src.close()
    a += 1  # owned memory, valid after close
    np.testing.assert_array_equal(a, weights["model.norm.weight"] + 1)


def test_unknown_name_is_a_key_error(tmp_path, config, helpers):
    path = helpers.write_hf(tmp_path / "m", helpers.hf_weights(config), config)
    with checkpoints.open(path) as src, pytest.raises(KeyError, match="q_proj"):
        src.read("model.layers.0.self_attn.q_proj")
    with checkpoints.open(path) as src, pytest.raises(KeyError, match="no tensor 'w'"):
        src.shape("w")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sparse files and /proc")
def test_reads_are_lazy_on_a_4gb_sparse_checkpoint(tmp_path):
    """A shard whose 4 GiB tensor is a hole on disk: opening it and reading the small tensor
    must not read (or allocate) the big one."""
    big = 1 << 30  # float32 elements: 4 GiB
    header = {
        "model.norm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "model.embed_tokens.weight": {
            "dtype": "F32",
            "shape": [1 << 20, 1 << 10],
            "data_offsets": [16, 16 + 4 * big],
        },
    }
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    d = tmp_path / "sparse"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.write(np.arange(4, dtype="<f4").tobytes())
        f.truncate(8 + len(blob) + 16 + 4 * big)
    before = _rss_bytes()
    with checkpoints.open(d) as src:
        assert src.shape("model.embed_tokens.weight") == (1 << 20, 1 << 10)
        np.testing.assert_array_equal(src.read("model.norm.weight"), np.arange(4.0))
    assert _rss_bytes() - before < 256 << 20
