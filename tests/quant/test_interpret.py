"""``quant.quantized``: any function on a QArray tree equals the function on the dequantized tree,
under jit / grad / vmap, for plain functions, Linen, NNX, HF Flax and the LM workbench; no full
float copy of a large kernel; W8A8 int8 x int8; bad input rows."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from jaxslim import quant
from jaxslim.demo import lm
from jaxslim.quant import QuantSpec

JIT = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]
SPECS = [
    pytest.param(QuantSpec(8, axis=-1), id="int8"),
    pytest.param(QuantSpec(4, axis=-1, group_size=32), id="int4-g32"),
    pytest.param(QuantSpec(4, axis=-1, group_size=128), id="int4-g128"),
    pytest.param(QuantSpec(fmt="nf4", axis=-1, group_size=64), id="nf4"),
    pytest.param(QuantSpec(fmt="e4m3", axis=-1), id="fp8"),
]
RNG = np.random.default_rng(0)


def normal(*shape):
    return jnp.asarray(RNG.normal(size=shape).astype(np.float32))


PARAMS = {
    "embed": normal(64, 256),  # gathered and used tied, as h @ embed.T
    "w": normal(256, 128),  # Flax (in, out)
    "eqx": normal(128, 128),  # Equinox (out, in)
    "heads": normal(128, 4, 32),  # explicit heads (d, h, k)
    "b": normal(128),
}


def fn(p, tokens):
    h = p["embed"][tokens]
    y = jnp.tanh(h @ p["w"] + p["b"][None, None])
    z = jnp.einsum("...i,oi->...o", y, p["eqx"])
    heads = jnp.einsum("btd,dhk->bthk", z, p["heads"])
    logits = h @ p["embed"].T
    return logits + heads.sum((-1, -2))[..., None]


TOKENS = jnp.asarray(RNG.integers(0, 64, (2, 5)), jnp.int32)


def qtree(params, spec, keep=("b",)):
    heads = spec if spec.group_size is None else dataclasses.replace(spec, group_axis=0)
    rules = [(k, None) for k in keep] + [("heads", heads), (None, spec)]
    return quant.quantize_params(params, rules)[0]


def close(a, b, rtol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), 1.0))


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("spec", SPECS)
def test_plain_function_equals_dequantized(wrap, spec):
    qp = qtree(PARAMS, spec)
    g = quant.quantized(fn)
    close(wrap(g)(qp, TOKENS), fn(quant.dequantize_params(qp), TOKENS))


@pytest.mark.parametrize("spec", SPECS[:3])
def test_grad_and_vmap(spec):
    qp = qtree(PARAMS, spec)
    dq = quant.dequantize_params(qp)
    g = quant.quantized(fn)
    # grad w.r.t. a float leaf of params and w.r.t. a float input (straight-through).
    gb = jax.jit(jax.grad(lambda b: g({**qp, "b": b}, TOKENS).sum()))(PARAMS["b"])
    close(gb, jax.grad(lambda b: fn({**dq, "b": b}, TOKENS).sum())(PARAMS["b"]), 1e-4)
    f2 = lambda p, x: jnp.tanh(x @ p["w"]) @ p["eqx"].T  # noqa: E731
    x = normal(3, 256)
    gx = jax.grad(lambda x: quant.quantized(f2)(qp, x).sum())(x)
    close(gx, jax.grad(lambda x: f2(dq, x).sum())(x), 1e-4)
    ys = jax.vmap(g, in_axes=(None, 0))(qp, TOKENS[None].repeat(2, 0))
    close(ys[1], fn(dq, TOKENS))


def f32_kernel_copies(g, *args, shape):
    """Number of float32 values of ``shape`` (or its transpose) that g's lowered program makes."""
    text = jax.jit(g).lower(*args).as_text()
    dims = [f"tensor<{'x'.join(map(str, s))}xf32>" for s in (shape, shape[::-1])]
    return sum(text.count(d) for d in dims)


