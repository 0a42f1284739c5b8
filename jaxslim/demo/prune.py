"""Demo section: gradual magnitude pruning to 90 % during training (Zhu & Gupta)."""

from __future__ import annotations

import time

import optax
from flax import nnx

from jaxslim import prune, report
from jaxslim.demo import data as D

__all__ = ["run"]


def run(data, dense, *, steps: int = 3000, sparsity: float = 0.9, seed: int = 0):
    """Trains a fresh copy of ``dense``'s architecture with a pruner; returns rows and layers.

    Returns ``(rows, layers)``: the report row(s) and a per-layer table (path, shape, nonzeros,
    sparsity) of the pruned model.
    """
    model = D.make_model("cnn", seed=seed)
    schedule = prune.polynomial_schedule(
        sparsity, begin_step=steps // 6, end_step=2 * steps // 3, frequency=max(1, steps // 30)
    )
    tx = optax.chain(D.baseline_optimizer(steps), prune.pruner(schedule, scope="global"))
    t0 = time.perf_counter()
    D.train(
        model,
        tx,
        data,
        steps=steps,
        batch_size=D.BATCH_SIZE,
        seed=seed,
        desc=f"prune to {sparsity:.0%}",
    )
    seconds = time.perf_counter() - t0
    params = nnx.state(model, nnx.Param)
    layers = [
        {k: r[k] for k in ("path", "shape", "size", "nonzeros", "sparsity")}
        for r in report.summary(params)
    ]
    nonzero = sum(r["nonzeros"] for r in layers)
    total = sum(r["size"] for r in layers)
    rows = [
        {
            "method": f"pruned {sparsity:.0%} (gradual, global magnitude)",
            "accuracy": D.accuracy(model, data[2], data[3]),
            "size": f"{nonzero:,} nonzero / {total:,} params",
            "seconds": seconds,
            "note": f"kernel sparsity {float(report.sparsity(params)):.1%}, biases dense",
        }
    ]
    return rows, layers
