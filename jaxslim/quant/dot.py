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
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxslim.quant import packing
from jaxslim.quant.qarray import QArray, dequantize, quantize
from jaxslim.quant.spec import QuantSpec, layout

__all__ = [
    "qdot_general",
    "INT_MIN_ROWS",
    "BLOCKED_BACKENDS",
    "BLOCK_ROWS",
    "int_path_applies",
    "blocked_path_applies",
]

INT_MIN_ROWS: dict[str, int] = {"cpu": 8}
"""Smallest number of ``lhs`` rows from which ``impl="auto"`` uses the int path, per backend."""

BLOCKED_BACKENDS: tuple[str, ...] = ("cpu",)
"""Backends on which ``impl="auto"`` prefers the blocked weight-only path to dequantizing."""

BLOCK_ROWS = 256
"""Kernel rows dequantized per step of the blocked path (at least one scale group)."""


def _scale_ok(q: QArray, contracting: tuple[int, ...]) -> bool:
    s = q.spec
    if s.fmt != "int" or not s.signed or not s.symmetric or q.zero_point is not None:
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


def _block_rows(q: QArray) -> int | None:
    """Rows per block for the blocked path, or None when the kernel's layout does not allow it."""
    if not isinstance(q, QArray) or len(q.shape) != 2:
        return None
    k = q.shape[0]
    lay = layout(q.spec, q.shape)
    per = k // lay.view_shape[0]  # kernel rows per row of the statistics view (group size)
    fits = [d for d in range(per, k + 1, per) if k % d == 0 and d <= max(BLOCK_ROWS, per)]
    rows = max(fits)
    return rows if rows >= min(k, 64) else None


def blocked_path_applies(lhs: Any, rhs: Any, dimension_numbers) -> bool:
    """Whether ``qdot_general`` can use the blocked weight-only path: ``rhs`` a 2-D ``QArray``
    ``(K, N)`` contracted on axis 0 with ``lhs``'s last axis, no batch dimensions."""
    (lc, rc), (lb, rb) = dimension_numbers
    return (
        isinstance(rhs, QArray)
        and tuple(rc) == (0,)
        and not tuple(lb)
        and not tuple(rb)
        and tuple(lc) == (len(lhs.shape) - 1,)
        and _block_rows(rhs) is not None
    )


def _blocked(x: jax.Array, q: QArray, compute, precision) -> jax.Array:
    """``x @ dequantize(q)``, dequantizing ``BLOCK_ROWS`` rows of ``q`` at a time."""
    k, n = q.shape
    kb = _block_rows(q)
    nb = k // kb
    lay = layout(q.spec, q.shape)
    bview = (lay.view_shape[0] // nb, *lay.view_shape[1:])

    def per_block(a):  # (a0, ...) -> (nb, a0 // nb, ...) when it varies along the rows
        if a is None or a.shape[0] == 1:
            return None
        return a.reshape(nb, a.shape[0] // nb, *a.shape[1:])

    values = q.values.reshape(nb, kb, *q.values.shape[1:])
    scale_b, zp_b = per_block(q.scale), per_block(q.zero_point)
    xs = jnp.moveaxis(x.reshape(*x.shape[:-1], nb, kb), -2, 0)

    def body(acc, xs_i):
        xb, vb, sb, zb = xs_i
        s = q.scale if sb is None else sb
        z = q.zero_point if zb is None else zb
        if q.spec.fmt == "int":
            c = packing.unpack(vb, q.spec.storage_bits, (kb, n), signed=q.spec.signed)
            c = c.reshape(bview).astype(jnp.float32)
            if z is not None:
                c = c - z.astype(jnp.float32)
        else:
            c = vb.astype(jnp.float32).reshape(bview)
        w = (c * s.astype(jnp.float32)).reshape(kb, n).astype(compute)
        y = jnp.matmul(
            xb.astype(compute), w, precision=precision, preferred_element_type=jnp.float32
        )
        return acc + y, None

    acc0 = jnp.zeros((*x.shape[:-1], n), jnp.float32)
    acc, _ = lax.scan(body, acc0, (xs, values, scale_b, zp_b))
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
        lhs = quantize(lhs, lhs_spec, path="lhs")
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = tuple(lc), tuple(rc), tuple(lb), tuple(rb)
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
            f"{fn}: impl='blocked' needs rhs as a 2-D QArray (K, N) contracted on axis 0 with the "
            "last axis of lhs, no batch dimensions, and K split into blocks of whole groups"
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
        return _blocked(a, rhs, compute, precision).astype(out_dtype)
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
