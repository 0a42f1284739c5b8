"""GPTQ against a numpy statement of the paper's algorithm, the blocked weight-only qdot path, conv
patches and calibrated quantize_model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from jaxslim import quant
from jaxslim.flax.quant import conv_patches, quantize_model
from jaxslim.quant import QArray, QuantSpec
from jaxslim.quant._dot import INT_MIN_ROWS, blocked_path_applies
from jaxslim.quant._spec import layout

JIT = [lambda f: f, jax.jit]


def gptq_reference(w, h, bits, group, damp=0.01):
    """Algorithm 1 of Frantar et al. (2023), one row at a time, symmetric signed codes with one
    scale per output column and group of ``group`` consecutive rows (``group = K``: per channel,
    scales from the original kernel)."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    k = w.shape[0]
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H^-1 = U^T U
    codes = np.zeros_like(w)
    for i in range(k):
        if i % group == 0:
            g = w[i : i + group]
            amax = np.maximum(-np.minimum(g.min(0), 0), np.maximum(g.max(0), 0))
            s = np.maximum(
                amax.astype(np.float32) / np.float32((qmax - qmin) / 2), np.finfo(np.float32).eps
            ).astype(np.float64)
        c = np.clip(np.round(w[i] / s), qmin, qmax)
        codes[i] = c
        e = (w[i] - c * s) / u[i, i]
        w[i + 1 :] -= np.outer(u[i, i + 1 :], e)
    return codes


def _data(k, n, rows=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, k)) @ rng.normal(size=(k, k)) / np.sqrt(k)  # correlated inputs
    w = rng.normal(size=(k, n))
    return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("group,block", [(16, 32), (None, 8)])
def test_gptq_matches_numpy_reference(wrap, group, block):
    x, w = _data(64, 12)
    h = quant.gptq_hessian(x)
    spec = QuantSpec(4, axis=-1, group_size=group)
    q = wrap(lambda w, h: quant.gptq(w, h, spec, block_size=block))(w, h)
    want = gptq_reference(w, h, 4, group or 64)
    got = np.asarray(q.codes())
    assert (got == want).mean() >= 0.99  # float32 vs float64 may flip a rare near-tie
    assert q.scale.shape == layout(spec, w.shape).scale_shape


@settings(max_examples=7)  # each example compiles GPTQ once
@given(
    spec=st.sampled_from(
        [
            QuantSpec(4, axis=-1),
            QuantSpec(8),
            QuantSpec(4, axis=-1, group_size=8),
            QuantSpec(3, axis=-1, group_size=4, symmetric=False),
            QuantSpec(2, signed=False, axis=-1),
            QuantSpec(4, axis=(0, -1), group_size=8),
            QuantSpec(4, axis=-1, group_size=8),
            QuantSpec(8, axis=0),
            QuantSpec(4, group_size=3, group_axis=-1),
        ]
    ),
    seed=st.integers(0, 50),
    conv=st.booleans(),
)
def test_gptq_with_identity_hessian_is_round_to_nearest(spec, seed, conv):
    # H = I: no input is correlated with another, so no error is carried and GPTQ is plain
    # rounding with min/max scales, code for code.
    shape = (3, 16, 6) if conv else (48, 6)
    w = jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
    k = int(np.prod(shape[:-1]))
    q = quant.gptq(w, jnp.eye(k), spec, block_size=16)
    want = quant.quantize(w, spec)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert q.spec == spec and q.shape == w.shape and q.dtype == w.dtype


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(4, axis=-1, group_size=16),
        QuantSpec(3, axis=-1),
        QuantSpec(4, axis=-1, group_size=16, symmetric=False),
    ],
    ids=str,
)
@pytest.mark.parametrize("clip", [1, 10])
def test_gptq_lowers_the_layer_output_error(spec, clip):
    x, w = _data(96, 24, seed=1)
    q = quant.gptq(w, quant.gptq_hessian(x), spec, clip_candidates=clip)
    err = lambda v: float(jnp.sum((x @ w - x @ v) ** 2))
    assert err(quant.dequantize(q)) < 0.8 * err(quant.fake_quant(w, spec))


