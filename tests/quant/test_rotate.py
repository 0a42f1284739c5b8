"""quant.rotate_model (QuaRot) on every jaxslim.models family, and the per-token activation and
KV-cache quantization of the forward pass (quant.TokenQuant)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import models, quant

JIT = [lambda f: f, jax.jit]
CONFIGS = {
    "llama": models.Config(head_dim=8),
    "llama-tied": models.Config(head_dim=8, tie_word_embeddings=True),
    "llama-bias": models.Config(head_dim=8, attention_bias=True, o_bias=True),
    "qwen2": models.Config(family="qwen2", head_dim=8, attention_bias=True),
    "qwen2-tied": models.Config(
        family="qwen2", head_dim=8, attention_bias=True, tie_word_embeddings=True
    ),
    "qwen3": models.Config(family="qwen3", head_dim=8, qk_norm=True),
    "qwen3-tied": models.Config(family="qwen3", head_dim=8, qk_norm=True, tie_word_embeddings=True),
    "mistral": models.Config(family="mistral", head_dim=8, sliding_window=3),
}
TOKENS = jnp.array([[1, 5, 7, 9, 11, 3, 2, 40], [0, 4, 4, 8, 31, 49, 6, 12]])


def _model(cfg, *, seed=0, hidden=24, intermediate=40, heads=3, kv_heads=1, ones=False):
    p = models.init(
        jax.random.key(seed),
        cfg,
        vocab=50,
        hidden=hidden,
        layers=2,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        scale=0.3,
    )
    if ones:
        return p
    rng = np.random.default_rng(seed)
    scale = lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
    p["norm"] = scale(p["norm"])
    for lp in p["layers"]:
        for n in ("attn_norm", "mlp_norm", "q_norm", "k_norm"):
            if n in lp:
                lp[n] = scale(lp[n])
    return p


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _forward(wrap, cfg, **kw):
    f = lambda p, t: models.forward(p, t, cfg, **kw)
    return wrap(f)


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_rotation_preserves_the_function(name, wrap, online):
    cfg = CONFIGS[name]
    p = _model(cfg)
    rp, rcfg = quant.rotate_model(p, cfg, seed=1, online=online)
    want = models.forward(p, TOKENS, cfg)
    got = _forward(wrap, rcfg)(rp, TOKENS)
    assert _rel(got, want) <= 1e-4
    # every RMSNorm scale is folded away; the online leaves are there only when asked
    assert all(bool(jnp.all(lp[n] == 1)) for lp in rp["layers"] for n in ("attn_norm", "mlp_norm"))
    assert bool(jnp.all(rp["norm"] == 1))
    for lp in rp["layers"]:
        assert ("down_hadamard" in lp) is online and ("qk_hadamard" in lp) is online
        if cfg.qk_norm:  # per-head q/k norms stay as they are: nothing rotates inside q or k
            assert not bool(jnp.all(lp["q_norm"] == 1))
    # a tied head with a non-unit final norm is untied
    assert rcfg == dataclasses.replace(cfg, tie_word_embeddings=False)
    assert rp["lm_head"].shape == (24, 50)


def test_tied_head_stays_tied_when_the_final_norm_is_one():
    cfg = CONFIGS["llama-tied"]
    p = _model(cfg, ones=True)
    rp, rcfg = quant.rotate_model(p, cfg)
    assert rcfg is cfg and "lm_head" not in rp
    assert _rel(models.forward(rp, TOKENS, rcfg), models.forward(p, TOKENS, cfg)) <= 1e-4


@pytest.mark.parametrize("hidden,intermediate,hd", [(16, 24, 8), (48, 56, 12), (40, 72, 20)])
def test_other_hadamard_sizes(hidden, intermediate, hd):
    cfg = models.Config(family="qwen3", head_dim=hd, qk_norm=True)
    p = _model(cfg, hidden=hidden, intermediate=intermediate, heads=2, kv_heads=2)
    rp, rcfg = quant.rotate_model(p, cfg, seed=5)
    assert _rel(models.forward(rp, TOKENS, rcfg), models.forward(p, TOKENS, cfg)) <= 1e-4


def test_rotated_leaves_follow_the_formulas():
    cfg = CONFIGS["qwen2"]
    p = _model(cfg)
    rp, _ = quant.rotate_model(p, cfg, seed=2)
    f64 = lambda x: np.asarray(x, np.float64)
    q = f64(quant.random_hadamard(24, 2))
    qh = f64(quant.random_hadamard(8, 3))
    np.testing.assert_allclose(rp["embed"], f64(p["embed"]) @ q, atol=1e-6)
    lp, rl = p["layers"][0], rp["layers"][0]
    w = f64(lp["attn_norm"])[:, None]
    np.testing.assert_allclose(rl["q"], q.T @ (w * f64(lp["q"])), atol=1e-6)
    np.testing.assert_array_equal(rl["q_bias"], lp["q_bias"])  # outputs of q are not rotated
    v = (q.T @ (w * f64(lp["v"]))).reshape(24, 1, 8) @ qh
    np.testing.assert_allclose(rl["v"], v.reshape(24, 8), atol=1e-6)
    np.testing.assert_allclose(rl["v_bias"], f64(lp["v_bias"]) @ qh, atol=1e-6)
    o = np.einsum("ji,hjd->hid", qh, f64(lp["o"]).reshape(3, 8, 24)).reshape(24, 24) @ q
    np.testing.assert_allclose(rl["o"], o, atol=1e-6)
    s_f = np.asarray(rl["down_hadamard"], np.float64)
    assert set(np.unique(s_f)) == {-1.0, 1.0} and s_f.shape == (40,)
    qf = s_f[:, None] * quant.hadamard_matrix(40)
    np.testing.assert_allclose(rl["down"], qf.T @ f64(lp["down"]) @ q, atol=1e-6)
    assert rl["qk_hadamard"].shape == (8,)
    np.testing.assert_allclose(
        rp["lm_head"], q.T @ (f64(p["norm"])[:, None] * f64(p["lm_head"])), atol=1e-6
    )


@pytest.mark.parametrize("name", ["llama-tied", "qwen3"])
def test_rotated_model_decodes_with_a_cache(name):
    cfg = CONFIGS[name]
    rp, rcfg = quant.rotate_model(_model(cfg), cfg)
    full = models.forward(rp, TOKENS, rcfg)
    cache = models.init_cache(rcfg, rp, 2, 8)
    first, cache = models.forward(rp, TOKENS[:, :5], rcfg, cache=cache)
    rest, _ = models.forward(rp, TOKENS[:, 5:], rcfg, cache=cache)
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, atol=1e-5)


def test_rotated_model_runs_quantized_and_calibrates():
    """The online transforms are plain jax ops: quant.quantized and GPTQ see through them."""
    cfg = CONFIGS["qwen3"]
    rp, rcfg = quant.rotate_model(_model(cfg), cfg)
    f = lambda p, x: models.forward(p, x, rcfg)
    rules = [(r"^layers/\d+/(q|k|v|o|gate|up|down)$", quant.QuantSpec(8, axis=-1))]
    qp, _ = quant.quantize_params(rp, rules)
    want = f(quant.dequantize_params(qp), TOKENS)
    np.testing.assert_allclose(jax.jit(quant.quantized(f))(qp, TOKENS), want, atol=1e-5)
    gp, _ = quant.oneshot(f, rp, [TOKENS], rules, method=quant.GPTQ(), sequential=False)
    kernels = ("q", "k", "v", "o", "gate", "up", "down")
    assert all(quant.is_qarray(lp[n]) for lp in gp["layers"] for n in kernels)
    for lp, rl in zip(gp["layers"], rp["layers"], strict=True):
        for n in ("down_hadamard", "qk_hadamard", "q_norm"):
            np.testing.assert_array_equal(lp[n], rl[n])
    assert _rel(quant.quantized(f)(gp, TOKENS), models.forward(rp, TOKENS, rcfg)) < 0.05


def _outlier_model(cfg):
    """Outliers as LLMs have them: 2 residual channels 30x larger, 2 key channels (one RoPE
    pair) 5x larger; the rest of the model as before."""
    p = _model(cfg, ones=True)
    p["embed"] = p["embed"].at[:, jnp.array([3, 17])].multiply(30.0)
    for lp in p["layers"]:
        lp["k"] = lp["k"].at[:, jnp.array([1, 5])].multiply(5.0)
    return p


def test_rotation_removes_outliers_and_helps_4_bit_activations_and_kv():
    cfg = CONFIGS["llama"]
    p = _outlier_model(cfg)
    rp, rcfg = quant.rotate_model(p, cfg)
    tq = quant.TokenQuant(4)
    err = lambda x: float(jnp.linalg.norm(tq(x) - x) / jnp.linalg.norm(x))
    peak = lambda x: float(jnp.max(jnp.abs(x)) / jnp.sqrt(jnp.mean(x * x)))
    # the input of layer 0's q/k/v, and its product with q: the same in float, the rotated one
    # without outlier channels, so its 4-bit per-token quantization loses much less
    norm = lambda p, c: models.rms_norm(
        models.embed(p, TOKENS, c), p["layers"][0]["attn_norm"], c.rms_norm_eps
    )
    a, ra = norm(p, cfg), norm(rp, rcfg)
    wq, rwq = p["layers"][0]["q"], rp["layers"][0]["q"]
    np.testing.assert_allclose(ra @ rwq, a @ wq, atol=1e-5)
    assert peak(ra) < 0.5 * peak(a)  # 1.69 vs 4.88
    assert err(ra) < 0.6 * err(a)  # 0.060 vs 0.126
    prod = lambda x, w: float(jnp.linalg.norm(tq(x) @ w - x @ w) / jnp.linalg.norm(x @ w))
    assert prod(ra, rwq) < 0.6 * prod(a, wq)  # 0.065 vs 0.132
    # keys after RoPE (and the online Hadamard), as the cache stores them
    cache = lambda p, c: models.forward(p, TOKENS, c, cache=models.init_cache(c, p, 2, 8))[1]
    k, rk = cache(p, cfg)["layers"][0]["k"], cache(rp, rcfg)["layers"][0]["k"]
    assert peak(rk) < 0.7 * peak(k)  # 2.08 vs 3.45
    assert err(rk) < 0.7 * err(k)  # 0.063 vs 0.111


# -- TokenQuant and the forward pass options ---------------------------------------------------


@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_token_quant_is_per_token_fake_quant(wrap, bits, symmetric):
    x = jax.random.normal(jax.random.key(0), (2, 5, 32)) * jnp.arange(1.0, 33.0).reshape(1, 1, 32)
    tq = quant.TokenQuant(bits, symmetric=symmetric)
    ref = quant.fake_quant(x, quant.QuantSpec(bits, symmetric=symmetric, axis=(0, 1)))
    np.testing.assert_array_equal(wrap(tq)(x), ref)
    y = np.asarray(tq(x)).reshape(10, 32)
    assert max(len(np.unique(r)) for r in y) <= 2**bits


@pytest.mark.parametrize("wrap", JIT)
def test_token_quant_clipping_formula(wrap):
    x = np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32)
    y = wrap(quant.TokenQuant(4, clip=0.8))(x)
    scale = (0.8 * np.abs(x).max(-1, keepdims=True) / np.float32(7.5)).astype(np.float32)
    ref = np.clip(np.round(x * (np.float32(1) / scale)), -8, 7) * scale
    np.testing.assert_allclose(y, ref, rtol=1e-6)
    ya = quant.TokenQuant(4, symmetric=False, clip=0.9)(x)
    lo, hi = 0.9 * np.minimum(x.min(-1, keepdims=True), 0), 0.9 * x.max(-1, keepdims=True)
    s = ((hi - lo) / np.float32(15)).astype(np.float32)
    z = np.clip(-8 - np.round(lo / s), -8, 7)
    ref = (np.clip(np.round(x * (np.float32(1) / s)) + z, -8, 7) - z) * s
    np.testing.assert_allclose(ya, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"bits": 1}, "bits must be an int in \\[2, 8\\], got 1"),
        ({"bits": 4.0}, "bits must be an int"),
        ({"bits": 4, "clip": 0.0}, "clip must be a float in \\(0, 1\\], got 0.0"),
        ({"bits": 4, "clip": 1.5}, "got 1.5"),
        ({"bits": 4, "symmetric": 1}, "symmetric must be a bool"),
    ],
)
def test_token_quant_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        quant.TokenQuant(**kw)


@pytest.mark.parametrize("wrap", JIT)
def test_forward_quantizes_kernel_inputs_and_the_kv_cache(wrap):
    cfg = CONFIGS["qwen2"]
    rp, rcfg = quant.rotate_model(_model(cfg), cfg)
    want = models.forward(rp, TOKENS, rcfg)
    a8 = _forward(wrap, rcfg, activations=quant.TokenQuant(8))(rp, TOKENS)
    a4 = _forward(wrap, rcfg, activations=quant.TokenQuant(4))(rp, TOKENS)
    assert 0 < _rel(a8, want) < _rel(a4, want) < 0.5
    kv = quant.TokenQuant(4, symmetric=False, clip=0.95)
    f = lambda p, t, c: models.forward(p, t, rcfg, cache=c, kv=kv)
    cache = models.init_cache(rcfg, rp, 2, 8)
    logits, cache = wrap(f)(rp, TOKENS, cache)
    np.testing.assert_allclose(logits, models.forward(rp, TOKENS, rcfg, kv=kv), atol=1e-5)
    for lc in cache["layers"]:  # every (token, head) vector of the cache is on a 16-level grid
        for name in ("k", "v"):
            rows = np.asarray(lc[name]).reshape(-1, 8)
            assert max(len(np.unique(r)) for r in rows) <= 16
    with pytest.raises(TypeError, match="activations must be None or a quant.TokenQuant"):
        models.forward(rp, TOKENS, rcfg, activations=quant.QuantSpec(4))


# -- errors --------------------------------------------------------------------------------------


def test_unsupported_widths_name_the_size():
    cfg = CONFIGS["llama"]
    with pytest.raises(ValueError, match=r"hidden width d=18.*n=18.*2\^k \* m"):
        quant.rotate_model(_model(cfg, hidden=18), cfg)
    with pytest.raises(ValueError, match=r"layers/0/down: MLP width F=44.*n=44"):
        quant.rotate_model(_model(cfg, intermediate=44), cfg)
    with pytest.raises(ValueError, match=r"head_dim=6.*n=6"):
        c6 = models.Config(head_dim=6)
        quant.rotate_model(_model(c6, heads=4, kv_heads=2), c6)


def test_layernorm_and_unknown_leaves_are_errors():
    cfg = CONFIGS["llama"]
    p = _model(cfg)
    p["layers"][1]["attn_norm_bias"] = jnp.zeros(24)
    with pytest.raises(ValueError, match=r"layers/1/attn_norm_bias: .*LayerNorm.*only RMSNorm"):
        quant.rotate_model(p, cfg)
    p = _model(cfg)
    p["layers"][0]["adapter"] = jnp.zeros((24, 24))
    with pytest.raises(ValueError, match=r"layers/0/adapter is not a leaf"):
        quant.rotate_model(p, cfg)


def test_quantized_rotated_and_bad_arguments():
    cfg = CONFIGS["llama"]
    p = _model(cfg)
    rp, rcfg = quant.rotate_model(p, cfg)
    with pytest.raises(ValueError, match=r"layers/0/down_hadamard is present: .*rotated already"):
        quant.rotate_model(rp, rcfg)
    qp, _ = quant.quantize_params(p, [("layers/0/q", quant.QuantSpec(4, axis=-1))])
    with pytest.raises(TypeError, match=r"layers/0/q is a QArray; rotate the float model first"):
        quant.rotate_model(qp, cfg)
    with pytest.raises(TypeError, match="seed must be an int"):
        quant.rotate_model(p, cfg, seed=1.5)
    with pytest.raises(TypeError, match="config must be a jaxslim.models.Config"):
        quant.rotate_model(p, {"head_dim": 8})
    with pytest.raises(ValueError, match="embed, layers and norm"):
        quant.rotate_model({"layers": []}, cfg)
    bad = {**rp, "layers": [{**rp["layers"][0], "qk_hadamard": jnp.ones(4)}]}
    with pytest.raises(ValueError, match=r"online Hadamard leaf has shape \(4,\), expected \(8,\)"):
        models.forward(bad, TOKENS, rcfg)
