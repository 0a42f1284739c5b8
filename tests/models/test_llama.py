"""jaxslim.models: the decoder's contract (shapes, causality, cache, jit, pruned trees, RoPE)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import models

SIZES = dict(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48)
CONFIGS = {
    "llama": models.Config(head_dim=8, rope_theta=500.0),
    "llama3_tied": models.Config(
        head_dim=8,
        tie_word_embeddings=True,
        rope_scaling=models.RopeScaling(8.0, 1.0, 4.0, 64),
    ),
    "qwen2": models.Config(family="qwen2", head_dim=8, attention_bias=True),
    "qwen3": models.Config(family="qwen3", head_dim=8, qk_norm=True),
    "mistral_window": models.Config(family="mistral", head_dim=8, sliding_window=3),
    "llama_bias": models.Config(head_dim=8, attention_bias=True, o_bias=True),
}


def make(name="llama", seed=0, **kw):
    cfg = CONFIGS[name]
    params = models.init(jax.random.key(seed), cfg, **{**SIZES, **kw}, scale=0.2)
    if cfg.qk_norm:  # non-trivial norm weights
        for i, lp in enumerate(params["layers"]):
            lp["q_norm"] = 1 + 0.1 * jax.random.normal(jax.random.key(100 + i), (8,))
            lp["k_norm"] = 1 - 0.1 * jax.random.normal(jax.random.key(200 + i), (8,))
    return params, cfg


def tokens(b=2, t=10, seed=1, vocab=64):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab, jnp.int32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shapes_and_dtype(name):
    params, cfg = make(name)
    logits = models.forward(params, tokens(), cfg)
    assert logits.shape == (2, 10, 64) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_causal(name):
    params, cfg = make(name)
    x = tokens()
    y = x.at[:, 6].set((x[:, 6] + 1) % 64)
    a, b = models.forward(params, x, cfg), models.forward(params, y, cfg)
    np.testing.assert_array_equal(np.asarray(a[:, :6]), np.asarray(b[:, :6]))
    assert not np.allclose(np.asarray(a[:, 6:]), np.asarray(b[:, 6:]))


def test_sliding_window_forgets_old_tokens():
    params, cfg = make("mistral_window")
    x = tokens(t=12)
    y = x.at[:, 0].set((x[:, 0] + 1) % 64)
    a, b = models.forward(params, x, cfg), models.forward(params, y, cfg)
    # window 3, 2 layers: position t sees tokens back to t - 2 * (3 - 1) = t - 4
    np.testing.assert_array_equal(np.asarray(a[:, 5:]), np.asarray(b[:, 5:]))
    assert not np.allclose(np.asarray(a[:, 4]), np.asarray(b[:, 4]))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cache_decode_equals_full_forward(name):
    params, cfg = make(name)
    x = tokens(t=9)
    full = models.forward(params, x, cfg)
    cache = models.init_cache(cfg, params, 2, 12)
    step = jax.jit(models.forward, static_argnames="config")
    logits, cache = step(params, x[:, :4], config=cfg, cache=cache)
    outs = [logits]
    for t in range(4, 9):
        logits, cache = step(params, x[:, t : t + 1], config=cfg, cache=cache)
        outs.append(logits)
    assert int(cache["index"]) == 9
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_jit_equals_eager(name):
    params, cfg = make(name)
    x = tokens()
    eager = models.forward(params, x, cfg)
    jitted = jax.jit(models.forward, static_argnames="config")(params, x, config=cfg)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


def test_block_composes_forward():
    params, cfg = make("qwen2")
    x = tokens(t=7)
    h = models.embed(params, x, cfg)
    pos = jnp.broadcast_to(jnp.arange(7)[None], (2, 7))
    for lp in params["layers"]:
        h = jax.jit(models.block, static_argnames="config")(lp, h, config=cfg, positions=pos)
    np.testing.assert_allclose(
        models.head(params, h, cfg), models.forward(params, x, cfg), rtol=1e-5, atol=1e-5
    )


def test_explicit_positions_shift_invariance():
    # RoPE scores depend on position differences only: shifting all positions changes nothing
    params, cfg = make("llama")
    x = tokens(t=6)
    pos = jnp.broadcast_to(jnp.arange(6)[None] + 5, (2, 6))
    np.testing.assert_allclose(
        models.forward(params, x, cfg, positions=pos),
        models.forward(params, x, cfg),
        rtol=1e-4,
        atol=1e-4,
    )


def test_bf16_params_compute_float32():
    params, cfg = make("llama")
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p16)
    x = tokens()
    np.testing.assert_allclose(
        models.forward(p16, x, cfg), models.forward(p32, x, cfg), rtol=1e-6, atol=1e-6
    )


def _prune(params, keep_kv, keep_f, keep_layers, hd=8, group=2):
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = []
    for i in keep_layers:
        lp = dict(params["layers"][i])
        q_heads = [kv * group + g for kv in keep_kv for g in range(group)]
        qcols = np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in q_heads])
        kvcols = np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in keep_kv])
        lp["q"], lp["o"] = lp["q"][:, qcols], lp["o"][qcols]
        lp["k"], lp["v"] = lp["k"][:, kvcols], lp["v"][:, kvcols]
        lp["gate"], lp["up"] = lp["gate"][:, keep_f], lp["up"][:, keep_f]
        lp["down"] = lp["down"][keep_f]
        out["layers"].append(lp)
    return out


def test_pruned_tree_runs_and_config_reports_cut_sizes():
    params, cfg = make("llama", layers=3)
    cut = _prune(params, keep_kv=[1], keep_f=np.arange(0, 48, 2), keep_layers=[0, 2])
    s = models.sizes(cut, cfg)
    assert s.layers == (models.LayerSizes(2, 1, 24),) * 2
    logits, _ = models.forward(cut, tokens(), cfg, cache=models.init_cache(cfg, cut, 2, 10))
    assert logits.shape == (2, 10, 64)
    hf = cfg.to_hf(cut)
    assert (hf["num_attention_heads"], hf["num_key_value_heads"]) == (2, 1)
    assert (hf["intermediate_size"], hf["num_hidden_layers"]) == (24, 2)
    assert (hf["hidden_size"], hf["vocab_size"], hf["head_dim"]) == (32, 64, 8)
    again = models.Config.from_hf(hf)
    assert again == cfg


def test_to_hf_rejects_uneven_layers():
    params, cfg = make("llama")
    uneven = {**params, "layers": [params["layers"][0], _prune(params, [0], np.arange(8), [1])]}
    uneven["layers"][1] = uneven["layers"][1]["layers"][0]
    models.forward(uneven, tokens(), cfg)  # runs
    with pytest.raises(ValueError, match="different heads"):
        cfg.to_hf(uneven)


def _llama3_reference(hd, theta, factor, low, high, orig):
    # transformers' _compute_llama3_parameters, transcribed with float64 NumPy
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    wavelen = 2 * math.pi / inv
    low_w, high_w = orig / low, orig / high
    out = []
    for f, w in zip(inv, wavelen, strict=True):
        if w < high_w:
            out.append(f)
        elif w > low_w:
            out.append(f / factor)
        else:
            s = (orig / w - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out)


@pytest.mark.parametrize(
    "hd,theta,factor,low,high,orig",
    [
        (64, 500000.0, 8.0, 1.0, 4.0, 8192),
        (8, 10000.0, 4.0, 1.0, 4.0, 64),
        (128, 5e5, 32, 1, 4, 8192),
    ],
)
def test_llama3_rope_scaling_matches_formula(hd, theta, factor, low, high, orig):
    from jaxslim.models._config import inv_freq

    cfg = models.Config(
        head_dim=hd, rope_theta=theta, rope_scaling=models.RopeScaling(factor, low, high, orig)
    )
    ref = _llama3_reference(hd, theta, factor, low, high, orig)
    got = inv_freq(cfg)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=2e-6)
    # all three regimes are exercised by the first case
    assert hd != 64 or (got < ref[0]).any()


def test_from_hf_rope_parameters_and_scaling():
    base = {"model_type": "llama", "head_dim": 8}
    rs = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    a = models.Config.from_hf({**base, "rope_theta": 5e5, "rope_scaling": rs})
    b = models.Config.from_hf({**base, "rope_parameters": {**rs, "rope_theta": 5e5}})
    assert a == b and a.rope_scaling.factor == 8.0 and a.rope_theta == 5e5
    c = models.Config.from_hf(
        {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    )
    assert c.rope_scaling is None and c.rope_theta == 1e4
    assert hash(a) != hash(c)


# ---------------------------------------------------------------------------------------------
# bad input


def test_tokens_out_of_vocab():
    params, cfg = make("llama")
    with pytest.raises(ValueError, match=r"models.forward: tokens must be in \[0, vocab=64\)"):
        models.forward(params, jnp.array([[1, 64]]), cfg)
    with pytest.raises(ValueError, match="tokens must be in"):
        models.forward(params, np.array([[-1, 2]]), cfg)
    with pytest.raises(ValueError, match=r"tokens must be \(B, T\)"):
        models.forward(params, jnp.array([1, 2]), cfg)
    with pytest.raises(TypeError, match="integer"):
        models.forward(params, jnp.ones((1, 2)), cfg)


def test_unsupported_model_type():
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3") as e:
        models.Config.from_hf({"model_type": "gpt2", "hidden_size": 8, "num_attention_heads": 2})
    assert "gpt2" in str(e.value)
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        models.Config.from_hf(
            {
                "model_type": "llama",
                "head_dim": 8,
                "rope_scaling": {"rope_type": "yarn", "factor": 2.0},
            }
        )
    with pytest.raises(ValueError, match="hidden_act"):
        models.Config.from_hf({"model_type": "llama", "head_dim": 8, "hidden_act": "gelu"})


def test_missing_leaf_names_path():
    params, cfg = make("llama")
    del params["layers"][1]["up"]
    with pytest.raises(
        ValueError, match=r"models.forward: the params tree has no leaf layers/1/'up'"
    ):
        models.forward(params, tokens(), cfg)
    params, cfg = make("qwen3")
    del params["layers"][0]["k_norm"]
    with pytest.raises(ValueError, match="layers/0/'k_norm'"):
        models.forward(params, tokens(), cfg)
    params, cfg = make("llama")
    del params["lm_head"]
    with pytest.raises(ValueError, match="'lm_head'"):
        models.forward(params, tokens(), cfg)


def test_bad_shapes_name_leaf():
    params, cfg = make("llama")
    params["layers"][0]["q"] = params["layers"][0]["q"][:, :12]  # not a multiple of head_dim
    with pytest.raises(ValueError, match=r"layers/0/q has shape \(32, 12\).*transpose HF"):
        models.forward(params, tokens(), cfg)
    params, cfg = make("llama")
    params["layers"][0]["down"] = params["layers"][0]["down"].T  # HF layout by mistake
    with pytest.raises(
        ValueError, match=r"layers/0/down has shape \(32, 48\), expected \(48, 32\)"
    ):
        models.forward(params, tokens(), cfg)
    params, cfg = make("llama")
    lp = params["layers"][1]
    lp["k"] = jnp.concatenate([lp["k"], lp["k"][:, :8]], axis=1)  # 3 kv heads for 4 query heads
    lp["v"] = jnp.concatenate([lp["v"], lp["v"][:, :8]], axis=1)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        models.forward(params, tokens(), cfg)


def test_cache_too_small():
    params, cfg = make("llama")
    with pytest.raises(ValueError, match="do not fit a cache of 4 slots"):
        models.forward(params, tokens(), cfg, cache=models.init_cache(cfg, params, 2, 4))
