"""jaxslim vs qwix on the LM workbench: bits per byte, stored bytes, quantization time, latency.

    pip install -e '.[bench]'          # qwix (never a runtime dependency of jaxslim)
    python benchmarks/bench_vs_qwix.py [--steps 600] [--group 128] [--params cache.pkl]

One run trains (or loads) the README's workbench decoder (``jaxslim.demo.lm``, d=128, 2 layers,
head_dim 32, MLP 384), then quantizes its block kernels (q, k, v, o, gate, up, down; the tied
embedding stays float) with both libraries:

* int8 per output channel, weight-only (qwix ``PtqProvider``; jaxslim ``oneshot(method="rtn")``);
* int4, groups of ``--group`` along the contraction, weight-only: RTN (symmetric, and affine:
  qwix ``weight_calibration_method="minmax"``), GPTQ, AWQ (qwix ``contrib.gptq`` /
  ``contrib.awq``; jaxslim ``oneshot``), HQQ (jaxslim only: qwix has none); qwix's AWQ
  result is placed into the NNX model by ``_place_awq`` (``nnx.update`` cannot);
* NF4 with a scale per ``--group``: jaxslim ``QuantSpec(fmt="nf4")`` (double-quantized scales)
  vs qwix ``weight_qtype="nf4"`` (float32 absmax scales);
* W8A8: int8 weights and int8 per-token activations (qwix ``act_qtype=int8``; jaxslim
  SmoothQuant alpha=0.5, then ``quant.quantized(fn, activations=QuantSpec(8))``).

Two rewrites of the workbench, the same function for both libraries:

* qwix intercepts the ``dot_general``/``einsum`` calls of Flax modules. The workbench's MLP computes
  ``x @ W`` with ``jnp.matmul``; qwix's NNX path then fails (its weight wrapper has no ``@``, and
  its first call mutates the module inside ``jnp.matmul``'s jit trace): the MLP is re-written
  with ``jnp.einsum``, and qwix's quantize/calibrate calls run under ``jax.disable_jit()``.
* Both libraries cut a group along a kernel's *last* contracted axis (jaxslim
  ``quant._oneshot.kernel_spec``: ``group_axis = max(contracted)``; qwix
  ``get_how_to_quantize``: ``tiled_axes = {contracting_axes[-1]: tile_size}``). The attention
  output ``o: (kv, groups, head_dim, dim)`` contracts 128 inputs, but its last contracted axis is
  ``head_dim = 32``: a group of 128 fails in both (jaxslim: "group_size=128 does not divide axis
  2 of size 32"; qwix: "cannot be tiled as {2: 128}"). ``o`` is therefore stored flattened as
  ``(kv * groups * head_dim, dim)`` and used as ``einsum("btf,fd->btd", out.reshape(b, t, -1),
  o)``: the group runs along the flattened contraction in both libraries (for every group size
  that divides 128 this gives the same groups as the 4-D kernel where those exist).
  ``--keep-o-4d`` keeps the 4-D kernel (to see the failures).

Latency: one jitted forward of ``(8, 128)`` tokens; every model (float included) is timed in the
same interleaved rounds at the end of the run, median of ``--reps``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import platform
import re
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


def _attn_call(self, x):  # the workbench attention; ``o`` may be stored flattened (f, d)
    o = self.o[...]
    if o.ndim == 4:
        return _attn_4d(self, x)
    b, t, _ = x.shape
    q = jnp.einsum("btd,dkgh->btkgh", x, self.q[...])
    k = jnp.einsum("btd,dkh->btkh", x, self.k[...])
    v = jnp.einsum("btd,dkh->btkh", x, self.v[...])
    q, k = lm._rope(q, self.rope_base), lm._rope(k, self.rope_base)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k) / math.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((1, 1, 1, t, t), jnp.bool_))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    out = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(logits, axis=-1), v)
    return jnp.einsum("btf,fd->btd", out.reshape(b, t, -1), o)


lm.MLP.__call__ = _mlp_call
_attn_4d = lm.Attention.__call__
lm.Attention.__call__ = _attn_call


def _flatten_o(model: lm.LM) -> None:
    """Stores every block's ``attn/o`` as ``(kv * groups * head_dim, dim)`` (same function)."""
    for block in model.blocks:
        o = block.attn.o[...]
        block.attn.o = nnx.Param(o.reshape(-1, o.shape[-1]))


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


