"""Hugging Face tensors <-> the params tree, and ``load`` over ``jaxslim.checkpoints``.

HF name (``(out, in)`` PyTorch layout)                  -> tree leaf (Flax ``(in, out)``)
``model.embed_tokens.weight`` ``(V, d)``                -> ``embed`` ``(V, d)`` (not transposed)
``model.layers.{i}.input_layernorm.weight``             -> ``layers/{i}/attn_norm``
``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``    -> ``layers/{i}/{q,k,v,o}`` (transposed)
``model.layers.{i}.self_attn.{q,k,v,o}_proj.bias``      -> ``layers/{i}/{q,k,v,o}_bias``
``model.layers.{i}.self_attn.{q,k}_norm.weight``        -> ``layers/{i}/{q,k}_norm``
``model.layers.{i}.post_attention_layernorm.weight``    -> ``layers/{i}/mlp_norm``
``model.layers.{i}.mlp.{gate,up,down}_proj.weight``     -> ``layers/{i}/{gate,up,down}`` (transp.)
``model.norm.weight``                                   -> ``norm``
``lm_head.weight`` ``(V, d)``                           -> ``lm_head`` ``(d, V)`` (untied only)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim._checks import public
from jaxslim.models._config import Config
from jaxslim.models._params import sizes
from jaxslim.models._tokenizer import Tokenizer

LAYER_TENSORS = {
    "attn_norm": ("input_layernorm.weight", False),
    "q": ("self_attn.q_proj.weight", True),
    "k": ("self_attn.k_proj.weight", True),
    "v": ("self_attn.v_proj.weight", True),
    "o": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "o_bias": ("self_attn.o_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate": ("mlp.gate_proj.weight", True),
    "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
}
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def layer_leaves(config: Config) -> list[str]:
    names = ["attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down"]
    if config.attention_bias:
        names += ["q_bias", "k_bias", "v_bias"]
    if config.o_bias:
        names.append("o_bias")
    if config.qk_norm:
        names += ["q_norm", "k_norm"]
    return names


@public("models.from_hf_tensors")
def from_hf_tensors(
    config: Mapping[str, Any],
    get: Callable[[str], np.ndarray],
    names: Iterable[str],
    *,
    dtype: Any = None,
) -> tuple[dict[str, Any], Config]:
    """Builds the params tree and ``Config`` from HF tensors (``(out, in)`` kernels).

    The number of layers is the number of ``model.layers.{i}`` found in ``names`` (so a
    checkpoint with fewer layers than its config says loads as it is); other names
    (``rotary_emb.inv_freq``, a stored ``lm_head.weight`` of a tied model) are ignored. The
    mapping is in this module's docstring.

    Args:
      config: a HF ``config.json`` dict (``Config.from_hf``).
      get: ``get(name) -> np.ndarray`` reads one tensor (``checkpoints`` source ``read``,
        ``state_dict`` lookup, ...).
      names: the tensor names available.
      dtype: cast every leaf to this dtype; default keeps each tensor's dtype.

    Returns:
      ``(params, config)``.

    >>> import numpy as np
    >>> from jaxslim import models
    >>> cfg = {"model_type": "llama", "head_dim": 8, "tie_word_embeddings": True}
    >>> p = models.init(jax.random.key(0), models.Config.from_hf(cfg), vocab=32, hidden=16,
    ...                 layers=1, heads=2, kv_heads=1, intermediate=24)
    >>> hf = models.to_hf_tensors(p, models.Config.from_hf(cfg))
    >>> p2, c2 = models.from_hf_tensors(cfg, hf.__getitem__, hf)
    >>> p2["layers"][0]["q"].shape, hf["model.layers.0.self_attn.q_proj.weight"].shape
    ((16, 16), (16, 16))
    """
    fn = "models.from_hf_tensors"
    cfg = Config.from_hf(config)
    names = set(names)
    found = sorted({int(m.group(1)) for n in names if (m := LAYER_RE.match(n))})
    if found != list(range(len(found))):
        raise ValueError(f"{fn}: layer indices are not contiguous from 0: {found}")

    def read(name: str, transpose: bool) -> jax.Array:
        if name not in names:
            hint = ""
            if name.endswith(".bias") or "_norm." in name:
                hint = f" (config says model_type={cfg.family!r}; is that the right family?)"
            raise ValueError(f"{fn}: tensor {name!r} is missing from the checkpoint{hint}")
        a = np.asarray(get(name))
        if transpose:
            if a.ndim != 2:
                raise ValueError(f"{fn}: tensor {name!r} has shape {a.shape}, expected 2-D")
            a = a.T
        out = jnp.asarray(a)
        return out if dtype is None else out.astype(dtype)

    params: dict[str, Any] = {
        "embed": read("model.embed_tokens.weight", False),
        "layers": [
            {
                leaf: read(f"model.layers.{i}.{LAYER_TENSORS[leaf][0]}", LAYER_TENSORS[leaf][1])
                for leaf in keys
            }
            for i in found
            for keys in [layer_leaves(cfg)]
        ],
        "norm": read("model.norm.weight", False),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = read("lm_head.weight", True)
    sizes(params, cfg, fn=fn)
    return params, cfg


@public("models.to_hf_tensors")
def to_hf_tensors(params: Mapping[str, Any], config: Config) -> dict[str, np.ndarray]:
    """The inverse of ``from_hf_tensors``: HF names to ``(out, in)`` NumPy tensors.

    A tied model gets no ``lm_head.weight`` (as ``save_pretrained`` writes it); with
    ``config.to_hf(params)`` this is a checkpoint ``transformers`` loads, pruned sizes included.
    """
    sizes(params, config, fn="models.to_hf_tensors")

    def np_(x: Any, transpose: bool) -> np.ndarray:
        a = np.asarray(x)
        return np.ascontiguousarray(a.T) if transpose else a

    out = {"model.embed_tokens.weight": np_(params["embed"], False)}
    for i, lp in enumerate(params["layers"]):
        for leaf in layer_leaves(config):
            name, transpose = LAYER_TENSORS[leaf]
            out[f"model.layers.{i}.{name}"] = np_(lp[leaf], transpose)
    out["model.norm.weight"] = np_(params["norm"], False)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = np_(params["lm_head"], True)
    return out


@public("models.load")
def load(source: Any, *, dtype: Any = None) -> tuple[dict[str, Any], Config, Tokenizer | None]:
    """Loads a Llama-family checkpoint: ``(params, config, tokenizer)``.

    Args:
      source: a path (a HF safetensors directory or a GGUF file) opened with
        ``jaxslim.checkpoints.open``, or an already opened source (anything with ``names()``,
        ``read(name)``, ``config`` and ``tokenizer_json()``).
      dtype: cast every leaf to this dtype (e.g. ``jnp.bfloat16``); default keeps the stored one
        (GGUF tensors arrive dequantized to float32).

    Returns:
      ``(params, config, tokenizer)``; ``tokenizer`` is ``None`` when the checkpoint has no
      ``tokenizer.json``.
    """
    if all(hasattr(source, a) for a in ("names", "read", "config")):
        return _load(source, dtype)
    from jaxslim import checkpoints

    with checkpoints.open(source) as src:
        return _load(src, dtype)


def _load(src: Any, dtype: Any) -> tuple[dict[str, Any], Config, Tokenizer | None]:
    params, config = from_hf_tensors(src.config, src.read, src.names(), dtype=dtype)
    text = src.tokenizer_json() if hasattr(src, "tokenizer_json") else None
    return params, config, (Tokenizer.from_str(text) if text else None)
