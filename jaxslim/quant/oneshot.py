"""``quant.oneshot``: calibrated post-training quantization of any function's kernels.

The twin of ``prune.oneshot``: ``fn(params, batch)`` is traced (``jaxslim.calibrate``), every
kernel a rule quantizes gets its input statistics, and one method quantizes it:

* ``"rtn"``: round to nearest (``quant.quantize``);
* ``"gptq"``: ``quant.gptq`` on the kernel's ``X^T X``;
* ``"hqq"``: ``quant.hqq`` (calibration-free; statistics only for the report);
* ``"awq"``: ``quant.awq_scales`` per group of kernels sharing an input, folded into the absorber
  ``quant.find_absorbers`` finds, then RTN;
* ``"smoothquant"``: ``quant.smooth_scales`` (``alpha``), folded the same way, then int8 weights
  per output channel (W8A8: run the activations through ``quant.w8a8_dot`` / ``qdot_general``
  with a per-token ``lhs_spec``).

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
from jaxslim.quant.awq import (
    apply_scales,
    as_matrix,
    awq_clip,
    awq_scales,
    find_absorbers,
    from_matrix,
    matrix_spec,
)
from jaxslim.quant.gptq import gptq
from jaxslim.quant.hqq import hqq
from jaxslim.quant.params import _normalize_rules
from jaxslim.quant.qarray import QArray, dequantize, quantize
from jaxslim.quant.smoothquant import W8_SPEC, check_alpha, smooth_scales
from jaxslim.quant.spec import QuantSpec, layout

__all__ = ["oneshot", "OneshotReport", "KernelReport", "kernel_spec"]

METHODS = ("rtn", "gptq", "awq", "hqq", "smoothquant")


@dataclasses.dataclass(frozen=True)
class KernelReport:
    """One quantized leaf: ``method`` (with ``" (no absorber)"`` when AWQ/SmoothQuant found
    nothing to fold into), its spec on the kernel's own layout, bytes before/after, and the
    relative output error ``tr(D^T H D) / tr(W^T H W)`` on its calibration inputs (``nan`` for a
    leaf that feeds no matmul)."""

    path: str
    shape: tuple[int, ...]
    method: str
    spec: QuantSpec
    bytes_before: int
    bytes_after: int
    rel_error: float


@dataclasses.dataclass(frozen=True)
class OneshotReport:
    """``rows`` per quantized leaf, ``absorbers`` ``{kernel path: absorber path or None}``
    (AWQ/SmoothQuant), ``alphas`` ``{kernel path: alpha}``, ``seconds`` wall time."""

    rows: tuple[KernelReport, ...]
    absorbers: dict
    alphas: dict
    seconds: float

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    def __str__(self) -> str:
        lines = [f"{'path':32} {'method':22} {'bits':>4} {'bytes':>10} {'rel err':>9}"]
        for r in self.rows:
            lines.append(
                f"{r.path:32} {r.method:22} {r.spec.bits:>4} {r.bytes_after:>10} "
                f"{r.rel_error:>9.2e}"
            )
        lines.append(f"total {self.bytes_before} -> {self.bytes_after} bytes, {self.seconds:.2f} s")
        return "\n".join(lines)


def kernel_spec(spec: QuantSpec, shape, contracted, output) -> QuantSpec:
    """``spec`` (written for a Flax ``(in, out)`` kernel) on a kernel with these axes: ``axis``
    -> the output axes, ``group_axis`` -> the last contracted axis.

    >>> kernel_spec(QuantSpec(4, axis=-1, group_size=32), (16, 64), (1,), (0,)).axis
    (0,)
    """
    return dataclasses.replace(
        spec,
        axis=None if spec.axis is None else tuple(output),
        group_axis=None if spec.group_size is None else max(contracted),
    )


def _rel_error(w2, q2, h) -> float:
    d = w2 - q2
    num = jnp.sum(d * (h @ d))
    den = jnp.sum(w2 * (h @ w2))
    return float(num / jnp.maximum(den, 1e-30))


def oneshot(
    fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    rules: Any,
    *,
    method: str = "rtn",
    sequential: bool = True,
    alpha: float = 0.5,
    n_grid: int = 20,
    act: str = "rms",
    damp: float = 0.01,
    block_size: int = 128,
    hqq_iters: int = 20,
    clip: bool = True,
) -> tuple[Any, OneshotReport]:
    """Quantizes the kernels of ``fn(params, batch)`` with a calibrated method.

    Args:
      fn: ``fn(params, batch)`` (plain, Linen ``apply``, NNX ``merge``, Equinox, ...).
      params: its parameter pytree.
      batches: calibration batches (read once into a list).
      rules: as ``quant.quantize_params``: a ``QuantSpec`` or ``[(where, spec or None)]``, first
        match wins, ``None`` keeps the leaf float. Specs are written for a Flax ``(in, out)``
        kernel and re-pointed at each kernel's own axes (:func:`kernel_spec`). A matched leaf
        that feeds no matmul (an embedding table used by a gather) is quantized round-to-nearest.
      method: ``"rtn"``, ``"gptq"``, ``"awq"``, ``"hqq"`` or ``"smoothquant"`` (module
        docstring). ``"smoothquant"`` ignores the rules' specs for kernels and uses int8 per
        output channel (``quant.smoothquant.W8_SPEC``).
      sequential: calibrate each kernel on the outputs of the already-quantized earlier kernels
        (``calibrate.sequential``); else all on the float model. ``"rtn"`` and ``"hqq"`` are
        calibration-free: their weights do not depend on it, and their report's errors are
        always measured on the float model's inputs (one calibration pass).
      alpha: SmoothQuant's migration strength in ``[0, 1]``.
      n_grid: AWQ's grid size over ``alpha`` in ``[0, 1)``.
      act: AWQ's activation magnitude, ``"rms"`` (``sqrt(mean x^2)``) or ``"absmax"``.
      clip: AWQ's weight clipping after the scaling (``quant.awq.awq_clip``, the reference's
        ``auto_clip``), for kernels whose scale was folded.
      damp, block_size: GPTQ's. hqq_iters: HQQ's iterations.

    Returns:
      ``(qparams, report)``: ``params`` with ``QArray`` leaves where a rule quantized (AWQ and
      SmoothQuant also rescale their absorbers, float, so the float function is unchanged),
      and a :class:`OneshotReport`.

    >>> import jax, jax.numpy as jnp
    >>> params = {"norm": jnp.ones(16), "w": jax.random.normal(jax.random.key(0), (16, 8))}
    >>> f = lambda p, x: (x * p["norm"][None]) @ p["w"]
    >>> xs = [jax.random.normal(jax.random.key(1), (32, 16))]
    >>> q, rep = oneshot(f, params, xs, QuantSpec(4, axis=-1, group_size=8), method="awq")
    >>> type(q["w"]).__name__, rep.absorbers["w"]
    ('QArray', 'norm')
    """
    name = "quant.oneshot"
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"{name}: method must be one of {METHODS}, got {method!r}")
    if act not in ("rms", "absmax"):
        raise ValueError(f"{name}: act must be 'rms' or 'absmax', got {act!r}")
    if not isinstance(sequential, bool):
        raise TypeError(f"{name}: sequential must be a bool, got {sequential!r}")
    if method == "smoothquant":
        check_alpha(alpha, name)
    rules = _normalize_rules(rules, name)
    _tree.reject_traced(params, fn_name=name, why="oneshot calibrates and checks values")
    batches = list(batches)
    if not batches:
        raise ValueError(f"{name}: batches is empty; pass at least one calibration batch")
    leaves = dict(_tree.leaves_with_paths(params))
    specs: dict[str, QuantSpec] = {}
    for path, leaf in leaves.items():
        if not _tree.is_float_array(leaf):
            continue
        for where, s in rules:
            if _tree.is_selected(where, path, leaf, fn_name=name):
                if s is not None:
                    specs[path] = W8_SPEC if method == "smoothquant" else s
                break
    if not specs:
        raise ValueError(f"{name}: the rules quantize no leaf of fn {getattr(fn, '__name__', fn)}")
    uses = _jaxpr.kernel_uses(fn, params, batches[0], fn_name=name)
    in_matmul = {p for p in specs if p in uses}
    if in_matmul:
        stats = calibrate.statistics(fn, params, batches, where=lambda p, x: p in in_matmul)
    else:
        stats = {}
    for path, st in stats.items():
        if st.lead_axes:
            raise ValueError(
                f"{name}: kernel {path!r} has batch/layer axes {st.lead_axes} (shape {st.shape}); "
                "per-slice quantization is not supported: exclude it with a rule (where, None)"
            )
    kernels = [p for p in stats]

    def axes(path):
        st = stats[path]
        c = tuple(st.contracted_axes)
        return c, tuple(a for a in range(len(st.shape)) if a not in c)

    absorbers: dict = {}
    alphas: dict = {}
    unfolded: set = set()
    if method in ("awq", "smoothquant"):
        groups = find_absorbers(fn, params, batches[0], stats, kernels)
        for g in groups:
            for p in g.kernels:
                absorbers[p] = g.absorber
            if g.absorber is None:
                unfolded.update(g.kernels)
                continue
            st = stats[g.kernels[0]]
            ws = [as_matrix(leaves[p], *axes(p)) for p in g.kernels]
            gname = ",".join(g.kernels)
            if method == "awq":
                a = (
                    jnp.sqrt(st.sq_norm / jnp.maximum(st.count.astype(jnp.float32), 1.0))
                    if act == "rms"
                    else st.absmax
                )
                s, al = awq_scales(ws, st.xtx, a, specs[g.kernels[0]], n_grid=n_grid, path=gname)
                al = float(al)
            else:
                s, al = smooth_scales(ws, st.absmax, alpha=alpha, path=gname), alpha
            for p in g.kernels:
                alphas[p] = al
            params = apply_scales(params, g, s)
        leaves = dict(_tree.leaves_with_paths(params))
        if not sequential:  # statistics of the rescaled float model
            stats = calibrate.statistics(fn, params, batches, where=lambda p, x: p in in_matmul)

    qarrays: dict[str, QArray] = {}
    errors: dict[str, float] = {}

    def compress(path, w, st):
        c, o = axes(path)
        spec = kernel_spec(specs[path], w.shape, c, o)
        layout(spec, tuple(w.shape), path=path, fn_name=name)
        w2 = as_matrix(w.astype(jnp.float32), c, o)
        if method == "awq" and clip and path not in unfolded:
            q2 = awq_clip(w2, st.xtx, specs[path], path=path)
            deq2 = q2.dequantize().astype(jnp.float32)
            q = _requantize(q2, from_matrix(deq2, w.shape, c, o).astype(w.dtype), spec, c, o)
        elif method == "gptq":
            q2 = gptq(w2, st.xtx, matrix_spec(specs[path]), damp=damp,
                      block_size=block_size, path=path)  # fmt: skip
            deq2 = q2.dequantize().astype(jnp.float32)
            q = _requantize(q2, from_matrix(deq2, w.shape, c, o).astype(w.dtype), spec, c, o)
        elif method == "hqq":
            q = hqq(w, spec, iters=hqq_iters, path=path)
        else:
            q = quantize(w, spec, path=path)
        deq = dequantize(q).astype(w.dtype)
        qarrays[path] = q
        errors[path] = _rel_error(w2, as_matrix(deq.astype(jnp.float32), c, o), st.xtx)
        return deq

    if sequential and method in ("gptq", "awq", "smoothquant") and in_matmul:
        calibrate.sequential(fn, params, batches, compress, where=lambda p, x: p in in_matmul)
    else:
        for p in kernels:
            compress(p, leaves[p], stats[p])

    rows = []
    for path, spec in specs.items():
        leaf = leaves[path]
        if path in qarrays:
            m = method if path not in unfolded else f"{method} (no absorber)"
            q, err = qarrays[path], errors[path]
            spec_used = q.spec
        else:  # not a kernel: round to nearest
            q, err, m, spec_used = (
                quantize(leaf, spec, path=path),
                math.nan,
                "rtn (no matmul)",
                spec,
            )
            qarrays[path] = q
        rows.append(
            KernelReport(
                path,
                tuple(leaf.shape),
                m,
                spec_used,
                math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize,
                q.nbytes,
                err,
            )  # fmt: skip
        )
    flat, tree = jax.tree_util.tree_flatten_with_path(params)
    out = jax.tree.unflatten(tree, [qarrays.get(_tree.path_str(p), x) for p, x in flat])
    return out, OneshotReport(tuple(rows), absorbers, alphas, time.perf_counter() - t0)


def _requantize(q2: QArray, w: jax.Array, spec: QuantSpec, c, o) -> QArray:
    """The codes of ``q2`` (on the ``(K, N)`` view) as a ``QArray`` of ``w``'s layout: the
    per-element scales (and zero points) mapped back, sampled at the layout's scale shape."""
    lay2 = layout(q2.spec, tuple(q2.shape))
    lay = layout(spec, tuple(w.shape))

    def per_element(a):
        full = jnp.broadcast_to(a, lay2.view_shape).reshape(q2.shape)
        full = from_matrix(full, w.shape, c, o).reshape(lay.view_shape)
        idx = tuple(slice(0, 1) if i in lay.reduce_axes else slice(None) for i in range(full.ndim))
        return full[idx]

    scale = per_element(q2.float_scale())
    zp = None
    if spec.stores_zero_point:
        zp = per_element(q2.zero_point.astype(jnp.int32))
    return quantize(w, spec, scale=scale, zero_point=zp)
