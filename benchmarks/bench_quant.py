"""Quantization benchmark: bytes f32 vs int8/int4/int2, and qdot_general vs a float32 dot.

Run: ``python benchmarks/bench_quant.py``. Byte counts come from ``quant.quantize`` traced with
``jax.eval_shape`` (no 400 MB allocation); timings are medians over paired, interleaved runs.
"""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxslim import quant
from jaxslim.quant import QuantSpec
from jaxslim.quant._dot import COLUMNS_MIN_ROWS, INT_MIN_ROWS

SPECS = {
    "int8 per-channel": QuantSpec(8, axis=-1),
    "int4 group-32": QuantSpec(4, axis=-1, group_size=32),
    "int2 group-32": QuantSpec(2, axis=-1, group_size=32),
}


def tree_bytes(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    out = {"float32": sum(4 * int(np.prod(s)) for s in shapes.values())}
    for name, spec in SPECS.items():
        total = 0
        for shape in shapes.values():
            spec = SPECS[name]
            x = jax.ShapeDtypeStruct(shape, jnp.float32)
            if spec.group_size and shape[-2] % spec.group_size:  # fall back to per-channel
                spec = QuantSpec(spec.bits, axis=-1)
            q = jax.eval_shape(lambda x, spec=spec: quant.quantize(x, spec), x)
            total += q.nbytes
        out[name] = total
    return out


def bytes_table() -> str:
    from flax import nnx

    from jaxslim.demo.data import make_model

    demo = {
        "/".join(map(str, p)): tuple(v.shape)
        for p, v in nnx.to_flat_state(nnx.state(make_model("cnn"), nnx.Param))
        if len(v.shape) >= 2
    }
    # ~100M parameters: 8 transformer-like blocks of 1024-wide kernels and a 32000-row embedding.
    big = {f"block{i}/{k}": (1024, 1024) for i in range(8) for k in ("q", "k", "v", "o")}
    big |= {f"block{i}/mlp_in": (1024, 2048) for i in range(8)}
    big |= {f"block{i}/mlp_out": (2048, 1024) for i in range(8)}
    big |= {"embed": (32000, 1024 - 1024 % 32)}
    lines = [
        "| tree | params | " + " | ".join(["float32", *SPECS]) + " |",
        "|---|---|" + "---|" * (1 + len(SPECS)),
    ]
    for name, shapes in [("MNIST-1D CNN kernels", demo), ("100M-parameter tree", big)]:
        b = tree_bytes(shapes)
        n = sum(int(np.prod(s)) for s in shapes.values())
        unit, div = ("KiB", 2**10) if b["float32"] < 2**20 else ("MiB", 2**20)
        cells = [f"{b['float32'] / div:.1f} {unit}"] + [
            f"{b[k] / div:.1f} {unit} ({b['float32'] / b[k]:.1f}x)" for k in SPECS
        ]
        lines.append(f"| {name} | {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _time(f, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t0


def dot_table(
    k: int = 4096,
    n: int = 4096,
    reps: int = int(os.environ.get("REPS", 7)),
    ms: tuple[int, ...] = tuple(int(m) for m in os.environ.get("MS", "1,8,64,512").split(",")),
) -> str:
    """Median time of each path and its median paired ratio to the float32 dot."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(k, n)).astype(np.float32))
    wq = quant.quantize(w, QuantSpec(8, axis=-1))
    dn = (((1,), (0,)), ((), ()))
    act = QuantSpec(8, axis=0)
    wg = quant.quantize(w, QuantSpec(4, axis=-1, group_size=128))

    def qdot(impl, lhs_spec=None):
        return jax.jit(lambda x, q: quant.qdot_general(x, q, dn, lhs_spec=lhs_spec, impl=impl))

    fns = {
        "f32": jax.jit(lambda x, w: lax.dot_general(x, w, dn)),
        "int8 dequantize": qdot("dequantize"),
        "int8 blocked": qdot("blocked"),
        "int8 columns": qdot("columns"),
        "int8 auto": qdot("auto"),
        "W8A8 int8 x int8": qdot("int", act),
        "W8A8 auto": qdot("auto", act),
        "int4 g128 dequantize": qdot("dequantize"),
        "int4 g128 blocked": qdot("blocked"),
        "int4 g128 columns": qdot("columns"),
        "int4 g128 auto": qdot("auto"),
    }
    cols = list(fns)
    lines = [
        "| M | " + " | ".join(f"{c} ms (x f32)" for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for m in ms:
        x = jnp.asarray(rng.normal(size=(m, k)).astype(np.float32))
        args = {name: (x, wg if name.startswith("int4") else wq) for name in fns} | {"f32": (x, w)}
        for name, f in fns.items():
            _time(f, *args[name])  # compile + warm up
        times = {name: [] for name in fns}
        for _ in range(reps):  # paired: every variant once per round
            for name, f in fns.items():
                times[name].append(_time(f, *args[name]))
        base = np.array(times["f32"])
        cells = [
            f"{np.median(t) * 1e3:.1f} ({np.median(np.array(t) / base):.2f}x)"
            for t in times.values()
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__}, backend "
        f"{jax.default_backend()}, auto: W8A8 int path from {INT_MIN_ROWS.get('cpu')} rows, "
        f"weight-only columns path from {COLUMNS_MIN_ROWS.get('cpu')} rows (rows path below)"
    )


if __name__ == "__main__":
    print(machine())
    print()
    if not os.environ.get("DOT_ONLY"):
        print(bytes_table())
        print()
    print(
        "qdot_general, K = N = 4096: int8 per-channel / int4 group-128 weights (weight-only); "
        "'W8A8' columns quantize the activations per row (token) on the fly"
    )
    print(dot_table())
