"""GGUF files (llama.cpp) read as Hugging Face checkpoints: HF names and shapes, dequantized
tensors, q/k permutation undone, a `config.json` dict and a `tokenizer.json` built from the
metadata."""

import functools
import json
import math

import ml_dtypes
import numpy as np

from jaxslim.checkpoints import _names
from jaxslim.checkpoints._source import Source, require

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_NATIVE = ("F32", "F16", "F64", "I8", "I16", "I32", "I64")  # the reader maps these to numpy
_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6  # tokenizer.ggml.token_type values


def _error(path: str, what: str) -> ValueError:
    return ValueError(f"jaxslim.checkpoints.open: {path!r}: {what}")


@functools.cache
def _reader_class():
    """`gguf.GGUFReader` that checks each tensor's type and extent before mapping it."""
    gguf = require("gguf")

    class Reader(gguf.GGUFReader):
        def __init__(self, path):
            self.path = path
            super().__init__(path)

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                name = str(bytes(field.parts[1]), encoding="utf-8")
                raw = int(field.parts[4][0])
                try:
                    qtype = gguf.GGMLQuantizationType(raw)
                    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                except (ValueError, KeyError):
                    raise _error(
                        self.path,
                        f"tensor {name!r} has GGML type id {raw}, which the "
                        f"installed gguf package does not know; upgrade it (pip install "
                        f"-U gguf) or re-quantize the file to a standard type (Q8_0, "
                        f"Q4_K_M, F16)",
                    ) from None
                n = math.prod(int(d) for d in field.parts[3])
                start = start_offs + int(field.parts[5][0])
                stop = start + n * type_size // block
                if stop > size:
                    raise _error(
                        self.path,
                        f"the file is truncated: tensor {name!r} needs bytes "
                        f"{start}..{stop} but the file has {size}; download it again",
                    )
            super()._build_tensors(start_offs, fields)

    return Reader


def _open_reader(path: str):
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise _error(
            path,
            f"not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf "
            "file from llama.cpp, or a Hugging Face model directory",
        )
    try:
        reader = _reader_class()(path)
    except ValueError as e:
        if str(e).startswith("jaxslim"):
            raise
        raise _error(
            path, f"corrupt or truncated GGUF file (gguf says: {e}); download it again"
        ) from e
    except Exception as e:  # a truncated header surfaces as IndexError/struct errors
        raise _error(
            path, f"corrupt or truncated GGUF header ({type(e).__name__}: {e}); download it again"
        ) from e
    if reader.byte_order != "I":
        raise _error(
            path,
            "is a big-endian GGUF file; convert it to little-endian with "
            "gguf-py's gguf_convert_endian.py",
        )
    return reader


def _float(x) -> float:
    """A float32 metadata value as the decimal a config.json would hold (1e-05, not 9.99e-06)."""
    return float(str(np.float32(x)))


def _llama3_rope_scaling(factors, theta, head_dim, context) -> dict:
    """Recover Llama 3's rope_scaling from llama.cpp's `rope_freqs` (convert_hf_to_gguf.py)."""
    factors = np.asarray(factors, np.float64)
    factor = float(factors.max())
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    old = float(context or 8192)

    def rebuild(low, high):
        smooth = (old / wavelen - low) / (high - low)
        mid = 1 / ((1 - smooth) / factor + smooth)
        return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))

    low, high = 1.0, 4.0  # llama.cpp's defaults
    inner = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if inner.sum() >= 2 and factor > 1:
        s = (1 / factors[inner] - 1 / factor) / (1 - 1 / factor)
        slope, low = np.polyfit(s, old / wavelen[inner], 1)
        low, high = round(float(low), 4), round(float(low + slope), 4)
    with np.errstate(all="ignore"):
        if not (0 < low < high and np.allclose(rebuild(low, high), factors, rtol=1e-4)):
            low, high = 1.0, 4.0
    return {
        "rope_type": "llama3",
        "factor": _float(factor),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": int(old),
    }


