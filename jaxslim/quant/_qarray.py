"""``QArray`` and ``quantize`` / ``dequantize`` / ``fake_quant``.

A ``QArray`` is a registered pytree: its children are the arrays ``values`` (the codes: integers,
fp8 values or codebook indices; 2/3/4-bit codes packed into ``uint8``), ``scale`` (float32; int8
codes for a double-quantized format such as nf4), ``zero_point`` (``int8``/``uint8`` codes, or
``None`` when it is 0: symmetric signed specs and formats without one) and ``scale_scale`` (the
float32 second-level scales of a double-quantized format, else ``None``); its static metadata is
the ``QuantSpec`` and the original ``shape`` and ``dtype``. It goes through ``jax.jit``,
``jax.vmap`` (the metadata describes one example), ``jax.device_put`` with shardings and Orbax
checkpoints like any pytree of arrays.

Every format-specific step (rounding, packing width, dequantization, scale storage) is read from
the spec's record in ``quant.formats``; nothing here branches on a format's name.

Invariants: the children's shapes and dtypes are exactly what ``quantize`` makes for the spec and
shape (a batch prefix is allowed on construction, for ``vmap`` / stacked layers); a QArray whose
arrays were changed raises ``ValueError`` on construction and in ``dequantize``, never dequantizing
to garbage.

``nbytes`` counts codes, scales and zero points: an int4 per-channel ``(in, out)`` kernel takes
``in * out / 2 + 4 * out`` bytes.

Group sizes that do not divide the group axis (``quant._spec``): the last group is shorter and
its scale comes from its real entries only. The codes are stored unpadded (``values`` holds the
leaf's own codes, packed along its last axis as always); only the scales (and zero points) number
``ceil(n / g)`` along the group axis, so an int4 ``(576, N)`` kernel with ``group_size=128`` takes
``576 * N / 2 + 4 * 5 * N`` bytes. ``dequantize`` returns exactly the original shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim._checks import caller, count_nonfinite, leaf_path, public
from jaxslim.quant import _packing as packing
from jaxslim.quant._numerics import (
    check_scale,
    check_zero_point,
    compute_dtype,
    compute_qparams,
    is_concrete,
    saturate,
    valid_scale,
)
from jaxslim.quant._spec import QuantSpec, layout


@dataclasses.dataclass(frozen=True, eq=False)
class QArray:
    """A quantized array: codes, scales, zero points and the static ``spec``, ``shape``, ``dtype``.

    ``dequantize()`` (or ``quant.dequantize(q)``) gives back a ``shape``/``dtype`` array equal to
    ``decode(codes, zero_point) * scale`` (for integer formats ``(codes - zero_point) * scale``).
    Build QArrays with ``quant.quantize``: construction checks that the arrays' shapes and dtypes
    are the ones ``quantize`` makes for ``spec`` and ``shape``.

    >>> import jax.numpy as jnp
    >>> q = quantize(jnp.ones((4, 8)), QuantSpec(4, axis=-1))
    >>> q.values.shape, q.values.dtype, q.nbytes  # 4 * 8 / 2 codes + 8 float32 scales
    ((4, 4), dtype('uint8'), 48)
    """

    values: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    spec: QuantSpec
    shape: tuple[int, ...]
    dtype: Any
    scale_scale: jax.Array | None = None

    def __post_init__(self):
        _check_qarray(self, "quant.QArray", exact=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def nbytes(self) -> int:
        """Bytes of codes + scales + zero points (+ second-level scales)."""
        leaves = [
            a for a in (self.values, self.scale, self.zero_point, self.scale_scale) if a is not None
        ]
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves)

    def dequantize(self) -> jax.Array:
        return dequantize(self)

    def codes(self) -> jax.Array:
        """The unpacked codes, shape ``shape``: integer codes (``int8``, ``uint8`` when unsigned),
        codebook indices (``uint8``) or fp8 values."""
        return unpack_codes(self.values, self.spec, self.shape)

    def float_scale(self) -> jax.Array:
        """The scales as float32, ``scale``'s shape (decodes stored scales: nf4's int8 codes,
        an E8M0 byte, NVFP4's E4M3 code times its per-tensor scale)."""
        codec = self.spec.format.scales
        if codec is None:
            return self.scale.astype(jnp.float32)
        return codec.decode(self.scale, self.scale_scale)

    def __getitem__(self, idx):
        # ``variable[...]`` (how Flax NNX layers read their kernel) returns the QArray itself.
        if idx is Ellipsis or idx == ():
            return self
        raise TypeError("QArray supports only q[...]; dequantize it to index")

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"QArray(shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, bits={s.bits}, "
            f"fmt={s.fmt!r}, axis={s.axis}, group_size={s.group_size}, nbytes={self.nbytes})"
        )


