"""One-shot pruning of any JAX function from calibration data: ``prune.oneshot``.

``oneshot(fn, params, batches, sparsity)`` calibrates every kernel of ``fn(params, batch)``
(``jaxslim.calibrate``), prunes it with magnitude, Wanda or SparseGPT, and returns the pruned
params and a ``prune.OneshotReport`` (per-kernel rows; the masks for ``prune.keep_mask``).

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

* ``Magnitude()``: every output prunes its ``round_half_even(s K)`` smallest ``|W_kj|`` (``NM``:
  the ``n`` largest of every ``m`` consecutive inputs);
* ``Wanda()``: the same with the score ``|W_kj| ||X_k||_2`` (``prune.wanda``);
* ``SparseGPT(block_size, damp)``: ``prune.sparsegpt`` on ``H = X^T X`` with ``B`` = the largest
  divisor of ``K`` that is ``<= block_size`` (a multiple of ``m`` for ``NM``): every output prunes
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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxslim import _jaxpr, _tree, calibrate
from jaxslim._checks import at_leaf, public
from jaxslim._oneshot import KernelRow, OneshotReport, relative_error
from jaxslim.prune._calibrated import sparsegpt, wanda
from jaxslim.prune._methods import Magnitude, Method, SparseGPT, Wanda, as_method
from jaxslim.structures import NM, Structure, Unstructured

_FN = "prune.oneshot"
_HI = lax.Precision.HIGHEST


def _block(k: int, block_size: int, structure: Structure) -> int:
    """The largest divisor of ``k`` that is ``<= block_size`` (and a multiple of ``m``)."""
    m = structure.m if isinstance(structure, NM) else 1
    for b in range(min(block_size, k), 0, -1):
        if k % b == 0 and b % m == 0:
            return b
    return k


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
    method: Method,
    structure: Structure,
) -> tuple[jax.Array, jax.Array, list[KernelRow]]:
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
    # One kernel (no lead axes): its (K, K) statistic as it is, never an eager (K, K) copy
    # (a reshape or an index), which would double the largest array of a streamed block.
    one = n_lead == 1 and stats.xtx.shape == (k, k)
    xtx = (stats.xtx,) if one else stats.xtx.reshape(n_lead, k, k)
    sq = stats.sq_norm.reshape(n_lead, k)
    news, masks, rows = [], [], []
    for i in range(n_lead):
        idx = tuple(int(j) for j in np.unravel_index(i, lead_shape)) if lead_shape else None
        name = path if idx is None else f"{path}{list(idx)}"
        wi = w2[i]
        hi = xtx[i]
        t0 = time.perf_counter()
        if isinstance(method, SparseGPT):
            q = method.quant(name, wi) if method.quant is not None else None
            b = _block(k, method.block_size, inner)
            with at_leaf(name):
                new, mask = sparsegpt(
                    wi,
                    hi,
                    sparsity,
                    structure=inner,
                    block_size=b,
                    damp=float(method.damp),
                    quant=q,
                )
        else:
            v = sq[i] if isinstance(method, Wanda) else jnp.ones((k,), jnp.float32)
            mask = wanda({"w": wi}, {"w": v}, sparsity, structure=inner)["w"]
            new = jnp.where(mask, wi, jnp.zeros((), wi.dtype))
        new = jax.block_until_ready(new)
        seconds = time.perf_counter() - t0
        error = relative_error(wi, new, hi)
        if isinstance(method, Magnitude):
            baseline = error
        else:
            ones = jnp.ones((k,), jnp.float32)
            base = jnp.where(wanda({"w": wi}, {"w": ones}, sparsity, structure=inner)["w"], wi, 0)
            baseline = relative_error(wi, base.astype(wi.dtype), hi)
        rows.append(
            KernelRow(
                path=path,
                method=method.name,
                shape=tuple(stats.shape),
                error=error,
                baseline=baseline,
                seconds=seconds,
                slice=idx,
                sparsity=float(1.0 - jnp.mean(mask.astype(jnp.float32))),
                size=k * n,
            )
        )
        news.append(new)
        masks.append(mask)
    inv = np.argsort(perm)
    w_new = jnp.transpose(jnp.stack(news).reshape(w_t.shape), inv).astype(w.dtype)
    mask = jnp.transpose(jnp.stack(masks).reshape(w_t.shape), inv)
    return w_new, mask, rows


def _check_args(sparsity, structure, sequential) -> None:
    if not isinstance(structure, Unstructured | NM):
        raise TypeError(
            f"{_FN}: structure must be Unstructured() or NM(n, m) (along the inputs), got "
            f"{structure!r}; for channels use splice.prune_channels"
        )
    real = int | float | np.integer | np.floating
    per_kernel = sparsity.items() if isinstance(sparsity, Mapping) else [(None, sparsity)]
    for path, s in per_kernel:
        at = "" if path is None else f" for {path!r}"
        if isinstance(s, bool) or not isinstance(s, real):
            raise TypeError(
                f"{_FN}: sparsity must be a float in [0, 1) or a dict path -> float, got {s!r}{at}"
            )
        if not 0.0 <= float(s) < 1.0:
            raise ValueError(
                f"{_FN}: sparsity must be in [0, 1) (the fraction of each output's inputs to "
                f"prune), got {s!r}{at}"
            )
    if not isinstance(sequential, bool):
        raise TypeError(f"{_FN}: sequential must be a bool, got {sequential!r}")


@public("prune.oneshot")
def oneshot(
    fn: Callable[..., Any],
    params: optax.Params,
    batches: Iterable[Any],
    sparsity: float | Mapping[str, float],
    *,
    method: Method | str = "sparsegpt",
    structure: Structure = Unstructured(),
    where: _tree.Where = None,
    sequential: bool = True,
) -> tuple[optax.Params, OneshotReport]:
    """Prunes every kernel of ``fn(params, batch)`` once, from calibration ``batches``.

    Args:
      fn: ``fn(params, batch)``, traceable (a plain function, Linen ``apply``, an NNX
        ``merge``, Equinox); see ``calibrate.statistics``.
      params: the parameter pytree ``fn`` reads.
      batches: calibration batches (e.g. a few hundred sequences), read into a list once.
      sparsity: the fraction of each output's inputs to prune, in ``[0, 1)``. With ``NM(n, m)``
        any ``sparsity > 0`` applies the pattern (``0`` leaves kernels dense). A dict
        ``{path: sparsity}`` (``prune.owl``, ``prune.erk`` flattened) gives each kernel its own;
        only the kernels it names are pruned (and ``where=`` still filters them).
      method: ``SparseGPT(block_size=128, damp=0.01, quant=None)`` (mask selection with weight
        reconstruction), ``Wanda()`` (``|W| * ||X||``, no update) or ``Magnitude()`` (``|W|``
        per output; calibration is still run, for the report); the strings ``"sparsegpt"``,
        ``"wanda"``, ``"magnitude"`` stand for the records with their defaults.
      structure: ``Unstructured()`` or ``NM(n, m)`` along the (flattened) contracted inputs.
      where: which leaves are kernels (``calibrate.statistics``: ``None`` = every floating leaf
        of ndim >= 2 that feeds a matmul, except a leaf a ``gather`` also reads — an embedding
        table, also the LM head when tied — which stays dense and is named in
        ``report.skipped``; a ``where=`` that names it prunes it).
      sequential: calibrate each kernel on the outputs of the already-pruned earlier ones
        (``calibrate.sequential``; one forward pass per kernel and batch) instead of all on the
        dense model (``calibrate.statistics``; one pass per batch).

    Returns:
      ``(params, report)``: ``params`` with pruned kernels (exact zeros where the mask is False;
      ``w.dtype``) and a ``prune.OneshotReport``: ``report.masks`` has ``params``' structure
      (``bool`` on pruned kernels, ``None`` elsewhere) for ``prune.keep_mask``; ``report.rows``
      one ``KernelRow`` per kernel (per slice of a stacked kernel: ``slice`` its index) with the
      mask's ``sparsity``, ``size`` (``K N``), ``error`` (``||XW - XW'||_F / ||XW||_F``, module
      docstring), the magnitude ``baseline`` error and ``seconds``; ``report.sparsity`` overall;
      ``report.table()`` prints it.

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
    >>> new, report = oneshot(fn, params, xs, 0.5, method=SparseGPT(damp=0.01))
    >>> report.masks["w1"].sum(axis=0).tolist() == [4] * 16, [r.sparsity for r in report.rows]
    (True, [0.5, 0.5])
    """
    method = as_method(method, _FN)
    _check_args(sparsity, structure, sequential)
    _tree.reject_traced(params, why="oneshot calibrates and checks values")
    t0 = time.perf_counter()
    batches = list(batches)
    skipped: dict[str, str] = {}
    if where is None and batches:
        traced = _jaxpr.make_jaxpr(fn, params, batches[0])
        kernels = set(_jaxpr.kernel_uses_of(traced))
        for path in _jaxpr.gathered_of(traced):
            if path in kernels:
                skipped[path] = (
                    "gathered (an embedding table, and the LM head when tied): left dense; "
                    "a where= that names it prunes it"
                )
        if skipped:
            leaves = dict(_tree.leaves_with_paths(params))
            keep = frozenset(
                p
                for p in kernels
                if p not in skipped and _tree.is_float_array(leaves[p]) and leaves[p].ndim >= 2
            )
            where = lambda p, _, keep=keep: p in keep  # noqa: E731
    if isinstance(sparsity, Mapping):  # per-kernel sparsities (prune.owl): only those kernels
        leaves = dict(_tree.leaves_with_paths(params))
        unknown = [p for p in sparsity if p not in leaves]
        if unknown:
            raise ValueError(f"{_FN}: sparsity names {unknown}, which are not leaves of params")
        outer = where
        where = lambda p, x, outer=outer: (
            p in sparsity
            and (  # noqa: E731
                outer is None or _tree.is_selected(outer, p, x)
            )
        )
    done: dict[str, jax.Array] = {}
    rows: list[KernelRow] = []

    def compress(path: str, w: jax.Array, stats: calibrate.Stats) -> jax.Array:
        s = float(sparsity[path]) if isinstance(sparsity, Mapping) else sparsity
        w_new, mask, r = _prune_kernel(path, w, stats, s, method, structure)
        done[path] = mask
        rows.extend(r)
        return w_new

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
            allow_empty=True,
        )
    masks = _tree.map_selected(
        lambda p, x: done[p],
        params,
        where=lambda p, _: p in done,
        allow_empty=True,
        unselected=lambda *_: None,
    )
    seconds = time.perf_counter() - t0
    report = OneshotReport(method, tuple(rows), seconds, masks=masks, skipped=skipped)
    return new, report
