"""``quant.oneshot``: calibrated post-training quantization of any function's kernels.

The twin of ``prune.oneshot``: ``fn(params, batch)`` is traced (``jaxslim.calibrate``), every
kernel a rule quantizes gets its input statistics, and one method (a record of
``quant/_methods.py``) quantizes it:

* ``RTN()``: round to nearest (``quant.quantize``);
* ``GPTQ(damp, block_size, ...)``: ``quant.gptq`` on the kernel's ``X^T X`` (with ``qep``, on
  ``quant.qep_correct`` of the kernel: fitted to the float model's outputs);
* ``HQQ(iters)``: ``quant.hqq`` (calibration-free; statistics only for the report);
* ``AWQ(grid, act, clip)``: ``quant.awq_scales`` per group of kernels sharing an input, folded
  into the absorber ``quant.find_absorbers`` finds, then RTN;
* ``SmoothQuant(alpha)``: ``quant.smooth_scales``, folded the same way, then int8 weights per
  output channel (W8A8: run the activations through ``quant.w8a8_dot`` / ``qdot_general`` with a
  per-token ``lhs_spec``).

**Layouts.** Read from the jaxpr (``calibrate.Stats.contracted_axes``), never assumed: a rule's
``QuantSpec`` is written for a Flax ``(in, out)`` kernel (``axis=-1`` per output channel,
``group_size`` along the input); on each kernel it is re-pointed so that ``axis`` is the kernel's
output axes and ``group_axis`` its last contracted axis (Equinox ``(out, in)``, einsum ``(d,
heads, hd)``, an attention output ``(heads, hd, d)`` all work). Kernels with batch or scanned
layer axes are refused (exclude them with a rule ``(where, None)``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxslim import _jaxpr, _tree, calibrate
from jaxslim._checks import at_leaf, caller, public
from jaxslim._oneshot import KernelRow, OneshotReport, relative_error
from jaxslim.quant._awq import (
    apply_scales,
    as_matrix,
    awq_clip,
    awq_scales,
    find_absorbers,
    from_matrix,
    matrix_spec,
)
from jaxslim.quant._gptq import gptq
from jaxslim.quant._hqq import hqq
from jaxslim.quant._methods import AWQ, GPTQ, HQQ, RTN, Method, SmoothQuant, as_method
from jaxslim.quant._qarray import QArray, dequantize, quantize
from jaxslim.quant._qep import qep_correct
from jaxslim.quant._rules import first, normalize
from jaxslim.quant._smoothquant import W8_SPEC, smooth_scales
from jaxslim.quant._spec import QuantSpec, layout


def kernel_spec(spec: QuantSpec, shape, contracted, output) -> QuantSpec:
    """``spec`` (written for a Flax ``(in, out)`` kernel) on a kernel with these axes: ``axis``
    -> the output axes, ``group_axis`` -> the last contracted axis.

    >>> kernel_spec(QuantSpec(4, axis=-1, group_size=32), (16, 64), (1,), (0,)).axis
    (0,)
    """
    if isinstance(spec.group_size, tuple):  # tiles: (the last contracted, the last output)
        if len(spec.group_size) != 2 or len(contracted) != 1 or len(output) != 1:
            raise ValueError(
                f"{caller()}: group_size={spec.group_size} (tiles) fits a 2-D (input, output) "
                f"kernel with tiles such as (128, 128); this kernel has shape {tuple(shape)} "
                f"with contracted axes {tuple(contracted)} and output axes {tuple(output)}"
            )
        ga: Any = (max(contracted), max(output))
    else:
        ga = None if spec.group_size is None else max(contracted)
    return dataclasses.replace(
        spec, axis=None if spec.axis is None else tuple(output), group_axis=ga
    )


@public("quant.oneshot")
def oneshot(
    fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    rules: Any,
    *,
    method: Method | str = "rtn",
    sequential: bool = True,
    reference_batches: Iterable[Any] | None = None,
) -> tuple[Any, OneshotReport]:
    """Quantizes the kernels of ``fn(params, batch)`` with a calibrated method.

    Args:
      fn: ``fn(params, batch)`` (plain, Linen ``apply``, NNX ``merge``, Equinox, ...).
      params: its parameter pytree.
      batches: calibration batches (read once into a list).
      rules: as ``quant.quantize_params``: a ``QuantSpec`` or ``[(where, spec or None)]``, first
        match wins, ``None`` keeps the leaf float. A leaf a ``gather`` reads (an embedding
        table, also the LM head when tied) is left float unless a rule's ``where=`` names it
        (``report.skipped`` says so). Specs are written for a Flax ``(in, out)``
        kernel and re-pointed at each kernel's own axes (:func:`kernel_spec`). A matched leaf
        that feeds no matmul (an embedding table used by a gather) is quantized round-to-nearest.
      method: ``RTN()``, ``GPTQ(damp=0.01, block_size=128)``, ``AWQ(grid=20, act="rms",
        clip=True)``, ``HQQ(iters=20)`` or ``SmoothQuant(alpha=0.5)`` (module docstring), or
        the name of one (its defaults). ``SmoothQuant`` ignores the rules' specs for kernels and
        uses int8 per output channel.
      sequential: calibrate each kernel on the outputs of the already-quantized earlier kernels
        (``calibrate.sequential``); else all on the float model. ``"rtn"`` and ``"hqq"`` are
        calibration-free: their weights do not depend on it, and their report's errors are
        always measured on the float model's inputs (one calibration pass).
      reference_batches: with ``GPTQ(qep=...)`` on a block of a bigger model whose earlier
        blocks are already compressed, the float model's inputs to this block, one per batch
        (``calibrate.stream(..., reference=True)`` gives them); default ``batches``.

    Returns:
      ``(qparams, report)``: ``params`` with ``QArray`` leaves where a rule quantized (AWQ and
      SmoothQuant also rescale their absorbers, float, so the float function is unchanged),
      and a ``quant.OneshotReport`` (the same type as ``prune.oneshot``'s): one row per
      quantized leaf with its spec on the kernel's own layout, bytes before/after, the relative
      output error ``||XW - XW'||_F / ||XW||_F`` on its calibration inputs (``nan`` for a leaf
      that feeds no matmul), the round-to-nearest ``baseline`` error and ``seconds``;
      ``report.absorbers`` / ``report.alphas`` for AWQ and SmoothQuant. With
      ``GPTQ(qep=...)`` the errors are still ``||X_q (W - W')|| / ||X_q W||`` against the
      original kernel on the compressed model's inputs, which QEP gives up on purpose for the
      float model's outputs: judge it on the model's output (perplexity, logits).

    >>> import jax, jax.numpy as jnp
    >>> params = {"norm": jnp.ones(16), "w": jax.random.normal(jax.random.key(0), (16, 8))}
    >>> f = lambda p, x: (x * p["norm"][None]) @ p["w"]
    >>> xs = [jax.random.normal(jax.random.key(1), (32, 16))]
    >>> q, rep = oneshot(f, params, xs, QuantSpec(4, axis=-1, group_size=8), method=AWQ(grid=10))
    >>> type(q["w"]).__name__, rep.absorbers["w"]
    ('QArray', 'norm')
    """
    name = "quant.oneshot"
    t0 = time.perf_counter()
    method = as_method(method, name)
    if not isinstance(sequential, bool):
        raise TypeError(f"{name}: sequential must be a bool, got {sequential!r}")
    qep = isinstance(method, GPTQ) and method.qep > 0
    if qep and not sequential:
        raise ValueError(
            f"{name}: GPTQ(qep={method.qep}) corrects the error of the already-quantized kernels "
            "before each one, which needs sequential=True (with sequential=False every kernel "
            "sees the float inputs and the correction is zero)"
        )
    if reference_batches is not None and not qep:
        raise ValueError(
            f"{name}: reference_batches is read only by GPTQ(qep=...) (the float model's inputs "
            f"it fits against), got method {method!r}"
        )
    rules = normalize(rules, name)
    _tree.reject_traced(params, why="oneshot calibrates and checks values")
    batches = list(batches)
    if not batches:
        raise ValueError(f"{name}: batches is empty; pass at least one calibration batch")
    traced = _jaxpr.make_jaxpr(fn, params, batches[0])
    uses = _jaxpr.kernel_uses_of(traced)
    gathered = set(_jaxpr.gathered_of(traced))
    leaves = dict(_tree.leaves_with_paths(params))
    specs: dict[str, QuantSpec] = {}
    skipped: dict[str, str] = {}
    for path, leaf in leaves.items():
        if not _tree.is_float_array(leaf):
            continue
        rule = first(rules, path, leaf)
        if rule is None or rule.spec is None:
            continue
        if leaf.ndim < 2:
            skipped[path] = (
                "a vector (a norm scale or a bias) feeds no matmul: left float; "
                "quant.quantize_params quantizes it round-to-nearest"
            )
            continue
        if rule.where is None and path in gathered:
            skipped[path] = (
                "gathered (an embedding table, and the LM head when tied): left float; a rule "
                "whose where= names it quantizes it"
            )
            continue
        specs[path] = W8_SPEC if isinstance(method, SmoothQuant) else rule.spec
    if not specs:
        raise ValueError(f"{name}: the rules quantize no leaf of fn {getattr(fn, '__name__', fn)}")
    in_matmul = {p for p in specs if p in uses}
    kernels = [p for p in uses if p in in_matmul]  # execution order
    # GPTQ with sequential=True calibrates every kernel inside calibrate.sequential: no pass
    # over the float model first (it would cost one forward and every kernel's Hessian, held
    # in memory for the whole run).
    upfront = bool(in_matmul) and not (sequential and isinstance(method, GPTQ))
    stats = (
        calibrate.statistics(fn, params, batches, where=lambda p, x: p in in_matmul)
        if upfront
        else {}
    )
    for path, st in stats.items():
        _check_lead(path, st, name)

    def axes(st):
        c = tuple(st.contracted_axes)
        return c, tuple(a for a in range(len(st.shape)) if a not in c)

    absorbers: dict = {}
    alphas: dict = {}
    unfolded: set = set()
    if isinstance(method, AWQ | SmoothQuant):
        groups = find_absorbers(fn, params, batches[0], stats, kernels)
        for g in groups:
            for p in g.kernels:
                absorbers[p] = g.absorber
            if g.absorber is None:
                unfolded.update(g.kernels)
                continue
            st = stats[g.kernels[0]]
            ws = [as_matrix(leaves[p], *axes(stats[p])) for p in g.kernels]
            gname = ",".join(g.kernels)
            if isinstance(method, AWQ):
                a = (
                    jnp.sqrt(st.sq_norm / jnp.maximum(st.count.astype(jnp.float32), 1.0))
                    if method.act == "rms"
                    else st.absmax
                )
                spec0 = specs[g.kernels[0]]
                with at_leaf(gname):
                    s, al = awq_scales(ws, st.xtx, a, spec0, n_grid=method.grid)
                al = float(al)
            else:
                al = float(method.alpha)
                with at_leaf(gname):
                    s = smooth_scales(ws, st.absmax, alpha=al)
            for p in g.kernels:
                alphas[p] = al
            params = apply_scales(params, g, s)
        leaves = dict(_tree.leaves_with_paths(params))
        if not sequential:  # statistics of the rescaled float model
            stats = calibrate.statistics(fn, params, batches, where=lambda p, x: p in in_matmul)
        else:  # calibrate.sequential computes each kernel's own: free these now
            stats = {}

    qarrays: dict[str, QArray] = {}
    errors: dict[str, tuple[float, float, float]] = {}

    def compress(path, w, st):
        _check_lead(path, st, name)
        c, o = axes(st)
        spec = kernel_spec(specs[path], w.shape, c, o)
        layout(spec, tuple(w.shape), path=path)
        w2 = as_matrix(w.astype(jnp.float32), c, o)
        t0 = time.perf_counter()
        if isinstance(method, AWQ) and method.clip and path not in unfolded:
            q2 = awq_clip(w2, st.xtx, specs[path], path=path)
            deq2 = q2.dequantize().astype(jnp.float32)
            q = _requantize(q2, from_matrix(deq2, w.shape, c, o).astype(w.dtype), spec, c, o)
        elif isinstance(method, GPTQ):
            m2 = matrix_spec(specs[path])
            target = w2
            if qep:
                with at_leaf(path):
                    target = qep_correct(w2, st.xtx, st.cross, alpha=method.qep, damp=method.damp)
            with at_leaf(path):
                q2 = gptq(
                    target,
                    st.xtx,
                    m2,
                    damp=method.damp,
                    block_size=method.block_size,
                    clip_candidates=method.clip_candidates,
                    act_order=method.act_order,
                )
            deq2 = q2.dequantize().astype(jnp.float32)
            q = _requantize(q2, from_matrix(deq2, w.shape, c, o).astype(w.dtype), spec, c, o)
        elif isinstance(method, HQQ):
            with at_leaf(path):
                q = hqq(w, spec, iters=method.iters)
        else:
            with at_leaf(path):
                q = quantize(w, spec)
        deq = jax.block_until_ready(dequantize(q).astype(w.dtype))
        seconds = time.perf_counter() - t0
        qarrays[path] = q
        error = relative_error(w2, as_matrix(deq.astype(jnp.float32), c, o), st.xtx)
        if isinstance(method, RTN):
            baseline = error
        else:
            with at_leaf(path):
                rtn = dequantize(quantize(w, spec)).astype(jnp.float32)
            baseline = relative_error(w2, as_matrix(rtn, c, o), st.xtx)
        errors[path] = (error, baseline, seconds)
        return deq

    if sequential and isinstance(method, GPTQ | AWQ | SmoothQuant) and in_matmul:
        calibrate.sequential(
            fn,
            params,
            batches,
            compress,
            where=lambda p, x: p in in_matmul,
            cross=qep,
            reference_batches=reference_batches,
        )
    else:
        for p in kernels:
            compress(p, leaves[p], stats[p])

    rows = []
    for path, spec in specs.items():
        leaf = leaves[path]
        if path in qarrays:
            m = method.name if path not in unfolded else f"{method.name} (no absorber)"
            q, (err, base, sec) = qarrays[path], errors[path]
        else:  # not a kernel: round to nearest
            with at_leaf(path):
                q, m = quantize(leaf, spec), "rtn (no matmul)"
            err = base = sec = math.nan
            qarrays[path] = q
        rows.append(
            KernelRow(
                path=path,
                method=m,
                shape=tuple(leaf.shape),
                error=err,
                baseline=base,
                seconds=sec,
                spec=q.spec,
                bytes_before=math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize,
                bytes_after=q.nbytes,
            )
        )
    flat, tree = jax.tree_util.tree_flatten_with_path(params)
    out = jax.tree.unflatten(tree, [qarrays.get(_tree.path_str(p), x) for p, x in flat])
    seconds = time.perf_counter() - t0
    report = OneshotReport(
        method, tuple(rows), seconds, absorbers=absorbers, alphas=alphas, skipped=skipped
    )
    return out, report


def _check_lead(path: str, st: calibrate.Stats, name: str) -> None:
    if st.lead_axes:
        raise ValueError(
            f"{name}: kernel {path!r} has batch/layer axes {st.lead_axes} (shape {st.shape}); "
            "per-slice quantization is not supported: exclude it with a rule (where, None)"
        )


def _requantize(q2: QArray, w: jax.Array, spec: QuantSpec, c, o) -> QArray:
    """The codes of ``q2`` (on the ``(K, N)`` view) as a ``QArray`` of ``w``'s layout: the
    per-element scales (and zero points) mapped back, sampled at the layout's scale shape."""
    lay2 = layout(q2.spec, tuple(q2.shape))
    lay = layout(spec, tuple(w.shape))

    def per_element(a):
        full = lay2.expand(a)
        full = lay.to_view(from_matrix(full, w.shape, c, o))
        idx = tuple(slice(0, 1) if i in lay.reduce_axes else slice(None) for i in range(full.ndim))
        return full[idx]

    scale = per_element(q2.float_scale())
    zp = None
    if spec.stores_zero_point:
        zp = per_element(q2.zero_point.astype(jnp.int32))
    return quantize(w, spec, scale=scale, zero_point=zp)
