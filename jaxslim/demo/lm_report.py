"""The LM workbench report: compress the byte-level decoder every way jaxslim can, in one table.

Rows (validation bits per byte, lower is better; parameters; seconds):

* dense: the teacher, trained for ``steps`` steps;
* width-pruned (MLP hidden, residual/embedding channels, attention heads where the tracer allows):
  cut with ``jaxslim.splice``, then recovered for ``recover`` steps with and without distillation
  from the dense model (``distill.kd_loss``, Minitron's logit-only recipe);
* depth-pruned: the blocks with the lowest ``splice.block_influence`` dropped, recovered likewise;
* from scratch: the width-pruned architecture trained from a fresh init for ``recover`` steps
  (Minitron's claim is that pruned + distilled beats this at the same size and steps);
* int8 per-channel and int4 group-32 round-to-nearest weight quantization of the dense model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxslim import _tree, quant, splice
from jaxslim.demo import lm
from jaxslim.quant import QuantSpec

__all__ = ["run", "width_prune", "depth_prune", "evaluator"]


def width_prune(
    model: lm.LM, batches: jax.Array, *, keep: float, heads: bool = True
) -> tuple[lm.LM, list]:
    """Minitron width pruning: removes ``1 - keep`` of the MLP hidden channels, the residual
    (embedding) channels and, with ``heads``, the query heads inside every key/value group,
    lowest activation importance first (``splice.importance`` on ``batches``); MLP and residual
    widths are rounded to multiples of 8. Returns the rebuilt model and the splice reports."""
    fn, params = lm.apply_fn(model)
    example = batches[:2]
    cuts = [(("mlp/down", 0), 8), (("embed", 1), 8)]
    if heads:
        cuts.append((("attn/q", 2), 1))
    reports = []
    for where, round_to in cuts:
        groups = [
            g
            for g in splice.trace(fn, params, example)
            if g.removable and any(p.endswith(where[0]) and a == where[1] for p, a in g)
        ]
        if not groups:
            continue
        scores = splice.importance(fn, params, [batches], groups)
        params, rep = splice.prune_channels(
            fn,
            params,
            example,
            sparsity=1.0 - keep,
            score=scores,
            groups=groups,
            round_to=round_to,
        )
        reports.append(rep)
    return lm.rebuild(params), reports


def depth_prune(model: lm.LM, windows: jax.Array, *, drop: int) -> tuple[lm.LM, np.ndarray]:
    """Drops the ``drop`` blocks with the lowest ablation influence (``splice.block_influence``,
    loss increase when the block is the identity); returns the rebuilt model and the scores.

    Works on both forms of the decoder (``lm.block_specs``: ``"blocks/<i>"`` for the list,
    ``("blocks", i)`` for a ``scan_layers=True`` stack); blocks go highest index first, so the
    indices still to drop stay valid."""
    forward, params = lm.apply_fn(model)

    def fn(p, w):
        logits, hs = forward(p, w[:, :-1], hiddens=True)
        return lm.next_byte_loss(logits, w), hs

    specs = lm.block_specs(params)
    inf = splice.block_influence(fn, params, [windows], specs)
    order = np.argsort(inf.ablation, kind="stable")[:drop]
    small = params
    for i in sorted(order.tolist(), reverse=True):
        spec = specs[i]
        if isinstance(spec, tuple):
            small = splice.drop_layer(small, spec[0], index=spec[1])
        else:
            small = splice.drop_layer(small, spec)
    return lm.rebuild(small), inf.ablation


# Which axes of each workbench kernel are contracted (the rest are outputs).
_CONTRACTED = {
    "attn/q": (0,),
    "attn/k": (0,),
    "attn/v": (0,),
    "attn/o": (0, 1, 2),
    "mlp/gate": (0,),
    "mlp/up": (0,),
    "mlp/down": (0,),
    "embed": (1,),
}


def _spec(path: str, shape: tuple[int, ...], bits: int, group: int | None) -> QuantSpec | None:
    """Per-output-channel scales (``group=None``) or groups of ``group`` inputs along the last
    contracted axis, for the workbench's explicit-head kernels."""
    key = next((k for k in _CONTRACTED if path.endswith(k)), None)
    if key is None:
        return None
    contracted = _CONTRACTED[key]
    outputs = tuple(i for i in range(len(shape)) if i not in contracted)
    if group is None:
        return QuantSpec(bits, axis=outputs)
    ga = contracted[-1]
    keep = tuple(i for i in range(len(shape)) if i != ga)
    return QuantSpec(bits, axis=keep, group_size=min(group, shape[ga]), group_axis=ga)


def _quantize(params: Any, bits: int, group: int | None) -> tuple[Any, int]:
    """``(dequantized params, stored bytes)``: RTN weight quantization of every kernel."""

    def one(kp, x):
        spec = _spec(_tree.path_str(kp), x.shape, bits, group)
        return x if spec is None else quant.quantize(x, spec)

    qparams = jax.tree_util.tree_map_with_path(one, params)
    leaves = jax.tree.leaves(qparams, is_leaf=quant.is_qarray)
    nbytes = sum(int(x.nbytes) for x in leaves if hasattr(x, "nbytes"))
    return quant.dequantize_params(qparams), nbytes


