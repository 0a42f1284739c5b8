"""Channel removal: parameters, FLOPs and measured inference time against the dense model.

Two NNX CNNs on MNIST-1D-shaped input ``(batch, 40)``: the paper's CNN (32 channels) and a wider
synthetic one (256 channels). For 25 / 50 / 75 % of every removable channel group removed by
``splice.prune_channels``, prints the parameter count, FLOPs (matmul + conv multiply-adds x 2),
and the median of paired timing ratios (dense and pruned jitted forward passes run alternately).

    python benchmarks/bench_splice.py [--repeats 30] [--batch 1024]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
from flax import nnx

from jaxslim import splice
from jaxslim.demo import data as D
from jaxslim.flax import splice as fsplice


def _time(f, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t0


def bench(name: str, channels: tuple[int, int, int], batch: int, repeats: int) -> list[dict]:
    model = D.CNN(channels=channels, rngs=nnx.Rngs(0))
    fn, state = fsplice.module_fn(model)
    x = jax.random.normal(jax.random.key(0), (batch, 40))
    run = jax.jit(fn)
    rows = []
    for sparsity in (0.25, 0.5, 0.75):
        small, rep = splice.prune_channels(fn, state, x, sparsity=sparsity)
        for p in (state, small):  # compile and warm up
            for _ in range(3):
                _time(run, p, x)
        ratios, td, ts = [], [], []
        for _ in range(repeats):
            a, b = _time(run, state, x), _time(run, small, x)
            td.append(a)
            ts.append(b)
            ratios.append(a / b)
        flop_ratio = rep.flops_before / rep.flops_after
        speedup = statistics.median(ratios)
        rows.append(
            {
                "model": name,
                "removed": f"{sparsity:.0%}",
                "params": f"{rep.params_before:,} -> {rep.params_after:,}",
                "flops": f"{rep.flops_before / 1e6:.1f}M -> {rep.flops_after / 1e6:.1f}M",
                "flop_x": f"{flop_ratio:.2f}x",
                "dense_ms": f"{statistics.median(td) * 1e3:.2f}",
                "pruned_ms": f"{statistics.median(ts) * 1e3:.2f}",
                "speedup": f"{speedup:.2f}x",
                "of_flop": f"{speedup / flop_ratio:.2f}",
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()
    rows = bench("CNN 32ch (MNIST-1D)", (32, 32, 32), args.batch, args.repeats)
    rows += bench("CNN 256ch (synthetic)", (256, 256, 256), args.batch, args.repeats)
    cols = [
        ("model", "model"),
        ("removed", "removed"),
        ("params", "params"),
        ("flops", "FLOPs"),
        ("flop_x", "FLOP cut"),
        ("dense_ms", "dense ms"),
        ("pruned_ms", "pruned ms"),
        ("speedup", "speed-up"),
        ("of_flop", "speed-up / FLOP cut"),
    ]
    print(
        f"jax {jax.__version__}, {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"batch {args.batch}, median of {args.repeats} paired runs"
    )
    print("| " + " | ".join(h for _, h in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r[k] for k, _ in cols) + " |")


if __name__ == "__main__":
    main()
