"""Forward latency of the width-pruned LM workbench decoder vs the dense one.

The workbench decoder (``jaxslim.demo.lm``, d=256, 4 layers, 8 query / 4 key-value heads, MLP
768) is cut to 50 % width (MLP hidden, residual channels, query heads per key-value group) by
``jaxslim.demo.lm_report.width_prune``; both are timed side by side (paired, median) at batch
1 x 128 and 32 x 128 tokens. ``speed-up / FLOP cut`` is 1.0 when time falls as fast as FLOPs.
Weights are random: latency does not depend on their values.
"""

from __future__ import annotations

import os
import platform
import time

import jax
import numpy as np
from flax import nnx

from jaxslim import splice
from jaxslim.demo import lm, lm_report

REPS = int(os.environ.get("REPS", "20"))


def _timer(model, tokens):
    fwd = nnx.jit(lambda m, t: m(t))
    fwd(model, tokens).block_until_ready()

    def run():
        t0 = time.perf_counter()
        fwd(model, tokens).block_until_ready()
        return time.perf_counter() - t0

    return run


def main() -> None:
    cfg = lm.LMConfig(dim=256, layers=4, kv_heads=4, groups=2, head_dim=32, hidden=768)
    dense = lm.LM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    calib = jax.numpy.asarray(rng.integers(0, 256, (8, 128)), jax.numpy.int32)
    small, _ = lm_report.width_prune(dense, calib, keep=0.5)
    cpu = platform.processor() or platform.machine()
    print(
        f"jax {jax.__version__}, {jax.default_backend()} ({cpu}), {os.cpu_count()} CPUs; "
        f"median of {REPS} paired runs"
    )
    print(f"dense: {lm_report._describe(cfg)}; {lm.count_params(dense):,} params")
    scfg = lm.config_of(nnx.state(small, nnx.Param))
    print(f"pruned: {lm_report._describe(scfg)}; {lm.count_params(small):,} params")
    print()
    print("| batch x tokens | dense ms | pruned ms | speed-up | FLOP cut | speed-up / FLOP cut |")
    print("|---|---|---|---|---|---|")
    for batch in (1, 32):
        tokens = jax.numpy.asarray(rng.integers(0, 256, (batch, 128)), jax.numpy.int32)
        fd, pd = lm.apply_fn(dense)
        fs, ps = lm.apply_fn(small)
        cut = splice.count_flops(fd, pd, tokens) / splice.count_flops(fs, ps, tokens)
        a, b = _timer(dense, tokens), _timer(small, tokens)
        ta, tb = [], []
        for _ in range(REPS):
            ta.append(a())
            tb.append(b())
        da, db = 1e3 * np.median(ta), 1e3 * np.median(tb)
        print(
            f"| {batch} x 128 | {da:.2f} | {db:.2f} | {da / db:.2f}x | {cut:.2f}x "
            f"| {da / db / cut:.2f} |"
        )


if __name__ == "__main__":
    main()
