"""One-shot pruning of any JAX function from calibration data: ``prune.oneshot``.

``oneshot(fn, params, batches, sparsity)`` calibrates every kernel of ``fn(params, batch)``
(``jaxslim.calibrate``), prunes it with magnitude, Wanda or SparseGPT, and returns the pruned
params, the masks (for ``prune.keep_mask``) and a per-layer report.

**Layout.** Whatever the framework's layout, a kernel is pruned as the matrix its layer computes
with: ``calibrate.Stats`` says which kernel axes are contracted with the input
(``contracted_axes``) and which have statistics of their own (``lead_axes``: a scanned layer axis,
per-head batch axes). The kernel is transposed to ``(*lead, *contracted, *out)`` and reshaped to
``(*lead, K, N)``, ``K = prod(contracted)`` inputs and ``N`` outputs; every ``(K, N)`` slice is
pruned on its own statistics, and the result is reshaped and transposed back. So a Flax
``(in, out)`` kernel, an Equinox ``(out, in)`` weight and an explicit-head ``(d, kv, g, hd)``
query kernel all prune along their inputs, per output.

**Methods** (``s`` = ``sparsity``; ``NM(n, m)`` runs along the flattened ``K`` inputs, whatever its
``axis``):

* ``"magnitude"``: every output prunes its ``round_half_even(s K)`` smallest ``|W_kj|`` (``NM``:
  the ``n`` largest of every ``m`` consecutive inputs);
* ``"wanda"``: the same with the score ``|W_kj| ||X_k||_2`` (``prune.wanda``);
* ``"sparsegpt"``: ``prune.sparsegpt`` on ``H = X^T X`` with ``B`` = the largest divisor of ``K``
  that is ``<= block_size`` (a multiple of ``m`` for ``NM``): every output prunes
  ``(K / B) round_half_even(s B)`` inputs and the kept weights are reconstructed.

**Report.** For each kernel (each slice of a stack) the sparsity of its mask and the relative
reconstruction error of its layer on the calibration inputs it saw, from ``H = X^T X`` alone::

    err = ||X W - X W'||_F / ||X W||_F = sqrt(tr(D^T H D) / tr(W^T H W)),   D = W - W'.

With ``sequential=True`` (``calibrate.sequential``, what the SparseGPT paper does) ``X`` are the
inputs after the earlier kernels were pruned, and each kernel is fitted to them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxslim import _tree, calibrate
from jaxslim.prune._oneshot import Quantizer, sparsegpt, wanda
from jaxslim.structures import NM, Structure, Unstructured

__all__ = ["oneshot"]

_FN = "prune.oneshot"
_METHODS = ("sparsegpt", "wanda", "magnitude")
_HI = lax.Precision.HIGHEST


def _block(k: int, block_size: int, structure: Structure) -> int:
    """The largest divisor of ``k`` that is ``<= block_size`` (and a multiple of ``m``)."""
    m = structure.m if isinstance(structure, NM) else 1
    for b in range(min(block_size, k), 0, -1):
        if k % b == 0 and b % m == 0:
            return b
    return k


@jax.jit
def _errors(w: jax.Array, w_new: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(tr(D^T H D), tr(W^T H W))`` for ``(K, N)`` kernels and ``(K, K)`` ``H``."""
    w = w.astype(jnp.float32)
    d = w - w_new.astype(jnp.float32)
    h = h.astype(jnp.float32)
    num = jnp.sum(d * jnp.matmul(h, d, precision=_HI))
    den = jnp.sum(w * jnp.matmul(h, w, precision=_HI))
    return num, den


def _layout(stats: calibrate.Stats) -> tuple[list[int], tuple[int, ...], int, int, int]:
    """``(perm, lead_shape, L, K, N)``: ``transpose(w, perm)`` is ``(*lead, *contracted, *out)``."""
    shape, lead, con = stats.shape, stats.lead_axes, stats.contracted_axes
    out = [a for a in range(len(shape)) if a not in lead and a not in con]
    perm = [*lead, *con, *out]
    lead_shape = tuple(shape[a] for a in lead)
    k = math.prod(shape[a] for a in con)
    n = math.prod(shape[a] for a in out)
    return perm, lead_shape, math.prod(lead_shape), k, n


