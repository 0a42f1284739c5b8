"""demo.sparse: the scanned MLP training loop and 2:4 SR-STE vs one-shot 2:4 + fine-tune.

Tiny synthetic data (64 x 40, 10 classes) and a 40-8-8-10 MLP keep every test under a second
of compute; the full MNIST-1D table is in the notebook ``notebooks/sparse_training.ipynb``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxslim import prune
from jaxslim.demo import sparse as S
from jaxslim.structures import NM

SIZES = (40, 8, 8, 10)


def tiny_data(seed=0, n=64, nt=32):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(40, 10)).astype(np.float32)
    x = rng.normal(size=(n + nt, 40)).astype(np.float32)
    y = np.argmax(x @ w, axis=-1).astype(np.int32)  # a learnable rule
    return x[:n], y[:n], x[n:], y[n:]


def assert_exact_24(params):
    """Every group of 4 consecutive entries along the input axis of every kernel has exactly 2
    nonzeros; biases are untouched (1-D)."""
    for name, layer in params.items():
        k = np.asarray(layer["kernel"])
        din, dout = k.shape
        nz = (k.reshape(din // 4, 4, dout) != 0).sum(axis=1)
        assert (nz == 2).all(), (name, np.unique(nz))
        assert layer["bias"].ndim == 1


@pytest.mark.standard_promotion
def test_compare_24_exact_pattern_and_finite_accuracies():
    res = S.compare_24(tiny_data(), steps=12, seeds=(1,), sizes=SIZES, batch_size=16)
    assert [(r.method, r.seed) for r in res] == [
        ("dense", 1),
        ("SR-STE 2:4 from scratch", 1),
        ("one-shot 2:4 + fine-tune", 1),
    ]
    for r in res:
        assert math.isfinite(r.accuracy) and 0.0 <= r.accuracy <= 1.0
        # accuracy is a multiple of 1/32 (32 test examples) and recomputes exactly
        assert r.accuracy == S.accuracy(r.params, tiny_data()[2], tiny_data()[3])
        assert round(r.accuracy * 32) == pytest.approx(r.accuracy * 32, abs=1e-6)
        if r.method != "dense":
            assert_exact_24(r.params)
        else:
            assert all(np.all(np.asarray(v["kernel"]) != 0) for v in r.params.values())
    table = S.table(res)
    assert table.count("\n") == 4 and "| SR-STE 2:4 from scratch |" in table
    # the same seed's dense run is the dense reference: identical to a direct ``train``
    dense, _ = S.train(
        S.mlp_init(jax.random.key(1), SIZES),
        S.adam(12),
        tiny_data(),
        steps=12,
        seed=1,
        batch_size=16,
    )
    jax.tree.map(np.testing.assert_array_equal, res[0].params, dense)


@pytest.mark.standard_promotion
def test_train_scan_equals_an_eager_loop():
    """``train`` (one jitted scan) equals a plain Python loop of ``tx.update`` run without jit
    on the same minibatches; ``start`` continues the same minibatch stream."""
    data = tiny_data()
    init = S.mlp_init(jax.random.key(3), SIZES)
    tx = optax.adam(1e-2)
    got, _ = S.train(init, tx, data, steps=3, seed=4, batch_size=8)
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    idx = jax.random.randint(jax.random.key(104), (3, 8), 0, 64)

    def loss(p, i):
        return optax.softmax_cross_entropy_with_integer_labels(S.mlp_apply(p, x[i]), y[i]).mean()

    with jax.disable_jit():
        p, s = init, tx.init(init)
        for t in range(3):
            u, s = tx.update(jax.grad(loss)(p, idx[t]), s, p)
            p = optax.apply_updates(p, u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, p)

    # 3 + 2 steps with ``start=3`` on an SGD stream == 5 steps in one go
    sgd = optax.sgd(0.1)
    a, _ = S.train(init, sgd, data, steps=3, seed=4, batch_size=8)
    a, _ = S.train(a, sgd, data, steps=2, seed=4, start=3, batch_size=8)
    b, _ = S.train(init, sgd, data, steps=5, seed=4, batch_size=8)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a, b)
    zero, _ = S.train(init, sgd, data, steps=0)
    jax.tree.map(np.testing.assert_array_equal, zero, init)


@pytest.mark.standard_promotion
def test_oneshot_is_the_magnitude_24_mask_of_the_dense_run_and_finetune_keeps_it():
    data = tiny_data()
    init = S.mlp_init(jax.random.key(0), SIZES)
    dense, _ = S.train(init, S.adam(6), data, steps=6, batch_size=16)
    want = prune.apply_mask(dense, prune.topk_mask(prune.magnitude(dense), 0.5, structure=NM(2, 4)))
    no_ft = S.oneshot_24_finetune(data, init, steps=6, finetune_steps=0, batch_size=16)
    jax.tree.map(np.testing.assert_array_equal, no_ft, want)

    ft = S.oneshot_24_finetune(data, init, steps=10, finetune_steps=4, batch_size=16)
    base = S.oneshot_24_finetune(data, init, steps=6, finetune_steps=0, batch_size=16)
    for name in ft:
        k, k0 = np.asarray(ft[name]["kernel"]), np.asarray(base[name]["kernel"])
        np.testing.assert_array_equal(k != 0, k0 != 0)  # same support, exact zeros held
        assert not np.array_equal(k, k0)  # and the kept weights were fine-tuned
    assert_exact_24(ft)


@pytest.mark.standard_promotion
def test_sr_ste_deploys_the_straight_through_values():
    """With zero learning rate the weights never move: the deployed params are the 2:4
    magnitude mask of the initialization, i.e. ``straight_through(init)``."""
    data = tiny_data()
    init = S.mlp_init(jax.random.key(1), SIZES)
    got = S.sr_ste_24(data, init, steps=3, learning_rate=0.0, decay=0.0, batch_size=8)
    want = prune.straight_through(init, 0.5, structure=NM(2, 4))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert_exact_24(got)


def test_mlp_apply_shapes_and_formula():
    p = S.mlp_init(jax.random.key(0), (4, 3, 2))
    x = jnp.arange(8.0).reshape(2, 4)
    h = np.maximum(np.asarray(x) @ np.asarray(p["l0"]["kernel"]), 0)  # biases are 0
    want = h @ np.asarray(p["l1"]["kernel"])
    np.testing.assert_allclose(S.mlp_apply(p, x), want, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(S.mlp_apply)(p, x), want, rtol=1e-5)
    assert p["l0"]["kernel"].shape == (4, 3) and p["l1"]["bias"].shape == (2,)


def _data():
    return tiny_data()


BAD = [
    pytest.param(
        lambda: S.compare_24(_data(), steps=0, sizes=SIZES),
        ValueError,
        r"demo\.sparse\.compare_24: steps must be an int >= 1, got 0",
        id="compare_24-steps-0",
    ),
    pytest.param(
        lambda: S.compare_24(_data(), steps=2, seeds=(), sizes=SIZES),
        ValueError,
        r"demo\.sparse\.compare_24: seeds must be a non-empty.*\[\]",
        id="compare_24-no-seeds",
    ),
    pytest.param(
        lambda: S.compare_24(_data(), steps=2, finetune_fraction=1.5, sizes=SIZES),
        ValueError,
        r"demo\.sparse\.compare_24: finetune_fraction must be in \[0, 1\], got 1\.5",
        id="compare_24-finetune-fraction",
    ),
    pytest.param(
        lambda: S.compare_24(_data(), steps=2, sizes=(40, 6, 10)),
        ValueError,
        r"demo\.sparse\.compare_24: sizes \(40, 6, 10\).*multiple of 4.*\[6\]",
        id="compare_24-sizes-not-multiple-of-4",
    ),
    pytest.param(
        lambda: S.compare_24(_data(), steps=2, sizes=(36, 8, 10)),
        ValueError,
        r"demo\.sparse\.compare_24: sizes\[0\] must equal.*sizes\[0\]=36.*\(64, 40\)",
        id="compare_24-sizes-vs-features",
    ),
    pytest.param(
        lambda: S.compare_24(_data()[:3], steps=2, sizes=SIZES),
        TypeError,
        r"demo\.sparse\.compare_24: data must be \(x_train, y_train, x_test, y_test\)",
        id="compare_24-data-tuple",
    ),
    pytest.param(
        lambda: S.sr_ste_24(
            (np.zeros((4, 40)), np.zeros(5), np.zeros((2, 40)), np.zeros(2)),
            S.mlp_init(jax.random.key(0), SIZES),
            steps=1,
        ),
        ValueError,
        r"demo\.sparse\.sr_ste_24: data: x_train .* \(4, 40\) and \(5,\)",
        id="sr_ste_24-data-shapes",
    ),
    pytest.param(
        lambda: S.oneshot_24_finetune(
            _data(), S.mlp_init(jax.random.key(0), SIZES), steps=4, finetune_steps=5
        ),
        ValueError,
        r"demo\.sparse\.oneshot_24_finetune: finetune_steps must be <= steps.*5 > 4",
        id="oneshot_24_finetune-too-many-finetune-steps",
    ),
    pytest.param(
        lambda: S.train(S.mlp_init(jax.random.key(0), SIZES), optax.sgd(0.1), _data(), steps=-1),
        ValueError,
        r"demo\.sparse\.train: steps must be an int >= 0, got -1",
        id="train-negative-steps",
    ),
    pytest.param(
        lambda: S.mlp_init(jax.random.key(0), (40,)),
        ValueError,
        r"demo\.sparse\.mlp_init: sizes needs at least 2 widths, got \(40,\)",
        id="mlp_init-one-width",
    ),
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
