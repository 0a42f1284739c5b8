"""jaxslim.models: HF tensor mapping, load over a checkpoint source, the tokenizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import models

HF = {
    "model_type": "qwen3",
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "vocab_size": 50,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
    "eos_token_id": 2,
}


def _random_tree(cfg, **kw):
    sizes = dict(vocab=50, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=40)
    return models.init(jax.random.key(0), cfg, **{**sizes, **kw}, scale=0.3)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_tensor_round_trip(tied):
    hf = {**HF, "tie_word_embeddings": tied}
    cfg = models.Config.from_hf(hf)
    params = _random_tree(cfg)
    tensors = models.to_hf_tensors(params, cfg)
    assert ("lm_head.weight" in tensors) == (not tied)
    assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (32, 32)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (32, 40)  # (out, in)
    assert tensors["model.layers.0.self_attn.k_norm.weight"].shape == (8,)
    names = [*tensors, "model.layers.0.self_attn.rotary_emb.inv_freq"]  # ignored
    back, cfg2 = models.from_hf_tensors(cfg.to_hf(params), tensors.__getitem__, names)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_from_hf_tensors_reads_layer_count_and_dtype():
    cfg = models.Config.from_hf(HF)
    tensors = models.to_hf_tensors(_random_tree(cfg, layers=3), cfg)
    params, _ = models.from_hf_tensors(HF, tensors.__getitem__, tensors, dtype=jnp.bfloat16)
    assert len(params["layers"]) == 3  # the names decide, not num_hidden_layers
    assert params["layers"][2]["up"].dtype == jnp.bfloat16


def test_from_hf_tensors_missing_tensor():
    cfg = models.Config.from_hf(HF)
    tensors = models.to_hf_tensors(_random_tree(cfg), cfg)
    del tensors["model.layers.1.self_attn.q_norm.weight"]
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.q_norm.weight' is missing"):
        models.from_hf_tensors(HF, tensors.__getitem__, tensors)
    tensors = models.to_hf_tensors(_random_tree(cfg), cfg)
    del tensors["model.layers.0.input_layernorm.weight"]
    names = [n for n in tensors if not n.startswith("model.layers.0.")]
    with pytest.raises(ValueError, match=r"not contiguous from 0: \[1\]"):
        models.from_hf_tensors(HF, tensors.__getitem__, names)


def _tokenizer_json():
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as tm

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate("abcdefgh ")}}
    tok = Tokenizer(tm.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok.to_str()


class FakeSource:
    """The jaxslim.checkpoints source protocol: names(), read(name), config, tokenizer_json()."""

    def __init__(self, tensors, config, tokenizer):
        self._t, self.config, self._tok = tensors, config, tokenizer

    def names(self):
        return list(self._t)

    def read(self, name):
        return self._t[name]

    def tokenizer_json(self):
        return self._tok


def test_load_from_source_and_tokenizer():
    cfg = models.Config.from_hf(HF)
    ref = _random_tree(cfg)
    params, config, tok = models.load(
        FakeSource(models.to_hf_tensors(ref, cfg), HF, _tokenizer_json())
    )
    assert config == cfg
    ids = tok.encode("abc hag")
    assert ids[0] == 0 and len(ids) == 8
    assert tok.decode(ids) == "abc hag"
    assert tok.encode("ab", add_special_tokens=False) == [3, 4]
    assert tok.vocab_size == 12 and tok.token_to_id("</s>") == 1
    logits = models.forward(params, jnp.asarray([ids]), config)
    np.testing.assert_array_equal(logits, models.forward(ref, jnp.asarray([ids]), cfg))
    _, _, none = models.load(FakeSource(models.to_hf_tensors(ref, cfg), HF, None))
    assert none is None


def test_tokenizer_missing_package(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "tokenizers":
            raise ImportError("no tokenizers")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"pip install 'jaxslim\[models\]'"):
        models.Tokenizer.from_str("{}")