def _prune_kernel(
    path: str,
    w: jax.Array,
    stats: calibrate.Stats,
    sparsity: float,
    method: str,
    structure: Structure,
    block_size: int,
    damp: float,
    quant: Callable[[str, jax.Array], Quantizer] | None,
) -> tuple[jax.Array, jax.Array, list[dict[str, Any]]]:
    """Prunes one kernel (every slice of its lead axes); returns ``(w_new, mask, rows)``."""
    perm, lead_shape, n_lead, k, n = _layout(stats)
    if n == 0 or k == 0:
        raise ValueError(f"{_FN}: kernel {path!r} of shape {stats.shape} is empty; exclude it")
    inner = NM(structure.n, structure.m) if isinstance(structure, NM) else structure
    if isinstance(inner, NM) and k % inner.m:
        raise ValueError(
            f"{_FN}: kernel {path!r} (shape {stats.shape}) has {k} inputs (contracted axes "
            f"{stats.contracted_axes}), not a multiple of m={inner.m} for {structure!r}; exclude "
            "it with where="
        )
    w_t = jnp.transpose(jnp.asarray(w), perm)
    w2 = w_t.reshape(n_lead, k, n)
    xtx = stats.xtx.reshape(n_lead, k, k)
    sq = stats.sq_norm.reshape(n_lead, k)
    news, masks, rows = [], [], []
    for i in range(n_lead):
        idx = tuple(int(j) for j in np.unravel_index(i, lead_shape)) if lead_shape else None
        name = path if idx is None else f"{path}{list(idx)}"
        wi = w2[i]
        if method == "sparsegpt":
            q = quant(name, wi) if quant is not None else None
            b = _block(k, block_size, inner)
            new, mask = sparsegpt(
                wi, xtx[i], sparsity, structure=inner, block_size=b, damp=damp, quant=q, path=name
            )
        else:
            v = sq[i] if method == "wanda" else jnp.ones((k,), jnp.float32)
            mask = wanda({"w": wi}, {"w": v}, sparsity, structure=inner)["w"]
            new = jnp.where(mask, wi, jnp.zeros((), wi.dtype))
        num, den = jax.device_get(_errors(wi, new, xtx[i]))
        rows.append(
            {
                "path": path,
                "slice": idx,
                "shape": tuple(stats.shape),
                "size": k * n,
                "sparsity": float(1.0 - jnp.mean(mask.astype(jnp.float32))),
                "error": float(np.sqrt(num / den)) if den > 0 else 0.0,
            }
        )
        news.append(new)
        masks.append(mask)
    inv = np.argsort(perm)
    w_new = jnp.transpose(jnp.stack(news).reshape(w_t.shape), inv).astype(w.dtype)
    mask = jnp.transpose(jnp.stack(masks).reshape(w_t.shape), inv)
    return w_new, mask, rows


def _check_args(sparsity, method, structure, sequential, block_size, damp, quant) -> None:
    if method not in _METHODS:
        raise ValueError(f"{_FN}: method must be one of {_METHODS}, got {method!r}")
    if not isinstance(structure, Unstructured | NM):
        raise TypeError(
            f"{_FN}: structure must be Unstructured() or NM(n, m) (along the inputs), got "
            f"{structure!r}; for channels use splice.prune_channels"
        )
    real = int | float | np.integer | np.floating
    if isinstance(sparsity, bool) or not isinstance(sparsity, real):
        raise TypeError(f"{_FN}: sparsity must be a float in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(
            f"{_FN}: sparsity must be in [0, 1) (the fraction of each output's inputs to prune), "
            f"got {sparsity!r}"
        )
    if not isinstance(sequential, bool):
        raise TypeError(f"{_FN}: sequential must be a bool, got {sequential!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{_FN}: block_size must be a positive int, got {block_size!r}")
    if not isinstance(damp, int | float) or not 0.0 <= float(damp) or not math.isfinite(damp):
        raise ValueError(f"{_FN}: damp must be a finite float >= 0, got {damp!r}")
    if quant is not None and (method != "sparsegpt" or not callable(quant)):
        raise TypeError(
            f"{_FN}: quant must be None or, with method='sparsegpt', a callable "
            f"quant(path, w) -> (row, k) -> row, got {quant!r} with method={method!r}"
        )


