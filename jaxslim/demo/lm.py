"""The LM workbench: a byte-level Llama-style decoder on an offline corpus, measured in bits/byte.

The corpus is CPython's ``pydoc_data.topics`` (the text of ``help()``; it ships with every
Python, about 465 K characters of English documentation), read as UTF-8 bytes: the vocabulary is
the 256 byte values and the metric is validation **bits per byte** (cross-entropy in bits, averaged
over every predicted byte). Nothing is downloaded; the report records the corpus hash and the
Python version, since the text changes between Python releases.

The model is a small Llama (Touvron et al. 2023): pre-norm RMSNorm, rotary position embeddings,
grouped-query attention, a SwiGLU MLP and tied input/output embeddings, written in Flax NNX. Every
size lives in a parameter shape, not in a config field, so a model whose arrays were cut by
``jaxslim.splice`` runs as it is:

* ``attn/q``: ``(dim, kv_heads, groups, head_dim)``, ``attn/k``, ``attn/v``: ``(dim, kv_heads,
  head_dim)``, ``attn/o``: ``(kv_heads, groups, head_dim, dim)`` — a query head is
  ``(kv, group)``; ``heads = kv_heads * groups`` query heads share ``kv_heads`` key/value heads;
* ``mlp/gate``, ``mlp/up``: ``(dim, hidden)``, ``mlp/down``: ``(hidden, dim)``;
* ``embed``: ``(256, dim)``, norms ``(dim,)``.

The blocks are an ``nnx.List`` (state paths ``blocks/0/attn/q`` ...), or, with
``LMConfig(scan_layers=True)``, one :class:`Block` whose every array has a leading layer axis
(``blocks/attn/q``: ``(layers, dim, kv_heads, groups, head_dim)``), created under ``nnx.vmap``
and run under ``nnx.scan`` as in Flax's "scan over layers" guide: one compiled block, whatever
the depth. Both forms compute the same function of the same weights
(:func:`stack_layers` / :func:`unstack_layers` convert between them). Depth pruning takes
:func:`block_specs`: ``splice.drop_layer(params, "blocks/2")`` for the list,
``splice.drop_layer(params, "blocks", index=2)`` for the stack.

>>> cfg = LMConfig(dim=32, layers=2, kv_heads=2, groups=2, head_dim=8, hidden=64)
>>> model = LM(cfg, rngs=nnx.Rngs(0))
>>> model(jnp.zeros((3, 16), jnp.int32)).shape
(3, 16, 256)
>>> config_of(nnx.state(model, nnx.Param)) == cfg
True
>>> scanned = LM(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(0))
>>> nnx.state(scanned, nnx.Param)["blocks"]["attn"]["q"].shape
(2, 32, 2, 2, 8)
>>> config_of(nnx.state(scanned, nnx.Param)).scan_layers
True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxslim._checks import caller, public

__all__ = [
    "LMConfig",
    "LM",
    "Block",
    "load_corpus",
    "config_of",
    "batches",
    "train",
    "train_together",
    "default_optimizer",
    "bits_per_byte",
    "apply_fn",
    "next_byte_loss",
    "rebuild",
    "eval_windows",
    "count_params",
    "stack_layers",
    "unstack_layers",
    "block_specs",
]


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Sizes of the workbench decoder. ``heads = kv_heads * groups`` query heads.

    ``scan_layers=True`` stacks the blocks' arrays on a leading layer axis and runs them under
    ``nnx.scan`` (see the module docstring); ``False`` keeps an ``nnx.List`` of blocks.
    """

    dim: int = 128
    layers: int = 4
    kv_heads: int = 2
    groups: int = 2
    head_dim: int = 32
    hidden: int = 384
    vocab: int = 256
    rope_base: float = 10_000.0
    eps: float = 1e-6
    scan_layers: bool = False

    @property
    def heads(self) -> int:
        return self.kv_heads * self.groups


# --------------------------------------------------------------------------------------- data


