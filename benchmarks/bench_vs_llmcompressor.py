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
    from jaxslim.checkpoints import export_hf

    params, cfg, tok = models.load(smollm2_data.gguf_path())
    os.makedirs(directory, exist_ok=True)
    # the GGUF's tokenizer as tokenizer.json: oneshot wants a processor alongside a dataset
    export_hf(directory, params, cfg, dtype="float32", tokenizer_json=tok._tok.to_str())
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


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run(directory: str, rows: list[str], threads: int, jaxslim_json: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(threads)
    if not torch.accelerator.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations for faster host-to-device copies
        # (Tensor.pin_memory), which raises without an accelerator; on a CPU the copies it speeds
        # up never happen, so pinning is skipped (no change to what is computed).
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    calib = np.load(os.path.join(directory, "calib.npy"))
    windows = np.load(os.path.join(directory, "eval.npy"))
    with open(os.path.join(directory, "data.json")) as f:
        data = json.load(f)
    n_bytes = data["n_bytes"]
    import llmcompressor

    info = {
        "library": f"llm-compressor {llmcompressor.__version__}, torch {torch.__version__}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch.set_num_threads({threads})",
        "text": data["text"],
        "calibration": f"{calib.shape[0]} x {calib.shape[1]} tokens",
        "evaluation": f"{windows.shape[0]} disjoint windows of {windows.shape[1]} tokens, "
        f"{windows.shape[0] * (windows.shape[1] - 1)} scored, {n_bytes} UTF-8 bytes",
        "dtype": "float32 (model, calibration and evaluation)",
        "pipeline": "llm-compressor defaults (sequential pipeline, layer by layer)",
    }
    print("\n".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    out = os.path.join(HERE, "results", "smollm2_llmcompressor.json")
    # only to satisfy oneshot (the dataset is already token ids): the GGUF's tokenizer
    processor = PreTrainedTokenizerFast(tokenizer_file=os.path.join(directory, "tokenizer.json"))
    results = {}
    if os.path.exists(out):  # rows run separately accumulate
        with open(out) as f:
            results = json.load(f).get("rows", {})
    for row in rows:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        load_before = _load()
        t0 = time.perf_counter()
        try:
            if row != "dense":
                from llmcompressor import oneshot

                ds = Dataset.from_dict(
                    {"input_ids": calib.tolist(), "attention_mask": np.ones_like(calib).tolist()}
                )
                oneshot(
                    model=model,
                    dataset=ds,
                    processor=processor,
                    recipe=_recipe(row),
                    max_seq_length=calib.shape[1],
                    num_calibration_samples=calib.shape[0],
                    shuffle_calibration_samples=False,
                )
        except Exception as e:  # the table reports a failing row with its error
            results[row] = {
                "error": f"{type(e).__name__}: {e}",
                "compress_seconds": time.perf_counter() - t0,
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            print(row, "FAILED", results[row], flush=True)
            del model
            continue
        sec = time.perf_counter() - t0 if row != "dense" else 0.0
        load_after = _load()
        total, count, tps = _perplexity(model, windows)
        results[row] = {
            "perplexity": math.exp(total / count),
            "bits_per_byte": total / (math.log(2) * n_bytes),
            "compress_seconds": sec,
            "tokens_per_second": tps,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg_before_after": [load_before, load_after],
        }
        print(row, results[row], flush=True)
        del model
        with open(out, "w") as f:  # after every row, so a run cut short keeps what it measured
            json.dump({**info, "rows": results}, f, indent=1)
    with open(out, "w") as f:
        json.dump({**info, "rows": results}, f, indent=1)
    with open(jaxslim_json) as f:
        ours = {r["row"]: r for r in json.load(f)["rows"]}
    print()
    print("| row | jaxslim ppl | llm-compressor ppl | jaxslim s | llm-compressor s |")
    print("|---|---:|---:|---:|---:|")
    nan = float("nan")
    for row, r in results.items():
        j = ours.get(JAXSLIM_ROW[row], {})
        print(
            f"| {row} | {j.get('perplexity', nan):.2f} | {r.get('perplexity', nan):.2f} | "
            f"{j.get('compress_seconds', nan):.0f} | {r['compress_seconds']:.0f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["prepare", "run"])
    ap.add_argument("directory")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--jaxslim",
        default=os.path.join(HERE, "results", "smollm2.json"),
        help="bench_smollm2.py result json whose rows are printed alongside",
    )
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.directory, args.eval_tokens)
    else:
        run(args.directory, args.rows.split(","), args.threads, args.jaxslim)


if __name__ == "__main__":
    main()
