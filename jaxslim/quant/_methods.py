"""Calibrated quantization methods as records: ``RTN()``, ``GPTQ(...)``, ``AWQ(...)``,
``HQQ(...)``, ``SmoothQuant(...)``.

A record carries its method's options and nothing else (qwix's ``GptqRule`` / ``AwqRule`` do the
same); ``quant.oneshot(..., method=...)``, ``flax.quant.quantize_model`` and ``jaxslim compress``
recipes take it (``method = {name = "gptq", damp = 0.01}`` in TOML is ``GPTQ(damp=0.01)``). The
strings ``"rtn"``, ``"gptq"``, ``"awq"``, ``"hqq"``, ``"smoothquant"`` stand for the records
with their defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxslim import _checks


@dataclasses.dataclass(frozen=True)
class RTN:
    """Round to nearest (``quant.quantize``); calibration only feeds the report."""

    name = "rtn"


@dataclasses.dataclass(frozen=True)
class GPTQ:
    """GPTQ (Frantar et al., ICLR 2023): column-by-column rounding with OBS error feedback.

    Attributes:
      damp: Hessian dampening, a fraction of the mean diagonal of ``X^T X`` (``>= 0``).
      block_size: columns per lazy batch update (``>= 1``; changes speed, not the result).
      clip_candidates: shrink factors of each group's range tried before the sweep (``1``: the
        min/max range; more: an MSE search over clipped ranges, see ``quant.gptq``).
      act_order: rows in decreasing order of ``diag(X^T X)``, group scales from the original
        kernel (llm-compressor's ``actorder="static"``; the stored layout is unchanged).
      qep: error propagation (QEP, Arai & Ichikawa 2025; the objective of GPTAQ): each kernel
        is fitted to the float model's outputs from the inputs of the partly quantized model,
        ``||X_f W - X_q Q||``, by GPTQ on ``quant.qep_correct(W, H, C, alpha=qep)``. ``0``
        (plain GPTQ) to ``1`` (the full correction; larger values over-correct and are
        allowed); the paper uses ``0.5``. The float reference is the params given to
        ``oneshot`` (already pruned, if a recipe pruned first). Needs
        ``quant.oneshot(..., sequential=True)``; each calibration pass runs both models.

    >>> GPTQ(damp=0.1)
    GPTQ(damp=0.1, block_size=128, clip_candidates=1, act_order=False, qep=0.0)
    """

    damp: float = 0.01
    block_size: int = 128
    clip_candidates: int = 1
    act_order: bool = False
    qep: float = 0.0
    name = "gptq"

    def __post_init__(self):
        _checks.number("quant.GPTQ", "damp", self.damp, positive=False)
        _checks.integer("quant.GPTQ", "block_size", self.block_size, low=1)
        _checks.integer("quant.GPTQ", "clip_candidates", self.clip_candidates, low=1)
        if not isinstance(self.act_order, bool):
            raise TypeError(
                f"quant.GPTQ: act_order must be a bool (true / false in a recipe), got "
                f"{self.act_order!r}"
            )
        _checks.number("quant.GPTQ", "qep", self.qep, positive=False)


@dataclasses.dataclass(frozen=True)
class AWQ:
    """AWQ (Lin et al., MLSys 2024): per-input-channel scales ``s = a^alpha`` searched on a grid,
    folded into the preceding norm or kernel, then round to nearest.

    Attributes:
      grid: grid size over ``alpha`` in ``[0, 1)``.
      act: the activation magnitude ``a``: ``"rms"`` (``sqrt(mean x^2)``) or ``"absmax"``.
      clip: search a weight clipping range after scaling (the reference's ``auto_clip``).
    """

    grid: int = 20
    act: str = "rms"
    clip: bool = True
    name = "awq"

    def __post_init__(self):
        _checks.integer("quant.AWQ", "grid", self.grid, low=1)
        if self.act not in ("rms", "absmax"):
            raise ValueError(f"quant.AWQ: act must be 'rms' or 'absmax', got {self.act!r}")
        if not isinstance(self.clip, bool):
            raise TypeError(f"quant.AWQ: clip must be a bool, got {self.clip!r}")


@dataclasses.dataclass(frozen=True)
class HQQ:
    """HQQ (Badri & Shaji, 2023): zero points (and scales) optimised per group by a
    half-quadratic solver of an ``l_p`` (``p < 1``) reconstruction loss; calibration-free.

    Attributes:
      iters: solver iterations (``>= 1``).
    """

    iters: int = 20
    name = "hqq"

    def __post_init__(self):
        _checks.integer("quant.HQQ", "iters", self.iters, low=1)


@dataclasses.dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant (Xiao et al., ICML 2023): ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``
    folded into the preceding norm or kernel, then int8 weights per output channel (W8A8).

    Attributes:
      alpha: migration strength in ``[0, 1]``.
    """

    alpha: float = 0.5
    name = "smoothquant"

    def __post_init__(self):
        a = _checks.scalar("quant.SmoothQuant", "alpha", self.alpha)
        if a is None or not 0.0 <= a <= 1.0:
            raise ValueError(
                f"quant.SmoothQuant: alpha (migration strength) must be a number in [0, 1], got "
                f"{self.alpha!r}"
            )


METHODS = {"rtn": RTN, "gptq": GPTQ, "awq": AWQ, "hqq": HQQ, "smoothquant": SmoothQuant}
Method = RTN | GPTQ | AWQ | HQQ | SmoothQuant


def as_method(method: Any, fn: str) -> Method:
    """A record from a record or a shorthand string; ``ValueError`` naming the choices."""
    if isinstance(method, RTN | GPTQ | AWQ | HQQ | SmoothQuant):
        return method
    if isinstance(method, str) and method in METHODS:
        return METHODS[method]()
    raise ValueError(
        f"{fn}: method must be RTN(), GPTQ(...), AWQ(...), HQQ(...), SmoothQuant(...) or one of "
        f"{tuple(METHODS)}, got {method!r}"
    )
