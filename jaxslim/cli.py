"""The ``jaxslim`` command.

``jaxslim demo`` trains the MNIST-1D CNN, compresses it with each part of jaxslim and prints one
report: test accuracy, size and time per method (needs the ``demo`` extra:
``pip install 'jaxslim[demo]'``); ``--oneshot`` adds the one-shot pruning grid (magnitude, Wanda,
SparseGPT, SparseGPT + int4 at 50/60/70 % and 2:4, 4:8) of the dense CNN. ``jaxslim demo --lm``
is the LM workbench (bits per byte; ``--lm --oneshot`` adds the same grid on the decoder) and
``jaxslim demo --sweep`` the architecture sweep (activation x depth x seeds of an MLP trained at
once with ``jax.vmap``, against a Python loop).

``jaxslim eval MODEL --text FILE`` prints the perplexity, bits per byte and tokens per second of
a Llama-family model (a Hugging Face safetensors directory, plain or compressed-tensors, a GGUF
file, or what ``jaxslim compress`` wrote; quantized weights run from their codes) on a text file,
and ``jaxslim generate MODEL --prompt TEXT`` its continuation (needs the ``models`` extra:
``pip install 'jaxslim[models]'``).

``jaxslim inspect PATH`` prints the per-leaf table (shape, dtype, bits, nonzeros, sparsity, bytes)
of a parameter tree saved as an Orbax checkpoint directory or a ``.npz`` file; quantized leaves
stored with ``jaxslim.checkpoints`` show their real bits and bytes (a packed int4 kernel: 4 bits
a value), and so do QArrays saved with plain Orbax where their layout tells the width
(``checkpoints.plain_qarray_bits``). Files written by jaxslim carry a CRC-32 per leaf, checked on
every read. ``jaxslim compress CKPT --recipe R.toml -o OUT`` applies a data-free recipe
(``jaxslim.recipe``: magnitude / N:M pruning, RTN quantization by rules) to the tree in ``CKPT``
and writes ``OUT`` (an Orbax checkpoint directory, or ``.npz`` when ``OUT`` ends in ``.npz``) that
restores without a target: ``checkpoints.load(OUT)``. ``jaxslim compress --print-recipe`` prints
an annotated example recipe.

Every error is one line on stderr, ``jaxslim: error: FILE: CAUSE``, and exit code 2 for bad input
(a missing, unreadable or corrupted file, a pickled ``.npz``, a wrong argument); 1 for an internal
error (set ``JAXSLIM_TRACEBACK=1`` to see its traceback). Files are never unpickled.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time
from typing import Any

__all__ = ["main", "inspect", "compress", "compress_model", "evaluate", "generate", "InputError"]

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
        import orbax.checkpoint  # noqa: F401
    except ImportError:
        raise InputError(
            path, f"reading an Orbax checkpoint needs orbax-checkpoint: {ORBAX_EXTRA}"
        ) from None
    from jaxslim import checkpoints

    _ignore_closed_loop()
    try:
        return checkpoints.load_orbax(p)
    except ValueError as e:
        cause = str(e).removeprefix("checkpoints.load_orbax: ").removeprefix(f"{p}: ")
        raise InputError(path, cause) from None


def _load(path: str) -> Any:
    """The tree stored at ``path`` (Orbax directory or ``.npz``), QArrays restored, every leaf
    checked against the CRC-32 written with it (files written by jaxslim).

    Raises ``InputError`` (a ``ValueError``) naming the file and the cause.
    """
    from jaxslim import checkpoints

    p = pathlib.Path(path)
    if not p.exists():
        raise InputError(path, "no such file or directory")
    if p.is_dir():
        return _load_orbax(p, path)
    if p.suffix == ".npz":
        try:
            return checkpoints.load_npz(p)
        except (ValueError, TypeError) as e:
            msg = str(e).removeprefix("checkpoints.load_npz: ").removeprefix(f"{p}: ")
            raise InputError(path, msg) from None
    kind = f"a {p.suffix} file" if p.suffix else "a file without a suffix"
    raise InputError(path, f"expected an Orbax checkpoint directory or a .npz file, got {kind}")


def inspect(path: str) -> str:
    """Per-leaf table of the tree stored at ``path`` (Orbax checkpoint directory or ``.npz``).

    Ends with the totals: leaves, entries, nonzeros and bytes. A QArray saved with plain Orbax
    (no spec in the checkpoint) is one row with the storage bits its layout tells, ``?`` where it
    does not tell, and no nonzero count. Raises ``InputError`` naming the file and the cause when
    ``path`` cannot be read.
    """
    from jaxslim import report

    rows = _rows(_load(path))
    counted = [r for r in rows if r["nonzeros"] != "?"]
    size = sum(r["size"] for r in counted)
    nonzeros = sum(r["nonzeros"] for r in counted)
    nbytes = sum(r["bytes"] for r in rows)
    plain = len(rows) - len(counted)
    note = (
        f"; {plain} QArrays saved without their spec (not counted in entries and nonzeros: "
        "rebuild them with jaxslim.checkpoints.restore_qarrays(tree, like=...))"
        if plain
        else ""
    )
    return "\n".join(
        [
            report.format_table(rows),
            "",
            f"{len(rows)} leaves, {size:,} entries, {nonzeros:,} nonzero "
            f"({(size - nonzeros) / size if size else 0.0:.1%} zeros), {nbytes:,} bytes{note}",
        ]
    )


def _rows(tree: Any) -> list[dict[str, Any]]:
    """``report.summary`` rows, a QArray saved with plain Orbax as one row (bits from its
    layout, ``checkpoints.plain_qarray_bits``)."""
    import math

    import jax

    from jaxslim import _tree, checkpoints, quant, report

    whole = lambda x: quant.is_qarray(x) or checkpoints.is_plain_qarray(x)  # noqa: E731
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=whole):
        if not checkpoints.is_plain_qarray(leaf):
            rows += [{**r, "path": _tree.path_str(path)} for r in report.summary(leaf)]
            continue
        bits, shape = checkpoints.plain_qarray_bits(leaf)
        parts = [a for a in leaf.values() if a is not None]
        rows.append(
            {
                "path": _tree.path_str(path),
                "shape": shape or tuple(leaf["values"].shape),
                "dtype": f"{f'int{bits}' if bits else 'packed'} codes (spec not saved)",
                "bits": bits or "?",
                "size": math.prod(shape) if shape else "?",
                "nonzeros": "?",
                "sparsity": "?",
                "bytes": sum(report.nbytes(a) for a in parts),
            }
        )
    return rows


PROGRESS_MIN_LEAVES = 64
"""Trees with at least this many leaves get a progress bar (when tqdm is installed)."""


def _progress(n: int) -> Any:
    if n < PROGRESS_MIN_LEAVES or importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm import tqdm

    return lambda it: tqdm(it, total=n, desc="quantize", unit="leaf", file=sys.stderr, leave=False)


def _save(tree: Any, out: str) -> None:
    import jax

    from jaxslim import checkpoints, quant

    stored = checkpoints.to_checkpoint(tree)
    try:  # never write what cannot be restored: decode the stored form and trace dequantize
        jax.eval_shape(quant.dequantize_params, checkpoints.from_checkpoint(stored))
    except (TypeError, ValueError) as e:
        cause = f"this jaxslim cannot store the result so that it restores: {e}"
        raise InputError(out, cause) from None
    p = pathlib.Path(out)
    if p.exists():
        raise InputError(out, "already exists; pass --force to replace it")
    if not p.parent.exists():
        raise InputError(out, f"the directory {str(p.parent)!r} does not exist")
    if p.suffix == ".npz":
        checkpoints.save_npz(p, tree)
        return
    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError:
        raise InputError(
            out,
            f"writing an Orbax checkpoint needs orbax-checkpoint: {ORBAX_EXTRA} (or write a .npz)",
        ) from None
    checkpoints.save_orbax(p, tree)


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
    from jaxslim.checkpoints import is_plain_qarray
    from jaxslim.quant import is_qarray

    quantized = lambda x: is_qarray(x) or is_plain_qarray(x)  # noqa: E731
    done = [q for q in jax.tree_util.tree_leaves(tree, is_leaf=quantized) if quantized(q)]
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


def _load_model(path: str, *, dequantize: bool = True) -> tuple[Any, Any, Any]:
    """``models.load(path, dequantize=)`` with its errors as one ``InputError`` line naming the
    file."""
    if not pathlib.Path(path).exists():
        raise InputError(path, "no such file or directory (a HF model directory or a .gguf file)")
    try:
        from jaxslim import models

        return models.load(path, dequantize=dequantize)
    except ImportError as e:
        raise InputError(path, _one_line(e)) from None
    except (ValueError, KeyError, OSError) as e:
        raise InputError(path, _one_line(e)) from None


def evaluate(
    model: str, text_file: str, *, seq: int = 512, stride: int | None = None, batch: int = 1
) -> str:
    """``jaxslim eval``: perplexity, bits per byte and tokens per second of a model on a text.

    ``model`` is a HF safetensors directory (plain or compressed-tensors), a GGUF file or a
    directory ``jaxslim compress`` wrote (``models.load``); quantized weights stay quantized
    (``dequantize=False``: GGUF Q8_0/Q4_0 codes and scales as stored) and run through
    ``quant.quantized``. The text is read as UTF-8 and tokenized with the model's own tokenizer;
    windows of ``seq`` tokens every ``stride`` (``models.perplexity``).
    """
    from jaxslim import models

    try:
        text = pathlib.Path(text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(text_file, f"cannot read it as UTF-8 text: {_one_line(e)}") from None
    params, config, tok = _load_model(model, dequantize=False)
    if tok is None:
        raise InputError(model, "the checkpoint has no tokenizer (tokenizer.json or GGUF vocab)")
    ids = tok.encode(text)
    if len(ids) < 2:
        raise InputError(text_file, f"the text has {len(ids)} token(s); at least 2 are needed")
    for name, v in (("--seq", seq), ("--batch", batch), ("--stride", stride or seq)):
        if v < 1:
            raise InputError(None, f"{name} must be a positive int, got {v}")
    if stride is not None and stride > seq:
        raise InputError(None, f"--stride ({stride}) must be <= --seq ({seq})")
    n_bytes = len(text.encode("utf-8"))
    r = models.perplexity(params, config, ids, seq=seq, stride=stride, batch=batch, n_bytes=n_bytes)
    return (
        f"{model}: perplexity {r.perplexity:.3f}, {r.bits_per_byte:.4f} bits/byte over "
        f"{r.tokens:,} tokens ({n_bytes:,} bytes of {text_file}), seq {seq}, "
        f"stride {stride or seq}; "
        f"{r.tokens_per_second:,.0f} tokens/s ({r.seconds:.1f} s)"
    )


def generate(
    model: str,
    prompt: str,
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """``jaxslim generate``: the model's continuation of ``prompt`` (greedy by default; top-p
    sampling with ``temperature > 0``), decoded with its tokenizer, using the KV cache."""
    import jax

    from jaxslim import models

    if max_tokens < 1:
        raise InputError(None, f"--max-tokens must be a positive int, got {max_tokens}")
    if not temperature >= 0 or not 0 < top_p <= 1:
        raise InputError(
            None, f"--temperature must be >= 0 and --top-p in (0, 1], got {temperature}, {top_p}"
        )
    params, config, tok = _load_model(model)
    if tok is None:
        raise InputError(model, "the checkpoint has no tokenizer (tokenizer.json or GGUF vocab)")
    ids = tok.encode(prompt)
    if not ids:
        raise InputError(None, "--prompt is empty after tokenization")
    new = models.generate(
        params,
        config,
        ids,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        key=jax.random.key(seed) if temperature > 0 else None,
    )
    return tok.decode([int(i) for i in new])


def print_recipe(name: str = "", path: str | None = None) -> str:
    """The text ``jaxslim compress --print-recipe [NAME] [CKPT]`` prints: the annotated example
    recipe (no ``name``) or the ready recipe ``name``, then, for a model checkpoint ``path``, the
    leaf paths its recipes' ``where`` regexes are matched against (``layers/<i>/q``, ...)."""
    from jaxslim import recipe as R

    if name and name not in R.NAMED and path is None and _is_model(name):
        name, path = "", name  # `--print-recipe CKPT`: argparse gave the checkpoint to NAME
    if name and name not in R.NAMED:
        raise InputError(None, f"no ready recipe {name!r}; the names are {', '.join(R.NAMED)}")
    text = R.NAMED[name] if name else R.EXAMPLE
    if not name:
        text += f"\n# Ready recipes (--recipe NAME, --print-recipe NAME): {', '.join(R.NAMED)}\n"
    if path is not None:
        text += _model_paths(path)
    return text


