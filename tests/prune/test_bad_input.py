"""Bad input to pruning, structures, regularizers, schedules and distillation: one row per case.

Each row is ``(callable, exception type, regex)``; the regex names the public function and the bad
value or the leaf path. Rows cover wrong types, out-of-range and non-finite numbers, concrete NumPy
and jax arrays (checked like Python floats), traced values (checked where their shape or dtype is
wrong), integer-keyed NNX states (``nnx.List``) and mismatched mask trees.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxslim import distill, prune, regularize, schedules, structures
from jaxslim.flax.distill import distill_step
from jaxslim.structures import NM, Blocks, Channels, Unstructured

NAN, INF = float("nan"), float("inf")


def P():
    return {"layer": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)}}


def nnx_list_state():
    """``nnx.state`` of an ``nnx.List``: integer keys 0, 1."""
    layers = nnx.List([nnx.Linear(6, 4, rngs=nnx.Rngs(i)) for i in range(2)])
    return nnx.state(layers, nnx.Param)


def pruner_update(tx, params, steps=1):
    state = tx.init(params)
    for _ in range(steps):
        _, state = tx.update(params, state, params)


def reg_update(tx, params, steps=1):
    state = tx.init(params)
    for _ in range(steps):
        _, state = tx.update(params, state, params)


LOGITS = jnp.zeros((2, 5))
FEATS = jnp.ones((2, 3, 3, 4))


def _distill_step(**kw):
    student = nnx.Linear(3, 5, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(student, optax.sgd(0.1), wrt=nnx.Param)
    args = dict(student=student, optimizer=opt, x=jnp.ones((2, 3)), teacher=LOGITS)
    args.update(kw)
    return distill_step(**args)


ROWS = [
    # --- prune.topk_mask: sparsity ------------------------------------------------------------
    pytest.param(
        lambda: prune.topk_mask(P(), np.array(1.5)),
        ValueError,
        r"prune\.topk_mask: sparsity must be in \[0, 1\], got array\(1\.5\) for 'layer/kernel'",
        id="topk_mask-numpy-array-1.5",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), jnp.array(1.5)),
        ValueError,
        r"prune\.topk_mask: sparsity must be in \[0, 1\], got Array\(1\.5.*'layer/kernel'",
        id="topk_mask-jax-array-1.5",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), np.float32(-0.25)),
        ValueError,
        r"prune\.topk_mask: sparsity must be in \[0, 1\], got .*-0\.25.*'layer/kernel'",
        id="topk_mask-numpy-scalar-negative",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), np.array(NAN), structure=NM(2, 4)),
        ValueError,
        r"prune\.topk_mask: sparsity must be in \[0, 1\], got array\(nan\).*layer/kernel",
        id="topk_mask-NM-numpy-nan",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), "0.5"),
        TypeError,
        r"prune\.topk_mask: sparsity must be a real number, got '0\.5'",
        id="topk_mask-sparsity-str",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), True),
        TypeError,
        r"prune\.topk_mask: sparsity must be a real number, got the bool True",
        id="topk_mask-sparsity-bool",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), np.array([0.5, 0.5])),
        TypeError,
        r"prune\.topk_mask: sparsity must be a scalar, got an array of shape \(2,\)",
        id="topk_mask-sparsity-vector",
    ),
    pytest.param(
        lambda: jax.jit(lambda s: prune.topk_mask(P(), s))(jnp.ones(2) / 2),
        TypeError,
        r"prune\.topk_mask: sparsity must be a scalar, got an array of shape \(2,\)",
        id="topk_mask-traced-sparsity-vector",
    ),
    pytest.param(
        lambda: prune.topk_mask(nnx_list_state(), 1.5),
        ValueError,
        r"prune\.topk_mask: sparsity must be in \[0, 1\], got 1\.5 for '0/kernel'",
        id="topk_mask-nnx-list-state-sparsity",
    ),
    # --- prune.topk_mask: structure, scope, where --------------------------------------------
    pytest.param(
        lambda: prune.topk_mask(P(), 0.5, structure="channels"),
        TypeError,
        r"prune\.topk_mask: structure must be one of Unstructured\(\), Channels.*'channels'",
        id="topk_mask-structure-str",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), 0.5, structure=Channels),
        TypeError,
        r"prune\.topk_mask: structure must be .*a class: write Channels\(\)",
        id="topk_mask-structure-class",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), 0.5, scope="model"),
        ValueError,
        r"prune\.topk_mask: scope must be 'layer' or 'global', got 'model'",
        id="topk_mask-scope",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), 0.5, where=3),
        TypeError,
        r"prune\.topk_mask: where must be None, a regex string or a predicate.*got int 3",
        id="topk_mask-where-int",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), 0.5, where="kernel["),
        ValueError,
        r"prune\.topk_mask: where='kernel\[' is not a valid regular expression",
        id="topk_mask-where-bad-regex",
    ),
    pytest.param(
        lambda: prune.topk_mask({"w": jnp.ones((6, 2))}, 0.5, structure=NM(2, 4)),
        ValueError,
        r"prune\.topk_mask: NM\(2, 4\) needs axis -2 of 'w' to be a multiple of 4, got shape "
        r"\(6, 2\).*NM\(2, 4, axis=\.\.\.\)",
        id="topk_mask-NM-not-divisible-suggests-axis",
    ),
    pytest.param(
        lambda: prune.topk_mask({"einsum": jnp.ones((2, 3, 8))}, 0.5, structure=NM(2, 4)),
        ValueError,
        r"prune\.topk_mask: NM\(2, 4\) needs axis -2 of 'einsum'.*Flax kernel.*"
        r"axes of 'einsum' divisible by 4: \[2\]",
        id="topk_mask-NM-einsum-kernel-names-axis",
    ),
    pytest.param(
        lambda: prune.topk_mask(nnx_list_state(), 0.5, structure=NM(2, 4)),
        ValueError,
        r"prune\.topk_mask: NM\(2, 4\) needs axis -2 of '0/kernel'",
        id="topk_mask-NM-nnx-list-state",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), 0.5, structure=Channels(axis=2)),
        ValueError,
        r"prune\.topk_mask: Channels\(axis=2\): axis 2 is out of range for 'layer/kernel'",
        id="topk_mask-Channels-axis-out-of-range",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), 0.5, structure=Blocks((3, 3))),
        ValueError,
        r"prune\.topk_mask: Blocks\(3, 3\) does not tile 'layer/kernel' of shape \(8, 4\)",
        id="topk_mask-Blocks-not-tiling",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), 0.5, where="nothing"),
        ValueError,
        r"prune\.topk_mask: where='nothing' selects no floating-point array leaf",
        id="topk_mask-where-selects-nothing",
    ),
    # --- prune.apply_mask / keep_mask / masks_of: mismatched mask trees ---------------------
    pytest.param(
        lambda: prune.apply_mask(P(), {"layer": {"kernel": jnp.ones((8, 4), bool)}}),
        ValueError,
        r"prune\.apply_mask: tree structures differ",
        id="apply_mask-tree-mismatch",
    ),
    pytest.param(
        lambda: prune.apply_mask(P(), {"layer": {"kernel": jnp.ones((8, 4)), "bias": None}}),
        ValueError,
        r"prune\.apply_mask: mask for 'layer/kernel' must be a bool array of shape \(8, 4\), "
        r"got float32",
        id="apply_mask-float-mask",
    ),
    pytest.param(
        lambda: prune.apply_mask(P(), {"layer": {"kernel": "keep", "bias": None}}),
        ValueError,
        r"prune\.apply_mask: mask for 'layer/kernel' must be a bool array .* got str",
        id="apply_mask-str-mask",
    ),
    pytest.param(
        lambda: prune.keep_mask({"layer": {"kernel": jnp.ones((4, 4), bool), "bias": None}}).init(
            P()
        ),
        ValueError,
        r"prune\.keep_mask: mask for 'layer/kernel' must be a bool array of shape \(8, 4\)",
        id="keep_mask-shape-mismatch",
    ),
    pytest.param(
        lambda: prune.keep_mask({"layer": None}).init(P()),
        ValueError,
        r"prune\.keep_mask: tree structures differ",
        id="keep_mask-tree-mismatch",
    ),
    pytest.param(
        lambda: prune.masks_of(optax.sgd(0.1).init(P())),
        ValueError,
        r"prune\.masks_of: no pruner or keep_mask state found",
        id="masks_of-no-pruner",
    ),
    # --- prune.pruner ------------------------------------------------------------------------
    pytest.param(
        lambda: prune.pruner(0.5, structure="channels"),
        TypeError,
        r"prune\.pruner: structure must be one of Unstructured\(\), Channels.*'channels'",
        id="pruner-structure-str",
    ),
    pytest.param(
        lambda: prune.pruner("gradual"),
        TypeError,
        r"prune\.pruner: schedule must be a number in \[0, 1\] or a callable.*'gradual'",
        id="pruner-schedule-str",
    ),
    pytest.param(
        lambda: prune.pruner(np.array(1.5)),
        ValueError,
        r"prune\.pruner: prune\.constant_schedule: sparsity must be a number in \[0, 1\], got "
        r"array\(1\.5\)",
        id="pruner-numpy-array-1.5",
    ),
    pytest.param(
        lambda: prune.pruner(0.5, score="magnitude"),
        TypeError,
        r"prune\.pruner: score must be a callable params -> scores, got 'magnitude'",
        id="pruner-score-str",
    ),
    pytest.param(
        lambda: prune.pruner(0.5, where=1.0),
        TypeError,
        r"prune\.pruner: where must be None, a regex string or a predicate.*got float 1\.0",
        id="pruner-where-float",
    ),
    pytest.param(
        lambda: pruner_update(prune.pruner(lambda t: 1.5), P()),
        ValueError,
        r"prune\.pruner: the schedule gave sparsity 1\.5 at step 0; it must be in \[0, 1\]",
        id="pruner-eager-schedule-out-of-range",
    ),
    pytest.param(
        lambda: pruner_update(
            prune.pruner(lambda t: jnp.where(t >= 1, jnp.nan, 0.5).astype(jnp.float32)), P(), 2
        ),
        ValueError,
        r"prune\.pruner: the schedule gave sparsity nan at step 1",
        id="pruner-eager-schedule-nan-after-step-0",
    ),
    pytest.param(
        lambda: pruner_update(prune.pruner(lambda t: jnp.ones(2)), P()),
        TypeError,
        r"prune\.pruner: the scheduled sparsity must be a scalar, got an array of shape \(2,\)",
        id="pruner-schedule-vector",
    ),
    pytest.param(
        lambda: prune.pruner(0.5, structure=NM(2, 4)).init(nnx_list_state()),
        ValueError,
        r"prune\.pruner: NM\(2, 4\) needs axis -2 of '0/kernel'",
        id="pruner-NM-nnx-list-state",
    ),
    pytest.param(
        lambda: prune.pruner(0.5).update(P(), prune.pruner(0.5).init(P())),
        ValueError,
        r"prune\.pruner: params are required",
        id="pruner-no-params",
    ),
    pytest.param(
        lambda: prune.pruner(0.5).update(P(), (), P()),
        TypeError,
        r"prune\.pruner: state must be the PrunerState from init, got \(\)",
        id="pruner-wrong-state",
    ),
    # --- prune scores -------------------------------------------------------------------------
    pytest.param(
        lambda: prune.saliency(P(), {"layer": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(4)}}),
        ValueError,
        r"prune\.saliency: grads for 'layer/kernel' must have shape \(8, 4\), got \(2, 2\)",
        id="saliency-shape-mismatch",
    ),
    pytest.param(
        lambda: prune.saliency(P(), {"layer": {"kernel": jnp.ones((8, 4))}}),
        ValueError,
        r"prune\.saliency: tree structures differ",
        id="saliency-tree-mismatch",
    ),
    pytest.param(
        lambda: prune.random(P(), jax.random.key(0)),
        TypeError,
        r"prune\.random: key must be a PRNG key .*random\(key, params\)",
        id="random-arguments-swapped",
    ),
    # --- sparsity schedules -------------------------------------------------------------------
    pytest.param(
        lambda: prune.polynomial_schedule(np.array(1.5), 0, 10),
        ValueError,
        r"prune\.polynomial_schedule: final sparsity must be a number in \[0, 1\], got "
        r"array\(1\.5\)",
        id="polynomial_schedule-numpy-final",
    ),
    pytest.param(
        lambda: prune.polynomial_schedule(0.5, 0, 10, initial=NAN),
        ValueError,
        r"prune\.polynomial_schedule: initial sparsity must be a number in \[0, 1\], got nan",
        id="polynomial_schedule-nan-initial",
    ),
    pytest.param(
        lambda: prune.polynomial_schedule(0.5, 0.0, 10),
        TypeError,
        r"prune\.polynomial_schedule: begin_step must be an int, got 0\.0",
        id="polynomial_schedule-float-step",
    ),
    pytest.param(
        lambda: prune.polynomial_schedule(0.5, 0, 10, power=NAN),
        ValueError,
        r"prune\.polynomial_schedule: power must be finite and > 0, got nan",
        id="polynomial_schedule-nan-power",
    ),
    pytest.param(
        lambda: prune.constant_schedule(None),
        TypeError,
        r"prune\.constant_schedule: sparsity must be a real number, got None",
        id="constant_schedule-None",
    ),
    pytest.param(
        lambda: prune.one_shot_schedule(0.5, 2.5),
        TypeError,
        r"prune\.one_shot_schedule: at_step must be an int, got 2\.5",
        id="one_shot_schedule-float-step",
    ),
    pytest.param(
        lambda: prune.one_shot_schedule(jnp.array(-0.5), 3),
        ValueError,
        r"prune\.one_shot_schedule: sparsity must be a number in \[0, 1\], got Array\(-0\.5",
        id="one_shot_schedule-jax-array-negative",
    ),
    # --- structures ---------------------------------------------------------------------------
    pytest.param(lambda: NM(2.0, 4), TypeError, r"NM: n and m must be ints, got n=2\.0", id="NM-n"),
    pytest.param(lambda: NM(5, 4), ValueError, r"NM: need integers 0 <= n <= m, got n=5", id="NM>"),
    pytest.param(lambda: NM(2, 4, axis="in"), TypeError, r"NM: axis must be an int", id="NM-axis"),
    pytest.param(
        lambda: Channels(axis=1.0),
        TypeError,
        r"Channels: axis must be an int, got 1\.0",
        id="Ch-ax",
    ),
    pytest.param(lambda: Channels(ord=0), ValueError, r"Channels: ord must be .*got 0", id="Ch-0"),
    pytest.param(lambda: Channels(ord="2"), TypeError, r"Channels: ord must be .*'2'", id="Ch-str"),
    pytest.param(lambda: Blocks(4), TypeError, r"Blocks: shape must be a tuple of ints", id="Bl-4"),
    pytest.param(lambda: Blocks(()), ValueError, r"Blocks: shape must be positive", id="Bl-empty"),
    pytest.param(
        lambda: structures.nm_mask(jnp.ones((4, 2)), Channels()),
        TypeError,
        r"structures\.nm_mask: structure must be NM\(n, m\), got Channels",
        id="nm_mask-wrong-structure",
    ),
    pytest.param(
        lambda: structures.nm_mask(jnp.ones((6, 2)), NM(2, 4)),
        ValueError,
        r"structures\.nm_mask: NM\(2, 4\) needs axis -2 of 'scores'",
        id="nm_mask-not-divisible",
    ),
    pytest.param(
        lambda: structures.norm(jnp.ones(3), 0, -1),
        ValueError,
        r"structures\.norm: ord must be a positive number or math\.inf, got -1",
        id="norm-negative-ord",
    ),
    # --- regularize ---------------------------------------------------------------------------
    pytest.param(
        lambda: regularize.add_l1(np.array(-1.0)),
        ValueError,
        r"regularize\.add_l1: strength must be finite and >= 0, got array\(-1\.\)",
        id="add_l1-numpy-negative",
    ),
    pytest.param(
        lambda: regularize.add_l2(jnp.array(INF)),
        ValueError,
        r"regularize\.add_l2: strength must be finite and >= 0, got Array\(inf",
        id="add_l2-jax-inf",
    ),
    pytest.param(
        lambda: regularize.add_l1(True),
        TypeError,
        r"regularize\.add_l1: strength must be a float or an optax schedule, got True",
        id="add_l1-bool",
    ),
    pytest.param(
        lambda: regularize.add_l1(lambda t: jnp.ones(3)),
        TypeError,
        r"regularize\.add_l1: strength must be a scalar, got an array of shape \(3,\)",
        id="add_l1-schedule-vector",
    ),
    pytest.param(
        lambda: regularize.prox_l1(0.1, -0.5),
        ValueError,
        r"regularize\.prox_l1: learning_rate must be finite and >= 0, got -0\.5",
        id="prox_l1-negative-lr",
    ),
    pytest.param(
        lambda: reg_update(
            regularize.prox_l1(0.1, lambda t: jnp.where(t >= 1, jnp.nan, 0.1)), P(), steps=2
        ),
        ValueError,
        r"regularize\.prox_l1: learning_rate must be finite and >= 0, got nan from the schedule "
        r"at step 1",
        id="prox_l1-eager-lr-schedule-nan-after-step-0",
    ),
    pytest.param(
        lambda: reg_update(regularize.add_l1(lambda t: jnp.where(t >= 1, -1.0, 0.1)), P(), steps=2),
        ValueError,
        r"regularize\.add_l1: strength must be finite and >= 0, got -1\.0 from the schedule at "
        r"step 1",
        id="add_l1-eager-strength-schedule-negative-after-step-0",
    ),
    pytest.param(
        lambda: regularize.prox_elastic_net(0.1, NAN, 0.1),
        ValueError,
        r"regularize\.prox_elastic_net: l2 must be finite and >= 0, got nan",
        id="prox_elastic_net-nan-l2",
    ),
    pytest.param(
        lambda: regularize.prox_group_lasso(0.1, 0.1, structure="channels"),
        TypeError,
        r"regularize\.prox_group_lasso: structure must be Unstructured\(\), Channels.*'channels'",
        id="prox_group_lasso-structure-str",
    ),
    pytest.param(
        lambda: regularize.prox_group_lasso(0.1, 0.1, structure=NM(2, 4)),
        TypeError,
        r"regularize\.prox_group_lasso: structure must be .*got NM\(n=2, m=4",
        id="prox_group_lasso-NM",
    ),
    pytest.param(
        lambda: regularize.prox_group_lasso(0.1, 0.1, structure=Channels(), groups=Channels()),
        TypeError,
        r"unexpected keyword argument 'groups'",
        id="prox_group_lasso-groups-is-gone",
    ),
    pytest.param(
        lambda: regularize.prox_group_lasso(0.1, 0.1, structure=Channels(ord=1)),
        ValueError,
        r"regularize\.prox_group_lasso: group lasso uses 2-norms of groups; got ord=1",
        id="prox_group_lasso-ord-1",
    ),
    pytest.param(
        lambda: regularize.prox_group_lasso(0.1, 0.1, structure=Blocks((4, 4))).init(
            nnx_list_state()
        ),
        ValueError,
        r"regularize\.prox_group_lasso: Blocks\(4, 4\) does not tile '0/kernel' of shape \(6, 4\)",
        id="prox_group_lasso-nnx-list-state-blocks",
    ),
    pytest.param(
        lambda: regularize.prox_l1(0.1, 0.1, where=["kernel"]),
        TypeError,
        r"regularize\.prox_l1: where must be None, a regex string or a predicate.*\['kernel'\]",
        id="prox_l1-where-list",
    ),
    pytest.param(
        lambda: regularize.prox_l1(0.1, 0.1).update(P(), (), P()),
        TypeError,
        r"regularize\.prox_l1: state must be the RegularizerState from init, got \(\)",
        id="prox_l1-wrong-state",
    ),
    pytest.param(
        lambda: regularize.prox_l1(0.1, 0.1).update(
            {"layer": {"kernel": jnp.ones((8, 4))}}, regularize.RegularizerState(jnp.int32(0)), P()
        ),
        ValueError,
        r"regularize\.prox_l1: tree structures differ",
        id="prox_l1-updates-tree-mismatch",
    ),
    pytest.param(
        lambda: regularize.l1_penalty(P(), where="("),
        ValueError,
        r"regularize\.l1_penalty: where='\(' is not a valid regular expression",
        id="l1_penalty-bad-regex",
    ),
    pytest.param(
        lambda: regularize.l2_penalty(P(), where="nothing"),
        ValueError,
        r"regularize\.l2_penalty: where='nothing' selects no floating-point array leaf",
        id="l2_penalty-selects-nothing",
    ),
    pytest.param(
        lambda: regularize.group_lasso_penalty(P(), structure=Blocks((3, 3))),
        ValueError,
        r"regularize\.group_lasso_penalty: Blocks\(3, 3\) does not tile 'layer/kernel'",
        id="group_lasso_penalty-blocks",
    ),
    pytest.param(
        lambda: regularize.group_lasso_penalty(P(), structure=Unstructured),
        TypeError,
        r"regularize\.group_lasso_penalty: structure must be .*a class: write Unstructured\(\)",
        id="group_lasso_penalty-class",
    ),
    # --- schedules ----------------------------------------------------------------------------
    pytest.param(
        lambda: schedules.step_decay(np.array(-0.1), 10),
        ValueError,
        r"schedules\.step_decay: init must be finite and >= 0, got -0\.1",
        id="step_decay-numpy-negative",
    ),
    pytest.param(
        lambda: schedules.step_decay(0.1, np.int64(0)),
        ValueError,
        r"schedules\.step_decay: total_steps must be > 0, got 0",
        id="step_decay-numpy-int-zero",
    ),
    pytest.param(
        lambda: schedules.step_decay(0.1, 10, "2"),
        TypeError,
        r"schedules\.step_decay: power must be a real number, got '2'",
        id="step_decay-power-str",
    ),
    pytest.param(
        lambda: schedules.exponential_decay(NAN, 0.5),
        ValueError,
        r"schedules\.exponential_decay: init must be finite and >= 0, got nan",
        id="exponential_decay-nan",
    ),
    pytest.param(
        lambda: schedules.exponential_decay(0.1, True),
        TypeError,
        r"schedules\.exponential_decay: rate must be a real number, got the bool True",
        id="exponential_decay-bool",
    ),
    # --- distill.kd_loss ----------------------------------------------------------------------
    pytest.param(
        lambda: distill.kd_loss(LOGITS, LOGITS, temperature=np.array(0.0)),
        ValueError,
        r"distill\.kd_loss: temperature must be finite and > 0, got array\(0\.\)",
        id="kd_loss-numpy-temperature-0",
    ),
    pytest.param(
        lambda: distill.kd_loss(LOGITS, LOGITS, temperature=INF),
        ValueError,
        r"distill\.kd_loss: temperature must be finite and > 0, got inf",
        id="kd_loss-temperature-inf",
    ),
    pytest.param(
        lambda: distill.kd_loss(LOGITS, LOGITS, temperature="4"),
        TypeError,
        r"distill\.kd_loss: temperature must be a real number, got '4'",
        id="kd_loss-temperature-str",
    ),
    pytest.param(
        lambda: jax.jit(lambda T: distill.kd_loss(LOGITS, LOGITS, temperature=T))(jnp.ones(2)),
        TypeError,
        r"distill\.kd_loss: temperature must be a scalar, got an array of shape \(2,\)",
        id="kd_loss-traced-temperature-vector",
    ),
    pytest.param(
        lambda: distill.kd_loss(LOGITS, LOGITS, soft_weight=NAN),
        ValueError,
        r"distill\.kd_loss: soft_weight must be finite and >= 0, got nan",
        id="kd_loss-nan-soft-weight",
    ),
    pytest.param(
        lambda: distill.kd_loss(LOGITS, LOGITS, jnp.array([0, 5]), hard_weight=1.0),
        ValueError,
        r"distill\.kd_loss: labels must be class ids in \[0, 5\), got 5 at index \(1,\)",
        id="kd_loss-label-equals-num-classes",
    ),
    pytest.param(
        lambda: distill.kd_loss(LOGITS, LOGITS, np.array([-1, 0]), hard_weight=1.0),
        ValueError,
        r"distill\.kd_loss: labels must be class ids in \[0, 5\), got -1 at index \(0,\)",
        id="kd_loss-label-negative",
    ),
    pytest.param(
        lambda: distill.kd_loss(LOGITS, LOGITS, np.array([0.0, 1.0]), hard_weight=1.0),
        TypeError,
        r"distill\.kd_loss: labels of shape \(2,\) must be integer class ids, got dtype float",
        id="kd_loss-float-labels",
    ),
    pytest.param(
        lambda: jax.jit(lambda y: distill.kd_loss(LOGITS, LOGITS, y, hard_weight=1.0))(
            jnp.array([True, False])
        ),
        TypeError,
        r"distill\.kd_loss: labels of shape \(2,\) must be integer class ids, got dtype bool",
        id="kd_loss-traced-bool-labels",
    ),
    pytest.param(
        lambda: distill.kd_loss(LOGITS, LOGITS, jnp.array([0, 1, 2]), hard_weight=1.0),
        ValueError,
        r"distill\.kd_loss: labels must be integer ids of shape \(2,\) or probabilities",
        id="kd_loss-labels-shape",
    ),
    pytest.param(
        lambda: distill.kd_loss(LOGITS, LOGITS, hard_weight=0.5),
        ValueError,
        r"distill\.kd_loss: labels are required when hard_weight=0\.5",
        id="kd_loss-missing-labels",
    ),
    pytest.param(
        lambda: distill.kd_loss(jnp.zeros((2, 5), jnp.int32), LOGITS),
        TypeError,
        r"distill\.kd_loss: student_logits must be floating-point, got dtype int32",
        id="kd_loss-int-logits",
    ),
    pytest.param(
        lambda: distill.kd_loss(LOGITS, "teacher"),
        TypeError,
        r"distill\.kd_loss: teacher_logits must be",
        id="kd_loss-str-logits",
    ),
    pytest.param(
        lambda: distill.kd_loss(jnp.zeros((2, 0)), jnp.zeros((2, 0))),
        ValueError,
        r"distill\.kd_loss: logits need a class axis with >= 1 class, got shape \(2, 0\)",
        id="kd_loss-zero-classes",
    ),
    pytest.param(
        lambda: distill.kd_loss(LOGITS, LOGITS[:, :4]),
        ValueError,
        r"distill\.kd_loss: student_logits \(2, 5\) and teacher_logits \(2, 4\)",
        id="kd_loss-shape-mismatch",
    ),
    # --- distill.hint_loss / attention_transfer_loss / distill_step ---------------------------
    pytest.param(
        lambda: distill.hint_loss(FEATS, FEATS, regressor="linear"),
        TypeError,
        r"distill\.hint_loss: regressor must be a callable or None, got 'linear'",
        id="hint_loss-regressor-str",
    ),
    pytest.param(
        lambda: distill.hint_loss(FEATS, FEATS[..., :2]),
        ValueError,
        r"distill\.hint_loss: student_features \(2, 3, 3, 4\) and teacher_features \(2, 3, 3, 2\)",
        id="hint_loss-shape-mismatch",
    ),
    pytest.param(
        lambda: distill.hint_loss(jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3))),
        TypeError,
        r"distill\.hint_loss: student_features must be floating-point, got dtype int32",
        id="hint_loss-int-features",
    ),
    pytest.param(
        lambda: distill.attention_transfer_loss(FEATS, FEATS, p=np.array(-2.0)),
        ValueError,
        r"distill\.attention_transfer_loss: p must be finite and > 0, got array\(-2\.\)",
        id="attention_transfer-numpy-negative-p",
    ),
    pytest.param(
        lambda: distill.attention_transfer_loss(FEATS, FEATS, channel_axis=0),
        ValueError,
        r"distill\.attention_transfer_loss: .*channel_axis=0 \(which must not be the batch",
        id="attention_transfer-channel-axis-batch",
    ),
    pytest.param(
        lambda: distill.attention_transfer_loss(FEATS, FEATS, channel_axis=4),
        ValueError,
        r"distill\.attention_transfer_loss: channel_axis=4 is out of range for ndim 4",
        id="attention_transfer-channel-axis-out-of-range",
    ),
    pytest.param(
        lambda: distill.attention_transfer_loss(FEATS, FEATS, channel_axis=1.0),
        TypeError,
        r"distill\.attention_transfer_loss: channel_axis must be an int, got 1\.0",
        id="attention_transfer-channel-axis-float",
    ),
    pytest.param(
        lambda: distill.attention_transfer_loss(FEATS[..., :0], FEATS),
        ValueError,
        r"distill\.attention_transfer_loss: features need >= 1 channel",
        id="attention_transfer-zero-channels",
    ),
    pytest.param(
        lambda: _distill_step(temperature=0.0),
        ValueError,
        r"flax\.distill\.distill_step: temperature must be finite and > 0, got 0\.0",
        id="distill_step-temperature-0",
    ),
    pytest.param(
        lambda: _distill_step(hard_weight=1.0),
        ValueError,
        r"flax\.distill\.distill_step: labels are required when hard_weight=1\.0",
        id="distill_step-missing-labels",
    ),
    pytest.param(
        lambda: _distill_step(teacher="teacher"),
        TypeError,
        r"flax\.distill\.distill_step: teacher must be an NNX model, a callable .* got str",
        id="distill_step-teacher-str",
    ),
    # --- issue 12: erk / uniform, per-leaf sparsity trees, sparse training ---------------------
    pytest.param(
        lambda: prune.erk(P(), 1.5),
        ValueError,
        r"prune\.erk: sparsity must be a number in \[0, 1\], got 1\.5",
        id="erk-sparsity-1.5",
    ),
    pytest.param(
        lambda: prune.erk(P(), 0.5, where="conv"),
        ValueError,
        r"prune\.erk: where='conv' selects no",
        id="erk-where-selects-nothing",
    ),
    pytest.param(
        lambda: prune.uniform(P(), NAN),
        ValueError,
        r"prune\.uniform: sparsity must be a number in \[0, 1\], got nan",
        id="uniform-nan",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), {"layer": {"kernel": 1.5, "bias": None}}),
        ValueError,
        r"prune\.topk_mask: sparsity must be in \[0, 1\], got 1\.5 for 'layer/kernel'",
        id="topk_mask-per-leaf-1.5",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), {"other": 0.5}),
        ValueError,
        r"prune\.topk_mask: the per-leaf sparsity tree has no value for 'layer/kernel'",
        id="topk_mask-per-leaf-missing-path",
    ),
    pytest.param(
        lambda: prune.topk_mask(P(), {"layer": {"kernel": 0.5}}, scope="global"),
        ValueError,
        r"prune\.topk_mask: a per-leaf sparsity tree needs scope='layer', got 'global'",
        id="topk_mask-per-leaf-global",
    ),
    pytest.param(
        lambda: prune.pruner({"layer": {"kernel": -0.5}}),
        ValueError,
        r"prune\.pruner: sparsity must be in \[0, 1\], got -0\.5 for 'layer/kernel'",
        id="pruner-per-leaf-negative",
    ),
    pytest.param(
        lambda: prune.rigl(1.5, update_every=10, end_step=100),
        ValueError,
        r"prune\.rigl: sparsity must be a number in \[0, 1\], got 1\.5",
        id="rigl-sparsity-1.5",
    ),
    pytest.param(
        lambda: prune.rigl(0.9, update_every=0, end_step=100),
        ValueError,
        r"prune\.rigl: update_every must be an int >= 1, got 0",
        id="rigl-update-every-0",
    ),
    pytest.param(
        lambda: prune.rigl(0.9, update_every=10, end_step=100, drop_fraction=NAN),
        ValueError,
        r"prune\.rigl: drop_fraction must be a number in \[0, 1\], got nan",
        id="rigl-drop-fraction-nan",
    ),
    pytest.param(
        lambda: prune.rigl(0.9, update_every=10, end_step=100, distribution="er"),
        ValueError,
        r"prune\.rigl: distribution must be 'uniform' or 'erk', got 'er'",
        id="rigl-distribution",
    ),
    pytest.param(
        lambda: prune.rigl(0.9, update_every=10, end_step=100, key=0),
        TypeError,
        r"prune\.rigl: key must be a PRNG key",
        id="rigl-key-int",
    ),
    pytest.param(
        lambda: prune.rigl(0.9, update_every=1, end_step=9, optimizer=optax.sgd),
        TypeError,
        r"prune\.rigl: optimizer must be an optax\.GradientTransformation",
        id="rigl-optimizer-not-instantiated",
    ),
    pytest.param(
        lambda: prune.rigl(0.5, update_every=1, end_step=9).init({"w": jnp.ones(3)}),
        ValueError,
        r"prune\.(rigl|uniform): where=None selects no",
        id="rigl-selects-nothing",
    ),
    pytest.param(
        lambda: prune.rigl(0.5, update_every=1, end_step=9).update(P(), None),
        ValueError,
        r"prune\.rigl: params are required",
        id="rigl-no-params",
    ),
    pytest.param(
        lambda: prune.set_sparse(0.5, update_every=1, end_step=-1),
        ValueError,
        r"prune\.set_sparse: end_step must be an int >= 1, got -1",
        id="set-end-step-negative",
    ),
    pytest.param(
        lambda: prune.static_sparse("0.9"),
        TypeError,
        r"prune\.static_sparse: sparsity must be a real number, got '0\.9'",
        id="static-sparse-str",
    ),
    pytest.param(
        lambda: prune.sr_ste(0.5, decay=-1.0),
        ValueError,
        r"prune\.sr_ste: decay must be a finite number >= 0, got -1\.0",
        id="sr-ste-negative-decay",
    ),
    pytest.param(
        lambda: prune.ste(0.5, structure=NM(2, 3)).init(P()),
        ValueError,
        r"prune\.ste: NM.*'layer/kernel'",
        id="ste-nm-does-not-divide",
    ),
    pytest.param(
        lambda: prune.straight_through(P(), 2.0),
        ValueError,
        r"prune\.straight_through: sparsity must be in \[0, 1\], got 2\.0 for",
        id="straight-through-sparsity-2",
    ),
]


@pytest.mark.parametrize("call,exc,match", ROWS)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
