"""The pruner inside real Flax loops: nnx.Optimizer and Linen TrainState, with no extra call."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state
from sklearn.datasets import load_digits

from jaxslim import prune

pytestmark = pytest.mark.standard_promotion


def _digits():
    x, y = load_digits(return_X_y=True)
    return jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y, jnp.int32)


SCHEDULE = dict(final=0.9, begin_step=10, end_step=110, frequency=10)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def _check_exact(kernels_and_biases):
    for kernel, bias in kernels_and_biases:
        k = np.asarray(kernel)
        assert (k == 0).sum() == round(0.9 * k.size)
        assert (np.asarray(bias) != 0).any()


def test_nnx_optimizer_loop():
    x, y = _digits()
    model = NnxMLP(nnx.Rngs(0))
    tx = optax.chain(optax.adam(1e-2), prune.pruner(prune.polynomial_schedule(**SCHEDULE)))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        grads = nnx.grad(loss)(model)
        opt.update(model, grads)

    for i in range(150):
        sl = slice((i * 64) % 1700, (i * 64) % 1700 + 64)
        step(model, opt, x[sl], y[sl])
    _check_exact(
        [(model.l1.kernel[...], model.l1.bias[...]), (model.l2.kernel[...], model.l2.bias[...])]
    )
    masks = prune.masks_of(opt.opt_state)
    np.testing.assert_array_equal(np.asarray(masks["l1"]["kernel"]), model.l1.kernel[...] != 0)
    before = np.asarray(model.l1.kernel[...]) == 0
    for _ in range(10):  # zeros survive more training
        step(model, opt, x[:64], y[:64])
    np.testing.assert_array_equal(np.asarray(model.l1.kernel[...]) == 0, before)
    acc = float(jnp.mean(jnp.argmax(model(x), -1) == y))
    assert acc > 0.7  # chance is 0.1; a 90 %-sparse 64-32-10 MLP after 150 steps


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))


def test_linen_train_state_loop():
    x, y = _digits()
    module = LinenMLP()
    params = module.init(jax.random.key(0), x[:1])["params"]
    tx = optax.chain(optax.adam(1e-2), prune.pruner(prune.polynomial_schedule(**SCHEDULE)))
    state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)

    @jax.jit
    def step(state, xb, yb):
        def loss(p):
            logits = state.apply_fn({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    for i in range(150):
        sl = slice((i * 64) % 1700, (i * 64) % 1700 + 64)
        state = step(state, x[sl], y[sl])
    p = state.params
    _check_exact(
        [
            (p["Dense_0"]["kernel"], p["Dense_0"]["bias"]),
            (p["Dense_1"]["kernel"], p["Dense_1"]["bias"]),
        ]
    )
    masks = prune.masks_of(state.opt_state)
    np.testing.assert_array_equal(
        np.asarray(masks["Dense_1"]["kernel"]), np.asarray(p["Dense_1"]["kernel"]) != 0
    )
    acc = float(jnp.mean(jnp.argmax(module.apply({"params": p}, x), -1) == y))
    assert acc > 0.7  # chance is 0.1; a 90 %-sparse 64-32-10 MLP after 150 steps
