"""Input statistics of every kernel of any JAX function, and sequential calibration.

One-shot compression (GPTQ, SparseGPT, Wanda, AWQ, SmoothQuant) needs, for each kernel, the
statistics of the input it multiplies. :func:`statistics` finds them for any ``fn(params, batch)``
(a plain function, Linen ``apply``, an NNX ``merge``, a Hugging Face Flax model, Equinox): it
traces ``fn`` to a jaxpr, follows each selected parameter leaf to the ``dot_general`` /
``conv_general_dilated`` it feeds (through ``jit``, ``scan``, ``cond``, ``while``, casts,
transposes and reshapes, with :mod:`jaxslim._jaxpr`), and evaluates the jaxpr once per batch,
adding up at every such site the statistics of the *other* operand.

**Layout.** A kernel ``W`` of shape ``shape`` contracts some of its axes, ``contracted_axes``,
with its input. The input is flattened to rows ``X`` of shape ``(n, k)``, ``k =
prod(shape[a] for a in contracted_axes)``, its features in the kernel's own axis order
(row-major over ``contracted_axes``), so that ``X @ W.reshape(k, -1)`` is the layer's output when
the contracted axes lead:

* Flax ``Dense`` ``(in, out)``: ``k = in``; Equinox ``(out, in)``: ``k = in``;
* an attention output kernel ``(heads, head_dim, d)`` contracted over ``(0, 1)``: ``k = heads *
  head_dim``, heads-major (the flattened ``(n, heads, head_dim)`` input);
* a convolution ``(*spatial, in, out)`` (Flax): its im2col patches, rows = batch x output
  positions, ``k = prod(spatial) * in`` in the kernel's axis order (window position major, input
  channel minor), ``contracted_axes = (0, ..., ndim - 2)``; ``conv(x, W) == X @ W.reshape(k,
  out)``. Zero padding contributes zeros. Grouped convolutions are not supported.

Then, with sums over every row of every batch::

    xtx     = X^T X            (k, k)   GPTQ / SparseGPT Hessian (divide by count for the mean)
    sq_norm = sum_rows X**2    (k,)     Wanda: ||X_j||_2 = sqrt(sq_norm_j)
    absmax  = max_rows |X|     (k,)     AWQ / SmoothQuant
    count   = n                ()       rows seen
    cross   = X^T X_ref        (k, k)   only with reference params: X_ref the same kernel's
                                        input when fn runs on the reference (QEP / GPTAQ)

**Several uses.** A kernel used at several sites (tied or shared weights, a layer called twice)
gets the *sum* over its sites (and ``absmax`` the max), as if the inputs of all sites were
stacked; its sites must contract the same kernel axes. A stacked kernel ``(L, ...)`` that a
``scan`` slices one layer per step gets statistics *per layer*: every field has leading
``lead_axes`` (here ``(L,)``); so does a kernel with ``dot_general`` batch axes (a per-head
``einsum("bhd,hdf->bhf")`` gets ``(heads, ...)``), since each slice sees its own input.

**Cost.** One forward pass per batch, compiled once per batch shape; the forward after the last
selected kernel is dead code that XLA removes. Memory: the accumulators (``k^2`` floats per
kernel, per layer of a stack; donated to each step, so updated in place, one copy) plus one
forward's activations; ``kernels=[path]`` keeps one kernel's at a time. Sharded params stay
where they are (nothing is gathered); the statistics come out with whatever sharding XLA gives
them.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxslim import _jaxpr, _tree
from jaxslim._checks import caller, count_nonfinite, public

__all__ = ["Fisher", "Stats", "fisher", "statistics", "sequential", "stream", "StreamResult"]

_HI = lax.Precision.HIGHEST


class Stats(NamedTuple):
    """Input statistics of one kernel (module docstring for the layout).

    ``xtx`` ``(*lead, k, k)``, ``sq_norm`` and ``absmax`` ``(*lead, k)`` in the accumulation
    dtype; ``count`` ``(*lead,)`` int32, the rows seen; ``contracted_axes`` the kernel axes whose
    product is ``k`` (row-major, kernel axis order); ``lead_axes`` the kernel axes with their own
    statistics (a scanned layer axis, ``dot_general`` batch axes), ``lead = [shape[a] for a in
    lead_axes]``; ``shape`` the kernel's shape. :meth:`at` gives one slice (one layer).

    A ``NamedTuple``: under ``jit`` its tuple fields become traced leaves; pass the arrays, or
    keep the tuples outside.
    """

    xtx: jax.Array
    sq_norm: jax.Array
    absmax: jax.Array
    count: jax.Array
    contracted_axes: tuple[int, ...]
    lead_axes: tuple[int, ...]
    shape: tuple[int, ...]
    cross: jax.Array | None = None

    def at(self, i: int) -> Stats:
        """The statistics of slice ``i`` of the first lead axis (layer ``i`` of a scanned stack:
        those of the kernel ``w[i]`` when that axis is 0), axes renumbered for that slice.

        >>> import jax.numpy as jnp
        >>> s = Stats(jnp.ones((3, 2, 2)), jnp.ones((3, 2)), jnp.ones((3, 2)), jnp.ones(3),
        ...           (1,), (0,), (3, 2, 5))
        >>> t = s.at(1)
        >>> t.xtx.shape, t.contracted_axes, t.lead_axes, t.shape
        ((2, 2), (0,), (), (2, 5))
        """
        if not self.lead_axes:
            raise ValueError(
                f"calibrate.Stats.at: these statistics have no lead axis (kernel shape "
                f"{self.shape}); index them only when lead_axes is not empty"
            )
        a = self.lead_axes[0]

        def renumber(axes: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(b - (b > a) for b in axes if b != a)

        return Stats(
            self.xtx[i],
            self.sq_norm[i],
            self.absmax[i],
            self.count[i],
            renumber(self.contracted_axes),
            renumber(self.lead_axes),
            self.shape[:a] + self.shape[a + 1 :],
            None if self.cross is None else self.cross[i],
        )


class _Plan(NamedTuple):
    contracted: tuple[int, ...]
    lead: tuple[int, ...]
    scanned: dict  # leaf axis -> scan depth
    k: int
    lead_shape: tuple[int, ...]


def _fail(path: str, site: int, why: str) -> ValueError:
    return ValueError(
        f"{caller()}: kernel {path!r} at matmul #{site}: {why}; exclude it with where= (a regex "
        "or predicate on the path)"
    )


def _plan_use(u: _jaxpr.KernelUse, shape: tuple[int, ...]) -> _Plan:
    if u.primitive == "conv_general_dilated":
        if u.operand != 1:
            raise _fail(u.path, u.index, "it is the convolution's input, not its kernel")
        contracted, batch = _union(u.contracted, u.spatial), ()
    else:
        contracted, batch = u.contracted, u.batch
    if not contracted:
        raise _fail(u.path, u.index, "no kernel axis is contracted (an outer product)")
    scanned: dict[int, int] = {}
    for group, depth, length in u.scanned:
        if len(group) != 1 or shape[group[0]] != length:
            raise _fail(
                u.path,
                u.index,
                f"a scan of length {length} slices its axes {group} (shape {shape}); only a scan "
                "over one whole kernel axis gets per-layer statistics",
            )
        scanned[group[0]] = depth
    other = [a for a in u.indexed if a not in scanned and shape[a] > 1]
    if other:
        raise _fail(
            u.path,
            u.index,
            f"its axes {tuple(other)} are indexed outside a scan (w[i]), so statistics cannot be "
            "assigned to a slice; scan over the stacked axis or split the stack into leaves",
        )
    lead = _union(batch, tuple(scanned))
    if set(lead) & set(contracted):
        raise _fail(u.path, u.index, f"axes {contracted} are both contracted and batch")
    k = math.prod(shape[a] for a in contracted)
    return _Plan(contracted, lead, scanned, k, tuple(shape[a] for a in lead))


def _union(*groups: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted({a for g in groups for a in g}))


def _feature_order(u, kdims, sizes, contracted) -> list[int]:
    """Positions ``i`` of ``kdims`` (kernel-operand dims) sorted so that flattening them row-major
    gives the kernel's contracted axes row-major; raises where no order does."""
    keyed = []
    for i, d in enumerate(kdims):
        group = u.axes[d] if u.axes else ()
        if not group:
            if sizes[d] != 1:
                raise _fail(u.path, u.index, "a contracted axis is broadcast")
            continue
        keyed.append((group[0], i, group))
    keyed.sort(key=lambda t: (t[0], t[1]))
    flat: list[int] = []
    for _, _, group in keyed:
        if flat[-len(group) :] != list(group):
            flat.extend(group)
    if flat != sorted(set(flat)) or tuple(flat) != tuple(contracted):
        raise _fail(
            u.path,
            u.index,
            f"its contracted axes {contracted} reach the matmul permuted and merged by a reshape "
            f"(operand axes {[u.axes[d] for d in kdims]}); keep the kernel's own axis order",
        )
    return [i for _, i, _ in keyed]


