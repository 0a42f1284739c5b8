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


@pytest.mark.standard_promotion
def test_run_table_has_one_row_per_activation_and_one_column_per_depth():
    """The demo section (`jaxslim demo --sweep`) on tiny settings: its table's shape, accuracies
    in [0, 1], the loop timing extrapolated, and the depth moves (grow exact, shrink a layer)."""
    data = _data()
    acts, depths, seeds = ["relu", "silu"], [1, 2], [0, 1]
    r = sweep.run(data, activations=acts, depths=depths, seeds=seeds, steps=3, width=8,
                  loop_variants=1)  # fmt: skip
    assert [(row["activation"], row["depth"]) for row in r["rows"]] == [
        (a, d) for d in depths for a in acts
    ]
    # params of one variant: 40*8 + 8 (+ 8*8 + 8 per extra hidden layer) + 8*10 + 10
    assert {row["depth"]: row["params"] for row in r["rows"]} == {1: 418, 2: 490}
    for row in r["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["std"] <= 0.5
        assert row["accuracy"] * 16 * len(seeds) == pytest.approx(round(row["accuracy"] * 32))
    assert r["variants"] == 8 and r["loop_variants"] == 1
    assert r["speedup"] == pytest.approx(r["loop_seconds_per_variant"] * 8 / r["sweep_seconds"])
    grow, shrink = r["moves"]["grow"], r["moves"]["shrink"]
    assert (grow["from"], grow["to"], grow["max_logit_change"]) == (1, 2, 0.0)
    assert (shrink["from"], shrink["to"], shrink["tune_steps"]) == (2, 1, 1)
    relu1 = next(row for row in r["rows"] if row["activation"] == "relu" and row["depth"] == 1)
    assert grow["accuracy"] == relu1["accuracy"] == shrink["scratch_accuracy"]
    for k in ("accuracy_before", "accuracy_dropped", "accuracy_tuned"):
        assert 0.0 <= shrink[k] <= 1.0

    text = sweep.report(r)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| activation | depth 1 (418 params) | depth 2 (490 params) |"
    assert [line.split(" | ")[0] for line in table[2:]] == ["| relu", "| silu"]
    cells = [c.strip() for line in table[2:] for c in line.strip("|").split("|")[1:]]
    assert len(cells) == 4
    assert all(0.0 <= float(c.split(" +- ")[0]) <= 1.0 for c in cells)
    assert "8 variants (2 activations x 2 depths x 2 seeds)" in text and "x faster" in text
    assert "grow (splice.deepen) relu depth 1 -> 2: max |logit change| 0.0e+00" in text


@pytest.mark.standard_promotion
def test_run_without_relu_has_no_moves_and_rejects_no_loop():
    r = sweep.run(_data(), activations=["gelu"], depths=[1], seeds=[0], steps=1, width=4,
                  loop_variants=1)  # fmt: skip
    assert r["moves"] is None and "grow" not in sweep.report(r)
    with pytest.raises(ValueError, match="sweep.run: loop_variants must be >= 1.*got 0"):
        sweep.run(_data(), activations=["gelu"], depths=[1], seeds=[0], steps=1, loop_variants=0)
