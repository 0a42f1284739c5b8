"""Layer splicing: coupled-axis tracing, channel removal, and cut / merge / add layer surgery."""

from jaxslim.splice._channels import (
    GroupReport,
    SpliceReport,
    feature_sizes,
    prune_channels,
    score_group,
)
from jaxslim.splice._fold import Fold, Fuse, find_foldable, fold_all, fuse_all
from jaxslim.splice._graph import Group, Member, count_flops, trace
from jaxslim.splice._importance import importance
from jaxslim.splice._influence import Influence, block_influence
from jaxslim.splice._merge import MergeReport, block_similarity, merge_similar_blocks
from jaxslim.splice._remove import (
    Plan,
    apply_plan,
    apply_plan_to_opt_state,
    make_plan,
    remove_channels,
)
from jaxslim.splice._rules import register_rule
from jaxslim.splice._surgery import (
    deepen,
    drop_layer,
    fold_batchnorm,
    fuse_linear,
    widen,
    widen_map,
)

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