@public("lm.load_corpus")
def load_corpus(valid_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(train_bytes, valid_bytes, info)`` from ``pydoc_data.topics`` (uint8 arrays).

    Topics are joined in sorted key order; the last ``valid_fraction`` of the bytes is the
    validation split. ``info`` has ``sha256`` of the whole corpus, ``bytes`` and ``python``.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    cut = int(len(data) * (1 - valid_fraction))
    info = {
        "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
        "bytes": int(len(data)),
        "python": sys.version.split()[0],
    }
    return data[:cut].copy(), data[cut:].copy(), info


def batches(data: np.ndarray, batch: int, seq: int, *, seed: int = 0) -> Iterator[jax.Array]:
    """Endless random windows of ``seq + 1`` bytes: ``(batch, seq + 1)`` int32 arrays."""
    rng = np.random.default_rng(seed)
    while True:
        start = rng.integers(0, len(data) - seq - 1, batch)
        yield jnp.asarray(np.stack([data[s : s + seq + 1] for s in start]).astype(np.int32))


@public("lm.eval_windows")
def eval_windows(data: np.ndarray, seq: int, count: int) -> jax.Array:
    """``count`` evenly spaced, fixed windows of ``seq + 1`` bytes (the validation set)."""
    starts = np.linspace(0, len(data) - seq - 1, count).astype(int)
    return jnp.asarray(np.stack([data[s : s + seq + 1] for s in starts]).astype(np.int32))


# -------------------------------------------------------------------------------------- model


def _rope(x: jax.Array, base: float) -> jax.Array:
    """Rotary embedding on the last axis of ``x: (batch, seq, ..., head_dim)`` (halves paired)."""
    seq, half = x.shape[1], x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = jnp.arange(seq, dtype=jnp.float32)[:, None] * freq[None, :]
    shape = (1, seq) + (1,) * (x.ndim - 3) + (half,)
    cos, sin = jnp.cos(angle).reshape(shape), jnp.sin(angle).reshape(shape)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis; ``scale: (dim,)``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        ms = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        scale = self.scale[...]
        return x * jax.lax.rsqrt(ms + self.eps) * scale.reshape((1,) * (x.ndim - 1) + scale.shape)


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in))


