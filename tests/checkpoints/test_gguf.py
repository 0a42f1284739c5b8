"""checkpoints.open on GGUF files written with gguf.GGUFWriter the way llama.cpp converts HF
models: HF names and shapes, dequantized values, q/k permutation undone, derived config,
tokenizer.json."""

import math

import ml_dtypes
import numpy as np
import pytest

from jaxslim import checkpoints

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
Q = gguf.GGMLQuantizationType


def _unpermute_reference(stored, n_head):
    """Invert llama.cpp's permute by index bookkeeping (no reshape formula)."""
    perm = _llama_cpp_permute(np.arange(stored.shape[0]), n_head)
    return stored[np.argsort(perm)]


def _llama_cpp_permute(w, n_head):
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_from_stored(name, stored, config, arch="llama"):
    if arch == "llama" and ".q_proj." in name:
        return _unpermute_reference(stored, config["num_attention_heads"])
    if arch == "llama" and ".k_proj." in name:
        return _unpermute_reference(stored, config["num_key_value_heads"])
    return stored


def test_f32_llama_round_trips_exactly(tmp_path, config, helpers):
    weights = helpers.hf_weights(config)
    path = tmp_path / "m.gguf"
    helpers.write_gguf(path, weights, config)
    with checkpoints.open(path) as src:
        assert src.format == "gguf"
        assert src.names() == sorted(src.names(), key=checkpoints._names.natural_key)
        assert sorted(src.names()) == sorted(weights)
        for name, w in weights.items():
            assert src.shape(name) == w.shape
            assert src.dtype(name) == np.float32
            np.testing.assert_array_equal(src.read(name), w)  # q/k permutation undone exactly
        for key, value in config.items():
            if key != "architectures":
                assert src.config[key] == value, key
        assert src.config["architectures"] == ["LlamaForCausalLM"]
        assert src.config["rope_scaling"] is None
        assert src.metadata["general.architecture"] == "llama"
        assert src.metadata["llama.block_count"] == 2


def test_quantized_values_equal_gguf_dequantize(tmp_path, config, helpers):
    weights = helpers.hf_weights(config)
    kinds = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16]
    types = {n: kinds[i % len(kinds)] for i, n in enumerate(weights) if weights[n].ndim == 2}
    path = tmp_path / "q.gguf"
    raw = helpers.write_gguf(path, weights, config, types=types)
    with checkpoints.open(path) as src:
        for name, w in weights.items():
            qtype = types.get(name, Q.F32)
            got = src.read(name)
            want = _hf_from_stored(name, gguf.quants.dequantize(raw[name], qtype), config)
            if qtype == Q.F16:
                assert src.dtype(name) == np.float16 and got.dtype == np.float16
            elif qtype == Q.BF16:
                assert src.dtype(name) == np.dtype(ml_dtypes.bfloat16)
            else:
                assert src.dtype(name) == np.float32 and got.dtype == np.float32
            np.testing.assert_array_equal(got.astype(np.float32), want.reshape(w.shape))
            scale = np.abs(w).max()
            assert np.abs(got.astype(np.float32) - w).max() <= 0.2 * scale, name


@pytest.mark.parametrize(
    ("arch", "bias", "qk_norm"), [("qwen2", True, False), ("qwen3", False, True)]
)
def test_qwen_is_not_permuted(tmp_path, config, helpers, arch, bias, qk_norm):
    config = config | {"model_type": arch, "tie_word_embeddings": True}
    weights = helpers.hf_weights(config, bias=bias, qk_norm=qk_norm)
    path = tmp_path / f"{arch}.gguf"
    helpers.write_gguf(path, weights, config, arch=arch)
    with checkpoints.open(path) as src:
        assert src.config["model_type"] == arch
        assert src.config["tie_word_embeddings"] is True
        assert "lm_head.weight" not in src.names()
        assert sorted(src.names()) == sorted(weights)
        for name, w in weights.items():
            np.testing.assert_array_equal(src.read(name), w)


def test_llama_with_bias_permutes_bias(tmp_path, config, helpers):
    weights = helpers.hf_weights(config, bias=True)
    path = tmp_path / "b.gguf"
    helpers.write_gguf(path, weights, config)
    with checkpoints.open(path) as src:
        assert src.config["attention_bias"] is True
        for name in (
            "model.layers.1.self_attn.q_proj.bias",
            "model.layers.1.self_attn.k_proj.bias",
        ):
            np.testing.assert_array_equal(src.read(name), weights[name])


def _gguf_types_that_dequantize():
    out = []
    for qtype in Q:
        if qtype.name in ("F32", "F16") or qtype not in gguf.GGML_QUANT_SIZES:
            continue
        if qtype.name.startswith("I") and qtype.name[1:].isdigit():
            continue  # integer tensors are not weights
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
        except NotImplementedError:
            continue
        out.append(qtype)
    return out