def _model_paths(path: str) -> str:
    if not _is_model(path):
        raise InputError(path, "is not a model (a HF directory with config.json, or a .gguf)")
    from jaxslim import checkpoints, models
    from jaxslim.models._load import layer_leaves

    try:
        with checkpoints.open(path) as src:
            config = models.Config.from_hf(src.config)
            names = set(src.names())
    except (ValueError, OSError) as e:
        raise InputError(path, str(e)) from None
    layers = sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")})
    leaves = layer_leaves(config)
    top = ["embed", "norm"] + (["lm_head"] if "lm_head.weight" in names else [])
    lines = [
        f"\n# Leaf paths of {path} ({len(layers)} layers; `where` is searched in these):",
        f"#   {', '.join(top)}",
        f"#   layers/<i>/{{{','.join(leaves)}}} for i in 0..{len(layers) - 1}",
        "#   kernels (2-D, quantized and pruned by the ready recipes): "
        + ", ".join(f"layers/0/{k}" for k in ("q", "k", "v", "o", "gate", "up", "down")),
    ]
    return "\n".join(lines) + "\n"


def _is_model(path: str) -> bool:
    """A Hugging Face model directory (``config.json``) or a GGUF file."""
    p = pathlib.Path(path)
    return (p.is_dir() and (p / "config.json").exists()) or p.suffix == ".gguf"


