"""Lottery tickets: iterative magnitude pruning with weight rewinding around your training loop.

Frankle & Carbin (2019), "The Lottery Ticket Hypothesis"; rewinding to step ``k > 0``: Frankle
et al. (2020), "Linear Mode Connectivity and the Lottery Ticket Hypothesis".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxslim import _tree
from jaxslim._checks import fraction, integer, public
from jaxslim.prune._masks import apply_mask, check_structure, check_where, topk_mask
from jaxslim.structures import Structure, Unstructured

_FN = "prune.lottery"


class LotteryRound(NamedTuple):
    """One round of ``lottery``: its overall ``sparsity``, the ``masks`` it trained with, the
    rewound ``init`` params it started from and the trained ``params``."""

    sparsity: float
    masks: optax.Params
    init: optax.Params
    params: optax.Params


@public("prune.lottery")
def lottery(
    train_fn: Callable[[optax.Params, optax.Params], tuple[optax.Params, Mapping[int, Any] | None]],
    params: optax.Params,
    *,
    rounds: int | None = None,
    sparsity_per_round: float | None = None,
    sparsities: Sequence[float] | None = None,
    rewind_step: int = 0,
    structure: Structure = Unstructured(),
    scope: str = "layer",
    where: _tree.Where = None,
) -> list[LotteryRound]:
    """Iterative magnitude pruning with rewinding (IMP) around ``train_fn``.

    Round 0 trains the dense network from ``params``. Each round ``r >= 1`` prunes, by magnitude
    of the previous round's trained weights, the selected leaves to the overall sparsity ``s_r``
    (weights pruned earlier stay pruned: the masks are nested), rewinds the survivors to their
    values at ``rewind_step`` of round 0 (``0``: the original initialization, the lottery ticket;
    ``k > 0``: late rewinding) and trains again with the mask held fixed. The schedule ``s_r`` is
    either

    * geometric: ``rounds`` rounds, each pruning ``sparsity_per_round = p`` of the weights still
      alive, ``s_r = 1 - (1 - p)^r`` (Frankle & Carbin use ``p = 0.2``); or
    * explicit: ``sparsities = [s_1, s_2, ...]``, non-decreasing overall sparsities, e.g. the
      MNIST-1D lottery notebook's ``np.linspace(0, 1, 100)[1:]`` (one round per entry).

    Each leaf loses ``round_half_even(s_r * n)`` of its ``n`` entries (``scope="layer"``) or all
    selected leaves together lose that many (``scope="global"``). Leaves that ``where`` leaves out
    (by default biases and other 1-D leaves) are never pruned; select them with ``where`` (e.g.
    ``where=r"kernel|bias"``), and exclude a layer with a regex or predicate that skips it.

    The protocol: ``train_fn(params, masks) -> (trained_params, checkpoints)``. ``masks`` is a
    mask tree (``None`` on unmasked leaves; all ``True`` in round 0) that ``train_fn`` must keep
    applied, e.g. with ``optax.chain(opt, prune.keep_mask(masks))``. ``checkpoints`` maps a step
    to the params at that step; only round 0's ``checkpoints[rewind_step]`` is read, and it may be
    ``None`` when ``rewind_step == 0``.

    Args:
      train_fn: your training function (see above).
      params: the initial parameters.
      rounds: number of pruning rounds after the dense one (``>= 1``), with
        ``sparsity_per_round``.
      sparsity_per_round: fraction of the surviving weights pruned each round, in ``[0, 1]``.
      sparsities: instead of ``rounds`` and ``sparsity_per_round``: the overall sparsity of each
        round, a non-empty non-decreasing sequence of numbers in ``[0, 1]``.
      rewind_step: step of round 0 to rewind to.
      structure, scope, where: as in ``topk_mask``.

    Returns:
      ``[LotteryRound, ...]``, one per round plus the dense run at entry 0.

    >>> import jax.numpy as jnp
    >>> def train_fn(p, masks):  # a stand-in: "training" doubles the weights
    ...     return apply_mask({"w": p["w"] * 2}, masks), None
    >>> out = lottery(train_fn, {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}, rounds=2,
    ...               sparsity_per_round=0.5)
    >>> [(r.sparsity, int(r.masks["w"].sum())) for r in out]
    [(0.0, 8), (0.5, 4), (0.75, 2)]
    >>> out[2].init["w"]  # survivors rewound to their initial values
    Array([[0., 0., 0., 0.],
           [0., 0., 7., 8.]], dtype=float32)
    >>> out = lottery(train_fn, {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}, sparsities=[0.25, 0.5])
    >>> [(r.sparsity, int(r.masks["w"].sum())) for r in out]
    [(0.0, 8), (0.25, 6), (0.5, 4)]
    """
    if not callable(train_fn):
        raise TypeError(f"{_FN}: train_fn must be a callable (params, masks) -> (params, ckpts)")
    schedule = _schedule(rounds, sparsity_per_round, sparsities)
    rewind_step = integer("prune.lottery", "rewind_step", rewind_step, low=0)
    check_structure(_FN, structure)
    check_where(_FN, where)
    masks = _tree.map_selected(
        lambda _, x: jnp.ones(x.shape, jnp.bool_),
        params,
        where=where,
        unselected=lambda *_: None,
    )
    trained, ckpts = _call(train_fn, params, masks)
    if rewind_step == 0:
        rewind = params
    else:
        if not isinstance(ckpts, Mapping) or rewind_step not in ckpts:
            have = sorted(ckpts) if isinstance(ckpts, Mapping) else ckpts
            raise ValueError(
                f"{_FN}: rewind_step={rewind_step} needs train_fn's checkpoints to hold the params "
                f"at that step (a dict step -> params) in round 0; got keys {have!r:.80}"
            )
        rewind = ckpts[rewind_step]
    out = [LotteryRound(0.0, masks, params, trained)]
    for s in schedule:
        masks = topk_mask(_scores(trained, masks), s, structure=structure, scope=scope, where=where)
        init = apply_mask(rewind, masks)
        trained, _ = _call(train_fn, init, masks)
        out.append(LotteryRound(s, masks, init, trained))
    return out


def _schedule(rounds, sparsity_per_round, sparsities) -> list[float]:
    """The overall sparsity of each pruning round, checked."""
    if sparsities is not None:
        if rounds is not None or sparsity_per_round is not None:
            raise ValueError(
                f"{_FN}: pass either sparsities=[...] or rounds= with sparsity_per_round=, "
                f"not both (got sparsities={sparsities!r:.60}, rounds={rounds!r}, "
                f"sparsity_per_round={sparsity_per_round!r})"
            )
        if isinstance(sparsities, str | bytes) or not isinstance(sparsities, Sequence | Iterable):
            raise TypeError(
                f"{_FN}: sparsities must be a sequence of overall sparsities in [0, 1], "
                f"got {type(sparsities).__name__} {sparsities!r:.60}"
            )
        out = [fraction("prune.lottery", v, "each of sparsities") for v in sparsities]
        if not out:
            raise ValueError(f"{_FN}: sparsities must hold at least one round's sparsity, got []")
        for r, (a, b) in enumerate(zip(out[:-1], out[1:], strict=True), start=2):
            if b < a:
                raise ValueError(
                    f"{_FN}: sparsities must be non-decreasing (pruned weights stay pruned), got "
                    f"{b!r} in round {r} after {a!r}; sort them"
                )
        return out
    if rounds is None or sparsity_per_round is None:
        raise TypeError(
            f"{_FN}: give the schedule as rounds= and sparsity_per_round=, or as sparsities=[...] "
            f"(got rounds={rounds!r}, sparsity_per_round={sparsity_per_round!r})"
        )
    rounds = integer("prune.lottery", "rounds", rounds, low=1)
    p = fraction("prune.lottery", sparsity_per_round, "sparsity_per_round")
    return [1.0 - (1.0 - p) ** r for r in range(1, rounds + 1)]


def _scores(trained, masks):
    """``|w|`` of the survivors and ``-1`` on pruned entries, so that a survivor trained to exactly
    0 never takes the place of a weight pruned earlier: the masks stay nested."""
    return jax.tree.map(
        lambda w, m: None if m is None else jnp.where(m, jnp.abs(w), -1.0).astype(w.dtype),
        trained,
        masks,
        is_leaf=lambda x: x is None,
    )


def _call(train_fn, params, masks):
    res = train_fn(params, masks)
    if not (isinstance(res, tuple) and len(res) == 2):
        raise TypeError(
            f"{_FN}: train_fn must return (trained_params, checkpoints), got {type(res).__name__}"
        )
    trained = res[0]
    if jax.tree.structure(trained) != jax.tree.structure(params):
        raise ValueError(
            f"{_FN}: train_fn returned params whose tree differs from the input's "
            f"({jax.tree.structure(trained)} vs {jax.tree.structure(params)})"
        )
    return res
