"""Bad input to every public splice function (and the ``_tree`` path helpers they share).

One row per case: ``pytest.param(call, exception, match, id=...)``; ``match`` names the function
and the path or value. Covers non-finite values, out-of-range numbers, wrong types, traced values
where a concrete one is needed, integer-keyed NNX states and missing block paths.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxslim import _tree, splice
from jaxslim._checks import public
from jaxslim.flax import splice as fsplice


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"]


P = {"w1": jnp.ones((4, 8)), "b1": jnp.ones(8), "w2": jnp.ones((8, 2))}
X = jnp.ones((1, 4))
(G,) = [g for g in splice.trace(mlp, P, X) if g.removable]
PLAN = splice.make_plan([G], [[0, 1, 2]])
NAN_P = {**P, "w1": P["w1"].at[0, 3].set(jnp.nan)}


def res_fn(p, x):
    hs = [x]
    for w in p["blocks"]:
        hs.append(hs[-1] + hs[-1] @ w)
    return jnp.mean(hs[-1] ** 2), hs


BLOCKS_P = {"blocks": [0.1 * jnp.eye(2), 0.2 * jnp.eye(2)]}
# Block 0 owns a table every block reads (T5's relative_attention_bias).
OWNED = {"blocks": {"0": {"w": jnp.eye(2), "bias_table": jnp.ones(2)}, "1": {"w": jnp.eye(2)}}}
NUMBERED = {"blocks": {"0": 0.1 * jnp.eye(2), "1": 0.2 * jnp.eye(2)}}


def fixed_depth_fn(p, x):
    """Looks up blocks "0" and "1" by number, as a model built for two layers does."""
    hs = [x]
    for i in range(2):
        hs.append(hs[-1] + hs[-1] @ p["blocks"][str(i)])
    return jnp.mean(hs[-1] ** 2), hs


BATCHES = [jnp.ones((3, 2))]
STACK = {"w": jnp.ones((3, 2, 2))}


class Blk(nnx.Module):
    def __init__(self, seed):
        self.lin = nnx.Linear(2, 2, rngs=nnx.Rngs(seed))


class Net(nnx.Module):
    def __init__(self):
        self.blocks = nnx.List([Blk(0), Blk(1)])


STATE = nnx.state(Net())  # keys 0, 1 under "blocks"
PURE = nnx.to_pure_dict(STATE)


def mlp_model():
    return nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))


def bn_pair():
    layer = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    bn = nnx.BatchNorm(3, use_running_average=True, rngs=nnx.Rngs(1))
    bn.var.set_value(jnp.array([1.0, -2.0, 1.0]))
    return layer, bn


class Pair(NamedTuple):
    a: object
    b: object


BN = dict(b=None, gamma=jnp.ones(3), beta=jnp.zeros(3), mean=jnp.zeros(3), var=jnp.ones(3))


def fold(w=jnp.ones((2, 3)), eps=1e-5, **kw):
    return splice.fold_batchnorm(w, **{**BN, **kw}, eps=eps)


TX = optax.adam(1e-3)
OPT = TX.init(P)

ROWS = [
    # --- _tree paths and where= ---
    pytest.param(
        public("f")(lambda: _tree.get_path(STATE, "blocks/5/lin")),
        ValueError,
        r"f: 'blocks/5/lin' is not in the tree \(no key '5' under 'blocks'; keys there: \['0'",
        id="get_path-int-keyed-state-missing",
    ),
    pytest.param(
        public("g")(lambda: _tree.set_path(PURE, "blocks/0/lin/scale", 1.0)),
        ValueError,
        r"g: 'blocks/0/lin/scale' is not in the tree \(no key 'scale' under 'blocks/0/lin'",
        id="set_path-pure-dict-missing",
    ),
    pytest.param(
        public("_tree.delete_path")(lambda: _tree.delete_path(Pair(1, 2), "a")),
        ValueError,
        r"_tree.delete_path: cannot delete 'a'.*Pair",
        id="delete_path-namedtuple-field",
    ),
    pytest.param(
        public("_tree.get_path")(lambda: _tree.get_path(P, 1.5)),
        TypeError,
        r"_tree.get_path: path must be .* got float 1.5",
        id="get_path-path-type",
    ),
    pytest.param(
        public("prune.x")(lambda: _tree.selected_paths(P, "w(")),
        ValueError,
        r"prune.x: where='w\(' is not a valid regular expression",
        id="where-invalid-regex",
    ),
    pytest.param(
        public("prune.x")(lambda: _tree.selected_paths({"i": 1}, 3)),
        TypeError,
        r"prune.x: where must be None, a regex string or a predicate.*int 3",
        id="where-wrong-type-no-float-leaf",
    ),
    # --- fold_batchnorm ---
    pytest.param(
        lambda: fold(var=None),
        TypeError,
        r"splice.fold_batchnorm: var must be an array, got None",
        id="fold_batchnorm-var-None",
    ),
    pytest.param(
        lambda: fold(mean=[0.0, 0.0, 0.0]),
        TypeError,
        r"splice.fold_batchnorm: mean must be a jax or numpy array, got list",
        id="fold_batchnorm-mean-list",
    ),
    pytest.param(
        lambda: fold(var=jnp.ones(3, jnp.int32)),
        TypeError,
        r"splice.fold_batchnorm: var must be a floating-point array, got dtype int32",
        id="fold_batchnorm-int-var",
    ),
    pytest.param(
        lambda: fold(var=jnp.array([1.0, -1.0, 1.0])),
        ValueError,
        r"splice.fold_batchnorm: var\[1\] = -1.0 is negative",
        id="fold_batchnorm-var-negative",
    ),
    pytest.param(
        lambda: fold(var=jnp.array([1.0, 1.0, 0.0]), eps=0.0),
        ValueError,
        r"splice.fold_batchnorm: var\[2\] \+ eps = 0.0 \+ 0.0 is 0",
        id="fold_batchnorm-var-zero-eps-zero",
    ),
    pytest.param(
        lambda: fold(var=jnp.array([1.0, jnp.nan, 1.0])),
        ValueError,
        r"splice.fold_batchnorm: var\[1\] = nan is not finite",
        id="fold_batchnorm-var-nan",
    ),
    pytest.param(
        lambda: fold(gamma=jnp.array([jnp.inf, 1.0, 1.0])),
        ValueError,
        r"splice.fold_batchnorm: gamma\[0\] = inf is not finite",
        id="fold_batchnorm-gamma-inf",
    ),
    pytest.param(
        lambda: fold(mean=jnp.zeros(4)),
        ValueError,
        r"splice.fold_batchnorm: mean must have shape \(3,\).* got \(4,\)",
        id="fold_batchnorm-shape",
    ),
    pytest.param(
        lambda: fold(w=jnp.ones(3)),
        ValueError,
        r"splice.fold_batchnorm: w must be a Dense .* got shape \(3,\)",
        id="fold_batchnorm-1d-kernel",
    ),
    pytest.param(
        lambda: fold(eps=-1e-5),
        ValueError,
        r"splice.fold_batchnorm: eps must be a finite float >= 0, got -1e-05",
        id="fold_batchnorm-eps-negative",
    ),
    pytest.param(
        lambda: fold(eps=float("nan")),
        ValueError,
        r"splice.fold_batchnorm: eps must be a finite float >= 0, got nan",
        id="fold_batchnorm-eps-nan",
    ),
    pytest.param(
        lambda: fold(eps="1e-5"),
        TypeError,
        r"splice.fold_batchnorm: eps must be a float, got str",
        id="fold_batchnorm-eps-str",
    ),
    pytest.param(
        lambda: fold(gamma=jnp.full(3, 1e30), mean=jnp.ones(3), var=jnp.zeros(3), eps=1e-30),
        ValueError,
        r"splice.fold_batchnorm: the folded bias overflows float32 at channel 0",
        id="fold_batchnorm-bias-overflow",
    ),
    pytest.param(
        lambda: fold(w=jnp.full((2, 3), 1e38).at[:, 0].set(1.0), gamma=jnp.full(3, 100.0)),
        ValueError,
        r"splice.fold_batchnorm: the folded kernel overflows float32 at channel 1",
        id="fold_batchnorm-kernel-overflow",
    ),
    # --- fuse_linear, widen, widen_map, deepen ---
    pytest.param(
        lambda: splice.fuse_linear(jnp.ones((2, 3)), None, None, None),
        TypeError,
        r"splice.fuse_linear: w2 must be a jax or numpy array, got NoneType",
        id="fuse_linear-w2-None",
    ),
    pytest.param(
        lambda: splice.fuse_linear(jnp.ones((2, 3)), jnp.ones(2), jnp.ones((3, 1)), None),
        ValueError,
        r"splice.fuse_linear: b1 must have shape \(3,\), got \(2,\)",
        id="fuse_linear-b1-shape",
    ),
    pytest.param(
        lambda: jax.jit(lambda n: splice.widen(P["w1"], P["b1"], P["w2"], n))(9),
        TypeError,
        r"splice.widen: new_width must be a Python int .*cannot be traced",
        id="widen-traced-width",
    ),
    pytest.param(
        lambda: splice.widen(P["w1"], P["b1"], P["w2"], 4),
        ValueError,
        r"splice.widen: new_width=4 is smaller than the width 8",
        id="widen-narrower",
    ),
    pytest.param(
        lambda: splice.widen(P["w1"], P["b1"], P["w2"], 9, key=jax.random.key(0), noise=np.nan),
        ValueError,
        r"splice.widen: noise must be a finite float >= 0, got nan",
        id="widen-noise-nan",
    ),
    pytest.param(
        lambda: splice.widen(P["w1"], P["b1"], P["w2"], 9, noise=0.1),
        ValueError,
        r"splice.widen: noise > 0 needs a key",
        id="widen-noise-without-key",
    ),
    pytest.param(
        lambda: splice.widen_map(0, 3),
        ValueError,
        r"splice.widen: width must be >= 1, got 0",
        id="widen_map-zero-width",
    ),
    pytest.param(
        lambda: splice.widen_map(2, 3.5),
        TypeError,
        r"splice.widen: new_width must be a Python int.*float 3.5",
        id="widen_map-float-width",
    ),
    pytest.param(
        lambda: splice.deepen(0),
        ValueError,
        r"splice.deepen: width must be >= 1, got 0",
        id="deepen-zero-width",
    ),
    pytest.param(
        lambda: splice.deepen(4, jax.nn.relu),
        TypeError,
        r"splice.deepen: activation must be a name such as 'relu' or None, got",
        id="deepen-activation-function",
    ),
    pytest.param(
        lambda: splice.deepen(4, "gelu"),
        ValueError,
        r"splice.deepen: activation='gelu' is not idempotent",
        id="deepen-not-idempotent",
    ),
    # --- drop_layer, block_influence, block_similarity, merge_similar_blocks ---
    pytest.param(
        lambda: splice.drop_layer(STATE, "blocks/2"),
        ValueError,
        r"splice.drop_layer: 'blocks/2' is not in the tree \(no key '2' under 'blocks'",
        id="drop_layer-int-keyed-state-missing",
    ),
    pytest.param(
        lambda: splice.drop_layer(PURE, "block/0"),
        ValueError,
        r"splice.drop_layer: 'block/0' is not in the tree \(no key 'block' at the root",
        id="drop_layer-pure-dict-missing",
    ),
    pytest.param(
        lambda: splice.drop_layer(BLOCKS_P, 1),
        TypeError,
        r"splice.drop_layer: block must be a path .* got int 1",
        id="drop_layer-int-block",
    ),
    pytest.param(
        lambda: jax.jit(lambda i: splice.drop_layer(STACK, ("w", i)))(1),
        TypeError,
        r"splice.drop_layer: a scanned-stack block is \(path, int index\)",
        id="drop_layer-traced-index",
    ),
    pytest.param(
        lambda: splice.drop_layer(STACK, ("w", 3)),
        ValueError,
        r"splice.drop_layer: layer 3 is out of range for 'w' with shape \(3, 2, 2\)",
        id="drop_layer-scanned-out-of-range",
    ),
    pytest.param(
        lambda: splice.drop_layer(OWNED, "blocks/0", renumber=True),
        ValueError,
        r"splice.drop_layer: 'blocks/0' holds parameters that 'blocks/1', which takes its "
        r"number, lacks: \['bias_table'\].*Pass keep='bias_table'",
        id="drop_layer-renumber-drops-shared-params",
    ),
    pytest.param(
        lambda: splice.drop_layer(OWNED, "blocks/0", renumber=True, keep="w"),
        ValueError,
        r"splice.drop_layer: 'blocks/0' holds parameters .* lacks: \['bias_table'\]",
        id="drop_layer-keep-misses-shared-params",
    ),
    pytest.param(
        lambda: splice.drop_layer(OWNED, "blocks/0", keep="bias_table"),
        ValueError,
        r"splice.drop_layer: keep= moves .* needs renumber=True",
        id="drop_layer-keep-without-renumber",
    ),
    pytest.param(
        lambda: splice.drop_layer(OWNED, "blocks/0", renumber=True, keep=1),
        TypeError,
        r"splice.drop_layer: keep must be a regex string, got 1",
        id="drop_layer-keep-not-str",
    ),
    pytest.param(
        lambda: splice.block_influence(fixed_depth_fn, NUMBERED, BATCHES, ["blocks/0", "blocks/1"]),
        ValueError,
        r"splice.block_influence: fn cannot run without block 'blocks/0' \(KeyError.*fn must "
        r"accept drop_layer\(params, block\).*pass renumber=True",
        id="block_influence-fn-needs-every-block",
    ),
    pytest.param(
        lambda: splice.block_influence(res_fn, BLOCKS_P, BATCHES, ["blocks/0", "blocks/7"]),
        ValueError,
        r"splice.block_influence: 'blocks/7' is not in the tree \(no key '7' under 'blocks'",
        id="block_influence-missing-block",
    ),
    pytest.param(
        lambda: splice.block_influence(res_fn, STATE, BATCHES, ["blocks/0", "blocks/2"]),
        ValueError,
        r"splice.block_influence: 'blocks/2' is not in the tree",
        id="block_influence-int-keyed-state-missing-block",
    ),
    pytest.param(
        lambda: splice.block_influence(res_fn, BLOCKS_P, [jnp.full((3, 2), jnp.nan)], ["blocks/0"]),
        ValueError,
        r"splice.block_influence: fn's loss on batch 0 is nan",
        id="block_influence-nan-loss",
    ),
    pytest.param(
        lambda: splice.block_influence(lambda p, x: x, BLOCKS_P, BATCHES, ["blocks/0"]),
        TypeError,
        r"splice.block_influence: fn\(params, batch\) must return \(loss, hiddens\)",
        id="block_influence-fn-output",
    ),
    pytest.param(
        lambda: splice.block_influence(res_fn, BLOCKS_P, BATCHES, "blocks/0"),
        TypeError,
        r"splice.block_influence: blocks must be a list of paths.*str 'blocks/0'",
        id="block_influence-blocks-str",
    ),
    pytest.param(
        lambda: splice.block_similarity(
            lambda p, x: (0.0, [x, x * jnp.inf, x]), None, [jnp.ones((2, 2))]
        ),
        ValueError,
        r"splice.block_similarity: hiddens\[1\] on batch 0 holds NaN or inf",
        id="block_similarity-inf-hidden",
    ),
    pytest.param(
        lambda: splice.merge_similar_blocks(
            res_fn, BLOCKS_P, BATCHES, ["blocks/0", "blocks/1"], threshold=np.nan, where="."
        ),
        ValueError,
        r"splice.merge_similar_blocks: threshold must be a cosine in \[-1, 1\], got nan",
        id="merge-threshold-nan",
    ),
    pytest.param(
        lambda: splice.merge_similar_blocks(
            res_fn, BLOCKS_P, BATCHES, ["blocks/0", "blocks/1"], threshold="0.9", where="."
        ),
        TypeError,
        r"splice.merge_similar_blocks: threshold must be a float, got str",
        id="merge-threshold-str",
    ),
    pytest.param(
        lambda: splice.merge_similar_blocks(
            res_fn, BLOCKS_P, BATCHES, ["blocks/0", "blocks/1"], where="w2["
        ),
        ValueError,
        r"splice.merge_similar_blocks: where='w2\[' is not a valid regular expression",
        id="merge-out-invalid-regex",
    ),
    pytest.param(
        lambda: splice.merge_similar_blocks(res_fn, BLOCKS_P, BATCHES, ["blocks/0", "blocks/1"]),
        ValueError,
        r"splice.merge_similar_blocks: where=None; pass the block's output leaves",
        id="merge-out-None",
    ),
    pytest.param(
        lambda: splice.merge_similar_blocks(
            res_fn, STATE, BATCHES, ["blocks/0", "blocks/5"], where="kernel"
        ),
        ValueError,
        r"splice.merge_similar_blocks: 'blocks/5' is not in the tree \(no key '5'",
        id="merge-int-keyed-state-missing-block",
    ),
    # --- plans and channel removal ---
    pytest.param(
        lambda: splice.make_plan([G], [[0.5]]),
        ValueError,
        r"splice.make_plan: keep must be a 1-D sequence of integer indices.*'w1'",
        id="make_plan-float-keep",
    ),
    pytest.param(
        lambda: splice.make_plan(["w1"], [[0]]),
        TypeError,
        r"splice.make_plan: group must be a splice.Group",
        id="make_plan-not-a-group",
    ),
    pytest.param(
        lambda: splice.apply_plan(PLAN, P),
        TypeError,
        r"splice.apply_plan: the arguments are \(tree, plan\)",
        id="apply_plan-swapped",
    ),
    pytest.param(
        lambda: splice.apply_plan(P, {"keep": [0]}),
        TypeError,
        r"splice.apply_plan: plan must be a splice.Plan, got dict",
        id="apply_plan-plan-type",
    ),
    pytest.param(
        lambda: splice.apply_plan_to_opt_state(OPT, PLAN, optax.adam, P),
        TypeError,
        r"splice.apply_plan_to_opt_state: tx must be the optax.GradientTransformation",
        id="apply_plan_to_opt_state-tx-type",
    ),
    pytest.param(
        lambda: splice.apply_plan_to_opt_state(OPT, PLAN, TX, {"w1": P["w1"]}),
        ValueError,
        r"splice.apply_plan_to_opt_state: the plan names \['b1', 'w2'\] which params do not",
        id="apply_plan_to_opt_state-missing-path",
    ),
    pytest.param(
        lambda: splice.remove_channels(P, G, [0, 8]),
        ValueError,
        r"splice.remove_channels: keep index 8 is out of range \[0, 8\).*'w1'",
        id="remove_channels-out-of-range",
    ),
    pytest.param(
        lambda: splice.score_group(P, G, score="l3"),
        ValueError,
        r"splice.score_group: score must be 'l2', 'l1', 'taylor' or a callable, got 'l3'",
        id="score_group-bad-score",
    ),
    pytest.param(
        lambda: splice.score_group(P, G, score="taylor", grads={"w1": P["w1"]}),
        ValueError,
        r"splice.score_group: grads have no leaf 'b1'",
        id="score_group-taylor-grads-missing",
    ),
    pytest.param(
        lambda: splice.prune_channels(mlp, P, X, sparsity=np.nan),
        ValueError,
        r"splice.prune_channels: sparsity must be in \[0, 1\), got nan",
        id="prune_channels-sparsity-nan",
    ),
    pytest.param(
        lambda: splice.prune_channels(mlp, P, X, sparsity=np.array(1.5)),
        ValueError,
        r"splice.prune_channels: sparsity must be in \[0, 1\), got 1.5",
        id="prune_channels-sparsity-array-1.5",
    ),
    pytest.param(
        lambda: jax.jit(lambda s: splice.prune_channels(mlp, P, X, sparsity=s))(0.5),
        TypeError,
        r"splice.prune_channels: sparsity must be concrete",
        id="prune_channels-sparsity-traced",
    ),
    pytest.param(
        lambda: splice.prune_channels(mlp, P, X, sparsity="0.5"),
        TypeError,
        r"splice.prune_channels: sparsity must be a float, got str",
        id="prune_channels-sparsity-str",
    ),
    pytest.param(
        lambda: splice.prune_channels(mlp, P, X, sparsity=0.5, where="w1["),
        ValueError,
        r"splice.prune_channels: where='w1\[' is not a valid regular expression",
        id="prune_channels-where-invalid-regex",
    ),
    pytest.param(
        lambda: splice.prune_channels(mlp, P, X, sparsity=0.5, where="^nothing$"),
        ValueError,
        r"splice.prune_channels: where='\^nothing\$' matches no removable group.*"
        r"\['b1', 'w1', 'w2'\]",
        id="prune_channels-where-matches-nothing",
    ),
    pytest.param(
        lambda: splice.prune_channels(mlp, P, X, sparsity=0.5, where="w2"),
        ValueError,
        r"splice.prune_channels: where='w2' matches no removable group",
        id="prune_channels-where-selects-input-axis-only",
    ),
    pytest.param(
        lambda: splice.prune_channels(mlp, P, X, sparsity=0.5, where=("w1", "1")),
        TypeError,
        r"splice.prune_channels: a where= pair is \(regex or predicate, int axis\), got \('w1'",
        id="prune_channels-where-pair-axis-not-int",
    ),
    pytest.param(
        lambda: splice.prune_channels(mlp, P, X, sparsity=0.5, score={}),
        ValueError,
        r"splice.prune_channels: score has no entry for the group over \['b1', 'w1', 'w2'\]",
        id="prune_channels-score-mapping-missing-group",
    ),
    pytest.param(
        lambda: splice.importance(mlp, P, [X], aggregate=("l2", "median")),
        ValueError,
        r"splice.importance: aggregate must be a pair .* got \('l2', 'median'\)",
        id="importance-bad-aggregate",
    ),
    pytest.param(
        lambda: splice.importance(mlp, P, []),
        ValueError,
        r"splice.importance: batches is empty",
        id="importance-no-batches",
    ),
    pytest.param(
        lambda: splice.drop_layer({"a": {"w": jnp.ones(2)}, "b": 1}, "a", renumber=True),
        ValueError,
        r"splice.drop_layer: renumber=True needs a block key ending in its number .* got 'a'",
        id="drop_layer-renumber-unnumbered-key",
    ),
    pytest.param(
        lambda: splice.drop_layer({"l0": 1, "l1": 2}, "l0", renumber=1),
        TypeError,
        r"splice.drop_layer: renumber must be a bool, got 1",
        id="drop_layer-renumber-not-bool",
    ),
    pytest.param(
        lambda: splice.prune_channels(mlp, P, X, sparsity=0.5, round_to=0),
        ValueError,
        r"splice.prune_channels: round_to must be an int >= 1, got 0",
        id="prune_channels-round_to-0",
    ),
    pytest.param(
        lambda: splice.prune_channels(mlp, NAN_P, X, sparsity=0.5),
        ValueError,
        r"splice.prune_channels: score of channel 3 of the group over .* is nan",
        id="prune_channels-nan-weight",
    ),
    pytest.param(
        lambda: splice.prune_channels(mlp, P, X, sparsity=0.5, score=2),
        TypeError,
        r"splice.prune_channels: score must be 'l2', 'l1', 'taylor' or score\(params, group\)",
        id="prune_channels-score-int",
    ),
    # --- jaxslim.flax.splice ---
    pytest.param(
        lambda: fsplice.trace_model({"w": 1}, X),
        TypeError,
        r"flax.splice.trace_model: model must be an nnx.Module, got dict",
        id="trace_model-not-a-module",
    ),
    pytest.param(
        lambda: fsplice.prune_channels_model(mlp_model(), X, sparsity=0.5, where="^nope"),
        ValueError,
        r"flax.splice.prune_channels_model: where='\^nope' matches no removable group"
        r".*layers/0/kernel",
        id="prune_channels_model-where-matches-nothing",
    ),
    pytest.param(
        lambda: fsplice.prune_channels_model(mlp_model(), X, sparsity=0.5, optimizer=TX),
        TypeError,
        r"flax.splice.prune_channels_model: optimizer must be an nnx.Optimizer or None",
        id="prune_channels_model-optimizer-type",
    ),
    pytest.param(
        lambda: fsplice.apply_plan_model(mlp_model(), PLAN),
        ValueError,
        r"flax.splice.apply_plan_model: the plan names \['b1', 'w1', 'w2'\] which the tree",
        id="apply_plan_model-foreign-plan",
    ),
    pytest.param(
        lambda: fsplice.remove_channels_model(mlp_model(), "layers/0", [0]),
        TypeError,
        r"flax.splice.remove_channels_model: group must be a splice.Group",
        id="remove_channels_model-group-type",
    ),
    pytest.param(
        lambda: fsplice.fold_batchnorm_model(*bn_pair()),
        ValueError,
        r"splice.fold_batchnorm: var\[1\] = -2.0 is negative",
        id="fold_batchnorm_model-negative-var",
    ),
    pytest.param(
        lambda: fsplice.fold_batchnorm_model(bn_pair()[0], nnx.LayerNorm(3, rngs=nnx.Rngs(0))),
        TypeError,
        r"flax.splice.fold_batchnorm_model: bn must be an nnx.BatchNorm, got LayerNorm",
        id="fold_batchnorm_model-bn-type",
    ),
    pytest.param(
        lambda: fsplice.widen_model(bn_pair()[1], bn_pair()[0], 4),
        TypeError,
        r"flax.splice.widen_model: layer1 must be an nnx.Linear or nnx.Conv, got BatchNorm",
        id="widen_model-layer-type",
    ),
    pytest.param(
        lambda: fsplice.fold_all_model(STATE, X),
        TypeError,
        r"flax.splice.fold_all_model: model must be an nnx.Module, got State",
        id="fold_all_model-state-not-module",
    ),
    pytest.param(
        public("flax.splice.fold_all_model")(lambda: fsplice._get(Net(), "blocks/3/lin")),
        ValueError,
        r"flax.splice.fold_all_model: 'blocks/3/lin' is not in the model",
        id="flax-path-helper-missing-item",
    ),
]


@pytest.mark.parametrize("call, exc, match", ROWS)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_fold_batchnorm_model_leaves_the_layer_unchanged_on_error():
    layer, bn = bn_pair()
    before = np.asarray(layer.kernel.get_value())
    with pytest.raises(ValueError, match="negative"):
        fsplice.fold_batchnorm_model(layer, bn)
    np.testing.assert_array_equal(layer.kernel.get_value(), before)


def test_apply_plan_model_is_all_or_nothing():
    """An optimizer the plan does not fit raises before the model changes."""
    model = mlp_model()
    (g,) = [g for g in fsplice.trace_model(model, X) if g.removable]
    narrow = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.Linear(6, 2, rngs=nnx.Rngs(1)))
    other = nnx.Optimizer(narrow, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    kernel = np.asarray(model.layers[0].kernel.get_value())
    with pytest.raises(ValueError, match=r"flax.splice.apply_plan_model: 'layers/0/"):
        fsplice.apply_plan_model(model, splice.make_plan([g], [[0, 1]]), optimizer=other)
    np.testing.assert_array_equal(model.layers[0].kernel.get_value(), kernel)
    assert model.layers[0].out_features == 8
