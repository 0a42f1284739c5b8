"""``QuantSpec``: what to quantize to, and how a leaf is cut into groups that share a scale.

A spec is plain hashable data (a frozen dataclass), so it can be a static argument under ``jit``.

Granularity ("global", "local" and everything between):

* ``axis=None, group_size=None`` — one scale for the whole tensor (per-tensor, "global");
* ``axis=k`` (or a tuple) — the axes in ``axis`` keep their own scale (per-channel, "local");
* ``group_size=g`` — the group axis (``group_axis``, by default ``-2``: the input / contraction axis
  of a Flax kernel, ``-1`` for a vector) is cut into blocks of ``g`` consecutive entries, each block
  with its own scale; axes in ``axis`` also keep their own scale; other axes share.

Statistics are computed on a *view* of the leaf: its shape with the group axis ``n`` split into
``(n // g, g)``. A scale has the view's shape with every reduced axis set to 1, so it broadcasts
against the view (a per-output-channel scale of a ``(in, out)`` kernel has shape ``(1, out)``; a
``group_size=32`` scale of the same kernel with ``axis=-1`` has shape ``(in // 32, 1, out)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["QuantSpec", "qrange", "Layout", "layout"]

_INT_BITS = (2, 3, 4, 8)
_FP8 = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}


def qrange(bits: int, signed: bool = True, reduce_range: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``bits``-bit integer grid, as in PyTorch.

    ``reduce_range`` drops one bit (``int8 -> [-64, 63]``, ``uint8 -> [0, 127]``), PyTorch's
    setting for x86 kernels that may overflow.

    >>> qrange(8), qrange(8, signed=False), qrange(4), qrange(8, reduce_range=True)
    ((-128, 127), (0, 255), (-8, 7), (-64, 63))
    """
    b = bits - 1 if reduce_range else bits
    if signed:
        return -(2 ** (b - 1)), 2 ** (b - 1) - 1
    return 0, 2**b - 1


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What to quantize a tensor to.

    Args:
      bits: 2, 3, 4 or 8 for ``fmt="int"``; 8 for the fp8 formats.
      signed: codes in ``[-2^(b-1), 2^(b-1) - 1]`` (True) or ``[0, 2^b - 1]`` (False).
      symmetric: zero point fixed (0 when signed, mid-range when unsigned) and
        ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)``; else affine with a zero point.
      axis: ``None`` or the axes that keep their own scale (per-channel).
      group_size: cut ``group_axis`` into blocks of this many entries, one scale each.
      fmt: ``"int"``, ``"e4m3"`` (``float8_e4m3fn``, max 448) or ``"e5m2"`` (max 57344).
      group_axis: the axis ``group_size`` cuts; ``None`` means ``-2`` (``-1`` for a vector).

    Codes of 2, 3 and 4 bits are packed into ``uint8`` (four 2-bit or two 3/4-bit codes a byte).

    >>> s = QuantSpec(4, axis=-1, group_size=32)
    >>> s.qmin, s.qmax, s.storage_bits
    (-8, 7, 4)
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axis: int | tuple[int, ...] | None = None
    group_size: int | None = None
    fmt: str = "int"
    group_axis: int | None = None

    def __post_init__(self):
        if self.fmt not in ("int", *_FP8):
            raise ValueError(f"QuantSpec: fmt must be 'int', 'e4m3' or 'e5m2', got {self.fmt!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int | np.integer):
            raise ValueError(f"QuantSpec: bits must be an int, got {self.bits!r}")
        if self.fmt == "int" and self.bits not in _INT_BITS:
            raise ValueError(
                f"QuantSpec: bits must be one of {_INT_BITS} for fmt='int', got {self.bits!r}"
            )
        if self.fmt != "int" and (self.bits != 8 or not self.signed or not self.symmetric):
            raise ValueError(
                f"QuantSpec: fmt={self.fmt!r} needs bits=8, signed=True, symmetric=True; got "
                f"bits={self.bits!r}, signed={self.signed!r}, symmetric={self.symmetric!r}"
            )
        axis = self.axis
        if axis is not None:
            axes = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
            if not all(isinstance(a, int | np.integer) and not isinstance(a, bool) for a in axes):
                raise ValueError(
                    f"QuantSpec: axis must be None, an int or a tuple of ints, got {axis!r}"
                )
            object.__setattr__(self, "axis", tuple(int(a) for a in axes))
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int | np.integer)
            or self.group_size < 1
        ):
            raise ValueError(
                f"QuantSpec: group_size must be a positive int or None, got {self.group_size!r}"
            )

    @property
    def qmin(self) -> int:
        """Smallest integer code (for fp8, minus the largest finite value)."""
        if self.fmt != "int":
            return -int(self.fmax)
        return qrange(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        """Largest integer code (for fp8, the largest finite value)."""
        if self.fmt != "int":
            return int(self.fmax)
        return qrange(self.bits, self.signed)[1]

    @property
    def fmax(self) -> float:
        """Largest finite value of the fp8 format (``qmax`` for integers)."""
        if self.fmt == "int":
            return float(self.qmax)
        return float(jnp.finfo(_FP8[self.fmt]).max)

    @property
    def storage_bits(self) -> int:
        """Bits one code takes in memory: 2, 4 (3-bit codes use a nibble) or 8."""
        return {2: 2, 3: 4, 4: 4, 8: 8}[self.bits]

    @property
    def storage_dtype(self) -> Any:
        """dtype of ``QArray.values``: ``int8``/``uint8``, ``uint8`` when packed, or fp8."""
        if self.fmt != "int":
            return jnp.dtype(_FP8[self.fmt])
        if self.storage_bits < 8 or not self.signed:
            return jnp.dtype(jnp.uint8)
        return jnp.dtype(jnp.int8)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one leaf of shape ``shape`` is viewed for statistics under a spec.

    ``view_shape`` is ``shape`` with the group axis split into ``(n // g, g)``; ``reduce_axes``
    are the view axes that share one scale; ``scale_shape`` is ``view_shape`` with those axes 1.
    """

    shape: tuple[int, ...]
    view_shape: tuple[int, ...]
    reduce_axes: tuple[int, ...]
    scale_shape: tuple[int, ...]


def _norm(axis: int, ndim: int, what: str, path: str, fn_name: str) -> int:
    if not -ndim <= axis < max(ndim, 1):
        raise ValueError(
            f"{fn_name}: {what} {axis} is out of range for {path or 'the input'!r} with ndim {ndim}"
        )
    return axis % max(ndim, 1)


def layout(
    spec: QuantSpec, shape: tuple[int, ...], *, path: str = "", fn_name: str = "quant"
) -> Layout:
    """The statistics view of a leaf of ``shape`` under ``spec`` (raises on a bad axis or group).

    >>> layout(QuantSpec(4, axis=-1, group_size=2), (4, 3)).scale_shape
    (2, 1, 3)
    """
    shape = tuple(int(d) for d in shape)
    ndim = len(shape)
    keep = set()
    if spec.axis is not None:
        if ndim == 0:
            raise ValueError(f"{fn_name}: axis={spec.axis} given for the scalar {path!r}")
        keep = {_norm(a, ndim, "axis", path, fn_name) for a in spec.axis}
    if spec.group_size is None:
        view = shape
        reduce = tuple(i for i in range(ndim) if i not in keep)
    else:
        if ndim == 0:
            raise ValueError(f"{fn_name}: group_size given for the scalar {path!r}")
        ga = spec.group_axis if spec.group_axis is not None else (-2 if ndim >= 2 else -1)
        ga = _norm(ga, ndim, "group_axis", path, fn_name)
        if ga in keep:
            raise ValueError(
                f"{fn_name}: the group axis {ga} of {path or 'the input'!r} is also in "
                f"axis={spec.axis}; a per-channel axis cannot be cut into groups"
            )
        n, g = shape[ga], spec.group_size
        if n % g:
            raise ValueError(
                f"{fn_name}: group_size={g} does not divide axis {ga} of size {n} of "
                f"{path or 'the input'!r} (shape {shape})"
            )
        view = shape[:ga] + (n // g, g) + shape[ga + 1 :]
        # View axes: i < ga -> i; ga -> blocks (kept); ga+1 -> within a block; i > ga -> i+1.
        kept_view = {i if i < ga else i + 1 for i in keep} | {ga}
        reduce = tuple(i for i in range(len(view)) if i not in kept_view)
    scale_shape = tuple(1 if i in reduce else d for i, d in enumerate(view))
    return Layout(shape, view, reduce, scale_shape)