def _rows(call: _jaxpr.Hooked, u: _jaxpr.KernelUse, plan: _Plan) -> jax.Array:
    """The input of kernel use ``u`` at this site as ``(*batch_lead, n, k)``."""
    eqn, w = call.eqn, call.operands[u.operand]
    x = call.operands[1 - u.operand]
    if u.primitive == "conv_general_dilated":
        p = eqn.params
        if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
            raise _fail(u.path, u.index, "grouped convolutions are not supported")
        dn = p["dimension_numbers"]
        spatial = sorted(dn.rhs_spec[2:])
        patches = lax.conv_general_dilated_patches(
            x,
            [w.shape[d] for d in spatial],
            p["window_strides"],
            p["padding"],
            p.get("lhs_dilation"),
            p.get("rhs_dilation"),
            dn,
            precision=_HI,
        )
        patches = jnp.moveaxis(patches, dn.out_spec[1], -1)
        lead_shape = patches.shape[:-1]
        x = patches.reshape(*lead_shape, w.shape[dn.rhs_spec[1]], *[w.shape[d] for d in spatial])
        nb = len(lead_shape)
        kdims = [dn.rhs_spec[1], *spatial]
        xf = [nb + i for i in range(len(kdims))]
        kb, xb = [], []
    else:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        kdims, xf = (list(lc), list(rc)) if u.operand == 0 else (list(rc), list(lc))
        kb, xb = (list(lb), list(rb)) if u.operand == 0 else (list(rb), list(lb))
    order = _feature_order(u, kdims, w.shape, plan.contracted)
    feats = [xf[i] for i in order]
    batch = sorted(range(len(kb)), key=lambda i: u.axes[kb[i]] if u.axes else i)
    bdims = [xb[i] for i in batch]
    rest = [d for d in range(x.ndim) if d not in feats and d not in bdims]
    x = jnp.transpose(x, [*bdims, *rest, *feats])
    k = math.prod(x.shape[x.ndim - len(feats) :]) if feats else 1
    if k != plan.k:
        raise _fail(u.path, u.index, f"the matmul contracts {k} of its {plan.k} inputs")
    return x.reshape(*x.shape[: len(bdims)], -1, k)


def _replicated(x: jax.Array) -> Any:
    """Under a mesh with ``Explicit`` axes (where the sharding of a result is part of its type),
    the replicated sharding the statistics are accumulated in (all-reduced over the rows'
    shards); ``None`` otherwise (XLA chooses)."""
    try:
        mesh = jax.typeof(x).sharding.mesh
    except AttributeError:
        return None
    if not any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


_PAIR = "jaxslim_reference"  # the vmapped axis of (params, reference) in a cross step


def _make_hook(plans: dict[str, _Plan], dtype: Any, pair: bool = False):
    def hook(state, call: _jaxpr.Hooked):
        acc, ok = state
        for u in call.kernels:
            plan = plans.get(u.path)
            if plan is None:
                continue
            x = _rows(call, u, plan).astype(dtype)
            whole = _replicated(x)
            xtx = jnp.einsum("...nk,...nl->...kl", x, x, precision=_HI, out_sharding=whole)
            if pair:  # the same site's rows on the params (0) and on the reference (1)
                both = lax.all_gather(x, _PAIR)
                cross = jnp.einsum(
                    "...nk,...nl->...kl", both[0], both[1], precision=_HI, out_sharding=whole
                )
            sq = jnp.sum(x * x, axis=-2)
            am = jnp.max(jnp.abs(x), axis=-2, initial=jnp.zeros((), dtype))
            if whole is not None:
                sq, am = jax.sharding.reshard(sq, whole), jax.sharding.reshard(am, whole)
            n = jnp.int32(x.shape[-2])
            idx = tuple(
                call.scan_index[plan.scanned[a]] if a in plan.scanned else slice(None)
                for a in plan.lead
            )
            a_xtx, a_sq, a_am, a_n, *a_cross = acc[u.path]
            acc = {
                **acc,
                u.path: (
                    a_xtx.at[idx].add(xtx),
                    a_sq.at[idx].add(sq),
                    a_am.at[idx].max(am),
                    a_n.at[idx].add(n),
                    *([a_cross[0].at[idx].add(cross)] if pair else []),
                ),
            }
            ok = {**ok, u.path: ok[u.path] & jnp.all(jnp.isfinite(x))}
        return acc, ok

    return hook


def _signature(batch: Any) -> Any:
    leaves, tree = jax.tree.flatten(batch)
    return tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves)


def _select(params, where, kernels) -> list[str]:
    paths = _tree.selected_paths(params, where)
    if isinstance(kernels, str):
        if kernels != "all":
            raise ValueError(
                f"{caller()}: kernels must be 'all' or a sequence of kernel paths, got the string "
                f"{kernels!r}; write kernels=[{kernels!r}]"
            )
        return paths
    wanted = list(kernels)
    missing = [p for p in wanted if p not in paths]
    if missing:
        raise ValueError(
            f"{caller()}: kernels {missing} are not floating-point leaves selected by "
            f"where={where!r}; selected leaves are {paths[:8]}{' ...' if len(paths) > 8 else ''}"
        )
    return wanted


class _Compiled(NamedTuple):
    traced: _jaxpr.Traced
    uses: dict


