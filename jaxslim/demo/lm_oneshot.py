"""Demo section: one-shot pruning (magnitude, Wanda, SparseGPT, SparseGPT + int4) with
``prune.oneshot``, on the LM workbench (bits per byte) and on the MNIST-1D CNN (accuracy).

Each row prunes the dense model once, at one sparsity / pattern, from calibration data of the
training split, with no fine-tuning: 50 %, 60 %, 70 % unstructured (per output) and 2:4, 4:8
along the inputs. Every method is calibrated once on the dense model (``sequential=False``: one
forward pass per batch, so the grid fits a laptop CPU); the rows ``"sparsegpt seq"`` calibrate
each kernel on the outputs of the pruned earlier ones, as in the paper (one pass per kernel).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxslim import prune, quant
from jaxslim._checks import at_leaf
from jaxslim.quant import QuantSpec
from jaxslim.structures import NM, Structure, Unstructured

__all__ = ["run", "run_cnn", "int4_rtn", "SETTINGS", "METHODS", "LM_WHERE"]

#: (label, sparsity, structure) of each column.
SETTINGS: tuple[tuple[str, float, Structure], ...] = (
    ("50%", 0.5, Unstructured()),
    ("60%", 0.6, Unstructured()),
    ("70%", 0.7, Unstructured()),
    ("2:4", 0.5, NM(2, 4)),
    ("4:8", 0.5, NM(4, 8)),
)
SETTINGS_ALL = tuple(s[0] for s in SETTINGS)
METHODS = ("magnitude", "wanda", "sparsegpt", "sparsegpt+int4", "sparsegpt seq")
#: The attention and MLP kernels of ``demo.lm`` (not the tied embedding / output head).
LM_WHERE = r"blocks/.*/(attn/(q|k|v|o)|mlp/(gate|up|down))$"


def int4_rtn(path: str, w: jax.Array):
    """Per-output symmetric int4 round-to-nearest for SparseGPT's ``quant=`` (``prune.oneshot``).

    ``w`` is the dense ``(K, N)`` kernel; the scale of output ``j`` is ``max_k |w_kj| / 7.5``
    (``quant.qparams`` of ``QuantSpec(4, axis=-1)``) and each input row ``(N,)`` is quantized
    with ``quant.fake_quant_affine`` on ``[-8, 7]``.
    """
    spec = QuantSpec(4, axis=-1)
    with at_leaf(path):
        scale, zero = quant.qparams(w.astype(jnp.float32), spec)
    scale, zero = scale.reshape(-1), zero.reshape(-1)

    def q(row, k):
        return quant.fake_quant_affine(row, scale, zero, spec.qmin, spec.qmax)

    return q


def _oneshot(fn, params, calib, sparsity, structure, method, where):
    if method.startswith("sparsegpt"):
        record = prune.SparseGPT(quant=int4_rtn if method.endswith("int4") else None)
    else:
        record = method
    seq = method.endswith("seq")
    return prune.oneshot(
        fn, params, calib, sparsity, method=record, structure=structure, where=where, sequential=seq
    )


def _grid(fn, params, calib, where, score, methods, settings, seq_settings):
    rows = []
    for method in methods:
        for label, sparsity, structure in settings:
            if method.endswith("seq") and label not in seq_settings:
                continue
            t0 = time.perf_counter()
            w = where(structure) if callable(where) else where
            new, rep = _oneshot(fn, params, calib, sparsity, structure, method, w)
            errs = [r.error for r in rep.rows]
            rows.append(
                {
                    "method": method,
                    "setting": label,
                    "score": score(new),
                    "sparsity": rep.sparsity,
                    "mean_error": float(np.mean(errs)),
                    "seconds": time.perf_counter() - t0,
                }
            )
    return rows


def run(
    dense_model: nnx.Module,
    train: np.ndarray,
    windows: jax.Array,
    *,
    calib_sequences: int = 32,
    batch: int = 16,
    methods: Sequence[str] = METHODS,
    settings: Sequence[tuple[str, float, Structure]] = SETTINGS,
    seq_settings: Sequence[str] = ("50%", "2:4"),
) -> list[dict[str, Any]]:
    """One-shot pruning of the LM workbench's attention and MLP kernels; bits per byte.

    Args:
      dense_model: a trained ``demo.lm.LM`` (not modified).
      train: the training bytes (calibration windows are taken from them).
      windows: the validation windows ``(n, seq + 1)`` that bits per byte is measured on.
      calib_sequences: calibration sequences of 128 bytes (``lm.eval_windows(train, 128,
        n)[:, :-1]``), in batches of ``batch``.
      methods, settings: the grid (``METHODS``, ``SETTINGS``); ``"sparsegpt seq"`` (sequential
        calibration, one forward per kernel) runs only at the settings in ``seq_settings``.

    Returns:
      Rows ``{"method", "setting", "score" (bits per byte), "sparsity" (of the pruned kernels),
      "mean_error" (mean relative layer reconstruction error), "seconds"}``, the dense model
      first (method ``"dense"``).
    """
    from jaxslim.demo import lm

    fn, params = lm.apply_fn(dense_model)
    calib_w = lm.eval_windows(train, 128, calib_sequences)[:, :-1]
    calib = [calib_w[i : i + batch] for i in range(0, calib_sequences, batch)]

    # One jitted evaluation taking the params as an argument: compiled once for the grid,
    # where a closure over each pruned tree would compile (with its weights as constants) per row.
    nats = jax.jit(lambda p, w: lm.next_byte_loss(fn(p, w[:, :-1]), w))

    def score(p):
        return float(nats(p, windows)) / math.log(2)

    dense = {"method": "dense", "setting": "-", "score": score(params), "sparsity": 0.0,
             "mean_error": 0.0, "seconds": 0.0}  # fmt: skip
    return [dense, *_grid(fn, params, calib, LM_WHERE, score, methods, settings, seq_settings)]


def run_cnn(
    dense_model: nnx.Module,
    data,
    *,
    calib_examples: int = 512,
    methods: Sequence[str] = METHODS,
    settings: Sequence[tuple[str, float, Structure]] = SETTINGS,
    seq_settings: Sequence[str] = SETTINGS_ALL,
) -> list[dict[str, Any]]:
    """The same grid on the MNIST-1D CNN (``demo.data``); ``score`` is test accuracy.

    Every conv and dense kernel is pruned (``where=None``: floating leaves of ndim >= 2 that
    feed a matmul or convolution; biases are kept), except ``conv1`` under N:M (its 5 inputs are
    not a multiple of ``m``); calibration is the first
    ``calib_examples`` training inputs in batches of 128.
    """
    graphdef, params, rest = nnx.split(dense_model, nnx.Param, ...)
    x_test, y_test = jnp.asarray(data[2]), jnp.asarray(data[3])

    def fn(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    xs = jnp.asarray(data[0][:calib_examples])
    calib = [xs[i : i + 128] for i in range(0, calib_examples, 128)]
    acc = jax.jit(lambda p: jnp.mean(jnp.argmax(fn(p, x_test), -1) == y_test))

    def score(p):
        return float(acc(p))

    dense = {"method": "dense", "setting": "-", "score": score(params), "sparsity": 0.0,
             "mean_error": 0.0, "seconds": 0.0}  # fmt: skip

    def where(structure):  # conv1 has 5 inputs (a 5-tap kernel, 1 channel): not N:M-able
        return r"^(?!conv1/).*kernel$" if isinstance(structure, NM) else None

    return [dense, *_grid(fn, params, calib, where, score, methods, settings, seq_settings)]


def table(rows: list[dict[str, Any]], metric: str) -> str:
    """A markdown table: one row per method, one column per setting, ``metric`` in the cells."""
    settings = list(dict.fromkeys(r["setting"] for r in rows if r["method"] != "dense"))
    dense = next(r["score"] for r in rows if r["method"] == "dense")
    lines = [
        f"| method ({metric}) | " + " | ".join(settings) + " |",
        "|---" * (len(settings) + 1) + "|",
        f"| dense | {dense:.4f}" + " |" * len(settings),
    ]
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        cells = {r["setting"]: f"{r['score']:.4f}" for r in rows if r["method"] == m}
        lines.append(f"| {m} | " + " | ".join(cells.get(s, "-") for s in settings) + " |")
    return "\n".join(lines)


def main(steps: int = 400) -> None:
    """``python -m jaxslim.demo.lm_oneshot``: trains the workbench LM (``dim=96``, 4 layers) for
    ``steps`` steps and the MNIST-1D CNN (3000 steps), then prints both grids as JSON and tables
    (the numbers in ``notebooks/oneshot.ipynb``)."""
    import json

    from jaxslim.demo import data as D
    from jaxslim.demo import lm

    train, valid, _ = lm.load_corpus()
    cfg = lm.LMConfig(dim=96, layers=4, kv_heads=2, groups=2, head_dim=24, hidden=256)
    model = lm.train(lm.LM(cfg, rngs=nnx.Rngs(0)), train, steps=steps)
    rows = run(model, train, lm.eval_windows(valid, 128, 64))
    print(json.dumps(rows))
    print(table(rows, "bits/byte"))
    data = D.load_mnist1d()
    cnn = D.make_model("cnn")
    D.train(cnn, D.baseline_optimizer(3000), data, steps=3000, batch_size=D.BATCH_SIZE)
    rows = run_cnn(cnn, data)
    print(json.dumps(rows))
    print(table(rows, "accuracy"))


if __name__ == "__main__":
    main()
