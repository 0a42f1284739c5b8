"""``qdot_general``: ``lax.dot_general`` that accepts ``QArray`` operands.

Three ways to compute a product with quantized operands, chosen per backend and shape:

* **int**: integer codes times integer codes, ``preferred_element_type=int32`` (exact
  accumulation), then one float multiply by ``lhs_scale * rhs_scale``. Needs both operands
  quantized to signed symmetric ints (no zero point) whose scales are constant along the
  contracting dimensions (per-tensor or per-channel, not grouped along the contraction).
* **blocked** (weight-only): for a 2-D ``QArray`` kernel ``(K, N)`` contracted on its first axis
  (``x @ W``, as ``nnx.Linear`` calls it), a ``lax.scan`` over blocks of ``BLOCK_ROWS`` kernel rows
  dequantizes one block at a time and accumulates ``x_block @ W_block`` in float32. The kernel
  stays quantized in memory and no full float copy is made: each block fits in cache, which is
  what makes a matrix-vector product about as fast as with a float32 kernel. A quantized ``lhs`` is
  dequantized first (it is small when this path is chosen).
* **dequantize**: dequantize the ``QArray`` operand(s) whole, then one float ``dot_general``.

``impl="auto"`` picks, on each backend, the fastest path that applies, from the measurements
(``benchmarks/bench_quant.py``, K = N = 4096, median of paired runs; the README has the table).
On XLA:CPU (2 shared cores): an int8 x int8 product is the fastest path from
``INT_MIN_ROWS["cpu"]`` (8) rows up (0.6-0.9x the float32 time at 64-512 rows) and 7-10x slower
than float32 below (XLA:CPU has no fast int8 matrix-vector kernel). At M = 1, dequantizing the
whole kernel first is 7-9x slower than float32 (it writes a full float32 copy of the kernel on
every call); the blocked path reads int8 codes and runs at 0.7-1.3x the float32 time for int8
per-channel codes (1.9x with the cores busy), 4-5x for int4 groups of 32 (unpacking nibbles and
applying a scale per group), 5x faster than dequantizing first in both cases. At 512 rows the
blocked and dequantize weight-only paths are within noise of each other (1.15-1.4x float32).
So ``auto`` takes the int path when it applies and ``rows >= INT_MIN_ROWS[backend]``, else the
blocked path when it applies, else the dequantize path. Backends without measurements (GPU,
TPU) take the dequantize path, which their compilers fuse into the matmul. A float ``lhs`` is
used as it is (weight-only quantization) unless ``lhs_spec`` asks to quantize it on the fly
(dynamic activation quantization, as PyTorch's ``quantize_dynamic``), e.g.
``QuantSpec(8, axis=0)`` for one scale per row of a ``(batch, in)`` input.

All paths compute ``sum_k (a_k - za) sa * (b_k - zb) sb``; they differ only by float32 rounding
(the blocked path sums the blocks' partial products in order). The int path has no gradient
(use ``fake_quant`` for training); the others differentiate with respect to a float ``lhs``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxslim.quant import formats
from jaxslim.quant.qarray import QArray, _unpack, check_finite, dequantize, quantize
from jaxslim.quant.spec import QuantSpec, layout

__all__ = [
    "qdot_general",
    "INT_MIN_ROWS",
    "BLOCKED_BACKENDS",
    "BLOCK_ROWS",
    "BLOCK_ELEMS",
    "int_path_applies",
    "blocked_path_applies",
]

INT_MIN_ROWS: dict[str, int] = {"cpu": 8}
"""Smallest number of ``lhs`` rows from which ``impl="auto"`` uses the int path, per backend."""

BLOCKED_BACKENDS: tuple[str, ...] = ("cpu",)
"""Backends on which ``impl="auto"`` prefers the blocked weight-only path to dequantizing."""

BLOCK_ROWS = 256
"""Kernel rows dequantized per step of the blocked path for a ``(K, 4096)`` kernel."""

BLOCK_ELEMS = BLOCK_ROWS * 4096
"""Kernel entries dequantized per step of the blocked path (at least one scale group): 4 MiB of
float32, which stays in cache next to the block of ``lhs`` it multiplies."""


def _scale_ok(q: QArray, contracting: tuple[int, ...]) -> bool:
    s = q.spec
    # Integer codes whose value is the code itself (decode_int, no zero point), signed.
    linear = s.format.decode is formats.decode_int and s.format.scale_block is None
    if not linear or not s.signed or not s.symmetric or q.zero_point is not None:
        return False
    lay = layout(s, q.shape)
    if lay.view_shape != lay.shape:  # grouped: scales vary along some axis inside blocks
        return False
    return all(q.scale.shape[d] == 1 for d in contracting)


def int_path_applies(lhs: Any, rhs: Any, dimension_numbers) -> bool:
    """Whether ``qdot_general`` can multiply integer codes for these operands."""
    (lc, rc), _ = dimension_numbers
    return (
        isinstance(lhs, QArray)
        and isinstance(rhs, QArray)
        and _scale_ok(lhs, tuple(lc))
        and _scale_ok(rhs, tuple(rc))
    )


def _group_axis(q: QArray) -> int | None:
    """The kernel axis ``q.spec.group_size`` cuts (non-negative), ``None`` when not grouped."""
    lay = layout(q.spec, q.shape)
    if lay.view_shape == lay.shape:
        return None
    ga = q.spec.group_axis if q.spec.group_axis is not None else (-2 if q.ndim >= 2 else -1)
    return ga % q.ndim


def _block_plan(q: QArray, contracting: tuple[int, ...]) -> tuple[int, int] | None:
    """``(axis, size)``: the contracted kernel axis the blocked path walks and the block size, or
    ``None`` when no contracted axis splits into blocks of whole scale groups (and whole packed
    bytes, along a packed last axis) of at least ``min(size, 64)`` entries and at most
    ``BLOCK_ELEMS`` kernel entries (or one group)."""
    if not isinstance(q, QArray) or q.ndim == 0:
        return None
    ga = _group_axis(q)
    per = 8 // q.spec.storage_bits
    for a in contracting:
        k = q.shape[a]
        unit = q.spec.group_size if a == ga else 1
        if a == q.ndim - 1 and per > 1:
            if k % per:
                continue
            unit = math.lcm(unit, per)
        rest = max(q.size // max(k, 1), 1)
        limit = max(BLOCK_ELEMS // rest, unit)
        fits = [d for d in range(unit, k + 1, unit) if k % d == 0 and d <= limit]
        if fits and max(fits) >= min(k, 64):
            return a, max(fits)
    return None


def _block_rows(q: QArray) -> int | None:
    """Rows per block of a 2-D ``(K, N)`` kernel contracted on axis 0 (``None``: not blockable)."""
    plan = _block_plan(q, (0,)) if isinstance(q, QArray) and q.ndim == 2 else None
    return None if plan is None else plan[1]


def blocked_path_applies(lhs: Any, rhs: Any, dimension_numbers) -> bool:
    """Whether ``qdot_general`` can use the blocked weight-only path: a ``QArray`` ``rhs`` with no
    batch dimensions (a quantized ``lhs`` is dequantized first), one of whose contracted axes
    splits into blocks of whole scale groups (a ``(K, N)`` kernel contracted on ``K``, an
    Equinox-style ``(N, K)`` weight contracted on ``K``, a per-head ``(d, heads, head_dim)``
    kernel)."""
    (lc, rc), (lb, rb) = dimension_numbers
    return (
        isinstance(rhs, QArray)
        and not tuple(lb)
        and not tuple(rb)
        and _block_plan(rhs, tuple(d % rhs.ndim for d in rc)) is not None
    )


def _slice(a: jax.Array, start, size: int, axis: int) -> jax.Array:
    return lax.dynamic_slice_in_dim(a, start, size, axis=axis)


def _blocked(x: jax.Array, q: QArray, dimension_numbers, compute, precision) -> jax.Array:
    """``dot_general(x, dequantize(q))``, dequantizing one block of a contracted axis of ``q`` at
    a time (``lax.scan`` over blocks, float32 accumulation). The scan body is rematerialized
    (``jax.checkpoint``), so a gradient recomputes each block instead of storing all of them: no
    full float copy of the kernel is made in either direction."""
    (lc, rc), _ = dimension_numbers
    lc = tuple(d % x.ndim for d in lc)
    rc = tuple(d % q.ndim for d in rc)
    a, kb = _block_plan(q, rc)
    xa = lc[rc.index(a)]
    nb = q.shape[a] // kb
    ga, g = _group_axis(q), q.spec.group_size
    lay = layout(q.spec, q.shape)
    va = a if ga is None or a <= ga else a + 1  # axis a in the statistics view
    per = 8 // q.spec.storage_bits
    packed_axis = a == q.ndim - 1 and per > 1
    bshape = tuple(kb if i == a else d for i, d in enumerate(q.shape))
    bview = list(lay.view_shape)
    bview[va] = kb // g if a == ga else kb
    scale = q.float_scale()
    zero = q.zero_point if q.zero_point is not None else jnp.zeros((1,) * len(bview), jnp.int32)
    dn = ((lc, rc), ((), ()))

    def per_block(s, vstart, vsize):
        return s if s.shape[va] == 1 else _slice(s, vstart, vsize, va)

    @jax.checkpoint
    def body(acc, i):
        start = i * kb
        vb = (
            _slice(q.values, start // per, kb // per, a)
            if packed_axis
            else _slice(q.values, start, kb, a)
        )
        vstart, vsize = (start // g, kb // g) if a == ga else (start, kb)
        s, z = per_block(scale, vstart, vsize), per_block(zero, vstart, vsize)
        c = _unpack(vb, q.spec, bshape).reshape(bview)
        w = (q.spec.format.decode(c, z) * s).reshape(bshape).astype(compute)
        xb = _slice(x, start, kb, xa).astype(compute)
        y = lax.dot_general(xb, w, dn, precision=precision, preferred_element_type=jnp.float32)
        return acc + y, None

    out_shape = jax.eval_shape(
        lambda: lax.dot_general(
            jax.ShapeDtypeStruct(x.shape, compute), jax.ShapeDtypeStruct(q.shape, compute), dn
        )
    ).shape
    acc0 = jnp.zeros(out_shape, jnp.float32)
    acc, _ = lax.scan(body, acc0, jnp.arange(nb, dtype=jnp.int32))
    return acc


def _rows(shape, dimension_numbers) -> int:
    (lc, _), (lb, _) = dimension_numbers
    return math.prod(d for i, d in enumerate(shape) if i not in lc and i not in lb)


def _full_batch_scale(scale, batch_dims, batch_sizes):
    shape = list(scale.shape)
    for d, n in zip(batch_dims, batch_sizes, strict=True):
        shape[d] = n
    return jnp.broadcast_to(scale, tuple(shape))


def qdot_general(
    lhs: Any,
    rhs: Any,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    out_sharding=None,
    lhs_spec: QuantSpec | None = None,
    impl: str = "auto",
) -> jax.Array:
    """``lax.dot_general(lhs, rhs, dimension_numbers)`` where either side may be a ``QArray``.

    Args:
      lhs, rhs: arrays or ``QArray``s.
      dimension_numbers, precision, preferred_element_type, out_sharding: as in
        ``lax.dot_general`` (``preferred_element_type`` sets the float output dtype).
      lhs_spec: quantize a float ``lhs`` on the fly with this spec (dynamic quantization).
      impl: ``"auto"`` (the fastest path that applies on this backend for this shape, see the
        module docstring), ``"int"``, ``"blocked"`` (both raise if the operands do not allow
        them) or ``"dequantize"``.

    Returns:
      A float array: ``preferred_element_type``, else the promoted original dtypes.

    >>> import jax.numpy as jnp
    >>> x, w = jnp.ones((8, 16)), jnp.full((16, 4), 0.5)
    >>> dn = (((1,), (0,)), ((), ()))
    >>> wq = quantize(w, QuantSpec(8, axis=-1))
    >>> y = qdot_general(x, wq, dn, lhs_spec=QuantSpec(8, axis=0))  # int8 x int8 -> int32
    >>> bool(jnp.allclose(y, x @ w, rtol=0.01))
    True
    """
    fn = "quant.qdot_general"
    if impl not in ("auto", "int", "blocked", "dequantize"):
        raise ValueError(
            f"{fn}: impl must be 'auto', 'int', 'blocked' or 'dequantize', got {impl!r}"
        )
    if lhs_spec is not None and not isinstance(lhs, QArray):
        if not hasattr(lhs, "shape") or not hasattr(lhs, "dtype"):
            raise TypeError(f"{fn}: lhs must be an array or a QArray, got {type(lhs).__name__}")
        if not isinstance(lhs_spec, QuantSpec):
            raise TypeError(f"{fn}: lhs_spec must be a QuantSpec, got {lhs_spec!r}")
        lhs = jnp.asarray(lhs)
        if not jnp.issubdtype(lhs.dtype, jnp.floating):
            raise ValueError(f"{fn}: lhs_spec quantizes a floating lhs, got {lhs.dtype}")
        check_finite(lhs, "lhs", "quant.quantize")
        dn = tuple(tuple(tuple(int(d) for d in ds) for ds in pair) for pair in dimension_numbers)
        return _dynamic(
            lhs, rhs, dn, precision, preferred_element_type, out_sharding, lhs_spec, impl
        )
    if isinstance(lhs, QArray) and hasattr(rhs, "shape") and not isinstance(rhs, QArray):
        # A quantized lhs (an Equinox-style (out, in) weight times x): compute rhs . lhs, with the
        # kernel on the right where the blocked path expects it, and move the axes back.
        (lc, rc), (lb, rb) = dimension_numbers
        if impl != "int" and len(lc) == len(rc) and len(lb) == len(rb):
            lc, rc = [d % lhs.ndim for d in lc], [d % rhs.ndim for d in rc]
            lb, rb = [d % lhs.ndim for d in lb], [d % rhs.ndim for d in rb]
            y = qdot_general(
                rhs,
                lhs,
                ((rc, lc), (rb, lb)),
                precision,
                preferred_element_type,
                out_sharding=out_sharding,
                impl=impl,
            )
            nb = len(lb)
            n_r = rhs.ndim - len(rc) - nb
            n_l = lhs.ndim - len(lc) - nb
            perm = (*range(nb), *range(nb + n_r, nb + n_r + n_l), *range(nb, nb + n_r))
            return y.transpose(perm)
    return _qdot(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding, impl)


@partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _dynamic(x, rhs, dn, precision, preferred_element_type, out_sharding, lhs_spec, impl):
    """Dynamic activation quantization: ``x`` quantized under ``lhs_spec`` on the fly, then
    ``_qdot``. Straight-through: the derivative with respect to ``x`` is that of the
    weight-only product ``x . dequantize(rhs)`` (quantizing ``x`` counts as the identity)."""
    lhs = quantize(x, lhs_spec, path="lhs")
    return _qdot(lhs, rhs, dn, precision, preferred_element_type, out_sharding, impl)


@_dynamic.defjvp
def _dynamic_jvp(dn, precision, preferred_element_type, out_sharding, lhs_spec, impl, p, t):
    x, rhs = p
    y = _dynamic(x, rhs, dn, precision, preferred_element_type, out_sharding, lhs_spec, impl)
    weight_only = "dequantize" if impl == "dequantize" else "auto"
    dy = _qdot(t[0], rhs, dn, precision, preferred_element_type, out_sharding, weight_only)
    return y, dy.astype(y.dtype)


def _qdot(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding, impl):
    fn = "quant.qdot_general"
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = tuple(lc), tuple(rc), tuple(lb), tuple(rb)
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{fn}: {name} must be an array or a QArray, got {type(x).__name__}")
    for dims_l, dims_r, what in ((lc, rc, "contracting"), (lb, rb, "batch")):
        if len(dims_l) != len(dims_r) or any(
            not -len(shape) <= d < len(shape)
            for shape, ds in ((lhs.shape, dims_l), (rhs.shape, dims_r))
            for d in ds
        ):
            raise ValueError(
                f"{fn}: {what} dimensions {dims_l} / {dims_r} do not fit lhs {tuple(lhs.shape)} "
                f"and rhs {tuple(rhs.shape)}"
            )
    dt = [x.dtype for x in (lhs, rhs)]
    out_dtype = preferred_element_type or jnp.promote_types(*dt)
    can_int = int_path_applies(lhs, rhs, dimension_numbers)
    if impl == "int" and not can_int:
        raise ValueError(
            f"{fn}: impl='int' needs both operands as signed symmetric integer QArrays whose "
            "scales do not vary along the contracting dimensions (not grouped)"
        )
    can_block = blocked_path_applies(lhs, rhs, dimension_numbers)
    if impl == "blocked" and not can_block:
        raise ValueError(
            f"{fn}: impl='blocked' needs rhs as a QArray with no batch dimensions and a contracted "
            "axis that splits into blocks of whole scale groups"
        )
    for dims_l, dims_r, what in ((lc, rc, "contracting"), (lb, rb, "batch")):
        sizes_l = [lhs.shape[d] for d in dims_l]
        sizes_r = [rhs.shape[d] for d in dims_r]
        if sizes_l != sizes_r:
            raise ValueError(
                f"{fn}: {what} dimensions of lhs {tuple(lhs.shape)} (sizes {sizes_l}) and rhs "
                f"{tuple(rhs.shape)} (sizes {sizes_r}) differ"
            )
    backend = jax.default_backend()
    if impl == "auto":
        many = _rows(lhs.shape, dimension_numbers) >= INT_MIN_ROWS.get(backend, math.inf)
        if can_int and many:
            impl = "int"
        elif can_block and out_sharding is None and backend in BLOCKED_BACKENDS:
            impl = "blocked"
        else:
            impl = "dequantize"
    compute = jnp.promote_types(*dt)
    if impl == "blocked":
        a = dequantize(lhs) if isinstance(lhs, QArray) else lhs
        if preferred_element_type is None and not jnp.issubdtype(compute, jnp.floating):
            compute = jnp.dtype(jnp.float32)
        return _blocked(a, rhs, ((lc, rc), (lb, rb)), compute, precision).astype(out_dtype)
    if impl == "int":
        acc = lax.dot_general(
            lhs.codes(),
            rhs.codes(),
            ((lc, rc), (lb, rb)),
            preferred_element_type=jnp.int32,
            out_sharding=out_sharding,
        )
        sizes = [lhs.shape[d] for d in lb]
        ls = _full_batch_scale(lhs.scale, lb, sizes)
        rs = _full_batch_scale(rhs.scale, rb, sizes)
        scale = lax.dot_general(ls, rs, ((lc, rc), (lb, rb)), precision=lax.Precision.HIGHEST)
        return (acc.astype(jnp.float32) * scale).astype(out_dtype)
    a = dequantize(lhs) if isinstance(lhs, QArray) else lhs
    b = dequantize(rhs) if isinstance(rhs, QArray) else rhs
    return lax.dot_general(
        a.astype(compute),
        b.astype(compute),
        ((lc, rc), (lb, rb)),
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    ).astype(out_dtype)
