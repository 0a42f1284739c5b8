"""The ``jaxslim`` command.

``jaxslim demo`` trains the MNIST-1D CNN, compresses it with each part of jaxslim and prints one
report: test accuracy, size and time per method. ``jaxslim inspect PATH`` prints the per-leaf
table (shape, dtype, bits, nonzeros, sparsity, bytes) of a parameter tree saved as an Orbax
checkpoint directory or a ``.npz`` file.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import time

__all__ = ["main", "demo", "inspect"]


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


def _load(path: str):
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"jaxslim inspect: no such file or directory: {path!r}")
    if p.is_file() and p.suffix == ".npz":
        import numpy as np

        with np.load(p) as f:
            return {k: f[k] for k in f.files}
    if p.is_dir():
        try:
            import orbax.checkpoint as ocp
        except ImportError as e:  # pragma: no cover - orbax is installed with the dev extra
            raise ImportError("jaxslim inspect: reading a checkpoint needs orbax-checkpoint") from e
        with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore(p.resolve())
    raise ValueError(
        f"jaxslim inspect: expected an Orbax checkpoint directory or .npz, got {path!r}"
    )


def inspect(path: str) -> str:
    """Per-leaf table of the tree stored at ``path`` (Orbax checkpoint directory or ``.npz``).

    Ends with the totals: parameters, nonzeros and bytes.
    """
    from jaxslim import report

    rows = report.summary(_load(path))
    size = sum(r["size"] for r in rows)
    nonzeros = sum(r["nonzeros"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    return "\n".join(
        [
            report.format_table(rows),
            "",
            f"{len(rows)} leaves, {size:,} entries, {nonzeros:,} nonzero "
            f"({1 - nonzeros / max(size, 1):.1%} zeros), {nbytes:,} bytes",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxslim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train, compress and report on MNIST-1D")
    p_demo.add_argument("--steps", type=int, default=3000, help="training steps per model")
    p_demo.add_argument("--seed", type=int, default=0)
    p_inspect = sub.add_parser("inspect", help="per-leaf table of a saved parameter tree")
    p_inspect.add_argument("path", help="an Orbax checkpoint directory or a .npz file")
    args = parser.parse_args(argv)
    if args.command == "inspect":
        print(inspect(args.path))
    if args.command == "demo":
        t0 = time.perf_counter()
        print(demo(steps=args.steps, seed=args.seed))
        print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
