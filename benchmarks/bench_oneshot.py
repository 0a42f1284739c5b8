"""One-shot compression of one layer: SparseGPT vs GPTQ vs Wanda (issue 10 target: SparseGPT
<= 1.5x GPTQ).

Run: ``python benchmarks/bench_oneshot.py [--size 4096] [--rows 2048] [--reps 5]``; with
``--memory`` it measures the peak memory of ``calibrate.statistics`` instead (see ``memory``).
One ``(d, d)`` kernel, calibration inputs of ``--rows`` random correlated rows; the Hessian ``X^T
X`` (and Wanda's per-input squared norms) are computed once and timed separately as "calibration".
Every method is compiled first, then timed ``--reps`` times in interleaved rounds; the table gives
medians and the median paired ratio to GPTQ. Without ``--size``, 4096 is used unless one SparseGPT
run there (compile included) takes over a minute, in which case it falls back to 1024 and says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import _tree, calibrate, quant
from jaxslim.prune._calibrated import sparsegpt, wanda
from jaxslim.quant import QuantSpec
from jaxslim.structures import NM


def _run(f):
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    return time.perf_counter() - t0


def _layer(d: int, rows: int):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    mix = jnp.eye(d) + 0.1 * jax.random.normal(kc, (d, d)) / np.sqrt(d)
    x = jax.random.normal(kx, (rows, d)) @ mix
    w = jax.random.normal(kw, (d, d)) / np.sqrt(d)
    return jax.block_until_ready(x), jax.block_until_ready(w)


def _int4(w):
    scale = jnp.max(jnp.abs(w), axis=0) / 7.0
    return lambda row, k: jnp.clip(jnp.round(row / scale), -8, 7) * scale


def methods(w, h, sq, block):
    spec = QuantSpec(4, axis=-1)
    q4 = _int4(w)
    return {
        "GPTQ int4 per-channel": lambda: quant.gptq(w, h, spec, block_size=block).values,
        "SparseGPT 50%": lambda: sparsegpt(w, h, 0.5, block_size=block),
        "SparseGPT 2:4": lambda: sparsegpt(w, h, 0.5, structure=NM(2, 4), block_size=block),
        "SparseGPT 50% + int4": lambda: sparsegpt(w, h, 0.5, block_size=block, quant=q4),
        "Wanda 50%": lambda: wanda({"w": w}, {"w": sq}, 0.5)["w"],
        "Wanda 2:4": lambda: wanda({"w": w}, {"w": sq}, 0.5, structure=NM(2, 4))["w"],
    }


# ------------------------------------------------------------------------------- peak memory

_MB = 2**20


def _stack(layers: int, d: int):
    """A plain-JAX stack of ``layers`` Dense ``(d, d)`` kernels (separate leaves) and its fn."""
    keys = jax.random.split(jax.random.key(0), layers)
    params = {f"l{i:02d}": jax.random.normal(k, (d, d)) / np.sqrt(d) for i, k in enumerate(keys)}

    def fn(p, x):
        for name in sorted(p):
            x = jnp.tanh(x @ p[name])
        return x

    return jax.block_until_ready(params), fn


def _batches(n: int, rows: int, d: int):
    return [jax.random.normal(jax.random.key(100 + b), (rows, d)) for b in range(n)]


def _step_memory(fn, params, batch, kernels) -> dict:
    """``memory_analysis()`` of the jitted accumulation step ``calibrate.statistics`` runs (its
    private pieces, put together as it does): arguments, outputs (the accumulators) and temps."""
    name = "bench"
    c = calibrate._trace(fn, params, batch, 0, name)
    leaves = dict(_tree.leaves_with_paths(params))
    chosen = list(leaves) if kernels == "all" else kernels
    plans = calibrate._make_plans(c.uses, chosen, leaves, False, name)
    step = jax.jit(calibrate._make_step(c.traced, calibrate._make_hook(plans, jnp.float32, name)))
    acc = {
        p: (
            jax.ShapeDtypeStruct((pl.k, pl.k), jnp.float32),
            jax.ShapeDtypeStruct((pl.k,), jnp.float32),
            jax.ShapeDtypeStruct((pl.k,), jnp.float32),
            jax.ShapeDtypeStruct((), jnp.int32),
        )
        for p, pl in plans.items()
    }
    args = ([x for _, x in _tree.leaves_with_paths(params)], list(c.traced.consts), acc,
            jax.tree.leaves(batch))  # fmt: skip
    ma = step.lower(*args).compile().memory_analysis()
    return {
        "arguments": ma.argument_size_in_bytes,
        "outputs": ma.output_size_in_bytes,
        "temps": ma.temp_size_in_bytes,
        "aliased": ma.alias_size_in_bytes,
    }


def _rss_peak_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return r / 1024.0


def _rss_child(mode: str, layers: int, d: int, rows: int, n: int) -> None:
    """Runs in a fresh process: peak RSS before and after ``calibrate.statistics``."""
    params, fn = _stack(layers, d)
    xs = _batches(n, rows, d)
    jax.block_until_ready(jax.jit(fn)(params, xs[0]))  # runtime + a forward, before measuring
    before = _rss_peak_mb()
    t0 = time.perf_counter()
    if mode == "all":
        stats = calibrate.statistics(fn, params, xs)
        jax.block_until_ready(jax.tree.leaves(stats))
    else:  # one kernel's accumulators at a time, dropped before the next
        for p in sorted(params):
            s = calibrate.statistics(fn, params, xs, kernels=[p])[p]
            jax.block_until_ready(s.xtx)
            del s
    print(f"{before:.1f} {_rss_peak_mb():.1f} {time.perf_counter() - t0:.1f}")


def memory(layers: int = 24, d: int = 2048, rows: int = 512, n: int = 4) -> None:
    """Peak memory of ``calibrate.statistics`` on a ``layers`` x ``(d, d)`` plain-JAX Dense
    stack (24 x 2048^2 = 100.7M parameters), ``n`` batches of ``rows`` rows.

    Two measurements: (1) XLA's ``memory_analysis()`` of the compiled accumulation step (one
    batch): arguments (params + accumulators + batch), outputs (the new accumulators) and temps
    (activations and the per-site ``X^T X`` in flight); (2) the process's peak RSS
    (``resource.getrusage``) in a fresh subprocess, before and after the whole call, with every
    kernel's statistics at once (``kernels="all"``) and one kernel at a time
    (``kernels=[path]`` in a loop)."""
    params, fn = _stack(layers, d)
    model = sum(x.size * 4 for x in jax.tree.leaves(params))
    hess = d * d * 4
    act = rows * d * 4
    print(f"model {layers} x ({d}, {d}) = {model / 4 / 1e6:.1f}M params, {model / _MB:.0f} MiB; "
          f"one Hessian {hess / _MB:.0f} MiB; one layer's activation ({rows}, {d}) "
          f"{act / _MB:.0f} MiB; all layers' activations {layers * act / _MB:.0f} MiB")  # fmt: skip
    batch = _batches(1, rows, d)[0]
    print()
    print("| step (memory_analysis) | arguments MiB | outputs MiB | temps MiB |")
    print("|---|---|---|---|")
    for label, kernels in (("all kernels", "all"), ("one kernel", [sorted(params)[-1]])):
        m = _step_memory(fn, params, batch, kernels)
        print(f"| {label} | {m['arguments'] / _MB:.0f} | {m['outputs'] / _MB:.0f} | "
              f"{m['temps'] / _MB:.0f} |")  # fmt: skip
    del params
    print()
    print("| whole call (peak RSS, fresh process) | before MiB | peak MiB | added MiB | s |")
    print("|---|---|---|---|---|")
    for mode in ("all", "one"):
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", mode, str(layers), str(d), str(rows),
             str(n)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        before, peak, secs = map(float, out.stdout.split()[-3:])
        label = "kernels='all'" if mode == "all" else "kernels=[path], one at a time"
        print(f"| {label} | {before:.0f} | {peak:.0f} | {peak - before:.0f} | {secs:.1f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        mode, layers, d, rows, n = sys.argv[2], *map(int, sys.argv[3:7])
        _rss_child(mode, layers, d, rows, n)
        return
    if "--memory" in sys.argv:
        memory()
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--block", type=int, default=128)
    args = ap.parse_args()

    d = args.size or 4096
    note = f"size {d} (given)" if args.size else "size 4096 (default)"
    x, w = _layer(d, args.rows)
    h = jax.jit(lambda x: x.T @ x)(x)
    if args.size is None:
        first = _run(lambda: sparsegpt(w, h, 0.5, block_size=args.block))
        if first > 60.0:
            note = f"size 1024: one SparseGPT run at 4096 took {first:.0f} s (> 60 s) on this CPU"
            d = 1024
            x, w = _layer(d, args.rows)
    calib = {
        "hessian": jax.jit(lambda x: jnp.matmul(x.T, x, precision="highest")),
        "sq_norm": jax.jit(lambda x: jnp.sum(x * x, axis=0)),
    }
    h, sq = calib["hessian"](x), calib["sq_norm"](x)
    fns = {"calibration: X^T X": lambda: calib["hessian"](x)}
    fns["calibration: sq norms"] = lambda: calib["sq_norm"](x)
    fns |= methods(w, h, sq, args.block)
    compile_s = {name: _run(f) for name, f in fns.items()}  # first call: trace + compile + run
    times = {name: [] for name in fns}
    for _ in range(args.reps):
        for name, f in fns.items():
            times[name].append(_run(f))
    base = np.asarray(times["GPTQ int4 per-channel"])

    dev = jax.devices()[0]
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()} ({dev.device_kind}), "
        f"{os.cpu_count()} CPUs, {platform.machine()}, python {platform.python_version()}"
    )
    print(f"{note}; layer ({d}, {d}), {args.rows} calibration rows, block {args.block}, "
          f"median of {args.reps} after compile")  # fmt: skip
    print()
    print("| method | first call (s) | median (s) | ratio to GPTQ |")
    print("|---|---|---|---|")
    for name, t in times.items():
        ratio = np.median(np.asarray(t) / base)
        print(f"| {name} | {compile_s[name]:.2f} | {np.median(t):.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
