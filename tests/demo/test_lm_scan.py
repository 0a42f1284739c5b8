"""The LM workbench with its blocks under ``nnx.scan``, and depth pruning on the stacked layers.

The scanned model must compute the same function as the list model for the same weights, and
dropping layer ``i`` of the stack (``splice.drop_layer(params, "blocks", index=i)``) must equal
the list model with block ``i`` removed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxslim import splice
from jaxslim.demo import lm

CFG = lm.LMConfig(dim=16, layers=3, kv_heads=2, groups=2, head_dim=4, hidden=24)
SCFG = dataclasses.replace(CFG, scan_layers=True)
TOL = dict(rtol=1e-6, atol=1e-6)
TRANSFORMS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]


def tokens(n=2, t=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, t)), jnp.int32)


@functools.cache
def models() -> tuple[lm.LM, lm.LM]:
    """``(list_model, scan_model)`` holding the same weights (the scan model's stacked)."""
    dense = lm.LM(CFG, rngs=nnx.Rngs(0))
    scanned = lm.LM(SCFG, rngs=nnx.Rngs(1))
    nnx.update(scanned, nnx.State(lm.stack_layers(nnx.state(dense, nnx.Param))))
    return dense, scanned


def list_params():
    return nnx.state(models()[0], nnx.Param)


def scan_params():
    return nnx.state(models()[1], nnx.Param)


def test_scan_model_has_stacked_params_and_config_round_trip():
    m = lm.LM(SCFG, rngs=nnx.Rngs(3))
    pure = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    assert pure["blocks"]["attn"]["q"].shape == (3, 16, 2, 2, 4)
    assert pure["blocks"]["attn"]["o"].shape == (3, 2, 2, 4, 16)
    assert pure["blocks"]["mlp"]["down"].shape == (3, 24, 16)
    assert pure["blocks"]["attn_norm"]["scale"].shape == (3, 16)
    assert pure["embed"].shape == (256, 16) and pure["norm"]["scale"].shape == (16,)
    # the layers are initialised independently (split rngs), not copies of one block
    q = np.asarray(pure["blocks"]["attn"]["q"])
    assert not np.allclose(q[0], q[1]) and not np.allclose(q[1], q[2])
    assert lm.config_of(nnx.state(m, nnx.Param)) == SCFG
    assert lm.config_of(pure) == SCFG
    assert lm.count_params(m) == lm.count_params(models()[0])
    assert lm.block_specs(pure) == [("blocks", 0), ("blocks", 1), ("blocks", 2)]
    assert lm.block_specs(list_params()) == ["blocks/0", "blocks/1", "blocks/2"]


def test_stack_and_unstack_are_inverse():
    stacked = lm.stack_layers(list_params())
    for k in ("q", "k", "v", "o"):
        for i in range(3):
            np.testing.assert_array_equal(
                stacked["blocks"]["attn"][k][i], list_params()["blocks"][i]["attn"][k][...]
            )
    back = lm.unstack_layers(stacked)
    ref = nnx.to_pure_dict(list_params())
    assert jax.tree.structure(back) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)


