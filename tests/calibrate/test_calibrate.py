"""calibrate.statistics and calibrate.sequential: equality with X^T X of inputs computed by hand,
on plain functions (every layout), control flow, convolutions, Linen, NNX, Hugging Face Flax Llama
and the LM workbench; bad input."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jaxslim import _tree, calibrate
from jaxslim.demo import lm

RNG = np.random.default_rng(0)


def arr(*shape, dtype=jnp.float32):
    return jnp.asarray(RNG.normal(size=shape), dtype)


def ref(x):
    """Reference statistics of rows ``x`` (..., k) in float64 NumPy."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return x.T @ x, (x**2).sum(0), np.abs(x).max(0), x.shape[0]


def check(stats, x, rtol=1e-5, atol=1e-5):
    xtx, sq, am, n = ref(x)
    np.testing.assert_allclose(stats.xtx, xtx, rtol=rtol, atol=atol)
    np.testing.assert_allclose(stats.sq_norm, sq, rtol=rtol, atol=atol)
    np.testing.assert_allclose(stats.absmax, am, rtol=rtol, atol=atol)
    assert int(stats.count) == n


# --------------------------------------------------------------------------------- plain layouts


def mlp(p, x):
    h1 = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"][None])
    h2 = jnp.tanh(h1 @ p["l2"]["kernel"])
    return h2 @ p["l3"]["kernel"], (h1, h2)


MLP = {
    "l1": {"kernel": arr(4, 6), "bias": arr(6)},
    "l2": {"kernel": arr(6, 5)},
    "l3": {"kernel": arr(5, 3)},
}
BATCHES = [arr(3, 4), arr(5, 4)]


def test_mlp_every_layer_equals_xtx_of_its_inputs_over_all_batches():
    s = calibrate.statistics(mlp, MLP, BATCHES)
    assert list(s) == ["l1/kernel", "l2/kernel", "l3/kernel"]  # execution order, bias skipped
    h = [mlp(MLP, b)[1] for b in BATCHES]
    check(s["l1/kernel"], jnp.concatenate(BATCHES))
    check(s["l2/kernel"], jnp.concatenate([a for a, _ in h]))
    check(s["l3/kernel"], jnp.concatenate([b for _, b in h]))
    st = s["l2/kernel"]
    assert st.contracted_axes == (0,) and st.lead_axes == () and st.shape == (6, 5)
    assert st.xtx.dtype == jnp.float32 and st.count.dtype == jnp.int32


def test_kernels_restricts_to_the_listed_paths_and_gives_the_same_values():
    full = calibrate.statistics(mlp, MLP, BATCHES)
    one = calibrate.statistics(mlp, MLP, BATCHES, kernels=["l2/kernel"])
    assert list(one) == ["l2/kernel"]
    np.testing.assert_array_equal(one["l2/kernel"].xtx, full["l2/kernel"].xtx)


