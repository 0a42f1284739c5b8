"""Export a Llama-family params tree to a GGUF file that llama.cpp loads.

Tensors are written in llama.cpp's names (`blk.N.attn_q.weight`, ...) and layout: a linear weight
is HF's `(out, in)` block of memory (GGUF lists it as `[in, out]`), one row per output, GGUF
blocks of 32 running along the input (contraction) axis. For the `llama` architecture the rows of
`attn_q`/`attn_k` (and their biases) are permuted as llama.cpp's `convert_hf_to_gguf.py` does
(`permute_qk`): the permutation moves whole rows and blocks run inside a row, so a quantized
weight's codes and scales are permuted together, unchanged.

Quantized leaves are written from their codes, never re-rounded (byte layouts as `gguf.quants`):

* Q8_0 <- int8 symmetric: block = f16 `d` + 32 int8 `q`; value `q * d`.
* Q4_0 <- int4 symmetric signed (codes `c` in [-8, 7]): block = f16 `d` + 16 bytes of nibbles
  `n = c + 8`, byte `j` holding element `j` (low nibble) and `j + 16` (high); value `(n - 8) * d`.
* Q4_1 <- int4 with a zero point `z` (affine, or unsigned): block = f16 `d`, f16 `m` + 16 bytes
  of `n = c - qmin` (same nibble order); value `n * d + m` with `m = (qmin - z) * d`.

Any scale layout whose scale is constant over each run of 32 inputs of a row maps exactly: groups
of 32, 64, 128... along the input axis (each scale repeated over its blocks), one scale per output
channel, one per tensor. Other specs (int2/int3, NF4, fp8, affine int8, groups of 16, a scale per
input channel) raise `ValueError` naming the leaf and the nearest supported spec.

The export error is the f16 rounding of the scales (and of Q4_1's `m`): a value `(c - z) * s`
becomes `(c - z) * f16(s)` (Q4_1: `n * f16(s) + f16((qmin - z) * f16(s))`), off by at most
`|c - z| * ulp(s) / 2`, a relative `2^-11` of the largest value of its block (scales below f16's
normal range, ~6e-5, lose more relative precision; that is at most `|c - z| * 2^-25`).
`export_gguf` measures it per tensor (with gguf-py's own `dequantize`) and returns it.
Quantize with `gguf_quantize` (scales rounded up to f16, Q4_1's to 7 significant bits) and the
export is exact: llama.cpp then dequantizes bit for bit what `quant.dequantize` gives.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim._checks import leaf_path, public
from jaxslim.checkpoints import _names
from jaxslim.checkpoints._export_safetensors import (
    Leaf,
    Rows,
    check_dir,
    float_tensor,
    hf_config,
    leaves,
    rows,
    sizes,
)
from jaxslim.quant import QArray, QuantSpec, qparams_from_range, quantize
from jaxslim.quant._spec import layout

BLOCK = 32


@dataclasses.dataclass(frozen=True)
class _Type:
    """A GGUF block type jaxslim codes map onto without re-rounding."""

    name: str  # "Q8_0"
    bits: int
    zero_point: bool  # True: the block stores a min `m` (Q4_1)
    signed: bool  # signedness of gguf_spec's codes
    mantissa: int  # significant bits gguf_quantize keeps in a scale (f16: 11)


_TYPES = {
    "q8_0": _Type("Q8_0", 8, False, True, 11),
    "q4_0": _Type("Q4_0", 4, False, True, 11),
    "q4_1": _Type("Q4_1", 4, True, False, 7),
}


def _type(type_name: str, fn: str) -> _Type:
    t = _TYPES.get(str(type_name).lower())
    if t is None:
        raise ValueError(f"{fn}: GGUF type must be one of {list(_TYPES)}, got {type_name!r}")
    return t


@public("checkpoints.gguf_spec")
def gguf_spec(type_name: str, *, embedding: bool = False) -> QuantSpec:
    """The jaxslim `QuantSpec` that a GGUF block type stores exactly.

    For a Flax kernel `(in, out)`: blocks of 32 along the input axis (`group_axis=-2`, the
    default), a scale per output channel and block (`axis=-1`). For an embedding `(V, d)` (GGUF
    blocks run along `d`): `axis=0, group_axis=-1`. `"q8_0"`: int8 symmetric; `"q4_0"`: int4
    symmetric signed; `"q4_1"`: int4 affine unsigned (codes `[0, 15]`, as Q4_1's nibbles).

    >>> s = gguf_spec("q4_0")
    >>> s.bits, s.signed, s.symmetric, s.axis, s.group_size
    (4, True, True, (-1,), 32)
    >>> gguf_spec("q8_0", embedding=True).group_axis
    -1
    """
    t = _type(type_name, "checkpoints.gguf_spec")
    kw = {"axis": 0, "group_axis": -1} if embedding else {"axis": -1}
    return QuantSpec(t.bits, signed=t.signed, symmetric=not t.zero_point, group_size=BLOCK, **kw)


def _round_up(s: np.ndarray, mantissa: int) -> np.ndarray:
    """The smallest float16 >= `s` with at most `mantissa` significant bits (f16 range)."""
    s = np.asarray(s, np.float32)
    m, e = np.frexp(s)
    r = np.ldexp(np.ceil(np.ldexp(m, mantissa)), e - mantissa).astype(np.float32)
    h = r.astype(np.float16)
    h = np.where(h.astype(np.float32) < r, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float32)


@public("checkpoints.gguf_quantize", leaf_kwarg=True)
def gguf_quantize(x: jax.typing.ArrayLike, type_name: str, *, embedding: bool = False) -> QArray:
    """Quantizes `x` (RTN) to a `QArray` that `export_gguf` writes as `type_name` exactly.

    Same as `quant.quantize(x, gguf_spec(type_name))` but each scale is rounded *up* to the next
    float16 (for `"q4_1"`: to 7 significant bits, so that `m = (qmin - z) * d` is a float16 too),
    before the codes are computed; rounding up keeps the whole range on the grid. The GGUF file
    then holds exactly the QArray: `gguf.quants.dequantize` of the tensor equals
    `quant.dequantize` bit for bit.

    >>> import jax.numpy as jnp
    >>> q = gguf_quantize(jnp.linspace(-1.0, 1.0, 64).reshape(32, 2), "q4_0")
    >>> bool((q.scale == q.scale.astype(jnp.float16).astype(jnp.float32)).all())
    True
    """
    path = leaf_path()
    fn = "checkpoints.gguf_quantize"
    t = _type(type_name, fn)
    spec = gguf_spec(type_name, embedding=embedding)
    x = jnp.asarray(x)
    lay = layout(spec, x.shape, path=path)
    v = np.asarray(jax.device_get(lay.to_view(x)), np.float32)
    lo = v.min(axis=lay.reduce_axes, keepdims=True)
    hi = v.max(axis=lay.reduce_axes, keepdims=True)
    s, _ = qparams_from_range(jnp.asarray(lo), jnp.asarray(hi), spec)
    s = _round_up(np.asarray(s), t.mantissa)
    if not np.isfinite(s).all():
        raise ValueError(f"{fn}: {path or 'the input'!r} has a scale beyond float16's range")
    zp = None
    if not spec.symmetric:
        qmin, qmax = spec.qmin, spec.qmax
        zp = np.clip(qmin - np.round(np.minimum(lo, 0) / s), qmin, qmax).astype(np.int32)
    return quantize(x, spec, scale=s, zero_point=zp)


# --------------------------------------------------------------------------------------------
# tensors


class GGUFTensor(NamedTuple):
    """One written tensor: the leaf path, GGUF type name, HF shape and the largest absolute
    difference between llama.cpp's values (gguf-py's `dequantize` of the bytes) and the leaf's."""

    path: str
    type: str
    shape: tuple[int, ...]
    max_abs_error: float