def _trace(fn, params, batch, b) -> _Compiled:
    try:
        t = _jaxpr.make_jaxpr(fn, params, batch)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{e} (batch {b})") from e
    return _Compiled(t, _jaxpr.kernel_uses_of(t))


def _statistics(
    fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    where: _tree.Where,
    kernels: str | Sequence[str],
    dtype: Any,
    reference: Any = None,
    reference_batches: Sequence[Any] | None = None,
) -> dict[str, Stats]:
    strict = where is not None or not isinstance(kernels, str)
    selected = _select(params, where, kernels)
    leaves = dict(_tree.leaves_with_paths(params))
    param_leaves = [x for _, x in _tree.leaves_with_paths(params)]
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{caller()}: dtype must be a floating-point dtype, got {dtype}")
    crossed = reference is not None or reference_batches is not None
    pair, differ, batch_differ = crossed, (), False
    if crossed:
        batches = list(batches)
        ref_batches = _reference_batches(batches, reference_batches)
        ref_leaves = param_leaves if reference is None else _reference_leaves(params, reference)
        differ = tuple(a is not b for a, b in zip(param_leaves, ref_leaves, strict=True))
        batch_differ = any(r is not b for r, b in zip(ref_batches, batches, strict=True))
        # only the leaves that differ travel twice (stacked inside the step, never kept)
        param_leaves = [
            (a, b) if d else a for a, b, d in zip(param_leaves, ref_leaves, differ, strict=True)
        ]
        if not any(differ) and not batch_differ:  # the same model and inputs: cross = xtx
            pair, differ = False, ()
    compiled: dict[Any, tuple[_Compiled, Any]] = {}
    plans: dict[str, _Plan] | None = None
    acc = None
    b = -1
    shapes = _param_signature(params)
    for b, batch in enumerate(batches):
        sig = _signature(batch)
        if sig not in compiled:
            key = _step_key(fn, shapes, sig, selected, strict, dtype, (differ, batch_differ))
            hit = _STEPS.get(key) if key is not None else None
            if hit is not None:
                _STEPS.move_to_end(key)
            else:
                c = _trace(fn, params, batch, b)
                own = _make_plans(c.uses, selected, leaves, strict)
                hook = _make_hook(own, dtype, pair)
                step_fn = _jit_pair_step(c.traced, hook, differ, batch_differ) if pair else None
                hit = (c, step_fn or _jit_step(c.traced, hook), own)
                _remember(key, hit)
            c, step, own = hit
            if plans is None:
                plans = own
            _check_uses(c.uses, plans, leaves)
            compiled[sig] = (c, step)
        c, step = compiled[sig]
        if acc is None:
            acc = _zeros(plans, dtype, pair)
        batch_leaves = jax.tree.leaves(batch)
        if batch_differ:
            refs = _paired_leaves(batch, ref_batches[b], b)
            batch_leaves = list(zip(batch_leaves, refs, strict=True))
        acc, ok = step(param_leaves, list(c.traced.consts), acc, batch_leaves)
        bad = [p for p, flag in jax.device_get(ok).items() if not bool(flag)]
        if bad:
            raise ValueError(
                f"{caller()}: the input of kernel {bad[0]!r} is not finite (NaN or inf) in batch "
                f"{b}; check that batch and the parameters used before this kernel"
            )
    if acc is None or plans is None:
        raise ValueError(f"{caller()}: batches is empty; pass at least one calibration batch")
    out = {}
    for p, pl in plans.items():
        xtx, sq, am, n, *cross = acc[p]
        if not bool(jnp.all(n > 0)):
            raise ValueError(
                f"{caller()}: kernel {p!r} was reached by none of the {b + 1} batches (counts "
                f"{np.asarray(n).tolist()}, per {pl.lead or 'kernel'}): it sits in a branch or "
                "loop the calibration data never ran; exclude it with where="
            )
        shape = tuple(np.shape(leaves[p]))
        if crossed and not cross:
            cross = [xtx]
        out[p] = Stats(xtx, sq, am, n, pl.contracted, pl.lead, shape, *cross)
    return out


def _reference_batches(batches: list[Any], reference_batches: Any) -> list[Any]:
    if reference_batches is None:
        return batches
    refs = list(reference_batches)
    if len(refs) != len(batches):
        raise ValueError(
            f"{caller()}: reference_batches has {len(refs)} batches and batches {len(batches)}; "
            "pass the reference model's inputs for the same batches, in the same order"
        )
    return refs


def _paired_leaves(batch: Any, ref: Any, b: int) -> list[Any]:
    if _signature(batch) != _signature(ref):
        (t_ref, s_ref), (t_b, s_b) = _signature(ref), _signature(batch)
        raise ValueError(
            f"{caller()}: reference batch {b} is {t_ref} with shapes {s_ref}, batch {b} is {t_b} "
            f"with {s_b}; the reference model's inputs must match batch by batch"
        )
    return jax.tree.leaves(ref)


def _reference_leaves(params: Any, reference: Any) -> list[Any]:
    """``reference``'s leaves, checked against ``params``'s tree, shapes and dtypes."""
    mine = _tree.leaves_with_paths(params)
    try:
        flat, tree = jax.tree.flatten(reference)
        same = tree == jax.tree.structure(params)
    except Exception:  # noqa: BLE001 - any unflattenable value
        same = False
    if not same:
        raise ValueError(
            f"{caller()}: reference must have the tree structure of params (the same model "
            f"before compression), got {type(reference).__name__} with a different structure"
        )
    for (path, a), b in zip(mine, flat, strict=True):
        if np.shape(a) != np.shape(b) or getattr(a, "dtype", None) != getattr(b, "dtype", None):
            raise ValueError(
                f"{caller()}: reference leaf {path!r} is {getattr(b, 'dtype', type(b))}"
                f"{list(np.shape(b))}, params holds {getattr(a, 'dtype', type(a))}"
                f"{list(np.shape(a))}; pass the uncompressed params of the same model"
            )
    return flat


# Compiled accumulation steps, reused across calls: `sequential` (and `stream`, block after block
# of the same shapes) asks for the same kernel of the same function many times; each new jit of
# the hooked jaxpr would compile again. Keyed by the function object itself (as `jax.jit`
# caches: a function is assumed to trace the same for the same shapes), the parameter and batch
# shapes / dtypes / shardings, the kernels and the dtype; a few entries, least recently used
# dropped first.
_STEPS: collections.OrderedDict[Any, tuple[_Compiled, Any, dict]] = collections.OrderedDict()
_STEPS_MAX = 16


def _param_signature(params: Any) -> Any:
    leaves, tree = jax.tree.flatten(params)
    return tree, tuple(
        (np.shape(x), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None))
        for x in leaves
    )


def _step_key(fn, shapes, sig, selected, strict, dtype, differ=()) -> Any:
    key = (fn, shapes, sig, tuple(selected), strict, jnp.dtype(dtype).name, differ)
    try:
        hash(key)
    except TypeError:  # an unhashable callable or sharding: compile for this call only
        return None
    return key


