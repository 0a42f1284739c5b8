"""Layer surgery: merge (``fold_batchnorm``, ``fuse_linear``), cut (``drop_layer``) and add
(``widen``, ``deepen``) layers.

Layouts follow Flax: a Dense kernel is ``(in, out)``, a Conv kernel ``(*spatial, in, out)``.
``fold_batchnorm``, ``fuse_linear``, ``widen`` and ``deepen`` preserve the function (to float
rounding); ``drop_layer`` replaces a residual block by the identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import _tree

__all__ = ["fold_batchnorm", "fuse_linear", "drop_layer", "widen", "widen_map", "deepen"]

_HI = jax.lax.Precision.HIGHEST


def fold_batchnorm(
    w: jax.Array,
    b: jax.Array | None,
    gamma: jax.Array | None,
    beta: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    eps: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """Folds an inference-mode batch norm that follows a Dense or Conv layer into the layer.

    ``BN(x W + b) = x W' + b'`` with ``s = gamma / sqrt(var + eps)``, ``W' = W * s`` (scaled on the
    output-channel axis, the last) and ``b' = (b - mean) * s + beta``. ``b``, ``gamma``, ``beta``
    may be ``None`` (0, 1, 0). ``eps`` defaults to Flax's ``BatchNorm`` value. Folding a batch
    norm into a *following* zero-padded convolution would be inexact at the borders, which is why
    only the preceding layer is a target here.

    Args:
      w: kernel ``(in, out)`` or ``(*spatial, in, out)``; b: ``(out,)`` or None.
      gamma, beta, mean, var: batch-norm scale, bias, running mean and variance, ``(out,)``.

    Returns:
      ``(w', b')`` with the shapes of ``w`` and ``(out,)``.

    >>> import jax.numpy as jnp
    >>> w, b = fold_batchnorm(jnp.ones((2, 1)), None, jnp.array([2.0]), jnp.array([1.0]),
    ...                       jnp.array([0.5]), jnp.array([4.0]), eps=0.0)
    >>> w.tolist(), b.tolist()
    ([[1.0], [1.0]], [0.5])
    """
    n = w.shape[-1]
    for name, x in (("b", b), ("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var)):
        if x is not None and tuple(x.shape) != (n,):
            raise ValueError(
                f"splice.fold_batchnorm: {name} must have shape ({n},) to match the "
                f"kernel's output axis, got {tuple(x.shape)}"
            )
    s = jax.lax.rsqrt(var + jnp.asarray(eps, var.dtype))
    if gamma is not None:
        s = gamma * s
    b0 = jnp.zeros((n,), w.dtype) if b is None else b
    b_new = (b0 - mean) * s
    if beta is not None:
        b_new = b_new + beta
    return w * s.astype(w.dtype).reshape((1,) * (w.ndim - 1) + (n,)), b_new.astype(w.dtype)


def fuse_linear(
    w1: jax.Array, b1: jax.Array | None, w2: jax.Array, b2: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Merges two affine layers with nothing non-linear between: ``(W1 W2, b1 W2 + b2)``.

    ``w1`` is a Dense ``(in, mid)`` or Conv ``(*spatial, in, mid)`` kernel; ``w2`` a Dense
    ``(mid, out)`` kernel or a 1x1 Conv kernel ``(1, ..., 1, mid, out)``. The product is taken at
    ``Precision.HIGHEST``.

    >>> import jax.numpy as jnp
    >>> w, b = fuse_linear(jnp.eye(2), jnp.ones(2), 2 * jnp.eye(2), None)
    >>> w.tolist(), b.tolist()
    ([[2.0, 0.0], [0.0, 2.0]], [2.0, 2.0])
    """
    if w2.ndim > 2:
        if any(s != 1 for s in w2.shape[:-2]):
            raise ValueError(
                "splice.fuse_linear: w2 must be a Dense kernel or a 1x1 Conv kernel, "
                f"got shape {tuple(w2.shape)}"
            )
        w2 = w2.reshape(w2.shape[-2:])
    if w1.shape[-1] != w2.shape[0]:
        raise ValueError(
            f"splice.fuse_linear: w1 output width {w1.shape[-1]} does not match w2 "
            f"input width {w2.shape[0]} (shapes {tuple(w1.shape)}, {tuple(w2.shape)})"
        )
    w = jnp.matmul(w1, w2, precision=_HI)
    b = jnp.zeros((w2.shape[1],), w.dtype) if b2 is None else b2
    if b1 is not None:
        b = b + jnp.matmul(b1, w2, precision=_HI)
    return w, b


