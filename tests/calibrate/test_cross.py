"""``calibrate`` with a reference model: ``Stats.cross = X^T X_ref`` (QEP / GPTAQ statistics).

Checked against NumPy products of the inputs each kernel sees, computed by running the two
models by hand: dense layers, a scanned stack (per-layer cross), a kernel used twice, and
``sequential(..., cross=True)`` whose reference is the float model.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import calibrate

RNG = np.random.default_rng(0)


def arr(*shape):
    return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def mlp(p, x):
    h1 = jax.nn.relu(x @ p["l1"])
    h2 = jnp.tanh(h1 @ p["l2"])
    return h2 @ p["l3"], (h1, h2)


P = {"l1": arr(4, 6), "l2": arr(6, 5), "l3": arr(5, 3)}
BATCHES = [arr(3, 4), arr(5, 4)]


def _cross(xs, xrefs):
    return sum(
        np.asarray(a, np.float64).reshape(-1, a.shape[-1]).T
        @ np.asarray(b, np.float64).reshape(-1, b.shape[-1])
        for a, b in zip(xs, xrefs, strict=True)
    )


def test_cross_of_every_kernel_equals_numpy_products_of_both_models_inputs():
    q = {**P, "l1": jnp.round(P["l1"]), "l2": P["l2"] * 0.9}  # l3 unchanged (shared object)
    s = calibrate.statistics(mlp, q, BATCHES, reference=P)
    mine = [mlp(q, b)[1] for b in BATCHES]
    theirs = [mlp(P, b)[1] for b in BATCHES]
    np.testing.assert_allclose(s["l1"].cross, _cross(BATCHES, BATCHES), rtol=1e-5)
    for i, path in enumerate(["l2", "l3"]):
        want = _cross([m[i] for m in mine], [t[i] for t in theirs])
        np.testing.assert_allclose(s[path].cross, want, rtol=1e-4, atol=1e-4)
        # the other statistics are the params' own, as without a reference
        plain = calibrate.statistics(mlp, q, BATCHES)[path]
        np.testing.assert_allclose(s[path].xtx, plain.xtx, rtol=1e-6)
        np.testing.assert_array_equal(s[path].count, plain.count)


def test_identical_reference_gives_cross_equal_to_xtx_and_none_without_reference():
    s = calibrate.statistics(mlp, P, BATCHES, reference=dict(P))
    for st in s.values():
        np.testing.assert_array_equal(st.cross, st.xtx)
    assert all(st.cross is None for st in calibrate.statistics(mlp, P, BATCHES).values())


def test_cross_jitted_caller_and_copy_of_equal_leaves():
    # leaves equal in value but not the same object: carried twice, same answer
    copy = jax.tree.map(lambda x: x + 0.0, P)
    s = calibrate.statistics(mlp, P, BATCHES, reference=copy)
    for st in s.values():
        np.testing.assert_allclose(st.cross, st.xtx, rtol=1e-5, atol=1e-5)


def test_scanned_stack_gets_a_cross_per_layer():
    def fn(p, x):
        def body(h, w):
            return jnp.tanh(h @ w), h

        return jax.lax.scan(body, x, p["stack"])

    p = {"stack": arr(3, 4, 4)}
    ref = {"stack": p["stack"].at[0].multiply(1.5)}
    s = calibrate.statistics(fn, p, BATCHES, reference=ref)["stack"]
    assert s.cross.shape == (3, 4, 4) and s.lead_axes == (0,)
    mine = [fn(p, b)[1] for b in BATCHES]  # (3, n, 4): the input of each layer
    theirs = [fn(ref, b)[1] for b in BATCHES]
    for layer in range(3):
        want = _cross([m[layer] for m in mine], [t[layer] for t in theirs])
        np.testing.assert_allclose(s.cross[layer], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(s.at(layer).cross, want, rtol=1e-4, atol=1e-4)


def test_kernel_used_twice_sums_the_cross_of_both_sites():
    def fn(p, x):
        return (x @ p["a"]) @ p["w"] + x @ p["w"]

    p = {"a": arr(4, 4), "w": arr(4, 2)}
    ref = {"a": p["a"] * 2.0, "w": p["w"]}
    s = calibrate.statistics(fn, p, BATCHES, reference=ref)["w"]
    want = _cross(
        [x @ p["a"] for x in BATCHES] + BATCHES, [x @ ref["a"] for x in BATCHES] + BATCHES
    )
    np.testing.assert_allclose(s.cross, want, rtol=1e-4, atol=1e-4)


def test_sequential_cross_compares_with_the_float_model():
    seen = {}

    def compress(path, w, stats):
        seen[path] = stats
        return jnp.round(w * 2) / 2

    new = calibrate.sequential(mlp, P, BATCHES, compress, cross=True)
    # l3 sees the inputs of the model with l1, l2 rounded; the reference is the float model
    partial = {**new, "l3": P["l3"]}
    mine = [mlp(partial, b)[1][1] for b in BATCHES]
    theirs = [mlp(P, b)[1][1] for b in BATCHES]
    np.testing.assert_allclose(seen["l3"].cross, _cross(mine, theirs), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(seen["l1"].cross, seen["l1"].xtx)
    without = {}
    calibrate.sequential(mlp, P, BATCHES, lambda p, w, s: without.setdefault(p, s) and w)
    assert without["l3"].cross is None


def test_zero_inputs_give_an_exactly_zero_cross():
    s = calibrate.statistics(mlp, {**P, "l1": P["l1"] * 0}, BATCHES, reference=P)["l2"]
    assert float(jnp.abs(s.cross).sum()) == 0.0  # the params' l2 input is relu(0) = 0
