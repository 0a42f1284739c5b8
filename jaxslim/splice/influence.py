"""``block_influence``: how much each residual block changes its input, and what dropping it costs.

Two scores per block, higher = more important:

* ``cosine``: Block Influence of ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language
  Models are More Redundant Than You Expect"), ``BI_i = 1 - E[cos(h_i, h_{i+1})]`` over tokens,
  ``h_i`` the residual stream entering block ``i``;
* ``ablation``: ``E[loss(params without block i)] - E[loss(params)]``, the loss increase when the
  block is replaced by the identity (:func:`jaxslim.splice.drop_layer`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxslim.splice.surgery import drop_layer

__all__ = ["Influence", "block_influence"]


class Influence(NamedTuple):
    """Per-block scores, in the order of ``blocks``."""

    blocks: tuple[Any, ...]
    cosine: np.ndarray
    ablation: np.ndarray


def block_influence(
    fn: Callable[..., tuple[jax.Array, Sequence[jax.Array]]],
    params: Any,
    batches: Iterable[Any],
    blocks: Sequence[str | tuple[str, int]],
) -> Influence:
    """Scores residual blocks for removal: ShortGPT Block Influence and the ablation loss gap.

    ``fn(params, batch) -> (loss, hiddens)``, where ``hiddens`` has ``len(blocks) + 1`` arrays of
    shape ``(..., d)``: ``hiddens[i]`` enters block ``i`` and ``hiddens[i + 1]`` leaves it. ``fn``
    must also run on ``drop_layer(params, block)`` (iterate over the blocks present, or over a
    scanned stack's layer axis); only the loss is used there. ``blocks`` are
    :func:`drop_layer` specs: a path (``"blocks/2"``) or ``(path, index)`` for a scanned stack.

    Returns:
      :class:`Influence` with ``cosine`` ``= 1 - mean cos(h_i, h_{i+1})`` and ``ablation``
      ``= mean loss without the block - mean loss``, both ``(len(blocks),)`` float64. Low scores
      mark the blocks to drop first.

    >>> import jax.numpy as jnp
    >>> def fn(p, x):
    ...     hs = [x]
    ...     for w in p["blocks"]:
    ...         hs.append(hs[-1] + hs[-1] @ w)
    ...     return jnp.mean(hs[-1] ** 2), hs
    >>> p = {"blocks": [jnp.zeros((2, 2)), jnp.eye(2)]}
    >>> inf = block_influence(fn, p, [jnp.ones((3, 2))], ["blocks/0", "blocks/1"])
    >>> inf.cosine.round(6).tolist(), inf.ablation.round(6).tolist()
    ([0.0, 0.0], [0.0, -3.0])
    """
    blocks = tuple(blocks)
    batches = list(batches)
    if not batches:
        raise ValueError("splice.block_influence: batches is empty")
    jfn = jax.jit(fn)
    cos = np.zeros(len(blocks))
    base = 0.0
    for batch in batches:
        loss, hiddens = jfn(params, batch)
        if len(hiddens) != len(blocks) + 1:
            raise ValueError(
                f"splice.block_influence: fn returned {len(hiddens)} hidden states for "
                f"{len(blocks)} blocks; expected {len(blocks) + 1} (input of each block + output)"
            )
        for i in range(len(blocks)):
            a, b = jnp.asarray(hiddens[i], jnp.float32), jnp.asarray(hiddens[i + 1], jnp.float32)
            cos[i] += float(jnp.mean(optax.losses.cosine_similarity(a, b, epsilon=1e-12)))
        base += float(loss)
    cos /= len(batches)
    base /= len(batches)
    ablation = np.zeros(len(blocks))
    for i, blk in enumerate(blocks):
        smaller = drop_layer(params, blk)
        ablation[i] = np.mean([float(jfn(smaller, b)[0]) for b in batches]) - base
    return Influence(blocks, 1.0 - cos, ablation)
