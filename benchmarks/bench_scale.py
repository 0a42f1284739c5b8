"""Block-streamed compression of a Llama-3.2-1B-shaped checkpoint (issue 19): memory and time.

Run: ``python benchmarks/bench_scale.py [--blocks 16] [--cache /tmp/jaxslim-bench-scale]``.

Writes once (into ``--cache``, never committed) a checkpoint with Llama-3.2-1B's shapes and
random bf16 weights: ``--blocks`` decoder layers (16 in the real model), d 2048, 32 query / 8 kv
heads of 64, MLP 8192, vocab 128256, tied embeddings, two safetensors shards written tensor by
tensor (a few rows at a time: bounded memory). Then, each in a fresh process (so its peak RSS is
its own), ``models.compress_streamed`` with 32 x 512 calibration tokens:

* GPTQ W4A16, group 128 (``quant.GPTQ()``, ``QuantSpec(4, axis=-1, group_size=128)``);
* SparseGPT 50 % unstructured (``prune.SparseGPT()``);

and prints the memory estimate, seconds per block and per kernel, and the peak RSS against one
block's float32 weights. Last, the resume check: SparseGPT again into a new directory, the process
killed (SIGKILL) once ``--kill-at`` blocks are done, restarted, and every output file compared
byte for byte with the uninterrupted run's. Targets on a 2-core CPU: completes; peak RSS <= 2 GiB
above one block's float weights; <= 30 min per method (``--blocks`` < 16: extrapolated per block).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np

SHAPE = dict(hidden=2048, heads=32, kv_heads=8, head_dim=64, mlp=8192, vocab=128256)
SEQ, SAMPLES, BATCH = 512, 32, 4


def _config(blocks: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": SHAPE["hidden"],
        "intermediate_size": SHAPE["mlp"],
        "num_hidden_layers": blocks,
        "num_attention_heads": SHAPE["heads"],
        "num_key_value_heads": SHAPE["kv_heads"],
        "head_dim": SHAPE["head_dim"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "vocab_size": SHAPE["vocab"],
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }


def _tensors(blocks: int) -> list[tuple[str, tuple[int, ...]]]:
    d, f, v = SHAPE["hidden"], SHAPE["mlp"], SHAPE["vocab"]
    q, kv = SHAPE["heads"] * SHAPE["head_dim"], SHAPE["kv_heads"] * SHAPE["head_dim"]
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(blocks):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (q, d)),
            (p + "self_attn.k_proj.weight", (kv, d)),
            (p + "self_attn.v_proj.weight", (kv, d)),
            (p + "self_attn.o_proj.weight", (d, q)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
        ]
    return out + [("model.norm.weight", (d,))]


def _write_shard(path: str, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """A safetensors file written tensor by tensor, 4096 rows at a time (bf16, N(0, 0.02);
    norms 1)."""
    import ml_dtypes

    header, offset = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path + ".partial", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape in tensors:
            if len(shape) == 1:
                f.write(np.ones(shape, ml_dtypes.bfloat16).tobytes())
                continue
            for r in range(0, shape[0], 4096):
                rows = min(4096, shape[0] - r)
                chunk = rng.standard_normal((rows, shape[1]), np.float32) * np.float32(0.02)
                f.write(chunk.astype(ml_dtypes.bfloat16).tobytes())
    os.replace(path + ".partial", path)


def write_checkpoint(root: str, blocks: int) -> str:
    d = os.path.join(root, f"llama-1b-shaped-{blocks}")
    if os.path.exists(os.path.join(d, "config.json")):
        return d
    os.makedirs(d, exist_ok=True)
    t0 = time.perf_counter()
    tensors = _tensors(blocks)
    cut = 1 + 9 * (blocks // 2)  # embedding and the first half of the layers in shard 1
    shards = [tensors[:cut], tensors[cut:]]
    index = {}
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        _write_shard(os.path.join(d, name), part, seed=i)
        index |= {n: name for n, _ in part}
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(_config(blocks), f)
    size = sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d))
    print(f"wrote {d}: {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
    return d


def _method(name: str) -> dict:
    from jaxslim import prune, quant

    if name == "gptq":
        spec = quant.QuantSpec(4, axis=-1, group_size=128)
        return dict(quant_rules=spec, quant_method=quant.GPTQ())
    return dict(sparsity=0.5, prune_method=prune.SparseGPT())


def child(ckpt: str, out: str, method: str) -> None:
    """One streamed run; prints one JSON line of figures."""
    from jaxslim import calibrate
    from jaxslim.models._stream import compress_streamed

    ids = np.random.default_rng(7).integers(0, SHAPE["vocab"], (SAMPLES, SEQ), dtype=np.int32)
    t0 = time.perf_counter()
    res = compress_streamed(ckpt, out, ids, batch_size=BATCH, **_method(method))
    total = time.perf_counter() - t0
    kernels: dict[str, list[float]] = {}
    for reps in res.reports.values():
        for rep in reps:
            for row in getattr(rep, "rows", ()):
                kernels.setdefault(row.path, []).append(row.seconds)
    print(
        "RESULT "
        + json.dumps(
            {
                "total": total,
                "blocks": res.seconds,
                "kernels": {k: float(np.median(v)) for k, v in kernels.items()},
                "peak_rss": calibrate.peak_rss(),
                "resumed": list(res.resumed),
            }
        ),
        flush=True,
    )


def _spawn(ckpt: str, out: str, method: str) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", method, "--ckpt", ckpt, "--out", out]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen) -> dict:
    text, _ = p.communicate()
    if p.returncode:
        raise SystemExit(f"child failed ({p.returncode})")
    line = next(x for x in text.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _block_floats() -> int:
    d, f = SHAPE["hidden"], SHAPE["mlp"]
    q, kv = SHAPE["heads"] * SHAPE["head_dim"], SHAPE["kv_heads"] * SHAPE["head_dim"]
    return 4 * (d * q * 2 + 2 * d * kv + 3 * d * f + 2 * d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--cache", default=os.environ.get("JAXSLIM_BENCH_CACHE", "/tmp/jaxslim-scale"))
    ap.add_argument("--kill-at", type=int, default=None)
    ap.add_argument("--methods", default="gptq,sparsegpt")
    ap.add_argument("--child")
    ap.add_argument("--ckpt")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.child:
        return child(a.ckpt, a.out, a.child)
    load = os.getloadavg()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; python {platform.python_version()}"
    )
    ckpt = write_checkpoint(a.cache, a.blocks)
    one = _block_floats()
    print(f"one block's float32 weights: {one / 2**30:.3f} GiB; calibration {SAMPLES} x {SEQ}")
    results = {}
    for m in a.methods.split(","):
        out = os.path.join(a.cache, f"out-{m}-{a.blocks}")
        shutil.rmtree(out, ignore_errors=True)
        r = results[m] = _result(_spawn(ckpt, out, m))
        per = list(r["blocks"].values())
        print(f"\n{m}: {r['total']:.0f} s for {a.blocks} blocks (extrapolated to 16: "
              f"{r['total'] / a.blocks * 16 / 60:.1f} min)")  # fmt: skip
        print(f"  s/block: first {per[0]:.1f}, median {np.median(per):.1f}, max {max(per):.1f}")
        print("  s/kernel (method only, median over blocks): " + ", ".join(
            f"{k} {v:.2f}" for k, v in r["kernels"].items()))  # fmt: skip
        above = (r["peak_rss"] - one) / 2**30
        print(f"  peak RSS {r['peak_rss'] / 2**30:.2f} GiB = one block's float weights + "
              f"{above:.2f} GiB (target <= 2)")  # fmt: skip
    kill_at = a.kill_at or max(1, a.blocks // 2)
    if "sparsegpt" in results and kill_at < a.blocks:
        out = os.path.join(a.cache, f"out-sparsegpt-{a.blocks}-resumed")
        shutil.rmtree(out, ignore_errors=True)
        p = _spawn(ckpt, out, "sparsegpt")
        manifest = os.path.join(out, "manifest.json")
        while p.poll() is None:
            try:
                with open(manifest) as f:
                    if len(json.load(f)["done"]) >= kill_at:
                        p.send_signal(signal.SIGKILL)
                        break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        p.communicate()
        with open(manifest) as f:
            killed = len(json.load(f)["done"])
        r = _result(_spawn(ckpt, out, "sparsegpt"))
        ref = os.path.join(a.cache, f"out-sparsegpt-{a.blocks}")
        files = sorted(os.listdir(ref))
        same = files == sorted(os.listdir(out)) and all(
            open(os.path.join(ref, n), "rb").read() == open(os.path.join(out, n), "rb").read()
            for n in files
        )
        print(f"\nresume: killed after {killed} blocks, restarted: {len(r['resumed'])} read back, "
              f"{len(r['blocks'])} computed in {r['total']:.0f} s; {len(files)} files "
              f"{'identical, byte for byte' if same else 'DIFFER'}; restarted process peak RSS "
              f"{r['peak_rss'] / 2**30:.2f} GiB")  # fmt: skip
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
