"""The core on Equinox modules: pruning in an optax chain, quantize_params, trace / prune_channels,
and ``quant.quantized`` running an MLP, a conv net and a multi-head attention block on int8 / int4
weights (forward and ``jax.grad``, jitted and not).

Equinox layouts are ``(out, in)`` for ``eqx.nn.Linear`` and ``(out, in, *kernel)`` for convs, with
conv biases ``(out, 1, ...)``: the tests pass the axes explicitly (``Channels(axis=0)``,
``QuantSpec(axis=0)``) and select kernels with ``structures.kernel_like``.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxslim import prune, quant, splice
from jaxslim.structures import kernel_like


def _mlp(key=0):
    return eqx.nn.MLP(4, 3, width_size=8, depth=2, key=jax.random.key(key))


def _loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def _data():
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (16, 4)), jax.random.normal(ky, (16, 3))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "structure, zeros_of",
    [
        (prune.Unstructured(), lambda w: int((w == 0).sum())),
        (prune.Channels(axis=0), lambda w: int((w == 0).all(axis=1).sum())),  # whole rows
    ],
)
def test_pruner_in_optax_chain_over_filtered_module(jit, structure, zeros_of):
    model = _mlp()
    x, y = _data()
    tx = optax.chain(
        optax.sgd(0.05),  # adam's bias correction breaks strict promotion on optax 0.2.8
        prune.pruner(prune.constant_schedule(0.5), structure=structure, where=kernel_like),
    )
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    def step(model, opt_state):
        grads = eqx.filter_grad(_loss)(model, x, y)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state

    step = eqx.filter_jit(step) if jit else step
    biases = [layer.bias for layer in model.layers]
    for _ in range(3):
        model, opt_state = step(model, opt_state)
    masks = prune.masks_of(opt_state)
    for i, layer in enumerate(model.layers):
        w = np.asarray(layer.weight)
        n = w.size if isinstance(structure, prune.Unstructured) else w.shape[0]
        assert zeros_of(w) == round(0.5 * n)  # exact count: round_half_even(0.5 * n)
        np.testing.assert_array_equal(np.asarray(masks.layers[i].weight), w != 0)
        assert masks.layers[i].bias is None  # 1-D leaves are not selected
        assert not np.array_equal(np.asarray(layer.bias), np.asarray(biases[i]))  # still trained


@pytest.mark.parametrize("jit", [False, True])
def test_quantize_params_per_output_row(jit):
    model = _mlp()
    params, static = eqx.partition(model, eqx.is_array)
    rules = [(kernel_like, quant.QuantSpec(8, axis=0))]  # one scale per row (output) of (out, in)
    fn = lambda p: quant.quantize_params(p, rules)[0]
    q = jax.jit(fn)(params) if jit else fn(params)
    for layer, ql in zip(model.layers, q.layers, strict=True):
        assert isinstance(ql.weight, quant.QArray) and not isinstance(ql.bias, quant.QArray)
        out, inp = layer.weight.shape
        assert ql.weight.scale.shape == (out, 1)
        ref = quant.quantize(layer.weight, quant.QuantSpec(8, axis=0))
        np.testing.assert_array_equal(np.asarray(ql.weight.values), np.asarray(ref.values))
        scale = jnp.max(jnp.abs(layer.weight), axis=1, keepdims=True) / 127.5
        np.testing.assert_allclose(np.asarray(ql.weight.scale), np.asarray(scale), rtol=1e-6)
    deq = eqx.combine(quant.dequantize_params(q), static)
    x, _ = _data()
    err = jnp.max(jnp.abs(jax.vmap(deq)(x) - jax.vmap(model)(x)))
    assert 0 < float(err) < 0.05


def _shrink(model, units):
    """Scales hidden ``units`` of the named layers' outputs by 1e-3 (they score lowest)."""
    scale = jnp.ones(model.layers[0].weight.shape[0]).at[jnp.array(units)].set(1e-3)
    return eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[0].bias),
        model,
        (model.layers[0].weight * scale[:, None], model.layers[0].bias * scale),
    )


def test_trace_and_prune_channels_on_mlp():
    model = _shrink(_mlp(), [1, 3, 4, 6])
    params, static = eqx.partition(model, eqx.is_array)
    fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    x, _ = _data()
    groups = [g for g in splice.trace(fn, params, x) if g.removable]
    assert sorted(sorted(g) for g in groups) == [
        [("layers/0/bias", 0), ("layers/0/weight", 0), ("layers/1/weight", 1)],
        [("layers/1/bias", 0), ("layers/1/weight", 0), ("layers/2/weight", 1)],
    ]
    first = next(g for g in groups if ("layers/0/weight", 0) in list(g))
    new, rep = splice.prune_channels(fn, params, x, sparsity=0.5, groups=[first])
    (g,) = rep.groups
    assert g.removed == (1, 3, 4, 6) and (g.size_before, g.size_after) == (8, 4)
    keep = np.array([0, 2, 5, 7])
    np.testing.assert_array_equal(new.layers[0].weight, params.layers[0].weight[keep])  # rows
    np.testing.assert_array_equal(new.layers[0].bias, params.layers[0].bias[keep])
    np.testing.assert_array_equal(new.layers[1].weight, params.layers[1].weight[:, keep])
    # The smaller model runs through eqx.combine and equals the model with those units zeroed.
    gone = np.array([1, 3, 4, 6])
    zeroed = eqx.tree_at(
        lambda p: (p.layers[0].weight, p.layers[0].bias),
        params,
        (
            params.layers[0].weight.at[gone].set(0),
            params.layers[0].bias.at[gone].set(0),
        ),
    )
    np.testing.assert_allclose(fn(new, x), fn(zeroed, x), rtol=1e-6, atol=1e-6)


