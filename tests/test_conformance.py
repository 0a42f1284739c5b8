"""One conformance table: every public tree function and transform, run the same way.

Each row is checked for: jit == eager, no retrace on a second call with new values, dtype
preservation for float32 and bfloat16 parameters, and pass-through of leaves it must not touch
(ints, PRNG keys, ``None``, size-0 arrays). A new algorithm is one new row.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxslim
from jaxslim import QuantSpec, _tree, prune, quant, regularize, schedules


def params(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.standard_normal((8, 12)), dtype),
            "bias": jnp.asarray(rng.standard_normal(12), dtype),
        },
        "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 4, 8)), dtype)},
        "count": jnp.array(3, jnp.int32),
        "key": jax.random.key(7),
        "empty": jnp.zeros((0, 4), dtype),
        "nothing": None,
    }


# Tree functions: name -> f(params) returning a tree of params' structure.
TREE_FUNCTIONS = {
    "prune.magnitude": prune.magnitude,
    "prune.random": functools.partial(prune.random, jax.random.key(0)),
    "prune.saliency": lambda p: prune.saliency(p, p),
    "prune.topk_mask": lambda p: prune.topk_mask(prune.magnitude(p), 0.5),
    "prune.topk_mask(global, Channels)": lambda p: prune.topk_mask(
        prune.magnitude(p), 0.5, structure=prune.Channels(), scope="global"
    ),
    "prune.apply_mask": lambda p: prune.apply_mask(p, prune.topk_mask(prune.magnitude(p), 0.5)),
    "prune.straight_through": lambda p: prune.straight_through(p, 0.5),
    "prune.topk_mask(NM, kernel_like)": lambda p: prune.topk_mask(
        prune.magnitude(p), 0.5, structure=prune.NM(2, 4), where=jaxslim.structures.kernel_like
    ),
    "prune.topk_mask(Blocks, numpy sparsity)": lambda p: prune.topk_mask(
        prune.magnitude(p), np.array(0.25), structure=prune.Blocks((2, 4))
    ),
    "quant.quantize_params(int8 per-channel) -> dequantize_params": lambda p: (
        quant.dequantize_params(quant.quantize_params(p, [(None, QuantSpec(8, axis=-1))])[0])
    ),
    "quant.quantize_params(int4 group 4, mixed) -> dequantize_params": lambda p: (
        quant.dequantize_params(
            quant.quantize_params(p, [("conv", None), (None, QuantSpec(4, axis=-1, group_size=4))])[
                0
            ]
        )
    ),
    "quant.quantize_params(nf4 group 4, double-quantized scales) -> dequantize_params": lambda p: (
        quant.dequantize_params(
            quant.quantize_params(p, QuantSpec(fmt="nf4", axis=-1, group_size=4))[0]
        )
    ),
    "quant.quantize_params(e4m3 per-channel) -> dequantize_params": lambda p: (
        quant.dequantize_params(quant.quantize_params(p, QuantSpec(fmt="e4m3", axis=-1))[0])
    ),
}

# Transforms last in a chain: name -> (params -> GradientTransformation).
TRANSFORMS = {
    "prune.pruner": lambda p: prune.pruner(prune.polynomial_schedule(0.5, 0, 4)),
    "prune.pruner(NM)": lambda p: prune.pruner(0.5, structure=prune.NM(2, 4)),
    "prune.keep_mask": lambda p: prune.keep_mask(prune.topk_mask(prune.magnitude(p), 0.5)),
    "regularize.add_l1": lambda p: regularize.add_l1(1e-2),
    "regularize.add_l2": lambda p: regularize.add_l2(1e-2),
    "regularize.prox_l1": lambda p: regularize.prox_l1(0.5, 0.1),
    "regularize.prox_elastic_net": lambda p: regularize.prox_elastic_net(0.5, 0.1, 0.1),
    "regularize.prox_group_lasso": lambda p: regularize.prox_group_lasso(
        0.5, schedules.exponential_decay(0.1, 0.9)
    ),
    "prune.pruner(Channels, global)": lambda p: prune.pruner(
        prune.polynomial_schedule(0.5, 0, 4), structure=prune.Channels(), scope="global"
    ),
    # Sparse training. update_every=1: the second step of test_transform is a drop/grow step.
    "prune.rigl": lambda p: prune.rigl(0.5, update_every=1, end_step=4),
    "prune.rigl(erk)": lambda p: prune.rigl(0.5, update_every=1, end_step=4, distribution="erk"),
    "prune.set_sparse": lambda p: prune.set_sparse(0.5, update_every=1, end_step=4),
    "prune.static_sparse": lambda p: prune.static_sparse(0.5),
    # ste/sr_ste go first in a chain in use; the contract checked here holds in any position.
    "prune.ste": lambda p: prune.ste(0.5),
    "prune.sr_ste(NM)": lambda p: prune.sr_ste(0.5, structure=prune.NM(2, 4)),
}

# Scalar loss terms: name -> f(params) -> scalar.
PENALTIES = {
    "regularize.l1_penalty": regularize.l1_penalty,
    "regularize.l2_penalty": regularize.l2_penalty,
    "regularize.group_lasso_penalty": regularize.group_lasso_penalty,
}


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(
            np.asarray(x, np.float32) if x.dtype == jnp.bfloat16 else np.asarray(x),
            np.asarray(y, np.float32) if y.dtype == jnp.bfloat16 else np.asarray(y),
        )


@pytest.mark.parametrize("name", sorted(TREE_FUNCTIONS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_tree_function(name, dtype):
    f = TREE_FUNCTIONS[name]
    p = params(dtype)
    eager = f(p)
    traces = []
    jitted = jax.jit(lambda p: (traces.append(1), f(p))[1])
    _leaves_equal(jitted(p), eager)
    jitted(params(dtype, seed=1))  # new values, same shapes: no retrace
    assert len(traces) == 1
    _tree.check_same_structure(p, eager)  # params' structure, None allowed
    assert eager["count"] is None or eager["count"] == 3
    if name == "prune.apply_mask":
        assert eager["dense"]["kernel"].dtype == dtype and eager["count"] == 3
        assert eager["empty"].shape == (0, 4) and eager["nothing"] is None


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_transform(name, dtype):
    p = params(dtype)
    p.pop("count"), p.pop("key")  # optimizers upstream of us don't take ints or keys
    tx = optax.chain(optax.sgd(0.1), TRANSFORMS[name](p))
    state = tx.init(p)

    traces = []

    @jax.jit
    def step(p, state, g):
        traces.append(1)
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state

    def eager_step(p, state, g):
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state

    g = jax.tree.map(jnp.ones_like, p)
    out_j, s_j = step(p, state, g)
    out_e, s_e = eager_step(p, state, g)
    _leaves_equal(out_j, out_e)
    _leaves_equal(s_j, s_e)
    out2, _ = step(out_j, s_j, g)  # second call: no retrace
    assert len(traces) == 1
    for a, b in zip(jax.tree.leaves(out2), jax.tree.leaves(p), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
    assert out2["nothing"] is None and out2["empty"].shape == (0, 4)


@pytest.mark.parametrize("name", sorted(PENALTIES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_penalty(name, dtype):
    f = PENALTIES[name]
    p = params(dtype)
    traces = []
    jitted = jax.jit(lambda p: (traces.append(1), f(p))[1])
    np.testing.assert_allclose(np.float32(jitted(p)), np.float32(f(p)), rtol=1e-6)
    jitted(params(dtype, seed=1))
    assert len(traces) == 1
    g = jax.grad(lambda k: f({**p, "dense": {**p["dense"], "kernel": k}}))(
        jnp.zeros_like(p["dense"]["kernel"])
    )
    assert np.isfinite(np.asarray(g, np.float32)).all()  # finite gradient at zero


def _public_names():
    for mod_name in [
        "jaxslim",
        "jaxslim.prune",
        "jaxslim.structures",
        "jaxslim.report",
        "jaxslim.quant",
        "jaxslim.splice",
        "jaxslim.flax.quant",
        "jaxslim.flax.splice",
        "jaxslim.regularize",
        "jaxslim.schedules",
        "jaxslim.distill",
        "jaxslim.flax.distill",
    ]:
        mod = importlib.import_module(mod_name)
        for name in mod.__all__:
            yield mod_name, name, getattr(mod, name)


@pytest.mark.parametrize(
    "mod_name,name,obj", list(_public_names()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_public_name_has_a_docstring(mod_name, name, obj):
    if inspect.ismodule(obj):
        assert obj.__doc__, f"{mod_name}.{name}"
        return
    doc = inspect.getdoc(obj)
    assert doc and len(doc.strip()) > 10, f"{mod_name}.{name} has no docstring"


def test_version():
    assert jaxslim.__version__.count(".") == 2
