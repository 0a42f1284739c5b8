"""Greedy and nucleus (top-p) sampling with the KV cache."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim._checks import public
from jaxslim.models._config import Config
from jaxslim.models._llama import forward, init_cache
from jaxslim.models._params import sizes


def _sample(logits: jax.Array, key: jax.Array, temperature, top_p, greedy: bool) -> jax.Array:
    """Next ids ``(B,)`` from last-position logits ``(B, V)``.

    Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p``
    (always at least the most likely one), after dividing the logits by ``temperature``.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < top_p
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "greedy"))
def _step(params, tokens, cache, key, temperature, top_p, *, config: Config, greedy: bool):
    logits, cache = forward(params, tokens, config, cache=cache)
    return _sample(logits[:, -1], key, temperature, top_p, greedy), cache


@public("models.generate")
def generate(
    params: Mapping[str, Any],
    config: Config,
    prompt_ids: Any,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    stop_at_eos: bool = True,
) -> np.ndarray:
    """Continues ``prompt_ids`` by up to ``max_tokens`` tokens, greedy or top-p sampled.

    The prompt fills a KV cache of ``P + max_tokens`` slots in one call; every later token is one
    jitted decode step (compiled once for a given batch, cache size and sampling mode).
    ``temperature=0`` is greedy (argmax); otherwise the logits are divided by ``temperature``
    and sampled from the nucleus of probability ``top_p``.

    Args:
      params: the parameter tree.
      config: the ``models.Config``.
      prompt_ids: ``(P,)`` or ``(B, P)`` integer ids (a list works), ``P >= 1``.
      max_tokens: how many tokens to generate at most.
      temperature: ``0`` for greedy, else the sampling temperature.
      top_p: nucleus mass in ``(0, 1]``.
      key: a PRNG key, required when ``temperature > 0``.
      stop_at_eos: stop once every row has produced ``config.eos_token_id``; a finished row is
        padded with its first eos id.

    Returns:
      The new ids (not the prompt), ``(n,)`` or ``(B, n)`` int32 NumPy, ``n <= max_tokens``.

    >>> from jaxslim import models
    >>> cfg = models.Config(head_dim=8)
    >>> p = models.init(jax.random.key(0), cfg, vocab=32, hidden=16, layers=1, heads=2,
    ...                 kv_heads=1, intermediate=24)
    >>> models.generate(p, cfg, [1, 2, 3], max_tokens=4).shape
    (4,)
    """
    fn = "models.generate"
    prompt = np.asarray(prompt_ids)
    single = prompt.ndim == 1
    if single:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] == 0 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(
            f"{fn}: prompt_ids must be (P,) or (B, P) integer ids with P >= 1, got shape "
            f"{np.shape(prompt_ids)} dtype {prompt.dtype}"
        )
    if not isinstance(max_tokens, int | np.integer) or max_tokens < 0:
        raise ValueError(f"{fn}: max_tokens must be an int >= 0, got {max_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"{fn}: temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{fn}: top_p must be in (0, 1], got {top_p!r}")
    greedy = temperature == 0
    if not greedy and key is None:
        raise ValueError(f"{fn}: temperature={temperature} samples: pass key=jax.random.key(0)")
    vocab = sizes(params, config, fn=fn).vocab
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise ValueError(f"{fn}: prompt_ids must be in [0, vocab={vocab}), got {prompt.tolist()}")
    b, n_prompt = prompt.shape
    eos = config.eos_token_id
    eos_ids = np.asarray([] if eos is None else np.atleast_1d(eos), np.int32)
    if key is None:
        key = jax.random.key(0)
    temp = jnp.float32(1.0 if greedy else temperature)
    top = jnp.float32(top_p)

    cache = init_cache(config, params, b, n_prompt + max_tokens)
    out: list[np.ndarray] = []
    done = np.zeros((b,), bool)
    tokens = jnp.asarray(prompt, jnp.int32)
    for _ in range(max_tokens):
        key, sub = jax.random.split(key)
        nxt, cache = _step(params, tokens, cache, sub, temp, top, config=config, greedy=greedy)
        ids = np.asarray(nxt)
        if eos_ids.size:
            ids = np.where(done, eos_ids[0], ids)
            done |= np.isin(ids, eos_ids)
        out.append(ids)
        tokens = nxt[:, None]
        if stop_at_eos and eos_ids.size and done.all():
            break
    result = np.stack(out, axis=1).astype(np.int32) if out else np.zeros((b, 0), np.int32)
    return result[0] if single else result
