"""Mixed precision under a bit budget: per-kernel RTN sensitivities and an exact allocation.

``sensitivities`` predicts, for each kernel and candidate format, the increase of the layer's
squared output error on the calibration inputs (from ``calibrate.statistics``) or of the loss
(from the empirical Fisher diagonal, ``calibrate.fisher``); ``allocate`` picks one candidate per
kernel that minimizes the summed prediction under an average-bits-per-weight budget (a
multiple-choice knapsack, solved by dynamic programming) and returns ordinary ``(where, spec)``
rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from functools import reduce
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxslim import _tree
from jaxslim._checks import at_leaf, public
from jaxslim.quant._qarray import dequantize, quantize
from jaxslim.quant._spec import QuantSpec

_HI = lax.Precision.HIGHEST
Candidates = Sequence[QuantSpec | None] | Mapping[str, Sequence[QuantSpec | None]]


@jax.jit
def _trace(d: jax.Array, h: jax.Array) -> jax.Array:
    """``sum_l tr(D_l^T H_l D_l)`` for ``(L, K, N)`` ``D`` and ``(L, K, K)`` ``H``."""
    return jnp.sum(d * jnp.matmul(h, d, precision=_HI))


@jax.jit
def _weighted(d: jax.Array, f: jax.Array) -> jax.Array:
    """``sum(f * d**2)``."""
    return jnp.sum(f * jnp.square(d))


def _is_fisher(st: Any) -> bool:
    return hasattr(st, "diag") and hasattr(st, "count") and not hasattr(st, "xtx")


def _is_stats(st: Any) -> bool:
    return all(hasattr(st, a) for a in ("xtx", "contracted_axes", "lead_axes", "shape"))


def _view(x: jax.Array, st: Any) -> jax.Array:
    """``x`` (a kernel's shape) as ``(L, K, N)``: lead, contracted and output axes."""
    shape = tuple(st.shape)
    lead, con = tuple(st.lead_axes), tuple(st.contracted_axes)
    out = [a for a in range(len(shape)) if a not in lead and a not in con]
    sizes = [math.prod(shape[a] for a in axes) for axes in (lead, con, out)]
    return jnp.transpose(x, [*lead, *con, *out]).reshape(sizes)


def _candidates_for(fn: str, candidates: Any, path: str) -> tuple[QuantSpec | None, ...]:
    if isinstance(candidates, Mapping):
        if path not in candidates:
            raise ValueError(f"{fn}: candidates has no entry for the kernel {path!r}")
        cands = candidates[path]
    else:
        cands = candidates
    if isinstance(cands, QuantSpec | str) or not isinstance(cands, Sequence) or not cands:
        raise TypeError(
            f"{fn}: candidates must be a non-empty list of QuantSpec or None (or a dict path -> "
            f"such a list), got {cands!r} for {path!r}"
        )
    for c in cands:
        if c is not None and not isinstance(c, QuantSpec):
            raise TypeError(f"{fn}: candidate {c!r} for {path!r} is not a QuantSpec or None")
    return tuple(cands)


@public("quant.sensitivities")
def sensitivities(
    params: Any,
    stats: Mapping[str, Any],
    candidates: Candidates,
    *,
    where: _tree.Where = None,
) -> dict[str, tuple[float, ...]]:
    """The predicted error of every kernel under every candidate format (RTN).

    With ``D = W - dequantize(quantize(W, spec))`` the candidate's rounding error, two
    predictions, by the kind of ``stats``:

    * ``calibrate.statistics`` (``Stats``): the layer's squared output error on the calibration
      inputs, on the kernel's ``(K, N)`` view (a stacked kernel sums its slices)::

          e = tr(D^T H D) = ||X W - X W'||_F^2,    H = X^T X = stats[path].xtx

    * ``calibrate.fisher`` (``Fisher``): the predicted increase of the loss (second order around
      a minimum, the empirical Fisher diagonal ``F = diag / count`` standing in for the
      Hessian; HAWQ, SqueezeLLM)::

          e = 0.5 * sum(F * D**2)

      It weighs each kernel by what its error does to the loss at the model's output, so it
      ranks kernels across layers where the output error of each layer alone does not (on
      SmolLM2-135M at 4.25 bits: perplexity 18.67 against 22.27 from the output error).

    ``None`` (keep float) gives 0.

    Args:
      params: the parameter tree ``stats`` was computed on.
      stats: ``calibrate.statistics(fn, params, batches)`` or ``calibrate.fisher(loss_fn,
        params, batches)``.
      candidates: a list of ``QuantSpec`` or ``None`` tried on every kernel, or a dict
        ``path -> list``.
      where: which of ``stats``' kernels (``None``: all).

    Returns:
      ``{path: (e_0, e_1, ...)}``, one float per candidate, in ``stats`` order.

    >>> import jax, jax.numpy as jnp
    >>> from jaxslim import calibrate
    >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
    >>> stats = calibrate.statistics(lambda p, x: x @ p["w"], params, [jnp.ones((4, 16))])
    >>> e = sensitivities(params, stats, [QuantSpec(8, axis=-1), QuantSpec(2, axis=-1), None])
    >>> e["w"][0] < e["w"][1], e["w"][2]
    (True, 0.0)
    >>> fisher = calibrate.fisher(lambda p, x: jnp.sum((x @ p["w"]) ** 2), params,
    ...                           [jnp.ones((4, 16))])
    >>> e = sensitivities(params, fisher, [QuantSpec(8, axis=-1), QuantSpec(2, axis=-1), None])
    >>> e["w"][0] < e["w"][1], e["w"][2]
    (True, 0.0)
    """
    fn = "quant.sensitivities"
    _tree.check_where(where)
    leaves = dict(_tree.leaves_with_paths(params))
    kinds = {_is_fisher(st) for st in stats.values()}
    if len(kinds) > 1:
        raise ValueError(
            f"{fn}: stats mixes calibrate.statistics and calibrate.fisher entries, whose "
            "predictions (a layer's output error, a loss increase) are not comparable; pass one "
            "kind for every kernel"
        )
    out: dict[str, tuple[float, ...]] = {}
    for path, st in stats.items():
        if path not in leaves:
            raise ValueError(f"{fn}: stats name {path!r}, which is not a leaf of params")
        w = leaves[path]
        if where is not None and not _tree.is_selected(where, path, w):
            continue
        is_fisher = _is_fisher(st)
        if not is_fisher and not _is_stats(st):
            raise TypeError(
                f"{fn}: stats[{path!r}] is a {type(st).__name__}; pass calibrate.statistics(...) "
                "or calibrate.fisher(...)"
            )
        shape = tuple(np.shape(st.diag)) if is_fisher else tuple(st.shape)
        if tuple(w.shape) != shape:
            raise ValueError(
                f"{fn}: stats for {path!r} are of shape {shape}, params holds {tuple(w.shape)}"
            )
        if is_fisher:
            f = jnp.asarray(st.diag, jnp.float32) * (0.5 / st.count)
        else:
            h = jnp.asarray(st.xtx, jnp.float32)
            h = h.reshape(-1, *h.shape[-2:])
        errors = []
        for spec in _candidates_for(fn, candidates, path):
            if spec is None:
                errors.append(0.0)
                continue
            try:
                with at_leaf(path):
                    w_hat = dequantize(quantize(w, spec))
            except ValueError as e:
                raise ValueError(f"{fn}: candidate {spec!r} does not fit {path!r}: {e}") from None
            d = jnp.asarray(w, jnp.float32) - w_hat.astype(jnp.float32)
            e = _weighted(d, f) if is_fisher else _trace(_view(d, st), h)
            errors.append(max(float(e), 0.0))
        out[path] = tuple(errors)
    return out


def bits(leaf: Any, spec: QuantSpec | None) -> int:
    """Storage bits of ``leaf`` under ``spec``: ``8 * QArray.nbytes`` (codes, scales, zero points,
    second-level scales; found with ``jax.eval_shape``, no compute), or the float leaf's own bits
    for ``None``."""
    shape, dtype = tuple(leaf.shape), jnp.dtype(leaf.dtype)
    if spec is None:
        return 8 * math.prod(shape) * dtype.itemsize
    q = jax.eval_shape(lambda x: quantize(x, spec), jax.ShapeDtypeStruct(shape, dtype))
    return 8 * int(q.nbytes)


def _solve(
    errors: list[np.ndarray], costs: list[np.ndarray], capacity: int, resolution: int
) -> list[int]:
    """Exact multiple-choice knapsack: one index per item, ``sum cost <= capacity``, min error.

    Costs are shifted by each item's cheapest option and divided by their gcd; if more than
    ``resolution`` cells remain, the unit becomes ``ceil(capacity / resolution)`` and costs are
    rounded *up* (always feasible; optimal for the rounded costs).
    """
    base = [int(c.min()) for c in costs]
    extra = [c - b for c, b in zip(costs, base, strict=True)]
    cap = capacity - sum(base)
    unit = reduce(math.gcd, (int(v) for c in extra for v in c if v), 0) or 1
    if cap // unit > resolution:
        unit = -(-cap // resolution)
    steps = [-(-c // unit) for c in extra]
    cells = min(cap // unit, int(sum(s.max() for s in steps)))
    dp = np.zeros(cells + 1)  # dp[b]: least error of the items so far within b cells
    choice = np.zeros((len(errors), cells + 1), np.int16)
    for i, (e, s) in enumerate(zip(errors, steps, strict=True)):
        order = np.argsort(s, kind="stable")  # ties go to the cheaper option
        new = np.full(cells + 1, np.inf)
        for j in order:
            if s[j] > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[s[j] :] = dp[: cells + 1 - s[j]] + e[j]
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        dp = new
    picks, b = [], cells
    for i in range(len(errors) - 1, -1, -1):
        j = int(choice[i, b])
        picks.append(j)
        b -= int(steps[i][j])
    return picks[::-1]


@public("quant.allocate")
def allocate(
    stats_or_errors: Mapping[str, Any],
    budget: float,
    candidates: Candidates,
    *,
    params: Any,
    resolution: int = 1 << 16,
) -> list[tuple[str, QuantSpec | None]]:
    """One candidate format per kernel, minimizing the predicted error under a bit budget.

    Minimizes ``sum_l e_l(c_l)`` over choices ``c_l`` from each kernel's candidates subject to
    ``sum_l bits_l(c_l) <= budget * sum_l n_l`` (``n_l`` the kernel's weight count; ``bits`` are
    ``8 * QArray.nbytes``, scales and zero points included, or the float leaf's own bits for
    ``None``) — a multiple-choice knapsack, solved by dynamic programming over the budget. The
    DP is exact when the bits above each kernel's cheapest candidate, divided by their gcd,
    leave at most ``resolution`` cells of budget (small models, and every test); otherwise the
    cell is ``ceil(spare / resolution)`` bits and costs are rounded up, so the budget always
    holds and at most ``n_kernels`` cells of it (``n_kernels / resolution`` of the spare bits)
    go unused.

    Args:
      stats_or_errors: ``calibrate.statistics(...)`` or ``calibrate.fisher(...)`` (then
        ``sensitivities(params, stats, candidates)`` is computed; the Fisher's loss-aware
        prediction allocates better across layers) or its result ``{path: (e_0, e_1, ...)}``,
        any nonnegative predicted losses aligned with the candidates (e.g. measured perplexity
        increases).
      budget: average bits per weight over these kernels (e.g. ``4.25``).
      candidates: a list of ``QuantSpec`` or ``None`` (float) for every kernel, or a dict
        ``path -> list``.
      params: the parameter tree (shapes and dtypes give the bits).
      resolution: the most budget cells the DP uses (time and memory ``n_kernels * resolution``).

    Returns:
      ``[(re.escape(path) anchored, spec or None), ...]`` in kernel order: rules to edit and pass
      to ``quant.quantize_params`` or ``quant.oneshot``.

    Raises ``ValueError`` naming ``quant.allocate`` when even the cheapest candidates exceed the
    budget (it says the least average achievable), on an errors entry of the wrong length or a
    negative or non-finite error, on a path not in ``params``.

    >>> import jax, jax.numpy as jnp
    >>> params = {"a": jnp.zeros((64, 32)), "b": jnp.zeros((64, 32))}
    >>> cands = [QuantSpec(8, axis=-1), QuantSpec(4, axis=-1)]
    >>> rules = allocate({"a": (1.0, 5.0), "b": (1.0, 9.0)}, 6.5, cands, params=params)
    >>> [(where, spec.bits) for where, spec in rules]  # 6.5 bits: one kernel keeps 8
    [('^a$', 4), ('^b$', 8)]
    """
    fn = "quant.allocate"
    if isinstance(budget, bool) or not isinstance(budget, int | float | np.integer | np.floating):
        raise TypeError(f"{fn}: budget must be a number of bits per weight, got {budget!r}")
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"{fn}: budget must be finite and > 0 bits per weight, got {budget!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"{fn}: resolution must be an int >= 1, got {resolution!r}")
    if not isinstance(stats_or_errors, Mapping) or not stats_or_errors:
        raise TypeError(
            f"{fn}: stats_or_errors must be a non-empty dict (calibrate.statistics or "
            f"quant.sensitivities), got {stats_or_errors!r}"
        )
    if all(_is_stats(v) or _is_fisher(v) for v in stats_or_errors.values()):
        errors = sensitivities(params, stats_or_errors, candidates)
    else:
        errors = stats_or_errors
    leaves = dict(_tree.leaves_with_paths(params))
    paths, errs, costs, cands, n = [], [], [], [], 0
    for path, e in errors.items():
        if path not in leaves:
            raise ValueError(f"{fn}: {path!r} is not a leaf of params")
        c = _candidates_for(fn, candidates, path)
        e = np.asarray(e, np.float64)
        if e.shape != (len(c),):
            raise ValueError(
                f"{fn}: {path!r} has errors of shape {e.shape} for {len(c)} candidates; give one "
                "error per candidate"
            )
        if not np.all(np.isfinite(e) & (e >= 0)):
            raise ValueError(f"{fn}: errors of {path!r} must be finite and >= 0, got {e.tolist()}")
        paths.append(path)
        errs.append(e)
        cands.append(c)
        try:
            costs.append(np.array([bits(leaves[path], s) for s in c], np.int64))
        except ValueError as err:
            raise ValueError(f"{fn}: a candidate does not fit {path!r}: {err}") from None
        n += math.prod(leaves[path].shape)
    capacity = math.floor(budget * n * (1 + 1e-12))
    least = sum(int(c.min()) for c in costs)
    if least > capacity:
        raise ValueError(
            f"{fn}: budget={budget!r} bits per weight is below the cheapest candidates' "
            f"{least / n:.4f} (scales included); raise the budget or add smaller candidates"
        )
    picks = _solve(errs, costs, capacity, resolution)
    return [(f"^{re.escape(p)}$", c[j]) for p, c, j in zip(paths, cands, picks, strict=True)]
