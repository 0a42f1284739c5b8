"""One walker over jaxprs, shared by splice/, calibrate and quant.

Every piece of jaxslim that reads a traced function (coupled axes in :mod:`jaxslim.splice._graph`,
FLOP counts, fold detection, which parameter feeds which matmul, calibration statistics) does so
through :class:`Walker`: one traversal that knows the sub-jaxprs of ``jit``/``pjit``,
``closed_call``, ``custom_jvp_call``/``custom_vjp_call``, ``remat``/``checkpoint``, ``cond``,
``scan`` and ``while``. A consumer differs only in what it does per equation (``equation``) and,
where it needs to, per control-flow primitive (``scan``, ``while_loop``, ``cond``, ``call``).

**Version robustness.** The parameters of control-flow equations changed between jax releases
(jax 0.12's ``scan`` has ``ft_in``/``ft_out`` trees instead of ``num_consts``/``num_carry``, and
sub-jaxprs are open ``Jaxpr`` objects with their own ``consts`` instead of ``ClosedJaxpr``).
:func:`control` is the one place that reads them; walkers get plain records (:class:`Scan`,
:class:`While`, :class:`Cond`, :class:`Call`).

**Order.** Equations are visited in program order, depth first: a sub-jaxpr is walked when its
equation is reached; a ``scan`` or ``while`` body is walked once (a ``while`` condition before its
body); ``cond`` branches in branch-index order. Each equation has a *site*: the tuple
``(i0, k0, i1, k1, ..., in)`` of equation indices and sub-jaxpr numbers (the order above) from the
top jaxpr down. Every ``dot_general`` / ``conv_general_dilated`` site gets an *index*: its
position in that order (:func:`sites`). :func:`kernel_uses` and :func:`eval_jaxpr` number sites
the same way, so a calibration hook can look its kernels up by ``Call.index``.

Also here: :func:`make_jaxpr` (trace ``fn(params, *args)`` on shapes only and name every input by
its parameter path) and :func:`kernel_uses` (which parameter leaf feeds which matmul or
convolution, and which of its axes are contracted and which are output).

**The internal API.** The names in ``__all__`` are what splice/, calibrate and quant/ use; other
modules never reach for an underscored name here. By job:

* tracing: :func:`make_jaxpr` -> :class:`Traced`; :func:`abstract` (an array's
  ``ShapeDtypeStruct``, sharding kept);
* reading: :func:`control` and its records, :func:`open_jaxpr`, :func:`shape`,
  :func:`use_counts`;
* walking: subclass :class:`Walker`; :func:`bind` evaluates one ordinary equation;
* kernels: :func:`kernel_uses` (traces) / :func:`kernel_uses_of` (an existing :class:`Traced`)
  -> ``{path: [KernelUse]}``; :func:`sites` numbers the matmuls; :class:`Leaf` and
  :func:`leaf_layout` follow a parameter leaf through layout ops in a walker of one's own;
* evaluating with a hook per matmul: :func:`eval_jaxpr` / :func:`run`, the hook getting a
  :class:`Hooked`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from jaxslim import _tree
from jaxslim._checks import caller, public

MATMULS = frozenset({"dot_general", "conv_general_dilated"})

# Primitives whose one sub-jaxpr takes exactly the equation's inputs and gives its outputs.
_CALLS = frozenset(
    """pjit jit closed_call core_call custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr
    remat remat2 checkpoint""".split()
)
_CALL_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


# --------------------------------------------------------------------------------------------
# Reading control-flow equations (the one version-dependent place).


def open_jaxpr(x: Any, consts: Sequence[Any] | None = None) -> tuple[Any, list[Any]]:
    """``(open Jaxpr, consts)`` of a ``ClosedJaxpr`` (jax <= 0.11) or a ``Jaxpr`` (jax 0.12, which
    may carry its own ``consts``). Missing consts are ``None`` (unknown)."""
    jaxpr = x.jaxpr if hasattr(x, "jaxpr") else x
    if consts is None:
        consts = getattr(x, "consts", None) or ()
    consts = list(consts)
    n = len(jaxpr.constvars)
    return jaxpr, (consts + [None] * n)[:n]


@dataclasses.dataclass(frozen=True)
class Scan:
    """A ``scan``: invars are ``consts + carry + xs``, outvars ``carry + ys``."""

    body: Any
    body_consts: tuple
    length: int
    reverse: bool
    num_consts: int
    num_carry: int
    unroll: Any = 1


@dataclasses.dataclass(frozen=True)
class While:
    """A ``while``: invars are ``cond_consts + body_consts + carry``, outvars ``carry``."""

    cond: Any
    cond_consts: tuple
    body: Any
    body_consts: tuple
    cond_nconsts: int
    body_nconsts: int


@dataclasses.dataclass(frozen=True)
class Cond:
    """A ``cond``: invars are ``index, *operands``; each branch takes the operands."""

    branches: tuple
    branch_consts: tuple


@dataclasses.dataclass(frozen=True)
class Call:
    """A call-like primitive (``jit``, ``custom_jvp_call``, ``remat``, ...): the sub-jaxpr takes
    the equation's inputs and gives its outputs."""

    jaxpr: Any
    consts: tuple


