"""quant.oneshot with GPTQ and sequential=True calibrates inside calibrate.sequential only: no
statistics pass over the float model first (it cost a forward and held every kernel's Hessian
for the whole run)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import calibrate, quant


def _model():
    k = jax.random.split(jax.random.key(0), 3)
    params = {"a": jax.random.normal(k[0], (16, 16)), "b": jax.random.normal(k[1], (16, 8))}
    xs = [jax.random.normal(k[2], (32, 16))]
    return (lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]), params, xs


@pytest.mark.parametrize("sequential", [True, False])
def test_gptq_statistics_passes(monkeypatch, sequential):
    fn, params, xs = _model()
    calls = []
    real = calibrate.statistics
    monkeypatch.setattr(calibrate, "statistics", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = quant.QuantSpec(4, axis=-1, group_size=8)
    q, rep = quant.oneshot(fn, params, xs, spec, method="gptq", sequential=sequential)
    assert len(calls) == (0 if sequential else 1)
    assert [r.path for r in rep.rows] == ["a", "b"]
    # the report's error is measured on each kernel's own calibration inputs: b's are the
    # outputs of the quantized a
    x = np.asarray(xs[0])
    h = (
        np.tanh(x @ np.asarray(quant.dequantize(q["a"])))
        if sequential
        else np.tanh(x @ np.asarray(params["a"]))
    )
    wb, qb = np.asarray(params["b"]), np.asarray(quant.dequantize(q["b"]))
    want = np.linalg.norm(h @ wb - h @ qb) / np.linalg.norm(h @ wb)
    assert rep.rows[1].error == pytest.approx(want, rel=1e-3)
