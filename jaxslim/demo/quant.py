"""Demo section: post-training quantization (int8 per channel, int4 in groups of 32) and
quantization-aware fine-tuning (int4) of the trained MNIST-1D model."""

from __future__ import annotations

import time
from typing import Any

import optax
from flax import nnx

from jaxslim.demo.data import accuracy, train
from jaxslim.flax.quant import qat_model, quantize_model
from jaxslim.quant import QuantSpec

__all__ = ["run", "INT8", "INT4_G32"]

INT8 = [(None, QuantSpec(8, axis=-1))]
"""int8, one scale per output channel, every Linear/Conv kernel."""

INT4_G32 = [
    (lambda path, w: w.size // w.shape[-1] < 32, QuantSpec(8, axis=-1)),
    (lambda path, w: w.shape[-2] % 32 == 0, QuantSpec(4, axis=-1, group_size=32)),
    (None, QuantSpec(4, axis=-1)),
]
"""int4 in groups of 32 input channels (int4 per channel where 32 does not divide the inputs);
a kernel with fewer than 32 weights per output channel (the first conv) stays int8."""


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def run(data, dense: nnx.Module, *, steps: int = 300, learning_rate: float = 1e-4) -> list[dict]:
    """PTQ int8, PTQ int4 (group 32) and QAT int4 rows for the demo table."""
    x_test, y_test = data[2], data[3]
    base = accuracy(dense, x_test, y_test)
    rows: list[dict[str, Any]] = []

    def ptq(name, rules, note):
        t0 = time.perf_counter()
        model = nnx.clone(dense)
        report = quantize_model(model, rules)
        acc = accuracy(model, x_test, y_test)
        rows.append({
            "method": name, "accuracy": acc, "size": _kib(report.bytes_after),
            "seconds": time.perf_counter() - t0,
            "note": f"{note}; kernels {_kib(report.bytes_before)} f32, "
                    f"{100 * (acc - base):+.1f} pt vs float",
        })
        return acc

    ptq("PTQ int8 per-channel", INT8, "weights int8, one scale per output channel")
    acc4 = ptq("PTQ int4 group-32", INT4_G32, "int4, a scale per 32 inputs; first conv int8")

    t0 = time.perf_counter()
    model = nnx.clone(dense)
    qat_model(model, INT4_G32)
    train(model, optax.adam(learning_rate), data, steps=steps, desc="QAT int4")
    report = quantize_model(model, INT4_G32)
    acc = accuracy(model, x_test, y_test)
    lost = base - acc4
    recovered = (acc - acc4) / lost if lost > 0 else float("nan")
    rows.append({
        "method": "QAT int4 group-32", "accuracy": acc, "size": _kib(report.bytes_after),
        "seconds": time.perf_counter() - t0,
        "note": f"{steps} fake-quant fine-tune steps; recovers {100 * recovered:.0f}% of the PTQ "
                f"int4 loss" if lost > 0 else f"{steps} fake-quant fine-tune steps",
    })
    return rows
