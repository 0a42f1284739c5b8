"""Bad input to every public quantization function: one row per case.

Each row asserts the exception type and that the message names the function and the leaf path or
the bad value. Below the table: what happens where nothing can raise (under ``jit``), and
integer-keyed NNX states (``nnx.List``) through the tree-wide functions.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxslim import _checks, quant
from jaxslim.flax.quant import fake_quant_dot_general, qat_model, quantize_model
from jaxslim.quant import QuantSpec

NAN, INF = float("nan"), float("inf")
X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))
X_NAN = X.at[2, 1].set(NAN)
X_INF = X.at[0, 0].set(-INF)
S8 = QuantSpec(8, axis=-1)
Q4 = quant.quantize(X, QuantSpec(4, axis=-1, symmetric=False))
DN = (((1,), (0,)), ((), ()))
H = quant.gptq_hessian(jnp.asarray(np.random.default_rng(1).normal(size=(32, 8)), jnp.float32))


def _at(path, call):
    """``call`` run for the leaf ``path`` (as a tree-wide function runs it)."""

    def run():
        with _checks.at_leaf(path):
            return call()

    return run


def _replace(**kw):
    return lambda: dataclasses.replace(Q4, **kw)


def _unflatten(i, fn):
    leaves, treedef = jax.tree.flatten(Q4)
    leaves[i] = fn(leaves[i])
    return lambda: jax.tree.unflatten(treedef, leaves)


def _model(n=2):
    class Stack(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([nnx.Linear(8, 8, rngs=nnx.Rngs(i)) for i in range(n)])

        def __call__(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    return Stack()


def _nan_kernel_model():
    m = _model()
    m.layers[1].kernel.set_value(m.layers[1].kernel[...].at[0, 0].set(NAN))
    return m


def _observer_update(make, x, spec=S8):
    obs = make(spec)
    return lambda: obs.update(obs.init(X), x)


ROWS = [
    # --- QuantSpec: out-of-range bits, group sizes, formats; traced where static is needed ---
    pytest.param(
        lambda: QuantSpec(9), ValueError, r"QuantSpec: bits .*\(2, 3, 4, 8\).* 9", id="spec-bits-9"
    ),
    pytest.param(lambda: QuantSpec(0), ValueError, r"QuantSpec: bits .* got 0", id="spec-bits-0"),
    pytest.param(
        lambda: QuantSpec("8"),
        ValueError,
        r"QuantSpec: bits must be an int, got '8'",
        id="spec-bits-str",
    ),
    pytest.param(
        lambda: jax.jit(lambda b: QuantSpec(b))(4),
        ValueError,
        r"QuantSpec: bits must be an int, got .*Tracer",
        id="spec-bits-traced",
    ),
    pytest.param(
        lambda: QuantSpec(group_size=0),
        ValueError,
        r"QuantSpec: group_size .* got 0",
        id="spec-group-0",
    ),
    pytest.param(
        lambda: QuantSpec(group_size=2.5),
        ValueError,
        r"QuantSpec: group_size .* got 2.5",
        id="spec-group-float",
    ),
    pytest.param(
        lambda: QuantSpec(fmt="fp4"),
        ValueError,
        r"QuantSpec: fmt must be one of .* 'fp4'",
        id="spec-fmt",
    ),
    pytest.param(
        lambda: QuantSpec(4, fmt="nf4", signed=False),
        ValueError,
        r"QuantSpec: fmt='nf4' needs signed=True",
        id="spec-nf4-unsigned",
    ),
    pytest.param(
        lambda: QuantSpec(fmt="e5m2", symmetric=False),
        ValueError,
        r"QuantSpec: fmt='e5m2' needs symmetric=True",
        id="spec-fp8-affine",
    ),
    pytest.param(
        lambda: QuantSpec(axis=1.0), ValueError, r"QuantSpec: axis .* got 1.0", id="spec-axis-float"
    ),
    # --- quantize: non-finite values, bad scales and zero points, shapes ---
    pytest.param(
        lambda: quant.quantize(X_NAN, S8, path="enc/w"),
        ValueError,
        r"quant.quantize: 'enc/w' has 1 non-finite .*nan at index \(2, 1\)",
        id="quantize-nan",
    ),
    pytest.param(
        lambda: quant.quantize(X_INF, S8, path="enc/w"),
        ValueError,
        r"quant.quantize: 'enc/w' has 1 non-finite .*-inf",
        id="quantize-inf",
    ),
    pytest.param(
        lambda: quant.quantize(X, S8, scale=jnp.zeros((1, 4)), path="w"),
        ValueError,
        r"quant.quantize: scale must be finite and > 0, got 0.0 .*'w'",
        id="quantize-scale-0",
    ),
    pytest.param(
        lambda: quant.quantize(X, S8, scale=-0.5, path="w"),
        ValueError,
        r"quant.quantize: scale .* got -0.5 .*'w'",
        id="quantize-scale-neg",
    ),
    pytest.param(
        lambda: quant.quantize(X, S8, scale=jnp.array([[1, NAN, 1, 1]]), path="w"),
        ValueError,
        r"quant.quantize: scale .* got nan .*'w'",
        id="quantize-scale-nan",
    ),
    pytest.param(
        lambda: quant.quantize(X, S8, scale=INF, path="w"),
        ValueError,
        r"quant.quantize: scale .* got inf",
        id="quantize-scale-inf",
    ),
    pytest.param(
        lambda: quant.quantize(
            X, QuantSpec(8, symmetric=False), scale=0.1, zero_point=300, path="w"
        ),
        ValueError,
        r"quant.quantize: zero_point must be an integer in \[-128, 127\], got 300.0 .*'w'",
        id="quantize-zp-range",
    ),
    pytest.param(
        lambda: quant.quantize(X, QuantSpec(8, symmetric=False), scale=0.1, zero_point=0.5),
        ValueError,
        r"quant.quantize: zero_point .* got 0.5",
        id="quantize-zp-fraction",
    ),
    pytest.param(
        lambda: quant.quantize(X, QuantSpec(fmt="e4m3"), scale=0.1, zero_point=0, path="w"),
        ValueError,
        r"quant.quantize: fmt='e4m3' has no zero point.*'w'",
        id="quantize-zp-fp8",
    ),
    pytest.param(
        lambda: quant.quantize(X, S8, scale=jnp.ones((8, 1)), path="w"),
        ValueError,
        r"quant.quantize: scale of shape \(8, 1\) .*'w'",
        id="quantize-scale-shape",
    ),
    pytest.param(
        # group_size=3 not dividing the axis is a shorter last group, not an error; a group axis
        # out of range still is.
        lambda: quant.quantize(X, QuantSpec(4, group_size=3, group_axis=4), path="w"),
        ValueError,
        r"quant.quantize: group_axis 4 is out of range for 'w'",
        id="quantize-group",
    ),
    pytest.param(
        lambda: quant.quantize(X, QuantSpec(8, axis=5), path="w"),
        ValueError,
        r"quant.quantize: axis 5 is out of range for 'w'",
        id="quantize-axis",
    ),
    pytest.param(
        lambda: quant.quantize(X.astype(jnp.int32), S8, path="ids"),
        ValueError,
        r"quant.quantize: .*floating-point.*int32.*'ids'",
        id="quantize-int",
    ),
    pytest.param(
        lambda: quant.quantize(X, 8, path="w"),
        TypeError,
        r"quant.quantize: spec must be a QuantSpec, got 8",
        id="quantize-spec",
    ),
    # --- dequantize / QArray: tampered arrays fail on construction, unflatten and dequantize ---
    pytest.param(
        lambda: quant.dequantize(X),
        TypeError,
        r"quant.dequantize: expects a QArray, got ArrayImpl",
        id="dequantize-array",
    ),
    pytest.param(
        _replace(values=Q4.values[:4]),
        ValueError,
        r"quant.QArray: values is uint8\[4, 2\], expected uint8\[8, 2\]",
        id="qarray-values-shape",
    ),
    pytest.param(
        _replace(values=Q4.values.astype(jnp.int8)),
        ValueError,
        r"quant.QArray: values is int8\[8, 2\], expected uint8",
        id="qarray-values-dtype",
    ),
    pytest.param(
        _replace(scale=Q4.scale[:, :2]),
        ValueError,
        r"quant.QArray: scale is float32\[1, 2\], expected float32\[1, 4\]",
        id="qarray-scale-shape",
    ),
    pytest.param(
        _replace(scale=Q4.scale.astype(jnp.float16)),
        ValueError,
        r"quant.QArray: scale is float16\[1, 4\], expected float32",
        id="qarray-scale-dtype",
    ),
    pytest.param(
        _replace(zero_point=Q4.zero_point.astype(jnp.int32)),
        ValueError,
        r"quant.QArray: zero_point is int32\[1, 4\], expected int8",
        id="qarray-zp-dtype",
    ),
    pytest.param(
        _replace(scale_scale=jnp.ones(1)),
        ValueError,
        r"quant.QArray: scale_scale must be None",
        id="qarray-extra-scale",
    ),
    pytest.param(
        _replace(shape=(8, 6)),
        ValueError,
        r"quant.QArray: values is uint8\[8, 2\], expected uint8\[8, 3\]",
        id="qarray-meta-shape",
    ),
    pytest.param(
        _replace(dtype=jnp.int32),
        TypeError,
        r"quant.QArray: dtype must be a floating dtype, got int32",
        id="qarray-meta-dtype",
    ),
    pytest.param(
        _unflatten(0, lambda v: v.reshape(4, 4)),
        ValueError,
        r"quant.QArray: values is uint8\[4, 4\]",
        id="unflatten-values",
    ),
    pytest.param(
        _unflatten(1, lambda s: jnp.tile(s, (2, 1))),
        ValueError,
        r"quant.QArray: scale is float32\[2, 4\]",
        id="unflatten-scale",
    ),
    pytest.param(
        lambda: quant.dequantize(dataclasses.replace(Q4, zero_point=None)),
        ValueError,
        r"quant.dequantize: zero_point is missing",
        id="dequantize-no-zp",
    ),
    pytest.param(
        lambda: quant.dequantize(jax.vmap(lambda x: quant.quantize(x, S8))(jnp.stack([X, X]))),
        ValueError,
        r"quant.dequantize: values is int8\[2, 8, 4\], expected int8\[8, 4\]",
        id="dequantize-batched",
    ),
    pytest.param(
        lambda: quant.dequantize_params({"enc": {"w": dataclasses.replace(Q4, zero_point=None)}}),
        ValueError,
        r"quant.dequantize_params: 'enc/w': .*zero_point is missing",
        id="dequantize-params-tampered",
    ),
    # --- fake_quant and the primitive ---
    pytest.param(
        lambda: quant.fake_quant(X, S8, scale=jnp.zeros((1, 4)), path="w"),
        ValueError,
        r"quant.fake_quant: scale must be finite and > 0, got 0.0 .*'w'",
        id="fake-quant-scale-0",
    ),
    pytest.param(
        lambda: quant.fake_quant(X, S8, scale=NAN, path="w"),
        ValueError,
        r"quant.fake_quant: scale .* got nan",
        id="fake-quant-scale-nan",
    ),
    pytest.param(
        # group_size=5 on an axis of 8 is a shorter last group; a bad group axis raises.
        lambda: quant.fake_quant(X, QuantSpec(4, group_size=5, group_axis=-3), path="w"),
        ValueError,
        r"quant.fake_quant: group_axis -3 is out of range for 'w'",
        id="fake-quant-group",
    ),
    pytest.param(
        lambda: quant.fake_quant_affine(X, 0.0, 0, -8, 7),
        ValueError,
        r"quant.fake_quant_affine: scale must be finite and > 0, got 0.0",
        id="affine-scale-0",
    ),
    pytest.param(
        lambda: quant.fake_quant_affine(X, -1.0, 0, -8, 7),
        ValueError,
        r"quant.fake_quant_affine: scale .* got -1.0",
        id="affine-scale-neg",
    ),
    pytest.param(
        lambda: quant.fake_quant_affine(X, NAN, 0, -8, 7),
        ValueError,
        r"quant.fake_quant_affine: scale .* got nan",
        id="affine-scale-nan",
    ),
    pytest.param(
        lambda: quant.fake_quant_affine(X, 0.1, 9, -8, 7),
        ValueError,
        r"quant.fake_quant_affine: zero_point .*\[-8, 7\], got 9",
        id="affine-zp",
    ),
    pytest.param(
        lambda: quant.fake_quant_affine(X, 0.1, 0, 7, -8),
        ValueError,
        r"quant.fake_quant_affine: need qmin < qmax, got qmin=7",
        id="affine-range",
    ),
    pytest.param(
        lambda: jax.jit(lambda q: quant.fake_quant_affine(X, 0.1, 0, q, 7))(-8),
        ValueError,
        r"quant.fake_quant_affine: qmin must be a Python int .*traced",
        id="affine-qmin-traced",
    ),
    pytest.param(
        lambda: quant.fake_quant_lsq(X, jnp.float32(0.0), -8, 7),
        ValueError,
        r"quant.fake_quant_lsq: scale must be finite and > 0, got 0.0",
        id="lsq-scale-0",
    ),
    pytest.param(
        lambda: quant.fake_quant_lsq(X, jnp.float32(NAN), -8, 7),
        ValueError,
        r"quant.fake_quant_lsq: scale .* got nan",
        id="lsq-scale-nan",
    ),
    pytest.param(
        lambda: quant.fake_quant_lsq(X, jnp.float32(1.0), -8, 7, grad_scale=NAN),
        ValueError,
        r"quant.fake_quant_lsq: grad_scale .* got nan",
        id="lsq-grad-scale",
    ),
    pytest.param(
        lambda: quant.lsq_init_scale(X, 0),
        ValueError,
        r"quant.lsq_init_scale: qmax must be a positive int, got 0",
        id="lsq-init-qmax",
    ),
    pytest.param(
        lambda: quant.lsq_init_scale(X, 7, axis=3),
        ValueError,
        r"quant.lsq_init_scale: axis 3 is out of range",
        id="lsq-init-axis",
    ),
    # --- qparams ---
    pytest.param(
        lambda: quant.qparams(X.astype(jnp.int8), S8, path="w"),
        ValueError,
        r"quant.qparams: .*floating-point.*int8 for 'w'",
        id="qparams-int",
    ),
    pytest.param(
        # (group sizes that do not divide the axis are a shorter last group, not an error)
        lambda: quant.qparams(X, QuantSpec(4, group_size=3, group_axis=4), path="w"),
        ValueError,
        r"quant.qparams: group_axis 4 is out of range for 'w'",
        id="qparams-group",
    ),
    pytest.param(
        lambda: quant.qparams_from_range(NAN, 1.0, S8),
        ValueError,
        r"quant.qparams_from_range: lo must be finite, got nan",
        id="qparams-range-nan",
    ),
    pytest.param(
        lambda: quant.qparams_from_range(-1.0, INF, S8),
        ValueError,
        r"quant.qparams_from_range: hi must be finite, got inf",
        id="qparams-range-inf",
    ),
    pytest.param(
        lambda: quant.qparams_from_range(-1.0, 1.0, 8),
        TypeError,
        r"quant.qparams_from_range: spec must be a QuantSpec, got 8",
        id="qparams-range-spec",
    ),
    # --- packing ---
    pytest.param(
        lambda: quant.pack(jnp.array([1, 2], jnp.int8), 5),
        ValueError,
        r"quant.pack: storage bits must be 2, 3, 4 or 8, got 5",
        id="pack-bits",
    ),
    pytest.param(
        lambda: quant.pack(jnp.array([1.0, 2.0]), 4),
        ValueError,
        r"quant.pack: codes must be an integer array, got float32",
        id="pack-float",
    ),
    pytest.param(
        lambda: quant.pack(jnp.array([1, 20], jnp.int32), 4),
        ValueError,
        r"quant.pack: codes must fit 4 bits .*\[1, 20\]",
        id="pack-range",
    ),
    pytest.param(
        lambda: quant.unpack(jnp.zeros((3,), jnp.uint8), 4, (8,), signed=True),
        ValueError,
        r"quant.unpack: packed has shape \(3,\), .* pack to \(4,\)",
        id="unpack-shape",
    ),
    pytest.param(
        lambda: quant.unpack(jnp.zeros((4,), jnp.float32), 4, (8,), signed=True),
        ValueError,
        r"quant.unpack: packed must be a uint8 .*float32",
        id="unpack-dtype",
    ),
    pytest.param(
        lambda: quant.packed_shape((4,), 5),
        ValueError,
        r"quant.packed_shape: storage bits must be 2, 3, 4 or 8, got 5",
        id="packed-shape-bits",
    ),
    # --- observers ---
    pytest.param(
        lambda: quant.minmax_observer("int8"),
        TypeError,
        r"quant.minmax_observer: spec must be a QuantSpec, got 'int8'",
        id="obs-spec",
    ),
    pytest.param(
        lambda: quant.moving_average_observer(S8, averaging_constant=0.0),
        ValueError,
        r"quant.moving_average_observer: averaging_constant .* got 0.0",
        id="obs-ma-0",
    ),
    pytest.param(
        lambda: quant.moving_average_observer(S8, averaging_constant=NAN),
        ValueError,
        r"quant.moving_average_observer: averaging_constant .* got nan",
        id="obs-ma-nan",
    ),
    pytest.param(
        lambda: quant.percentile_observer(S8, percentile=30.0),
        ValueError,
        r"quant.percentile_observer: percentile .* got 30.0",
        id="obs-pct",
    ),
    pytest.param(
        lambda: quant.mse_observer(S8, num_candidates=0),
        ValueError,
        r"quant.mse_observer: num_candidates .* got 0",
        id="obs-mse",
    ),
    pytest.param(
        _observer_update(quant.minmax_observer, X.astype(jnp.int32)),
        ValueError,
        r"quant.minmax_observer: .*floating-point.*int32",
        id="obs-update-int",
    ),
    pytest.param(
        _observer_update(quant.minmax_observer, X, QuantSpec(4, group_size=3, group_axis=4)),
        ValueError,
        r"quant.minmax_observer: group_axis 4 is out of range",
        id="obs-group",
    ),
    # --- quantize_params / dequantize_params ---
    pytest.param(
        lambda: quant.quantize_params({"w": X}, [("enc(", S8)]),
        ValueError,
        r"quant.quantize_params: rule 0: where='enc\(' is not a valid regular expression",
        id="params-regex",
    ),
    pytest.param(
        lambda: quant.quantize_params({"w": X}, [(3, S8)]),
        TypeError,
        r"quant.quantize_params: rule 0: where must be .* got int 3",
        id="params-where-type",
    ),
    pytest.param(
        lambda: quant.quantize_params({"w": X}, [("w", "int8")]),
        TypeError,
        r"quant.quantize_params: rule 0 .*spec must be a QuantSpec or None, got 'int8'",
        id="params-spec",
    ),
    pytest.param(
        lambda: quant.quantize_params({"w": X}, "int8"),
        TypeError,
        r"quant.quantize_params: rules must be .* got 'int8'",
        id="params-rules",
    ),
    pytest.param(
        lambda: quant.quantize_params({"w": X}, [("w", S8, 1)]),
        TypeError,
        r"quant.quantize_params: rule 0 must be a \(where, spec\) pair",
        id="params-rule-pair",
    ),
    pytest.param(
        lambda: quant.quantize_params({"w": X}, [("nothing", S8)]),
        ValueError,
        r"quant.quantize_params: the rules quantize no leaf; .*\['w'\]",
        id="params-nothing",
    ),
    pytest.param(
        lambda: quant.quantize_params({"enc": [X, X_NAN]}, S8),
        ValueError,
        r"quant.quantize_params: 'enc/1' has 1 non-finite",
        id="params-nan-int-key",
    ),
    pytest.param(
        lambda: quant.quantize_params({"w": X}, QuantSpec(4, group_size=3, group_axis=4)),
        ValueError,
        r"quant.quantize_params: .*group_axis 4 is out of range for 'w'",
        id="params-group",
    ),
    pytest.param(
        lambda: quant.quantize_params({"w": X}, S8, default=8),
        TypeError,
        r"quant.quantize_params: default must be a QuantSpec",
        id="params-default",
    ),
    pytest.param(
        lambda: quant.quantize_params({"enc": {"w": X}}, QuantSpec(4, axis=0, group_size=4)),
        ValueError,
        r"quant.quantize_params: .*'enc/w'.*; to leave 'enc/w' in float, put the rule "
        r"\(r'\^enc/w\$', None\) first$",
        id="params-refused-names-the-float-rule",
    ),
    pytest.param(
        lambda: quant.quantize_params({"tt": jnp.ones((2, 64))}, QuantSpec(4, group_size=32)),
        ValueError,
        r"quant.quantize_params: the rules quantize no leaf; .*\['tt'\]; a grouped spec with "
        r"where=None left \['tt'\] float .*name them in a rule's where=",
        id="params-grouped-default-skips-a-table",
    ),
    pytest.param(
        lambda: quant.quantize_params({"w": X}, S8, example_args=(X,)),
        ValueError,
        r"quant.quantize_params: example_args given without fn; pass fn=",
        id="params-args-without-fn",
    ),
    pytest.param(
        lambda: quant.quantize_params({"w": X}, S8, fn=lambda p, x: x @ p["w"], example_args=X),
        TypeError,
        r"quant.quantize_params: example_args must be a tuple, got Array",
        id="params-args-not-tuple",
    ),
    pytest.param(
        lambda: quant.quantize_params({"w": X}, QuantSpec(4, group_size=4), fn=3),
        TypeError,
        r"quant.quantize_params: tracing fn for the grouped default where: .*fn must be a "
        r"callable fn\(params, \*args\), got int",
        id="params-fn-not-callable",
    ),
    pytest.param(
        lambda: quant.quantize_params(
            {"w": X}, QuantSpec(4, group_size=4), fn=lambda p, x: x @ p["w"], example_args=(X,)
        ),
        TypeError,
        r"quant.quantize_params: tracing fn for the grouped default where: .*raised TypeError "
        r"while traced on shapes .*contracting dimensions",
        id="params-fn-fails-on-example-args",
    ),
    # --- qdot_general ---
    pytest.param(
        lambda: quant.qdot_general(X, Q4, DN, impl="fast"),
        ValueError,
        r"quant.qdot_general: impl must be .* got 'fast'",
        id="qdot-impl",
    ),
    pytest.param(
        lambda: quant.qdot_general(X, Q4, DN),
        ValueError,
        r"quant.qdot_general: contracting dimensions of lhs \(8, 4\) \(sizes \[4\]\) and rhs",
        id="qdot-shape",
    ),
    pytest.param(
        lambda: quant.qdot_general(X, Q4, (((3,), (0,)), ((), ()))),
        ValueError,
        r"quant.qdot_general: contracting dimensions \(3,\)",
        id="qdot-dims",
    ),
    pytest.param(
        lambda: quant.qdot_general(X.T, Q4, DN, impl="int"),
        ValueError,
        r"quant.qdot_general: impl='int' needs",
        id="qdot-int",
    ),
    pytest.param(
        lambda: quant.qdot_general(X_NAN.T, Q4, DN, lhs_spec=QuantSpec(8, axis=0)),
        ValueError,
        r"quant.qdot_general: 'lhs' has 1 non-finite",
        id="qdot-lhs-nan",
    ),
    pytest.param(
        lambda: quant.qdot_general([1.0], Q4, DN),
        TypeError,
        r"quant.qdot_general: lhs must be an array or a QArray, got list",
        id="qdot-list",
    ),
    # --- rotate ---
    pytest.param(
        lambda: quant.rotate(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 4))}, X, seed=1.5),
        TypeError,
        r"quant.rotate: seed must be an int, got 1.5",
        id="rotate-seed",
    ),
    pytest.param(
        lambda: quant.rotate(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 4))}, X, online=1),
        TypeError,
        r"quant.rotate: online must be a bool, got 1",
        id="rotate-online",
    ),
    pytest.param(
        lambda: quant.rotate(lambda p, x: x @ p["w"], {"w": Q4}, X),
        TypeError,
        r"quant.rotate: w is a QArray; rotate the float model, then quantize it",
        id="rotate-qarray",
    ),
    pytest.param(
        lambda: quant.rotate(lambda p, x: x[:, :3] @ p["w"], {"w": jnp.ones((3, 7))}, X),
        ValueError,
        r"quant.rotate: fn has no coupled-axis group whose width has a Hadamard matrix",
        id="rotate-no-stream",
    ),
    # --- gptq / gptq_hessian ---
    pytest.param(
        lambda: quant.gptq(X, H.at[0, 1].set(NAN), S8, path="mlp/kernel"),
        ValueError,
        r"quant.gptq: 'hessian of mlp/kernel' has 1 non-finite",
        id="gptq-hessian-nan",
    ),
    pytest.param(
        lambda: quant.gptq(X_NAN, H, S8, path="mlp/kernel"),
        ValueError,
        r"quant.gptq: 'mlp/kernel' has 1 non-finite",
        id="gptq-kernel-nan",
    ),
    pytest.param(
        lambda: quant.gptq(X, -H, S8, path="mlp/kernel"),
        ValueError,
        r"quant.gptq: the hessian of 'mlp/kernel' is not positive definite",
        id="gptq-not-pd",
    ),
    pytest.param(
        lambda: quant.gptq(X, H, S8, damp=-0.1, path="k"),
        ValueError,
        r"quant.gptq: damp must be .* got -0.1 for 'k'",
        id="gptq-damp-neg",
    ),
    pytest.param(
        lambda: quant.gptq(X, H, S8, damp=NAN, path="k"),
        ValueError,
        r"quant.gptq: damp must be .* got nan for 'k'",
        id="gptq-damp-nan",
    ),
    pytest.param(
        lambda: quant.gptq(X, H, S8, act_order="static", path="k"),
        TypeError,
        r"quant.gptq: act_order must be a bool, got 'static' for 'k'",
        id="gptq-act-order",
    ),
    pytest.param(
        lambda: quant.GPTQ(act_order="static"),
        TypeError,
        r"quant.GPTQ: act_order must be a bool \(true / false in a recipe\), got 'static'",
        id="GPTQ-act-order",
    ),
    pytest.param(
        lambda: quant.GPTQ(damp=-1.0),
        ValueError,
        r"quant.GPTQ: damp",
        id="GPTQ-damp",
    ),
    pytest.param(
        lambda: quant.GPTQ(qep=-0.5),
        ValueError,
        r"quant.GPTQ: qep must be finite and >= 0, got -0.5",
        id="GPTQ-qep-negative",
    ),
    pytest.param(
        lambda: quant.GPTQ(qep=NAN),
        ValueError,
        r"quant.GPTQ: qep must be finite and >= 0, got nan",
        id="GPTQ-qep-nan",
    ),
    pytest.param(
        lambda: quant.oneshot(
            lambda p, x: x @ p["w"],
            {"w": X.T},
            [X],
            S8,
            method=quant.GPTQ(qep=0.5),
            sequential=False,
        ),
        ValueError,
        r"quant.oneshot: GPTQ\(qep=0.5\) .* needs sequential=True",
        id="oneshot-qep-not-sequential",
    ),
    pytest.param(
        lambda: quant.oneshot(
            lambda p, x: x @ p["w"], {"w": X.T}, [X], S8, method=quant.GPTQ(), reference_batches=[X]
        ),
        ValueError,
        r"quant.oneshot: reference_batches is read only by GPTQ\(qep=...\) .* got method GPTQ\(",
        id="oneshot-reference-batches-without-qep",
    ),
    pytest.param(
        lambda: quantize_model(_model(), S8, calibration=X, method=quant.GPTQ(qep=0.5)),
        ValueError,
        r"flax.quantize_model: GPTQ\(qep=0.5\) needs .* use quant.oneshot",
        id="quantize_model-qep",
    ),
    # --- qep_correct ---
    pytest.param(
        _at("mlp/kernel", lambda: quant.qep_correct(X.T, H[:4, :4], None)),
        TypeError,
        r"quant.qep_correct: cross must be a \(4, 4\) array, got NoneType for 'mlp/kernel'; "
        r"calibrate with calibrate.sequential\(..., cross=True\)",
        id="qep-cross-missing",
    ),
    pytest.param(
        _at("mlp/kernel", lambda: quant.qep_correct(X.T, H[:4, :4], H)),
        ValueError,
        r"quant.qep_correct: cross must be a floating \(4, 4\) array for the kernel \(4, 8\) "
        r"of 'mlp/kernel', got float32 \(8, 8\)",
        id="qep-cross-shape",
    ),
    pytest.param(
        _at("k", lambda: quant.qep_correct(X.T, H[:4, :4], H[:4, :4].at[0, 0].set(NAN))),
        ValueError,
        r"quant.qep_correct: 'cross of k' has 1 non-finite",
        id="qep-cross-nan",
    ),
    pytest.param(
        _at("k", lambda: quant.qep_correct(X.T, -H[:4, :4], H[:4, :4])),
        ValueError,
        r"quant.qep_correct: the hessian of 'k' is not positive definite",
        id="qep-not-pd",
    ),
    pytest.param(
        _at("k", lambda: quant.qep_correct(X.T, H[:4, :4], H[:4, :4], alpha=-1.0)),
        ValueError,
        r"quant.qep_correct: alpha must be finite and >= 0, got -1.0",
        id="qep-alpha",
    ),
    pytest.param(
        _at("k", lambda: quant.qep_correct(jnp.ones(4), H[:4, :4], H[:4, :4])),
        ValueError,
        r"quant.qep_correct: expects a floating-point kernel with ndim >= 2, got float32 \(4,\)",
        id="qep-vector",
    ),
    pytest.param(
        lambda: quant.gptq(X, H, S8, block_size=0, path="k"),
        ValueError,
        r"quant.gptq: block_size must be a positive int, got 0 for 'k'",
        id="gptq-block",
    ),
    pytest.param(
        lambda: quant.gptq(X, H, S8, clip_candidates=0, path="k"),
        ValueError,
        r"quant.gptq: clip_candidates .* got 0 for 'k'",
        id="gptq-clip",
    ),
    pytest.param(
        lambda: quant.gptq(X, H.astype(jnp.int32), S8, path="k"),
        ValueError,
        r"quant.gptq: hessian must be floating point, got int32 for 'k'",
        id="gptq-hessian-int",
    ),
    pytest.param(
        lambda: quant.gptq(X, H[:4, :4], S8, path="k"),
        ValueError,
        r"quant.gptq: hessian must have shape \(8, 8\) .*'k'",
        id="gptq-hessian-shape",
    ),
    pytest.param(
        lambda: quant.gptq(X, H, QuantSpec(4, group_size=3, group_axis=4), path="k"),
        ValueError,
        r"quant.gptq: group_axis 4 is out of range for 'k'",
        id="gptq-group",
    ),
    pytest.param(
        lambda: jax.jit(lambda b: quant.gptq(X, H, S8, block_size=b, path="k"))(4),
        ValueError,
        r"quant.gptq: block_size must be a positive int, got .*Tracer.* for 'k'",
        id="gptq-block-traced",
    ),
    pytest.param(
        lambda: jax.jit(lambda b: quant.pack(jnp.array([1, 2], jnp.int8), b))(4),
        ValueError,
        r"quant.pack: storage bits must be 2, 3, 4 or 8, got .*Tracer",
        id="pack-bits-traced",
    ),
    pytest.param(
        lambda: jax.jit(lambda n: quant.mse_observer(S8, num_candidates=n))(10),
        ValueError,
        r"quant.mse_observer: num_candidates must be a positive int, got .*Tracer",
        id="obs-mse-traced",
    ),
    pytest.param(
        lambda: quant.gptq_hessian(X_NAN, path="mlp/kernel"),
        ValueError,
        r"quant.gptq_hessian: 'calibration inputs of mlp/kernel' has 1 non-finite",
        id="hessian-nan",
    ),
    pytest.param(
        lambda: quant.gptq_hessian(X.astype(jnp.int32)),
        ValueError,
        r"quant.gptq_hessian: expects a floating-point array .*int32",
        id="hessian-int",
    ),
    pytest.param(
        lambda: quant.gptq_hessian(jnp.float32(1.0)),
        ValueError,
        r"quant.gptq_hessian: expects .*\(\)",
        id="hessian-scalar",
    ),
    # --- flax: quantize_model, qat_model, fake_quant_dot_general (nnx.List: integer keys) ---
    pytest.param(
        lambda: quantize_model(_model(), [("layers/[", S8)]),
        ValueError,
        r"flax.quantize_model: rule 0: where='layers/\[' is not a valid regular expression",
        id="model-regex",
    ),
    pytest.param(
        lambda: quantize_model(_nan_kernel_model(), S8),
        ValueError,
        r"flax.quantize_model: 'layers/1/kernel' has 1 non-finite",
        id="model-nan-kernel",
    ),
    pytest.param(
        lambda: quantize_model(_model(), S8, calibration=[jnp.ones((2, 8)), jnp.full((2, 8), NAN)]),
        ValueError,
        r"flax.quantize_model: 'calibration batch 1' has 16 non-finite",
        id="model-nan-calibration",
    ),
    pytest.param(
        lambda: quantize_model(_model(), S8, calibration=jnp.ones((2, 5))),
        TypeError,
        r"flax.quantize_model: .*\(fn=Stack.__call__\).* got \(5,\) and \(8,\)",
        id="model-calibration-wrong-width",
    ),
    pytest.param(
        lambda: quantize_model(_model(), S8, act_bits=5),
        ValueError,
        r"flax.quantize_model: act_bits .* got 5",
        id="model-act-bits",
    ),
    pytest.param(
        lambda: quantize_model(_model(), S8, calibration=jnp.ones((2, 8)), method=quant.AWQ()),
        ValueError,
        r"flax.quantize_model: method must be quant.GPTQ",
        id="model-gptq-options",
    ),
    pytest.param(
        lambda: quantize_model(
            _model(), S8, calibration=jnp.ones((2, 8)), observer=quant.mse_observer
        ),
        ValueError,
        r"flax.quantize_model: pass calibration \(GPTQ\) or observer",
        id="model-obs-and-gptq",
    ),
    pytest.param(
        lambda: quantize_model(_model(), S8, observer=3),
        TypeError,
        r"flax.quantize_model: observer must be a function",
        id="model-observer",
    ),
    pytest.param(
        lambda: quantize_model({"w": X}, S8),
        TypeError,
        r"flax.quantize_model: model must be an nnx.Module, got dict",
        id="model-not-module",
    ),
    pytest.param(
        lambda: quantize_model(_model(), [("layers/7", S8)]),
        ValueError,
        r"flax.quantize_model: the rules quantize no kernel; .*'layers/0/kernel', 'layers/1/k",
        id="model-int-keys-nothing",
    ),
    pytest.param(
        lambda: quantize_model(_model(), QuantSpec(4, group_size=3, group_axis=4)),
        ValueError,
        r"flax.quantize_model: group_axis 4 is out of range for 'layers/0/kernel'",
        id="model-group",
    ),
    pytest.param(
        lambda: qat_model(_model(), [("(", S8)]),
        ValueError,
        r"flax.qat_model: rule 0: where=.* is not a valid regular expression",
        id="qat-regex",
    ),
    pytest.param(
        lambda: qat_model(_model(), S8, act_bits=1),
        ValueError,
        r"flax.qat_model: act_bits .* got 1",
        id="qat-act-bits",
    ),
    pytest.param(
        lambda: fake_quant_dot_general(8),
        TypeError,
        r"flax.fake_quant_dot_general: spec must be a QuantSpec, got 8",
        id="fqdg-spec",
    ),
    pytest.param(
        lambda: fake_quant_dot_general(S8, act_bits=9),
        ValueError,
        r"flax.fake_quant_dot_general: act_bits .* got 9",
        id="fqdg-act-bits",
    ),
]


@pytest.mark.parametrize("call,exc,match", ROWS)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- where nothing can raise: defined behaviour under jit -------------------------------------


def test_traced_nan_stays_in_its_own_entry():
    spec = QuantSpec(4, axis=-1, group_size=4)
    q = jax.jit(lambda x: quant.quantize(x, spec))(X_NAN)
    clean = quant.quantize(X_NAN.at[2, 1].set(0.0), spec)  # the scale ignores the NaN
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(clean), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert quant.dequantize(q)[2, 1] == 0.0  # NaN -> the zero point
    y = jax.jit(lambda x: quant.fake_quant(x, spec))(X_NAN)  # fake-quant keeps NaN visible
    assert np.isnan(np.asarray(y)).sum() == 1 and np.isnan(y[2, 1])


def test_traced_invalid_scale_gives_nan_not_zeros():
    for bad in (0.0, -1.0, NAN):
        s = jnp.full((1, 4), bad, jnp.float32)
        y = jax.jit(lambda x, s: quant.fake_quant(x, S8, scale=s))(X, s)
        assert np.isnan(np.asarray(y)).all()
        q = jax.jit(lambda x, s: quant.quantize(x, S8, scale=s))(X, s)
        assert np.isnan(np.asarray(quant.dequantize(q))).all()
        z = jax.jit(lambda x, s: quant.fake_quant_affine(x, s, 0, -8, 7))(X, jnp.float32(bad))
        assert np.isnan(np.asarray(z)).all()


def test_traced_nonfinite_gptq_falls_back_to_round_to_nearest():
    spec = QuantSpec(4, axis=-1)
    rtn = quant.quantize(X, spec)
    f = jax.jit(lambda w, h: quant.gptq(w, h, spec))
    for h in (H.at[0, 1].set(NAN), -H, jnp.full_like(H, INF)):
        q = f(X, h)
        for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(rtn), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = f(X, H)  # a good Hessian still gets GPTQ (different codes than RTN)
    assert not np.array_equal(np.asarray(q.values), np.asarray(rtn.values))
    # A NaN calibration batch under jit: the Hessian is NaN, the kernel is round-to-nearest.
    g = jax.jit(lambda w, x: quant.gptq(w, quant.gptq_hessian(x), spec))
    xs = jnp.ones((4, 8)).at[0, 0].set(NAN)
    np.testing.assert_array_equal(np.asarray(g(X, xs).values), np.asarray(rtn.values))


# --- integer-keyed NNX states --------------------------------------------------------------------


def test_nnx_list_through_quantize_model_and_quantize_params():
    model = _model(3)
    x = jnp.ones((2, 8))
    want = model(x)
    report = quantize_model(model, [("layers/1/", None), (None, S8)])
    assert [r.path for r in report.rows] == [
        "layers/0/kernel",
        "layers/1/kernel",
        "layers/2/kernel",
    ]
    assert [r.spec for r in report.rows] == [S8, None, S8]
    assert isinstance(model.layers[0].kernel[...], quant.QArray)
    assert not isinstance(model.layers[1].kernel[...], quant.QArray)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(want), rtol=0.05, atol=0.05)
    # The state and its pure-dict form: integer keys name the leaves "layers/<i>/kernel".
    for tree in (nnx.state(_model(3), nnx.Param), nnx.to_pure_dict(nnx.state(_model(3)))):
        q, rep = quant.quantize_params(tree, [(r"layers/2/kernel", None), (None, S8)])
        quantized = [r.path for r in rep.rows if r.spec is not None]
        assert quantized == ["layers/0/kernel", "layers/1/kernel"]
        back = quant.dequantize_params(q)
        assert jax.tree.structure(back) == jax.tree.structure(tree)
