"""OWL layer-wise sparsities: fewer pruned weights where the Wanda scores have more outliers.

Yin et al., ICML 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for
Pruning LLMs to High Sparsity"; the formulas follow its released code (``luuyin/OWL``,
``prune_wanda_outlier`` and ``check_outlier_mean``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import _tree
from jaxslim._checks import fraction, number, public

_FN = "prune.owl"


@jax.jit
def _score_sum(w: jax.Array, sq: jax.Array) -> jax.Array:
    """``sum |W_kj| ||X_k||`` over a ``(L, K, N)`` kernel and ``(L, K)`` squared norms."""
    score = jnp.abs(w.astype(jnp.float32)) * jnp.sqrt(jnp.maximum(sq.astype(jnp.float32), 0.0))
    return jnp.sum(score)


@jax.jit
def _count_above(w: jax.Array, sq: jax.Array, threshold: jax.Array) -> jax.Array:
    score = jnp.abs(w.astype(jnp.float32)) * jnp.sqrt(jnp.maximum(sq.astype(jnp.float32), 0.0))
    return jnp.sum(score > threshold, dtype=jnp.int32)


def _view(path: str, w: Any, st: Any) -> tuple[jax.Array, jax.Array]:
    """The kernel as ``(L, K, N)`` (lead, contracted, output axes), its norms as ``(L, K, 1)``."""
    shape = tuple(w.shape)
    if tuple(st.shape) != shape:
        raise ValueError(
            f"{_FN}: stats for {path!r} are of a kernel of shape {tuple(st.shape)}, but params "
            f"holds shape {shape}; calibrate the same params"
        )
    lead, con = tuple(st.lead_axes), tuple(st.contracted_axes)
    out = [a for a in range(len(shape)) if a not in lead and a not in con]
    w3 = jnp.transpose(jnp.asarray(w), [*lead, *con, *out])
    n_lead = math.prod(shape[a] for a in lead)
    k = math.prod(shape[a] for a in con)
    w3 = w3.reshape(n_lead, k, math.prod(shape[a] for a in out))
    return w3, jnp.asarray(st.sq_norm).reshape(n_lead, k, 1)


def _block_of(blocks: Any) -> Callable[[str], Any]:
    if blocks is None:
        return lambda path: path
    if isinstance(blocks, str):
        try:
            pattern = re.compile(blocks)
        except re.error as e:
            raise ValueError(f"{_FN}: blocks={blocks!r} is not a valid regex ({e})") from None
        if pattern.groups != 1:
            raise ValueError(
                f"{_FN}: blocks={blocks!r} must have exactly one group (the block id, e.g. "
                rf"r'layers/(\d+)/'), it has {pattern.groups}"
            )

        def by_regex(path: str) -> Any:
            m = pattern.search(path)
            return path if m is None else ("block", m.group(1))

        return by_regex
    if callable(blocks):
        return blocks
    raise TypeError(
        f"{_FN}: blocks must be None, a regex with one group or a function path -> block id, "
        f"got {blocks!r}"
    )


@public("prune.owl")
def owl(
    params: Any,
    stats: Mapping[str, Any],
    sparsity: float,
    *,
    lam: float = 0.08,
    M: float = 5.0,  # noqa: N803 (the paper's name)
    blocks: str | Callable[[str], Any] | None = None,
    where: _tree.Where = None,
) -> dict[str, float]:
    """OWL per-kernel sparsities (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity").

    For each block ``b`` (by default every kernel is its own block; the paper uses one block per
    transformer layer, ``blocks=r"layers/(\\d+)/"``), with the Wanda score
    ``A_kj = |W_kj| ||X_k||_2`` over all entries of the block's kernels (each on its ``(K, N)``
    view, ``||X_k||^2 = stats[path].sq_norm``)::

        D_b = #{A > M * mean_b(A)} / n_b                       (outlier ratio, n_b = block size)
        r_b = (D_b - min D) / (max D - min D) * 2 * lam         (in [0, 2 lam]; 0 if all D equal)
        s_b = sparsity - (r_b - sum_b n_b r_b / N)              (N = sum_b n_b)

    and every kernel of block ``b`` gets ``s_b``: more outliers, lower sparsity. The released
    code subtracts the *unweighted* mean of ``r_b`` over layers (its layers all have the same
    size); here the mean is weighted by block size, so the size-weighted mean of the returned
    sparsities is exactly ``sparsity`` (the overall fraction pruned) whatever the sizes — the
    same numbers as the paper when the blocks have equal size. The paper's clamp of a negative
    ``s_b`` to 0.01 is replaced by an error that names the largest ``lam`` that fits.

    Args:
      params: the parameter tree ``stats`` was computed on.
      stats: ``calibrate.statistics(fn, params, batches)``: ``{path: Stats}``.
      sparsity: the target overall fraction pruned, in ``[0, 1)``.
      lam: the half-width ``lam >= 0`` of the sparsity spread (the paper's lambda, 0.08).
      M: the outlier threshold, a multiple ``> 0`` of the block's mean score (the paper's 5).
      blocks: ``None`` (each kernel alone), a regex with one group (its match is the block id; a
        kernel it does not match is a block of its own), or a function ``path -> block id``.
      where: which of ``stats``' kernels (``None``: all).

    Returns:
      ``{path: sparsity}`` for the selected kernels, in ``stats`` order: pass it as
      ``prune.oneshot``'s per-kernel sparsity. A stacked kernel (lead axes, e.g. a scanned
      layer axis) is one kernel.

    Raises ``ValueError`` naming ``prune.owl`` on a sparsity outside ``[0, 1)``, a negative or
    non-finite ``lam``, ``M <= 0``, a kernel missing from ``params`` or of another shape, a regex
    without exactly one group, and a ``lam`` that would push a block outside ``[0, 1)``.

    >>> import jax, jax.numpy as jnp
    >>> from jaxslim import calibrate
    >>> w = jax.random.normal(jax.random.key(0), (2, 16, 16))
    >>> params = {"a": w[0], "b": w[1].at[:4, :4].set(10.0)}  # "b" has 16 outliers
    >>> fn = lambda p, x: (x @ p["a"], x @ p["b"])
    >>> stats = calibrate.statistics(fn, params, [jnp.ones((4, 16))])
    >>> owl(params, stats, 0.5, lam=0.1, M=3)
    {'a': 0.6, 'b': 0.4}
    """
    s = fraction(_FN, sparsity)
    if s >= 1.0:
        raise ValueError(f"{_FN}: sparsity must be in [0, 1), got {sparsity!r}")
    lam = number(_FN, "lam", lam, positive=False)
    m = number(_FN, "M", M, positive=True)
    _tree.check_where(where)
    if not isinstance(stats, Mapping):
        raise TypeError(
            f"{_FN}: stats must be the dict calibrate.statistics returns, got {type(stats)}"
        )
    block_of = _block_of(blocks)
    leaves = dict(_tree.leaves_with_paths(params))
    views: dict[str, tuple[jax.Array, jax.Array]] = {}
    for path, st in stats.items():
        if path not in leaves:
            raise ValueError(f"{_FN}: stats name {path!r}, which is not a leaf of params")
        leaf = leaves[path]
        if where is not None and not _tree.is_selected(where, path, leaf):
            continue
        if not hasattr(st, "sq_norm"):
            raise TypeError(f"{_FN}: stats[{path!r}] is not a calibrate.Stats, got {type(st)}")
        views[path] = _view(path, leaf, st)
    if not views:
        raise ValueError(
            f"{_FN}: no kernel selected (stats has {list(stats)[:8]}, where={where!r})"
        )

    members: dict[Any, list[str]] = {}
    for path in views:
        members.setdefault(block_of(path), []).append(path)
    size = {b: sum(math.prod(views[p][0].shape) for p in ps) for b, ps in members.items()}
    ratio = {}
    for b, ps in members.items():
        total = sum(float(_score_sum(*views[p])) for p in ps)
        threshold = jnp.float32(m * total / size[b]) if size[b] else jnp.float32(0.0)
        count = sum(int(_count_above(*views[p], threshold)) for p in ps)
        ratio[b] = count / size[b] if size[b] else 0.0
    d = np.array(list(ratio.values()), np.float64)
    n = np.array([size[b] for b in ratio], np.float64)
    spread = d.max() - d.min()
    u = (d - d.min()) / spread if spread > 0 else np.zeros_like(d)
    c = 2.0 * ((u @ n) / n.sum() - u)  # s_b = s + lam * c_b
    per_block = s + lam * c
    bad = [i for i, v in enumerate(per_block) if not 0.0 <= v < 1.0]
    if bad:
        i = bad[0]
        limits = [s / -ci for ci in c if ci < 0] + [(1.0 - s) / ci for ci in c if ci > 0]
        b = list(ratio)[i]
        raise ValueError(
            f"{_FN}: lam={lam!r} gives block {b!r} (kernels {members[b]}) the sparsity "
            f"{per_block[i]:.4f}, outside [0, 1); use lam < {min(limits):.4f} for sparsity={s}"
        )
    by_block = dict(zip(ratio, per_block.tolist(), strict=True))
    return {p: by_block[block_of(p)] for p in views}
