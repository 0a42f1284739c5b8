"""One-shot pruning: SparseGPT against a float64 NumPy statement of Algorithm 1 (Frantar &
Alistarh 2023), Wanda against a NumPy reference, exact counts, N:M patterns, reconstruction
ordering, bad input."""

import functools
import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jaxslim import prune
from jaxslim.prune._calibrated import sparsegpt, wanda
from jaxslim.structures import NM, Channels, Unstructured

JIT = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]


# ------------------------------------------------------------------------------- references


def _lowest(scores, count):
    """Bool mask of the ``count`` lowest (ties: lower index first) and the relative gap between
    the highest pruned and the lowest kept score (how close the choice is to a tie)."""
    order = np.argsort(scores, kind="stable")
    sel = np.zeros(scores.shape, bool)
    sel[order[:count]] = True
    if 0 < count < scores.size:
        lo, hi = scores[order[count - 1]], scores[order[count]]
        return sel, (hi - lo) / max(abs(hi), 1e-30)
    return sel, np.inf


def sparsegpt_reference(w, h, sparsity, block, *, damp=0.01, nm=None, per_output=True, quant=None):
    """Algorithm 1 of the paper in its own layout (``W`` rows = outputs, columns = inputs), one
    input column at a time, float64. Returns ``(w_new (in, out), keep (in, out), margin)``."""
    W = np.array(w, np.float64).T.copy()  # (N, K)
    H = np.array(h, np.float64).copy()
    N, K = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * np.mean(np.diag(H)) * np.eye(K)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H^-1 = Hinv^T Hinv
    d = np.diag(Hinv)
    pruned = np.zeros((N, K), bool)
    margin = np.inf
    for i1 in range(0, K, block):
        i2 = i1 + block
        if nm is None:
            score = W[:, i1:i2] ** 2 / d[i1:i2] ** 2
            if per_output:
                for r in range(N):
                    pruned[r, i1:i2], g = _lowest(score[r], round(sparsity * block))
                    margin = min(margin, g)
            else:
                sel, g = _lowest(score.reshape(-1), round(sparsity * block * N))
                pruned[:, i1:i2] = sel.reshape(N, block)
                margin = min(margin, g)
        E = np.zeros((N, block))
        for j in range(i1, i2):
            if nm is not None and (j - i1) % nm.m == 0:
                score = W[:, j : j + nm.m] ** 2 / d[j : j + nm.m] ** 2
                for r in range(N):
                    pruned[r, j : j + nm.m], g = _lowest(score[r], nm.m - nm.n)
                    margin = min(margin, g)
            q = np.where(pruned[:, j], 0.0, W[:, j])
            if quant is not None:
                q = np.where(pruned[:, j], 0.0, quant(q, j))
            e = (W[:, j] - q) / Hinv[j, j]
            W[:, j:i2] -= np.outer(e, Hinv[j, j:i2])
            W[:, j] = q
            E[:, j - i1] = e
        W[:, i2:] -= E @ Hinv[i1:i2, i2:]
    return W.T, ~pruned.T, margin


def wanda_reference(w, v, sparsity, nm=None):
    """Per output column: prune the lowest ``|W| sqrt(v)`` (ties: lower input first)."""
    w = np.asarray(w, np.float32).reshape(-1, w.shape[-1])
    score = np.abs(w) * np.sqrt(np.asarray(v, np.float32))[:, None]
    keep = np.ones(w.shape, bool)
    for j in range(w.shape[1]):
        if nm is None:
            keep[:, j] = ~_lowest(score[:, j], round(sparsity * w.shape[0]))[0]
        else:
            for g in range(0, w.shape[0], nm.m):
                keep[g : g + nm.m, j] = ~_lowest(score[g : g + nm.m, j], nm.m - nm.n)[0]
    return keep


