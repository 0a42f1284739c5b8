"""Finds the batch norms to fold and the linear pairs to fuse in a traced function; applies them.

``find_foldable(fn, params, *args)`` walks the jaxpr of ``fn(params, *args)`` (shapes only) and
follows the output of every Dense (``dot_general`` with a ``(in, out)`` parameter kernel) and Conv
(``conv_general_dilated`` with a ``(*spatial, in, out)`` kernel) through the ops that keep it a
per-channel affine function of that output, ``y = z * s + t`` with ``s``, ``t`` computed from
parameters and constants only: a bias add, an inference-mode batch norm (``(z - mean) *
rsqrt(var + eps) * scale + bias``), a constant scale. Where the chain stops it reports

* :class:`Fold` — the chain ends at a non-linear op: ``W' = W * s``, ``b' = t``
  (:func:`jaxslim.splice.fold_batchnorm` generalised), the chain's parameters go;
* :class:`Fuse` — the chain feeds straight into another Dense, or a 1x1 Conv, on the same
  channel axis: the two layers become one, ``(W1 s) W2`` (:func:`jaxslim.splice.fuse_linear`).

A chain is only reported when every intermediate value has a single use and every parameter in it
is used by nothing else, so the rewrite is exact. ``s`` and ``t`` are kept as small expressions
over the parameter paths, evaluated by :func:`fold_all` / :func:`fuse_all` on the tree they get.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxslim import _tree
from jaxslim.splice.graph import _call_jaxpr, _make_jaxpr
from jaxslim.splice.surgery import fuse_linear

__all__ = ["Fold", "Fuse", "find_foldable", "fold_all", "fuse_all"]

_AFFINE_OPS = frozenset("add sub mul div neg".split())
_VEC_OPS = frozenset(
    """add sub mul div neg rsqrt sqrt exp log abs max min integer_pow square pow
    convert_element_type copy""".split()
)


@dataclasses.dataclass(frozen=True)
class Fold:
    """A per-channel affine chain after a layer, to fold into it.

    ``kernel``/``bias`` are the layer's paths (``bias`` None if it has none: folding creates
    ``<module>/bias``); ``absorbed`` the chain's other parameters (a batch norm's scale, bias,
    mean, var), removed by :func:`fold_all`. ``scale``/``shift`` are the chain's ``s``/``t`` as
    expressions over parameter paths (see the module docstring).
    """

    kernel: str
    bias: str | None
    absorbed: tuple[str, ...]
    scale: Any = dataclasses.field(default=None, repr=False, compare=False)
    shift: Any = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Fuse:
    """Two linear layers with only a per-channel affine chain between: ``first`` then ``second``.

    :func:`fuse_all` stores the merged layer under ``first``'s paths (it keeps ``first``'s
    convolution settings) and removes ``second``'s kernel and bias and the chain's ``absorbed``
    parameters. ``first``/``second`` are ``(kernel path, bias path or None)``.
    """

    first: tuple[str, str | None]
    second: tuple[str, str | None]
    absorbed: tuple[str, ...]
    scale: Any = dataclasses.field(default=None, repr=False, compare=False)
    shift: Any = dataclasses.field(default=None, repr=False, compare=False)


# Values the walk tracks, one per jaxpr variable (None: anything else).
@dataclasses.dataclass(frozen=True)
class _Param:
    path: str
    private: bool


@dataclasses.dataclass(frozen=True)
class _Vec:
    """A data-independent value constant along every axis but ``axis`` (None: a scalar)."""

    expr: Any
    axis: int | None
    size: int
    params: frozenset
    private: bool


@dataclasses.dataclass(frozen=True)
class _Affine:
    """``layer_output * s + t`` along ``axis``; ``valid`` if every earlier value had one use."""

    layer: str
    axis: int
    s: Any
    t: Any
    bias: str | None
    params: frozenset
    steps: int
    valid: bool


def _op(prim, params, *args):
    return ("op", prim, tuple(sorted(params.items())), args)


def _shape(v) -> tuple[int, ...]:
    return tuple(getattr(v.aval, "shape", ()))


def _vec_of(val, shape: tuple[int, ...], private_use: bool) -> _Vec | None:
    """``val`` (a parameter or a vector) seen as a per-channel vector in ``shape``."""
    if isinstance(val, _Vec):
        return dataclasses.replace(val, private=val.private and private_use)
    if isinstance(val, _Param):
        big = [i for i, s in enumerate(shape) if s > 1]
        if len(big) > 1:
            return None
        axis = big[0] if big else None
        size = shape[axis] if big else 1
        expr = ("param", val.path)
        return _Vec(expr, axis, size, frozenset([val.path]), val.private and private_use)
    return None


class _Finder:
    def __init__(self) -> None:
        self.ends: dict[str, tuple[Any, _Affine]] = {}
        self.fused: dict[str, tuple[Any, str]] = {}
        self.order: list[str] = []
        self.kernel_uses: dict[str, int] = {}
        self.layer_bias: dict[str, str | None] = {}

    def walk(self, jaxpr, ins: list, consts: Sequence[Any] = ()) -> list:
        uses: dict = {}
        for eqn in jaxpr.eqns:
            for v in eqn.invars:
                if not isinstance(v, jex_core.Literal):
                    uses[v] = uses.get(v, 0) + 1
        for v in jaxpr.outvars:
            if not isinstance(v, jex_core.Literal):
                uses[v] = uses.get(v, 0) + 1
        env: dict = {}
        for v, c in zip(jaxpr.constvars, consts, strict=False):
            arr = np.asarray(c)
            big = [i for i, s in enumerate(arr.shape) if s > 1]
            if len(big) <= 1 and jnp.issubdtype(arr.dtype, jnp.floating):
                env[v] = _Vec(
                    ("const", arr.reshape(-1)), big[0] if big else None, arr.size, frozenset(), True
                )
        for v, val in zip(jaxpr.invars, ins, strict=True):
            env[v] = val

        def read(v):
            if isinstance(v, jex_core.Literal):
                val = np.asarray(v.val)
                if val.ndim == 0 and jnp.issubdtype(val.dtype, jnp.floating):
                    return _Vec(("lit", val), None, 1, frozenset(), True)
                return None
            return env.get(v)

        for eqn in jaxpr.eqns:
            vals = [read(v) for v in eqn.invars]
            single = [isinstance(v, jex_core.Literal) or uses.get(v, 0) == 1 for v in eqn.invars]
            outs = self.equation(eqn, vals, single)
            for v, val in zip(eqn.outvars, outs, strict=True):
                env[v] = val
                if isinstance(val, _Affine) and val.valid:
                    self.ends[val.layer] = (v, val)
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, vals, single) -> list:
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        if name == "dot_general":
            return [self.dot(eqn, vals, single)]
        if name == "conv_general_dilated":
            return [self.conv(eqn, vals, single)]
        if name in ("reshape", "broadcast_in_dim", "squeeze", "expand_dims"):
            return [self.restructure(eqn, vals[0], single[0])]
        if name in ("convert_element_type", "copy") and isinstance(vals[0], _Param):
            return [dataclasses.replace(vals[0], private=vals[0].private and single[0])]
        if name in _AFFINE_OPS and any(isinstance(v, _Affine) for v in vals):
            return [self.affine(eqn, vals, single)]
        if name in ("convert_element_type", "copy") and isinstance(vals[0], _Affine):
            a = vals[0]
            return [self.extend(a, single[0], a.s, a.t, frozenset(), count=False)]
        if name in _VEC_OPS:
            return [self.vec(eqn, vals, single)]
        sub = _call_jaxpr(eqn)
        if sub is not None:
            holder = next(
                (eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in eqn.params),
                None,
            )
            consts = getattr(holder, "consts", ())
            ins = [self.pass_in(v, s) for v, s in zip(vals, single, strict=True)]
            return self.walk(sub, ins, consts)
        return [None] * n_out

    @staticmethod
    def pass_in(val, single):
        if isinstance(val, _Param | _Vec):
            return dataclasses.replace(val, private=val.private and single)
        if isinstance(val, _Affine):
            return dataclasses.replace(val, valid=val.valid and single)
        return val

    def layer(self, kernel, single, axis) -> _Affine | None:
        if not isinstance(kernel, _Param):
            return None
        path = kernel.path
        self.kernel_uses[path] = self.kernel_uses.get(path, 0) + 1
        if path not in self.order:
            self.order.append(path)
        ok = kernel.private and single
        return _Affine(path, axis, None, None, None, frozenset(), 0, ok)

    def consume(self, lhs, single_lhs, axis, second) -> None:
        if isinstance(lhs, _Affine) and lhs.valid and single_lhs and lhs.axis == axis:
            self.fused[lhs.layer] = (lhs.steps, second)

    def dot(self, eqn, vals, single):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs_shape, rhs_shape = _shape(eqn.invars[0]), _shape(eqn.invars[1])
        dense = (
            len(rhs_shape) == 2
            and tuple(rc) == (0,)
            and tuple(lc) == (len(lhs_shape) - 1,)
            and not lb
            and not rb
        )
        if not dense:
            return None
        out = self.layer(vals[1], single[1], len(_shape(eqn.outvars[0])) - 1)
        if out is not None:
            self.consume(vals[0], single[0], len(lhs_shape) - 1, out.layer)
        return out

    def conv(self, eqn, vals, single):
        p = eqn.params
        dn = p["dimension_numbers"]
        rhs_shape = _shape(eqn.invars[1])
        nd = len(rhs_shape)
        if tuple(dn.rhs_spec[:2]) != (nd - 1, nd - 2) or p["batch_group_count"] != 1:
            return None
        out = self.layer(vals[1], single[1], dn.out_spec[1])
        if out is None:
            return None
        pointwise = (
            all(s == 1 for s in rhs_shape[:-2])
            and all(s == 1 for s in p["window_strides"])
            and all(tuple(q) == (0, 0) for q in p["padding"])
            and all(d == 1 for d in p["lhs_dilation"])
            and p["feature_group_count"] == 1
        )
        if pointwise:
            self.consume(vals[0], single[0], dn.lhs_spec[1], out.layer)
        return out

    def restructure(self, eqn, val, single):
        src, dst = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
        if isinstance(val, _Param):
            val = _vec_of(val, src, single)
            single = True
        if isinstance(val, _Vec):
            if val.axis is None:
                return dataclasses.replace(val, private=val.private and single)
            big = [i for i, s in enumerate(dst) if s > 1]
            if eqn.primitive.name == "broadcast_in_dim":
                axis = eqn.params["broadcast_dimensions"][val.axis]
            elif len([s for s in dst if s == val.size]) == 1 and val.size in dst:
                axis = dst.index(val.size)
            else:
                return None
            if eqn.primitive.name != "broadcast_in_dim" and big != [axis]:
                return None
            return dataclasses.replace(val, axis=axis, private=val.private and single)
        if isinstance(val, _Affine) and eqn.primitive.name == "reshape":
            tail = len(src) - val.axis
            if len(dst) >= tail and src[val.axis :] == dst[len(dst) - tail :]:
                out = self.extend(val, single, val.s, val.t, frozenset(), count=False)
                return dataclasses.replace(out, axis=len(dst) - tail)
        return None

    def vec(self, eqn, vals, single):
        shape = _shape(eqn.outvars[0])
        vecs = [
            _vec_of(v, _shape(var), s) if not isinstance(var, jex_core.Literal) else v
            for v, var, s in zip(vals, eqn.invars, single, strict=True)
        ]
        if any(v is None for v in vecs):
            return None
        axes = {v.axis for v in vecs if v.axis is not None}
        if len(axes) > 1:
            return None
        axis = axes.pop() if axes else None
        size = shape[axis] if axis is not None else 1
        return _Vec(
            _op(eqn.primitive, eqn.params, *(v.expr for v in vecs)),
            axis,
            size,
            frozenset().union(*(v.params for v in vecs)),
            all(v.private for v in vecs),
        )

    @staticmethod
    def extend(a: _Affine, single, s, t, params, bias=None, count=True) -> _Affine:
        return _Affine(
            a.layer,
            a.axis,
            s,
            t,
            bias or a.bias,
            a.params | params,
            a.steps + int(count),
            a.valid and single,
        )

    def affine(self, eqn, vals, single):
        name = eqn.primitive.name
        found = [k for k, v in enumerate(vals) if isinstance(v, _Affine)]
        if len(found) != 1:
            return None
        i = found[0]
        a = vals[i]
        if name == "neg":
            return self.extend(a, single[0], _mul(a.s, -1.0), _scale(a.t, -1.0), frozenset())
        j = 1 - i
        var = eqn.invars[j]
        c = (
            vals[j]
            if isinstance(var, jex_core.Literal)
            else _vec_of(vals[j], _shape(var), single[j])
        )
        if c is None or (c.axis is not None and c.axis != a.axis) or not c.private:
            return None
        if name == "add" or (name == "sub" and i == 0):
            first = a.steps == 0 and name == "add" and c.expr[0] == "param"
            bias = c.expr[1] if first else None
            shift = c.expr if name == "add" else _op(jax.lax.neg_p, {}, c.expr)
            return self.extend(a, single[i], a.s, _add(a.t, shift), c.params, bias)
        if name == "sub":  # c - a
            return self.extend(
                a, single[i], _mul(a.s, -1.0), _add(_scale(a.t, -1.0), c.expr), c.params
            )
        if name == "mul":
            return self.extend(a, single[i], _mul(a.s, c.expr), _scale(a.t, c.expr), c.params)
        if name == "div" and i == 0:
            inv = _op(jax.lax.div_p, {}, ("lit", np.float32(1.0)), c.expr)
            return self.extend(a, single[i], _mul(a.s, inv), _scale(a.t, inv), c.params)
        return None


def _scale(t, y):
    """``t * y`` for a shift ``t`` (None: zero, which stays zero)."""
    return None if t is None else _mul(t, y)


def _mul(x, y):
    """``x * y`` for a scale ``x`` (None: one)."""
    if x is None:
        return None if y is None else (("lit", np.float32(y)) if isinstance(y, float) else y)
    y = ("lit", np.float32(y)) if isinstance(y, float) else y
    return _op(jax.lax.mul_p, {}, x, y)


def _add(x, y):
    return y if x is None else _op(jax.lax.add_p, {}, x, y)


def _eval(expr, leaves: Mapping[str, Any], size: int, dtype) -> jax.Array:
    kind = expr[0]
    if kind == "param":
        if expr[1] not in leaves:
            raise ValueError(
                f"splice.fold_all/fuse_all: the tree has no leaf {expr[1]!r} named by the plan "
                "(was it folded already? apply fold_all before fuse_all, each plan once)"
            )
        x = jnp.asarray(leaves[expr[1]])
        return jnp.broadcast_to(x.reshape(-1) if x.size > 1 else x.reshape(()), (size,))
    if kind in ("lit", "const"):
        x = jnp.asarray(expr[1])
        x = x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        return jnp.broadcast_to(x.reshape(-1) if x.size > 1 else x.reshape(()), (size,))
    _, prim, params, args = expr
    vals = [_eval(a, leaves, size, dtype) for a in args]
    if prim.name != "convert_element_type":
        dt = jnp.result_type(*vals)
        vals = [v.astype(dt) for v in vals]
    return prim.bind(*vals, **dict(params))


def _affine_values(scale, shift, leaves, n, dtype) -> tuple[jax.Array, jax.Array]:
    s = jnp.ones((n,), dtype) if scale is None else _eval(scale, leaves, n, dtype).astype(dtype)
    t = jnp.zeros((n,), dtype) if shift is None else _eval(shift, leaves, n, dtype).astype(dtype)
    return s, t


def find_foldable(fn: Callable[..., Any], params: Any, *example_args: Any) -> list[Fold | Fuse]:
    """Batch norms (and other per-channel affine chains) to fold, and linear pairs to fuse.

    Traces ``fn(params, *example_args)`` on shapes only (like :func:`jaxslim.splice.trace`) and
    returns, in program order of the first layer, a :class:`Fold` for every Dense/Conv whose output
    goes through a per-channel affine chain (beyond its own bias) before a non-linear op, and a
    :class:`Fuse` for every Dense/Conv whose output (after such a chain) feeds only a Dense or a
    1x1 Conv. Layouts follow Flax (``(in, out)``, ``(*spatial, in, out)``); trace in inference mode
    (Linen ``use_running_average=True``, NNX ``model.eval()``). A kernel used by two layers, or a
    value used twice inside a chain, is not reported.

    >>> import jax.numpy as jnp
    >>> p = {"w": jnp.ones((3, 4)), "mean": jnp.zeros(4), "var": jnp.ones(4), "v": jnp.ones((4, 2))}
    >>> def fn(p, x):
    ...     h = (x @ p["w"] - p["mean"]) * jax.lax.rsqrt(p["var"] + 1e-5)
    ...     return jax.nn.relu(h) @ p["v"]
    >>> find_foldable(fn, p, jnp.ones((1, 3)))
    [Fold(kernel='w', bias=None, absorbed=('mean', 'var'))]
    """
    closed = _make_jaxpr(fn, params, example_args)
    leaves = _tree.leaves_with_paths(params)
    args = _tree.leaves_with_paths(list(example_args))
    if len(leaves) + len(args) != len(closed.jaxpr.invars):
        raise ValueError(
            f"splice.find_foldable: fn's jaxpr has {len(closed.jaxpr.invars)} inputs but params "
            f"and args have {len(leaves) + len(args)} leaves"
        )
    f = _Finder()
    ins = [_Param(p, True) for p, _ in leaves] + [None] * len(args)
    f.walk(closed.jaxpr, ins, closed.consts)
    found: list[Fold | Fuse] = []
    bias = {layer: end[1].bias for layer, end in f.ends.items()}
    for layer in f.order:
        if f.kernel_uses.get(layer, 0) != 1 or layer not in f.ends:
            continue
        _, a = f.ends[layer]
        absorbed = tuple(sorted(a.params - {a.bias}))
        if layer in f.fused:
            fa, second = f.fused[layer]
            if fa == a.steps and f.kernel_uses.get(second) == 1 and second in f.ends:
                found.append(Fuse((layer, a.bias), (second, bias.get(second)), absorbed, a.s, a.t))
                continue
        if a.steps > (1 if a.bias else 0):
            found.append(Fold(layer, a.bias, absorbed, a.s, a.t))
    return found


def _nested(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _nested(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple) and not hasattr(tree, "_fields"):
        return [_nested(v) for v in tree]
    return tree


def _locate(tree: Any, path: str, fn_name: str) -> tuple[Any, Any]:
    parent, _, name = path.rpartition("/")
    node = _tree.subtree(tree, parent, fn_name=fn_name) if parent else tree
    if not isinstance(node, dict | list):
        raise TypeError(f"{fn_name}: cannot edit {path!r} inside a {type(node).__name__}")
    return node, _tree.child_key(node, name)


def _set(tree: Any, path: str, value: Any, fn_name: str) -> None:
    node, key = _locate(tree, path, fn_name)
    node[key] = value


def _delete(tree: Any, path: str, fn_name: str) -> None:
    node, key = _locate(tree, path, fn_name)
    if isinstance(node, dict):
        node.pop(key, None)


def _prune_empty(tree: Any) -> Any:
    if isinstance(tree, dict):
        out = {k: _prune_empty(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
    return tree


def _leaf(leaves: Mapping[str, Any], path: str, fn_name: str) -> jax.Array:
    if path not in leaves:
        raise ValueError(f"{fn_name}: the tree has no kernel {path!r} named by the plan")
    return jnp.asarray(leaves[path])


def _bias_path(kernel: str) -> str:
    module, _, _ = kernel.rpartition("/")
    return f"{module}/bias" if module else "bias"


def _check_found(found: Sequence[Any], kind: type, fn_name: str) -> list:
    out = []
    for r in found:
        if not isinstance(r, Fold | Fuse):
            raise TypeError(f"{fn_name}: expected Fold/Fuse records from find_foldable, got {r!r}")
        if isinstance(r, kind):
            out.append(r)
    return out


def fold_all(params: Any, found: Sequence[Fold | Fuse]) -> Any:
    """Applies every :class:`Fold` of ``found`` to ``params``; returns a new nested-dict tree.

    For each, ``W' = W * s`` on the output axis and ``b' = t`` (written to the layer's bias path,
    ``<module>/bias`` if it had none: rebuild that layer with a bias), and the chain's parameters
    (``absorbed``: a batch norm's scale, bias, mean, var) are removed, with any container left
    empty (a Linen ``batch_stats`` collection). :class:`Fuse` records are skipped (see
    :func:`fuse_all`, applied after this). Rebuild the model without the folded norms.

    >>> import jax.numpy as jnp
    >>> p = {"w": jnp.ones((3, 4)), "mean": jnp.ones(4), "var": jnp.full(4, 4.0)}
    >>> p["v"] = jnp.ones((4, 2))
    >>> def fn(p, x):
    ...     return jax.nn.relu((x @ p["w"] - p["mean"]) / jnp.sqrt(p["var"])) @ p["v"]
    >>> new = fold_all(p, find_foldable(fn, p, jnp.ones((1, 3))))
    >>> sorted(new), new["w"][0, 0].item(), new["bias"][0].item()
    (['bias', 'v', 'w'], 0.5, -0.5)
    """
    folds = _check_found(found, Fold, "splice.fold_all")
    leaves = dict(_tree.leaves_with_paths(params))
    out = _nested(params)
    for r in folds:
        w = _leaf(leaves, r.kernel, "splice.fold_all")
        s, t = _affine_values(r.scale, r.shift, leaves, w.shape[-1], w.dtype)
        _set(out, r.kernel, w * s.reshape((1,) * (w.ndim - 1) + (-1,)), "splice.fold_all")
        for p in r.absorbed:
            _delete(out, p, "splice.fold_all")
        _set(out, r.bias or _bias_path(r.kernel), t, "splice.fold_all")
    return _prune_empty(out)


def fuse_all(params: Any, found: Sequence[Fold | Fuse]) -> Any:
    """Applies every :class:`Fuse` of ``found`` to ``params``; returns a new nested-dict tree.

    For ``first -> chain -> second``: ``W = (W1 s) W2``, ``b = t W2 + b2``
    (:func:`jaxslim.splice.fuse_linear`), stored under ``first``'s kernel and bias paths; the
    chain's ``absorbed`` parameters and ``second``'s kernel and bias are removed. Rebuild the model
    with ``first`` producing ``second``'s features and without ``second``. Pairs are applied last
    first, so a run ``L1 -> L2 -> L3`` collapses into ``L1``. Apply :func:`fold_all` first when
    ``found`` also has folds (a :class:`Fold` of ``second`` changes ``W2``).

    >>> import jax.numpy as jnp
    >>> p = {"a": jnp.ones((3, 4)), "b": jnp.ones((4, 2))}
    >>> found = find_foldable(lambda p, x: x @ p["a"] @ p["b"], p, jnp.ones((1, 3)))
    >>> new = fuse_all(p, found)
    >>> sorted(new), new["a"].shape, new["a"][0, 0].item()
    (['a', 'bias'], (3, 2), 4.0)
    """
    fuses = _check_found(found, Fuse, "splice.fuse_all")
    out = _nested(params)
    moved: dict[str, tuple[str, str]] = {}
    for r in reversed(fuses):
        leaves = dict(_tree.leaves_with_paths(out))
        (k1, b1), (k2, b2) = r.first, r.second
        k2, b2 = moved.get(k2, (k2, b2 or _bias_path(k2)))
        w1 = _leaf(leaves, k1, "splice.fuse_all")
        s, t = _affine_values(r.scale, r.shift, leaves, w1.shape[-1], w1.dtype)
        w1 = w1 * s.reshape((1,) * (w1.ndim - 1) + (-1,))
        w2 = _leaf(leaves, k2, "splice.fuse_all")
        w, b = fuse_linear(w1, t, w2, leaves.get(b2))
        for p in (*r.absorbed, k2, b2):
            _delete(out, p, "splice.fuse_all")
        if b1 is not None:
            _delete(out, b1, "splice.fuse_all")
        new_b1 = b1 or _bias_path(k1)
        _set(out, k1, w, "splice.fuse_all")
        _set(out, new_b1, b, "splice.fuse_all")
        moved[k1] = (k1, new_b1)
    return _prune_empty(out)
