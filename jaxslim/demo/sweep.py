"""Architecture sweep: activation x depth x seeds on MNIST-1D, many variants trained at once.

The recipe (no new API, just ``jax.vmap``): a model is a pure function of a parameter pytree, the
activation is a *traced* index into a ``lax.switch`` table, and the seed is the params' leading
axis. For one depth every (activation, seed) variant has the same shapes, so one ``jit``-compiled
step trains all of them together: ``vmap`` over the stacked params, the activation indices and the
optimizer states. A sweep over ``A`` activations, ``D`` depths and ``S`` seeds compiles ``D`` steps
and makes ``D * steps`` calls, where a Python loop over variants makes ``A * D * S * steps``.

Depth moves without training from scratch: ``grow`` inserts a ``splice.deepen`` identity layer
(exact for ReLU, an idempotent activation) and ``shrink`` removes a hidden layer with
``splice.drop_layer``; a short fine-tune follows.

Model (Flax layout, kernels ``(in, out)``): ``h_0 = x`` of shape ``(batch, 40)``,
``h_i = act(h_{i-1} W_i + b_i)`` for ``depth`` hidden layers of ``width`` units, logits
``h_depth W_out + b_out``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxslim import splice

__all__ = [
    "ACTIVATIONS",
    "init_mlp",
    "apply_mlp",
    "train_sweep",
    "train_loop",
    "grow",
    "shrink",
    "count_params",
    "run",
]

ACTIVATIONS: dict[str, Any] = {
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "elu": jax.nn.elu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
}
"""The activations of the sweep, in ``lax.switch`` order."""


def init_mlp(key: jax.Array, depth: int, width: int = 64, din: int = 40, dout: int = 10) -> dict:
    """``{"layers": [{"kernel": (in, out), "bias": (out,)}, ...], "head": {...}}``, LeCun normal."""
    sizes = [din, *[width] * depth]
    keys = jax.random.split(key, depth + 1)

    def dense(k, a, b):
        w = jax.random.normal(k, (a, b)) * jnp.sqrt(jnp.float32(1.0 / a))
        return {"kernel": w, "bias": jnp.zeros((b,))}

    layers = [
        dense(keys[i], a, b) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    ]
    return {"layers": layers, "head": dense(keys[-1], sizes[-1], dout)}


def apply_mlp(params: dict, x: jax.Array, activation: jax.Array | int) -> jax.Array:
    """Logits ``(batch, dout)``; ``activation`` is an index into ``ACTIVATIONS`` (may be traced)."""
    fns = list(ACTIVATIONS.values())
    h = x
    for layer in params["layers"]:
        z = h @ layer["kernel"] + layer["bias"][None, :]
        h = jax.lax.switch(activation, fns, z)
    return h @ params["head"]["kernel"] + params["head"]["bias"][None, :]


def _loss(params, activation, x, y):
    logits = apply_mlp(params, x, activation)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _optimizer(steps: int, learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1)))


def _batches(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """``(steps, batch_size)`` minibatch indices, the same for every variant."""
    return np.random.default_rng(seed).integers(0, n, (steps, batch_size))


def _step_fn(tx):
    def step(params, opt_state, activation, x, y):
        grads = jax.grad(_loss)(params, activation, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def train_sweep(
    data,
    activations: Sequence[str],
    depth: int,
    seeds: Sequence[int],
    *,
    steps: int,
    width: int = 64,
    batch_size: int = 100,
    learning_rate: float = 1e-2,
    params: dict | None = None,
) -> tuple[dict, np.ndarray]:
    """Trains every ``(activation, seed)`` variant of one depth at once with one compiled step.

    Returns ``(params, act_index)``: params stacked on a leading variant axis of size
    ``len(activations) * len(seeds)`` (activation-major) and the activation index of each
    variant. ``params`` (stacked the same way) continues training instead of a fresh init.
    """
    names = list(ACTIVATIONS)
    acts = np.repeat([names.index(a) for a in activations], len(seeds)).astype(np.int32)
    keys = jnp.stack([jax.random.key(s) for _ in activations for s in seeds])
    if params is None:
        params = jax.vmap(lambda k: init_mlp(k, depth, width))(keys)
    tx = _optimizer(steps, learning_rate)
    opt_state = jax.vmap(tx.init)(params)
    step = jax.jit(jax.vmap(_step_fn(tx), in_axes=(0, 0, 0, None, None)), donate_argnums=(0, 1))
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    acts_j = jnp.asarray(acts)
    for idx in _batches(x.shape[0], steps, batch_size, 0):
        params, opt_state = step(params, opt_state, acts_j, x[idx], y[idx])
    return params, acts


def train_loop(
    data,
    activation: str,
    depth: int,
    seed: int,
    *,
    steps: int,
    width: int = 64,
    batch_size: int = 100,
    learning_rate: float = 1e-2,
) -> dict:
    """One variant, trained alone: the Python-loop baseline ``train_sweep`` is measured against."""
    params = init_mlp(jax.random.key(seed), depth, width)
    tx = _optimizer(steps, learning_rate)
    opt_state = tx.init(params)
    step = jax.jit(_step_fn(tx), donate_argnums=(0, 1))
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    act = jnp.int32(list(ACTIVATIONS).index(activation))
    for idx in _batches(x.shape[0], steps, batch_size, 0):
        params, opt_state = step(params, opt_state, act, x[idx], y[idx])
    return params


def grow(params: dict) -> dict:
    """One hidden layer more: a ``splice.deepen`` identity after the last hidden layer.

    Exact (same logits) for ReLU models; works on params stacked on a leading variant axis.
    """
    w = params["layers"][-1]["kernel"]
    kernel, bias = splice.deepen(w.shape[-1], "relu", dtype=w.dtype)
    lead = w.shape[:-2]
    new = {
        "kernel": jnp.broadcast_to(kernel, (*lead, *kernel.shape)),
        "bias": jnp.broadcast_to(bias, (*lead, *bias.shape)),
    }
    return {"layers": [*params["layers"], new], "head": params["head"]}


def shrink(params: dict, index: int = -1) -> dict:
    """One hidden layer fewer: ``splice.drop_layer`` on a width-to-width hidden layer."""
    n = len(params["layers"])
    index = index % n
    if index == 0:
        raise ValueError("sweep.shrink: the first layer maps the input to the width; drop another")
    return splice.drop_layer(params, f"layers/{index}")


def count_params(params: dict) -> int:
    """Entries of one variant (for stacked params, divide by the variant count)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _accuracy(params, acts, x, y) -> np.ndarray:
    logits = jax.jit(jax.vmap(apply_mlp, in_axes=(0, None, 0)))(params, x, acts)
    return np.asarray(jnp.mean(jnp.argmax(logits, -1) == y, axis=-1))


