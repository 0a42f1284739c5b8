"""Pruning: scores -> masks -> sparsity schedules -> an Optax transform; one-shot pruning from
calibration statistics (Wanda, SparseGPT)."""

from jaxslim._oneshot import KernelRow, OneshotReport
from jaxslim.prune._calibrated import sparsegpt, wanda
from jaxslim.prune._lottery import LotteryRound, lottery
from jaxslim.prune._masks import apply_mask, topk_mask
from jaxslim.prune._methods import Magnitude, SparseGPT, Wanda
from jaxslim.prune._oneshot import oneshot
from jaxslim.prune._owl import owl
from jaxslim.prune._schedules import (
    constant_schedule,
    erk,
    one_shot_schedule,
    polynomial_schedule,
    uniform,
)
from jaxslim.prune._scores import magnitude, random, saliency
from jaxslim.prune._sparse_training import (
    rigl,
    set_sparse,
    sr_ste,
    static_sparse,
    ste,
    straight_through,
)
from jaxslim.prune._transform import (
    MaskState,
    PrunerState,
    SparseState,
    keep_mask,
    masks_of,
    pruner,
)
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
    "Magnitude",
    "Wanda",
    "SparseGPT",
    "OneshotReport",
    "KernelRow",
    "PrunerState",
    "MaskState",
    "SparseState",
    "erk",
    "owl",
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
