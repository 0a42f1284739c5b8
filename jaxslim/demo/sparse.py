"""Sparse training on MNIST-1D: a plain-JAX MLP, a scanned training loop, and 2:4 from scratch
with SR-STE vs one-shot 2:4 + fine-tuning (issue 12 §3).

The MLP is the one of ``benchmarks/bench_prune.py --mnist1d`` (``40-100-100-10``, ReLU, kernels
``(in, out)`` with ``N(0, 1/in)`` entries, zero biases), trained with Adam (learning rate ``1e-2``,
cosine-decayed to 0), batch 100, on the minibatches drawn from ``jax.random.key(seed + 100)``.
``train`` runs the whole loop as one jitted ``lax.scan``, so a run of 1500 steps takes about a
second on a laptop CPU.

``compare_24`` trains, from the same initialization and on the same minibatches, for the same
total number of steps:

- ``"SR-STE 2:4 from scratch"``: the forward pass sees ``prune.straight_through(p, 0.5,
  structure=NM(2, 4))`` (the two largest ``|w|`` of every 4 consecutive inputs), the gradient is
  the dense one plus ``decay * p`` on the pruned entries (``prune.sr_ste``, first in the chain;
  Zhou et al. 2021). The deployed weights are that masked copy of the last weights.
- ``"one-shot 2:4 + fine-tune"``: dense training for ``steps - finetune_steps``, then one-shot
  ``topk_mask(magnitude(p), 0.5, structure=NM(2, 4))`` and fine-tuning with the mask held by
  ``prune.keep_mask`` (last in the chain) for ``finetune_steps`` with a fresh cosine schedule.

Both results keep exactly 2 of every 4 consecutive entries along the input axis (axis -2) of
every kernel; biases stay dense.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxslim import prune
from jaxslim.structures import NM

__all__ = [
    "SIZES",
    "NM24",
    "NMResult",
    "mlp_init",
    "mlp_apply",
    "adam",
    "train",
    "accuracy",
    "sr_ste_24",
    "oneshot_24_finetune",
    "compare_24",
    "table",
]

SIZES: tuple[int, ...] = (40, 100, 100, 10)
"""Layer widths of the MNIST-1D MLP (``benchmarks/bench_prune.py --mnist1d``)."""

NM24 = NM(2, 4)
"""The 2:4 pattern of sparse tensor cores: 2 of every 4 consecutive inputs (axis -2) kept."""

Data = tuple[Any, Any, Any, Any]


class NMResult(NamedTuple):
    """One trained 2:4 model: ``method``, ``seed``, test ``accuracy`` in ``[0, 1]`` and the
    deployed (2:4-sparse) ``params``."""

    method: str
    seed: int
    accuracy: float
    params: optax.Params


def _check_int(fn: str, name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{fn}: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_data(fn: str, data: Any) -> Data:
    if not isinstance(data, (tuple, list)) or len(data) != 4:
        raise TypeError(
            f"{fn}: data must be (x_train, y_train, x_test, y_test) as from "
            f"jaxslim.demo.data.load_mnist1d(), got {type(data).__name__}"
        )
    x, y, xt, yt = data
    for name, a, b in (("train", x, y), ("test", xt, yt)):
        if np.ndim(a) != 2 or np.ndim(b) != 1 or np.shape(a)[0] != np.shape(b)[0]:
            raise ValueError(
                f"{fn}: data: x_{name} must be (n, features) and y_{name} (n,), got "
                f"{np.shape(a)} and {np.shape(b)}"
            )
    return tuple(jnp.asarray(a) for a in data)  # type: ignore[return-value]


def mlp_init(key: jax.Array, sizes: Sequence[int] = SIZES) -> dict[str, dict[str, jax.Array]]:
    """MLP parameters ``{"l0": {"kernel": (in, out), "bias": (out,)}, ...}``; kernels
    ``N(0, 1/in)``, biases 0.

    >>> import jax
    >>> p = mlp_init(jax.random.key(0), (8, 4, 2))
    >>> {k: v["kernel"].shape for k, v in p.items()}
    {'l0': (8, 4), 'l1': (4, 2)}
    """
    sizes = tuple(sizes)
    if len(sizes) < 2:
        raise ValueError(f"demo.sparse.mlp_init: sizes needs at least 2 widths, got {sizes!r}")
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"l{i}": {
            "kernel": jax.random.normal(k, (a, b)) * jnp.float32(a**-0.5),
            "bias": jnp.zeros(b),
        }
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    }


def mlp_apply(params: optax.Params, x: jax.Array) -> jax.Array:
    """Logits ``(batch, out)`` of ``x: (batch, in)``: ``relu(x W_i + b_i)``, linear last layer."""
    n = len(params)
    for i in range(n):
        b = params[f"l{i}"]["bias"]
        x = x @ params[f"l{i}"]["kernel"] + b.reshape((1,) * (x.ndim - 1) + b.shape)
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def adam(steps: int, learning_rate: float = 1e-2) -> optax.GradientTransformation:
    """Adam at ``learning_rate``, cosine-decayed to 0 over ``steps`` (the demo's baseline)."""
    return optax.adam(optax.cosine_decay_schedule(learning_rate, max(int(steps), 1)))


def train(
    params: optax.Params,
    tx: optax.GradientTransformation,
    data: Data,
    *,
    steps: int,
    seed: int = 0,
    start: int = 0,
    batch_size: int = 100,
    forward: Callable[[optax.Params], optax.Params] | None = None,
) -> tuple[optax.Params, optax.OptState]:
    """Trains the MLP for ``steps`` Adam-style steps with ``tx`` (one jitted ``lax.scan``).

    Minibatch ``t`` (``start <= t < start + steps``) is row ``t`` of
    ``randint(key(seed + 100), (start + steps, batch_size))``: two calls with ``start`` set
    continue one stream of minibatches. ``forward(params)`` is what the loss sees (default:
    ``params`` itself; ``prune.straight_through`` for STE/SR-STE). Returns ``(params, state)``.
    """
    fn = "demo.sparse.train"
    steps = _check_int(fn, "steps", steps, 0)
    start = _check_int(fn, "start", start, 0)
    batch_size = _check_int(fn, "batch_size", batch_size, 1)
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    idx = jax.random.randint(
        jax.random.key(seed + 100), (start + steps, batch_size), 0, x.shape[0]
    )[start:]
    view = (lambda p: p) if forward is None else forward

    def loss(p, i):
        logits = mlp_apply(view(p), x[i])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[i]).mean()

    @jax.jit
    def run(params, idx):
        def body(carry, i):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p, i), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, tx.init(params)), idx)[0]

    return run(params, idx)