class Attention(nnx.Module):
    """Causal grouped-query attention with RoPE on queries and keys."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        d, kv, g, hd = cfg.dim, cfg.kv_heads, cfg.groups, cfg.head_dim
        self.q = _init(rngs, (d, kv, g, hd), d)
        self.k = _init(rngs, (d, kv, hd), d)
        self.v = _init(rngs, (d, kv, hd), d)
        self.o = _init(rngs, (kv, g, hd, d), kv * g * hd)
        self.rope_base = cfg.rope_base

    def __call__(self, x):
        q = jnp.einsum("btd,dkgh->btkgh", x, self.q[...])
        k = jnp.einsum("btd,dkh->btkh", x, self.k[...])
        v = jnp.einsum("btd,dkh->btkh", x, self.v[...])
        q, k = _rope(q, self.rope_base), _rope(k, self.rope_base)
        logits = jnp.einsum("btkgh,bskh->bkgts", q, k) / math.sqrt(q.shape[-1])
        seq = x.shape[1]
        causal = jnp.tril(jnp.ones((1, 1, 1, seq, seq), jnp.bool_))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
        return jnp.einsum("btkgh,kghd->btd", out, self.o[...])


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(x @ gate) * (x @ up))``."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.gate = _init(rngs, (cfg.dim, cfg.hidden), cfg.dim)
        self.up = _init(rngs, (cfg.dim, cfg.hidden), cfg.dim)
        self.down = _init(rngs, (cfg.hidden, cfg.dim), cfg.hidden)

    def __call__(self, x):
        return (jax.nn.silu(x @ self.gate[...]) * (x @ self.up[...])) @ self.down[...]


class Block(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.eps)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


@nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
def _scan(x: jax.Array, block: Block) -> jax.Array:
    return block(x)


@nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
def _scan_hiddens(x: jax.Array, block: Block) -> tuple[jax.Array, jax.Array]:
    y = block(x)
    return y, y


def _stacked_blocks(cfg: LMConfig, rngs: nnx.Rngs) -> Block:
    """``cfg.layers`` blocks as one :class:`Block` with a leading layer axis on every array."""

    @nnx.split_rngs(splits=cfg.layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs)

    return make(rngs)


class LM(nnx.Module):
    """Byte-level decoder: ``tokens (batch, seq) int -> logits (batch, seq, 256)``.

    ``hiddens=True`` also returns the residual stream before every block and after the last one
    (``layers + 1`` arrays of ``(batch, seq, dim)``), what ``splice.block_influence`` reads.
    With ``cfg.scan_layers`` the blocks are one stacked :class:`Block` run under ``nnx.scan``
    (the hidden states are the scan's per-layer outputs); the depth is the leading axis of the
    arrays, so a state cut by ``splice.drop_layer(..., index=i)`` runs after ``nnx.update``.
    """

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab, cfg.dim)) * 0.02)
        if cfg.scan_layers:
            self.blocks = _stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.layers)])
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.scan_layers = cfg.scan_layers

    def __call__(self, tokens, *, hiddens: bool = False):
        embed = self.embed[...]
        x = embed[tokens]
        hs = [x]
        if self.scan_layers and hiddens:
            x, ys = _scan_hiddens(x, self.blocks)
            hs.extend(ys[i] for i in range(ys.shape[0]))
        elif self.scan_layers:
            x = _scan(x, self.blocks)
        else:
            for block in self.blocks:
                x = block(x)
                hs.append(x)
        logits = self.norm(x) @ embed.T
        return (logits, hs) if hiddens else logits


def _value(x: Any) -> Any:
    return x.get_value() if hasattr(x, "get_value") else x


def _is_stack(blocks: Any) -> bool:
    """Whether an LM state's ``blocks`` node is the scanned form (named keys, not ``0 .. n-1``)."""
    return hasattr(blocks, "keys") and "attn" in blocks.keys()


def _pure(params: Any) -> dict:
    """``params`` as a pure dict (``nnx.to_pure_dict`` of a State); checks ``blocks`` is there."""
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else dict(params.items())
    if "blocks" not in pure:
        raise ValueError(
            f"{caller()}: params has no 'blocks' (keys {sorted(map(str, pure))}); pass the "
            "nnx.Param state of an LM, nnx.state(model, nnx.Param), or its pure dict"
        )
    return pure


@public("lm.stack_layers")
def stack_layers(params: Any) -> dict:
    """The list-form LM state (``blocks/0/...``, ``blocks/1/...``) as the scanned form
    (``blocks/...`` with block ``i`` at index ``i`` of a new leading axis), a pure dict.

    ``LM(dataclasses.replace(cfg, scan_layers=True), ...)`` updated with it computes the same
    function as the list model (see :func:`unstack_layers` for the way back).

    >>> m = LM(LMConfig(dim=8, layers=3, kv_heads=1, groups=2, head_dim=4, hidden=8),
    ...        rngs=nnx.Rngs(0))
    >>> stack_layers(nnx.state(m, nnx.Param))["blocks"]["mlp"]["gate"].shape
    (3, 8, 8)
    """
    pure = _pure(params)
    blocks = pure["blocks"]
    if _is_stack(blocks):
        raise ValueError(
            "lm.stack_layers: params['blocks'] is already a scanned stack (keys "
            f"{sorted(blocks)}); unstack_layers is the way back"
        )
    keys = sorted(blocks)
    pure["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(blocks[k] for k in keys))
    return pure


@public("lm.unstack_layers")
def unstack_layers(params: Any) -> dict:
    """The scanned-form LM state as the list form (``blocks/0/...``), a pure dict: index ``i``
    of every stacked array becomes block ``i``."""
    pure = _pure(params)
    stack = pure["blocks"]
    if not _is_stack(stack):
        raise ValueError(
            "lm.unstack_layers: params['blocks'] is not a scanned stack (keys "
            f"{sorted(stack)}); it is already the list form"
        )
    n = jax.tree.leaves(stack)[0].shape[0]
    pure["blocks"] = {i: jax.tree.map(lambda a, i=i: a[i], stack) for i in range(n)}
    return pure


@public("lm.block_specs")
def block_specs(params: Any) -> list[str | tuple[str, int]]:
    """The ``splice.drop_layer`` / ``splice.block_influence`` spec of every block, in order:
    ``"blocks/<key>"`` for the list form, ``("blocks", i)`` for the scanned form.

    >>> cfg = LMConfig(dim=8, layers=2, kv_heads=1, groups=2, head_dim=4, hidden=8)
    >>> block_specs(nnx.state(LM(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    ['blocks/0', 'blocks/1']
    >>> cfg = dataclasses.replace(cfg, scan_layers=True)
    >>> block_specs(nnx.state(LM(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    [('blocks', 0), ('blocks', 1)]
    """
    blocks = params["blocks"]
    if _is_stack(blocks):
        return [("blocks", i) for i in range(_value(blocks["attn"]["q"]).shape[0])]
    return [f"blocks/{k}" for k in sorted(blocks.keys())]


@public("lm.config_of")
def config_of(params: Any) -> LMConfig:
    """The :class:`LMConfig` that the shapes of an LM parameter state (or its pure dict) imply.

    This is how a model is rebuilt after surgery: ``LM(config_of(state), rngs=...)`` then
    ``nnx.update(model, state)`` (:func:`rebuild` does both). The list form has one entry per
    block; the scanned form (``scan_layers=True``) takes ``layers`` from the leading axis.
    """
    get = params.get if hasattr(params, "get") else params.__getitem__
    blocks = get("blocks")
    vocab = _value(get("embed")).shape[0]
    if _is_stack(blocks):
        q = _value(blocks["attn"]["q"])
        if q.ndim != 5:
            raise ValueError(
                "lm.config_of: a scanned stack's 'blocks/attn/q' is (layers, dim, kv_heads, "
                f"groups, head_dim), got shape {tuple(q.shape)}"
            )
        layers, dim, kv, groups, head_dim = q.shape
        hidden = _value(blocks["mlp"]["gate"]).shape[-1]
        return LMConfig(dim, layers, kv, groups, head_dim, hidden, vocab, scan_layers=True)
    keys = sorted(blocks.keys())
    first = blocks[keys[0]]
    q = _value(first["attn"]["q"])
    dim, kv, groups, head_dim = q.shape
    hidden = _value(first["mlp"]["gate"]).shape[1]
    return LMConfig(dim, len(keys), kv, groups, head_dim, hidden, vocab)


@public("lm.count_params")
def count_params(model: nnx.Module) -> int:
    """Number of parameters of ``model`` (the tied embedding counted once)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@public("lm.apply_fn")
def apply_fn(model: LM) -> tuple[Callable[..., Any], Any]:
    """``(fn, params)``: the functional form of ``model`` for ``jaxslim.splice`` and
    ``jaxslim.calibrate``. ``params`` is the ``nnx.Param`` state and
    ``fn(params, tokens, hiddens=False)`` runs whatever blocks ``params`` holds (in key order),
    at whatever widths their arrays have: it runs unchanged on a tree cut by
    ``splice.drop_layer`` or ``splice.apply_plan``. For a scanned model (``scan_layers=True``)
    ``fn`` runs ``jax.lax.scan`` over the leading layer axis of ``params["blocks"]``, so it runs
    on a stack cut by ``splice.drop_layer(params, "blocks", index=i)`` too; with
    ``hiddens=True`` it returns the scan's per-layer outputs as the ``layers + 1`` hidden states.
    """
    if model.scan_layers:
        block_def, _, block_rest = nnx.split(model.blocks, nnx.Param, ...)
    else:
        block_def, _, block_rest = nnx.split(model.blocks[0], nnx.Param, ...)
    norm_def, _, norm_rest = nnx.split(model.norm, nnx.Param, ...)
    params = nnx.state(model, nnx.Param)

    def run_stack(stack, x, hiddens):
        def body(h, layer):
            h = nnx.merge(block_def, layer[0], layer[1])(h)
            return h, (h if hiddens else None)

        x, ys = jax.lax.scan(body, x, (stack, block_rest))
        return x, ([] if ys is None else [ys[i] for i in range(ys.shape[0])])

    def fn(p, tokens, hiddens: bool = False):
        embed = _value(p["embed"])
        x = embed[tokens]
        hs = [x]
        if model.scan_layers:
            x, ys = run_stack(p["blocks"], x, hiddens)
            hs.extend(ys)
        else:
            for key in sorted(p["blocks"].keys()):
                x = nnx.merge(block_def, p["blocks"][key], block_rest)(x)
                hs.append(x)
        logits = nnx.merge(norm_def, p["norm"], norm_rest)(x) @ embed.T
        return (logits, hs) if hiddens else logits

    return fn, params


@public("lm.rebuild")
def rebuild(params: Any, *, seed: int = 0) -> LM:
    """A fresh :class:`LM` with the shapes of ``params`` (e.g. after ``splice.drop_layer`` or a
    width cut), holding ``params``. A scanned stack (``blocks/attn/q`` with a leading layer
    axis) rebuilds a ``scan_layers=True`` model with as many layers as that axis holds."""
    model = LM(config_of(params), rngs=nnx.Rngs(seed))
    blocks = params["blocks"]
    keys = sorted(blocks.keys())
    if not _is_stack(blocks) and keys != list(range(len(keys))):
        params = dict(params.items())  # a dropped block leaves a gap in the list's keys
        params["blocks"] = {i: blocks[k] for i, k in enumerate(keys)}
    if not isinstance(params, nnx.State):
        params = nnx.State(
            jax.tree.map(lambda x: x, dict(params.items()), is_leaf=lambda x: x is None)
        )
    nnx.update(model, params)
    return model


# ---------------------------------------------------------------------------------- training


@public("lm.next_byte_loss")
def next_byte_loss(logits: jax.Array, window: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:]).mean()


@public("lm.default_optimizer")
@functools.cache
def default_optimizer(steps: int, lr: float = 3e-3) -> optax.GradientTransformation:
    """The workbench optimizer for a run of ``steps`` steps: AdamW (weight decay 0.01), linear
    warmup from 0 over ``max(1, steps // 20)`` steps to ``lr``, then cosine decay to 0 at
    ``steps``; gradients clipped to global norm 1. :func:`train` uses it when ``tx`` is None.

    The same ``(steps, lr)`` returns the same (immutable) object: ``nnx.jit`` keys its cache on
    the optimizer's transform, so every run of one length and one model shape (``train`` with
    the default ``tx``, or ``tx=default_optimizer(steps)``) shares one compiled step.

    >>> tx = default_optimizer(100, lr=1e-3)
    >>> tx is default_optimizer(100, lr=1e-3)
    True
    """
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 2))
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


@nnx.jit(static_argnames=("temperature",))
def _step(model, optimizer, window, t_logits, alpha, temperature):
    """One AdamW step on next-byte cross-entropy (``t_logits`` None) or on ``distill.kd_loss``
    against precomputed teacher logits, ``alpha`` (traced) soft + ``1 - alpha`` hard: with
    ``alpha = 0`` that is the cross-entropy (the soft term's weight and gradient are exactly 0),
    so fine-tuned and distilled students of one shape share this compiled step."""
    from jaxslim import distill

    def loss_fn(m):
        s_logits = m(window[:, :-1])
        if t_logits is None:
            return next_byte_loss(s_logits, window)
        v = s_logits.shape[-1]
        return distill.kd_loss(
            s_logits.reshape(-1, v),
            t_logits.reshape(-1, v),
            window[:, 1:].reshape(-1),
            temperature=temperature,
            soft_weight=alpha,
            hard_weight=1.0 - alpha,
        )

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@public("lm.train")
def train(
    model: LM,
    data: np.ndarray,
    *,
    steps: int,
    lr: float = 3e-3,
    batch: int = 16,
    seq: int = 128,
    seed: int = 0,
    teacher: LM | None = None,
    temperature: float = 1.0,
    alpha: float = 1.0,
    tx: optax.GradientTransformation | None = None,
) -> LM:
    """Trains ``model`` in place for ``steps`` steps with ``tx`` (default
    :func:`default_optimizer` ``(steps, lr)``) on random windows of ``data``
    (:func:`batches` ``(data, batch, seq, seed=seed)``).

    With ``teacher``, the loss is ``distill.kd_loss`` against the teacher's logits
    (``alpha`` soft + ``1 - alpha`` hard, temperature ``temperature``): Minitron's recovery is
    logit distillation alone (``alpha=1``, ``T=1``). ``train(m, ...)`` is
    ``train_together([m], ..., distill=[teacher is not None])``.
    """
    train_together(
        [model],
        data,
        steps=steps,
        lr=lr,
        batch=batch,
        seq=seq,
        seed=seed,
        teacher=teacher,
        distill=[teacher is not None],
        temperature=temperature,
        alpha=alpha,
        tx=tx,
    )
    return model


@public("lm.train_together")
def train_together(
    models: Sequence[LM],
    data: np.ndarray,
    *,
    steps: int,
    distill: Sequence[bool] | None = None,
    teacher: LM | None = None,
    lr: float = 3e-3,
    batch: int = 16,
    seq: int = 128,
    seed: int = 0,
    temperature: float = 1.0,
    alpha: float = 1.0,
    tx: optax.GradientTransformation | None = None,
) -> list[float]:
    """Trains every model of ``models`` in place on the same batches, in lockstep; each ends
    as :func:`train` would leave it alone. Returns the seconds spent on each.

    ``distill[i]`` says whether model ``i`` distills from ``teacher`` (default: all of them when
    a teacher is given). The frozen teacher's logits are computed once per batch and serve every
    distilled model (``k`` distillation runs cost one teacher forward per step, not ``k``);
    the fine-tuned ones take the same compiled step with ``alpha = 0`` (pure cross-entropy), so
    models of one shape compile one step between them (a fine-tuned model's loss is then
    ``kd_loss``'s hard term: equal to :func:`train`'s cross-entropy up to float rounding). A
    run's seconds include an equal share of the teacher's forward passes.

    >>> cfg = LMConfig(dim=8, layers=1, kv_heads=1, groups=1, head_dim=4, hidden=8)
    >>> a, b = LM(cfg, rngs=nnx.Rngs(0)), LM(cfg, rngs=nnx.Rngs(1))
    >>> data = np.arange(200, dtype=np.uint8)
    >>> len(train_together([a, b], data, steps=2, batch=2, seq=8, teacher=LM(cfg,
    ...     rngs=nnx.Rngs(2)), distill=[True, False]))
    2
    """
    fn = "lm.train_together"
    models = list(models)
    distill = [teacher is not None] * len(models) if distill is None else list(distill)
    if len(distill) != len(models):
        raise ValueError(
            f"{fn}: distill has {len(distill)} entries for {len(models)} models; "
            "give one bool per model"
        )
    if any(distill) and teacher is None:
        raise ValueError(f"{fn}: distill={distill} asks for a teacher; pass teacher=")
    tx = default_optimizer(steps, lr) if tx is None else tx
    optimizers = [nnx.Optimizer(m, tx, wrt=nnx.Param) for m in models]
    alphas = [jnp.float32(alpha if d else 0.0) for d in distill]
    seconds = [0.0] * len(models)
    it = batches(data, batch, seq, seed=seed)
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(steps):
            window = next(it)
            t_logits = None
            if any(distill):
                t0 = time.perf_counter()
                t_logits = jax.block_until_ready(_logits(teacher, window[:, :-1]))
                share = (time.perf_counter() - t0) / sum(distill)
                seconds = [s + share * d for s, d in zip(seconds, distill, strict=True)]
            for i, (m, opt) in enumerate(zip(models, optimizers, strict=True)):
                t0 = time.perf_counter()
                jax.block_until_ready(_step(m, opt, window, t_logits, alphas[i], temperature))
                seconds[i] += time.perf_counter() - t0
    return seconds


@nnx.jit
def _window_nats(model, windows):
    """Mean next-byte cross-entropy (nats) of every window ``(n, seq + 1)``: ``(n,)``."""
    ce = optax.softmax_cross_entropy_with_integer_labels(model(windows[:, :-1]), windows[:, 1:])
    return ce.mean(axis=-1)


_CHUNK = 16


@public("lm.bits_per_byte")
def bits_per_byte(model: LM | Callable[[jax.Array], jax.Array], windows: jax.Array) -> float:
    """Mean next-byte cross-entropy of ``model`` over ``windows (n, seq + 1)``, in bits.

    Evaluated in chunks of 16 windows (the last one padded with copies of the first window,
    whose values are dropped) by one jitted function: an :class:`LM` compiles it once per
    shape, whatever the number of models, calls and windows (a plain callable ``model`` is
    compiled for each call).
    """
    n = windows.shape[0]
    pad = -n % _CHUNK
    if pad:
        windows = jnp.concatenate([windows, jnp.repeat(windows[:1], pad, axis=0)])
    if isinstance(model, nnx.Module):
        run = functools.partial(_window_nats, model)
    else:
        run = jax.jit(
            lambda w: optax.softmax_cross_entropy_with_integer_labels(
                model(w[:, :-1]), w[:, 1:]
            ).mean(axis=-1)
        )
    nats = np.concatenate([np.asarray(run(windows[i : i + _CHUNK])) for i in range(0, n, _CHUNK)])
    return float(np.mean(nats[:n]) / math.log(2))