class GGUFSource(Source):
    """A llama.cpp GGUF file read in Hugging Face naming (see `checkpoints.open`)."""

    format = "gguf"

    def __init__(self, path: str):
        gguf = require("gguf")
        self.path = path
        self._gguf = gguf
        self._reader = _open_reader(path)
        self._arch = None
        self._arch = self._get("general.architecture")
        if self._arch not in _names.GGUF_ARCH_TO_MODEL_TYPE:
            raise _error(
                path,
                f"architecture {self._arch!r} is not supported (known: "
                f"{', '.join(_names.GGUF_ARCH_TO_MODEL_TYPE)}); jaxslim.models runs "
                "Llama-family decoders only: use a Llama/Mistral/Qwen2/Qwen3/SmolLM2 file",
            )
        self._tensors = {}
        self._extra = {}
        for t in self._reader.tensors:
            if t.name in _names.GGUF_NON_HF_TENSORS:
                self._extra[t.name] = t
                continue
            try:
                self._tensors[_names.gguf_to_hf_name(t.name)] = t
            except ValueError:
                raise _error(
                    path,
                    f"tensor {t.name!r} has no Hugging Face name in a "
                    f"{self._arch!r} model; the file is not a plain Llama-family "
                    "decoder (checkpoints.gguf_to_hf_name lists the names read)",
                ) from None
        for qtype in {t.tensor_type for t in self._reader.tensors}:
            if qtype.name in _NATIVE or qtype.name == "BF16":
                continue
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            try:
                gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
            except NotImplementedError:
                bad = next(t.name for t in self._reader.tensors if t.tensor_type == qtype)
                raise _error(
                    path,
                    f"tensor {bad!r} is {qtype.name}, which the installed gguf "
                    "package cannot dequantize; upgrade gguf (pip install -U gguf) or "
                    "re-quantize the file (Q8_0, Q4_K_M, F16)",
                ) from None
        self._names = sorted(self._tensors, key=_names.natural_key)
        self._shapes = {n: tuple(map(int, t.shape[::-1])) for n, t in self._tensors.items()}
        self._config = self._derive_config()
        self._metadata = None

    def _get(self, key: str, default=None):
        """A metadata value; the first entry of a per-layer list (head counts may be lists)."""
        field = self._reader.get_field(key)
        if field is None:
            return default
        value = field.contents()
        per_layer = self._arch is not None and key.startswith(f"{self._arch}.")
        return value[0] if per_layer and isinstance(value, list) and value else value

    def _derive_config(self) -> dict:
        a = self._arch
        hidden = self._get(f"{a}.embedding_length")
        heads = self._get(f"{a}.attention.head_count")
        embed = self._tensors.get("model.embed_tokens.weight")
        vocab = self._get(f"{a}.vocab_size") or (int(embed.shape[-1]) if embed else None)
        head_dim = self._get(f"{a}.attention.key_length") or (hidden // heads if heads else None)
        theta = _float(self._get(f"{a}.rope.freq_base", 10000.0))
        context = self._get(f"{a}.context_length")
        config = {
            "architectures": [_ARCHITECTURES[a]],
            "model_type": _names.GGUF_ARCH_TO_MODEL_TYPE[a],
            "hidden_size": hidden,
            "intermediate_size": self._get(f"{a}.feed_forward_length"),
            "num_hidden_layers": self._get(f"{a}.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._get(f"{a}.attention.head_count_kv", heads),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": _float(self._get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": theta,
            "rope_scaling": None,
            "vocab_size": vocab,
            "max_position_embeddings": context,
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
        }
        for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
            value = self._get(f"tokenizer.ggml.{key}")
            if value is not None:
                config[hf] = value
        kind = self._get(f"{a}.rope.scaling.type")
        scale = self._get(f"{a}.rope.scaling.factor")
        orig = self._get(f"{a}.rope.scaling.original_context_length")
        if "rope_freqs.weight" in self._extra and a == "llama":
            factors = np.array(self._extra["rope_freqs.weight"].data, np.float32)
            config["rope_scaling"] = _llama3_rope_scaling(factors, theta, head_dim, orig)
        elif kind in ("linear", "yarn") and scale:
            config["rope_scaling"] = {"rope_type": kind, "factor": _float(scale)}
            if orig:
                config["rope_scaling"]["original_max_position_embeddings"] = orig
        return config

    @property
    def config(self) -> dict:
        return self._config

    @property
    def gguf_reader(self):
        """The open `gguf.GGUFReader` of the file (`None` once closed)."""
        return self._reader

    @property
    def metadata(self) -> dict:
        if self._metadata is None:
            self._metadata = {k: f.contents() for k, f in self._reader.fields.items()}
        return self._metadata

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check_name(name, "shape")
        return self._shapes[name]

    def dtype(self, name: str) -> np.dtype:
        self._check_name(name, "dtype")
        t = self._tensors[name]
        if t.tensor_type.name in _NATIVE:
            return np.dtype(t.data.dtype)
        if t.tensor_type.name == "BF16":
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(np.float32)

    def _read(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        if t is None:
            raise ValueError(f"checkpoints.Source.read: {self.path!r} was closed; open it again")
        kind = t.tensor_type.name
        if kind in _NATIVE:
            out = np.array(t.data)
        elif kind == "BF16":
            out = np.array(t.data).view(ml_dtypes.bfloat16)
        else:
            out = self._gguf.quants.dequantize(t.data, t.tensor_type)
        out = out.reshape(self.shape(name))
        heads = _names.qk_heads(name, self._config)
        if heads is not None and self._arch in _names.QK_PERMUTED_ARCHS:
            out = _names.unpermute_qk(out, heads)
        return out

    def read_qarray(self, name: str, *, transpose: bool = False):
        """`name` as a `quant.QArray` holding the file's own codes and scales, or `None` when its
        GGUF type is not Q8_0 or Q4_0 (read it with `read`: dequantized).

        A GGUF row of `C` entries is `C / 32` blocks of an f16 scale `d` and 32 codes: Q8_0 int8
        codes `q`, value `q * d`; Q4_0 nibbles `n` (byte `j` of a block holds entry `j` low and
        `j + 16` high), value `(n - 8) * d`. The QArray is int8 / int4 symmetric signed with one
        float32 scale (`d` exactly) per 32 entries of a row, so `quant.dequantize` equals
        `gguf.quants.dequantize` of the bytes bit for bit. Layout: HF `(R, C)` with
        `gguf_spec(type, embedding=True)` (blocks along the last axis), or with `transpose=True`
        a Flax kernel `(C, R)` with `gguf_spec(type)`. The q/k row permutation is undone on
        codes and scales together.
        """
        from jaxslim.checkpoints._export_gguf import gguf_spec
        from jaxslim.quant import QArray, pack

        self._check_name(name, "read_qarray")
        t = self._tensors[name]
        if t is None:
            raise ValueError(f"checkpoints.Source.read: {self.path!r} was closed; open it again")
        kind = t.tensor_type.name
        if kind not in ("Q8_0", "Q4_0"):
            return None
        shape = self.shape(name)
        if len(shape) != 2 or shape[1] % 32:
            return None
        rows, cols = shape
        _, type_size = self._gguf.GGML_QUANT_SIZES[t.tensor_type]
        blocks = np.asarray(t.data).reshape(rows, cols // 32, type_size)
        scale = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        if kind == "Q8_0":
            codes = blocks[..., 2:].copy().view(np.int8)
        else:
            qs = blocks[..., 2:]
            codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.int8) - np.int8(8)
        codes = codes.reshape(rows, cols)
        heads = _names.qk_heads(name, self._config)
        if heads is not None and self._arch in _names.QK_PERMUTED_ARCHS:
            codes, scale = _names.unpermute_qk(codes, heads), _names.unpermute_qk(scale, heads)
        bits = 8 if kind == "Q8_0" else 4
        if transpose:
            spec = gguf_spec(kind, embedding=False)
            codes, scale = codes.T, scale.T[:, None, :]  # (C, R); (C / 32, 1, R)
        else:
            spec = gguf_spec(kind, embedding=True)
            scale = scale[:, :, None]  # (R, C / 32, 1)
        codes = np.ascontiguousarray(codes)
        values = codes if bits == 8 else np.asarray(pack(codes, 4))
        return QArray(
            values, np.ascontiguousarray(scale), None, spec, tuple(codes.shape), np.float32
        )

    def tokenizer_json(self) -> str | None:
        if self._reader is None:
            raise ValueError(f"checkpoints.Source.tokenizer_json: {self.path!r} was closed")
        return tokenizer_json(self._get, self.path)

    def close(self) -> None:
        self._reader = None
        self._tensors = dict.fromkeys(self._tensors)
        self._extra = {}


# --- tokenizer.json from the GGUF vocabulary -------------------------------------------------

# Pre-tokenizer regexes of llama.cpp's `tokenizer.ggml.pre` names (llama-vocab.cpp), as the
# Hugging Face tokenizer.json of the same models writes them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_LEVEL = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": True,
    "use_regex": True,
}


def _split(regex: str) -> dict:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {**_BYTE_LEVEL, "use_regex": False},
        ],
    }


_PRE_TOKENIZERS = {
    "llama-bpe": _split(_LLAMA3_SPLIT),
    "llama3": _split(_LLAMA3_SPLIT),
    "qwen2": _split(_QWEN2_SPLIT),
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
    },
}


