"""prune: scores, structures and topk_mask against an independent reference of torch's rules.

The references below re-implement ``torch.nn.utils.prune``'s published semantics in numpy:
``l1_unstructured`` / ``global_unstructured`` prune the ``round(amount * n)`` smallest ``|w|``;
``ln_structured(dim, n)`` prunes the ``round(amount * size[dim])`` slices with the smallest
``n``-norm over the other dims.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jaxslim import prune, structures
from jaxslim.structures import NM, Blocks, Channels, Unstructured

VARIANTS = {"eager": lambda f: f, "jit": jax.jit}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return VARIANTS[request.param]


def ref_unstructured(w: np.ndarray, amount: float) -> np.ndarray:
    k = round(amount * w.size)
    order = np.argsort(np.abs(w).ravel(), kind="stable")
    keep = np.ones(w.size, bool)
    keep[order[:k]] = False
    return keep.reshape(w.shape)


def ref_global(ws: list[np.ndarray], amount: float) -> list[np.ndarray]:
    flat = np.concatenate([np.abs(w).ravel() for w in ws])
    keep = ref_unstructured(flat, amount)
    out, i = [], 0
    for w in ws:
        out.append(keep[i : i + w.size].reshape(w.shape))
        i += w.size
    return out


def ref_ln_structured(w: np.ndarray, amount: float, ord: float, dim: int) -> np.ndarray:
    norms = np.linalg.norm(np.moveaxis(w, dim, 0).reshape(w.shape[dim], -1), ord=ord, axis=1)
    k = round(amount * w.shape[dim])
    order = np.argsort(norms, kind="stable")
    keep = np.ones(w.shape[dim], bool)
    keep[order[:k]] = False
    shape = [1] * w.ndim
    shape[dim] = w.shape[dim]
    return np.broadcast_to(keep.reshape(shape), w.shape)


shapes = st.lists(st.integers(1, 7), min_size=2, max_size=4).map(tuple)
fractions = st.floats(0.0, 1.0, allow_nan=False)


def tie_free(shape, seed):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    assume(len(np.unique(np.abs(w))) == w.size)
    return w


@settings(max_examples=12)
@given(shapes, fractions, st.integers(0, 2**31 - 1))
def test_unstructured_matches_torch_rule(shape, s, seed):
    w = tie_free(shape, seed)
    mask = prune.topk_mask(prune.magnitude({"w": jnp.asarray(w)}), s)["w"]
    np.testing.assert_array_equal(np.asarray(mask), ref_unstructured(w, s))
    assert int((~mask).sum()) == round(s * w.size)


@settings(max_examples=12)
@given(st.lists(shapes, min_size=1, max_size=3), fractions, st.integers(0, 2**31 - 1))
def test_global_matches_torch_rule(shape_list, s, seed):
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal(sh).astype(np.float32) for sh in shape_list]
    flat = np.concatenate([np.abs(w).ravel() for w in ws])
    assume(len(np.unique(flat)) == flat.size)
    params = {f"l{i}": jnp.asarray(w) for i, w in enumerate(ws)}
    masks = prune.topk_mask(prune.magnitude(params), s, scope="global")
    refs = ref_global(ws, s)
    for i, ref in enumerate(refs):
        np.testing.assert_array_equal(np.asarray(masks[f"l{i}"]), ref)


@settings(max_examples=12)
@given(shapes, fractions, st.sampled_from([1, 2, math.inf]), st.integers(0, 3), st.integers(0, 99))
def test_channels_matches_ln_structured_on_any_axis(shape, s, ord, axis, seed):
    axis = axis % len(shape)
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    ref = ref_ln_structured(w, s, ord, axis)
    norms = np.linalg.norm(np.moveaxis(w, axis, 0).reshape(shape[axis], -1), ord=ord, axis=1)
    assume(len(np.unique(norms.astype(np.float32))) == norms.size)
    # scores are |w|; Channels ranks the norm of |w| = norm of w
    mask = prune.topk_mask(
        prune.magnitude({"w": jnp.asarray(w)}),
        s,
        structure=Channels(axis=axis, ord=ord),
        where="w",  # any shape, (1, 1, 1) included: not only what the default calls a kernel
    )["w"]
    np.testing.assert_array_equal(np.asarray(mask), ref)


def test_ties_prune_lowest_flat_index_first(variant):
    scores = {"a": jnp.zeros((2, 3)), "b": jnp.zeros((2, 2))}
    m = variant(lambda s: prune.topk_mask(s, 0.5))(scores)
    np.testing.assert_array_equal(np.asarray(m["a"]).ravel(), [False] * 3 + [True] * 3)
    np.testing.assert_array_equal(np.asarray(m["b"]).ravel(), [False] * 2 + [True] * 2)
    g = variant(lambda s: prune.topk_mask(s, 0.5, scope="global"))(scores)
    # 10 entries, 5 pruned: all 6 of "a" come first in tree order, so a loses 5, b none.
    assert np.asarray(g["a"]).ravel().tolist() == [False] * 5 + [True]
    assert np.asarray(g["b"]).all()


@given(st.integers(0, 12), st.integers(0, 99))
def test_exact_count_with_many_ties(k, seed):
    # values drawn from 3 levels: heavy ties at the threshold
    vals = np.random.default_rng(seed).integers(0, 3, size=(3, 4)).astype(np.float32)
    s = k / 12
    m = np.asarray(prune.topk_mask({"w": jnp.asarray(vals)}, s)["w"])
    assert (~m).sum() == round(s * 12)
    order = np.lexsort((np.arange(12), vals.ravel()))  # by value, then flat index
    expected = np.ones(12, bool)
    expected[order[: round(s * 12)]] = False
    np.testing.assert_array_equal(m.ravel(), expected)


def test_traced_sparsity_equals_static(variant):
    w = jnp.asarray(np.random.default_rng(0).standard_normal((16, 8)), jnp.float32)
    scores = prune.magnitude({"w": w})
    f = jax.jit(lambda s: prune.topk_mask(scores, s)["w"])
    for s in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        np.testing.assert_array_equal(
            f(jnp.float32(s)), variant(lambda: prune.topk_mask(scores, s)["w"])()
        )


def test_negative_and_infinite_scores_rank_correctly():
    s = jnp.array([[3.0, -jnp.inf, -1.0, 0.0, jnp.inf, -0.5]])
    m = prune.topk_mask({"w": s}, 0.5)["w"]
    np.testing.assert_array_equal(np.asarray(m)[0], [True, False, False, True, True, False])


@settings(max_examples=12)
@given(
    st.sampled_from([(2, 4), (1, 4), (4, 8), (0, 4), (4, 4)]),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(0, 99),
)
def test_nm_keeps_n_largest_of_every_m(nm, rows_mult, cols, seed):
    n, m = nm
    w = np.random.default_rng(seed).standard_normal((rows_mult * m, cols)).astype(np.float32)
    mask = np.asarray(
        prune.topk_mask(prune.magnitude({"w": jnp.asarray(w)}), 0.5, structure=NM(n, m))["w"]
    )
    runs = np.abs(w).T.reshape(cols, rows_mult, m)
    kept = mask.T.reshape(cols, rows_mult, m)
    assert (kept.sum(-1) == n).all()
    ref = np.argsort(-runs, axis=-1, kind="stable")[..., :n]
    ref_mask = np.zeros_like(kept)
    np.put_along_axis(ref_mask, ref, True, axis=-1)
    np.testing.assert_array_equal(kept, ref_mask)


def test_nm_sparsity_zero_keeps_all_and_traced_gate(variant):
    w = {"w": jnp.arange(16.0).reshape(8, 2)}
    assert np.asarray(prune.topk_mask(w, 0.0, structure=NM(2, 4))["w"]).all()
    f = variant(lambda s: prune.topk_mask(w, s, structure=NM(2, 4))["w"])
    assert np.asarray(f(jnp.float32(0.0))).all()
    assert int(np.asarray(f(jnp.float32(0.3))).sum()) == 8


def test_blocks_group_scores_and_count():
    w = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    mask = np.asarray(prune.topk_mask({"w": jnp.asarray(w)}, 0.5, structure=Blocks((2, 3)))["w"])
    norms = np.array([[np.linalg.norm(w[i : i + 2, j : j + 3]) for j in (0, 3)] for i in (0, 2)])
    ref_keep = norms >= np.sort(norms.ravel())[2]
    np.testing.assert_array_equal(mask, np.kron(ref_keep, np.ones((2, 3), bool)))


def test_global_channels_rank_across_leaves():
    a = jnp.array([[1.0, 5.0], [1.0, 5.0]])  # channel norms sqrt2, 5sqrt2
    b = jnp.array([[2.0, 0.1, 3.0]])  # channel norms 2, .1, 3
    m = prune.topk_mask({"a": a, "b": b}, 0.4, structure=Channels(), scope="global")
    # 5 channels, prune 2: b[:,1] (0.1) and a[:,0] (1.41)
    np.testing.assert_array_equal(np.asarray(m["a"]), [[False, True], [False, True]])
    np.testing.assert_array_equal(np.asarray(m["b"]), [[True, False, True]])


def test_scores_saliency_random_magnitude(variant):
    p = {"w": jnp.array([[2.0, -1.0]]), "n": jnp.array(3, jnp.int32)}
    g = {"w": jnp.array([[0.5, 3.0]]), "n": jnp.array(0, jnp.int32)}
    np.testing.assert_allclose(variant(prune.saliency)(p, g)["w"], [[1.0, 3.0]])
    assert variant(prune.saliency)(p, g)["n"] is None
    np.testing.assert_allclose(variant(prune.magnitude)(p)["w"], [[2.0, 1.0]])
    r1 = variant(prune.random)(jax.random.key(0), p)["w"]
    r2 = prune.random(jax.random.key(0), {"w": p["w"], "x": jnp.ones((3, 3))})["w"]
    np.testing.assert_array_equal(r1, r2)
    assert ((r1 >= 0) & (r1 < 1)).all()


def test_apply_mask_exact_zeros_and_passthrough(variant):
    params = {
        "dense": {"kernel": jnp.ones((3, 4), jnp.bfloat16), "bias": jnp.ones(4)},
        "step": jnp.array(5, jnp.int32),
        "key": jax.random.key(0),
        "empty": jnp.zeros((0, 3)),
        "none": None,
        "scalar": 2.0,
    }
    mask = prune.topk_mask(prune.random(jax.random.key(1), params), 0.25)
    assert mask["dense"]["bias"] is None and mask["step"] is None and mask["empty"] is None
    out = variant(prune.apply_mask)(params, mask)
    k = out["dense"]["kernel"]
    assert k.dtype == jnp.bfloat16 and int((k == 0).sum()) == 3
    assert out["step"] == 5 and out["none"] is None and out["scalar"] == 2.0
    assert out["empty"].shape == (0, 3)
    assert jax.random.key_data(out["key"]).tolist() == jax.random.key_data(params["key"]).tolist()
    np.testing.assert_array_equal(out["dense"]["bias"], params["dense"]["bias"])


def test_all_zero_tensor_is_pruned_by_index():
    m = prune.topk_mask(prune.magnitude({"w": jnp.zeros((2, 2))}), 0.5)["w"]
    np.testing.assert_array_equal(np.asarray(m), [[False, False], [True, True]])


def test_regex_and_predicate_where():
    p = {"a": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "b": {"kernel": jnp.ones((2, 2))}}
    m = prune.topk_mask(prune.magnitude(p), 0.5, where="bias")
    assert m["a"]["kernel"] is None and m["a"]["bias"].shape == (2,)
    m = prune.topk_mask(prune.magnitude(p), 0.5, where=lambda path, x: path.startswith("b/"))
    assert m["a"]["kernel"] is None and m["b"]["kernel"].shape == (2, 2)


@pytest.mark.parametrize("s", [-0.1, 1.5, float("nan")])
def test_bad_sparsity_names_the_leaf(s):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\].*'layer/kernel'"):
        prune.topk_mask({"layer": {"kernel": jnp.ones((2, 2))}}, s)


def test_bad_structure_and_where_name_the_leaf():
    p = {"layer": {"kernel": jnp.ones((6, 2))}}
    with pytest.raises(ValueError, match=r"NM\(2, 4\).*'layer/kernel'.*\(6, 2\)"):
        prune.topk_mask(p, 0.5, structure=NM(2, 4))
    with pytest.raises(ValueError, match="Blocks.*'layer/kernel'"):
        prune.topk_mask(p, 0.5, structure=Blocks((4, 4)))
    with pytest.raises(ValueError, match="axis 3 is out of range for 'layer/kernel'"):
        prune.topk_mask(p, 0.5, structure=Channels(axis=3))
    with pytest.raises(ValueError, match="selects no floating-point array leaf"):
        prune.topk_mask(p, 0.5, where="nothing")
    with pytest.raises(ValueError, match="scope"):
        prune.topk_mask(p, 0.5, scope="model")
    with pytest.raises(TypeError, match="structure"):
        prune.topk_mask(p, 0.5, structure="channels")
    with pytest.raises(ValueError, match="n <= m"):
        NM(5, 4)


def test_apply_mask_rejects_mismatched_masks():
    p = {"a": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="structures differ"):
        prune.apply_mask(p, {"b": jnp.ones((2, 2), bool)})
    with pytest.raises(ValueError, match=r"mask for 'a' must be a bool array of shape \(2, 2\)"):
        prune.apply_mask(p, {"a": jnp.ones((2, 3), bool)})


def test_unstructured_structure_default_is_identity():
    x = jnp.arange(6.0).reshape(2, 3)
    assert Unstructured().reduce(x) is x and Unstructured().group_size(x.shape) == 1


# --- non-finite scores, concrete array sparsities, layouts ------------------------------------


def ref_rank_nan_lowest(w: np.ndarray, amount: float) -> np.ndarray:
    """torch's rule with NaN ranked below everything (pruned first), +inf above everything."""
    key = np.where(np.isnan(w), -np.inf, w).ravel()
    first = np.isnan(w).ravel()
    k = round(amount * w.size)
    order = np.lexsort((np.arange(w.size), key, ~first))  # NaNs, then by value, then index
    keep = np.ones(w.size, bool)
    keep[order[:k]] = False
    return keep.reshape(w.shape)


