"""Tree-wide quantization with mixed precision: ``quantize_params`` / ``dequantize_params``.

``rules`` is a list of ``(where, spec or None)``; for each floating-point leaf the first rule whose
``where`` selects it decides (``None`` keeps the leaf float), and leaves no rule selects get
``default``. ``where`` follows jaxslim's convention: ``None`` = float leaves with ``ndim >= 2``, a
regex on the path, or a predicate ``(path, leaf) -> bool``. So "global" (per-tensor), "local"
(per-channel / per-group) and "mixed" (some leaves left float, different bits per layer) are all
just rules::

    rules = [("head", None),                                  # keep the classifier float
             ("embed", QuantSpec(8, axis=-1)),                 # int8 per channel
             (None, QuantSpec(4, axis=-1, group_size=32))]     # other kernels int4, groups of 32
    qtree, report = quantize_params(params, rules)

**Grouped specs and the default ``where``.** A rule ``(None, QuantSpec(..., group_size=g))`` (or a
bare grouped ``QuantSpec``) selects only contracted 2-D kernels: with ``fn`` and
``example_args``, the 2-D leaves that feed a ``dot_general`` in ``fn(params, *example_args)`` and
are not gathered (embedding and position tables, a tied LM head); without them, by shape: 2-D
leaves with two axes longer than 1 whose group axis (``group_axis``, default -2) holds at least
one whole group of ``g``. So a BERT token-type table ``(2, 64)``, a BART ``final_logits_bias``
``(1, N)``, conv kernels and per-head 3-D kernels stay float (and, with ``fn``, also OPT's position
table and every embedding); a rule whose ``where`` names a leaf quantizes it whatever its shape.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxslim import _jaxpr, _tree, structures
from jaxslim._checks import at_leaf, public
from jaxslim.quant._qarray import QArray, dequantize, is_qarray, quantize
from jaxslim.quant._rules import first, normalize
from jaxslim.quant._spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class LeafSize:
    """One row of a ``SizeReport``: a floating-point leaf and its bytes before and after."""

    path: str
    shape: tuple[int, ...]
    spec: QuantSpec | None
    bytes_before: int
    bytes_after: int


@dataclasses.dataclass(frozen=True)
class SizeReport:
    """Per-leaf bytes before/after quantization (float leaves only) and their totals."""

    rows: tuple[LeafSize, ...]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    @property
    def ratio(self) -> float:
        """``bytes_before / bytes_after`` (the compression factor)."""
        return self.bytes_before / max(self.bytes_after, 1)

    def __str__(self) -> str:
        lines = ["| path | shape | spec | bytes before | bytes after |", "|---|---|---|---|---|"]
        for r in self.rows:
            s = _spec_str(r.spec)
            lines.append(f"| {r.path} | {r.shape} | {s} | {r.bytes_before:,} | {r.bytes_after:,} |")
        lines.append(f"| total | | | {self.bytes_before:,} | {self.bytes_after:,} |")
        return "\n".join(lines)


def _spec_str(spec: QuantSpec | None) -> str:
    if spec is None:
        return "float"
    name = spec.format.name if spec.signed else "u" + spec.format.name
    parts = [name]
    if spec.axis is not None:
        parts.append(f"axis={spec.axis if len(spec.axis) > 1 else spec.axis[0]}")
    if spec.group_size is not None:
        parts.append(f"group={spec.group_size}")
    if not spec.symmetric:
        parts.append("affine")
    return " ".join(parts)


def _nbytes(leaf: Any) -> int:
    if isinstance(leaf, QArray):
        return leaf.nbytes
    return math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize


def _grouped_kernels(params: Any, fn: Callable | None, example_args: tuple) -> Callable:
    """``(path, leaf, spec) -> bool``: whether the default ``where`` of a grouped spec selects
    the leaf (module docstring): contracted, not gathered, 2-D (with ``fn``), else by shape."""
    if fn is not None:
        traced = _jaxpr.make_jaxpr(fn, params, *example_args)
        contracted = set(_jaxpr.kernel_uses_of(traced)) - set(_jaxpr.gathered_of(traced))
        return lambda path, leaf, spec: leaf.ndim == 2 and path in contracted

    def by_shape(path, leaf, spec):
        if leaf.ndim != 2 or not structures.kernel_like(path, leaf):
            return False
        if isinstance(spec.group_size, tuple):  # tiles: every 2-D kernel
            return True
        ga = -2 if spec.group_axis is None else spec.group_axis
        if not isinstance(ga, int) or not -2 <= ga < 2:
            return True  # a bad group axis: let quantize name it
        return leaf.shape[ga] >= spec.group_size

    return by_shape


@public("quant.quantize_params")
def quantize_params(
    params: Any,
    rules: Any,
    *,
    default: QuantSpec | None = None,
    fn: Callable | None = None,
    example_args: tuple = (),
) -> tuple[Any, SizeReport]:
    """Quantizes the leaves of ``params`` by rules; returns ``(tree, report)``.

    Args:
      params: any pytree (plain dicts, Linen ``params``, an NNX ``State``).
      rules: a ``QuantSpec`` (applied to ``where=None``) or a list of ``(where, spec or None)``;
        first match wins, ``None`` keeps the leaf float.
      default: the spec for floating-point leaves no rule selects (``None``: keep float).
      fn: optional ``fn(params, *example_args)``, traced on shapes only, so that a grouped spec
        with the default ``where`` selects exactly the contracted 2-D kernels (module docstring);
        without it a shape rule decides.
      example_args: the example inputs of ``fn`` (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      The tree with ``QArray`` leaves where a spec applied (other leaves untouched, ``QArray``
      leaves already present kept as they are) and a ``SizeReport`` of every floating-point leaf.

    Raises ``ValueError`` naming the leaf when a spec does not fit it (with the rule that keeps it
    float), when a concrete leaf to quantize holds NaN or inf, and when nothing is quantized;
    naming the rule when its ``where`` is not a valid regex. Integer-keyed trees (an ``nnx.List``
    state, a list of layers) are named ``"layers/0/kernel"``.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32), "head": jnp.ones((32, 10))}
    >>> q, report = quantize_params(params, [("head", None), (None, QuantSpec(8, axis=-1))])
    >>> type(q["w"]).__name__, type(q["head"]).__name__, report.bytes_after
    ('QArray', 'ArrayImpl', 3584)
    """
    api = "quant.quantize_params"
    rules = normalize(rules, api)
    if default is not None and not isinstance(default, QuantSpec):
        raise TypeError(f"{api}: default must be a QuantSpec or None, got {default!r}")
    if not isinstance(example_args, tuple):
        raise TypeError(f"{api}: example_args must be a tuple, got {example_args!r}")
    if fn is None and example_args:
        raise ValueError(f"{api}: example_args given without fn; pass fn=")
    grouped_kernel = None
    if any(r.where is None and r.spec is not None and r.spec.group_size for r in rules):
        try:
            grouped_kernel = _grouped_kernels(params, fn, example_args)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{api}: tracing fn for the grouped default where: {e}") from None
    rows: list[LeafSize] = []
    skipped: list[str] = []

    def visit(path, leaf):
        if isinstance(leaf, QArray) or not _tree.is_float_array(leaf):
            return leaf
        name = _tree.path_str(path)
        rule = first(rules, name, leaf)
        spec = default if rule is None else rule.spec
        if spec is not None and rule is not None and rule.where is None and spec.group_size:
            if not grouped_kernel(name, leaf, spec):
                spec = None  # not a contracted 2-D kernel: a grouped default leaves it float
                skipped.append(name)
        try:
            with at_leaf(name):
                new = leaf if spec is None else quantize(leaf, spec)
        except ValueError as e:
            keep = f"(r'^{re.escape(name)}$', None)"
            raise ValueError(
                f"{e}; to leave {name!r} in float, put the rule {keep} first"
            ) from None
        rows.append(LeafSize(name, tuple(leaf.shape), spec, _nbytes(leaf), _nbytes(new)))
        return new

    out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_qarray)
    if not any(r.spec is not None for r in rows):
        names = [r.path for r in rows][:8]
        raise ValueError(
            f"{api}: the rules quantize no leaf; floating-point leaves are {names}"
            f"{' ...' if len(rows) > 8 else ''}"
            + (
                f"; a grouped spec with where=None left {skipped[:4]} float (not contracted 2-D "
                "kernels holding a whole group): name them in a rule's where= to quantize them"
                if skipped
                else ""
            )
        )
    return out, SizeReport(tuple(rows))


@public("quant.dequantize_params")
def dequantize_params(tree: Any) -> Any:
    """Replaces every ``QArray`` leaf by its dequantized array; other leaves are untouched.

    A QArray whose arrays were changed after quantizing raises ``ValueError`` naming its path.

    >>> import jax.numpy as jnp
    >>> q, _ = quantize_params({"w": jnp.ones((2, 2))}, QuantSpec(8))
    >>> dequantize_params(q)["w"].round(2).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """

    def visit(path, x):
        if not isinstance(x, QArray):
            return x
        try:
            return dequantize(x)
        except ValueError as e:
            raise ValueError(f"quant.dequantize_params: {_tree.path_str(path)!r}: {e}") from None

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_qarray)
