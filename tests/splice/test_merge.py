"""merge_similar_blocks: adjacent residual blocks with near-identical updates become one block."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import splice


def rnd(seed, *shape, scale=1.0):
    return jax.random.normal(jax.random.key(seed), shape) * scale


def block(seed, d=6, h=8, scale=0.02):
    return {
        "w1": rnd(seed, d, h, scale=0.5),
        "b1": rnd(seed + 1, h, scale=0.1),
        "w2": rnd(seed + 2, h, d, scale=scale),
        "b2": rnd(seed + 3, d, scale=scale),
    }


def jitter(b, seed, eps=1e-3):
    return {k: v + rnd(seed + i, *v.shape, scale=eps) for i, (k, v) in enumerate(b.items())}


def res_fn(p, x):
    hs = [x]
    for b in p["blocks"]:
        h = hs[-1]
        hs.append(h + jax.nn.relu(h @ b["w1"] + b["b1"][None]) @ b["w2"] + b["b2"][None])
    return jnp.mean(hs[-1] ** 2), hs


def scan_fn(p, x):
    def step(h, b):
        h = h + jax.nn.relu(h @ b["w1"] + b["b1"][None]) @ b["w2"] + b["b2"][None]
        return h, h

    h, hs = jax.lax.scan(step, x, p["stack"])
    return jnp.mean(h**2), [x, *hs]


PARAMS = {"blocks": [block(0), block(10), jitter(block(10), 20), block(30)]}
BATCHES = [rnd(40, 16, 6), rnd(41, 16, 6)]
BLOCKS = [f"blocks/{i}" for i in range(4)]


def np_cos(a, b):
    return np.mean((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))


def test_similar_pair_is_merged_and_dissimilar_blocks_are_not():
    new, rep = splice.merge_similar_blocks(
        res_fn, PARAMS, BATCHES, BLOCKS, threshold=0.99, where="w2|b2"
    )
    ref = np.zeros(3)
    for x in BATCHES:
        hs = [np.asarray(h) for h in res_fn(PARAMS, x)[1]]
        d = [b - a for a, b in zip(hs[:-1], hs[1:], strict=True)]
        ref += [np_cos(d[i], d[i + 1]) / len(BATCHES) for i in range(3)]
    np.testing.assert_allclose(rep.similarity, ref, atol=1e-5)
    assert rep.similarity[1] > 0.99 and rep.similarity[0] < 0.9 and rep.similarity[2] < 0.9
    assert rep.merged == (("blocks/1", "blocks/2"),)
    assert len(new["blocks"]) == 3
    assert new["blocks"][0] is PARAMS["blocks"][0] and new["blocks"][2] is PARAMS["blocks"][3]
    b1, b2 = PARAMS["blocks"][1], PARAMS["blocks"][2]
    for k, mult in (("w1", 1), ("b1", 1), ("w2", 2), ("b2", 2)):
        expected = mult * (np.asarray(b1[k]) + np.asarray(b2[k])) / 2
        np.testing.assert_allclose(new["blocks"][1][k], expected, rtol=1e-6, atol=1e-7)
    # the function changes by less than 0.5% of the output's size, 10x less than dropping a block
    dropped = splice.drop_layer(PARAMS, "blocks/2")
    for x in BATCHES:
        y, y_new = res_fn(PARAMS, x)[1][-1], res_fn(new, x)[1][-1]
        change = float(jnp.linalg.norm(y_new - y) / jnp.linalg.norm(y))
        assert change < 5e-3
        assert 10 * change < float(jnp.linalg.norm(res_fn(dropped, x)[1][-1] - y)) / float(
            jnp.linalg.norm(y)
        )
    assert abs(rep.loss_after - rep.loss_before) < 1e-2 * rep.loss_before


def test_threshold_one_merges_nothing_and_first_mode_keeps_the_first():
    new, rep = splice.merge_similar_blocks(
        res_fn, PARAMS, BATCHES, BLOCKS, threshold=1.0, where="w2|b2"
    )
    assert rep.merged == () and new is PARAMS and rep.loss_after == rep.loss_before
    new, _ = splice.merge_similar_blocks(
        res_fn, PARAMS, BATCHES, BLOCKS, threshold=0.99, where="w2|b2", how="first"
    )
    np.testing.assert_array_equal(new["blocks"][1]["w1"], PARAMS["blocks"][1]["w1"])
    np.testing.assert_array_equal(new["blocks"][1]["b2"], 2 * np.asarray(PARAMS["blocks"][1]["b2"]))


def test_scanned_stack_run_of_three_becomes_one_layer():
    b = block(50)
    layers = [block(60), b, jitter(b, 70), jitter(b, 80)]
    stack = {"stack": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    blocks = [("stack", i) for i in range(4)]
    new, rep = splice.merge_similar_blocks(
        scan_fn, stack, BATCHES, blocks, threshold=0.99, where="w2|b2"
    )
    assert rep.merged == ((("stack", 1), ("stack", 2), ("stack", 3)),)
    assert new["stack"]["w1"].shape == (2, 6, 8)
    mean_w2 = np.mean([np.asarray(lay["w2"]) for lay in layers[1:]], axis=0)
    np.testing.assert_allclose(new["stack"]["w2"][1], 3 * mean_w2, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(new["stack"]["w1"][0], layers[0]["w1"])
    for x in BATCHES:
        y, y_new = scan_fn(stack, x)[1][-1], scan_fn(new, x)[1][-1]
        assert (
            float(jnp.linalg.norm(y_new - y) / jnp.linalg.norm(y)) < 1e-2
        )  # a run of three: the second-order error grows with k


@pytest.mark.parametrize("transform", [lambda f: f, jax.jit])
def test_block_similarity_of_known_updates(transform):
    fn = lambda p, x: (jnp.sum(x), [x, x + p[None], x + 2 * p[None], x + p[None]])
    sim, loss = splice.block_similarity(transform(fn), jnp.ones(3), [jnp.zeros((2, 3))])
    np.testing.assert_allclose(sim, [1.0, -1.0], atol=1e-6)
    assert loss == 0.0


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"threshold must be a cosine in \[-1, 1\], got 1.5"):
        splice.merge_similar_blocks(res_fn, PARAMS, BATCHES, BLOCKS, threshold=1.5, where="w2")
    with pytest.raises(ValueError, match="how must be"):
        splice.merge_similar_blocks(res_fn, PARAMS, BATCHES, BLOCKS, where="w2", how="sum")
    with pytest.raises(ValueError, match="expected 4"):
        splice.merge_similar_blocks(res_fn, PARAMS, BATCHES, BLOCKS[:3], where="w2")
    with pytest.raises(ValueError, match="need two blocks"):
        splice.merge_similar_blocks(res_fn, PARAMS, BATCHES, BLOCKS[:1], where="w2")
    with pytest.raises(ValueError, match="batches is empty"):
        splice.merge_similar_blocks(res_fn, PARAMS, [], BLOCKS, where="w2")
    with pytest.raises(ValueError, match="where=.nope. selects no"):
        splice.merge_similar_blocks(res_fn, PARAMS, BATCHES, BLOCKS, threshold=0.99, where="nope")


def test_out_is_the_deprecated_name_of_where():
    with pytest.warns(DeprecationWarning, match=r"out= is deprecated, use where="):
        old, _ = splice.merge_similar_blocks(res_fn, PARAMS, BATCHES, BLOCKS, out="w2|b2")
    new, _ = splice.merge_similar_blocks(res_fn, PARAMS, BATCHES, BLOCKS, where="w2|b2")
    chex.assert_trees_all_equal(old, new)
    with pytest.raises(TypeError, match=r"pass where= only"):
        splice.merge_similar_blocks(res_fn, PARAMS, BATCHES, BLOCKS, where="w2", out="w2")
