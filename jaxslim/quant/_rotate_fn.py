"""``quant.rotate``: QuaRot's rotation of the residual stream, found on the jaxpr of any function.

``quant.rotate_model`` knows the leaves of a ``jaxslim.models`` decoder by name. ``rotate`` knows
nothing by name: it traces ``fn(params, *example_args)``, takes the coupled-axis group of
``splice.trace`` that is the residual stream (the embedding's feature axis, the input axis of
every kernel that reads the stream, the output axis of every kernel that writes it, the norm
scales), and follows that group's values through the jaxpr to prove that an orthogonal ``Q`` on
the stream changes no output:

* a gather from a table of the group (an embedding) starts the stream: ``E -> E Q``;
* a matmul whose kernel's output axis is in the group writes to it: ``W -> W Q`` (also a bias
  added to the stream, ``b -> b Q``);
* adding, subtracting, casting, transposing, reshaping and slicing the stream along other axes
  keep it a stream; multiplying or dividing it by a value that is constant along its features (the
  ``1 / rms(x)`` of an RMSNorm) too: ``||x Q|| = ||x||``;
* squaring the stream and summing the squares over its features (the RMSNorm's mean square) gives
  the same value as before: rotation preserves norms;
* multiplying it by a 1-D leaf of the group is an RMSNorm's scale ``w``: it is folded into the
  kernels the scaled stream feeds, ``W -> diag(w) W``, and set to ones;
* a matmul contracting the (scaled) stream with a kernel of the group reads it:
  ``W -> Q^T diag(w) W``; its output is an ordinary value again.

Anything else the stream meets is an error naming the primitive: a sum over the features that is
not a sum of squares (a LayerNorm's mean), an element-wise nonlinearity, a ``scan`` carrying the
stream, a norm scale added rather than multiplied, the stream returned by ``fn``. Every leaf of the
group must be met in one of the roles above.

With ``online=True`` each kernel that writes the stream from an ordinary input (an attention
output projection, an MLP down projection) also gets an online randomized Hadamard transform
``H_s = diag(s) H / sqrt(n)`` on its input: ``W -> H_s^T W Q`` offline, ``x -> x H_s`` in the
returned function, which spreads the outliers of that input (QuaRot's online Hadamard before
``down``) so the input itself can be quantized to 4 bits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxslim import _jaxpr, _tree
from jaxslim._checks import public
from jaxslim.quant._hadamard import hadamard_matrix, random_signs
from jaxslim.quant._qarray import is_qarray

_FN = "quant.rotate"

_CASTS = _jaxpr.CASTS | {"neg"}  # layout-preserving ops, and a negation: linear
_ELEMENTWISE = frozenset(
    """add sub mul div max min pow exp exp2 log log1p rsqrt sqrt cbrt tanh logistic neg abs sign
    integer_pow square erf erf_inv sin cos select_n convert_element_type copy clamp nextafter
    expm1 atan2 rem floor ceil round is_finite not and or xor eq ne lt le gt ge""".split()
)


class RotateError(ValueError):
    """The stream meets an op a rotation cannot pass (the message names it)."""


@dataclasses.dataclass(frozen=True)
class _S:
    """The stream: axis ``axis`` of this value is in the rotated basis. ``norm``: the path of an
    RMSNorm scale multiplied in and not yet read by a kernel; ``square``: the element-wise
    square of the stream (only a sum over the features may follow)."""

    axis: int
    norm: str | None = None
    square: bool = False
    var: Any = None


@dataclasses.dataclass(frozen=True)
class _C:
    """An ordinary value known to be constant along ``axes``."""

    axes: frozenset


def _shape(v: Any) -> tuple[int, ...]:
    return _jaxpr.shape(v)


class _StreamWalker(_jaxpr.Walker):
    def __init__(self, members: set[tuple[str, int]], leaf_ndim: dict[str, int]) -> None:
        super().__init__()
        self.members = members
        self.leaf_ndim = leaf_ndim
        self.roles: dict[tuple[str, int], set[str]] = {}
        self.reads: dict[tuple[str, int], set[str | None]] = {}  # kernel axis -> norms folded
        self.writer_sites: dict[tuple[int, ...], tuple[int, int, str, int]] = {}
        self.norm_bias: dict[tuple[str, int], str] = {}
        self.width = 0

    # -- helpers --------------------------------------------------------------------------------
    def fail(self, eqn: Any, what: str) -> None:
        src = ""
        info = getattr(eqn, "source_info", None)
        if info is not None:
            try:
                from jax._src import source_info_util

                where = source_info_util.summarize(info)
                src = f" ({where})" if where else ""
            except Exception:  # noqa: BLE001 - the location is a courtesy
                src = ""
        raise RotateError(
            f"{_FN}: the residual stream meets `{eqn.primitive.name}`{src}: {what}; a rotation "
            "of the stream would change fn's output there"
        )

    def role(self, path: str, axis: int, role: str) -> None:
        self.roles.setdefault((path, axis), set()).add(role)

    def member_axis(self, val: Any, dim: int) -> tuple[str, int] | None:
        if isinstance(val, _jaxpr.Leaf) and dim < len(val.axes) and len(val.axes[dim]) == 1:
            key = (val.path, val.axes[dim][0])
            if key in self.members:
                return key
        return None

    def const_axes(self, val: Any, var: Any) -> frozenset:
        if isinstance(var, jex_core.Literal) or not _shape(var):
            return frozenset(range(64))
        out = {i for i, n in enumerate(_shape(var)) if n == 1}
        if isinstance(val, _C):
            out |= set(val.axes)
        return frozenset(out)

    def literal(self, lit: Any) -> Any:
        return _C(frozenset(range(64)))

    # -- control flow: the stream may not enter a loop or a branch -----------------------------
    def _no_stream(self, eqn: Any, ins: list, what: str) -> None:
        if any(isinstance(v, _S) for v in ins):
            self.fail(
                eqn,
                f"the stream is carried into a {what}, which this walk cannot follow (unroll the "
                "layers: a Python loop instead of lax.scan / nnx.scan)",
            )

    def scan(self, eqn, ins, s):
        self._no_stream(eqn, ins, "scan")
        return super().scan(eqn, ins, s)

    def while_loop(self, eqn, ins, w):
        self._no_stream(eqn, ins, "while loop")
        return super().while_loop(eqn, ins, w)

    def cond(self, eqn, ins, c):
        self._no_stream(eqn, ins, "cond")
        return super().cond(eqn, ins, c)

    # -- ordinary equations ---------------------------------------------------------------------
    def equation(self, eqn: Any, ins: list) -> list:
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        if name == "dot_general":
            return [self.dot(eqn, ins)]
        if name == "gather":
            return [self.gather(eqn, ins)]
        streams = [v for v in ins if isinstance(v, _S)]
        if not streams:
            return self.ordinary(eqn, ins)
        s = streams[0]
        if name in _CASTS:
            return [s]
        p = eqn.params
        if name == "transpose":
            return [dataclasses.replace(s, axis=list(p["permutation"]).index(s.axis))]
        if name == "broadcast_in_dim" and ins[0] is s:
            return [dataclasses.replace(s, axis=p["broadcast_dimensions"][s.axis])]
        if name == "reshape":
            src, dst = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
            before = int(np.prod(src[: s.axis]))
            for b in range(len(dst)):
                if int(np.prod(dst[:b])) == before and dst[b] == src[s.axis]:
                    return [dataclasses.replace(s, axis=b)]
            self.fail(eqn, f"a reshape {src} -> {dst} splits or merges the feature axis")
        if name == "squeeze":
            dims = {d % len(_shape(eqn.invars[0])) for d in p["dimensions"]}
            return [dataclasses.replace(s, axis=s.axis - sum(d < s.axis for d in dims))]
        if name in ("slice", "dynamic_slice") and ins[0] is s:
            if _shape(eqn.outvars[0])[s.axis] != _shape(eqn.invars[0])[s.axis]:
                self.fail(eqn, "a slice takes part of the features")
            return [s]
        if name == "concatenate":
            if all(isinstance(v, _S) and v.axis == s.axis and not v.square for v in ins) and (
                p["dimension"] != s.axis
            ):
                return [dataclasses.replace(s, var=None)]
            self.fail(eqn, "a concatenation with values that are not the stream")
        if name == "reduce_sum":
            axes = tuple(p["axes"])
            if s.axis in axes:
                if s.square:
                    return [_C(frozenset())]
                self.fail(
                    eqn,
                    "a sum over the features that is not a sum of squares (a LayerNorm's mean, "
                    "which a rotation does not preserve; only RMSNorm can be rotated)",
                )
            return [dataclasses.replace(s, axis=s.axis - sum(a < s.axis for a in axes))]
        if name in ("add", "sub", "add_any"):
            return [self.add(eqn, ins)]
        if name == "mul":
            return [self.mul(eqn, ins)]
        if name == "div":
            if ins[0] is s and s.axis in self.const_axes(ins[1], eqn.invars[1]):
                return [s]
            self.fail(eqn, "a division by a value that varies along the features")
        if name == "integer_pow" and p.get("y") == 2 or name == "square":
            return [dataclasses.replace(s, square=True, var=None)]
        self.fail(
            eqn,
            "an operation that does not commute with a rotation of the features (an element-wise "
            "nonlinearity, a comparison, a max, ...)",
        )
        return [None] * n_out  # unreachable

    def ordinary(self, eqn: Any, ins: list) -> list:
        name, n_out = eqn.primitive.name, len(eqn.outvars)
        leaf = ins[0] if ins else None
        if isinstance(leaf, _jaxpr.Leaf):
            if name in _CASTS:
                return [leaf] + [None] * (n_out - 1)
            out = _jaxpr.leaf_layout(eqn, leaf)
            if out is not None:
                return out
        if name == "broadcast_in_dim" and not isinstance(leaf, _jaxpr.Leaf):
            src, dst = _shape(eqn.invars[0]), tuple(eqn.params["shape"])
            bd = eqn.params["broadcast_dimensions"]
            const = {d for d in range(len(dst)) if d not in bd}
            for i, d in enumerate(bd):
                if src[i] == 1 and dst[d] != 1:
                    const.add(d)
                elif i in self.const_axes(leaf, eqn.invars[0]):
                    const.add(d)
            return [_C(frozenset(const))]
        if name in _ELEMENTWISE and n_out == 1 and ins:
            common = None
            for v, var in zip(ins, eqn.invars, strict=True):
                c = self.const_axes(v if not isinstance(v, _jaxpr.Leaf) else None, var)
                common = c if common is None else common & c
            return [_C(common or frozenset())]
        return [None] * n_out

    def add(self, eqn: Any, ins: list) -> _S:
        a, b = ins
        if isinstance(a, _S) and isinstance(b, _S):
            if a.axis == b.axis and not (a.norm or b.norm or a.square or b.square):
                return _S(a.axis)
            self.fail(eqn, "a sum of the stream and a scaled or squared copy of it")
        s, other = (a, b) if isinstance(a, _S) else (b, a)
        if s.square:
            self.fail(eqn, "a value added to the squared stream")
        key = self.member_axis(other, s.axis)
        if key is not None and s.norm is not None:
            if self.leaf_ndim.get(key[0]) != 1 or self.norm_bias.get(key, s.norm) != s.norm:
                self.fail(eqn, f"a value added to the stream scaled by {s.norm!r}")
            self.role(*key, "norm_bias")  # x w + b = (x + b / w) w
            self.norm_bias[key] = s.norm
            return s
        if key is not None:
            self.role(*key, "bias")
            return _S(s.axis)
        self.fail(eqn, "a value that is not a bias of the stream's group is added to it")
        return s  # unreachable

    def mul(self, eqn: Any, ins: list) -> _S:
        a, b = ins
        va, vb = eqn.invars
        if isinstance(a, _S) and isinstance(b, _S):
            if va is vb and not (a.norm or a.square):
                return dataclasses.replace(a, square=True, var=None)
            self.fail(eqn, "a product of two stream values other than x * x")
        (s, other, ov) = (a, b, vb) if isinstance(a, _S) else (b, a, va)
        if s.square:
            self.fail(eqn, "the squared stream is multiplied before it is summed")
        key = self.member_axis(other, s.axis)
        if key is not None and self.leaf_ndim.get(key[0]) == 1:
            if s.norm is not None:
                self.fail(eqn, f"a second norm scale {key[0]!r} after {s.norm!r}")
            self.role(*key, "norm")
            return _S(s.axis, norm=key[0])
        if s.axis in self.const_axes(other if not isinstance(other, _jaxpr.Leaf) else None, ov):
            return s
        self.fail(
            eqn,
            "a product with a value that varies along the features and is not a 1-D norm scale "
            "of the stream's group (a norm scale of another shape, a gate, ...)",
        )
        return s  # unreachable

    def dot(self, eqn: Any, ins: list) -> Any:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lc, rc, lb, rb = map(list, (lc, rc, lb, rb))
        for k in (0, 1):
            s = ins[k]
            if not isinstance(s, _S):
                continue
            other = ins[1 - k]
            mine, theirs = (lc, rc) if k == 0 else (rc, lc)
            if s.square:
                self.fail(eqn, "a matmul of the squared stream")
            if s.axis in mine:
                odim = theirs[mine.index(s.axis)]
                key = self.member_axis(other, odim)
                if key is not None:
                    self.role(*key, "reader")
                    self.reads.setdefault(key, set()).add(s.norm)
                    return self.writes(eqn, 1 - k, other)  # a (d, d) kernel also writes
                if isinstance(other, _S) and other.axis == odim and not (s.norm or other.norm):
                    return None  # <x Q, y Q> = <x, y>
                self.fail(
                    eqn,
                    "the features are contracted with a value that is not a kernel of the "
                    "stream's group",
                )
            if isinstance(other, _S) or s.norm:
                self.fail(eqn, "a matmul that keeps the features of a normalized stream")
            return _S(self.out_pos(eqn, k, s.axis))
        # no stream operand: a kernel of the group with its output axis free writes the stream
        for k in (0, 1):
            out = self.writes(eqn, k, ins[k])
            if out is not None:
                return out
        return None

    def writes(self, eqn: Any, k: int, val: Any) -> _S | None:
        """The stream, when operand ``k`` is a kernel whose free (output) axis is in the group."""
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lc, rc, lb, rb = map(list, (lc, rc, lb, rb))
        if isinstance(val, _jaxpr.Leaf):
            contract, batch = (lc, lb) if k == 0 else (rc, rb)
            for d in range(len(_shape(eqn.invars[k]))):
                if d in contract or d in batch:
                    continue
                key = self.member_axis(val, d)
                if key is not None:
                    self.role(*key, "writer")
                    if len(contract) == 1 and len(val.axes[contract[0]]) == 1:
                        x_dim = (rc if k == 0 else lc)[0]  # the input's contracted dim
                        laxis = val.axes[contract[0]][0]
                        self.writer_sites[self.site] = (1 - k, x_dim, val.path, laxis)
                    return _S(self.out_pos(eqn, k, d))
        return None

    def out_pos(self, eqn: Any, k: int, dim: int) -> int:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        nl, nr = len(_shape(eqn.invars[0])), len(_shape(eqn.invars[1]))
        batch = list(lb if k == 0 else rb)
        if dim in batch:
            return batch.index(dim)
        lfree = [d for d in range(nl) if d not in lc and d not in lb]
        rfree = [d for d in range(nr) if d not in rc and d not in rb]
        if k == 0:
            return len(batch) + lfree.index(dim)
        return len(batch) + len(lfree) + rfree.index(dim)

    def gather(self, eqn: Any, ins: list) -> Any:
        table = ins[0]
        if isinstance(table, _S):
            self.fail(eqn, "an index into the stream")
        if not isinstance(table, _jaxpr.Leaf):
            return None
        dn = eqn.params["dimension_numbers"]
        skipped = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
        kept = [d for d in range(len(_shape(eqn.invars[0]))) if d not in skipped]
        for od in kept:
            key = self.member_axis(table, od)
            if key is None and len(table.axes[od]) == 1 and _shape(eqn.invars[0])[od] == self.width:
                # splice.trace does not unite every gather's slice axis with its output (a
                # clipped gather of an Equinox Embedding): a table of the stream's width whose
                # rows are gathered whole is taken as one; the walk checks every use of it.
                key = (table.path, table.axes[od][0])
                self.members.add(key)
            if key is None:
                continue
            if eqn.params["slice_sizes"][od] != _shape(eqn.invars[0])[od]:
                self.fail(eqn, "a gather takes part of the features of a table of the group")
            self.role(*key, "table")
            return _S(dn.offset_dims[kept.index(od)])
        return None


def _stream_groups(fn, params, args) -> list:
    from jaxslim import splice

    groups = splice.trace(fn, params, *args, check=False)
    out = []
    for g in groups:
        if any(len(m.factors) != 1 or m.segments for m in g.members):
            continue
        try:
            hadamard_matrix(g.size)
        except ValueError:
            continue
        out.append(g)
    return sorted(out, key=lambda g: -len({(m.path, m.axis) for m in g.members}))


def _analyse(traced, members: set, leaf_ndim: dict, width: int) -> _StreamWalker:
    w = _StreamWalker(set(members), leaf_ndim)
    w.width = width
    ins = []
    for v, label in zip(traced.jaxpr.invars, traced.labels, strict=True):
        nd = len(_shape(v))
        ins.append(
            None
            if label is None
            else _jaxpr.Leaf(label, tuple((a,) for a in range(nd)), frozenset())
        )
    outs = w.walk(traced.jaxpr, ins, traced.consts)
    if any(isinstance(o, _S) for o in outs):
        raise RotateError(
            f"{_FN}: fn returns the residual stream itself (its rotated basis would be visible); "
            "rotate a function whose outputs are computed by kernels reading the stream "
            "(logits, a loss)"
        )
    missing = sorted(m for m in w.members if m not in w.roles)
    if missing:
        raise RotateError(
            f"{_FN}: leaves of the stream's group are used in a way the walk does not follow: "
            f"{[f'{p} axis {a}' for p, a in missing]}"
        )
    for key, norms in w.reads.items():
        if len(norms) > 1:
            raise RotateError(
                f"{_FN}: {key[0]} (axis {key[1]}) reads the stream after different norms "
                f"{sorted(map(str, norms))}; its scales cannot all be folded into it"
            )
    return w


def _along(x: np.ndarray, axis: int, m: np.ndarray) -> np.ndarray:
    """``v -> v @ m`` for every vector ``v`` of ``x`` along ``axis``."""
    return np.moveaxis(np.moveaxis(x, axis, -1) @ m, -1, axis)


@dataclasses.dataclass(frozen=True)
class RotateReport:
    """What ``quant.rotate`` did: the stream width, each rotated leaf axis and its role
    (``"path:axis"`` -> ``table`` / ``reader`` / ``writer`` / ``bias`` / ``norm`` /
    ``norm_bias``), the norm scales folded (and into which kernels), the kernels given an online
    Hadamard, and the largest relative difference of the outputs on the example inputs (checked
    to be below ``1e-3``, or 8 machine epsilons of the lowest-precision leaf)."""

    width: int
    roles: dict[str, tuple[str, ...]]
    folded: dict[str, tuple[str, ...]]
    online: tuple[str, ...]
    max_rel_diff: float = 0.0


@public("quant.rotate")
def rotate(
    fn: Callable[..., Any],
    params: Any,
    *example_args: Any,
    seed: int = 0,
    online: bool = False,
) -> tuple[Callable[..., Any], Any]:
    """Rotates the residual stream of ``fn(params, *args)`` by a randomized Hadamard matrix.

    The stream, its readers, writers and RMSNorm scales are found on the jaxpr (module
    docstring), so any function works: a ``jaxslim.models`` decoder, an Equinox or Flax model
    called through its parameters, a plain-JAX one. With ``Q = diag(s) H_d / sqrt(d)``
    (``s = random_signs(d, seed)``): norm scales ``w`` are folded into the kernels after them and
    set to 1, tables and writers ``-> (.) Q`` along the stream axis, readers
    ``-> Q^T diag(w) (.)``. The function is unchanged up to float rounding; the rotated stream
    has no outlier features, which is what 4-bit activations need (QuaRot).

    Args:
      fn: ``fn(params, *args)``; the layers must be unrolled (a Python loop, not ``lax.scan``).
      params: its parameter pytree (concrete float arrays: the rotation is computed on the host
        in float64 and each leaf returned in its dtype).
      *example_args: example inputs (shapes only are used to trace ``fn``).
      seed: picks the random signs.
      online: also give every kernel that writes the stream from an ordinary input an online
        Hadamard on that input (module docstring); the input size must have a Hadamard matrix.

    Returns:
      ``(rotated_fn, rotated_params)``: ``rotated_fn`` has ``fn``'s signature (without
      ``online`` it calls ``fn``; with it, it applies the online transforms) and its
      ``rotate_report`` is a :class:`RotateReport`. Both functions are run once on the example
      inputs and must agree (a ``ValueError`` otherwise).

    Raises:
      ValueError: no coupled-axis group of ``fn`` can be rotated (the message names the op the
        largest candidate meets: a LayerNorm's mean, a nonlinearity, a ``scan``), a norm scale
        that cannot be folded (a tied embedding read after a norm whose scale is not all ones),
        a width with no Hadamard matrix.
      TypeError: a QArray leaf (rotate the float model, then quantize), a non-integer seed.

    >>> import jax, jax.numpy as jnp
    >>> from jaxslim import quant
    >>> def fn(p, ids):
    ...     h = p["embed"][ids]
    ...     n = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * p["norm"]
    ...     h = h + jax.nn.relu(n @ p["up"]) @ p["down"]
    ...     return h @ p["head"]
    >>> k = jax.random.split(jax.random.key(0), 5)
    >>> p = {"embed": jax.random.normal(k[0], (10, 8)), "norm": 1 + jax.random.normal(k[1], (8,)),
    ...      "up": jax.random.normal(k[2], (8, 16)), "down": jax.random.normal(k[3], (16, 8)),
    ...      "head": jax.random.normal(k[4], (8, 10))}
    >>> ids = jnp.array([1, 2, 3])
    >>> rfn, rp = quant.rotate(fn, p, ids)
    >>> bool(jnp.allclose(rfn(rp, ids), fn(p, ids), atol=1e-4)), rp["norm"].tolist() == [1.0] * 8
    (True, True)
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"{_FN}: seed must be an int, got {seed!r}")
    if not isinstance(online, bool):
        raise TypeError(f"{_FN}: online must be a bool, got {online!r}")
    for kp, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_qarray):
        if is_qarray(leaf):
            raise TypeError(
                f"{_FN}: {_tree.path_str(kp)} is a QArray; rotate the float model, then quantize it"
            )
    leaves = _tree.leaves_with_paths(params)
    for path, leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            raise TypeError(
                f"{_FN}: {path} is traced; call quant.rotate outside jit (it computes the "
                "rotated leaves on the host)"
            )
    traced = _jaxpr.make_jaxpr(fn, params, *example_args)
    leaf_ndim = {p: np.ndim(v) for p, v in leaves}
    candidates = _stream_groups(fn, params, example_args)
    if not candidates:
        raise ValueError(
            f"{_FN}: fn has no coupled-axis group whose width has a Hadamard matrix (2^k or "
            "2^k * m, m in 12, 20, 28, 36, 40) and whose axes are whole leaf axes"
        )
    first_error = None
    for g in candidates:
        members = {(m.path, m.axis) for m in g.members}
        try:
            walker = _analyse(traced, members, leaf_ndim, g.size)
        except RotateError as e:
            first_error = first_error or (g, e)
            continue
        roles = {k: v for k, v in walker.roles.items()}
        if not any("reader" in r for r in roles.values()) or not any(
            {"writer", "table"} & r for r in roles.values()
        ):
            first_error = first_error or (
                g,
                RotateError(f"{_FN}: the group has no kernel both writing and reading it"),
            )
            continue
        return _apply(fn, params, example_args, g.size, walker, seed, online)
    g, e = first_error
    where = ", ".join(f"{m.path} axis {m.axis}" for m in g.members[:6])
    raise ValueError(
        f"{e} (the candidate stream has {g.size} features: {where}"
        f"{', ...' if len(g.members) > 6 else ''})"
    ) from None


