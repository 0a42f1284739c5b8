"""Quantized Flax layers: NNX models quantized in place and a ``dot_general`` for Linen modules.

NNX, post-training (PTQ)::

    report = quantize_model(model, [("head", None), (None, QuantSpec(8, axis=-1))])
    logits = model(x)          # Linear: quant.qdot_general; Conv / Einsum: dequantized kernel

``nnx.Linear``, ``nnx.Conv`` and ``nnx.Einsum`` kernels become ``QArray``s (rules as in
``quant.quantize_params``, matched against ``"<module path>/kernel"``, e.g. ``"layers/0/kernel"``).
A Linear layer multiplies with ``quant.qdot_general``; with ``act_bits=8`` its input is quantized
per row on the fly and int8 x int8 products accumulate in int32 where that is faster (dynamic
quantization). Conv and Einsum layers dequantize the kernel and run the float op (weight-only).

NNX, quantization-aware training (QAT)::

    qat_model(model, rules, act_bits=8)   # kernels stay float Params, fake-quantized in the call
    ... train ...
    quantize_model(model, rules, act_bits=8)   # same grid: the trained weights quantize exactly

NNX, GPTQ (Frantar et al., 2023): pass model inputs as ``calibration`` and each Linear/Conv kernel
is quantized with ``quant.gptq`` from the statistics of its own inputs, layer after layer (a layer
sees the outputs of the layers already quantized before it). The statistics come from the core,
``jaxslim.calibrate.statistics`` on ``nnx.merge(graphdef, state)(x)``; ``quant.oneshot`` does the
same for any function (Linen, Hugging Face Flax, Equinox) and returns a quantized tree instead::

    quantize_model(model, QuantSpec(4, axis=-1, group_size=32), calibration=x_train[:1024])

Linen: ``nn.Dense(features, dot_general=fake_quant_dot_general(QuantSpec(4, axis=-1)))``
fake-quantizes the kernel (and, with ``act_bits``, the input) in the forward pass, with a
straight-through gradient, for QAT and for simulating PTQ; store the trained tree with
``quant.quantize_params`` and restore it with ``quant.dequantize_params``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from jax import lax

from jaxslim import _jaxpr, _tree, calibrate
from jaxslim._checks import at_leaf, public
from jaxslim.quant._dot import qdot_general
from jaxslim.quant._gptq import gptq
from jaxslim.quant._methods import GPTQ, as_method
from jaxslim.quant._observers import Observer
from jaxslim.quant._params import LeafSize, SizeReport
from jaxslim.quant._qarray import QArray, check_finite, dequantize, fake_quant, quantize
from jaxslim.quant._rules import match, normalize
from jaxslim.quant._spec import QuantSpec

__all__ = [
    "quantize_model",
    "qat_model",
    "fake_quant_dot_general",
    "quantized_layers",
    "conv_patches",
]

_LAYERS = (nnx.Linear, nnx.Conv, nnx.Einsum)


def _check_act_bits(act_bits: Any, fn: str) -> None:
    if act_bits is None:
        return
    try:
        QuantSpec(act_bits)
    except ValueError:
        raise ValueError(
            f"{fn}: act_bits must be None or an integer width of quant.QuantSpec (2, 3, 4, 8), "
            f"got {act_bits!r}"
        ) from None


def _act_spec(bits: int | None, ndim: int, per_row: bool) -> QuantSpec | None:
    if bits is None or ndim == 0:
        return None
    axis = tuple(range(ndim - 1)) if per_row else (0,)
    return QuantSpec(bits, axis=axis if ndim > 1 else None)


def _promote_keep_qarray(args, dtype=None, inexact=True):
    plain = tuple(None if isinstance(a, QArray) else a for a in args)
    out = dtypes.promote_dtype(plain, dtype=dtype, inexact=inexact)
    return tuple(a if isinstance(a, QArray) else o for a, o in zip(args, out, strict=True))


def _ptq_dot(
    lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *, act_bits=None, **kw
):
    spec = _act_spec(act_bits, lhs.ndim, per_row=True)
    return qdot_general(
        lhs, rhs, dimension_numbers, precision, preferred_element_type, lhs_spec=spec, **kw
    )


def _ptq_conv(lhs, rhs, *args, act_bits=None, **kw):
    spec = _act_spec(act_bits, lhs.ndim, per_row=False)
    if spec is not None:
        lhs = fake_quant(lhs, spec)
    w = dequantize(rhs) if isinstance(rhs, QArray) else rhs
    return lax.conv_general_dilated(lhs, w.astype(lhs.dtype), *args, **kw)


def _ptq_einsum(eq, lhs, rhs, **kw):
    w = dequantize(rhs) if isinstance(rhs, QArray) else rhs
    return jnp.einsum(eq, lhs, w, **kw)


def _qat_dot(
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    spec,
    act_bits=None,
    path="",
    **kw,
):
    aspec = _act_spec(act_bits, lhs.ndim, per_row=True)
    if aspec is not None:
        lhs = fake_quant(lhs, aspec)
    with at_leaf(path):
        rhs = fake_quant(rhs, spec)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw)


def _qat_conv(lhs, rhs, *args, spec, act_bits=None, path="", **kw):
    aspec = _act_spec(act_bits, lhs.ndim, per_row=False)
    if aspec is not None:
        lhs = fake_quant(lhs, aspec)
    with at_leaf(path):
        return lax.conv_general_dilated(lhs, fake_quant(rhs, spec), *args, **kw)


def _qat_einsum(eq, lhs, rhs, *, spec, path="", **kw):
    with at_leaf(path):
        return jnp.einsum(eq, lhs, fake_quant(rhs, spec), **kw)


@public("flax.quant.quantized_layers")
def quantized_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``[(path, module)]`` of the ``nnx.Linear``, ``nnx.Conv`` and ``nnx.Einsum`` layers."""
    return [
        ("/".join(str(k) for k in path), m)
        for path, m in nnx.iter_modules(model)
        if isinstance(m, _LAYERS)
    ]


