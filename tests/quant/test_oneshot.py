"""quant.oneshot: layouts read from the jaxpr, each method against its single-layer function, the
report, sequential calibration, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import calibrate, quant
from jaxslim.quant import QuantSpec, dequantize
from jaxslim.quant._awq import as_matrix, matrix_spec

SPEC = QuantSpec(4, axis=-1, group_size=8)


def _x(rows=64, k=16, seed=0):
    return jax.random.normal(jax.random.key(seed), (rows, k))


def _layouts():
    k = jax.random.split(jax.random.key(0), 3)
    flax = ({"w": jax.random.normal(k[0], (16, 12))}, lambda p, x: x @ p["w"], (0,), (1,))
    eqx = ({"w": jax.random.normal(k[1], (12, 16))}, lambda p, x: x @ p["w"].T, (1,), (0,))
    heads = (
        {"w": jax.random.normal(k[2], (16, 3, 8))},  # (d, heads, hd)
        lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["w"]),
        (0,),
        (1, 2),
    )
    return {"flax": flax, "equinox": eqx, "heads": heads}


@pytest.mark.parametrize("name", ["flax", "equinox", "heads"])
@pytest.mark.parametrize("method", ["rtn", "gptq", "hqq"])
def test_layouts_per_output_channel_groups_along_contracted(name, method):
    p, fn, c, o = _layouts()[name]
    xs = [_x()]
    q, rep = quant.oneshot(fn, p, xs, SPEC, method=method)
    w = p["w"]
    w2 = as_matrix(w, c, o)  # (K=16, N)
    deq2 = as_matrix(dequantize(q["w"]), c, o)
    if method == "rtn":
        ref2 = quant.quantize(w2, matrix_spec(SPEC)).dequantize()
    elif method == "hqq":
        ref2 = quant.hqq(w2, matrix_spec(SPEC)).dequantize()
    else:
        h = calibrate.statistics(fn, p, xs)["w"].xtx
        ref2 = quant.gptq(w2, h, matrix_spec(SPEC)).dequantize()
    np.testing.assert_allclose(deq2, ref2, rtol=1e-6, atol=1e-6)
    # one scale per output channel and group of 8 contracted inputs: 2 groups per channel
    assert q["w"].scale.size == 2 * w2.shape[1]
    (row,) = rep.rows
    assert row.method == method and row.bytes_before == w.size * 4
    assert row.bytes_after == q["w"].nbytes
    d = w2 - deq2
    h = calibrate.statistics(fn, p, xs)["w"].xtx
    assert row.error == pytest.approx(
        float(jnp.sqrt(jnp.sum(d * (h @ d)) / jnp.sum(w2 * (h @ w2)))), rel=1e-4
    )
    r2 = as_matrix(quant.quantize(w, q["w"].spec).dequantize(), c, o)  # RTN on the same layout
    d = w2 - r2
    assert row.baseline == pytest.approx(
        float(jnp.sqrt(jnp.sum(d * (h @ d)) / jnp.sum(w2 * (h @ w2)))), rel=1e-4
    )
    assert row.seconds >= 0 and rep.method.name == method


def _two_layers():
    k = jax.random.split(jax.random.key(1), 2)
    p = {"a": jax.random.normal(k[0], (16, 32)) / 4, "b": jax.random.normal(k[1], (32, 8)) / 6}
    return p, lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]


def test_sequential_gptq_calibrates_on_quantized_predecessors():
    p, fn = _two_layers()
    xs = [_x(128)]
    q_seq, _ = quant.oneshot(fn, p, xs, SPEC, method="gptq", sequential=True)
    q_par, _ = quant.oneshot(fn, p, xs, SPEC, method="gptq", sequential=False)
    np.testing.assert_array_equal(q_seq["a"].dequantize(), q_par["a"].dequantize())
    pa = {"a": q_seq["a"].dequantize(), "b": p["b"]}
    h = calibrate.statistics(fn, pa, xs)["b"].xtx  # inputs after the quantized first layer
    ref = quant.gptq(p["b"], h, SPEC).dequantize()
    np.testing.assert_allclose(q_seq["b"].dequantize(), ref, rtol=1e-6, atol=1e-6)
    err = lambda q: float(jnp.sum((fn(quant.dequantize_params(q), xs[0]) - fn(p, xs[0])) ** 2))
    assert err(q_seq) <= err(q_par) * 1.05


def test_rules_first_match_and_leaves_without_matmul():
    p, fn = _two_layers()
    p = {**p, "table": jnp.ones((16, 16))}
    f = lambda p, x: fn(p, x) + p["table"][0, :8][None]
    q, rep = quant.oneshot(f, p, [_x()], [("^b$", None), (None, SPEC)], method="gptq")
    assert isinstance(q["b"], jax.Array) and isinstance(q["a"], quant.QArray)
    rows = {r.path: r for r in rep.rows}
    assert set(rows) == {"a", "table"} and rows["table"].method == "rtn (no matmul)"
    assert np.isnan(rows["table"].error)
    assert rows["a"].baseline >= rows["a"].error  # GPTQ at least as good as RTN on its inputs
    assert "rtn (no matmul)" in rep.table()


def _nan_batch():
    return [_x().at[3, 2].set(jnp.nan)]


def _zero_channel():
    return [_x().at[:, 5].set(0.0)]


_NORM = {"n": jnp.ones(16), "w": jax.random.normal(jax.random.key(2), (16, 8))}
_NORM_FN = lambda p, x: (x * p["n"][None]) @ p["w"]  # noqa: E731
_P, _FN = _two_layers()

BAD = [
    pytest.param(
        lambda: quant.oneshot(_FN, _P, [_x()], SPEC, method="awesome"),
        ValueError, r"quant\.oneshot: method must be RTN\(\), GPTQ\(\.\.\.\).*'awesome'",
        id="unknown-method",
    ),
    pytest.param(
        lambda: quant.oneshot(_FN, _P, _nan_batch(), SPEC, method="gptq"),
        ValueError, r"non-finite|not finite", id="nan-activations",
    ),
    pytest.param(
        lambda: quant.oneshot(_NORM_FN, _NORM, _zero_channel(), SPEC, method="awq"),
        ValueError, r"quant\.awq_scales: input channel 5 of 'w' is all zero", id="awq-zero-channel",
    ),
    pytest.param(
        lambda: quant.oneshot(_NORM_FN, _NORM, _zero_channel(), SPEC, method="smoothquant"),
        ValueError, r"quant\.smooth_scales: input channel 5 of 'w' is all zero",
        id="smoothquant-zero-channel",
    ),
    pytest.param(
        lambda: quant.oneshot(_NORM_FN, _NORM, [_x()], SPEC, method=quant.SmoothQuant(alpha=1.5)),
        ValueError, r"quant\.SmoothQuant: alpha .* must be a number in \[0, 1\], got 1\.5",
        id="alpha-above-1",
    ),
    pytest.param(
        lambda: quant.smooth_scales([jnp.ones((4, 2))], jnp.ones(4), alpha=-0.1, path="mlp/up"),
        ValueError, r"quant\.smooth_scales: alpha .* got -0\.1 for 'mlp/up'", id="alpha-below-0",
    ),
    pytest.param(
        lambda: quant.awq_scales([jnp.ones((4, 2))], jnp.eye(4),
                                 jnp.array([1.0, jnp.inf, 1.0, 1.0]), SPEC, path="attn/q"),
        ValueError, r"quant\.awq_scales: .* of 'attn/q' are not finite \(channel 1: inf\)",
        id="awq-inf-activation",
    ),
    pytest.param(
        lambda: quant.hqq(jnp.ones((16, 4)), QuantSpec(fmt="nf4", axis=-1), path="k"),
        ValueError, r"quant\.hqq: HQQ needs an integer format .* for 'k'", id="hqq-nf4",
    ),
    pytest.param(
        lambda: quant.hqq(jnp.ones((16, 4)), SPEC, p=1.5, path="k"),
        ValueError, r"quant\.hqq: p must be a number in \(0, 1\], got 1\.5 for 'k'", id="hqq-p",
    ),
    pytest.param(
        lambda: quant.hqq(jnp.ones((16, 4)).at[0, 0].set(jnp.nan), SPEC, path="k"),
        ValueError, r"quant\.hqq: 'k' has 1 non-finite", id="hqq-nan-weight",
    ),
    pytest.param(
        lambda: quant.GPTQ(damp=float("nan")), ValueError,
        r"quant\.GPTQ: damp must be finite and >= 0, got nan", id="gptq-nan-damp",
    ),
    pytest.param(
        lambda: quant.GPTQ(block_size=1.5), TypeError,
        r"quant\.GPTQ: block_size must be an int, got 1\.5", id="gptq-float-block",
    ),
    pytest.param(
        lambda: quant.AWQ(act="mean"), ValueError,
        r"quant\.AWQ: act must be 'rms' or 'absmax', got 'mean'", id="awq-act",
    ),
    pytest.param(
        lambda: quant.HQQ(iters=0), ValueError,
        r"quant\.HQQ: iters must be an int >= 1, got 0", id="hqq-iters",
    ),
    pytest.param(
        lambda: quant.oneshot(_FN, _P, [], SPEC), ValueError, r"quant\.oneshot: batches is empty",
        id="no-batches",
    ),
    pytest.param(
        lambda: jax.jit(lambda p: quant.oneshot(_FN, p, [_x()], SPEC)[0])(_P),
        TypeError, r"quant\.oneshot: params leaf '\w+' is traced: .* outside jax\.jit",
        id="traced-params",
    ),
]  # fmt: skip


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_tied_embedding_stays_float_by_default_and_quantizes_when_named():
    k = jax.random.split(jax.random.key(9), 2)
    p = {"embed": jax.random.normal(k[0], (16, 8)), "w": jax.random.normal(k[1], (8, 8))}
    fn = lambda p, ids: jnp.tanh(p["embed"][ids] @ p["w"]) @ p["embed"].T  # noqa: E731
    ids = [jax.random.randint(jax.random.key(b), (4, 6), 0, 16) for b in range(2)]
    spec = QuantSpec(8, axis=-1)
    q, rep = quant.oneshot(fn, p, ids, spec, method="gptq")
    assert isinstance(q["w"], quant.QArray) and isinstance(q["embed"], jax.Array)
    assert [r.path for r in rep.rows] == ["w"] and "gathered" in rep.skipped["embed"]
    q, rep = quant.oneshot(fn, p, ids, [("embed|w", spec)], method="gptq")
    assert isinstance(q["embed"], quant.QArray) and not rep.skipped
