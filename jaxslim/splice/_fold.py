"""Finds the batch norms to fold and the linear pairs to fuse in a traced function; applies them.

``find_foldable(fn, params, *args)`` walks the jaxpr of ``fn(params, *args)`` (shapes only) and
follows the output of every Dense (``dot_general`` with a ``(in, out)`` parameter kernel) and Conv
(``conv_general_dilated`` with a ``(*spatial, in, out)`` kernel) through the ops that keep it a
per-channel affine function of that output, ``y = z * s + t`` with ``s``, ``t`` computed from
parameters and constants only: a bias add, an inference-mode batch norm (``(z - mean) *
rsqrt(var + eps) * scale + bias``), a constant scale. Where the chain stops it reports

* :class:`Fold` — the chain ends at a non-linear op: ``W' = W * s``, ``b' = t``
  (:func:`jaxslim.splice.fold_batchnorm` generalised), the chain's parameters go;
* :class:`Fuse` — the chain feeds straight into another Dense, or a 1x1 Conv, on the same
  channel axis: the two layers become one, ``(W1 s) W2`` (:func:`jaxslim.splice.fuse_linear`).

A chain is only reported when every intermediate value has a single use and every parameter in it
is used by nothing else, so the rewrite is exact. ``s`` and ``t`` are kept as small expressions
over the parameter paths, evaluated by :func:`fold_all` / :func:`fuse_all` on the tree they get.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxslim import _jaxpr, _tree
from jaxslim._checks import caller, public
from jaxslim.splice._affine import Finder, Param, affine_values
from jaxslim.splice._surgery import fuse_linear


@dataclasses.dataclass(frozen=True)
class Fold:
    """A per-channel affine chain after a layer, to fold into it.

    ``kernel``/``bias`` are the layer's paths (``bias`` None if it has none: folding creates
    ``<module>/bias``); ``absorbed`` the chain's other parameters (a batch norm's scale, bias,
    mean, var), removed by :func:`fold_all`. ``scale``/``shift`` are the chain's ``s``/``t`` as
    expressions over parameter paths (see the module docstring).
    """

    kernel: str
    bias: str | None
    absorbed: tuple[str, ...]
    scale: Any = dataclasses.field(default=None, repr=False, compare=False)
    shift: Any = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Fuse:
    """Two linear layers with only a per-channel affine chain between: ``first`` then ``second``.

    :func:`fuse_all` stores the merged layer under ``first``'s paths (it keeps ``first``'s
    convolution settings) and removes ``second``'s kernel and bias and the chain's ``absorbed``
    parameters. ``first``/``second`` are ``(kernel path, bias path or None)``.
    """

    first: tuple[str, str | None]
    second: tuple[str, str | None]
    absorbed: tuple[str, ...]
    scale: Any = dataclasses.field(default=None, repr=False, compare=False)
    shift: Any = dataclasses.field(default=None, repr=False, compare=False)


@public("splice.find_foldable")
def find_foldable(fn: Callable[..., Any], params: Any, *example_args: Any) -> list[Fold | Fuse]:
    """Batch norms (and other per-channel affine chains) to fold, and linear pairs to fuse.

    Traces ``fn(params, *example_args)`` on shapes only (like :func:`jaxslim.splice.trace`) and
    returns, in program order of the first layer, a :class:`Fold` for every Dense/Conv whose output
    goes through a per-channel affine chain (beyond its own bias) before a non-linear op, and a
    :class:`Fuse` for every Dense/Conv whose output (after such a chain) feeds only a Dense or a
    1x1 Conv. Layouts follow Flax (``(in, out)``, ``(*spatial, in, out)``); trace in inference mode
    (Linen ``use_running_average=True``, NNX ``model.eval()``). A kernel used by two layers, or a
    value used twice inside a chain, is not reported. Layers inside ``jit``, ``cond``, ``scan`` and
    ``while`` bodies are found too when their kernel is a constant of the body (a stacked kernel
    sliced by ``scan`` is not).

    >>> import jax.numpy as jnp
    >>> p = {"w": jnp.ones((3, 4)), "mean": jnp.zeros(4), "var": jnp.ones(4), "v": jnp.ones((4, 2))}
    >>> def fn(p, x):
    ...     h = (x @ p["w"] - p["mean"]) * jax.lax.rsqrt(p["var"] + 1e-5)
    ...     return jax.nn.relu(h) @ p["v"]
    >>> find_foldable(fn, p, jnp.ones((1, 3)))
    [Fold(kernel='w', bias=None, absorbed=('mean', 'var'))]
    """
    t = _jaxpr.make_jaxpr(fn, params, *example_args)
    f = Finder()
    ins = [Param(p, True) for p in t.param_paths] + [None] * len(t.arg_paths)
    f.walk(t.jaxpr, ins, t.consts)
    found: list[Fold | Fuse] = []
    bias = {layer: end[1].bias for layer, end in f.ends.items()}
    for layer in f.order:
        if f.kernel_uses.get(layer, 0) != 1 or layer not in f.ends:
            continue
        _, a = f.ends[layer]
        absorbed = tuple(sorted(a.params - {a.bias}))
        if layer in f.fused:
            fa, second = f.fused[layer]
            if fa == a.steps and f.kernel_uses.get(second) == 1 and second in f.ends:
                found.append(Fuse((layer, a.bias), (second, bias.get(second)), absorbed, a.s, a.t))
                continue
        if a.steps > (1 if a.bias else 0):
            found.append(Fold(layer, a.bias, absorbed, a.s, a.t))
    return found


def _nested(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _nested(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple) and not hasattr(tree, "_fields"):
        return [_nested(v) for v in tree]
    return tree


def _locate(tree: Any, path: str) -> tuple[Any, Any]:
    parent, _, name = path.rpartition("/")
    node = _tree.subtree(tree, parent) if parent else tree
    if not isinstance(node, dict | list):
        raise TypeError(f"{caller()}: cannot edit {path!r} inside a {type(node).__name__}")
    return node, _tree.child_key(node, name)


def _set(tree: Any, path: str, value: Any) -> None:
    node, key = _locate(tree, path)
    node[key] = value


def _delete(tree: Any, path: str) -> None:
    node, key = _locate(tree, path)
    if isinstance(node, dict):
        node.pop(key, None)


def _prune_empty(tree: Any) -> Any:
    if isinstance(tree, dict):
        out = {k: _prune_empty(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
    return tree


def _leaf(leaves: Mapping[str, Any], path: str) -> jax.Array:
    if path not in leaves:
        raise ValueError(f"{caller()}: the tree has no kernel {path!r} named by the plan")
    return jnp.asarray(leaves[path])


def _bias_path(kernel: str) -> str:
    module, _, _ = kernel.rpartition("/")
    return f"{module}/bias" if module else "bias"


def _check_found(found: Sequence[Any], kind: type) -> list:
    out = []
    for r in found:
        if not isinstance(r, Fold | Fuse):
            raise TypeError(f"{caller()}: expected Fold/Fuse records from find_foldable, got {r!r}")
        if isinstance(r, kind):
            out.append(r)
    return out


@public("splice.fold_all")
def fold_all(params: Any, found: Sequence[Fold | Fuse]) -> Any:
    """Applies every :class:`Fold` of ``found`` to ``params``; returns a new nested-dict tree.

    For each, ``W' = W * s`` on the output axis and ``b' = t`` (written to the layer's bias path,
    ``<module>/bias`` if it had none: rebuild that layer with a bias), and the chain's parameters
    (``absorbed``: a batch norm's scale, bias, mean, var) are removed, with any container left
    empty (a Linen ``batch_stats`` collection). :class:`Fuse` records are skipped (see
    :func:`fuse_all`, applied after this). Rebuild the model without the folded norms.

    >>> import jax.numpy as jnp
    >>> p = {"w": jnp.ones((3, 4)), "mean": jnp.ones(4), "var": jnp.full(4, 4.0)}
    >>> p["v"] = jnp.ones((4, 2))
    >>> def fn(p, x):
    ...     return jax.nn.relu((x @ p["w"] - p["mean"]) / jnp.sqrt(p["var"])) @ p["v"]
    >>> new = fold_all(p, find_foldable(fn, p, jnp.ones((1, 3))))
    >>> sorted(new), new["w"][0, 0].item(), new["bias"][0].item()
    (['bias', 'v', 'w'], 0.5, -0.5)
    """
    folds = _check_found(found, Fold)
    leaves = dict(_tree.leaves_with_paths(params))
    out = _nested(params)
    for r in folds:
        w = _leaf(leaves, r.kernel)
        s, t = affine_values(r.scale, r.shift, leaves, w.shape[-1], w.dtype)
        _set(out, r.kernel, w * s.reshape((1,) * (w.ndim - 1) + (-1,)))
        for p in r.absorbed:
            _delete(out, p)
        _set(out, r.bias or _bias_path(r.kernel), t)
    return _prune_empty(out)


@public("splice.fuse_all")
def fuse_all(params: Any, found: Sequence[Fold | Fuse]) -> Any:
    """Applies every :class:`Fuse` of ``found`` to ``params``; returns a new nested-dict tree.

    For ``first -> chain -> second``: ``W = (W1 s) W2``, ``b = t W2 + b2``
    (:func:`jaxslim.splice.fuse_linear`), stored under ``first``'s kernel and bias paths; the
    chain's ``absorbed`` parameters and ``second``'s kernel and bias are removed. Rebuild the model
    with ``first`` producing ``second``'s features and without ``second``. Pairs are applied last
    first, so a run ``L1 -> L2 -> L3`` collapses into ``L1``. Apply :func:`fold_all` first when
    ``found`` also has folds (a :class:`Fold` of ``second`` changes ``W2``).

    >>> import jax.numpy as jnp
    >>> p = {"a": jnp.ones((3, 4)), "b": jnp.ones((4, 2))}
    >>> found = find_foldable(lambda p, x: x @ p["a"] @ p["b"], p, jnp.ones((1, 3)))
    >>> new = fuse_all(p, found)
    >>> sorted(new), new["a"].shape, new["a"][0, 0].item()
    (['a', 'bias'], (3, 2), 4.0)
    """
    fuses = _check_found(found, Fuse)
    out = _nested(params)
    moved: dict[str, tuple[str, str]] = {}
    for r in reversed(fuses):
        leaves = dict(_tree.leaves_with_paths(out))
        (k1, b1), (k2, b2) = r.first, r.second
        k2, b2 = moved.get(k2, (k2, b2 or _bias_path(k2)))
        w1 = _leaf(leaves, k1)
        s, t = affine_values(r.scale, r.shift, leaves, w1.shape[-1], w1.dtype)
        w1 = w1 * s.reshape((1,) * (w1.ndim - 1) + (-1,))
        w2 = _leaf(leaves, k2)
        w, b = fuse_linear(w1, t, w2, leaves.get(b2))
        for p in (*r.absorbed, k2, b2):
            _delete(out, p)
        if b1 is not None:
            _delete(out, b1)
        new_b1 = b1 or _bias_path(k1)
        _set(out, k1, w)
        _set(out, new_b1, b)
        moved[k1] = (k1, new_b1)
    return _prune_empty(out)
