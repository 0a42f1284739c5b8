"""``merge_similar_blocks``: collapse runs of adjacent residual blocks that compute the same update.

Residual block ``i`` maps ``h_{i+1} = h_i + d_i``. When the updates of adjacent blocks point the
same way (``cos(d_i, d_{i+1})`` near 1 over the data), the run ``i .. i+k-1`` is replaced by one
block whose parameters are the run's average (or the first block's) with the *output* leaves — the
ones the update is linear in, the block's last projection ``w2``/``b2`` — multiplied by ``k``:
``h + k f_avg(h) ~ h + sum_j f_j(h_j)``. The error is second order in the updates' size and
difference (parameter merging of Layer Collapse: Yang et al., 2024, "LaCo: Large Language Model
Pruning via Layer Collapse"; block similarity as in ShortGPT, Men et al., 2024).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxslim import _tree
from jaxslim._checks import caller, public
from jaxslim.splice._influence import check_blocks, loss_and_hiddens
from jaxslim.splice._surgery import drop_layer, split_block


class MergeReport(NamedTuple):
    """What ``merge_similar_blocks`` did.

    ``similarity[i]`` is the mean cosine of the updates of ``blocks[i]`` and ``blocks[i + 1]``;
    ``merged`` the runs of blocks replaced by one (stored at the run's first block); ``loss_before``
    and ``loss_after`` the mean loss over the batches.
    """

    similarity: np.ndarray
    merged: tuple[tuple[Any, ...], ...]
    loss_before: float
    loss_after: float


_UNSET: Any = object()


@public("splice.block_similarity")
def block_similarity(
    fn: Callable[..., tuple[jax.Array, Sequence[jax.Array]]],
    params: Any,
    batches: Iterable[Any],
) -> tuple[np.ndarray, float]:
    """Mean cosine of adjacent blocks' residual updates, and the mean loss.

    ``fn(params, batch) -> (loss, hiddens)`` as for :func:`jaxslim.splice.block_influence`:
    ``hiddens[i]`` enters block ``i``. Returns ``(sim, loss)`` with ``sim[i] = E[cos(d_i,
    d_{i+1})]``, ``d_i = h_{i+1} - h_i``, over the last axis, averaged over positions and batches
    (``len(hiddens) - 2`` values).

    >>> import jax.numpy as jnp
    >>> fn = lambda p, x: (0.0, [x, 2 * x, 3 * x, 3 * x - x])
    >>> block_similarity(fn, None, [jnp.ones((2, 3))])[0].round(6).tolist()
    [1.0, -1.0]
    """
    return _block_similarity(fn, params, batches)


def _block_similarity(fn, params, batches) -> tuple[np.ndarray, float]:
    batches = list(batches)
    if not batches:
        raise ValueError(f"{caller()}: batches is empty")
    jfn = jax.jit(fn)
    total, loss = None, 0.0
    for n, batch in enumerate(batches):
        value, hs = loss_and_hiddens(jfn(params, batch), n)
        if len(hs) < 3:
            raise ValueError(
                f"{caller()}: fn returned {len(hs)} hidden states; two blocks "
                "need at least 3 (the input of each block and the output)"
            )
        deltas = [b - a for a, b in zip(hs[:-1], hs[1:], strict=True)]
        sims = np.array(
            [
                float(jnp.mean(optax.losses.cosine_similarity(a, b, epsilon=1e-12)))
                for a, b in zip(deltas[:-1], deltas[1:], strict=True)
            ]
        )
        total = sims if total is None else total + sims
        loss += value
    return total / len(batches), loss / len(batches)


_FN = "splice.merge_similar_blocks"


def _get_block(params: Any, block: str | tuple[str, int]) -> Any:
    path, index = split_block(block)
    sub = _tree.get_path(params, path)
    if index is None:
        return sub
    return jax.tree.map(lambda x: x[index], sub)


def _set_block(params: Any, block: str | tuple[str, int], value: Any) -> Any:
    path, index = split_block(block)
    if index is not None:
        old = _tree.get_path(params, path)
        value = jax.tree.map(lambda s, v: s.at[index].set(v), old, value)
    return _tree.set_path(params, path, value)


def _mean(xs: tuple[Any, ...], k: int) -> Any:
    if not _tree.is_float_array(xs[0]):
        return xs[0]  # ints, keys, ... : the first block's
    return (sum(xs[1:], xs[0]) / jnp.asarray(k, xs[0].dtype)).astype(xs[0].dtype)


def _runs(sim: np.ndarray, threshold: float) -> list[list[int]]:
    runs, cur = [], [0]
    for i, s in enumerate(sim):
        if s >= threshold:
            cur.append(i + 1)
        else:
            runs.append(cur)
            cur = [i + 1]
    runs.append(cur)
    return [r for r in runs if len(r) > 1]


@public("splice.merge_similar_blocks")
def merge_similar_blocks(
    fn: Callable[..., tuple[jax.Array, Sequence[jax.Array]]],
    params: Any,
    batches: Iterable[Any],
    blocks: Sequence[str | tuple[str, int]],
    *,
    threshold: float = 0.99,
    where: _tree.Where = None,
    how: str = "average",
    out: Any = _UNSET,
) -> tuple[Any, MergeReport]:
    """Replaces each run of adjacent blocks with near-identical updates by one block.

    ``fn(params, batch) -> (loss, hiddens)`` with ``len(blocks) + 1`` hidden states, as for
    :func:`jaxslim.splice.block_influence`; it must also run on the smaller tree (iterate over the
    blocks present). Adjacent blocks ``i, i+1`` are *similar* when :func:`block_similarity` is
    ``>= threshold``; every maximal run of ``k`` similar blocks becomes one block at the run's
    first position with parameters ``mean_j theta_j`` (``how="average"``) or ``theta_first``
    (``how="first"``), and the leaves selected by ``where`` (the block's output projection, whose
    update is linear in them: ``"w2|b2"``, a regex or predicate on the path *inside* the block)
    multiplied by ``k``. The other blocks of the run are removed (:func:`drop_layer`).

    Args:
      fn, params, batches, blocks: as for :func:`block_influence`; ``blocks`` in order.
      threshold: cosine in ``[-1, 1]`` above which two adjacent blocks merge.
      where: selects the block's output leaves (required: the update must be scaled by ``k``).
      how: ``"average"`` or ``"first"``.
      out: the deprecated name of ``where`` (``DeprecationWarning``).

    Returns:
      ``(new_params, MergeReport)``.

    >>> import jax.numpy as jnp
    >>> def fn(p, x):
    ...     hs = [x]
    ...     for b in p["blocks"]:
    ...         hs.append(hs[-1] + jax.nn.relu(hs[-1] @ b["w1"]) @ b["w2"])
    ...     return jnp.mean(hs[-1]), hs
    >>> b = {"w1": jnp.eye(2), "w2": 0.25 * jnp.eye(2)}
    >>> p = {"blocks": [b, b]}
    >>> new, rep = merge_similar_blocks(fn, p, [jnp.ones((1, 2))], ["blocks/0", "blocks/1"],
    ...                                 where="w2")
    >>> len(new["blocks"]), rep.merged, new["blocks"][0]["w2"][0, 0].item()
    (1, (('blocks/0', 'blocks/1'),), 0.5)
    """
    blocks = list(check_blocks(params, blocks))
    if len(blocks) < 2:
        raise ValueError(f"splice.merge_similar_blocks: need two blocks or more, got {blocks!r}")
    if out is not _UNSET:
        if where is not None:
            raise TypeError(f"{_FN}: pass where= only (out= is its deprecated name)")
        warnings.warn(
            f"{_FN}: out= is deprecated, use where= (the leaves it selects)",
            DeprecationWarning,
            stacklevel=2,
        )
        where = out
    _tree.check_where(where)
    if where is None:
        raise ValueError(
            f"{_FN}: where=None; pass the block's output leaves (a regex such as 'w2|b2' or a "
            "predicate): the merged update is scaled through them"
        )
    out = where
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.floating):
        raise TypeError(f"{_FN}: threshold must be a float, got {type(threshold).__name__}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(
            f"splice.merge_similar_blocks: threshold must be a cosine in [-1, 1], got {threshold!r}"
        )
    if how not in ("average", "first"):
        raise ValueError(
            f"splice.merge_similar_blocks: how must be 'average' or 'first', got {how!r}"
        )
    batches = list(batches)
    sim, before = _block_similarity(fn, params, batches)
    if sim.shape != (len(blocks) - 1,):
        raise ValueError(
            f"splice.merge_similar_blocks: fn returned {sim.size + 2} hidden states for "
            f"{len(blocks)} blocks; expected {len(blocks) + 1} (input of each block + output)"
        )
    runs = _runs(sim, threshold)
    new = params
    for run in runs:
        subs = [_get_block(params, blocks[i]) for i in run]
        k = len(run)
        if how == "average":
            merged = jax.tree.map(lambda *xs, k=k: _mean(xs, k), *subs)
        else:
            merged = subs[0]
        scaled = _tree.map_selected(
            lambda _, x, k=k: x * jnp.asarray(k, x.dtype),
            merged,
            where=out,
        )
        new = _set_block(new, blocks[run[0]], scaled)
    for run in reversed(runs):
        for i in reversed(run[1:]):
            new = drop_layer(new, blocks[i])
    after = before
    if runs:
        jfn = jax.jit(lambda p, b: fn(p, b)[0])
        after = float(np.mean([float(jfn(new, b)) for b in batches]))
        if not np.isfinite(after):
            raise ValueError(f"{_FN}: the loss of the merged model is {after}")
    merged = tuple(tuple(blocks[i] for i in run) for run in runs)
    return new, MergeReport(sim, merged, before, after)
