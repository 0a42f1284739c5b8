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

import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import quant
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
    get_quantized: Callable[[str, bool], Any] | None = None,
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
      get_quantized: ``get_quantized(name, transpose) -> QArray | None``: a tensor stored
        quantized, as a ``quant.QArray`` in the leaf's layout (``transpose``: a Flax kernel),
        or ``None`` to read it with ``get``; such leaves are kept as they are (no ``dtype``).

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

    def read(name: str, transpose: bool) -> Any:
        if get_quantized is not None and (q := get_quantized(name, transpose)) is not None:
            return q
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
def load(
    source: Any, *, dtype: Any = None, dequantize: bool = True
) -> tuple[dict[str, Any], Config, Tokenizer | None]:
    """Loads a Llama-family checkpoint: ``(params, config, tokenizer)``.

    Args:
      source: a path opened with ``jaxslim.checkpoints.open`` (a HF safetensors directory, plain
        or in the compressed-tensors layout, or a GGUF file), a directory
        ``models.compress_streamed`` (``jaxslim compress``) wrote (it holds ``manifest.json``),
        or an already opened source (anything with ``names()``, ``read(name)``, ``config`` and
        ``tokenizer_json()``).
      dtype: cast every float leaf to this dtype (e.g. ``jnp.bfloat16``); default keeps the
        stored one (GGUF tensors arrive dequantized to float32).
      dequantize: ``False`` keeps quantized tensors as ``quant.QArray`` leaves with the stored
        codes and scales: GGUF Q8_0 / Q4_0 tensors (int8 / int4 symmetric, one scale per 32
        inputs: ``checkpoints.gguf_spec``; other GGUF block types arrive dequantized),
        compressed-tensors ``pack-quantized`` / ``int-quantized`` weights and a streamed
        directory's QArrays. Run such a tree with ``quant.quantized(models.forward)``
        (``models.perplexity`` does); ``quant.dequantize`` of a leaf equals the stored model's
        values bit for bit (GGUF: gguf-py's ``dequantize``). ``True`` (default): float leaves.

    Returns:
      ``(params, config, tokenizer)``; ``tokenizer`` is ``None`` when the checkpoint has no
      ``tokenizer.json``.
    """
    if all(hasattr(source, a) for a in ("names", "read", "config")):
        return _load(source, dtype, dequantize)
    if isinstance(source, str | os.PathLike) and os.path.isfile(
        os.path.join(source, "manifest.json")
    ):
        from jaxslim.models._stream import load_streamed

        params, config, tok = load_streamed(source)
        if dequantize:
            params = quant.dequantize_params(params)
        if dtype is not None:
            params = jax.tree.map(
                lambda x: x if quant.is_qarray(x) else x.astype(dtype),
                params,
                is_leaf=quant.is_qarray,
            )
        return params, config, tok
    from jaxslim import checkpoints

    with checkpoints.open(source) as src:
        return _load(src, dtype, dequantize)


def _load(
    src: Any, dtype: Any, dequantize: bool = True
) -> tuple[dict[str, Any], Config, Tokenizer | None]:
    get_q = _quantized_reader(src, dequantize)
    if get_q is not None and dequantize:
        read_q = get_q

        def get_q(name: str, transpose: bool) -> Any:
            q = read_q(name, transpose)
            if q is None:
                return None
            x = quant.dequantize(q)
            return x if dtype is None else x.astype(dtype)

    params, config = from_hf_tensors(
        src.config, src.read, src.names(), dtype=dtype, get_quantized=get_q
    )
    text = src.tokenizer_json() if hasattr(src, "tokenizer_json") else None
    return params, config, (Tokenizer.from_str(text) if text else None)