def _apply(fn, params, example_args, d, walker: _StreamWalker, seed, online):
    leaves = dict(_tree.leaves_with_paths(params))
    q = random_signs(d, seed)[:, None] * hadamard_matrix(d)
    touched = {p for p, _ in walker.roles}
    new = {p: np.asarray(v, np.float64) for p, v in leaves.items() if p in touched}
    folded: dict[str, list[str]] = {}
    norms = {p for (p, _), r in walker.roles.items() if "norm" in r}
    for (path, axis), norm_set in walker.reads.items():
        (norm,) = norm_set
        if norm is None:
            continue
        w = np.asarray(leaves[norm], np.float64)
        if "table" in walker.roles[(path, axis)] or "writer" in walker.roles[(path, axis)]:
            if not np.all(w == 1):
                raise ValueError(
                    f"{_FN}: the norm scale {norm!r} cannot be folded into {path!r}: that leaf "
                    "is also the embedding (or writes the stream), which the scale must not "
                    "touch; untie the head (a separate leaf) or use quant.rotate_model for "
                    "jaxslim.models, which unties it"
                )
            continue
        shape = [1] * new[path].ndim
        shape[axis] = d
        new[path] = new[path] * w.reshape(shape)
        folded.setdefault(norm, []).append(path)
    for (path, _axis), norm in walker.norm_bias.items():
        w = np.asarray(leaves[norm], np.float64)
        if np.any(w == 0):
            raise ValueError(
                f"{_FN}: the norm bias {path!r} follows the scale {norm!r}, which has zeros: "
                "x * w + b cannot be written (x + b / w) * w; the bias cannot be rotated"
            )
        new[path] = new[path] / w
    for (path, axis), r in walker.roles.items():
        if "norm" in r:
            continue
        new[path] = _along(new[path], axis, q)
    for path in norms:
        new[path] = np.ones_like(new[path])
    online_paths: list[str] = []
    hads: dict[str, np.ndarray] = {}
    if online:
        for _site, (_k, _x_dim, path, laxis) in walker.writer_sites.items():
            if path in hads:  # a kernel written at several sites: one transform of it
                continue
            n = new[path].shape[laxis]
            try:
                h = random_signs(n, seed + 2)[:, None] * hadamard_matrix(n)
            except ValueError as e:
                raise ValueError(f"{_FN}: online Hadamard on the input of {path!r}: {e}") from e
            new[path] = _along(new[path], laxis, h)  # H_s^T W: the columns of W along the axis
            hads[path] = h
            online_paths.append(path)
    rotated = jax.tree_util.tree_map_with_path(
        lambda kp, x: (
            jnp.asarray(new[p], jnp.asarray(x).dtype) if (p := _tree.path_str(kp)) in new else x
        ),
        params,
    )
    rfn = _RotatedFn(fn, hads, walker)
    diff = _max_rel_diff(rfn(rotated, *example_args), fn(params, *example_args))
    eps = max(
        (float(jnp.finfo(x.dtype).eps) for x in jax.tree.leaves(params) if _tree.is_float_array(x)),
        default=0.0,
    )
    if not diff <= max(1e-3, 8 * eps):
        raise ValueError(
            f"{_FN}: the rotated function differs from fn by {diff:.3g} (relative) on the example "
            "inputs: fn uses the stream in a way this walk did not model; please report it"
        )
    rfn.rotate_report = RotateReport(
        width=d,
        roles={f"{p}:{a}": tuple(sorted(r)) for (p, a), r in walker.roles.items()},
        folded={k: tuple(v) for k, v in folded.items()},
        online=tuple(online_paths),
        max_rel_diff=diff,
    )
    return rfn, rotated