@pytest.mark.parametrize("qtype", _gguf_types_that_dequantize(), ids=lambda q: q.name)
def test_every_type_gguf_dequantizes(tmp_path, qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    cols = 256 * block // math.gcd(256, block)  # a whole number of blocks, K-quants included
    rng = np.random.default_rng(int(qtype))
    # bytes <= 0x3B keep every f16/bf16/e8m0 scale finite (no inf, no NaN)
    raw = rng.integers(0, 0x3C, size=(3, cols // block * size), dtype=np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with checkpoints.open(tmp_path / "t.gguf", check=False) as src:
        name = "model.layers.0.mlp.up_proj.weight"
        assert src.shape(name) == (3, cols)
        np.testing.assert_array_equal(
            src.read(name, np.float32), gguf.quants.dequantize(raw, qtype).astype(np.float32)
        )


def test_read_dequantizes_only_the_tensor_asked_for(tmp_path, config, helpers, monkeypatch):
    weights = helpers.hf_weights(config)
    path = tmp_path / "q.gguf"
    helpers.write_gguf(
        path,
        weights,
        config,
        types=dict.fromkeys(weights, Q.Q8_0)
        | {n: Q.F32 for n, w in weights.items() if w.ndim == 1},
    )
    calls = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda d, q: calls.append(d.shape) or real(d, q))
    with checkpoints.open(path) as src:
        n_open = len(calls)
        assert isinstance(src._reader.data, np.memmap)
        src.read("model.layers.1.mlp.down_proj.weight")
    assert len(calls) == n_open + 1
    assert calls[-1] == (64, 96 // 32 * 34)  # that tensor's Q8_0 bytes, nothing else


def _llama3_factors(theta, dim, factor, low, high, old):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, in numpy."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


@pytest.mark.parametrize("head_dim", [16, 128])
def test_llama3_rope_scaling_from_rope_freqs(tmp_path, config, helpers, head_dim):
    config = config | {"head_dim": head_dim}
    factors = _llama3_factors(500000.0, head_dim, 32.0, 1.0, 4.0, 8192)
    path = tmp_path / "l3.gguf"
    helpers.write_gguf(path, {}, config, extra={"rope_freqs.weight": (factors, None)})
    with checkpoints.open(path) as src:
        assert "rope_freqs.weight" not in src.names()
        assert src.config["rope_scaling"] == {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }


def test_name_tables_and_permutation():
    for hf in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.12.self_attn.q_proj.bias",
        "model.layers.3.self_attn.k_norm.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.7.input_layernorm.weight",
    ]:
        assert checkpoints.gguf_to_hf_name(checkpoints.hf_to_gguf_name(hf)) == hf
    assert checkpoints.hf_to_gguf_name("model.layers.2.post_attention_layernorm.weight") == (
        "blk.2.ffn_norm.weight"
    )
    assert checkpoints.gguf_to_hf_name("blk.0.attn_output.weight") == (
        "model.layers.0.self_attn.o_proj.weight"
    )
    with pytest.raises(ValueError, match="gguf_to_hf_name.*blk.0.ffn_gate_exps"):
        checkpoints.gguf_to_hf_name("blk.0.ffn_gate_exps.weight")
    with pytest.raises(ValueError, match="hf_to_gguf_name.*vision"):
        checkpoints.hf_to_gguf_name("vision_tower.weight")
    w = np.random.default_rng(0).standard_normal((48, 5))
    for heads in (1, 2, 3, 6):
        np.testing.assert_array_equal(
            checkpoints.permute_qk(w, heads), _llama_cpp_permute(w, heads)
        )
        np.testing.assert_array_equal(
            checkpoints.unpermute_qk(checkpoints.permute_qk(w, heads), heads), w
        )
    with pytest.raises(ValueError, match="permute_qk.*num_key_value_heads"):
        checkpoints.permute_qk(w, 5)


def _byte_level_tiny():
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    merges = [
        ("h", "e"),
        ("l", "l"),
        ("he", "ll"),
        ("hell", "o"),
        ("Ġ", "w"),
        ("o", "r"),
        ("Ġw", "or"),
        ("l", "d"),
        ("Ġwor", "ld"),
    ]
    tokens = ["<|endoftext|>", "<s>", "</s>"] + alphabet + ["".join(m) for m in merges]
    return tokens, merges


def test_tokenizer_json_gpt2_matches_tokenizers_bpe(tmp_path, config, helpers):
    tokens, merges = _byte_level_tiny()
    path = tmp_path / "tok.gguf"
    config = config | {"vocab_size": len(tokens)}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with checkpoints.open(path) as src:
        ours = tokenizers.Tokenizer.from_str(src.tokenizer_json())
    ref = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = tokenizers.decoders.ByteLevel()
    ref.add_special_tokens(["<|endoftext|>", "<s>", "</s>"])
    for text in ["hello world", "hello, world!</s>", "héllo  wörld\n"]:
        assert ours.encode(text).ids == ref.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    assert ours.encode("hello world").tokens == ["hello", "Ġworld"]
    assert ours.encode("</s>").ids == [2]


def test_tokenizer_json_sentencepiece(tmp_path):
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["▁", "h", "e", "l", "o", "▁h", "ll", "▁he", "▁hell", "▁hello"]
    tokens = ["<unk>", "<s>", "</s>"] + byte_tokens + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))][::-1]
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with checkpoints.open(path) as src:
        tok = tokenizers.Tokenizer.from_str(src.tokenizer_json())
    enc = tok.encode("hello é")
    assert enc.tokens == ["<s>", "▁hello", "▁", "<0xC3>", "<0xA9>"]
    assert tok.decode(enc.ids) == "hello é"
