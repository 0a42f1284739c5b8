"""Pytree paths, ``where=`` filters and leaf helpers shared by every part of jaxslim.

A leaf is named by its *path string*: the keys from the root joined by ``/``, e.g.
``"params/Dense_0/kernel"`` for a Linen tree or ``"l1/kernel"`` for an NNX state (the ``.value``
of an NNX ``Variable`` is dropped from the name).

Every tree-wide function takes ``where=``:

* ``None``: every floating-point array leaf with ``ndim >= 2`` (kernels, not biases or scales);
* a regex ``str``: floating-point array leaves whose path matches ``re.search``;
* a predicate ``(path, leaf) -> bool``: called on floating-point array leaves only.

Leaves that are not selected (ints, bools, PRNG keys, ``None``, scalars, size-0 arrays and anything
the filter rejects) pass through untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Where = None | str | Callable[[str, Any], bool]

__all__ = [
    "Where",
    "path_str",
    "is_float_array",
    "is_selected",
    "selected_paths",
    "map_selected",
    "leaves_with_paths",
    "check_same_structure",
    "match_sharding",
    "subtree",
    "child_key",
]


def _key_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """Returns the ``/``-joined name of a key path from ``jax.tree_util``.

    >>> import jax
    >>> [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path({"a": {"b": 1}, "c": [2]})]
    ['a/b', 'c/0']
    """
    keys = list(path)
    # An NNX Variable stores its array under the attribute `value`; drop it from the name.
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_str(k) for k in keys)


def is_float_array(leaf: Any) -> bool:
    """True for a non-empty floating-point array (jax or numpy), scalars of ndim 0 included."""
    if not isinstance(leaf, jax.Array | np.ndarray) and not hasattr(leaf, "aval"):
        return False
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return False
    return bool(jnp.issubdtype(dtype, jnp.floating)) and int(np.prod(leaf.shape)) > 0


def is_selected(where: Where, path: str, leaf: Any) -> bool:
    """Whether ``where`` selects the leaf named ``path`` (see the module docstring)."""
    if not is_float_array(leaf):
        return False
    if where is None:
        return leaf.ndim >= 2
    if isinstance(where, str):
        return re.search(where, path) is not None
    if callable(where):
        return bool(where(path, leaf))
    raise TypeError(
        f"where must be None, a regex string or a predicate (path, leaf) -> bool; got {where!r}"
    )


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``[(path_string, leaf), ...]`` in ``jax.tree`` order (``None`` is not a leaf)."""
    return [(path_str(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def selected_paths(tree: Any, where: Where, *, fn_name: str, allow_empty: bool = False) -> list:
    """Paths of the leaves ``where`` selects; raises ``ValueError`` if it selects none."""
    paths = [p for p, leaf in leaves_with_paths(tree) if is_selected(where, p, leaf)]
    if not paths and not allow_empty:
        names = [p for p, _ in leaves_with_paths(tree)][:8]
        raise ValueError(
            f"{fn_name}: where={where!r} selects no floating-point array leaf; "
            f"leaves are {names}{' ...' if len(names) == 8 else ''}"
        )
    return paths


def map_selected(
    fn: Callable[..., Any],
    tree: Any,
    *rest: Any,
    where: Where = None,
    fn_name: str = "jaxslim",
    allow_empty: bool = False,
    unselected: Callable[..., Any] = lambda leaf, *rest: leaf,
) -> Any:
    """Maps ``fn(path, leaf, *rest_leaves)`` over the leaves of ``tree`` that ``where`` selects.

    ``rest`` are trees with ``tree``'s structure (or a prefix of it, e.g. masks holding ``None``).
    Unselected leaves become ``unselected(leaf, *rest_leaves)`` — by default the leaf itself.
    Raises ``ValueError`` naming ``fn_name`` when ``where`` selects nothing (unless
    ``allow_empty``) and when a tree in ``rest`` does not match ``tree``.
    """
    selected_paths(tree, where, fn_name=fn_name, allow_empty=allow_empty)
    for other in rest:
        check_same_structure(tree, other, fn_name=fn_name)

    def visit(path, leaf, *others):
        name = path_str(path)
        if is_selected(where, name, leaf):
            return fn(name, leaf, *others)
        return unselected(leaf, *others)

    return jax.tree_util.tree_map_with_path(visit, tree, *rest)


def check_same_structure(tree: Any, other: Any, *, fn_name: str) -> None:
    """Raises ``ValueError`` unless ``other`` is ``tree`` with some leaves replaced by ``None``."""
    try:
        jax.tree.map(lambda *_: None, tree, other)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{fn_name}: tree structures differ: {jax.tree.structure(tree)} vs "
            f"{jax.tree.structure(other)} ({e})"
        ) from None


def match_sharding(x: jax.Array, ref: jax.Array) -> jax.Array:
    """Gives ``x`` the explicit sharding of ``ref`` (same shape), if ``ref`` has one.

    Under a mesh with ``Explicit`` axes the sharding is part of the type, and a value broadcast
    from a smaller array (a channel mask) would otherwise come out less sharded than the leaf it
    masks. Resharding to a finer spec only slices locally; nothing is gathered. A no-op for
    arrays without explicit sharding.
    """
    try:
        sharding = jax.typeof(ref).sharding
        spec, mine = sharding.spec, jax.typeof(x).sharding.spec
    except AttributeError:
        return x
    if all(s is None for s in spec) or tuple(spec) == tuple(mine):
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, spec))


def child_key(node: Any, name: str) -> Any:
    """The key of ``node`` whose path-string form is ``name``.

    List items take an ``int``; dicts whose keys are ints (NNX states of list attributes) match
    ``"0"`` to ``0``; otherwise the string itself.
    """
    if isinstance(node, list | tuple):
        return int(name)
    if isinstance(node, Mapping) and name not in node and name.lstrip("-").isdigit():
        if int(name) in node:
            return int(name)
    return name


def subtree(tree: Any, path: str, *, fn_name: str) -> Any:
    """The node of ``tree`` at ``path`` (``"blocks/1/w"``, the form ``path_str`` gives).

    Raises ``ValueError`` naming ``fn_name``, the path and the missing key.

    >>> subtree({"blocks": [{"w": 1}, {"w": 2}]}, "blocks/1/w", fn_name="f")
    2
    """
    node = tree
    for name in path.split("/"):
        try:
            node = node[child_key(node, name)]
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise ValueError(f"{fn_name}: {path!r} is not in the tree (no key {name!r})") from e
    return node