@pytest.mark.filterwarnings("ignore:.*scores of .* are NaN:RuntimeWarning")
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_nan_scores_rank_lowest_and_inf_highest(variant, scope):
    w = np.arange(1.0, 13.0, dtype=np.float32).reshape(4, 3)
    w[0, 1], w[2, 2], w[3, 0] = np.nan, np.inf, np.nan
    for s in (0.25, 0.5, 11 / 12):
        got = variant(lambda x, s=s: prune.topk_mask({"w": x}, s, scope=scope))(jnp.asarray(w))
        np.testing.assert_array_equal(np.asarray(got["w"]), ref_rank_nan_lowest(w, s))
    # the +inf score is the last one pruned, the NaNs the first
    got = prune.topk_mask({"w": jnp.asarray(w)}, 2 / 12, scope=scope)["w"]
    assert not got[0, 1] and not got[3, 0] and int(got.sum()) == 10


@pytest.mark.filterwarnings("ignore:.*scores of .* are NaN:RuntimeWarning")
@pytest.mark.parametrize("structure", [Channels(axis=-1), Blocks((2, 1))], ids=repr)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_group_with_nan_ranks_lowest_group_with_inf_highest(variant, structure, scope):
    w = np.ones((4, 3), np.float32) * np.array([5.0, 1.0, 3.0], np.float32)
    w[1, 0] = np.nan  # poisons group 0 of both structures
    w[0, 1] = np.inf  # makes the smallest column/block the largest
    got = np.asarray(
        variant(lambda x: prune.topk_mask({"w": x}, 1 / 3, structure=structure, scope=scope))(
            jnp.asarray(w)
        )["w"]
    )
    if isinstance(structure, Channels):  # 3 columns, 1 pruned: the NaN column
        np.testing.assert_array_equal(got, np.array([[False, True, True]] * 4))
    else:  # Blocks (2, 1): 6 blocks, 2 pruned: the NaN block, then the smallest finite (col 1)
        expect = np.ones((4, 3), bool)
        expect[0:2, 0] = False
        expect[2:4, 1] = False
        np.testing.assert_array_equal(got, expect)


