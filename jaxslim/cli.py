"""The ``jaxslim`` command.

``jaxslim demo`` trains the MNIST-1D CNN, compresses it with each part of jaxslim and prints one
report: test accuracy, size and time per method (needs the ``demo`` extra:
``pip install 'jaxslim[demo]'``); ``--oneshot`` adds the one-shot pruning grid (magnitude, Wanda,
SparseGPT, SparseGPT + int4 at 50/60/70 % and 2:4, 4:8) of the dense CNN. ``jaxslim demo --lm``
is the LM workbench (bits per byte; ``--lm --oneshot`` adds the same grid on the decoder) and
``jaxslim demo --sweep`` the architecture sweep (activation x depth x seeds of an MLP trained at
once with ``jax.vmap``, against a Python loop).

``jaxslim inspect PATH`` prints the per-leaf table (shape, dtype, bits, nonzeros, sparsity, bytes)
of a parameter tree saved as an Orbax checkpoint directory or a ``.npz`` file; quantized leaves
stored with ``jaxslim.quant.storage`` show their real bits and bytes (a packed int4 kernel: 4 bits
a value). ``jaxslim compress CKPT --recipe R.toml -o OUT`` applies a data-free recipe
(``jaxslim.recipe``: magnitude / N:M pruning, RTN quantization by rules) to the tree in ``CKPT``
and writes ``OUT`` (an Orbax checkpoint directory, or ``.npz`` when ``OUT`` ends in ``.npz``) that
restores without a target: ``quant.storage.from_checkpoint(restore(OUT))``. ``jaxslim compress
--print-recipe`` prints an annotated example recipe.

Every error is one line on stderr, ``jaxslim: error: FILE: CAUSE``, and exit code 2 for bad input
(a missing, unreadable or corrupted file, a pickled ``.npz``, a wrong argument); 1 for an internal
error (set ``JAXSLIM_TRACEBACK=1`` to see its traceback). Files are never unpickled.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import platform
import sys
import time
from typing import Any

__all__ = ["main", "demo", "lm_demo", "sweep_demo", "inspect", "compress", "InputError"]

DEMO_EXTRA = "pip install 'jaxslim[demo]'"
ORBAX_EXTRA = "pip install 'jaxslim[orbax]'"


class InputError(ValueError):
    """Bad input to a command: ``main`` prints ``jaxslim: error: FILE: CAUSE`` and exits 2."""

    def __init__(self, file: str | None, cause: str):
        self.file, self.cause = file, cause
        super().__init__(f"{file}: {cause}" if file is not None else cause)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors become one ``InputError`` line, not a usage dump."""

    def error(self, message: str):  # type: ignore[override]
        raise InputError(None, f"{message} (see '{self.prog} --help')")


def _demo_needs() -> None:
    """Raises ``InputError`` naming the extra when a package only the demo needs is missing."""
    for name in ("mnist1d", "tqdm"):
        # Found without importing it (mnist1d pulls in matplotlib and scipy); ``None`` in
        # ``sys.modules`` is how Python marks a module that must not import.
        try:
            if name in sys.modules:
                missing = sys.modules[name] is None
            else:
                missing = importlib.util.find_spec(name) is None
        except (ImportError, ValueError):
            missing = True
        if missing:
            raise InputError(
                None, f"the demo needs the package {name!r}, which is not installed: {DEMO_EXTRA}"
            )


def demo(steps: int = 3000, seed: int = 0, *, oneshot: bool = False) -> str:
    """Runs the demo and returns the report (Markdown). Needs the ``demo`` extra.

    With ``oneshot``, a last section prunes the dense CNN once with ``prune.oneshot``: magnitude,
    Wanda, SparseGPT and SparseGPT + int4 at 50 / 60 / 70 % and 2:4, 4:8, test accuracy
    (``jaxslim.demo.lm_oneshot.run_cnn``).
    """
    _demo_needs()
    import jax

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


def sweep_demo(
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
    _demo_needs()
    import jax

    from jaxslim.demo import data as D
    from jaxslim.demo import sweep

    t0 = time.perf_counter()
    data = D.load_mnist1d(seed=seed)
    t_data = time.perf_counter() - t0
    result = sweep.run(
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
            sweep.report(result),
        ]
    )