def test_accumulation_step_donates_its_accumulators():
    """The jitted step updates the accumulators in place: XLA aliases every accumulator byte to
    an output, the buffers passed in are deleted (no second copy kept), and two steps sum."""
    c = calibrate._trace(mlp, MLP, BATCHES[0], 0)
    leaves = dict(_tree.leaves_with_paths(MLP))
    plans = calibrate._make_plans(c.uses, list(c.uses), leaves, False)
    step = calibrate._jit_step(c.traced, calibrate._make_hook(plans, jnp.float32))
    args = ([x for x in leaves.values()], list(c.traced.consts))
    acc0 = calibrate._zeros(plans, jnp.float32)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(acc0))
    assert nbytes == 4 * sum(k * k + 2 * k + 1 for k in (4, 6, 5))
    memory = step.lower(*args, acc0, [BATCHES[0]]).compile().memory_analysis()
    assert memory.alias_size_in_bytes == nbytes
    acc1, ok = step(*args, acc0, [BATCHES[0]])
    assert all(x.is_deleted() for x in jax.tree.leaves(acc0))
    acc2, ok = step(*args, acc1, [BATCHES[1]])
    assert all(x.is_deleted() for x in jax.tree.leaves(acc1)) and all(jax.device_get(ok).values())
    xtx, sq, am, n = ref(jnp.concatenate(BATCHES))
    np.testing.assert_allclose(acc2["l1/kernel"][0], xtx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(acc2["l1/kernel"][1], sq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(acc2["l1/kernel"][2], am, rtol=1e-5, atol=1e-5)
    assert int(acc2["l1/kernel"][3]) == n


def test_where_regex_selects_kernels():
    s = calibrate.statistics(mlp, MLP, BATCHES, where=r"l[13]/kernel")
    assert list(s) == ["l1/kernel", "l3/kernel"]


def test_out_in_kernel_and_bf16_inputs_accumulate_in_float32():
    p = {"w": arr(3, 4, dtype=jnp.bfloat16)}  # Equinox (out, in)
    x = arr(6, 4, dtype=jnp.bfloat16)
    s = calibrate.statistics(lambda p, x: x @ p["w"].T, p, [x])["w"]
    assert s.contracted_axes == (1,) and s.xtx.dtype == jnp.float32
    check(s, x.astype(jnp.float32))


def test_multi_axis_kernels_flatten_in_the_kernels_axis_order():
    b, t, kv, g, hd, d = 2, 3, 2, 3, 4, 5
    p = {"q": arr(d, kv, g, hd), "o": arr(kv, g, hd, d), "perm": arr(hd, kv, d)}

    def fn(p, x):
        q = jnp.einsum("btd,dkgh->btkgh", x, p["q"])
        y = jnp.einsum("btkgh,kghd->btd", q, p["o"])
        z = jnp.einsum("btkh,hkd->btd", q[:, :, :, 0], p["perm"])  # operand order (k, h)
        return y + z, q

    x = arr(b, t, d)
    s = calibrate.statistics(fn, p, [x])
    q = fn(p, x)[1]
    assert s["o"].contracted_axes == (0, 1, 2) and s["o"].xtx.shape == (kv * g * hd,) * 2
    check(s["q"], x)
    check(s["o"], q.reshape(b * t, kv * g * hd))
    # kernel (hd, kv, d): features hd-major, kv-minor, though the input is laid out (kv, hd)
    check(s["perm"], jnp.swapaxes(q[:, :, :, 0], -1, -2).reshape(b * t, hd * kv))


def test_a_kernel_reshaped_from_heads_is_flattened_in_its_own_order():
    p = {"o": arr(2, 3, 4)}  # (heads, head_dim, d), applied as a (6, 4) matrix
    x = arr(5, 6)
    s = calibrate.statistics(lambda p, x: x @ p["o"].reshape(6, 4), p, [x])["o"]
    assert s.contracted_axes == (0, 1)
    check(s, x)


def test_a_shared_kernel_gets_the_sum_over_its_sites():
    p = {"w": arr(4, 4)}
    x = arr(3, 4)
    s = calibrate.statistics(lambda p, x: jnp.tanh(x @ p["w"]) @ p["w"], p, [x])["w"]
    check(s, jnp.concatenate([x, jnp.tanh(x @ p["w"])]))


def test_per_head_batch_einsum_gets_per_head_statistics():
    p = {"w": arr(3, 4, 2)}  # (heads, d, f), heads a dot_general batch axis
    x = arr(5, 3, 4)  # (b, heads, d)
    s = calibrate.statistics(lambda p, x: jnp.einsum("bhd,hdf->bhf", x, p["w"]), p, [x])["w"]
    assert s.lead_axes == (0,) and s.contracted_axes == (1,) and s.xtx.shape == (3, 4, 4)
    for h in range(3):
        check(s.at(h), x[:, h])


# ------------------------------------------------------------------------------------ control flow


@pytest.mark.parametrize("reverse", [False, True])
def test_scanned_stacked_kernel_gets_per_layer_statistics(reverse):
    L, d = 3, 4
    p = {"stack": arr(L, d, d), "head": arr(d, 2)}

    def fn(p, x):
        h, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["stack"], reverse=reverse)
        return h @ p["head"]

    x = arr(5, d)
    s = calibrate.statistics(fn, p, [x, 2 * x])
    st = s["stack"]
    assert st.lead_axes == (0,) and st.contracted_axes == (1,) and st.xtx.shape == (L, d, d)
    ins = {}
    for b in (x, 2 * x):
        h = b
        for i in reversed(range(L)) if reverse else range(L):
            ins.setdefault(i, []).append(h)
            h = jnp.tanh(h @ p["stack"][i])
        ins.setdefault("head", []).append(h)
    for i in range(L):
        check(st.at(i), jnp.concatenate(ins[i]))
        assert st.at(i).contracted_axes == (0,) and st.at(i).shape == (d, d)
    check(s["head"], jnp.concatenate(ins["head"]))


def test_cond_and_while_kernels_count_what_ran():
    p = {"a": arr(4, 4), "b": arr(4, 4), "c": arr(4, 4)}

    def fn(p, x):
        h = lax.cond(x.sum() > 1e9, lambda h: h @ p["a"], lambda h: h @ p["b"], x)
        return lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["c"]), h)

    x = arr(2, 4)
    s = calibrate.statistics(fn, p, [x], where=r"^[bc]$")
    check(s["b"], x)
    hs, h = [], x @ p["b"]
    for _ in range(3):
        hs.append(h)
        h = jnp.tanh(h @ p["c"])
    check(s["c"], jnp.concatenate(hs))
    with pytest.raises(ValueError, match=r"calibrate.statistics: kernel 'a' was reached by none"):
        calibrate.statistics(fn, p, [x])