def test_no_full_float_copy_of_a_large_kernel():
    k, n = 2048, 1024  # larger than one block (quant._dot.BLOCK_ELEMS entries)
    qp = {"w": quant.quantize(normal(k, n), QuantSpec(4, axis=-1, group_size=128))}
    f = lambda p, x: x @ p["w"]  # noqa: E731
    dequantize_all = lambda p, x: f(quant.dequantize_params(p), x)  # noqa: E731
    x = normal(2, k)
    assert f32_kernel_copies(quant.quantized(f), qp, x, shape=(k, n)) == 0
    assert f32_kernel_copies(dequantize_all, qp, x, shape=(k, n)) > 0
    # Peak temporary memory: one block, well below one float32 copy of the kernel.
    mem = lambda g: jax.jit(g).lower(qp, x).compile().memory_analysis().temp_size_in_bytes  # noqa: E731
    assert mem(quant.quantized(f)) < k * n * 3 < k * n * 4 <= mem(dequantize_all)
    # Also under grad: the blocks are recomputed, not stored.
    gq = lambda p, x: jax.grad(lambda x: quant.quantized(f)(p, x).sum())(x)  # noqa: E731
    assert f32_kernel_copies(gq, qp, x, shape=(k, n)) == 0


@pytest.mark.parametrize("wrap", JIT)
def test_w8a8_uses_int8_products_and_straight_through_grad(wrap):
    qp = qtree({"w": normal(256, 64), "v": normal(64, 32)}, QuantSpec(8, axis=-1), keep=())
    f = lambda p, x: jax.nn.relu(x @ p["w"]) @ p["v"]  # noqa: E731
    x = normal(16, 256)
    g = quant.quantized(f, activations=QuantSpec(8))
    jaxpr = str(jax.make_jaxpr(g)(qp, x))
    assert jaxpr.count("preferred_element_type=int32") == 2
    act = lambda a: quant.fake_quant(a, QuantSpec(8, axis=0))  # noqa: E731
    dq = quant.dequantize_params(qp)
    want = act(jax.nn.relu(act(x) @ dq["w"])) @ dq["v"]
    close(wrap(g)(qp, x), want, 1e-4)
    gx = jax.grad(lambda x: g(qp, x).sum())(x)
    assert np.isfinite(np.asarray(gx)).all() and float(jnp.abs(gx).max()) > 0
    # Straight-through: activation quantization counts as the identity in the backward pass.
    ste = lambda a: a + jax.lax.stop_gradient(act(a) - a)  # noqa: E731
    want_g = jax.grad(lambda x: (ste(jax.nn.relu(ste(x) @ dq["w"])) @ dq["v"]).sum())(x)
    close(gx, want_g, 1e-4)


# --- W8A8 whichever side the quantized weight is on (issue 11 §3) ------------------------------


def np_quant8(a, contracted):
    """Symmetric int8 codes and scales of ``a``, one scale per index of the free axes:
    ``s = max|a| / 127.5`` (floored at eps), ``q = clip(round_half_even(a * (1/s)), -128, 127)``."""
    a = np.asarray(a, np.float32)
    s = np.abs(a).max(axis=contracted, keepdims=True) / np.float32(127.5)
    s = np.maximum(s, np.finfo(np.float32).eps).astype(np.float32)
    q = np.clip(np.round(a * (np.float32(1) / s)), -128, 127).astype(np.int32)
    return q, s


def w8a8_ref(w, x, w_left):
    """Per-token int8 activations x per-output-channel int8 weights, int32 accumulation, times
    both scales. ``w``: (out, in) when ``w_left`` (``w @ x``, x (in, tokens)), else (in, out)
    (``x @ w``, x (tokens, in))."""
    if w_left:
        qw, sw = np_quant8(w, 1)  # (out, in), scale (out, 1)
        qx, sx = np_quant8(x, 0)  # (in, tokens), scale (1, tokens)
        acc = qw @ qx  # int32 (out, tokens)
        assert acc.dtype == np.int32
        return acc.astype(np.float32) * sw * sx
    qw, sw = np_quant8(w, 0)  # (in, out), scale (1, out)
    qx, sx = np_quant8(x, 1)  # (tokens, in), scale (tokens, 1)
    acc = qx @ qw
    assert acc.dtype == np.int32
    return acc.astype(np.float32) * sx * sw


