"""The report both one-shot drivers return: ``prune.oneshot`` and ``quant.oneshot``.

One row per compressed kernel (per slice of a stacked kernel): its path, the method, the relative
output error of the layer on the calibration inputs it saw, the error of the method's uncalibrated
baseline on the same inputs (magnitude pruning for pruning methods, round-to-nearest for
quantization methods), and the seconds it took. ``report.table()`` prints it, so a user sees
which layer hurt.

The error is ``||X W - X W'||_F / ||X W||_F = sqrt(tr(D^T H D) / tr(W^T H W))`` with
``H = X^T X`` and ``D = W - W'`` on the kernel's ``(K, N)`` view.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST


@jax.jit
def _traces(w: jax.Array, w_new: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    w = w.astype(jnp.float32)
    d = w - w_new.astype(jnp.float32)
    h = h.astype(jnp.float32)
    num = jnp.sum(d * jnp.matmul(h, d, precision=_HI))
    den = jnp.sum(w * jnp.matmul(h, w, precision=_HI))
    return num, den


def relative_error(w: jax.Array, w_new: jax.Array, h: jax.Array) -> float:
    """``sqrt(tr(D^T H D) / tr(W^T H W))`` for ``(K, N)`` kernels and a ``(K, K)`` ``H``
    (``0.0`` when the layer's output is zero on the calibration inputs).

    >>> import jax.numpy as jnp
    >>> relative_error(jnp.ones((2, 1)), jnp.zeros((2, 1)), jnp.eye(2))
    1.0
    """
    num, den = jax.device_get(_traces(w, w_new, h))
    return float(math.sqrt(max(float(num), 0.0) / float(den))) if den > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class KernelRow:
    """One compressed kernel (or one slice of a stacked kernel).

    ``error`` is the layer's relative output error after the method, ``baseline`` the error of
    the uncalibrated baseline (magnitude / round-to-nearest) on the same inputs, ``seconds`` the
    method's time on this kernel. Pruning rows fill ``sparsity`` (of the mask) and ``size``
    (``K N``); quantization rows fill ``spec`` (on the kernel's own layout) and the bytes.
    """

    path: str
    method: str
    shape: tuple[int, ...]
    error: float
    baseline: float
    seconds: float
    slice: tuple[int, ...] | None = None
    sparsity: float | None = None
    size: int = 0
    spec: Any = None
    bytes_before: int = 0
    bytes_after: int = 0


@dataclasses.dataclass(frozen=True)
class OneshotReport:
    """What ``prune.oneshot`` / ``quant.oneshot`` did: ``rows`` (:class:`KernelRow`), the
    ``method`` record, the wall ``seconds`` (calibration included), ``masks`` (pruning: a tree of
    ``params``' structure, ``bool`` on pruned kernels and ``None`` elsewhere, for
    ``prune.keep_mask``), ``absorbers`` / ``alphas`` (AWQ and SmoothQuant: the float leaf each
    kernel's input scales were folded into, and the migration strength) and ``skipped`` (leaves
    left as they were, with the reason)."""

    method: Any
    rows: tuple[KernelRow, ...]
    seconds: float
    masks: Any = None
    absorbers: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    alphas: Mapping[str, float] = dataclasses.field(default_factory=dict)
    skipped: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """The pruned fraction over every pruned kernel, weighted by size (0.0 when none)."""
        size = sum(r.size for r in self.rows)
        return sum((r.sparsity or 0.0) * r.size for r in self.rows) / size if size else 0.0

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    def table(self) -> str:
        """The rows as a text table (path, method, shape, sparsity or bits, errors, seconds)."""
        width = max([24, *(len(_name(r)) for r in self.rows)])
        head = f"{'kernel':{width}} {'method':18} {'shape':>14} {'sp/bits':>7} "
        lines = [head + f"{'baseline':>9} {'error':>9} {'s':>6}"]
        for r in self.rows:
            kind = f"{r.sparsity:.3f}" if r.sparsity is not None else _bits(r.spec)
            lines.append(
                f"{_name(r):{width}} {r.method:18} {'x'.join(map(str, r.shape)):>14} {kind:>7} "
                f"{r.baseline:>9.3e} {r.error:>9.3e} {r.seconds:>6.2f}"
            )
        tail = f"{len(self.rows)} kernels, {self.seconds:.1f} s"
        if any(r.sparsity is not None for r in self.rows):
            tail += f", sparsity {self.sparsity:.3f}"
        if self.bytes_before:
            tail += f", {self.bytes_before} -> {self.bytes_after} bytes"
        lines.append(tail)
        for path, why in self.skipped.items():
            lines.append(f"skipped {path}: {why}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _name(r: KernelRow) -> str:
    return r.path if r.slice is None else f"{r.path}{list(r.slice)}"


def _bits(spec: Any) -> str:
    return "-" if spec is None else str(getattr(spec, "bits", "?"))