def _recipe(arg: str) -> Any:
    from jaxslim import recipe as R

    try:
        return R.named(arg) if arg in R.NAMED else R.load(arg)
    except FileNotFoundError:
        raise InputError(arg, f"no such file (ready recipes: {', '.join(R.NAMED)})") from None
    except OSError as e:
        raise InputError(arg, f"cannot read the recipe ({_one_line(e)})") from None
    except R.RecipeError as e:
        raise InputError(arg, str(e)) from None


def compress_model(
    model: str,
    recipe_arg: str,
    out: str,
    *,
    calib: str | None,
    samples: int = 32,
    seq: int = 512,
    fmt: str = "npz",
    force: bool = False,
) -> str:
    """``jaxslim compress MODEL``: a Llama-family checkpoint (HF directory or GGUF) compressed
    block by block (``models.compress_streamed``: one layer in memory, resumable) on ``samples``
    sequences of ``seq`` tokens of the text ``calib``, written to ``out`` (per-layer ``.npz`` and
    a manifest; ``fmt`` ``"gguf"``, ``"hf"`` or ``"compressed-tensors"`` also exports there).
    With ``fmt="gguf"`` and ``out`` ending in ``.gguf``, ``out`` is the GGUF file and the layers
    go to ``out + ".layers"``; a GGUF source's tokenizer is copied as it is."""
    import shutil

    import numpy as np

    from jaxslim import checkpoints, models

    rec = _recipe(recipe_arg)
    if calib is None:
        raise InputError(
            None, f"compress {model} needs --calib TEXT: a model is compressed on text"
        )
    for name, v in (("--samples", samples), ("--seq", seq)):
        if v < 1:
            raise InputError(None, f"{name} must be a positive int, got {v}")
    if len(rec.prune) > 1:
        raise InputError(recipe_arg, "a model recipe takes one [[prune]] step")
    step = rec.prune[0] if rec.prune else None
    if step is not None and step.scope != "layer":
        raise InputError(recipe_arg, "prune[0].scope: a model is pruned layer by layer ('layer')")
    rules, methods = None, set()
    if rec.quant is not None:
        rules = [(r.where, r.spec) for r in rec.quant]
        if rec.default is not None:
            rules.append((None, rec.default))
        methods = {r.method or rec.method for r in rec.quant if r.spec is not None}
        if rec.default is not None:
            methods.add(rec.method)
        if len(methods) > 1:
            raise InputError(recipe_arg, "a model recipe uses one quant method for every rule")
    try:
        text = pathlib.Path(calib).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(calib, f"cannot read it as UTF-8 text: {_one_line(e)}") from None
    try:
        with checkpoints.open(model) as src:
            tok_json = src.tokenizer_json()
    except (ValueError, KeyError, OSError, ImportError) as e:
        raise InputError(model, _one_line(e)) from None
    if tok_json is None:
        raise InputError(model, "the checkpoint has no tokenizer (tokenizer.json or GGUF vocab)")
    ids = models.Tokenizer.from_str(tok_json).encode(text)
    if len(ids) < samples * seq:
        raise InputError(
            calib,
            f"has {len(ids):,} tokens; --samples {samples} x --seq {seq} needs {samples * seq:,} "
            "(give more text or lower --samples / --seq)",
        )
    gguf_file = fmt == "gguf" and out.endswith(".gguf")
    work = out + ".layers" if gguf_file else out
    for target in {pathlib.Path(out), pathlib.Path(work)}:
        if force and target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    calib_ids = np.asarray(ids[: samples * seq], np.int32).reshape(samples, seq)
    try:
        res = models.compress_streamed(
            model,
            work,
            calib_ids,
            sparsity=None if step is None else step.sparsity,
            prune_method="sparsegpt" if step is None else step.method,
            structure=_structure_of(step),
            quant_rules=rules,
            quant_method=methods.pop() if methods else "rtn",
        )
    except ValueError as e:
        raise InputError(out, _one_line(e)) from None
    lines = [f"{len(res.names)} layers ({len(res.resumed)} resumed) written to {work}"]
    for name in res.names:
        for rep in res.reports.get(name, ()) or ():
            if rep is not None:
                lines += [f"## {name}", "", rep.table(), ""]
    if fmt != "npz":
        params, config, tok = models.load_streamed(work)
        dest = out if gguf_file else None
        if fmt == "gguf" and pathlib.Path(model).suffix == ".gguf":
            with checkpoints.open(model) as src:  # its tokenizer and stored types, kept
                _export(fmt, work, _as_stored(src, params), config, tok_json, dest, src)
        else:
            _export(fmt, work, params, config, tok_json, dest)
        lines.append(f"exported as {fmt} in {out}")
    lines.append(f"peak RSS {res.peak_rss / 2**30:.2f} GiB")
    return "\n".join(lines)