# ---------------------------------------------------------------------------------- convolutions


def test_flax_layout_conv_statistics_are_its_im2col_patches():
    x = arr(2, 7, 6, 3)  # NHWC
    w = arr(3, 2, 3, 4)  # HWIO
    kw = dict(window_strides=(2, 1), padding=((1, 1), (0, 1)), rhs_dilation=(1, 2))
    dn = ("NHWC", "HWIO", "NHWC")
    fn = lambda p, x: lax.conv_general_dilated(x, p["w"], dimension_numbers=dn, **kw)  # noqa: E731
    s = calibrate.statistics(fn, {"w": w}, [x])["w"]
    assert s.contracted_axes == (0, 1, 2) and s.xtx.shape == (18, 18)
    # Independent im2col: the patch of output (b, i, j) at tap (di, dj, c), padded input
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (0, 1), (0, 0)))
    out = fn({"w": w}, x)
    rows = []
    for b in range(2):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                rows.append(
                    [
                        xp[b, 2 * i + di, j + 2 * dj, c]
                        for di in range(3)
                        for dj in range(2)
                        for c in range(3)
                    ]
                )
    rows = np.asarray(rows)
    got = rows @ np.asarray(w).reshape(18, 4)
    np.testing.assert_allclose(got, np.asarray(out).reshape(-1, 4), rtol=1e-4, atol=1e-4)
    check(s, rows, rtol=1e-4, atol=1e-4)


def test_torch_layout_conv_flattens_in_kernel_order_in_h_w():
    x = arr(2, 3, 5, 5)  # NCHW
    w = arr(4, 3, 2, 2)  # OIHW: contracted (1, 2, 3), features (in, h, w)
    fn = lambda p, x: lax.conv_general_dilated(x, p["w"], (1, 1), "VALID")  # noqa: E731
    s = calibrate.statistics(fn, {"w": w}, [x])["w"]
    assert s.contracted_axes == (1, 2, 3)
    xn = np.asarray(x, np.float64)
    rows = [
        xn[b, :, i : i + 2, j : j + 2].reshape(-1)
        for b in range(2)
        for i in range(4)
        for j in range(4)
    ]
    rows = np.asarray(rows)
    out = np.moveaxis(np.asarray(fn({"w": w}, x)), 1, -1).reshape(-1, 4)
    np.testing.assert_allclose(rows @ np.asarray(w).reshape(4, 12).T, out, rtol=1e-4, atol=1e-4)
    check(s, rows, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- sequential


def _grid(w):
    return jnp.round(w * 2) / 2  # a coarse grid: changes the next layer's inputs


def test_sequential_calibrates_each_layer_on_the_compressed_earlier_ones():
    seen = {}

    def compress(path, w, stats):
        seen[path] = stats
        return _grid(w)

    new = calibrate.sequential(mlp, MLP, BATCHES, compress)
    assert list(seen) == ["l1/kernel", "l2/kernel", "l3/kernel"]
    for path in seen:
        layer = path.split("/")[0]
        np.testing.assert_array_equal(new[layer]["kernel"], _grid(MLP[layer]["kernel"]))
    np.testing.assert_array_equal(new["l1"]["bias"], MLP["l1"]["bias"])
    # layer 2's statistics are those of the model whose layer 1 is already compressed
    one = {**MLP, "l1": {**MLP["l1"], "kernel": _grid(MLP["l1"]["kernel"])}}
    expect = calibrate.statistics(mlp, one, BATCHES)["l2/kernel"]
    np.testing.assert_allclose(seen["l2/kernel"].xtx, expect.xtx, rtol=1e-6)
    plain = calibrate.statistics(mlp, MLP, BATCHES)["l2/kernel"]
    assert np.abs(np.asarray(seen["l2/kernel"].xtx - plain.xtx)).max() > 1e-2
    # layer 3 sees layers 1 and 2 compressed
    two = {**one, "l2": {"kernel": _grid(MLP["l2"]["kernel"])}}
    check(seen["l3/kernel"], jnp.concatenate([mlp(two, b)[1][1] for b in BATCHES]))


def test_sequential_with_a_jitted_compress_and_an_explicit_order():
    compress = jax.jit(lambda path, w, stats: w * 0.5, static_argnums=0)
    new = calibrate.sequential(mlp, MLP, BATCHES, compress, order=["l3/kernel", "l1/kernel"])
    np.testing.assert_array_equal(new["l3"]["kernel"], MLP["l3"]["kernel"] * 0.5)
    np.testing.assert_array_equal(new["l2"]["kernel"], MLP["l2"]["kernel"])


# ------------------------------------------------------------------------------ framework clients


def test_linen_dense_and_conv():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Conv(4, (3,), name="conv")(x))
            return nn.Dense(2, name="dense")(h.reshape(h.shape[0], -1)), h

    x = arr(2, 5, 3)
    net = Net()
    params = net.init(jax.random.key(0), x)
    fn = lambda p, x: net.apply(p, x)[0]  # noqa: E731
    s = calibrate.statistics(fn, params, [x])
    assert list(s) == ["params/conv/kernel", "params/dense/kernel"]
    h = net.apply(params, x)[1]
    check(s["params/dense/kernel"], h.reshape(2, -1))
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (0, 0)))  # SAME padding
    rows = [xp[b, i : i + 3].reshape(-1) for b in range(2) for i in range(5)]
    check(s["params/conv/kernel"], np.asarray(rows), rtol=1e-4, atol=1e-4)


