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

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxslim import _jaxpr, _tree

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


_SHAPE_CHECK = re.compile(
    r'parameter "(?P<name>[^"]+)" in "(?P<scope>[^"]*)".*?shape \((?P<a>[^)]*)\).*?'
    r"shape \((?P<b>[^)]*)\)",
    re.S,
)


@dataclasses.dataclass(frozen=True)
class _Rebuild:
    """``fn`` checks a parameter's shape against its own config (Linen's
    ``ScopeParamShapeError``): which leaf (``None`` when the message cannot be read) and the
    shape the module builds it with."""

    leaf: int | None
    path: str
    expected: tuple[int, ...]


def _rebuilds(e: BaseException) -> bool:
    """A Linen module checking a parameter's shape against its config: rebuild, not a pin."""
    return type(e).__name__ in ("ScopeParamShapeError",)


def _shape_check(e: BaseException, paths: Sequence[str], shapes: Sequence[Any]) -> _Rebuild:
    """The leaf a ``ScopeParamShapeError`` names (its message: ``parameter "kernel" in
    "/model/layers/0/mlp/up_proj" ... shape (32, 48) ... shape (32, 96)``)."""
    m = _SHAPE_CHECK.search(str(e))
    if m is None:
        return _Rebuild(None, "", ())
    tail = "/".join(x for x in (m["scope"].strip("/"), m["name"]) if x)
    dims = [tuple(int(x) for x in g.replace(",", " ").split()) for g in (m["a"], m["b"])]
    for i, (path, shape) in enumerate(zip(paths, shapes, strict=True)):
        if (path == tail or path.endswith("/" + tail)) and shape in dims:
            return _Rebuild(i, path, shape)
    return _Rebuild(None, tail, ())


def _unprobed(r: _Rebuild) -> str:
    where = f"{r.path!r} to {r.expected}" if r.path and r.expected else "its parameters"
    return (
        f"the size probe could not run: fn fixes {where} from its own config "
        "(ScopeParamShapeError when the group is wider), so sizes the code pins were not "
        "checked. The smaller params run only in a module rebuilt from a config with the new "
        "widths (report.sizes): a width a config field sets (intermediate_size; heads where "
        "head_dim is a field of its own, Gemma's head_dim or T5's d_kv) can be; a width "
        "derived from another (head_dim = hidden_size / num_heads) or fixed to another "
        "(a convolution stem's width = d_model) cannot"
    )


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
) -> tuple[dict[int, str], dict[int, str]]:
    """``({root: reason}, {root: hazard})``: the classes in ``roots`` whose sizes ``fn`` pins
    (see the module docstring), and those it could not probe because ``fn`` checks their
    parameters against its own config (a Linen/HF module's ``ScopeParamShapeError``).

    Every root is widened at once; a shape check names its leaf, whose widened classes get the
    hazard and leave the set, and the rest is probed again; a pin found with several roots
    widened is attributed by probing each alone."""
    if not roots:
        return {}, {}
    axes = walker.axes
    flat = _tree.leaves_with_paths(params)
    leaves, treedef = jax.tree.flatten(params)
    paths = [p for p, _ in flat]
    shapes = [tuple(getattr(x, "shape", ())) for x in leaves]

    def once(grow: dict[int, int]) -> str | _Rebuild | None:
        new = []
        for leaf, nodes in zip(leaves, param_nodes, strict=True):
            if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
                shape = tuple(axes.probe_size(n, grow) for n in nodes)
                leaf = jax.ShapeDtypeStruct(shape, leaf.dtype)
            new.append(leaf)
        try:
            t = _jaxpr.make_jaxpr(fn, jax.tree.unflatten(treedef, new), *args)
        except Exception as e:  # noqa: BLE001 - fn's own error is the finding
            cause = e.__cause__ if e.__cause__ is not None else e
            if _rebuilds(cause) or _rebuilds(e):
                return _shape_check(cause if _rebuilds(cause) else e, paths, shapes)
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
                if getattr(nodes, "made", False):
                    continue  # made from literals: each use is a copy, checked where it is used
                for d, n in enumerate(nodes):
                    expected = axes.probe_size(n, grow)
                    if d < len(actual) and actual[d] != expected:
                        return _describe(eqn, d, expected, actual[d])
        return None

    def doubled(rs) -> dict[int, int]:
        return {r: axes.size[r] for r in rs}

    def grown(leaf: int) -> set[int]:
        return {axes.find(a) for n in param_nodes[leaf] for a in axes.atoms(n)}

    pinned: dict[int, str] = {}
    unprobed: dict[int, str] = {}
    left = list(roots)
    while left:
        found = once(doubled(left))
        if found is None:
            break
        blamed = set()
        if isinstance(found, _Rebuild) and found.leaf is not None:
            blamed = grown(found.leaf) & set(left)
        if blamed:
            for r in blamed:
                unprobed[r] = _unprobed(found)
            left = [r for r in left if r not in blamed]
            continue
        for r in left:  # one at a time: which of them is pinned (or checked by the module)
            reason = once(doubled([r]))
            if isinstance(reason, _Rebuild):
                unprobed[r] = _unprobed(reason)
            elif reason:
                pinned[r] = reason
        break
    return pinned, unprobed
