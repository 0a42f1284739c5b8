"""quant.rotate_model (QuaRot) on every jaxslim.models family, the per-token activation and
KV-cache quantization of the forward pass (quant.TokenQuant), and quant.rotate on the jaxpr of any
function."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxslim import models, quant
from jaxslim.demo import lm

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


def _np_token_quant(x, clip, bits=4):
    """Symmetric per-vector fake quantization in NumPy (float32 like the library)."""
    half = np.float32((2**bits - 1) / 2)
    scale = (np.float32(clip) * np.abs(x).max(-1, keepdims=True) / half).astype(np.float32)
    scale = np.maximum(scale, np.finfo(np.float32).eps)
    q = np.clip(np.round(x * (np.float32(1) / scale)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * scale).astype(np.float32)


@pytest.mark.parametrize("wrap", JIT)
def test_token_quant_groups_equal_per_group_formula_with_a_padded_last_group(wrap):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(3, 20)) * np.linspace(0.1, 8, 20)).astype(np.float32)
    y = np.asarray(wrap(quant.TokenQuant(4, group_size=8))(x))
    assert y.shape == x.shape and y.dtype == np.float32
    for lo in (0, 8, 16):  # groups [0, 8), [8, 16) and the padded [16, 20)
        np.testing.assert_allclose(y[:, lo : lo + 8], _np_token_quant(x[:, lo : lo + 8], 1.0))
    per_token = np.asarray(quant.TokenQuant(4)(x))
    assert np.abs(y - x).sum() < np.abs(per_token - x).sum()
    np.testing.assert_array_equal(quant.TokenQuant(4, group_size=64)(x), per_token)


@pytest.mark.parametrize("wrap", JIT)
def test_token_quant_clip_search_picks_the_least_error_ratio_per_vector(wrap):
    rng = np.random.default_rng(2)
    x = rng.standard_t(2, size=(40, 16)).astype(np.float32)  # heavy tails: ratios differ
    ratios = (1.0, 0.9, 0.75, 0.6)
    y = np.asarray(wrap(quant.TokenQuant(4, clip=ratios))(x))
    cands = np.stack([_np_token_quant(x, c) for c in ratios])  # (ratio, token, K)
    errs = ((cands - x[None]) ** 2).sum(-1)
    best = errs.argmin(0)  # ties to the earlier ratio, like the library
    np.testing.assert_allclose(y, cands[best, np.arange(40)], rtol=1e-6)
    assert len(set(best.tolist())) > 1  # the search chose different ratios for different tokens
    assert ((y - x) ** 2).sum() <= errs.sum(1).min() * (1 + 1e-6)  # beats every fixed ratio
    g = jax.grad(lambda v: jnp.sum(quant.TokenQuant(4, clip=ratios)(v)))(jnp.asarray(x))
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
    assert quant.TokenQuant(4, clip=[1.0, 0.9]) == quant.TokenQuant(4, clip=(1.0, 0.9))
    assert hash(quant.TokenQuant(4, clip=[1.0, 0.9], group_size=16)) is not None


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"bits": 1}, "bits must be an int in \\[2, 8\\], got 1"),
        ({"bits": 4.0}, "bits must be an int"),
        ({"bits": 4, "clip": 0.0}, "clip must be a float in \\(0, 1\\], got 0.0"),
        ({"bits": 4, "clip": 1.5}, "got 1.5"),
        ({"bits": 4, "symmetric": 1}, "symmetric must be a bool"),
        ({"bits": 4, "clip": ()}, "clip must be a float in \\(0, 1\\] or a non-empty tuple"),
        ({"bits": 4, "clip": (0.9, 1.5)}, "clip must be a float in \\(0, 1\\], got 1.5"),
        ({"bits": 4, "group_size": 0}, "group_size must be None or an int >= 1, got 0"),
        ({"bits": 4, "group_size": 16.0}, "group_size must be None or an int >= 1, got 16.0"),
        ({"bits": 4, "group_size": True}, "group_size must be None or an int >= 1, got True"),
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


# --------------------------------------------------------------------------------------------
# quant.rotate: the same rotation found on the jaxpr of any function (the NNX workbench,
# Equinox, plain JAX); the ops it refuses, by name.

UNTIED = [k for k, c in CONFIGS.items() if not c.tie_word_embeddings]


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("name", UNTIED)
def test_rotate_on_the_jaxpr_preserves_every_models_family(name, wrap, online):
    cfg = CONFIGS[name]
    p = _model(cfg)
    f = lambda p, t: models.forward(p, t, cfg)
    rfn, rp = quant.rotate(f, p, TOKENS, online=online)
    assert _rel(wrap(rfn)(rp, TOKENS), f(p, TOKENS)) < 1e-4
    rep = rfn.rotate_report
    assert rep.width == 24
    # every block norm and the final norm were folded and are now exactly 1
    for lp in rp["layers"]:
        np.testing.assert_array_equal(np.asarray(lp["attn_norm"]), 1.0)
        np.testing.assert_array_equal(np.asarray(lp["mlp_norm"]), 1.0)
    np.testing.assert_array_equal(np.asarray(rp["norm"]), 1.0)
    assert rep.folded["layers/0/attn_norm"] == ("layers/0/q", "layers/0/k", "layers/0/v")
    assert rep.folded["norm"] == ("lm_head",)
    assert rep.roles["embed:1"] == ("table",) and rep.roles["layers/1/down:1"] == ("writer",)
    if "qwen3" in name:  # the per-head q/k norms are not on the stream: untouched
        np.testing.assert_array_equal(
            np.asarray(rp["layers"][0]["q_norm"]), np.asarray(p["layers"][0]["q_norm"])
        )
    if online:
        assert set(rep.online) == {f"layers/{i}/{k}" for i in (0, 1) for k in ("o", "down")}
    else:
        assert rep.online == ()
        np.testing.assert_array_equal(rfn(rp, TOKENS), f(rp, TOKENS))  # fn itself
    assert rep.max_rel_diff < 1e-4


def test_rotate_on_the_jaxpr_follows_the_formulas():
    # E Q, Q^T diag(w) W for a reader, W Q for a writer, with Q = diag(s) H / sqrt(d).
    cfg = CONFIGS["llama"]
    p = _model(cfg, seed=3)
    _, rp = quant.rotate(lambda p, t: models.forward(p, t, cfg), p, TOKENS, seed=7)
    q = quant.random_hadamard(24, 7)
    f64 = lambda x: np.asarray(x, np.float64)
    np.testing.assert_allclose(f64(rp["embed"]), f64(p["embed"]) @ q, atol=1e-5)
    lp, rl = p["layers"][0], rp["layers"][0]
    want = q.T @ (f64(lp["attn_norm"])[:, None] * f64(lp["q"]))
    np.testing.assert_allclose(f64(rl["q"]), want, atol=1e-5)
    np.testing.assert_allclose(f64(rl["down"]), f64(lp["down"]) @ q, atol=1e-5)
    np.testing.assert_allclose(
        f64(rp["lm_head"]), q.T @ (f64(p["norm"])[:, None] * f64(p["lm_head"])), atol=1e-5
    )


def test_rotation_spreads_an_outlier_feature():
    # One feature 30x the others in every embedding row: after E Q no feature stands out.
    cfg = CONFIGS["llama"]
    p = _model(cfg)
    p["embed"] = p["embed"].at[:, 5].multiply(30.0)
    _, rp = quant.rotate(lambda p, t: models.forward(p, t, cfg), p, TOKENS)
    ratio = lambda e: float(jnp.max(jnp.abs(e)) / jnp.sqrt(jnp.mean(e * e)))
    assert ratio(p["embed"]) > 4.0
    assert ratio(rp["embed"]) < 0.5 * ratio(p["embed"])


def test_tied_head_is_rotated_when_the_final_norm_is_one_and_refused_otherwise():
    cfg = CONFIGS["llama-tied"]
    f = lambda p, t: models.forward(p, t, cfg)
    p = _model(cfg)
    p["norm"] = jnp.ones_like(p["norm"])
    rfn, rp = quant.rotate(f, p, TOKENS)
    assert _rel(rfn(rp, TOKENS), f(p, TOKENS)) < 1e-4
    assert sorted(rfn.rotate_report.roles["embed:1"]) == ["reader", "table"]
    with pytest.raises(ValueError, match=r"quant.rotate: the norm scale 'norm' cannot be folded"):
        quant.rotate(f, _model(cfg), TOKENS)


def test_rotate_an_nnx_workbench_model():
    cfg = lm.LMConfig(dim=32, layers=2, kv_heads=2, groups=2, head_dim=8, hidden=64)
    model = lm.LM(cfg, rngs=nnx.Rngs(0))
    fn, params = lm.apply_fn(model)
    rng = np.random.default_rng(0)
    # block norms away from 1 (the final norm stays 1: the head is the tied embedding)
    params = jax.tree_util.tree_map_with_path(
        lambda kp, x: (
            jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
            if x.ndim == 1 and "blocks" in jax.tree_util.keystr(kp)
            else x
        ),
        params,
    )
    tokens = jnp.asarray(rng.integers(0, 256, (2, 12)), jnp.int32)
    for online in (False, True):
        rfn, rp = quant.rotate(fn, params, tokens, online=online)
        assert _rel(jax.jit(rfn)(rp, tokens), fn(params, tokens)) < 1e-4
    assert set(rfn.rotate_report.online) == {"blocks/0/mlp/down", "blocks/1/mlp/down"}


def test_scanned_layers_are_refused_naming_the_scan():
    cfg = lm.LMConfig(dim=32, layers=2, kv_heads=2, groups=2, head_dim=8, hidden=64)
    model = lm.LM(cfg.__class__(**{**cfg.__dict__, "scan_layers": True}), rngs=nnx.Rngs(0))
    fn, params = lm.apply_fn(model)
    with pytest.raises(ValueError, match=r"carried into a scan.*unroll the layers"):
        quant.rotate(fn, params, jnp.zeros((1, 4), jnp.int32))


class _EqxBlock(eqx.Module):
    norm1: eqx.nn.RMSNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    norm2: eqx.nn.RMSNorm
    proj: eqx.nn.Linear

    def __init__(self, d, f, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.norm1 = eqx.nn.RMSNorm(d)
        self.up = eqx.nn.Linear(d, f, key=k1)
        self.down = eqx.nn.Linear(f, d, key=k2)
        self.norm2 = eqx.nn.RMSNorm(d)
        self.proj = eqx.nn.Linear(d, d, use_bias=False, key=k3)

    def __call__(self, x):
        x = x + self.down(jax.nn.gelu(self.up(self.norm1(x))))
        return x + self.proj(self.norm2(x))


class _EqxLM(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list
    norm: eqx.nn.RMSNorm
    head: eqx.nn.Linear

    def __init__(self, key, vocab=20, d=16, f=32):
        ks = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(vocab, d, key=ks[0])
        self.blocks = [_EqxBlock(d, f, k) for k in jax.random.split(ks[1], 2)]
        self.norm = eqx.nn.RMSNorm(d)
        self.head = eqx.nn.Linear(d, vocab, key=ks[2])

    def __call__(self, ids):
        x = jax.vmap(self.embed)(ids)
        for b in self.blocks:
            x = jax.vmap(b)(x)
        return jax.vmap(self.head)(jax.vmap(self.norm)(x))


def test_rotate_an_equinox_model():
    model = _EqxLM(jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    rng = np.random.default_rng(1)
    params = jax.tree.map(  # RMSNorm weights away from 1
        lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype) if x.ndim == 1 else x,
        params,
    )
    fn = lambda p, ids: eqx.combine(p, static)(ids)
    ids = jnp.array([1, 4, 9, 19, 0])
    rfn, rp = quant.rotate(fn, params, ids, online=True)
    assert _rel(jax.jit(rfn)(rp, ids), fn(params, ids)) < 1e-4
    rep = rfn.rotate_report
    # eqx.nn.Linear is (out, in): the writers' stream axis is 0, the readers' 1
    assert rep.roles["blocks/0/down/weight:0"] == ("writer",)
    assert rep.roles["blocks/0/down/bias:0"] == ("bias",)
    assert rep.roles["blocks/0/up/weight:1"] == ("reader",)
    # eqx.nn.RMSNorm has a bias after its scale: x w + b is rotated as (x + b / w) w
    assert rep.roles["blocks/0/norm1/bias:0"] == ("norm_bias",)
    assert sorted(rep.roles["blocks/0/proj/weight:0"] + rep.roles["blocks/0/proj/weight:1"]) == [
        "reader",
        "writer",
    ]  # a (d, d) kernel reads and writes the stream
    np.testing.assert_array_equal(np.asarray(rp.norm.weight), 1.0)


def _plain(norm="rms", act_on_stream=False, scan=False):
    def fn(p, ids):
        h = p["embed"][ids]

        def block(h, lp):
            if norm == "rms":
                n = (
                    h
                    * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)
                    * lp["norm"][None, None, :]
                )
            else:  # LayerNorm: subtracts the mean
                c = h - jnp.mean(h, -1, keepdims=True)
                n = (
                    c
                    * jax.lax.rsqrt(jnp.mean(c * c, -1, keepdims=True) + 1e-6)
                    * lp["norm"][None, None, :]
                )
            h = h + jax.nn.relu(n @ lp["up"]) @ lp["down"]
            return jnp.tanh(h) if act_on_stream else h

        if scan:
            h, _ = jax.lax.scan(lambda h, lp: (block(h, lp), None), h, p["layers"])
        else:
            for lp in p["layers"]:
                h = block(h, lp)
        return h @ p["head"]

    k = iter(jax.random.split(jax.random.key(0), 16))
    layer = lambda: {
        "norm": 1 + 0.2 * jax.random.normal(next(k), (16,)),
        "up": jax.random.normal(next(k), (16, 32)) * 0.3,
        "down": jax.random.normal(next(k), (32, 16)) * 0.3,
    }
    layers = [layer(), layer()]
    if scan:
        layers = jax.tree.map(lambda *x: jnp.stack(x), *layers)
    p = {
        "embed": jax.random.normal(next(k), (12, 16)),
        "layers": layers,
        "head": jax.random.normal(next(k), (16, 12)),
    }
    return fn, p


IDS = jnp.array([[0, 3, 5, 11]])


@pytest.mark.parametrize("wrap", JIT)
def test_rotate_a_plain_jax_model(wrap):
    fn, p = _plain()
    rfn, rp = quant.rotate(fn, p, IDS, seed=2, online=True)
    assert _rel(wrap(rfn)(rp, IDS), fn(p, IDS)) < 1e-4
    # a different batch shape than the example: the online function re-traces
    ids = jnp.array([[1, 2], [3, 4], [5, 6]])
    assert _rel(rfn(rp, ids), fn(p, ids)) < 1e-4


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"norm": "layer"}, r"meets `reduce_sum`.*LayerNorm's mean.*only RMSNorm can be rotated"),
        ({"act_on_stream": True}, r"meets `tanh`.*does not commute with a rotation"),
        ({"scan": True}, r"carried into a scan"),
    ],
)
def test_what_cannot_be_rotated_is_named(kw, match):
    fn, p = _plain(**kw)
    with pytest.raises(ValueError, match=r"quant\.rotate: .*" + match):
        quant.rotate(fn, p, IDS)


def test_bad_arguments():
    fn, p = _plain()
    with pytest.raises(ValueError, match="fn returns the residual stream itself"):
        quant.rotate(
            lambda p, ids: (  # the hidden states, not logits
                p["embed"][ids]
                + jax.nn.relu(p["embed"][ids] @ p["layers"][0]["up"]) @ p["layers"][0]["down"]
            ),
            p,
            IDS,
        )
    with pytest.raises(TypeError, match="quant.rotate: seed must be an int, got 1.5"):
        quant.rotate(fn, p, IDS, seed=1.5)
    with pytest.raises(TypeError, match="quant.rotate: online must be a bool, got 'yes'"):
        quant.rotate(fn, p, IDS, online="yes")
    q = {**p, "head": quant.quantize(p["head"], quant.QuantSpec(8))}
    with pytest.raises(TypeError, match=r"quant.rotate: head is a QArray; rotate the float model"):
        quant.rotate(fn, q, IDS)
    with pytest.raises(TypeError, match=r"quant.rotate: fn must be a callable"):
        quant.rotate("fn", p, IDS)
    with pytest.raises(TypeError, match="is traced; call quant.rotate outside jit"):
        jax.jit(lambda p: quant.rotate(fn, p, IDS)[1])(p)
    odd = {"embed": jnp.ones((13, 7)), "head": jnp.ones((7, 13))}  # 7, 9, 13: no Hadamard
    odd["layers"] = [{"norm": jnp.ones(7), "up": jnp.ones((7, 9)), "down": jnp.ones((9, 7))}] * 2
    with pytest.raises(ValueError, match=r"no coupled-axis group whose width has a Hadamard"):
        quant.rotate(fn, odd, IDS)


def test_a_rotation_that_changes_the_function_is_refused(monkeypatch):
    # The result is checked on the example inputs: a broken (non-orthogonal) Q is caught.
    from jaxslim.quant import _rotate_fn

    fn, p = _plain()
    monkeypatch.setattr(_rotate_fn, "hadamard_matrix", lambda n: 1.1 * quant.hadamard_matrix(n))
    with pytest.raises(ValueError, match=r"the rotated function differs from fn by 0\.\d+"):
        quant.rotate(fn, p, IDS)