@pytest.mark.filterwarnings("ignore:.*scores of .* are NaN:RuntimeWarning")
def test_nm_nan_never_drops_a_finite_entry(variant):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    w[1, 0] = w[4, 3] = w[6, 3] = np.nan  # one NaN in run 0 of col 0, two in run 1 of col 3
    w[0, 5] = np.inf
    got = np.asarray(
        variant(lambda x: prune.topk_mask({"w": x}, 0.5, structure=NM(2, 4)))(jnp.asarray(w))["w"]
    )
    for col in range(6):
        for run in range(2):
            seg = w[4 * run : 4 * run + 4, col]
            key = np.where(np.isnan(seg), -np.inf, seg)  # NaN below every finite score
            expect = np.zeros(4, bool)
            expect[np.argsort(key, kind="stable")[2:]] = True
            np.testing.assert_array_equal(got[4 * run : 4 * run + 4, col], expect)
            assert not got[4 * run : 4 * run + 4, col][np.isnan(seg)].any()
    assert got[0, 5]  # +inf is kept


@pytest.mark.parametrize(
    "s", [np.array(0.5), jnp.array(0.5), np.float32(0.5), np.float64(0.5), np.int64(1)], ids=repr
)
def test_concrete_array_sparsity_is_checked_and_equals_float(s):
    w = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((4, 5)), jnp.float32)}
    np.testing.assert_array_equal(prune.topk_mask(w, s)["w"], prune.topk_mask(w, float(s))["w"])