def test_nnx_split_merge_functional_form():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 6, rngs=rngs)
            self.l2 = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.gelu(self.l1(x)))

    model = Net(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    fn = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
    x = arr(5, 4)
    s = calibrate.statistics(fn, state, [x])
    assert list(s) == ["l1/kernel", "l2/kernel"]
    check(s["l1/kernel"], x)
    check(s["l2/kernel"], nnx.gelu(model.l1(x)), rtol=1e-5)


def test_lm_workbench_einsum_kernels():
    cfg = lm.LMConfig(dim=8, layers=2, kv_heads=2, groups=2, head_dim=4, hidden=12, vocab=16)
    abstract = nnx.eval_shape(lambda: lm.LM(cfg, rngs=nnx.Rngs(0)))  # no init compilations
    graphdef, state = nnx.split(abstract)
    state = jax.tree.map(lambda x: arr(*x.shape) * 0.3, state)
    model = nnx.merge(graphdef, state)
    fn, params = lm.apply_fn(model)
    tokens = jnp.asarray(RNG.integers(0, 16, (2, 5)), jnp.int32)
    s = calibrate.statistics(fn, params, [tokens])
    assert s["blocks/0/attn/o"].contracted_axes == (0, 1, 2)
    assert s["blocks/0/attn/o"].xtx.shape == (16, 16)
    assert s["blocks/1/mlp/down"].xtx.shape == (12, 12)
    hs = jax.jit(lambda p, t: fn(p, t, hiddens=True)[1])(params, tokens)  # one compile

    def rms(x, scale):  # RMSNorm by hand: x / sqrt(mean(x^2) + eps) * scale
        return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.eps) * scale[None, None]

    for i in range(2):
        x = rms(hs[i], params["blocks"][i]["attn_norm"]["scale"][...])
        check(s[f"blocks/{i}/attn/q"], x, rtol=1e-4)
    check(s["embed"], rms(hs[-1], params["norm"]["scale"][...]), rtol=1e-4)  # tied head
    assert s["embed"].contracted_axes == (1,)


