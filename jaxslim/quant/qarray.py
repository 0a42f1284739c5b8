"""``QArray`` and ``quantize`` / ``dequantize`` / ``fake_quant``.

A ``QArray`` is a registered pytree: its children are the arrays ``values`` (integer or fp8 codes,
2/3/4-bit codes packed into ``uint8``), ``scale`` (float32) and ``zero_point`` (``int8``/``uint8``
codes, or ``None`` when it is 0: symmetric signed and fp8 specs); its static metadata is the
``QuantSpec`` and the original ``shape`` and ``dtype``. It goes through ``jax.jit``, ``jax.vmap``
(the metadata describes one example), ``jax.device_put`` with shardings and Orbax checkpoints
like any pytree of arrays.

``nbytes`` counts codes, scales and zero points: an int4 per-channel ``(in, out)`` kernel takes
``in * out / 2 + 4 * out`` bytes.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxslim.quant import packing
from jaxslim.quant.numerics import _fake_quant, compute_dtype, qparams, round_codes
from jaxslim.quant.spec import QuantSpec, layout

__all__ = ["QArray", "quantize", "dequantize", "fake_quant", "is_qarray"]


@dataclasses.dataclass(frozen=True, eq=False)
class QArray:
    """A quantized array: codes, scales, zero points and the static ``spec``, ``shape``, ``dtype``.

    ``dequantize()`` (or ``quant.dequantize(q)``) gives back a ``shape``/``dtype`` array equal to
    ``(codes - zero_point) * scale``.

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
        """Bytes of codes + scales + zero points."""
        leaves = [a for a in (self.values, self.scale, self.zero_point) if a is not None]
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves)

    def dequantize(self) -> jax.Array:
        return dequantize(self)

    def codes(self) -> jax.Array:
        """The unpacked integer codes (``int8``, or ``uint8`` for unsigned), shape ``shape``."""
        if self.spec.fmt != "int":
            raise ValueError("QArray.codes: fp8 values have no integer codes; use .values")
        return packing.unpack(
            self.values, self.spec.storage_bits, self.shape, signed=self.spec.signed
        )

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
    QArray, data_fields=["values", "scale", "zero_point"], meta_fields=["spec", "shape", "dtype"]
)


def is_qarray(x: Any) -> bool:
    """``isinstance(x, QArray)`` — handy as ``is_leaf=`` in ``jax.tree`` functions."""
    return isinstance(x, QArray)


def _check_input(x: Any, spec: Any, path: str, fn_name: str) -> jax.Array:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{fn_name}: spec must be a QuantSpec, got {spec!r} for {path!r}")
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{fn_name}: expects a floating-point array, got "
            f"{getattr(x, 'dtype', type(x).__name__)} for {path or 'the input'!r}"
        )
    return jnp.asarray(x)


def _check_params(scale, zero_point, lay, path, fn_name):
    """Raises unless a given scale / zero point broadcasts to the layout's scale shape."""
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
                f"{fn_name}: {name} of shape {shape} does not broadcast to the scale shape "
                f"{lay.scale_shape} of {path or 'the input'!r}"
            )


def _params(x, spec, scale, zero_point, lay):
    if scale is None:
        scale, zp = qparams(x, spec)
        return jax.lax.stop_gradient(scale), zp
    scale = jnp.asarray(scale, jnp.float32)
    zp = jnp.zeros((), jnp.int32) if zero_point is None else jnp.asarray(zero_point)
    return jnp.broadcast_to(scale, lay.scale_shape), jnp.broadcast_to(zp, lay.scale_shape)


def quantize(
    x: jax.Array,
    spec: QuantSpec,
    *,
    scale: jax.typing.ArrayLike | None = None,
    zero_point: jax.typing.ArrayLike | None = None,
    path: str = "",
) -> QArray:
    """Quantizes ``x`` to a ``QArray`` under ``spec``.

    ``q = clip(round_half_even(x * (1/s)) + z, qmin, qmax)`` (fp8: ``x * (1/s)`` clipped to the
    format's range and cast, round to nearest even). Without ``scale``, ``(s, z)`` come from the
    min/max of ``x`` (``quant.qparams``); pass calibrated ones (from an observer) shaped like
    ``quant.layout(spec, x.shape).scale_shape``. NaN becomes the zero point (fp8 keeps NaN);
    ``+-inf`` clip to the ends of the grid. ``path`` names the leaf in error messages.

    >>> import jax.numpy as jnp, numpy as np
    >>> q = quantize(jnp.array([-1.0, 0.0, 0.5, 1.0]), QuantSpec(8))
    >>> q.values.tolist(), q.scale.tolist() == [np.float32(1) / np.float32(127.5)]
    ([-127, 0, 64, 127], True)
    """
    fn_name = "quant.quantize"
    x = _check_input(x, spec, path, fn_name)
    lay = layout(spec, x.shape, path=path, fn_name=fn_name)
    _check_params(scale, zero_point, lay, path, fn_name)
    return _quantize(x, spec, scale, zero_point)


