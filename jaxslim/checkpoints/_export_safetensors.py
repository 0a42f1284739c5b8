"""Export a Llama-family params tree as a Hugging Face checkpoint: a plain float one
(`export_hf`) or the compressed-tensors layout vLLM and tpu-inference load
(`export_compressed_tensors`).

The tree is `jaxslim.models`' (kernels in Flax `(in, out)` layout, any leaf may be a `QArray`)::

    {"embed": (V, d), "layers": [{"attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up",
     "down", optional "q_bias"/"k_bias"/"v_bias"/"o_bias", "q_norm"/"k_norm"}], "norm",
     optional "lm_head": (d, V)}

Written tensors use HF names and PyTorch layout (a linear weight `(out, in)`); sizes (hidden width,
heads, kv heads, MLP width, layers, vocabulary) are read from the leaves, so a pruned tree's
`config.json` matches its cut shapes.

compressed-tensors layout (the `compressed-tensors` package, `compressors/pack_quantized` and
`compressors/naive_quantized`), for a quantized `q_proj` (HF weight `(out, in)`):

* int4 (or 2-8 bit) weight-only, `format="pack-quantized"`: `weight_packed` int32
  `(out, ceil(in * bits / 32))` holding the codes `+ 2^(bits-1)` (unsigned), element `k` of a row
  at bits `[k * bits, (k + 1) * bits)` of the row's bit string, little-endian words (for 4 bits:
  eight nibbles a word, element `8w + j` in nibble `j`); `weight_scale` `(out, in / group)`
  (`(out, 1)` per channel); `weight_shape` int64 `[out, in]`; asymmetric schemes add
  `weight_zero_point` int32 `(ceil(out * bits / 32), in / group)` packed the same way along the
  output axis. Dequantized: `(code - zero_point) * scale`, codes and zero points in
  `[-2^(bits-1), 2^(bits-1) - 1]` — jaxslim's signed grid; unsigned jaxslim codes and zero points
  are shifted by `2^(bits-1)`, which leaves `code - zero_point` unchanged.
* int8 W8A8, `format="int-quantized"`: `weight` int8 `(out, in)`, `weight_scale` `(out, 1)`
  (per output channel) or `(1,)` (per tensor), input activations quantized per token,
  dynamically, symmetric int8, at serving time.
* FP8 E4M3 weight-only, `format="float-quantized"`: `weight` float8_e4m3fn `(out, in)` (the
  codes as stored), `weight_scale` `(out, 1)` per output channel, `(1,)` per tensor, or
  `(ceil(out / 128), ceil(in / 128))` for `128 x 128` tiles (strategy `"block"`,
  `block_structure` `[128, 128]`: DeepSeek-V3's FP8 layout). Dequantized: `weight * scale`.

Scales are stored in `scale_dtype` (float32 by default: the stored model is exactly jaxslim's
`dequantize`; float16/bfloat16 round each scale once, an error of at most `|q - z| * ulp(s) / 2`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxslim._checks import public
from jaxslim.quant import QArray
from jaxslim.quant._spec import layout

# Params leaf key -> (HF suffix, kind). kind: "kernel" (Flax (in, out), transposed to HF
# (out, in)), "embedding" ((V, d), as HF) or "vector".
_LAYER_LEAVES = {
    "attn_norm": ("input_layernorm.weight", "vector"),
    "q": ("self_attn.q_proj.weight", "kernel"),
    "k": ("self_attn.k_proj.weight", "kernel"),
    "v": ("self_attn.v_proj.weight", "kernel"),
    "o": ("self_attn.o_proj.weight", "kernel"),
    "q_bias": ("self_attn.q_proj.bias", "vector"),
    "k_bias": ("self_attn.k_proj.bias", "vector"),
    "v_bias": ("self_attn.v_proj.bias", "vector"),
    "o_bias": ("self_attn.o_proj.bias", "vector"),
    "q_norm": ("self_attn.q_norm.weight", "vector"),
    "k_norm": ("self_attn.k_norm.weight", "vector"),
    "mlp_norm": ("post_attention_layernorm.weight", "vector"),
    "gate": ("mlp.gate_proj.weight", "kernel"),
    "up": ("mlp.up_proj.weight", "kernel"),
    "down": ("mlp.down_proj.weight", "kernel"),
}
_REQUIRED_LAYER = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")
_DTYPES = {
    "float32": ("F32", np.float32),
    "float16": ("F16", np.float16),
    "bfloat16": ("BF16", jax.numpy.bfloat16),
}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of the tree: its path (`layers/0/q`), HF name, the leaf and its kind."""

    path: str
    hf_name: str
    value: Any
    kind: str  # "kernel" | "embedding" | "vector"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Model sizes read from the leaves (`head_dim` from the config)."""

    hidden: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int
    tied: bool


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in (x.shape if isinstance(x, QArray) else np.shape(x)))