def _scan_counts(params: Mapping[str, Any]) -> tuple[int, int]:
    if "num_consts" in params:
        return int(params["num_consts"]), int(params["num_carry"])
    if "ft_in" in params:  # jax 0.12: a flat tree of (consts, carry, xs)
        consts, carry, _ = params["ft_in"].unpack()
        return len(consts), len(carry)
    raise NotImplementedError(
        f"jaxslim: unknown scan parameters {sorted(params)} in jax {jax.__version__}; "
        "please report this jax version"
    )


def control(eqn: Any) -> Scan | While | Cond | Call | None:
    """The control-flow record of ``eqn``, or ``None`` for an ordinary equation.

    The one place that reads control-flow parameters; walkers never index ``eqn.params`` for
    sub-jaxprs themselves.
    """
    name, p = eqn.primitive.name, eqn.params
    if name == "scan":
        nc, ncarry = _scan_counts(p)
        body, consts = open_jaxpr(p["jaxpr"])
        return Scan(
            body,
            tuple(consts),
            int(p["length"]),
            bool(p.get("reverse", False)),
            nc,
            ncarry,
            p.get("unroll", 1),
        )
    if name == "while":
        cj, cc = open_jaxpr(p["cond_jaxpr"])
        bj, bc = open_jaxpr(p["body_jaxpr"])
        return While(cj, tuple(cc), bj, tuple(bc), int(p["cond_nconsts"]), int(p["body_nconsts"]))
    if name == "cond":
        opened = [open_jaxpr(b) for b in p["branches"]]
        return Cond(tuple(j for j, _ in opened), tuple(tuple(c) for _, c in opened))
    for key in _CALL_KEYS:
        sub = p.get(key)
        if sub is None or not hasattr(getattr(sub, "jaxpr", sub), "eqns"):
            continue
        jaxpr, consts = open_jaxpr(sub)
        if name in _CALLS or _same_signature(jaxpr, eqn):
            return Call(jaxpr, tuple(consts))
    return None


def _same_signature(jaxpr: Any, eqn: Any) -> bool:
    if len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
        return False
    return all(
        getattr(a.aval, "shape", None) == getattr(b.aval, "shape", None)
        for a, b in zip(jaxpr.invars, eqn.invars, strict=True)
    )


def shape(v: Any) -> tuple[int, ...]:
    """The shape of a jaxpr variable or literal (``()`` for tokens)."""
    return tuple(getattr(v.aval, "shape", ()))


# --------------------------------------------------------------------------------------------
# The walker.


class Walker:
    """Abstract (or concrete) interpretation of a jaxpr: one value per variable.

    ``walk(jaxpr, ins, consts)`` binds ``ins`` to the invars and ``consts`` (through
    :meth:`const`) to the constvars, then visits every equation in program order, calling
    :meth:`visit`, which dispatches on :func:`control`:

    * an ordinary equation goes to :meth:`equation` (default: ``None`` for every output);
    * ``scan`` / ``while`` / ``cond`` / a call go to :meth:`scan` / :meth:`while_loop` /
      :meth:`cond` / :meth:`call`, whose defaults walk every sub-jaxpr once (see the module
      docstring for the order) with :meth:`walk_sub`: constants and operands go in unchanged,
      loop-carried values and scanned slices go in as ``None`` (their value changes per
      iteration), and the outputs of loops and conds are ``None``; a call's outputs are its
      sub-jaxpr's.

    Literals are read through :meth:`literal` (default: ``None``). Overrides of the control-flow
    methods must walk sub-jaxprs with ``walk_sub(k, ...)``, ``k`` the sub-jaxpr's number, so
    that :attr:`site` stays right.
    """

    def __init__(self) -> None:
        self._path: list[int] = []
        self._stack: list[Any] = []

    # -- hooks ----------------------------------------------------------------------------------
    def const(self, var: Any, value: Any) -> Any:
        """The value of a constvar whose constant is ``value`` (``None`` if unknown)."""
        return None

    def literal(self, lit: Any) -> Any:
        """The value of a literal operand."""
        return None

    def equation(self, eqn: Any, ins: list) -> list:
        """The output values of an ordinary equation, given its input values."""
        return [None] * len(eqn.outvars)

    def call(self, eqn: Any, ins: list, c: Call) -> list:
        return self.walk_sub(0, c.jaxpr, ins, c.consts)

    def scan(self, eqn: Any, ins: list, s: Scan) -> list:
        nc, nk = s.num_consts, s.num_carry
        body_ins = list(ins[:nc]) + [None] * nk
        body_ins += [
            self.scan_slice(x, v)
            for x, v in zip(ins[nc + nk :], eqn.invars[nc + nk :], strict=True)
        ]
        self.walk_sub(0, s.body, body_ins, s.body_consts)
        return [None] * len(eqn.outvars)

    def scan_slice(self, value: Any, var: Any) -> Any:
        """The body's value for one slice (along axis 0) of the scanned input ``value``."""
        return None

    def while_loop(self, eqn: Any, ins: list, w: While) -> list:
        cn, bn = w.cond_nconsts, w.body_nconsts
        carry = [None] * (len(ins) - cn - bn)
        self.walk_sub(0, w.cond, list(ins[:cn]) + carry, w.cond_consts)
        self.walk_sub(1, w.body, list(ins[cn : cn + bn]) + carry, w.body_consts)
        return [None] * len(eqn.outvars)

    def cond(self, eqn: Any, ins: list, c: Cond) -> list:
        for k, (branch, consts) in enumerate(zip(c.branches, c.branch_consts, strict=True)):
            self.walk_sub(k, branch, list(ins[1:]), consts)
        return [None] * len(eqn.outvars)

    # -- traversal ------------------------------------------------------------------------------
    @property
    def site(self) -> tuple[int, ...]:
        """The site of the equation being visited (see the module docstring)."""
        return tuple(self._path)

    @property
    def jaxpr(self) -> Any:
        """The open jaxpr being walked (the innermost one)."""
        return self._stack[-1]

    def read(self, env: dict, v: Any) -> Any:
        if isinstance(v, jex_core.Literal):
            return self.literal(v)
        return env[v]

    def visit(self, eqn: Any, ins: list) -> list:
        c = control(eqn)
        if c is None:
            return self.equation(eqn, ins)
        if isinstance(c, Scan):
            return self.scan(eqn, ins, c)
        if isinstance(c, While):
            return self.while_loop(eqn, ins, c)
        if isinstance(c, Cond):
            return self.cond(eqn, ins, c)
        return self.call(eqn, ins, c)

    def walk(self, jaxpr: Any, ins: Sequence[Any], consts: Sequence[Any] | None = None) -> list:
        """Walks ``jaxpr`` (open or closed) with input values ``ins``; returns the output values."""
        jaxpr, consts = open_jaxpr(jaxpr, consts)
        env: dict = {}
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = self.const(v, c)
        for v, x in zip(jaxpr.invars, ins, strict=True):
            env[v] = x
        self._stack.append(jaxpr)
        self._path.append(0)
        try:
            for i, eqn in enumerate(jaxpr.eqns):
                self._path[-1] = i
                outs = self.visit(eqn, [self.read(env, v) for v in eqn.invars])
                for v, o in zip(eqn.outvars, outs, strict=True):
                    env[v] = o
        finally:
            self._path.pop()
            self._stack.pop()
        return [self.read(env, v) for v in jaxpr.outvars]

    def walk_sub(self, k: int, jaxpr: Any, ins: Sequence[Any], consts: Sequence[Any] = ()) -> list:
        """Walks sub-jaxpr number ``k`` of the current equation."""
        self._path.append(k)
        try:
            return self.walk(jaxpr, ins, consts)
        finally:
            self._path.pop()


