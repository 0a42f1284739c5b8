"""``save`` / ``load``: a parameter tree to and from an Orbax directory or a ``.npz`` file."""

from __future__ import annotations

import os
import pathlib
from typing import Any

from jaxslim.checkpoints._npz import load_npz, save_npz
from jaxslim.checkpoints._orbax import load_orbax, save_orbax
from jaxslim.checkpoints._qarrays import restore_qarrays


def save(path: str | os.PathLike, tree: Any, *, force: bool = False) -> None:
    """Writes ``tree`` (QArrays included) to ``path`` with a CRC-32 per leaf.

    A path ending in ``.npz`` gets a ``.npz`` file (``save_npz``), any other an Orbax checkpoint
    directory (``save_orbax``). ``load`` reads either back, QArrays restored and every leaf
    checked against its CRC-32.

    Raises ``ValueError`` when ``path`` exists and ``force`` is not set.

    >>> import pathlib, tempfile
    >>> import jax.numpy as jnp
    >>> from jaxslim import checkpoints
    >>> from jaxslim.quant import QuantSpec, quantize
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "params.npz"
    >>> checkpoints.save(f, {"w": quantize(jnp.ones((4, 8)), QuantSpec(4, axis=-1))})
    >>> checkpoints.load(f)["w"].bits
    4
    """
    p = pathlib.Path(path)
    if p.exists() and not force:
        raise ValueError(f"checkpoints.save: {os.fspath(path)} already exists; pass force=True")
    if p.suffix == ".npz":
        if p.is_dir():
            raise ValueError(f"checkpoints.save: {os.fspath(path)} is a directory, not a .npz")
        save_npz(p, tree)
    else:
        save_orbax(p, tree, force=force)


def load(path: str | os.PathLike, *, like: Any = None) -> Any:
    """Reads the tree at ``path`` (an Orbax checkpoint directory or a ``.npz`` file).

    QArrays stored by jaxslim come back as QArrays; with ``like``, so do QArrays saved with plain
    Orbax, whose spec the checkpoint does not hold (``restore_qarrays``). Every leaf of a file
    written by ``save`` is checked against the CRC-32 written with it; files written before
    checksums existed (or by plain Orbax / ``np.savez``) load without that check.

    Raises:
      ValueError: naming the file and, where there is one, the leaf: a missing path, a file
        that is neither, corrupted or truncated data, a missing leaf, a checksum mismatch, a
        tampered QArray; each says what to do.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(
            f"checkpoints.load: {os.fspath(path)} does not exist; pass an Orbax checkpoint "
            "directory or a .npz file"
        )
    if p.is_dir():
        return load_orbax(p, like=like)
    if p.suffix != ".npz":
        raise ValueError(
            f"checkpoints.load: {os.fspath(path)} is neither a directory nor a .npz file; pass an "
            "Orbax checkpoint directory or a .npz file (checkpoints.open reads HF and GGUF models)"
        )
    tree = load_npz(p)
    if like is not None:
        try:
            tree = restore_qarrays(tree, like)
        except ValueError as e:
            raise ValueError(f"checkpoints.load: {os.fspath(path)}: {e}") from None
    return tree
