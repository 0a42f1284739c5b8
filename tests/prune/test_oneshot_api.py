"""prune.oneshot: layouts (Flax, Equinox, explicit heads, scanned stacks), equality with
prune.wanda / prune.sparsegpt called by hand, sequential calibration, report errors, keep_mask,
bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from jaxslim import calibrate, prune
from jaxslim.prune import _calibrated
from jaxslim.structures import NM

METHODS = ["magnitude", "wanda", "sparsegpt"]


def _key(i):
    return jax.random.key(i)


def _mlp(widths=(8, 16, 16, 4)):
    return {
        f"w{i}": jax.random.normal(_key(i), (a, b)) / np.sqrt(a)
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))
    }


def _mlp_fn(p, x):
    for i in range(len(p) - 1):
        x = jnp.tanh(x @ p[f"w{i}"])
    return x @ p[f"w{len(p) - 1}"]


def _batches(d=8, n=64, count=2, seed=10):
    mix = jnp.eye(d) + 0.5 * jax.random.normal(_key(seed + 99), (d, d))
    return [jax.random.normal(_key(seed + b), (n, d)) @ mix for b in range(count)]


@pytest.mark.parametrize("method", METHODS)
def test_flax_layout_exact_per_output(method):
    params = _mlp()
    new, rep = prune.oneshot(_mlp_fn, params, _batches(), 0.5, method=method)
    masks = rep.masks
    for p, w in params.items():
        k = w.shape[0]
        assert masks[p].sum(axis=0).tolist() == [k // 2] * w.shape[1]
        assert bool(jnp.all(new[p][~masks[p]] == 0))
        assert new[p].dtype == w.dtype
    assert [r.path for r in rep.rows] == ["w0", "w1", "w2"]
    assert all(r.sparsity == 0.5 for r in rep.rows) and rep.sparsity == 0.5
    assert all(r.method == getattr(method, "name", method) for r in rep.rows)


@pytest.mark.parametrize("method", METHODS)
def test_equinox_layout_prunes_along_inputs(method):
    w = jax.random.normal(_key(1), (6, 8))  # (out, in)
    params = {"weight": w}
    fn = lambda p, x: x @ p["weight"].T  # noqa: E731
    masks = prune.oneshot(fn, params, _batches(), 0.5, method=method)[1].masks
    assert masks["weight"].sum(axis=1).tolist() == [4] * 6  # per output (row), over inputs
    m24 = prune.oneshot(fn, params, _batches(), 0.5, method=method, structure=NM(2, 4))[1].masks
    groups = m24["weight"].reshape(6, 2, 4).sum(axis=-1)
    assert bool(jnp.all(groups == 2))


@pytest.mark.parametrize("method", METHODS)
def test_head_layout(method):
    d, kv, g, hd = 8, 2, 2, 4
    params = {
        "q": jax.random.normal(_key(3), (d, kv, g, hd)),
        "o": jax.random.normal(_key(4), (kv, g, hd, d)),
    }

    def fn(p, x):
        h = jnp.einsum("bd,dkgh->bkgh", x, p["q"])
        return jnp.einsum("bkgh,kghd->bd", jnp.tanh(h), p["o"])

    masks = prune.oneshot(fn, params, _batches(), 0.5, method=method)[1].masks
    assert bool(jnp.all(masks["q"].sum(axis=0) == d // 2))  # each (kv, g, hd) output
    assert bool(jnp.all(masks["o"].sum(axis=(0, 1, 2)) == kv * g * hd // 2))
    m48 = prune.oneshot(fn, params, _batches(), 0.5, method=method, structure=NM(4, 8))[1].masks
    flat = m48["o"].reshape(kv * g * hd // 8, 8, d).sum(axis=1)  # runs of 8 flattened inputs
    assert bool(jnp.all(flat == 4))


def test_scanned_stack_gets_per_layer_stats():
    ws = jax.random.normal(_key(5), (3, 8, 8)) / np.sqrt(8)

    def fn(p, x):
        return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["ws"])[0]

    stats = calibrate.statistics(fn, {"ws": ws}, _batches())
    new, rep = prune.oneshot(fn, {"ws": ws}, _batches(), 0.5, sequential=False)
    masks = rep.masks
    assert [r.slice for r in rep.rows] == [(0,), (1,), (2,)]
    for i in range(3):
        w_i, m_i = prune.sparsegpt(ws[i], stats["ws"].xtx[i], 0.5)
        np.testing.assert_array_equal(masks["ws"][i], m_i)
        np.testing.assert_allclose(new["ws"][i], w_i, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("structure", [prune.Unstructured(), NM(2, 4)], ids=["unstr", "2:4"])
def test_masks_equal_methods_called_by_hand(structure):
    params = _mlp()
    stats = calibrate.statistics(_mlp_fn, params, _batches())
    m_wanda = prune.oneshot(
        _mlp_fn,
        params,
        _batches(),
        0.5,
        method=prune.Wanda(),
        structure=structure,
        sequential=False,
    )[1].masks
    by_hand = prune.wanda(params, stats, 0.5, structure=structure)
    for p in params:
        np.testing.assert_array_equal(m_wanda[p], by_hand[p])
    sgpt = prune.SparseGPT(block_size=8)
    new, rep = prune.oneshot(
        _mlp_fn, params, _batches(), 0.5, method=sgpt, structure=structure, sequential=False
    )
    m_sgpt = rep.masks
    for p, w in params.items():
        w_h, m_h = prune.sparsegpt(w, stats[p].xtx, 0.5, structure=structure, block_size=8)
        np.testing.assert_array_equal(m_sgpt[p], m_h)
        np.testing.assert_array_equal(new[p], w_h)


def test_magnitude_is_per_output_lowest_abs():
    params = _mlp()
    masks = prune.oneshot(_mlp_fn, params, _batches(), 0.25, method="magnitude")[1].masks
    for p, w in params.items():
        k = w.shape[0]
        order = np.argsort(np.abs(np.asarray(w)), axis=0, kind="stable")
        ref = np.ones(w.shape, bool)
        np.put_along_axis(ref, order[: round(0.25 * k)], False, axis=0)
        np.testing.assert_array_equal(masks[p], ref)


def test_report_error_matches_definition():
    params = _mlp()
    xs = _batches()
    new, rep = prune.oneshot(_mlp_fn, params, xs, 0.5, method="wanda", sequential=False)
    x = jnp.concatenate(xs)
    ref = np.linalg.norm(x @ params["w0"] - x @ new["w0"]) / np.linalg.norm(x @ params["w0"])
    assert rep.rows[0].error == pytest.approx(float(ref), rel=1e-4)
    base = jnp.where(prune.oneshot(_mlp_fn, params, xs, 0.5, method="magnitude")[1].masks["w0"],
                     params["w0"], 0)  # fmt: skip
    ref_base = np.linalg.norm(x @ (params["w0"] - base)) / np.linalg.norm(x @ params["w0"])
    assert rep.rows[0].baseline == pytest.approx(float(ref_base), rel=1e-4)
    errs = {m: prune.oneshot(_mlp_fn, params, xs, 0.5, method=m, sequential=False)[1]
            for m in METHODS}  # fmt: skip
    first = {m: e.rows[0].error for m, e in errs.items()}
    assert first["sparsegpt"] < min(first["wanda"], first["magnitude"])
    assert errs["magnitude"].rows[0].baseline == errs["magnitude"].rows[0].error
    assert "w0" in errs["wanda"].table() and "sparsity 0.500" in errs["wanda"].table()


def test_sequential_fits_the_pruned_inputs():
    """Kernel ``i`` is SparseGPT on the statistics of the model whose earlier kernels are already
    pruned; so on the input it actually sees, its layer error is lower than one-pass's."""
    params = _mlp()
    xs = _batches(count=3)
    sgpt = prune.SparseGPT(block_size=8)
    seq, rep = prune.oneshot(_mlp_fn, params, xs, 0.5, method=sgpt)
    m_seq = rep.masks
    one, _ = prune.oneshot(_mlp_fn, params, xs, 0.5, sequential=False, method=sgpt)
    np.testing.assert_array_equal(seq["w0"], one["w0"])  # the first layer sees the same input
    assert not np.array_equal(np.asarray(seq["w1"]), np.asarray(one["w1"]))
    partial = {**params, "w0": seq["w0"]}
    s1 = calibrate.statistics(_mlp_fn, partial, xs, kernels=["w1"])["w1"]
    w_h, m_h = prune.sparsegpt(params["w1"], s1.xtx, 0.5, block_size=8)
    np.testing.assert_array_equal(m_seq["w1"], m_h)
    np.testing.assert_allclose(seq["w1"], w_h, rtol=1e-6, atol=1e-6)
    x1 = jnp.tanh(jnp.concatenate(xs) @ seq["w0"])  # what w1 sees after w0 is pruned

    def err(w):
        return float(jnp.linalg.norm(x1 @ (params["w1"] - w)) / jnp.linalg.norm(x1 @ params["w1"]))

    assert err(seq["w1"]) < err(one["w1"])