def use_counts(jaxpr: Any) -> dict:
    """How many times each variable of ``jaxpr`` is read (equation inputs and outputs)."""
    uses: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, jex_core.Literal):
                uses[v] = uses.get(v, 0) + 1
    for v in jaxpr.outvars:
        if not isinstance(v, jex_core.Literal):
            uses[v] = uses.get(v, 0) + 1
    return uses


# --------------------------------------------------------------------------------------------
# Tracing a function on shapes.


@dataclasses.dataclass(frozen=True)
class Traced:
    """The jaxpr of ``fn(params, *args)`` with its inputs named.

    ``jaxpr.invars`` are the leaves of ``params`` (``param_paths``, in ``jax.tree`` order) then
    those of ``args`` (``arg_paths``, ``"0/..."`` for ``args[0]``); ``out_tree`` is the structure
    of ``fn``'s output.
    """

    jaxpr: Any
    consts: tuple
    param_paths: tuple[str, ...]
    arg_paths: tuple[str, ...]
    out_tree: Any

    @property
    def labels(self) -> tuple[str | None, ...]:
        """Per invar: its parameter path, ``None`` for an argument."""
        return self.param_paths + (None,) * len(self.arg_paths)


def abstract(x: Any) -> Any:
    """The ``jax.ShapeDtypeStruct`` (shape, dtype and sharding) of an array or of a
    ``ShapeDtypeStruct``; any other value (a Python scalar, ``None``) is returned unchanged.

    Tracing on these instead of the arrays costs no compute and keeps shardings.

    >>> import jax.numpy as jnp
    >>> abstract(jnp.ones((2, 3))).shape, abstract(1.5)
    ((2, 3), 1.5)
    """
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
    return x


def _is_float_leaf(leaf: Any) -> bool:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return bool(jnp.issubdtype(leaf.dtype, jnp.floating)) and int(np.prod(leaf.shape)) > 0
    return _tree.is_float_array(leaf)


def _check_leaves(leaves: list, what: str) -> None:
    for path, leaf in leaves:
        ok = isinstance(leaf, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct)
        ok = ok or isinstance(leaf, bool | int | float | complex) or hasattr(leaf, "aval")
        if not ok:
            raise TypeError(
                f"{caller()}: {what} leaf {path!r} is a {type(leaf).__name__} ({leaf!r:.60}), not "
                "an array; pass arrays or jax.ShapeDtypeStruct (mark static fields of a module "
                "as such, or close over them in fn)"
            )


