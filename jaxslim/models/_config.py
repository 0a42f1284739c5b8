"""The model configuration: what parameter shapes cannot tell (family, head_dim, RoPE, norms).

Sizes (hidden width ``d``, heads ``H``, kv heads ``KV``, MLP width ``F``, layers, vocabulary) are
never stored here: they are read from the parameter shapes at run time, so a pruned tree runs as it
is and ``Config.to_hf(params)`` writes the sizes of the tree it is given.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "llama3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 RoPE frequency scaling (``rope_type: "llama3"`` in a HF config).

    Wavelengths ``lambda = 2 pi / inv_freq`` longer than ``original_max_position_embeddings /
    low_freq_factor`` are divided by ``factor``; shorter than ``original / high_freq_factor`` are
    kept; in between ``inv_freq' = (1 - s) inv_freq / factor + s inv_freq`` with ``s = (original /
    lambda - low_freq_factor) / (high_freq_factor - low_freq_factor)`` (transformers'
    ``_compute_llama3_parameters``).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclasses.dataclass(frozen=True)
class Config:
    """A Llama-family decoder's static configuration (hashable: a static argument under ``jit``).

    Sizes are not fields: ``d = embed.shape[1]``, ``H = q.shape[1] // head_dim``, ``KV =
    k.shape[1] // head_dim``, ``F = gate.shape[1]``, ``L = len(layers)``, ``V = embed.shape[0]``
    are read from the parameter tree (see ``jaxslim.models.forward``).

    Attributes:
      family: ``"llama"`` (also SmolLM2, TinyLlama), ``"mistral"``, ``"qwen2"`` or ``"qwen3"``.
      head_dim: per-head width ``hd``.
      rope_theta: RoPE base; ``inv_freq_i = theta ** (-2i / hd)``.
      rope_scaling: ``None`` or a ``RopeScaling`` (llama3 type).
      rms_norm_eps: ``eps`` in ``x / sqrt(mean(x^2) + eps) * w``.
      tie_word_embeddings: the output head is ``embed.T`` (no ``lm_head`` leaf).
      attention_bias: q/k/v carry biases (``q_bias``, ``k_bias``, ``v_bias``; Qwen2 always).
      o_bias: the output projection carries a bias (``o_bias``; Llama's ``attention_bias=True``).
      qk_norm: per-head RMSNorm of q and k before RoPE (``q_norm``, ``k_norm``; Qwen3).
      sliding_window: ``None`` or the attention window (Mistral): query ``i`` sees keys ``j`` with
        ``i - window < j <= i``.
      bos_token_id, eos_token_id: special token ids (``eos`` may be a tuple of ids).
      max_position_embeddings: the context length the model was trained for.
      dtype: the compute dtype (``"float32"``); parameters may be stored in another dtype.

    >>> from jaxslim import models
    >>> cfg = models.Config.from_hf({"model_type": "llama", "hidden_size": 64,
    ...     "num_attention_heads": 4, "rope_theta": 10000.0})
    >>> cfg.head_dim, cfg.family
    (16, 'llama')
    """

    family: str = "llama"
    head_dim: int = 64
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    max_position_embeddings: int = 2048
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(
                f"models.Config: family must be one of {', '.join(FAMILIES)}, got {self.family!r}"
            )
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(
                f"models.Config: head_dim must be a positive even int (RoPE rotates pairs), "
                f"got {self.head_dim!r}"
            )

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> Config:
        """Builds a ``Config`` from a Hugging Face ``config.json`` dict.

        Reads ``model_type`` (llama, mistral, qwen2, qwen3), ``head_dim`` (or ``hidden_size //
        num_attention_heads``), ``rope_theta`` and ``rope_scaling`` (or transformers 5's
        ``rope_parameters``), ``rms_norm_eps``, ``tie_word_embeddings``, ``attention_bias``,
        ``sliding_window``, special token ids and ``max_position_embeddings``. Raises
        ``ValueError`` for an unsupported model type, activation or RoPE type.
        """
        fn = "models.Config.from_hf"
        if not isinstance(config, Mapping):
            raise TypeError(f"{fn}: config must be a config.json dict, got {type(config).__name__}")
        family = config.get("model_type")
        if family not in FAMILIES:
            raise ValueError(
                f"{fn}: model_type {family!r} is not supported; supported: {', '.join(FAMILIES)} "
                "(SmolLM2 and TinyLlama are 'llama')"
            )
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{fn}: hidden_act {act!r} is not supported; only 'silu' is")
        if config.get("mlp_bias", False):
            raise ValueError(f"{fn}: mlp_bias=True is not supported (gate/up/down have no bias)")
        head_dim = config.get("head_dim")
        if head_dim is None:
            try:
                head_dim = int(config["hidden_size"]) // int(config["num_attention_heads"])
            except KeyError as e:
                raise ValueError(
                    f"{fn}: config has neither head_dim nor hidden_size and num_attention_heads"
                ) from e
        rope = dict(config.get("rope_parameters") or {})
        scaling = config.get("rope_scaling") or (rope if rope else None)
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = _rope_scaling(fn, scaling)
        window = None
        if family == "mistral":
            window = config.get("sliding_window")
        elif config.get("use_sliding_window", False):
            raise ValueError(
                f"{fn}: use_sliding_window=True ({family}: sliding attention on some layers only) "
                "is not supported; set use_sliding_window=False"
            )
        eos = config.get("eos_token_id")
        if isinstance(eos, list | tuple):
            eos = tuple(int(e) for e in eos)
        # transformers: Llama and Qwen3 put a bias on q, k, v and o when attention_bias is set;
        # Qwen2 always on q, k, v and never on o; Mistral never.
        attention_bias = family == "qwen2" or (
            family != "mistral" and bool(config.get("attention_bias", False))
        )
        return cls(
            family=family,
            head_dim=int(head_dim),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_bias=family in ("llama", "qwen3") and attention_bias,
            qk_norm=family == "qwen3",
            sliding_window=None if window is None else int(window),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=eos,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        )

    def to_hf(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """A HF ``config.json`` dict whose sizes are read from ``params``.

        A pruned tree (fewer heads or kv heads, a narrower MLP, fewer layers, a smaller vocabulary)
        gets a config that matches it. Raises ``ValueError`` when layers differ in size (a HF config
        has one size per model).
        """
        from jaxslim.models._params import sizes

        s = sizes(params, self, fn="models.Config.to_hf")
        for name in ("heads", "kv_heads", "intermediate"):
            values = sorted({getattr(layer, name) for layer in s.layers})
            if len(values) > 1:
                raise ValueError(
                    f"models.Config.to_hf: layers have different {name} {values}; a HF config "
                    "holds one size for all layers: prune every layer to the same size"
                )
        first = s.layers[0] if s.layers else None
        out: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.family]],
            "model_type": self.family,
            "hidden_act": "silu",
            "hidden_size": s.hidden,
            "intermediate_size": first.intermediate if first else 0,
            "num_attention_heads": first.heads if first else 0,
            "num_key_value_heads": first.kv_heads if first else 0,
            "num_hidden_layers": len(s.layers),
            "vocab_size": s.vocab,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": None
            if self.rope_scaling is None
            else dataclasses.asdict(self.rope_scaling),
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id)
            if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "torch_dtype": "float32",
        }
        if self.family in ("llama", "qwen3"):
            out["attention_bias"] = self.attention_bias
        if self.family == "llama":
            out["mlp_bias"] = False
        if self.family == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.family in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
            out["sliding_window"] = None
        return out


def _rope_scaling(fn: str, scaling: Mapping[str, Any] | None) -> RopeScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"{fn}: rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    if kind == "default":
        return None
    try:
        return RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ValueError(f"{fn}: llama3 rope scaling misses {e.args[0]!r}: {dict(scaling)}") from e


def inv_freq(config: Config) -> np.ndarray:
    """RoPE inverse frequencies ``(hd // 2,)`` float32, as transformers computes them.

    ``inv_freq_i = 1 / theta ** (2i / hd)`` in float32, then the llama3 scaling when configured.
    """
    hd = config.head_dim
    exponent = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
    freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponent)).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = (np.float32(2 * math.pi) / freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, freq / np.float32(rs.factor), freq).astype(np.float32)
    smooth = (
        (np.float32(rs.original_max_position_embeddings) / wavelen - np.float32(rs.low_freq_factor))
        / np.float32(rs.high_freq_factor - rs.low_freq_factor)
    ).astype(np.float32)
    smoothed = (np.float32(1) - smooth) * scaled / np.float32(rs.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