def evaluator(model: lm.LM, windows: jax.Array) -> Callable[[Any], float]:
    """``bpb(model_or_params) -> float``: validation bits per byte on ``windows (n, seq + 1)``,
    equal to ``lm.bits_per_byte`` (one batch instead of chunks of 16).

    One jitted function of the parameters (``lm.apply_fn``'s functional form, which runs any
    cut of ``model``): it compiles once per parameter shape and every row of that shape (a
    fine-tuned, a distilled and a from-scratch model; quantized weights) reuses it, where
    ``lm.bits_per_byte`` compiles again for every model.
    """
    fn, _ = lm.apply_fn(model)
    nats = jax.jit(lambda p, w: lm.next_byte_loss(fn(p, w[:, :-1]), w))

    def bpb(m: Any) -> float:
        params = _params(m) if isinstance(m, nnx.Module) else m
        return float(nats(params, windows)) / math.log(2)

    return bpb


def run(
    *,
    cfg: lm.LMConfig | None = None,
    steps: int = 600,
    recover: int = 150,
    keep: float = 0.5,
    drop: int = 2,
    seed: int = 0,
    oneshot: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict], dict]:
    """Trains the dense decoder and measures every compression row; returns ``(rows, info)``.

    ``info`` holds the corpus record (``sha256``, ``bytes``, ``python``). With ``oneshot`` (a
    mapping of keyword arguments for ``lm_oneshot.run``; ``{}`` for the full grid) the same
    dense model is also pruned once by every method of the one-shot grid: its rows are
    ``info["oneshot"]`` and its time ``info["oneshot_seconds"]``. ``log`` receives one line per
    row as it is measured.

    The five recovery runs (fine-tune and distill after each cut, the width architecture from
    scratch) train ``recover`` steps in lockstep on the same batches (``lm.train_together``,
    ``lm.default_optimizer``): one teacher forward per batch serves both distillations, and
    runs of one shape share a compiled step. A row's seconds are its cut plus its own training
    steps (a distilled row: plus half the teacher's forward passes). Every row is measured by
    one jitted evaluator (``evaluator``).
    """
    cfg = cfg or lm.LMConfig(dim=96, layers=4, kv_heads=2, groups=2, head_dim=24, hidden=256)
    train, valid, info = lm.load_corpus()
    windows = lm.eval_windows(valid, 128, 64)
    calib = lm.eval_windows(train, 128, 16)
    say = log or (lambda *_: None)
    rows = []

    t0 = time.perf_counter()
    dense = lm.LM(cfg, rngs=nnx.Rngs(seed))
    bpb = evaluator(dense, windows)

    def row(method, model, seconds, note="", *, bits=None, params=None):
        value = bpb(model) if bits is None else bits
        rows.append(
            {
                "method": method,
                "bits/byte": value,
                "params": lm.count_params(model) if params is None else params,
                "seconds": seconds,
                "note": note,
            }
        )
        say(f"{method}: {value:.3f} bits/byte")

    lm.train(dense, train, steps=steps, seed=seed)
    row("dense", dense, time.perf_counter() - t0, f"{steps} AdamW steps; {_describe(cfg)}")

    # Both cuts first, then the five recovery runs in lockstep on the same batches
    # (lm.train_together): one teacher forward per batch serves both distillations.
    cuts = []
    for label, cut in [
        (
            f"width {keep:.0%} (heads, MLP, residual)",
            lambda: width_prune(dense, calib[:, :-1], keep=keep),
        ),
        (f"depth -{drop} blocks", lambda: depth_prune(dense, calib, drop=drop)),
    ]:
        t0 = time.perf_counter()
        small, _ = cut()
        cuts.append((label, small, time.perf_counter() - t0))
    runs = []  # (cut label, row name, model, distill, seconds of its cut)
    for label, small, t_cut in cuts:
        for kd in (False, True):
            how = "distilled (kd_loss, T=1)" if kd else "fine-tuned (hard labels)"
            runs.append((label, f"{label} + {recover} steps {how}", nnx.clone(small), kd, t_cut))
        if label.startswith("width"):
            scratch = lm.LM(lm.config_of(_params(small)), rngs=nnx.Rngs(seed + 2))
            runs.append((label, f"{label} from scratch, {recover} steps", scratch, False, 0.0))
    seconds = lm.train_together(
        [r[2] for r in runs],
        train,
        steps=recover,
        seed=seed + 1,
        teacher=dense,
        distill=[r[3] for r in runs],
        tx=lm.default_optimizer(recover),
    )
    for label, small, t_cut in cuts:
        row(f"{label}, no recovery", small, t_cut, _describe(lm.config_of(_params(small))))
        for (cut_label, name, student, _, t0), sec in zip(runs, seconds, strict=True):
            if cut_label == label:
                row(name, student, t0 + sec)

    n_dense = lm.count_params(dense)
    for name, bits, group in [
        ("int8 per-channel (RTN)", 8, None),
        ("int4 group-32 (RTN)", 4, 32),
    ]:
        t0 = time.perf_counter()
        deq, nbytes = _quantize(_params(dense), bits, group)
        value = bpb(deq)
        note = f"{nbytes / 1024:.0f} KiB stored vs {4 * n_dense / 1024:.0f} KiB f32"
        row(name, dense, time.perf_counter() - t0, note, bits=value, params=n_dense)

    if oneshot is not None:
        from jaxslim.demo import lm_oneshot

        t0 = time.perf_counter()
        info["oneshot"] = lm_oneshot.run(dense, train, windows, **oneshot)
        info["oneshot_seconds"] = time.perf_counter() - t0
        say(f"one-shot grid: {len(info['oneshot']) - 1} prunings")
    return rows, info


def _params(model: lm.LM) -> Any:
    return nnx.state(model, nnx.Param)


def _describe(cfg: lm.LMConfig) -> str:
    return (
        f"d={cfg.dim}, {cfg.layers} layers, {cfg.heads} q / {cfg.kv_heads} kv heads x "
        f"{cfg.head_dim}, MLP {cfg.hidden}"
    )
