"""``qdot_general``: ``lax.dot_general`` that accepts ``QArray`` operands.

Four ways to compute a product with quantized operands, chosen per backend and shape:

* **int**: integer codes times integer codes, ``preferred_element_type=int32`` (exact
  accumulation), then one float multiply by ``lhs_scale * rhs_scale``. Needs both operands
  quantized to signed symmetric ints (no zero point) whose scales are constant along the
  contracting dimensions (per-tensor or per-channel, not grouped along the contraction).
* **blocked** (weight-only, few rows): a ``lax.scan`` over blocks of kernel rows along the
  contraction, ``acc += x_blk @ decode(codes_blk)``: each block is decoded once into a float
  buffer that stays in cache, so the kernel is read as int8/int4 and never copied whole in float.
  For a 2-D kernel ``(K, N)`` contracted on ``K`` (``x @ W``, ``nnx.Linear``) the *rows* form
  (``rows_path_applies``) decodes packed codes with shifts (inside ``int8``; 3-bit words in
  ``int32``) in ``per`` planes of columns ``j::per`` (no nibble interleave; the ``(M, N)`` outputs
  are interleaved at the end) and
  multiplies the ``(M, N)`` partial product by a scale that is constant over the block (per
  channel: once at the end; a group of ``kb`` rows: once per block) instead of the block.
  Other layouts (an Equinox ``(N, K)`` weight, a per-head ``(d, heads, head_dim)`` kernel) take
  the general form, which decodes and scales each block with ``quant.dequantize``'s formula.
* **columns** (weight-only, many rows; the rows form's kernels only): a ``lax.scan`` over blocks
  of output columns, each ``x @ (decode(codes) * scale)[:, blk]`` with all of ``K``: no ``(M, N)``
  accumulator is read and written per step, which dominates the rows form's cost at large ``M``.
* **dequantize**: dequantize the ``QArray`` operand(s) whole, then one float ``dot_general``.

``impl="auto"`` picks from the measurements (``benchmarks/bench_quant.py``: K = N = 4096, paired
interleaved repetitions, median ratio to the float32 dot of the same round; the README has the
table). On XLA:CPU (2 shared cores, AVX2): XLA does not fuse an int8 -> float32 convert into its
dot, and a broadcast-multiply-reduce over the kernel's major axis is far slower still (it is
given to the YNNPACK reduction, 100-600x float32), so the scan is what keeps the reads at int8
width. Weight-only int8 per-channel and int4 group-128, rows form, vs float32: 0.65-0.7x at
M = 1, 0.5x at M = 8, 0.8-0.9x at M = 64 (the old general form: 1.0-1.5x and 4x for int4 at
M = 1); at 256-512 rows all weight-only paths are compute-bound and within noise of float32
(0.65-1.03x), the columns form the steadiest. int8 x int8 is 7-10x slower than float32 below
``INT_MIN_ROWS["cpu"]`` (8) rows (no fast int8 matrix-vector kernel) and 0.6-0.7x from 64.
So ``auto`` takes the int path when it applies and ``rows >= INT_MIN_ROWS[backend]``; else the
columns path when it applies and ``rows >= COLUMNS_MIN_ROWS[backend]`` (256); else the blocked
path when it applies; else the dequantize path. Backends without measurements (GPU, TPU) take
the dequantize path, which their compilers fuse into the matmul. A float ``lhs`` is used as it
is (weight-only quantization) unless ``lhs_spec`` asks to quantize it on the fly (dynamic
activation quantization, as PyTorch's ``quantize_dynamic``), e.g. ``QuantSpec(8, axis=0)`` for
one scale per row of a ``(batch, in)`` input.

All paths compute ``sum_k (a_k - za) sa * (b_k - zb) sb``; they differ only by float32 rounding
(the scans sum blocks' partial products in order, and the rows form applies a scale to a sum
instead of to each term). The int path has no gradient (use ``fake_quant`` for training); the
others differentiate with respect to a float ``lhs``, rematerializing each block (no float copy
of the kernel in either direction).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxslim._checks import at_leaf, public
from jaxslim.quant import _packing as packing
from jaxslim.quant import formats
from jaxslim.quant._qarray import QArray, check_finite, dequantize, quantize, unpack_codes
from jaxslim.quant._spec import QuantSpec, layout

IMPLS = ("auto", "int", "blocked", "columns", "dequantize")

INT_MIN_ROWS: dict[str, int] = {"cpu": 8}
"""Smallest number of ``lhs`` rows from which ``impl="auto"`` uses the int path, per backend."""

COLUMNS_MIN_ROWS: dict[str, int] = {"cpu": 256}
"""Smallest number of ``lhs`` rows from which ``impl="auto"`` takes the columns path (weight-only,
where the rows path applies), per backend."""

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
    return layout(q.spec, q.shape).group_axis


def _cut(q: Any, contracting: tuple[int, ...]):
    """``(axis, kf, main, tail)`` for a ``QArray`` whose shorter last group (a ``group_size`` that
    does not divide its axis) lies on a contracted axis: ``main`` is the kernel up to its last
    whole group (``kf`` entries of ``axis``), ``tail`` the rest (one group), both ``QArray``s
    sharing ``q``'s codes and scales. ``None`` when there is no such group, or it cannot be cut
    without touching the codes: double-quantized scales (nf4: the scale blocks span the cut) or
    a packed last axis cut inside a packed word (a byte; 3 bytes for 3-bit codes)."""
    if not isinstance(q, QArray) or q.ndim == 0:
        return None
    lay = layout(q.spec, q.shape)
    a = lay.group_axis
    if lay.tiles or not lay.pad or a not in contracting or q.spec.format.scale_block is not None:
        return None
    if q.values.ndim != q.ndim or q.scale.ndim != q.ndim + 1:  # a batch prefix (stacked layers)
        return None
    kf = q.shape[a] - q.shape[a] % lay.group_size
    per, nbytes = packing.word(q.spec.storage_bits)
    vcut = kf
    if a == q.ndim - 1 and per > 1:
        if kf % per:
            return None
        vcut = kf // per * nbytes
    groups = kf // lay.group_size

    def part(lo, hi, vlo, vhi, glo, ghi):
        z = q.zero_point
        return QArray(
            lax.slice_in_dim(q.values, vlo, vhi, axis=a),
            lax.slice_in_dim(q.scale, glo, ghi, axis=a),  # the view's group axis is ``a``
            None if z is None else lax.slice_in_dim(z, glo, ghi, axis=a),
            q.spec,
            tuple(hi - lo if i == a else d for i, d in enumerate(q.shape)),
            q.dtype,
        )

    main = part(0, kf, 0, vcut, 0, groups)
    tail = part(kf, q.shape[a], vcut, q.values.shape[a], groups, groups + 1)
    return a, kf, main, tail


def _block_plan(q: QArray, contracting: tuple[int, ...]) -> tuple[int, int] | None:
    """``(axis, size)``: the contracted kernel axis the blocked path walks and the block size, or
    ``None`` when no contracted axis splits into blocks of whole scale groups (and whole packed
    bytes, along a packed last axis) of at least ``min(size, 64)`` entries and at most
    ``BLOCK_ELEMS`` kernel entries (or one group)."""
    if not isinstance(q, QArray) or q.ndim == 0:
        return None
    lay = layout(q.spec, q.shape)
    if lay.tiles:  # tiles: the dequantize path (scales vary along two axes)
        return None
    ga = lay.group_axis
    per, _ = packing.word(q.spec.storage_bits)
    for a in contracting:
        k = q.shape[a]
        if a == ga and lay.pad:  # a shorter last group: ``_cut`` splits it off first
            continue
        unit = lay.group_size if a == ga else 1
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
    if not isinstance(rhs, QArray) or tuple(lb) or tuple(rb):
        return False
    rc = tuple(d % rhs.ndim for d in rc)
    cut = _cut(rhs, rc)
    return _block_plan(rhs if cut is None else cut[2], rc) is not None


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
    lay = layout(q.spec, q.shape)
    ga, g = lay.group_axis, lay.group_size
    va = a if ga is None or a <= ga else a + 1  # axis a in the statistics view
    per, nbytes = packing.word(q.spec.storage_bits)
    packed_axis = a == q.ndim - 1 and per > 1
    bshape = tuple(kb if i == a else d for i, d in enumerate(q.shape))
    # The block's own view: whole groups along ``a``; a shorter last group along another axis is
    # padded in each block as in the kernel's view.
    blay = layout(q.spec, bshape)
    scale = q.float_scale()
    zero = q.zero_point
    if zero is None:
        zero = jnp.zeros((1,) * len(blay.view_shape), jnp.int32)
    dn = ((lc, rc), ((), ()))

    def per_block(s, vstart, vsize):
        return s if s.shape[va] == 1 else _slice(s, vstart, vsize, va)

    @jax.checkpoint
    def body(acc, i):
        start = i * kb
        vb = (
            _slice(q.values, start // per * nbytes, kb // per * nbytes, a)
            if packed_axis
            else _slice(q.values, start, kb, a)
        )
        vstart, vsize = (start // g, kb // g) if a == ga else (start, kb)
        s, z = per_block(scale, vstart, vsize), per_block(zero, vstart, vsize)
        c = blay.to_view(unpack_codes(vb, q.spec, bshape))
        w = blay.from_view(q.spec.format.decode(c, z) * s).astype(compute)
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


def _kernel_view(q: QArray) -> tuple[jax.Array, jax.Array | None, int] | None:
    """For a 2-D ``(K, N)`` kernel: its scales and zero points as ``(G, 1, N)`` arrays (``G`` scale
    rows along ``K``, each covering ``K // G`` consecutive rows) and ``G``; ``None`` when the
    scales cannot be viewed so (grouped along ``N``, or a packed last axis not a multiple of the
    codes per packed word)."""
    if not isinstance(q, QArray) or q.ndim != 2:
        return None
    k, n = q.shape
    lay = layout(q.spec, q.shape)
    per, _ = packing.word(q.spec.storage_bits)
    if n % per or lay.group_axis not in (None, 0) or lay.pad or lay.tiles:
        return None  # (a shorter last group along K: ``_cut`` splits it off first)
    s = q.float_scale().reshape(-1, q.scale.shape[-1])  # (K/g, N or 1) or (K or 1, N or 1)
    rows = s.shape[0]
    s = jnp.broadcast_to(s, (rows, n))[:, None, :]
    z = q.zero_point
    if z is not None:
        z = jnp.broadcast_to(z.reshape(-1, z.shape[-1]), (rows, n))[:, None, :]
    return s, z, rows


def _planes(v: jax.Array, spec: QuantSpec) -> list[jax.Array]:
    """The codes in a block ``v`` of packed kernel rows ``(r, W)`` (``W`` packed words of
    ``per`` codes), as ``per`` planes of shape ``(r, W)``: plane ``j`` holds columns ``j, j + per,
    ...`` (the ``j``-th code of each word). One-byte words are shifted within ``int8``/``uint8``
    (sign-extending for signed codes), so XLA fuses them with the decode and the scale into the
    loop that writes the float block; no interleave. 3-bit words (8 codes in 3 bytes) are
    assembled into ``int32`` first."""
    b = spec.storage_bits
    per, nbytes = packing.word(b)
    if per == 1:
        return [v]
    signed = jnp.issubdtype(jnp.dtype(spec.code_dtype), jnp.signedinteger)
    if nbytes > 1:
        u = v.astype(jnp.int32).reshape(*v.shape[:-1], v.shape[-1] // nbytes, nbytes)
        word = u[..., 0]
        for i in range(1, nbytes):
            word = word | (u[..., i] << (8 * i))
        if signed:  # code j to the top of the int32, then an arithmetic shift back
            return [
                lax.shift_right_arithmetic(lax.shift_left(word, 32 - (j + 1) * b), 32 - b).astype(
                    jnp.int8
                )
                for j in range(per)
            ]
        return [((word >> (j * b)) & (2**b - 1)).astype(jnp.uint8) for j in range(per)]
    if signed:
        p = lax.bitcast_convert_type(v, jnp.int8)
        return [
            lax.shift_right_arithmetic(
                lax.shift_left(p, jnp.int8(8 - (j + 1) * b)), jnp.int8(8 - b)
            )
            for j in range(per)
        ]
    mask = jnp.uint8(2**b - 1)
    return [lax.shift_right_logical(v, jnp.uint8(j * b)) & mask for j in range(per)]


def _columns_of(a, j: int, per: int):
    return a if a is None or per == 1 else a[..., j::per]


def _rows_block(k: int, n: int, rows: int) -> int | None:
    """Rows per step of the rows path: ``BLOCK_ELEMS // N`` rounded to whole scale rows (or to a
    divisor of one scale row), dividing ``K``; ``None`` when only tiny blocks would divide."""
    gl = k // rows  # kernel rows per scale row
    target = max(BLOCK_ELEMS // max(n, 1), 1)
    if gl >= target:  # a scale row spans several blocks: blocks divide it
        fits = [d for d in range(1, gl + 1) if gl % d == 0 and d <= target]
    else:
        fits = [d for d in range(gl, k + 1, gl) if k % d == 0 and d <= max(target, gl)]
    best = max(fits) if fits else None
    return best if best is not None and best >= min(k, 64) else None


def rows_path_applies(lhs: Any, rhs: Any, dimension_numbers) -> bool:
    """Whether the fast rows path applies: a 2-D ``QArray`` ``rhs`` ``(K, N)`` contracted on ``K``
    against one ``lhs`` axis, no batch dimensions, scales per channel, per tensor or in groups
    along ``K``, and ``N`` a multiple of the codes per packed word (``nnx.Linear``'s ``x @ W``)."""
    (lc, rc), (lb, rb) = dimension_numbers
    if not isinstance(rhs, QArray) or rhs.ndim != 2 or tuple(lb) or tuple(rb):
        return False
    if len(tuple(lc)) != 1 or [d % 2 for d in rc] != [0]:
        return False
    cut = _cut(rhs, (0,))
    rhs = rhs if cut is None else cut[2]  # a shorter last group is split off (``_cut``)
    view = _kernel_view(rhs)
    return view is not None and _rows_block(*rhs.shape, view[2]) is not None


def _rows_path(x: jax.Array, q: QArray, lc: int, mode: str, compute, precision) -> jax.Array:
    """``x . dequantize(q)`` for a ``(K, N)`` kernel contracted on ``K``, output ``x``'s free axes
    then ``N``. ``x`` is flattened to ``(M, K)``; the codes are decoded in ``per`` planes of
    ``(K, N / per)`` columns (``_planes``) and the outputs of the planes interleaved at the end.

    * ``mode="rows"`` (few rows): ``lax.scan`` over blocks of ``kb`` kernel rows, ``acc +=
      x_blk @ decode(c_blk)``, each block written in float once, in cache. A scale constant
      over the block multiplies the ``(M, N)`` partial product instead of the ``(kb, N)`` block
      (per-channel scales: once, at the end; groups of ``kb`` rows: once per block).
    * ``mode="columns"`` (many rows): ``lax.scan`` over blocks of output columns, each a full
      ``x @ (decode(c) * s)[:, blk]``: no ``(M, N)`` accumulator read and written per step.

    The scan bodies are rematerialized (``jax.checkpoint``): a gradient stores no float block."""
    k, n = q.shape
    xm = jnp.moveaxis(x, lc, -1)
    free = xm.shape[:-1]
    x2 = xm.reshape(-1, k).astype(compute)
    m = x2.shape[0]
    spec = q.spec
    per, nbytes = packing.word(spec.storage_bits)
    s, z, rows = _kernel_view(q)
    gl = k // rows
    dec = spec.format.decode

    def dot(a, w):
        return lax.dot_general(
            a,
            w.astype(compute),
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )

    if mode == "columns":
        nbk = _columns_block(k, n, per)

        @jax.checkpoint
        def cbody(_, i):
            vb = lax.dynamic_slice_in_dim(
                q.values, i * (nbk // per) * nbytes, nbk // per * nbytes, 1
            )
            sb = lax.dynamic_slice_in_dim(s, i * nbk, nbk, 2)
            zb = None if z is None else lax.dynamic_slice_in_dim(z, i * nbk, nbk, 2)
            ys = []
            for j, c in enumerate(_planes(vb, spec)):
                zj = 0 if zb is None else _columns_of(zb, j, per)
                w = dec(c.reshape(rows, gl, -1), zj) * _columns_of(sb, j, per)
                ys.append(dot(x2, w.reshape(k, -1)))
            return None, jnp.stack(ys, -1).reshape(m, nbk) if per > 1 else ys[0]

        _, ys = lax.scan(cbody, None, jnp.arange(n // nbk, dtype=jnp.int32))
        y = ys.transpose(1, 0, 2).reshape(m, n)
        return y.reshape(*free, n)

    kb = _rows_block(k, n, rows)
    sj = [_columns_of(s, j, per) for j in range(per)]
    zj = [_columns_of(z, j, per) for j in range(per)]
    # Scale rows per block (gb) and kernel rows per scale row within the block (kb // gb).
    gb = max(kb // gl, 1)
    # One scale row per block: scale the (M, N) product, not the (kb, N) block. A kernel of one
    # block is decoded and scaled as ``dequantize`` does, so small kernels give its exact bits.
    out_scale = gb == 1 and k > kb

    def block_rows(a, i):
        if a is None or a.shape[0] == 1:
            return a
        return lax.dynamic_slice_in_dim(a, (i * kb) // gl, gb, 0)

    @jax.checkpoint
    def body(acc, i):
        vb = lax.dynamic_slice_in_dim(q.values, i * kb, kb, 0)
        xb = lax.dynamic_slice_in_dim(x2, i * kb, kb, 1)
        out = []
        for j, c in enumerate(_planes(vb, spec)):
            zb, sb = block_rows(zj[j], i), block_rows(sj[j], i)
            w = dec(c.reshape(gb, kb // gb, -1), 0 if zb is None else zb)
            if out_scale:
                y = dot(xb, w.reshape(kb, -1))
                out.append(acc[j] + (y if rows == 1 else y * sb[0]))
            else:
                out.append(acc[j] + dot(xb, (w * sb).reshape(kb, -1)))
        return tuple(out), None

    acc0 = tuple(jnp.zeros((m, n // per), jnp.float32) for _ in range(per))
    acc, _ = lax.scan(body, acc0, jnp.arange(k // kb, dtype=jnp.int32))
    if out_scale and rows == 1:
        acc = tuple(a * sj[j][0] for j, a in enumerate(acc))
    y = jnp.stack(acc, -1).reshape(m, n) if per > 1 else acc[0]
    return y.reshape(*free, n)


def _columns_block(k: int, n: int, per: int) -> int:
    """Output columns per step of the columns path: about ``BLOCK_ELEMS // K``, a multiple of the
    codes per packed word dividing ``N`` (``N`` itself when nothing smaller divides)."""
    target = max(BLOCK_ELEMS // max(k, 1), per)
    fits = [d for d in range(per, n + 1, per) if n % d == 0 and d <= target]
    return max(fits) if fits else n


def _describe(q: Any) -> str:
    if isinstance(q, QArray):
        return f"QArray{tuple(q.shape)} ({q.spec.format.name}, group_size={q.spec.group_size})"
    return f"{type(q).__name__}{tuple(getattr(q, 'shape', ()))}"


def _rows(shape, dimension_numbers) -> int:
    (lc, _), (lb, _) = dimension_numbers
    return math.prod(d for i, d in enumerate(shape) if i not in lc and i not in lb)


def _full_batch_scale(scale, batch_dims, batch_sizes):
    shape = list(scale.shape)
    for d, n in zip(batch_dims, batch_sizes, strict=True):
        shape[d] = n
    return jnp.broadcast_to(scale, tuple(shape))


@public("quant.qdot_general")
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
        module docstring), ``"int"``, ``"blocked"``, ``"columns"`` (these three raise if the
        operands do not allow them) or ``"dequantize"``.

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
    if impl not in IMPLS:
        raise ValueError(
            f"{fn}: impl must be 'auto', 'int', 'blocked', 'columns' or 'dequantize', got {impl!r}"
        )
    if lhs_spec is not None and not isinstance(lhs, QArray):
        if not hasattr(lhs, "shape") or not hasattr(lhs, "dtype"):
            raise TypeError(f"{fn}: lhs must be an array or a QArray, got {type(lhs).__name__}")
        if not isinstance(lhs_spec, QuantSpec):
            raise TypeError(f"{fn}: lhs_spec must be a QuantSpec, got {lhs_spec!r}")
        lhs = jnp.asarray(lhs)
        if not jnp.issubdtype(lhs.dtype, jnp.floating):
            raise ValueError(f"{fn}: lhs_spec quantizes a floating lhs, got {lhs.dtype}")
        check_finite(lhs, "lhs")
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
    with at_leaf("lhs"):
        lhs = quantize(x, lhs_spec)
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
    can_rows = rows_path_applies(lhs, rhs, dimension_numbers)
    if impl == "columns" and not can_rows:
        raise ValueError(
            f"{fn}: impl='columns' needs rhs as a 2-D QArray kernel (K, N) contracted on K, no "
            "batch dimensions, scales per channel or in groups along K, and N a multiple of the "
            f"codes per packed word; got rhs {_describe(rhs)} and dimension_numbers "
            f"{dimension_numbers}"
        )
    if impl == "blocked" and not (can_block or can_rows):
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
        m = _rows(lhs.shape, dimension_numbers)
        if can_int and m >= INT_MIN_ROWS.get(backend, math.inf):
            impl = "int"
        elif can_rows and out_sharding is None and m >= COLUMNS_MIN_ROWS.get(backend, math.inf):
            impl = "columns"
        elif (can_block or can_rows) and out_sharding is None and backend in BLOCKED_BACKENDS:
            impl = "blocked"
        else:
            impl = "dequantize"
    compute = jnp.promote_types(*dt)
    if impl in ("blocked", "columns"):
        a = dequantize(lhs) if isinstance(lhs, QArray) else lhs
        cut = _cut(rhs, tuple(d % rhs.ndim for d in rc))
        if cut is not None:
            # A shorter last group on the contraction: the whole groups take this path, the
            # last group (at most ``group_size`` rows) is dequantized; float32 sum of the two.
            ax, kf, main, tail = cut
            xa = lc[[d % rhs.ndim for d in rc].index(ax)] % a.ndim
            acc = jnp.promote_types(out_dtype, jnp.float32)
            parts = (
                (lax.slice_in_dim(a, 0, kf, axis=xa), main, impl),
                (lax.slice_in_dim(a, kf, a.shape[xa], axis=xa), tail, "dequantize"),
            )
            y = [_qdot(x, w, dimension_numbers, precision, acc, None, i) for x, w, i in parts]
            return (y[0] + y[1]).astype(out_dtype)
        if preferred_element_type is None and not jnp.issubdtype(compute, jnp.floating):
            compute = jnp.dtype(jnp.float32)
        if can_rows:
            mode = "rows" if impl == "blocked" else "columns"
            y = _rows_path(a, rhs, lc[0] % a.ndim, mode, compute, precision)
            return y.astype(out_dtype)
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
