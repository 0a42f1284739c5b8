"""Layer splicing: coupled-axis tracing, channel removal, and cut / merge / add layer surgery."""

from jaxslim.splice.channels import (
    GroupReport,
    SpliceReport,
    feature_sizes,
    prune_channels,
    score_group,
)
from jaxslim.splice.fold import Fold, Fuse, find_foldable, fold_all, fuse_all
from jaxslim.splice.graph import Group, Member, count_flops, trace
from jaxslim.splice.importance import importance
from jaxslim.splice.influence import Influence, block_influence
from jaxslim.splice.merge import MergeReport, block_similarity, merge_similar_blocks
from jaxslim.splice.remove import (
    Plan,
    apply_plan,
    apply_plan_to_opt_state,
    make_plan,
    remove_channels,
)
from jaxslim.splice.rules import register_rule
from jaxslim.splice.surgery import deepen, drop_layer, fold_batchnorm, fuse_linear, widen, widen_map

__all__ = [
    "trace",
    "Group",
    "Member",
    "count_flops",
    "register_rule",
    "remove_channels",
    "prune_channels",
    "score_group",
    "Plan",
    "make_plan",
    "apply_plan",
    "apply_plan_to_opt_state",
    "GroupReport",
    "SpliceReport",
    "feature_sizes",
    "fold_batchnorm",
    "fuse_linear",
    "drop_layer",
    "widen",
    "widen_map",
    "deepen",
    "block_influence",
    "importance",
    "Influence",
    "find_foldable",
    "fold_all",
    "fuse_all",
    "Fold",
    "Fuse",
    "merge_similar_blocks",
    "block_similarity",
    "MergeReport",
]