jax.tree_util.register_dataclass(
    QArray,
    data_fields=["values", "scale", "zero_point", "scale_scale"],
    meta_fields=["spec", "shape", "dtype"],
)


@functools.lru_cache(maxsize=1024)
def _expected(spec: QuantSpec, shape: tuple[int, ...]) -> dict[str, Any]:
    """``{child: (shape, dtype) or None}``: what ``quantize`` makes for ``spec`` and ``shape``."""
    f = spec.format
    lay = layout(spec, shape)
    values = shape if f.storage_bits == 8 else packing.packed_shape(shape, f.storage_bits)
    codec = f.scales
    n = math.prod(lay.scale_shape)
    second = None if codec is None or codec.second_size is None else codec.second_size(n)
    return {
        "values": (tuple(values), jnp.dtype(spec.storage_dtype)),
        "scale": (lay.scale_shape, jnp.dtype(jnp.float32 if codec is None else codec.dtype)),
        "zero_point": (lay.scale_shape, jnp.dtype(spec.code_dtype)) if f.affine else None,
        "scale_scale": None if second is None else ((second,), jnp.dtype(jnp.float32)),
    }


def _is_array(x: Any) -> bool:
    return (
        hasattr(x, "shape")
        and hasattr(x, "dtype")
        and not isinstance(x, type)
        and jnp.dtype(x.dtype) != jax.dtypes.float0
    )


def _check_qarray(q: QArray, fn: str, *, exact: bool) -> None:
    """Raises unless ``q``'s arrays have the shapes and dtypes ``quantize`` makes.

    ``exact=False`` (construction, unflattening) skips children that are not arrays (JAX builds
    QArrays of placeholders and of float0 tangents) and allows one batch prefix shared by all
    children (``vmap`` outputs, stacked layers); ``exact=True`` (``dequantize``) allows neither.
    """
    if not isinstance(q.spec, QuantSpec):
        raise TypeError(f"{fn}: spec must be a QuantSpec, got {q.spec!r}")
    shape = q.shape
    if not (isinstance(shape, tuple) and all(isinstance(d, int | np.integer) for d in shape)):
        raise TypeError(f"{fn}: shape must be a tuple of ints, got {shape!r}")
    try:
        dtype = jnp.dtype(q.dtype)
    except TypeError:
        raise TypeError(f"{fn}: dtype must be a floating dtype, got {q.dtype!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{fn}: dtype must be a floating dtype, got {dtype}")
    try:
        want = _expected(q.spec, tuple(int(d) for d in shape))
    except ValueError as e:
        raise ValueError(f"{fn}: spec {q.spec} does not fit shape {shape}: {e}") from None
    hint = (
        f"for a QArray of shape {tuple(shape)} under {q.spec}; the QArray was changed after "
        "quant.quantize made it (or restored with the wrong target)"
    )
    prefix = None
    for name in ("values", "scale", "zero_point", "scale_scale"):
        x, w = getattr(q, name), want[name]
        required = name in ("values", "scale", "scale_scale") or q.spec.stores_zero_point
        if x is None:
            if exact and w is not None and required:
                raise ValueError(f"{fn}: {name} is missing {hint}")
            continue
        if not _is_array(x):
            if exact:
                raise TypeError(f"{fn}: {name} must be an array, got {type(x).__name__} {hint}")
            continue
        if w is None:
            raise ValueError(f"{fn}: {name} must be None, got {x.dtype}{list(x.shape)} {hint}")
        wshape, wdtype = w
        got = tuple(x.shape)
        k = len(got) - len(wshape)
        ok = k >= 0 and got[k:] == wshape and jnp.dtype(x.dtype) == wdtype
        if ok:  # the batch prefix: none in dequantize, one shared by all children otherwise
            ok = not (exact and k) and (prefix is None or prefix == got[:k])
            prefix = got[:k]
        if not ok:
            raise ValueError(
                f"{fn}: {name} is {jnp.dtype(x.dtype).name}{list(got)}, expected "
                f"{wdtype.name}{list(wshape)} {hint}"
            )