def _match(leaf: Leaf, fn: str) -> tuple[_Type, Rows]:
    """The GGUF type and row form of a quantized leaf, or `ValueError` with the nearest spec."""
    q = leaf.value
    spec = q.spec
    embedding = leaf.kind == "embedding"
    if spec.fmt == "int" and spec.bits == 8 and spec.symmetric:
        t = _TYPES["q8_0"]
    elif spec.fmt == "int" and spec.bits == 4:
        t = _TYPES["q4_1" if q.zero_point is not None else "q4_0"]
    else:
        t = None
    near = "q8_0" if spec.bits == 8 or spec.fmt in ("e4m3", "e5m2") else "q4_0"
    if spec.fmt == "int" and spec.bits == 4 and not spec.symmetric:
        near = "q4_1"
    r = rows(leaf) if t is not None and leaf.kind != "vector" and q.ndim == 2 else None
    why = None
    if t is None:
        why = f"GGUF has no block type for {spec.bits}-bit {spec.fmt!r} codes"
        if spec.fmt == "int" and spec.bits == 8:
            why = "GGUF's int8 type Q8_0 is symmetric (no zero point)"
    elif r is None:
        why = "its scales vary along the input axis inside a row (GGUF blocks run along it)"
    elif r.block % BLOCK or r.codes.shape[1] % BLOCK:
        why = (
            f"GGUF blocks are {BLOCK} inputs long and its scales change every {r.block} inputs "
            f"of rows {r.codes.shape[1]} long"
        )
    if why is not None:
        raise ValueError(
            f"checkpoints.export_gguf: {leaf.path!r} is quantized with {spec}, which has no GGUF "
            f"type: {why}; quantize it with {gguf_spec(near, embedding=embedding)} -> "
            f"{_TYPES[near].name} (checkpoints.gguf_spec({near!r}"
            f"{', embedding=True' if embedding else ''}) or checkpoints.gguf_quantize), or "
            "dequantize it"
        )
    return t, r


