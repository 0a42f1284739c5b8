"""A CRC-32 per stored leaf: written with a checkpoint, verified when it is read back.

``leaf_checksums(stored)`` maps the path string of every array leaf of a tree in its stored form
(after ``to_checkpoint``: a QArray's codes, scales, zero points and metadata are leaves of their
own) to ``{"crc32", "shape", "dtype"}``; the CRC-32 (``zlib.crc32``) is taken over the leaf's
bytes in C order. ``verify`` recomputes it on the tree read back: a flipped bit, a zeroed block or
a partial copy of a data file changes the bytes of some leaf, so its CRC differs (CRC-32 detects
every change of up to 32 consecutive bits, and any other change with probability 1 - 2^-32).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxslim import _tree

ALGORITHM = "crc32"


def _host(leaf: Any) -> np.ndarray | None:
    """The leaf as a host array (a typed PRNG key as its key data), or ``None`` if not an array."""
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if not leaf.is_fully_addressable:
            return None  # another process holds part of it: no global checksum here
    if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
        return None
    arr = np.asarray(leaf)
    return None if arr.dtype == object else arr


def crc32(arr: np.ndarray) -> int:
    """CRC-32 of the bytes of ``arr`` in C order (any dtype, ml_dtypes included)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    return zlib.crc32(flat.view(np.uint8)) if flat.size else 0


def leaf_checksums(stored: Any) -> dict[str, dict[str, Any]]:
    """``{path: {"crc32", "shape", "dtype"}}`` of every array leaf of ``stored``."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(stored):
        arr = _host(leaf)
        if arr is not None:
            out[_tree.path_str(path)] = {
                "crc32": crc32(arr),
                "shape": list(arr.shape),
                "dtype": arr.dtype.name,
            }
    return out


def verify(stored: Any, record: Mapping[str, Any], error: Any) -> None:
    """Raises ``error(what)`` for the first leaf of ``record`` that is missing from ``stored``
    or whose shape, dtype or CRC-32 differs. ``stored`` is the tree as read (stored form)."""
    found = {_tree.path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(stored)}
    fix = "restore it from a good copy or write it again"
    for name, want in record.items():
        if name not in found:
            raise error(f"leaf {name!r} is missing (it was written with the file); {fix}")
        arr = _host(found[name])
        if arr is None:
            continue
        got = (list(arr.shape), arr.dtype.name)
        if got != (list(want["shape"]), want["dtype"]):
            raise error(
                f"leaf {name!r} is {got[1]}{got[0]}, but was written as "
                f"{want['dtype']}{list(want['shape'])}; {fix}"
            )
        crc = crc32(arr)
        if crc != want["crc32"]:
            raise error(
                f"leaf {name!r} does not match the {ALGORITHM} checksum written with it "
                f"(written {want['crc32']:#010x}, read {crc:#010x}): its data changed after "
                f"writing (a flipped bit, a damaged or partial copy); {fix}"
            )
