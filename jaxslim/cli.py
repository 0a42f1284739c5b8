"""The ``jaxslim`` command.

``jaxslim demo`` trains the MNIST-1D CNN, compresses it with each part of jaxslim and prints one
report: test accuracy, size and time per method.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

__all__ = ["main", "demo"]


def demo(steps: int = 3000, seed: int = 0) -> str:
    """Runs the demo and returns the report (Markdown)."""
    import jax
    import optax

    from jaxslim import report
    from jaxslim.demo import data as D
    from jaxslim.demo import distill as distill_demo
    from jaxslim.demo import prune as prune_demo
    from jaxslim.demo import quant as quant_demo
    from jaxslim.demo import splice as splice_demo

    t0 = time.perf_counter()
    data = D.load_mnist1d(seed=seed)
    t_data = time.perf_counter() - t0

    dense = D.make_model("cnn", seed=seed)
    t0 = time.perf_counter()
    D.train(dense, optax.adam(3e-3), data, steps=steps, seed=seed, desc="dense")
    n = D.count_params(dense)
    rows = [
        {
            "method": "dense CNN (baseline)",
            "accuracy": D.accuracy(dense, data[2], data[3]),
            "size": f"{n:,} params, {4 * n / 1024:.1f} KiB f32",
            "seconds": time.perf_counter() - t0,
            "note": f"{steps} Adam steps",
        }
    ]
    pruned_rows, layers = prune_demo.run(data, dense, steps=steps, seed=seed)
    rows += pruned_rows
    rows += quant_demo.run(data, dense)
    rows += splice_demo.run(data, dense, seed=seed)
    rows += distill_demo.run(data, dense)

    lines = [
        "# jaxslim demo: MNIST-1D (4000 train / 1000 test, generated locally)",
        "",
        f"jax {jax.__version__} on {jax.default_backend()} ({platform.machine()}), "
        f"data generated in {t_data:.1f} s",
        "",
        report.format_table(rows, ["method", "accuracy", "size", "seconds", "note"]),
        "",
        "## Per-layer sparsity of the pruned model",
        "",
        report.format_table(layers),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxslim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train, compress and report on MNIST-1D")
    p_demo.add_argument("--steps", type=int, default=3000, help="training steps per model")
    p_demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        t0 = time.perf_counter()
        print(demo(steps=args.steps, seed=args.seed))
        print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
