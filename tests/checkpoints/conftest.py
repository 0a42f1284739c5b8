"""Fixtures that write tiny checkpoints: Hugging Face safetensors directories and GGUF files
(with `gguf.GGUFWriter`, quantized with `gguf.quants.quantize`)."""

import json
import os

import numpy as np
import pytest

try:
    import gguf
    from safetensors.numpy import save_file
except ImportError:  # the `models` extra is missing: the test modules skip themselves
    gguf = save_file = None

# Small enough to be instant, big enough for GQA (4 q heads share 2 kv heads) and for Q4_0/Q8_0
# blocks of 32 along every row.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "vocab_size": 40,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def hf_weights(config, seed=0, *, bias=False, qk_norm=False) -> dict[str, np.ndarray]:
    """Random float32 weights of a Llama-family decoder, by HF name and (out, in) shape."""
    rng = np.random.default_rng(seed)
    h, v = config["hidden_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    i = config["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
        if bias:
            sizes = {"q": q, "k": kv, "v": kv}
            shapes |= {p + f"self_attn.{x}_proj.bias": (d,) for x, d in sizes.items()}
        if qk_norm:
            shapes |= {p + f"self_attn.{x}_norm.weight": (config["head_dim"],) for x in "qk"}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def llama_cpp_permute(w, n_head, n_head_kv=None):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim (the reference)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf: str) -> str:
    """HF -> GGUF names written out by hand (independent of checkpoints.hf_to_gguf_name)."""
    table = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    stem, kind = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, n, rest = stem.split(".", 3)
        return f"blk.{n}.{table[rest]}.{kind}"
    return f"{table[stem]}.{kind}"


def stored(hf: str, w: np.ndarray, config: dict, arch: str) -> np.ndarray:
    """What convert_hf_to_gguf.py stores for `w`: q/k rows permuted for the llama arch only."""
    if arch == "llama" and ".q_proj." in hf:
        return llama_cpp_permute(w, config["num_attention_heads"], config["num_attention_heads"])
    if arch == "llama" and ".k_proj." in hf:
        return llama_cpp_permute(w, config["num_attention_heads"], config["num_key_value_heads"])
    return w


def write_gguf(path, weights, config, *, arch="llama", types=None, extra=None, tokenizer=True):
    """Write `weights` (HF names, float32) as a GGUF file the way llama.cpp converts them.

    `types` maps an HF name to a `GGMLQuantizationType` (default F32); `extra` adds raw GGUF
    tensors {gguf name: (array, raw_dtype or None)}. Returns {hf name: raw stored array}.
    """
    q = gguf.GGMLQuantizationType
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_vocab_size(config["vocab_size"])
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list([f"t{i}" for i in range(config["vocab_size"])])
        w.add_token_types([3, 3, 3] + [1] * (config["vocab_size"] - 3))
        w.add_token_merges(["t 1"])
        w.add_bos_token_id(config["bos_token_id"])
        w.add_eos_token_id(config["eos_token_id"])
    raw = {}
    for hf, x in weights.items():
        qtype = types.get(hf, q.F32)
        data = stored(hf, x, config, arch)
        if qtype == q.F32:
            data = data.astype(np.float32)
        elif qtype == q.F16:
            data = data.astype(np.float16)
        else:
            data = gguf.quants.quantize(data, qtype)
        raw[hf] = data
        w.add_tensor(gguf_name(hf), data, raw_dtype=None if qtype in (q.F32, q.F16) else qtype)
    for name, (data, qtype) in (extra or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


def write_hf(path, weights, config, *, shards=1, tokenizer=None):
    """A Hugging Face model directory: config.json and model.safetensors, or `shards` files
    with model.safetensors.index.json."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if tokenizer is not None:
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            f.write(tokenizer)
    if shards == 1:
        save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    names = list(weights)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[k::shards]}
        save_file(part, os.path.join(path, file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return path


@pytest.fixture
def config():
    return dict(CONFIG)


@pytest.fixture
def helpers():
    """The writers above, for tests (conftest modules are not importable under importlib mode)."""

    class H:
        """A namespace for the writers."""

    for f in (hf_weights, llama_cpp_permute, gguf_name, stored, write_gguf, write_hf):
        setattr(H, f.__name__, staticmethod(f))
    return H


def tiny_llama(key, *, vocab, d, layers, heads, kv, f, head_dim=8, tied=False):
    """A random jaxslim Llama tree ((in, out) kernels, `head_dim` per head) for the exporters."""
    import jax
    import jax.numpy as jnp

    ks = iter(jax.random.split(key, 64))

    def w(*shape, scale=0.2):
        return scale * jax.random.normal(next(ks), shape, jnp.float32)

    params = {
        "embed": w(vocab, d),
        "layers": [
            {
                "attn_norm": 1.0 + w(d, scale=0.1),
                "q": w(d, heads * head_dim),
                "k": w(d, kv * head_dim),
                "v": w(d, kv * head_dim),
                "o": w(heads * head_dim, d),
                "mlp_norm": 1.0 + w(d, scale=0.1),
                "gate": w(d, f),
                "up": w(d, f),
                "down": w(f, d),
            }
            for _ in range(layers)
        ],
        "norm": 1.0 + w(d, scale=0.1),
    }
    if not tied:
        params["lm_head"] = w(d, vocab)
    return params


@pytest.fixture
def tiny_sizes():
    """The default sizes of `tiny` (a test module overrides this fixture to change them)."""
    return dict(vocab=64, d=64, layers=2, heads=4, kv=2, f=96)


@pytest.fixture
def tiny(tiny_sizes):
    """tiny(key, **sizes) -> a random Llama tree; sizes not given come from `tiny_sizes`."""

    def build(key, **sizes):
        return tiny_llama(key, **{**tiny_sizes, **sizes})

    return build