def test_keep_mask_finetuning_keeps_zeros():
    params = _mlp()
    xs = _batches()
    new, rep = prune.oneshot(_mlp_fn, params, xs, 0.5)
    masks = rep.masks
    tx = optax.chain(optax.sgd(0.1), prune.keep_mask(masks))
    state = tx.init(new)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda p: jnp.mean(jnp.square(_mlp_fn(p, xs[0]) - 1.0)))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p = new
    for _ in range(5):
        p, state = step(p, state)
    for k in params:
        assert bool(jnp.all(p[k][~masks[k]] == 0))
        assert not np.array_equal(np.asarray(p[k]), np.asarray(new[k]))


def test_top_level_eager_inner_work_jitted():
    params = _mlp()
    prune.oneshot(_mlp_fn, params, _batches(), 0.5, sequential=False)
    before = _calibrated._sparsegpt._cache_size()
    params2 = jax.tree.map(lambda w: w * 2.0, params)
    prune.oneshot(_mlp_fn, params2, _batches(seed=3), 0.5, sequential=False)
    assert _calibrated._sparsegpt._cache_size() == before  # compiled once per shape, reused
    with pytest.raises(TypeError, match=r"prune\.oneshot: params leaf 'w0' is traced"):
        jax.jit(lambda p: prune.oneshot(_mlp_fn, p, _batches(), 0.5)[0])(params)