def test_gptq_dead_inputs_and_bad_input():
    x, w = _data(32, 4)
    x = x.at[:, 5].set(0.0)  # an input that is always zero: its weights do not matter
    q = quant.gptq(w, quant.gptq_hessian(x), QuantSpec(4, axis=-1))
    assert np.asarray(q.codes())[5].tolist() == [0, 0, 0, 0]
    assert np.isfinite(np.asarray(quant.dequantize(q))).all()
    h = quant.gptq_hessian(x)
    with pytest.raises(ValueError, match=r"hessian must have shape \(32, 32\).*'layer'"):
        quant.gptq(w, h[:4, :4], QuantSpec(4), path="layer")
    with pytest.raises(TypeError, match="QuantSpec"):
        quant.gptq(w, h, "int4")
    with pytest.raises(ValueError, match="ndim >= 2"):
        quant.gptq(w[:, 0], h, QuantSpec(4))
    # A group size that does not divide K = 32 is a shorter last group (32 = 6 x 5 + 2), not an
    # error: 7 scale rows; with H = I, GPTQ is round-to-nearest on the same groups.
    q5 = quant.gptq(w, jnp.eye(32), QuantSpec(4, axis=-1, group_size=5), path="layer")
    assert q5.scale.shape[0] == 7
    r5 = quant.quantize(w, QuantSpec(4, axis=-1, group_size=5))
    np.testing.assert_array_equal(np.asarray(q5.dequantize()), np.asarray(r5.dequantize()))
    with pytest.raises(ValueError, match=r"group_axis 3 is out of range.*'layer'"):
        quant.gptq(w, h, QuantSpec(4, axis=-1, group_size=5, group_axis=3), path="layer")
    with pytest.raises(ValueError, match="clip_candidates"):
        quant.gptq(w, h, QuantSpec(4), clip_candidates=0)
    with pytest.raises(ValueError, match="floating"):
        quant.gptq_hessian(jnp.ones((3, 2), jnp.int32))


@pytest.mark.parametrize(
    "strides,padding,dil", [((1,), "SAME", (1,)), ((2,), [(2, 1)], (1,)), ((1,), "VALID", (2,))]
)
def test_conv_patches_order_matches_the_kernel(strides, padding, dil):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 11, 3)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(3, 3, 5)).astype(np.float32))
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NWC", "WIO", "NWC"))
    y = lax.conv_general_dilated(
        x,
        k,
        strides,
        padding,
        rhs_dilation=dil,
        dimension_numbers=dn,
        precision=lax.Precision.HIGHEST,
    )
    p = conv_patches(x, k.shape, strides, padding, rhs_dilation=dil, dimension_numbers=dn)
    np.testing.assert_allclose(
        np.asarray(jnp.matmul(p, k.reshape(-1, 5), precision=lax.Precision.HIGHEST)),
        np.asarray(y),
        rtol=1e-5,
        atol=1e-5,
    )


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 32, kernel_size=(3,), rngs=rngs)
        self.head = nnx.Linear(32 * 8, 6, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.conv(x))
        return self.head(h.reshape(h.shape[0], -1))


def test_quantize_model_with_calibration_beats_round_to_nearest():
    net = _Net(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(128, 8, 2)) @ np.array([[1.0, 0.9], [0.0, 0.4]]), jnp.float32)
    want = net(x)
    rules = [("conv", QuantSpec(3, axis=(0, -1))), (None, QuantSpec(3, axis=-1, group_size=32))]
    rtn, cal = nnx.clone(net), nnx.clone(net)
    quantize_model(rtn, rules)
    report = quantize_model(cal, rules, calibration=[x[:64], x[64:]])
    assert all(isinstance(m.kernel[...], QArray) for m in (cal.conv, cal.head))
    assert report.bytes_after == quantize_model(nnx.clone(net), rules).bytes_after
    err = lambda m: float(jnp.mean((m(x) - want) ** 2))
    assert err(cal) < 0.8 * err(rtn)
    with pytest.raises(ValueError, match="not both"):
        quantize_model(nnx.clone(net), rules, calibration=x, observer=quant.mse_observer)
    with pytest.raises(ValueError, match="without calibration"):
        quantize_model(nnx.clone(net), rules, method=quant.GPTQ(damp=0.1))


