"""Pruning: scores -> masks -> sparsity schedules -> an Optax transform."""

from jaxslim.prune.masks import apply_mask, topk_mask
from jaxslim.prune.schedules import constant_schedule, one_shot_schedule, polynomial_schedule
from jaxslim.prune.scores import magnitude, random, saliency
from jaxslim.prune.transform import MaskState, PrunerState, keep_mask, masks_of, pruner
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
    "PrunerState",
    "MaskState",
]
