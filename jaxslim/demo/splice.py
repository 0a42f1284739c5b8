"""Demo section: physical channel removal (traced coupled groups) and a Net2Net widening."""

from __future__ import annotations

import time

import jax.numpy as jnp
import optax
from flax import nnx

from jaxslim.demo import data as D
from jaxslim.flax import splice as fsplice

__all__ = ["run"]


def run(data, dense, *, steps: int = 300, sparsity: float = 0.5, seed: int = 0) -> list[dict]:
    """Removes ``sparsity`` of every removable channel group of ``dense`` (a copy), fine-tunes
    for ``steps`` steps, and widens a copy of the dense model 2x by Net2WiderNet."""
    x_test, y_test = data[2], data[3]
    example = jnp.asarray(x_test[:2])
    rows = []

    t0 = time.perf_counter()
    model = nnx.clone(dense)
    before = fsplice.count_params(model)
    rep = fsplice.prune_channels_model(model, example, sparsity=sparsity)
    acc = D.accuracy(model, x_test, y_test)
    cut = time.perf_counter() - t0
    flops = f"FLOPs {rep.flops_before:,} -> {rep.flops_after:,}"
    rows.append(
        {
            "method": f"splice: remove {sparsity:.0%} of channels (L2, no fine-tune)",
            "accuracy": acc,
            "size": f"{rep.params_after:,} params",
            "seconds": cut,
            "note": f"{len(rep.groups)} groups; {flops}; dense {before:,} params",
        }
    )

    t0 = time.perf_counter()
    D.train(model, optax.adam(1e-3), data, steps=steps, seed=seed, desc="splice fine-tune")
    rows.append(
        {
            "method": f"splice: remove {sparsity:.0%} + fine-tune {steps} steps",
            "accuracy": D.accuracy(model, x_test, y_test),
            "size": f"{fsplice.count_params(model):,} params",
            "seconds": cut + time.perf_counter() - t0,
            "note": "physically smaller arrays; features updated in place",
        }
    )

    layers = _hidden_pair(dense)
    if layers is not None:
        t0 = time.perf_counter()
        wide = nnx.clone(dense)
        a, b = _hidden_pair(wide)
        fsplice.widen_model(a, b, 2 * a.out_features)
        rows.append(
            {
                "method": "splice: widen a hidden layer 2x (Net2WiderNet)",
                "accuracy": D.accuracy(wide, x_test, y_test),
                "size": f"{fsplice.count_params(wide):,} params",
                "seconds": time.perf_counter() - t0,
                "note": "function-preserving: same accuracy as dense, room to train",
            }
        )
    return rows


def _hidden_pair(model):
    """The first two consecutive layers of the demo CNN or MLP (or None for another model)."""
    if hasattr(model, "conv1") and hasattr(model, "conv2"):
        return model.conv1, model.conv2
    if hasattr(model, "layers") and len(model.layers) >= 2:
        return model.layers[0], model.layers[1]
    return None
