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
    "depth_moves",
    "run",
    "table",
    "report",
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


@jax.jit
def _correct(params, acts, x, y):
    logits = jax.vmap(apply_mlp, in_axes=(0, None, 0))(params, x, acts)
    return jnp.mean(jnp.argmax(logits, -1) == y[None, :], axis=-1)


def _accuracy(params, acts, x, y) -> np.ndarray:
    """Test accuracy ``(variants,)`` of stacked params (one compile per depth, reused)."""
    return np.asarray(_correct(params, jnp.asarray(acts), x, y))


def _relu_slice(params: dict, acts: np.ndarray) -> tuple[dict, np.ndarray]:
    """The ReLU variants of stacked params (all seeds), and their activation indices."""
    keep = acts == list(ACTIVATIONS).index("relu")
    return jax.tree.map(lambda x: x[keep], params), acts[keep]


def depth_moves(
    data,
    trained: dict[int, tuple[dict, np.ndarray]],
    *,
    steps: int,
    width: int = 64,
    seeds: Sequence[int] = (0,),
) -> dict[str, Any]:
    """Moves trained ReLU models between depths instead of training them from scratch.

    ``trained`` maps a depth to ``train_sweep``'s ``(params, act_index)`` (ReLU among the
    activations). ``grow`` (``splice.deepen``) takes the shallowest depth ``d`` to ``d + 1`` and
    must leave every logit unchanged; ``shrink`` (``splice.drop_layer``) takes the deepest depth
    ``D >= 2`` to ``D - 1``, then fine-tunes it for ``steps // 2`` steps (all seeds at once).

    Returns ``{"grow": {"from", "to", "max_logit_change", "accuracy"}, "shrink": {"from", "to",
    "accuracy_before", "accuracy_dropped", "accuracy_tuned", "tune_steps", "scratch_accuracy"}}``
    (accuracies are means over seeds; ``scratch_accuracy`` is depth ``D - 1`` trained from scratch
    for ``steps`` steps, ``None`` when that depth was not trained); ``shrink`` is ``None`` when no
    depth >= 2 was trained.
    """
    x_test, y_test = jnp.asarray(data[2]), jnp.asarray(data[3])
    apply = jax.vmap(apply_mlp, in_axes=(0, None, 0))
    d0, d1 = min(trained), max(trained)

    params, acts = _relu_slice(*trained[d0])
    before = apply(params, x_test, jnp.asarray(acts))
    grown = grow(params)
    after = apply(grown, x_test, jnp.asarray(acts))
    out: dict[str, Any] = {
        "grow": {
            "from": d0,
            "to": d0 + 1,
            "max_logit_change": float(jnp.max(jnp.abs(after - before))),
            "accuracy": float(_accuracy(grown, acts, x_test, y_test).mean()),
        },
        "shrink": None,
    }
    if d1 < 2:
        return out
    params, acts = _relu_slice(*trained[d1])
    dropped = shrink(params)
    scratch = None
    if d1 - 1 in trained:
        scratch = float(_accuracy(*_relu_slice(*trained[d1 - 1]), x_test, y_test).mean())
    out["shrink"] = {
        "from": d1,
        "to": d1 - 1,
        "accuracy_before": float(_accuracy(params, acts, x_test, y_test).mean()),
        "accuracy_dropped": float(_accuracy(dropped, acts, x_test, y_test).mean()),
        "tune_steps": max(1, steps // 2),
        "scratch_accuracy": scratch,
    }
    # train_sweep donates its params: hand it a copy, `dropped` shares arrays with `trained`.
    tuned, _ = train_sweep(
        data,
        ["relu"],
        d1 - 1,
        seeds,
        steps=out["shrink"]["tune_steps"],
        width=width,
        params=jax.tree.map(jnp.copy, dropped),
    )
    out["shrink"]["accuracy_tuned"] = float(_accuracy(tuned, acts, x_test, y_test).mean())
    return out


def run(
    data,
    *,
    activations: Sequence[str] = tuple(ACTIVATIONS),
    depths: Sequence[int] = (1, 2, 3, 4),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 1000,
    width: int = 64,
    loop_variants: int = 3,
    moves: bool = True,
) -> dict[str, Any]:
    """The sweep and its timing: vmapped per depth vs a Python loop over ``loop_variants``.

    Returns ``{"rows": [{activation, depth, params, accuracy (mean over seeds), std}],
    "sweep_seconds", "loop_seconds_per_variant", "variants", "speedup", "loop_variants",
    "steps", "width", "seeds", "moves"}``; the loop time is measured on ``loop_variants``
    variants (``train_loop``: one jit per variant, as a plain loop over a config grid) and
    extrapolated to all of them. ``moves`` is ``depth_moves`` on the trained ReLU variants
    (``None`` when ``moves`` is false or ReLU is not swept).
    """
    if loop_variants < 1:
        raise ValueError(
            f"sweep.run: loop_variants must be >= 1 (it times the loop), got {loop_variants}"
        )
    x_test, y_test = jnp.asarray(data[2]), jnp.asarray(data[3])
    rows, trained = [], {}
    t0 = time.perf_counter()
    for depth in depths:
        params, acts = train_sweep(data, activations, depth, seeds, steps=steps, width=width)
        acc = _accuracy(params, acts, x_test, y_test).reshape(len(activations), len(seeds))
        trained[depth] = (params, acts)
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
    found = None
    if moves and "relu" in activations:
        found = depth_moves(data, trained, steps=steps, width=width, seeds=seeds)
    return {
        "rows": rows,
        "sweep_seconds": sweep_seconds,
        "loop_seconds_per_variant": per_variant,
        "variants": variants,
        "speedup": per_variant * variants / sweep_seconds,
        "loop_variants": loop_variants,
        "steps": steps,
        "width": width,
        "seeds": list(seeds),
        "moves": found,
    }


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per activation, one column per depth (its parameter count in the header),
    cells ``mean +- std`` test accuracy over the seeds."""
    rows = result["rows"]
    depths = list(dict.fromkeys(r["depth"] for r in rows))
    params = {r["depth"]: r["params"] for r in rows}
    cell = {(r["activation"], r["depth"]): f"{r['accuracy']:.3f} +- {r['std']:.3f}" for r in rows}
    lines = [
        "| activation | " + " | ".join(f"depth {d} ({params[d]:,} params)" for d in depths) + " |",
        "|---|" + "---:|" * len(depths),
    ]
    for a in dict.fromkeys(r["activation"] for r in rows):
        lines.append(f"| {a} | " + " | ".join(cell.get((a, d), "-") for d in depths) + " |")
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    """The demo section (Markdown): the accuracy-vs-parameters table, the wall-clock saving of
    the vmapped sweep over a Python loop, and the depth moves (``depth_moves``)."""
    r = result
    n_act = len(dict.fromkeys(row["activation"] for row in r["rows"]))
    n_depth = len(dict.fromkeys(row["depth"] for row in r["rows"]))
    loop_total = r["loop_seconds_per_variant"] * r["variants"]
    lines = [
        f"MLP width {r['width']}, {r['steps']} Adam steps (batch 100), test accuracy: mean +- std "
        f"over {len(r['seeds'])} seeds.",
        "",
        table(r),
        "",
        f"Wall clock: {r['variants']} variants ({n_act} activations x {n_depth} depths x "
        f"{len(r['seeds'])} seeds) vmapped, one compiled step per depth: "
        f"{r['sweep_seconds']:.1f} s; a Python loop (one jit per variant) "
        f"{r['loop_seconds_per_variant']:.2f} s per variant (measured on {r['loop_variants']}), "
        f"{loop_total:.0f} s for all: {r['speedup']:.1f}x faster vmapped.",
    ]
    m = r.get("moves")
    if m:
        g = m["grow"]
        lines += [
            "",
            f"- grow (splice.deepen) relu depth {g['from']} -> {g['to']}: max |logit change| "
            f"{g['max_logit_change']:.1e}, accuracy {g['accuracy']:.3f} (unchanged)",
        ]
        s = m["shrink"]
        if s:
            scratch = (
                f"; depth {s['to']} from scratch, {r['steps']} steps: {s['scratch_accuracy']:.3f}"
                if s["scratch_accuracy"] is not None
                else ""
            )
            lines.append(
                f"- shrink (splice.drop_layer) relu depth {s['from']} -> {s['to']}: accuracy "
                f"{s['accuracy_before']:.3f} -> {s['accuracy_dropped']:.3f} after the drop -> "
                f"{s['accuracy_tuned']:.3f} after {s['tune_steps']} fine-tune steps{scratch}"
            )
    return "\n".join(lines)