def _place_awq(obj, tree) -> None:
    """Puts qwix AWQ's quantized params (a pure dict) into the NNX model ``obj``.

    ``nnx.update`` cannot (the model holds ``WithAux`` nodes and AWQ returns ``WithAwqScale``
    ones: "Cannot set key 'awq_scale' on immutable node of type WithAux"), so each kernel's node
    is rebuilt. Every workbench kernel is the right operand contracted on its axis 0.
    """
    from qwix._src.providers import ptq
    from qwix.contrib import awq as qawq

    for k, v in tree.items():
        child = obj[k] if isinstance(k, int) else getattr(obj, k)
        if isinstance(child, ptq.WithAux):
            arr = dataclasses.replace(child.array, **v["array"])
            if "awq_scale" in v:
                child = qawq.WithAwqScale(
                    array=arr, how=child.how, awq_scale=v["awq_scale"], contracting_axis=0
                )
            else:
                child = dataclasses.replace(child, array=arr)
            setattr(obj, k, child)
        elif isinstance(v, dict) and not isinstance(child, nnx.Variable):
            _place_awq(child, v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--params", default="")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", default="", help="regex: run only the methods it matches")
    ap.add_argument("--keep-o-4d", action="store_true", help="do not flatten attn/o")
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
    if not args.keep_o_4d:
        _flatten_o(model)
    fn, params = lm.apply_fn(model)
    val = lm.eval_windows(va, 128, 64)
    calib = [lm.eval_windows(tr, 128, 32)[:, :-1]]
    x = val[:8, :-1]
    g = args.group
    float_bpb = lm.bits_per_byte(model, val)
    float_bytes = _bytes(
        [v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
         if "blocks" in jax.tree_util.keystr(p) and v.ndim >= 2]
    )  # fmt: skip
    print(f"jax {jax.__version__}, qwix {qwix.__version__}, {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; workbench {cfg}, "
          f"attn/o {'4-D' if args.keep_o_4d else 'flattened'}; float bits/byte "
          f"{float_bpb:.4f}")  # fmt: skip
    results = {}  # (method, lib) -> (bpb, bytes, seconds, timer)

    def js(name, rules, method, activations=None, **kw):
        t = time.perf_counter()
        qp, rep = quant.oneshot(fn, params, calib, rules, method=method, **kw)
        dt = time.perf_counter() - t
        g_fn = jax.jit(quant.quantized(fn, activations=activations))
        bpb = lm.bits_per_byte(lambda w: g_fn(qp, w), val)
        results[name, "jaxslim"] = (bpb, rep.bytes_after, dt, (g_fn, qp, x))

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
            qparams = mod.quantize_params(state, qm, stats)
            if mod is qawq:
                _place_awq(qm, qparams)
                awq_bytes = _bytes(
                    [
                        v
                        for p, v in jax.tree_util.tree_flatten_with_path(qparams)[0]
                        if "blocks" in jax.tree_util.keystr(p)
                        and "norm" not in jax.tree_util.keystr(p)
                    ]
                )  # codes, scales and the per-input awq_scale vectors
            else:
                nnx.update(qm, qparams)
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
        if algo is not None and algo[0] is qawq:
            nbytes = awq_bytes  # the rebuilt WithAwqScale nodes are not nnx.Param state
        results[name, "qwix"] = (bpb, nbytes, dt, (fwd, qm, x))

    keep = [("embed", None)]
    i8, i4 = QuantSpec(8, axis=-1), QuantSpec(4, axis=-1, group_size=g)
    a4 = QuantSpec(4, axis=-1, group_size=g, signed=False, symmetric=False)
    nf4 = QuantSpec(fmt="nf4", axis=-1, group_size=g)
    t4 = {"weight_qtype": jnp.int4, "tile_size": g}
    gptq_algo = (qgptq, qgptq.GptqRule, qgptq.GptqCalibrationProvider)
    awq_algo = (qawq, qawq.AwqRule, qawq.AwqCalibrationProvider)
    tests = [
        ("int8 per-channel", lambda n: js(n, keep + [(KERNELS, i8)], "rtn"),
         lambda n: qw(n, {"weight_qtype": jnp.int8})),
        (f"int4 g{g} RTN", lambda n: js(n, keep + [(KERNELS, i4)], "rtn"), lambda n: qw(n, t4)),
        (f"int4 g{g} RTN affine", lambda n: js(n, keep + [(KERNELS, a4)], "rtn"),
         lambda n: qw(n, {**t4, "weight_calibration_method": "minmax"})),
        (f"int4 g{g} HQQ affine", lambda n: js(n, keep + [(KERNELS, a4)], "hqq"), None),
        (f"int4 g{g} AWQ", lambda n: js(n, keep + [(KERNELS, i4)], "awq"),
         lambda n: qw(n, t4, awq_algo)),
        (f"NF4 g{g}", lambda n: js(n, keep + [(KERNELS, nf4)], "rtn"),
         lambda n: qw(n, {"weight_qtype": "nf4", "tile_size": g})),
        ("W8A8", lambda n: js(n, keep + [(KERNELS, i8)], "smoothquant", activations=QuantSpec(8)),
         lambda n: qw(n, {"weight_qtype": jnp.int8, "act_qtype": jnp.int8})),
        (f"int4 g{g} GPTQ", lambda n: js(n, keep + [(KERNELS, i4)], "gptq"),
         lambda n: qw(n, t4, gptq_algo)),
    ]  # fmt: skip
    only = re.compile(args.only) if args.only else None
    names = [t[0] for t in tests if only is None or only.search(t[0])]
    for name, run_js, run_qw in tests:
        if name not in names:
            continue
        for lib, run in (("jaxslim", run_js), ("qwix", run_qw)):
            if run is None:
                continue
            try:
                run(name)
                bpb, nbytes, dt, _ = results[name, lib]
                print(f"  {lib} {name}: {bpb:.4f} bits/byte, {nbytes} B, {dt:.1f} s", flush=True)
            except Exception as e:  # report what a library cannot do, keep going
                print(f"  {lib} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)

    # Latency: every model in the same interleaved rounds (the load of a shared machine drifts).
    timers = {("float", "float"): (nnx.jit(lambda m, w: m(w)), model, x)}
    timers.update({k: v[3] for k, v in results.items()})
    for f, *a in timers.values():
        jax.block_until_ready(f(*a))
    ts = {k: [] for k in timers}
    for _ in range(args.reps):
        for k, (f, *a) in timers.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts[k].append(time.perf_counter() - t)
    ms = {k: float(np.median(v)) * 1e3 for k, v in ts.items()}

    def cell(name, lib, i):
        r = results.get((name, lib))
        if r is None:
            return "-"
        return [f"{r[0]:.4f} ({100 * (r[0] / float_bpb - 1):+.2f} %)", str(r[1]),
                f"{r[2]:.1f}", f"{ms[name, lib]:.1f}"][i]  # fmt: skip

    print(f"\nfloat32: bits/byte {float_bpb:.4f}, kernels {float_bytes} B, latency "
          f"{ms['float', 'float']:.1f} ms; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    libs = "| {0} jaxslim | {0} qwix "
    head = "".join(libs.format(c) for c in ("bits/byte", "stored B", "quant. s", "latency ms"))
    print(f"| method {head}|")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        cells = [cell(name, lib, i) for i in range(4) for lib in ("jaxslim", "qwix")]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
