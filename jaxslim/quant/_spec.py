"""``QuantSpec``: what to quantize to, and how a leaf is cut into groups that share a scale.

A spec is plain hashable data (a frozen dataclass), so it can be a static argument under ``jit``.

Granularity ("global", "local" and everything between):

* ``axis=None, group_size=None`` — one scale for the whole tensor (per-tensor, "global");
* ``axis=k`` (or a tuple) — the axes in ``axis`` keep their own scale (per-channel, "local");
* ``group_size=g`` — the group axis (``group_axis``, by default ``-2``: the input / contraction axis
  of a Flax kernel, ``-1`` for a vector) is cut into blocks of ``g`` consecutive entries, each block
  with its own scale; axes in ``axis`` also keep their own scale; other axes share.

Statistics are computed on a *view* of the leaf: its shape with the group axis ``n`` split into
``(ceil(n / g), g)``. A scale has the view's shape with every reduced axis set to 1, so it
broadcasts against the view (a per-output-channel scale of a ``(in, out)`` kernel has shape
``(1, out)``; a ``group_size=32`` scale of the same kernel with ``axis=-1`` has shape
``(ceil(in / 32), 1, out)``).

Padded last group: when ``g`` does not divide ``n`` (SmolLM2's 576 = 4 x 128 + 64), the last
group is shorter. The view is then the leaf padded along the group axis with ``ceil(n/g) * g - n``
filler entries (``Layout.to_view``; ``Layout.from_view`` drops them again). The filler never
counts: ranges and searches reduce over the real entries only (``Layout.mask``, ``Layout.count``),
so the last group's scale is exactly the one computed from its real entries. Stored codes are not
padded (``QArray.values`` holds exactly the leaf's codes); only the scales number ``ceil(n/g)``
along the group axis. A ``group_size`` at least ``n`` makes one group of the whole axis (the
effective ``Layout.group_size`` is then ``n``, nothing is padded).

Tiles: ``group_size=(128, 128)`` cuts two axes (``group_axis``, by default ``(-2, -1)``) into
``128 x 128`` tiles with one scale each (DeepSeek-V3's FP8 block scales, compressed-tensors'
``"block"`` strategy): the view splits both axes, ``(ceil(K/128), 128, ceil(N/128), 128)`` for a
``(K, N)`` kernel, and a shorter last tile along either axis is padded the same way
(``Layout.tiles``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxslim._checks import caller, public
from jaxslim.quant import formats


@public("quant.qrange")
def qrange(bits: int, *, signed: bool = True, reduce_range: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``bits``-bit integer grid, as in PyTorch.

    ``reduce_range`` drops one bit (``int8 -> [-64, 63]``, ``uint8 -> [0, 127]``), PyTorch's
    setting for x86 kernels that may overflow.

    >>> qrange(8), qrange(8, signed=False), qrange(4), qrange(8, reduce_range=True)
    ((-128, 127), (0, 255), (-8, 7), (-64, 63))
    """
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or bits < 1:
        raise ValueError(f"quant.qrange: bits must be a positive int, got {bits!r}")
    b = bits - 1 if reduce_range else bits
    if signed:
        return -(2 ** (b - 1)), 2 ** (b - 1) - 1
    return 0, 2**b - 1


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What to quantize a tensor to.

    Args:
      bits: bits of one code: 2, 3, 4 or 8 for ``fmt="int"`` (default 8), 8 for the fp8
        formats, 4 for ``"nf4"``; ``None`` (the default) means the format's widest.
      signed: codes in ``[-2^(b-1), 2^(b-1) - 1]`` (True) or ``[0, 2^b - 1]`` (False; integer
        formats only).
      symmetric: zero point fixed (0 when signed, mid-range when unsigned) and
        ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)``; else affine with a zero point
        (integer formats only).
      axis: ``None`` or the axes that keep their own scale (per-channel).
      group_size: cut ``group_axis`` into blocks of this many consecutive entries, one scale
        each; the last group is shorter when ``group_size`` does not divide the axis (its scale
        comes from its real entries only), and a ``group_size`` at least the axis length makes
        one group of the whole axis. A positive int (``ValueError`` otherwise).
      fmt: a format family of the registry ``quant.formats.FORMATS``: ``"int"``, ``"e4m3"``
        (``float8_e4m3fn``, max 448), ``"e5m2"`` (max 57344) or ``"nf4"`` (QLoRA's NormalFloat-4
        codebook with absmax scales, double-quantized; QLoRA's setting is
        ``QuantSpec(fmt="nf4", axis=-1, group_size=64)``), or a block format: ``"mxfp8"``,
        ``"mxfp4"`` (OCP Microscaling: blocks of 32 E4M3 / E2M1 values sharing an E8M0
        power-of-two scale) and ``"nvfp4"`` (blocks of 16 E2M1 values, an E4M3 scale each and a
        float32 per-tensor scale). A block format's ``group_size`` defaults to its block, and
        with ``axis=None`` every axis but the group axis keeps its own scale (the OCP block of
        consecutive values along ``group_axis``).
      group_axis: the axis ``group_size`` cuts; ``None`` means ``-2`` (``-1`` for a vector).
        With a tuple ``group_size`` (tiles, e.g. ``(128, 128)``: one scale per ``128 x 128``
        block), a tuple of as many distinct axes, ``None`` meaning the last ones (``(-2, -1)``).

    Every option but ``bits`` is keyword-only. Codes of 2, 3 and 4 bits are packed into
    ``uint8`` at their exact width (four 2-bit codes a byte, eight 3-bit codes in 3 bytes, two
    4-bit codes a byte).

    >>> s = QuantSpec(4, axis=-1, group_size=32)
    >>> s.qmin, s.qmax, s.storage_bits, s.format.name
    (-8, 7, 4, 'int4')
    >>> QuantSpec(fmt="mxfp4").group_size, QuantSpec(fmt="nvfp4", axis=-1).group_size
    (32, 16)
    """

    bits: int | None = None
    _: dataclasses.KW_ONLY
    signed: bool = True
    symmetric: bool = True
    axis: int | tuple[int, ...] | None = None
    group_size: int | tuple[int, ...] | None = None
    fmt: str = "int"
    group_axis: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.fmt, str):
            raise ValueError(f"QuantSpec: fmt must be a format name (str), got {self.fmt!r}")
        if self.bits is not None and (
            isinstance(self.bits, bool) or not isinstance(self.bits, int | np.integer)
        ):
            raise ValueError(f"QuantSpec: bits must be an int, got {self.bits!r}")
        f = formats.lookup(self.fmt, None if self.bits is None else int(self.bits))
        object.__setattr__(self, "bits", f.bits)
        for name, ok in (("signed", f.unsigned), ("symmetric", f.affine)):
            v = getattr(self, name)
            if not isinstance(v, bool | np.bool_):
                raise ValueError(f"QuantSpec: {name} must be a bool, got {v!r}")
            if not v and not ok:
                raise ValueError(
                    f"QuantSpec: fmt={self.fmt!r} needs {name}=True (format {f.name!r}); got "
                    f"bits={self.bits!r}, signed={self.signed!r}, symmetric={self.symmetric!r}"
                )
        axis = self.axis
        if axis is not None:
            if isinstance(axis, int | np.integer):
                axes = (axis,)
            elif isinstance(axis, tuple | list):
                axes = tuple(axis)
            else:
                raise ValueError(
                    f"QuantSpec: axis must be None, an int or a tuple of ints, got {axis!r}"
                )
            if not all(isinstance(a, int | np.integer) and not isinstance(a, bool) for a in axes):
                raise ValueError(
                    f"QuantSpec: axis must be None, an int or a tuple of ints, got {axis!r}"
                )
            object.__setattr__(self, "axis", tuple(int(a) for a in axes))
        is_int = lambda v: isinstance(v, int | np.integer) and not isinstance(v, bool)
        if isinstance(self.group_size, tuple | list):  # tiles: one scale per block of axes
            gs, ga = tuple(self.group_size), self.group_axis
            if len(gs) < 2 or not all(is_int(g) and g >= 1 for g in gs):
                raise ValueError(
                    f"QuantSpec: a tuple group_size (tiles) needs two or more positive ints, got "
                    f"{self.group_size!r}"
                )
            if ga is None:
                ga = tuple(range(-len(gs), 0))
            if not isinstance(ga, tuple | list) or len(ga) != len(gs) or not all(map(is_int, ga)):
                raise ValueError(
                    f"QuantSpec: group_axis must be a tuple of {len(gs)} ints to go with "
                    f"group_size={gs}, got {self.group_axis!r}"
                )
            if f.block_size is not None or f.scales is not None:
                raise ValueError(
                    f"QuantSpec: fmt={self.fmt!r} has its own blocks or stored scales; tiles "
                    "(a tuple group_size) are for int and fp8 formats"
                )
            object.__setattr__(self, "group_size", tuple(int(g) for g in gs))
            object.__setattr__(self, "group_axis", tuple(int(a) for a in ga))
            return
        for name in ("group_size", "group_axis"):
            v = getattr(self, name)
            if v is not None and not is_int(v):
                raise ValueError(f"QuantSpec: {name} must be an int or None, got {v!r}")
            if v is not None:
                object.__setattr__(self, name, int(v))
        if self.group_size is None and f.block_size is not None:
            object.__setattr__(self, "group_size", f.block_size)
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(
                f"QuantSpec: group_size must be a positive int or None, got {self.group_size!r}"
            )

    @property
    def format(self) -> formats.Format:
        """The registry record of this spec's format (``quant.formats``)."""
        return formats.lookup(self.fmt, self.bits)

    @property
    def qmin(self) -> float:
        """Smallest code (for fp8 minus the largest finite value, for a codebook its smallest
        entry): ``(qmin - zero_point) * scale`` is the smallest representable value."""
        return self.format.code_range(self.signed)[0]

    @property
    def qmax(self) -> float:
        """Largest code (for fp8 the largest finite value, for a codebook its largest entry)."""
        return self.format.code_range(self.signed)[1]

    @property
    def fmax(self) -> float:
        """Largest normalized value: ``qmax`` (the largest finite value of an fp8 format)."""
        return float(self.qmax)

    @property
    def storage_bits(self) -> int:
        """Bits one code takes in memory: 2, 3, 4 (packed into ``uint8``: 3-bit codes 8 in 3 bytes)
        or 8."""
        return self.format.storage_bits

    @property
    def storage_dtype(self) -> Any:
        """dtype of ``QArray.values``: ``int8``/``uint8``, ``uint8`` when packed, or fp8."""
        return self.format.storage_dtype(self.signed)

    @property
    def code_dtype(self) -> Any:
        """dtype of the unpacked codes (``QArray.codes()``)."""
        return self.format.codes_dtype(self.signed)

    @property
    def symmetric_zero_point(self) -> int:
        """The zero point of a symmetric spec: 0 when signed, the grid's middle when unsigned
        (128 for uint8, as PyTorch; ``(qmin + qmax) // 2`` otherwise)."""
        if self.signed:
            return 0
        qmin, qmax = self.qmin, self.qmax
        return 128 if (qmin, qmax) == (0, 255) else int((qmin + qmax) // 2)

    @property
    def stores_zero_point(self) -> bool:
        """Whether ``quantize`` stores a zero point (affine or unsigned specs)."""
        return not (self.symmetric and self.signed)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one leaf of shape ``shape`` is viewed for statistics under a spec.

    ``view_shape`` is ``shape`` with the group axis ``n`` split into ``(ceil(n / g), g)`` (padded
    by ``pad`` filler entries when ``g`` does not divide ``n``); ``reduce_axes`` are the view axes
    that share one scale; ``scale_shape`` is ``view_shape`` with those axes 1. ``group_axis`` is
    the axis of ``shape`` that is cut (``None``: not grouped) and ``group_size`` the effective
    group length (``min(spec.group_size, n)``).

    >>> lay = layout(QuantSpec(4, axis=-1, group_size=4), (6, 2))
    >>> lay.view_shape, lay.scale_shape, lay.pad, lay.count().reshape(-1).tolist()
    ((2, 4, 2), (2, 1, 2), 2, [4, 4, 2, 2])
    """

    shape: tuple[int, ...]
    view_shape: tuple[int, ...]
    reduce_axes: tuple[int, ...]
    scale_shape: tuple[int, ...]
    group_axis: int | None = None
    group_size: int | None = None
    pad: int = 0
    tiles: tuple[tuple[int, int, int], ...] = ()
    """``((axis, size, pad), ...)`` when several axes are cut (a tuple ``group_size``); then
    ``group_axis`` is ``None`` and ``pad`` 0."""

    def _pads(self) -> list[tuple[int, int]]:
        if self.tiles:
            return [(a, p) for a, _, p in self.tiles if p]
        return [(self.group_axis, self.pad)] if self.pad else []

    @property
    def padded_shape(self) -> tuple[int, ...]:
        """``shape`` with each group axis padded to a multiple of its group size."""
        shape = list(self.shape)
        for a, p in self._pads():
            shape[a] += p
        return tuple(shape)

    def to_view(self, x: Any, fill: Any = 0) -> Any:
        """``x`` (shape ``shape``, a jax or numpy array) padded with ``fill`` along the group
        axes and reshaped to ``view_shape``."""
        xp = np if isinstance(x, np.ndarray) else jnp
        pads = self._pads()
        if pads:
            widths = [(0, 0)] * len(self.shape)
            for a, p in pads:
                widths[a] = (0, p)
            x = xp.pad(x, widths, constant_values=xp.asarray(fill, x.dtype))
        return x.reshape(self.view_shape)

    def from_view(self, v: Any) -> Any:
        """Inverse of ``to_view``: ``v`` (shape ``view_shape``) back to ``shape``, filler
        dropped."""
        v = v.reshape(self.padded_shape)
        pads = self._pads()
        if not pads:
            return v
        return v[tuple(slice(0, n) for n in self.shape)]

    def expand(self, a: Any) -> Any:
        """A per-group array (broadcasting to ``scale_shape``: a scale, a zero point) as one
        value per entry of the leaf, shape ``shape``."""
        xp = np if isinstance(a, np.ndarray) else jnp
        return self.from_view(xp.broadcast_to(a, self.view_shape))

    def mask(self) -> np.ndarray | None:
        """``bool[view_shape]``, True on the leaf's real entries; ``None`` when nothing is
        padded."""
        if not self._pads():
            return None
        return _mask(self)

    def count(self) -> np.ndarray:
        """Real entries sharing each scale (``int64[scale_shape]``): ``g`` per group times the
        shared axes, fewer in a padded last group."""
        m = self.mask()
        if m is None:
            n = math.prod(self.view_shape[i] for i in self.reduce_axes)
            return np.full(self.scale_shape, n, np.int64)
        return np.sum(m, axis=self.reduce_axes, keepdims=True, dtype=np.int64)

    def masked(self, v: Any, fill: Any) -> Any:
        """``v`` (shape ``view_shape``) with its filler entries replaced by ``fill`` (a value that
        leaves a reduction unchanged: ``inf`` for a min, ``0`` for a sum)."""
        m = self.mask()
        if m is None:
            return v
        xp = np if isinstance(v, np.ndarray) else jnp
        return xp.where(m, v, xp.asarray(fill, v.dtype))


@functools.lru_cache(maxsize=256)
def _mask_cached(shape, view_shape, group_axis, pad, tiles) -> np.ndarray:
    lay = Layout(shape, view_shape, (), (), group_axis, None, pad, tiles)
    m = lay.to_view(np.ones(shape, bool), fill=False)
    m.setflags(write=False)
    return m


def _mask(lay: Layout) -> np.ndarray:
    return _mask_cached(lay.shape, lay.view_shape, lay.group_axis, lay.pad, lay.tiles)


def _norm(axis: int, ndim: int, what: str, path: str) -> int:
    if not -ndim <= axis < max(ndim, 1):
        raise ValueError(
            f"{caller()}: {what} {axis} is out of range for {path or 'the input'!r} "
            f"with ndim {ndim}"
        )
    return axis % max(ndim, 1)


def layout(spec: QuantSpec, shape: tuple[int, ...], *, path: str = "") -> Layout:
    """The statistics view of a leaf of ``shape`` under ``spec`` (raises on a bad axis or group).

    A group size that does not divide the group axis gives a shorter last group (see the module
    docstring):

    >>> layout(QuantSpec(4, axis=-1, group_size=2), (4, 3)).scale_shape
    (2, 1, 3)
    >>> layout(QuantSpec(4, axis=-1, group_size=128), (576, 3)).scale_shape
    (5, 1, 3)
    >>> layout(QuantSpec(fmt="mxfp4"), (64, 3)).scale_shape  # a block format: per block
    (2, 1, 3)
    """
    shape = tuple(int(d) for d in shape)
    try:
        return _cached_layout(spec, shape)
    except ValueError:
        return _layout(spec, shape, path)  # raises, naming the function and the leaf


@functools.lru_cache(maxsize=4096)
def _cached_layout(spec: QuantSpec, shape: tuple[int, ...]) -> Layout:
    return _layout(spec, shape, "")


def _layout(spec: QuantSpec, shape: tuple[int, ...], path: str) -> Layout:
    ndim = len(shape)
    keep = set()
    if spec.axis is not None:
        if ndim == 0:
            raise ValueError(f"{caller()}: axis={spec.axis} given for the scalar {path!r}")
        keep = {_norm(a, ndim, "axis", path) for a in spec.axis}
    if spec.group_size is None:
        scale_shape = tuple(1 if i not in keep else d for i, d in enumerate(shape))
        reduce = tuple(i for i in range(ndim) if i not in keep)
        return Layout(shape, shape, reduce, scale_shape)
    if ndim == 0:
        raise ValueError(f"{caller()}: group_size given for the scalar {path!r}")
    if isinstance(spec.group_size, tuple):
        return _tiled(spec, shape, keep, path)
    block_format = spec.format.block_size is not None and spec.axis is None
    g = spec.group_size
    if isinstance(g, bool) or not isinstance(g, int | np.integer) or g < 1:
        raise ValueError(
            f"{caller()}: group_size must be a positive int, got {g!r} for {path or 'the input'!r}"
        )
    ga = spec.group_axis if spec.group_axis is not None else (-2 if ndim >= 2 else -1)
    ga = _norm(ga, ndim, "group_axis", path)
    if ga in keep:
        raise ValueError(
            f"{caller()}: the group axis {ga} of {path or 'the input'!r} is also in "
            f"axis={spec.axis}; a per-channel axis cannot be cut into groups"
        )
    if block_format:  # a block format: one scale per block of consecutive values
        keep = set(range(ndim)) - {ga}
    n = shape[ga]
    g = int(g) if n == 0 else min(int(g), n)  # a group longer than the axis: the whole axis
    groups = -(-n // g)
    view = shape[:ga] + (groups, g) + shape[ga + 1 :]
    # View axes: i < ga -> i; ga -> blocks (kept); ga+1 -> within a block; i > ga -> i+1.
    kept_view = {i if i < ga else i + 1 for i in keep} | {ga}
    reduce = tuple(i for i in range(len(view)) if i not in kept_view)
    scale_shape = tuple(1 if i in reduce else d for i, d in enumerate(view))
    return Layout(shape, view, reduce, scale_shape, ga, g, groups * g - n)


def _tiled(spec: QuantSpec, shape: tuple[int, ...], keep: set, path: str) -> Layout:
    """The view of a tuple ``group_size``: every group axis split into ``(tiles, size)``."""
    ndim = len(shape)
    gas = [_norm(a, ndim, "group_axis", path) for a in spec.group_axis]
    if len(set(gas)) != len(gas):
        raise ValueError(
            f"{caller()}: group_axis={spec.group_axis} names an axis twice for "
            f"{path or 'the input'!r} with ndim {ndim}"
        )
    if set(gas) & keep:
        raise ValueError(
            f"{caller()}: a group axis {spec.group_axis} of {path or 'the input'!r} is also in "
            f"axis={spec.axis}; a per-channel axis cannot be cut into tiles"
        )
    sizes = dict(zip(gas, spec.group_size, strict=True))
    view: list[int] = []
    kept_view: set[int] = set()
    tiles = []
    for i, n in enumerate(shape):
        if i in sizes:
            g = int(sizes[i]) if n == 0 else min(int(sizes[i]), n)
            t = -(-n // g)
            kept_view.add(len(view))
            view += [t, g]
            tiles.append((i, g, t * g - n))
        else:
            if i in keep:
                kept_view.add(len(view))
            view.append(n)
    reduce = tuple(i for i in range(len(view)) if i not in kept_view)
    scale_shape = tuple(1 if i in reduce else d for i, d in enumerate(view))
    return Layout(shape, tuple(view), reduce, scale_shape, None, None, 0, tuple(tiles))
