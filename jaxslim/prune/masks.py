"""Masks from scores: ``topk_mask`` and ``apply_mask``.

Counting rule (the same as ``torch.nn.utils.prune``): ``sparsity=s`` over ``n`` candidates prunes
``k = round_half_even(s * n)`` of them, lowest scores first; equal scores are pruned in order of
their flat (row-major) index, lowest first, and across leaves in ``jax.tree`` order.

The k-th smallest score is found without sorting: scores are mapped to ``uint32`` keys whose
integer order is the float order, and a radix select builds two 65536-bin histograms (high, then
low 16 bits). Histograms and counts are reductions, so XLA runs them shard by shard on sharded
parameters, and the global threshold over all layers never concatenates or gathers them. Under
a mesh with ``Explicit`` axes a 32-step bisection on counts is used instead.

Non-finite scores have a fixed rank (``structures.float_keys``): a NaN score ranks lowest and is
pruned first, ``+inf`` ranks highest; a ``Channels``/``Blocks`` group holding a NaN has a NaN norm
and is pruned first. This holds for every structure and both scopes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxslim import _tree
from jaxslim.schedules import _scalar
from jaxslim.structures import NM, Blocks, Channels, Structure, Unstructured, float_keys, nm_mask

__all__ = ["topk_mask", "apply_mask", "float_keys", "num_to_prune"]

_FN = "prune.topk_mask"


def check_sparsity(sparsity: Any, *, fn: str = _FN, what: str = "") -> float | None:
    """The concrete sparsity as a float (raises outside ``[0, 1]``), ``None`` when traced.

    Python numbers, NumPy scalars and 0-d arrays and 0-d ``jax.Array`` outside ``jit`` are
    concrete and checked; ``bool``, strings and arrays of more than one entry raise ``TypeError``.
    """
    s = _scalar(fn, "sparsity", sparsity)
    if s is not None and not 0.0 <= s <= 1.0:  # NaN fails too
        raise ValueError(f"{fn}: sparsity must be in [0, 1], got {sparsity!r}{what}")
    return s


def num_to_prune(sparsity: Any, n: int, *, what: str = "") -> jax.Array | int:
    """``round_half_even(sparsity * n)``: exact in Python for a concrete sparsity.

    A concrete sparsity outside ``[0, 1]`` raises ``ValueError``. A traced sparsity (e.g. from a
    schedule inside ``jit``) cannot be checked: it is clipped to ``[0, 1]``, a NaN counts as ``0``
    (nothing pruned), and the count is rounded in float32.
    """
    s = check_sparsity(sparsity, what=what)
    if s is not None:
        return round(s * n)
    s = jnp.asarray(sparsity, jnp.float32)
    s = jnp.where(jnp.isnan(s), jnp.float32(0), jnp.clip(s, 0.0, 1.0))
    return jnp.round(s * jnp.float32(n)).astype(jnp.int32)


def check_where(fn: str, where: Any) -> None:
    """Raises ``TypeError``/``ValueError`` naming ``fn`` for a ``where=`` of the wrong kind."""
    _tree.check_where(where, fn_name=fn)


def check_structure(fn: str, structure: Any) -> None:
    """Raises ``TypeError`` naming ``fn`` unless ``structure`` is a ``Structure`` instance."""
    if not isinstance(structure, Structure):
        hint = ""
        if isinstance(structure, type) and issubclass(structure, Structure):
            hint = f" (a class: write {structure.__name__}())"
        raise TypeError(
            f"{fn}: structure must be one of {Unstructured.__name__}(), {Channels.__name__}("
            f"axis=...), {NM.__name__}(n, m), {Blocks.__name__}(shape), got {structure!r}{hint}"
        )


def check_leaf_structure(fn: str, structure: Structure, path: str, shape) -> None:
    """``structure.check`` with errors prefixed by ``fn``."""
    try:
        structure.check(tuple(shape), path)
    except ValueError as e:
        raise ValueError(f"{fn}: {e}") from None


def _count_le(keys: list[jax.Array], t: jax.Array) -> jax.Array:
    return sum(jnp.sum(k <= t, dtype=jnp.int32) for k in keys)


def _select_bisect(keys: list[jax.Array], k):
    """``(t, #{key < t}, [#{key_i == t}])`` for the smallest ``t`` with ``#{key <= t} >= k``.

    32 bisection steps, each one count (a sum) over all keys; needs ``k >= 1``.
    """

    def step(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = _count_le(keys, mid) >= k
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    _, t = lax.fori_loop(0, 32, step, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
    n_lt = sum(jnp.sum(key < t, dtype=jnp.int32) for key in keys)
    return t, n_lt, [jnp.sum(key == t, dtype=jnp.int32) for key in keys]


def _select_radix(keys: list[jax.Array], k):
    """Same as ``_select_bisect`` by radix select: two 65536-bin histogram passes.

    Pass 1 counts the high 16 bits and finds the bucket holding the k-th key; pass 2 counts, per
    leaf, the low 16 bits of the keys in that bucket, which also gives each leaf's count of keys
    equal to the threshold. The histograms are scatter-adds into a small replicated array, which
    XLA partitions into per-shard histograms and one all-reduce.
    """
    bins = 1 << 16

    def hist(key, index, weight):
        return jnp.zeros(bins, jnp.int32).at[index].add(weight, mode="drop")

    def pick(h, k):
        c = jnp.cumsum(h)
        b = jnp.sum(c < k, dtype=jnp.int32)  # first bucket whose cumulative count reaches k
        return b, c[b] - h[b]  # the bucket and the count below it

    high = [(key >> 16).astype(jnp.int32) for key in keys]
    b1, below1 = pick(sum(hist(key, h, jnp.int32(1)) for key, h in zip(keys, high, strict=True)), k)
    h2 = [
        hist(key, (key & jnp.uint32(0xFFFF)).astype(jnp.int32), (h == b1).astype(jnp.int32))
        for key, h in zip(keys, high, strict=True)
    ]
    b2, below2 = pick(sum(h2), k - below1)
    t = (b1.astype(jnp.uint32) << 16) | b2.astype(jnp.uint32)
    return t, below1 + below2, [h[b2] for h in h2]


def _explicitly_sharded(x: jax.Array) -> bool:
    try:
        return any(s is not None for s in jax.typeof(x).sharding.spec)
    except AttributeError:
        return False


@jax.jit
def _lowest_k(keys: list[jax.Array], k) -> list[jax.Array]:
    """Marks the ``k`` lowest keys overall (ties by leaf order, then flat index).

    The threshold comes from a radix select; under a mesh with ``Explicit`` axes (where a scatter
    from a sharded array needs the mesh in context) from a 32-pass bisection, which only sums.
    The mask itself is one elementwise pass per leaf.
    """
    k = jnp.asarray(k, jnp.int32)
    select = _select_bisect if any(map(_explicitly_sharded, keys)) else _select_radix
    t, n_lt, n_eqs = select(keys, jnp.maximum(k, 1))
    need = k - n_lt  # entries equal to t still to prune, taken in leaf order
    out = []
    for key, n_eq in zip(keys, n_eqs, strict=True):
        take = jnp.clip(need, 0, n_eq)
        need = need - take

        def some_ties(key=key, take=take):
            # the `take` equal entries with the lowest flat index: bisection on the index for the
            # cut (no cumsum: it would need the array unsharded along the scanned axis)
            flat = _flat_index(key.shape)

            def step(_, lohi):
                lo, hi = lohi
                mid = lo + (hi - lo) // 2
                ok = jnp.sum((key == t) & (flat < mid), dtype=jnp.int32) >= take
                return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

            bits = max(1, int(np.ceil(np.log2(key.size + 1))))
            cut = lax.fori_loop(0, bits, step, (jnp.int32(0), jnp.int32(key.size)))[1]
            return (key < t) | ((key == t) & (flat < cut))

        # The common cases need no index: all or none of the entries equal to t are pruned.
        case = jnp.where(take >= n_eq, 0, jnp.where(take == 0, 1, 2))
        pruned = lax.switch(case, [lambda key=key: key <= t, lambda key=key: key < t, some_ties])
        out.append(pruned & (k > 0))
    return out


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major flat index of every entry, built from iotas (no reshape of a sharded array)."""
    flat = jnp.zeros(shape, jnp.int32)
    stride = 1
    for ax in reversed(range(len(shape))):
        flat = flat + lax.broadcasted_iota(jnp.int32, shape, ax) * stride
        stride *= shape[ax]
    return flat


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
    ``m`` whenever ``sparsity > 0`` (the ``sparsity`` value itself is not used). Its default
    ``axis=-2`` assumes a Flax kernel (see ``NM``).

    Non-finite scores: NaN ranks lowest (pruned first), ``+inf`` highest; a group holding a NaN
    has a NaN norm and is pruned first. A NaN never costs a finite entry its place in an N:M run.

    Args:
      scores: a tree of float arrays (e.g. ``magnitude(params)``); ``None`` leaves are skipped.
      sparsity: fraction in ``[0, 1]`` to prune, or a per-leaf tree of fractions (``erk``,
        ``uniform``; ``scope="layer"`` only) with a number on every selected leaf. A concrete
        value (Python or NumPy number, 0-d array) is checked: outside ``[0, 1]`` or NaN raises
        ``ValueError``. A traced scalar cannot be checked: it is clipped to ``[0, 1]`` and a NaN
        prunes nothing.
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
    fn = _FN
    if scope not in ("layer", "global"):
        raise ValueError(f"{fn}: scope must be 'layer' or 'global', got {scope!r}")
    check_structure(fn, structure)
    check_where(fn, where)
    paths = _tree.selected_paths(scores, where, fn_name=fn)
    leaves = dict(_tree.leaves_with_paths(scores))
    for path in paths:
        check_leaf_structure(fn, structure, path, leaves[path].shape)

    per_leaf = _per_leaf_sparsity(fn, sparsity, scores, paths, scope)
    if per_leaf is not None:
        return _topk_per_leaf(scores, per_leaf, structure, where)

    if isinstance(structure, NM):
        concrete = check_sparsity(sparsity, what=f" for {paths}")
        if concrete is not None:
            active = concrete > 0

            def nm(path, s):
                return nm_mask(s, structure) if active else jnp.ones(s.shape, jnp.bool_)
        else:
            gate = jnp.asarray(sparsity) > 0  # NaN: False, keep everything

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


def _all(path, leaf) -> bool:
    return True


def is_sparsity_tree(sparsity: Any) -> bool:
    """Whether ``sparsity`` is a per-leaf tree (a dict, list, ...) rather than one number."""
    if sparsity is None:
        return False
    return not jax.tree_util.treedef_is_leaf(jax.tree.structure(sparsity))


def _per_leaf_sparsity(fn: str, sparsity: Any, scores, paths: list, scope: str) -> dict | None:
    """``{path: sparsity}`` for a per-leaf sparsity tree (e.g. from ``erk``), else ``None``."""
    if not is_sparsity_tree(sparsity):
        return None
    if scope != "layer":
        raise ValueError(f"{fn}: a per-leaf sparsity tree needs scope='layer', got {scope!r}")
    given = dict(_tree.leaves_with_paths(sparsity))
    out = {}
    for p in paths:
        if p not in given:
            raise ValueError(
                f"{fn}: the per-leaf sparsity tree has no value for {p!r} (it has "
                f"{sorted(given)[:8]}); build it with prune.erk or prune.uniform on the same tree"
            )
        check_sparsity(given[p], fn=fn, what=f" for {p!r}")
        out[p] = given[p]
    return out


def _topk_per_leaf(scores, per_leaf: dict, structure: Structure, where) -> Any:
    def one(path, s):
        return topk_mask({"x": s}, per_leaf[path], structure=structure, where=_all)["x"]

    return _tree.map_selected(one, scores, where=where, fn_name=_FN, unselected=_none)


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
    if not isinstance(m, jax.Array | np.ndarray | np.bool_) and not hasattr(m, "aval"):
        raise ValueError(
            f"{fn}: mask for {path!r} must be a bool array of shape {jnp.shape(p)} or None, got "
            f"{type(m).__name__} {m!r:.60}"
        )
    if jnp.shape(m) != jnp.shape(p) or jnp.result_type(m) != jnp.bool_:
        raise ValueError(
            f"{fn}: mask for {path!r} must be a bool array of shape {jnp.shape(p)}, got "
            f"{jnp.result_type(m)}{list(jnp.shape(m))}"
        )