class _Stack(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return x


def _hessian(rows):
    rows = rows.reshape(-1, rows.shape[-1]).astype(jnp.float32)
    return jnp.matmul(rows.T, rows, precision=lax.Precision.HIGHEST) / rows.shape[0]


def _assert_same_qarray(got, want):
    assert isinstance(got, QArray) and got.spec == want.spec
    np.testing.assert_array_equal(np.asarray(got.values), np.asarray(want.values))
    np.testing.assert_allclose(np.asarray(got.scale), np.asarray(want.scale), rtol=1e-6)


@pytest.mark.parametrize("act_bits", [None, 8])
def test_calibrated_quantize_model_is_gptq_on_the_inputs_of_the_quantized_model(act_bits):
    """Layer after layer: kernel i is ``quant.gptq(w_i, X_i^T X_i / n)``, ``X_i`` the rows layer i
    sees in the *final* model (earlier layers quantized, with their ``act_bits``), over both
    batches; the report lists every kernel with its bytes."""
    net = _Stack(nnx.Rngs(0))
    w = [layer.kernel[...] for layer in net.layers]
    rng = np.random.default_rng(1)
    xs = [jnp.asarray(rng.normal(size=(n, 8)), jnp.float32) for n in (24, 40)]
    rules = [("layers/1/", QuantSpec(8, axis=-1)), (None, QuantSpec(4, axis=-1))]
    report = quantize_model(net, rules, calibration=xs, act_bits=act_bits)
    h = list(xs)
    for i, layer in enumerate(net.layers):
        spec = rules[0][1] if i == 1 else rules[1][1]
        want = quant.gptq(w[i], _hessian(jnp.concatenate(h)), spec)
        _assert_same_qarray(layer.kernel[...], want)
        h = [jnp.tanh(layer(x)) for x in h]
    assert [(r.path, r.bytes_after) for r in report.rows] == [
        (f"layers/{i}/kernel", layer.kernel[...].nbytes) for i, layer in enumerate(net.layers)
    ]


def test_calibrated_conv_kernel_is_gptq_on_its_im2col_patches():
    """A Conv kernel's Hessian is that of its patches (``conv_patches``), the head's that of the
    quantized conv's output; ``method``'s options reach ``quant.gptq``."""
    net = _Net(nnx.Rngs(0))
    wc, wh = net.conv.kernel[...], net.head.kernel[...]
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(48, 8, 2)), jnp.float32)
    rules = [("conv", QuantSpec(3, axis=(0, -1))), (None, QuantSpec(3, axis=-1, group_size=32))]
    opts = {"damp": 0.05, "block_size": 16}
    quantize_model(net, rules, calibration=x, method=quant.GPTQ(**opts))
    dn = lax.conv_dimension_numbers(x.shape, wc.shape, ("NWC", "WIO", "NWC"))
    patches = conv_patches(x, wc.shape, (1,), "SAME", dimension_numbers=dn)
    want = quant.gptq(wc, _hessian(patches), rules[0][1], **opts)
    _assert_same_qarray(net.conv.kernel[...], want)
    hidden = jax.nn.relu(net.conv(x)).reshape(x.shape[0], -1)
    want = quant.gptq(wh, _hessian(hidden), rules[1][1], **opts)
    _assert_same_qarray(net.head.kernel[...], want)


def test_a_kernel_that_feeds_no_matmul_rounds_to_nearest_under_calibration():
    class Skip(nnx.Module):
        def __init__(self, rngs):
            self.used = nnx.Linear(4, 4, rngs=rngs)
            self.unused = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return self.used(x)

    net = Skip(nnx.Rngs(0))
    w = net.unused.kernel[...]
    spec = QuantSpec(4, axis=-1)
    quantize_model(net, spec, calibration=jnp.ones((3, 4)))
    _assert_same_qarray(net.unused.kernel[...], quant.quantize(w, spec))


