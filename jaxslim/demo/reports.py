"""The reports ``jaxslim demo`` prints (Markdown), built from the demo modules.

``mnist1d`` (``jaxslim demo``): the MNIST-1D CNN trained, then compressed by each part of
jaxslim; ``sweep`` (``jaxslim demo --sweep``): the architecture sweep; ``lm`` (``jaxslim demo
--lm``): the LM workbench. The command line dispatches here; the library never imports the demo.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import jax

from jaxslim import report


def mnist1d(steps: int = 3000, seed: int = 0, *, oneshot: bool = False) -> str:
    """Runs the demo and returns the report (Markdown). Needs the ``demo`` extra.

    With ``oneshot``, a last section prunes the dense CNN once with ``prune.oneshot``: magnitude,
    Wanda, SparseGPT and SparseGPT + int4 at 50 / 60 / 70 % and 2:4, 4:8, test accuracy
    (``jaxslim.demo.lm_oneshot.run_cnn``).
    """
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
    tx = D.baseline_optimizer(steps)
    D.train(dense, tx, data, steps=steps, batch_size=D.BATCH_SIZE, seed=seed, desc="dense")
    n = D.count_params(dense)
    rows = [
        {
            "method": "dense CNN (baseline)",
            "accuracy": D.accuracy(dense, data[2], data[3]),
            "size": f"{n:,} params, {4 * n / 1024:.1f} KiB f32",
            "seconds": time.perf_counter() - t0,
            "note": f"{steps} Adam steps, lr 1e-2 cosine, batch {D.BATCH_SIZE}",
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
        report.format_table(rows, columns=["method", "accuracy", "size", "seconds", "note"]),
        "",
        "## Per-layer sparsity of the pruned model",
        "",
        report.format_table(layers),
    ]
    if oneshot:
        from jaxslim.demo import lm_oneshot

        t0 = time.perf_counter()
        grid = lm_oneshot.run_cnn(dense, data)
        lines += [
            "",
            "## One-shot pruning of the dense CNN (prune.oneshot, no fine-tuning)",
            "",
            lm_oneshot.table(grid, "accuracy"),
            "",
            f"{len(grid) - 1} one-shot prunings in {time.perf_counter() - t0:.0f} s; 512 "
            "calibration inputs; `conv1` (5 inputs) stays dense under N:M.",
        ]
    return "\n".join(lines)


def sweep(
    steps: int = 200,
    seed: int = 0,
    *,
    depths: tuple[int, ...] = (1, 2, 3, 4),
    seeds: int = 2,
    width: int = 32,
    loop_variants: int = 3,
) -> str:
    """The architecture sweep (``jaxslim demo --sweep``) as Markdown. Needs the ``demo`` extra.

    Every activation of ``jaxslim.demo.sweep.ACTIVATIONS`` x ``depths`` x ``seeds`` seeds of a
    ``width``-unit MLP on MNIST-1D, vmapped over (activation, seed) with one compiled step per
    depth; the accuracy-vs-parameters table, the wall-clock saving over a Python loop (timed on
    ``loop_variants`` variants) and ``splice.deepen`` / ``drop_layer`` moves between depths.
    """
    from jaxslim.demo import data as D
    from jaxslim.demo import sweep as sweep_mod

    t0 = time.perf_counter()
    data = D.load_mnist1d(seed=seed)
    t_data = time.perf_counter() - t0
    result = sweep_mod.run(
        data,
        depths=depths,
        seeds=tuple(range(seed, seed + seeds)),
        steps=steps,
        width=width,
        loop_variants=loop_variants,
    )
    return "\n".join(
        [
            "# jaxslim demo --sweep: activation x depth x seeds on MNIST-1D, trained at once",
            "",
            f"jax {jax.__version__} on {jax.default_backend()} ({platform.machine()}), "
            f"data generated in {t_data:.1f} s",
            "",
            sweep_mod.report(result),
        ]
    )


def lm(
    steps: int = 600,
    recover: int = 150,
    seed: int = 0,
    *,
    oneshot: bool = False,
    cfg: Any = None,
    oneshot_kw: dict[str, Any] | None = None,
) -> str:
    """Runs the LM workbench (``jaxslim demo --lm``) and returns its report (Markdown).

    A byte-level Llama-style decoder trained on CPython's ``pydoc_data.topics`` (offline), then
    width- and depth-pruned with and without distillation, trained from scratch at the pruned
    size, and quantized: validation bits per byte per row (``jaxslim.demo.lm_report``). With
    ``oneshot`` (``--lm --oneshot``) a second table prunes the same dense model once with
    ``prune.oneshot`` (``jaxslim.demo.lm_oneshot``; ``oneshot_kw`` narrows its grid). ``cfg``
    (an ``lm.LMConfig``) replaces the default decoder size.
    """
    from jaxslim.demo import lm_report

    rows, info = lm_report.run(
        cfg=cfg,
        steps=steps,
        recover=recover,
        seed=seed,
        oneshot=(oneshot_kw or {}) if oneshot else None,
    )
    lines = [
        "# jaxslim demo --lm: byte-level decoder on pydoc_data.topics",
        "",
        f"jax {jax.__version__} on {jax.default_backend()} ({platform.machine()}); corpus "
        f"{info['bytes']:,} bytes, sha256 {info['sha256'][:16]}..., Python {info['python']}",
        "",
        report.format_table(rows, columns=["method", "bits/byte", "params", "seconds", "note"]),
    ]
    if oneshot:
        from jaxslim.demo import lm_oneshot

        grid = info["oneshot"]
        lines += [
            "",
            "## One-shot pruning of the dense model (prune.oneshot, no fine-tuning)",
            "",
            lm_oneshot.table(grid, "bits/byte"),
            "",
            f"{len(grid) - 1} one-shot prunings of the attention and MLP kernels (not the "
            f"embedding) in {info['oneshot_seconds']:.0f} s; "
            "cells: validation bits per byte.",
        ]
    return "\n".join(lines)