@pytest.mark.filterwarnings("ignore:.*scores of .* are NaN:RuntimeWarning")
def test_traced_sparsity_is_clipped_and_nan_prunes_nothing():
    w = {"w": jnp.asarray(np.random.default_rng(2).standard_normal((4, 5)), jnp.float32)}
    f = jax.jit(lambda s: prune.topk_mask(w, s)["w"])
    assert bool(f(jnp.float32(1.5)).sum() == 0)  # clipped to 1: everything pruned
    assert bool(f(jnp.float32(-0.5)).all())  # clipped to 0
    assert bool(f(jnp.float32(jnp.nan)).all())  # NaN: nothing pruned
    g = jax.jit(lambda s: prune.topk_mask(w, s, structure=NM(2, 4), where=lambda p, x: True))
    assert bool(g(jnp.float32(jnp.nan))["w"].all())


def test_equinox_layouts_channels_axis0_prunes_rows_and_filters(variant):
    rng = np.random.default_rng(3)
    # eqx.nn.Linear(5, 6).weight is (out=6, in=5); eqx.nn.Conv2d(3, 4, 3).weight (4, 3, 3, 3)
    lin = rng.standard_normal((6, 5)).astype(np.float32) * np.arange(1, 7)[:, None]
    conv = (
        rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
        * np.array([3, 1, 4, 2])[:, None, None, None]
    )
    bias = np.ones((4, 1, 1), np.float32)  # eqx Conv2d bias: ndim 3 but not a kernel
    params = {"linear": {"weight": lin}, "conv": {"weight": conv, "bias": bias}}
    params = jax.tree.map(jnp.asarray, params)
    mask = variant(
        lambda p: prune.topk_mask(p, 0.5, structure=Channels(axis=0), where=structures.kernel_like)
    )(params)
    assert mask["conv"]["bias"] is None  # kernel_like skips (out, 1, 1)
    row_norms = np.linalg.norm(lin, axis=1)
    pruned_rows = np.sort(np.argsort(row_norms, kind="stable")[:3])
    np.testing.assert_array_equal(
        np.flatnonzero(~np.asarray(mask["linear"]["weight"]).all(1)), pruned_rows
    )
    assert np.asarray(mask["linear"]["weight"]).all(1).sum() == 3  # whole rows (outputs)
    filt_norms = np.linalg.norm(conv.reshape(4, -1), axis=1)
    kept = np.asarray(mask["conv"]["weight"]).reshape(4, -1)
    assert (kept.all(1) | ~kept.any(1)).all()  # whole filters
    np.testing.assert_array_equal(
        np.flatnonzero(~kept.any(1)), np.sort(np.argsort(filt_norms, kind="stable")[:2])
    )