def accuracy(params: optax.Params, x: Any, y: Any) -> float:
    """Top-1 accuracy of the MLP on ``(x, y)``, a float in ``[0, 1]``."""
    pred = jnp.argmax(mlp_apply(params, jnp.asarray(x)), axis=-1)
    return float(jnp.mean(pred == jnp.asarray(y)))


def sr_ste_24(
    data: Data,
    init: optax.Params,
    *,
    steps: int,
    seed: int = 0,
    learning_rate: float = 1e-2,
    decay: float = 2e-4,
    batch_size: int = 100,
) -> optax.Params:
    """2:4 from scratch with SR-STE (Zhou et al. 2021); returns the deployed 2:4 params.

    ``tx = chain(prune.sr_ste(0.5, structure=NM(2, 4), decay=decay), adam)``, loss on
    ``prune.straight_through(p, 0.5, structure=NM(2, 4))``; after ``steps`` the deployed weights
    are ``apply_mask(p, topk_mask(magnitude(p), 0.5, structure=NM(2, 4)))``, the values the last
    forward pass would see.
    """
    steps = _check_int("demo.sparse.sr_ste_24", "steps", steps, 1)
    data = _check_data("demo.sparse.sr_ste_24", data)
    tx = optax.chain(prune.sr_ste(0.5, structure=NM24, decay=decay), adam(steps, learning_rate))
    p, _ = train(
        init,
        tx,
        data,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        forward=lambda q: prune.straight_through(q, 0.5, structure=NM24),
    )
    return prune.apply_mask(p, prune.topk_mask(prune.magnitude(p), 0.5, structure=NM24))


def oneshot_24_finetune(
    data: Data,
    init: optax.Params,
    *,
    steps: int,
    finetune_steps: int,
    seed: int = 0,
    learning_rate: float = 1e-2,
    finetune_learning_rate: float = 1e-2,
    batch_size: int = 100,
) -> optax.Params:
    """Dense training, one-shot 2:4 magnitude pruning, fine-tuning with the mask held.

    ``steps - finetune_steps`` dense steps (Adam, cosine from ``learning_rate``), then
    ``mask = topk_mask(magnitude(p), 0.5, structure=NM(2, 4))``, ``p = apply_mask(p, mask)`` and
    ``finetune_steps`` steps of ``chain(adam(finetune_learning_rate), keep_mask(mask))`` on the
    continuing minibatch stream: ``steps`` in total. Returns the fine-tuned 2:4 params.
    """
    fn = "demo.sparse.oneshot_24_finetune"
    steps = _check_int(fn, "steps", steps, 1)
    finetune_steps = _check_int(fn, "finetune_steps", finetune_steps, 0)
    if finetune_steps > steps:
        raise ValueError(
            f"{fn}: finetune_steps must be <= steps (the total), got {finetune_steps} > {steps}"
        )
    data = _check_data(fn, data)
    dense_steps = steps - finetune_steps
    p = init
    if dense_steps:
        p, _ = train(
            p,
            adam(dense_steps, learning_rate),
            data,
            steps=dense_steps,
            seed=seed,
            batch_size=batch_size,
        )
    mask = prune.topk_mask(prune.magnitude(p), 0.5, structure=NM24)
    p = prune.apply_mask(p, mask)
    if finetune_steps:
        tx = optax.chain(adam(finetune_steps, finetune_learning_rate), prune.keep_mask(mask))
        p, _ = train(
            p,
            tx,
            data,
            steps=finetune_steps,
            seed=seed,
            start=dense_steps,
            batch_size=batch_size,
        )
    return p


