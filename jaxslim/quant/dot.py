"""``qdot_general``: ``lax.dot_general`` that accepts ``QArray`` operands.

Two ways to compute a product with quantized operands, chosen per backend and shape:

* **int**: integer codes times integer codes, ``preferred_element_type=int32`` (exact
  accumulation), then one float multiply by ``lhs_scale * rhs_scale``. Needs both operands
  quantized to signed symmetric ints (no zero point) whose scales are constant along the
  contracting dimensions (per-tensor or per-channel, not grouped along the contraction).
* **dequantize**: dequantize the ``QArray`` operand(s), then a float ``dot_general``.

``impl="auto"`` takes the int path when it applies and the product has at least
``INT_MIN_ROWS[backend]`` rows (the product of ``lhs``'s free dimensions). On XLA:CPU (measured
with ``benchmarks/bench_quant.py``, K = N = 4096) an int8 x int8 matrix-vector product is about
10x slower than float32 while from 8 rows up the int8 product is the fastest; backends without a
measurement use the dequantize path. A float ``lhs`` is used as it is (weight-only
quantization) unless ``lhs_spec`` asks to quantize it on the fly (dynamic activation
quantization, as PyTorch's ``quantize_dynamic``), e.g. ``QuantSpec(8, axis=0)`` for one scale per
row of a ``(batch, in)`` input.

Both paths compute ``sum_k (a_k - za) sa * (b_k - zb) sb``; they differ only by float32 rounding.
The int path has no gradient (use ``fake_quant`` for training).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxslim.quant.qarray import QArray, dequantize, quantize
from jaxslim.quant.spec import QuantSpec, layout

__all__ = ["qdot_general", "INT_MIN_ROWS", "int_path_applies"]

INT_MIN_ROWS: dict[str, int] = {"cpu": 8}
"""Smallest number of ``lhs`` rows from which ``impl="auto"`` uses the int path, per backend."""


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
      impl: ``"auto"`` (by backend and shape, see the module docstring), ``"int"`` (raises if the
        operands do not allow it) or ``"dequantize"``.

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
    if impl not in ("auto", "int", "dequantize"):
        raise ValueError(f"{fn}: impl must be 'auto', 'int' or 'dequantize', got {impl!r}")
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
    use_int = can_int and (
        impl == "int"
        or (impl == "auto"
            and _rows(lhs.shape, dimension_numbers) >= INT_MIN_ROWS.get(jax.default_backend(),
                                                                          math.inf))
    )
    if use_int:
        acc = lax.dot_general(
            lhs.codes(), rhs.codes(), ((lc, rc), (lb, rb)),
            preferred_element_type=jnp.int32, out_sharding=out_sharding,
        )
        sizes = [lhs.shape[d] for d in lb]
        ls = _full_batch_scale(lhs.scale, lb, sizes)
        rs = _full_batch_scale(rhs.scale, rb, sizes)
        scale = lax.dot_general(ls, rs, ((lc, rc), (lb, rb)), precision=lax.Precision.HIGHEST)
        return (acc.astype(jnp.float32) * scale).astype(out_dtype)
    compute = jnp.promote_types(*dt)
    a = dequantize(lhs) if isinstance(lhs, QArray) else lhs
    b = dequantize(rhs) if isinstance(rhs, QArray) else rhs
    return lax.dot_general(
        a.astype(compute), b.astype(compute), ((lc, rc), (lb, rb)), precision=precision,
        preferred_element_type=preferred_element_type, out_sharding=out_sharding,
    ).astype(out_dtype)