def test_kernel_like_predicate():
    assert structures.kernel_like("k", jnp.zeros((3, 4)))
    assert structures.kernel_like("k", jnp.zeros((3, 1, 4)))
    assert not structures.kernel_like("b", jnp.zeros((8, 1, 1)))
    assert not structures.kernel_like("b", jnp.zeros((1, 8)))
    assert not structures.kernel_like("i", jnp.zeros((3, 4), jnp.int32))
    assert not structures.kernel_like("n", None)


def test_nm_on_einsum_kernel_follows_the_axis_given():
    # (2, H=4, F=8) einsum kernel contracting F: NM(2, 4, axis=-1) runs along F.
    w = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, 8)), jnp.float32)
    along_f = prune.topk_mask({"w": w}, 0.5, structure=NM(2, 4, axis=-1))["w"]
    assert (np.asarray(along_f).reshape(2, 4, 2, 4).sum(-1) == 2).all()
    along_h = prune.topk_mask({"w": w}, 0.5, structure=NM(2, 4))["w"]  # default: axis -2 (H)
    assert (np.asarray(along_h).sum(1) == 2).all()
    assert not np.array_equal(np.asarray(along_f), np.asarray(along_h))


# --- global selection by a sample bracket (issue 12 §5) -------------------------------------------

from jaxslim.prune import _masks  # noqa: E402

