"""Score trees: how important each weight is (higher = more important).

A score tree has the structure of ``params``: a float array on every floating-point array leaf and
``None`` elsewhere (ints, PRNG keys, ``None``, size-0 arrays), so it feeds ``topk_mask`` directly.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import optax

from jaxslim import _tree
from jaxslim._checks import public


def _none(*_):
    return None


@public("prune.magnitude")
def magnitude(params: optax.Params) -> optax.Params:
    """``|w|`` for every floating-point leaf (Han et al., 2015; torch ``l1_unstructured``).

    >>> import jax.numpy as jnp
    >>> magnitude({"w": jnp.array([-2.0, 1.0]), "step": 3})
    {'step': None, 'w': Array([2., 1.], dtype=float32)}
    """
    return _tree.map_selected(
        lambda _, p: jnp.abs(p), params, where=_all_float, allow_empty=True, unselected=_none
    )


@public("prune.saliency")
def saliency(params: optax.Params, grads: optax.Params) -> optax.Params:
    """``|w * dL/dw|`` — the connection sensitivity of SNIP (Lee et al., 2019).

    ``grads`` has the structure of ``params`` (e.g. from ``jax.grad`` of a loss on one batch).
    The product is formed in float32 for half-precision leaves.

    >>> import jax.numpy as jnp
    >>> saliency({"w": jnp.array([2.0, -1.0])}, {"w": jnp.array([0.5, 3.0])})["w"]
    Array([1., 3.], dtype=float32)
    """

    def one(path, p, g):
        if g is None or jnp.shape(g) != p.shape:
            raise ValueError(
                f"prune.saliency: grads for {path!r} must have shape {p.shape}, got "
                f"{None if g is None else jnp.shape(g)}"
            )
        return jnp.abs(p.astype(jnp.float32) * jnp.asarray(g).astype(jnp.float32))

    return _tree.map_selected(
        one,
        params,
        grads,
        where=_all_float,
        allow_empty=True,
        unselected=_none,
    )


@public("prune.random")
def random(key: jax.Array, params: optax.Params) -> optax.Params:
    """Uniform ``[0, 1)`` scores (random pruning), an independent stream per leaf.

    The leaf at path ``name`` draws from ``jax.random.fold_in(key, crc32(name))``, so the scores
    of one leaf do not change when another leaf is added or removed.

    >>> import jax
    >>> s = random(jax.random.key(0), {"w": jax.numpy.zeros((2, 3))})
    >>> s["w"].shape
    (2, 3)
    """

    if not isinstance(key, jax.Array) or not (
        jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    ):
        raise TypeError(
            f"prune.random: key must be a PRNG key (jax.random.key(0)), got {type(key).__name__}; "
            f"the signature is random(key, params)"
        )

    def one(path, p):
        sub = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        return jax.random.uniform(sub, p.shape, jnp.float32)

    return _tree.map_selected(one, params, where=_all_float, allow_empty=True, unselected=_none)


def _all_float(path, leaf) -> bool:
    return True
