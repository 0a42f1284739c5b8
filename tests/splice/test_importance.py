"""``splice.importance`` against hand-computed (NumPy) activation norms.

Minitron importance of a unit: ``I_c = agg_b agg_t ||A[b, t, c, :]||_2`` over the activation that
enters the consuming kernel. The cases here are kernels whose contracted dimension merges several
leaf axes: an output projection stored ``(heads, head_dim, d)`` and used as
``(heads * head_dim, d)`` (head-outer and head-inner memory orders, and an out-first ``(d, heads,
head_dim)`` weight used transposed), an einsum kernel ``(heads, head_dim, d)`` contracted over two
axes, ``nnx.MultiHeadAttention``'s ``out`` kernel, and MLP neurons. A head unit is all of its
head_dim channels: its score is the norm over head_dim of its slice of the attention output.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxslim import splice
from jaxslim.flax import splice as fsplice

TRANSFORMS = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]
B, T, M, H, D = 2, 5, 6, 3, 2  # batch, sequence, model width, heads, head_dim


def rand(seed, *shapes):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes, strict=True)]


def _agg(x, how, axis):
    if how == "l2":
        return np.sqrt(np.sum(np.square(x), axis=axis))
    return x.mean(axis) if how == "mean" else x.max(axis)


def minitron(per_unit, batch="l2", seq="mean"):
    """NumPy reference: ``per_unit`` is ``(examples, t, units, r)``; the L2 norm over ``r``, then
    the sequence aggregation, then the batch aggregation over every example."""
    norm = np.sqrt(np.sum(np.square(np.asarray(per_unit, np.float64)), axis=-1))
    return _agg(_agg(norm, seq, 1), batch, 0)


def values(p, x):
    """``(b, t, heads, head_dim)``: the per-head activation entering the output projection."""
    return jnp.tanh(jnp.einsum("btm,mhd->bthd", x, p["wv"]))


def head_outer(p, x):  # wo: (heads, head_dim, d), used as (heads * head_dim, d)
    v = values(p, x)
    return v.reshape(*v.shape[:2], -1) @ p["wo"].reshape(-1, p["wo"].shape[-1])


def head_inner(p, x):  # wo: (head_dim, heads, d), used as (head_dim * heads, d)
    v = jnp.swapaxes(values(p, x), 2, 3)
    return v.reshape(*v.shape[:2], -1) @ p["wo"].reshape(-1, p["wo"].shape[-1])


def out_first(p, x):  # wo: (d, heads, head_dim) like a torch Linear weight, used transposed
    v = values(p, x)
    return v.reshape(*v.shape[:2], -1) @ p["wo"].reshape(p["wo"].shape[0], -1).T


def einsum_out(p, x):  # wo: (heads, head_dim, d) contracted over both axes by one einsum
    return jnp.einsum("bthd,hdm->btm", values(p, x), p["wo"])


CASES = [
    pytest.param(head_outer, (H, D, M), 0, id="merged-head-outer"),
    pytest.param(head_inner, (D, H, M), 1, id="merged-head-inner"),
    pytest.param(out_first, (M, H, D), 1, id="merged-out-first"),
    pytest.param(einsum_out, (H, D, M), 0, id="einsum-two-axes"),
]


def _heads_group(groups, head_axis):
    (g,) = [g for g in groups if g.removable and ("wo", head_axis) in list(g)]
    return g


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize(("fn", "wo_shape", "head_axis"), CASES)
def test_head_importance_on_merged_contracted_axes_matches_numpy(
    fn, wo_shape, head_axis, transform
):
    wv, wo = rand(0, (M, H, D), wo_shape)
    p = {"wv": wv, "wo": wo}
    xs = rand(1, (B, T, M), (B + 1, T, M))
    heads = _heads_group(splice.trace(fn, p, xs[0]), head_axis)
    assert heads.size == H
    scores = splice.importance(transform(fn), p, xs, [heads])
    v = np.concatenate([np.asarray(values(p, x)) for x in xs])  # (examples, t, heads, head_dim)
    np.testing.assert_allclose(scores[heads], minitron(v), rtol=1e-5)
    # per-head scores differ from a per-channel mix-up: head h is v[..., h, :], not a stride
    wrong = minitron(v.reshape(*v.shape[:2], D, H).transpose(0, 1, 3, 2))
    assert not np.allclose(scores[heads], wrong, rtol=1e-3)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_head_dim_unit_of_a_merged_kernel_is_scored_over_heads(transform):
    wv, wo = rand(2, (M, H, D), (H, D, M))
    p = {"wv": wv, "wo": wo}
    x = rand(3, (B, T, M))[0]
    (inner,) = [g for g in splice.trace(head_outer, p, x) if ("wo", 1) in list(g)]
    scores = splice.importance(transform(head_outer), p, [x], [inner], aggregate=("mean", "max"))
    v = np.asarray(values(p, x)).transpose(0, 1, 3, 2)  # (b, t, head_dim, heads)
    np.testing.assert_allclose(scores[inner], minitron(v, "mean", "max"), rtol=1e-5)


def test_merged_kernel_scores_drive_head_removal_and_the_function_still_runs():
    wv, wo = rand(4, (M, H, D), (H, D, M))
    p = {"wv": wv, "wo": wo}
    x = rand(5, (B, T, M))[0]
    heads = _heads_group(splice.trace(head_outer, p, x), 0)
    scores = splice.importance(head_outer, p, [x], [heads])
    new, rep = splice.prune_channels(head_outer, p, x, sparsity=1 / 3, score=scores, groups=[heads])
    (dropped,) = rep.groups[0].removed
    assert dropped == int(np.argmin(scores[heads]))
    keep = jnp.asarray([h for h in range(H) if h != dropped])
    assert new["wo"].shape == (H - 1, D, M)
    ref = {"wv": p["wv"][:, keep], "wo": p["wo"][keep]}
    np.testing.assert_allclose(head_outer(new, x), head_outer(ref, x), rtol=1e-6)


def test_sliced_merged_kernel_is_reported_not_guessed():
    """``wo[:, :2]`` of a ``(heads, 3, d)`` leaf, then merged: the leaf's axes no longer tile
    the activation; the error names the function, the leaf, its shape and the activation's, and
    says how to go on (score the other groups)."""
    wv, wo = rand(6, (M, H, D), (H, D + 1, M))
    p = {"wv": wv, "wo": wo}

    def fn(p, x):
        v = values(p, x)
        return v.reshape(*v.shape[:2], -1) @ p["wo"][:, :D].reshape(-1, M)

    x = rand(7, (B, T, M))[0]
    heads = _heads_group(splice.trace(fn, p, x), 0)
    match = r"splice.importance: cannot map the activation \(2, 5, 6\) .*'wo' \(shape \(3, 3, 6\)"
    with pytest.raises(ValueError, match=match):
        splice.importance(fn, p, [x], [heads])


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_nnx_multi_head_attention_head_importance_matches_numpy(transform):
    n_heads, d_model = 4, 8
    hd = d_model // n_heads
    mha = nnx.MultiHeadAttention(
        n_heads, d_model, qkv_features=d_model, out_features=d_model, decode=False, rngs=nnx.Rngs(0)
    )
    xs = rand(8, (B, T, d_model), (1, T, d_model))
    (heads,) = [
        g for g in fsplice.trace_model(mha, xs[0]) if g.removable and ("out/kernel", 0) in list(g)
    ]
    graphdef, state = nnx.split(mha)
    fn = transform(lambda s, x: nnx.merge(graphdef, s)(x))
    scores = splice.importance(fn, state, xs, [heads])
    w = {k: np.asarray(v, np.float64) for k, v in _flat(nnx.to_pure_dict(state)).items()}

    def attention_output(x):  # NumPy: softmax(q k^T / sqrt(hd)) v per head, (b, t, heads, hd)
        x = np.asarray(x, np.float64)
        q, k, v = (
            np.einsum("btm,mhd->bthd", x, w[f"{n}/kernel"]) + w[f"{n}/bias"]
            for n in ("query", "key", "value")
        )
        logits = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return np.einsum("bhts,bshd->bthd", probs, v)

    out = np.concatenate([attention_output(x) for x in xs])
    np.testing.assert_allclose(scores[heads], minitron(out), rtol=1e-4)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("aggregate", [("l2", "mean"), ("mean", "l2"), ("max", "max")])
def test_mlp_neuron_importance_matches_numpy(aggregate, transform):
    """Neurons of a GELU MLP whose down projection is an einsum ``(F, d)`` kernel, and the
    residual input channels of the up projection (r = 1: a neuron is one channel)."""
    w1, w2 = rand(9, (M, 8), (8, M))
    p = {"w1": w1, "w2": w2}

    def fn(p, x):
        return jnp.einsum("btf,fm->btm", jax.nn.gelu(x @ p["w1"]), p["w2"])

    xs = rand(10, (B, T, M), (1, T, M))
    (hidden,) = [g for g in splice.trace(fn, p, xs[0]) if g.removable]
    assert hidden.size == 8
    scores = splice.importance(transform(fn), p, xs, [hidden], aggregate=aggregate)
    x = np.concatenate([np.asarray(x, np.float64) for x in xs])
    pre = x @ np.asarray(w1, np.float64)
    act = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre**3)))  # gelu
    np.testing.assert_allclose(scores[hidden], minitron(act[..., None], *aggregate), rtol=1e-4)
