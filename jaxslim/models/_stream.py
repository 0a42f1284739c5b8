"""Compress a Llama-family checkpoint block by block, never whole in memory: ``compress_streamed``
and ``load_streamed``.

``compress_streamed(source, out, calib_ids, ...)`` embeds the calibration tokens, then for each
decoder layer reads only that layer's tensors from the checkpoint (``checkpoints.open``, one
tensor at a time), prunes and/or quantizes it with ``prune.oneshot`` / ``quant.oneshot`` on
``models.block`` (kernels calibrated sequentially inside the layer, on the outputs of the
already-compressed layers before it), writes it to ``out/layers.<i>.npz``
(``checkpoints.save_npz``: QArrays kept) and frees it. The driver is ``calibrate.stream``:
resumable, with a manifest in ``out``. The embedding, final norm and ``lm_head`` are copied as
they are (``out/rest.npz``), with ``config.json`` and ``tokenizer.json``.

The result equals ``prune.oneshot`` / ``quant.oneshot(..., sequential=True)`` on the whole model
with ``where`` / rules restricted to the layers' kernels (``tests/models/test_stream.py``).
``load_streamed(out)`` assembles ``(params, config, tokenizer)``; run quantized params with
``quant.quantized(models.forward)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import _tree, calibrate, checkpoints, prune, quant
from jaxslim._checks import public
from jaxslim.models import _load
from jaxslim.models._config import Config
from jaxslim.models._llama import block, embed
from jaxslim.models._tokenizer import Tokenizer
from jaxslim.structures import Structure, Unstructured

_FN = "models.compress_streamed"
_REST = "rest.npz"


def block_fn(config: Config):
    """``fn(layer_params, hidden) -> hidden``: one decoder layer at positions ``0 .. T - 1``."""

    def fn(p: Any, h: jax.Array) -> jax.Array:
        return block(p, h, config, positions=jnp.arange(h.shape[1], dtype=jnp.int32))

    return fn


def _batches(calib_ids: Any, batch_size: int) -> list[np.ndarray]:
    if isinstance(calib_ids, list | tuple):
        out = [np.asarray(b) for b in calib_ids]
    else:
        ids = np.asarray(calib_ids)
        if ids.ndim != 2:
            raise ValueError(f"{_FN}: calib_ids must be (N, T) token ids, got shape {ids.shape}")
        out = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    if not out or any(b.ndim != 2 or not np.issubdtype(b.dtype, np.integer) for b in out):
        raise ValueError(
            f"{_FN}: calib_ids must be (N, T) integer token ids or a list of (B, T) batches"
        )
    return out


def _embed_rows(src: Any, batches: list[np.ndarray], config: Config) -> list[jax.Array]:
    """``models.embed`` of every batch with only the rows the tokens use read and on the device
    (a Hugging Face checkpoint's table is never read whole)."""
    vocab = src.shape("model.embed_tokens.weight")[0]
    used = np.unique(np.concatenate([b.ravel() for b in batches]))
    if used[0] < 0 or used[-1] >= vocab:
        bad = used[(used < 0) | (used >= vocab)]
        raise ValueError(f"{_FN}: calibration tokens must be in [0, vocab={vocab}), got {bad[:5]}")
    rows = {"embed": jnp.asarray(src.read_rows("model.embed_tokens.weight", used))}
    return [embed(rows, np.searchsorted(used, b).astype(np.int32), config) for b in batches]


_SPARSITY_PATH = re.compile(r"layers/(\d+)/([^/]+)")
_KERNEL_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


def _check_sparsity_paths(sparsity: Mapping[str, Any], n_layers: int) -> dict:
    """A per-kernel sparsity dict checked against the checkpoint: ``{path: float}``."""
    bad = []
    for path in sparsity:
        m = _SPARSITY_PATH.fullmatch(path) if isinstance(path, str) else None
        if m is None or int(m.group(1)) >= n_layers or m.group(2) not in _KERNEL_NAMES:
            bad.append(path)
    if bad:
        raise ValueError(
            f"{_FN}: sparsity names {bad[:5]}, which are not layer kernels of this checkpoint; "
            f"give paths 'layers/<i>/<k>' with i < {n_layers} and k in {list(_KERNEL_NAMES)} "
            "(prune.owl on the model's tree gives them)"
        )
    return dict(sparsity)  # the values are checked by prune.oneshot, naming the kernel


def _layer_sparsity(sparsity: Any, i: int) -> Any:
    """The sparsity ``prune.oneshot`` gets for layer ``i``: the float, the layer's share of a
    per-kernel dict (``None`` when it names none of the layer's kernels), or ``None``."""
    if not isinstance(sparsity, Mapping):
        return sparsity
    prefix = f"layers/{i}/"
    own = {p.removeprefix(prefix): v for p, v in sparsity.items() if p.startswith(prefix)}
    return own or None


def _rules_for(rules: Any, prefix: str) -> list[tuple[Any, Any]]:
    """``rules`` written for the whole tree (``"layers/3/q"``) as rules on one layer's tree."""
    rules = [(None, rules)] if isinstance(rules, quant.QuantSpec) else list(rules)
    out = []
    for rule in rules:
        where, spec = (rule.where, rule.spec) if isinstance(rule, quant.Rule) else rule
        if isinstance(where, str):
            rx = re.compile(where)
            where = lambda p, x, rx=rx: rx.search(prefix + p) is not None  # noqa: E731
        elif callable(where):
            where = lambda p, x, w=where: w(prefix + p, x)  # noqa: E731
        out.append((where, spec))
    return out


def _selects_any(rules: list[tuple[Any, Any]], params: Any) -> bool:
    """Whether the first matching rule quantizes (spec not ``None``) some matrix of ``params``."""
    for path, leaf in _tree.leaves_with_paths(params):
        if np.ndim(leaf) < 2:
            continue
        for where, spec in rules:
            if where is None or where(path, leaf):
                if spec is not None:
                    return True
                break
    return False


def _digest(batches: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(f"{b.shape}{b.dtype.str}".encode())
        h.update(np.ascontiguousarray(b).tobytes())
    return h.hexdigest()


def _write_atomic(path: str, write) -> None:
    root, ext = os.path.splitext(path)
    tmp = f"{root}.partial{ext}"
    write(tmp)
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _write_atomic(path, write)


@public("models.compress_streamed")
def compress_streamed(
    source: str | os.PathLike,
    out: str | os.PathLike,
    calib_ids: Any,
    *,
    sparsity: float | Mapping[str, float] | None = None,
    prune_method: Any = "sparsegpt",
    structure: Structure = Unstructured(),
    quant_rules: Any = None,
    quant_method: Any = "gptq",
    batch_size: int = 1,
    dtype: Any = None,
    progress: bool = True,
) -> calibrate.StreamResult:
    """Prunes and/or quantizes a Llama-family checkpoint layer by layer into ``out``.

    Memory: one layer's weights (and the method's float32 working copies, one kernel's Hessian)
    plus the calibration activations ``(N, T, d)`` twice; the embedding table is read once, to
    embed the tokens, and again at the end to copy it. Interrupted, the same call resumes after
    the last finished layer and gives the same files, bit for bit (``calibrate.stream``).

    Args:
      source: a HF safetensors directory or a GGUF file (``checkpoints.open``).
      out: the output directory (created; a directory from an interrupted run of the same
        arguments is resumed, one of different arguments raises ``ValueError``).
      calib_ids: calibration tokens, ``(N, T)`` integers (split into batches of ``batch_size``
        rows) or a list of ``(B, T)`` batches.
      sparsity: prune every layer kernel (``q k v o gate up down``) to this fraction with
        ``prune.oneshot(..., method=prune_method, structure=structure)``; a dict ``{"layers/3/q":
        0.62, ...}`` (``prune.owl``'s per-layer sparsities, paths of the whole tree) prunes the
        kernels it names, each to its own fraction; ``None``: no pruning.
      prune_method, structure: as ``prune.oneshot``'s ``method`` / ``structure``.
      quant_rules: ``quant.oneshot``'s rules, ``where`` written for the whole tree (a regex
        searched in ``"layers/3/q"``) and matched on the layers' leaves only (the embedding,
        the final norm and ``lm_head`` stay as stored); ``None``: no quantization. Pruning runs
        first; a calibrated quantizer after it (GPTQ, AWQ) moves the pruned zeros, so combine
        them only with ``"rtn"`` / ``"hqq"`` (or ``prune.SparseGPT(quant=...)``).
      quant_method: ``quant.oneshot``'s ``method``; ``quant.GPTQ(qep=...)`` also carries the float
        model's activations (twice the activation memory) to fit each layer to them.
      batch_size: rows per calibration batch when ``calib_ids`` is one array.
      dtype: cast each layer's weights to this dtype when read (default: as stored).
      progress: the memory estimate, a bar per layer, the peak RSS (stderr).

    Returns:
      the ``calibrate.StreamResult`` (per layer: ``(prune_report, quant_report)`` in ``reports``,
      the prune report without its masks: the zeros are in the weights).
    """
    from jaxslim import checkpoints

    if sparsity is None and quant_rules is None:
        raise ValueError(f"{_FN}: give sparsity= and/or quant_rules=; there is nothing to do")
    if sparsity is not None and quant_rules is not None:
        qm = quant_method if isinstance(quant_method, str) else getattr(quant_method, "name", "")
        if qm in ("gptq", "awq", "smoothquant"):
            raise ValueError(
                f"{_FN}: quant_method={qm!r} after pruning would move the pruned zeros (its "
                "updates and rescaling touch every weight); prune then quantize with 'rtn' or "
                "'hqq', or quantize jointly with prune.SparseGPT(quant=...)"
            )
    batches = _batches(calib_ids, batch_size)
    out = os.fspath(out)
    with checkpoints.open(source) as src:
        config = Config.from_hf(src.config)
        names = set(src.names())
        n_layers = len({int(m.group(1)) for n in names if (m := _load.LAYER_RE.match(n))})
        if isinstance(sparsity, Mapping):
            sparsity = _check_sparsity_paths(sparsity, n_layers)
        hidden = _embed_rows(src, batches, config)
        fn = block_fn(config)

        def loader(i: int):
            def load() -> dict[str, Any]:
                leaves = {}
                for leaf in _load.layer_leaves(config):
                    suffix, transpose = _load.LAYER_TENSORS[leaf]
                    a = src.read(f"model.layers.{i}.{suffix}")
                    a = jnp.asarray(np.ascontiguousarray(a.T) if transpose else a)
                    leaves[leaf] = a if dtype is None else a.astype(dtype)
                return leaves

            return load

        # GPTQ(qep=...) fits each layer to the float model's outputs: carry its activations
        qep = getattr(quant_method, "qep", 0) > 0 and quant_rules is not None

        def compress(i: int):
            def run(p: Any, hs: list[Any], refs: list[Any] | None = None) -> tuple[Any, Any]:
                reports = [None, None]
                s = _layer_sparsity(sparsity, i)
                if s is not None:
                    p, rep = prune.oneshot(fn, p, hs, s, method=prune_method, structure=structure)
                    reports[0] = dataclasses.replace(rep, masks=None)  # the zeros are in p
                if quant_rules is not None:
                    rules = _rules_for(quant_rules, f"layers/{i}/")
                    if _selects_any(rules, p):  # a recipe may leave whole layers float
                        p, reports[1] = quant.oneshot(
                            fn, p, hs, rules, method=quant_method, reference_batches=refs
                        )
                return p, tuple(reports)

            return run

        recipe = {
            "model": src.config,
            "tokens": _digest(batches),
            "sparsity": sparsity,
            "prune_method": prune_method if sparsity is not None else None,
            "structure": structure if sparsity is not None else None,
            "quant_rules": quant_rules,
            "quant_method": quant_method if quant_rules is not None else None,
            "dtype": None if dtype is None else jnp.dtype(dtype).name,
        }
        # calibrate.stream calls each layer's load, then compress_block on what it returned:
        # the index of the layer being compressed is the last one loaded.
        loaded: list[int] = []

        def tracked(i: int):
            load = loader(i)

            def load_and_note() -> dict[str, Any]:
                loaded.append(i)
                return load()

            return load_and_note

        layers = [(f"layers.{i}", tracked(i)) for i in range(n_layers)]
        res = calibrate.stream(
            fn,
            layers,
            hidden,
            lambda p, hs, *refs: compress(loaded[-1])(p, hs, *refs),
            out=out,
            save=checkpoints.save_npz,
            load=checkpoints.load_npz,
            recipe=recipe,
            progress=progress,
            reference=qep,
        )
        rest = {
            "embed": src.read("model.embed_tokens.weight"),
            "norm": src.read("model.norm.weight"),
        }
        if not config.tie_word_embeddings:
            rest["lm_head"] = np.ascontiguousarray(src.read("lm_head.weight").T)
        _write_atomic(os.path.join(out, _REST), lambda f: checkpoints.save_npz(f, rest))
        _write_text(os.path.join(out, "config.json"), json.dumps(src.config, indent=1))
        tok = src.tokenizer_json()
        if tok is not None:
            _write_text(os.path.join(out, "tokenizer.json"), tok)
    return res


@public("models.load_streamed")
def load_streamed(out: str | os.PathLike) -> tuple[dict[str, Any], Config, Tokenizer | None]:
    """The model ``compress_streamed`` wrote to ``out``: ``(params, config, tokenizer)``.

    ``params`` is the usual tree (``models.forward``'s), with ``quant.QArray`` leaves where the
    layers were quantized: run it with ``quant.quantized(models.forward)`` or dequantize it with
    ``quant.dequantize_params``. Raises ``ValueError`` naming the directory when the run is not
    finished (call ``compress_streamed`` again with the same arguments to finish it).
    """
    fn = "models.load_streamed"
    out = os.fspath(out)
    path = os.path.join(out, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{fn}: {out!r} has no readable manifest.json ({e})") from None
    blocks, done = manifest.get("blocks", []), manifest.get("done", [])
    rest_file = os.path.join(out, _REST)
    if done != blocks or not os.path.exists(rest_file):
        raise ValueError(
            f"{fn}: {out!r} is unfinished ({len(done)} of {len(blocks)} layers done); run "
            "models.compress_streamed again with the same arguments to finish it"
        )
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config = Config.from_hf(json.load(f))
    rest = checkpoints.load_npz(rest_file)
    layers = [checkpoints.load_npz(calibrate.block_file(out, n)) for n in blocks]
    params: dict[str, Any] = {"embed": rest["embed"], "layers": layers, "norm": rest["norm"]}
    if "lm_head" in rest:
        params["lm_head"] = rest["lm_head"]
    params = jax.tree.map(jnp.asarray, params)
    tok_file = os.path.join(out, "tokenizer.json")
    tokenizer = None
    if os.path.exists(tok_file):
        with open(tok_file, encoding="utf-8") as f:
            tokenizer = Tokenizer.from_str(f.read())
    return params, config, tokenizer
