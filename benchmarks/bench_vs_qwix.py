"""jaxslim vs qwix on the LM workbench: bits per byte, stored bytes, quantization time, latency.

    pip install -e '.[bench]'          # qwix (never a runtime dependency of jaxslim)
    python benchmarks/bench_vs_qwix.py [--steps 600] [--group 32] [--params cache.pkl]

One run trains (or loads) a small workbench decoder (``jaxslim.demo.lm``), then quantizes its
block kernels (q, k, v, o, gate, up, down; the tied embedding stays float) with both libraries:

* int8 per output channel, weight-only (qwix ``PtqProvider``; jaxslim ``oneshot(method="rtn")``);
* int4, groups of ``--group`` along the contracted axis, weight-only: RTN, GPTQ, AWQ (qwix
  ``contrib.gptq`` / ``contrib.awq``; jaxslim ``oneshot``);
* W8A8: int8 weights and int8 per-token activations (qwix ``act_qtype=int8``; jaxslim
  SmoothQuant alpha=0.5, then ``quant.quantized(fn, activations=QuantSpec(8))``).

qwix intercepts the ``dot_general``/``einsum`` calls of Flax modules. The workbench's MLP computes
``x @ W`` with ``jnp.matmul``; qwix's NNX path then fails (its weight wrapper has no ``@``, and
its first call mutates the module inside ``jnp.matmul``'s jit trace): here the MLP is re-written
with ``jnp.einsum`` (the same function) for both libraries, and qwix's quantize/calibrate calls run
under ``jax.disable_jit()``. Latency: one jitted forward of ``(8, 128)`` tokens, median of 20.
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxslim import quant
from jaxslim.demo import lm
from jaxslim.quant import QuantSpec


def _mlp_call(self, x):  # the workbench MLP with einsum, which qwix intercepts
    g = jnp.einsum("btd,dh->bth", x, self.gate[...])
    u = jnp.einsum("btd,dh->bth", x, self.up[...])
    return jnp.einsum("bth,hd->btd", jax.nn.silu(g) * u, self.down[...])


lm.MLP.__call__ = _mlp_call

KERNELS = r"blocks/.*/(attn/(q|k|v|o)|mlp/(gate|up|down))$"


def _bytes(tree) -> int:
    """Stored bytes of the kernels' arrays (int4 counted as 4 bits)."""
    n = 0
    for x in jax.tree.leaves(tree, is_leaf=quant.is_qarray):
        if quant.is_qarray(x):
            n += x.nbytes
        else:
            bits = jnp.iinfo(x.dtype).bits if jnp.issubdtype(x.dtype, jnp.integer) else None
            n += x.size * (bits / 8 if bits else jnp.dtype(x.dtype).itemsize)
    return int(n)