SHAPE_SETS = [[(8, 16)], [(8, 16), (5, 7)], [(3, 4, 5), (33,), (2, 9)]]


def np_keys(w: np.ndarray) -> np.ndarray:
    """``float_keys`` in numpy: NaN < -inf < ... < -0 < +0 < ... < +inf as uint32 order."""
    bits = w.astype(np.float32).view(np.uint32)
    keys = np.where(bits >= 0x80000000, ~bits, bits | 0x80000000)
    return np.where(np.isnan(w), np.uint32(0), keys).astype(np.uint32)


def ref_lowest_k(ws: list[np.ndarray], k: int) -> list[np.ndarray]:
    """The k lowest keys over all leaves; ties by leaf order, then flat index (stable sort)."""
    flat = np.concatenate([np_keys(w).ravel() for w in ws])
    pruned = np.zeros(flat.size, bool)
    pruned[np.argsort(flat, kind="stable")[:k]] = True
    out, i = [], 0
    for w in ws:
        out.append(pruned[i : i + w.size].reshape(w.shape))
        i += w.size
    return out


def draw_tree(shapes, seed, kind, specials):
    rng = np.random.default_rng(seed)
    ws = []
    for shape in shapes:
        if kind == "levels":  # heavy ties
            w = rng.integers(-2, 3, size=shape).astype(np.float32)
        elif kind == "zeros":  # mostly exact zeros of both signs
            w = rng.standard_normal(shape).astype(np.float32) * (rng.random(shape) < 0.3)
            w = np.where(rng.random(shape) < 0.5, -w, w).astype(np.float32)
        else:
            w = rng.standard_normal(shape).astype(np.float32)
        flat = w.ravel()
        for value, frac in zip([np.nan, np.inf, -np.inf, -0.0], specials, strict=True):
            flat[rng.random(flat.size) < frac] = value
        ws.append(flat.reshape(shape))
    return ws


