"""Deprecated: moved to ``jaxslim.checkpoints``; this module goes away in the next release.

``quant.storage.to_checkpoint`` / ``from_checkpoint`` / ``save_npz`` / ``load_npz`` are
``checkpoints.to_checkpoint`` / ``from_checkpoint`` / ``save_npz`` / ``load_npz`` (same
arguments, same stored form; ``.npz`` files now also carry a CRC-32 per entry). Each call here
emits a ``DeprecationWarning`` and forwards. ``checkpoints.save`` / ``checkpoints.load`` write
and read Orbax directories and ``.npz`` files with checksums.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

MARKER = "__jaxslim_qarray__"
"""Key of the metadata array in the stored dict of a QArray (``checkpoints.to_checkpoint``)."""


def _forward(name: str, args: tuple, kwargs: dict) -> Any:
    # Calls from inside jaxslim are not the user's to fix: warn only for outside callers.
    caller = sys._getframe(2).f_globals.get("__name__", "")
    if not caller.startswith("jaxslim."):
        warnings.warn(
            f"jaxslim.quant.storage.{name} is deprecated and will be removed: use "
            f"jaxslim.checkpoints.{name}",
            DeprecationWarning,
            stacklevel=3,
        )
    checkpoints = importlib.import_module("jaxslim.checkpoints")  # a floor above quant
    return getattr(checkpoints, name)(*args, **kwargs)


def to_checkpoint(*args: Any, **kwargs: Any) -> Any:
    """Deprecated alias of ``jaxslim.checkpoints.to_checkpoint``."""
    return _forward("to_checkpoint", args, kwargs)


def from_checkpoint(*args: Any, **kwargs: Any) -> Any:
    """Deprecated alias of ``jaxslim.checkpoints.from_checkpoint``."""
    return _forward("from_checkpoint", args, kwargs)


def save_npz(*args: Any, **kwargs: Any) -> None:
    """Deprecated alias of ``jaxslim.checkpoints.save_npz``."""
    return _forward("save_npz", args, kwargs)


def load_npz(*args: Any, **kwargs: Any) -> Any:
    """Deprecated alias of ``jaxslim.checkpoints.load_npz``."""
    return _forward("load_npz", args, kwargs)
