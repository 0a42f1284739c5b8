"""Per-leaf tables of a parameter tree: shape, dtype, bits, nonzeros, sparsity and bytes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import _tree
from jaxslim._checks import public

__all__ = ["sparsity", "summary", "format_table", "nbytes"]


@public("report.sparsity")
def sparsity(tree: Any, *, where: _tree.Where = None) -> jax.Array:
    """Fraction of exact zeros over the leaves ``where`` selects (jit-safe, a float32 scalar).

    >>> import jax.numpy as jnp
    >>> float(sparsity({"w": jnp.array([[0.0, 1.0], [0.0, 0.0]]), "b": jnp.ones(2)}))
    0.75
    """
    paths = _tree.selected_paths(tree, where)
    leaves = [leaf for p, leaf in _tree.leaves_with_paths(tree) if p in paths]
    zeros = sum(jnp.sum(leaf == 0, dtype=jnp.int32) for leaf in leaves)
    total = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    return (zeros / total).astype(jnp.float32)


@public("report.nbytes")
def nbytes(leaf: Any) -> int:
    """Storage bytes of one leaf: an array's ``nbytes``, a QArray's codes + scales + zero points.

    Python numbers count as the 0-d array numpy makes of them; anything else (``None``) is 0.
    """
    if hasattr(leaf, "nbytes"):
        return int(leaf.nbytes)
    if isinstance(leaf, int | float | complex | np.generic):
        return int(np.asarray(leaf).nbytes)
    return 0


def _is_compound(x: Any) -> bool:
    # Quantized arrays report their own size and dequantize themselves; keep them whole.
    return hasattr(x, "dequantize") and hasattr(x, "nbytes") and hasattr(x, "shape")


def _compound_format(leaf: Any) -> tuple[Any, str]:
    """``(bits, dtype label)`` of a quantized leaf: ``(4, "int4 (float32)")`` for a QArray."""
    spec = getattr(leaf, "spec", None)
    bits = getattr(leaf, "bits", None) or getattr(spec, "bits", "?")
    fmt = getattr(spec, "fmt", None)
    if fmt == "int":
        fmt = f"{'int' if getattr(spec, 'signed', True) else 'uint'}{bits}"
    label = str(jnp.dtype(leaf.dtype).name) if fmt is None else f"{fmt} ({jnp.dtype(leaf.dtype)})"
    return bits, label


def _row(path: str, leaf: Any) -> dict[str, Any] | None:
    if isinstance(leaf, bool | int | float | complex | np.generic):
        leaf = np.asarray(leaf)
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        return None  # None, strings, other objects: not parameters
    size = int(np.prod(leaf.shape))
    dtype = str(leaf.dtype)
    if _is_compound(leaf):
        nonzeros = int(jnp.count_nonzero(leaf.dequantize())) if size else 0
        bits, dtype = _compound_format(leaf)
    elif jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        nonzeros, bits = size, "key"
    elif np.dtype(leaf.dtype).type in (np.object_, np.str_, np.bytes_, np.void):
        return None  # text, objects or untyped bytes: no numeric value to count
    else:
        nonzeros = int(jnp.count_nonzero(leaf)) if size else 0
        bits = np.dtype(leaf.dtype).itemsize * 8
    return {
        "path": path,
        "shape": tuple(leaf.shape),
        "dtype": dtype,
        "bits": bits,
        "size": size,
        "nonzeros": nonzeros,
        "sparsity": 1.0 - nonzeros / size if size else 0.0,
        "bytes": nbytes(leaf),
    }


@public("report.summary")
def summary(tree: Any) -> list[dict[str, Any]]:
    """One row per array leaf: ``path, shape, dtype, bits, size, nonzeros, sparsity, bytes``.

    ``bits`` is the width of one stored value: ``8 * itemsize`` for an array, the format's bits for
    a quantized array (a ``QArray`` is one row: ``bits=4``, dtype ``"int4 (float32)"``, ``bytes``
    of the packed codes plus scales), ``"key"`` for a typed PRNG key. Python numbers are rows of
    shape ``()``; ``None``, strings and size-0 arrays give no nonzeros (a size-0 leaf has sparsity
    0). ``sparsity`` is ``1 - nonzeros / size``.

    >>> import jax.numpy as jnp
    >>> [r["nonzeros"] for r in summary({"w": jnp.array([[0.0, 1.0], [2.0, 0.0]])})]
    [2]
    """
    flat = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_compound)
    rows = [_row(_tree.path_str(path), leaf) for path, leaf in flat]
    return [r for r in rows if r is not None]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


@public("report.format_table")
def format_table(rows: Sequence[dict[str, Any]], *, columns: Sequence[str] | None = None) -> str:
    """Formats rows (dicts) as a Markdown table; ``columns`` defaults to the first row's keys.

    >>> print(format_table([{"a": 1, "b": 0.5}]))
    | a | b |
    |---|---|
    | 1 | 0.5000 |
    """
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)
