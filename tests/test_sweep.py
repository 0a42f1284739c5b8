"""The architecture sweep: vmapped variants train exactly like a loop; depth moves are exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim.demo import sweep


def _data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 40)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return x, y, x[:16], y[:16]


@pytest.mark.standard_promotion  # optax 0.2.8's Adam bias correction mixes int and float
def test_vmapped_sweep_equals_a_python_loop_over_variants():
    data = _data()
    acts, seeds = ["gelu"], [0, 3]
    kw = dict(steps=4, width=8, batch_size=16)
    params, idx = sweep.train_sweep(data, acts, 2, seeds, **kw)
    assert idx.tolist() == [3, 3]  # activation-major, indices into ACTIVATIONS
    assert params["layers"][0]["kernel"].shape == (2, 40, 8)
    for v, (a, s) in enumerate([(a, s) for a in acts for s in seeds]):
        ref = sweep.train_loop(data, a, 2, s, **kw)
        got = jax.tree.map(lambda p: p[v], params)
        jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6), got, ref)


@pytest.mark.parametrize("jit", [False, True])
def test_apply_switches_to_the_named_activation(jit):
    params = sweep.init_mlp(jax.random.key(0), 1, 4)
    x = jnp.asarray(_data()[0][:3])
    f = jax.jit(sweep.apply_mlp) if jit else sweep.apply_mlp
    for i, fn in enumerate(sweep.ACTIVATIONS.values()):
        (layer,) = params["layers"]
        h = fn(x @ layer["kernel"] + layer["bias"][None])
        ref = h @ params["head"]["kernel"] + params["head"]["bias"][None]
        np.testing.assert_allclose(f(params, x, jnp.int32(i)), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.standard_promotion
def test_grow_is_exact_for_relu_and_shrink_drops_a_hidden_layer():
    params, acts = sweep.train_sweep(_data(), ["relu"], 2, [0, 1], steps=3, width=8, batch_size=16)
    x = jnp.asarray(_data()[0])
    apply = jax.vmap(sweep.apply_mlp, in_axes=(0, None, 0))
    deeper = sweep.grow(params)
    assert len(deeper["layers"]) == 3 and deeper["layers"][2]["kernel"].shape == (2, 8, 8)
    np.testing.assert_array_equal(apply(deeper, x, acts), apply(params, x, acts))
    back = sweep.shrink(deeper)
    assert len(back["layers"]) == 2
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert sweep.count_params(sweep.shrink(params, 1)) == sweep.count_params(params) - 2 * 72
    with pytest.raises(ValueError, match="sweep.shrink: the first layer"):
        sweep.shrink(params, 0)