def hf_config(params: Any, config: Any, fn: str) -> dict[str, Any]:
    """The HF `config.json` dict for `params`: `config.to_hf(params)` (a `models.Config`) or a
    copy of a HF config dict; sizes are then checked against (and taken from) the leaves."""
    if hasattr(config, "to_hf"):
        hf = dict(config.to_hf(params))
    elif isinstance(config, Mapping):
        hf = dict(config)
    else:
        raise TypeError(
            f"{fn}: config must be a jaxslim.models.Config or a Hugging Face config.json dict, "
            f"got {type(config).__name__}"
        )
    s = sizes(params, hf, fn)
    hf.update(
        hidden_size=s.hidden,
        vocab_size=s.vocab,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        intermediate_size=s.intermediate,
        head_dim=s.head_dim,
        tie_word_embeddings=s.tied,
    )
    return hf


def _layers(params: Any, fn: str) -> Sequence[Mapping[str, Any]]:
    if not isinstance(params, Mapping):
        raise ValueError(f"{fn}: params must be a dict tree, got {type(params).__name__}")
    for name in ("embed", "layers", "norm"):
        if name not in params or params[name] is None:
            raise ValueError(
                f"{fn}: the params tree has no {name!r}; a Llama-family tree needs embed, "
                "layers/<i>/{attn_norm,q,k,v,o,mlp_norm,gate,up,down}, norm (and lm_head when "
                "the embeddings are untied): see jaxslim.models.forward"
            )
    extra = set(params) - {"embed", "layers", "norm", "lm_head"}
    if extra:
        raise ValueError(f"{fn}: the params tree has leaves no checkpoint holds: {sorted(extra)}")
    layers = params["layers"]
    if not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"{fn}: 'layers' must be a non-empty list of per-layer dicts")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            raise ValueError(f"{fn}: layers/{i} must be a dict, got {type(layer).__name__}")
        missing = [k for k in _REQUIRED_LAYER if layer.get(k) is None]
        if missing:
            raise ValueError(f"{fn}: layers/{i} has no {missing} (needs {list(_REQUIRED_LAYER)})")
        extra = set(layer) - set(_LAYER_LEAVES)
        if extra:
            raise ValueError(
                f"{fn}: layers/{i} has leaves no checkpoint holds: {sorted(extra)} (known: "
                f"{list(_LAYER_LEAVES)})"
            )
    return layers