W_OI, W_IO = normal(32, 64), normal(64, 32)
LEFT_RIGHT = [  # (fn, weight, spec, x, weight on the left?)
    pytest.param(lambda p, x: p["w"] @ x, W_OI, 0, normal(64, 16), True, id="left-matmul"),
    pytest.param(
        lambda p, x: jax.lax.dot_general(p["w"], x, (((1,), (0,)), ((), ()))),
        W_OI,
        0,
        normal(64, 12),
        True,
        id="left-dot_general",
    ),
    pytest.param(lambda p, x: p["w"] @ x, W_OI, 0, normal(64, 3), True, id="left-few-tokens"),
    pytest.param(lambda p, x: x @ p["w"], W_IO, -1, normal(16, 64), False, id="right-matmul"),
    pytest.param(
        lambda p, x: jnp.einsum("ti,io->to", x, p["w"]),
        W_IO,
        -1,
        normal(10, 64),
        False,
        id="right-einsum",
    ),
]


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("f, w, axis, x, w_left", LEFT_RIGHT)
def test_w8a8_weight_on_either_side_equals_int8_reference(wrap, f, w, axis, x, w_left):
    qp = {"w": quant.quantize(w, QuantSpec(8, axis=axis))}
    g = quant.quantized(f, activations=QuantSpec(8))
    y = wrap(g)(qp, x)
    want = w8a8_ref(w, x, w_left)
    assert y.shape == want.shape and y.dtype == jnp.float32
    close(y, want, 1e-5)
    # The activations really are quantized: W8A8 differs from weight-only.
    y_wo = wrap(quant.quantized(f))(qp, x)
    assert float(jnp.abs(y - y_wo).max()) > 1e-4
    close(y_wo, f(quant.dequantize_params(qp), x), 1e-5)
    tokens = x.shape[1] if w_left else x.shape[0]
    jaxpr = str(jax.make_jaxpr(g)(qp, x))  # enough tokens: the int8 x int8 product runs
    assert jaxpr.count("preferred_element_type=int32") == (tokens >= 8)


def test_w8a8_left_weight_in_batched_einsum():
    w, x = W_OI, normal(2, 64, 9)  # (out, in) @ (batch, in, tokens)
    qp = {"w": quant.quantize(w, QuantSpec(8, axis=0))}
    for f in (lambda p, x: p["w"] @ x, lambda p, x: jnp.einsum("oi,bit->bot", p["w"], x)):
        y = jax.jit(quant.quantized(f, activations=QuantSpec(8)))(qp, x)
        want = np.stack([w8a8_ref(w, x[b], w_left=True) for b in range(2)])
        close(y, want, 1e-5)


@pytest.mark.parametrize("wrap", JIT)
def test_w8a8_scanned_layer_stack(wrap):
    rng = np.random.default_rng(11)  # own data: a flipped rounding would compound over layers
    ws = rng.normal(size=(3, 32, 32)).astype(np.float32)  # three (out, in) layers, scanned
    x = rng.normal(size=(32, 8)).astype(np.float32)
    qp = {"w": quant.quantize(jnp.asarray(ws), QuantSpec(8, axis=(0, 1)))}

    def f(p, x):  # x: (in, tokens); linear layers, so the reference has no transcendental ulps
        return jax.lax.scan(lambda h, w: (w @ h, None), x, p["w"])[0]

    g = quant.quantized(f, activations=QuantSpec(8))
    y = wrap(g)(qp, jnp.asarray(x))
    # One layer: the int8 reference. Scanned layers run simulated (fake-quantized activations
    # times dequantized weights in float32), so over three layers the reference is that.
    q1 = {"w": quant.quantize(jnp.asarray(ws[:1]), QuantSpec(8, axis=(0, 1)))}
    close(wrap(g)(q1, jnp.asarray(x)), w8a8_ref(ws[0], x, True))
    h, dq = jnp.asarray(x), quant.dequantize(qp["w"])
    for i in range(3):
        h = dq[i] @ quant.fake_quant(h, QuantSpec(8, axis=1))
    close(y, h, 1e-5)
    assert float(jnp.abs(y - quant.quantized(f)(qp, jnp.asarray(x))).max()) > 1e-2


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x))
        x = nn.DenseGeneral((2, 32))(x)
        return nn.Dense(8)(x.reshape(*x.shape[:-2], 64))


