"""Masks from scores: ``topk_mask`` and ``apply_mask``.

Counting rule (the same as ``torch.nn.utils.prune``): ``sparsity=s`` over ``n`` candidates prunes
``k = round_half_even(s * n)`` of them, lowest scores first; equal scores are pruned in order of
their flat (row-major) index, lowest first, and across leaves in ``jax.tree`` order.

The k-th smallest score is found without a global sort: scores are mapped to ``uint32`` keys
whose integer order is the float order. From ``_SAMPLE_FROM`` keys on, the quantiles of a small
strided sample bracket the k-th key; one scatter pass counts the keys below the bracket and
histograms those inside it (a second pass only when the bracket spans more distinct keys than
the histogram has bins). Only when the bracket missed does the exact radix select (two
65536-bin histograms, high then low 16 bits) run, inside a ``lax.cond``. Histograms and counts
are reductions, so XLA runs them shard by shard on sharded parameters, and the global threshold
over all layers never concatenates or gathers them (only the sample is gathered). Under a mesh
with ``Explicit`` axes a 32-step bisection on counts is used instead.

Non-finite scores have a fixed rank (``structures.float_keys``): a NaN score ranks lowest and is
pruned first, ``+inf`` ranks highest; a ``Channels``/``Blocks`` group holding a NaN has a NaN norm
and is pruned first. This holds for every structure and both scopes.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxslim import _tree
from jaxslim._checks import public, scalar
from jaxslim.structures import NM, Blocks, Channels, Structure, Unstructured, float_keys, nm_mask

_FN = "prune.topk_mask"


def check_sparsity(sparsity: Any, *, fn: str = _FN, what: str = "") -> float | None:
    """The concrete sparsity as a float (raises outside ``[0, 1]``), ``None`` when traced.

    Python numbers, NumPy scalars and 0-d arrays and 0-d ``jax.Array`` outside ``jit`` are
    concrete and checked; ``bool``, strings and arrays of more than one entry raise ``TypeError``.
    """
    s = scalar(fn, "sparsity", sparsity)
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
    _tree.check_where(where)


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


def explicitly_sharded(x: jax.Array) -> bool:
    try:
        return any(s is not None for s in jax.typeof(x).sharding.spec)
    except AttributeError:
        return False


# Sample-bracket selection (``_select_sampled``) is used from this many keys on; below it the
# radix select's two fixed passes over a few thousand keys cost less than sampling and sorting.
_SAMPLE_FROM = 1 << 17
_SAMPLE = 1 << 16  # keys in the strided sample
_BINS = 1 << 19  # histogram bins of the exact work inside the bracket


def _sample(key: jax.Array, rate: int) -> jax.Array:
    """About ``key.size / rate`` entries of ``key`` on a strided grid (one stride per axis)."""
    strides, left = [], float(rate)
    for ax, d in enumerate(key.shape):
        s = max(1, min(d, round(left ** (1 / (key.ndim - ax)))))
        strides.append(s)
        left = max(1.0, left / s)
    return lax.slice(key, (0,) * key.ndim, key.shape, tuple(strides)).ravel()


def _hist_in(keys: list[jax.Array], base, top, shift, bins: int, *, below: bool) -> jax.Array:
    """Histogram of ``(key - base) >> shift`` over the keys in ``[base, top]``, others dropped.

    With ``below=True`` bin 0 counts the keys under ``base`` and the range starts at bin 1: the
    count below comes with the histogram, in the same pass. A scatter-add into a small replicated
    array, which XLA partitions into per-shard histograms and one all-reduce.
    """
    h = jnp.zeros(bins, jnp.int32)
    first = int(below)
    for key in keys:
        i = jnp.where(key <= top, ((key - base) >> shift).astype(jnp.int32) + first, bins)
        i = jnp.where(key < base, 0 if below else bins, i)
        h = h.at[i].add(jnp.int32(1), mode="drop")
    return h


def _pick(h: jax.Array, r):
    """The bin holding the ``r``-th (1-based) counted key, and the count below that bin."""
    c = jnp.cumsum(h)
    b = jnp.minimum(jnp.sum(c < r, dtype=jnp.int32), h.size - 1)
    return b, c[b] - h[b]


def _select_sampled(keys: list[jax.Array], k, *, sample: int, margin: float = 4.0):
    """``(t, #{key < t}, #{key == t}, hit)``: the k-th smallest key by a sample bracket.

    1. A strided sample of about ``sample`` keys is sorted; its ranks ``k m / n -+ margin *
       sqrt(m p (1 - p))`` give a bracket ``[lo, hi]`` that holds the k-th key with high
       probability.
    2. One pass (a scatter-add) counts the keys below ``lo`` and histograms the keys inside
       ``[lo, hi]`` into ``_BINS`` bins of ``2**shift`` keys each (``shift`` just large enough
       to cover ``hi - lo``; 0 for typical weights, whose bracket spans fewer distinct keys).
    3. Only if the bins are wider than one key, a second pass histograms the chosen bin's keys.

    ``hit`` is ``False`` when the bracket missed the k-th key (the result is then meaningless and
    the caller falls back to the exact radix select). Needs ``k >= 1``. Only reductions and
    scatter-adds into a replicated histogram: nothing is gathered but the small sample.
    """
    n = sum(key.size for key in keys)
    rate = max(1, n // sample)
    s = jnp.sort(jnp.concatenate([_sample(key, rate) for key in keys]))
    m = s.shape[0]
    p = k.astype(jnp.float32) / jnp.float32(n)
    pos = p * m
    half = margin * jnp.sqrt(m * p * (1 - p)) + 2
    ilo = jnp.floor(pos - half).astype(jnp.int32) - 1
    ihi = jnp.ceil(pos + half).astype(jnp.int32)
    lo = jnp.where(ilo >= 0, s[jnp.clip(ilo, 0, m - 1)], jnp.uint32(0))
    hi = jnp.where(ihi < m, s[jnp.clip(ihi, 0, m - 1)], jnp.uint32(0xFFFFFFFF))
    width = hi - lo
    shifts = jnp.arange(32, dtype=jnp.uint32)
    shift = jnp.sum((width >> shifts) >= _BINS, dtype=jnp.int32).astype(jnp.uint32)

    h = _hist_in(keys, lo, hi, shift, _BINS + 1, below=True)
    c_lo, h = h[0], h[1:]
    r = k - c_lo
    hit = (r >= 1) & (r <= jnp.sum(h))
    b, below = _pick(h, r)
    base = lo + (b.astype(jnp.uint32) << shift)

    def refine():  # the chosen bin holds 2**shift keys: histogram them one key per bin
        top = base + jnp.minimum((jnp.uint32(1) << shift) - 1, hi - base)
        h2 = _hist_in(keys, base, top, jnp.uint32(0), _BINS, below=False)
        b2, below2 = _pick(h2, r - below)
        return base + b2.astype(jnp.uint32), below + below2, h2[b2]

    t, below, n_eq = lax.cond(shift > 0, refine, lambda: (base, below, h[b]))
    return t, c_lo + below, n_eq, hit


def _select_exact(keys: list[jax.Array], k):
    """``(t, #{key < t}, #{key == t})`` by radix select, or bisection under ``Explicit`` axes."""
    select = _select_bisect if any(map(explicitly_sharded, keys)) else _select_radix
    t, n_lt, n_eqs = select(keys, k)
    return t, n_lt, sum(n_eqs)


@functools.partial(jax.jit, static_argnames=("sample", "margin", "exact"))
def lowest_k(
    keys: list[jax.Array], k, *, sample: int | None = None, margin: float = 4.0, exact=False
) -> list[jax.Array]:
    """Marks the ``k`` lowest keys overall (ties by leaf order, then flat index).

    The threshold ``t`` (the k-th smallest key) comes from a sample bracket (``_select_sampled``)
    when there are at least ``_SAMPLE_FROM`` keys, with the exact radix select inside a
    ``lax.cond`` if the bracket missed; from the radix select alone for fewer keys; and under a
    mesh with ``Explicit`` axes (where a scatter from a sharded array needs the mesh in context)
    from a 32-pass bisection, which only sums. ``sample`` forces the sampled path with that sample
    size and ``exact=True`` the exact one (the reference in tests and benchmarks). The mask itself
    is one elementwise pass per leaf.
    """
    k = jnp.asarray(k, jnp.int32)
    k1 = jnp.maximum(k, 1)
    n = sum(key.size for key in keys)
    explicit = any(map(explicitly_sharded, keys))
    if sample is None and n >= _SAMPLE_FROM:
        sample = _SAMPLE
    if explicit or exact or sample is None:
        t, n_lt, n_eq = _select_exact(keys, k1)
    else:
        t, n_lt, n_eq, hit = _select_sampled(keys, k1, sample=sample, margin=margin)
        t, n_lt, n_eq = lax.cond(hit, lambda: (t, n_lt, n_eq), lambda: _select_exact(keys, k1))
    return _mark(keys, k, t, n_lt, n_eq)


def _mark(keys: list[jax.Array], k, t, n_lt, n_eq) -> list[jax.Array]:
    """Pruned masks: every key below ``t``, and the first ``k - n_lt`` keys equal to ``t``."""
    need = k - n_lt  # entries equal to t still to prune, taken in leaf order

    def leaf_by_leaf():  # some but not all of the entries equal to t: count them per leaf
        left, cases, takes = need, [], []
        for key in keys:
            n_eq_i = jnp.sum(key == t, dtype=jnp.int32)
            take = jnp.clip(left, 0, n_eq_i)
            left = left - take
            cases.append(jnp.where(take >= n_eq_i, 0, jnp.where(take == 0, 1, 2)))
            takes.append(take)
        return cases, takes

    def all_or_none():  # the common cases need no per-leaf count and no index
        case = jnp.where(need > 0, 0, 1)
        return [case] * len(keys), [jnp.int32(0)] * len(keys)

    cases, takes = lax.cond((need > 0) & (need < n_eq), leaf_by_leaf, all_or_none)
    out = []
    for key, case, take in zip(keys, cases, takes, strict=True):

        def some_ties(key=key, take=take):
            # the `take` equal entries with the lowest flat index: bisection on the index for the
            # cut (no cumsum: it would need the array unsharded along the scanned axis)
            flat = flat_index(key.shape)

            def step(_, lohi):
                lo, hi = lohi
                mid = lo + (hi - lo) // 2
                ok = jnp.sum((key == t) & (flat < mid), dtype=jnp.int32) >= take
                return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

            bits = max(1, int(np.ceil(np.log2(key.size + 1))))
            cut = lax.fori_loop(0, bits, step, (jnp.int32(0), jnp.int32(key.size)))[1]
            return (key < t) | ((key == t) & (flat < cut))

        pruned = lax.switch(case, [lambda key=key: key <= t, lambda key=key: key < t, some_ties])
        out.append(pruned & (k > 0))
    return out


def flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major flat index of every entry, built from iotas (no reshape of a sharded array)."""
    flat = jnp.zeros(shape, jnp.int32)
    stride = 1
    for ax in reversed(range(len(shape))):
        flat = flat + lax.broadcasted_iota(jnp.int32, shape, ax) * stride
        stride *= shape[ax]
    return flat


@public("prune.topk_mask")
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
    Called eagerly on scores that hold NaN, it also warns (``RuntimeWarning``) naming the leaf and
    the count: a NaN weight is usually an upstream bug. Under ``jit`` the rule applies silently.

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
    paths = _tree.selected_paths(scores, where)
    leaves = dict(_tree.leaves_with_paths(scores))
    for path in paths:
        check_leaf_structure(fn, structure, path, leaves[path].shape)
        warn_nan(fn, path, leaves[path])

    per_leaf = per_leaf_sparsity(fn, sparsity, scores, paths, scope)
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

        return _tree.map_selected(nm, scores, where=where, unselected=_none)

    groups = {p: structure.reduce(leaves[p]) for p in paths}
    keys = {p: float_keys(g) for p, g in groups.items()}
    if scope == "global":
        n = sum(int(np.prod(g.shape)) for g in groups.values())
        k = num_to_prune(sparsity, n, what=f" for leaves {paths}")
        pruned = dict(zip(paths, lowest_k([keys[p] for p in paths], k), strict=True))
    else:
        pruned = {}
        for p in paths:
            k = num_to_prune(sparsity, int(np.prod(groups[p].shape)), what=f" for {p!r}")
            (pruned[p],) = lowest_k([keys[p]], k)

    def expand(path, s):
        return _tree.match_sharding(structure.expand(~pruned[path], s.shape), s)

    return _tree.map_selected(expand, scores, where=where, unselected=_none)


def _none(*_):
    return None


def warn_nan(fn: str, path: str, scores: Any) -> None:
    """Warns (``RuntimeWarning``) when concrete ``scores`` hold NaN: they rank lowest and are
    pruned first, and a NaN weight is usually an upstream bug the user must hear about. Traced
    scores (under ``jit``) are not inspected: the documented ranking applies silently."""
    if isinstance(scores, jax.core.Tracer) or not jnp.issubdtype(scores.dtype, jnp.floating):
        return
    with jax.ensure_compile_time_eval():  # a concrete array closed over by a jit is checked too
        n = int(jnp.count_nonzero(jnp.isnan(scores)))
    if n:
        warnings.warn(
            f"{fn}: {n} of the {scores.size} scores of {path!r} are NaN (a NaN weight?); they "
            "rank lowest and are pruned first. Check the step that produced them.",
            RuntimeWarning,
            stacklevel=3,
        )


def _all(path, leaf) -> bool:
    return True


def is_sparsity_tree(sparsity: Any) -> bool:
    """Whether ``sparsity`` is a per-leaf tree (a dict, list, ...) rather than one number."""
    if sparsity is None:
        return False
    return not jax.tree_util.treedef_is_leaf(jax.tree.structure(sparsity))


def per_leaf_sparsity(fn: str, sparsity: Any, scores, paths: list, scope: str) -> dict | None:
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

    return _tree.map_selected(one, scores, where=where, unselected=_none)


@public("prune.apply_mask")
def apply_mask(params: optax.Params, mask: optax.Params) -> optax.Params:
    """Zeros the pruned entries: ``where(mask, p, 0)`` on masked leaves; others pass through.

    ``mask`` is a tree from ``topk_mask`` (``None`` where nothing is masked). Raises ``ValueError``
    when the trees or a leaf's shape do not match.

    >>> import jax.numpy as jnp
    >>> apply_mask({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([True, False])})["w"]
    Array([1., 0.], dtype=float32)
    """
    fn = "prune.apply_mask"
    _tree.check_same_structure(params, mask)

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
