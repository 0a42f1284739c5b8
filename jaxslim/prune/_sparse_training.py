"""Sparse training from scratch: RigL, SET, static sparse, STE and SR-STE (N:M from scratch).

``rigl``, ``set_sparse`` and ``static_sparse`` go **last** in ``optax.chain``, like ``pruner``:
they return ``u' = where(mask, u, -p)``, so ``optax.apply_updates`` lands inactive weights on
exact zeros. Their masks start random (per-leaf sparsity ``uniform`` or ``erk``) and live in a
``SparseState``; read them with ``masks_of``. No extra call per step and no extra backward pass.

``ste`` and ``sr_ste`` go **first** in the chain (they edit the gradient); the forward pass uses
``straight_through(params, sparsity, ...)``, a masked copy whose gradient is the dense one.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxslim import _tree
from jaxslim._checks import fraction, integer, nonnegative, public
from jaxslim.prune._masks import (
    check_leaf_structure,
    check_structure,
    check_where,
    is_sparsity_tree,
    topk_mask,
)
from jaxslim.prune._schedules import erk, uniform
from jaxslim.prune._scores import magnitude, random
from jaxslim.prune._transform import SparseState, lowest_k_leaf
from jaxslim.structures import Structure, Unstructured, float_keys

_TOP = jnp.uint32(0xFFFFFFFF)


def _check_key(fn: str, key):
    if key is None:
        return jax.random.key(0)
    if not isinstance(key, jax.Array) or not (
        jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    ):
        raise TypeError(f"{fn}: key must be a PRNG key (jax.random.key(0)), got {key!r:.60}")
    return key


def _sparsities(fn: str, params, sparsity, distribution: str, where):
    """The per-leaf sparsity tree: ``sparsity`` itself if it is a tree, else uniform / ERK."""
    if is_sparsity_tree(sparsity):
        return sparsity
    try:
        fraction(fn, sparsity)
        if distribution == "erk":
            return erk(params, sparsity, where=where)
        return uniform(params, sparsity, where=where)
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise type(e)(msg if msg.startswith(fn) else f"{fn}: {msg}") from None


def _threefry2x32(k0, k1, x0, x1):
    """Threefry-2x32, 20 rounds (Salmon et al. 2011): the block cipher behind ``jax.random``,
    written out elementwise so that XLA fuses it into its consumer. (``jax.random`` lowers it to a
    rolled ``while`` loop on CPU, whose full-size carried arrays each cost a buffer in every step's
    program, the untaken ``lax.cond`` branch included.) All arguments ``uint32``, broadcasting."""
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r)))
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


def _step_key(key, t):
    """``uint32`` words ``(a, b)`` of ``fold_in(key, t)``: equal to
    ``jax.random.key_data(jax.random.fold_in(key, t))`` for threefry keys (the default); other
    key implementations are first folded to two words by xor."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key  # a raw uint32[2] key is its own data
    words = data.reshape(2, -1)
    k0, k1 = jnp.bitwise_xor.reduce(words[0]), jnp.bitwise_xor.reduce(words[1])
    return _threefry2x32(k0, k1, jnp.uint32(0), t.astype(jnp.uint32))


def _growth_bits(step_key, name: str, shape) -> jax.Array:
    """Random ``uint32`` per entry of one leaf: threefry-2x32 of the counter ``(leaf id, flat
    index)`` under ``step_key``, ``x0 ^ x1`` (``jax.random.bits``' 32-bit output), where the leaf id
    is ``crc32(path) & 0x7FFFFFFF``. For leaf id 0 this is exactly
    ``jax.random.bits(jax.random.fold_in(key, t), shape)``. Elementwise on an iota: fuses into its
    consumer (no temporary) and partitions under sharding (no gather). Leaves up to 2**32
    entries (the flat index is ``uint32``)."""
    n = math.prod(shape)
    flat = lax.iota(jnp.uint32, n).reshape(shape)
    leaf = jnp.uint32(zlib.crc32(name.encode()) & 0x7FFFFFFF)
    y0, y1 = _threefry2x32(step_key[0], step_key[1], leaf, flat)
    return y0 ^ y1


def _drop_grow(m, p, grow_order, k):
    """Drops the ``k`` lowest-|p| active entries, grows the ``k`` inactive ones lowest in
    ``grow_order`` (``uint32``; ties by flat index). Returns the new mask; its count equals
    ``m``'s exactly (``k <= n_active <= #inactive after the drop + k``)."""
    drop_keys = jnp.where(m, jnp.minimum(float_keys(jnp.abs(p)), _TOP - 1), _TOP)
    dropped = lowest_k_leaf(drop_keys, k)
    after = m & ~dropped
    grow_keys = jnp.where(after, _TOP, jnp.minimum(grow_order, _TOP - 1))
    grown = lowest_k_leaf(grow_keys, k)
    return after | grown


