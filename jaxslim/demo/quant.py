"""Demo section: post-training quantization (int8 per channel; int4 in groups of 32, rounded to
nearest and with GPTQ) and quantization-aware fine-tuning (int4) of the trained MNIST-1D model."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import optax
from flax import nnx

from jaxslim import quant
from jaxslim.demo.data import accuracy, train
from jaxslim.flax.quant import qat_model, quantize_model
from jaxslim.quant import QuantSpec

__all__ = ["run", "INT8", "INT4_G32", "GPTQ_METHOD"]

INT8 = [(None, QuantSpec(8, axis=-1))]
"""int8, one scale per output channel, every Linear/Conv kernel."""


def _conv_g32(path, w) -> bool:
    return w.ndim == 3 and w.shape[-2] % 32 == 0


def _dense_g32(path, w) -> bool:
    return w.ndim == 2 and w.shape[0] % 32 == 0


INT4_G32 = [
    (_conv_g32, QuantSpec(4, axis=(0, -1), group_size=32)),
    (_dense_g32, QuantSpec(4, axis=-1, group_size=32)),
    (None, QuantSpec(4, axis=-1)),
]
"""int4 everywhere, one scale per 32 consecutive weights of the contraction: a Dense kernel
``(in, out)`` in groups of 32 inputs; a Conv kernel ``(taps, in, out)`` in groups of 32 input
channels per tap and output channel. A kernel whose contraction 32 does not divide gets one scale
per output channel (the first conv: 5 weights per scale)."""

GPTQ_METHOD = quant.GPTQ(clip_candidates=20)
"""GPTQ with the MSE-optimal clip of each group searched over 20 ratios."""


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def run(
    data,
    dense: nnx.Module,
    *,
    steps: int = 300,
    learning_rate: float = 1e-4,
    calibration_size: int = 1024,
) -> list[dict]:
    """PTQ int8, PTQ int4 (round to nearest, then GPTQ) and QAT int4 rows for the demo table."""
    x_test, y_test = data[2], data[3]
    base = accuracy(dense, x_test, y_test)
    calibration = np.asarray(data[0][:calibration_size])
    rows: list[dict[str, Any]] = []

    def ptq(name, rules, note, **kw):
        t0 = time.perf_counter()
        model = nnx.clone(dense)
        report = quantize_model(model, rules, **kw)
        acc = accuracy(model, x_test, y_test)
        rows.append(
            {
                "method": name,
                "accuracy": acc,
                "size": _kib(report.bytes_after),
                "seconds": time.perf_counter() - t0,
                "note": f"{note}; kernels {_kib(report.bytes_before)} f32, "
                f"{100 * (acc - base):+.1f} pt vs float",
            }
        )
        return acc

    ptq("PTQ int8 per-channel", INT8, "round to nearest, a scale per output channel")
    acc4 = ptq("PTQ int4 group-32", INT4_G32, "round to nearest, a scale per 32 weights")
    ptq(
        "PTQ int4 group-32 GPTQ",
        INT4_G32,
        f"GPTQ on {len(calibration)} training inputs, MSE-optimal clip per group",
        calibration=calibration,
        method=GPTQ_METHOD,
    )

    t0 = time.perf_counter()
    model = nnx.clone(dense)
    qat_model(model, INT4_G32)
    train(model, optax.adam(learning_rate), data, steps=steps, desc="QAT int4")
    report = quantize_model(model, INT4_G32)
    acc = accuracy(model, x_test, y_test)
    lost = base - acc4
    note = f"{steps} fake-quant fine-tune steps, then round to nearest"
    if lost > 0:
        note += f"; recovers {100 * (acc - acc4) / lost:.0f}% of the PTQ int4 loss"
    rows.append(
        {
            "method": "QAT int4 group-32",
            "accuracy": acc,
            "size": _kib(report.bytes_after),
            "seconds": time.perf_counter() - t0,
            "note": note,
        }
    )
    return rows