class _ConvNet(eqx.Module):
    conv1: eqx.nn.Conv1d
    conv2: eqx.nn.Conv1d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv1d(2, 8, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv1d(8, 4, 3, padding=1, key=k2)
        self.head = eqx.nn.Linear(4, 3, key=k3)

    def __call__(self, x):  # x: (channels, length)
        h = jax.nn.relu(self.conv1(x))
        h = jax.nn.relu(self.conv2(h))
        return self.head(jnp.mean(h, axis=-1))


def test_trace_and_prune_channels_on_conv_net():
    model = _ConvNet(jax.random.key(0))
    weak = jnp.ones(8).at[jnp.array([2, 5])].set(1e-3)  # filters 2 and 5 of conv1 score lowest
    model = eqx.tree_at(
        lambda m: (m.conv1.weight, m.conv1.bias),
        model,
        (model.conv1.weight * weak[:, None, None], model.conv1.bias * weak[:, None]),
    )
    params, static = eqx.partition(model, eqx.is_array)
    fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    x = jax.random.normal(jax.random.key(2), (5, 2, 12))
    groups = [g for g in splice.trace(fn, params, x) if g.removable]
    assert sorted(sorted(g) for g in groups) == [
        [("conv1/bias", 0), ("conv1/weight", 0), ("conv2/weight", 1)],
        [("conv2/bias", 0), ("conv2/weight", 0), ("head/weight", 1)],
    ]
    first = next(g for g in groups if ("conv1/weight", 0) in list(g))
    new, rep = splice.prune_channels(fn, params, x, sparsity=0.25, groups=[first])
    assert rep.groups[0].removed == (2, 5)
    keep = np.array([0, 1, 3, 4, 6, 7])
    assert new.conv1.weight.shape == (6, 2, 3) and new.conv1.bias.shape == (6, 1)
    np.testing.assert_array_equal(new.conv1.weight, params.conv1.weight[keep])  # filters
    np.testing.assert_array_equal(new.conv2.weight, params.conv2.weight[:, keep])
    gone = np.array([2, 5])
    zeroed = eqx.tree_at(
        lambda p: (p.conv1.weight, p.conv1.bias),
        params,
        (params.conv1.weight.at[gone].set(0), params.conv1.bias.at[gone].set(0)),
    )
    np.testing.assert_allclose(fn(new, x), fn(zeroed, x), rtol=1e-5, atol=1e-6)


# --- quant.quantized on real Equinox models ----------------------------------------------------
#
# ``quant.quantized(fn)(qparams, x)`` must equal ``fn(dequantize_params(qparams), x)``: the
# Equinox weights are ``(out, in)`` (``(out, in, k)`` for convs) and reach ``W @ x`` as the *left*
# operand of a vmapped ``dot_general``; conv kernels are dequantized at their use.

_I8 = quant.QuantSpec(8, axis=0)  # one scale per output row / filter
_I4 = quant.QuantSpec(4, axis=0, group_size=8, group_axis=1)  # + groups of 8 inputs


class _Attn(eqx.Module):
    """One pre-norm self-attention block: ``x + mha(ln(x))`` on ``(seq, 16)``."""

    norm: eqx.nn.LayerNorm
    mha: eqx.nn.MultiheadAttention

    def __init__(self, key):
        self.norm = eqx.nn.LayerNorm(16)
        self.mha = eqx.nn.MultiheadAttention(2, 16, key=key)

    def __call__(self, x):
        h = jax.vmap(self.norm)(x)
        return x + self.mha(h, h, h)


def _conv_net(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return eqx.nn.Sequential(
        [
            eqx.nn.Conv1d(8, 16, 3, padding=1, key=k1),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Conv1d(16, 8, 3, padding=1, key=k2),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Lambda(lambda h: jnp.mean(h, axis=-1)),
            eqx.nn.Linear(8, 3, key=k3),
        ]
    )


# name: (model, input batch, quantized leaf paths)
_MODELS = {
    "mlp": (
        lambda k: eqx.nn.MLP(16, 8, width_size=32, depth=2, key=k),
        (5, 16),
        ["layers/0/weight", "layers/1/weight", "layers/2/weight"],
    ),
    "conv": (_conv_net, (5, 8, 12), ["layers/0/weight", "layers/2/weight", "layers/5/weight"]),
    "mha": (
        _Attn,
        (3, 6, 16),
        [f"mha/{n}_proj/weight" for n in ("query", "key", "value", "output")],
    ),
}


@functools.cache
def _quantized_model(name, spec):
    make, shape, paths = _MODELS[name]
    params, static = eqx.partition(make(jax.random.key(0)), eqx.is_array)
    fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    qp, _ = quant.quantize_params(params, [(kernel_like, spec)])
    x = jax.random.normal(jax.random.key(3), shape)
    return fn, params, qp, x, paths


def _paths_of_qarrays(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=quant.is_qarray)[0]
    return [
        "/".join(str(getattr(k, "name", getattr(k, "idx", k))) for k in p)
        for p, leaf in flat
        if quant.is_qarray(leaf)
    ]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("spec", [_I8, _I4], ids=["int8-channel", "int4-g8"])
@pytest.mark.parametrize("name", list(_MODELS))
def test_quantized_equals_model_on_dequantized_params(name, spec, jit):
    fn, params, qp, x, paths = _quantized_model(name, spec)
    assert _paths_of_qarrays(qp) == paths  # exactly the kernels; biases, norms stay float
    g = quant.quantized(fn)
    g = jax.jit(g) if jit else g
    y = g(qp, x)
    ref = fn(quant.dequantize_params(qp), x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # The weights really are quantized: the output moved away from the float model's, by a
    # quantization-sized amount (int4 groups err more than int8 channels).
    err = float(jnp.max(jnp.abs(y - fn(params, x))))
    assert 0 < err < (0.05 if spec.bits == 8 else 0.5)


@pytest.mark.parametrize(
    "name, spec, jit",
    [
        pytest.param(n, s, True, id=f"{n}-{i}-jit")
        for n in _MODELS
        for s, i in ((_I8, "int8"), (_I4, "int4"))
    ]
    + [pytest.param("mlp", _I4, False, id="mlp-int4-eager")],
)
def test_quantized_grad_equals_grad_on_dequantized_params(name, spec, jit):
    """``jax.grad`` through ``quantized(fn)`` with respect to the input and to the float leaves
    (biases, norm scales) equals the gradient of the model on the dequantized weights."""
    fn, _, qp, x, _ = _quantized_model(name, spec)
    floats, qarrays = eqx.partition(qp, eqx.is_inexact_array, is_leaf=quant.is_qarray)
    g = quant.quantized(fn)

    def loss_q(fl, x):
        return jnp.sum(jnp.sin(g(eqx.combine(fl, qarrays), x)))

    def loss_ref(fl, x):
        return jnp.sum(jnp.sin(fn(quant.dequantize_params(eqx.combine(fl, qarrays)), x)))

    grad_q = jax.grad(loss_q, argnums=(0, 1))
    grad_q = jax.jit(grad_q) if jit else grad_q
    (gf, gx), (rf, rx) = grad_q(floats, x), jax.grad(loss_ref, argnums=(0, 1))(floats, x)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(gx))) > 0
    leaves_q, leaves_r = jax.tree.leaves(gf), jax.tree.leaves(rf)
    assert len(leaves_q) == len(leaves_r) > 0
    for a, b in zip(leaves_q, leaves_r, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("spec", [_I8, _I4], ids=["int8-channel", "int4-g8"])
def test_w8a8_mlp_quantizes_activations_of_left_operand_weights(spec, jit):
    """W8A8 on ``eqx.nn.MLP`` (``weight @ x``, the weight on the left of the vmapped product):
    every layer's input is quantized per token. Reference: dequantized weights times
    fake-quantized activations, layer by layer; int8 per-row weights run int8 x int8 (int32)."""
    model = eqx.nn.MLP(16, 8, width_size=32, depth=2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    qp, _ = quant.quantize_params(params, [(kernel_like, spec)])
    x = jax.random.normal(jax.random.key(3), (16, 16))  # 16 tokens: enough for the int path
    g = quant.quantized(fn, activations=quant.QuantSpec(8))
    y = (jax.jit(g) if jit else g)(qp, x)

    dq = quant.dequantize_params(qp)
    h = x
    for i, layer in enumerate(dq.layers):
        h = quant.fake_quant(h, quant.QuantSpec(8, axis=0)) @ layer.weight.T + layer.bias[None]
        h = model.activation(h) if i < len(dq.layers) - 1 else h
    assert y.shape == h.shape == (16, 8)
    np.testing.assert_allclose(np.asarray(y), np.asarray(h), rtol=1e-5, atol=1e-5)
    weight_only = quant.quantized(fn)(qp, x)
    assert float(jnp.max(jnp.abs(y - weight_only))) > 1e-4  # the activations are quantized
    n_int = str(jax.make_jaxpr(g)(qp, x)).count("preferred_element_type=int32")
    assert n_int == (3 if spec is _I8 else 0)  # grouped int4 weights: simulated, not int8 x int8
