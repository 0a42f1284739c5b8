"""prune on params sharded over 8 simulated CPU devices: same masks, shardings kept."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxslim import prune
from jaxslim.structures import Channels


@pytest.fixture(scope="module", params=["explicit", "auto"])
def mesh(request):
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 host devices"
    kind = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[request.param]
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))


def _params():
    rng = np.random.default_rng(0)
    return {
        "a": {
            "kernel": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(32), jnp.float32),
        },
        "b": {"kernel": jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)},
    }


def _shard(params, mesh):
    specs = {
        "a": {"kernel": P("data", "model"), "bias": P("model")},
        "b": {"kernel": P("model", None)},
    }
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("structure", [prune.Unstructured(), Channels()])
def test_sharded_masks_equal_single_device(mesh, scope, structure):
    params = _params()
    sharded = _shard(params, mesh)
    f = jax.jit(
        lambda p, s: prune.topk_mask(prune.magnitude(p), s, structure=structure, scope=scope)
    )
    ref = f(params, 0.7)
    got = f(sharded, 0.7)
    for name in ("a", "b"):
        np.testing.assert_array_equal(
            np.asarray(got[name]["kernel"]), np.asarray(ref[name]["kernel"])
        )
        if mesh.axis_types[0] == AxisType.Explicit:  # the sharding is part of the mask's type
            assert got[name]["kernel"].sharding.is_equivalent_to(
                sharded[name]["kernel"].sharding, 2
            )
    masked = jax.jit(prune.apply_mask)(sharded, got)
    for name in ("a", "b"):
        assert masked[name]["kernel"].sharding.is_equivalent_to(sharded[name]["kernel"].sharding, 2)
    assert masked["a"]["bias"].sharding.is_equivalent_to(sharded["a"]["bias"].sharding, 1)


def test_sharded_pruner_step_keeps_shardings(mesh):
    params = _shard(_params(), mesh)
    tx = optax.chain(optax.sgd(0.1), prune.pruner(0.5, scope="global"))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
        return optax.apply_updates(params, updates), state

    new, state = step(params, state)
    for name in ("a", "b"):
        assert new[name]["kernel"].sharding.is_equivalent_to(params[name]["kernel"].sharding, 2)
    zeros = sum(int((np.asarray(new[n]["kernel"]) == 0).sum()) for n in ("a", "b"))
    assert zeros == round(0.5 * (64 * 32 + 32 * 16))
