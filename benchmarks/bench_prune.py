"""Pruning benchmarks: ratios measured side by side in one run.

1. Train-step time with ``pruner``, ``rigl`` and ``set_sparse`` vs the same step with plain optax
   Adam (MLPs 40-128-128-10 and 784-1024-1024-10, CNN; jitted, donated buffers, 40 interleaved
   paired runs, median ratio). Targets: ``pruner`` <= 1.03x, RigL/SET between updates <= 1.05x,
   a step that updates the masks <= 3x a plain step. ``--only MLP`` runs this table alone.
2. Global magnitude threshold at 90 % over 50M parameters: jaxslim's sort-free bisection vs one
   ``sum(abs(p))`` pass and vs a ``jnp.sort``-based threshold.
3. ``--mnist1d``: test accuracy of sparse training on MNIST-1D (dense, lottery ticket vs the same
   mask re-initialized, RigL / SET / static / gradual magnitude at 90 % and 95 %).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxslim import prune
from jaxslim.demo import sparse as sparse_demo


def _time(f, *args, reps):
    jax.block_until_ready(f(*args))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        out.append(time.perf_counter() - t0)
    return out


def mlp_params(key, sizes):
    keys = jax.random.split(key, len(sizes))
    return {
        f"l{i}": {"kernel": jax.random.normal(k, (a, b)) * a**-0.5, "bias": jnp.zeros(b)}
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=False))
    }


def mlp_apply(p, x):
    n = len(p)
    for i in range(n):
        x = x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
        x = jax.nn.relu(x) if i < n - 1 else x
    return x


def cnn_params(key, c=64, length=64):
    k = jax.random.split(key, 4)
    return {
        "c1": {"kernel": jax.random.normal(k[0], (5, 1, c)) * 0.3, "bias": jnp.zeros(c)},
        "c2": {"kernel": jax.random.normal(k[1], (3, c, c)) * 0.1, "bias": jnp.zeros(c)},
        "c3": {"kernel": jax.random.normal(k[2], (3, c, c)) * 0.1, "bias": jnp.zeros(c)},
        "head": {
            "kernel": jax.random.normal(k[3], (c * length // 8, 10)) * 0.05,
            "bias": jnp.zeros(10),
        },
    }


def cnn_apply(p, x):
    x = x[..., None]
    for name in ("c1", "c2", "c3"):
        x = jax.lax.conv_general_dilated(
            x, p[name]["kernel"], (2,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
        )
        x = jax.nn.relu(x + p[name]["bias"])
    return x.reshape(x.shape[0], -1) @ p["head"]["kernel"] + p["head"]["bias"]


def _set_count(state, count):
    """``state`` with the step count of its pruner / sparse-training state set to ``count``."""
    kinds = (prune.PrunerState, prune.SparseState)
    return jax.tree.map(
        lambda x: x._replace(count=jnp.int32(count)) if isinstance(x, kinds) else x,
        state,
        is_leaf=lambda x: isinstance(x, kinds),
    )


def _extra_hlo(f, *args) -> int:
    """Instructions of the compiled program outside fusion bodies, nested computations included
    (e.g. the untaken mask-update branch: XLA:CPU pays a little per step for each of its
    buffers)."""
    count, inside_fusion = 0, False
    for line in f.lower(*args).compile().as_text().splitlines():
        if line.startswith(("%", "ENTRY")):  # a computation's header
            inside_fusion = line.startswith(("%fused", "%wrapped"))
        elif " = " in line and not inside_fusion:
            count += 1
    return count


def train_step_table(reps, only=None):
    """Rows ``(model, transform, optax ms, ms, wall ratio, CPU-time ratio, update ms, update ratio,
    extra HLO)``: each transform's train step vs plain Adam's, interleaved, medians of paired
    ratios. The timed steps are between mask updates; "update" is one step that updates masks."""
    rows = []
    key = jax.random.key(0)
    cases = {
        "MLP 40-128-128-10, batch 128": (
            mlp_params(key, [40, 128, 128, 10]),
            mlp_apply,
            jax.random.normal(key, (128, 40)),
        ),
        "MLP 784-1024-1024-10, batch 128": (
            mlp_params(key, [784, 1024, 1024, 10]),
            mlp_apply,
            jax.random.normal(key, (128, 784)),
        ),
        "CNN 3x64ch conv1d, batch 128": (
            cnn_params(key),
            cnn_apply,
            jax.random.normal(key, (128, 64)),
        ),
    }
    every = 10_000  # mask updates at steps 0 and every `every` steps: none while timing
    for name, (params, apply, x) in cases.items():
        if only is not None and only not in name:
            continue
        y = jnp.zeros(x.shape[0], jnp.int32)

        def make(tx, apply=apply, y=y, donate=True):
            def step(params, state, x):
                def loss(p):
                    return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

                g = jax.grad(loss)(params)
                u, state = tx.update(g, state, params)
                return optax.apply_updates(params, u), state

            # buffers donated, as a training loop does: the step updates its state in place
            return jax.jit(step, donate_argnums=(0, 1) if donate else ())

        sparse = dict(update_every=every, end_step=10 * every)
        txs = {
            "optax": optax.adam(1e-3),
            "pruner": optax.chain(
                optax.adam(1e-3),
                prune.pruner(prune.polynomial_schedule(0.9, 0, 10 * every, frequency=every)),
            ),
            "rigl": prune.rigl(0.9, optimizer=optax.adam(1e-3), **sparse),
            "set_sparse": optax.chain(optax.adam(1e-3), prune.set_sparse(0.9, **sparse)),
        }
        runs, extra = {}, {}
        for label, tx in txs.items():
            f = make(tx)
            extra[label] = _extra_hlo(f, params, tx.init(params), x)
            p, s = f(jax.tree.map(jnp.copy, params), tx.init(params), x)  # past step 0: the
            p, s = f(p, s, x)  # timed steps are the common, non-update steps
            runs[label] = [f, p, s]
        wall = {label: [] for label in runs}
        cpu = {label: [] for label in runs}
        for _ in range(reps):  # alternate them, 5 steps each, carrying the state
            for label, run in runs.items():
                f, p, s = run
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(5):
                    p, s = f(p, s, x)
                jax.block_until_ready(p)
                wall[label].append((time.perf_counter() - t0) / 5)
                cpu[label].append((time.process_time() - c0) / 5)
                run[1], run[2] = p, s
        tb = statistics.median(wall["optax"])

        def paired(times, label):
            return statistics.median(
                [a / b for a, b in zip(times[label], times["optax"], strict=True)]
            )

        for label, tx in txs.items():
            if label == "optax":
                continue
            # one step that updates the masks (step 0 for pruner, `every` for RigL/SET)
            fu = make(tx, donate=False)
            state = _set_count(tx.init(params), 0 if label == "pruner" else every)
            tu = statistics.median(_time(fu, params, state, x, reps=max(3, reps // 5)))
            rows.append(
                (
                    name,
                    label,
                    tb * 1e3,
                    statistics.median(wall[label]) * 1e3,
                    paired(wall, label),
                    paired(cpu, label),
                    tu * 1e3,
                    tu / tb,
                    extra[label] - extra["optax"],
                )
            )
    return rows


def threshold_table(n_params, reps):
    # Measured by bench_select.py (run as a script from benchmarks/, as `make bench` does), which
    # also times the exact radix select the sample bracket replaced.
    from bench_select import measure

    total, best = measure(int(n_params), reps)
    return total, best["one sum(abs(p)) pass"], best["topk_mask(global)"], best["jnp.sort"]


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return (
        f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    )


# --- sparse training on MNIST-1D (issue 12) -------------------------------------------------------


def mnist1d_table(
    steps: int, seeds: int, *, lottery_full: bool = False, lottery_only: bool = False
):
    """Test accuracy on MNIST-1D of lottery tickets and sparse training, mean over ``seeds``.

    Lottery ticket, the MNIST-1D paper's protocol (greydanus/mnist1d,
    ``notebooks/lottery-tickets.ipynb`` and ``notebooks/train.py``): its ``SparseMLP``
    40-500-500-10 with a residual second layer (``h + relu(W2 h)``), PyTorch's default
    ``Linear`` init, Adam(2e-2) at a constant rate, batch 100 taken in order, ``steps`` steps per
    round; IMP that prunes the weights and biases of all three layers, layer-wise, by magnitude,
    rewinding to the initialization (step 0). The paper runs 100 rounds,
    ``np.linspace(0, 1, 100)`` (~1 % more per round), and reads the ticket near 90 %:
    ``lottery_full`` runs those rounds up to 90.9 % (round 90); the default runs 10 rounds of
    20.6 % each (``1 - 0.1 ** (1 / 10)``, Frankle & Carbin's ~20 %) to exactly 90 %. Compared
    with the dense run from the same init and the ticket's mask on a fresh init ("re-init").
    Differences from the paper: each leaf (kernel, bias) is ranked on its own rather than one
    vector per layer; counts round half-even rather than truncate.

    Sparse training (skipped by ``lottery_only``): MLP 40-100-100-10, Adam(1e-2, cosine), random
    batches of 100: RigL / SET / static random / gradual magnitude (``pruner``) at 90 % and 95 %.
    """
    from jaxslim.demo.data import load_mnist1d

    xtr, ytr, xte, yte = (jnp.asarray(a) for a in load_mnist1d(0))
    results: dict[str, list[float]] = {}

    def add(name, value):
        results.setdefault(name, []).append(value)

    # --- lottery ticket, the paper's protocol
    def torch_init(key, sizes):  # torch.nn.Linear: weight and bias ~ U(-1/sqrt(in), 1/sqrt(in))
        keys = jax.random.split(key, 2 * len(sizes))
        return {
            f"l{i}": {
                "kernel": jax.random.uniform(
                    keys[2 * i], (a, b), minval=-(a**-0.5), maxval=a**-0.5
                ),
                "bias": jax.random.uniform(
                    keys[2 * i + 1], (b,), minval=-(a**-0.5), maxval=a**-0.5
                ),
            }
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
        }

    def sparse_mlp(p, x):  # the notebook's SparseMLP.forward
        h = jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"])
        h = h + jax.nn.relu(h @ p["l1"]["kernel"] + p["l1"]["bias"])
        return h @ p["l2"]["kernel"] + p["l2"]["bias"]

    batch = 100
    in_order = (jnp.arange(steps)[:, None] * batch + jnp.arange(batch)[None]) % xtr.shape[0]

    def paper_train(params, masks):
        tx = optax.chain(optax.adam(2e-2), prune.keep_mask(masks))

        def loss(p, i):
            logits = sparse_mlp(p, xtr[i])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ytr[i]).mean()

        def body(carry, i):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p, i), s, p)
            return (optax.apply_updates(p, u), s), None

        run = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), in_order)[0][0])
        return run(params), None

    def paper_acc(p):
        return float(jnp.mean(jnp.argmax(sparse_mlp(p, xte), -1) == yte))

    if lottery_full:
        schedule = dict(sparsities=[float(v) for v in np.linspace(0, 1, 100)[1:91]])
        tag = "90.9 %, paper: 90 rounds of ~1 %"
    else:
        schedule = dict(rounds=10, sparsity_per_round=1 - 0.1 ** (1 / 10))
        tag = "90 %, 10 rounds of 20.6 %"
    wide = [40, 500, 500, 10]
    for seed in range(seeds):
        init = torch_init(jax.random.key(seed), wide)
        rounds = prune.lottery(paper_train, init, where=r"kernel|bias", **schedule)
        ticket = rounds[-1]
        add("SparseMLP 40-500-500-10 (paper), dense", paper_acc(rounds[0].params))
        add(f"lottery ticket {tag}, rewind to init", paper_acc(ticket.params))
        reinit = prune.apply_mask(torch_init(jax.random.key(seed + 1000), wide), ticket.masks)
        add(f"same mask, re-initialized ({tag})", paper_acc(paper_train(reinit, ticket.masks)[0]))
    if lottery_only:
        return results

    # --- sparse training from scratch, MLP 40-100-100-10
    sizes = [40, 100, 100, 10]

    def acc(p):
        return float(jnp.mean(jnp.argmax(mlp_apply(p, xte), -1) == yte))

    def train(params, tx, seed):  # one jitted scan, minibatches from key(seed + 100)
        return sparse_demo.train(params, tx, (xtr, ytr), steps=steps, seed=seed)

    def adam():
        return optax.adam(optax.cosine_decay_schedule(1e-2, steps))

    for seed in range(seeds):
        init = mlp_params(jax.random.key(seed), sizes)
        p, _ = train(init, adam(), seed)
        add("MLP 40-100-100-10, dense", acc(p))
        for s in (0.9, 0.95):
            k = jax.random.key(seed + 7)
            upd = dict(update_every=50, end_step=int(0.75 * steps), key=k)
            cases = {
                "RigL (ERK)": prune.rigl(s, distribution="erk", optimizer=adam(), **upd),
                "SET (ERK)": prune.set_sparse(s, distribution="erk", optimizer=adam(), **upd),
                "static random (ERK)": optax.chain(
                    adam(), prune.static_sparse(s, distribution="erk", key=k)
                ),
                "gradual magnitude (pruner)": optax.chain(
                    adam(),
                    prune.pruner(prune.polynomial_schedule(s, 0, int(0.75 * steps), frequency=50)),
                ),
            }
            for name, tx in cases.items():
                add(f"{name} {round(s * 100)} %", acc(train(init, tx, seed)[0]))
    return results


def main_mnist1d(steps, seeds, *, lottery_full=False, lottery_only=False):
    print(f"machine: {machine()}\n")
    print(f"**MNIST-1D test accuracy, {steps} steps per run, mean of {seeds} seeds**\n")
    print("| model / method | test accuracy |")
    print("|---|---|")
    table = mnist1d_table(steps, seeds, lottery_full=lottery_full, lottery_only=lottery_only)
    for name, v in table.items():
        print(
            f"| {name} | {100 * np.mean(v):.1f} % ("
            + ", ".join(f"{100 * a:.1f}" for a in v)
            + ") |"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--only", default=None, help="train-step table only, models whose name has it")
    ap.add_argument("--mnist1d", action="store_true", help="sparse-training accuracy table only")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument(
        "--lottery-full",
        action="store_true",
        help="--mnist1d: the MNIST-1D paper's full IMP schedule (90 rounds of ~1 %%, slow)",
    )
    ap.add_argument(
        "--lottery-only", action="store_true", help="--mnist1d: the lottery-ticket rows only"
    )
    args = ap.parse_args()
    if args.mnist1d:
        return main_mnist1d(
            args.steps, args.seeds, lottery_full=args.lottery_full, lottery_only=args.lottery_only
        )
    print(f"machine: {machine()}\n")
    print(
        "**Train step: each transform last in chain vs plain optax (Adam), donated buffers, "
        f"medians of {args.reps} interleaved paired runs of 5 steps between mask updates; "
        "CPU ratio = process time (robust on a shared machine); update = one step that "
        "updates the masks; extra HLO = compiled instructions beyond Adam's**\n"
    )
    print(
        "| model | transform | optax ms | ms | ratio | CPU ratio | update step ms | "
        "update / plain | extra HLO |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, label, tb, tp, r, rc, tu, ru, n in train_step_table(args.reps, args.only):
        print(
            f"| {name} | {label} | {tb:.2f} | {tp:.2f} | {r:.3f}x | {rc:.3f}x | {tu:.2f} | "
            f"{ru:.1f}x | {n} |"
        )
    if args.only is not None:
        return None
    total, t_pass, t_ours, t_sort = threshold_table(int(args.params), max(3, args.reps // 4))
    print(f"\n**Global 90 % magnitude threshold over {total / 1e6:.1f}M parameters**\n")
    print("| method | ms | vs one sum(abs(p)) pass |")
    print("|---|---|---|")
    for name, t in (
        ("one sum(abs(p)) pass", t_pass),
        ("jaxslim topk_mask (radix select)", t_ours),
        ("jnp.sort threshold", t_sort),
    ):
        print(f"| {name} | {t * 1e3:.1f} | {t / t_pass:.1f}x |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