def _dynamic(
    fn: str,
    sparsity,
    *,
    grow: str | None,
    update_every: int,
    end_step: int,
    drop_fraction: float,
    distribution: str,
    where,
    key,
    optimizer,
) -> optax.GradientTransformation:
    if distribution not in ("uniform", "erk"):
        raise ValueError(f"{fn}: distribution must be 'uniform' or 'erk', got {distribution!r}")
    if not is_sparsity_tree(sparsity):
        fraction(fn, sparsity)
    update_every = integer(fn, "update_every", update_every, low=1)
    end_step = integer(fn, "end_step", end_step, low=1)
    drop_fraction = fraction(fn, drop_fraction, "drop_fraction")
    check_where(fn, where)
    key = _check_key(fn, key)
    if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"{fn}: optimizer must be an optax.GradientTransformation, got {optimizer!r}"
        )

    def init_fn(params):
        sp = _sparsities(fn, params, sparsity, distribution, where)
        masks = topk_mask(random(key, params), sp, where=where)
        inner = None if optimizer is None else optimizer.init(params)
        # a copy: a train step that donates its state must not delete the transform's own key
        return SparseState(jnp.zeros([], jnp.int32), masks, jnp.copy(key), inner)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{fn}: params are required (call tx.update(grads, state, params))")
        if not isinstance(state, SparseState):
            raise TypeError(f"{fn}: state must be the SparseState from init, got {state!r:.80}")
        t = state.count
        inner = state.inner
        if optimizer is not None:
            grads = updates
            masked = jax.tree.map(
                lambda g, m: g if m is None else jnp.where(m, g, jnp.zeros((), g.dtype)),
                grads,
                state.masks,
                is_leaf=lambda x: x is None,
            )
            updates, inner = optimizer.update(masked, inner, params)
        else:
            grads = updates
        masks = state.masks
        if grow is not None:
            due = (t > 0) & (t % update_every == 0) & (t < end_step)
            frac = 0.5 * drop_fraction * (1.0 + jnp.cos(jnp.pi * t.astype(jnp.float32) / end_step))

            def regrow():
                step_key = None if grow == "gradient" else _step_key(state.key, t)

                def one(path, p, m, g):
                    n_active = jnp.sum(m, dtype=jnp.int32)
                    k = jnp.round(frac * n_active.astype(jnp.float32)).astype(jnp.int32)
                    if grow == "gradient":  # largest |g| first; a NaN gradient ranks last
                        score = jnp.abs(g.astype(jnp.float32))
                        order = float_keys(-jnp.where(jnp.isnan(score), 0.0, score))
                    else:  # random bits as the order: a uniformly random k-subset
                        order = _growth_bits(step_key, path, p.shape)
                    return _drop_grow(m, p, order, k)

                # random growth reads no update: a cond that reads one makes XLA materialize it
                src = grads if grow == "gradient" else masks
                return _tree.map_selected(
                    one, params, masks, src, where=where, unselected=lambda *_: None
                )

            masks = lax.cond(due, regrow, lambda: state.masks)

        def out(path, u, p, m, old):
            if m is None:
                return u
            # grown entries (m & ~old) start at exactly 0: u' = -p (p is 0 there already)
            return jnp.where(m & old, u, -p).astype(u.dtype)

        new_updates = jax.tree_util.tree_map_with_path(
            lambda path, u, p, m, old: out(path, u, p, m, old),
            updates,
            params,
            masks,
            state.masks,
            is_leaf=lambda x: x is None,
        )
        return new_updates, SparseState(optax.safe_increment(t), masks, state.key, inner)

    return optax.GradientTransformation(public(fn)(init_fn), public(fn)(update_fn))