def _remember(key: Any, entry: tuple[_Compiled, Any, dict]) -> None:
    if key is None:
        return
    _STEPS[key] = entry
    _STEPS.move_to_end(key)
    while len(_STEPS) > _STEPS_MAX:
        _STEPS.popitem(last=False)


def _make_plans(uses, selected, leaves, strict) -> dict[str, _Plan]:
    if strict:
        unused = [p for p in selected if p not in uses]
        if unused:
            raise ValueError(
                f"{caller()}: kernel {unused[0]!r} feeds no dot_general or convolution of fn "
                "(used elementwise, as a gather table, or not at all), so no batch reaches it as "
                f"a kernel; kernels found: {list(uses)[:8]}. Exclude it with where="
            )
    chosen = set(selected)
    return {p: _plan_path(u, leaves[p]) for p, u in uses.items() if p in chosen}


def _plan_path(uses, leaf) -> _Plan:
    shape = tuple(np.shape(leaf))
    plans = [(u, _plan_use(u, shape)) for u in uses]
    u0, p0 = plans[0]
    for u, p in plans[1:]:
        if (p.contracted, p.lead) != (p0.contracted, p0.lead):
            raise _fail(
                u.path,
                u.index,
                f"it contracts axes {p.contracted} (per-slice axes {p.lead}) here but "
                f"{p0.contracted} ({p0.lead}) at matmul #{u0.index}; statistics of different "
                "layouts cannot be summed",
            )
    return p0


def _check_uses(uses, plans, leaves) -> None:
    for p, pl in plans.items():
        if p in uses:
            q = _plan_path(uses[p], leaves[p])
            if (q.contracted, q.lead) != (pl.contracted, pl.lead):
                raise ValueError(
                    f"{caller()}: kernel {p!r} is used differently for this batch shape "
                    f"(contracted {q.contracted} vs {pl.contracted}); use one batch shape"
                )


def _make_step(t: _jaxpr.Traced, hook):
    def step(param_leaves, consts, acc, batch_leaves):
        ok = {p: jnp.bool_(True) for p in acc}
        _, (acc, ok) = _jaxpr.eval_jaxpr(
            t.jaxpr,
            consts,
            *param_leaves,
            *batch_leaves,
            hook=hook,
            state=(acc, ok),
            labels=t.labels,
        )
        return acc, ok

    return step


def _jit_step(t: _jaxpr.Traced, hook):
    """The jitted accumulation step ``(param_leaves, consts, acc, batch_leaves) -> (acc, ok)``.

    ``acc`` (argument 2) is donated: XLA writes the new sums into the old buffers, so one copy
    of every kernel's accumulators is alive during a step, not the old and the new one (with all
    kernels at once that second copy was the whole ``sum k^2`` again). The caller must not read
    an ``acc`` after passing it.
    """
    return jax.jit(_make_step(t, hook), donate_argnums=(2,))


def _jit_pair_step(t: _jaxpr.Traced, hook, differ: tuple[bool, ...], batch_differ: bool):
    """The accumulation step evaluated on the params and the reference at once: ``fn`` vmapped
    over a pair axis (``_PAIR``) that only the leaves that differ carry (stacked inside the
    step; the batch's leaves too with reference batches), so the hook sees a site's rows under
    both and accumulates their cross product. The statistics returned are the params' (pair
    member 0)."""
    inner = _make_step(t, hook)

    def step(param_leaves, consts, acc, batch_leaves):
        leaves = [jnp.stack(x) if d else x for x, d in zip(param_leaves, differ, strict=True)]
        axes = [0 if d else None for d in differ]
        if batch_differ:
            batch_leaves = [jnp.stack(x) for x in batch_leaves]
        acc, ok = jax.vmap(
            lambda ls, a, bl: inner(ls, consts, a, bl),
            in_axes=(axes, None, 0 if batch_differ else None),
            axis_name=_PAIR,
        )(leaves, acc, batch_leaves)
        first = jax.tree.map(lambda v: v[0], acc)
        return first, {p: jnp.all(v) for p, v in ok.items()}

    return jax.jit(step, donate_argnums=(2,))


def _zeros(plans: dict[str, _Plan], dtype: Any, pair: bool = False) -> dict:
    """Fresh accumulators ``(xtx, sq_norm, absmax, count[, cross])`` per kernel."""
    return {
        p: (
            jnp.zeros((*pl.lead_shape, pl.k, pl.k), dtype),
            jnp.zeros((*pl.lead_shape, pl.k), dtype),
            jnp.zeros((*pl.lead_shape, pl.k), dtype),
            jnp.zeros(pl.lead_shape, jnp.int32),
            *([jnp.zeros((*pl.lead_shape, pl.k, pl.k), dtype)] if pair else []),
        )
        for p, pl in plans.items()
    }


@public("calibrate.statistics")
def statistics(
    fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    *,
    where: _tree.Where = None,
    kernels: Literal["all"] | Sequence[str] = "all",
    dtype: Any = jnp.float32,
    reference: Any = None,
    reference_batches: Sequence[Any] | None = None,
) -> dict[str, Stats]:
    """Input statistics of every kernel of ``fn(params, batch)``, summed over ``batches``.

    A *kernel* is a parameter leaf selected by ``where`` that is an operand of a ``dot_general``
    or ``conv_general_dilated`` of ``fn`` (found in its jaxpr, through ``jit``/``scan``/``cond``/
    ``while`` and module code). For each, the other operand at each of its sites is flattened to
    rows ``X`` ``(n, k)``, features in the kernel's contracted-axis order (module docstring), and
    ``X^T X``, ``sum X**2``, ``max |X|`` (over rows) and ``n`` are accumulated in ``dtype``.

    Args:
      fn: ``fn(params, batch)``, traceable by jax; its output is not used.
      params: the parameter pytree ``fn`` reads (dicts, Linen params, NNX state, ...); arrays may
        be sharded.
      batches: an iterable of calibration batches, each passed as ``fn``'s second argument; one
        compilation per distinct batch shape.
      where: which leaves are kernels: ``None`` (floating leaves of ndim >= 2 that feed a matmul;
        others, e.g. an embedding table used only by a gather, are skipped), a regex, or a
        predicate ``(path, leaf) -> bool``. With an explicit ``where``, every selected leaf must
        feed a matmul.
      kernels: ``"all"`` or a list of paths (among those selected) to accumulate; only their
        accumulators are allocated, so ``kernels=[path]`` in a loop holds one at a time.
      dtype: accumulation dtype (float32; float64 needs ``jax_enable_x64``).
      reference: other params of the same tree, shapes and dtypes (the model before
        compression): ``Stats.cross`` is then ``X^T X_ref``, with ``X_ref`` the kernel's input
        when ``fn`` runs on ``reference`` with the same batch (what QEP / GPTAQ fit against).
        Both run in one step (``fn`` vmapped over the pair; only the leaves that differ, by
        identity, are carried twice, stacked inside the step; the accumulators are held for
        both, so four ``k x k`` buffers per kernel instead of one). Control flow that depends
        on the params (a ``cond`` predicate that differs between the two) is evaluated as a
        select under the vmap: the rows of a branch one model did not take are paired too.
      reference_batches: the reference's own inputs, one per batch of the same shapes (when
        ``fn`` is a block of a model whose earlier blocks were compressed: the float model's
        activations at this block); default ``batches``. Either argument gives ``cross``.

    Returns:
      ``{path: Stats}`` in execution order of first use.

    Raises ``ValueError`` (naming the kernel and the batch) on a non-finite input of a kernel, on
    empty ``batches``, on a selected leaf that feeds no matmul or a kernel that no batch reached,
    on a layout it cannot flatten (a grouped convolution, a kernel indexed as ``w[i]`` in a Python
    loop); ``fn`` failing on a batch is re-raised naming ``fn`` and the batch index.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    >>> fn = lambda p, x: x @ p["w"] + p["b"][None]  # "b" (ndim 1) is not a kernel
    >>> s = statistics(fn, params, [jnp.array([[1.0, 2.0]]), jnp.array([[3.0, -1.0]])])
    >>> s["w"].xtx.tolist(), s["w"].sq_norm.tolist(), s["w"].absmax.tolist(), int(s["w"].count)
    ([[10.0, -1.0], [-1.0, 5.0]], [10.0, 5.0], [3.0, 2.0], 2)
    >>> f2 = lambda p, x: (x @ p["a"]) @ p["b"]  # "b" sees x @ a: 2 here, 3 on the reference
    >>> p2 = {"a": jnp.full((1, 1), 2.0), "b": jnp.ones((1, 1))}
    >>> ref = {"a": jnp.full((1, 1), 3.0), "b": p2["b"]}
    >>> statistics(f2, p2, [jnp.ones((1, 1))], reference=ref)["b"].cross.tolist()
    [[6.0]]
    """
    return _statistics(fn, params, batches, where, kernels, dtype, reference, reference_batches)