def _plan(model, rules, default, fn):
    if not isinstance(model, nnx.Module):
        raise TypeError(f"{fn}: model must be an nnx.Module, got {type(model).__name__}")
    rules = normalize(rules, fn)
    if default is not None and not isinstance(default, QuantSpec):
        raise TypeError(f"{fn}: default must be a QuantSpec or None, got {default!r}")
    plan = []
    for path, m in quantized_layers(model):
        kernel = m.kernel[...]
        name = f"{path}/kernel" if path else "kernel"
        if isinstance(kernel, QArray) or not _tree.is_float_array(kernel):
            continue
        spec = match(rules, name, kernel, default=default)
        plan.append((name, m, kernel, spec))
    if not any(spec is not None for *_, spec in plan):
        raise ValueError(
            f"{fn}: the rules quantize no kernel; kernels are {[p for p, *_ in plan][:8]}"
        )
    return plan


@public("flax.conv_patches")
def conv_patches(
    lhs,
    rhs_shape,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    **_,
) -> jax.Array:
    """The input patches of a Flax convolution, ``(..., prod(spatial) * in)``, ordered like the
    rows of its kernel ``(*spatial, in, out)`` flattened: ``conv(x, k) == patches @ k.reshape(-1,
    out)``. Takes ``lax.conv_general_dilated``'s arguments (channels-last input, as Flax).

    >>> import jax.numpy as jnp
    >>> conv_patches(jnp.ones((2, 10, 3)), (5, 3, 4), (2,), [(2, 2)]).shape
    (2, 5, 15)
    """
    if feature_group_count != 1:
        raise ValueError(
            f"flax.conv_patches: feature_group_count must be 1, got {feature_group_count}"
        )
    spatial, cin = tuple(rhs_shape[:-2]), rhs_shape[-2]
    if dimension_numbers is None:
        nd = len(spatial)
        dimension_numbers = lax.conv_dimension_numbers(
            (1, *([1] * nd), cin),
            (*spatial, cin, 1),
            ("N" + "HWD"[:nd] + "C", "HWD"[:nd] + "IO", "N" + "HWD"[:nd] + "C"),
        )
    p = lax.conv_general_dilated_patches(
        lhs, spatial, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers
    )
    p = jnp.moveaxis(p, dimension_numbers.out_spec[1], -1)  # features (in, *spatial) last
    s = p.shape[-1] // cin
    return jnp.swapaxes(p.reshape(*p.shape[:-1], cin, s), -1, -2).reshape(p.shape)


def _as_fn(model: nnx.Module) -> tuple[Callable[[Any, Any], Any], Any]:
    """``(fn, state)`` with ``fn(state, x) == model(x)``: the model's current graph (quantized
    layers included) as the pure function ``jaxslim.calibrate`` traces."""
    graphdef, state = nnx.split(model)

    def call(state, x):
        return nnx.merge(graphdef, state)(x)

    call.__qualname__ = f"{type(model).__name__}.__call__"  # what errors name
    return call, state