@settings(max_examples=25)
@given(
    st.sampled_from(range(len(SHAPE_SETS))),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["normal", "levels", "zeros"]),
    st.tuples(*[st.sampled_from([0.0, 0.05, 0.3])] * 4),
    st.floats(0.0, 1.0),
    st.sampled_from([(4, 4.0), (32, 4.0), (32, 0.0)]),
)
def test_sampled_select_equals_exact(shape_set, seed, kind, specials, frac, sampling):
    ws = draw_tree(SHAPE_SETS[shape_set], seed, kind, specials)
    n = sum(w.size for w in ws)
    k = round(frac * n)
    keys = [jnp.asarray(np_keys(w)) for w in ws]
    sample, margin = sampling  # margin 0: a bracket of a few sample ranks, often missed
    got = _masks.lowest_k(keys, jnp.int32(k), sample=sample, margin=margin)
    exact = _masks.lowest_k(keys, jnp.int32(k), exact=True)
    for g, e, r in zip(got, exact, ref_lowest_k(ws, k), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
        np.testing.assert_array_equal(np.asarray(g), r)
    assert sum(int(np.asarray(g).sum()) for g in got) == k


def test_sampled_select_reports_a_missed_bracket_and_falls_back():
    # 64 x 64 keys sampled every 8th row and column (sample 64): make exactly the sampled grid
    # large, so the sample puts the median among large keys while 63/64 of the keys are small.
    w = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    w[::8, ::8] += 100.0
    keys = [jnp.asarray(np_keys(w))]
    k = jnp.int32(2048)
    *_, hit = _masks._select_sampled(keys, k, sample=64)
    assert not bool(hit)
    got = _masks.lowest_k(keys, k, sample=64)
    np.testing.assert_array_equal(np.asarray(got[0]), ref_lowest_k([w], 2048)[0])
    # a bracket that holds the k-th key is a hit, with the exact threshold and counts
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    w[rng.random(w.shape) < 0.2] = 0.5  # a tie at the threshold, shared by both shapes below
    keys = [jnp.asarray(np_keys(w))]
    for k in (1, 700, 2048, 4096):
        t, n_lt, n_eq, hit = _masks._select_sampled(keys, jnp.int32(k), sample=256)
        flat = np.sort(np_keys(w).ravel())
        assert bool(hit) and int(t) == flat[k - 1]
        assert int(n_lt) == (flat < flat[k - 1]).sum() and int(n_eq) == (flat == flat[k - 1]).sum()


def test_sampled_bins_wider_than_one_key_refine_exactly():
    # keys spread over the whole uint32 range with a sample of 4: the bracket is wider than
    # _BINS keys, so the chosen bin is histogrammed again one key per bin.
    w = np.random.default_rng(2).standard_normal((16, 16)).astype(np.float32) * 1e30
    keys = [jnp.asarray(np_keys(w))]
    flat = np.sort(np_keys(w).ravel())
    for k in (1, 77, 256):
        t, n_lt, n_eq, hit = _masks._select_sampled(keys, jnp.int32(k), sample=4)
        assert bool(hit) and int(t) == flat[k - 1] and int(n_lt) == k - 1 and int(n_eq) == 1


def test_global_topk_on_a_large_tree_uses_the_sample_and_matches_torch(variant):
    # 2**17 scores: topk_mask takes the sampled path by default
    rng = np.random.default_rng(5)
    ws = [rng.standard_normal((256, 256)).astype(np.float32), rng.standard_normal((256, 256))]
    ws[1] = np.round(ws[1].astype(np.float32), 1)  # ties across the threshold in the 2nd leaf
    assert sum(w.size for w in ws) >= _masks._SAMPLE_FROM
    params = {"a": jnp.asarray(ws[0]), "b": jnp.asarray(ws[1])}
    for s in (0.1, 0.5, 0.9):
        got = variant(lambda p, s=s: prune.topk_mask(prune.magnitude(p), s, scope="global"))(params)
        for name, ref in zip("ab", ref_global(ws, s), strict=True):
            np.testing.assert_array_equal(np.asarray(got[name]), ref)


def test_nan_weights_warn_eagerly_naming_the_leaf_and_count():
    w = jnp.arange(12.0).reshape(4, 3).at[1, 1].set(jnp.nan).at[2, 0].set(jnp.nan)
    with pytest.warns(RuntimeWarning, match=r"prune\.topk_mask: 2 of the 12 scores of 'w' are NaN"):
        mask = prune.topk_mask(prune.magnitude({"w": w}), 0.25)["w"]
    assert not mask[1, 1] and not mask[2, 0]  # pruned first, as documented
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # traced scores: the documented rule, silently
        jax.jit(lambda w: prune.topk_mask({"w": w}, 0.25))(w)