class Fisher(NamedTuple):
    """The empirical Fisher diagonal of one parameter leaf (:func:`fisher`).

    ``diag`` (the leaf's shape, float32) is ``sum_b (d loss_b / d w)**2`` over the ``count``
    batches; ``diag / count`` estimates ``E[g**2]``, the diagonal of the Fisher information (of
    the Hessian of the loss at a minimum). A ``NamedTuple``: under ``jit`` its fields are leaves.
    """

    diag: jax.Array
    count: int


def _fisher_step(loss_fn: Callable[..., Any], treedef: Any, idx: tuple[int, ...]):
    @functools.partial(jax.jit, donate_argnums=(2,))
    def step(sel, rest, acc, batch):
        def loss(sel):
            full = list(rest)
            for i, x in zip(idx, sel, strict=True):
                full[i] = x
            return loss_fn(jax.tree_util.tree_unflatten(treedef, full), batch)

        val, g = jax.value_and_grad(loss)(sel)
        return val, [a + jnp.square(x.astype(jnp.float32)) for a, x in zip(acc, g, strict=True)]

    return step


@public("calibrate.fisher")
def fisher(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batches: Iterable[Any],
    *,
    where: _tree.Where = None,
) -> dict[str, Fisher]:
    """The empirical Fisher diagonal of the selected leaves: squared gradients summed over batches.

    For each selected leaf ``w`` and each batch ``b``, ``g_b = d loss_fn(params, batch_b) / d w``
    (one ``jax.value_and_grad``, jitted once per batch shape); then::

        diag = sum_b g_b ** 2      (w's shape, float32),      count = number of batches

    Each batch is one sample of the gradient: a batch of one sequence gives the per-sample
    estimate that SqueezeLLM and HAWQ-style sensitivity use; larger batches average the
    gradient first (cheaper, noisier in the other direction). :func:`jaxslim.quant.sensitivities`
    turns it into the predicted loss increase of a weight perturbation ``D``,
    ``0.5 * sum(diag / count * D**2)`` (a second-order Taylor expansion around a minimum, with
    the diagonal empirical Fisher standing in for the Hessian), which ``quant.allocate`` uses to
    pick a format per kernel.

    Cost: one forward and backward pass per batch (compiled once per batch shape). Memory: the
    float32 accumulators (the selected leaves' size in float32) plus one backward pass's
    activations and the selected leaves' gradients (only those are computed: select part of a
    large model at a time with ``where=``).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (float), differentiable in the selected
        leaves, e.g. the summed next-token negative log-likelihood of a language model.
      params: the parameter pytree; arrays may be sharded (the squares of the gradients stay
        sharded like them: nothing is gathered).
      batches: an iterable of batches, each passed as ``loss_fn``'s second argument.
      where: which leaves (``None``: every floating leaf that :func:`statistics` would call a
        kernel: a matrix, or a higher-rank leaf with two axes > 1; a regex; a predicate
        ``(path, leaf) -> bool``). Gradients of the other leaves are not computed.

    Returns:
      ``{path: Fisher(diag, count)}`` in ``jax.tree`` order.

    Raises ``TypeError`` when ``loss_fn`` is not callable or does not return a float scalar,
    ``ValueError`` on empty ``batches``, a non-finite loss (naming the batch) or a non-finite
    gradient (naming the leaf); ``loss_fn`` failing on a batch is re-raised naming the batch.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.array([[1.0], [2.0]])}
    >>> loss = lambda p, x: jnp.sum(x @ p["w"])  # d/dw = x summed over rows
    >>> f = fisher(loss, params, [jnp.array([[1.0, 0.0]]), jnp.array([[3.0, 1.0]])])
    >>> f["w"].diag.tolist(), f["w"].count  # 1**2 + 3**2, 0**2 + 1**2
    ([[10.0], [1.0]], 2)
    """
    if not callable(loss_fn):
        raise TypeError(
            f"{caller()}: loss_fn must be a callable loss_fn(params, batch) -> scalar, got "
            f"{type(loss_fn).__name__} {loss_fn!r}"
        )
    _tree.reject_traced(params, why="it evaluates the gradient on every batch")
    paths = set(_tree.selected_paths(params, where))
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [_tree.path_str(p) for p, _ in flat]
    idx = tuple(i for i, n in enumerate(names) if n in paths)
    sel = [flat[i][1] for i in idx]
    rest = [None if i in idx else x for i, (_, x) in enumerate(flat)]
    step = _fisher_step(loss_fn, treedef, idx)
    acc, count, checked = None, 0, set()
    for b, batch in enumerate(batches):
        sig = _signature(batch)
        if sig not in checked:
            try:
                out = jax.eval_shape(loss_fn, params, batch)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{caller()}: loss_fn failed on batch {b}: {e}") from e
            if (
                not hasattr(out, "shape")
                or out.shape != ()
                or not jnp.issubdtype(out.dtype, jnp.floating)
            ):
                raise TypeError(
                    f"{caller()}: loss_fn must return a float scalar, got "
                    f"{getattr(out, 'dtype', type(out).__name__)} "
                    f"{getattr(out, 'shape', '')} on batch {b}; reduce the loss (e.g. jnp.sum)"
                )
            checked.add(sig)
        if acc is None:  # zeros_like keeps each leaf's sharding: nothing is gathered
            acc = [jnp.zeros_like(x, dtype=jnp.float32) for x in sel]
        val, acc = step(sel, rest, acc, batch)
        if not math.isfinite(float(val)):
            raise ValueError(
                f"{caller()}: the loss is {float(val)} on batch {b}; check that batch and the "
                "parameters (a non-finite loss has no usable gradient)"
            )
        count += 1
    if acc is None:
        raise ValueError(f"{caller()}: batches is empty; pass at least one batch")
    result = {}
    for i, a in zip(idx, acc, strict=True):
        bad = count_nonfinite(a)
        if bad:
            raise ValueError(
                f"{caller()}: the gradient of {names[i]!r} has {bad} non-finite squared entries "
                "(NaN or inf, e.g. an overflow in float16); compute the loss in float32"
            )
        result[names[i]] = Fisher(a, count)
    return result