def _layer(k, n, rows, seed, outliers=0, dtype=np.float32):
    """Correlated inputs ``x (rows, k)`` (optionally a few outlier features) and a kernel."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, k)) @ (np.eye(k) + 0.5 * rng.normal(size=(k, k)) / np.sqrt(k))
    if outliers:
        x[:, rng.choice(k, outliers, replace=False)] *= 20.0
    w = rng.normal(size=(k, n))
    return x, jnp.asarray(w, dtype), jnp.asarray(x.T @ x, jnp.float32)


def _int4(w):
    """Per-output symmetric int4 grid with scales from the dense kernel (the paper's setup)."""
    scale = np.max(np.abs(np.asarray(w, np.float64)), axis=0) / 7.0

    def np_q(row, k):
        return np.clip(np.round(row / scale), -8, 7) * scale

    s32 = jnp.asarray(scale, jnp.float32)

    def jax_q(row, k):
        return jnp.clip(jnp.round(row / s32), -8, 7) * s32

    return np_q, jax_q, scale


# --------------------------------------------------------------------------------- SparseGPT


@settings(max_examples=12)  # each example compiles one kernel shape
@given(
    block=st.sampled_from([4, 8, 16]),
    blocks=st.integers(1, 4),
    n=st.integers(4, 16),
    sparsity=st.sampled_from([0.25, 0.5, 0.6, 0.75]),
    kind=st.sampled_from(["per_output", "per_block", "2:4", "1:4"]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 10_000),
)
def test_sparsegpt_equals_numpy_algorithm(block, blocks, n, sparsity, kind, dtype, seed):
    k = block * blocks
    assume(8 <= k <= 32)
    _, w, h = _layer(k, n, 4 * k + 8, seed, dtype=dtype)
    nm = {"2:4": NM(2, 4), "1:4": NM(1, 4)}.get(kind)
    want_w, want_keep, margin = sparsegpt_reference(
        w.astype(jnp.float32), h, sparsity, block, nm=nm, per_output=kind != "per_block"
    )
    assume(margin > 1e-3)  # float32 vs float64 may flip a near-tie
    kw = dict(structure=nm or Unstructured(), block_size=block, per_output=kind != "per_block")
    got_w, keep = sparsegpt(w, h, sparsity, **kw)
    assert got_w.dtype == w.dtype and keep.dtype == jnp.bool_
    np.testing.assert_array_equal(keep, want_keep)
    assert np.all(np.asarray(got_w)[~want_keep] == 0)  # exact zeros
    scale = np.abs(want_w).max()
    if dtype == jnp.float32:
        np.testing.assert_allclose(got_w, want_w, rtol=1e-3, atol=1e-4 * scale)
    else:
        np.testing.assert_allclose(
            np.asarray(got_w, np.float64), want_w, rtol=2**-7, atol=1e-3 * scale
        )


def test_sparsegpt_joint_int4_equals_numpy_algorithm():
    _, w, h = _layer(32, 8, 200, 5)
    np_q, jax_q, scale = _int4(w)
    want_w, want_keep, _ = sparsegpt_reference(w, h, 0.5, 8, quant=np_q)
    for wrap in (lambda f: f, jax.jit):
        got_w, keep = wrap(lambda w, h: sparsegpt(w, h, 0.5, block_size=8, quant=jax_q))(w, h)
        np.testing.assert_array_equal(keep, want_keep)
        np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-5)
        codes = np.asarray(got_w, np.float64) / scale
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)  # on the int4 grid
        assert codes.min() >= -8 - 1e-4 and codes.max() <= 7 + 1e-4
        assert np.all(np.asarray(got_w)[~keep] == 0)


@pytest.mark.parametrize(
    "structure,per_output", [(Unstructured(), True), (Unstructured(), False), (NM(2, 4), True)]
)
def test_sparsegpt_jit_equals_eager_and_traced_sparsity(structure, per_output):
    _, w, h = _layer(16, 6, 64, 1)
    f = partial(sparsegpt, structure=structure, block_size=8, per_output=per_output)
    w0, m0 = f(w, h, 0.5)
    w1, m1 = jax.jit(lambda w, h: f(w, h, 0.5))(w, h)
    w2, m2 = jax.jit(f)(w, h, jnp.float32(0.5))  # sparsity traced
    for wi, mi in ((w1, m1), (w2, m2)):
        np.testing.assert_array_equal(mi, m0)
        np.testing.assert_allclose(wi, w0, rtol=1e-6, atol=1e-6)


@functools.cache
def _jitted_sparsegpt(block, per_output):
    return jax.jit(partial(sparsegpt, block_size=block, per_output=per_output))