def run(
    data,
    *,
    activations: Sequence[str] = tuple(ACTIVATIONS),
    depths: Sequence[int] = (1, 2, 3, 4),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 1000,
    width: int = 64,
    loop_variants: int = 3,
) -> dict[str, Any]:
    """The sweep and its timing: vmapped per depth vs a Python loop over ``loop_variants``.

    Returns ``{"rows": [{activation, depth, params, accuracy (mean over seeds), std}],
    "sweep_seconds", "loop_seconds_per_variant", "variants", "speedup"}``; the loop time is
    measured on ``loop_variants`` variants and extrapolated to all of them.
    """
    x_test, y_test = jnp.asarray(data[2]), jnp.asarray(data[3])
    rows = []
    t0 = time.perf_counter()
    for depth in depths:
        params, acts = train_sweep(data, activations, depth, seeds, steps=steps, width=width)
        acc = _accuracy(params, acts, x_test, y_test).reshape(len(activations), len(seeds))
        n = count_params(params) // (len(activations) * len(seeds))
        for a, row in zip(activations, acc, strict=True):
            rows.append(
                {
                    "activation": a,
                    "depth": depth,
                    "params": n,
                    "accuracy": float(row.mean()),
                    "std": float(row.std()),
                }
            )
    sweep_seconds = time.perf_counter() - t0
    variants = len(activations) * len(depths) * len(seeds)
    t0 = time.perf_counter()
    for i in range(loop_variants):
        p = train_loop(
            data,
            activations[i % len(activations)],
            depths[i % len(depths)],
            i,
            steps=steps,
            width=width,
        )
    jax.block_until_ready(p)
    per_variant = (time.perf_counter() - t0) / loop_variants
    return {
        "rows": rows,
        "sweep_seconds": sweep_seconds,
        "loop_seconds_per_variant": per_variant,
        "variants": variants,
        "speedup": per_variant * variants / sweep_seconds,
    }
