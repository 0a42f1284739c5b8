"""SmolLM2-135M-Instruct: llm-compressor (PyTorch) next to jaxslim, same tokens, same windows.

Two steps, two virtual environments (llm-compressor needs torch and its own transformers pin):

    .venv-interop/bin/python benchmarks/bench_vs_llmcompressor.py prepare /tmp/smollm2-hf
    .venv-bench/bin/python   benchmarks/bench_vs_llmcompressor.py run /tmp/smollm2-hf [--rows ...]

``prepare`` (jaxslim side) writes the float32 model that ``bench_smollm2.py`` calls "dense"
(the Q4_1 GGUF dequantized by ``models.load``) as a Hugging Face checkpoint with
``checkpoints``' ``export_hf``, and the exact calibration windows (64 x 256) and evaluation
windows (disjoint 512-token windows) of ``bench_smollm2.py`` as ``.npy``. ``run`` (torch side)
applies llm-compressor's ``oneshot`` with GPTQ W4A16 group 64 (symmetric), AWQ W4A16 group 64,
SparseGPT 50 % and Wanda 50 % to a fresh copy of that checkpoint for each row, evaluates the
perplexity on the same windows in float32, and prints it next to jaxslim's rows from
``benchmarks/results/smollm2.json``. llm-compressor's defaults are kept (its sequential pipeline,
layer by layer; jaxslim's rows calibrate on the float model, ``sequential=False``), and
``lm_head`` is ignored (tied to the embedding, which jaxslim keeps float too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = ["dense", "gptq-w4g64", "awq-w4g64", "sparsegpt-50", "wanda-50"]
JAXSLIM_ROW = {
    "dense": "dense",
    "gptq-w4g64": "w4g64-gptq",
    "awq-w4g64": "w4g64-awq",
    "sparsegpt-50": "sparsegpt-50",
    "wanda-50": "wanda-50",
}


def prepare(directory: str, eval_tokens: int) -> None:
    sys.path.insert(0, HERE)
    import smollm2_data

    from jaxslim import models
    from jaxslim.checkpoints._export_safetensors import export_hf  # not re-exported yet

    params, cfg, tok = models.load(smollm2_data.gguf_path())
    os.makedirs(directory, exist_ok=True)
    export_hf(directory, params, cfg, dtype="float32")
    calib = np.concatenate(smollm2_data.calibration_batches(tok, n=64, seq=256, batch=8))
    ids, n_bytes = smollm2_data.evaluation_ids(tok, eval_tokens)
    n = (ids.size // 512) * 512
    np.save(os.path.join(directory, "calib.npy"), calib)
    np.save(os.path.join(directory, "eval.npy"), ids[:n].reshape(-1, 512))
    with open(os.path.join(directory, "data.json"), "w") as f:
        json.dump({"n_bytes": n_bytes, "text": smollm2_data.describe()}, f)
    print(f"wrote {directory}: calib {calib.shape}, eval {n} tokens")


def _recipe(row: str):
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier

    try:
        from llmcompressor.modifiers.pruning import SparseGPTModifier
    except ImportError:  # older layout
        from llmcompressor.modifiers.obcq import SparseGPTModifier

    w4g64 = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 64,
            },
        }
    }
    if row == "gptq-w4g64":
        return GPTQModifier(config_groups=w4g64, ignore=["lm_head"])
    if row == "awq-w4g64":
        return AWQModifier(config_groups=w4g64, ignore=["lm_head"])
    if row == "sparsegpt-50":
        return SparseGPTModifier(sparsity=0.5, mask_structure="0:0", ignore=["lm_head"])
    if row == "wanda-50":
        return WandaPruningModifier(sparsity=0.5, mask_structure="0:0", ignore=["lm_head"])
    raise ValueError(row)


def _perplexity(model, windows) -> tuple[float, float, float]:
    import torch

    total, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for w in windows:
            x = torch.as_tensor(w[None, :-1].astype(np.int64))
            logits = model(input_ids=x).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            total -= float(lp[torch.arange(w.size - 1), torch.as_tensor(w[1:])].sum())
            count += w.size - 1
    sec = time.perf_counter() - t0
    return total, count, windows.size / sec


def run(directory: str, rows: list[str], threads: int) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    calib = np.load(os.path.join(directory, "calib.npy"))
    windows = np.load(os.path.join(directory, "eval.npy"))
    with open(os.path.join(directory, "data.json")) as f:
        n_bytes = json.load(f)["n_bytes"]
    import llmcompressor

    print(
        f"llm-compressor {llmcompressor.__version__}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads"
    )
    print(f"calibration {calib.shape[0]} x {calib.shape[1]}, evaluation {windows.size} tokens")
    results = {}
    for row in rows:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        t0 = time.perf_counter()
        if row != "dense":
            from llmcompressor import oneshot

            ds = Dataset.from_dict(
                {"input_ids": calib.tolist(), "attention_mask": np.ones_like(calib).tolist()}
            )
            oneshot(
                model=model,
                dataset=ds,
                recipe=_recipe(row),
                max_seq_length=calib.shape[1],
                num_calibration_samples=calib.shape[0],
                shuffle_calibration_samples=False,
            )
        sec = time.perf_counter() - t0 if row != "dense" else 0.0
        total, count, tps = _perplexity(model, windows)
        results[row] = {
            "perplexity": math.exp(total / count),
            "bits_per_byte": total / (math.log(2) * n_bytes),
            "compress_seconds": sec,
            "tokens_per_second": tps,
        }
        print(row, results[row], flush=True)
        del model
    with open(os.path.join(HERE, "results", "smollm2.json")) as f:
        ours = {r["row"]: r for r in json.load(f)["rows"]}
    print()
    print("| row | jaxslim ppl | llm-compressor ppl | jaxslim s | llm-compressor s |")
    print("|---|---:|---:|---:|---:|")
    for row, r in results.items():
        j = ours.get(JAXSLIM_ROW[row], {})
        print(
            f"| {row} | {j.get('perplexity', float('nan')):.2f} | {r['perplexity']:.2f} | "
            f"{j.get('compress_seconds', float('nan')):.0f} | {r['compress_seconds']:.0f} |"
        )
    with open(os.path.join(HERE, "results", "smollm2_llmcompressor.json"), "w") as f:
        json.dump({"rows": results}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["prepare", "run"])
    ap.add_argument("directory")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.directory, args.eval_tokens)
    else:
        run(args.directory, args.rows.split(","), args.threads)


if __name__ == "__main__":
    main()
