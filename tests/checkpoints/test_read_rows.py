"""Source.read_rows: only the asked rows of a tensor (the calibration tokens of an embedding
table), bit-exact, from a Hugging Face directory and (reading the tensor first) a GGUF file."""

import ml_dtypes
import numpy as np
import pytest

from jaxslim import checkpoints

pytest.importorskip("safetensors")
pytest.importorskip("gguf")  # conftest's writers

EMBED = "model.embed_tokens.weight"


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_rows_equal_read_then_index(tmp_path, config, helpers, dtype):
    weights = {k: v.astype(dtype) for k, v in helpers.hf_weights(config).items()}
    path = helpers.write_hf(tmp_path / "m", weights, config, shards=2)
    rows = np.array([5, 0, 5, config["vocab_size"] - 1, 3])
    with checkpoints.open(path) as src:
        got = src.read_rows(EMBED, rows)
        assert got.dtype == np.dtype(dtype) and got.shape == (5, config["hidden_size"])
        np.testing.assert_array_equal(got.view(np.uint8), weights[EMBED][rows].view(np.uint8))
        f32 = src.read_rows(EMBED, rows, dtype=np.float32)
        np.testing.assert_array_equal(f32, weights[EMBED][rows].astype(np.float32))
        assert src.read_rows(EMBED, np.array([], int)).shape == (0, config["hidden_size"])


def test_rows_out_of_range_name_the_tensor(tmp_path, config, helpers):
    path = helpers.write_hf(tmp_path / "m", helpers.hf_weights(config), config)
    with checkpoints.open(path) as src, pytest.raises(ValueError, match="embed_tokens.*rows must"):
        src.read_rows(EMBED, [config["vocab_size"]])


def test_gguf_rows_equal_read(tmp_path, config, helpers):
    weights = helpers.hf_weights(config)
    path = tmp_path / "m.gguf"
    helpers.write_gguf(path, weights, config)
    rows = np.array([2, 7, 2])
    with checkpoints.open(path) as src:
        np.testing.assert_array_equal(src.read_rows(EMBED, rows), src.read(EMBED)[rows])
