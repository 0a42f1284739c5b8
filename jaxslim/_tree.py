"""Pytree paths, ``where=`` filters and leaf helpers shared by every part of jaxslim.

A leaf is named by its *path string*: the keys from the root joined by ``/``, e.g.
``"params/Dense_0/kernel"`` for a Linen tree or ``"l1/kernel"`` for an NNX state (the ``.value``
of an NNX ``Variable`` is dropped from the name).

Every tree-wide function takes ``where=``:

* ``None``: every floating-point matrix, and every higher-rank floating-point array with at
  least two axes of size > 1 (kernels; not biases, scales, or an Equinox conv bias
  ``(O, 1, 1)``);
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

from jaxslim._checks import caller

Where = None | str | Callable[[str, Any], bool]


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


def check_where(where: Any) -> None:
    """Raises unless ``where`` is ``None``, a valid regex ``str`` or a callable.

    ``TypeError`` for another type, ``ValueError`` for a pattern ``re`` cannot compile (instead
    of a bare ``re.error``); both name the public call (``_checks.caller()``) and the pattern.

    >>> check_where("Dense_[")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: jaxslim: where='Dense_[' is not a valid regular expression (...); ... re.escape
    """
    if where is None or (callable(where) and not isinstance(where, str)):
        return
    if isinstance(where, str):
        try:
            re.compile(where)
        except re.error as e:
            raise ValueError(
                f"{caller()}: where={where!r} is not a valid regular expression ({e}); "
                "escape literal characters with re.escape"
            ) from None
        return
    raise TypeError(
        f"{caller()}: where must be None, a regex string or a predicate (path, leaf) -> bool; "
        f"got {type(where).__name__} {where!r}"
    )


def is_selected(where: Where, path: str, leaf: Any) -> bool:
    """Whether ``where`` selects the leaf named ``path`` (see the module docstring).

    Raises as :func:`check_where` for an invalid ``where``, whatever the leaf.
    """
    check_where(where)
    if not is_float_array(leaf):
        return False
    if where is None:
        # A matrix is a kernel (a Dense (n, 1) too); a higher-rank leaf needs two axes of size
        # > 1, so an Equinox conv bias (O, 1, 1) or a broadcast scale (1, 1, C) is not one.
        return leaf.ndim == 2 or (leaf.ndim > 2 and sum(int(d) > 1 for d in leaf.shape) >= 2)
    if isinstance(where, str):
        return re.search(where, path) is not None
    try:
        return bool(where(path, leaf))
    except Exception as e:
        raise ValueError(
            f"{caller()}: the where= predicate raised {type(e).__name__}: {e} for the leaf "
            f"{path!r} (shape {tuple(leaf.shape)}, dtype {leaf.dtype}); it is called as "
            "where(path, leaf) on every floating-point leaf"
        ) from e


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``[(path_string, leaf), ...]`` in ``jax.tree`` order (``None`` is not a leaf)."""
    return [(path_str(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def selected_paths(tree: Any, where: Where, *, allow_empty: bool = False) -> list:
    """Paths of the leaves ``where`` selects; raises ``ValueError`` if it selects none."""
    check_where(where)
    paths = [p for p, leaf in leaves_with_paths(tree) if is_selected(where, p, leaf)]
    if not paths and not allow_empty:
        names = [p for p, _ in leaves_with_paths(tree)][:8]
        raise ValueError(
            f"{caller()}: where={where!r} selects no floating-point array leaf; "
            f"leaves are {names}{' ...' if len(names) == 8 else ''}"
        )
    return paths


def map_selected(
    fn: Callable[..., Any],
    tree: Any,
    *rest: Any,
    where: Where = None,
    allow_empty: bool = False,
    unselected: Callable[..., Any] = lambda leaf, *rest: leaf,
) -> Any:
    """Maps ``fn(path, leaf, *rest_leaves)`` over the leaves of ``tree`` that ``where`` selects.

    ``rest`` are trees with ``tree``'s structure (or a prefix of it, e.g. masks holding ``None``).
    Unselected leaves become ``unselected(leaf, *rest_leaves)`` — by default the leaf itself.
    Raises ``ValueError`` naming the public call when ``where`` selects nothing (unless
    ``allow_empty``) and when a tree in ``rest`` does not match ``tree``.
    """
    selected_paths(tree, where, allow_empty=allow_empty)
    for other in rest:
        check_same_structure(tree, other)

    def visit(path, leaf, *others):
        name = path_str(path)
        if is_selected(where, name, leaf):
            return fn(name, leaf, *others)
        return unselected(leaf, *others)

    return jax.tree_util.tree_map_with_path(visit, tree, *rest)


def reject_traced(tree: Any, *, why: str) -> None:
    """Raises ``TypeError`` naming the first traced leaf of ``tree``.

    For eager-only entry points (one-shot calibration reads values and loops in Python): the
    message names the function, the leaf path and ``why`` it must run outside ``jax.jit``.
    """
    traced = [p for p, x in leaves_with_paths(tree) if isinstance(x, jax.core.Tracer)]
    if traced:
        raise TypeError(
            f"{caller()}: params leaf {traced[0]!r} is traced: {why}, so call it outside "
            "jax.jit/vmap/grad (its per-kernel work is jitted inside)"
        )


def check_same_structure(tree: Any, other: Any) -> None:
    """Raises ``ValueError`` unless ``other`` is ``tree`` with some leaves replaced by ``None``."""
    try:
        jax.tree.map(lambda *_: None, tree, other)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{caller()}: tree structures differ: {jax.tree.structure(tree)} vs "
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


def subtree(tree: Any, path: str) -> Any:
    """The node of ``tree`` at ``path``: :func:`get_path` (kept for older callers).

    >>> subtree({"blocks": [{"w": 1}, {"w": 2}]}, "blocks/1/w")
    2
    """
    return get_path(tree, path)


# --- get / set / delete by path -------------------------------------------------------------
#
# A path is the ``/``-joined string ``path_str`` gives ("blocks/1/w"), or a key path from
# ``jax.tree_util``. One step of a path names a child of a node:
#
# * a ``Mapping`` (dict, FrozenDict, an NNX ``State``, ``nnx.to_pure_dict`` output): its keys,
#   ``str`` or ``int`` (NNX states of ``nnx.List``/``nnx.Sequential``/list attributes are keyed
#   0, 1, ...): ``"1"`` names the key ``1`` unless there is a key ``"1"``;
# * a list or tuple: its indices; a NamedTuple: its field names;
# * any other registered pytree node (a dataclass, an Equinox module): the names ``path_str``
#   gives its children.
#
# An NNX ``Variable`` is named without its ``.value`` (like ``path_str``): ``get_path`` returns
# the array inside, ``set_path`` puts an array inside a copy of the Variable.
# Keys that themselves contain "/" are matched whole (the longest key that fits wins).


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def _is_variable(node: Any) -> bool:
    """An NNX ``Variable`` (duck-typed: flax is not imported here)."""
    return (
        not isinstance(node, Mapping | list | tuple)
        and hasattr(node, "get_value")
        and hasattr(node, "replace")
    )


def _is_leaf(node: Any) -> bool:
    return node is None or jax.tree_util.all_leaves([node])


def _children(node: Any) -> list[tuple[str, Any]]:
    """``[(name, key), ...]``: the children of ``node`` as path strings and exact keys."""
    if isinstance(node, Mapping):
        return [(str(k), k) for k in node]
    if _is_namedtuple(node):
        return [(f, f) for f in node._fields]
    if isinstance(node, list | tuple):
        return [(str(i), i) for i in range(len(node))]
    if _is_variable(node) or _is_leaf(node):
        return []
    keyed, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    return [(_key_str(p[0]), p[0]) for p, _ in keyed]


def _child(node: Any, key: Any) -> Any:
    if isinstance(node, Mapping):
        return node[key]
    if _is_namedtuple(node):
        return getattr(node, key)
    if isinstance(node, list | tuple):
        return node[key]
    keyed, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    return next(x for p, x in keyed if p[0] == key)


def _rebuild(node: Any, key: Any, value: Any, path: str) -> Any:
    """A shallow copy of ``node`` with child ``key`` replaced by ``value``."""
    if isinstance(node, Mapping):
        items = dict(node.items())
        items[key] = value
        return _same_mapping(node, items, path)
    if _is_namedtuple(node):
        return node._replace(**{key: value})
    if isinstance(node, list | tuple):
        new = list(node)
        new[key] = value
        return new if isinstance(node, list) else type(node)(new)
    keyed, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    return jax.tree_util.tree_unflatten(treedef, [value if p[0] == key else x for p, x in keyed])


def _same_mapping(node: Mapping, items: dict, path: str) -> Any:
    if type(node) is dict:
        return items
    try:
        return type(node)(items)
    except TypeError as e:
        raise TypeError(
            f"{caller()}: cannot rebuild the {type(node).__name__} holding {path!r} from a dict "
            f"({e}); convert the tree to plain dicts first"
        ) from None


def _path_string(path: Any) -> str:
    if isinstance(path, str):
        return path
    if isinstance(path, Sequence) and all(
        isinstance(k, jax.tree_util.DictKey | jax.tree_util.SequenceKey | jax.tree_util.GetAttrKey)
        or isinstance(k, jax.tree_util.FlattenedIndexKey)
        for k in path
    ):
        return path_str(path)
    raise TypeError(
        f"{caller()}: path must be a '/'-joined string such as 'blocks/1/w' or a jax key path, "
        f"got {type(path).__name__} {path!r}"
    )


def _step(node: Any, rest: str, path: str, done: str) -> tuple[Any, str, str]:
    """``(key, name, rest_after)``: the child of ``node`` that the head of ``rest`` names."""
    children = _children(node)
    fits = [(n, k) for n, k in children if rest == n or rest.startswith(n + "/")]
    where = f"under {done!r}" if done else "at the root"
    if not fits:
        head = rest.split("/", 1)[0]
        if not children:
            raise ValueError(
                f"{caller()}: {path!r} is not in the tree (no key {head!r} {where}: that node is "
                f"a leaf of type {type(node).__name__})"
            )
        names = [n for n, _ in children]
        more = " ..." if len(names) > 8 else ""
        raise ValueError(
            f"{caller()}: {path!r} is not in the tree (no key {head!r} {where}; keys there: "
            f"{names[:8]}{more})"
        )
    # the longest key wins ("a/b" over "a"); between 1 and "1", the string
    name, key = max(fits, key=lambda nk: (len(nk[0]), isinstance(nk[1], str)))
    return key, name, rest[len(name) + 1 :]


def get_path(tree: Any, path: str | Sequence[Any]) -> Any:
    """The node of ``tree`` at ``path`` (``"blocks/1/w"``, as :func:`path_str` names it).

    Works on dicts with ``str`` or ``int`` keys, lists, tuples, NamedTuples, NNX ``State`` (and
    its ``nnx.to_pure_dict`` form) and other pytree nodes; an NNX ``Variable`` gives its value,
    so ``get_path(tree, p)`` is the leaf that :func:`leaves_with_paths` names ``p``. ``""`` is
    the root. Raises ``ValueError`` naming the public call, the path and the missing key.

    >>> get_path({"blocks": [{"w": 1}, {"w": 2}]}, "blocks/1/w")
    2
    >>> get_path({"blocks": {0: {"w": 1}}}, "blocks/0/w")  # an nnx.List state
    1
    >>> get_path({"blocks": [1]}, "blocks/3")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: jaxslim: 'blocks/3' is not in the tree (no key '3' under 'blocks'; ...)
    """
    path = _path_string(path)
    node, rest, done = tree, path, ""
    while rest:
        key, name, rest = _step(node, rest, path, done)
        node = _child(node, key)
        done = f"{done}/{name}" if done else name
    return node.get_value() if _is_variable(node) else node


def set_path(
    tree: Any,
    path: str | Sequence[Any],
    value: Any,
    *,
    create: bool = False,
) -> Any:
    """A new tree with the node at ``path`` replaced by ``value``; ``tree`` is not modified.

    Only the containers on the path are copied (shallow); everything else is shared. Where the
    old node is an NNX ``Variable`` and ``value`` is not, the new node is the Variable with
    ``value`` inside (its metadata kept). With ``create=True`` the last key may be missing from
    a mapping and is added; otherwise a missing key raises ``ValueError`` as :func:`get_path`.
    ``path=""`` returns ``value``.

    >>> t = {"blocks": [{"w": 1}, {"w": 2}]}
    >>> set_path(t, "blocks/0/w", 5), t
    ({'blocks': [{'w': 5}, {'w': 2}]}, {'blocks': [{'w': 1}, {'w': 2}]})
    >>> set_path({"l": {"kernel": 1}}, "l/bias", 0, create=True)
    {'l': {'kernel': 1, 'bias': 0}}
    """
    path = _path_string(path)

    def go(node: Any, rest: str, done: str) -> Any:
        if not rest:
            if _is_variable(node) and not _is_variable(value):
                return node.replace(value)
            return value
        if create and isinstance(node, Mapping) and "/" not in rest:
            fits = [k for n, k in _children(node) if n == rest]
            if not fits:
                return _rebuild(node, rest, value, path)
        key, name, after = _step(node, rest, path, done)
        new = go(_child(node, key), after, f"{done}/{name}" if done else name)
        return _rebuild(node, key, new, path)

    return go(tree, path, "")


def _is_index_keyed(node: Mapping) -> bool:
    keys = list(node)
    return all(type(k) is int for k in keys) and sorted(keys) == list(range(len(keys)))


def delete_path(tree: Any, path: str | Sequence[Any]) -> Any:
    """A new tree without the node at ``path``; ``tree`` is not modified.

    From a list or tuple the item is popped (later items shift down). From a mapping the key is
    removed; a mapping keyed exactly ``0 .. n-1`` (the NNX state of an ``nnx.List``,
    ``nnx.Sequential`` or list attribute, and its ``nnx.to_pure_dict`` form) behaves like a list:
    the later keys shift down, so the result is the state of the list without that item. A
    NamedTuple field or another node's child cannot be deleted (``ValueError``).

    >>> delete_path({"blocks": [10, 11, 12]}, "blocks/1")
    {'blocks': [10, 12]}
    >>> delete_path({"blocks": {0: 10, 1: 11, 2: 12}}, "blocks/1")
    {'blocks': {0: 10, 1: 12}}
    """
    path = _path_string(path)
    if not path:
        raise ValueError(f"{caller()}: cannot delete the root (path '')")

    def go(node: Any, rest: str, done: str) -> Any:
        key, name, after = _step(node, rest, path, done)
        if after:
            new = go(_child(node, key), after, f"{done}/{name}" if done else name)
            return _rebuild(node, key, new, path)
        if isinstance(node, Mapping):
            shift = _is_index_keyed(node)
            items = {(k - 1 if shift and k > key else k): v for k, v in node.items() if k != key}
            return _same_mapping(node, items, path)
        if isinstance(node, list | tuple) and not _is_namedtuple(node):
            new = [v for i, v in enumerate(node) if i != key]
            return new if isinstance(node, list) else type(node)(new)
        raise ValueError(
            f"{caller()}: cannot delete {path!r}: its parent is a {type(node).__name__}, "
            "whose children are fixed (only dict, list and tuple items can be removed)"
        )

    return go(tree, path, "")
