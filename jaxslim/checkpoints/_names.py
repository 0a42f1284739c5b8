"""Tensor names and layouts shared by the readers and the exporters: Hugging Face <-> GGUF names,
llama.cpp's q/k row permutation, and the shape every Llama-family tensor must have.

Hugging Face (PyTorch) layout throughout: a linear weight is `(out, in)`, a bias or norm `(n,)`.
GGUF lists dimensions fastest-first (`ne0` = `in`), so its row-major array is the same `(out, in)`
block of memory; only the printed shape is reversed.
"""

import re

import numpy as np

from jaxslim._checks import public

# Per-layer names: GGUF suffix after "blk.N." -> HF suffix after "model.layers.N.".
_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Whole-model names: GGUF stem -> HF stem.
_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_BACK = {hf: gg for gg, hf in _LAYER.items()}
_GLOBAL_BACK = {hf: gg for gg, hf in _GLOBAL.items()}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)")

# GGUF architecture (general.architecture) <-> HF config model_type.
GGUF_ARCH_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
MODEL_TYPE_TO_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Architectures whose q/k rows llama.cpp's convert_hf_to_gguf.py permutes (LlamaModel.permute, with
# undo_permute=True). Qwen2Model and Qwen3Model derive from TextModel and store q/k as in HF.
QK_PERMUTED_ARCHS = frozenset({"llama"})
# GGUF tensors that carry no HF tensor (their content lives in config.json instead).
GGUF_NON_HF_TENSORS = frozenset({"rope_freqs.weight"})


@public("checkpoints.gguf_to_hf_name")
def gguf_to_hf_name(name: str) -> str:
    """The Hugging Face name of a GGUF tensor of a Llama-family model.

    `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, `attn_k`/`attn_v` ->
    `k_proj`/`v_proj`, `attn_output` -> `o_proj`, `attn_q_norm`/`attn_k_norm` -> `q_norm`/`k_norm`
    (Qwen3), `ffn_gate`/`ffn_up`/`ffn_down` -> `mlp.gate_proj`/`up_proj`/`down_proj`, `attn_norm`
    -> `input_layernorm`, `ffn_norm` -> `post_attention_layernorm`, `token_embd` ->
    `model.embed_tokens`, `output_norm` -> `model.norm`, `output` -> `lm_head`. Biases
    (`attn_q.bias`, Qwen2) map like weights. The inverse is `hf_to_gguf_name`.

    Raises `ValueError` for a name outside the table.

    Example:
        >>> from jaxslim import checkpoints
        >>> checkpoints.gguf_to_hf_name("blk.3.ffn_down.weight")
        'model.layers.3.mlp.down_proj.weight'
    """
    m = _GGUF_LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL and kind in ("weight", "bias"):
        return f"{_GLOBAL[stem]}.{kind}"
    raise ValueError(
        f"checkpoints.gguf_to_hf_name: GGUF tensor {name!r} has no Hugging Face name; known "
        f"per-layer names are blk.N.{{{', '.join(_LAYER)}}}.weight/bias and "
        f"{', '.join(_GLOBAL)} (Llama, Mistral, Qwen2, Qwen3, SmolLM2)"
    )


@public("checkpoints.hf_to_gguf_name")
def hf_to_gguf_name(name: str) -> str:
    """The GGUF name of a Hugging Face tensor of a Llama-family model (inverse of
    `gguf_to_hf_name`).

    Raises `ValueError` for a name outside the table.

    Example:
        >>> from jaxslim import checkpoints
        >>> checkpoints.hf_to_gguf_name("model.layers.0.self_attn.q_proj.weight")
        'blk.0.attn_q.weight'
        >>> checkpoints.hf_to_gguf_name("lm_head.weight")
        'output.weight'
    """
    m = _HF_LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_BACK:
        return f"blk.{m.group(1)}.{_LAYER_BACK[m.group(2)]}.{m.group(3)}"
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL_BACK and kind in ("weight", "bias"):
        return f"{_GLOBAL_BACK[stem]}.{kind}"
    raise ValueError(
        f"checkpoints.hf_to_gguf_name: Hugging Face tensor {name!r} has no GGUF name; known "
        f"per-layer names are model.layers.N.{{{', '.join(_LAYER_BACK)}}}.weight/bias and "
        f"{', '.join(_GLOBAL_BACK)} (Llama, Mistral, Qwen2, Qwen3, SmolLM2)"
    )


