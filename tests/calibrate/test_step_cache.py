"""calibrate reuses the compiled accumulation step across calls with the same function and
shapes (what `sequential` and `stream` do block after block), never stale values."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import calibrate


def _fn_counting(counter):
    def fn(p, x):
        counter.append(1)  # runs once per trace
        return jnp.tanh(x @ p["a"]) @ p["b"]

    return fn


def _params(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"a": jax.random.normal(k1, (6, 5)), "b": jax.random.normal(k2, (5, 3))}


def test_second_call_same_shapes_does_not_trace_again_and_uses_new_values():
    traces = []
    fn = _fn_counting(traces)
    xs = [jax.random.normal(jax.random.key(9), (4, 6))]
    s1 = calibrate.statistics(fn, _params(0), xs)
    n = len(traces)
    p2 = _params(1)
    s2 = calibrate.statistics(fn, p2, xs)
    assert len(traces) == n  # cached: no new trace
    # new parameter values are used: b's input is tanh(x @ a) with the new a
    h = np.tanh(np.asarray(xs[0]) @ np.asarray(p2["a"]))
    np.testing.assert_allclose(np.asarray(s2["b"].xtx), h.T @ h, rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(s1["b"].xtx), np.asarray(s2["b"].xtx))


def test_new_shapes_or_kernels_trace_again():
    traces = []
    fn = _fn_counting(traces)
    p = _params(0)
    calibrate.statistics(fn, p, [jnp.ones((4, 6))])
    n = len(traces)
    calibrate.statistics(fn, p, [jnp.ones((7, 6))])  # another batch shape
    assert len(traces) > n
    n = len(traces)
    calibrate.statistics(fn, p, [jnp.ones((4, 6))], where=lambda path, x: path == "a")
    assert len(traces) > n  # another kernel selection


def test_sequential_equals_uncached_reference():
    # sequential asks for one kernel at a time; run it twice on different values: each result
    # equals the hand-computed sequential statistics of its own params
    fn = _fn_counting([])
    xs = [jax.random.normal(jax.random.key(3), (8, 6))]
    for seed in (0, 1):
        p = _params(seed)
        seen = {}

        def compress(path, w, st, seen=seen):
            seen[path] = np.asarray(st.xtx)
            return jnp.round(w)

        calibrate.sequential(fn, p, xs, compress)
        x = np.asarray(xs[0])
        h = np.tanh(x @ np.round(np.asarray(p["a"])))
        np.testing.assert_allclose(seen["a"], x.T @ x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(seen["b"], h.T @ h, rtol=1e-5, atol=1e-4)
