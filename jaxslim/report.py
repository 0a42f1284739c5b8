"""Per-leaf tables of a parameter tree: shape, dtype, bits, nonzeros, sparsity and bytes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import _tree

__all__ = ["sparsity", "summary", "format_table", "nbytes"]


def sparsity(tree: Any, where: _tree.Where = None) -> jax.Array:
    """Fraction of exact zeros over the leaves ``where`` selects (jit-safe, a float32 scalar).

    >>> import jax.numpy as jnp
    >>> float(sparsity({"w": jnp.array([[0.0, 1.0], [0.0, 0.0]]), "b": jnp.ones(2)}))
    0.75
    """
    paths = _tree.selected_paths(tree, where, fn_name="report.sparsity")
    leaves = [leaf for p, leaf in _tree.leaves_with_paths(tree) if p in paths]
    zeros = sum(jnp.sum(leaf == 0, dtype=jnp.int32) for leaf in leaves)
    total = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    return (zeros / total).astype(jnp.float32)


def nbytes(leaf: Any) -> int:
    """Storage bytes of one leaf (an array, or any object with an ``nbytes`` such as a QArray)."""
    if hasattr(leaf, "nbytes"):
        return int(leaf.nbytes)
    return 0


def _is_compound(x: Any) -> bool:
    # Quantized arrays report their own size and dequantize themselves; keep them whole.
    return hasattr(x, "dequantize") and hasattr(x, "nbytes") and hasattr(x, "shape")


def summary(tree: Any) -> list[dict[str, Any]]:
    """One row per array leaf: ``path, shape, dtype, bits, size, nonzeros, sparsity, bytes``.

    Leaves that are not arrays (ints, ``None``, strings) are skipped; objects that carry their own
    ``nbytes`` and ``shape`` (a quantized array) are one row each, with ``bits`` taken from them.

    >>> import jax.numpy as jnp
    >>> [r["nonzeros"] for r in summary({"w": jnp.array([[0.0, 1.0], [2.0, 0.0]])})]
    [2]
    """
    rows = []
    flat = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_compound)
    for path, leaf in flat:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            continue
        size = int(np.prod(leaf.shape))
        if _is_compound(leaf):
            nonzeros = int(jnp.sum(leaf.dequantize() != 0))
            bits = getattr(leaf, "bits", None) or getattr(getattr(leaf, "spec", None), "bits", "?")
        else:
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                nonzeros = size
                bits = "key"
            else:
                nonzeros = int(jnp.sum(leaf != 0)) if size else 0
                bits = jnp.dtype(leaf.dtype).itemsize * 8
        rows.append(
            {
                "path": _tree.path_str(path),
                "shape": tuple(leaf.shape),
                "dtype": str(leaf.dtype),
                "bits": bits,
                "size": size,
                "nonzeros": nonzeros,
                "sparsity": 1.0 - nonzeros / size if size else 0.0,
                "bytes": nbytes(leaf),
            }
        )
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
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
