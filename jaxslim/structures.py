"""How weights group: ``Unstructured``, ``Channels``, ``NM`` and ``Blocks``.

A structure says which entries of a leaf live or die together. It is plain, hashable data (a frozen
dataclass), so it can be a static argument under ``jax.jit``. The same structures serve pruning
(rank groups by a score), group lasso (shrink groups by their norm) and channel splicing.

Shapes follow Flax: a Dense kernel is ``(in, out)``, a Conv kernel ``(*spatial, in, out)``; the
output channel is axis ``-1``, the input channel axis ``-2``.

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

import jax
import jax.numpy as jnp

__all__ = ["Structure", "Unstructured", "Channels", "NM", "Blocks", "nm_mask", "norm"]


def norm(x: jax.Array, axis, ord: float) -> jax.Array:
    """``ord``-norm of ``x`` over ``axis`` (1, 2, ``inf`` or any p > 0), computed in float32+.

    The 2-norm of an all-zero group is 0 (no NaN); use ``optax.safe_norm`` where a gradient at zero
    is needed.
    """
    a = jnp.abs(x)
    if ord == 1:
        return jnp.sum(a, axis=axis)
    if ord == 2:
        return jnp.sqrt(jnp.sum(a * a, axis=axis))
    if ord == math.inf:
        return jnp.max(a, axis=axis)
    return jnp.sum(a**ord, axis=axis) ** (1.0 / ord)


def _check_ord(ord: float, name: str) -> None:
    if not (ord == math.inf or (isinstance(ord, int | float) and ord > 0)):
        raise ValueError(f"{name}: ord must be a positive number or math.inf, got {ord!r}")


def _norm_axis(axis: int, ndim: int, what: str, path: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}: axis {axis} is out of range for {path!r} with ndim {ndim}")
    return axis % ndim


class Structure:
    """Base class: how entries of one leaf group together."""

    def check(self, shape: tuple[int, ...], path: str = "", fn_name: str = "jaxslim") -> None:
        """Raises ``ValueError`` naming ``path`` if this structure cannot group ``shape``."""

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
    ``(*spatial, in, out)``); ``Channels(axis=-2)`` the input channels. ``reduce`` maps a leaf of
    shape ``S`` to shape ``(S[axis],)``: ``g_c = ||x[..., c, ...]||_ord``.

    >>> import jax.numpy as jnp
    >>> Channels(axis=-1, ord=1).reduce(jnp.array([[1.0, -2.0], [3.0, 0.0]]))
    Array([4., 2.], dtype=float32)
    """

    axis: int = -1
    ord: float = 2

    def __post_init__(self):
        _check_ord(self.ord, "Channels")

    def check(self, shape, path="", fn_name="jaxslim"):
        if len(shape) == 0:
            raise ValueError(f"{fn_name}: Channels needs an array with ndim >= 1, {path!r} is 0-d")
        _norm_axis(self.axis, len(shape), f"{fn_name}: Channels", path)

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

    The default ``axis=-2`` is the input (contraction) axis of a Flax kernel, which is what 2:4
    sparse tensor cores need. The sparsity is fixed at ``1 - n/m``.

    >>> NM(2, 4).sparsity
    0.5
    """

    n: int = 2
    m: int = 4
    axis: int = -2

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 <= self.n <= self.m):
            raise ValueError(f"NM: need integers 0 <= n <= m, got n={self.n!r}, m={self.m!r}")
        if self.m < 1:
            raise ValueError(f"NM: m must be >= 1, got {self.m!r}")

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def check(self, shape, path="", fn_name="jaxslim"):
        if len(shape) == 0:
            raise ValueError(f"{fn_name}: NM needs an array with ndim >= 1, {path!r} is 0-d")
        ax = _norm_axis(self.axis, len(shape), f"{fn_name}: NM", path)
        if shape[ax] % self.m:
            raise ValueError(
                f"{fn_name}: NM({self.n}, {self.m}) needs axis {self.axis} of {path!r} to be a "
                f"multiple of {self.m}, got shape {tuple(shape)}"
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
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not self.shape or any(s < 1 for s in self.shape):
            raise ValueError(f"Blocks: shape must be positive integers, got {self.shape!r}")
        _check_ord(self.ord, "Blocks")

    def _full(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (1,) * (len(shape) - len(self.shape)) + self.shape

    def check(self, shape, path="", fn_name="jaxslim"):
        if len(shape) < len(self.shape):
            raise ValueError(
                f"{fn_name}: Blocks{self.shape} needs ndim >= {len(self.shape)}, "
                f"{path!r} has shape {tuple(shape)}"
            )
        if any(s % b for s, b in zip(shape, self._full(shape), strict=True)):
            raise ValueError(
                f"{fn_name}: Blocks{self.shape} does not tile {path!r} of shape {tuple(shape)}"
            )

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


def nm_mask(scores: jax.Array, structure: NM) -> jax.Array:
    """Boolean mask keeping the ``n`` highest scores of every run of ``m`` along ``structure.axis``.

    Ties break by position: of equal scores the earlier one is pruned first. Sort-free: each entry's
    rank inside its run is counted by ``m`` comparisons.

    >>> import jax.numpy as jnp
    >>> nm_mask(jnp.array([[4.0], [1.0], [3.0], [2.0]]), NM(2, 4))[:, 0]
    Array([ True, False,  True, False], dtype=bool)
    """
    n, m = structure.n, structure.m
    ax = structure.axis % scores.ndim
    x = jnp.moveaxis(scores, ax, -1)
    runs = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    a, b = runs[..., :, None], runs[..., None, :]
    j_lt_i = jnp.broadcast_to(jnp.arange(m)[None, :] < jnp.arange(m)[:, None], runs.shape + (m,))
    # rank = number of entries that are pruned before this one (lower score, or equal and earlier)
    rank = jnp.sum((b < a) | ((b == a) & j_lt_i), axis=-1)
    keep = rank >= m - n
    return jnp.moveaxis(keep.reshape(x.shape), -1, ax)
