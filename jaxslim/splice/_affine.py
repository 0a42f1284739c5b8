"""The affine abstract interpreter behind :func:`jaxslim.splice.find_foldable`.

:class:`Finder` walks a jaxpr (with the shared :class:`jaxslim._jaxpr.Walker`) and tracks, per
variable, one of

* :class:`Param` — a parameter leaf (``private``: used by nothing else so far);
* :class:`Vec` — a data-independent per-channel vector computed from parameters and constants,
  kept as a small expression;
* :class:`Affine` — ``layer_output * s + t`` along the layer's output axis, ``s`` and ``t``
  expressions over parameter paths (``valid``: every value on the way had one use).

The roles of primitives come from the rule table (:func:`jaxslim.splice._rules.fold_role`):
``"linear"`` starts a chain at a Dense/Conv with a parameter kernel, ``"affine"`` (add, sub, mul,
div, neg with a private per-channel vector) extends it, ``"layout"`` and ``"cast"`` carry values
through, ``"vector"`` combines per-channel vectors. :func:`affine_values` evaluates ``s`` and
``t`` on a parameter tree.

Expressions: ``("param", path)``, ``("lit", value)``, ``("const", array)`` or
``("op", primitive, params, args)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxslim import _jaxpr
from jaxslim.splice import _rules as rules


@dataclasses.dataclass(frozen=True)
class Param:
    """A parameter leaf; ``private`` while nothing else reads it."""

    path: str
    private: bool


@dataclasses.dataclass(frozen=True)
class Vec:
    """A data-independent value constant along every axis but ``axis`` (None: a scalar)."""

    expr: Any
    axis: int | None
    size: int
    params: frozenset
    private: bool


@dataclasses.dataclass(frozen=True)
class Affine:
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


def _vec_of(val, shape: tuple[int, ...], private_use: bool) -> Vec | None:
    """``val`` (a parameter or a vector) seen as a per-channel vector in ``shape``."""
    if isinstance(val, Vec):
        return dataclasses.replace(val, private=val.private and private_use)
    if isinstance(val, Param):
        big = [i for i, s in enumerate(shape) if s > 1]
        if len(big) > 1:
            return None
        axis = big[0] if big else None
        size = shape[axis] if big else 1
        expr = ("param", val.path)
        return Vec(expr, axis, size, frozenset([val.path]), val.private and private_use)
    return None


class Finder(_jaxpr.Walker):
    """Tracks :class:`Param` / :class:`Vec` / :class:`Affine` values through a jaxpr.

    After ``walk``: ``ends[layer] = (var, Affine)`` is the last valid chain value of each layer,
    ``fused[layer] = (steps, second)`` when that chain fed straight into layer ``second``,
    ``order`` the layers in program order and ``kernel_uses[path]`` how many layers use a kernel.
    Control flow is entered by the shared walker; values passed into a sub-jaxpr keep their
    privacy only if the equation is their single use, and loop-carried values are unknown.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ends: dict[str, tuple[Any, Affine]] = {}
        self.fused: dict[str, tuple[Any, str]] = {}
        self.order: list[str] = []
        self.kernel_uses: dict[str, int] = {}
        self.layer_bias: dict[str, str | None] = {}
        self._uses: dict[int, tuple[Any, dict]] = {}

    def const(self, var, value):
        if value is None:
            return None
        arr = np.asarray(value)
        big = [i for i, s in enumerate(arr.shape) if s > 1]
        if len(big) <= 1 and jnp.issubdtype(arr.dtype, jnp.floating):
            return Vec(
                ("const", arr.reshape(-1)), big[0] if big else None, arr.size, frozenset(), True
            )
        return None

    def literal(self, lit):
        val = np.asarray(lit.val)
        if val.ndim == 0 and jnp.issubdtype(val.dtype, jnp.floating):
            return Vec(("lit", val), None, 1, frozenset(), True)
        return None

    def single(self, eqn) -> list[bool]:
        """Per input of ``eqn``: whether it is a literal or read exactly once in its jaxpr."""
        jaxpr = self.jaxpr
        held = self._uses.get(id(jaxpr))
        if held is None or held[0] is not jaxpr:
            held = (jaxpr, _jaxpr.use_counts(jaxpr))
            self._uses[id(jaxpr)] = held
        uses = held[1]
        return [isinstance(v, jex_core.Literal) or uses.get(v, 0) == 1 for v in eqn.invars]

    def visit(self, eqn, ins):
        outs = super().visit(eqn, ins)
        for v, val in zip(eqn.outvars, outs, strict=True):
            if isinstance(val, Affine) and val.valid:
                self.ends[val.layer] = (v, val)
        return outs

    def _passed(self, eqn, ins) -> list:
        return [self.pass_in(v, s) for v, s in zip(ins, self.single(eqn), strict=True)]

    def call(self, eqn, ins, c):
        return super().call(eqn, self._passed(eqn, ins), c)

    def scan(self, eqn, ins, s):
        return super().scan(eqn, self._passed(eqn, ins), s)

    def while_loop(self, eqn, ins, w):
        return super().while_loop(eqn, self._passed(eqn, ins), w)

    def cond(self, eqn, ins, c):
        return super().cond(eqn, self._passed(eqn, ins), c)

    def equation(self, eqn, vals) -> list:
        single = self.single(eqn)
        name = eqn.primitive.name
        role = rules.fold_role(name)
        n_out = len(eqn.outvars)
        if name == "dot_general":
            return [self.dot(eqn, vals, single)]
        if name == "conv_general_dilated":
            return [self.conv(eqn, vals, single)]
        if role == "layout":
            return [self.restructure(eqn, vals[0], single[0])]
        if role == "cast" and isinstance(vals[0], Param):
            return [dataclasses.replace(vals[0], private=vals[0].private and single[0])]
        if role == "affine" and any(isinstance(v, Affine) for v in vals):
            return [self.affine(eqn, vals, single)]
        if role == "cast" and isinstance(vals[0], Affine):
            a = vals[0]
            return [self.extend(a, single[0], a.s, a.t, frozenset(), count=False)]
        if role in ("affine", "cast", "vector") and n_out == 1:
            return [self.vec(eqn, vals, single)]
        return [None] * n_out

    @staticmethod
    def pass_in(val, single):
        if isinstance(val, Param | Vec):
            return dataclasses.replace(val, private=val.private and single)
        if isinstance(val, Affine):
            return dataclasses.replace(val, valid=val.valid and single)
        return val

    def layer(self, kernel, single, axis) -> Affine | None:
        if not isinstance(kernel, Param):
            return None
        path = kernel.path
        self.kernel_uses[path] = self.kernel_uses.get(path, 0) + 1
        if path not in self.order:
            self.order.append(path)
        ok = kernel.private and single
        return Affine(path, axis, None, None, None, frozenset(), 0, ok)

    def consume(self, lhs, single_lhs, axis, second) -> None:
        if isinstance(lhs, Affine) and lhs.valid and single_lhs and lhs.axis == axis:
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
        if isinstance(val, Param):
            val = _vec_of(val, src, single)
            single = True
        if isinstance(val, Vec):
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
        if isinstance(val, Affine) and eqn.primitive.name == "reshape":
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
        return Vec(
            _op(eqn.primitive, eqn.params, *(v.expr for v in vecs)),
            axis,
            size,
            frozenset().union(*(v.params for v in vecs)),
            all(v.private for v in vecs),
        )

    @staticmethod
    def extend(a: Affine, single, s, t, params, bias=None, count=True) -> Affine:
        return Affine(
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
        found = [k for k, v in enumerate(vals) if isinstance(v, Affine)]
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


def affine_values(scale, shift, leaves, n, dtype) -> tuple[jax.Array, jax.Array]:
    s = jnp.ones((n,), dtype) if scale is None else _eval(scale, leaves, n, dtype).astype(dtype)
    t = jnp.zeros((n,), dtype) if shift is None else _eval(shift, leaves, n, dtype).astype(dtype)
    return s, t
