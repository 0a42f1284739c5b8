"""Demo section: distill the dense CNN into a 5x smaller CNN; sparsify it with proximal steps.

Rows: a small student CNN trained on hard labels vs with ``kd_loss`` from the frozen dense teacher
(mean over seeds, Hinton et al. 2015), and the dense model fine-tuned with ``prox_l1`` (exact zero
weights) and ``prox_group_lasso`` (exact zero conv channels).

Training here is a jitted ``lax.scan`` over steps, ``vmap``-ed over seeds, so every seed of a row
trains in one compiled call. The teacher is frozen, so its logits on the training set are computed
once and looked up per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from jaxslim import regularize
from jaxslim.demo import data as D
from jaxslim.distill import kd_loss
from jaxslim.schedules import step_decay

__all__ = ["run", "fit", "stack_models", "accuracies"]

LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (logits, labels, teacher)


def hard_loss(logits, labels, teacher_logits):
    """Cross-entropy with the labels (the teacher is ignored)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def stack_models(models: Sequence[nnx.Module]):
    """``(graphdef, state)`` with every array stacked over the models on a new axis 0."""
    graphdef = nnx.graphdef(models[0])
    states = [nnx.state(m) for m in models]
    return graphdef, jax.tree.map(lambda *a: jnp.stack(a), *states)


def fit(
    graphdef,
    states,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    data,
    teacher_logits,
    *,
    steps: int,
    batch_size: int = 128,
    seeds: Sequence[int] = (0,),
):
    """Trains the stacked ``states`` (one model per seed) for ``steps`` minibatch steps each.

    Returns the trained stacked states. Seed ``k`` draws its batches from ``seeds[k]``.
    """
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    n = x.shape[0]
    idx = jnp.asarray(
        np.stack([np.random.default_rng(s).integers(0, n, (steps, batch_size)) for s in seeds]),
        jnp.int32,
    )

    def one(state, ix):
        def body(carry, i):
            p, opt = carry
            grads = jax.grad(
                lambda p: loss_fn(nnx.merge(graphdef, p)(x[i]), y[i], teacher_logits[i])
            )(p)
            updates, opt = tx.update(grads, opt, p)
            return (optax.apply_updates(p, updates), opt), None

        (state, _), _ = lax.scan(body, (state, tx.init(state)), ix)
        return state

    return jax.block_until_ready(jax.jit(jax.vmap(one))(states, idx))


def accuracies(graphdef, states, x, y) -> list[float]:
    """Test accuracy of each stacked model."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    acc = jax.jit(
        jax.vmap(
            lambda s: jnp.mean((jnp.argmax(nnx.merge(graphdef, s)(x), -1) == y).astype(jnp.float32))
        )
    )(states)
    return [float(a) for a in acc]


def _kernels(state) -> list[np.ndarray]:
    return [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state) if np.ndim(v) >= 2]


def _fmt(accs: list[float]) -> str:
    return f"{np.mean(accs):.3f} +- {np.std(accs):.3f} over {len(accs)} seeds"


def run(
    data,
    dense,
    *,
    steps: int = 3000,
    prox_steps: int = 800,
    seeds: Sequence[int] = (0, 1, 2),
    student_channels=(12, 12, 12),
    temperature: float = 4.0,
    soft_weight: float = 0.7,
    hard_weight: float = 0.3,
    l1_strength: float = 0.4,
    group_strength: float = 0.4,
) -> list[dict]:
    """Distillation and proximal-sparsity rows for the demo report (``dense`` is not modified).

    Students: Adam with a linear decay ``step_decay(1e-2, steps)``, the same seeds and batches for
    both losses. Proximal rows: ``adam(1e-3)`` then the proximal step, from the dense weights.
    """
    x_train = jnp.asarray(data[0])
    teacher = nnx.clone(dense)
    teacher_logits = jax.jit(lambda s: nnx.merge(nnx.graphdef(teacher), s)(x_train))(
        nnx.state(teacher)
    )
    n_dense = D.count_params(dense)
    rows = []

    students = [D.make_model("cnn", seed=s, channels=student_channels) for s in seeds]
    n_student = D.count_params(students[0])
    size = f"{n_student:,} params ({n_dense / n_student:.1f}x smaller)"
    graphdef, init = stack_models(students)

    def kd(s, y, t):
        return kd_loss(
            s, t, y, temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight
        )

    student_tx = optax.adam(step_decay(1e-2, steps, 1.0))
    results = {}
    for name, loss_fn in (
        ("hard labels", hard_loss),
        (f"kd_loss T={temperature:g} ({soft_weight:g} soft + {hard_weight:g} hard)", kd),
    ):
        t0 = time.perf_counter()
        trained = fit(
            graphdef, init, student_tx, loss_fn, data, teacher_logits, steps=steps, seeds=seeds
        )
        accs = accuracies(graphdef, trained, data[2], data[3])
        results[name] = accs
        rows.append(
            {
                "method": f"student CNN {'-'.join(map(str, student_channels))}, {name}",
                "accuracy": float(np.mean(accs)),
                "size": size,
                "seconds": time.perf_counter() - t0,
                "note": f"{_fmt(accs)}, {steps} Adam steps (linear decay)",
            }
        )
    hard, soft = results.values()
    rows[-1]["note"] += f"; {np.mean(soft) - np.mean(hard):+.3f} vs hard labels"

    lr = 1e-3
    dense_graph, dense_state = stack_models([teacher])
    prox = [
        ("prox_l1", regularize.prox_l1(l1_strength, lr), l1_strength),
        (
            "prox_group_lasso (conv channels)",
            regularize.prox_group_lasso(group_strength, lr, where=r"conv\d/kernel"),
            group_strength,
        ),
    ]
    for name, last, strength in prox:
        t0 = time.perf_counter()
        tx = optax.chain(optax.adam(lr), last)
        tuned = fit(
            dense_graph,
            dense_state,
            tx,
            hard_loss,
            data,
            teacher_logits,
            steps=prox_steps,
            seeds=seeds[:1],
        )
        acc = accuracies(dense_graph, tuned, data[2], data[3])[0]
        kernels = _kernels(jax.tree.map(lambda a: a[0], tuned))
        zeros = sum(int((k == 0).sum()) for k in kernels)
        total = sum(k.size for k in kernels)
        convs = [k for k in kernels if k.ndim == 3]  # (width, in, out) conv kernels
        dead = sum(int((k == 0).reshape(-1, k.shape[-1]).all(0).sum()) for k in convs)
        channels = sum(k.shape[-1] for k in convs)
        note = (
            f"strength {strength:g}, {prox_steps} Adam steps from the dense model; "
            f"{zeros / total:.1%} of kernel weights exactly 0"
        )
        if "group" in name:
            note += f", {dead}/{channels} conv channels exactly 0"
        rows.append(
            {
                "method": f"dense CNN + {name}",
                "accuracy": acc,
                "size": f"{n_dense - zeros:,} nonzero / {n_dense:,} params",
                "seconds": time.perf_counter() - t0,
                "note": note,
            }
        )
    return rows