def test_scan_model_equals_list_model():
    dense, scanned = models()
    x = tokens()
    logits_ref, hs_ref = dense(x, hiddens=True)  # eager: the reference
    want = np.asarray(logits_ref)
    np.testing.assert_allclose(scanned(x), want, **TOL)
    np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(scanned, x), want, **TOL)
    logits, hs = scanned(x, hiddens=True)
    assert len(hs) == len(hs_ref) == CFG.layers + 1
    np.testing.assert_allclose(logits, want, **TOL)
    for h, r in zip(hs, hs_ref, strict=True):
        np.testing.assert_allclose(h, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_functional_form_of_the_scan_model(transform):
    dense, scanned = models()
    fn, params = lm.apply_fn(scanned)
    x = tokens(seed=1)
    want, hs_ref = jitted_fns()[0](list_params(), x, hiddens=True)
    np.testing.assert_allclose(transform(fn)(params, x), want, **TOL)
    np.testing.assert_allclose(transform(fn)(nnx.to_pure_dict(params), x), want, **TOL)
    logits, hs = transform(lambda p, t: fn(p, t, hiddens=True))(params, x)
    assert len(hs) == CFG.layers + 1
    for h, r in zip(hs, hs_ref, strict=True):
        np.testing.assert_allclose(h, r, rtol=1e-5, atol=1e-5)


def test_scan_model_gradients_are_the_stacked_list_gradients():
    dense, scanned = models()
    w = tokens(t=9, seed=2)

    def loss(m):
        return lm.next_byte_loss(m(w[:, :-1]), w)

    grad = nnx.jit(nnx.grad(loss))
    g_scan = nnx.to_pure_dict(grad(scanned))
    want = lm.stack_layers(grad(dense))
    assert jax.tree.structure(g_scan) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@functools.cache
def jitted_fns():
    """``(fn_list, fn_scan)``: the jitted functional forms (one compile per shape)."""
    fns = lm.apply_fn(models()[0])[0], lm.apply_fn(models()[1])[0]
    return tuple(jax.jit(f, static_argnames="hiddens") for f in fns)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("i", [0, 1, 2])
def test_drop_layer_of_the_stack_equals_the_list_without_it(transform, i):
    fn_list, fn_scan = jitted_fns()
    p_list, p_scan = list_params(), scan_params()
    x = tokens(seed=3)
    small = transform(lambda p: splice.drop_layer(p, "blocks", index=i))(p_scan)
    pure = nnx.to_pure_dict(small)
    assert pure["blocks"]["attn"]["q"].shape == (2, 16, 2, 2, 4)
    assert pure["blocks"]["mlp_norm"]["scale"].shape == (2, 16)
    np.testing.assert_array_equal(pure["embed"], p_scan["embed"][...])  # outside: untouched
    keep = [k for k in range(3) if k != i]
    np.testing.assert_array_equal(
        pure["blocks"]["mlp"]["up"], np.asarray(p_scan["blocks"]["mlp"]["up"][...])[keep]
    )
    want = np.asarray(fn_list(splice.drop_layer(p_list, f"blocks/{i}"), x))
    np.testing.assert_allclose(fn_scan(small, x), want, **TOL)
    # the (path, index) spec is the same cut
    tup = splice.drop_layer(p_scan, ("blocks", i))
    for a, b in zip(jax.tree.leaves(tup), jax.tree.leaves(small), strict=True):
        np.testing.assert_array_equal(a, b)


def test_rebuild_after_dropping_a_layer_of_the_stack():
    """A scan_layers model with one layer fewer, from the cut state or its pure dict."""
    fn_list, _ = jitted_fns()
    small = splice.drop_layer(scan_params(), "blocks", index=1)
    x = tokens(seed=4)
    want = np.asarray(fn_list(splice.drop_layer(list_params(), "blocks/1"), x))
    for state in (small, nnx.to_pure_dict(small)):
        rebuilt = lm.rebuild(state)
        assert lm.config_of(nnx.state(rebuilt, nnx.Param)) == dataclasses.replace(SCFG, layers=2)
        np.testing.assert_allclose(rebuilt(x), want, **TOL)
    # the list model rebuilt from the unstacked weights agrees
    np.testing.assert_allclose(lm.rebuild(lm.unstack_layers(small))(x), want, **TOL)


def test_drop_two_layers_of_the_stack():
    fn_list, fn_scan = jitted_fns()
    small = splice.drop_layer(splice.drop_layer(scan_params(), "blocks", index=2), ("blocks", 0))
    ref = splice.drop_layer(splice.drop_layer(list_params(), "blocks/2"), "blocks/0")
    x = tokens(seed=4)
    np.testing.assert_allclose(fn_scan(small, x), fn_list(ref, x), **TOL)
    assert lm.config_of(small) == dataclasses.replace(SCFG, layers=1)


def _influence_fn(model):
    fn, _ = lm.apply_fn(model)

    def f(p, w):
        logits, hs = fn(p, w[:, :-1], hiddens=True)
        return lm.next_byte_loss(logits, w), hs

    return f


def test_block_influence_on_the_scanned_stack_equals_the_list():
    dense, scanned = models()
    batches = [tokens(t=9, seed=5), tokens(t=9, seed=6)]
    f_list, f_scan = _influence_fn(dense), _influence_fn(scanned)
    ref = splice.block_influence(f_list, list_params(), batches, lm.block_specs(list_params()))
    by_stack = splice.block_influence(f_scan, scan_params(), batches, lm.block_specs(scan_params()))
    assert by_stack.blocks == (("blocks", 0), ("blocks", 1), ("blocks", 2))
    np.testing.assert_allclose(by_stack.cosine, ref.cosine, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(by_stack.ablation, ref.ablation, rtol=1e-4, atol=1e-6)
    # the ablation score is the loss gap of drop_layer, recomputed here
    f = jax.jit(f_scan)
    base = np.mean([float(f(scan_params(), b)[0]) for b in batches])
    cut = splice.drop_layer(scan_params(), "blocks", index=1)
    gap = np.mean([float(f(cut, b)[0]) for b in batches]) - base
    np.testing.assert_allclose(by_stack.ablation[1], gap, rtol=1e-5, atol=1e-7)


def test_report_depth_prune_on_the_scanned_stack_equals_the_list():
    """`lm_report.depth_prune` takes `lm.block_specs`: on the scanned stack it scores the same
    blocks, drops the same ones (highest index first) and rebuilds the same function."""
    from jaxslim.demo import lm_report

    dense, scanned = models()
    windows, drop = tokens(n=3, t=9, seed=8), 2
    small_list, scores_list = lm_report.depth_prune(dense, windows, drop=drop)
    small_scan, scores_scan = lm_report.depth_prune(scanned, windows, drop=drop)
    np.testing.assert_allclose(scores_scan, scores_list, rtol=1e-4, atol=1e-6)
    assert lm.config_of(nnx.state(small_scan, nnx.Param)) == dataclasses.replace(
        SCFG, layers=3 - drop
    )
    assert lm.config_of(nnx.state(small_list, nnx.Param)) == dataclasses.replace(
        CFG, layers=3 - drop
    )
    kept = sorted(np.argsort(scores_list, kind="stable")[drop:].tolist())
    ref = list_params()
    got = lm.unstack_layers(nnx.state(small_scan, nnx.Param))
    for new, old in enumerate(kept):  # the kept blocks, in order, with their weights
        want = ref["blocks"][old]["attn"]["q"][...]
        np.testing.assert_array_equal(got["blocks"][new]["attn"]["q"], want)
    x = tokens(t=8, seed=9)
    np.testing.assert_allclose(small_scan(x), small_list(x), **TOL)


# ------------------------------------------------------------------------------- bad input


def one_layer_stack():
    return splice.drop_layer(splice.drop_layer(scan_params(), "blocks", index=0), "blocks", index=0)


def _fn_list(p, w):
    return _influence_fn(models()[0])(p, w)


BAD = [
    pytest.param(
        lambda: splice.drop_layer(scan_params(), "blocks", index=3),
        ValueError,
        r"splice.drop_layer: layer 3 is out of range for 'blocks/attn/k' with shape "
        r"\(3, 16, 2, 4\) on axis 0: the scanned stack 'blocks' has 3 layers \(index 0 \.\. 2\)",
        id="drop_layer-index-out-of-range",
    ),
    pytest.param(
        lambda: splice.drop_layer(scan_params(), "blocks", index=-1),
        ValueError,
        r"splice.drop_layer: layer -1 is out of range .* 'blocks' has 3 layers",
        id="drop_layer-negative-index",
    ),
    pytest.param(
        lambda: splice.drop_layer(scan_params(), ("blocks", 7)),
        ValueError,
        r"splice.drop_layer: layer 7 is out of range .* the scanned stack 'blocks' has 3 layers",
        id="drop_layer-tuple-index-out-of-range",
    ),
    pytest.param(
        lambda: splice.drop_layer(list_params(), "blocks", index=1),
        ValueError,
        r"splice.drop_layer: 'blocks' holds a list of 3 blocks, not a scanned stack .* "
        r"by its path, e\.g\. 'blocks/0'",
        id="drop_layer-list-not-stacked",
    ),
    pytest.param(
        lambda: splice.drop_layer(nnx.to_pure_dict(list_params()), ("blocks", 1)),
        ValueError,
        r"splice.drop_layer: 'blocks' holds a list of 3 blocks, not a scanned stack",
        id="drop_layer-pure-list-not-stacked",
    ),
    pytest.param(
        lambda: splice.drop_layer(list_params(), "blocks/0", index=1),
        ValueError,
        r"splice.drop_layer: 'blocks/0' is not a scanned stack: its leaves have different "
        r"sizes on axis 0 \('blocks/0/attn/k': 16, 'blocks/0/attn/o': 2",
        id="drop_layer-block-not-stacked",
    ),
    pytest.param(
        lambda: splice.drop_layer(scan_params(), "norm", index=0, axis=1),
        ValueError,
        r"splice.drop_layer: 'norm/scale' with shape \(16,\) has no layer axis 1, so 'norm' "
        r"is not a scanned stack",
        id="drop_layer-leaf-without-layer-axis",
    ),
    pytest.param(
        lambda: splice.drop_layer(scan_params(), "blocks/nope", index=0),
        ValueError,
        r"splice.drop_layer: no leaf under 'blocks/nope'",
        id="drop_layer-missing-stack",
    ),
    pytest.param(
        lambda: splice.drop_layer(one_layer_stack(), "blocks", index=0),
        ValueError,
        r"splice.drop_layer: the scanned stack 'blocks' has a single layer left "
        r"\('blocks/attn/k' with shape \(1, 16, 2, 4\)\)",
        id="drop_layer-last-layer",
    ),
    pytest.param(
        lambda: jax.jit(lambda i: splice.drop_layer(scan_params(), "blocks", index=i))(1),
        TypeError,
        r"splice.drop_layer: index must be a Python int .* for 'blocks'",
        id="drop_layer-traced-index",
    ),
    pytest.param(
        lambda: splice.drop_layer(scan_params(), "blocks", index=1.0),
        TypeError,
        r"splice.drop_layer: index must be a Python int .* got float 1\.0 for 'blocks'",
        id="drop_layer-float-index",
    ),
    pytest.param(
        lambda: splice.drop_layer(scan_params(), ("blocks", 1), index=1),
        TypeError,
        r"splice.drop_layer: give the layer index once, .* block=\('blocks', 1\) and index=1",
        id="drop_layer-index-twice",
    ),
    pytest.param(
        lambda: splice.drop_layer(scan_params(), "blocks", index=0, axis=-1),
        TypeError,
        r"splice.drop_layer: axis must be an int >= 0, got -1",
        id="drop_layer-negative-axis",
    ),
    pytest.param(
        lambda: splice.block_influence(_fn_list, list_params(), [tokens(t=9)], [("blocks", 1)]),
        ValueError,
        r"splice.block_influence: 'blocks' holds a list of 3 blocks, not a scanned stack .* "
        r"e\.g\. 'blocks/0'",
        id="block_influence-list-not-stacked",
    ),
    pytest.param(
        lambda: splice.block_influence(_fn_list, scan_params(), [tokens(t=9)], [("layers", 0)]),
        ValueError,
        r"splice.block_influence: 'layers' is not in the tree \(no key 'layers' at the root",
        id="block_influence-stack-missing",
    ),
    pytest.param(
        lambda: splice.block_influence(_fn_list, scan_params(), [tokens(t=9)], [("blocks", 3)]),
        ValueError,
        r"splice.block_influence: layer 3 is out of range for 'blocks/attn/k' with shape "
        r"\(3, 16, 2, 4\) on axis 0: the scanned stack 'blocks' has 3 layers",
        id="block_influence-index-out-of-range",
    ),
    pytest.param(
        lambda: splice.block_influence(
            _fn_list, scan_params(), [tokens(t=9)], [("blocks", 0)], axis=1
        ),
        ValueError,
        r"splice.block_influence: 'blocks' is not a scanned stack: its leaves have different "
        r"sizes on axis 1 \('blocks/attn/k': 16, 'blocks/attn/o': 2",
        id="block_influence-wrong-axis",
    ),
    pytest.param(
        lambda: lm.stack_layers(scan_params()),
        ValueError,
        r"lm.stack_layers: params\['blocks'\] is already a scanned stack \(keys \['attn', ",
        id="stack_layers-already-stacked",
    ),
    pytest.param(
        lambda: lm.unstack_layers(list_params()),
        ValueError,
        r"lm.unstack_layers: params\['blocks'\] is not a scanned stack \(keys \[0, 1, 2\]\)",
        id="unstack_layers-list-form",
    ),
    pytest.param(
        lambda: lm.stack_layers({"embed": jnp.ones((256, 4))}),
        ValueError,
        r"lm.stack_layers: params has no 'blocks' \(keys \['embed'\]\)",
        id="stack_layers-no-blocks",
    ),
    pytest.param(
        lambda: lm.config_of(
            {"embed": jnp.ones((256, 4)), "blocks": {"attn": {"q": jnp.ones((4, 1, 2, 2))}}}
        ),
        ValueError,
        r"lm.config_of: a scanned stack's 'blocks/attn/q' is \(layers, dim, kv_heads, groups, "
        r"head_dim\), got shape \(4, 1, 2, 2\)",
        id="config_of-stack-q-rank",
    ),
]


@pytest.mark.parametrize("call, exc, match", BAD)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