def _added_tokens(tokens, types) -> list[dict]:
    return [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == _CONTROL,
        }
        for i, (tok, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (_CONTROL, _USER_DEFINED)
    ]


def _bos_template(tokens, bos: int) -> dict:
    piece = {"SpecialToken": {"id": tokens[bos], "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [piece, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            piece,
            {"Sequence": {"id": "A", "type_id": 0}},
            piece,
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}},
    }


def _spm_merges(tokens, scores) -> list[list[str]]:
    """BPE merges equivalent to a SentencePiece vocabulary (transformers' SentencePieceExtractor):
    every split of a piece into two pieces, ranked by the merged piece's score."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece in sorted(vocab, key=lambda t: -scores[vocab[t]]):
        local = [
            (piece[:i], piece[i:])
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        merges += sorted(local, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    return [list(m) for m in merges]


def tokenizer_json(get, path: str) -> str | None:
    """A Hugging Face tokenizer.json for GGUF metadata read with `get(key, default)`.

    `tokenizer.ggml.model == "gpt2"` (Llama 3, Qwen2/3, SmolLM2): a byte-level BPE over
    `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, with the pre-tokenizer regex that
    `tokenizer.ggml.pre` names (GPT-2's when unknown). `"llama"` (Llama 2, Mistral): a
    SentencePiece-style BPE with byte fallback and merges rebuilt from the scores. CONTROL tokens
    become special added tokens, USER_DEFINED ones plain added tokens; a BOS is prepended when
    `tokenizer.ggml.add_bos_token` is true. None when the file has no vocabulary.
    """
    model = get("tokenizer.ggml.model")
    tokens = get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        return None
    types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    bos = get("tokenizer.ggml.bos_token_id")
    add_bos = bool(get("tokenizer.ggml.add_bos_token", model == "llama")) and bos is not None
    vocab = {t: i for i, t in enumerate(tokens)}
    if model == "gpt2":
        merges = get("tokenizer.ggml.merges") or []
        pre = get("tokenizer.ggml.pre", "default")
        ignore_merges = pre in ("llama-bpe", "llama3")
        normalizer = {"type": "NFC"} if pre == "qwen2" else None
        bpe = {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges,
        }
        pre_tokenizer = _PRE_TOKENIZERS.get(pre, _BYTE_LEVEL)
        decoder = {**_BYTE_LEVEL, "add_prefix_space": True}
        post = {**_BYTE_LEVEL, "trim_offsets": False}
        if add_bos:
            post = {"type": "Sequence", "processors": [post, _bos_template(tokens, bos)]}
    elif model == "llama":
        scores = get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = get("tokenizer.ggml.unknown_token_id", 0)
        bpe = {
            "type": "BPE",
            "dropout": None,
            "unk_token": tokens[unk],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": _spm_merges(tokens, scores),
        }
        normalizer = {
            "type": "Sequence",
            "normalizers": [{"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}],
        }
        if get("tokenizer.ggml.add_space_prefix", True):
            normalizer["normalizers"].insert(0, {"type": "Prepend", "prepend": "\u2581"})
        pre_tokenizer = None
        decoder = {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        }
        post = _bos_template(tokens, bos) if add_bos else None
    else:
        raise ValueError(
            f"checkpoints.Source.tokenizer_json: {path!r} has tokenizer.ggml.model {model!r}; only "
            "'gpt2' (byte-level BPE) and 'llama' (SentencePiece) vocabularies are converted: "
            "use the model's tokenizer.json from Hugging Face instead"
        )
    return json.dumps(
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": _added_tokens(tokens, types),
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": decoder,
            "model": bpe,
        },
        ensure_ascii=False,
    )