def _replace(params: Any, path: str, value: Any) -> Any:
    flat, tree = jax.tree_util.tree_flatten_with_path(params)
    leaves = [value if _tree.path_str(p) == path else x for p, x in flat]
    return jax.tree.unflatten(tree, leaves)


@public("calibrate.sequential")
def sequential(
    fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    compress: Callable[[str, jax.Array, Stats], jax.Array],
    *,
    where: _tree.Where = None,
    order: Literal["execution"] | Sequence[str] = "execution",
    dtype: Any = jnp.float32,
    cross: bool = False,
    reference_batches: Sequence[Any] | None = None,
) -> Any:
    """Compresses kernels one at a time, each calibrated on the already-compressed earlier ones.

    For each kernel path in ``order``: its :class:`Stats` are computed by :func:`statistics` with
    the *current* params (earlier kernels already replaced), then ``w_new = compress(path, w,
    stats)`` replaces it. This is how GPTQ and SparseGPT calibrate: a layer is fitted to the
    inputs it will actually see after the layers before it were compressed.

    ``compress`` must return a floating-point array of ``w``'s shape and dtype (dequantize a
    ``QArray`` first, e.g. with ``quant.dequantize``); the result gets ``w``'s sharding back.

    A stacked kernel that a ``scan`` slices is compressed at once (all layers, per-layer
    ``Stats``): layers inside one stack are not calibrated on each other.

    Cost: one forward pass per kernel and batch (from the inputs each time; the forward after
    the kernel is removed by XLA) and one compilation per kernel and batch shape. ``batches`` is
    read into a list once.

    Args:
      fn, params, batches, where, dtype: as for :func:`statistics`.
      compress: ``compress(path, w, stats) -> w_new``.
      order: ``"execution"`` (first use in ``fn``, the order of :func:`jaxslim._jaxpr.sites`) or
        an explicit sequence of kernel paths.
      cross: also give each kernel ``Stats.cross = X^T X_ref``, its input on the partly
        compressed model against its input on the original ``params`` (the float model), for
        methods that fit the float outputs from the compressed inputs (``quant.qep_correct``).
        Doubles each pass (both models run); the compressed kernels so far are held twice
        inside a step.
      reference_batches: with ``cross``, the float model's own inputs to ``fn``, one per batch
        (``fn`` a block whose input differs in the float model: ``stream(..., reference=True)``
        gives them); default ``batches``.

    Returns:
      ``params`` with every kernel replaced, same tree structure.

    >>> import jax.numpy as jnp
    >>> params = {"a": jnp.full((2, 2), 0.6), "b": jnp.eye(2)}
    >>> fn = lambda p, x: (x @ p["a"]) @ p["b"]
    >>> seen = []
    >>> def compress(path, w, stats):
    ...     seen.append((path, stats.xtx.tolist()))
    ...     return jnp.round(w)
    >>> new = sequential(fn, params, [jnp.ones((1, 2))], compress)
    >>> seen  # "b" sees x @ round(a) = [2, 2], not x @ a = [1.2, 1.2]
    [('a', [[1.0, 1.0], [1.0, 1.0]]), ('b', [[4.0, 4.0], [4.0, 4.0]])]
    """
    name = caller()
    if not callable(compress):
        raise TypeError(f"{name}: compress must be a callable compress(path, w, stats)")
    if not isinstance(cross, bool):
        raise TypeError(f"{name}: cross must be a bool, got {cross!r}")
    if reference_batches is not None and not cross:
        raise ValueError(f"{name}: reference_batches is only read with cross=True")
    reference = params if cross else None
    batches = list(batches)
    refs = None if reference_batches is None else _reference_batches(batches, reference_batches)
    if not batches:
        raise ValueError(f"{name}: batches is empty; pass at least one calibration batch")
    selected = _tree.selected_paths(params, where)
    if isinstance(order, str):
        if order != "execution":
            raise ValueError(
                f"{name}: order must be 'execution' or a sequence of kernel paths, got {order!r}"
            )
        uses = _trace(fn, params, batches[0], 0).uses
        chosen = set(selected)
        paths = [p for p in uses if p in chosen]
        if where is not None:
            _make_plans(uses, selected, dict(_tree.leaves_with_paths(params)), True)
    else:
        paths = list(order)
    for path in paths:
        stats = _statistics(fn, params, batches, where, [path], dtype, reference, refs)[path]
        w = dict(_tree.leaves_with_paths(params))[path]
        w_new = compress(path, w, stats)
        if not isinstance(w_new, jax.Array | np.ndarray):
            raise TypeError(
                f"{name}: compress returned a {type(w_new).__name__} for {path!r}; return a "
                "floating-point array (dequantize a QArray first)"
            )
        if w_new.shape != w.shape or w_new.dtype != w.dtype:
            raise ValueError(
                f"{name}: compress returned {w_new.dtype}{list(w_new.shape)} for {path!r}, "
                f"expected {w.dtype}{list(w.shape)}"
            )
        if count_nonfinite(w_new):
            raise ValueError(f"{name}: compress returned non-finite values for {path!r}")
        if isinstance(w, jax.Array) and w_new.sharding != w.sharding:
            w_new = jax.device_put(w_new, w.sharding)
        params = _replace(params, path, w_new)
    return params


# ---------------------------------------------------------------------------------------------
# Block streaming


class StreamResult(NamedTuple):
    """What :func:`stream` did.

    ``names`` the blocks in order; ``blocks`` the compressed params of every block when there is
    no ``out`` directory (``None`` otherwise: they are in the files); ``reports`` the second
    value ``compress_block`` returned, per block compressed in this run; ``resumed`` the blocks
    read back from ``out`` instead (a restarted run); ``hidden`` the calibration activations after
    the last block; ``seconds`` per block compressed in this run (load, compress, forward, write);
    ``peak_rss`` the process's peak resident memory in bytes (``getrusage``; 0 where unknown).
    """

    names: tuple[str, ...]
    blocks: list[Any] | None
    reports: dict[str, Any]
    resumed: tuple[str, ...]
    hidden: list[Any]
    seconds: dict[str, float]
    peak_rss: int


