"""``importance``: activation-based importance of every removable unit (Minitron).

Muralidharan et al. (2024), "Compact Language Models via Pruning and Knowledge Distillation"
(Minitron), score width units by the activations that carry them: an MLP neuron by its
activation entering the down projection, an attention head by its output entering the output
projection, an embedding (residual) channel by the normalized inputs of the next layers. Here
that is one rule for every group of :func:`jaxslim.splice.trace`: a group's *consumers* are its
members contracted by a ``dot_general`` or convolution (the jaxpr says which), and the
activation on the other side of that matmul, restricted to the channel, is what is measured.

For channel ``c`` of a group, consumer ``k`` and activation ``A_k`` (batch ``b``, sequence
positions ``t``, and the channel's own extent ``r``: a head's ``head_dim``, ``1`` for a neuron):

``I_c = sum_k agg_b agg_t ||A_k[b, t, c, :]||_2``

with ``agg_t`` the sequence aggregation (``"mean"`` by default) and ``agg_b`` the batch
aggregation (``"l2"`` by default, over every example of every batch): the paper's best
``(batch=L2, sequence=mean)``. The first axis of the activation is the batch, the others (but
the channel's) are the sequence.

A kernel's contracted dimension may merge several leaf axes: an output projection stored
``(heads, head_dim, d)`` and used as ``x.reshape(b, t, heads * head_dim) @ wo.reshape(-1, d)``
(or in any memory order, or an out-first ``(d, heads, head_dim)`` weight used transposed). The
jaxpr says which leaf axes make up that dimension, outer to inner; the activation's dimension is
split into them, so a head unit is all of its ``head_dim`` channels (``r = head_dim``) whatever
the layout. A kernel sliced before the merge (its axes no longer tile the activation) raises
rather than guessing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import _jaxpr, _tree
from jaxslim._checks import caller, public
from jaxslim.splice._graph import Group, Member, trace

_AGG = ("l2", "mean", "max")


def _check_aggregate(aggregate: Any) -> tuple[str, str]:
    ok = isinstance(aggregate, tuple | list) and len(aggregate) == 2
    if not ok or any(a not in _AGG for a in aggregate):
        raise ValueError(
            f"{caller()}: aggregate must be a pair (batch, sequence) of 'l2', 'mean' or 'max', "
            f"got {aggregate!r}"
        )
    return aggregate[0], aggregate[1]


def _channel_view(
    a: jax.Array,
    pieces: list[tuple[int, int, tuple[int, ...]]],
    leaf_shape: tuple[int, ...],
    m: Member,
):
    """``(a as (rows..., channels, r), number of row axes)``, or ``None`` when the widths do not
    match the member's layout.

    ``pieces`` are the contracted dims as ``(kernel operand dim, activation dim, leaf axes)``:
    the leaf axes that make up that operand dim (several when a reshape merged them, outer to
    inner, like an ``(heads, head_dim, d)`` kernel used as ``(heads * head_dim, d)``; one leaf axis
    may also be split over several dims). A merged activation dim is first split into the leaf
    axes' sizes (``leaf_shape``). The pieces of ``m.axis`` (outer to inner) become the channel
    axis; the other contracted pieces are the rest of the unit (``r``: a head's ``head_dim``),
    summed over by the caller's norm; the dims that are not contracted are rows (batch, sequence).
    """
    by_dim = {ad: (kd, axes) for kd, ad, axes in pieces}
    shape: list[int] = []
    rows: list[int] = []
    own: list[tuple[tuple[int, int], int]] = []  # ((kernel dim, position in it), new dim)
    others: list[int] = []
    for i, n in enumerate(a.shape):
        if i not in by_dim:
            rows.append(len(shape))
            shape.append(n)
            continue
        kd, axes = by_dim[i]
        if len(axes) <= 1:  # one leaf axis (or a piece of one), or a broadcast new axis
            axes, sizes = axes or (-1,), [n]
        else:
            if any(ax >= len(leaf_shape) for ax in axes):
                return None
            sizes = [leaf_shape[ax] for ax in axes]
            if math.prod(sizes) != n:
                return None  # a sliced or padded leaf: its axes no longer tile this dim
        for pos, (ax, size) in enumerate(zip(axes, sizes, strict=True)):
            if ax == m.axis:
                own.append(((kd, pos), len(shape)))
            else:
                others.append(len(shape))
            shape.append(size)
    if not own:
        return None
    dims = [d for _, d in sorted(own)]
    x = jnp.reshape(a, shape)
    x = jnp.transpose(x, rows + dims + others)
    row_shape = x.shape[: len(rows)]
    width = math.prod(x.shape[len(rows) : len(rows) + len(dims)])
    x = x.reshape(*row_shape, width, -1)
    if m.segments:
        if width != sum(m.segments):
            return None
        x = x[..., m.offset : m.offset + m.segments[m.segment], :]
        return x, len(rows)
    if width != math.prod(m.factors):
        return None
    x = x.reshape(*row_shape, *m.factors, x.shape[-1])
    x = jnp.moveaxis(x, len(row_shape) + m.factor, len(row_shape))
    return x.reshape(*row_shape, m.factors[m.factor], -1), len(rows)


def _reduce(x: jax.Array, how: str, axes: tuple[int, ...]) -> jax.Array:
    if not axes:
        return x
    if how == "l2":
        return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes))
    if how == "max":
        return jnp.max(x, axis=axes)
    return jnp.mean(x, axis=axes)


@public("splice.importance")
def importance(
    fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    groups: Sequence[Group] | None = None,
    *,
    aggregate: tuple[str, str] = ("l2", "mean"),
) -> dict[Group, np.ndarray]:
    """Activation-based importance of each channel of each group (Minitron; module docstring).

    ``fn(params, batch)`` runs on every batch of ``batches`` (each passed as ``fn``'s second
    argument), evaluated by :func:`jaxslim._jaxpr.run` with a hook at every matmul: a head group
    is scored by the attention output of each head entering the output projection, an MLP group
    by the input of the down projection, the residual stream by the normalized inputs of every
    kernel that reads it. ``groups`` defaults to the removable groups of
    ``trace(fn, params, first_batch)``.

    Returns ``{group: scores}`` (``scores`` a float64 ``(group.size,)`` array, higher = more
    important), usable directly as ``prune_channels(fn, params, x, sparsity=s, score=result)``.
    Raises ``ValueError`` for empty ``batches``, a bad ``aggregate``, or a group none of whose
    members is contracted by a matmul (nothing consumes its channels), or a consumer whose
    activation cannot be mapped onto the group's channels (a kernel sliced, then merged).

    >>> import jax.numpy as jnp
    >>> p = {"w1": jnp.eye(2), "w2": jnp.ones((2, 1))}
    >>> fn = lambda p, x: (x @ p["w1"]) @ p["w2"]
    >>> x = jnp.array([[3.0, 0.0], [4.0, 1.0]])
    >>> [s.tolist() for s in importance(fn, p, [x]).values()]
    [[5.0, 1.0]]
    """
    agg_b, agg_t = _check_aggregate(aggregate)
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError(f"{caller()}: batches is empty; pass at least one batch") from None
    if groups is None:
        groups = [g for g in trace(fn, params, first) if g.removable]
    groups = list(groups)
    for g in groups:
        if not isinstance(g, Group):
            raise TypeError(
                f"{caller()}: groups must hold splice.Group from trace(), got {type(g).__name__}"
            )
    by_path: dict[str, list[tuple[int, Member]]] = {}
    for i, g in enumerate(groups):
        for m in g.members:
            by_path.setdefault(m.path, []).append((i, m))

    shapes = {path: tuple(np.shape(leaf)) for path, leaf in _tree.leaves_with_paths(params)}

    def hook(state, call):
        p = call.eqn.params
        for k in call.kernels:
            if k.operand not in (0, 1) or not any(
                m.axis in k.contracted for _, m in by_path.get(k.path, ())
            ):
                continue
            if any(o.path and o.operand == 1 - k.operand for o in call.kernels):
                continue  # both operands are parameters: no activation
            act = jnp.asarray(call.operands[1 - k.operand], jnp.float32)
            if call.primitive == "dot_general":
                (lc, rc), _ = p["dimension_numbers"]
                kc, ac = (rc, lc) if k.operand == 1 else (lc, rc)
            else:  # convolution: the lhs feature axis meets the kernel's input-feature axis
                dn = p["dimension_numbers"]
                kc, ac = (dn.rhs_spec[1],), (dn.lhs_spec[1],)
            for i, m in by_path.get(k.path, ()):
                if m.axis not in k.contracted:
                    continue
                pieces = [(d, a, k.axes[d]) for d, a in zip(kc, ac, strict=True)]
                view = _channel_view(act, pieces, shapes.get(k.path, ()), m)
                if view is None:
                    raise ValueError(
                        f"{caller()}: cannot map the activation {tuple(act.shape)} entering "
                        f"{k.path!r} (shape {shapes.get(k.path)}, axis {m.axis}, seen by the "
                        f"matmul as {[k.axes[d] for d in kc]} leaf axes per contracted dim) "
                        f"onto the {groups[i].size} channels of the group over "
                        f"{list(groups[i].paths)}; pass groups= without it to score the others"
                    )
                x, n_rows = view  # (rows..., channels, r)
                norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))  # (rows..., channels)
                if n_rows == 0:
                    norm = norm[None]
                    n_rows = 1
                per_ex = _reduce(norm, agg_t, tuple(range(1, n_rows)))  # (batch, channels)
                acc = state.setdefault(i, {})
                key = (k.index, m.path, m.axis, m.factor, m.segment)
                s, n = acc.get(key, (None, 0))
                if agg_b == "l2":
                    part = np.asarray(jnp.sum(jnp.square(per_ex), axis=0), np.float64)
                elif agg_b == "mean":
                    part = np.asarray(jnp.sum(per_ex, axis=0), np.float64)
                else:
                    part = np.asarray(jnp.max(per_ex, axis=0), np.float64)
                if s is None:
                    s = part
                elif agg_b == "max":
                    s = np.maximum(s, part)
                else:
                    s = s + part
                acc[key] = (s, n + per_ex.shape[0])
        return state

    state: dict = {}
    for batch in [first, *it]:
        _, state = _jaxpr.run(fn, params, batch, hook=hook, state=state, loops="python")
    out = {}
    for i, g in enumerate(groups):
        if i not in state:
            raise ValueError(
                f"{caller()}: no matmul contracts the channels of the group over {list(g.paths)}: "
                "nothing consumes them, so there is no activation to score"
            )
        total = np.zeros(g.size, np.float64)
        for s, n in state[i].values():
            if agg_b == "l2":
                total += np.sqrt(s)
            elif agg_b == "mean":
                total += s / n
            else:
                total += s
        out[g] = total
    return out