def _f16(a: np.ndarray, leaf: Leaf) -> np.ndarray:
    h = a.astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError(
            f"checkpoints.export_gguf: {leaf.path!r} has a scale beyond float16's range "
            f"(max {float(np.abs(a).max())}); GGUF stores scales in float16"
        )
    return h


def _blocks(t: _Type, r: Rows, leaf: Leaf) -> np.ndarray:
    """GGUF block bytes `(R, C // 32 * bytes_per_block)` of row form `r` (see the table above)."""
    R, C = r.codes.shape
    nb = C // BLOCK
    rep = r.block // BLOCK
    scale = np.repeat(r.scale, rep, axis=1)[:, :nb]
    zp = None if r.zero_point is None else np.repeat(r.zero_point, rep, axis=1)[:, :nb]
    codes = r.codes.reshape(R, nb, BLOCK)
    d = _f16(scale, leaf)
    parts = [d[..., None].view(np.uint8)]
    spec = leaf.value.spec
    if t.name == "Q8_0":
        q = codes if zp is None else codes - zp[..., None]  # unsigned symmetric: z = 128
        parts.append(q.astype(np.int8).view(np.uint8))
    else:
        if t.zero_point:
            n = codes - int(spec.qmin)
            m = (float(spec.qmin) - zp.astype(np.float32)) * d.astype(np.float32)
            parts.append(_f16(m, leaf)[..., None].view(np.uint8))
        else:
            n = codes + 8
        n = n.astype(np.uint8)
        parts.append(n[..., : BLOCK // 2] | (n[..., BLOCK // 2 :] << np.uint8(4)))
    return np.concatenate(parts, axis=-1).reshape(R, -1)


def _permute(x: np.ndarray, leaf: Leaf, arch: str, s) -> np.ndarray:
    if arch not in _names.QK_PERMUTED_ARCHS:
        return x
    key = leaf.path.rsplit("/", 1)[-1]
    heads = {"q": s.heads, "q_bias": s.heads, "k": s.kv_heads, "k_bias": s.kv_heads}.get(key)
    return x if heads is None else _names.permute_qk(x, heads)


def _tensor(leaf: Leaf, arch: str, s, dtype: str, fn: str):
    """`(array, raw ggml type or None, type name, max abs error)` of one leaf."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    x = leaf.value
    if isinstance(x, QArray) and leaf.kind != "vector" and x.ndim == 2:
        t, r = _match(leaf, fn)
        data = _permute(_blocks(t, r, leaf), leaf, arch, s)
        qt = getattr(GGMLQuantizationType, t.name)
        want = _permute(float_tensor(leaf), leaf, arch, s)
        err = float(np.abs(dequantize(data, qt) - want).max(initial=0.0))
        return data, qt, t.name, err
    a = _permute(float_tensor(leaf), leaf, arch, s)  # 1-D QArrays: stored dequantized, exactly
    if dtype == "f16" and a.ndim == 2:
        h = a.astype(np.float16)
        return h, None, "F16", float(np.abs(h.astype(np.float32) - a).max(initial=0.0))
    return a, None, "F32", 0.0


# --------------------------------------------------------------------------------------------
# metadata


def _arch(hf: Mapping[str, Any], fn: str) -> str:
    model_type = hf.get("model_type", "llama")
    arch = _names.MODEL_TYPE_TO_GGUF_ARCH.get(model_type)
    if arch is None:
        raise ValueError(
            f"{fn}: model_type {model_type!r} has no llama.cpp architecture here; supported: "
            f"{sorted(_names.MODEL_TYPE_TO_GGUF_ARCH)}"
        )
    scaling = hf.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(
            f"{fn}: RoPE scaling {scaling.get('rope_type', scaling.get('type'))!r} is not "
            "exported yet (llama.cpp needs a rope_freqs tensor); export a model without it"
        )
    return arch


def _copy_tokenizer(writer, source: Any, fn: str) -> int | None:
    """Copies `tokenizer.ggml.*` (and `tokenizer.chat_template`) from a GGUF file, with their
    GGUF value types; returns the vocabulary size."""
    from gguf import GGUFReader, GGUFValueType

    path = getattr(source, "path", source)
    reader = getattr(source, "gguf_reader", None)  # an open GGUF Source: no second parse
    if reader is None and not (isinstance(path, str | os.PathLike) and os.path.isfile(path)):
        raise ValueError(
            f"{fn}: tokenizer_gguf must be a GGUF file path or a checkpoints Source opened on "
            f"one, got {source!r}"
        )
    reader = reader if reader is not None else GGUFReader(path)
    n = None
    for key, field in reader.fields.items():
        if not (key.startswith("tokenizer.ggml.") or key == "tokenizer.chat_template"):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        value = field.contents()
        writer.add_key_value(key, value, main, sub_type=sub)
        if key == "tokenizer.ggml.tokens":
            n = len(value)
    if n is None:
        raise ValueError(f"{fn}: {os.fspath(path)!r} holds no tokenizer.ggml.tokens")
    return n


def _tokenizer_from_json(writer, text: str, hf: Mapping[str, Any], vocab: int, pre: str, fn):
    """GGUF tokenizer keys of a HF byte-level BPE `tokenizer.json` (llama.cpp's "gpt2" model),
    as `convert_hf_to_gguf.py` writes them: tokens by id (padded with `[PAD{i}]` up to the
    embedding rows), token types (1 normal, 3 control for special added tokens, 4 user-defined
    for other added tokens, 5 unused padding) and merges."""
    if isinstance(text, str | os.PathLike) and os.path.isfile(text):
        with open(text) as f:
            text = f.read()
    tok = json.loads(text)
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(
            f"{fn}: only byte-level BPE tokenizer.json files are converted (got model type "
            f"{model.get('type')!r}); pass tokenizer_gguf= a GGUF file with this tokenizer instead"
        )
    by_id = {int(i): t for t, i in model["vocab"].items()}
    kinds = {}
    for added in tok.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        kinds[int(added["id"])] = 3 if added.get("special") else 4
    n = max(by_id) + 1
    if n > vocab:
        raise ValueError(
            f"{fn}: the tokenizer has {n} tokens but the embedding only {vocab} rows; a "
            "vocabulary cut from the embedding has no GGUF tokenizer"
        )
    tokens, types = [], []
    for i in range(vocab):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(kinds.get(i, 1))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", None)):
        v = hf.get(key)
        if isinstance(v, list | tuple):
            v = v[0] if v else None
        if v is not None:
            (add or writer.add_eos_token_id)(int(v))
    return vocab


@public("checkpoints.export_gguf")
def export_gguf(
    path: str | os.PathLike,
    params: Any,
    config: Any,
    *,
    dtype: str = "f32",
    tokenizer_json: str | os.PathLike | None = None,
    tokenizer_gguf: Any = None,
    tokenizer_pre: str = "gpt-2",
    name: str | None = None,
) -> dict[str, GGUFTensor]:
    """Writes `params` (a `jaxslim.models` tree, any leaf a `QArray`) as a GGUF file.

    Args:
      path: the `.gguf` file to write (its directory must exist).
      params: `{"embed", "layers": [...], "norm", optional "lm_head"}`, kernels Flax `(in, out)`.
      config: a `jaxslim.models.Config` (its `to_hf(params)`) or a HF `config.json` dict; sizes
        are read from the leaves, so a pruned model's file has its cut shapes.
      dtype: `"f32"` or `"f16"` for float 2-D tensors (norms and biases are always F32).
        Quantized leaves are written in their GGUF type (module docstring) whatever `dtype` is.
      tokenizer_json: a HF byte-level BPE `tokenizer.json` (text or path) to build the GGUF
        tokenizer from (`tokenizer.ggml.model = "gpt2"`, pre-tokenizer `tokenizer_pre`).
      tokenizer_gguf: a GGUF file (or a `checkpoints` Source opened on one) whose
        `tokenizer.ggml.*` keys and chat template are copied with their types (takes precedence).
      name: `general.name`.

    Metadata: `general.architecture` (`llama` for Llama/Mistral/SmolLM2, `qwen2`, `qwen3`) and
    `{arch}.context_length`, `embedding_length`, `block_count`, `feed_forward_length`,
    `attention.head_count`, `attention.head_count_kv`, `attention.key_length`/`value_length`,
    `attention.layer_norm_rms_epsilon`, `rope.freq_base`, `rope.dimension_count`, `vocab_size`.

    Returns:
      `{gguf tensor name: GGUFTensor(path, type, shape, max_abs_error)}`: `max_abs_error` is the
      largest `|llama.cpp value - jaxslim value|` of the tensor (0 for F32 and for QArrays made by
      `gguf_quantize`; the f16 rounding of scales otherwise, module docstring).

    Raises `ValueError` naming the leaf for a spec with no GGUF type (with the nearest supported
    spec), a tree that is not a Llama-family tree, a tokenizer that does not fit the embedding,
    or a directory that does not exist.
    """
    fn = "checkpoints.export_gguf"
    import gguf

    if dtype not in ("f32", "f16"):
        raise ValueError(f"{fn}: dtype must be 'f32' or 'f16', got {dtype!r}")
    path = check_dir(path, fn)
    hf = hf_config(params, config, fn)
    s = sizes(params, hf, fn)
    arch = _arch(hf, fn)
    if arch == "llama" and any(
        lp.get(k) is not None for lp in params["layers"] for k in ("q_norm", "k_norm")
    ):
        raise ValueError(f"{fn}: q_norm/k_norm need model_type 'qwen3' (llama has no q/k norm)")

    written: dict[str, GGUFTensor] = {}
    tensors = []
    for leaf in leaves(params, fn):
        gname = _names.hf_to_gguf_name(leaf.hf_name)
        data, qt, tname, err = _tensor(leaf, arch, s, dtype, fn)
        tensors.append((gname, data, qt))
        shape = tuple(leaf.value.shape)
        written[gname] = GGUFTensor(
            leaf.path, tname, shape[::-1] if leaf.kind == "kernel" else shape, err
        )

    tmp = path + ".partial"
    w = gguf.GGUFWriter(tmp, arch)
    try:
        if name:
            w.add_name(name)
        w.add_context_length(int(hf.get("max_position_embeddings") or 2048))
        w.add_embedding_length(s.hidden)
        w.add_block_count(s.layers)
        w.add_feed_forward_length(s.intermediate)
        w.add_head_count(s.heads)
        w.add_head_count_kv(s.kv_heads)
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
        w.add_layer_norm_rms_eps(float(hf.get("rms_norm_eps", 1e-6)))
        rope = hf.get("rope_parameters") or {}
        w.add_rope_freq_base(float(hf.get("rope_theta") or rope.get("rope_theta", 10000.0)))
        w.add_rope_dimension_count(s.head_dim)
        w.add_vocab_size(s.vocab)
        if any(qt is not None for _, _, qt in tensors):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        n = None
        if tokenizer_gguf is not None:
            n = _copy_tokenizer(w, tokenizer_gguf, fn)
        elif tokenizer_json is not None:
            n = _tokenizer_from_json(w, tokenizer_json, hf, s.vocab, tokenizer_pre, fn)
        if n is not None and n != s.vocab:
            raise ValueError(
                f"{fn}: the tokenizer has {n} tokens but the embedding {s.vocab} rows; llama.cpp "
                "needs one row per token"
            )
        for gname, data, qt in tensors:
            w.add_tensor(gname, data, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    return written