def test_linen_and_nnx():
    x = normal(3, 32)
    m = LinenMLP()
    params = m.init(jax.random.key(0), x)
    qp = quant.quantize_params(params, QuantSpec(8, axis=-1))[0]
    g = quant.quantized(lambda p, x: m.apply(p, x))
    close(jax.jit(g)(qp, x), m.apply(quant.dequantize_params(qp), x))

    model = nnx.Sequential(
        nnx.Linear(32, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 8, rngs=nnx.Rngs(1))
    )
    gdef, state = nnx.split(model)
    qs = quant.quantize_params(state, QuantSpec(4, axis=-1, group_size=32))[0]
    run = lambda s, x: nnx.merge(gdef, s)(x)  # noqa: E731
    close(jax.jit(quant.quantized(run))(qs, x), run(quant.dequantize_params(qs), x))


def test_lm_workbench():
    cfg = lm.LMConfig(dim=32, layers=2, kv_heads=2, groups=2, head_dim=8, hidden=64)
    f, params = lm.apply_fn(lm.LM(cfg, rngs=nnx.Rngs(0)))
    g32 = QuantSpec(4, axis=-1, group_size=32)
    rules = [
        ("attn/(q|k|v)", dataclasses.replace(g32, group_axis=0)),  # (d, heads, head_dim)
        ("attn/o", QuantSpec(4, axis=-1, group_size=8, group_axis=2)),  # (kv, groups, hd, d)
        (None, g32),  # the embedding's groups cut the vocabulary axis (tied head: not contracted)
    ]
    qp = quant.quantize_params(params, rules)[0]
    tokens = jnp.asarray(RNG.integers(0, 256, (2, 16)), jnp.int32)
    got = jax.jit(quant.quantized(f))(qp, tokens)
    close(got, f(quant.dequantize_params(qp), tokens), 1e-4)
    w8a8 = jax.jit(quant.quantized(f, activations=QuantSpec(8)))
    qp8 = quant.quantize_params(params, QuantSpec(8, axis=-1))[0]
    ref = f(quant.dequantize_params(qp8), tokens)
    err = float(jnp.abs(w8a8(qp8, tokens) - ref).max() / jnp.abs(ref).max())
    assert 0 < err < 0.05


def test_hf_flax_llama():
    transformers = pytest.importorskip("transformers")
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        config = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        model = transformers.FlaxLlamaForCausalLM(config, seed=0)
        tokens = jnp.asarray(RNG.integers(0, 64, (2, 8)), jnp.int32)
        qp = quant.quantize_params(model.params, QuantSpec(8, axis=-1))[0]
        f = lambda p, x: model(x, params=p).logits  # noqa: E731
        close(jax.jit(quant.quantized(f))(qp, tokens), f(quant.dequantize_params(qp), tokens), 1e-4)


def test_mixed_tree_scan_cond_and_unit_views():
    w = normal(3, 32, 32)  # stacked layers, scanned
    qp = {"w": quant.quantize(w, QuantSpec(8, axis=-1)), "v": normal(32, 32)}

    def f(p, x):
        x, _ = jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, p["w"])
        y = jax.lax.cond(x.sum() > 0, lambda: x @ p["v"], lambda: -x)
        w0 = p["w"][:1].reshape(1, 1, 32, 32)  # a slice, then unit axes only
        return y @ w0[0, 0] + (p["w"][0] * 2.0).sum(0, keepdims=True)

    x = normal(4, 32)
    close(jax.jit(quant.quantized(f))(qp, x), f(quant.dequantize_params(qp), x), 1e-4)