def _latency(f, *args, reps=20) -> float:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--params", default="")
    args = ap.parse_args()
    import qwix
    from qwix.contrib import awq as qawq
    from qwix.contrib import gptq as qgptq

    tr, va, info = lm.load_corpus()
    cfg = lm.LMConfig(dim=128, layers=2, kv_heads=2, groups=2, head_dim=32, hidden=384)
    if args.params and os.path.exists(args.params):
        with open(args.params, "rb") as f:
            model = lm.rebuild(jax.tree.map(jnp.asarray, pickle.load(f)))
    else:
        model = lm.LM(cfg, rngs=nnx.Rngs(0))
        lm.train(model, tr, steps=args.steps, batch=16, seq=128)
        if args.params:
            with open(args.params, "wb") as f:
                pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
                pickle.dump(jax.tree.map(np.asarray, pure), f)
    fn, params = lm.apply_fn(model)
    val = lm.eval_windows(va, 128, 64)
    calib = [lm.eval_windows(tr, 128, 32)[:, :-1]]
    x = val[:8, :-1]
    g = args.group
    float_bpb = lm.bits_per_byte(model, val)
    print(f"jax {jax.__version__}, qwix {qwix.__version__}, {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores; workbench {cfg}; float bits/byte {float_bpb:.4f}")  # fmt: skip
    float_ms = _latency(jax.jit(fn), params, x)
    rows = []

    def js(name, rules, method, activations=None, **kw):
        t = time.perf_counter()
        qp, rep = quant.oneshot(fn, params, calib, rules, method=method, **kw)
        dt = time.perf_counter() - t
        g_fn = jax.jit(quant.quantized(fn, activations=activations))
        bpb = lm.bits_per_byte(lambda w: g_fn(qp, w), val)
        rows.append(("jaxslim", name, bpb, rep.bytes_after, dt, _latency(g_fn, qp, x)))

    def qw(name, rule_kw, algo=None):
        t = time.perf_counter()
        if algo is None:
            rules = [qwix.QtRule(module_path=r".*", **rule_kw)]
            with jax.disable_jit():
                qm = qwix.quantize_model(model, qwix.PtqProvider(rules), x)
        else:
            mod, rule_t, cal_t = algo
            rules = [rule_t(module_path=r".*", **rule_kw)]
            with jax.disable_jit():
                cal = qwix.quantize_model(model, cal_t(rules), x)
                for b in calib:
                    cal(b)
                qm = qwix.quantize_model(
                    model,
                    qawq.AwqInferenceProvider(rules) if mod is qawq else qwix.PtqProvider(rules),
                    x,
                )
            state = nnx.to_pure_dict(nnx.state(cal, nnx.Param))
            stats = nnx.to_pure_dict(nnx.state(cal, qwix.QuantStat))
            nnx.update(qm, mod.quantize_params(state, qm, stats))
        dt = time.perf_counter() - t
        fwd = nnx.jit(lambda m, w: m(w))
        bpb = lm.bits_per_byte(qm, val)
        kernel_state = {
            k: v
            for k, v in nnx.to_flat_state(nnx.state(qm, nnx.Param))
            if "/".join(map(str, k)).startswith("blocks") and "norm" not in "/".join(map(str, k))
        }
        nbytes = _bytes([v.get_value() if hasattr(v, "get_value") else v.value
                         for v in kernel_state.values()])  # fmt: skip
        rows.append(("qwix", name, bpb, nbytes, dt, _latency(fwd, qm, x)))

    keep = [("embed", None)]
    i8, i4 = QuantSpec(8, axis=-1), QuantSpec(4, axis=-1, group_size=g)
    tests = [
        ("int8 per-channel", lambda: js("int8 per-channel", keep + [(KERNELS, i8)], "rtn"),
         lambda: qw("int8 per-channel", {"weight_qtype": jnp.int8})),
        (f"int4 g{g} RTN", lambda: js(f"int4 g{g} RTN", keep + [(KERNELS, i4)], "rtn"),
         lambda: qw(f"int4 g{g} RTN", {"weight_qtype": jnp.int4, "tile_size": g})),
        (f"int4 g{g} GPTQ", lambda: js(f"int4 g{g} GPTQ", keep + [(KERNELS, i4)], "gptq"),
         lambda: qw(f"int4 g{g} GPTQ", {"weight_qtype": jnp.int4, "tile_size": g},
                    (qgptq, qgptq.GptqRule, qgptq.GptqCalibrationProvider))),
        (f"int4 g{g} AWQ", lambda: js(f"int4 g{g} AWQ", keep + [(KERNELS, i4)], "awq"),
         lambda: qw(f"int4 g{g} AWQ", {"weight_qtype": jnp.int4, "tile_size": g},
                    (qawq, qawq.AwqRule, qawq.AwqCalibrationProvider))),
        ("W8A8", lambda: js("W8A8 (SmoothQuant a=0.5)", keep + [(KERNELS, i8)], "smoothquant",
                            activations=QuantSpec(8)),
         lambda: qw("W8A8", {"weight_qtype": jnp.int8, "act_qtype": jnp.int8})),
    ]  # fmt: skip
    for name, run_js, run_qw in tests:
        for run in (run_js, run_qw):
            try:
                run()
            except Exception as e:  # report what a library cannot do, keep going
                lib = "jaxslim" if run is run_js else "qwix"
                rows.append((lib, name, float("nan"), 0, float("nan"), float("nan")))
                print(f"{lib} {name}: {type(e).__name__}: {str(e)[:200]}")
            print(rows[-1], flush=True)
    print(f"\nfloat: bits/byte {float_bpb:.4f}, latency {float_ms:.2f} ms")
    print("| method | library | bits/byte | vs float | stored bytes | quant. time s | latency ms |")
    print("|---|---|---|---|---|---|---|")
    for lib, name, bpb, nbytes, dt, ms in rows:
        print(f"| {name} | {lib} | {bpb:.4f} | {100 * (bpb / float_bpb - 1):+.2f} % | {nbytes} | "
              f"{dt:.2f} | {ms:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
