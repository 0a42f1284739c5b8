"""Global top-k selection speed (issue 12 §5): the cost of ``topk_mask(..., scope="global")``.

Each row is a jitted function of a model-like parameter tree (leaves of 4096x1024, 1024x4096,
1024x1024, 4096x256), timed side by side in one run (interleaved, best of ``--reps``), as a ratio
to one ``sum(abs(p))`` pass over the same tree:

* ``topk_mask`` — the public function at 90 % (scores, keys, threshold, masks);
* ``sample bracket`` — the selection and masks from ``float_keys(|p|)`` as ``topk_mask`` runs it:
  a strided sample's quantiles bracket the threshold, one scatter pass counts below the bracket
  and histograms inside it, exact radix select in a ``lax.cond`` if the bracket misses;
* ``exact radix`` — the previous method on the same keys (two 65536-bin histogram passes);
* ``jnp.sort`` — sort all magnitudes, read the threshold, compare (gathers everything).

Usage: ``python benchmarks/bench_select.py [--params 50e6 5e6] [--reps 5] [--no-sort]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp

from jaxslim import prune
from jaxslim.prune import _masks as masks
from jaxslim.structures import float_keys

SPARSITY = 0.9


def model_like(n_params: int) -> dict[str, jax.Array]:
    shapes, left = [], n_params
    while left > 0:
        for s in [(4096, 1024), (1024, 4096), (1024, 1024), (4096, 256)]:
            if left <= 0:
                break
            shapes.append(s)
            left -= s[0] * s[1]
    key = jax.random.key(1)
    return {f"w{i}": jax.random.normal(jax.random.fold_in(key, i), s) for i, s in enumerate(shapes)}


def functions(params) -> dict:
    n = sum(x.size for x in jax.tree.leaves(params))
    k = round(SPARSITY * n)

    def keys(p):
        return [float_keys(jnp.abs(x)) for x in jax.tree.leaves(p)]

    def sort_based(p):
        flat = jnp.concatenate([jnp.abs(x).ravel() for x in jax.tree.leaves(p)])
        t = jnp.sort(flat)[k - 1]
        return jax.tree.map(lambda x: jnp.abs(x) > t, p)

    return {
        "one sum(abs(p)) pass": lambda p: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(p)),
        "topk_mask(global)": lambda p: prune.topk_mask(
            prune.magnitude(p), SPARSITY, scope="global"
        ),
        "sample bracket (new)": lambda p: masks.lowest_k(keys(p), k),
        "exact radix (old)": lambda p: masks.lowest_k(keys(p), k, exact=True),
        "jnp.sort": sort_based,
    }


def measure(n_params: int, reps: int, *, sort: bool = True) -> tuple[int, dict[str, float]]:
    """``(n, {name: best seconds})``, the rows timed interleaved on the same tree."""
    params = model_like(n_params)
    fs = {name: jax.jit(f) for name, f in functions(params).items()}
    if not sort:
        fs.pop("jnp.sort")
    outs = {name: jax.block_until_ready(f(params)) for name, f in fs.items()}  # compile, warm
    ref = outs["exact radix (old)"]
    new = outs["sample bracket (new)"]
    assert all(bool((a == b).all()) for a, b in zip(new, ref, strict=True)), "masks differ"
    best = dict.fromkeys(fs, float("inf"))
    for i in range(reps):
        for name, f in fs.items():
            if name == "jnp.sort" and i > 0:
                continue  # one timed run: it is two orders of magnitude slower
            t0 = time.perf_counter()
            jax.block_until_ready(f(params))
            best[name] = min(best[name], time.perf_counter() - t0)
    return sum(x.size for x in jax.tree.leaves(params)), best


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores (load {load:.1f}), jax {jax.__version__} on "
        f"{jax.default_backend()}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, nargs="+", default=[50e6, 5e6])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-sort", action="store_true")
    args = ap.parse_args()
    print(f"\n{machine()}\n")
    print(f"**Global {SPARSITY:.0%} magnitude selection: time / one sum(abs(p)) pass**\n")
    results = [measure(int(n), args.reps, sort=not args.no_sort) for n in args.params]
    names = list(results[0][1])
    print("| method | " + " | ".join(f"{n / 1e6:.1f}M params" for n, _ in results) + " |")
    print("|---|" + "---|" * len(results))
    for name in names:
        cells = []
        for _, best in results:
            base = best["one sum(abs(p)) pass"]
            cells.append(f"{best[name] / base:.1f}x ({best[name] * 1e3:.0f} ms)")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