def _fn_label(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def make_jaxpr(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    require_float: bool = True,
) -> Traced:
    """Traces ``fn(params, *args)`` on shapes only (``jax.ShapeDtypeStruct``, shardings kept).

    Raises ``TypeError`` for a non-callable ``fn`` or a leaf that is not an array, ``ValueError``
    (with ``require_float``) when ``params`` has no floating-point array leaf, and re-raises an
    error of ``fn`` itself as ``TypeError`` (if it was one) or ``ValueError`` naming the public call
    and ``fn`` with a hint.

    >>> import jax.numpy as jnp
    >>> t = make_jaxpr(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}, jnp.ones(3))
    >>> t.param_paths, t.arg_paths, [eqn.primitive.name for eqn in t.jaxpr.eqns]
    (('w',), ('0',), ['dot_general'])
    """
    if not callable(fn):
        raise TypeError(
            f"{caller()}: fn must be a callable fn(params, *args), got {type(fn).__name__} "
            f"{fn!r:.80}"
        )
    param_leaves = _tree.leaves_with_paths(params)
    arg_leaves = _tree.leaves_with_paths(list(args))
    _check_leaves(param_leaves, "params")
    _check_leaves(arg_leaves, "args")
    if require_float and not any(_is_float_leaf(leaf) for _, leaf in param_leaves):
        names = [p for p, _ in param_leaves][:8]
        raise ValueError(
            f"{caller()}: params has no floating-point array leaf (leaves: {names}); pass the "
            "parameter tree fn reads as its first argument ({'params': ...} for Linen, "
            "nnx.state(model) or nnx.split(model)[1] for NNX)"
        )
    shapes = jax.tree.map(abstract, (params, args))
    try:
        closed, out = jax.make_jaxpr(lambda p, a: fn(p, *a), return_shape=True)(*shapes)
    except Exception as e:  # noqa: BLE001 - re-raised with the function named and a hint
        kind = TypeError if isinstance(e, TypeError) else ValueError
        msg = str(e).strip().splitlines()[0][:300].rstrip(".") if str(e).strip() else ""
        raise kind(
            f"{caller()}: fn(params, *args) raised {type(e).__name__} while traced on shapes "
            f"(fn={_fn_label(fn)}): {msg}. Hint: fn must run on jax.ShapeDtypeStruct inputs "
            "with these params and args: check their shapes and tree structure, and do not "
            "convert traced values to Python or NumPy (float(x), np.asarray(x), `if x > 0:`)"
        ) from e
    jaxpr, consts = open_jaxpr(closed)
    if len(param_leaves) + len(arg_leaves) != len(jaxpr.invars):
        raise ValueError(
            f"{caller()}: fn's jaxpr has {len(jaxpr.invars)} inputs but params and args have "
            f"{len(param_leaves) + len(arg_leaves)} leaves"
        )
    return Traced(
        jaxpr,
        tuple(consts),
        tuple(p for p, _ in param_leaves),
        tuple(p for p, _ in arg_leaves),
        jax.tree.structure(out),
    )


# --------------------------------------------------------------------------------------------
# Which parameter leaf feeds which dot_general / conv.


@dataclasses.dataclass(frozen=True)
class KernelUse:
    """One use of a parameter leaf as an operand of a ``dot_general`` or convolution.

    Axes are the *leaf's* axes (after following transposes, reshapes, casts, broadcasts, slices
    and scans back to it):

    * ``contracted``: summed over with the other operand (a Dense kernel ``(in, out)``: ``(0,)``;
      an Equinox ``(out, in)`` weight: ``(1,)``; a convolution kernel: its input-feature axis);
    * ``output``: axes that reach the output (``(1,)`` for ``(in, out)``; a convolution kernel's
      output-feature axis);
    * ``batch``: ``dot_general`` batch axes (a per-head einsum);
    * ``spatial``: a convolution kernel's window axes;
    * ``indexed``: axes taken one index at a time before the use (the layer axis of a stacked
      ``(L, in, out)`` kernel under ``scan`` or ``w[i]``).

    ``operand`` is 0 (lhs) or 1 (rhs); ``index`` the site's position in execution order (the
    module docstring), ``site`` the site itself, ``in_loop`` whether it is inside a ``scan`` or
    ``while`` body (runs many times).

    ``axes[d]``: the leaf axes that make up dimension ``d`` of the operand as the matmul sees it
    (``()`` for a new axis; several when a reshape merged them, in memory order).
    ``scanned``: ``(leaf_axes, depth, length)`` per axis taken one slice per iteration by an
    enclosing ``scan`` of ``length`` steps (``depth`` counts the scans outside that one: 0 for the
    outermost), the slice being ``Hooked.scan_index[depth]`` of :func:`eval_jaxpr`.
    """

    path: str
    primitive: str
    operand: int
    contracted: tuple[int, ...]
    output: tuple[int, ...]
    batch: tuple[int, ...] = ()
    spatial: tuple[int, ...] = ()
    indexed: tuple[int, ...] = ()
    index: int = 0
    site: tuple[int, ...] = ()
    in_loop: bool = False
    axes: tuple[tuple[int, ...], ...] = ()
    scanned: tuple[tuple[tuple[int, ...], int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """A value that is a parameter leaf seen through layout ops: ``axes[i]`` are the leaf axes
    that make up axis ``i`` (``()``: a new axis)."""

    path: str
    axes: tuple[tuple[int, ...], ...]
    indexed: frozenset
    scanned: tuple = ()  # ((leaf axes, scan depth, length), ...) of axes sliced by a scan


def _union(groups) -> tuple[int, ...]:
    return tuple(sorted({a for g in groups for a in g}))


_CASTS = frozenset(
    """convert_element_type copy copy_p reduce_precision sharding_constraint mesh_cast pvary
    optimization_barrier device_put""".split()
)


class _KernelWalker(Walker):
    """Follows parameter leaves to the matmuls they feed; numbers every matmul site."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: list[KernelUse] = []
        self.gathered: list[str] = []
        self.sites: dict[tuple[int, ...], int] = {}
        self.loops = 0
        self.scans = 0

    def scan_slice(self, value, var):
        if isinstance(value, _Leaf) and value.axes:
            scanned = (*value.scanned, (value.axes[0], self.scans - 1, shape(var)[0]))
            return _Leaf(value.path, value.axes[1:], value.indexed | set(value.axes[0]), scanned)
        return None

    def scan(self, eqn, ins, s):
        self.loops += 1
        self.scans += 1
        try:
            return super().scan(eqn, ins, s)
        finally:
            self.loops -= 1
            self.scans -= 1

    def while_loop(self, eqn, ins, w):
        self.loops += 1
        try:
            return super().while_loop(eqn, ins, w)
        finally:
            self.loops -= 1

    def equation(self, eqn, ins):
        name = eqn.primitive.name
        if name in MATMULS:
            index = self.sites.setdefault(self.site, len(self.sites))
            for k, val in enumerate(ins):
                if isinstance(val, _Leaf):
                    self.uses.append(self._use(eqn, k, val, index))
            return [None]
        if not any(isinstance(v, _Leaf) for v in ins):
            return [None] * len(eqn.outvars)
        if name == "gather" and isinstance(ins[0], _Leaf) and ins[0].path not in self.gathered:
            self.gathered.append(ins[0].path)
        val = ins[0]
        if not isinstance(val, _Leaf):
            return [None] * len(eqn.outvars)
        if name in _CASTS:
            return [val] + [None] * (len(eqn.outvars) - 1)
        out = _layout(eqn, val)
        if out is not None:
            return out
        return [None] * len(eqn.outvars)

    def _use(self, eqn, k, val: _Leaf, index: int) -> KernelUse:
        p = eqn.params
        axes = val.axes
        common = {
            "path": val.path,
            "primitive": eqn.primitive.name,
            "operand": k,
            "indexed": tuple(sorted(val.indexed)),
            "index": index,
            "site": self.site,
            "in_loop": self.loops > 0,
            "axes": axes,
            "scanned": val.scanned,
        }
        if eqn.primitive.name == "dot_general":
            (lc, rc), (lb, rb) = p["dimension_numbers"]
            contract, batch = (lc, lb) if k == 0 else (rc, rb)
            free = [i for i in range(len(axes)) if i not in contract and i not in batch]
            return KernelUse(
                contracted=_union(axes[i] for i in contract),
                output=_union(axes[i] for i in free),
                batch=_union(axes[i] for i in batch),
                **common,
            )
        dn = p["dimension_numbers"]
        spec = dn.rhs_spec if k == 1 else dn.lhs_spec
        # rhs_spec = (out features, in features, *spatial); lhs_spec = (batch, features, *spatial)
        contracted, output = (spec[1], spec[0])
        return KernelUse(
            contracted=_union([axes[contracted]]),
            output=_union([axes[output]]),
            spatial=_union(axes[d] for d in spec[2:]),
            **common,
        )


def _layout(eqn, val: _Leaf) -> list | None:
    """Maps a leaf through a layout op (transpose, reshape, broadcast, squeeze, slices, split,
    unstack); ``None`` if the op is not one."""
    name, p = eqn.primitive.name, eqn.params
    axes, src = val.axes, shape(eqn.invars[0])
    n_out = len(eqn.outvars)

    def leaf(new_axes, indexed=()):
        return _Leaf(val.path, tuple(new_axes), val.indexed | set(indexed), val.scanned)

    if name == "transpose":
        return [leaf(axes[i] for i in p["permutation"])]
    if name == "squeeze":
        drop = {d % len(axes) for d in p["dimensions"]}
        return [
            leaf((a for i, a in enumerate(axes) if i not in drop), _union(axes[d] for d in drop))
        ]
    if name == "broadcast_in_dim":
        dst = p["shape"]
        out = [()] * len(dst)
        for i, d in enumerate(p["broadcast_dimensions"]):
            if src[i] == dst[d]:
                out[d] = axes[i]
        return [leaf(out)]
    if name == "reshape":
        if p.get("dimensions") is not None:
            return None
        return [leaf(_reshape_axes(axes, src, shape(eqn.outvars[0])))]
    if name in ("slice", "dynamic_slice"):
        dst = shape(eqn.outvars[0])
        cut = [i for i in range(len(src)) if dst[i] == 1 and src[i] > 1]
        return [
            leaf(
                ((() if i in cut else a) for i, a in enumerate(axes)), _union(axes[i] for i in cut)
            )
        ]
    if name == "split":
        return [leaf(axes) for _ in range(n_out)]
    if name == "unstack":
        ax = p["axis"] % len(axes)
        rest = [a for i, a in enumerate(axes) if i != ax]
        return [leaf(rest, axes[ax]) for _ in range(n_out)]
    return None


Leaf = _Leaf
CASTS = _CASTS  # primitives that leave a value's layout as it is (casts, copies, constraints)


def leaf_layout(eqn: Any, val: Leaf) -> list | None:
    """The :class:`Leaf` values of ``eqn``'s outputs when ``eqn`` is a layout op (``transpose``,
    ``reshape``, ``broadcast_in_dim``, ``squeeze``, slices, ``split``, ``unstack``) applied to the
    leaf ``val`` (its first operand); ``None`` for any other op."""
    return _layout(eqn, val)


def _reshape_axes(axes, src, dst) -> list[tuple[int, ...]]:
    """Aligns runs of equal products of the non-unit axes of ``src`` and ``dst``."""
    out: list[tuple[int, ...]] = [()] * len(dst)
    a = [i for i, s in enumerate(src) if s > 1]
    b = [i for i, s in enumerate(dst) if s > 1]
    i = j = 0
    while i < len(a) and j < len(b):
        ga, gb = [a[i]], [b[j]]
        pa, pb = src[a[i]], dst[b[j]]
        i, j = i + 1, j + 1
        while pa != pb and i <= len(a) and j <= len(b):
            if pa < pb and i < len(a):
                pa *= src[a[i]]
                ga.append(a[i])
                i += 1
            elif pb < pa and j < len(b):
                pb *= dst[b[j]]
                gb.append(b[j])
                j += 1
            else:
                break
        merged = tuple(dict.fromkeys(a for k in ga for a in axes[k]))  # memory order
        for k in gb:
            out[k] = merged
    return out


def _walk_kernels(jaxpr: Any, consts: Sequence[Any], labels: Sequence[str | None]) -> _KernelWalker:
    w = _KernelWalker()
    ins = []
    for v, label in zip(jaxpr.invars, labels, strict=True):
        nd = len(shape(v))
        ins.append(
            None if label is None else _Leaf(label, tuple((a,) for a in range(nd)), frozenset())
        )
    w.walk(jaxpr, ins, consts)
    return w


@public("jaxslim.kernel_uses")
def kernel_uses(fn: Callable[..., Any], params: Any, *args: Any) -> dict[str, list[KernelUse]]:
    """For each parameter leaf that feeds a ``dot_general`` or convolution: its uses.

    ``fn(params, *args)`` is traced on shapes only. A leaf is followed through ``transpose``,
    ``reshape``, casts, ``broadcast_in_dim``, ``squeeze``, slices, ``split``, ``unstack`` and into
    ``jit``/``custom_jvp``/``custom_vjp``/``remat``/``cond`` bodies and ``scan``/``while`` bodies
    (as a constant, or as a scanned ``xs`` slice: its leading axis is then ``indexed``). The dict
    is ordered by the first use of each path in execution order; each list by ``index``.

    >>> import jax.numpy as jnp
    >>> p = {"dense": jnp.ones((3, 4)), "eqx": jnp.ones((2, 4)), "heads": jnp.ones((2, 4, 5))}
    >>> def fn(p, x):
    ...     h = x @ p["dense"]  # Flax (in, out)
    ...     y = p["eqx"] @ h  # Equinox (out, in)
    ...     return y, jnp.einsum("d,hdf->hf", h, p["heads"])  # per-head (heads, d, f)
    >>> uses = kernel_uses(fn, p, jnp.ones(3))
    >>> [(k, u[0].contracted, u[0].output, u[0].index) for k, u in uses.items()]
    [('dense', (0,), (1,), 0), ('eqx', (1,), (0,), 1), ('heads', (1,), (0, 2), 2)]
    """
    return kernel_uses_of(make_jaxpr(fn, params, *args))


def kernel_uses_of(traced: Traced) -> dict[str, list[KernelUse]]:
    """:func:`kernel_uses` of a function already traced by :func:`make_jaxpr` (no second trace).

    Returns ``{path: [KernelUse, ...]}``: every parameter leaf (named by ``traced.param_paths``)
    that is an operand of a ``dot_general`` or convolution, ordered by its first use in execution
    order, each list ordered by ``KernelUse.index`` (then operand).

    >>> import jax.numpy as jnp
    >>> t = make_jaxpr(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}, jnp.ones(3))
    >>> [(k, u[0].contracted, u[0].output) for k, u in kernel_uses_of(t).items()]
    [('w', (0,), (1,))]
    """
    return _group_uses(_walk_kernels(traced.jaxpr, traced.consts, traced.labels).uses)


def gathered_of(traced: Traced) -> list[str]:
    """The parameter leaves a ``gather`` reads rows of (embedding tables), in execution order.

    A tied embedding is both gathered and contracted (it is also the LM head): the one-shot
    drivers leave such leaves float unless a ``where=`` names them.

    >>> import jax.numpy as jnp
    >>> p = {"embed": jnp.ones((10, 4)), "w": jnp.ones((4, 4))}
    >>> fn = lambda p, ids: (p["embed"][ids] @ p["w"]) @ p["embed"].T
    >>> gathered_of(make_jaxpr(fn, p, jnp.zeros(3, int)))
    ['embed']
    """
    return list(_walk_kernels(traced.jaxpr, traced.consts, traced.labels).gathered)


def _group_uses(uses: list[KernelUse]) -> dict[str, list[KernelUse]]:
    out: dict[str, list[KernelUse]] = {}
    for u in sorted(uses, key=lambda u: (u.index, u.operand)):
        out.setdefault(u.path, []).append(u)
    return out


def sites(jaxpr: Any) -> dict[tuple[int, ...], int]:
    """``{site: index}`` of every ``dot_general`` / convolution of ``jaxpr`` (module docstring).

    >>> import jax.numpy as jnp
    >>> j = jax.make_jaxpr(lambda w, x: jax.lax.scan(lambda c, _: (c @ w, None), x @ w, length=3))
    >>> sorted(sites(j(jnp.ones((2, 2)), jnp.ones(2))).values())
    [0, 1]
    """
    jaxpr, consts = open_jaxpr(jaxpr)
    return _walk_kernels(jaxpr, consts, [None] * len(jaxpr.invars)).sites


# --------------------------------------------------------------------------------------------
# Concrete evaluation with a hook per matmul.


@dataclasses.dataclass(frozen=True)
class Hooked:
    """What a hook of :func:`eval_jaxpr` sees at one ``dot_general`` / convolution.

    ``operands`` are ``(lhs, rhs)`` and ``out`` the result (concrete arrays, or tracers inside a
    ``lax`` loop or under an outer ``jit``); ``kernels`` the :class:`KernelUse` of every parameter
    operand of this site (empty at the jaxpr level without ``labels``); ``scan_index`` the index
    of the slice of ``xs`` each enclosing ``scan`` is at, outermost first (an int32 scalar,
    traced under ``loops="lax"``; a reverse scan counts down).
    """

    index: int
    site: tuple[int, ...]
    eqn: Any
    operands: tuple
    out: Any
    kernels: tuple[KernelUse, ...] = ()
    scan_index: tuple = ()

    @property
    def primitive(self) -> str:
        return self.eqn.primitive.name


Hook = Callable[[Any, Hooked], Any]


def bind(eqn: Any, ins: Sequence[Any]) -> list:
    """Applies the primitive of the jaxpr equation ``eqn`` to the values ``ins`` (one per
    ``eqn.invars``: arrays, tracers or Python scalars), with the equation's parameters and its
    context (e.g. a mesh); returns the list of output values, one per ``eqn.outvars`` (a list of
    one for a single-result primitive).

    What :func:`eval_jaxpr` does at every ordinary equation; a :class:`Walker` that evaluates
    (``quant.quantized``) calls it for the equations it does not rewrite.

    >>> import jax.numpy as jnp
    >>> eqn = jax.make_jaxpr(jnp.sin)(1.0).jaxpr.eqns[0]
    >>> [round(float(y), 4) for y in bind(eqn, [jnp.float32(0.5)])]
    [0.4794]
    """
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older jax: (subfuns, params)
        subfuns, params = params
        ins = [*subfuns, *ins]
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx is None:
        out = eqn.primitive.bind(*ins, **params)
    else:
        with ctx:
            out = eqn.primitive.bind(*ins, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


class _Interpreter(Walker):
    def __init__(self, hook, state, loops, site_index, kernels) -> None:
        super().__init__()
        self.hook = hook
        self.state = state
        self.loops = loops
        self.site_index = site_index
        self.kernels = kernels
        self.scan_index: list = []

    def const(self, var, value):
        if value is None:
            raise ValueError(f"jaxslim.eval_jaxpr: no value for the constant {var}")
        return value

    def literal(self, lit):
        return lit.val

    def equation(self, eqn, ins):
        outs = bind(eqn, ins)
        if self.hook is not None and eqn.primitive.name in MATMULS:
            index = self.site_index[self.site]
            kernels = self.kernels.get(index, ())
            call = Hooked(
                index, self.site, eqn, tuple(ins), outs[0], kernels, tuple(self.scan_index)
            )
            self.state = self.hook(self.state, call)
        return outs

    def _swap_state(self, state, fn):
        saved, self.state = self.state, state
        try:
            out = fn()
            return self.state, out
        finally:
            self.state = saved

    def scan(self, eqn, ins, s):
        nc, nk = s.num_consts, s.num_carry
        consts, carry, xs = list(ins[:nc]), list(ins[nc : nc + nk]), list(ins[nc + nk :])
        if self.loops == "python":
            ys_steps = []
            order = range(s.length - 1, -1, -1) if s.reverse else range(s.length)
            for i in order:
                self.scan_index.append(i)
                try:
                    outs = self.walk_sub(
                        0, s.body, consts + carry + [x[i] for x in xs], s.body_consts
                    )
                finally:
                    self.scan_index.pop()
                carry, y = outs[:nk], outs[nk:]
                ys_steps.append(y)
            if s.reverse:
                ys_steps.reverse()
            n_ys = len(eqn.outvars) - nk
            ys = [
                jnp.stack([step[j] for step in ys_steps])
                if ys_steps
                else jnp.zeros(shape(eqn.outvars[nk + j]), eqn.outvars[nk + j].aval.dtype)
                for j in range(n_ys)
            ]
            return carry + ys

        def body(c, x):
            state, c = c
            x, i = x
            self.scan_index.append(i)
            try:
                state, outs = self._swap_state(
                    state,
                    lambda: self.walk_sub(0, s.body, consts + list(c) + list(x), s.body_consts),
                )
            finally:
                self.scan_index.pop()
            return (state, outs[:nk]), outs[nk:]

        steps = jnp.arange(s.length, dtype=jnp.int32)
        (self.state, carry), ys = lax.scan(
            body, (self.state, carry), (xs, steps), length=s.length, reverse=s.reverse
        )
        return list(carry) + list(ys)

    def while_loop(self, eqn, ins, w):
        cn, bn = w.cond_nconsts, w.body_nconsts
        cc, bc, carry = list(ins[:cn]), list(ins[cn : cn + bn]), list(ins[cn + bn :])

        def test(carry):
            (pred,) = self.walk_sub(0, w.cond, cc + list(carry), w.cond_consts)
            return pred

        if self.loops == "python":
            pred = test(carry)
            if _concrete(pred):
                while bool(pred):
                    carry = self.walk_sub(1, w.body, bc + carry, w.body_consts)
                    pred = test(carry)
                return carry

        def cond_fun(c):
            hook, self.hook = self.hook, None  # the condition's matmuls are not hooked here
            try:
                return test(c[1])
            finally:
                self.hook = hook

        def body_fun(c):
            return self._swap_state(
                c[0], lambda: self.walk_sub(1, w.body, bc + list(c[1]), w.body_consts)
            )

        self.state, carry = lax.while_loop(cond_fun, body_fun, (self.state, carry))
        return list(carry)

    def cond(self, eqn, ins, c):
        index, ops = ins[0], list(ins[1:])
        n = len(c.branches)
        if self.loops == "python" and _concrete(index):
            k = min(max(int(index), 0), n - 1)
            return self.walk_sub(k, c.branches[k], ops, c.branch_consts[k])

        def branch(k):
            def run_branch(state, ops):
                return self._swap_state(
                    state, lambda: self.walk_sub(k, c.branches[k], list(ops), c.branch_consts[k])
                )

            return run_branch

        self.state, outs = lax.switch(index, [branch(k) for k in range(n)], self.state, ops)
        return list(outs)


def eval_jaxpr(
    jaxpr: Any,
    consts: Sequence[Any] | None,
    *args: Any,
    hook: Hook | None = None,
    state: Any = None,
    loops: Literal["lax", "python"] = "lax",
    labels: Sequence[str | None] | None = None,
) -> tuple[list, Any]:
    """Evaluates ``jaxpr`` on ``args``, calling ``hook`` at every ``dot_general`` / convolution.

    Returns ``(outputs, state)``. Equations are bound one by one (``jit``, ``custom_jvp``,
    ``custom_vjp`` and ``remat`` bodies are inlined, so their matmuls are hooked too; the custom
    derivative rules are not kept: use this to evaluate, not to differentiate).

    The hook contract: ``state = hook(state, call)`` with ``call`` a :class:`Hooked` (its
    ``index`` numbers the site in the order of :func:`sites`). ``state`` is any pytree (``None``
    by default), threaded through the whole evaluation and returned.

    * ``loops="lax"`` (default): ``scan``, ``while`` and ``cond`` run as ``lax.scan`` /
      ``lax.while_loop`` / ``lax.switch`` with ``state`` as part of the carry, so the hook is
      traced (its operands are tracers), is called once per site while tracing, and runs once per
      iteration; it must be a pure jax function returning a ``state`` of the same tree structure,
      shapes and dtypes (allocate accumulators, e.g. ``X^T X`` per kernel, before the call). Matmuls
      inside a ``while`` *condition* are not hooked in this mode.
    * ``loops="python"``: loops run in Python while their values are concrete (eagerly: the hook
      sees concrete arrays, once per iteration, and may change ``state`` freely, even add keys);
      under an outer ``jit`` a ``while``/``cond`` with a traced predicate falls back to ``"lax"``.

    Either way the whole evaluation may itself be wrapped in ``jax.jit``.

    ``labels`` (per invar: a parameter path or ``None``) fill ``Hooked.kernels``.

    >>> import jax.numpy as jnp
    >>> j = jax.make_jaxpr(lambda w, x: jax.lax.scan(lambda c, _: (c @ w, None), x, length=3)[0])
    >>> closed = j(jnp.ones((2, 2)), jnp.ones((1, 2)))
    >>> gram = lambda s, call: s + call.operands[0].T @ call.operands[0]
    >>> s0 = jnp.zeros((2, 2))
    >>> out, s = eval_jaxpr(closed, None, jnp.eye(2), jnp.ones((1, 2)), hook=gram, state=s0)
    >>> s.tolist()
    [[3.0, 3.0], [3.0, 3.0]]
    """
    if loops not in ("lax", "python"):
        raise ValueError(f"jaxslim.eval_jaxpr: loops must be 'lax' or 'python', got {loops!r}")
    jaxpr, consts = open_jaxpr(jaxpr, consts)
    labels = [None] * len(jaxpr.invars) if labels is None else list(labels)
    kw = _walk_kernels(jaxpr, consts, labels)
    kernels: dict[int, tuple[KernelUse, ...]] = {}
    for u in kw.uses:
        kernels[u.index] = (*kernels.get(u.index, ()), u)
    interp = _Interpreter(hook, state, loops, kw.sites, kernels)
    outs = interp.walk(jaxpr, args, consts)
    return outs, interp.state


@public("jaxslim.run")
def run(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    hook: Hook | None = None,
    state: Any = None,
    loops: Literal["lax", "python"] = "lax",
) -> tuple[Any, Any]:
    """``(fn(params, *args), state)`` evaluated by :func:`eval_jaxpr` with ``hook``; each
    ``Hooked.kernels`` names the parameter paths of its operands.

    >>> import jax.numpy as jnp
    >>> seen = lambda s, call: s + [(call.index, [k.path for k in call.kernels])]
    >>> p = {"a": jnp.ones((3, 4)), "b": jnp.ones((4, 2))}
    >>> out, s = run(lambda p, x: x @ p["a"] @ p["b"], p, jnp.ones(3), hook=seen, state=[])
    >>> out.tolist(), s
    ([12.0, 12.0], [(0, ['a']), (1, ['b'])])
    """
    t = make_jaxpr(fn, params, *args, require_float=False)
    leaves = jax.tree.leaves((params, list(args)))
    outs, state = eval_jaxpr(
        t.jaxpr, t.consts, *leaves, hook=hook, state=state, loops=loops, labels=t.labels
    )
    return jax.tree.unflatten(t.out_tree, outs), state
