"""calibrate.fisher: the empirical Fisher diagonal (squared gradients summed over batches)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxslim import calibrate


def _least_squares():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(3), jnp.float32),
    }
    batches = [
        (jnp.asarray(rng.standard_normal((5, 6)), jnp.float32),
         jnp.asarray(rng.standard_normal((5, 3)), jnp.float32))
        for _ in range(3)
    ]  # fmt: skip

    def loss(p, batch):
        x, y = batch
        return 0.5 * jnp.sum((x @ p["w"] + p["b"][None] - y) ** 2)

    return params, batches, loss


def test_diag_is_the_sum_of_squared_analytic_gradients():
    params, batches, loss = _least_squares()
    got = calibrate.fisher(loss, params, batches, where=r"^(w|b)$")
    w, b = (np.asarray(params[k], np.float64) for k in ("w", "b"))
    want_w, want_b = np.zeros_like(w), np.zeros_like(b)
    for x, y in batches:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        r = x @ w + b - y  # d/dW 0.5||xW + b - y||^2 = x^T r, d/db = sum_rows r
        want_w += (x.T @ r) ** 2
        want_b += r.sum(0) ** 2
    assert list(got) == ["b", "w"]  # jax.tree order
    assert got["w"].count == got["b"].count == 3
    assert got["w"].diag.dtype == jnp.float32 and got["w"].diag.shape == (6, 3)
    np.testing.assert_allclose(got["w"].diag, want_w, rtol=1e-5)
    np.testing.assert_allclose(got["b"].diag, want_b, rtol=1e-5)


def test_default_where_selects_the_matrices_only_and_one_compile_per_shape():
    params, batches, loss = _least_squares()
    traces = []

    def counted(p, batch):
        traces.append(1)
        return loss(p, batch)

    got = calibrate.fisher(counted, params, batches)
    assert list(got) == ["w"]
    # one abstract evaluation (the output check) and one jit trace for three same-shaped batches
    assert len(traces) == 2
    traces.clear()
    x, y = batches[0]
    calibrate.fisher(lambda p, b: counted(p, b), params, [*batches, (x[:2], y[:2]), (x, y)])
    assert len(traces) == 4  # the same for each of the two batch shapes


def test_bfloat16_params_give_float32_diag_and_params_are_untouched():
    params, batches, loss = _least_squares()
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    before = jax.tree.map(np.asarray, low)
    cast = [tuple(a.astype(jnp.bfloat16) for a in b) for b in batches]
    got = calibrate.fisher(lambda p, b: loss(p, b).astype(jnp.float32), low, cast)
    assert got["w"].diag.dtype == jnp.float32
    ref = calibrate.fisher(loss, jax.tree.map(lambda a: a.astype(jnp.float32), low), batches)
    np.testing.assert_allclose(got["w"].diag, ref["w"].diag, rtol=0.1)
    for k in params:
        np.testing.assert_array_equal(np.asarray(low[k]), before[k])


def test_linen_client_paths_and_values_equal_jax_grad():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(jax.nn.gelu(nn.Dense(8)(x)))

    model = MLP()
    x = jax.random.normal(jax.random.key(0), (4, 5))
    variables = model.init(jax.random.key(1), x)
    ys = jnp.array([0, 1, 1, 0])

    def loss(v, batch):
        logits = model.apply(v, batch[0])
        return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(4), batch[1]])

    batches = [(x, ys), (x * 2, 1 - ys)]
    got = calibrate.fisher(loss, variables, batches)
    assert list(got) == ["params/Dense_0/kernel", "params/Dense_1/kernel"]
    grads = [jax.grad(loss)(variables, b)["params"] for b in batches]
    for name in ("Dense_0", "Dense_1"):
        want = sum(np.asarray(g[name]["kernel"], np.float64) ** 2 for g in grads)
        np.testing.assert_allclose(got[f"params/{name}/kernel"].diag, want, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize(
    ("change", "err", "match"),
    [
        ({"loss": "nll"}, TypeError, r"calibrate.fisher: loss_fn must be a callable"),
        ({"loss": lambda p, b: b[0] @ p["w"]}, TypeError, r"float scalar, got float32 \(5, 3\)"),
        ({"loss": lambda p, b: jnp.int32(1)}, TypeError, "must return a float scalar"),
        ({"batches": []}, ValueError, "batches is empty"),
        ({"where": "nothing"}, ValueError, "where='nothing' selects no floating-point"),
        ({"where": 3}, TypeError, "where must be None, a regex"),
        ({"nan_batch": 1}, ValueError, r"the loss is nan on batch 1"),
        (
            {"loss": lambda p, b: jnp.sum(jnp.sqrt(jnp.abs(p["w"] * 0)))},
            ValueError,
            r"gradient of 'w' has 18 non-finite",
        ),
        (
            {"loss": lambda p, b: jnp.sum(b[0] @ p["w"].T)},
            TypeError,
            r"calibrate.fisher: loss_fn failed on batch 0: .*dot_general",
        ),
    ],
)
def test_bad_input(change, err, match):
    params, batches, loss = _least_squares()
    if "nan_batch" in change:
        x, y = batches[change["nan_batch"]]
        batches[change["nan_batch"]] = (x.at[0, 0].set(jnp.nan), y)
    with pytest.raises(err, match=match):
        calibrate.fisher(
            change.get("loss", loss),
            params,
            change.get("batches", batches),
            where=change.get("where", "w"),
        )


def test_traced_params_are_rejected():
    params, batches, loss = _least_squares()
    with pytest.raises(TypeError, match="calibrate.fisher: params leaf 'b' is traced"):
        jax.jit(lambda p: calibrate.fisher(loss, p, batches)["w"].diag)(params)
