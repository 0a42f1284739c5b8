"""_tree: get/set/delete by path on every container kind, and ``where=`` validation."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from jaxslim import _tree
from jaxslim._checks import calling, public


class Pair(NamedTuple):
    a: object
    b: object


class Block(nnx.Module):
    def __init__(self, seed):
        self.lin = nnx.Linear(2, 2, rngs=nnx.Rngs(seed))


class Model(nnx.Module):
    def __init__(self):
        self.blocks = nnx.List([Block(0), Block(1), Block(2)])
        self.seq = nnx.Sequential(Block(3), Block(4))
        self.extra = nnx.data([Block(5), Block(6)])


def leaf_paths(tree):
    return dict(_tree.leaves_with_paths(tree))


# --- hypothesis: random trees of dicts (str and int keys), lists, tuples, NamedTuples ---------

leaves = st.integers(-5, 5).map(lambda i: np.float32(i))
keys = st.one_of(st.sampled_from(["a", "b", "w", "kernel"]), st.integers(0, 3))


def containers(children):
    return st.one_of(
        st.dictionaries(keys, children, min_size=1, max_size=3).filter(
            lambda d: len({str(k) for k in d}) == len(d)  # no {1, "1"} twins
        ),
        st.lists(children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3).map(tuple),
        st.tuples(children, children).map(lambda t: Pair(*t)),
    )


trees = st.recursive(leaves, containers, max_leaves=8).filter(
    lambda t: not isinstance(t, np.floating)
)


def _dict_keys_sortable(tree):
    """jax sorts dict keys when flattening: mixed int/str keys are not a jax pytree."""
    if isinstance(tree, dict):
        kinds = {type(k) for k in tree}
        return len(kinds) == 1 and all(_dict_keys_sortable(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return all(_dict_keys_sortable(v) for v in tree)
    return True


@given(trees.filter(_dict_keys_sortable), st.data())
def test_set_then_get_round_trips_and_input_is_not_mutated(tree, data):
    paths = leaf_paths(tree)
    for path, leaf in paths.items():
        assert _tree.get_path(tree, path) is leaf  # get agrees with leaves_with_paths
    path = data.draw(st.sampled_from(sorted(paths)))
    before = jax.tree.map(np.copy, tree)
    new = _tree.set_path(tree, path, np.float32(99))
    assert _tree.get_path(new, path) == 99
    jax.tree.map(np.testing.assert_array_equal, tree, before)  # input untouched
    assert jax.tree.structure(new) == jax.tree.structure(tree)
    changed = {p for p, x in leaf_paths(new).items() if x != paths[p]}
    assert changed <= {path}


@given(trees.filter(_dict_keys_sortable), st.data())
def test_delete_removes_exactly_one_leaf(tree, data):
    paths = leaf_paths(tree)
    path = data.draw(st.sampled_from(sorted(paths)))
    parent = _tree.get_path(tree, path.rpartition("/")[0])
    if isinstance(parent, Pair):
        with pytest.raises(ValueError, match="^jaxslim: cannot delete .*Pair"):
            _tree.delete_path(tree, path)
        return
    new = _tree.delete_path(tree, path)
    assert len(jax.tree.leaves(new)) == len(jax.tree.leaves(tree)) - 1
    assert sorted(np.asarray(jax.tree.leaves(new)).tolist() + [float(paths[path])]) == sorted(
        np.asarray(jax.tree.leaves(tree)).tolist()
    )
    assert len(jax.tree.leaves(tree)) == len(paths)  # input untouched


# --- NNX states and their pure-dict form: integer keys --------------------------------------


@pytest.mark.parametrize("form", ["state", "pure_dict"])
def test_nnx_integer_keyed_states(form):
    state = nnx.state(Model())
    tree = state if form == "state" else nnx.to_pure_dict(state)
    for path, leaf in leaf_paths(tree).items():
        np.testing.assert_array_equal(_tree.get_path(tree, path), leaf)
    w = _tree.get_path(tree, "seq/layers/1/lin/kernel")
    np.testing.assert_array_equal(w, nnx.state(Model()).seq.layers[1].lin.kernel.get_value())
    new = _tree.set_path(tree, "blocks/2/lin/bias", jnp.full((2,), 7.0))
    assert type(new) is type(tree) and type(new["blocks"]) is type(tree["blocks"])
    np.testing.assert_array_equal(_tree.get_path(new, "blocks/2/lin/bias"), [7.0, 7.0])
    np.testing.assert_array_equal(_tree.get_path(tree, "blocks/2/lin/bias"), [0.0, 0.0])
    if form == "state":  # the Variable is kept, with the new value inside
        assert isinstance(new["blocks"][2]["lin"]["bias"], nnx.Param)
    # deleting item 1 of a 3-item list state gives the state of a 2-item list
    small = _tree.delete_path(tree, "blocks/1")
    assert sorted(small["blocks"]) == [0, 1]
    np.testing.assert_array_equal(
        _tree.get_path(small, "blocks/1/lin/kernel"), _tree.get_path(tree, "blocks/2/lin/kernel")
    )
    assert sorted(_tree.delete_path(tree, "extra/0")["extra"]) == [0]
    with pytest.raises(ValueError, match=r"f: 'blocks/3/lin' is not in the tree \(no key '3'"):
        with calling("f"):
            _tree.get_path(tree, "blocks/3/lin")


def test_state_rebuilt_from_deleted_path_merges_into_a_smaller_model():
    class Net(nnx.Module):
        def __init__(self, n):
            self.blocks = nnx.List([nnx.Linear(2, 2, rngs=nnx.Rngs(i)) for i in range(n)])

        def __call__(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x

    big = Net(3)
    graphdef, state = nnx.split(big)
    small = nnx.merge(nnx.graphdef(Net(2)), _tree.delete_path(state, "blocks/0"))
    x = jnp.ones((1, 2))
    ref = big.blocks[2](big.blocks[1](x) + x) + big.blocks[1](x) + x
    np.testing.assert_allclose(small(x), ref, atol=1e-6)


def test_string_key_wins_over_int_key_and_keys_with_slashes_match_whole():
    t = {"b": {1: "int", "1": "str"}, "a/b": {"c": 1}, "a": {"x": 2}}
    assert _tree.get_path(t, "b/1") == "str"
    assert _tree.get_path(t, "a/b/c") == 1
    assert _tree.get_path(t, "a/x") == 2
    assert (
        _tree.get_path({"c": [5]}, (jax.tree_util.DictKey("c"), jax.tree_util.SequenceKey(0))) == 5
    )


def test_set_create_and_errors():
    t = {"l": {"kernel": 1}}
    assert _tree.set_path(t, "l/bias", 0, create=True) == {"l": {"kernel": 1, "bias": 0}}
    with pytest.raises(
        ValueError, match=r"g: 'l/bias' is not in the tree \(no key 'bias' under 'l'"
    ):
        with calling("g"):
            _tree.set_path(t, "l/bias", 0)
    with pytest.raises(ValueError, match="no key 'x' under 'l/kernel'.*leaf of type int"):
        _tree.get_path(t, "l/kernel/x")
    with pytest.raises(ValueError, match="cannot delete the root"):
        _tree.delete_path(t, "")
    with pytest.raises(TypeError, match="^jaxslim: path must be"):
        _tree.get_path(t, 3)
    assert _tree.set_path(t, "", 5) == 5 and _tree.get_path(t, "") is t
    p = Pair(1, [2, 3])
    assert _tree.set_path(p, "b/0", 9) == Pair(1, [9, 3])
    assert _tree.delete_path(p, "b/0") == Pair(1, [3])
    assert _tree.delete_path((1, 2, 3), "0") == (2, 3)


def test_other_pytree_node_children_by_key_name():
    class Node:  # an Equinox-like module: children named by GetAttrKey
        def __init__(self, w, b):
            self.w, self.b = w, b

    jax.tree_util.register_pytree_with_keys(
        Node,
        lambda n: (
            ((jax.tree_util.GetAttrKey("w"), n.w), (jax.tree_util.GetAttrKey("b"), n.b)),
            None,
        ),
        lambda _, c: Node(*c),
    )
    t = {"layer": Node(jnp.ones(2), jnp.zeros(2))}
    assert _tree.get_path(t, "layer/b") is t["layer"].b
    new = _tree.set_path(t, "layer/w", jnp.full(2, 3.0))
    np.testing.assert_array_equal(new["layer"].w, [3.0, 3.0])
    np.testing.assert_array_equal(t["layer"].w, [1.0, 1.0])
    with pytest.raises(ValueError, match="cannot delete 'layer/w'.*Node"):
        _tree.delete_path(t, "layer/w")


# --- where= ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        public("prune.x")(lambda w: _tree.selected_paths({"a": jnp.ones((2, 2))}, w)),
        public("prune.x")(
            lambda w: _tree.map_selected(lambda p, x: x, {"a": jnp.ones((2, 2))}, where=w)
        ),
        public("prune.x")(lambda w: _tree.check_where(w)),
    ],
    ids=["selected_paths", "map_selected", "check_where"],
)
def test_invalid_where_raises_value_or_type_error_naming_the_function(call):
    with pytest.raises(ValueError, match=r"prune\.x: where='Dense_\[' is not a valid regular"):
        call("Dense_[")
    with pytest.raises(TypeError, match=r"prune\.x: where must be None, a regex.*int 3"):
        call(3)
    # a bad `where` raises even on a tree with no float leaf
    with pytest.raises(TypeError, match="where must be"):
        _tree.is_selected(3, "a", 1)


def test_a_raising_where_predicate_names_the_leaf():
    from jaxslim import prune

    params = {"dense": {"kernel": jnp.ones((4, 4))}, "scale": jnp.ones((3, 3))}
    where = lambda path, leaf: leaf.kernel_size > 1  # noqa: E731 - a user's mistaken predicate
    with pytest.raises(ValueError, match=r"prune\.topk_mask: the where= predicate raised "
                       r"AttributeError: .*kernel_size.* for the leaf 'dense/kernel' \(shape "
                       r"\(4, 4\), dtype float32\)"):  # fmt: skip
        prune.topk_mask(prune.magnitude(params), 0.5, where=where)
