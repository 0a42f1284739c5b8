"""The parameter tree: its layout, the sizes read from its shapes, a random init.

The tree (kernels in Flax ``(in, out)`` layout, the transpose of HF's ``(out, in)``)::

    {"embed": (V, d),
     "layers": [{"attn_norm": (d,), "q": (d, H*hd), "k": (d, KV*hd), "v": (d, KV*hd),
                 "o": (H*hd, d), "mlp_norm": (d,), "gate": (d, F), "up": (d, F), "down": (F, d),
                 # optional, as the Config says:
                 "q_bias": (H*hd,), "k_bias": (KV*hd,), "v_bias": (KV*hd,),   # attention_bias
                 "o_bias": (d,),                                              # o_bias
                 "q_norm": (hd,), "k_norm": (hd,)},                           # qk_norm (Qwen3)
                ...],
     "norm": (d,),
     "lm_head": (d, V)}            # only when not config.tie_word_embeddings

Sizes are read from the shapes every time the functions trace: ``H = q.shape[1] // hd``, ``KV =
k.shape[1] // hd``, ``F = gate.shape[1]``; layers may differ (a pruned tree runs as it is). Query
head ``h`` reads kv head ``h // (H // KV)`` (HF's ``repeat_kv``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim._checks import public
from jaxslim.models._config import Config


class LayerSizes(NamedTuple):
    """Per-layer sizes read from the parameter shapes."""

    heads: int
    kv_heads: int
    intermediate: int


class Sizes(NamedTuple):
    """Model sizes read from the parameter shapes (``models.sizes``)."""

    hidden: int
    vocab: int
    layers: tuple[LayerSizes, ...]


def _shape(tree: Mapping[str, Any], name: str, path: str, fn: str) -> tuple[int, ...]:
    if not isinstance(tree, Mapping) or name not in tree or tree[name] is None:
        raise ValueError(
            f"{fn}: the params tree has no leaf {path}{name!r}; a Llama-family tree needs "
            "embed, layers/<i>/{attn_norm,q,k,v,o,mlp_norm,gate,up,down}, norm (and lm_head when "
            "the embeddings are untied): see jaxslim.models.forward"
        )
    return tuple(np.shape(tree[name]))


def _expect(fn: str, path: str, got: tuple[int, ...], want: tuple[int, ...], why: str) -> None:
    if got != want:
        raise ValueError(f"{fn}: {path} has shape {got}, expected {want} ({why})")


def layer_sizes(layer: Mapping[str, Any], config: Config, d: int, prefix: str, fn: str):
    """Checks one layer's leaves against ``config`` and hidden width ``d``; returns its sizes."""
    hd = config.head_dim
    sh = {n: _shape(layer, n, prefix, fn) for n in ("attn_norm", "q", "k", "v", "o", "mlp_norm")}
    sh.update({n: _shape(layer, n, prefix, fn) for n in ("gate", "up", "down")})
    for name in ("q", "k"):
        s = sh[name]
        if len(s) != 2 or s[0] != d or s[1] % hd:
            raise ValueError(
                f"{fn}: {prefix}{name} has shape {s}, expected (d={d}, heads * head_dim) with "
                f"head_dim={hd} (kernels are Flax (in, out); transpose HF (out, in) weights)"
            )
    heads, kv = sh["q"][1] // hd, sh["k"][1] // hd
    if kv == 0 or heads % kv:
        raise ValueError(
            f"{fn}: {prefix}q has {heads} heads and {prefix}k {kv} kv heads; GQA needs heads to "
            "be a positive multiple of kv heads (remove query heads uniformly per kv group)"
        )
    f = sh["gate"][1] if len(sh["gate"]) == 2 else -1
    _expect(fn, prefix + "attn_norm", sh["attn_norm"], (d,), "hidden width")
    _expect(fn, prefix + "v", sh["v"], (d, kv * hd), "same kv heads as k")
    _expect(fn, prefix + "o", sh["o"], (heads * hd, d), "(heads * head_dim, d)")
    _expect(fn, prefix + "mlp_norm", sh["mlp_norm"], (d,), "hidden width")
    _expect(fn, prefix + "gate", sh["gate"], (d, f), "(d, F)")
    _expect(fn, prefix + "up", sh["up"], (d, f), "same width F as gate")
    _expect(fn, prefix + "down", sh["down"], (f, d), "(F, d)")
    if config.attention_bias:
        for name, n in (("q_bias", heads), ("k_bias", kv), ("v_bias", kv)):
            _expect(fn, prefix + name, _shape(layer, name, prefix, fn), (n * hd,), "bias")
    if config.o_bias:
        _expect(fn, prefix + "o_bias", _shape(layer, "o_bias", prefix, fn), (d,), "bias")
    if config.qk_norm:
        for name in ("q_norm", "k_norm"):
            _expect(fn, prefix + name, _shape(layer, name, prefix, fn), (hd,), "per-head norm")
    return LayerSizes(heads, kv, f)


