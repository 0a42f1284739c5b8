"""How weights group: ``Unstructured``, ``Channels``, ``NM`` and ``Blocks``.

A structure says which entries of a leaf live or die together. It is plain, hashable data (a frozen
dataclass), so it can be a static argument under ``jax.jit``. The same structures serve pruning
(rank groups by a score), group lasso (shrink groups by their norm) and channel splicing.

Shapes follow Flax: a Dense kernel is ``(in, out)``, a Conv kernel ``(*spatial, in, out)``; the
output channel is axis ``-1``, the input channel axis ``-2``. The default axes assume this layout:

* **Equinox / PyTorch** weights are ``(out, in)`` (``eqx.nn.Linear``) and ``(out, in, *kernel)``
  (``eqx.nn.Conv2d``): use ``Channels(axis=0)`` for output channels (rows, filters),
  ``Channels(axis=1)`` for input channels, ``NM(n, m, axis=1)`` for N:M along the contraction.
  Their conv biases ``(out, 1, 1)`` have ``ndim >= 2`` but are not kernels; the ``where=``
  predicate ``kernel_like`` selects only leaves with at least two axes of size > 1.
* **Einsum / DenseGeneral kernels** with ``ndim >= 3`` (e.g. ``(2, heads, features)``) contract
  whichever axes their equation says; pass the contracted axis explicitly
  (``NM(2, 4, axis=...)``, ``Channels(axis=...)``).

For a leaf ``x`` of shape ``S`` a group structure defines

* ``reduce(x) -> g``: the ``ord``-norm of each group, an array with one entry per group;
* ``expand(g, S) -> y``: ``g`` broadcast back to every entry of its group, shape ``S``;
* ``group_size(S)``: the number of entries in one group.

``NM`` is local rather than ranked: it keeps the ``n`` largest of every run of ``m`` consecutive
entries along ``axis`` and is applied with ``nm_mask``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxslim._checks import public

__all__ = [
    "Structure",
    "Unstructured",
    "Channels",
    "NM",
    "Blocks",
    "nm_mask",
    "norm",
    "kernel_like",
]

_LAYOUT = (
    "the default axes assume Flax kernels (in, out) / (*spatial, in, out); for Equinox/PyTorch "
    "(out, in, ...) or einsum kernels pass the axis explicitly"
)


def kernel_like(path: str, leaf: Any) -> bool:
    """``where=`` predicate: a floating-point array with at least two axes of size > 1.

    Unlike ``ndim >= 2`` it skips Equinox conv biases ``(out, 1, 1)``, ``(1, n)`` row vectors and
    other broadcast-shaped leaves, which are not kernels.

    >>> import jax.numpy as jnp
    >>> kernel_like("w", jnp.zeros((3, 4))), kernel_like("conv/bias", jnp.zeros((8, 1, 1)))
    (True, False)
    """
    dtype, shape = getattr(leaf, "dtype", None), getattr(leaf, "shape", None)
    if dtype is None or shape is None or not jnp.issubdtype(dtype, jnp.floating):
        return False
    return sum(int(d) > 1 for d in shape) >= 2


def float_keys(x: jax.Array) -> jax.Array:
    """Maps scores to ``uint32`` keys whose integer order ranks them, for pruning lowest first.

    ``NaN < -inf < ... < -0 < +0 < ... < +inf``: a NaN score ranks lowest (is pruned first) and
    ``+inf`` highest (is kept last), whatever the NaN's sign bit.

    >>> import jax.numpy as jnp
    >>> [int(k) for k in float_keys(jnp.array([jnp.nan, -jnp.inf, 0.0, jnp.inf]))]
    [0, 8388607, 2147483648, 4286578688]
    """
    return _float_keys(x)


@jax.jit
def _float_keys(x: jax.Array) -> jax.Array:
    # One compiled program per shape and dtype, also when called eagerly.
    x = x.astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    sign = jnp.uint32(0x80000000)
    keys = jnp.where(bits >= sign, ~bits, bits | sign)
    return jnp.where(jnp.isnan(x), jnp.uint32(0), keys)


@public("structures.norm")
def norm(x: jax.Array, axis, ord: float) -> jax.Array:
    """``ord``-norm of ``x`` over ``axis`` (1, 2, ``inf`` or any p > 0), computed in float32+.

    The 2-norm of an all-zero group is 0 (no NaN); use ``optax.safe_norm`` where a gradient at zero
    is needed.
    """
    _check_ord(ord, "structures.norm")
    a = jnp.abs(x)
    if ord == 1:
        return jnp.sum(a, axis=axis)
    if ord == 2:
        return jnp.sqrt(jnp.sum(a * a, axis=axis))
    if ord == math.inf:
        return jnp.max(a, axis=axis)
    return jnp.sum(a**ord, axis=axis) ** (1.0 / ord)


def _check_ord(ord: float, name: str) -> None:
    if isinstance(ord, bool) or not isinstance(ord, int | float | np.integer | np.floating):
        raise TypeError(f"{name}: ord must be a positive number or math.inf, got {ord!r}")
    if not (ord == math.inf or ord > 0):
        raise ValueError(f"{name}: ord must be a positive number or math.inf, got {ord!r}")


def _norm_axis(axis: int, ndim: int, what: str, path: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{what}: axis {axis} is out of range for {path!r} with ndim {ndim}; {_LAYOUT}"
        )
    return axis % ndim


def _check_axis(name: str, axis: Any) -> None:
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"{name}: axis must be an int, got {axis!r}")


class Structure:
    """Base class: how entries of one leaf group together."""

    def check(self, shape: tuple[int, ...], path: str = "") -> None:
        """Raises ``ValueError`` naming ``path`` if this structure cannot group ``shape``.

        The message starts with the structure; a caller prefixes its own name.
        """

    def reduce(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def expand(self, g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        raise NotImplementedError

    def group_size(self, shape: tuple[int, ...]) -> int:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Unstructured(Structure):
    """Every entry is its own group.

    >>> Unstructured().group_size((3, 4))
    1
    """

    def reduce(self, x):
        return x

    def expand(self, g, shape):
        return g

    def group_size(self, shape):
        return 1


@dataclasses.dataclass(frozen=True)
class Channels(Structure):
    """A whole slice along ``axis`` is one group, scored by its ``ord``-norm over the other axes.

    ``Channels(axis=-1)`` groups the output channels of a Flax kernel (``(in, out)`` or
    ``(*spatial, in, out)``); ``Channels(axis=-2)`` the input channels. For Equinox/PyTorch
    weights, ``(out, in)`` (``eqx.nn.Linear``) or ``(out, in, kh, kw)`` (``eqx.nn.Conv2d``), the
    output channels (rows, filters) are ``Channels(axis=0)``: ``axis=-1`` there would group
    input features or kernel columns. ``reduce`` maps a leaf of shape ``S`` to shape
    ``(S[axis],)``: ``g_c = ||x[..., c, ...]||_ord``.

    >>> import jax.numpy as jnp
    >>> Channels(axis=-1, ord=1).reduce(jnp.array([[1.0, -2.0], [3.0, 0.0]]))
    Array([4., 2.], dtype=float32)
    """

    axis: int = -1
    ord: float = 2

    def __post_init__(self):
        _check_axis("Channels", self.axis)
        _check_ord(self.ord, "Channels")

    def check(self, shape, path=""):
        if len(shape) == 0:
            raise ValueError(f"Channels needs an array with ndim >= 1, {path!r} is 0-d")
        _norm_axis(self.axis, len(shape), f"Channels(axis={self.axis})", path)

    def reduce(self, x):
        ax = self.axis % x.ndim
        return norm(x, tuple(i for i in range(x.ndim) if i != ax), self.ord)

    def expand(self, g, shape):
        ax = self.axis % len(shape)
        bshape = [1] * len(shape)
        bshape[ax] = shape[ax]
        return jnp.broadcast_to(g.reshape(bshape), shape)

    def group_size(self, shape):
        return math.prod(shape) // shape[self.axis % len(shape)]


@dataclasses.dataclass(frozen=True)
class NM(Structure):
    """N:M sparsity: keep the ``n`` largest of every run of ``m`` consecutive entries on ``axis``.

    The default ``axis=-2`` is the input (contraction) axis of a Flax kernel ``(in, out)`` or
    ``(*spatial, in, out)``, which is what 2:4 sparse tensor cores need. It is an assumption about
    the layout, not read from the model: an Equinox ``(out, in)`` weight needs ``axis=1``, and an
    einsum kernel of ``ndim >= 3`` such as ``(2, heads, features)`` contracting ``features`` needs
    ``axis=-1`` (``axis=-2`` would run along ``heads``). A leaf whose ``axis`` is not a multiple
    of ``m`` cannot be a Flax kernel of this pattern and is refused with the axis to pass.
    The sparsity is fixed at ``1 - n/m``.

    >>> NM(2, 4).sparsity
    0.5
    """

    n: int = 2
    m: int = 4
    axis: int = -2

    def __post_init__(self):
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (self.n, self.m)):
            raise TypeError(f"NM: n and m must be ints, got n={self.n!r}, m={self.m!r}")
        if not 0 <= self.n <= self.m:
            raise ValueError(f"NM: need integers 0 <= n <= m, got n={self.n!r}, m={self.m!r}")
        if self.m < 1:
            raise ValueError(f"NM: m must be >= 1, got {self.m!r}")
        _check_axis("NM", self.axis)

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def check(self, shape, path=""):
        if len(shape) == 0:
            raise ValueError(f"NM needs an array with ndim >= 1, {path!r} is 0-d")
        ax = _norm_axis(self.axis, len(shape), f"NM({self.n}, {self.m}, axis={self.axis})", path)
        if shape[ax] % self.m:
            fits = [a for a in range(len(shape)) if shape[a] % self.m == 0]
            hint = f"pass NM({self.n}, {self.m}, axis=...) with the contracted axis" + (
                f" (axes of {path!r} divisible by {self.m}: {fits})" if fits else ""
            )
            raise ValueError(
                f"NM({self.n}, {self.m}) needs axis {self.axis} of {path!r} to be a multiple of "
                f"{self.m}, got shape {tuple(shape)}; NM's axis (default -2) is the contracted "
                f"axis of a Flax kernel (..., in, out): for another layout {hint}"
            )

    def reduce(self, x):
        raise TypeError("NM is a local pattern, not a group norm; use nm_mask")

    expand = reduce

    def group_size(self, shape):
        return 1


@dataclasses.dataclass(frozen=True)
class Blocks(Structure):
    """Tiles of ``shape`` over the trailing axes are groups, scored by their ``ord``-norm.

    A leaf of shape ``(..., a, b)`` with ``Blocks((p, q))`` has ``(..., a/p, b/q)`` groups; leading
    axes not covered by ``shape`` are blocked with size 1.

    >>> import jax.numpy as jnp
    >>> Blocks((2, 2), ord=1).reduce(jnp.ones((4, 2)))
    Array([[4.],
           [4.]], dtype=float32)
    """

    shape: tuple[int, ...] = (4, 4)
    ord: float = 2

    def __post_init__(self):
        try:
            shape = tuple(self.shape)
        except TypeError:
            raise TypeError(f"Blocks: shape must be a tuple of ints, got {self.shape!r}") from None
        if any(isinstance(s, bool) or not isinstance(s, int | np.integer) for s in shape):
            raise TypeError(f"Blocks: shape must be a tuple of ints, got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        if not self.shape or any(s < 1 for s in self.shape):
            raise ValueError(f"Blocks: shape must be positive integers, got {self.shape!r}")
        _check_ord(self.ord, "Blocks")

    def _full(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (1,) * (len(shape) - len(self.shape)) + self.shape

    def check(self, shape, path=""):
        if len(shape) < len(self.shape):
            raise ValueError(
                f"Blocks{self.shape} needs ndim >= {len(self.shape)}, "
                f"{path!r} has shape {tuple(shape)}"
            )
        if any(s % b for s, b in zip(shape, self._full(shape), strict=True)):
            raise ValueError(f"Blocks{self.shape} does not tile {path!r} of shape {tuple(shape)}")

    def reduce(self, x):
        full = self._full(x.shape)
        split = [d for s, b in zip(x.shape, full, strict=True) for d in (s // b, b)]
        return norm(x.reshape(split), tuple(range(1, 2 * x.ndim, 2)), self.ord)

    def expand(self, g, shape):
        for ax, b in enumerate(self._full(shape)):
            if b > 1:
                g = jnp.repeat(g, b, axis=ax, total_repeat_length=g.shape[ax] * b)
        return g

    def group_size(self, shape):
        return math.prod(self.shape)


@public("structures.nm_mask")
def nm_mask(scores: jax.Array, structure: NM) -> jax.Array:
    """Boolean mask keeping the ``n`` highest scores of every run of ``m`` along ``structure.axis``.

    Ties break by position: of equal scores the earlier one is pruned first. Scores are ranked by
    ``float_keys``: a NaN score ranks lowest (pruned first, never at the cost of a finite entry),
    ``+inf`` highest. Sort-free: each entry's rank inside its run is counted by ``m`` comparisons.
    The leaf must have passed ``structure.check`` (``axis`` a multiple of ``m``).

    >>> import jax.numpy as jnp
    >>> nm_mask(jnp.array([[4.0], [1.0], [3.0], [2.0]]), NM(2, 4))[:, 0]
    Array([ True, False,  True, False], dtype=bool)
    """
    if not isinstance(structure, NM):
        raise TypeError(f"structures.nm_mask: structure must be NM(n, m), got {structure!r}")
    scores = jnp.asarray(scores)
    try:
        structure.check(tuple(scores.shape), "scores")
    except ValueError as e:
        raise ValueError(f"structures.nm_mask: {e}") from None
    n, m = structure.n, structure.m
    ax = structure.axis % scores.ndim
    x = jnp.moveaxis(float_keys(scores), ax, -1)
    runs = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    a, b = runs[..., :, None], runs[..., None, :]
    j_lt_i = jnp.broadcast_to(jnp.arange(m)[None, :] < jnp.arange(m)[:, None], runs.shape + (m,))
    # rank = number of entries that are pruned before this one (lower score, or equal and earlier)
    rank = jnp.sum((b < a) | ((b == a) & j_lt_i), axis=-1)
    keep = rank >= m - n
    return jnp.moveaxis(keep.reshape(x.shape), -1, ax)
