"""models.compress_streamed with rules that leave whole layers float: those layers are written as
they were read, the selected ones quantized as in memory."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")
from safetensors.numpy import save_file  # noqa: E402

from jaxslim import models, quant  # noqa: E402
from jaxslim.models._stream import compress_streamed, load_streamed  # noqa: E402

HF = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "vocab_size": 50,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def test_rules_selecting_layer_0_only(tmp_path):
    cfg = models.Config.from_hf(HF)
    params = models.init(
        jax.random.key(0), cfg, vocab=50, hidden=32, layers=2, heads=4, kv_heads=2,
        intermediate=64, scale=0.3,
    )  # fmt: skip
    src = tmp_path / "src"
    src.mkdir()
    save_file(models.to_hf_tensors(params, cfg), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(HF))
    loaded, _, _ = models.load(src)
    calib = np.asarray(jax.random.randint(jax.random.key(1), (4, 12), 0, 50, jnp.int32))
    rules = [(r"^layers/0/(q|k|v|o|gate|up|down)$", quant.QuantSpec(8, axis=-1))]
    compress_streamed(src, tmp_path / "out", calib, quant_rules=rules, progress=False)
    out, _, _ = load_streamed(tmp_path / "out")
    layer0, layer1 = out["layers"][0], out["layers"][1]
    kernels = ("q", "k", "v", "o", "gate", "up", "down")
    assert all(isinstance(layer0[k], quant.QArray) for k in kernels)
    for name, leaf in layer1.items():  # untouched: float and bit-identical to the source
        assert not isinstance(leaf, quant.QArray), name
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(loaded["layers"][1][name]))