def _as_stored(src: Any, params: dict) -> dict:
    """``params`` with the embedding / output head that the run left float put back as the GGUF
    source ``src`` stores them, when that is Q8_0 / Q4_0 (its codes and scales, exactly the
    float values the run copied): a GGUF export then keeps their type instead of F32."""
    import numpy as np

    from jaxslim import quant

    out = dict(params)
    names = set(src.names())
    for leaf, name, kernel in (
        ("embed", "model.embed_tokens.weight", False),
        ("lm_head", "lm_head.weight", True),
    ):
        if leaf not in out or quant.is_qarray(out[leaf]) or name not in names:
            continue
        q = src.read_qarray(name, transpose=kernel)
        if q is not None and np.array_equal(quant.dequantize(q), np.asarray(out[leaf])):
            out[leaf] = q
    return out


def _export(
    fmt: str,
    out: str,
    params: Any,
    config: Any,
    tok_json: str | None,
    gguf_path: str | None = None,
    tok_gguf: Any = None,
) -> None:
    """Writes the compressed tree in ``fmt`` inside ``out`` (a GGUF file at ``gguf_path`` when
    given, its tokenizer copied from the GGUF source ``tok_gguf`` when given); a leaf the format
    cannot hold is one ``InputError`` line naming it (the streamed result in ``out`` stays)."""
    from jaxslim import checkpoints

    try:
        if fmt == "gguf":
            checkpoints.export_gguf(
                gguf_path or os.path.join(out, "model.gguf"),
                params,
                config,
                tokenizer_json=None if tok_gguf else tok_json,
                tokenizer_gguf=tok_gguf,
            )
        elif fmt == "hf":
            checkpoints.export_hf(os.path.join(out, "hf"), params, config, tokenizer_json=tok_json)
        else:
            checkpoints.export_compressed_tensors(
                os.path.join(out, "compressed-tensors"), params, config, tokenizer_json=tok_json
            )
    except ValueError as e:
        raise InputError(out, f"--format {fmt}: {_one_line(e, 600)}") from None


