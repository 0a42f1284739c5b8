"""``quantized(fn)``: run any function on a parameter tree whose leaves may be ``QArray``s.

``quantized(fn)(qparams, *args)`` computes ``fn(dequantize_params(qparams), *args)`` without
dequantizing the tree: ``fn`` is traced once on shapes (the ``QArray`` leaves stand in as float
arrays of their original shape and dtype) and its jaxpr is evaluated equation by equation
(``jaxslim._jaxpr``'s walker). A ``QArray`` leaf flows through the program as a lazy *view*:

* ``transpose``, ``squeeze``, a ``reshape`` or ``broadcast_in_dim`` that only adds or drops unit
  axes, and float casts (``convert_element_type``, ``copy``) change the view, not the data;
* at a ``dot_general`` the view's axes are folded into the dimension numbers and the product runs
  as ``quant.qdot_general`` on the codes: the blocked weight-only path dequantizes one block of
  the contracted axis at a time (a Flax ``(in, out)`` kernel, an Equinox ``(out, in)`` weight, a
  tied embedding used as ``h @ embed.T``, an explicit-head ``(d, heads, head_dim)`` kernel), or
  int8 x int8 with int32 accumulation when ``activations`` asks for dynamic activation
  quantization (W8A8, SmoothQuant). The activation is the float operand whichever side the
  weight is on (``x @ W`` or Equinox's ``W @ x``), quantized with one scale per token (per index
  of its non-contracted axes);
* any other use (an embedding lookup ``embed[tokens]``, an elementwise op, a convolution, a
  ``reshape`` that merges axes, a slice, a loop carry) dequantizes *that leaf* at that use, in the
  function's dtype. Under ``jit`` XLA fuses the dequantization into a gather or a dynamic slice
  (no full float table is written; codebook formats such as nf4 excepted); a convolution kernel
  is dequantized whole (they are small).

Stacked layers under ``scan`` (a ``QArray`` scanned as ``xs``) are indexed one layer per step
from the dequantization expression, which XLA fuses into the slice for integer and fp8 formats.
Under ``activations`` a product with such a layer quantizes its activation per token with
``fake_quant`` (simulated: same numbers up to float rounding, no int8 x int8 product). A
convolution whose kernel is a ``QArray`` raises under ``activations`` (its input is not
quantized); a product of two ``QArray`` leaves has no activation operand and runs weight-only.

Differentiation: ``jax.grad`` / ``jax.vjp`` with respect to the float arguments (``args``, float
leaves of ``params``) work; the blocked product rematerializes each block in the backward pass,
so no full float kernel is stored, and the int8 x int8 product is straight-through (activation
quantization counts as the identity). Gradients with respect to ``QArray`` leaves are not
provided (they are zero): use ``quant.fake_quant`` for quantization-aware training.
``jax.vmap`` over ``args`` (and over a batch prefix of ``QArray`` children) works as for any
jax function.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxslim import _jaxpr, _tree
from jaxslim._checks import public
from jaxslim.quant._dot import qdot_general
from jaxslim.quant._qarray import QArray, dequantize, fake_quant, is_qarray
from jaxslim.quant._spec import QuantSpec

_FN = "quant.quantized"
_PASS = frozenset({"copy", "copy_p", "optimization_barrier", "pvary", "sharding_constraint"})


@dataclasses.dataclass(frozen=True, eq=False)
class _QView:
    """A ``QArray`` seen by the program: view axis ``i`` is ``q``'s axis ``dims[i]`` (``None``: a
    new unit axis; ``q`` axes missing from ``dims`` have size 1), in dtype ``dtype``."""

    q: QArray
    dims: tuple[int | None, ...]
    dtype: Any
    path: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(1 if d is None else self.q.shape[d] for d in self.dims)

    def materialize(self) -> jax.Array:
        """The view's float values: ``dequantize(q)`` moved to the view's axes and dtype."""
        mapped = [d for d in self.dims if d is not None]
        y = dequantize(self.q).astype(self.dtype)
        y = y.reshape(tuple(self.q.shape[d] for d in sorted(mapped)))
        order = sorted(mapped)
        y = y.transpose([order.index(d) for d in mapped])
        return y.reshape(self.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class _Deq:
    """A dequantized ``QArray`` slice that is still a weight: one layer of a scanned stack
    (``value``, float) under ``activations``. A product with it quantizes its other operand per
    token (simulated: ``fake_quant``, not an int8 x int8 product); layout ops keep the mark."""

    value: jax.Array
    path: str


def _mat(x: Any) -> Any:
    if isinstance(x, _QView):
        return x.materialize()
    return x.value if isinstance(x, _Deq) else x


_KEEP_DEQ = frozenset(
    {"transpose", "squeeze", "reshape", "broadcast_in_dim", "convert_element_type"}
)


def _unit_map(src: tuple[int, ...], dst: tuple[int, ...]) -> list[int | None] | None:
    """For a reshape that only inserts or drops unit axes: per ``dst`` axis the ``src`` axis it
    is (``None``: a new unit axis); ``None`` when the reshape does more."""
    out: list[int | None] = []
    i = 0
    for d in dst:
        while i < len(src) and src[i] == 1 and d != 1:
            i += 1
        if d == 1:
            if i < len(src) and src[i] == 1 and len(src) - i > len(dst) - len(out) - 1:
                out.append(i)
                i += 1
            else:
                out.append(None)
        elif i < len(src) and src[i] == d:
            out.append(i)
            i += 1
        else:
            return None
    if any(s != 1 for s in src[i:]):
        return None
    return out


class _Runner(_jaxpr.Walker):
    """Evaluates a jaxpr with ``_QView`` values for the ``QArray`` leaves."""

    def __init__(self, activations: QuantSpec | None, impl: str) -> None:
        super().__init__()
        self.activations = activations
        self.impl = impl

    def const(self, var, value):
        return value

    def literal(self, lit):
        return lit.val

    # -- ordinary equations ---------------------------------------------------------------------
    def equation(self, eqn, ins):
        if not any(isinstance(x, (_QView, _Deq)) for x in ins):
            return _jaxpr.bind(eqn, ins)
        name, p = eqn.primitive.name, eqn.params
        if self.activations is not None and name == "conv_general_dilated":
            w = next(x for x in ins if isinstance(x, (_QView, _Deq)))
            raise ValueError(
                f"{_FN}: activations={self.activations!r} does not quantize the input of a "
                f"convolution, and the quantized kernel {w.path!r} feeds one: keep that kernel "
                "float (a rule (path, None)) or pass activations=None"
            )
        if any(isinstance(x, _Deq) for x in ins):
            return self._deq(eqn, name, ins)
        v = ins[0]
        if isinstance(v, _QView) and len(ins) == 1:
            out = self._layout(eqn, name, p, v)
            if out is not None:
                return [out]
        if name == "dot_general":
            return [self._dot(eqn, ins)]
        return _jaxpr.bind(eqn, [_mat(x) for x in ins])

    def _layout(self, eqn, name, p, v: _QView) -> _QView | None:
        out = eqn.outvars[0].aval
        if name == "convert_element_type":
            if not jnp.issubdtype(out.dtype, jnp.floating):
                return None
            return dataclasses.replace(v, dtype=jnp.dtype(out.dtype))
        if name in _PASS:
            return v
        if name == "transpose":
            return dataclasses.replace(v, dims=tuple(v.dims[i] for i in p["permutation"]))
        if name == "squeeze":
            drop = {d % len(v.dims) for d in p["dimensions"]}
            return dataclasses.replace(
                v, dims=tuple(d for i, d in enumerate(v.dims) if i not in drop)
            )
        if name == "reshape" and p.get("dimensions") is None or name == "broadcast_in_dim":
            if name == "broadcast_in_dim":
                bd = p["broadcast_dimensions"]
                if any(v.shape[i] != out.shape[d] for i, d in enumerate(bd)):
                    return None
                if any(out.shape[d] != 1 for d in range(len(out.shape)) if d not in bd):
                    return None
                new = [None] * len(out.shape)
                for i, d in enumerate(bd):
                    new[d] = v.dims[i]
                return dataclasses.replace(v, dims=tuple(new))
            m = _unit_map(v.shape, tuple(out.shape))
            if m is None:
                return None
            return dataclasses.replace(v, dims=tuple(None if i is None else v.dims[i] for i in m))
        return None

    def _deq(self, eqn, name, ins) -> list:
        """An equation on a scanned layer's dequantized weight (see ``_Deq``)."""
        (d,) = [x for x in ins if isinstance(x, _Deq)][:1]
        outs = _jaxpr.bind(eqn, [_mat(x) for x in ins])
        if len(ins) == 1 and (name in _KEEP_DEQ or name in _PASS):
            if jnp.issubdtype(outs[0].dtype, jnp.floating):
                return [_Deq(outs[0], d.path)]
        if name != "dot_general":
            return outs
        if all(isinstance(x, (_Deq, _QView)) for x in ins):  # two weights: no activation
            return outs
        k = 0 if isinstance(ins[0], _Deq) else 1
        x = _mat(ins[1 - k])
        (lc, rc), _ = eqn.params["dimension_numbers"]
        x = fake_quant(x, self._token_spec(x, rc if k == 0 else lc, d.path))
        return _jaxpr.bind(eqn, [d.value, x] if k == 0 else [x, d.value])

    def _token_spec(self, x, contracted, path: str) -> QuantSpec:
        """``activations`` with one scale per token of ``x``: per index of its free axes."""
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"{_FN}: activations={self.activations!r} quantizes the float operand of the "
                f"product with the quantized kernel {path!r}, but that operand is "
                f"{x.dtype} {tuple(x.shape)}; pass activations=None for this function"
            )
        keep = tuple(i for i in range(x.ndim) if i not in {c % x.ndim for c in contracted})
        return dataclasses.replace(self.activations, axis=keep or None)

    # -- products -------------------------------------------------------------------------------
    def _dot(self, eqn, ins) -> jax.Array:
        p = eqn.params
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        out = eqn.outvars[0].aval
        two_weights = all(isinstance(x, _QView) for x in ins)
        if two_weights:  # two parameter leaves: dequantize one; neither is an activation
            ins = [ins[0].materialize(), ins[1]]
        k = 0 if isinstance(ins[0], _QView) else 1
        v, x = ins[k], ins[1 - k]
        vc, vb = (lc, lb) if k == 0 else (rc, rb)
        xc, xb = (rc, rb) if k == 0 else (lc, lb)
        qc = [v.dims[d] for d in vc]
        qb = [v.dims[d] for d in vb]
        x = jnp.asarray(x)
        lhs_spec = None
        if self.activations is not None and not two_weights:
            # Whichever side the weight is on (``x @ W`` or Equinox's ``W @ x``), the float
            # operand is the activation: one scale per token, i.e. per non-contracted index.
            lhs_spec = self._token_spec(x, xc, v.path)
        if any(d is None for d in (*qc, *qb)):  # contracts a unit axis the view made up
            if lhs_spec is not None:
                x = fake_quant(x, lhs_spec)  # simulated: no int8 x int8 product here
            ops = [v.materialize(), x] if k == 0 else [x, v.materialize()]
            return _jaxpr.bind(eqn, ops)[0]
        pet = p.get("preferred_element_type")
        try:
            r = qdot_general(
                x,
                v.q,
                ((tuple(xc), tuple(qc)), (tuple(xb), tuple(qb))),
                precision=p.get("precision"),
                preferred_element_type=pet if pet is not None else None,
                lhs_spec=lhs_spec,
                impl=self.impl,
            )
        except ValueError as e:
            side = "left" if k == 0 else "right"
            raise ValueError(
                f"{_FN}: the product with the quantized kernel {v.path!r} (the {side} operand of "
                f"a dot_general, shape {v.shape}) failed: {e}"
            ) from e
        # r: (batch, x free, q free in q's axis order); the program wants (batch, lhs free, rhs
        # free) with v's free axes in view order.
        nb = len(xb)
        x_free = x.ndim - len(xc) - nb
        q_free = [d for d in range(v.q.ndim) if d not in qc and d not in qb]
        view_free = [d for i, d in enumerate(v.dims) if i not in vc and i not in vb]
        mapped = [d for d in view_free if d is not None]
        base = nb + x_free
        r = r.reshape(
            r.shape[:base] + tuple(v.q.shape[d] for d in q_free if d in mapped)
        )  # drops unit q axes the view does not have
        order = sorted(mapped)
        r = r.transpose((*range(base), *(base + order.index(d) for d in mapped)))
        vshape = tuple(1 if d is None else v.q.shape[d] for d in view_free)
        r = r.reshape(r.shape[:base] + vshape)
        if k == 0:
            n_v = len(vshape)
            r = r.transpose((*range(nb), *range(base, base + n_v), *range(nb, base)))
        return r.reshape(out.shape).astype(out.dtype)

    # -- control flow: QViews never enter a lax loop's carry or a branch's operands --------------
    def scan(self, eqn, ins, s):
        nc, nk = s.num_consts, s.num_carry
        consts, carry = list(ins[:nc]), [_mat(c) for c in ins[nc : nc + nk]]
        xs = list(ins[nc + nk :])
        plain = [x for x in xs if not isinstance(x, _QView)]

        def body(c, inp):
            ps, i = inp
            it = iter(ps)
            step = [self._slice(x, i) if isinstance(x, _QView) else next(it) for x in xs]
            outs = [_mat(o) for o in self.walk_sub(0, s.body, consts + list(c) + step)]
            return outs[:nk], outs[nk:]

        steps = jnp.arange(s.length, dtype=jnp.int32)
        carry, ys = lax.scan(
            body, carry, (plain, steps), length=s.length, reverse=s.reverse, unroll=s.unroll
        )
        return list(carry) + list(ys)

    def _slice(self, v: _QView, i) -> Any:
        """Layer ``i`` of a scanned ``QArray`` stack, dequantized (fused into the slice)."""
        w = lax.dynamic_index_in_dim(v.materialize(), i, 0, keepdims=False)
        return w if self.activations is None else _Deq(w, v.path)

    def while_loop(self, eqn, ins, w):
        cn, bn = w.cond_nconsts, w.body_nconsts
        cc, bc = list(ins[:cn]), list(ins[cn : cn + bn])
        carry = [_mat(c) for c in ins[cn + bn :]]

        def cond_fun(c):
            (pred,) = self.walk_sub(0, w.cond, cc + list(c), w.cond_consts)
            return _mat(pred)

        def body_fun(c):
            return [_mat(o) for o in self.walk_sub(1, w.body, bc + list(c), w.body_consts)]

        return list(lax.while_loop(cond_fun, body_fun, carry))

    def cond(self, eqn, ins, c):
        index, ops = _mat(ins[0]), list(ins[1:])

        def branch(k):
            def run():
                outs = self.walk_sub(k, c.branches[k], ops, c.branch_consts[k])
                return [_mat(o) for o in outs]

            return run

        return list(lax.switch(index, [branch(k) for k in range(len(c.branches))]))


