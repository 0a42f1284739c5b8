"""One-shot pruning methods as records: ``Magnitude()``, ``Wanda()``, ``SparseGPT(...)``.

A record carries its method's options and nothing else; ``prune.oneshot(..., method=...)`` and
``jaxslim compress`` recipes take it (a recipe's ``method = {name = "sparsegpt", damp = 0.01}``
is ``SparseGPT(damp=0.01)``). The strings ``"magnitude"``, ``"wanda"``, ``"sparsegpt"`` stand for
the records with their defaults.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from jaxslim import _checks


@dataclasses.dataclass(frozen=True)
class Magnitude:
    """Every output prunes its smallest ``|W_kj|`` (calibration only feeds the report)."""

    name = "magnitude"


@dataclasses.dataclass(frozen=True)
class Wanda:
    """Wanda (Sun et al., ICLR 2024): score ``|W_kj| * ||X_k||_2`` per output, no update."""

    name = "wanda"


@dataclasses.dataclass(frozen=True)
class SparseGPT:
    """SparseGPT (Frantar & Alistarh, ICML 2023): OBS mask selection and weight reconstruction.

    Attributes:
      block_size: the lazy-update block; the largest divisor of ``K`` (a multiple of ``m`` for
        ``NM``) not above it is used.
      damp: Hessian dampening, a fraction of the mean diagonal (``>= 0``).
      quant: joint sparsity and quantization (the paper's 50 % + 4-bit): ``quant(path, w) -> q``
        with ``w`` the dense ``(K, N)`` kernel and ``q(row, k) -> row`` the quantizer of
        ``prune.sparsegpt``; the pruned params hold the dequantized values.

    >>> SparseGPT(damp=0.1).block_size
    128
    """

    block_size: int = 128
    damp: float = 0.01
    quant: Callable[[str, Any], Any] | None = None
    name = "sparsegpt"

    def __post_init__(self):
        fn = "prune.SparseGPT"
        _checks.integer(fn, "block_size", self.block_size, low=1)
        d = _checks.number(fn, "damp", self.damp, positive=False)
        if not math.isfinite(d):  # pragma: no cover - number() rejects it
            raise ValueError(f"{fn}: damp must be finite, got {self.damp!r}")
        if self.quant is not None and not callable(self.quant):
            raise TypeError(
                f"{fn}: quant must be None or a callable quant(path, w) -> (row, k) -> row, got "
                f"{self.quant!r}"
            )


METHODS = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}
Method = Magnitude | Wanda | SparseGPT


def as_method(method: Any, fn: str) -> Method:
    """A record from a record or a shorthand string; ``ValueError`` naming the choices."""
    if isinstance(method, Magnitude | Wanda | SparseGPT):
        return method
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]()
    raise ValueError(
        f"{fn}: method must be Magnitude(), Wanda(), SparseGPT(...) or one of "
        f"{tuple(METHODS)}, got {method!r}"
    )
