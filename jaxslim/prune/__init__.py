"""Pruning: scores -> masks -> sparsity schedules -> an Optax transform; one-shot pruning from
calibration statistics (Wanda, SparseGPT)."""

from jaxslim.prune._oneshot import sparsegpt, wanda
from jaxslim.prune.lottery import LotteryRound, lottery
from jaxslim.prune.masks import apply_mask, topk_mask
from jaxslim.prune.oneshot import oneshot
from jaxslim.prune.schedules import (
    constant_schedule,
    erk,
    one_shot_schedule,
    polynomial_schedule,
    uniform,
)
from jaxslim.prune.scores import magnitude, random, saliency
from jaxslim.prune.sparse_training import (
    rigl,
    set_sparse,
    sr_ste,
    static_sparse,
    ste,
    straight_through,
)
from jaxslim.prune.transform import MaskState, PrunerState, SparseState, keep_mask, masks_of, pruner
from jaxslim.structures import NM, Blocks, Channels, Unstructured

__all__ = [
    "magnitude",
    "random",
    "saliency",
    "Unstructured",
    "Channels",
    "NM",
    "Blocks",
    "topk_mask",
    "apply_mask",
    "polynomial_schedule",
    "constant_schedule",
    "one_shot_schedule",
    "pruner",
    "keep_mask",
    "masks_of",
    "wanda",
    "sparsegpt",
    "oneshot",
    "PrunerState",
    "MaskState",
    "SparseState",
    "erk",
    "uniform",
    "rigl",
    "set_sparse",
    "static_sparse",
    "ste",
    "sr_ste",
    "straight_through",
    "lottery",
    "LotteryRound",
]