def test_joint_quant_callable():
    params = _mlp()
    grid = 0.25

    def quant(path, w):
        return lambda row, k: jnp.round(row / grid) * grid

    new, rep = prune.oneshot(_mlp_fn, params, _batches(), 0.5, method=prune.SparseGPT(quant=quant))
    masks = rep.masks
    for p in params:
        v = np.asarray(new[p]) / grid
        np.testing.assert_allclose(v, np.round(v), atol=1e-4)
        assert bool(jnp.all(new[p][~masks[p]] == 0))


def _cond_fn(p, x):
    return lax.cond(jnp.sum(x) > 1e9, lambda: x @ p["a"], lambda: x @ p["b"])


_P2 = {"a": jnp.ones((8, 4)), "b": jnp.ones((8, 4))}
_NAN = [jnp.full((4, 8), jnp.nan)]

BAD = [
    pytest.param(
        lambda: prune.oneshot(_mlp_fn, _mlp(), _NAN, 0.5),
        ValueError,
        r"prune\.oneshot: .*kernel 'w0' is not finite",
        id="nonfinite-batch",
    ),
    pytest.param(
        lambda: prune.oneshot(_cond_fn, _P2, _batches(), 0.5, where="a|b", sequential=False),
        ValueError,
        r"prune\.oneshot: .*kernel 'a' was reached by none",
        id="unreached-kernel",
    ),
    pytest.param(
        lambda: prune.oneshot(_cond_fn, _P2, _batches(), 0.5, where="a|b"),
        ValueError,
        r"prune\.oneshot: .*kernel 'a' was reached by none",
        id="unreached-kernel-sequential",
    ),
    pytest.param(
        lambda: prune.oneshot(_mlp_fn, _mlp(), _batches(), 1.0),
        ValueError,
        r"prune\.oneshot: sparsity must be in \[0, 1\).*got 1\.0",
        id="sparsity-one",
    ),
    pytest.param(
        lambda: prune.oneshot(_mlp_fn, _mlp(), _batches(), -0.1),
        ValueError,
        r"prune\.oneshot: sparsity must be in \[0, 1\).*got -0\.1",
        id="sparsity-negative",
    ),
    pytest.param(
        lambda: prune.oneshot(_mlp_fn, _mlp(), _batches(), 0.5, method="obs"),
        ValueError,
        r"prune\.oneshot: method must be Magnitude\(\), Wanda\(\), SparseGPT\(\.\.\.\) .*got 'obs'",
        id="bad-method",
    ),
    pytest.param(
        lambda: prune.oneshot(_mlp_fn, _mlp((6, 4)), _batches(d=6), 0.5, structure=NM(2, 4)),
        ValueError,
        r"prune\.oneshot: kernel 'w0' .* 6 inputs .*m=4",
        id="nm-inputs-not-multiple",
    ),
    pytest.param(
        lambda: prune.oneshot(_mlp_fn, _mlp(), _batches(), 0.5, method=prune.SparseGPT(quant=3)),
        TypeError,
        r"prune\.SparseGPT: quant must be None or a callable",
        id="quant-not-callable",
    ),
    pytest.param(
        lambda: prune.oneshot(_mlp_fn, _mlp(), _batches(), {"w0": 0.5, "nope": 0.5}),
        ValueError,
        r"prune\.oneshot: .*'nope'",
        id="sparsity-dict-unknown-path",
    ),
    pytest.param(
        lambda: prune.oneshot(_mlp_fn, _mlp(), _batches(), {"w0": 1.5}),
        ValueError,
        r"prune\.oneshot: sparsity must be in \[0, 1\).*1\.5.*'w0'",
        id="sparsity-dict-out-of-range",
    ),
    pytest.param(
        lambda: prune.SparseGPT(damp=-1.0),
        ValueError,
        r"prune\.SparseGPT: damp must be finite and >= 0, got -1\.0",
        id="sparsegpt-negative-damp",
    ),
    pytest.param(
        lambda: prune.SparseGPT(block_size=0),
        ValueError,
        r"prune\.SparseGPT: block_size must be an int >= 1, got 0",
        id="sparsegpt-block-size",
    ),
]


@pytest.mark.parametrize("call, exc, match", BAD)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _tied():
    k = jax.random.split(_key(9), 2)
    p = {"embed": jax.random.normal(k[0], (16, 8)), "w": jax.random.normal(k[1], (8, 8))}
    fn = lambda p, ids: jnp.tanh(p["embed"][ids] @ p["w"]) @ p["embed"].T  # noqa: E731
    ids = [jax.random.randint(_key(b), (4, 6), 0, 16) for b in range(2)]
    return p, fn, ids


def test_tied_embedding_stays_dense_by_default_and_prunes_when_named():
    p, fn, ids = _tied()
    new, rep = prune.oneshot(fn, p, ids, 0.5, method="wanda")
    assert [r.path for r in rep.rows] == ["w"] and "embed" in rep.skipped
    np.testing.assert_array_equal(new["embed"], p["embed"])
    assert rep.masks["embed"] is None and "skipped embed: gathered" in rep.table()
    new, rep = prune.oneshot(fn, p, ids, 0.5, method="wanda", where="embed|w")
    assert sorted(r.path for r in rep.rows) == ["embed", "w"] and not rep.skipped
    assert float(jnp.mean(new["embed"] == 0)) == 0.5