def lm_demo(
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
    import jax

    from jaxslim import report
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


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, without tensorstore's spec dump, shortened."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" [tensorstore_spec=")[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    name = type(e).__name__
    return f"{name}: {text}" if text else name


def _is_orbax_dir(p: pathlib.Path) -> bool:
    # The tree's metadata; a CheckpointManager step directory has only _CHECKPOINT_METADATA and
    # keeps each item (`default/`, `params/`, ...) in a subdirectory.
    return (p / "_METADATA").is_file()


def _not_a_checkpoint(p: pathlib.Path, path: str) -> InputError:
    inner = sorted(
        str(q.relative_to(p))
        for q in [*p.glob("*"), *p.glob("*/*")]
        if q.is_dir() and _is_orbax_dir(q)
    )
    if inner:
        shown = ", ".join(inner[:5]) + (", ..." if len(inner) > 5 else "")
        return InputError(
            path,
            f"not an Orbax checkpoint (no _METADATA file), but it holds checkpoints: {shown}; "
            "pass one of them",
        )
    return InputError(path, "not an Orbax checkpoint directory (no _METADATA file) nor a .npz")


def _ignore_closed_loop() -> None:
    """Drops Orbax's late ``RuntimeError('Event loop is closed')`` after a failed restore.

    When a restore fails, tensorstore may still finish a read and call back into Orbax's asyncio
    loop after it closed (before or after the error reaches us); Python reports that through
    ``sys.unraisablehook`` as a traceback on stderr. Only that error is dropped; every other one
    goes to the previous hook.
    """
    prev = sys.unraisablehook
    if getattr(prev, "_jaxslim_filter", False):
        return

    def hook(u: Any) -> None:
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        prev(u)

    hook._jaxslim_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _load_orbax(p: pathlib.Path, path: str) -> Any:
    if not _is_orbax_dir(p):
        raise _not_a_checkpoint(p, path)
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise InputError(
            path, f"reading an Orbax checkpoint needs orbax-checkpoint: {ORBAX_EXTRA}"
        ) from None
    _ignore_closed_loop()
    try:
        with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore(p.resolve())
    except Exception as e:  # Orbax and tensorstore raise many types for damaged data
        cause = f"corrupted or unreadable Orbax checkpoint: {_one_line(e)}"
        raise InputError(path, cause) from None


def _load(path: str) -> Any:
    """The tree stored at ``path`` (Orbax directory or ``.npz``), QArrays restored.

    Raises ``InputError`` (a ``ValueError``) naming the file and the cause.
    """
    from jaxslim.quant import storage

    p = pathlib.Path(path)
    if not p.exists():
        raise InputError(path, "no such file or directory")
    if p.is_dir():
        tree = _load_orbax(p, path)
    elif p.suffix == ".npz":
        try:
            return storage.load_npz(p)
        except (ValueError, TypeError) as e:
            msg = str(e).removeprefix("quant.storage.load_npz: ").removeprefix(f"{p}: ")
            raise InputError(path, msg) from None
    else:
        kind = f"a {p.suffix} file" if p.suffix else "a file without a suffix"
        raise InputError(path, f"expected an Orbax checkpoint directory or a .npz file, got {kind}")
    try:
        return storage.from_checkpoint(tree)
    except (ValueError, TypeError) as e:
        raise InputError(path, str(e)) from None


def inspect(path: str) -> str:
    """Per-leaf table of the tree stored at ``path`` (Orbax checkpoint directory or ``.npz``).

    Ends with the totals: leaves, entries, nonzeros and bytes. Raises ``InputError`` naming the
    file and the cause when ``path`` cannot be read.
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
            f"({(size - nonzeros) / size if size else 0.0:.1%} zeros), {nbytes:,} bytes",
        ]
    )


PROGRESS_MIN_LEAVES = 64
"""Trees with at least this many leaves get a progress bar (when tqdm is installed)."""


def _progress(n: int) -> Any:
    if n < PROGRESS_MIN_LEAVES or importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm import tqdm

    return lambda it: tqdm(it, total=n, desc="quantize", unit="leaf", file=sys.stderr, leave=False)


def _save(tree: Any, out: str) -> None:
    import jax

    from jaxslim import quant
    from jaxslim.quant import storage

    stored = storage.to_checkpoint(tree)
    try:  # never write what cannot be restored: decode the stored form and trace dequantize
        jax.eval_shape(quant.dequantize_params, storage.from_checkpoint(stored))
    except (TypeError, ValueError) as e:
        cause = f"this jaxslim cannot store the result so that it restores: {e}"
        raise InputError(out, cause) from None
    p = pathlib.Path(out)
    if p.exists():
        raise InputError(out, "already exists; pass --force to replace it")
    if not p.parent.exists():
        raise InputError(out, f"the directory {str(p.parent)!r} does not exist")
    if p.suffix == ".npz":
        storage.save_npz(p, tree)
        return
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise InputError(
            out,
            f"writing an Orbax checkpoint needs orbax-checkpoint: {ORBAX_EXTRA} (or write a .npz)",
        ) from None
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(p.resolve(), stored)


def compress(path: str, recipe_path: str, out: str, *, force: bool = False) -> str:
    """Applies the recipe at ``recipe_path`` to the tree at ``path``, writes ``out``; returns the
    per-leaf report (Markdown) with the totals before and after.

    Raises ``InputError`` naming the file and, for a bad recipe, the key.
    """
    import shutil

    import jax

    from jaxslim import recipe as R
    from jaxslim import report

    try:
        rec = R.load(recipe_path)
    except FileNotFoundError:
        raise InputError(recipe_path, "no such file") from None
    except OSError as e:
        raise InputError(recipe_path, f"cannot read the recipe ({_one_line(e)})") from None
    except R.RecipeError as e:
        raise InputError(recipe_path, str(e)) from None
    tree = _load(path)
    from jaxslim.quant import is_qarray

    done = [q for q in jax.tree_util.tree_leaves(tree, is_leaf=is_qarray) if is_qarray(q)]
    if done:
        raise InputError(path, f"holds {len(done)} quantized leaves; compress a float checkpoint")
    n = len(jax.tree_util.tree_leaves(tree))
    try:
        new, rows = R.apply(rec, tree, progress=_progress(n))
    except R.RecipeError as e:
        raise InputError(recipe_path, str(e)) from None
    if force and pathlib.Path(out).exists():
        target = pathlib.Path(out)
        if target.resolve() == pathlib.Path(path).resolve():
            raise InputError(out, "is the input checkpoint; write to another path")
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    _save(new, out)
    tot = {k: sum(r[k] for r in rows) for k in rows[0] if k.startswith(("bytes", "nonzeros"))}
    ratio = tot["bytes_before"] / tot["bytes_after"] if tot["bytes_after"] else float("inf")
    return "\n".join(
        [
            report.format_table(rows),
            "",
            f"{len(rows)} leaves: {tot['bytes_before']:,} -> {tot['bytes_after']:,} bytes "
            f"({ratio:.2f}x smaller), {tot['nonzeros_before']:,} -> {tot['nonzeros_after']:,} "
            f"nonzeros; written to {out}",
        ]
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxslim", description="Model compression for JAX: prune, quantize, splice, distill."
    )
    try:
        from importlib.metadata import version

        parser.add_argument("--version", action="version", version=version("jaxslim"))
    except Exception:  # pragma: no cover - running from a source tree without metadata
        pass
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,inspect,compress}")
    p_demo = sub.add_parser(
        "demo", help=f"train, compress and report on MNIST-1D (needs {DEMO_EXTRA})"
    )
    p_demo.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps of the dense model (default 3000; 600 with --lm; per variant with "
        "--sweep, default 200)",
    )
    p_demo.add_argument("--seed", type=int, default=0)
    which = p_demo.add_mutually_exclusive_group()
    which.add_argument(
        "--lm",
        action="store_true",
        help="the LM workbench instead: a byte-level decoder, bits per byte (no extra needed)",
    )
    which.add_argument(
        "--sweep",
        action="store_true",
        help="the architecture sweep instead: activation x depth x seeds of an MLP, vmapped "
        "(default 200 steps per variant)",
    )
    p_demo.add_argument(
        "--oneshot",
        action="store_true",
        help="add the one-shot pruning grid (magnitude / Wanda / SparseGPT / SparseGPT+int4 at "
        "50/60/70%% and 2:4, 4:8) on the dense model",
    )
    p_inspect = sub.add_parser("inspect", help="per-leaf table of a saved parameter tree")
    p_inspect.add_argument("path", help="an Orbax checkpoint directory or a .npz file")
    p_c = sub.add_parser(
        "compress", help="prune and quantize a saved parameter tree by a TOML recipe (no data)"
    )
    p_c.add_argument("path", nargs="?", help="an Orbax checkpoint directory or a .npz file")
    p_c.add_argument("--recipe", help="the TOML recipe (see --print-recipe)")
    p_c.add_argument("-o", "--output", help="output: Orbax directory, or a file ending in .npz")
    p_c.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p_c.add_argument(
        "--print-recipe", action="store_true", help="print an annotated example recipe and exit"
    )
    return parser


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "inspect":
        print(inspect(args.path))
    elif args.command == "compress":
        if args.print_recipe:
            from jaxslim.recipe import EXAMPLE

            print(EXAMPLE, end="")
            return 0
        for name, flag in (("path", "CKPT"), ("recipe", "--recipe"), ("output", "-o/--output")):
            if getattr(args, name) is None:
                raise InputError(None, f"compress needs {flag} (see 'jaxslim compress --help')")
        print(compress(args.path, args.recipe, args.output, force=args.force))
    elif args.command == "demo":
        if args.steps is not None and args.steps < 1:
            raise InputError(None, f"--steps must be a positive int, got {args.steps}")
        if args.sweep and args.oneshot:
            raise InputError(None, "--oneshot prunes a trained model: pass it with --lm or alone")
        t0 = time.perf_counter()
        if args.lm:
            steps = args.steps or 600
            text = lm_demo(
                steps=steps, recover=max(1, steps // 4), seed=args.seed, oneshot=args.oneshot
            )
        elif args.sweep:
            text = sweep_demo(steps=args.steps or 200, seed=args.seed)
        else:
            text = demo(steps=args.steps or 3000, seed=args.seed, oneshot=args.oneshot)
        print(text)
        print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    0 on success, 2 on bad input (one line ``jaxslim: error: FILE: CAUSE`` on stderr), 1 on an
    internal error (one line; ``JAXSLIM_TRACEBACK=1`` re-raises it), 130 on Ctrl-C.
    """
    try:
        return _run(argv)
    except InputError as e:
        print(f"jaxslim: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxslim: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("JAXSLIM_TRACEBACK"):
            raise
        print(
            f"jaxslim: internal error: {_one_line(e)} (set JAXSLIM_TRACEBACK=1 for the traceback "
            "and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