def widen_map(width: int, new_width: int, key: jax.Array | None = None) -> jax.Array:
    """Net2WiderNet unit map ``g``: ``g[j] = j`` for ``j < width``, then copies of old units.

    With ``key`` the extra units copy uniformly random old units (Chen et al., 2016), otherwise
    they copy ``0, 1, 2, ...`` in turn. Returns an int32 array of shape ``(new_width,)``.

    >>> widen_map(3, 5).tolist()
    [0, 1, 2, 0, 1]
    """
    if new_width < width:
        raise ValueError(f"splice.widen: new_width={new_width} is smaller than the width {width}")
    extra = new_width - width
    if key is None:
        rest = jnp.arange(extra, dtype=jnp.int32) % width
    else:
        rest = jax.random.randint(key, (extra,), 0, width, dtype=jnp.int32)
    return jnp.concatenate([jnp.arange(width, dtype=jnp.int32), rest])


def widen(
    w1: jax.Array,
    b1: jax.Array | None,
    w2: jax.Array,
    new_width: int,
    key: jax.Array | None = None,
    *,
    noise: float = 0.0,
    extra: tuple[jax.Array | None, ...] = (),
) -> tuple[Any, ...]:
    """Net2WiderNet: widens the hidden layer between ``w1`` and ``w2`` to ``new_width`` units.

    Units are replicated by ``g = widen_map(width, new_width, key)``; the outgoing weights of each
    copy are divided by the number of copies ``c``: ``W1' = W1[..., g]``, ``b1' = b1[g]``,
    ``W2'[..., j, :] = W2[..., g[j], :] / c[g[j]]`` — the function is unchanged (Chen et al., 2016,
    "Net2Net"). ``noise > 0`` adds ``noise * N(0, 1) * std(W2)`` to the copies' outgoing weights
    to break symmetry (then the function changes by about that much; needs ``key``). ``extra``
    are per-unit arrays between the layers (a batch norm's scale, bias, mean, var), replicated too.

    Args:
      w1: ``(..., in, width)``; b1: ``(width,)`` or None; w2: ``(..., width, out)``.
      new_width: static int ``>= width``.

    Returns:
      ``(w1', b1', w2', *extra')``.

    >>> import jax.numpy as jnp
    >>> w1, b1, w2 = widen(jnp.ones((2, 1)), jnp.zeros(1), jnp.full((1, 1), 3.0), 3)
    >>> w2.ravel().tolist()
    [1.0, 1.0, 1.0]
    """
    width = w1.shape[-1]
    if w2.ndim < 2 or w2.shape[-2] != width:
        raise ValueError(
            f"splice.widen: w2 input axis (-2) must be {width} like w1's output axis, "
            f"got shapes {tuple(w1.shape)} and {tuple(w2.shape)}"
        )
    g = widen_map(
        width, new_width, key if noise == 0.0 or key is None else jax.random.fold_in(key, 1)
    )
    lead = (1,) * (w2.ndim - 2)
    counts = jnp.bincount(g, length=width)[g].astype(w2.dtype).reshape(lead + (new_width, 1))
    w1n = jnp.take(w1, g, axis=-1)
    w2n = jnp.take(w2, g, axis=-2) / counts
    if noise:
        if key is None:
            raise ValueError("splice.widen: noise > 0 needs a key")
        copies = jnp.asarray(np.arange(new_width) >= width).reshape(lead + (new_width, 1))
        eps = noise * jnp.std(w2) * jax.random.normal(key, w2n.shape, w2n.dtype)
        w2n = jnp.where(copies, w2n + eps, w2n)
    out = [w1n, None if b1 is None else jnp.take(b1, g, axis=-1), w2n]
    for x in extra:
        if x is not None and x.shape[-1] != width:
            raise ValueError(f"splice.widen: extra arrays must end in {width}, got {x.shape}")
        out.append(None if x is None else jnp.take(x, g, axis=-1))
    return tuple(out)


_IDEMPOTENT = {
    None: None,
    "linear": None,
    "identity": None,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "hard_tanh": jax.nn.hard_tanh,
}


