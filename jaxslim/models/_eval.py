"""Perplexity with HF's sliding-window protocol."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import quant
from jaxslim._checks import public
from jaxslim.models._config import Config
from jaxslim.models._llama import forward
from jaxslim.models._params import sizes


class PerplexityResult(NamedTuple):
    """What ``models.perplexity`` measured.

    Attributes:
      perplexity: ``exp(nll)``.
      nll: mean negative log-likelihood per scored token, in nats.
      tokens: number of scored tokens.
      bits_per_byte: ``sum(NLL) / (ln 2 * n_bytes)`` when ``n_bytes`` was given, else ``None``.
      tokens_per_second: scored tokens per second of wall time (compilation included).
      seconds: wall time.
    """

    perplexity: float
    nll: float
    tokens: int
    bits_per_byte: float | None
    tokens_per_second: float
    seconds: float


def windows(n: int, seq: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` per window: the window reads ``[begin, end)`` and scores tokens
    ``[first, end)``, each from the logits at the position before it.

    As in HF's perplexity guide: windows start every ``stride`` tokens, each scores the tokens
    the previous one did not reach (``end - prev_end``); token 0 of a window has no prediction,
    so ``stride == seq`` leaves the first token of every window unscored.
    """
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + seq, n)
        first = max(begin + 1, prev_end)
        out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


@functools.partial(jax.jit, static_argnames="config")
def _nll_sum(params, inputs, targets, weights, *, config: Config):
    leaves = jax.tree.leaves(params, is_leaf=quant.is_qarray)
    if any(quant.is_qarray(x) for x in leaves):  # on the codes: no float copy of the tree
        logits = quant.quantized(lambda p, x: forward(p, x, config))(params, inputs)
    else:
        logits = forward(params, inputs, config)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, :, None], axis=-1)[:, :, 0]
    return jnp.sum((lse - picked) * weights)


@public("models.perplexity")
def perplexity(
    params: Mapping[str, Any],
    config: Config,
    token_ids: Any,
    *,
    seq: int = 512,
    stride: int | None = None,
    batch: int = 1,
    n_bytes: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of one token stream, ``exp(mean NLL)``, with HF's sliding windows.

    Windows of ``seq`` tokens start every ``stride`` tokens (default ``stride = seq``: disjoint
    chunks); each scores only the tokens the previous window did not (``models._eval.windows``),
    so ``stride < seq`` gives every scored token ``seq - stride`` tokens of context or more.
    Windows run ``batch`` at a time, padded to ``seq`` (one compilation).

    Args:
      params, config: the model; ``params`` may hold ``quant.QArray`` leaves (``models.load(...,
        dequantize=False)``, ``quant.oneshot``): it then runs as ``quant.quantized(forward)``,
        each quantized kernel multiplied from its codes.
      token_ids: ``(N,)`` integer ids, ``N >= 2`` (e.g. ``tokenizer.encode(text)``).
      seq: window length.
      stride: window step, ``1 <= stride <= seq``.
      batch: windows per forward pass.
      n_bytes: the UTF-8 byte count of the text, for bits per byte.
      progress: show a ``tqdm`` bar (from the ``models`` extra).

    Returns:
      A ``PerplexityResult``.

    >>> from jaxslim import models
    >>> cfg = models.Config(head_dim=8)
    >>> p = models.init(jax.random.key(0), cfg, vocab=32, hidden=16, layers=1, heads=2,
    ...                 kv_heads=1, intermediate=24)
    >>> r = models.perplexity(p, cfg, list(range(32)) * 4, seq=16, progress=False)
    >>> r.tokens, round(r.perplexity)   # 128 tokens in 8 windows: 8 first tokens unscored
    (120, 32)
    """
    fn = "models.perplexity"
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.size < 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"{fn}: token_ids must be (N,) integer ids with N >= 2, got shape {ids.shape} "
            f"dtype {ids.dtype}"
        )
    stride = seq if stride is None else stride
    for name, v in (("seq", seq), ("batch", batch), ("stride", stride)):
        if not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"{fn}: {name} must be an int >= 1, got {v!r}")
    if stride > seq:
        raise ValueError(f"{fn}: stride ({stride}) must be <= seq ({seq})")
    vocab = sizes(params, config, fn=fn).vocab
    if ids.min() < 0 or ids.max() >= vocab:
        bad = ids[(ids < 0) | (ids >= vocab)][:5].tolist()
        raise ValueError(f"{fn}: token_ids must be in [0, vocab={vocab}), got {bad}")

    wins = windows(ids.size, seq, stride)
    n_batches = -(-len(wins) // batch)
    inputs = np.zeros((n_batches * batch, seq), np.int32)
    targets = np.zeros_like(inputs)
    weights = np.zeros((n_batches * batch, seq), np.float32)
    for w, (begin, end, first) in enumerate(wins):
        inputs[w, : end - begin] = ids[begin:end]
        targets[w, : end - begin - 1] = ids[begin + 1 : end]
        weights[w, first - begin - 1 : end - begin - 1] = 1.0
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError as e:
            raise ImportError(
                f"{fn}: progress=True needs tqdm: pip install 'jaxslim[models]' (or progress=False)"
            ) from e
        bar = tqdm(total=int(weights.sum()), desc="perplexity", unit="tok")
    start = time.perf_counter()
    total = 0.0
    for i in range(n_batches):
        sl = slice(i * batch, (i + 1) * batch)
        total += float(_nll_sum(params, inputs[sl], targets[sl], weights[sl], config=config))
        if bar is not None:
            bar.update(int(weights[sl].sum()))
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    count = int(weights.sum())
    nll = total / count
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=count,
        bits_per_byte=None if n_bytes is None else total / (math.log(2) * n_bytes),
        tokens_per_second=count / max(seconds, 1e-9),
        seconds=seconds,
    )