def _calibrated_hessian(model: nnx.Module, name: str, batches: list) -> jax.Array:
    """``X^T X / n`` of the input rows of kernel ``name`` when ``model`` runs on ``batches``.

    ``calibrate.statistics`` on the model's *current* state, so the layers quantized before this
    one (with their ``act_bits``) shape its inputs. A Linear kernel's rows are its input vectors;
    a Conv kernel ``(*spatial, in, out)``'s are its im2col patches ordered like
    ``kernel.reshape(-1, out)``'s rows (``conv_patches``): ``(K, K)`` with ``K =
    prod(kernel.shape[:-1])``, what ``quant.gptq`` takes.
    """
    fn, state = _as_fn(model)
    stats = calibrate.statistics(
        fn, state, batches, where=lambda path, _: path == name, kernels=[name]
    )[name]
    return stats.xtx / stats.count.astype(stats.xtx.dtype)


def _reached(model: nnx.Module, batch: Any) -> set[str]:
    """The kernel paths that feed a ``dot_general`` / convolution of ``model(batch)``."""
    fn, state = _as_fn(model)
    return set(_jaxpr.kernel_uses(fn, state, batch))


@partial(jax.jit, static_argnums=(1, 2))
def _rtn(kernel, spec, observer):
    """Round to nearest, with scales from min/max or from ``observer``, in one compiled call."""
    if observer is None:
        return quantize(kernel, spec)
    obs = observer(spec)
    scale, zp = obs.result(obs.update(obs.init(kernel), kernel))
    return quantize(kernel, spec, scale=scale, zero_point=zp if spec.stores_zero_point else None)


def _gptq_applies(m) -> bool:
    return isinstance(m, nnx.Linear) or (isinstance(m, nnx.Conv) and m.feature_group_count == 1)


@public("flax.quantize_model")
def quantize_model(
    model: nnx.Module,
    rules: Any,
    *,
    default: QuantSpec | None = None,
    act_bits: int | None = None,
    observer: Callable[[QuantSpec], Observer] | None = None,
    calibration: Any = None,
    method: GPTQ | str | None = None,
) -> SizeReport:
    """Quantizes an NNX model's Linear/Conv/Einsum kernels in place (post-training).

    Args:
      model: an ``nnx.Module``; modified in place.
      rules: a ``QuantSpec`` or ``(where, spec or None)`` pairs matched against
        ``"<module path>/kernel"`` (first match wins; ``None`` keeps the kernel float).
      default: the spec for kernels no rule selects.
      act_bits: quantize Linear inputs per row to this many bits on the fly (int8 x int8 products
        where faster) and fake-quantize Conv inputs per example; ``None``: weight-only.
      observer: how kernel scales are chosen, e.g. ``quant.mse_observer`` (MSE-optimal clipping,
        better for 4 bits); ``None``: min/max of the kernel.
      calibration: model inputs (an array, or an iterable of arrays) for GPTQ: each Linear and
        Conv kernel is quantized by ``quant.gptq`` from the Hessian ``X^T X / n`` of its own
        inputs (``jaxslim.calibrate.statistics``; a Conv's rows are its im2col patches), in
        model order, after the layers before it are quantized (other layers, and kernels that
        feed no matmul of ``model(x)``, round to nearest). Not with ``observer``. A batch with
        NaN or inf raises ``ValueError`` (so does a kernel with NaN or inf, and a kernel in a
        branch no batch runs).
      method: the ``quant.GPTQ(damp=..., block_size=..., clip_candidates=...)`` record used with
        ``calibration`` (``None``: ``GPTQ()``).

    Returns:
      A ``quant.SizeReport`` of the kernels (bytes before/after).

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> model = nnx.Linear(64, 8, rngs=nnx.Rngs(0))
    >>> report = quantize_model(model, QuantSpec(4, axis=-1, group_size=32))
    >>> type(model.kernel[...]).__name__, report.bytes_before, report.bytes_after
    ('QArray', 2048, 320)
    >>> model(jnp.ones((2, 64))).shape
    (2, 8)
    """
    fn = "flax.quantize_model"
    if calibration is not None and observer is not None:
        raise ValueError(f"{fn}: pass calibration (GPTQ) or observer, not both")
    if method is not None and calibration is None:
        raise ValueError(f"{fn}: method={method!r} given without calibration inputs")
    method = as_method("gptq" if method is None else method, fn)
    if not isinstance(method, GPTQ):
        raise ValueError(
            f"{fn}: method must be quant.GPTQ(...) (the calibrated method of quantize_model; for "
            f"AWQ, HQQ or SmoothQuant use quant.oneshot), got {method!r}"
        )
    if method.qep:
        raise ValueError(
            f"{fn}: GPTQ(qep={method.qep}) needs each layer's inputs in the float and the partly "
            "quantized model (quantize_model calibrates every layer on the float model); use "
            "quant.oneshot(nnx_fn, state, batches, rules, method=GPTQ(qep=...)) on "
            "nnx.split(model)"
        )
    if observer is not None and not callable(observer):
        raise TypeError(f"{fn}: observer must be a function spec -> Observer, got {observer!r}")
    _check_act_bits(act_bits, fn)
    reached: set[str] = set()
    if calibration is not None:
        batches = [calibration] if hasattr(calibration, "shape") else list(calibration)
        if not batches:
            raise ValueError(f"{fn}: calibration holds no batch")
        batches = [jnp.asarray(xb) for xb in batches]
        for i, xb in enumerate(batches):
            if jnp.issubdtype(xb.dtype, jnp.floating):
                check_finite(xb, f"calibration batch {i}")
    plan = _plan(model, rules, default, fn)
    if calibration is not None and any(s is not None and _gptq_applies(m) for _, m, _, s in plan):
        reached = _reached(model, batches[0])
    rows = []
    for name, m, kernel, spec in plan:
        if spec is None:
            rows.append(LeafSize(name, tuple(kernel.shape), None, kernel.nbytes, kernel.nbytes))
            continue
        check_finite(kernel, name)
        if name in reached and _gptq_applies(m):
            h = _calibrated_hessian(model, name, batches)
            with at_leaf(name):
                q = gptq(
                    kernel,
                    h,
                    spec,
                    damp=method.damp,
                    block_size=method.block_size,
                    clip_candidates=method.clip_candidates,
                    act_order=method.act_order,
                )
        else:
            with at_leaf(name):
                jax.eval_shape(partial(quantize, spec=spec), kernel)  # names the leaf
            q = _rtn(kernel, spec, observer)
        m.kernel.set_value(q) if hasattr(m.kernel, "set_value") else setattr(m.kernel, "value", q)
        m.promote_dtype = _promote_keep_qarray
        if isinstance(m, nnx.Linear):
            m.dot_general = partial(_ptq_dot, act_bits=act_bits)
        elif isinstance(m, nnx.Conv):
            m.conv_general_dilated = partial(_ptq_conv, act_bits=act_bits)
        else:
            m.einsum_op = _ptq_einsum
        rows.append(LeafSize(name, tuple(kernel.shape), spec, kernel.nbytes, q.nbytes))
    return SizeReport(tuple(rows))