def qk_heads(name: str, config: dict) -> int | None:
    """How many heads llama.cpp permutes the rows of `name` (an HF name) by, or None.

    `q_proj` weight/bias: `num_attention_heads`; `k_proj`: `num_key_value_heads` (llama.cpp's
    `LlamaModel.permute(w, n_head, n_head_kv)` uses `n_head_kv` when they differ). Only meaningful
    for the architectures in `QK_PERMUTED_ARCHS`.
    """
    if ".self_attn.q_proj." in name:
        return int(config["num_attention_heads"])
    if ".self_attn.k_proj." in name:
        heads = config["num_attention_heads"]
        return int(config.get("num_key_value_heads") or heads)
    return None


@public("checkpoints.permute_qk")
def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF -> GGUF row order of a llama q/k projection (llama.cpp `LlamaModel.permute`).

    HF's rotary embedding rotates the two halves of each head (`rotate_half`); GGML rotates
    adjacent pairs. llama.cpp therefore interleaves the halves of every head's rows:
    `w.reshape(n_heads, 2, d // 2, ...).swapaxes(1, 2).reshape(w.shape)`, with `d` the head dim.
    Works on a weight `(heads * d, in)` or a bias `(heads * d,)`; `unpermute_qk` undoes it.

    Example:
        >>> import numpy as np
        >>> from jaxslim import checkpoints
        >>> checkpoints.permute_qk(np.arange(8), n_heads=2)
        array([0, 2, 1, 3, 4, 6, 5, 7])
        >>> w = np.arange(24.0).reshape(8, 3)
        >>> bool((checkpoints.unpermute_qk(checkpoints.permute_qk(w, 2), 2) == w).all())
        True
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(
            f"checkpoints.permute_qk: {rows} rows do not split into {n_heads} heads of an even "
            f"head dim; pass the tensor's own head count (num_key_value_heads for k_proj)"
        )
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@public("checkpoints.unpermute_qk")
def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF -> HF row order of a llama q/k projection: the inverse of `permute_qk`.

    `w.reshape(n_heads, d // 2, 2, ...).swapaxes(1, 2).reshape(w.shape)`.

    Example:
        >>> import numpy as np
        >>> from jaxslim import checkpoints
        >>> checkpoints.unpermute_qk(np.array([0, 2, 1, 3]), n_heads=1)
        array([0, 1, 2, 3])
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(
            f"checkpoints.unpermute_qk: {rows} rows do not split into {n_heads} heads of an even "
            f"head dim; pass the tensor's own head count (num_key_value_heads for k_proj)"
        )
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_shape(name: str, config: dict) -> tuple[int, ...] | None:
    """The HF shape `name` must have under a Llama-family `config`, or None when not known.

    `q_proj.weight`: `(heads * head_dim, hidden)`; `k_proj`/`v_proj`: `(kv_heads * head_dim,
    hidden)`; `o_proj`: `(hidden, heads * head_dim)`; `gate_proj`/`up_proj`: `(intermediate,
    hidden)`; `down_proj`: `(hidden, intermediate)`; embeddings and `lm_head`: `(vocab, hidden)`;
    norms `(hidden,)`; `q_norm`/`k_norm`: `(head_dim,)`; biases: the weight's first axis.
    `head_dim` defaults to `hidden // heads`.
    """
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        inter = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError):
        return None
    table = {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv * head_dim, hidden),
        "self_attn.v_proj": (kv * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "self_attn.q_norm": (head_dim,),
        "self_attn.k_norm": (head_dim,),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
        "model.embed_tokens": (vocab, hidden),
        "lm_head": (vocab, hidden),
        "model.norm": (hidden,),
    }
    m = _HF_LAYER_RE.fullmatch(name)
    stem, _, kind = (f"{m.group(2)}.{m.group(3)}" if m else name).rpartition(".")
    shape = table.get(stem)
    if shape is None:
        return None
    return shape[:1] if kind == "bias" else shape


def natural_key(name: str) -> tuple:
    """Sort key that orders `model.layers.10` after `model.layers.9`."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