def _quantized_reader(src: Any, dequantize: bool) -> Callable[[str, bool], Any] | None:
    """``get_quantized`` for ``from_hf_tensors``: GGUF Q8_0/Q4_0 (only when not dequantizing:
    the source dequantizes the others itself) or compressed-tensors weights; else ``None``."""
    names = set(src.names())
    if hasattr(src, "read_qarray"):
        if dequantize:
            return None
        return lambda name, t: src.read_qarray(name, transpose=t) if name in names else None
    qc = src.config.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        return None
    return functools.partial(_ct_qarray, src, names, qc)


def _ct_weights(qc: Mapping[str, Any], stem: str) -> Mapping[str, Any]:
    """The ``weights`` args of the compressed-tensors config group that targets module ``stem``."""
    for group in (qc.get("config_groups") or {}).values():
        for t in group.get("targets", []):
            if t == "Linear" or (t.startswith("re:") and re.match(t[3:], stem)):
                return group.get("weights") or {}
    raise ValueError(
        f"models.load: no compressed-tensors config group targets {stem!r}; the checkpoint's "
        "quantization_config does not describe its tensors"
    )


def _unpack_int32(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Unsigned ``bits``-bit codes ``(R, n)`` from compressed-tensors' int32 rows: element ``k`` at
    bit ``k * bits`` of the row's little-endian bit string (``checkpoints`` ``pack_int32``)."""
    w = np.asarray(words).view(np.uint32).astype(np.uint64)
    w = np.concatenate([w, np.zeros((w.shape[0], 1), np.uint64)], axis=1)
    pos = np.arange(n, dtype=np.int64) * bits
    both = w[:, pos // 32] | (w[:, pos // 32 + 1] << np.uint64(32))
    return ((both >> (pos % 32).astype(np.uint64)) & np.uint64(2**bits - 1)).astype(np.int16)


def _ct_qarray(src: Any, names: set, qc: Mapping[str, Any], name: str, transpose: bool) -> Any:
    """A compressed-tensors weight as a Flax-layout ``QArray`` (codes on jaxslim's signed grid,
    scales as float32), or ``None`` for a tensor stored as a plain float."""
    stem = name.removesuffix(".weight")
    if not (transpose and name.endswith(".weight") and f"{stem}.weight_scale" in names):
        return None
    scale = np.asarray(src.read(f"{stem}.weight_scale"), np.float32)
    zp = None
    if f"{stem}.weight_packed" in names:
        bits = int(_ct_weights(qc, stem).get("num_bits", 4))
        out_, in_ = (int(v) for v in np.asarray(src.read(f"{stem}.weight_shape")))
        half = 2 ** (bits - 1)
        codes = _unpack_int32(src.read(f"{stem}.weight_packed"), bits, in_) - half
        if f"{stem}.weight_zero_point" in names:
            packed = np.asarray(src.read(f"{stem}.weight_zero_point"))
            zp = _unpack_int32(np.ascontiguousarray(packed.T), bits, out_).T - half
    else:
        bits, codes = 8, np.asarray(src.read(name)).astype(np.int16)
        out_, in_ = codes.shape
    per_tensor = scale.size == 1
    groups = 1 if per_tensor else scale.size // out_
    kw: dict[str, Any] = {} if per_tensor else {"axis": -1}
    if groups > 1:
        kw["group_size"] = in_ // groups
    spec = quant.QuantSpec(bits, symmetric=zp is None, **kw)

    def kernel(a: np.ndarray) -> np.ndarray:  # (out, groups) -> the scale_shape of (in, out)
        if per_tensor:
            return a.reshape(1, 1)
        a = a.reshape(out_, groups)
        return a.T[:, None, :] if groups > 1 else a.T

    c = np.ascontiguousarray(codes.T).astype(np.int8)
    values = c if spec.storage_bits == 8 else np.asarray(quant.pack(c, spec.storage_bits))
    z = None if zp is None else np.ascontiguousarray(kernel(zp)).astype(spec.code_dtype)
    s = np.ascontiguousarray(kernel(scale))
    return quant.QArray(values, s, z, spec, (in_, out_), np.float32)