@given(
    sparsity=st.floats(0.0, 0.99),
    per_output=st.booleans(),
    block=st.sampled_from([4, 8, 16]),
)
def test_sparsegpt_exact_counts_per_block(sparsity, per_output, block):
    k, n = 16, 5
    _, w, h = _layer(k, n, 64, 2)
    w_new, keep = _jitted_sparsegpt(block, per_output)(w, h, jnp.float32(sparsity))
    pruned = ~np.asarray(keep).reshape(k // block, block, n)
    if per_output:  # every output of every block: round_half_even(sparsity * B)
        want = int(np.round(np.float32(sparsity) * np.float32(block)))
        assert np.all(pruned.sum(axis=1) == want)
    else:
        want = int(np.round(np.float32(sparsity) * np.float32(block * n)))
        assert np.all(pruned.sum(axis=(1, 2)) == want)
    assert np.all(np.asarray(w_new)[~np.asarray(keep)] == 0)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_sparsegpt_nm_patterns_valid(n, m):
    _, w, h = _layer(32, 6, 128, 3)
    w_new, keep = sparsegpt(w, h, 0.5, structure=NM(n, m), block_size=16)
    groups = np.asarray(keep).reshape(32 // m, m, 6)
    assert np.all(groups.sum(axis=1) == n)
    assert np.all(np.asarray(w_new)[~np.asarray(keep)] == 0)
    w0, keep0 = sparsegpt(w, h, 0.0, structure=NM(n, m), block_size=16)  # sparsity 0: dense
    assert bool(keep0.all())


def test_sparsegpt_conv_kernel_is_its_flattened_matrix():
    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
    x = rng.normal(size=(200, 36))
    h = jnp.asarray(x.T @ x, jnp.float32)
    got_w, keep = sparsegpt(w, h, 0.5, structure=NM(2, 4), block_size=12)
    flat_w, flat_keep = sparsegpt(w.reshape(36, 6), h, 0.5, structure=NM(2, 4), block_size=12)
    assert got_w.shape == w.shape and keep.shape == w.shape
    np.testing.assert_array_equal(keep.reshape(36, 6), flat_keep)
    np.testing.assert_array_equal(got_w.reshape(36, 6), flat_w)
    assert np.all(keep.sum(axis=2) == 2)  # 2:4 along the input channels of every tap


def test_sparsegpt_dead_inputs_get_zero_weight():
    x, w, _ = _layer(16, 4, 64, 4)
    x[:, [3, 9]] = 0.0
    h = jnp.asarray(x.T @ x, jnp.float32)
    w_new, keep = sparsegpt(w, h, 0.25, block_size=8)
    assert np.all(np.asarray(w_new)[[3, 9]] == 0) and not np.asarray(keep)[[3, 9]].any()
    want_w, want_keep, _ = sparsegpt_reference(w, h, 0.25, 8)
    np.testing.assert_array_equal(keep, want_keep)
    np.testing.assert_allclose(w_new, want_w, rtol=1e-3, atol=1e-4)


def test_sparsegpt_under_jit_bad_hessian_is_all_nan():
    _, w, h = _layer(8, 4, 32, 0)
    h = h.at[2, 2].set(jnp.inf)
    w_new, keep = jax.jit(lambda w, h: sparsegpt(w, h, 0.5, block_size=4))(w, h)
    assert bool(jnp.all(jnp.isnan(w_new))) and bool(keep.all())


# ------------------------------------------------------------------------------------- Wanda


class _Stats(NamedTuple):  # the shape of calibrate.statistics' per-kernel record (a pytree)
    xtx: Any
    sq_norm: jax.Array
    absmax: Any
    count: Any


@functools.cache
def _jitted_wanda(structure):
    return jax.jit(partial(wanda, structure=structure))


@given(
    k=st.sampled_from([8, 16, 32]),
    n=st.sampled_from([4, 9, 16]),
    sparsity=st.sampled_from([0.0, 0.25, 0.3, 0.5, 0.7]),
    kind=st.sampled_from(["unstructured", "2:4", "1:4"]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    ties=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_wanda_equals_numpy_reference(k, n, sparsity, kind, dtype, ties, seed):
    rng = np.random.default_rng(seed)
    w = rng.integers(-3, 4, size=(k, n)) if ties else rng.normal(size=(k, n))
    v = rng.integers(0, 3, size=k) ** 2 if ties else rng.exponential(size=k)
    nm = {"2:4": NM(2, 4), "1:4": NM(1, 4)}.get(kind)
    params = {"dense": {"kernel": jnp.asarray(w, dtype), "bias": jnp.zeros(n, dtype)}}
    stats = {"dense/kernel": _Stats(None, jnp.asarray(v, jnp.float32), None, k)}
    want = wanda_reference(params["dense"]["kernel"].astype(jnp.float32), v, sparsity, nm)
    if nm is not None and sparsity == 0.0:
        want = np.ones_like(want)
    f = partial(wanda, structure=nm or Unstructured())
    jf = _jitted_wanda(nm or Unstructured())
    for masks in (f(params, stats, sparsity), jf(params, stats, jnp.float32(sparsity))):
        assert masks["dense"]["bias"] is None
        np.testing.assert_array_equal(masks["dense"]["kernel"], want)
    if nm is None:  # exact count per output
        assert np.all((~want).sum(axis=0) == round(sparsity * k))


def test_wanda_conv_per_channel_stats_broadcast_over_taps():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(3, 4, 8)), jnp.float32)  # 1-D conv (width, in, out)
    v = jnp.asarray(rng.exponential(size=4), jnp.float32)
    by_channel = wanda({"c": w}, {"c": v}, 0.5)["c"]
    by_patch = wanda({"c": w}, {"c": jnp.tile(v, 3)}, 0.5)["c"]
    np.testing.assert_array_equal(by_channel, by_patch)
    np.testing.assert_array_equal(
        by_channel.reshape(12, 8), wanda_reference(w.reshape(12, 8), np.tile(v, 3), 0.5)
    )


# ------------------------------------------------------------------ reconstruction ordering


def _error(x, w, w_new):
    x = np.asarray(x, np.float64)
    return float(np.linalg.norm(x @ np.asarray(w, np.float64) - x @ np.asarray(w_new, np.float64)))


@pytest.mark.parametrize("structure", [Unstructured(), NM(2, 4)], ids=["50%", "2:4"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_error_sparsegpt_lt_wanda_le_magnitude(structure, seed):
    x, w, h = _layer(64, 32, 1024, seed, outliers=4)
    params = {"l": w}
    sq = jnp.asarray(np.sum(x * x, axis=0), jnp.float32)
    w_sgpt, _ = sparsegpt(w, h, 0.5, structure=structure, block_size=32)
    m_wanda = wanda(params, {"l": sq}, 0.5, structure=structure)["l"]
    m_mag = prune.topk_mask(prune.magnitude(params), 0.5, structure=structure)["l"]
    e_sgpt = _error(x, w, w_sgpt)
    e_wanda = _error(x, w, jnp.where(m_wanda, w, 0))
    e_mag = _error(x, w, jnp.where(m_mag, w, 0))
    assert e_sgpt < e_wanda <= e_mag, (e_sgpt, e_wanda, e_mag)


# --------------------------------------------------------------------------------- bad input


def _kernel(k=16, n=4):
    _, w, h = _layer(k, n, 4 * k, 0)
    return w, h


def _nan_at(h, i, j):
    return h.at[i, j].set(jnp.nan)


SG = "prune\\.sparsegpt"
WD = "prune\\.wanda"
P = "'dense/kernel'"


def _sg(*, w=None, h=None, sparsity=0.5, **kw):
    w0, h0 = _kernel()
    return lambda: sparsegpt(
        w0 if w is None else w, h0 if h is None else h, sparsity, path="dense/kernel", **kw
    )


def _wd(stats=None, sparsity=0.5, **kw):
    w0, _ = _kernel()
    params = {"dense": {"kernel": w0, "bias": jnp.zeros(4)}}
    stats = {"dense/kernel": jnp.ones(16)} if stats is None else stats
    return lambda: wanda(params, stats, sparsity, **kw)


_W, _H = _kernel()

BAD = [
    pytest.param(
        _sg(h=_nan_at(_H, 2, 5)),
        ValueError,
        f"{SG}: hessian of {P} has 1 non-finite",
        id="sg-nan-h",
    ),
    pytest.param(
        _sg(w=_W.at[0, 0].set(jnp.inf)),
        ValueError,
        f"{SG}: kernel {P} has non-finite",
        id="sg-inf-w",
    ),
    pytest.param(
        _sg(h=-_H), ValueError, f"{SG}: the damped hessian of {P} is not positive", id="sg-not-pd"
    ),
    pytest.param(
        _sg(sparsity=1.0),
        ValueError,
        f"{SG}: sparsity must be in \\[0, 1\\).*1\\.0 for {P}",
        id="sg-sparsity-1",
    ),
    pytest.param(
        _sg(sparsity=-0.1),
        ValueError,
        f"{SG}: sparsity must be in \\[0, 1\\).*-0\\.1 for {P}",
        id="sg-sparsity-negative",
    ),
    pytest.param(
        _sg(sparsity=math.nan),
        ValueError,
        f"{SG}: sparsity must be in \\[0, 1\\).*nan for {P}",
        id="sg-sparsity-nan",
    ),
    pytest.param(
        _sg(sparsity=jnp.float32(1.5)),
        ValueError,
        f"{SG}: sparsity must be in .*1\\.5 for {P}",
        id="sg-sparsity-array",
    ),
    pytest.param(
        _sg(block_size=5),
        ValueError,
        f"{SG}: block_size 5 must divide the 16 input .* of {P}",
        id="sg-block-not-dividing",
    ),
    pytest.param(
        _sg(block_size=0),
        ValueError,
        f"{SG}: block_size must be a positive int, got 0",
        id="sg-block-zero",
    ),
    pytest.param(
        _sg(h=jnp.eye(8)),
        ValueError,
        f"{SG}: hessian of {P} must have shape \\(16, 16\\).*\\(8, 8\\)",
        id="sg-hessian-shape",
    ),
    pytest.param(
        _sg(w=jnp.ones(16)),
        ValueError,
        f"{SG}: expects a floating-point kernel.*\\(16,\\) for {P}",
        id="sg-kernel-1d",
    ),
    pytest.param(
        _sg(structure=NM(2, 4), block_size=6, w=_W[:12], h=_H[:12, :12]),
        ValueError,
        f"{SG}: block_size 6 must be a multiple of m=4 .* on {P}",
        id="sg-nm-block",
    ),
    pytest.param(
        _sg(structure=NM(2, 4), w=_W[:10], h=_H[:10, :10]),
        ValueError,
        f"{SG}: NM\\(2, 4\\) needs axis -2 of {P} to be a multiple of 4",
        id="sg-nm-fan-in",
    ),
    pytest.param(
        _sg(structure=NM(2, 4, axis=-1)),
        ValueError,
        f"{SG}: NM must run along the input axis.*{P}",
        id="sg-nm-axis",
    ),
    pytest.param(
        _sg(structure=Channels()),
        TypeError,
        f"{SG}: structure must be Unstructured\\(\\) or NM",
        id="sg-channels",
    ),
    pytest.param(
        _sg(damp=-1.0),
        ValueError,
        f"{SG}: damp must be a finite number >= 0, got -1\\.0 for {P}",
        id="sg-damp",
    ),
    pytest.param(
        _sg(quant=lambda row, k: row * jnp.nan),
        ValueError,
        f"{SG}: the reconstruction of {P} is not finite \\(quant=",
        id="sg-quant-nan",
    ),
    pytest.param(
        _wd(stats={}), ValueError, f"{WD}: no calibration statistics for {P}", id="wd-missing"
    ),
    pytest.param(
        _wd(stats={"dense/kernel": jnp.ones(5)}),
        ValueError,
        f"{WD}: statistics for {P} must be a float vector.*shape \\(16,\\).*got float32\\(5,\\)",
        id="wd-stats-shape",
    ),
    pytest.param(
        _wd(stats={"dense/kernel": jnp.ones(16).at[3].set(jnp.nan)}),
        ValueError,
        f"{WD}: statistics for {P} must be finite and >= 0, got nan at input 3",
        id="wd-stats-nan",
    ),
    pytest.param(
        _wd(stats={"dense/kernel": -jnp.ones(16)}),
        ValueError,
        f"{WD}: statistics for {P} must be finite and >= 0, got -1\\.0 at input 0",
        id="wd-stats-negative",
    ),
    pytest.param(
        _wd(sparsity=1.0),
        ValueError,
        f"{WD}: sparsity must be in \\[0, 1\\).*1\\.0 for {P}",
        id="wd-sparsity-1",
    ),
    pytest.param(_wd(stats=[1.0]), TypeError, f"{WD}: stats must be a mapping", id="wd-stats-list"),
    pytest.param(
        _wd(structure=Channels()),
        TypeError,
        f"{WD}: structure must be Unstructured\\(\\) or NM",
        id="wd-channels",
    ),
    pytest.param(
        _wd(structure=NM(2, 3)),
        ValueError,
        f"{WD}: NM\\(2, 3\\) needs axis -2 of {P} to be a multiple of 3",
        id="wd-nm-fan-in",
    ),
    pytest.param(
        _wd(where="nothing"), ValueError, f"{WD}: where='nothing' selects no", id="wd-where-empty"
    ),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
