"""One Llama-family decoder as pure functions over a params pytree (``models/_params.py``).

A decoder layer (``block``), with ``RMS(x) = x / sqrt(mean(x^2) + eps) * w`` in float32::

    a = RMS(x);  q, k, v = a @ Wq, a @ Wk, a @ Wv;  q, k = RoPE(q), RoPE(k)
    x = x + softmax(q k^T / sqrt(hd) + causal) v @ Wo
    m = RMS(x);  x = x + (silu(m @ Wgate) * (m @ Wup)) @ Wdown

RoPE is HF's non-interleaved ``rotate_half`` form: ``q * cos + rotate_half(q) * sin`` with
``cos = cos(pos * [inv_freq, inv_freq])``.

Online Hadamard transforms (``quant.rotate_model``): a layer with a leaf ``down_hadamard`` (F,)
of signs ``s`` computes ``(silu(m @ Wgate) * (m @ Wup)) -> H_F(. * s)`` before ``Wdown``; one with
``qk_hadamard`` (hd,) maps ``q, k -> H_hd(. * s)`` per head after RoPE (``q k^T`` is unchanged),
``H`` the orthonormal ``quant.hadamard``. Dynamic quantization (``activations=`` /
``kv=``, ``quant.TokenQuant``) quantizes every kernel's input of the layers per token (the head's
input stays float) and the keys (after RoPE) and values per head and token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim._checks import public
from jaxslim.models._config import Config, inv_freq
from jaxslim.models._params import layer_sizes, sizes
from jaxslim.quant import TokenQuant, hadamard


def _cast(x: jax.Array, dtype: Any) -> jax.Array:
    return x if x.dtype == dtype else x.astype(dtype)


@public("models.rms_norm")
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF's RMSNorm: ``x / sqrt(mean(x^2, -1) + eps) * weight``, the statistic in float32."""
    xf = _cast(x, jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = _cast(xf * jax.lax.rsqrt(var + eps), x.dtype)
    w = _cast(weight, x.dtype).reshape((1,) * (x.ndim - 1) + weight.shape)
    return w * y


def _linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    y = jnp.dot(x, _cast(w, x.dtype))
    if b is not None:
        y = y + _cast(b, x.dtype).reshape((1,) * (y.ndim - 1) + b.shape)
    return y


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin``; x ``(B, T, heads, hd)``, cos/sin ``(B, T, 1, hd)``."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def rope_tables(positions: jax.Array, config: Config, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``(B, T, 1, hd)`` for integer positions ``(B, T)``."""
    freq = jnp.asarray(inv_freq(config))
    angles = positions.astype(jnp.float32)[:, :, None] * freq[None, None, :]
    emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return _cast(jnp.cos(emb), dtype), _cast(jnp.sin(emb), dtype)


def _attend(q, k, v, mask):
    """Grouped-query attention. q ``(B,T,H,hd)``, k/v ``(B,S,KV,hd)``, mask ``(B,T,S)`` bool."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * (hd**-0.5)
    scores = _cast(scores, jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = _cast(jax.nn.softmax(scores, axis=-1), v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h * hd)


def _check_cache(layer_cache: Any, b: int, kv: int, hd: int, fn: str) -> None:
    if not isinstance(layer_cache, Mapping) or not {"k", "v", "index"} <= set(layer_cache):
        raise ValueError(
            f"{fn}: a layer cache is a dict with 'k', 'v' (B, S, KV, hd) and 'index' (int32 "
            "scalar); build the model's cache with models.init_cache"
        )
    ks = tuple(np.shape(layer_cache["k"]))
    if len(ks) != 4 or ks[0] != b or ks[2] != kv or ks[3] != hd:
        raise ValueError(
            f"{fn}: cache 'k' has shape {ks}, expected (B={b}, S, KV={kv}, hd={hd}); build it "
            "with models.init_cache for these params and batch size"
        )


@public("models.block")
def block(
    block_params: Mapping[str, Any],
    hidden: jax.Array,
    config: Config,
    *,
    positions: jax.Array,
    cache: Mapping[str, Any] | None = None,
    activations: TokenQuant | None = None,
    kv: TokenQuant | None = None,
) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """One decoder layer ``(B, T, d) -> (B, T, d)``: the ``block_fn`` of block-streamed calibration.

    Args:
      block_params: one entry of ``params["layers"]`` (see the module docstring for its leaves).
      hidden: the residual stream ``(B, T, d)`` in the compute dtype.
      config: the ``models.Config``.
      positions: ``(B, T)`` (or ``(T,)``) int32 RoPE positions.
      cache: ``None`` (causal attention within ``hidden``) or this layer's cache ``{"k": (B, S,
        KV, hd), "v": (B, S, KV, hd), "index": int32 ()}``: the new keys and values are written at
        slots ``index .. index + T - 1`` and query ``t`` attends to slots ``<= index + t``.
      activations: ``None`` or a ``quant.TokenQuant``: the input of every kernel (q/k/v, o,
        gate/up, down) quantized per token on the fly.
      kv: ``None`` or a ``quant.TokenQuant``: keys (after RoPE and ``qk_hadamard``) and values
        quantized per head and token before attention and the cache.

    Returns:
      ``hidden`` out, or ``(hidden, new_cache)`` when a cache is given (its ``index`` advanced by
      ``T``).

    >>> from jaxslim import models
    >>> cfg = models.Config(head_dim=8)
    >>> p = models.init(jax.random.key(0), cfg, vocab=32, hidden=16, layers=1, heads=2,
    ...                 kv_heads=1, intermediate=24)
    >>> x = models.embed(p, jnp.zeros((1, 5), jnp.int32), cfg)
    >>> models.block(p["layers"][0], x, cfg, positions=jnp.arange(5)[None]).shape
    (1, 5, 16)
    """
    fn = "models.block"
    hd = config.head_dim
    if hidden.ndim != 3:
        raise ValueError(f"{fn}: hidden must be (B, T, d), got shape {hidden.shape}")
    b, t, d = hidden.shape
    ls = layer_sizes(block_params, config, d, "", fn)
    positions = jnp.asarray(positions, jnp.int32)
    if positions.shape == (t,):
        positions = jnp.broadcast_to(positions[None], (b, t))
    if positions.shape != (b, t):
        raise ValueError(f"{fn}: positions must be (B, T) = {(b, t)}, got {positions.shape}")
    p = block_params
    eps = config.rms_norm_eps
    for name, opt in (("activations", activations), ("kv", kv)):
        if opt is not None and not isinstance(opt, TokenQuant):
            raise TypeError(f"{fn}: {name} must be None or a quant.TokenQuant, got {opt!r}")
    aq = (lambda x: x) if activations is None else activations

    a = aq(rms_norm(hidden, p["attn_norm"], eps))
    bias = config.attention_bias
    q = _linear(a, p["q"], p["q_bias"] if bias else None).reshape(b, t, ls.heads, hd)
    k = _linear(a, p["k"], p["k_bias"] if bias else None).reshape(b, t, ls.kv_heads, hd)
    v = _linear(a, p["v"], p["v_bias"] if bias else None).reshape(b, t, ls.kv_heads, hd)
    if config.qk_norm:
        q = rms_norm(q, p["q_norm"], eps)
        k = rms_norm(k, p["k_norm"], eps)
    cos, sin = rope_tables(positions, config, hidden.dtype)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    if "qk_hadamard" in p:
        q, k = _online_hadamard(q, p["qk_hadamard"], fn), _online_hadamard(k, p["qk_hadamard"], fn)
    if kv is not None:
        k, v = kv(k), kv(v)

    new_cache = None
    if cache is None:
        qi = jnp.arange(t)[:, None]
        ki = jnp.arange(t)[None, :]
        keys, values = k, v
    else:
        _check_cache(cache, b, ls.kv_heads, hd, fn)
        index = jnp.asarray(cache["index"], jnp.int32)
        keys = jax.lax.dynamic_update_slice(
            cache["k"], _cast(k, cache["k"].dtype), (0, index, 0, 0)
        )
        values = jax.lax.dynamic_update_slice(
            cache["v"], _cast(v, cache["v"].dtype), (0, index, 0, 0)
        )
        new_cache = {"k": keys, "v": values, "index": index + t}
        keys, values = _cast(keys, hidden.dtype), _cast(values, hidden.dtype)
        qi = index + jnp.arange(t)[:, None]
        ki = jnp.arange(keys.shape[1])[None, :]
    mask = ki <= qi
    if config.sliding_window is not None:
        mask = mask & (ki > qi - config.sliding_window)
    mask = jnp.broadcast_to(mask[None], (b, *mask.shape))
    attn = _attend(q, keys, values, mask)
    hidden = hidden + _linear(aq(attn), p["o"], p["o_bias"] if config.o_bias else None)

    m = aq(rms_norm(hidden, p["mlp_norm"], eps))
    mlp = jax.nn.silu(_linear(m, p["gate"])) * _linear(m, p["up"])
    if "down_hadamard" in p:
        mlp = _online_hadamard(mlp, p["down_hadamard"], fn)
    hidden = hidden + _linear(aq(mlp), p["down"])
    return hidden if cache is None else (hidden, new_cache)


def _online_hadamard(x: jax.Array, signs: Any, fn: str) -> jax.Array:
    """``H(x * s)`` along the last axis (``quant.hadamard``); ``signs`` ``(n,)``."""
    if tuple(np.shape(signs)) != x.shape[-1:]:
        raise ValueError(
            f"{fn}: an online Hadamard leaf has shape {tuple(np.shape(signs))}, expected "
            f"{x.shape[-1:]} (quant.rotate_model writes it; rotate the tree again)"
        )
    return hadamard(x * _cast(signs, x.dtype).reshape((1,) * (x.ndim - 1) + x.shape[-1:]))


def _check_tokens(tokens: Any, vocab: int, fn: str) -> jax.Array:
    try:
        arr = np.asarray(tokens)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        arr = tokens  # traced: checked by shape and dtype only
    else:
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{fn}: tokens must be integer ids, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= vocab):
            bad = arr[(arr < 0) | (arr >= vocab)]
            raise ValueError(
                f"{fn}: tokens must be in [0, vocab={vocab}), got {bad.ravel()[:5].tolist()} "
                "(a tokenizer for another model, or a pruned vocabulary?)"
            )
    if arr.ndim != 2:
        raise ValueError(f"{fn}: tokens must be (B, T), got shape {arr.shape}; use tokens[None]")
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{fn}: tokens must be integer ids, got dtype {arr.dtype}")
    return jnp.asarray(arr, jnp.int32)


@public("models.embed")
def embed(params: Mapping[str, Any], tokens: jax.Array, config: Config) -> jax.Array:
    """Token embeddings ``(B, T) -> (B, T, d)`` in the compute dtype (``config.dtype``).

    Concrete tokens outside ``[0, V)`` raise ``ValueError``; under ``jit`` they give NaN rows.
    """
    return _embed(params, tokens, config, "models.embed")


def _embed(params: Mapping[str, Any], tokens: Any, config: Config, fn: str) -> jax.Array:
    table = params.get("embed") if isinstance(params, Mapping) else None
    if table is None:
        raise ValueError(f"{fn}: the params tree has no leaf 'embed'")
    tokens = _check_tokens(tokens, table.shape[0], fn)
    return _cast(jnp.take(table, tokens, axis=0, mode="fill"), jnp.dtype(config.dtype))


@public("models.head")
def head(params: Mapping[str, Any], hidden: jax.Array, config: Config) -> jax.Array:
    """Final RMSNorm and output projection: ``(B, T, d) -> (B, T, V)`` float32 logits.

    The projection is ``lm_head`` ``(d, V)``, or ``embed.T`` when the embeddings are tied.
    """
    h = rms_norm(hidden, params["norm"], config.rms_norm_eps)
    if config.tie_word_embeddings:
        logits = jnp.einsum("btd,vd->btv", h, _cast(params["embed"], h.dtype))
    else:
        logits = _linear(h, params["lm_head"])
    return _cast(logits, jnp.float32)


@public("models.init_cache")
def init_cache(
    config: Config, params: Mapping[str, Any], batch: int, max_len: int, *, dtype: Any = None
) -> dict[str, Any]:
    """An empty KV cache: ``{"layers": [{"k": (B, S, KV_l, hd), "v": ...}, ...], "index": 0}``.

    ``S = max_len`` slots per layer (static shapes, one compilation for every decode step); the
    kv head count ``KV_l`` of each layer is read from ``params``. ``dtype`` defaults to the
    compute dtype.

    >>> from jaxslim import models
    >>> cfg = models.Config(head_dim=8)
    >>> p = models.init(jax.random.key(0), cfg, vocab=32, hidden=16, layers=1, heads=2,
    ...                 kv_heads=1, intermediate=24)
    >>> models.init_cache(cfg, p, 2, 10)["layers"][0]["k"].shape
    (2, 10, 1, 8)
    """
    s = sizes(params, config, fn="models.init_cache")
    dtype = jnp.dtype(config.dtype if dtype is None else dtype)
    shape = lambda kv: (batch, max_len, kv, config.head_dim)
    return {
        "layers": [
            {"k": jnp.zeros(shape(ls.kv_heads), dtype), "v": jnp.zeros(shape(ls.kv_heads), dtype)}
            for ls in s.layers
        ],
        "index": jnp.zeros((), jnp.int32),
    }


@public("models.forward")
def forward(
    params: Mapping[str, Any],
    tokens: jax.Array,
    config: Config,
    *,
    cache: Mapping[str, Any] | None = None,
    positions: jax.Array | None = None,
    activations: TokenQuant | None = None,
    kv: TokenQuant | None = None,
) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """Logits of a Llama-family decoder: tokens ``(B, T)`` int -> ``(B, T, V)`` float32.

    ``embed``, then every ``block`` in ``params["layers"]``, then ``head``. Causal attention with
    grouped-query heads, RoPE, RMSNorm in float32, computed in ``config.dtype`` whatever the
    parameters' dtype. A pure function of ``params``: every jaxslim tool that traces ``fn(params,
    *args)`` works on ``lambda p, x: models.forward(p, x, config)``.

    Args:
      params: the parameter tree (module docstring); sizes are read from its shapes.
      tokens: ``(B, T)`` integer ids in ``[0, V)``.
      config: the ``models.Config`` (static under ``jit``).
      cache: ``None`` or a cache from ``models.init_cache`` / a previous call: the tokens continue
        the cached sequence at ``cache["index"]`` (which must leave room: ``index + T <= S``).
      positions: ``(B, T)`` (or ``(T,)``) RoPE positions; default ``index + arange(T)`` (``index
        = 0`` without a cache). They only feed RoPE: the mask is causal in sequence (cache slot)
        order.
      activations, kv: ``None`` or ``quant.TokenQuant`` records: dynamic per-token quantization of
        every layer kernel's input, and of the keys (after RoPE) and values per head and token
        (``models.block``); W4A4 is ``quant.dequantize_params`` of int4 weights with
        ``activations=quant.TokenQuant(4)``.

    Returns:
      ``logits`` ``(B, T, V)``, or ``(logits, new_cache)`` when a cache is given.

    >>> from jaxslim import models
    >>> cfg = models.Config(head_dim=8)
    >>> p = models.init(jax.random.key(0), cfg, vocab=32, hidden=16, layers=2, heads=2,
    ...                 kv_heads=1, intermediate=24)
    >>> tokens = jnp.array([[1, 2, 3, 4]])
    >>> logits = jax.jit(models.forward, static_argnames="config")(p, tokens, config=cfg)
    >>> logits.shape, logits.dtype
    ((1, 4, 32), dtype('float32'))
    """
    fn = "models.forward"
    s = sizes(params, config, fn=fn)
    x = _embed(params, tokens, config, fn)
    b, t, _ = x.shape
    index = jnp.zeros((), jnp.int32) if cache is None else jnp.asarray(cache["index"], jnp.int32)
    if cache is not None:
        if len(cache.get("layers", ())) != len(s.layers):
            raise ValueError(
                f"{fn}: the cache has {len(cache.get('layers', ()))} layers, params "
                f"{len(s.layers)}; build it with models.init_cache(config, params, ...)"
            )
        slots = cache["layers"][0]["k"].shape[1] if s.layers else t
        if t > slots:
            raise ValueError(f"{fn}: {t} tokens do not fit a cache of {slots} slots")
    if positions is None:
        positions = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    positions = jnp.asarray(positions, jnp.int32)
    if positions.shape == (t,):
        positions = jnp.broadcast_to(positions[None], (b, t))
    if positions.shape != (b, t):
        raise ValueError(f"{fn}: positions must be (B, T) = {(b, t)}, got {positions.shape}")
    new_layers = []
    for i, lp in enumerate(params["layers"]):
        if cache is None:
            x = block(lp, x, config, positions=positions, activations=activations, kv=kv)
        else:
            lc = {**cache["layers"][i], "index": index}
            x, nc = block(
                lp, x, config, positions=positions, cache=lc, activations=activations, kv=kv
            )
            new_layers.append({"k": nc["k"], "v": nc["v"]})
    logits = head(params, x, config)
    if cache is None:
        return logits
    return logits, {"layers": new_layers, "index": index + t}
