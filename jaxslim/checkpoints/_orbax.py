"""Orbax checkpoint directories of parameter trees, QArrays included, with a CRC-32 per leaf.

``save_orbax`` writes ``to_checkpoint(tree)`` with ``ocp.StandardCheckpointer`` and puts the
CRC-32 of every stored leaf (``_checksums``) in the checkpoint's own custom metadata
(``_CHECKPOINT_METADATA``, written and committed by Orbax with the data). ``load_orbax`` restores
without a target, verifies every CRC-32 and rebuilds the QArrays: the tree comes back whole or
not at all. Needs ``orbax-checkpoint`` (``pip install 'jaxslim[orbax]'``).
"""

from __future__ import annotations

import gc
import os
import pathlib
import sys
from typing import Any

from jaxslim.checkpoints import _checksums
from jaxslim.checkpoints._qarrays import from_checkpoint, restore_qarrays, to_checkpoint

_KEY, _FORMAT, _VERSION = "jaxslim", "jaxslim.checksums", 1
_FIX = "restore the checkpoint from a good copy or write it again"


def _ocp(fn: str) -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError(
            f"checkpoints.{fn} needs orbax-checkpoint: pip install 'jaxslim[orbax]'"
        ) from None
    return ocp


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, without tensorstore's spec dump, shortened."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" [tensorstore_spec=")[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _drop_pending_reads() -> None:
    """Collects the read coroutines a failed Orbax restore leaves behind, without their noise.

    When one array fails to read, Orbax abandons the reads of the others; collected later, each
    reports ``GeneratorExit`` through ``sys.unraisablehook`` (a traceback on stderr, far from
    the error). They are collected here, the one error already in hand.
    """
    prev = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = prev


def save_orbax(path: str | os.PathLike, tree: Any, *, force: bool = False) -> None:
    """Writes ``tree`` (QArrays included) as an Orbax checkpoint directory with a CRC-32 per leaf.

    The directory holds ``to_checkpoint(tree)`` (``ocp.StandardCheckpointer``), so it restores
    without a target and without jaxslim (``from_checkpoint(ckpt.restore(path))``). The CRC-32 of
    every stored leaf (a QArray's codes, scales and zero points each have their own) goes into
    the checkpoint's custom metadata, ``{"jaxslim": {"format", "version", "algorithm",
    "leaves": {path: {"crc32", "shape", "dtype"}}}}``; ``load_orbax`` verifies it. Leaves held
    partly by other processes get no checksum.

    Args:
      path: the checkpoint directory to create (must not exist unless ``force``).
      tree: any pytree of arrays and QArrays.
      force: replace an existing directory.
    """
    ocp = _ocp("save_orbax")
    stored = to_checkpoint(tree)
    meta = {
        _KEY: {
            "format": _FORMAT,
            "version": _VERSION,
            "algorithm": _checksums.ALGORITHM,
            "leaves": _checksums.leaf_checksums(stored),
        }
    }
    target = pathlib.Path(path).resolve()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(target, stored, force=force, custom_metadata=meta)


def _record(ckpt: Any, target: pathlib.Path, error: Any) -> dict[str, Any] | None:
    """The checksums written with the checkpoint, or ``None`` (written without jaxslim, or
    before checksums existed)."""
    try:
        custom = ckpt.metadata(target).custom_metadata
    except Exception as e:  # a damaged _CHECKPOINT_METADATA
        raise error(f"unreadable checkpoint metadata ({_one_line(e)}); {_FIX}") from None
    entry = (custom or {}).get(_KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("format") != _FORMAT:
        raise error(f"the checksum record has no format {_FORMAT!r}; {_FIX}")
    if entry.get("version") != _VERSION or entry.get("algorithm") != _checksums.ALGORITHM:
        raise error(
            f"checksum record version {entry.get('version')!r} / algorithm "
            f"{entry.get('algorithm')!r} is not supported; upgrade jaxslim to read it"
        )
    leaves = entry.get("leaves")
    if not isinstance(leaves, dict):
        raise error(f"the checksum record has no leaves; {_FIX}")
    return leaves


def load_orbax(path: str | os.PathLike, *, like: Any = None) -> Any:
    """Reads an Orbax checkpoint directory without a target: the tree, QArrays restored.

    Every stored QArray (``to_checkpoint``) becomes its ``QArray`` again (``from_checkpoint``);
    with ``like``, QArrays saved with plain Orbax (spec-less ``{"values", "scale", ...}`` dicts)
    are rebuilt from that template too (``restore_qarrays``). When the checkpoint was written by
    ``save_orbax``, every leaf is compared with the CRC-32 written with it. Checkpoints written
    before checksums existed, or by plain Orbax, load without that check.

    Args:
      path: an Orbax checkpoint directory (holds ``_METADATA``).
      like: optional template for QArrays saved with plain Orbax (see ``restore_qarrays``).

    Returns:
      The tree (nested dicts; lists stay lists; Orbax turns int keys into strings).

    Raises:
      ValueError: naming the directory: not an Orbax checkpoint, data Orbax cannot read
        (corrupted, truncated), a leaf missing or whose bytes do not match its CRC-32, a stored
        QArray whose arrays do not match its metadata; each says what to do.
      ImportError: orbax-checkpoint is not installed.
    """
    shown = os.fspath(path)
    target = pathlib.Path(path).resolve()

    def error(what: str) -> ValueError:
        return ValueError(f"checkpoints.load_orbax: {shown}: {what}")

    if not target.is_dir():
        raise error("is not a directory; pass an Orbax checkpoint directory")
    if not (target / "_METADATA").is_file():
        raise error("not an Orbax checkpoint directory (no _METADATA file)")
    ocp = _ocp("load_orbax")
    failure = None
    with ocp.StandardCheckpointer() as ckpt:
        try:
            stored = ckpt.restore(target)
        except Exception as e:  # Orbax and tensorstore raise many types for damaged data
            failure = f"corrupted or unreadable Orbax checkpoint: {_one_line(e)}; {_FIX}"
        if failure is None:
            record = _record(ckpt, target, error)
    if failure is not None:
        _drop_pending_reads()
        raise error(failure)
    try:
        tree = from_checkpoint(stored)
    except ValueError as e:
        raise error(str(e)) from None
    if record is not None:
        _checksums.verify(stored, record, error)
    if like is not None:
        try:
            tree = restore_qarrays(tree, like)
        except ValueError as e:
            raise error(str(e)) from None
    return tree
