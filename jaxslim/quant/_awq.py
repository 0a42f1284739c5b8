"""AWQ: activation-aware per-input-channel scales, folded into what precedes the kernel.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan and Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", MLSys 2024 (reference code
``mit-han-lab/llm-awq``, ``auto_scale.py``).

A kernel seen as ``W`` ``(K, N)`` (``K`` contracted input channels, any layout: see
:func:`as_matrix`) computes ``X W``. For positive ``s`` ``(K,)``, ``X W = (X diag(1/s)) (diag(s)
W)``; quantizing ``diag(s) W`` instead of ``W`` protects the input channels with large
activations. With ``a_k`` the activation magnitude of channel ``k`` (``sqrt(mean x_k^2)``, the
reference's ``mean |x_k|`` in spirit, or ``max |x_k|``) AWQ searches ``alpha`` on a grid in
``[0, 1)``::

    s = a^alpha / sqrt(max(a^alpha) min(a^alpha))
    loss(alpha) = sum_kernels tr(D^T H D),  D = W - diag(1/s) Q(diag(s) W),  H = X^T X

(the output error ``||X W - X diag(1/s) Q(diag(s) W)||^2`` summed over calibration rows, from
``calibrate.statistics``' ``xtx``; kernels that read the same input share one ``s``).

The ``1/s`` must be absorbed by what produces ``X``: :func:`find_absorbers` finds, for each group
of kernels sharing an input, a parameter leaf whose scaling along some axes by ``1/s`` exactly
compensates scaling the kernels' input channels by ``s`` (an RMSNorm/LayerNorm scale vector, or
the output channels of a previous linear kernel such as ``up`` before ``down`` or ``v`` before
``o``), by trying candidates on a calibration batch with random scales and keeping the one that
leaves ``fn`` unchanged (relative ``1e-5``). A group with no absorber keeps ``s = 1`` (plain RTN
of its kernels; ``quant.oneshot`` reports it as ``"awq (no absorber)"``), so the rewritten
float model always computes the same function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxslim import _tree
from jaxslim._checks import at_leaf, count_nonfinite, leaf_path, public
from jaxslim.quant._numerics import qparams_from_range
from jaxslim.quant._qarray import QArray, fake_values, quantize
from jaxslim.quant._spec import QuantSpec, layout

_HI = lax.Precision.HIGHEST


# ------------------------------------------------------------------------- kernel as a matrix


def as_matrix(w: jax.Array, contracted: Sequence[int], output: Sequence[int]) -> jax.Array:
    """The kernel ``w`` as ``(K, N)``: contracted axes first (row-major, in the kernel's axis
    order), then the output axes. Flax ``(in, out)``: ``w``; Equinox ``(out, in)``: ``w.T``.

    >>> import jax.numpy as jnp
    >>> as_matrix(jnp.ones((4, 2, 3)), (0,), (1, 2)).shape
    (4, 6)
    """
    contracted, output = tuple(contracted), tuple(output)
    if sorted(contracted + output) != list(range(w.ndim)):
        raise ValueError(
            f"quant.as_matrix: contracted {contracted} and output {output} axes must cover the "
            f"{w.ndim} axes of a kernel {tuple(w.shape)} exactly (no batch/layer axes)"
        )
    k = math.prod(w.shape[a] for a in contracted)
    return jnp.transpose(w, contracted + output).reshape(k, -1)


def from_matrix(m: jax.Array, shape, contracted, output) -> jax.Array:
    """Inverse of :func:`as_matrix`: ``(K, N)`` back to a kernel of ``shape``."""
    perm = tuple(contracted) + tuple(output)
    return jnp.transpose(m.reshape([shape[a] for a in perm]), np.argsort(perm))


def matrix_spec(spec: QuantSpec) -> QuantSpec:
    """``spec`` on the ``(K, N)`` view: per output column if ``spec.axis`` is set, groups along
    the rows (the contracted channels)."""
    import dataclasses

    return dataclasses.replace(
        spec,
        axis=None if spec.axis is None else (1,),
        group_axis=(
            (0, 1)
            if isinstance(spec.group_size, tuple)
            else 0
            if spec.group_size is not None
            else None
        ),
    )


def _fake(m: jax.Array, spec: QuantSpec) -> jax.Array:
    """Round-to-nearest quantize-dequantize of a ``(K, N)`` matrix under ``matrix_spec``."""
    lay = layout(spec, tuple(m.shape))
    v = lay.to_view(m)  # a shorter last group: filler that the ranges skip, dropped at the end
    lo = jnp.min(lay.masked(v, jnp.inf), axis=lay.reduce_axes, keepdims=True)
    hi = jnp.max(lay.masked(v, -jnp.inf), axis=lay.reduce_axes, keepdims=True)
    s, z = qparams_from_range(lo, hi, spec)
    return lay.from_view(fake_values(v, s, z, spec)[0])


# ----------------------------------------------------------------------------- the search


def check_activations(a: Any, fn: str, path: str, *, what: str = "activation magnitudes"):
    """``a`` as float32 ``(K,)``; eagerly: ``ValueError`` naming ``fn``/``path`` on a non-finite
    entry or an all-zero channel (AWQ and SmoothQuant divide by it)."""
    a = jnp.asarray(a, jnp.float32)
    if a.ndim != 1:
        raise ValueError(f"{fn}: {what} of {path!r} must be a vector (K,), got shape {a.shape}")
    if not isinstance(a, jax.core.Tracer):
        v = np.asarray(a)
        bad = ~np.isfinite(v)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"{fn}: {what} of {path!r} are not finite (channel {i}: {v[i]}); calibrate on "
                "finite inputs"
            )
        zero = v <= 0
        if zero.any():
            i = int(np.argmax(zero))
            raise ValueError(
                f"{fn}: input channel {i} of {path!r} is all zero in the calibration data "
                f"({what} {v[i]}); it cannot be scaled: calibrate on more data or exclude the "
                "kernel with a rule (where, None)"
            )
    return a


def awq_loss(ws: Sequence[jax.Array], h: jax.Array, s: jax.Array, spec: QuantSpec) -> jax.Array:
    """``sum_i tr(D_i^T H D_i)`` with ``D_i = W_i - diag(1/s) Q(diag(s) W_i)`` (RTN ``Q`` under
    ``matrix_spec(spec)``), ``W_i`` ``(K, N_i)``, ``H`` ``(K, K)``, ``s`` ``(K,)``."""
    total = jnp.float32(0)
    for w in ws:
        d = w - _fake(w * s[:, None], spec) / s[:, None]
        total = total + jnp.sum(d * jnp.matmul(h, d, precision=_HI))
    return total


@public("quant.awq_scales", leaf_kwarg=True)
def awq_scales(
    ws: Sequence[jax.Array],
    xtx: jax.typing.ArrayLike,
    act: jax.typing.ArrayLike,
    spec: QuantSpec,
    *,
    n_grid: int = 20,
) -> tuple[jax.Array, jax.Array]:
    """AWQ's grid search of per-input-channel scales for kernels sharing one input.

    Args:
      ws: the kernels as ``(K, N_i)`` matrices (:func:`as_matrix`), float.
      xtx: ``(K, K)`` ``X^T X`` of their common input.
      act: ``(K,)`` activation magnitudes ``a`` (all finite and > 0).
      spec: the kernels' spec (as for a Flax ``(in, out)`` kernel, see :func:`matrix_spec`).
      n_grid: grid points ``alpha = i / n_grid``, ``i = 0 .. n_grid - 1`` (``alpha = 0``:
        ``s = 1``, plain RTN).

    Returns:
      ``(s, alpha)``: the best scales ``(K,)`` and the alpha that gave them.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (512, 32)) * jnp.linspace(0.1, 10, 32)
    >>> w = jax.random.normal(jax.random.key(1), (32, 8))
    >>> spec = QuantSpec(4, axis=-1, group_size=16)
    >>> s, alpha = awq_scales([w], x.T @ x, jnp.sqrt(jnp.mean(x**2, 0)), spec)
    >>> bool(awq_loss([w], x.T @ x, s, spec) <= awq_loss([w], x.T @ x, jnp.ones(32), spec))
    True
    """
    path = leaf_path()
    fn = "quant.awq_scales"
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{fn}: spec must be a QuantSpec, got {spec!r} for {path!r}")
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"{fn}: n_grid must be a positive int, got {n_grid!r} for {path!r}")
    a = check_activations(act, fn, path)
    k = a.shape[0]
    ws = [jnp.asarray(w, jnp.float32) for w in ws]
    for w in ws:
        if w.ndim != 2 or w.shape[0] != k:
            raise ValueError(f"{fn}: kernels of {path!r} must be (K={k}, N), got {w.shape}")
        layout(matrix_spec(spec), tuple(w.shape), path=path)
    h = jnp.asarray(xtx, jnp.float32)
    if h.shape != (k, k):
        raise ValueError(f"{fn}: xtx of {path!r} must be ({k}, {k}), got {h.shape}")
    if not isinstance(h, jax.core.Tracer) and count_nonfinite(h):
        raise ValueError(f"{fn}: xtx of {path!r} is not finite; calibrate on finite inputs")
    return _search(tuple(ws), h, a, matrix_spec(spec), n_grid)


@partial(jax.jit, static_argnums=(3, 4))
def _search(ws, h, a, spec, n_grid):
    alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid

    def scales(alpha):
        s = a**alpha
        return s / jnp.sqrt(jnp.max(s) * jnp.min(s))

    losses = lax.map(lambda al: awq_loss(ws, h, scales(al), spec), alphas)
    best = alphas[jnp.argmin(losses)]
    return scales(best), best


def awq_clip(
    w: jax.Array,
    xtx: jax.typing.ArrayLike,
    spec: QuantSpec,
    *,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    path: str = "",
) -> QArray:
    """AWQ's weight clipping (``auto_clip``): every group's range is shrunk by the ratio in
    ``{1, 1 - max_shrink / n_grid, ..., 1 - max_shrink}`` that minimises its output error
    ``d^T H_gg d`` (``d`` the group's rounding error, ``H_gg`` the group's diagonal block of
    ``X^T X``, as the reference code measures each group on its own input slice).

    Args:
      w: ``(K, N)`` float kernel matrix (:func:`as_matrix`, after the AWQ scaling).
      xtx: ``(K, K)``. spec: as in :func:`awq_scales` (grouped or per channel).

    Returns:
      A ``QArray`` of ``w`` under ``matrix_spec(spec)`` with the clipped scales.
    """
    fn = "quant.awq_clip"
    w = jnp.asarray(w, jnp.float32)
    mspec = matrix_spec(spec)
    layout(mspec, tuple(w.shape), path=path)
    if mspec.axis is None:  # per-tensor: one range for everything, nothing to clip per group
        with at_leaf(path):
            return quantize(w, mspec)
    h = jnp.asarray(xtx, jnp.float32)
    if h.shape != (w.shape[0], w.shape[0]):
        raise ValueError(
            f"{fn}: xtx of {path!r} must be ({w.shape[0]}, {w.shape[0]}), got {h.shape}"
        )
    if not 0 <= max_shrink < 1:
        raise ValueError(f"{fn}: max_shrink must be in [0, 1), got {max_shrink!r} for {path!r}")
    s, z = _clip(w, h, mspec, n_grid, float(max_shrink))
    with at_leaf(path):
        return quantize(w, mspec, scale=s, zero_point=z if mspec.stores_zero_point else None)


@partial(jax.jit, static_argnums=(2, 3, 4))
def _clip(w, h, spec, n_grid, max_shrink):
    lay = layout(spec, tuple(w.shape))
    k, n = w.shape
    g = lay.group_size or k  # rows per group
    # A shorter last group: its filler rows are skipped by the ranges and masked out of the
    # error (and meet zero rows of the padded H block).
    v = lay.to_view(w).reshape(-1, g, n)
    groups = v.shape[0]
    hp = jnp.pad(h, [(0, groups * g - k)] * 2)
    hb = jnp.stack([hp[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(groups)])
    real = lay.mask()
    real = jnp.ones((), bool) if real is None else jnp.asarray(real.reshape(groups, g, -1))
    lo = jnp.min(jnp.where(real, v, jnp.inf), axis=1, keepdims=True)
    hi = jnp.max(jnp.where(real, v, -jnp.inf), axis=1, keepdims=True)

    def err(ratio):
        s, z = qparams_from_range(ratio * lo, ratio * hi, spec)
        d = jnp.where(real, v - fake_values(v, s, z, spec)[0], 0.0)
        return jnp.sum(d * jnp.einsum("Gij,GjN->GiN", hb, d, precision=_HI), axis=1)  # (G, N)

    ratios = 1.0 - jnp.arange(n_grid, dtype=jnp.float32) * (max_shrink / n_grid)
    errs = lax.map(err, ratios)  # (R, G, N)
    best = ratios[jnp.argmin(errs, axis=0)][:, None, :]  # (G, 1, N)
    s, z = qparams_from_range(best * lo, best * hi, spec)
    if spec.group_size is None:
        s, z = s.reshape(lay.scale_shape), z.reshape(lay.scale_shape)
    return s, z


# ----------------------------------------------------------------------- absorbing the scale


class ScaleGroup(NamedTuple):
    """Kernels that read one input ``(K,)`` channels, and what absorbs a scale of it.

    ``kernels``: paths; ``contracted``: per kernel, its contracted axes; ``absorber``: the path of
    the leaf that takes ``1/s`` (``None``: nothing found), scaled along ``absorber_axes``
    (row-major ``K`` channels).
    """

    kernels: tuple[str, ...]
    contracted: tuple[tuple[int, ...], ...]
    absorber: str | None
    absorber_axes: tuple[int, ...]
    k: int


def _scale_along(x: jax.Array, axes: Sequence[int], s: jax.Array) -> jax.Array:
    """``x`` times ``s`` ``(prod(x.shape[axes]),)`` broadcast along ``axes`` (row-major)."""
    axes = tuple(axes)
    if list(axes) != sorted(axes):
        raise ValueError(f"quant.apply_scales: axes {axes} must be increasing")
    shape = [1] * x.ndim
    for a in axes:
        shape[a] = x.shape[a]
    return (x * s.reshape(shape).astype(x.dtype)).astype(x.dtype)


@public("quant.apply_scales")
def apply_scales(params: Any, group: ScaleGroup, s: jax.Array) -> Any:
    """``params`` with the group's kernels times ``s`` on their contracted channels and the
    absorber divided by ``s``: the same function when ``group.absorber`` is not ``None``."""
    if group.absorber is None:
        raise ValueError(
            f"quant.apply_scales: the group {group.kernels} has no absorber; its scale cannot be "
            "folded without changing the function"
        )
    leaves = dict(_tree.leaves_with_paths(params))
    new = {
        p: _scale_along(leaves[p], c, s)
        for p, c in zip(group.kernels, group.contracted, strict=True)
    }
    new[group.absorber] = _scale_along(leaves[group.absorber], group.absorber_axes, 1 / s)
    flat, tree = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree.unflatten(tree, [new.get(_tree.path_str(p), x) for p, x in flat])


def _rel_close(a: Any, b: Any, tol: float) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb, strict=True))
    den = max(float(jnp.max(jnp.abs(y))) for y in lb)
    return num <= tol * max(den, 1e-30)


def _first_example(batch: Any) -> Any:
    """``batch`` cut to its first example when all its arrays share a leading size > 1."""
    leaves = jax.tree_util.tree_leaves(batch)
    sizes = {getattr(x, "shape", (None,))[:1] for x in leaves}
    if len(sizes) != 1 or sizes == {()} or next(iter(sizes))[0] in (None, 1):
        return batch
    return jax.tree.map(lambda x: x[:1], batch)


@public("quant.find_absorbers")
def find_absorbers(
    fn: Callable[..., Any],
    params: Any,
    batch: Any,
    stats: dict[str, Any],
    kernels: Sequence[str],
    *,
    tol: float = 1e-5,
    seed: int = 0,
    max_candidates: int = 8,
) -> list[ScaleGroup]:
    """Groups ``kernels`` by their common input and finds, for each group, an absorber.

    Kernels share an input when their calibration statistics (``calibrate.statistics``:
    ``sq_norm``, ``absmax``, ``count``) are identical. Candidates for a group with ``K`` input
    channels: float vectors of shape ``(K,)`` (norm scales) and kernels that run earlier whose
    output channels number ``K``, nearest in the tree first. A candidate is kept when scaling it
    by ``1/r`` and the group's kernels by ``r`` (``r`` random in ``[0.5, 2]``) leaves
    ``fn(params, batch)`` unchanged to relative ``tol``: a traced, exact check, whatever the
    framework or layout. The check runs on the batch's first example when every array of
    ``batch`` has the same leading (batch) size, and tries the ``max_candidates`` nearest
    candidates of each group (a group whose absorber is farther gets none: its kernels are
    quantized without folding, and the report says so). Cost: at most ``max_candidates`` forward
    passes of one example per group.
    """
    import jaxslim._jaxpr as _jaxpr

    uses = _jaxpr.kernel_uses(fn, params, batch)
    leaves = dict(_tree.leaves_with_paths(params))
    order = {p: us[0].index for p, us in uses.items()}
    groups: list[list[str]] = []
    for p in kernels:
        st = stats[p]
        for g in groups:
            o = stats[g[0]]
            if (
                o.sq_norm.shape == st.sq_norm.shape
                and int(o.count) == int(st.count)
                and bool(jnp.array_equal(o.sq_norm, st.sq_norm))
                and bool(jnp.array_equal(o.absmax, st.absmax))
            ):
                g.append(p)
                break
        else:
            groups.append([p])
    run = jax.jit(fn)
    batch = _first_example(batch)
    ref = run(params, batch)
    rng = np.random.default_rng(seed)
    out = []
    for g in groups:
        k = int(stats[g[0]].sq_norm.shape[-1])
        contracted = tuple(tuple(stats[p].contracted_axes) for p in g)
        first = min(order[p] for p in g)

        def closeness(path, g=g):
            a, b = path.split("/"), g[0].split("/")
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            return n

        cands = []
        for path, leaf in leaves.items():
            if path in g or not _tree.is_float_array(leaf):
                continue
            if leaf.ndim == 1 and leaf.shape[0] == k and path not in uses:
                cands.append((-closeness(path), 0, path, (0,)))
            elif path in uses and order[path] < first:
                u = uses[path][0]
                if not u.batch and math.prod(leaf.shape[a] for a in u.output) == k:
                    cands.append((-closeness(path), first - order[path], path, tuple(u.output)))
        cands.sort()
        cands = cands[:max_candidates]
        r = jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32)
        found = ScaleGroup(tuple(g), contracted, None, (), k)
        for _, _, path, axes in cands:
            trial = ScaleGroup(tuple(g), contracted, path, axes, k)
            if _rel_close(run(apply_scales(params, trial, r), batch), ref, tol):
                found = trial
                break
        out.append(found)
    return out