@partial(jax.jit, static_argnums=(1,))
def _quantize(x, spec, scale, zero_point):
    # One compiled program per spec and shape (also when called eagerly).
    lay = layout(spec, x.shape)
    scale, zp = _params(x, spec, scale, zero_point, lay)
    v = x.reshape(lay.view_shape).astype(compute_dtype(x.dtype))
    if spec.fmt != "int":
        y = jnp.clip(v * (jnp.asarray(1, v.dtype) / scale.astype(v.dtype)), -spec.fmax, spec.fmax)
        values = y.astype(spec.storage_dtype).reshape(x.shape)
        return QArray(values, scale, None, spec, tuple(x.shape), jnp.dtype(x.dtype))
    q, _ = round_codes(v, scale, zp, spec.qmin, spec.qmax)
    q = jnp.where(jnp.isnan(q), zp.astype(q.dtype), q).astype(jnp.int32).reshape(x.shape)
    code_dtype = jnp.int8 if spec.signed else jnp.uint8
    values = packing.pack(q.astype(code_dtype), spec.storage_bits)
    if spec.storage_bits == 8:
        values = values.astype(spec.storage_dtype).reshape(x.shape)
    keep_zp = not (spec.symmetric and spec.signed) or zero_point is not None
    zp_store = zp.astype(code_dtype) if keep_zp else None
    return QArray(values, scale, zp_store, spec, tuple(x.shape), jnp.dtype(x.dtype))


def dequantize(q: QArray) -> jax.Array:
    """``(codes - zero_point) * scale`` in float32, reshaped and cast to ``q``'s original dtype.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.5, -1.0], [2.0, 0.25]])
    >>> dequantize(quantize(x, QuantSpec(8, axis=-1))).shape
    (2, 2)
    """
    if not isinstance(q, QArray):
        raise TypeError(f"quant.dequantize: expects a QArray, got {type(q).__name__}")
    return _dequantize(q)


@jax.jit
def _dequantize(q: QArray) -> jax.Array:
    lay = layout(q.spec, q.shape, fn_name="quant.dequantize")
    cd = compute_dtype(q.dtype)
    if q.spec.fmt != "int":
        v = q.values.astype(cd).reshape(lay.view_shape)
        return (v * q.scale.astype(cd)).reshape(q.shape).astype(q.dtype)
    codes = q.codes().astype(jnp.int32).reshape(lay.view_shape)
    if q.zero_point is not None:
        codes = codes - q.zero_point.astype(jnp.int32)
    return (codes.astype(cd) * q.scale.astype(cd)).reshape(q.shape).astype(q.dtype)


@partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _ste_fp8(v, scale, fmax, dtype):
    return _fp8_fq(v, scale, fmax, dtype)[0]


def _fp8_fq(v, scale, fmax, dtype):
    y = v * (jnp.asarray(1, v.dtype) / scale)
    inside = jnp.abs(y) <= fmax
    y = jnp.clip(y, -fmax, fmax).astype(dtype).astype(v.dtype)
    return y * scale, inside


@_ste_fp8.defjvp
def _ste_fp8_jvp(fmax, dtype, primals, tangents):
    v, scale = primals
    y, inside = _fp8_fq(v, scale, fmax, dtype)
    return y, jnp.where(inside, tangents[0], jnp.zeros_like(tangents[0]))


def fake_quant(
    x: jax.Array,
    spec: QuantSpec,
    *,
    scale: jax.typing.ArrayLike | None = None,
    zero_point: jax.typing.ArrayLike | None = None,
    path: str = "",
) -> jax.Array:
    """``dequantize(quantize(x, spec))`` with a straight-through gradient, same shape and dtype.

    The gradient with respect to ``x`` is 1 where ``qmin <= round(x/s) + z <= qmax`` and 0
    outside (PyTorch's mask); the scale computed from ``x`` is held constant (``stop_gradient``).
    Use it for quantization-aware training; ``fake_quant_lsq`` learns the scale instead.

    >>> import jax, jax.numpy as jnp
    >>> jax.grad(lambda x: fake_quant(x, QuantSpec(8)).sum())(jnp.array([0.3, -1.0])).tolist()
    [1.0, 1.0]
    """
    fn_name = "quant.fake_quant"
    x = _check_input(x, spec, path, fn_name)
    lay = layout(spec, x.shape, path=path, fn_name=fn_name)
    _check_params(scale, zero_point, lay, path, fn_name)
    return _fake_quant_spec(x, spec, scale, zero_point)


@partial(jax.jit, static_argnums=(1,))
def _fake_quant_spec(x, spec, scale, zero_point):
    lay = layout(spec, x.shape)
    scale, zp = _params(x, spec, scale, zero_point, lay)
    cd = compute_dtype(x.dtype)
    v = x.reshape(lay.view_shape)
    if spec.fmt != "int":
        y = _ste_fp8(v.astype(cd), scale.astype(cd), spec.fmax, spec.storage_dtype)
        return y.reshape(x.shape).astype(x.dtype)
    return _fake_quant(v, scale, zp, spec.qmin, spec.qmax).reshape(x.shape)
