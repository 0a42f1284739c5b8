"""GPTQ with activation ordering (``act_order=True``: static groups, rows by decreasing
``diag(H)``) against a NumPy statement of the algorithm, through ``quant.oneshot`` and recipes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxslim import quant, recipe
from jaxslim.quant import QuantSpec

JIT = [lambda f: f, jax.jit]


def act_order_reference(w, h, bits, group, damp=0.01):
    """Static groups + act order: each group's symmetric scale from the original rows
    ``[g * group, (g + 1) * group)``; rows then rounded in decreasing ``diag(H)`` order (ties in
    kernel order) with the OBS update of Algorithm 1 over the permuted ``H``."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    k = w.shape[0]
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scales = np.zeros_like(w)
    for g0 in range(0, k, group):
        g = w[g0 : g0 + group]
        amax = np.maximum(-np.minimum(g.min(0), 0), np.maximum(g.max(0), 0))
        s = np.maximum(amax.astype(np.float32) / np.float32((qmax - qmin) / 2), 1.2e-7)
        scales[g0 : g0 + group] = s.astype(np.float64)
    perm = np.argsort(-np.diag(h), kind="stable")
    w, h, scales = w[perm], h[perm][:, perm], scales[perm]
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H^-1 = U^T U
    codes = np.zeros_like(w)
    for i in range(k):
        c = np.clip(np.round(w[i] / scales[i]), qmin, qmax)
        codes[i] = c
        e = (w[i] - c * scales[i]) / u[i, i]
        w[i + 1 :] -= np.outer(u[i, i + 1 :], e)
    out = np.zeros_like(codes)
    out[perm] = codes
    return out


def _data(k, n, rows=512, seed=0):
    """Correlated inputs whose columns differ in scale by up to 30x (what act order is for)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, k)) @ rng.normal(size=(k, k)) / np.sqrt(k)
    x = x * np.exp(rng.uniform(0, np.log(30), size=k))
    w = rng.normal(size=(k, n))
    return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("group,block", [(16, 32), (16, 8), (None, 16)])
def test_act_order_matches_numpy_reference(wrap, group, block):
    x, w = _data(64, 12)
    h = quant.gptq_hessian(x)
    spec = QuantSpec(4, axis=-1, group_size=group)
    q = wrap(lambda w, h: quant.gptq(w, h, spec, block_size=block, act_order=True))(w, h)
    want = act_order_reference(w, h, 4, group or 64)
    got = np.asarray(q.codes())
    assert (got == want).mean() >= 0.99  # float32 vs float64 may flip a rare near-tie
    assert q.scale.shape == quant.quantize(w, spec).scale.shape
    # The stored scales are the original kernel's: round to nearest's, exactly.
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(quant.quantize(w, spec).scale))


def test_act_order_with_a_shorter_last_group_matches_the_reference():
    # K = 72 = 4 x 16 + 8: the padded rows go last and never take part.
    x, w = _data(72, 10, seed=3)
    h = quant.gptq_hessian(x)
    spec = QuantSpec(4, axis=-1, group_size=16)
    q = quant.gptq(w, h, spec, act_order=True)
    want = act_order_reference(w, h, 4, 16)
    assert (np.asarray(q.codes()) == want).mean() >= 0.99


@settings(max_examples=6)  # each example compiles GPTQ once
@given(
    spec=st.sampled_from(
        [
            QuantSpec(4, axis=-1),
            QuantSpec(4, axis=-1, group_size=8),
            QuantSpec(3, axis=-1, group_size=5, symmetric=False),
            QuantSpec(8),
            QuantSpec(4, group_size=3, group_axis=-1),
        ]
    ),
    seed=st.integers(0, 50),
    conv=st.booleans(),
)
def test_act_order_with_identity_hessian_is_round_to_nearest(spec, seed, conv):
    # H = I carries no error, whatever the order: GPTQ with act order is round to nearest.
    shape = (3, 16, 6) if conv else (48, 6)
    w = jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
    k = int(np.prod(shape[:-1]))
    q = quant.gptq(w, jnp.eye(k), spec, act_order=True)
    want = quant.quantize(w, spec)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_act_order_lowers_the_output_error_on_uneven_inputs():
    # Summed over seeds: act order helps on average, not on every kernel.
    spec = QuantSpec(4, axis=-1, group_size=32)
    plain = ordered = 0.0
    for seed in range(6):
        x, w = _data(128, 32, seed=seed)
        h = quant.gptq_hessian(x)
        err = lambda v, x=x, w=w: float(jnp.sum((x @ w - x @ v) ** 2))
        plain += err(quant.gptq(w, h, spec).dequantize())
        ordered += err(quant.gptq(w, h, spec, act_order=True).dequantize())
    assert ordered < 0.95 * plain


def test_act_order_dead_inputs_stay_zero_and_the_rest_matches_the_reference():
    x, w = _data(32, 8, seed=5)
    x = x.at[:, 7].set(0.0)  # an input that is always zero
    h = quant.gptq_hessian(x)
    q = quant.gptq(w, h, QuantSpec(8, axis=-1), act_order=True)
    assert np.all(np.asarray(q.codes())[7] == 0)
    assert np.all(np.isfinite(np.asarray(q.dequantize())))


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_act_order_must_be_a_bool(bad):
    w, h = jnp.ones((8, 4)), jnp.eye(8)
    with pytest.raises(TypeError, match=r"quant\.gptq: act_order must be a bool, got"):
        quant.gptq(w, h, QuantSpec(4), act_order=bad)
    with pytest.raises(TypeError, match=r"quant\.GPTQ: act_order must be a bool"):
        quant.GPTQ(act_order=bad)


def _fn(p, batch):
    (x,) = batch
    return jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"]


def test_oneshot_passes_act_order_to_gptq():
    rng = np.random.default_rng(0)
    params = {
        "a": {"kernel": jnp.asarray(rng.normal(size=(32, 48)), jnp.float32)},
        "b": {"kernel": jnp.asarray(rng.normal(size=(48, 16)), jnp.float32)},
    }
    x, _ = _data(32, 1, rows=256, seed=1)
    spec = QuantSpec(4, axis=-1, group_size=16)
    out, _ = quant.oneshot(_fn, params, [(x,)], spec, method=quant.GPTQ(act_order=True))
    # The first kernel's inputs are x itself: its codes are GPTQ with act order on X^T X.
    want = quant.gptq(params["a"]["kernel"], quant.gptq_hessian(x), spec, act_order=True)
    np.testing.assert_array_equal(np.asarray(out["a"]["kernel"].codes()), np.asarray(want.codes()))


def test_recipe_reads_act_order():
    r = recipe.parse(
        """
[quant]
default = {bits = 4, axis = -1, group_size = 32}
method = {name = "gptq", act_order = true}
"""
    )
    assert r.method == quant.GPTQ(act_order=True)
    with pytest.raises(recipe.RecipeError, match=r"quant\.method\.act_order: .*must be a bool"):
        recipe.parse(
            """
[quant]
default = {bits = 4, axis = -1, group_size = 32}
method = {name = "gptq", act_order = "static"}
"""
        )