def is_qarray(x: Any) -> bool:
    """``isinstance(x, QArray)`` — handy as ``is_leaf=`` in ``jax.tree`` functions."""
    return isinstance(x, QArray)


def _check_input(x: Any, spec: Any, path: str) -> jax.Array:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{caller()}: spec must be a QuantSpec, got {spec!r} for {path!r}")
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{caller()}: expects a floating-point array, got "
            f"{getattr(x, 'dtype', type(x).__name__)} for {path or 'the input'!r}"
        )
    return jnp.asarray(x)


def check_finite(x: jax.Array, path: str) -> None:
    """Raises ``ValueError`` when a concrete ``x`` holds NaN or +-inf (traced ``x``: no check)."""
    if not is_concrete(x) or x.size == 0:
        return
    n = count_nonfinite(x)
    if n:
        bad = ~jnp.isfinite(x)
        first = np.unravel_index(int(jnp.argmax(bad.reshape(-1))), x.shape)
        value = float(x[first])
        raise ValueError(
            f"{caller()}: {path or 'the input'!r} has {n} non-finite entries (first: {value} at "
            f"index {tuple(int(i) for i in first)}); NaN and inf have no code: fix or drop them "
            "before quantizing"
        )


def _check_params(scale, zero_point, lay, spec, path):
    """Raises unless a given scale / zero point broadcasts to the layout's scale shape and, when
    concrete, is valid (scale finite and > 0, zero point an integer on the grid)."""
    if zero_point is not None and not spec.format.affine:
        raise ValueError(
            f"{caller()}: fmt={spec.fmt!r} has no zero point; got one for {path or 'the input'!r}"
        )
    for name, v in (("scale", scale), ("zero_point", zero_point)):
        if v is None:
            continue
        shape = jnp.shape(v)
        try:
            ok = jnp.broadcast_shapes(shape, lay.scale_shape) == lay.scale_shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{caller()}: {name} of shape {shape} does not broadcast to the scale shape "
                f"{lay.scale_shape} of {path or 'the input'!r}"
            )
    check_scale(scale, path)
    check_zero_point(zero_point, spec.qmin, spec.qmax, path)


def _params(x, spec, scale, zero_point, lay, second=None):
    """``(scale, zero_point, stored scale, second-level scale)``, all of the scale shape.

    ``scale`` is the float32 scale quantization uses: for a format with stored scales (nf4's
    int8 codes, E8M0, NVFP4's E4M3), the decoded stored scale; ``second`` fixes the second-level
    scales instead of computing them. A given traced scale that is not finite and > 0 becomes
    NaN (loud, not zero).
    """
    if scale is None:
        scale, zp = compute_qparams(x, spec, path="")
        scale = jax.lax.stop_gradient(scale)
    else:
        scale = valid_scale(jnp.broadcast_to(jnp.asarray(scale, jnp.float32), lay.scale_shape))
        zp = jnp.zeros((), jnp.int32) if zero_point is None else jnp.asarray(zero_point)
        zp = jnp.broadcast_to(zp, lay.scale_shape)
    codec = spec.format.scales
    if codec is None:
        return scale, zp, scale, None
    if second is None and codec.second is not None:
        second = codec.second(scale)
    stored = codec.encode(scale, second)
    return codec.decode(stored, second), zp, stored, second