_MANIFEST = "manifest.json"
_STREAM_FORMAT, _STREAM_VERSION = "jaxslim.stream", 1
_BLOCK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def peak_rss() -> int:
    """The process's peak resident set size in bytes (``resource.getrusage``), 0 where unknown."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def fingerprint(batches: Sequence[Any]) -> str:
    """sha256 over the tree structure, shapes, dtypes and bytes of every leaf of ``batches`` (the
    calibration hash a :func:`stream` manifest records)."""
    h = hashlib.sha256()
    for b in batches:
        leaves, tree = jax.tree.flatten(b)
        h.update(str(tree).encode())
        for x in leaves:
            a = np.asarray(x)
            h.update(f"{a.shape}{a.dtype.str}".encode())
            h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
    return h.hexdigest()


def _atomic_json(path: str, obj: Any) -> None:
    tmp = f"{path}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _describe(obj: Any) -> str:
    if isinstance(obj, types.FunctionType):  # its repr holds an address that changes per run
        return f"<function {obj.__module__}.{obj.__qualname__}>"
    return repr(obj)


def _canonical(obj: Any) -> Any:
    """``obj`` as the JSON a manifest stores (records and other objects by their ``repr``,
    functions by their qualified name)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_describe))


def _open_manifest(out: str, recipe: Any, calib: str, names: Sequence[str], fn: str) -> list[str]:
    """Creates ``out`` and its manifest, or checks an existing one; returns the blocks done."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, _MANIFEST)
    want = {
        "format": _STREAM_FORMAT,
        "version": _STREAM_VERSION,
        "recipe": _canonical(recipe),
        "calibration": calib,
        "blocks": list(names),
        "done": [],
    }
    if not os.path.exists(path):
        if any(not n.startswith(".") for n in os.listdir(out)):
            raise ValueError(
                f"{fn}: {out!r} is not empty and has no {_MANIFEST}; write to a new or empty "
                "directory (or one a previous run of the same recipe left)"
            )
        _atomic_json(path, want)
        return []
    try:
        with open(path, encoding="utf-8") as f:
            have = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{fn}: {path!r} is not a readable manifest ({e})") from None
    if not isinstance(have, dict) or have.get("format") != _STREAM_FORMAT:
        raise ValueError(f"{fn}: {path!r} is not a {_STREAM_FORMAT} manifest")
    for key, what in (
        ("recipe", "recipe"),
        ("calibration", "calibration data (hash)"),
        ("blocks", "block list"),
    ):
        if have.get(key) != want[key]:
            raise ValueError(
                f"{fn}: {out!r} holds a run with a different {what}: the manifest has "
                f"{have.get(key)!r}, this run {want[key]!r}; use another directory, or delete "
                "this one to start over"
            )
    done = list(have.get("done", []))
    if done != list(names[: len(done)]):
        raise ValueError(
            f"{fn}: {path!r} lists done blocks {done} that are not a prefix of {list(names)}"
        )
    return done


def _mark_done(out: str, name: str) -> None:
    path = os.path.join(out, _MANIFEST)
    with open(path, encoding="utf-8") as f:
        m = json.load(f)
    m["done"] = [*m["done"], name]
    _atomic_json(path, m)


def block_file(out: str, name: str) -> str:
    """The file a :func:`stream` run writes block ``name`` to: ``out/<name>.npz``."""
    return os.path.join(out, f"{name}.npz")


def _dequantized(params: Any) -> Any:
    """Leaves with a ``dequantize()`` method (``quant.QArray``) replaced by its float array."""
    is_q = lambda x: hasattr(x, "dequantize") and callable(x.dequantize)  # noqa: E731
    return jax.tree.map(lambda x: x.dequantize() if is_q(x) else x, params, is_leaf=is_q)


def _estimate(params: Any, hidden: Sequence[Any]) -> tuple[int, int, int]:
    """Bytes of ``(block weights as stored, Hessians and OBS work, activations in + out)``."""
    weights, hess = 0, 0
    for x in jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "dequantize")):
        shape = tuple(np.shape(x))
        weights += math.prod(shape) * np.dtype(getattr(x, "dtype", np.float32)).itemsize
        if len(shape) >= 2:
            k = math.prod(shape[:-1])
            # X^T X and the sweep's factor (one more copy while it is factored), float32; the
            # float32 copy of the kernel and its update
            hess = max(hess, 3 * 4 * k * k + 3 * 4 * math.prod(shape))
    acts = sum(x.size * x.dtype.itemsize for b in hidden for x in jax.tree.leaves(b))
    return weights, hess, 2 * acts


@public("calibrate.stream")
def stream(
    block_fn: Callable[[Any, Any], Any],
    blocks: Iterable[tuple[str, Callable[[], Any]]],
    hidden: Sequence[Any],
    compress_block: Callable[[Any, list[Any]], tuple[Any, Any]],
    *,
    out: str | os.PathLike | None = None,
    save: Callable[[str, Any], None] | None = None,
    load: Callable[[str], Any] | None = None,
    recipe: Any = None,
    run: Callable[[Any, Any], Any] | None = None,
    progress: bool = True,
    reference: bool = False,
) -> StreamResult:
    """Compresses a model block by block, one block's weights in memory at a time; resumable.

    For each ``(name, load_block)`` of ``blocks``, in order::

        params        = load_block()                          # e.g. read from a checkpoint
        new, report   = compress_block(params, hidden)        # e.g. prune.oneshot(block_fn, ...)
        hidden        = [block_fn(dequantized(new), h) for h in hidden]
        save(out/<name>.npz, new); free params and new

    so every block is calibrated on the outputs of the already-compressed blocks before it, and
    inside a block ``compress_block`` calibrates kernels sequentially as ``prune.oneshot`` /
    ``quant.oneshot`` do with ``sequential=True`` on the whole model — with one forward pass per
    kernel over *one block* instead of the whole model, and the activations cached between
    blocks (the cost grows linearly with depth, not quadratically).

    **Batches.** ``hidden`` is a list of calibration batches at the first block's input; each is
    passed as ``block_fn``'s second argument. A batch is an array (the hidden states) or a tuple
    ``(hidden, *aux)``: then ``block_fn(params, (h, *aux))`` returns the new ``h`` and the aux
    (positions, a mask) are passed on unchanged.

    **Quantized blocks.** Leaves of ``new`` with a ``dequantize()`` method (``quant.QArray``) are
    dequantized before the forward pass, exactly as ``quant.oneshot(..., sequential=True)``
    feeds the dequantized weights to the kernels after them; pass ``run=quant.quantized(block_fn)``
    to run the quantized dot instead.

    **Memory.** One block's weights (as loaded, plus the float32 working copies of the method),
    one kernel's Hessian and its inverse, and the calibration activations twice (in and out). An
    estimate is printed after the first block is loaded and the peak RSS at the end (both on
    stderr, silenced with ``progress=False``, as is the ``tqdm`` bar per block with its ETA).

    **Resuming.** With ``out``, every block is written atomically (to a temporary name, then
    renamed) with ``save(path, params)`` (``checkpoints.save_npz``), and ``out/manifest.json``
    records the ``recipe`` (any JSON-able description; records by their ``repr``), the sha256 of
    the calibration batches (:func:`fingerprint`), the block names and the blocks done. A
    restarted run with the same arguments reads the finished blocks back with ``load(path)``
    (``checkpoints.load_npz``), recomputes the activations through them (not calling their
    ``load_block``) and goes on: the files and the result are identical, bit for bit, to an
    uninterrupted run's. A manifest with a different recipe, calibration hash or block list
    raises ``ValueError`` naming the directory and the difference.

    Args:
      block_fn: ``block_fn(block_params, batch) -> hidden`` (e.g. ``models.block`` with the config
        and positions bound), traceable.
      blocks: ``(name, load_block)`` pairs; ``name`` is a file name stem (letters, digits,
        ``_.-``), ``load_block()`` returns that block's params (read lazily).
      hidden: the calibration batches at the first block's input.
      compress_block: ``compress_block(block_params, hidden) -> (new_params, report)``, e.g.
        ``lambda p, hs: prune.oneshot(block_fn, p, hs, 0.5, method=prune.SparseGPT())``.
      out: a directory for the blocks and the manifest; ``None`` keeps the compressed blocks in
        memory (``StreamResult.blocks``) and cannot resume.
      save, load: write / read one block's params tree (required with ``out``).
      recipe: what the manifest records to recognise the same run (method records, sparsity,
        rules, the source checkpoint).
      run: the forward used to advance the activations, ``run(new_params, batch)``; default
        ``block_fn`` on the dequantized params.
      progress: print the estimate, the bar and the peak RSS.
      reference: also carry the float model's activations (each block advanced with its
        weights as loaded) and call ``compress_block(params, hidden, hidden_ref)``, for
        methods fitted to the float model's outputs (``quant.GPTQ(qep=...)`` through
        ``quant.oneshot(..., reference_batches=hidden_ref)``). Twice the activations in
        memory; a resumed run loads the finished blocks' float weights again to rebuild them.

    Returns:
      a :class:`StreamResult`.

    >>> import jax.numpy as jnp
    >>> blocks = [(f"b{i}", lambda i=i: {"w": jnp.full((2, 2), 0.6 + i)}) for i in range(2)]
    >>> fn = lambda p, x: x @ p["w"]
    >>> res = stream(fn, blocks, [jnp.ones((1, 2))],
    ...              lambda p, hs: ({"w": jnp.round(p["w"])}, None), progress=False)
    >>> [b["w"][0, 0].item() for b in res.blocks], res.hidden[0].tolist()
    ([1.0, 2.0], [[8.0, 8.0]])
    """
    fn = caller()
    if not callable(block_fn) or not callable(compress_block):
        raise TypeError(f"{fn}: block_fn and compress_block must be callables")
    if not isinstance(reference, bool):
        raise TypeError(f"{fn}: reference must be a bool, got {reference!r}")
    blocks = list(blocks)
    names = []
    for item in blocks:
        if not (isinstance(item, tuple) and len(item) == 2 and callable(item[1])):
            raise TypeError(f"{fn}: blocks must yield (name, load_block) pairs, got {item!r}")
        if not isinstance(item[0], str) or not _BLOCK_NAME.fullmatch(item[0]):
            raise ValueError(
                f"{fn}: block name {item[0]!r} must be a file name stem (letters, digits, _.-)"
            )
        names.append(item[0])
    if len(set(names)) != len(names):
        raise ValueError(f"{fn}: block names repeat: {names}")
    hidden = list(hidden)
    if not hidden:
        raise ValueError(f"{fn}: hidden is empty; pass at least one calibration batch")
    done: list[str] = []
    if out is not None:
        if save is None or load is None:
            raise TypeError(
                f"{fn}: out= needs save(path, params) and load(path) (checkpoints.save_npz / "
                "load_npz)"
            )
        out = os.fspath(out)
        # a run with the float activations is another run: its manifest says so
        record = {"recipe": recipe, "reference": True} if reference else recipe
        done = _open_manifest(out, record, fingerprint(hidden), names, fn)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    forward = jax.jit(run if run is not None else block_fn)
    forward_float = jax.jit(block_fn)
    hidden_ref = list(hidden) if reference else None

    def on_device(params: Any) -> Any:
        # Host (NumPy) leaves, as a resumed run reads finished blocks back, are put on the
        # device once: passed to the jitted forward as they are, every batch's call would make
        # its own copy, all alive at once under asynchronous dispatch.
        return jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, params)

    def advance_float(params: Any, batches: list[Any]) -> list[Any]:
        params = on_device(params)
        outs = []
        for b in batches:
            y = forward_float(params, b)
            outs.append((y, *b[1:]) if isinstance(b, tuple) else y)
        return outs

    def advance(params: Any, batches: list[Any]) -> list[Any]:
        params = on_device(params)
        if run is None:  # as quant.oneshot feeds the later kernels: dequantized once, eagerly
            params = _dequantized(params)
        outs = []
        for b in batches:
            y = forward(params, b)
            outs.append((y, *b[1:]) if isinstance(b, tuple) else y)
        return outs

    first = len(done)
    if first:
        log(f"{fn}: {out}: resuming after {first} of {len(names)} blocks ({', '.join(done)})")
    if first < len(names):
        for name, load_block in blocks[:first]:  # the activations at the first block left
            hidden = advance(load(block_file(out, name)), hidden)
            if hidden_ref is not None:
                hidden_ref = advance_float(load_block(), hidden_ref)
    kept: list[Any] | None = [] if out is None else None
    reports: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    todo = blocks[first:]
    bar = _bar(len(names), first, progress)
    try:
        for i, (name, load_block) in enumerate(todo):
            t0 = time.perf_counter()
            if bar is not None:
                bar.set_description(name)
            params = load_block()
            if i == 0:
                w, h, a = _estimate(params, hidden)
                if reference:  # the float activations, and the pair's accumulators
                    a, h = 2 * a, 2 * h
                log(
                    f"{fn}: memory estimate: block weights {_gib(w)} + Hessians and OBS work "
                    f"{_gib(h)} + activations in and out {_gib(a)} = {_gib(w + h + a)} "
                    f"(+ the JAX runtime and compiled code); {len(names) - first} blocks to go"
                )
            result = (
                compress_block(params, hidden, hidden_ref)
                if reference
                else compress_block(params, hidden)
            )
            if not (isinstance(result, tuple) and len(result) == 2):
                raise TypeError(
                    f"{fn}: compress_block must return (new_params, report) for block {name!r}, "
                    f"got {type(result).__name__}; return (params, None) when there is no report"
                )
            new, reports[name] = result
            if hidden_ref is not None:
                hidden_ref = advance_float(params, hidden_ref)
            del params, result
            hidden = advance(new, hidden)
            if out is None:
                kept.append(new)
            else:
                path = block_file(out, name)
                tmp = os.path.join(out, f".{name}.partial.npz")
                save(tmp, new)
                os.replace(tmp, path)
                _mark_done(out, name)
            del new
            seconds[name] = time.perf_counter() - t0
            if bar is not None:
                bar.set_postfix_str(f"{seconds[name]:.1f} s/block")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    peak = peak_rss()
    log(f"{fn}: peak RSS {_gib(peak)}")
    return StreamResult(tuple(names), kept, reports, tuple(done), hidden, seconds, peak)


def _bar(total: int, initial: int, progress: bool) -> Any:
    if not progress or total == initial:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, initial=initial, unit="block", file=sys.stderr, dynamic_ncols=True)
