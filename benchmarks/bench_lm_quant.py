"""int4 group-128 RTN vs GPTQ vs AWQ vs HQQ vs NF4 (+ SmoothQuant W8A8) on the LM workbench.

    python benchmarks/bench_lm_quant.py [--steps 600] [--group 128] [--params cache.pkl]

Trains the README's workbench decoder (``jaxslim.demo.lm``: d=128, 2 layers, 2 kv heads x 2
groups, head_dim 32, MLP 384; ``lm.train`` for ``--steps`` steps, batch 16 x 128 bytes; or loads
it from ``--params``), then quantizes its block kernels (q, k, v, o, gate, up, down; the tied
embedding stays float) once per method with ``quant.oneshot`` on 32 calibration windows of the
training split, and prints one Markdown row per method: validation bits per byte (64 windows of
128 bytes, run through ``quant.quantized`` on the quantized tree), its change vs float, the
stored bytes of the quantized kernels (codes, scales, zero points) and the quantization time.

**Groups of 128 on this model.** A rule's group runs along a kernel's *last* contracted axis
(``quant._oneshot.kernel_spec``). The attention output ``o: (kv, groups, head_dim, dim)``
contracts ``kv * groups * head_dim = 128`` inputs but its last contracted axis is ``head_dim =
32``, which a group of 128 cannot cut (``quant.oneshot`` raises). One group of 128 over the whole
flattened contraction is one scale per output channel, so ``o`` gets the same spec with
``group_size=None`` (identical codes and scales, stated in the output). The other kernels
contract ``dim = 128`` (q, k, v, gate, up: one group, also per channel) or ``hidden = 384``
(down: 3 groups). Smaller ``--group`` values that divide ``head_dim`` are used as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import platform

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxslim import quant
from jaxslim.demo import lm
from jaxslim.quant import QuantSpec

KERNELS = r"blocks/.*/(attn/(q|k|v|o)|mlp/(gate|up|down))$"
O_KERNEL = r"blocks/.*/attn/o$"
CFG = lm.LMConfig(dim=128, layers=2, kv_heads=2, groups=2, head_dim=32, hidden=384)


def workbench(steps: int, cache: str = "") -> tuple[lm.LM, np.ndarray, np.ndarray]:
    """``(model, train_bytes, valid_bytes)``: the trained workbench decoder (cached in ``cache``,
    a pickle of the ``nnx.Param`` pure dict, when given)."""
    tr, va, _ = lm.load_corpus()
    if cache and os.path.exists(cache):
        with open(cache, "rb") as f:
            return lm.rebuild(jax.tree.map(jnp.asarray, pickle.load(f))), tr, va
    model = lm.LM(CFG, rngs=nnx.Rngs(0))
    lm.train(model, tr, steps=steps, batch=16, seq=128)
    if cache:
        with open(cache, "wb") as f:
            pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            pickle.dump(jax.tree.map(np.asarray, pure), f)
    return model, tr, va


def rules_for(spec: QuantSpec, cfg: lm.LMConfig) -> tuple[list, str]:
    """``(rules, note)``: ``spec`` on every block kernel, the embedding float; ``o`` per output
    channel when ``spec``'s group equals its flattened contraction but not its last axis."""
    keep = [("embed", None)]
    g = spec.group_size
    if g is None or cfg.head_dim % g == 0:
        return keep + [(KERNELS, spec)], ""
    flat = cfg.kv_heads * cfg.groups * cfg.head_dim
    if flat != g:
        raise ValueError(
            f"bench_lm_quant: group_size={g} neither divides head_dim={cfg.head_dim} nor equals "
            f"the flattened contraction {flat} of attn/o; pick --group dividing {cfg.head_dim}"
        )
    per_channel = dataclasses.replace(spec, group_size=None, group_axis=None)
    note = f"attn/o: one group of {g} = its whole contraction (kv x groups x head_dim)"
    return keep + [(O_KERNEL, per_channel), (KERNELS, spec)], note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--calib", type=int, default=32, help="calibration windows of 128 bytes")
    ap.add_argument("--params", default="", help="pickle cache of the trained model")
    args = ap.parse_args()
    model, tr, va = workbench(args.steps, args.params)
    cfg = lm.config_of(nnx.state(model, nnx.Param))
    fn, params = lm.apply_fn(model)
    val = lm.eval_windows(va, 128, 64)
    calib = [lm.eval_windows(tr, 128, args.calib)[:, :-1]]
    float_bpb = lm.bits_per_byte(model, val)
    float_bytes = sum(
        int(x.size) * x.dtype.itemsize
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if "blocks" in jax.tree_util.keystr(p) and x.ndim >= 2
    )
    g = args.group
    print(
        f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; workbench {cfg}, {args.steps} steps; calibration "
        f"{args.calib} x 128 bytes; validation 64 x 128 bytes"
    )
    i4 = QuantSpec(4, axis=-1, group_size=g)
    a4 = QuantSpec(4, axis=-1, group_size=g, signed=False, symmetric=False)
    nf4 = QuantSpec(fmt="nf4", axis=-1, group_size=g)
    runs = [
        ("int8 per-channel (RTN)", QuantSpec(8, axis=-1), "rtn", None),
        (f"int4 g{g} RTN, symmetric", i4, "rtn", None),
        (f"int4 g{g} GPTQ, symmetric", i4, "gptq", None),
        (f"int4 g{g} AWQ, symmetric (with clip)", i4, "awq", None),
        (f"int4 g{g} RTN, affine", a4, "rtn", None),
        (f"int4 g{g} HQQ, affine", a4, "hqq", None),
        (f"int4 g{g} GPTQ, affine", a4, "gptq", None),
        (f"int4 g{g} AWQ, affine (with clip)", a4, "awq", None),
        (f"NF4 g{g} (round to nearest)", nf4, "rtn", None),
        ("SmoothQuant W8A8 (alpha 0.5)", QuantSpec(8, axis=-1), "smoothquant", QuantSpec(8)),
    ]
    rows, notes = [], set()
    for name, spec, method, acts in runs:
        rules, note = rules_for(spec, cfg)
        if note:
            notes.add(note)
        qp, rep = quant.oneshot(fn, params, calib, rules, method=method)
        run = jax.jit(quant.quantized(fn, activations=acts))
        bpb = lm.bits_per_byte(lambda w, qp=qp, run=run: run(qp, w), val)
        rows.append((name, bpb, rep.bytes_after, rep.seconds))
        print(
            f"  {name}: {bpb:.4f} bits/byte, {rep.bytes_after} B, {rep.seconds:.1f} s", flush=True
        )
    print()
    for note in sorted(notes):
        print(f"note: {note}")
    print("| method | bits/byte | vs float | stored bytes | quant. time s |")
    print("|---|---|---|---|---|")
    print(f"| float32 | {float_bpb:.4f} | | {float_bytes} | |")
    for name, bpb, nbytes, dt in rows:
        print(
            f"| {name} | {bpb:.4f} | {100 * (bpb / float_bpb - 1):+.2f} % | {nbytes} | {dt:.1f} |"
        )
    int4 = [r for r in rows if "int4" in r[0] or "NF4" in r[0]]
    best = min(int4, key=lambda r: r[1])
    sq = next(r for r in rows if r[0].startswith("SmoothQuant"))
    print(
        f"\nbest 4-bit: {best[0]}, {100 * (best[1] / float_bpb - 1):+.2f} % (target <= +2 %); "
        f"SmoothQuant W8A8 {100 * (sq[1] / float_bpb - 1):+.2f} % (target <= +1 %)"
    )


if __name__ == "__main__":
    main()
