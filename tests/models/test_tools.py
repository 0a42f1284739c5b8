"""The contract other parts rely on: jaxslim tools trace ``models.forward`` as any fn(params, x)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import calibrate, models, prune, quant, splice

CFG = models.Config(head_dim=8, attention_bias=True, o_bias=True)
PARAMS = models.init(
    jax.random.key(0),
    CFG,
    vocab=40,
    hidden=32,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate=48,
    scale=0.2,
)
X = jax.random.randint(jax.random.key(1), (2, 8), 0, 40, jnp.int32)


def fn(p, x):
    return models.forward(p, x, CFG)


def test_calibrate_finds_every_kernel():
    stats = calibrate.statistics(fn, PARAMS, [X])
    kernels = {
        f"layers/{i}/{k}" for i in range(2) for k in ("q", "k", "v", "o", "gate", "up", "down")
    }
    assert kernels | {"lm_head"} <= set(stats)


def test_quantized_forward_matches_dequantized():
    rules = [(r"layers/.*/(q|k|v|o|gate|up|down)$", quant.QuantSpec(8, axis=-1))]
    qp, _ = quant.quantize_params(PARAMS, rules)
    got = jax.jit(quant.quantized(fn))(qp, X)
    np.testing.assert_allclose(got, fn(quant.dequantize_params(qp), X), rtol=1e-4, atol=1e-4)


def test_prune_oneshot_runs():
    pruned, _ = prune.oneshot(fn, PARAMS, [X], 0.5, method="wanda", where=r"layers/.*/(gate|up)$")
    assert float(jnp.mean(pruned["layers"][0]["up"] == 0)) == 0.5
    assert fn(pruned, X).shape == (2, 8, 40)


def test_splice_finds_head_and_mlp_groups_and_removal_runs():
    groups = splice.trace(fn, PARAMS, X)
    removable = [g for g in groups if g.removable]
    assert removable
    cut, _ = splice.prune_channels(fn, PARAMS, X, sparsity=0.5, where=r"layers/.*/(gate|up|down)$")
    widths = [lp["gate"].shape[1] for lp in cut["layers"]]
    assert widths == [24, 24]
    assert CFG.to_hf(cut)["intermediate_size"] == 24
    assert fn(cut, X).shape == (2, 8, 40)
