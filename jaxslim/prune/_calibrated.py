"""One-shot pruning from calibration statistics: ``wanda`` and ``sparsegpt``.

Both work on Flax kernels: Dense ``(in, out)``, Conv ``(*spatial, in, out)`` seen as a ``(K, N)``
matrix with ``K = prod(shape[:-1])`` input features (the conv's input patches, in the kernel's
flattened order) and ``N`` outputs. A layer computes ``y = x W``.

* Wanda (Sun, Liu, Bair and Kolter, "A Simple and Effective Pruning Approach for Large Language
  Models", ICLR 2024): score ``S_kj = |W_kj| * ||X_k||_2``; every output ``j`` prunes its own
  lowest-scoring inputs. No weight update.
* SparseGPT (Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
  in One-Shot", ICML 2023, Algorithm 1): OBS mask selection ``w^2 / [U]_kk^2`` (``U`` the upper
  Cholesky factor of the damped inverse Hessian) per block of inputs, OBS weight reconstruction of
  the inputs not yet visited, lazy batch updates; optionally joint quantization.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxslim import _obs, _tree
from jaxslim._checks import caller, count_nonfinite, leaf_path, public
from jaxslim.structures import NM, Structure, Unstructured, float_keys, nm_mask

Quantizer = Callable[[jax.Array, jax.Array], jax.Array]


def _prune_count(sparsity: Any, n: int, fn: str, what: str) -> jax.Array:
    """``round_half_even(sparsity * n)`` as an int32 scalar; sparsity must lie in ``[0, 1)``.

    Exact (Python arithmetic) for a static sparsity; a traced one is clipped to ``[0, 1]`` and
    rounded in float32.
    """
    if isinstance(sparsity, int | float | np.integer | np.floating):
        s = float(sparsity)
        if not 0.0 <= s < 1.0:
            raise ValueError(
                f"{fn}: sparsity must be in [0, 1) (the fraction to prune), got {sparsity!r} "
                f"for {what}"
            )
        return jnp.int32(round(s * n))
    s = jnp.asarray(sparsity)
    if s.shape != () or not jnp.issubdtype(s.dtype, jnp.floating):
        raise ValueError(f"{fn}: sparsity must be a float scalar, got {s.dtype}{s.shape}")
    if _obs.is_concrete(s) and not 0.0 <= float(s) < 1.0:
        raise ValueError(f"{fn}: sparsity must be in [0, 1), got {float(s)!r} for {what}")
    s = jnp.clip(s.astype(jnp.float32), 0.0, 1.0)
    return jnp.round(s * jnp.float32(n)).astype(jnp.int32)


def _nm_gate(sparsity: Any, fn: str, what: str) -> jax.Array:
    """int32 1 when ``sparsity > 0`` (the N:M pattern applies), else 0; validates the range."""
    _prune_count(sparsity, 1, fn, what)
    return (jnp.asarray(sparsity) > 0).astype(jnp.int32)


def _check_structure(structure: Any, fn: str) -> None:
    if not isinstance(structure, Unstructured | NM):
        raise TypeError(
            f"{fn}: structure must be Unstructured() or NM(n, m) (along the input axis), got "
            f"{structure!r}; for channels use splice.prune_channels"
        )


def _check_shape(structure: Structure, shape: tuple[int, ...], path: str, fn: str) -> None:
    try:
        structure.check(tuple(shape), path)
    except ValueError as e:
        raise ValueError(f"{fn}: {e}") from None


def _lowest_per_column(score: jax.Array, count: jax.Array) -> jax.Array:
    """``(K, N)`` bool: the ``count`` lowest of each column; ties by row (= flat index) first.

    Sort-free (XLA's CPU sort is slow): the per-column threshold key is found by a 32-step
    bisection on order-preserving ``uint32`` keys, each step one count per column; ties at the
    threshold are taken in row order with a cumulative sum.
    """
    zero = jnp.zeros((), score.dtype)
    keys = float_keys(jnp.where(score == zero, zero, score))  # -0.0 and +0.0: one key
    need = jnp.maximum(count, 1)

    def step(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(keys <= mid[None, :], axis=0, dtype=jnp.int32) >= need
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    n = score.shape[1]
    lo, hi = jnp.zeros(n, jnp.uint32), jnp.full(n, 0xFFFFFFFF, jnp.uint32)
    t = lax.fori_loop(0, 32, step, (lo, hi))[1][None, :]
    below = keys < t
    n_below = jnp.sum(below, axis=0, dtype=jnp.int32)
    ties = keys == t
    pos = jnp.cumsum(ties, axis=0, dtype=jnp.int32)  # 1-based position among the ties
    return below | (ties & (pos <= (count - n_below)[None, :]))


def _lowest_flat(score: jax.Array, count: jax.Array) -> jax.Array:
    """``(B, N)`` bool: the ``count`` lowest entries of the whole array; ties by flat index."""
    return _lowest_per_column(score.reshape(-1, 1), count).reshape(score.shape)


# --------------------------------------------------------------------------------------- Wanda


@public("prune.wanda")
def wanda(
    params: optax.Params,
    stats: Mapping[str, Any],
    sparsity: Any,
    *,
    structure: Structure = Unstructured(),
    where: _tree.Where = None,
) -> optax.Params:
    """One-shot masks from the Wanda score ``|W_kj| * ||X_k||_2``, compared within each output.

    For a selected kernel ``W`` seen as ``(K, N)`` (Flax ``(in, out)``; a conv ``(*spatial, in,
    out)`` flattened over all but the last axis) and ``v_k = sum_samples x_k^2`` the squared norm
    of input feature ``k`` over the calibration data:

    * ``Unstructured()``: every output ``j`` prunes exactly ``round_half_even(sparsity * K)`` of
      its ``K`` inputs, lowest ``|W_kj| sqrt(v_k)`` first; ties break by flat index (lower input
      first).
    * ``NM(n, m)``: keeps the ``n`` best of every ``m`` consecutive inputs along the input axis
      (``structure.axis``, default ``-2``) whenever ``sparsity > 0`` (as ``prune.topk_mask``).

    Args:
      params: a pytree of kernels (any framework's).
      stats: ``{path: v}`` for every selected path (``"Dense_0/kernel"``, the names ``jax.tree``
        paths give, see ``jaxslim._tree``); ``v`` is the ``(in,)`` (or ``(K,)``, for a conv in
        patch order) vector of per-input squared norms, or an object with a ``sq_norm`` attribute
        holding it (``calibrate.statistics`` gives those). Any positive common scale of ``v``
        (a sum or a mean over samples) gives the same mask.
      sparsity: fraction of each output's inputs to prune, in ``[0, 1)``; a float or a traced
        scalar.
      structure: ``Unstructured()`` or ``NM(n, m)``.
      where: which leaves to prune (default: float kernels: matrices, and
        higher-rank leaves with two axes of size > 1).

    Returns:
      A mask tree of ``params``' structure: ``bool`` (``True`` keeps) on selected leaves, ``None``
      elsewhere. Feed it to ``prune.apply_mask`` and ``prune.keep_mask``.

    >>> import jax.numpy as jnp
    >>> w = {"kernel": jnp.array([[1.0, -1.0], [0.5, 2.0], [3.0, 0.1], [0.2, 1.0]])}
    >>> m = wanda(w, {"kernel": jnp.array([1.0, 16.0, 0.01, 4.0])}, 0.5)
    >>> m["kernel"].T.tolist()
    [[True, True, False, False], [False, True, False, True]]
    """
    fn = caller()
    _check_structure(structure, fn)
    if not isinstance(stats, Mapping):
        raise TypeError(
            f"{fn}: stats must be a mapping {{path: per-input squared norms}} (e.g. from "
            f"calibrate.statistics), got {type(stats).__name__}"
        )

    def one(path, w):
        _check_shape(structure, w.shape, path, fn)
        k = math.prod(w.shape[:-1])
        if isinstance(structure, NM):
            count = _nm_gate(sparsity, fn, repr(path))
        else:
            count = _prune_count(sparsity, k, fn, repr(path))
        if path not in stats:
            known = list(stats)[:8]
            raise ValueError(
                f"{fn}: no calibration statistics for {path!r} (stats has {known}"
                f"{' ...' if len(stats) > 8 else ''}); calibrate on batches that reach this "
                f"kernel or leave it out with where="
            )
        v = stats[path]
        v = jnp.asarray(getattr(v, "sq_norm", v))
        fan_in = w.shape[-2]
        if not jnp.issubdtype(v.dtype, jnp.floating) or v.shape not in ((fan_in,), (k,)):
            raise ValueError(
                f"{fn}: statistics for {path!r} must be a float vector of per-input squared "
                f"norms, shape ({fan_in},) or ({k},) for the kernel {tuple(w.shape)} (Flax "
                f"layout (in, out)), got {v.dtype}{v.shape}"
            )
        if _obs.is_concrete(v):
            a = np.asarray(v, np.float32)
            if not np.all(np.isfinite(a)) or np.any(a < 0):
                bad = int(np.argmax(~np.isfinite(a) | (a < 0)))
                raise ValueError(
                    f"{fn}: statistics for {path!r} must be finite and >= 0, got {a[bad]} at "
                    f"input {bad}; recompute them from finite calibration inputs"
                )
        return _wanda_leaf(w, v, count, structure)

    return _tree.map_selected(one, params, where=where, unselected=lambda *_: None)


@partial(jax.jit, static_argnames="structure")
def _wanda_leaf(w: jax.Array, v: jax.Array, count: jax.Array, structure: Structure) -> jax.Array:
    shape = w.shape
    norm = jnp.sqrt(v.astype(jnp.float32))
    if v.shape[0] == shape[-2] and len(shape) > 2:  # per channel: shared by all spatial taps
        norm = jnp.broadcast_to(norm, shape[:-1])
    norm = norm.reshape(shape[:-1])[..., None]
    score = jnp.abs(w.astype(jnp.float32)) * norm
    if isinstance(structure, NM):
        return nm_mask(score, structure) | (count == 0)
    k = math.prod(shape[:-1])
    return ~_lowest_per_column(score.reshape(k, shape[-1]), count).reshape(shape)


# ----------------------------------------------------------------------------------- SparseGPT


@public("prune.sparsegpt", leaf_kwarg=True)
def sparsegpt(
    w: jax.Array,
    hessian: jax.typing.ArrayLike,
    sparsity: Any,
    *,
    structure: Structure = Unstructured(),
    block_size: int = 128,
    damp: float = 0.01,
    quant: Quantizer | None = None,
    per_output: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Prunes one kernel with SparseGPT (Algorithm 1 of Frantar & Alistarh, 2023).

    ``W`` is seen as ``(K, N)`` (Flax ``(in, out)``; a conv ``(*spatial, in, out)`` flattened over
    all but the last axis) and ``U`` is the upper Cholesky factor of
    ``(H + damp mean(diag H) I)^-1`` (``jaxslim._obs``; inputs with ``H_kk = 0`` get weight 0).
    Inputs are visited in order, in blocks of ``B = min(block_size, K)``:

    1. mask selection, at the start of each block ``W[i:i+B]`` (already updated by the earlier
       blocks): prune the lowest ``W_kj^2 / U_kk^2``.

       * ``Unstructured()``, ``per_output=True`` (default): every output ``j`` prunes exactly
         ``round_half_even(sparsity * B)`` of the block's ``B`` inputs (ties: lower input first),
         so every output has exactly ``(K / B) * round_half_even(sparsity * B)`` zeros.
       * ``Unstructured()``, ``per_output=False``: the paper's and the reference code's choice,
         one comparison over the whole ``(B, N)`` block: ``round_half_even(sparsity * B * N)``
         entries per block, unevenly spread over outputs. (The reference code prunes every
         entry ``<=`` the threshold, one more than asked and more on ties; here the count is
         exact, ties by flat index.)
       * ``NM(n, m)``: at inputs ``k = 0, m, 2m, ...`` of the block, each output keeps the ``n``
         best of inputs ``k .. k+m-1`` (scored with the weights as updated so far), whenever
         ``sparsity > 0``.

    2. for each input ``k`` of the block: ``q = 0`` where pruned, else ``w_k`` (or
       ``quant(q, k)``); ``e = (w_k - q) / U_kk``; the block's later inputs take
       ``w_l -= U_kl e``. 3. after the block: ``W[i+B:] -= U[i:i+B, i+B:]^T E`` (lazy batch update).

    Args:
      w: float kernel, ``ndim >= 2`` (float32 or bfloat16; computed in float32, returned in
        ``w.dtype``).
      hessian: ``(K, K)`` ``X^T X`` of the kernel's inputs (any positive scale).
      sparsity: fraction to prune, in ``[0, 1)``; a float or a traced scalar.
      structure: ``Unstructured()`` or ``NM(n, m)`` along the input axis (``axis=-2``).
      block_size: inputs per block; ``min(block_size, K)`` must divide ``K`` and, for ``NM``,
        be a multiple of ``m``.
      damp: fraction of the mean Hessian diagonal added to the diagonal (the paper's 1 %).
      quant: optional ``quant(row, k) -> dequantized row`` applied to each input row ``(N,)`` (all
        outputs of input ``k``, pruned entries already 0) before its error is spread: the paper's
        joint sparsity + quantization (e.g. a per-output symmetric int4 grid whose scales were
        taken from the dense kernel). Must be traceable (``k`` is a traced int32). Pruned
        entries stay exactly 0 whatever it returns.
      per_output: see step 1.

    Returns:
      ``(w_new, mask)``: the reconstructed kernel (``w.shape``, ``w.dtype``; exact zeros where
      ``mask`` is False) and the bool mask (``True`` keeps).

    Eagerly, a non-finite Hessian or weight, or a Hessian that is not positive definite after
    damping, raises ``ValueError`` naming the kernel. Under ``jit`` (no values to check) a Hessian
    that is non-finite or not positive definite gives a kernel that is NaN in every entry and an
    all-True mask instead (never a partly wrong kernel).

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (256, 16))
    >>> w = jax.random.normal(jax.random.key(1), (16, 4))
    >>> w_new, mask = sparsegpt(w, x.T @ x, 0.5, block_size=8)
    >>> mask.sum(axis=0).tolist(), bool(jnp.all(w_new[~mask] == 0))
    ([8, 8, 8, 8], True)
    """
    path = leaf_path()
    fn = caller()
    _check_structure(structure, fn)
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating) or w.ndim < 2:
        raise ValueError(
            f"{fn}: expects a floating-point kernel with ndim >= 2 (Flax layout (in, out)), got "
            f"{w.dtype}{w.shape} for {path!r}"
        )
    k, n = math.prod(w.shape[:-1]), w.shape[-1]
    if isinstance(structure, NM):
        _check_shape(structure, w.shape, path, fn)
        if structure.axis % w.ndim != w.ndim - 2:
            raise ValueError(
                f"{fn}: NM must run along the input axis (axis=-2) of {path!r}, got "
                f"axis={structure.axis}"
            )
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{fn}: block_size must be a positive int, got {block_size!r}")
    b = min(block_size, k)
    if k % b:
        raise ValueError(
            f"{fn}: block_size {block_size} must divide the {k} input features of {path!r} "
            f"(shape {tuple(w.shape)}); pick a divisor of {k}"
        )
    if isinstance(structure, NM) and b % structure.m:
        raise ValueError(
            f"{fn}: block_size {b} must be a multiple of m={structure.m} for {structure!r} "
            f"on {path!r}"
        )
    if not isinstance(per_output, bool):
        raise TypeError(f"{fn}: per_output must be a bool, got {per_output!r}")
    if quant is not None and not callable(quant):
        raise TypeError(f"{fn}: quant must be None or a callable (row, k) -> row, got {quant!r}")
    if isinstance(structure, NM):
        count = _nm_gate(sparsity, fn, repr(path))
    else:
        count = _prune_count(sparsity, b * n if not per_output else b, fn, repr(path))
    if _obs.is_concrete(w) and count_nonfinite(w):
        raise ValueError(f"{fn}: kernel {path!r} has non-finite entries; cannot prune it")
    if jnp.shape(hessian) != (k, k):
        raise ValueError(
            f"{fn}: hessian of {path!r} must have shape ({k}, {k}) (X^T X of the kernel's {k} "
            f"input features, Flax layout (in, out)), got {jnp.shape(hessian)}"
        )
    m, dead, ok = _obs.obs_cholesky(hessian, damp, path=path, fn=fn)
    w_new, mask = _sparsegpt(w, m, dead, ok, count, structure, b, quant, per_output)
    if _obs.is_concrete(w_new) and count_nonfinite(w_new):
        raise ValueError(
            f"{fn}: the reconstruction of {path!r} is not finite (quant={quant!r} returned "
            f"non-finite values); fix the quantizer"
        )
    return w_new, mask


@partial(jax.jit, static_argnames=("structure", "b", "quant", "per_output"))
def _sparsegpt(w, m, dead, ok, count, structure, b, quant, per_output):
    shape = w.shape
    k, n = math.prod(shape[:-1]), shape[-1]
    w2 = jnp.where(dead[:, None], jnp.float32(0), w.reshape(k, n).astype(jnp.float32))
    nm = isinstance(structure, NM)
    zero = jnp.float32(0)

    def process_block(i1, wb, ub, mask):
        d2 = jnp.square(jnp.diagonal(ub))[:, None]
        if nm:
            pruned = jnp.zeros((b, n), jnp.bool_)
        elif per_output:
            pruned = _lowest_per_column(jnp.square(wb) / d2, count)
        else:
            pruned = _lowest_flat(jnp.square(wb) / d2, count)

        def row(j, c):
            wb, qb, eb, pruned = c
            if nm:  # choose the pattern of inputs j .. j+m-1 from the weights as they are now
                m = structure.m
                rows = lax.dynamic_slice_in_dim(wb, j, m)
                score = jnp.square(rows) / lax.dynamic_slice_in_dim(d2, j, m)
                cand = ~nm_mask(score, NM(structure.n, m, axis=0)) & (count > 0)
                pruned = jnp.where(j % m == 0, lax.dynamic_update_slice_in_dim(pruned, cand, j, 0),
                                   pruned)  # fmt: skip
            q = jnp.where(pruned[j], zero, wb[j])
            if quant is not None:
                qv = jnp.asarray(quant(q, i1 + j), jnp.float32)
                q = jnp.where(pruned[j], zero, qv)
            wb, e = _obs.obs_row_update(wb, ub, j, q)
            return wb, qb.at[j].set(q), eb.at[j].set(e), pruned

        zeros = jnp.zeros_like(wb)
        _, qb, eb, pruned = lax.fori_loop(0, b, row, (wb, zeros, zeros, pruned))
        mask = lax.dynamic_update_slice_in_dim(mask, ~pruned, i1, 0)
        return qb, eb, mask

    w2, mask = _obs.obs_sweep(w2, m, b, process_block, jnp.ones((k, n), jnp.bool_))
    failed = ~ok | ~jnp.all(jnp.isfinite(w2))  # a factor that failed: NaN, never garbage
    w2 = jnp.where(failed, jnp.float32(jnp.nan), w2)
    return w2.reshape(shape).astype(w.dtype), (mask | failed).reshape(shape)