def test_hf_flax_llama_q_proj_equals_xtx_of_post_norm_hidden_states():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import FlaxLlamaForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    tokens = jnp.asarray(RNG.integers(0, 64, (2, 6)), jnp.int32)
    with (
        warnings.catch_warnings(),
        jax.numpy_rank_promotion("allow"),
        jax.numpy_dtype_promotion("standard"),
    ):
        warnings.simplefilter("ignore")
        model = FlaxLlamaForCausalLM(cfg, _do_init=False)  # random params, no eager init
        shapes = jax.eval_shape(lambda k: model.init_weights(k, (1, 1)), jax.random.key(0))
        params = jax.tree.map(lambda x: arr(*x.shape) * 0.3, shapes)
        fn = lambda p, x: model(x, params=p).logits  # noqa: E731
        s = calibrate.statistics(fn, params, [tokens])

        def grab(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and context.module.name == "q_proj":
                captured["/".join(context.module.path)] = args[0]
            return next_fun(*args, **kwargs)

        @jax.jit
        def q_inputs(p, x):
            captured.clear()
            with nn.intercept_methods(grab):
                model(x, params=p)
            return dict(captured)

        captured = {}
        inputs = q_inputs(params, tokens)
    assert "model/embed_tokens/embedding" not in s  # a gather, not a matmul
    assert len(inputs) == 2
    for i in range(2):
        (x,) = [v for k, v in inputs.items() if f"/{i}/" in k]
        st = s[f"model/layers/{i}/self_attn/q_proj/kernel"]
        xtx = ref(x)[0]
        assert np.abs(np.asarray(st.xtx) - xtx).max() <= 1e-4 * np.abs(xtx).max()
        assert int(st.count) == 12


# -------------------------------------------------------------------------------------- bad input


def _nan_batch():
    return calibrate.statistics(mlp, MLP, [BATCHES[0], BATCHES[1].at[2, 1].set(jnp.nan)])


def _nan_param():
    p = {**MLP, "l2": {"kernel": MLP["l2"]["kernel"].at[0, 0].set(jnp.inf)}}
    return calibrate.statistics(mlp, p, BATCHES)


def _elementwise():
    p = {"w": arr(3, 3), "scale": arr(3, 3)}
    return calibrate.statistics(lambda p, x: (x @ p["w"]) * p["scale"], p, [arr(3, 3)], where=".")


def _unused_kernel():
    return calibrate.statistics(mlp, MLP, BATCHES, where="bias", kernels=["l1/bias"])


def _permuted_then_merged():
    p = {"w": arr(2, 3, 4)}  # transposed to (3, 2, 4), then merged: feature order is not W's
    fn = lambda p, x: x @ p["w"].transpose(1, 0, 2).reshape(6, 4)  # noqa: E731
    return calibrate.statistics(fn, p, [arr(2, 6)])


def _python_indexed_stack():
    p = {"stack": arr(2, 3, 3)}
    return calibrate.statistics(lambda p, x: x @ p["stack"][0] @ p["stack"][1], p, [arr(2, 3)])


def _grouped_conv():
    p = {"w": arr(3, 1, 4)}  # depthwise (W, I/groups, O)
    fn = lambda p, x: lax.conv_general_dilated(  # noqa: E731
        x, p["w"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=4
    )
    return calibrate.statistics(fn, p, [arr(2, 5, 4)])


def _bad_compress_shape():
    return calibrate.sequential(mlp, MLP, BATCHES, lambda path, w, s: w[:1])


def _bad_compress_nan():
    return calibrate.sequential(mlp, MLP, BATCHES, lambda path, w, s: w * jnp.nan)


BAD = [
    pytest.param(
        _nan_batch, ValueError, r"statistics: .*'l1/kernel'.*not finite.*batch 1", id="nan-batch"
    ),
    pytest.param(
        _nan_param, ValueError, r"statistics: .*'l3/kernel'.*not finite.*batch 0", id="inf-param"
    ),
    pytest.param(
        lambda: calibrate.statistics(mlp, MLP, []),
        ValueError,
        r"statistics: batches is empty",
        id="empty",
    ),
    pytest.param(
        lambda: calibrate.statistics(mlp, MLP, iter(())),
        ValueError,
        r"statistics: batches is empty",
        id="empty-iter",
    ),
    pytest.param(
        _elementwise,
        ValueError,
        r"statistics: kernel 'scale' feeds no dot_general",
        id="elementwise",
    ),
    pytest.param(
        _unused_kernel,
        ValueError,
        r"statistics: kernel 'l1/bias' feeds no dot_general",
        id="bias-kernel",
    ),
    pytest.param(
        lambda: calibrate.statistics(mlp, MLP, BATCHES, where="nothing"),
        ValueError,
        r"statistics: where='nothing' selects no",
        id="where-none",
    ),
    pytest.param(
        lambda: calibrate.statistics(mlp, MLP, BATCHES, kernels=["l9"]),
        ValueError,
        r"statistics: kernels \['l9'\] are not",
        id="kernels-missing",
    ),
    pytest.param(
        lambda: calibrate.statistics(mlp, MLP, BATCHES, kernels="l1/kernel"),
        ValueError,
        r"statistics: kernels must be 'all'.*'l1/kernel'",
        id="kernels-str",
    ),
    pytest.param(
        lambda: calibrate.statistics(mlp, MLP, [BATCHES[0], arr(2, 5)]),
        TypeError,
        r"statistics: fn\(params, \*args\) raised .*fn=mlp.*\(batch 1\)",
        id="batch-shape",
    ),
    pytest.param(
        _permuted_then_merged,
        ValueError,
        r"statistics: kernel 'w' at matmul #0: .*permuted",
        id="permuted-merge",
    ),
    pytest.param(
        _python_indexed_stack,
        ValueError,
        r"statistics: kernel 'stack' .*indexed outside a scan",
        id="python-index",
    ),
    pytest.param(
        _grouped_conv,
        ValueError,
        r"statistics: kernel 'w' .*grouped convolutions",
        id="grouped-conv",
    ),
    pytest.param(
        lambda: calibrate.statistics(mlp, MLP, BATCHES, dtype=jnp.int32),
        ValueError,
        r"statistics: dtype must be a floating",
        id="int-dtype",
    ),
    pytest.param(
        lambda: calibrate.statistics(mlp, MLP, BATCHES)["l1/kernel"].at(0),
        ValueError,
        r"Stats.at: these statistics have no lead axis \(kernel shape \(4, 6\)\)",
        id="at-no-lead",
    ),
    pytest.param(
        _bad_compress_shape,
        ValueError,
        r"sequential: compress returned float32\[1, 6\] for 'l1/kernel'",
        id="compress-shape",
    ),
    pytest.param(
        _bad_compress_nan,
        ValueError,
        r"sequential: compress returned non-finite values for 'l1/kernel'",
        id="compress-nan",
    ),
    pytest.param(
        lambda: calibrate.sequential(mlp, MLP, BATCHES, lambda p, w, s: None),
        TypeError,
        r"sequential: compress returned a NoneType for 'l1/kernel'",
        id="compress-none",
    ),
    pytest.param(
        lambda: calibrate.sequential(mlp, MLP, BATCHES, print, order="reverse"),
        ValueError,
        r"sequential: order must be 'execution'.*'reverse'",
        id="order",
    ),
    pytest.param(
        lambda: calibrate.sequential(mlp, MLP, [], print),
        ValueError,
        r"sequential: batches is empty",
        id="seq-empty",
    ),
    pytest.param(
        lambda: calibrate.sequential(mlp, MLP, BATCHES, print, cross="yes"),
        TypeError,
        r"sequential: cross must be a bool, got 'yes'",
        id="seq-cross",
    ),
    pytest.param(
        lambda: calibrate.statistics(mlp, MLP, BATCHES, reference_batches=BATCHES[:1]),
        ValueError,
        r"statistics: reference_batches has 1 batches and batches 2; pass the reference",
        id="reference-batches-count",
    ),
    pytest.param(
        lambda: calibrate.statistics(mlp, MLP, BATCHES, reference_batches=[BATCHES[0], arr(4, 4)]),
        ValueError,
        r"statistics: reference batch 1 is .* with shapes \(\(\(4, 4\), 'float32'\),\), batch 1 "
        r"is .* with \(\(\(5, 4\), 'float32'\),\); the reference model's inputs must match",
        id="reference-batches-shape",
    ),
    pytest.param(
        lambda: calibrate.sequential(mlp, MLP, BATCHES, print, reference_batches=BATCHES),
        ValueError,
        r"sequential: reference_batches is only read with cross=True",
        id="seq-reference-batches-without-cross",
    ),
    pytest.param(
        lambda: calibrate.statistics(mlp, MLP, BATCHES, reference={"l1": MLP["l1"]}),
        ValueError,
        r"statistics: reference must have the tree structure of params",
        id="reference-tree",
    ),
    pytest.param(
        lambda: calibrate.statistics(
            mlp, MLP, BATCHES, reference={**MLP, "l2": {"kernel": arr(6, 5).astype(jnp.bfloat16)}}
        ),
        ValueError,
        r"statistics: reference leaf 'l2/kernel' is bfloat16\[6, 5\], params holds "
        r"float32\[6, 5\]; pass the uncompressed params",
        id="reference-dtype",
    ),
]


@pytest.mark.parametrize("call, exc, match", BAD)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