@public("quant.quantized")
def quantized(
    fn: Callable[..., Any],
    *,
    activations: QuantSpec | None = None,
    impl: str = "auto",
) -> Callable[..., Any]:
    """Transforms ``fn(params, *args)`` into ``g(qparams, *args)`` that runs on quantized weights.

    ``g(qparams, *args) == fn(dequantize_params(qparams), *args)`` up to float rounding, where
    ``qparams`` is ``params`` with some leaves replaced by ``QArray``s (``quant.quantize_params``,
    ``quant.oneshot``); float leaves are used as they are. The float weight tree is never built:
    each ``QArray`` reaches the ``dot_general`` that uses it as a lazy view and multiplies through
    ``quant.qdot_general`` (see the module docstring for what is folded and what is dequantized
    at its use). ``fn`` is any jax function: a plain function, ``lambda p, x: module.apply(p,
    x)`` (Linen), ``lambda s, x: nnx.merge(graphdef, s)(x)`` (NNX), ``lambda p, x: hf_model(x,
    params=p).logits`` (HF Flax), an Equinox-style tree of ``(out, in)`` weights, or
    ``jaxslim.demo.lm.apply_fn(model)[0]``. ``g`` runs under ``jit``, ``vmap`` and ``grad`` with
    respect to float inputs (straight-through; no gradient with respect to ``QArray`` leaves).

    Args:
      fn: ``fn(params, *args, **kwargs)``; ``kwargs`` given to ``g`` are static (closed over).
      activations: ``None`` (weight-only) or a spec to quantize the activation operand of every
        quantized product on the fly, one scale per token (its ``axis`` is set to the
        activation's non-contracted axes at each product), whether the weight is the right
        (``x @ W``) or the left (``W @ x``, Equinox) operand: ``QuantSpec(8)`` gives W8A8 with
        int8 x int8 products accumulated in int32 where the kernel is int8 with one scale per
        output channel (constant along the contracted axis) and the product has enough rows for
        the int path (``quant._dot.INT_MIN_ROWS``), and simulated activation quantization
        (``fake_quant``) elsewhere. Raises ``ValueError`` when a quantized convolution kernel
        is met (convolution inputs are not quantized).
      impl: passed to ``qdot_general`` (``"auto"``, ``"blocked"``, ``"int"``, ``"dequantize"``).

    Returns:
      ``g(qparams, *args, **kwargs)`` with ``fn``'s output structure.

    >>> import jax, jax.numpy as jnp
    >>> from jaxslim import quant
    >>> params = {"w": jnp.linspace(-1, 1, 64 * 8).reshape(64, 8), "b": jnp.ones(8)}
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"] + p["b"])
    >>> qp, _ = quant.quantize_params(params, [("w", quant.QuantSpec(8, axis=-1))])
    >>> x = jnp.ones((2, 64))
    >>> y = jax.jit(quant.quantized(fn))(qp, x)
    >>> bool(jnp.allclose(y, fn(quant.dequantize_params(qp), x), atol=1e-5))
    True
    """
    if not callable(fn):
        raise TypeError(
            f"{_FN}: fn must be a callable fn(params, *args), got {type(fn).__name__} {fn!r:.80}"
        )
    if activations is not None and not isinstance(activations, QuantSpec):
        raise TypeError(f"{_FN}: activations must be None or a QuantSpec, got {activations!r}")
    if impl not in ("auto", "int", "blocked", "dequantize"):
        raise ValueError(
            f"{_FN}: impl must be 'auto', 'int', 'blocked' or 'dequantize', got {impl!r}"
        )

    @functools.wraps(fn)
    def g(params: Any, *args: Any, **kwargs: Any) -> Any:
        flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)
        leaves = [leaf for _, leaf in flat]
        shapes = [
            jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if is_qarray(leaf) else leaf
            for leaf in leaves
        ]
        abstract = jax.tree.unflatten(treedef, shapes)
        f = functools.partial(fn, **kwargs) if kwargs else fn
        t = _jaxpr.make_jaxpr(f, abstract, *args, require_float=False)
        ins = [
            _QView(leaf, tuple(range(leaf.ndim)), jnp.dtype(leaf.dtype), _tree.path_str(p))
            if is_qarray(leaf)
            else leaf
            for p, leaf in flat
        ]
        ins += jax.tree.leaves(list(args))
        if len(ins) != len(t.jaxpr.invars):
            raise ValueError(
                f"{_FN}: fn's jaxpr has {len(t.jaxpr.invars)} inputs but params and args have "
                f"{len(ins)} leaves"
            )
        outs = _Runner(activations, impl).walk(t.jaxpr, ins, t.consts)
        return jax.tree.unflatten(t.out_tree, [_mat(o) for o in outs])

    return public(_FN)(g)
