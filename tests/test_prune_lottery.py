"""prune.lottery: iterative magnitude pruning with rewinding around a user's training function."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxslim import prune


def _params():
    rng = np.random.default_rng(0)
    return {
        "l1": {
            "kernel": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
            "bias": jnp.ones(16),
        },
        "l2": {
            "kernel": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32),
            "bias": jnp.ones(4),
        },
    }


def make_train_fn(steps=6, record=(0, 2)):
    """SGD on a fixed random target with the mask held by keep_mask; records checkpoints."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)
    calls = []

    def loss(p):
        h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"][None])
        return jnp.mean((h @ p["l2"]["kernel"] + p["l2"]["bias"][None] - y) ** 2)

    def train_fn(params, masks):
        calls.append((params, masks))
        tx = optax.chain(optax.sgd(0.05), prune.keep_mask(masks))
        state = tx.init(params)
        step = jax.jit(lambda p, s: _step(tx, loss, p, s))
        ckpts = {}
        for t in range(steps):
            if t in record:
                ckpts[t] = params
            params, state = step(params, state)
        return params, ckpts

    return train_fn, calls


def _step(tx, loss, p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s


@pytest.mark.parametrize("rewind_step", [0, 2])
def test_lottery_prunes_iteratively_and_rewinds(rewind_step):
    params = _params()
    train_fn, calls = make_train_fn()
    out = prune.lottery(train_fn, params, rounds=3, sparsity_per_round=0.5, rewind_step=rewind_step)
    assert [r.sparsity for r in out] == [0.0, 0.5, 0.75, 0.875]
    rewind = params if rewind_step == 0 else train_fn(params, out[0].masks)[1][2]
    for r in range(1, 4):
        for name, n in (("l1", 128), ("l2", 64)):
            m = np.asarray(out[r].masks[name]["kernel"])
            assert (~m).sum() == round(out[r].sparsity * n)  # exact per-layer count
            assert (m <= np.asarray(out[r - 1].masks[name]["kernel"])).all()  # nested masks
            # survivors rewound to step k of the dense run; pruned exactly 0
            w0 = np.asarray(out[r].init[name]["kernel"])
            np.testing.assert_array_equal(w0, np.where(m, np.asarray(rewind[name]["kernel"]), 0))
            assert (np.asarray(out[r].params[name]["kernel"])[~m] == 0).all()
            # pruned = the lowest |w| of the previous round's trained survivors
            prev = np.abs(np.asarray(out[r - 1].params[name]["kernel"]))
            prev_m = np.asarray(out[r - 1].masks[name]["kernel"])
            alive = prev[m]
            dropped = prev[prev_m & ~m]
            assert dropped.max() <= alive.min()
        np.testing.assert_array_equal(out[r].init["l1"]["bias"], rewind["l1"]["bias"])
    assert len(calls) == 4 + (rewind_step != 0)


def test_lottery_bad_input():
    train_fn, _ = make_train_fn()
    with pytest.raises(ValueError, match=r"prune\.lottery: rewind_step=3 needs .*checkpoints"):
        prune.lottery(train_fn, _params(), rounds=1, sparsity_per_round=0.5, rewind_step=3)
    with pytest.raises(TypeError, match=r"prune\.lottery: train_fn must return"):
        prune.lottery(lambda p, m: p, _params(), rounds=1, sparsity_per_round=0.5)
    with pytest.raises(ValueError, match="sparsity_per_round"):
        prune.lottery(train_fn, _params(), rounds=1, sparsity_per_round=1.5)
    with pytest.raises(ValueError, match="rounds"):
        prune.lottery(train_fn, _params(), rounds=0, sparsity_per_round=0.5)