def _max_rel_diff(a: Any, b: Any) -> float:
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if not jnp.issubdtype(jnp.asarray(y).dtype, jnp.inexact):
            continue
        x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = float(np.max(np.abs(y64))) if y64.size else 0.0
        err = float(np.max(np.abs(x64 - y64))) if y64.size else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


class _RotatedFn:
    """``fn`` on the rotated parameters; with online transforms, ``x -> x H_s`` on the input of
    each kernel that writes the stream (``fn``'s jaxpr, traced per call, evaluated with them)."""

    rotate_report: RotateReport

    def __init__(self, fn, hads: dict[str, np.ndarray], walker: _StreamWalker) -> None:
        self.fn, self.hads = fn, hads
        self._members, self._ndim, self._width = set(walker.members), walker.leaf_ndim, walker.width
        self._sites: dict[Any, dict] = {}  # input signature -> {site: (operand, dim, H)}
        self.__name__ = f"rotated_{getattr(fn, '__name__', 'fn')}"
        self.__doc__ = getattr(fn, "__doc__", None)

    def _site_map(self, traced, key) -> dict:
        """Where the online transforms go in this trace: the stream walk again (another input
        shape may trace to another jaxpr), each kernel's writer sites."""
        if key not in self._sites:
            walker = _analyse(traced, self._members, self._ndim, self._width)
            sites = {
                site: (k, x_dim, self.hads[path])
                for site, (k, x_dim, path, _) in walker.writer_sites.items()
                if path in self.hads
            }
            missing = set(self.hads) - {p for _, _, p, _ in walker.writer_sites.values()}
            if missing:
                raise ValueError(
                    f"{_FN}: on these inputs fn no longer writes the stream with "
                    f"{sorted(missing)}; call quant.rotate with inputs like these"
                )
            self._sites[key] = sites
        return self._sites[key]

    def __call__(self, params, *args):
        if not self.hads:
            return self.fn(params, *args)
        traced = _jaxpr.make_jaxpr(self.fn, params, *args)
        key = (
            jax.tree.structure((params, args)),
            tuple(
                (np.shape(x), str(getattr(x, "dtype", type(x).__name__)))
                for x in jax.tree.leaves((params, args))
            ),
        )
        leaves = jax.tree.leaves((params, list(args)))
        outs = _OnlineEval(self._site_map(traced, key)).walk(traced.jaxpr, leaves, traced.consts)
        return jax.tree.unflatten(traced.out_tree, outs)


class _OnlineEval(_jaxpr.Walker):
    def __init__(self, hads) -> None:
        super().__init__()
        self.hads = hads

    def const(self, var, value):
        return value

    def literal(self, lit):
        return lit.val

    def equation(self, eqn, ins):
        h = self.hads.get(self.site)
        if h is not None:
            k, dim, m = h
            x = ins[k]
            ins = list(ins)
            ins[k] = jnp.moveaxis(
                jnp.moveaxis(x, dim, -1) @ jnp.asarray(m, x.dtype), -1, dim
            ).astype(x.dtype)
        return _jaxpr.bind(eqn, ins)

    def scan(self, eqn, ins, s):
        return _jaxpr.bind(eqn, ins)

    def while_loop(self, eqn, ins, w):
        return _jaxpr.bind(eqn, ins)

    def cond(self, eqn, ins, c):
        return _jaxpr.bind(eqn, ins)