@public("flax.qat_model")
def qat_model(
    model: nnx.Module, rules: Any, *, default: QuantSpec | None = None, act_bits: int | None = None
) -> list[str]:
    """Makes an NNX model quantization-aware in place: kernels are fake-quantized in the call.

    Kernels stay float ``nnx.Param``s and train through the straight-through estimator
    (``quant.fake_quant``); with ``act_bits`` the layer inputs are fake-quantized too (per row for
    Linear, per example for Conv), the same grid ``quantize_model(..., act_bits=...)`` uses.
    Returns the paths of the fake-quantized kernels.

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    >>> qat_model(model, QuantSpec(4, axis=-1))
    ['kernel']
    """
    fn = "flax.qat_model"
    _check_act_bits(act_bits, fn)
    done = []
    for name, m, _, spec in _plan(model, rules, default, fn):
        if spec is None:
            continue
        if isinstance(m, nnx.Linear):
            m.dot_general = partial(_qat_dot, spec=spec, act_bits=act_bits, path=name)
        elif isinstance(m, nnx.Conv):
            m.conv_general_dilated = partial(_qat_conv, spec=spec, act_bits=act_bits, path=name)
        else:
            m.einsum_op = partial(_qat_einsum, spec=spec, path=name)
        done.append(name)
    return done


@public("flax.fake_quant_dot_general")
def fake_quant_dot_general(spec: QuantSpec, *, act_bits: int | None = None):
    """A ``dot_general`` for Linen layers that fake-quantizes the kernel (and input) first.

    ``nn.Dense(features, dot_general=fake_quant_dot_general(QuantSpec(8, axis=-1)))`` trains
    with quantized weights (straight-through gradient) or, on trained parameters, shows the
    accuracy of post-training quantization with that spec.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> layer = nn.Dense(3, dot_general=fake_quant_dot_general(QuantSpec(4, axis=-1)))
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 8)))
    >>> layer.apply(params, jnp.ones((2, 8))).shape
    (2, 3)
    """
    fn = "flax.fake_quant_dot_general"
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{fn}: spec must be a QuantSpec, got {spec!r}")
    _check_act_bits(act_bits, fn)
    return partial(_qat_dot, spec=spec, act_bits=act_bits)