DN = (((1,), (0,)), ((), ()))
BLOCK_SPECS = [
    QuantSpec(8, axis=-1),
    QuantSpec(4, axis=-1, group_size=32),
    QuantSpec(4, axis=-1, group_size=32, symmetric=False),
    QuantSpec(2, axis=0),
    QuantSpec(8, signed=False, axis=-1),
    QuantSpec(fmt="e4m3", axis=-1),
    QuantSpec(4, group_size=8, group_axis=-1),
    QuantSpec(4, axis=-1, group_size=512),
]


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("spec", BLOCK_SPECS, ids=str)
def test_blocked_path_equals_dequantize_path(wrap, spec):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(1024, 40)).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(2, 3, 1024)).astype(np.float32))
    q = quant.quantize(w, spec)
    dn = (((2,), (0,)), ((), ()))
    assert blocked_path_applies(x, q, dn)
    y = wrap(lambda x, q: quant.qdot_general(x, q, dn, impl="blocked"))(x, q)
    want = np.einsum(
        "abk,kn->abn", np.asarray(x, np.float64), np.asarray(quant.dequantize(q), np.float64)
    )
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)
    gx = jax.grad(lambda x: quant.qdot_general(x, q, dn, impl="blocked").sum())(x)
    np.testing.assert_allclose(
        np.asarray(gx)[0, 0], np.asarray(quant.dequantize(q)).sum(1), rtol=1e-5, atol=1e-5
    )


def test_auto_picks_the_measured_fastest_path():
    rng = np.random.default_rng(1)
    wq = quant.quantize(
        jnp.asarray(rng.normal(size=(512, 64)).astype(np.float32)), QuantSpec(8, axis=-1)
    )
    act = QuantSpec(8, axis=0)

    def prims(m, **kw):
        x = jnp.ones((m, 512))
        jaxpr = jax.make_jaxpr(lambda x, q: quant.qdot_general(x, q, DN, **kw))(x, wq)
        return str(jaxpr)

    assert jax.default_backend() == "cpu"
    # One row: the blocked weight-only scan (int8 x int8 is slow for a matrix-vector product).
    assert "scan" in prims(1) and "scan" in prims(1, lhs_spec=act)
    # From INT_MIN_ROWS rows: int8 x int8 products accumulated in int32.
    m = INT_MIN_ROWS["cpu"]
    assert "preferred_element_type=int32" in prims(m, lhs_spec=act)
    assert "scan" in prims(m)  # weight-only: still the blocked path
    y1 = quant.qdot_general(jnp.ones((1, 512)), wq, DN, lhs_spec=act)
    y2 = quant.qdot_general(jnp.ones((1, 512)), wq, DN, lhs_spec=act, impl="int")
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="impl='blocked'"):
        quant.qdot_general(
            jnp.ones((2, 3, 8)),
            quant.quantize(jnp.ones((3, 8, 4)), QuantSpec(8)),
            (((2,), (1,)), ((0,), (0,))),
            impl="blocked",
        )


def test_gptq_on_obs_factor_matches_explicit_obs_loop():
    """gptq runs on jaxslim._obs: per channel (one group), its codes are those of the plain OBS
    row loop with the factor of _obs.obs_factor (numpy), dead inputs zeroed."""
    from jaxslim import _obs

    x, w = _data(32, 6, seed=3)
    x = x.at[:, 5].set(0.0)  # a dead input: its row is zeroed
    h = quant.gptq_hessian(x)
    spec = QuantSpec(4, axis=-1)
    q = quant.gptq(w, h, spec, block_size=8)
    u, dead = _obs.obs_factor(h, 0.01)
    u, wn = np.asarray(u, np.float64), np.where(np.asarray(dead)[:, None], 0.0, np.asarray(w))
    s = np.asarray(q.float_scale(), np.float64).reshape(1, -1)
    codes = np.zeros_like(wn)
    for i in range(wn.shape[0]):
        codes[i] = np.clip(np.round(wn[i] / s[0]), -8, 7)
        e = (wn[i] - codes[i] * s[0]) / u[i, i]
        wn[i + 1 :] -= np.outer(u[i, i + 1 :], e)
    assert np.mean(np.asarray(q.codes()) == codes) > 0.99
    assert bool(jnp.all(q.codes()[5] == 0))


def test_gptq_under_jit_falls_back_to_rtn_on_a_bad_hessian():
    x, w = _data(16, 4)
    spec = QuantSpec(4, axis=-1, group_size=8)
    bad = -jnp.eye(16)  # not positive definite: the _obs factor is all NaN under jit
    q = jax.jit(lambda w, h: quant.gptq(w, h, spec))(w, bad)
    np.testing.assert_array_equal(q.dequantize(), quant.quantize(w, spec).dequantize())
    with pytest.raises(ValueError, match="quant.gptq: the hessian of 'k' is not positive definite"):
        quant.gptq(w, bad, spec, path="k")
