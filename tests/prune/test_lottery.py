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


def _check_round(out, r, rewind, where_bias):
    """Exact per-leaf counts, nested masks, rewound survivors, pruned entries exactly 0."""
    for name, n in (("l1", 128), ("l2", 64)):
        leaves = ("kernel", "bias") if where_bias else ("kernel",)
        for leaf, size in zip(leaves, (n, n // (8 if name == "l1" else 16)), strict=False):
            m = np.asarray(out[r].masks[name][leaf])
            assert (~m).sum() == round(out[r].sparsity * size)
            assert (m <= np.asarray(out[r - 1].masks[name][leaf])).all()
            w0 = np.asarray(out[r].init[name][leaf])
            np.testing.assert_array_equal(w0, np.where(m, np.asarray(rewind[name][leaf]), 0))
            assert (np.asarray(out[r].params[name][leaf])[~m] == 0).all()


def test_lottery_explicit_schedule_prunes_biases_too():
    """``sparsities=`` gives each round's overall sparsity (the MNIST-1D notebook's linspace);
    ``where`` selecting biases prunes them too, each leaf to its own exact count."""
    params = _params()
    train_fn, calls = make_train_fn()
    sched = [0.25, 0.25, 0.5, 0.875]
    out = prune.lottery(train_fn, params, sparsities=sched, where=r"kernel|bias")
    assert [r.sparsity for r in out] == [0.0, *sched]
    assert len(calls) == 5
    for r in range(1, 5):
        _check_round(out, r, params, where_bias=True)
    # same sparsity twice: the second round keeps exactly the first round's mask count
    assert int(out[2].masks["l1"]["kernel"].sum()) == int(out[1].masks["l1"]["kernel"].sum())


def test_lottery_global_scope_and_excluded_layer():
    """``scope="global"`` ranks all selected kernels together (exact total count); a ``where``
    predicate that skips ``l2`` leaves it dense and unmasked."""
    params = _params()
    train_fn, _ = make_train_fn()
    out = prune.lottery(train_fn, params, rounds=2, sparsity_per_round=0.5, scope="global")
    for r in (1, 2):
        pruned = sum(int((~np.asarray(out[r].masks[k]["kernel"])).sum()) for k in ("l1", "l2"))
        assert pruned == round(out[r].sparsity * (128 + 64))
        for k in ("l1", "l2"):
            m = np.asarray(out[r].masks[k]["kernel"])
            assert (m <= np.asarray(out[r - 1].masks[k]["kernel"])).all()
    out = prune.lottery(
        train_fn,
        params,
        rounds=2,
        sparsity_per_round=0.5,
        where=lambda path, leaf: path == "l1/kernel",
    )
    assert out[2].masks["l2"]["kernel"] is None
    assert int(out[2].masks["l1"]["kernel"].sum()) == 32
    np.testing.assert_array_equal(out[2].init["l2"]["kernel"], params["l2"]["kernel"])


def test_lottery_masks_stay_nested_when_a_survivor_trains_to_zero():
    """A survivor trained to exactly 0 never revives a weight pruned in an earlier round, even
    when it sits at a lower flat index (ties break by index)."""
    w0 = jnp.arange(8.0, 0.0, -1.0).reshape(2, 4)  # round 1 prunes flat indices 4..7

    def train_fn(p, masks):  # after round 0, the survivor at flat index 0 trains to exactly 0
        w = jnp.where(masks["w"], p["w"], 0.0)
        if not bool(masks["w"].all()):
            w = w.at[0, 0].set(0.0)
        return {"w": w}, None

    out = prune.lottery(train_fn, {"w": w0}, sparsities=[0.5, 0.5, 0.625])
    m1, m2, m3 = (np.asarray(out[r].masks["w"]).ravel() for r in (1, 2, 3))
    np.testing.assert_array_equal(m1, np.arange(8) < 4)
    np.testing.assert_array_equal(m2, m1)  # same count: index 7 stays pruned
    np.testing.assert_array_equal(m3, m1 & (np.arange(8) != 0))  # then the zero survivor goes
    np.testing.assert_array_equal(out[3].init["w"], jnp.where(out[3].masks["w"], w0, 0.0))


def test_lottery_jitted_train_fn_matches_eager():
    """The same rounds whether ``train_fn`` runs its steps jitted or eagerly."""
    params = _params()
    jit_fn, _ = make_train_fn(steps=3)

    def eager_fn(params, masks):
        with jax.disable_jit():
            return jit_fn(params, masks)

    a = prune.lottery(jit_fn, params, rounds=2, sparsity_per_round=0.5)
    b = prune.lottery(eager_fn, params, rounds=2, sparsity_per_round=0.5)
    for ra, rb in zip(a, b, strict=True):
        assert jax.tree.structure(ra.masks) == jax.tree.structure(rb.masks)
        for x, y in zip(jax.tree.leaves(ra.masks), jax.tree.leaves(rb.masks), strict=True):
            np.testing.assert_array_equal(x, y)
        for x, y in zip(jax.tree.leaves(ra.params), jax.tree.leaves(rb.params), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _lottery(**kw):
    train_fn, _ = make_train_fn(steps=1)
    return lambda: prune.lottery(train_fn, _params(), **kw)


BAD = [
    pytest.param(
        _lottery(rounds=1, sparsity_per_round=0.5, rewind_step=3),
        ValueError,
        r"prune\.lottery: rewind_step=3 needs .*checkpoints",
        id="rewind-step-not-checkpointed",
    ),
    pytest.param(
        lambda: prune.lottery(lambda p, m: p, _params(), rounds=1, sparsity_per_round=0.5),
        TypeError,
        r"prune\.lottery: train_fn must return \(trained_params, checkpoints\), got dict",
        id="train-fn-returns-params-only",
    ),
    pytest.param(
        lambda: prune.lottery(None, _params(), rounds=1, sparsity_per_round=0.5),
        TypeError,
        r"prune\.lottery: train_fn must be a callable",
        id="train-fn-not-callable",
    ),
    pytest.param(
        _lottery(rounds=1, sparsity_per_round=1.5),
        ValueError,
        r"prune\.lottery: sparsity_per_round must be a number in \[0, 1\], got 1\.5",
        id="sparsity-per-round-above-1",
    ),
    pytest.param(
        _lottery(rounds=0, sparsity_per_round=0.5),
        ValueError,
        r"prune\.lottery: rounds must be an int >= 1, got 0",
        id="zero-rounds",
    ),
    pytest.param(
        _lottery(rounds=2),
        TypeError,
        r"prune\.lottery: give the schedule .*sparsity_per_round=None",
        id="no-schedule",
    ),
    pytest.param(
        _lottery(rounds=2, sparsity_per_round=0.5, sparsities=[0.5]),
        ValueError,
        r"prune\.lottery: pass either sparsities=.*not both .*rounds=2",
        id="both-schedules",
    ),
    pytest.param(
        _lottery(sparsities=[0.5, 0.25]),
        ValueError,
        r"prune\.lottery: sparsities must be non-decreasing .*0\.25 in round 2 after 0\.5",
        id="decreasing-sparsities",
    ),
    pytest.param(
        _lottery(sparsities=[0.5, float("nan")]),
        ValueError,
        r"prune\.lottery: each of sparsities must be a number in \[0, 1\], got nan",
        id="nan-sparsity",
    ),
    pytest.param(
        _lottery(sparsities=[]),
        ValueError,
        r"prune\.lottery: sparsities must hold at least one",
        id="empty-sparsities",
    ),
    pytest.param(
        _lottery(sparsities=0.9),
        TypeError,
        r"prune\.lottery: sparsities must be a sequence .*got float 0\.9",
        id="scalar-sparsities",
    ),
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD)
def test_lottery_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
