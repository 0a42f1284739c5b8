"""calibrate on params sharded over 8 simulated CPU devices: the same statistics, params untouched
(shardings kept, nothing gathered)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxslim import calibrate


@pytest.fixture(scope="module", params=["auto", "explicit"])
def mesh(request):
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 host devices"
    kind = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[request.param]
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))


def make_fn(mesh):
    """A two-layer MLP with a scanned stack between; under Explicit axes every matmul names its
    output sharding (rows over "data"), as jax requires when contracted axes are sharded."""
    out = None
    if mesh.axis_types[0] == AxisType.Explicit:
        out = NamedSharding(mesh, P("data", None))

    def mm(a, b):
        return jnp.matmul(a, b, out_sharding=out)

    def fn(p, x):
        h = jax.nn.relu(mm(x, p["up"]))
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(mm(h, w)), None), h, p["stack"])
        return mm(h, p["down"])

    return fn


def _params():
    rng = np.random.default_rng(0)
    return {
        "up": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
        "stack": jnp.asarray(rng.standard_normal((2, 16, 16)) / 4, jnp.float32),
        "down": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
    }


SPECS = {"up": P(None, "model"), "stack": P(None, None, "model"), "down": P("model", None)}


def _batches():
    rng = np.random.default_rng(1)
    return [jnp.asarray(rng.standard_normal((4, 8)), jnp.float32) for _ in range(2)]


def test_sharded_statistics_equal_single_device_and_params_keep_their_shardings(mesh):
    params = _params()
    sharded = {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in params.items()}
    batches = [jax.device_put(b, NamedSharding(mesh, P("data", None))) for b in _batches()]
    fn = make_fn(mesh)
    ref = calibrate.statistics(fn, params, _batches())
    got = calibrate.statistics(fn, sharded, batches)
    assert list(got) == ["up", "stack", "down"]
    for k in ref:
        for field in ("xtx", "sq_norm", "absmax", "count"):
            np.testing.assert_allclose(
                np.asarray(getattr(got[k], field)),
                np.asarray(getattr(ref[k], field)),
                rtol=1e-5,
                atol=1e-5,
            )
    assert got["stack"].xtx.shape == (2, 16, 16)
    for k, v in sharded.items():
        assert v.sharding == NamedSharding(mesh, SPECS[k])
        np.testing.assert_array_equal(np.asarray(v), np.asarray(params[k]))


def test_sequential_keeps_each_kernels_sharding(mesh):
    params = _params()
    sharded = {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in params.items()}
    batches = [jax.device_put(b, NamedSharding(mesh, P("data", None))) for b in _batches()]
    fn = make_fn(mesh)

    def compress(path, w, stats):
        return jnp.round(w * 4) / 4

    ref = calibrate.sequential(fn, params, _batches(), compress)
    got = calibrate.sequential(fn, sharded, batches, compress)
    for k in params:
        assert got[k].sharding.is_equivalent_to(sharded[k].sharding, got[k].ndim)
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]))


def test_fisher_diag_equals_single_device_and_keeps_each_leafs_sharding(mesh):
    params = _params()
    sharded = {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in params.items()}
    batches = [jax.device_put(b, NamedSharding(mesh, P("data", None))) for b in _batches()]
    fn = make_fn(mesh)

    def loss(p, x):
        return jnp.sum(fn(p, x) ** 2)

    ref = calibrate.fisher(loss, params, _batches())
    got = calibrate.fisher(loss, sharded, batches)
    assert list(got) == list(ref) == ["down", "stack", "up"]
    for k in ref:
        assert got[k].diag.sharding.is_equivalent_to(sharded[k].sharding, got[k].diag.ndim)
        np.testing.assert_allclose(np.asarray(got[k].diag), np.asarray(ref[k].diag), rtol=1e-4)