@public("models.sizes")
def sizes(params: Mapping[str, Any], config: Config, *, fn: str = "models.sizes") -> Sizes:
    """Reads (and checks) the model sizes from the parameter shapes.

    Raises ``ValueError`` naming the leaf path when a leaf is missing or a shape does not fit.

    >>> from jaxslim import models
    >>> cfg = models.Config(head_dim=8)
    >>> params = models.init(jax.random.key(0), cfg, vocab=32, hidden=16, layers=1, heads=2,
    ...                      kv_heads=1, intermediate=24)
    >>> models.sizes(params, cfg).layers[0]
    LayerSizes(heads=2, kv_heads=1, intermediate=24)
    """
    if not isinstance(config, Config):
        raise TypeError(f"{fn}: config must be a models.Config, got {type(config).__name__}")
    emb = _shape(params, "embed", "", fn)
    if len(emb) != 2:
        raise ValueError(f"{fn}: 'embed' must be (vocab, d), got shape {emb}")
    vocab, d = emb
    _expect(fn, "norm", _shape(params, "norm", "", fn), (d,), "hidden width")
    if not config.tie_word_embeddings:
        _expect(fn, "lm_head", _shape(params, "lm_head", "", fn), (d, vocab), "untied (d, V)")
    layers = params.get("layers")
    if not isinstance(layers, Sequence):
        raise ValueError(f"{fn}: 'layers' must be a list of per-layer dicts, got {type(layers)}")
    per = tuple(layer_sizes(lp, config, d, f"layers/{i}/", fn) for i, lp in enumerate(layers))
    return Sizes(d, vocab, per)


@public("models.init")
def init(
    key: jax.Array,
    config: Config,
    *,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    dtype: Any = jnp.float32,
    scale: float = 0.02,
) -> dict[str, Any]:
    """A random parameter tree (normal(0, scale) kernels, unit norms) for tests and demos.

    >>> from jaxslim import models
    >>> cfg = models.Config(head_dim=8)
    >>> p = models.init(jax.random.key(0), cfg, vocab=32, hidden=16, layers=2, heads=2,
    ...                 kv_heads=1, intermediate=24)
    >>> p["layers"][1]["k"].shape
    (16, 8)
    """
    hd = config.head_dim
    keys = iter(jax.random.split(key, 16 * layers + 2))

    def w(*shape):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def ones(n):
        return jnp.ones((n,), dtype)

    out: dict[str, Any] = {"embed": w(vocab, hidden), "layers": [], "norm": ones(hidden)}
    for _ in range(layers):
        lp = {
            "attn_norm": ones(hidden),
            "q": w(hidden, heads * hd),
            "k": w(hidden, kv_heads * hd),
            "v": w(hidden, kv_heads * hd),
            "o": w(heads * hd, hidden),
            "mlp_norm": ones(hidden),
            "gate": w(hidden, intermediate),
            "up": w(hidden, intermediate),
            "down": w(intermediate, hidden),
        }
        if config.attention_bias:
            lp.update(q_bias=w(heads * hd), k_bias=w(kv_heads * hd), v_bias=w(kv_heads * hd))
        if config.o_bias:
            lp["o_bias"] = w(hidden)
        if config.qk_norm:
            lp.update(q_norm=ones(hd), k_norm=ones(hd))
        out["layers"].append(lp)
    if not config.tie_word_embeddings:
        out["lm_head"] = w(hidden, vocab)
    return out
