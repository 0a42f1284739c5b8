"""GPTQ: post-training weight quantization that corrects each rounding error with the rows not yet
quantized, using second-order statistics of calibration inputs.

Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (after Optimal Brain Quantization, Frantar & Alistarh 2022).

A layer computes ``X W`` with ``W`` the kernel seen as a ``(K, N)`` matrix (a Flax kernel
``(*contraction, out)`` flattened over all axes but the last; a conv kernel ``(*spatial, in, out)``
against its input patches in the same order). GPTQ minimises ``||X W - X Q||^2`` over quantized
``Q`` row by row: with ``H = X^T X + damp * mean(diag(X^T X)) * I`` and ``U`` the upper Cholesky
factor of ``H^-1``, row ``i`` is rounded to the grid and its error spread over the later rows::

    q_i = quant(w_i);   e = (w_i - q_i) / U_ii;   w_j <- w_j - U_ij e   (j > i)

Rows are processed in blocks (the paper's lazy batch updates): inside a block every row update is
applied at once to the block, then one matrix product carries the block's errors to the rows
after it. Scales: a group of rows that shares one scale (``group_size``) gets its scale (and
optional MSE-optimal clip) from its rows as they are when the group starts, after the errors of
earlier groups have been added, as in the paper; rows are reordered so that each group is
contiguous (a conv kernel whose groups span its taps). A ``group_size`` that does not divide the
contraction (576 = 4 x 128 + 64) gives a shorter last group: the kernel is padded with zero rows
decoupled from the real ones (unit Hessian block), which never change a range, a clip search, an
error or the damping, so the result equals GPTQ on the real rows with that shorter group. When a
group has more rows than ``block_size`` (per-tensor and per-channel scales, or groups longer than
a block), scales come from the original kernel.

Any format of ``quant.formats`` works: rows are rounded with the format's own rounding (an fp8
cast, the nearest nf4 codebook entry, E2M1 round-half-even) and each group's scale comes from the
format's rule (the MX power of two). A format whose stored scales share one second level (E8M0:
none; NVFP4: one float32 per-tensor scale, taken from the original kernel as round-to-nearest
does) rounds every group scale to what it stores before the group's rows are rounded, so the
errors fed back are those of the stored grid. A double-quantized format with blocks of scales
(nf4 with more than 256 scales) stores its scales as int8 codes at the end; the codes are those
of the GPTQ-corrected kernel on the stored scales.

Non-finite input: a concrete kernel or Hessian with NaN or inf, or a Hessian that is not positive
definite after damping, raises ``ValueError`` naming the kernel. Under ``jit`` nothing can raise:
when the Hessian or its Cholesky factor is not finite, ``gptq`` returns plain round-to-nearest
(``quantize(w, spec)``), never a garbage kernel.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxslim import _obs
from jaxslim._checks import leaf_path, public
from jaxslim.quant._numerics import is_concrete, qparams_from_range
from jaxslim.quant._qarray import QArray, check_finite, fake_values, quantize, quantize_on
from jaxslim.quant._spec import QuantSpec, layout

_HI = lax.Precision.HIGHEST


@public("quant.gptq_hessian", leaf_kwarg=True)
def gptq_hessian(x: jax.typing.ArrayLike) -> jax.Array:
    """``X^T X / n`` of layer inputs ``x`` of shape ``(..., K)`` (float32, shape ``(K, K)``).

    ``K`` is the layer's contraction size in the kernel's flattened order; average the results
    of several batches (weighted by their row counts) to calibrate on more data. A concrete ``x``
    with NaN or inf raises ``ValueError`` (naming the layer whose inputs these are);
    a traced one gives a non-finite Hessian, which ``gptq`` under ``jit`` answers with
    round-to-nearest.

    >>> import jax.numpy as jnp
    >>> gptq_hessian(jnp.array([[1.0, 2.0], [3.0, 0.0]])).tolist()
    [[5.0, 1.0], [1.0, 2.0]]
    """
    path = leaf_path()
    fn = "quant.gptq_hessian"
    if not hasattr(x, "dtype") and not isinstance(x, list | tuple | float):
        raise ValueError(f"{fn}: expects a floating-point array (..., K), got {type(x).__name__}")
    x = jnp.asarray(x)
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{fn}: expects a floating-point array (..., K), got {x.dtype} {x.shape} for "
            f"{path or 'the input'!r}"
        )
    check_finite(x, f"calibration inputs of {path}" if path else "calibration inputs")
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    n = max(x2.shape[0], 1)
    return jnp.matmul(x2.T, x2, precision=_HI) / n


def _row_groups(spec: QuantSpec, shape: tuple[int, ...], path: str, fn: str):
    """Static plan on the padded kernel ``(Kp, Np)`` (``Layout.padded_shape`` flattened: a shorter
    last group is padded to a whole one): scale index of every element, row order, rows per
    group, column groups, and which padded rows are real rows of the kernel."""
    lay = layout(spec, shape, path=path)
    padded = lay.padded_shape
    n_scales = math.prod(lay.scale_shape)
    ids = np.broadcast_to(np.arange(n_scales).reshape(lay.scale_shape), lay.view_shape)
    ids = ids.reshape(math.prod(padded[:-1]), padded[-1])  # (Kp, Np) scale index of each weight
    real = lay.to_view(np.ones(shape, bool), fill=False).reshape(ids.shape).any(axis=1)
    row_key = ids[:, 0]
    order = np.argsort(row_key, kind="stable")  # rows sharing scales become contiguous
    keys = np.unique(row_key)
    rows_per_group = ids.shape[0] // len(keys)
    col_key = np.unique(ids[0], return_inverse=True)[1].reshape(-1)  # columns sharing a scale
    return ids, order, rows_per_group, col_key, int(col_key.max()) + 1, real


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


@public("quant.gptq", leaf_kwarg=True)
def gptq(
    w: jax.Array,
    hessian: jax.typing.ArrayLike,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    clip_candidates: int = 1,
    act_order: bool = False,
) -> QArray:
    """Quantizes the kernel ``w`` to a ``QArray`` with GPTQ error compensation.

    Args:
      w: a float kernel ``(*contraction, out)``, ``ndim >= 2`` (Dense ``(in, out)``, Conv
        ``(*spatial, in, out)``).
      hessian: ``(K, K)`` with ``K = prod(w.shape[:-1])``: ``quant.gptq_hessian`` of the layer's
        inputs (for a conv, its input patches ordered like the kernel's flattened rows).
      spec: a ``QuantSpec`` of any format and granularity (per-tensor, per-channel, grouped,
        symmetric or affine). The codes lie on the same grid ``quantize`` uses.
      damp: added to the diagonal as a fraction of its mean (the paper's 1 %); inputs that are
        always zero get weight 0.
      block_size: rows per lazy batch update.
      clip_candidates: with ``n > 1``, each group's range is also shrunk by the ratio in
        ``{1/n, ..., 1}`` that minimises its squared rounding error (MSE-optimal clipping).
      act_order: process rows in decreasing order of ``diag(H)`` (the inputs with the largest
        activations first, so their rounding errors are spread over the most rows; the paper's
        "act-order", GPTQModel's ``desc_act`` with ``static_groups``, llm-compressor's
        ``actorder="static"``). Group scales then come from the original kernel (after dead
        inputs are zeroed), before any error is fed back, so the stored layout is the one
        ``quantize`` writes (no permutation or group index is stored).

    Returns:
      A ``QArray`` (the same layout as ``quantize(w, spec)``) whose dequantized kernel ``Q``
      minimises ``tr((W - Q)^T H (W - Q))`` greedily, row by row.

    >>> import jax, jax.numpy as jnp
    >>> from jaxslim.quant import dequantize, quantize
    >>> x = jax.random.normal(jax.random.key(0), (256, 64))
    >>> w = jax.random.normal(jax.random.key(1), (64, 16))
    >>> spec = QuantSpec(4, axis=-1, group_size=32)
    >>> q = gptq(w, gptq_hessian(x), spec)
    >>> err = lambda v: float(jnp.sum((x @ w - x @ v) ** 2))
    >>> err(q.dequantize()) < err(dequantize(quantize(w, spec)))
    True
    """
    path = leaf_path()
    fn = "quant.gptq"
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{fn}: spec must be a QuantSpec, got {spec!r} for {path!r}")
    w = _obs.check_kernel(w, path=path, fn=fn)
    h = jnp.asarray(hessian)
    if not jnp.issubdtype(h.dtype, jnp.floating):
        raise ValueError(f"{fn}: hessian must be floating point, got {h.dtype} for {path!r}")
    h = h.astype(jnp.float32)
    k = math.prod(w.shape[:-1])
    if h.shape != (k, k):
        raise ValueError(
            f"{fn}: hessian must have shape ({k}, {k}) for the kernel {w.shape} of {path!r}, "
            f"got {h.shape}"
        )
    if (
        isinstance(clip_candidates, bool)
        or not isinstance(clip_candidates, int)
        or clip_candidates < 1
    ):
        raise ValueError(
            f"{fn}: clip_candidates must be a positive int, got {clip_candidates!r} for {path!r}"
        )
    if (
        isinstance(damp, bool)
        or not isinstance(damp, int | float | np.integer | np.floating)
        or not 0 <= damp < math.inf
    ):
        raise ValueError(f"{fn}: damp must be a finite float >= 0, got {damp!r} for {path!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(
            f"{fn}: block_size must be a positive int, got {block_size!r} for {path!r}"
        )
    if not isinstance(act_order, bool | np.bool_):
        raise TypeError(f"{fn}: act_order must be a bool, got {act_order!r} for {path!r}")
    layout(spec, tuple(w.shape), path=path)  # raises on a spec that does not fit
    check_finite(w, path)
    check_finite(h, f"hessian of {path}" if path else "hessian")
    q, ok = _gptq(w, h, spec, float(damp), block_size, clip_candidates, bool(act_order))
    if is_concrete(ok) and not bool(ok):
        raise ValueError(
            f"{fn}: the hessian of {path or 'the kernel'!r} is not positive definite after "
            f"damping (damp={damp}); raise damp or calibrate on more (and finite) inputs"
        )
    return q


@partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _gptq(w, h, spec, damp, block_size, clip_candidates, act_order):
    fn, path = "quant.gptq", ""
    lay = layout(spec, tuple(w.shape))
    ids, order, r, col_key, n_col, real = _row_groups(spec, tuple(w.shape), path, fn)
    k, n = ids.shape  # the padded kernel: a shorter last group padded with zero weights
    per_block = r <= block_size and not act_order  # act order: scales from the original kernel
    b = (
        r * _largest_divisor(k // r, block_size // r)
        if per_block
        else _largest_divisor(k, block_size)
    )
    col_key = jnp.asarray(col_key)
    rtn = quantize(w, spec)  # the fallback, and the second-level scales of the stored scales
    codec = spec.format.scales
    n_scales = math.prod(lay.scale_shape)
    shared = codec is not None and (codec.second_size is None or codec.second_size(n_scales) == 1)
    second = rtn.scale_scale if shared else None

    def stored(s):  # a group's scales as stored, when every scale shares the second level
        return codec.round(s, second) if shared else s

    def group_qparams(rows):  # rows (R, N) -> scale, zero point per column (N,)
        lo = jax.ops.segment_min(jnp.min(rows, axis=0), col_key, n_col)
        hi = jax.ops.segment_max(jnp.max(rows, axis=0), col_key, n_col)
        s, z = qparams_from_range(lo, hi, spec)
        if clip_candidates > 1:
            ratios = jnp.arange(1, clip_candidates + 1, dtype=jnp.float32) / clip_candidates

            def err(ratio):
                s_, z_ = qparams_from_range(ratio * lo, ratio * hi, spec)
                s_ = stored(s_)
                d = _round(rows, s_[col_key][None], z_[col_key].astype(jnp.float32)[None]) - rows
                return jax.ops.segment_sum(jnp.sum(d * d, axis=0), col_key, n_col)

            best = ratios[jnp.argmin(lax.map(err, ratios), axis=0)]
            s, z = qparams_from_range(best * lo, best * hi, spec)
        s = stored(s)
        return s[col_key], z[col_key].astype(jnp.float32)

    def _round(x, s, z):
        return fake_values(x, s, z, spec)[0]

    in_order = np.array_equal(order, np.arange(k))  # no gathered copies of (k, n) arrays
    perm = jnp.asarray(order)
    w2 = lay.to_view(w.astype(jnp.float32)).reshape(k, n)
    w2 = w2 if in_order else w2[perm]
    # Damping, dead inputs and the inverse-Hessian factor are _obs's (shared with SparseGPT):
    # H + damp mean(diag H) I (dead diagonal -> 1), M lower with J H J = M M^T, from which the
    # sweep computes the rows of U (H^-1 = U^T U) block by block; m_ok is False if H is not
    # positive definite (traced here, so nothing raises: the RTN fallback below answers).
    # Padded rows (a shorter last group) are zero weights decoupled from every real row: M is
    # the real rows' factor with identity rows and columns inserted at the reversed padded
    # positions (the factor of H with a unit block there), so they round to 0 with zero error
    # and no real row, scale or damping term sees them.
    is_real = real[order]
    rows = np.cumsum(real)[order][is_real] - 1  # real kernel rows, in the permuted order
    # the Hessian of those rows (no gathered copy of a k x k matrix when they are in order)
    h_rows = h if np.array_equal(rows, np.arange(h.shape[0])) else h[rows][:, rows]
    if act_order:
        # A second, data-dependent permutation of the rows above: real rows by decreasing
        # diag(H) (ties in kernel order), padded rows last. Scales are fixed before the sweep.
        n_real = len(rows)
        hr = h_rows
        key = jnp.full(k, jnp.inf).at[np.flatnonzero(is_real)].set(-jnp.diagonal(hr))
        perm2 = jnp.argsort(key, stable=True)
        sub = jnp.asarray(np.cumsum(is_real) - 1)[perm2[:n_real]]  # into hr
        m, dead, m_ok = _obs.obs_cholesky(hr[sub][:, sub], damp, fn=fn)
        if n_real < k:  # padded rows last: first in the reversed order of M
            m = jnp.eye(k, dtype=m.dtype).at[k - n_real :, k - n_real :].set(m)
            dead = jnp.zeros(k, bool).at[:n_real].set(dead)
        dead = jnp.zeros(k, bool).at[perm2].set(dead)  # back to the order of w2
    else:
        m, dead, m_ok = _obs.obs_cholesky(h_rows, damp, fn=fn)
        if not is_real.all():
            pos = np.flatnonzero(is_real)
            rev = (k - 1 - pos)[::-1]  # the real rows' positions in M's reversed order
            m = jnp.eye(k, dtype=m.dtype).at[rev[:, None], rev[None, :]].set(m)
            dead = jnp.zeros(k, bool).at[pos].set(dead)
    w2 = jnp.where(dead[:, None], 0.0, w2)
    # Scales are carried per group (k // r, n), never per weight: group gi holds rows
    # gi * r .. gi * r + r of the permuted kernel, and grp_ids its columns' scale indices.
    g = k // r
    grp_ids = jnp.asarray(ids[order][::r].reshape(-1))
    if per_block:
        s_groups = z_groups = jnp.zeros((g, n), jnp.float32)
    else:  # one group spans blocks: scales from the original kernel (rows of each group)
        s_groups, z_groups = jax.vmap(group_qparams)(w2.reshape(g, r, n))
    row_group = jnp.asarray(np.arange(k, dtype=np.int32) // r)  # the group of each swept row
    if act_order:
        w2, row_group = w2[perm2], row_group[perm2]

    def process_block(i1, wb, ub, carry):
        s_groups, z_groups = carry
        if per_block:  # set below as each group starts (b is a multiple of r)
            sb = zb = jnp.zeros_like(wb)
        else:
            gi = lax.dynamic_slice_in_dim(row_group, i1, b)
            sb, zb = s_groups[gi], z_groups[gi]

        def row(j, c):
            wb, qb, eb, sb, zb = c
            if per_block:  # a group starts: its scale from its rows as they are now
                sz = lax.cond(
                    j % r == 0,
                    lambda: group_qparams(lax.dynamic_slice_in_dim(wb, j, r)),
                    lambda: (sb[j - 1], zb[j - 1]),
                )
                sb, zb = sb.at[j].set(sz[0]), zb.at[j].set(sz[1])
            q = _round(wb[j], sb[j], zb[j])
            wb, e = _obs.obs_row_update(wb, ub, j, q)
            return wb, qb.at[j].set(q), eb.at[j].set(e), sb, zb

        zeros = jnp.zeros_like(wb)
        _, qb, eb, sb, zb = lax.fori_loop(0, b, row, (wb, zeros, zeros, sb, zb))
        if per_block:
            s_groups = lax.dynamic_update_slice_in_dim(s_groups, sb[::r], i1 // r, 0)
            z_groups = lax.dynamic_update_slice_in_dim(z_groups, zb[::r], i1 // r, 0)
        return qb, eb, (s_groups, z_groups)

    qs, (s_groups, z_groups) = _obs.obs_sweep(w2, m, b, process_block, (s_groups, z_groups))
    if act_order:
        qs = qs[jnp.argsort(perm2)]
    if not in_order:
        qs = qs[jnp.argsort(perm)]
    qs = lay.from_view(qs.reshape(lay.view_shape))  # the kernel's own shape, padding dropped
    # The group scales into the spec's scale layout (all writes to an entry agree).
    s_out = jnp.zeros(n_scales, jnp.float32).at[grp_ids].set(s_groups.reshape(-1))
    z_out = jnp.zeros(n_scales, jnp.float32).at[grp_ids].set(z_groups.reshape(-1))
    s_out = s_out.reshape(lay.scale_shape)
    z_out = jnp.round(z_out).astype(jnp.int32).reshape(lay.scale_shape)
    # A Hessian or Cholesky factor that is not finite: round to nearest instead of garbage.
    ok = m_ok & jnp.all(jnp.isfinite(qs))
    qs = jnp.where(ok, qs, rtn.dequantize().astype(jnp.float32))
    rtn_zp = rtn.zero_point if rtn.zero_point is not None else jnp.zeros((), jnp.int32)
    s_out = jnp.where(ok, s_out, rtn.float_scale())
    z_out = jnp.where(ok, z_out, rtn_zp.astype(jnp.int32))
    zp_out = z_out if spec.stores_zero_point else None
    if shared:  # the scales are already stored ones: keep rtn's second level, so they stay
        q = quantize_on(qs, spec, s_out, zp_out, second)
    else:
        q = quantize(qs, spec, scale=s_out, zero_point=zp_out)
    return dataclasses.replace(q, dtype=jnp.dtype(w.dtype)), ok