def sizes(params: Any, hf: Mapping[str, Any], fn: str) -> Sizes:
    """Reads and checks the sizes of `params`; every layer must have the same sizes (a HF config
    and the GGUF keys written here hold one size per model). Raises `ValueError` naming the leaf."""
    layers = _layers(params, fn)
    emb = _shape(params["embed"])
    if len(emb) != 2:
        raise ValueError(f"{fn}: 'embed' must be (vocab, d), got shape {emb}")
    vocab, d = emb
    try:
        hd = int(hf.get("head_dim") or int(hf["hidden_size"]) // int(hf["num_attention_heads"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{fn}: the config gives no head_dim (nor hidden_size and num_attention_heads)"
        ) from None

    def want(path, got, shape, why):
        if got != shape:
            raise ValueError(f"{fn}: {path} has shape {got}, expected {shape} ({why})")

    want("norm", _shape(params["norm"]), (d,), "hidden width")
    tied = params.get("lm_head") is None
    if not tied:
        want("lm_head", _shape(params["lm_head"]), (d, vocab), "Flax (d, V)")
    per = set()
    for i, layer in enumerate(layers):
        p = f"layers/{i}/"
        q, k = _shape(layer["q"]), _shape(layer["k"])
        for name, s in (("q", q), ("k", k)):
            if len(s) != 2 or s[0] != d or s[1] % hd:
                raise ValueError(
                    f"{fn}: {p}{name} has shape {s}, expected (d={d}, heads * head_dim) with "
                    f"head_dim={hd} (kernels are Flax (in, out))"
                )
        heads, kv = q[1] // hd, k[1] // hd
        if kv == 0 or heads % kv:
            raise ValueError(f"{fn}: {p}: {heads} heads are not a multiple of {kv} kv heads")
        f = _shape(layer["gate"])[-1]
        want(p + "v", _shape(layer["v"]), (d, kv * hd), "same kv heads as k")
        want(p + "o", _shape(layer["o"]), (heads * hd, d), "(heads * head_dim, d)")
        want(p + "gate", _shape(layer["gate"]), (d, f), "(d, F)")
        want(p + "up", _shape(layer["up"]), (d, f), "same F as gate")
        want(p + "down", _shape(layer["down"]), (f, d), "(F, d)")
        for name, n in (("attn_norm", d), ("mlp_norm", d), ("q_bias", heads * hd)):
            if layer.get(name) is not None:
                want(p + name, _shape(layer[name]), (n,), "vector")
        for name, n in (("k_bias", kv * hd), ("v_bias", kv * hd), ("o_bias", d)):
            if layer.get(name) is not None:
                want(p + name, _shape(layer[name]), (n,), "vector")
        for name in ("q_norm", "k_norm"):
            if layer.get(name) is not None:
                want(p + name, _shape(layer[name]), (hd,), "per-head norm")
        per.add((heads, kv, f))
    if len(per) > 1:
        raise ValueError(
            f"{fn}: layers have different (heads, kv_heads, intermediate) sizes {sorted(per)}; "
            "the exported config holds one size per model: prune every layer to the same size"
        )
    heads, kv, f = per.pop()
    return Sizes(d, vocab, len(layers), heads, kv, f, hd, tied)


def leaves(params: Any, fn: str) -> list[Leaf]:
    """Every leaf of a (checked) tree with its HF name and kind, in checkpoint order."""
    layers = _layers(params, fn)
    out = [Leaf("embed", "model.embed_tokens.weight", params["embed"], "embedding")]
    for i, layer in enumerate(layers):
        for key, (suffix, kind) in _LAYER_LEAVES.items():
            if layer.get(key) is not None:
                out.append(
                    Leaf(f"layers/{i}/{key}", f"model.layers.{i}.{suffix}", layer[key], kind)
                )
    out.append(Leaf("norm", "model.norm.weight", params["norm"], "vector"))
    if params.get("lm_head") is not None:
        out.append(Leaf("lm_head", "lm_head.weight", params["lm_head"], "kernel"))
    return out


def float_tensor(leaf: Leaf) -> np.ndarray:
    """The leaf as a float32 NumPy array in HF layout (a QArray is dequantized)."""
    x = leaf.value
    x = np.asarray(jax.device_get(x.dequantize() if isinstance(x, QArray) else x), np.float32)
    return x.T if leaf.kind == "kernel" else x


@dataclasses.dataclass(frozen=True)
class Rows:
    """A quantized 2-D leaf in HF row form: `codes` `(R, C)` (int16, jaxslim's grid), `scale`
    `(R, C // block)` float32 and `zero_point` (same shape, or None when 0): one scale per `block`
    consecutive entries of a row (`block == C`: one per row). Value = `(code - zp) * scale`."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    block: int
    grouped: bool  # the spec cuts the rows into groups (else one scale per row or tensor)


def rows(leaf: Leaf) -> Rows | None:
    """`Rows` of a quantized 2-D kernel or embedding, or `None` when a row's scales are not
    constant over runs of consecutive entries (a scale per input channel)."""
    q = leaf.value
    spec, shape = q.spec, q.shape
    col = 0 if leaf.kind == "kernel" else 1  # the leaf axis that becomes the HF row (contraction)
    lay = layout(spec, shape)
    if lay.tiles:  # one scale per tile: scales vary along both axes
        return None
    keep = {a % 2 for a in (spec.axis or ())}
    if lay.group_axis is not None and lay.group_axis % 2 == col:
        block = lay.group_size
    elif col in keep:
        return None
    else:
        block = shape[col]

    def hf(a):  # a leaf-shaped array to HF layout
        a = np.asarray(jax.device_get(a))
        return a.T if leaf.kind == "kernel" else a

    codes = hf(q.codes()).astype(np.int16)
    scale = hf(lay.expand(np.asarray(jax.device_get(q.float_scale()), np.float32)))[:, ::block]
    zp = None
    if q.zero_point is not None:
        zp = hf(lay.expand(np.asarray(jax.device_get(q.zero_point)).astype(np.int16)))[:, ::block]
    grouped = lay.group_axis is not None and lay.group_axis % 2 == col
    return Rows(codes, np.ascontiguousarray(scale), zp, block, grouped)


def check_dir(path: Any, fn: str) -> str:
    """`path` as a str, raising `ValueError` when its parent directory does not exist."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{fn}: the directory {parent!r} does not exist; create it first")
    return path


