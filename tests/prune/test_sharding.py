"""prune on params sharded over 8 simulated CPU devices: same masks, shardings kept."""

import re

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


def _collective_sizes(compiled_text: str, op: str) -> list[int]:
    """Element counts of the results of every ``op`` (e.g. all-gather) in compiled HLO text."""
    sizes = []
    for m in re.finditer(rf"= \(?([^=]*?)\)? {op}\(", compiled_text):
        for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1)):
            sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])))
    return sizes


def test_sampled_global_selection_on_shards_is_exact_and_gathers_only_the_sample(mesh):
    from jaxslim.prune import _masks as masks
    from jaxslim.structures import float_keys

    sharded = _shard(_params(), mesh)
    leaves = [sharded["a"]["kernel"], sharded["b"]["kernel"]]
    f = jax.jit(lambda ws, k: masks.lowest_k([float_keys(jnp.abs(w)) for w in ws], k, sample=64))
    exact = jax.jit(
        lambda ws, k: masks.lowest_k([float_keys(jnp.abs(w)) for w in ws], k, exact=True)
    )
    for k in (0, 1, 1000, 1792, 2559, 2560):
        got, ref = f(leaves, k), exact(leaves, k)
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
        assert sum(int(np.asarray(g).sum()) for g in got) == k
    text = f.lower(leaves, 5).compile().as_text()
    smallest = min(leaf.size for leaf in leaves)  # 512
    for op in ("all-gather", "all-to-all"):
        assert all(s < smallest // 4 for s in _collective_sizes(text, op)), op  # the sample only