def _encode(v, scale, zp, spec):
    """Float codes and the in-grid mask of ``v`` (compute dtype, statistics view). A zero scale
    (an NVFP4 block whose E4M3 scale rounds to 0) gives zero codes."""
    s = scale.astype(v.dtype)
    inv = jnp.where(s == 0, jnp.zeros((), v.dtype), jnp.asarray(1, v.dtype) / s)
    return spec.format.encode(v * inv, zp, spec.qmin, spec.qmax)


def fake_values(v, scale, zp, spec):
    """``(decode(encode(v / s)) * s, inside)`` in ``v``'s (compute) dtype; NaN stays NaN."""
    c, inside = _encode(v, scale, zp, spec)
    y = spec.format.decode(c, zp).astype(v.dtype) * scale.astype(v.dtype)
    return jnp.where(jnp.isnan(v), v, y), inside


def unpack_codes(values, spec: QuantSpec, shape) -> jax.Array:
    """The codes of ``values`` (packed or not), shape ``shape``, dtype ``spec.code_dtype``."""
    cd = jnp.dtype(spec.code_dtype)
    if spec.storage_bits == 8:
        return values.reshape(shape)
    signed = bool(jnp.issubdtype(cd, jnp.signedinteger))
    return packing.unpack(values, spec.storage_bits, shape, signed=signed).astype(cd)


@public("quant.quantize", leaf_kwarg=True)
def quantize(
    x: jax.Array,
    spec: QuantSpec,
    *,
    scale: jax.typing.ArrayLike | None = None,
    zero_point: jax.typing.ArrayLike | None = None,
) -> QArray:
    """Quantizes ``x`` to a ``QArray`` under ``spec``.

    ``q = clip(round_half_even(x * (1/s)) + z, qmin, qmax)`` for integer formats; in general
    ``q = encode(x * (1/s), z)`` with the format's rounding (fp8: clip to its range and cast,
    round to nearest even; nf4: the nearest codebook entry). Without ``scale``, ``(s, z)`` come
    from the min/max of ``x`` (``quant.qparams``); pass calibrated ones (from an observer) shaped
    like ``quant._spec.layout(spec, x.shape).scale_shape``. Errors name the leaf path that the
    tree-wide function calling it (``quantize_params``, ``oneshot``) is working on.

    Checks: a concrete ``x`` with NaN or inf raises ``ValueError`` (naming the leaf); so does a
    concrete ``scale`` that is not finite and > 0, and a zero point off the grid. Under ``jit``
    nothing can raise: NaN becomes the zero point (fp8 keeps NaN), ``+-inf`` clip to the ends of
    the grid, and since scales ignore non-finite entries no other entry changes; a traced invalid
    ``scale`` makes the dequantized values NaN. Use ``jax.experimental.checkify`` to check there.

    >>> import jax.numpy as jnp, numpy as np
    >>> q = quantize(jnp.array([-1.0, 0.0, 0.5, 1.0]), QuantSpec(8))
    >>> q.values.tolist(), q.scale.tolist() == [np.float32(1) / np.float32(127.5)]
    ([-127, 0, 64, 127], True)
    """
    path = leaf_path()
    x = _check_input(x, spec, path)
    lay = layout(spec, x.shape, path=path)
    _check_params(scale, zero_point, lay, spec, path)
    check_finite(x, path)
    return _quantize(x, spec, scale, zero_point)


def quantize_on(
    x: jax.Array,
    spec: QuantSpec,
    scale: jax.Array,
    zero_point: jax.Array | None,
    second: jax.Array | None,
) -> QArray:
    """``quantize(x, spec, scale=scale, zero_point=zero_point)`` with the second-level scales
    fixed to ``second`` (``QArray.scale_scale``; ``None``: computed from ``scale``), unchecked:
    for methods (GPTQ) whose float scales are already ``codec.round(s, second)``, so the stored
    scales decode to exactly ``scale``."""
    return _quantize(x, spec, scale, zero_point, second)