def _out_dir(path: Any, fn: str) -> str:
    path = check_dir(path, fn)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{fn}: {path!r} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    return path


def _dtype(dtype: str, fn: str, what: str = "dtype") -> tuple[str, Any]:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise ValueError(f"{fn}: {what} must be one of {list(_DTYPES)}, got {dtype!r}")
    return _DTYPES[name]


def _entry(x: np.ndarray, tag: str | None = None) -> dict[str, Any]:
    x = np.ascontiguousarray(x)
    if tag is None:
        tag = {np.dtype(np.int32): "I32", np.dtype(np.int8): "I8", np.dtype(np.int64): "I64"}[
            x.dtype
        ]
    return {"dtype": tag, "shape": list(x.shape), "data": x.tobytes()}


def write_safetensors(path: str, tensors: dict[str, dict], metadata: dict[str, str]) -> None:
    """Writes a `.safetensors` file (the documented format: a little-endian u64 header length,
    a JSON header of `{name: {dtype, shape, data_offsets}}` padded to 8 bytes, the data)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        header[name] = {
            "dtype": t["dtype"],
            "shape": t["shape"],
            "data_offsets": [offset, offset + len(t["data"])],
        }
        offset += len(t["data"])
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for t in tensors.values():
            f.write(t["data"])


def _write(directory: str, tensors: dict[str, dict], hf: dict, tokenizer_json: Any) -> None:
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    if tokenizer_json is not None:
        text = tokenizer_json
        if isinstance(text, os.PathLike) or (isinstance(text, str) and os.path.isfile(text)):
            with open(text) as g:
                text = g.read()
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:
            f.write(text)


def _float_entry(leaf: Leaf, tag: str, np_dtype: Any) -> dict[str, Any]:
    return _entry(float_tensor(leaf).astype(np_dtype), tag)


@public("checkpoints.export_hf")
def export_hf(
    directory: str | os.PathLike,
    params: Any,
    config: Any,
    *,
    dtype: str = "float32",
    tokenizer_json: str | os.PathLike | None = None,
) -> str:
    """Writes `params` as a plain Hugging Face checkpoint directory and returns its path.

    `config.json` comes from `config.to_hf(params)` (a `jaxslim.models.Config`; or a HF config
    dict, whose sizes are replaced by the leaves' sizes), so a pruned model's config matches its
    shapes; `model.safetensors` holds every leaf under its HF name in PyTorch layout (kernels
    transposed to `(out, in)`; `QArray` leaves dequantized) in `dtype` (`"float32"`, `"float16"`,
    `"bfloat16"`); tied embeddings write no `lm_head.weight`. `tokenizer_json` (the text or a
    path) is copied to `tokenizer.json`. Loadable by
    `transformers.AutoModelForCausalLM.from_pretrained(directory)`.

    Raises `ValueError` for a tree that is not a Llama-family tree (naming the leaf), an unknown
    dtype, or a parent directory that does not exist.
    """
    fn = "checkpoints.export_hf"
    tag, np_dtype = _dtype(dtype, fn)
    hf = hf_config(params, config, fn)
    hf["torch_dtype"] = dtype
    directory = _out_dir(directory, fn)
    tensors = {leaf.hf_name: _float_entry(leaf, tag, np_dtype) for leaf in leaves(params, fn)}
    _write(directory, tensors, hf, tokenizer_json)
    return directory


# ---------------------------------------------------------------------------------------------
# compressed-tensors


def pack_int32(u: np.ndarray, bits: int) -> np.ndarray:
    """Packs unsigned codes `u` `(R, C)` (values `< 2^bits`) along rows into int32 words:
    element `k` at bit `k * bits` of the row's little-endian bit string (compressed-tensors'
    `pack_to_int32` after its `+ 2^(bits-1)` offset), `ceil(C * bits / 32)` words a row."""
    r, c = u.shape
    words = -(-c * bits // 32)
    per = 32 // bits if 32 % bits == 0 else None
    if per is not None:
        pad = -c % per
        v = np.pad(u.astype(np.uint32), ((0, 0), (0, pad))).reshape(r, -1, per)
        out = np.zeros(v.shape[:2], np.uint32)
        for j in range(per):
            out |= v[:, :, j] << np.uint32(j * bits)
        return out[:, :words].view(np.int32)
    bitpos = np.arange(c, dtype=np.int64) * bits  # straddling codes (3, 5, 6, 7 bits)
    out = np.zeros((r, words + 1), np.uint64)
    v = u.astype(np.uint64)
    np.add.at(out.T, bitpos // 32, (v << (bitpos % 32).astype(np.uint64)).T)
    lo = out[:, :-1] & np.uint64(0xFFFFFFFF)
    hi = np.concatenate([np.zeros((r, 1), np.uint64), out[:, :-1] >> np.uint64(32)], axis=1)
    return ((lo + hi[:, :words]) & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


@dataclasses.dataclass(frozen=True)
class _Scheme:
    fmt: str  # "pack-quantized" | "int-quantized" | "float-quantized"
    bits: int
    symmetric: bool
    strategy: str  # "group" | "channel" | "tensor"
    group_size: int | None
    activations: bool
    block: tuple[int, int] | None = None  # (rows, cols) of a tile in HF (out, in) order


def _ct_scheme(leaf: Leaf, r: Rows | None, activations: str | None, fn: str) -> _Scheme:
    q = leaf.value
    spec = q.spec
    near = "QuantSpec(4, axis=-1, group_size=128) (W4A16) or QuantSpec(8, axis=-1) (W8A8)"
    why = None
    if leaf.kind != "kernel":
        why = "compressed-tensors quantizes Linear weights only; keep embeddings/norms float"
    elif spec.fmt == "e4m3":
        scheme = _fp8_scheme(leaf)
        if scheme is not None:
            return scheme
        why = "fp8 is stored per output channel, per tensor or in 2-D tiles"
        near = "QuantSpec(fmt='e4m3', axis=-1) or QuantSpec(fmt='e4m3', group_size=(128, 128))"
    elif spec.fmt != "int":
        why = f"fmt={spec.fmt!r} has no compressed-tensors integer layout"
    elif r is None and isinstance(spec.group_size, tuple):
        why = f"group_size={spec.group_size} (tiles) has no compressed-tensors integer layout"
    elif r is None:
        why = "its scales vary along the input axis inside a row (a scale per input channel)"
    if why is None:
        cols = r.codes.shape[1]
        strategy = "group" if r.grouped else "channel"
        if strategy == "group" and cols % r.block:
            why = f"group {r.block} does not divide the input width {cols}"
        symmetric = q.zero_point is None
        if spec.bits == 8 and activations is not None:
            if not spec.symmetric or strategy != "channel":
                why = "W8A8 int-quantized needs a symmetric per-output-channel int8 weight"
            else:
                return _Scheme("int-quantized", 8, True, "channel", None, True)
        if why is None:
            group = r.block if strategy == "group" else None
            return _Scheme("pack-quantized", spec.bits, symmetric, strategy, group, False)
    raise ValueError(
        f"{fn}: {leaf.path!r} is quantized with {spec}, which has no compressed-tensors layout: "
        f"{why}; quantize it with {near}, or dequantize it"
    )


def _fp8_scheme(leaf: Leaf) -> _Scheme | None:
    """The float-quantized scheme of an e4m3 `(in, out)` kernel, or `None` if its scales have no
    such layout."""
    q = leaf.value
    lay = layout(q.spec, q.shape)
    if lay.tiles:  # the spec's tile (a tile larger than an axis covers it whole, as in HF)
        sizes = {a % 2: g for a, g in zip(q.spec.group_axis, q.spec.group_size, strict=True)}
        if set(sizes) != {0, 1}:
            return None
        return _Scheme("float-quantized", 8, True, "block", None, False, (sizes[1], sizes[0]))
    if lay.view_shape != lay.shape:  # grouped along one axis
        return None
    keep = {a % 2 for a in (q.spec.axis or ())}
    if keep == {1}:
        return _Scheme("float-quantized", 8, True, "channel", None, False)
    if not keep:
        return _Scheme("float-quantized", 8, True, "tensor", None, False)
    return None


def _fp8_tensors(leaf: Leaf, s: _Scheme, scale_tag: str, scale_dt: Any) -> dict:
    stem = leaf.hf_name[: -len(".weight")]
    q = leaf.value
    codes = np.asarray(jax.device_get(q.values)).T  # float8_e4m3fn, HF (out, in)
    scale = np.asarray(jax.device_get(q.float_scale()), np.float32)
    if s.strategy == "block":
        scale = scale.reshape(scale.shape[0], scale.shape[2]).T  # (in/t, out/t) -> (out, in)
    elif s.strategy == "channel":
        scale = scale.reshape(-1, 1)
    else:
        scale = scale.reshape(1)
    return {
        f"{stem}.weight": {
            "dtype": "F8_E4M3",
            "shape": list(codes.shape),
            "data": np.ascontiguousarray(codes).tobytes(),
        },
        f"{stem}.weight_scale": _entry(scale.astype(scale_dt), scale_tag),
    }


def _ct_tensors(leaf: Leaf, r: Rows, s: _Scheme, scale_tag: str, scale_dt: Any) -> dict:
    stem = leaf.hf_name[: -len(".weight")]
    spec = leaf.value.spec
    if s.fmt == "float-quantized":
        return _fp8_tensors(leaf, s, scale_tag, scale_dt)
    shift = 0 if spec.signed else 2 ** (spec.bits - 1)  # unsigned jaxslim grid -> signed
    codes = r.codes - shift
    out = {}
    if s.fmt == "int-quantized":
        zp = 0 if r.zero_point is None else r.zero_point - shift
        out[f"{stem}.weight"] = _entry((codes - zp).astype(np.int8))
        out[f"{stem}.weight_scale"] = _entry(r.scale.astype(scale_dt), scale_tag)
        return out
    half = 2 ** (s.bits - 1)
    out[f"{stem}.weight_packed"] = _entry(pack_int32((codes + half).astype(np.uint32), s.bits))
    out[f"{stem}.weight_scale"] = _entry(r.scale.astype(scale_dt), scale_tag)
    out[f"{stem}.weight_shape"] = _entry(np.array(r.codes.shape, np.int64))
    if not s.symmetric:
        zp = (r.zero_point - shift + half).astype(np.uint32)
        out[f"{stem}.weight_zero_point"] = _entry(np.ascontiguousarray(pack_int32(zp.T, s.bits).T))
    return out


def _ct_args(s: _Scheme) -> dict[str, Any]:
    weights = {
        "num_bits": s.bits,
        "type": "float" if s.fmt == "float-quantized" else "int",
        "symmetric": s.symmetric,
        "strategy": s.strategy,
        "group_size": s.group_size,
        "dynamic": False,
        "actorder": None,
        "block_structure": None if s.block is None else list(s.block),
        "observer": "minmax",
        "observer_kwargs": {},
    }
    inputs = None
    if s.activations:
        inputs = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "strategy": "token",
            "group_size": None,
            "dynamic": True,
            "actorder": None,
            "block_structure": None,
            "observer": None,
            "observer_kwargs": {},
        }
    return {"weights": weights, "input_activations": inputs, "output_activations": None}


# vLLM fuses these projections into one Linear; they must share a scheme.
_FUSED = (("q", "k", "v"), ("gate", "up"))


@public("checkpoints.export_compressed_tensors")
def export_compressed_tensors(
    directory: str | os.PathLike,
    params: Any,
    config: Any,
    *,
    dtype: str = "float32",
    scale_dtype: str = "float32",
    activations: str | None = "int8-dynamic-token",
    tokenizer_json: str | os.PathLike | None = None,
) -> str:
    """Writes `params` in the compressed-tensors layout (vLLM, tpu-inference) and returns the
    directory.

    Each `QArray` kernel is stored from its codes, never re-rounded:

    * int2-int8 with one scale per group of input entries (`QuantSpec(4, axis=-1,
      group_size=128)`: W4A16) or per output channel (`QuantSpec(4, axis=-1)`), symmetric or
      affine: `"pack-quantized"`, weight-only;
    * int8 symmetric per output channel (`QuantSpec(8, axis=-1)`): `"int-quantized"` W8A8 with
      dynamic per-token int8 input activations (`activations="int8-dynamic-token"`, the default;
      `activations=None` stores int8 weights as weight-only `"pack-quantized"` W8A16 instead);
    * FP8 E4M3 per output channel (`QuantSpec(fmt="e4m3", axis=-1)`), per tensor, or in `128 x
      128` tiles (`QuantSpec(fmt="e4m3", group_size=(128, 128))`): `"float-quantized"`,
      weight-only (FP8 W8A16; `activations` applies to int8 only).

    Float leaves (embeddings, norms, unquantized kernels, `lm_head`) are written in `dtype`; the
    float Linear layers are listed in `quantization_config["ignore"]`. One config group per
    distinct scheme (targets: the module names as `re:` patterns); the global `format` is the
    schemes' format, or `"mixed-precision"` with a format per group. vLLM fuses q/k/v and
    gate/up: they must share a scheme (`ValueError` otherwise).

    Scales are written in `scale_dtype` (float32 keeps jaxslim's `dequantize` exactly; float16 or
    bfloat16 round each scale once, as llm-compressor's checkpoints do).

    Raises `ValueError` naming the leaf and a supported spec for a QArray with no layout (NF4,
    fp8 grouped along one axis, a per-input-channel scale, a group that does not divide the input
    width, an embedding).
    """
    fn = "checkpoints.export_compressed_tensors"
    tag, np_dtype = _dtype(dtype, fn)
    scale_tag, scale_dt = _dtype(scale_dtype, fn, "scale_dtype")
    if activations not in (None, "int8-dynamic-token"):
        raise ValueError(
            f"{fn}: activations must be 'int8-dynamic-token' or None, got {activations!r}"
        )
    hf = hf_config(params, config, fn)
    hf["torch_dtype"] = dtype
    all_leaves = leaves(params, fn)
    tensors: dict[str, dict] = {}
    schemes: dict[_Scheme, list[str]] = {}
    ignore: list[str] = []
    by_path: dict[str, _Scheme | None] = {}
    for leaf in all_leaves:
        if not isinstance(leaf.value, QArray):
            tensors[leaf.hf_name] = _float_entry(leaf, tag, np_dtype)
            if leaf.kind == "kernel":
                ignore.append(leaf.hf_name[: -len(".weight")])
                by_path[leaf.path] = None
            continue
        r = rows(leaf) if leaf.kind != "vector" and leaf.value.ndim == 2 else None
        s = _ct_scheme(leaf, r, activations, fn)
        by_path[leaf.path] = s
        tensors.update(_ct_tensors(leaf, r, s, scale_tag, scale_dt))
        schemes.setdefault(s, []).append(leaf.hf_name[: -len(".weight")])
    for i in range(len(params["layers"])):
        for group in _FUSED:
            got = {by_path.get(f"layers/{i}/{k}") for k in group}
            if len(got) > 1:
                raise ValueError(
                    f"{fn}: layers/{i}/{{{','.join(group)}}} are quantized differently; vLLM "
                    "fuses them into one Linear layer, so they need one scheme (quantize them "
                    "with the same spec, or keep all of them float)"
                )
    if schemes:
        formats = sorted({s.fmt for s in schemes})
        groups = {}
        for n, (s, names) in enumerate(schemes.items()):
            targets = ["Linear"] if len(schemes) == 1 else [_targets(names)]
            group = {"targets": targets, **_ct_args(s)}
            if len(formats) > 1:
                group["format"] = s.fmt
            groups[f"group_{n}"] = group
        hf["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": formats[0] if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": ignore,
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
        }
    directory = _out_dir(directory, fn)
    _write(directory, tensors, hf, tokenizer_json)
    return directory


def _targets(names: list[str]) -> str:
    return "re:^(" + "|".join(re.escape(n) for n in names) + ")$"
