"""Masks from scores: ``topk_mask`` and ``apply_mask``.

Counting rule (the same as ``torch.nn.utils.prune``): ``sparsity=s`` over ``n`` candidates prunes
``k = round_half_even(s * n)`` of them, lowest scores first; equal scores are pruned in order of
their flat (row-major) index, lowest first, and across leaves in ``jax.tree`` order.

The k-th smallest score is found without sorting: scores are mapped to ``uint32`` keys whose
integer order is the float order, and a radix select builds two 65536-bin histograms (high, then
low 16 bits). Histograms and counts are reductions, so XLA runs them shard by shard on sharded
parameters, and the global threshold over all layers never concatenates or gathers them. Under
a mesh with ``Explicit`` axes a 32-step bisection on counts is used instead.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxslim import _tree
from jaxslim.structures import NM, Structure, Unstructured, nm_mask

__all__ = ["topk_mask", "apply_mask", "float_keys", "num_to_prune"]


def float_keys(x: jax.Array) -> jax.Array:
    """Maps floats to ``uint32`` keys with the same order (``-inf < ... < -0 < +0 < ... < inf``).

    NaN sorts above ``+inf`` (a NaN score is kept).
    """
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    sign = jnp.uint32(0x80000000)
    return jnp.where(bits >= sign, ~bits, bits | sign)


def num_to_prune(sparsity: Any, n: int, *, what: str = "") -> jax.Array | int:
    """``round_half_even(sparsity * n)``: exact in Python for a static sparsity.

    A traced sparsity (e.g. from a schedule inside ``jit``) is clipped to ``[0, 1]`` and the count
    is rounded in float32.
    """
    if isinstance(sparsity, int | float | np.floating | np.integer):
        s = float(sparsity)
        if not 0.0 <= s <= 1.0 or math.isnan(s):
            raise ValueError(f"prune.topk_mask: sparsity must be in [0, 1], got {sparsity!r}{what}")
        return round(s * n)
    s = jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)
    return jnp.round(s * jnp.float32(n)).astype(jnp.int32)


def _count_le(keys: list[jax.Array], t: jax.Array) -> jax.Array:
    return sum(jnp.sum(k <= t, dtype=jnp.int32) for k in keys)


def _kth_key_bisect(keys: list[jax.Array], k) -> jax.Array:
    """Smallest ``t`` with ``#{key <= t} >= k`` over all ``keys`` (``k >= 1``): 32 count passes."""

    def step(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = _count_le(keys, mid) >= k
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo, hi = jnp.uint32(0), jnp.uint32(0xFFFFFFFF)
    _, hi = lax.fori_loop(0, 32, step, (lo, hi))
    return hi


def _kth_key_radix(keys: list[jax.Array], k) -> jax.Array:
    """Same as ``_kth_key_bisect`` by radix select: two 65536-bin histogram passes.

    Pass 1 counts the high 16 bits and finds the bucket holding the k-th key; pass 2 counts the
    low 16 bits of the keys in that bucket. The histograms are scatter-adds into a small
    replicated array, which XLA partitions into per-shard histograms and one all-reduce.
    """
    bins = 1 << 16

    def hist(index_of, weight_of):
        return sum(
            jnp.zeros(bins, jnp.int32).at[index_of(key)].add(weight_of(key), mode="drop")
            for key in keys
        )

    def pick(h, k):
        c = jnp.cumsum(h)
        b = jnp.sum(c < k, dtype=jnp.int32)  # first bucket whose cumulative count reaches k
        return b, c[b] - h[b]  # the bucket and the count below it

    high = lambda key: (key >> 16).astype(jnp.int32)  # noqa: E731
    low = lambda key: (key & jnp.uint32(0xFFFF)).astype(jnp.int32)  # noqa: E731
    b1, below = pick(hist(high, lambda key: jnp.int32(1)), k)
    b2, _ = pick(hist(low, lambda key: (high(key) == b1).astype(jnp.int32)), k - below)
    return (b1.astype(jnp.uint32) << 16) | b2.astype(jnp.uint32)


def _explicitly_sharded(x: jax.Array) -> bool:
    try:
        return any(s is not None for s in jax.typeof(x).sharding.spec)
    except AttributeError:
        return False


def _kth_key(keys: list[jax.Array], k) -> jax.Array:
    """Smallest ``t`` with ``#{key <= t} >= k`` over all arrays in ``keys`` (needs ``k >= 1``).

    Radix select by default; under a mesh with ``Explicit`` axes (where a scatter from a sharded
    array needs the mesh in context) the 32-pass bisection, which only sums.
    """
    if any(_explicitly_sharded(key) for key in keys):
        return _kth_key_bisect(keys, k)
    return _kth_key_radix(keys, k)


@jax.jit
def _lowest_k(keys: list[jax.Array], k) -> list[jax.Array]:
    """Marks the ``k`` lowest keys overall (ties by leaf order, then flat index)."""
    k = jnp.asarray(k, jnp.int32)
    t = _kth_key(keys, jnp.maximum(k, 1))
    lt = [key < t for key in keys]
    need = k - sum(jnp.sum(m, dtype=jnp.int32) for m in lt)  # entries equal to t still to prune
    out = []
    for key, below in zip(keys, lt, strict=True):
        eq = key == t
        n_eq = jnp.sum(eq, dtype=jnp.int32)
        take = jnp.clip(need, 0, n_eq)
        need = need - take

        def first(eq=eq, take=take):
            # The `take` equal entries with the lowest flat index, found by bisection on the index
            # (no cumsum: it would need the array unsharded along the scanned axis).
            flat = _flat_index(eq.shape)

            def step(_, lohi):
                lo, hi = lohi
                mid = lo + (hi - lo) // 2
                ok = jnp.sum(eq & (flat < mid), dtype=jnp.int32) >= take
                return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

            bits = max(1, int(np.ceil(np.log2(eq.size + 1))))
            _, cut = lax.fori_loop(0, bits, step, (jnp.int32(0), jnp.int32(eq.size)))
            return eq & (flat < cut)

        ties = lax.cond(take >= n_eq, lambda eq=eq: eq, first)
        out.append((below | (ties & (take > 0))) & (k > 0))
    return out


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major flat index of every entry, built from iotas (no reshape of a sharded array)."""
    flat = jnp.zeros(shape, jnp.int32)
    stride = 1
    for ax in reversed(range(len(shape))):
        flat = flat + lax.broadcasted_iota(jnp.int32, shape, ax) * stride
        stride *= shape[ax]
    return flat


def _check_leaf(path: str, leaf, structure: Structure, fn: str) -> None:
    if not isinstance(structure, Structure):
        raise TypeError(
            f"{fn}: structure must be Unstructured(), Channels(), NM() or Blocks(), "
            f"got {structure!r}"
        )
    structure.check(leaf.shape, path, fn)


def topk_mask(
    scores: optax.Params,
    sparsity: Any,
    *,
    structure: Structure = Unstructured(),
    scope: str = "layer",
    where: _tree.Where = None,
) -> optax.Params:
    """Mask tree that prunes the lowest-scoring groups.

    For each selected leaf (``where``, default: float leaves with ``ndim >= 2``) the scores are
    grouped by ``structure`` (``Channels`` / ``Blocks``: the ``ord``-norm of each group) and
    ``k = round_half_even(sparsity * n)`` of the ``n`` groups with the lowest scores are pruned:

    * ``scope="layer"``: ``n`` is the number of groups in that leaf (torch ``l1_unstructured``,
      ``ln_structured``);
    * ``scope="global"``: ``n`` is the number of groups over all selected leaves, ranked together
      on raw scores (torch ``global_unstructured``).

    ``NM(n, m)`` is a fixed local pattern: every selected leaf keeps the ``n`` best of each run of
    ``m`` whenever ``sparsity > 0`` (the ``sparsity`` value itself is not used).

    Args:
      scores: a tree of float arrays (e.g. ``magnitude(params)``); ``None`` leaves are skipped.
      sparsity: fraction in ``[0, 1]`` to prune; a Python float or a traced scalar.
      structure: ``Unstructured()``, ``Channels(axis, ord)``, ``NM(n, m, axis)``, ``Blocks(shape)``.
      scope: ``"layer"`` or ``"global"``.
      where: which leaves to prune (see ``jaxslim._tree``).

    Returns:
      A tree of ``params``' structure with ``bool`` arrays (``True`` keeps) on selected leaves and
      ``None`` elsewhere.

    >>> import jax.numpy as jnp
    >>> from jaxslim.prune import magnitude
    >>> w = {"kernel": jnp.array([[0.1, -3.0], [2.0, 0.5]]), "bias": jnp.ones(2)}
    >>> m = topk_mask(magnitude(w), 0.5)
    >>> m["kernel"], m["bias"]
    (Array([[False,  True],
           [ True, False]], dtype=bool), None)
    """
    fn = "prune.topk_mask"
    if scope not in ("layer", "global"):
        raise ValueError(f"{fn}: scope must be 'layer' or 'global', got {scope!r}")
    paths = _tree.selected_paths(scores, where, fn_name=fn)
    leaves = dict(_tree.leaves_with_paths(scores))
    for path in paths:
        _check_leaf(path, leaves[path], structure, fn)

    if isinstance(structure, NM):
        if isinstance(sparsity, int | float | np.integer | np.floating):
            num_to_prune(sparsity, 1, what=f" for {paths}")  # validates the range
            active = float(sparsity) > 0

            def nm(path, s):
                return nm_mask(s, structure) if active else jnp.ones(s.shape, jnp.bool_)
        else:
            gate = jnp.asarray(sparsity) > 0

            def nm(path, s):
                return nm_mask(s, structure) | ~gate

        return _tree.map_selected(nm, scores, where=where, fn_name=fn, unselected=_none)

    groups = {p: structure.reduce(leaves[p]) for p in paths}
    keys = {p: float_keys(g) for p, g in groups.items()}
    if scope == "global":
        n = sum(int(np.prod(g.shape)) for g in groups.values())
        k = num_to_prune(sparsity, n, what=f" for leaves {paths}")
        pruned = dict(zip(paths, _lowest_k([keys[p] for p in paths], k), strict=True))
    else:
        pruned = {}
        for p in paths:
            k = num_to_prune(sparsity, int(np.prod(groups[p].shape)), what=f" for {p!r}")
            (pruned[p],) = _lowest_k([keys[p]], k)

    def expand(path, s):
        return _tree.match_sharding(structure.expand(~pruned[path], s.shape), s)

    return _tree.map_selected(expand, scores, where=where, fn_name=fn, unselected=_none)


def _none(*_):
    return None


def apply_mask(params: optax.Params, mask: optax.Params) -> optax.Params:
    """Zeros the pruned entries: ``where(mask, p, 0)`` on masked leaves; others pass through.

    ``mask`` is a tree from ``topk_mask`` (``None`` where nothing is masked). Raises ``ValueError``
    when the trees or a leaf's shape do not match.

    >>> import jax.numpy as jnp
    >>> apply_mask({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([True, False])})["w"]
    Array([1., 0.], dtype=float32)
    """
    fn = "prune.apply_mask"
    _tree.check_same_structure(params, mask, fn_name=fn)

    def one(path, p, m):
        if m is None:
            return p
        check_mask_leaf(fn, _tree.path_str(path), p, m)
        return jnp.where(m, p, jnp.zeros((), p.dtype))

    return jax.tree_util.tree_map_with_path(one, params, mask)


def check_mask_leaf(fn: str, path: str, p, m) -> None:
    """Raises ``ValueError`` unless ``m`` is a bool array with the shape of ``p``."""
    if jnp.shape(m) != jnp.shape(p) or jnp.result_type(m) != jnp.bool_:
        raise ValueError(
            f"{fn}: mask for {path!r} must be a bool array of shape {jnp.shape(p)}, got "
            f"{jnp.result_type(m)}{list(jnp.shape(m))}"
        )