def deepen(
    width: int,
    activation: str | None = "relu",
    *,
    kernel_size: tuple[int, ...] | None = None,
    dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """Net2DeeperNet: an identity layer ``(W, b)`` to insert after a layer of ``width`` units.

    Dense: ``W = I`` ``(width, width)``, ``b = 0``. Conv (``kernel_size`` given, odd sizes,
    stride 1, ``SAME`` padding): ``W[centre, i, i] = 1``, zero elsewhere. The inserted layer
    computes ``act(h W + b) = act(h)``, equal to ``h`` when ``h`` already went through ``act`` —
    so ``activation`` must be idempotent (``relu``, ``relu6``, ``hard_tanh``, or none).

    >>> w, b = deepen(2)
    >>> w.tolist(), b.tolist()
    ([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    """
    if activation not in _IDEMPOTENT:
        raise ValueError(
            f"splice.deepen: activation={activation!r} is not idempotent, so an identity layer "
            f"would change the function; use one of {[k for k in _IDEMPOTENT if k]} or None"
        )
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"splice.deepen: width must be a positive int, got {width!r}")
    eye = jnp.eye(width, dtype=dtype)
    if kernel_size is None:
        return eye, jnp.zeros((width,), dtype)
    ks = tuple(int(k) for k in kernel_size)
    if any(k < 1 or k % 2 == 0 for k in ks):
        raise ValueError(f"splice.deepen: kernel_size must be odd, got {kernel_size!r}")
    w = jnp.zeros((*ks, width, width), dtype).at[tuple(k // 2 for k in ks)].set(eye)
    return w, jnp.zeros((width,), dtype)


def _split_block(block: str | tuple[str, int]) -> tuple[str, int | None]:
    if isinstance(block, tuple):
        return block[0], int(block[1])
    if isinstance(block, str):
        return block, None
    raise TypeError(f"splice.drop_layer: block must be a path or (path, index), got {block!r}")


def drop_layer(params: Any, block: str | tuple[str, int], *, axis: int = 0) -> Any:
    """Removes a residual block (the model then treats it as the identity); returns a new tree.

    * ``block="blocks/1"``: the subtree at that path is removed — popped from a list (later blocks
      shift down) or deleted from a dict. ``fn`` must iterate over what is there.
    * ``block=("blocks", 1)``: a scanned stack, every leaf under ``blocks`` having a layer axis
      ``axis``: index 1 is sliced out of each.

    >>> import jax.numpy as jnp
    >>> p = {"blocks": [{"w": jnp.ones(2)}, {"w": jnp.zeros(2)}], "head": jnp.ones(2)}
    >>> len(drop_layer(p, "blocks/0")["blocks"])
    1
    >>> drop_layer({"stack": {"w": jnp.ones((3, 2))}}, ("stack", 1))["stack"]["w"].shape
    (2, 2)
    """
    path, index = _split_block(block)
    if index is not None:
        names = [p for p, _ in _tree.leaves_with_paths(params)]
        inside = [p for p in names if p == path or p.startswith(path + "/")]
        if not inside:
            raise ValueError(f"splice.drop_layer: no leaf under {path!r}; leaves are {names[:8]}")

        def cut(p, x):
            name = _tree.path_str(p)
            if name not in inside:
                return x
            if x.ndim <= axis or not 0 <= index < x.shape[axis]:
                raise ValueError(
                    f"splice.drop_layer: layer {index} is out of range for "
                    f"{name!r} with shape {tuple(x.shape)} on axis {axis}"
                )
            if x.shape[axis] == 1:
                raise ValueError(f"splice.drop_layer: {name!r} has a single layer left")
            keep = np.delete(np.arange(x.shape[axis]), index)
            return jnp.take(x, keep, axis=axis)

        return jax.tree_util.tree_map_with_path(cut, params)
    return _drop(params, path.split("/"), path)


def _drop(node: Any, keys: list[str], path: str) -> Any:
    k, rest = keys[0], keys[1:]
    if isinstance(node, Mapping):
        if k not in node:
            raise ValueError(f"splice.drop_layer: {path!r} is not in the tree (no key {k!r})")
        out = {kk: v for kk, v in node.items() if not (kk == k and not rest)}
        if rest:
            out[k] = _drop(node[k], rest, path)
        return out if type(node) is dict else type(node)(out)
    if isinstance(node, list | tuple):
        if not (k.isdigit() and int(k) < len(node)):
            raise ValueError(f"splice.drop_layer: {path!r} is not in the tree (no index {k!r})")
        i = int(k)
        new = list(node)
        if rest:
            new[i] = _drop(node[i], rest, path)
        else:
            del new[i]
        return new if isinstance(node, list) else type(node)(new)
    raise ValueError(
        f"splice.drop_layer: {path!r} is not in the tree (cannot index "
        f"{type(node).__name__} with {k!r})"
    )