def oneshot(
    fn: Callable[..., Any],
    params: optax.Params,
    batches: Iterable[Any],
    sparsity: float,
    *,
    method: Literal["sparsegpt", "wanda", "magnitude"] = "sparsegpt",
    structure: Structure = Unstructured(),
    where: _tree.Where = None,
    sequential: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
    quant: Callable[[str, jax.Array], Quantizer] | None = None,
) -> tuple[optax.Params, optax.Params, dict[str, Any]]:
    """Prunes every kernel of ``fn(params, batch)`` once, from calibration ``batches``.

    Args:
      fn: ``fn(params, batch)``, traceable (a plain function, Linen ``apply``, an NNX
        ``merge``, Equinox); see ``calibrate.statistics``.
      params: the parameter pytree ``fn`` reads.
      batches: calibration batches (e.g. a few hundred sequences), read into a list once.
      sparsity: the fraction of each output's inputs to prune, in ``[0, 1)``. With ``NM(n, m)``
        any ``sparsity > 0`` applies the pattern (``0`` leaves kernels dense).
      method: ``"sparsegpt"`` (mask selection with weight reconstruction), ``"wanda"``
        (``|W| * ||X||``, no update) or ``"magnitude"`` (``|W|`` per output; calibration is
        still run, for the report).
      structure: ``Unstructured()`` or ``NM(n, m)`` along the (flattened) contracted inputs.
      where: which leaves are kernels (``calibrate.statistics``: ``None`` = every floating leaf
        of ndim >= 2 that feeds a matmul; a gather-only embedding is skipped).
      sequential: calibrate each kernel on the outputs of the already-pruned earlier ones
        (``calibrate.sequential``; one forward pass per kernel and batch) instead of all on the
        dense model (``calibrate.statistics``; one pass per batch).
      block_size, damp: SparseGPT's lazy-update block (the largest divisor of ``K`` not above it
        is used) and Hessian dampening (fraction of the mean diagonal).
      quant: SparseGPT only: ``quant(path, w) -> q`` with ``w`` the dense ``(K, N)`` kernel (or
        slice) and ``q(row, k) -> row`` the quantizer of ``prune.sparsegpt`` (joint sparsity and
        quantization, the paper's 50 % + 4-bit); the returned params hold the dequantized values.

    Returns:
      ``(params, masks, report)``: ``params`` with pruned kernels (exact zeros where the mask is
      False; ``w.dtype``); ``masks`` of ``params``' structure (``bool`` on pruned kernels, ``None``
      elsewhere), for ``prune.keep_mask``; ``report`` a dict with ``method``, ``sparsity``,
      ``structure``, ``seconds`` (wall time, calibration included) and ``layers``: one row per
      kernel (per slice of a stacked kernel: ``slice`` its index) with ``path``, ``shape``,
      ``sparsity`` (of its mask), ``size`` (``K N``) and ``error`` (``||XW - XW'||_F /
      ||XW||_F``, module docstring).

    Raises ``ValueError`` naming ``prune.oneshot`` and the kernel on a non-finite calibration
    input, a kernel that no batch reaches, a layout that cannot be flattened, or a sparsity
    outside ``[0, 1)``.

    The top level runs eagerly (it calibrates and checks values); the per-kernel work
    (accumulation, masks, SparseGPT sweeps, errors) is jitted.

    >>> import jax, jax.numpy as jnp
    >>> params = {"w1": jax.random.normal(jax.random.key(0), (8, 16)),
    ...           "w2": jax.random.normal(jax.random.key(1), (16, 4))}
    >>> fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
    >>> xs = [jax.random.normal(jax.random.key(2), (64, 8))]
    >>> new, masks, report = oneshot(fn, params, xs, 0.5)
    >>> masks["w1"].sum(axis=0).tolist() == [4] * 16, [r["sparsity"] for r in report["layers"]]
    (True, [0.5, 0.5])
    """
    _check_args(sparsity, method, structure, sequential, block_size, damp, quant)
    _tree.reject_traced(params, fn_name=_FN, why="oneshot calibrates and checks values")
    t0 = time.perf_counter()
    batches = list(batches)
    done: dict[str, jax.Array] = {}
    rows: list[dict[str, Any]] = []

    def compress(path: str, w: jax.Array, stats: calibrate.Stats) -> jax.Array:
        w_new, mask, r = _prune_kernel(
            path, w, stats, sparsity, method, structure, block_size, float(damp), quant
        )
        done[path] = mask
        rows.extend(r)
        return w_new

    try:
        if sequential:
            new = calibrate.sequential(fn, params, batches, compress, where=where)
        else:
            stats = calibrate.statistics(fn, params, batches, where=where)
            leaves = dict(_tree.leaves_with_paths(params))
            pruned = {p: compress(p, leaves[p], s) for p, s in stats.items()}
            new = _tree.map_selected(
                lambda p, x: pruned[p] if p in pruned else x,
                params,
                where=lambda p, _: p in pruned,
                fn_name=_FN,
                allow_empty=True,
            )
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(_FN) else f"{_FN}: {msg}") from None
    masks = _tree.map_selected(
        lambda p, x: done[p],
        params,
        where=lambda p, _: p in done,
        fn_name=_FN,
        allow_empty=True,
        unselected=lambda *_: None,
    )
    total = sum(r["sparsity"] * r["size"] for r in rows)
    size = sum(r["size"] for r in rows)
    report = {
        "method": method,
        "structure": repr(structure),
        "sparsity": total / size if size else 0.0,
        "seconds": time.perf_counter() - t0,
        "layers": rows,
    }
    return new, masks, report
