"""The re-trace check of :func:`jaxslim.splice.trace`: do the sizes of a group follow the params?

The tracer sees every shape as a number: it cannot tell ``x.reshape(b, t, -1, x.shape[-1] // h)``
(the size follows the parameters) from ``x.reshape(b, t, -1, 16)`` (a literal pins it), nor a
``jnp.zeros(x.shape)`` from a ``jnp.zeros((64,))``. So ``fn`` is traced once more, on shapes only,
with every removable group twice as wide (:meth:`Axes.probe_size`), and the two programs are
compared equation by equation: an output axis whose size does not become what the coupled-axis
graph predicts is pinned by that equation (a ``reshape``, ``broadcast_in_dim``, ``iota``, slice
bounds ...), and so is every group whose sizes cannot change without it. When the widened trace
fails or disagrees, each group is probed alone to find which one is pinned. A function that
checks its parameters' shapes against its own config (a Linen module raises
``ScopeParamShapeError``) cannot be probed: it is rebuilt from the report's sizes instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxslim import _jaxpr

_SHAPE_PARAMS = (
    "new_sizes",
    "shape",
    "dimension",
    "start_indices",
    "limit_indices",
    "slice_sizes",
    "sizes",
)


class _Shapes(_jaxpr.Walker):
    """Records the output shapes of every ordinary equation by site."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[tuple[int, ...], tuple[str, list]] = {}

    def equation(self, eqn, ins):
        self.records[self.site] = (eqn.primitive.name, [_jaxpr.shape(v) for v in eqn.outvars])
        return [None] * len(eqn.outvars)


def _rebuilds(e: BaseException) -> bool:
    """A Linen module checking a parameter's shape against its config: rebuild, not a pin."""
    return type(e).__name__ in ("ScopeParamShapeError",)


def _describe(eqn: Any, d: int, expected: int, actual: int) -> str:
    prim = eqn.primitive.name
    size = _jaxpr.shape(eqn.outvars[0])[d] if eqn.outvars else "?"
    consts = ", ".join(
        f"{k}={tuple(eqn.params[k]) if isinstance(eqn.params[k], list) else eqn.params[k]}"
        for k in _SHAPE_PARAMS
        if eqn.params.get(k) is not None
    )
    return (
        f"the code pins its size: {prim} ({consts}) makes axis {d} of its output {size}, and "
        f"it stays {actual} instead of {expected} when the group is wider; compute that size "
        "from the parameters' shapes (x.shape), not a constant or a config field"
    )


def probe(
    fn: Callable[..., Any],
    params: Any,
    args: Sequence[Any],
    walker: Any,
    param_nodes: Sequence[Sequence[int]],
    roots: Sequence[int],
    fn_name: str,
) -> dict[int, str]:
    """``{root: reason}`` for the classes in ``roots`` whose sizes ``fn`` pins (see the module
    docstring); ``{}`` when every size follows the parameters or ``fn`` cannot be probed."""
    if not roots:
        return {}
    axes = walker.axes
    leaves, treedef = jax.tree.flatten(params)

    def once(grow: dict[int, int]) -> str | None:
        new = []
        for leaf, nodes in zip(leaves, param_nodes, strict=True):
            if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
                shape = tuple(axes.probe_size(n, grow) for n in nodes)
                leaf = jax.ShapeDtypeStruct(shape, leaf.dtype)
            new.append(leaf)
        try:
            t = _jaxpr.make_jaxpr(fn, jax.tree.unflatten(treedef, new), *args, fn_name=fn_name)
        except Exception as e:  # noqa: BLE001 - fn's own error is the finding
            cause = e.__cause__ if e.__cause__ is not None else e
            if _rebuilds(cause) or _rebuilds(e):
                return ""
            msg = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            return (
                f"the code pins its size: fn fails when the group is wider "
                f"({type(cause).__name__}: {msg[:200]})"
            )
        rec = _Shapes()
        rec.walk(t.jaxpr, [None] * len(t.jaxpr.invars), t.consts)
        for site, (prim, outs, eqn) in walker.records.items():
            other = rec.records.get(site)
            if other is None or other[0] != prim:
                return None  # the program changed shape-dependently: the final check decides
            for nodes, actual in zip(outs, other[1], strict=True):
                for d, n in enumerate(nodes):
                    expected = axes.probe_size(n, grow)
                    if d < len(actual) and actual[d] != expected:
                        return _describe(eqn, d, expected, actual[d])
        return None

    def doubled(rs) -> dict[int, int]:
        return {r: axes.size[r] for r in rs}

    found = once(doubled(roots))
    if found is None or found == "":
        return {}
    pinned = {}
    for r in roots:
        reason = once(doubled([r]))
        if reason:
            pinned[r] = reason
    return pinned