@public("prune.rigl")
def rigl(
    sparsity: Any,
    *,
    update_every: int,
    end_step: int,
    drop_fraction: float = 0.3,
    distribution: str = "uniform",
    where: _tree.Where = None,
    key: jax.Array | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """RigL, "Rigging the Lottery" (Evci et al. 2020): dynamic sparse training, last in chain.

    The mask starts random at the per-leaf ``sparsity`` (``distribution="uniform"`` or
    ``"erk"``, or a tree from ``erk``/``uniform``). At every step ``t`` with
    ``0 < t < end_step`` and ``t % update_every == 0``, in each leaf, ``k = round(f_t * n_active)``
    active weights with the lowest ``|w|`` are dropped and the ``k`` inactive weights with the
    largest growth score are grown, ``f_t = drop_fraction / 2 * (1 + cos(pi t / end_step))``.
    The active count of each leaf is exactly constant; grown weights start at exactly 0;
    dropped weights become exactly 0. Updates are ``where(mask, u, -p)``.

    Growth score: with ``optimizer=`` (e.g. ``optax.adam(1e-3)``) the transform wraps it, feeds
    it the masked gradient and grows where the **dense gradient** ``|g|`` is largest (RigL). Without
    it, place ``rigl`` last in ``optax.chain(opt, rigl(...))`` and the score is ``|u|`` of the
    incoming update: ``|g|`` up to a constant for SGD, the normalized moment for Adam.

    Args:
      sparsity: fraction in ``[0, 1]`` or a per-leaf tree (``erk(params, 0.9)``).
      update_every, end_step: drop/grow every ``update_every`` steps before ``end_step``.
      drop_fraction: initial fraction of active weights replaced per update.
      distribution: ``"uniform"`` or ``"erk"`` when ``sparsity`` is a number.
      where: which leaves (default: float kernels: matrices, and
        higher-rank leaves with two axes of size > 1).
      key: PRNG key of the initial random mask (default ``jax.random.key(0)``).
      optimizer: optional inner optimizer to wrap (gives growth the dense gradient).

    >>> import jax, jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones((8, 8))}
    >>> tx = rigl(0.75, update_every=1, end_step=10, optimizer=optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> u, state = tx.update({"w": jnp.ones((8, 8))}, state, params)
    >>> int((optax.apply_updates(params, u)["w"] != 0).sum())
    16
    """
    return _dynamic(
        "prune.rigl",
        sparsity,
        grow="gradient",
        update_every=update_every,
        end_step=end_step,
        drop_fraction=drop_fraction,
        distribution=distribution,
        where=where,
        key=key,
        optimizer=optimizer,
    )


@public("prune.set_sparse")
def set_sparse(
    sparsity: Any,
    *,
    update_every: int,
    end_step: int,
    drop_fraction: float = 0.3,
    distribution: str = "uniform",
    where: _tree.Where = None,
    key: jax.Array | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """SET (Mocanu et al. 2018): ``rigl`` with random growth among inactive weights.

    Same arguments, schedule and guarantees as ``rigl``; the ``k`` grown entries of a leaf are a
    uniformly random ``k``-subset of its inactive entries (those just dropped included): the ones
    with the lowest 32-bit random key, ``jax.random.bits``' threefry-2x32 output at the counter
    ``(crc32(path) & 0x7FFFFFFF, flat index)`` under ``fold_in(key, step)``. Keys are drawn
    independently per entry, so every ``k``-subset is equally likely up to ties between 32-bit
    keys (about ``n**2 / 2**33`` pairs per leaf of ``n`` entries; a tie breaks by flat index).
    The bits are computed elementwise where they are consumed, with no temporaries and no
    gather under sharding.

    >>> import jax.numpy as jnp, optax
    >>> tx = optax.chain(optax.sgd(0.1), set_sparse(0.5, update_every=2, end_step=10))
    >>> state = tx.init({"w": jnp.ones((4, 4))})
    """
    return _dynamic(
        "prune.set_sparse",
        sparsity,
        grow="random",
        update_every=update_every,
        end_step=end_step,
        drop_fraction=drop_fraction,
        distribution=distribution,
        where=where,
        key=key,
        optimizer=optimizer,
    )


@public("prune.static_sparse")
def static_sparse(
    sparsity: Any,
    *,
    distribution: str = "uniform",
    where: _tree.Where = None,
    key: jax.Array | None = None,
) -> optax.GradientTransformation:
    """Static sparse training: a fixed random mask (uniform or ERK per-leaf sparsity), last in
    chain; ``where(mask, u, -p)``.

    >>> import jax.numpy as jnp, optax
    >>> params = {"w": jnp.ones((4, 4))}
    >>> tx = optax.chain(optax.sgd(0.1), static_sparse(0.5))
    >>> u, _ = tx.update(params, tx.init(params), params)
    >>> int((optax.apply_updates(params, u)["w"] == 0).sum())
    8
    """
    return _dynamic(
        "prune.static_sparse",
        sparsity,
        grow=None,
        update_every=1,
        end_step=1,
        drop_fraction=0.0,
        distribution=distribution,
        where=where,
        key=key,
        optimizer=None,
    )


@public("prune.straight_through")
def straight_through(
    params: optax.Params,
    sparsity: Any,
    *,
    structure: Structure = Unstructured(),
    where: _tree.Where = None,
) -> optax.Params:
    """A masked copy for the forward pass whose gradient is the dense one (straight-through).

    ``m = topk_mask(|p|, sparsity, structure=...)`` of the current weights; the value is
    ``where(m, p, 0)``, the gradient with respect to ``p`` is that with respect to the masked
    copy (``p + stop_gradient(where(m, p, 0) - p)``). Use it in the loss with ``ste`` or
    ``sr_ste`` in the optimizer; ``NM(2, 4)`` trains 2:4 from scratch.

    >>> import jax, jax.numpy as jnp
    >>> p = {"w": jnp.array([[1.0, -3.0], [2.0, 0.5]])}
    >>> f = lambda p: jnp.sum(straight_through(p, 0.5)["w"] * 2.0)
    >>> f(p), jax.grad(f)(p)["w"]
    (Array(-2., dtype=float32), Array([[2., 2.],
           [2., 2.]], dtype=float32))
    """
    try:
        masks = topk_mask(magnitude(params), sparsity, structure=structure, where=where)
    except (ValueError, TypeError) as e:
        raise type(e)(str(e).replace("prune.topk_mask", "prune.straight_through")) from None

    # Leaves without a mask (biases, ints, PRNG keys, None) pass through untouched.
    def one(m, p):
        if m is None:
            return p
        return p + lax.stop_gradient(jnp.where(m, p, jnp.zeros((), p.dtype)) - p)

    return jax.tree.map(one, masks, params, is_leaf=lambda x: x is None)


@public("prune.sr_ste")
def sr_ste(
    sparsity: Any,
    *,
    structure: Structure = Unstructured(),
    decay: float = 2e-4,
    where: _tree.Where = None,
) -> optax.GradientTransformation:
    """SR-STE (Zhou et al. 2021, "Learning N:M fine-grained structured sparse neural networks
    from scratch"), **first** in ``optax.chain``: ``g' = g + decay * where(m, 0, p)``.

    ``m = topk_mask(|p|, sparsity, structure=...)`` is recomputed every step from the dense
    weights ``p`` (the mask the forward pass ``straight_through(p, sparsity, ...)`` used), and
    kept in the state (``masks_of``). The sparse-refined term pulls pruned weights towards 0 so
    the mask settles. The weights stay dense: deploy ``apply_mask(p, masks_of(state))`` after
    the last step (or ``straight_through(p, ...)``, the same values).

    >>> import jax.numpy as jnp, optax
    >>> from jaxslim.structures import NM
    >>> params = {"w": jnp.ones((4, 2))}
    >>> tx = optax.chain(sr_ste(0.5, structure=NM(2, 4), decay=1.0), optax.sgd(1.0))
    >>> u, _ = tx.update({"w": jnp.zeros((4, 2))}, tx.init(params), params)
    >>> int((u["w"] != 0).sum())
    4
    """
    fn = "prune.sr_ste" if decay else "prune.ste"
    check_structure(fn, structure)
    check_where(fn, where)
    d = nonnegative(fn, "decay", decay)
    if not is_sparsity_tree(sparsity):
        fraction(fn, sparsity)

    def masks_for(params):
        return topk_mask(magnitude(params), sparsity, structure=structure, where=where)

    def init_fn(params):
        paths = _tree.selected_paths(params, where)
        for path, leaf in _tree.leaves_with_paths(params):
            if path in paths:
                check_leaf_structure(fn, structure, path, leaf.shape)
        return SparseState(jnp.zeros([], jnp.int32), masks_for(params), jax.random.key(0), None)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{fn}: params are required (call tx.update(grads, state, params))")
        masks = masks_for(params)
        if d:
            updates = jax.tree.map(
                lambda u, p, m: (
                    u if m is None else (u + jnp.where(m, 0, d * p).astype(u.dtype)).astype(u.dtype)
                ),
                updates,
                params,
                masks,
                is_leaf=lambda x: x is None,
            )
        return updates, SparseState(optax.safe_increment(state.count), masks, state.key, None)

    return optax.GradientTransformation(public(fn)(init_fn), public(fn)(update_fn))


@public("prune.ste")
def ste(
    sparsity: Any, *, structure: Structure = Unstructured(), where: _tree.Where = None
) -> optax.GradientTransformation:
    """Plain STE: ``sr_ste`` with ``decay=0`` (the gradient passes unchanged; the state tracks
    the mask of the forward pass ``straight_through(p, sparsity, ...)``).

    >>> import jax.numpy as jnp
    >>> tx = ste(0.5)
    >>> tx.init({"w": jnp.ones((2, 2))}).masks["w"].sum()
    Array(2, dtype=int32)
    """
    return sr_ste(sparsity, structure=structure, decay=0.0, where=where)