def compare_24(
    data: Data | None = None,
    *,
    steps: int = 1500,
    seeds: Sequence[int] = (0, 1, 2),
    finetune_fraction: float = 0.5,
    learning_rate: float = 1e-2,
    finetune_learning_rate: float = 1e-2,
    decay: float = 2e-4,
    sizes: Sequence[int] = SIZES,
    batch_size: int = 100,
) -> list[NMResult]:
    """2:4 from scratch with SR-STE vs dense + one-shot 2:4 + fine-tune, same total ``steps``.

    For each seed both start from ``mlp_init(key(seed), sizes)`` and see the same minibatches;
    the one-shot run fine-tunes for ``round(finetune_fraction * steps)`` of its steps. The
    baseline's defaults (half the steps dense, half fine-tuning at ``1e-2``) were the best of
    fractions ``0.25, 0.5`` x fine-tune rates ``1e-3, 3e-3, 1e-2`` at 1500 steps (seeds 0, 1);
    SR-STE's ``decay=2e-4`` is the paper's value and the best of ``0, 2e-4, 2e-3, 2e-2`` there
    (67.1, 67.9, 66.7, 63.6 %). Also reports the dense model trained for ``steps`` (the
    reference). ``data`` defaults to ``jaxslim.demo.data.load_mnist1d(0)``. Every kernel's input
    width must be a multiple of 4.

    Returns ``NMResult(method, seed, accuracy, params)`` rows, methods ``"dense"``,
    ``"SR-STE 2:4 from scratch"`` and ``"one-shot 2:4 + fine-tune"``, in seed order.
    """
    fn = "demo.sparse.compare_24"
    steps = _check_int(fn, "steps", steps, 1)
    seeds = list(seeds) if not isinstance(seeds, (int, np.integer)) else [seeds]
    if not seeds:
        raise ValueError(f"{fn}: seeds must be a non-empty sequence of ints, got {seeds!r}")
    for s in seeds:
        _check_int(fn, "each seed", s, 0)
    if isinstance(finetune_fraction, bool) or not 0 <= finetune_fraction <= 1:
        raise ValueError(f"{fn}: finetune_fraction must be in [0, 1], got {finetune_fraction!r}")
    sizes = tuple(sizes)
    bad = [a for a in sizes[:-1] if a % 4]
    if len(sizes) < 2 or bad:
        raise ValueError(
            f"{fn}: sizes {sizes!r}: every kernel's input width (all but the last size) must be "
            f"a multiple of 4 for the 2:4 pattern along the inputs; got {bad}"
        )
    if data is None:
        from jaxslim.demo.data import load_mnist1d  # noqa: PLC0415

        data = load_mnist1d(0)
    data = _check_data(fn, data)
    if data[0].shape[1] != sizes[0]:
        raise ValueError(
            f"{fn}: sizes[0] must equal the number of input features, got sizes[0]={sizes[0]} "
            f"for x_train of shape {tuple(data[0].shape)}"
        )
    ft = round(finetune_fraction * steps)
    xt, yt = data[2], data[3]
    out = []
    for seed in seeds:
        init = mlp_init(jax.random.key(seed), sizes)
        dense, _ = train(
            init, adam(steps, learning_rate), data, steps=steps, seed=seed, batch_size=batch_size
        )
        sr = sr_ste_24(
            data,
            init,
            steps=steps,
            seed=seed,
            learning_rate=learning_rate,
            decay=decay,
            batch_size=batch_size,
        )
        os_ = oneshot_24_finetune(
            data,
            init,
            steps=steps,
            finetune_steps=ft,
            seed=seed,
            learning_rate=learning_rate,
            finetune_learning_rate=finetune_learning_rate,
            batch_size=batch_size,
        )
        for method, p in (
            ("dense", dense),
            ("SR-STE 2:4 from scratch", sr),
            ("one-shot 2:4 + fine-tune", os_),
        ):
            out.append(NMResult(method, int(seed), accuracy(p, xt, yt), p))
    return out


def table(results: Sequence[NMResult]) -> str:
    """A Markdown table: per method, the mean test accuracy and the per-seed values.

    >>> print(table([NMResult("dense", 0, 0.5, None), NMResult("dense", 1, 0.7, None)]))
    | method | test accuracy, mean | per seed |
    |---|---|---|
    | dense | 60.0 % | 50.0, 70.0 |
    """
    by: dict[str, list[float]] = {}
    for r in results:
        by.setdefault(r.method, []).append(r.accuracy)
    lines = ["| method | test accuracy, mean | per seed |", "|---|---|---|"]
    for method, v in by.items():
        per = ", ".join(f"{100 * a:.1f}" for a in v)
        lines.append(f"| {method} | {100 * float(np.mean(v)):.1f} % | {per} |")
    return "\n".join(lines)