@partial(jax.jit, static_argnums=(1,))
def _quantize(x, spec, scale, zero_point, second=None):
    # One compiled program per spec and shape (also when called eagerly).
    lay = layout(spec, x.shape)
    scale, zp, stored, second = _params(x, spec, scale, zero_point, lay, second)
    v = lay.to_view(x.astype(compute_dtype(x.dtype)))
    c, _ = _encode(v, scale, zp, spec)
    codes = lay.from_view(c).astype(spec.code_dtype)  # the filler's codes are dropped
    values = codes if spec.storage_bits == 8 else packing.pack(codes, spec.storage_bits)
    keep_zp = spec.stores_zero_point or zero_point is not None
    zp_store = zp.astype(spec.code_dtype) if keep_zp else None
    return QArray(values, stored, zp_store, spec, tuple(x.shape), jnp.dtype(x.dtype), second)


@public("quant.dequantize")
def dequantize(q: QArray) -> jax.Array:
    """``decode(codes, zero_point) * scale`` in float32 (``(codes - zero_point) * scale`` for
    integer formats), reshaped and cast to ``q``'s original dtype; values past that dtype's finite
    range saturate at its largest finite value (never ``+-inf``).

    Raises ``ValueError`` when ``q``'s arrays do not have the shapes and dtypes ``quantize`` makes
    for its spec and shape (a QArray changed after quantizing, or restored with the wrong target).

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.5, -1.0], [2.0, 0.25]])
    >>> dequantize(quantize(x, QuantSpec(8, axis=-1))).shape
    (2, 2)
    """
    if not isinstance(q, QArray):
        raise TypeError(f"quant.dequantize: expects a QArray, got {type(q).__name__}")
    _check_qarray(q, "quant.dequantize", exact=True)
    return _dequantize(q)


@jax.jit
def _dequantize(q: QArray) -> jax.Array:
    lay = layout(q.spec, q.shape)
    cd = compute_dtype(q.dtype)
    codes = lay.to_view(q.codes())
    zp = q.zero_point if q.zero_point is not None else jnp.zeros((), jnp.int32)
    y = q.spec.format.decode(codes, zp).astype(cd) * q.float_scale().astype(cd)
    return saturate(lay.from_view(y), q.dtype).astype(q.dtype)


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _ste(v, scale, zp, spec):
    return _fake_out(v, scale, zp, spec)[0]


def _fake_out(v, scale, zp, spec):
    cd = compute_dtype(v.dtype)
    y, inside = fake_values(v.astype(cd), scale.astype(cd), zp, spec)
    return saturate(y, v.dtype).astype(v.dtype), inside


@_ste.defjvp
def _ste_jvp(spec, primals, tangents):
    v, scale, zp = primals
    y, inside = _fake_out(v, scale, zp, spec)
    return y, jnp.where(inside, tangents[0], jnp.zeros_like(tangents[0]))


@public("quant.fake_quant", leaf_kwarg=True)
def fake_quant(
    x: jax.Array,
    spec: QuantSpec,
    *,
    scale: jax.typing.ArrayLike | None = None,
    zero_point: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """``dequantize(quantize(x, spec))`` with a straight-through gradient, same shape and dtype.

    The gradient with respect to ``x`` is 1 where ``x / s`` lies on the grid (for integers
    ``qmin <= round(x/s) + z <= qmax``, PyTorch's mask) and 0 outside; the scale computed from
    ``x`` is held constant (``stop_gradient``). NaN stays NaN (it is not quantized, so it is not
    checked). Use it for quantization-aware training; ``fake_quant_lsq`` learns the scale instead.

    >>> import jax, jax.numpy as jnp
    >>> jax.grad(lambda x: fake_quant(x, QuantSpec(8)).sum())(jnp.array([0.3, -1.0])).tolist()
    [1.0, 1.0]
    """
    path = leaf_path()
    x = _check_input(x, spec, path)
    lay = layout(spec, x.shape, path=path)
    _check_params(scale, zero_point, lay, spec, path)
    return _fake_quant_spec(x, spec, scale, zero_point)


@partial(jax.jit, static_argnums=(1,))
def _fake_quant_spec(x, spec, scale, zero_point):
    lay = layout(spec, x.shape)
    scale, zp, _, _ = _params(x, spec, scale, zero_point, lay)
    return lay.from_view(_ste(lay.to_view(x), scale, zp, spec))
