"""Test configuration: 8 simulated CPU devices, unoptimized XLA codegen and strict numerics (set
before jax is imported)."""

import json
import os
import pathlib

# The environment the user started pytest in. pytest-xdist's workers inherit the controller's
# environment, which this file has already changed, so the controller records the original in
# _JAXSLIM_CALLER_ENV and the workers read it from there.
_CALLER_ENV = json.loads(
    os.environ.setdefault(
        "_JAXSLIM_CALLER_ENV",
        json.dumps({k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}),
    )
)
# XLA's CPU backend without LLVM optimization: the suite compiles thousands of small programs and
# runs few long ones, so compiling faster saves more than the slower code costs (a third to 40 %
# of a test file's CPU time, training loops included; the notebook kernels start without it).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile("jaxslim", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("jaxslim")

import pytest  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parent


class _AsAUserRunsThem:
    """`make test` collects jaxslim's doctests and the notebooks with this suite: they run as a
    user runs them, with jax's default promotion rules, and the notebook kernels start in the
    caller's environment (one CPU device)."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        if TESTS in pathlib.Path(item.path).resolve().parents:
            return (yield)
        saved = {k: os.environ.get(k) for k in _CALLER_ENV}
        _set_env(_CALLER_ENV)
        try:
            with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
                return (yield)
        finally:
            _set_env(saved)


def _set_env(values):
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "standard_promotion: run with jax_numpy_dtype_promotion='standard' (optax.adam's bias "
        "correction computes float ** int32, which strict promotion rejects)",
    )
    config.pluginmanager.register(_AsAUserRunsThem(), "jaxslim-doctests-and-notebooks")


@pytest.fixture(autouse=True)
def _dtype_promotion(request):
    mode = "standard" if request.node.get_closest_marker("standard_promotion") else "strict"
    with jax.numpy_dtype_promotion(mode):
        yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Each compiled XLA executable holds its own memory maps: a worker that runs half the suite
    (and the doctests) can pass the kernel's vm.max_map_count (65530), after which XLA cannot
    load code ("Failed to materialize symbols"). Past 20000 maps, jax's caches are cleared after
    the module."""
    yield
    try:
        with open("/proc/self/maps") as f:
            maps = sum(1 for _ in f)
    except OSError:  # not Linux
        return
    if maps > 20_000:
        jax.clear_caches()