def _structure_of(step: Any) -> Any:
    """The prune step's structure (``Unstructured()`` when there is no step)."""
    from jaxslim.structures import Unstructured

    return Unstructured() if step is None else step.structure


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxslim", description="Model compression for JAX: prune, quantize, splice, distill."
    )
    try:
        from importlib.metadata import version

        parser.add_argument("--version", action="version", version=version("jaxslim"))
    except Exception:  # pragma: no cover - running from a source tree without metadata
        pass
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{eval,generate,compress,inspect,demo}"
    )
    p_eval = sub.add_parser(
        "eval", help="perplexity and bits per byte of a model (HF directory or GGUF) on a text"
    )
    p_eval.add_argument(
        "model",
        help="a HF model directory (config.json + safetensors), a .gguf file or a directory "
        "written by 'jaxslim compress'",
    )
    p_eval.add_argument("--text", required=True, help="a UTF-8 text file to evaluate on")
    p_eval.add_argument("--seq", type=int, default=512, help="window length in tokens")
    p_eval.add_argument("--stride", type=int, default=None, help="window step (default --seq)")
    p_eval.add_argument("--batch", type=int, default=1, help="windows per forward pass")
    p_gen = sub.add_parser("generate", help="continue a prompt with a model (greedy or top-p)")
    p_gen.add_argument("model", help="a HF model directory (config.json + safetensors) or .gguf")
    p_gen.add_argument("--prompt", required=True)
    p_gen.add_argument("--max-tokens", type=int, default=64)
    p_gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p_gen.add_argument("--top-p", type=float, default=1.0)
    p_gen.add_argument("--seed", type=int, default=0)
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
        "compress",
        help="prune and quantize a model (HF directory or GGUF, with --calib) or a saved tree",
    )
    p_c.add_argument(
        "path",
        nargs="?",
        help="a HF model directory or .gguf (block by block, with --calib), or an Orbax "
        "checkpoint directory / .npz file",
    )
    p_c.add_argument("--recipe", help="a TOML recipe or a ready recipe's name (--print-recipe)")
    p_c.add_argument("--calib", help="calibration text (UTF-8) for a model")
    p_c.add_argument("--samples", type=int, default=32, help="calibration sequences (model)")
    p_c.add_argument("--seq", type=int, default=512, help="tokens per calibration sequence")
    p_c.add_argument(
        "--format",
        choices=["npz", "gguf", "hf", "compressed-tensors"],
        default="npz",
        help="also export a compressed model in this format (model)",
    )
    p_c.add_argument(
        "-o",
        "--output",
        help="output: Orbax directory, or a file ending in .npz; for a model, a directory (or a "
        "file ending in .gguf with --format gguf)",
    )
    p_c.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p_c.add_argument(
        "--print-recipe",
        nargs="?",
        const="",
        default=None,
        metavar="NAME",
        help="print an annotated example recipe (or the ready recipe NAME) and exit; with a "
        "model CKPT, its own leaf paths follow as comments",
    )
    return parser


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "eval":
        print(evaluate(args.model, args.text, seq=args.seq, stride=args.stride, batch=args.batch))
    elif args.command == "generate":
        out = generate(
            args.model,
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
        print(out)
    elif args.command == "inspect":
        print(inspect(args.path))
    elif args.command == "compress":
        if args.print_recipe is not None:
            print(print_recipe(args.print_recipe, args.path), end="")
            return 0
        for name, flag in (("path", "CKPT"), ("recipe", "--recipe"), ("output", "-o/--output")):
            if getattr(args, name) is None:
                raise InputError(None, f"compress needs {flag} (see 'jaxslim compress --help')")
        if _is_model(args.path):
            text = compress_model(
                args.path,
                args.recipe,
                args.output,
                calib=args.calib,
                samples=args.samples,
                seq=args.seq,
                fmt=args.format,
                force=args.force,
            )
        else:
            text = compress(args.path, args.recipe, args.output, force=args.force)
        print(text)
    elif args.command == "demo":
        if args.steps is not None and args.steps < 1:
            raise InputError(None, f"--steps must be a positive int, got {args.steps}")
        if args.sweep and args.oneshot:
            raise InputError(None, "--oneshot prunes a trained model: pass it with --lm or alone")
        t0 = time.perf_counter()
        if not args.lm:
            _demo_needs()
        from jaxslim.demo import reports

        if args.lm:
            steps = args.steps or 600
            text = reports.lm(
                steps=steps, recover=max(1, steps // 4), seed=args.seed, oneshot=args.oneshot
            )
        elif args.sweep:
            text = reports.sweep(steps=args.steps or 200, seed=args.seed)
        else:
            text = reports.mnist1d(steps=args.steps or 3000, seed=args.seed, oneshot=args.oneshot)
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