def _group_not_contracted():
    q = quant.quantize(normal(64, 32), QuantSpec(4, axis=0, group_size=8, group_axis=-1))
    # groups cut the output axis: the product still works (block along the contracted axis)
    f = lambda p, x: x @ p["w"]  # noqa: E731
    y = quant.quantized(f)({"w": q}, jnp.ones((2, 64)))
    close(y, jnp.ones((2, 64)) @ quant.dequantize(q))
    raise ValueError("ok: groups along the output axis")


BAD = [
    pytest.param(
        lambda: quant.quantized(42),
        TypeError,
        r"quant.quantized: fn must be a callable fn\(params, \*args\), got int",
        id="fn-not-callable",
    ),
    pytest.param(
        lambda: quant.quantized(lambda p, x: float(x @ p["w"]))(
            {"w": quant.quantize(jnp.ones((4, 2)), QuantSpec(8))}, jnp.ones(4)
        ),
        TypeError,
        r"quant.quantized: fn\(params, \*args\) raised .*while traced on shapes",
        id="fn-not-traceable",
    ),
    pytest.param(
        lambda: quant.quantized(lambda p, x: x @ p["w"])(
            {"w": quant.quantize(jnp.ones((4, 2)), QuantSpec(8))}, jnp.ones(3)
        ),
        TypeError,
        r"quant.quantized: fn\(params, \*args\) raised TypeError.*dot_general",
        id="shape-mismatch",
    ),
    pytest.param(
        lambda: quant.quantized(fn, activations=8),
        TypeError,
        r"quant.quantized: activations must be None or a QuantSpec, got 8",
        id="activations-not-spec",
    ),
    pytest.param(
        lambda: quant.quantized(fn, impl="fast"),
        ValueError,
        r"quant.quantized: impl must be .* got 'fast'",
        id="impl",
    ),
    pytest.param(
        lambda: quant.quantized(lambda p, x: x @ p["w"], impl="int")(
            {"w": quant.quantize(jnp.ones((4, 2)), QuantSpec(4, axis=-1, group_size=2))},
            jnp.ones((1, 4)),
        ),
        ValueError,
        r"quant.qdot_general: impl='int' needs",
        id="int-path-on-grouped-kernel",
    ),
    pytest.param(
        lambda: quant.quantized(lambda p, x: x @ p["w"])({"w": "abc"}, jnp.ones(3)),
        TypeError,
        r"quant.quantized: params leaf 'w' is a str",
        id="leaf-not-array",
    ),
    pytest.param(_group_not_contracted, ValueError, r"ok: groups along the output axis", id="grp"),
    pytest.param(
        lambda: quant.quantized(lambda p, x: p["w"] @ x, impl="int", activations=QuantSpec(8))(
            {
                "w": quant.quantize(
                    jnp.ones((2, 4)), QuantSpec(4, axis=0, group_size=2, group_axis=1)
                )
            },
            jnp.ones((4, 8)),
        ),
        ValueError,
        r"quant.quantized: the product with the quantized kernel 'w' \(the left operand"
        r".*impl='int' needs",
        id="int-path-left-weight-grouped",
    ),
    pytest.param(
        lambda: quant.quantized(
            lambda p, x: jax.lax.dot_general(
                x, p["w"], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            ),
            activations=QuantSpec(8),
        )({"w": quant.quantize(jnp.ones((4, 2)), QuantSpec(8))}, jnp.ones((3, 4), jnp.int32)),
        ValueError,
        r"quant.quantized: activations=.* kernel 'w', but that operand is int32 \(3, 4\)",
        id="w8a8-integer-activation",
    ),
    pytest.param(
        lambda: quant.quantized(
            lambda p, x: jax.lax.conv(x, p["w"], (1,), "SAME"), activations=QuantSpec(8)
        )({"w": quant.quantize(jnp.ones((2, 3, 3)), QuantSpec(8))}, jnp.ones((1, 3, 5))),
        ValueError,
        r"quant.quantized: activations=.* convolution, and the quantized kernel 'w'",
        id="w8a8-conv-kernel",
    ),
]


@pytest.mark.parametrize("call, exc, match", BAD)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
