"""splice on model code no one here wrote (issue 21): interleaved RoPE (Meta's Llama, GPT-J),
constants built inside the model (BERT's head_mask), Flax modules the size probe cannot widen
(Llama, Whisper), blocks that own shared parameters (T5), block influence on Hugging Face
models, and Gemma's ``(1 + w)`` RMSNorm. Tiny random configs; nothing is downloaded."""

from __future__ import annotations

import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import _tree, splice

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)


# --- a plain-JAX Llama with interleaved RoPE (Meta's original layout) -----------------------

D, H, HD, F, V = 32, 4, 8, 48, 64


def init_llama(key, layers=2):
    keys = iter(jax.random.split(key, 16 * layers + 4))

    def n(*shape):
        return 0.2 * jax.random.normal(next(keys), shape)

    blocks = [
        {
            "wq": n(D, H * HD),
            "wk": n(D, H * HD),
            "wv": n(D, H * HD),
            "wo": n(H * HD, D),
            "w1": n(D, F),
            "w3": n(D, F),
            "w2": n(F, D),
            "n1": 1 + n(D),
            "n2": 1 + n(D),
        }
        for _ in range(layers)
    ]
    return {"emb": n(V, D), "layers": blocks, "norm": 1 + n(D), "out": n(D, V)}


def rms(x, w):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w[None, None]


def rope_interleaved(x, pos):
    """Rotates pairs (2i, 2i + 1): ``x[..., ::2]``, ``x[..., 1::2]``, then stack + reshape."""
    hd = x.shape[-1]
    freqs = 1.0 / (10000.0 ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    ang = pos[:, None] * freqs[None, :]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., ::2], x[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).reshape(x.shape)


def llama(p, tokens):
    b, t = tokens.shape
    x = p["emb"][tokens]
    pos = jnp.arange(t, dtype=jnp.float32)
    for blk in p["layers"]:
        h = rms(x, blk["n1"])
        q, k, v = ((h @ blk[w]).reshape(b, t, -1, HD) for w in ("wq", "wk", "wv"))
        q, k = rope_interleaved(q, pos), rope_interleaved(k, pos)
        s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(HD).astype(np.float32)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, None], s, -1e9)
        a = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v).reshape(b, t, -1)
        x = x + a @ blk["wo"]
        h = rms(x, blk["n2"])
        x = x + (jax.nn.silu(h @ blk["w1"]) * (h @ blk["w3"])) @ blk["w2"]
    return rms(x, p["norm"]) @ p["out"]


def head_groups(groups, marker="wq"):
    return [g for g in groups if any(marker in p for p in g.paths) and g.size == H]


def test_interleaved_rope_heads_are_removable_and_head_dim_is_pinned():
    p = init_llama(jax.random.key(0))
    groups = splice.trace(llama, p, TOKENS)
    heads = [g for g in head_groups(groups) if any(m.factor == 0 for m in g.members)]
    assert len(heads) == 2 and all(g.removable for g in heads)
    for i, g in enumerate(heads):
        assert {pa.rsplit("/", 1)[-1] for pa in g.paths} == {"wq", "wk", "wv", "wo"}
        assert all(pa.startswith(f"layers/{i}/") for pa in g.paths)
    text = "\n".join(str(g) for g in groups)
    assert "no rule for primitive" not in text
    # head_dim stays within-head: pairs pinned with their reason, the pair index not a channel
    inner = [g for g in groups if ("layers/0/wq", 1) in list(g) and g not in heads]
    assert inner and not any(g.removable for g in inner)
    assert any("within-head" in r for g in inner for r in g.reasons)
    assert any("stride-2 slice" in r for g in inner for r in g.reasons)


def zero_head(p, layer, head):
    blk = dict(p["layers"][layer])
    cols = slice(head * HD, (head + 1) * HD)
    for w in ("wq", "wk", "wv"):
        blk[w] = blk[w].at[:, cols].set(0)
    blk["wo"] = blk["wo"].at[cols, :].set(0)
    layers = list(p["layers"])
    layers[layer] = blk
    return {**p, "layers": layers}


def test_interleaved_rope_head_removed_equals_head_zeroed_jitted():
    p = init_llama(jax.random.key(1))
    groups = splice.trace(llama, p, TOKENS)
    (g0,) = [g for g in head_groups(groups) if g.removable and "layers/0/wq" in g.paths]
    small = splice.apply_plan(p, splice.make_plan([g0], [[0, 2, 3]]))
    assert small["layers"][0]["wq"].shape == (D, 3 * HD)
    assert small["layers"][0]["wo"].shape == (3 * HD, D)
    assert small["layers"][1]["wq"].shape == (D, H * HD)
    ref = jax.jit(llama)(zero_head(p, 0, 1), TOKENS)
    out = jax.jit(llama)(small, TOKENS)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(llama(p, TOKENS) - ref))) > 1e-3  # the head was live


# --- Hugging Face Flax models ---------------------------------------------------------------

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    transformers = pytest.importorskip("transformers")


@pytest.fixture
def hf_numerics():
    """Transformers' Flax code relies on implicit rank and dtype promotion."""
    with (
        warnings.catch_warnings(),
        jax.numpy_rank_promotion("allow"),
        jax.numpy_dtype_promotion("standard"),
    ):
        warnings.simplefilter("ignore")
        yield


hf = pytest.mark.usefixtures("hf_numerics")
UNPROBED = "the size probe could not run"


@hf
def test_gptj_interleaved_rope_heads_found_and_probe_hazard_said():
    cfg = transformers.GPTJConfig(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, rotary_dim=8
    )
    model = transformers.FlaxGPTJForCausalLM(cfg, seed=0)
    groups = splice.trace(lambda p, x: model(x, params=p).logits, model.params, TOKENS)
    text = "\n".join(str(g) for g in groups)
    assert "no rule for primitive 'stack'" not in text and "sliced with stride" not in text
    for i in range(2):
        pre = f"transformer/h/{i}/attn/"
        q = pre + "q_proj/kernel"
        (heads,) = [
            g
            for g in groups
            if any(m.path == q and (m.axis, m.factor) == (1, 0) for m in g.members)
        ]
        assert heads.removable
        assert {pa.rsplit("/", 2)[-2] for pa in heads.paths} == {
            "q_proj",
            "k_proj",
            "v_proj",
            "out_proj",
        }
        # GPT-J derives head_dim = n_embd / n_head: the hazard says the probe could not check
        assert any(h.startswith(UNPROBED) and "q_proj/kernel" in h for h in heads.hazards)


@hf
def test_bert_head_mask_constant_does_not_couple_layers():
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    model = transformers.FlaxBertModel(cfg, seed=0)
    fn = lambda p, x: model(x, params=p).last_hidden_state  # noqa: E731
    groups = splice.trace(fn, model.params, TOKENS)
    heads = [g for g in groups if g.size == 4 and any("self/query/kernel" in p for p in g.paths)]
    assert len(heads) == 2
    for i, g in enumerate(heads):
        assert all(p.startswith(f"encoder/layer/{i}/attention/") for p in g.paths), g.paths
    (g0,) = [g for g in heads if g.paths[0].startswith("encoder/layer/0/")]
    small = splice.apply_plan(model.params, splice.make_plan([g0], [[0, 1, 2]]))
    layers = small["encoder"]["layer"]
    assert layers["0"]["attention"]["self"]["query"]["kernel"].shape == (32, 24)
    assert layers["1"]["attention"]["self"]["query"]["kernel"].shape == (32, 32)
    assert layers["1"]["attention"]["output"]["dense"]["kernel"].shape == (32, 32)


@hf
def test_probe_hazard_on_flax_models_names_the_config_fixed_leaf():
    cfg = transformers.WhisperConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=16,
    )
    model = transformers.FlaxWhisperModel(cfg, seed=0)
    feats = jnp.ones((2, 8, 32))
    fn = lambda p, x, f: model(f, decoder_input_ids=x, params=p).last_hidden_state  # noqa: E731
    groups = splice.trace(fn, model.params, TOKENS, feats)
    (conv1,) = [g for g in groups if ("encoder/conv1/kernel", 2) in list(g)]
    (hazard,) = [h for h in conv1.hazards if h.startswith(UNPROBED)]
    assert "'encoder/conv1/kernel' to (3, 8, 32)" in hazard and "d_model" in hazard
    # every removable group says so: none is silently offered
    assert all(any(h.startswith(UNPROBED) for h in g.hazards) for g in groups if g.removable)


def t5_model(layers):
    from transformers.models.t5 import modeling_flax_t5

    cfg = transformers.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
    )
    return transformers.FlaxT5Model(cfg, seed=0, _do_init=layers == 3), modeling_flax_t5


@pytest.fixture
def t5_clip(monkeypatch):
    """transformers 4.57's Flax T5 calls ``jnp.clip(x, a_max=...)``, which jax >= 0.10 removed;
    its module gets a ``jnp`` whose ``clip`` takes the old keywords."""
    from transformers.models.t5 import modeling_flax_t5

    shim = types.SimpleNamespace(**{k: getattr(jnp, k) for k in dir(jnp) if k[:2] != "__"})
    shim.clip = lambda a, a_min=None, a_max=None: jnp.clip(a, a_min, a_max)
    monkeypatch.setattr(modeling_flax_t5, "jnp", shim)


@hf
@pytest.mark.usefixtures("t5_clip")
def test_t5_drop_block_0_keeps_the_shared_relative_attention_bias():
    model, _ = t5_model(3)
    params = model.params
    for stack in ("encoder", "decoder"):
        with pytest.raises(ValueError, match=r"relative_attention_bias.*keep="):
            splice.drop_layer(params, f"{stack}/block/0", renumber=True)
    zeroed = params
    for stack, outs in (
        ("encoder", ("0/SelfAttention/o", "1/DenseReluDense/wo")),
        ("decoder", ("0/SelfAttention/o", "1/EncDecAttention/o", "2/DenseReluDense/wo")),
    ):
        for name in outs:
            path = f"{stack}/block/0/layer/{name}/kernel"
            leaf = _tree.get_path(zeroed, path)
            zeroed = _tree.set_path(zeroed, path, jnp.zeros_like(leaf))
    small = zeroed
    for stack in ("encoder", "decoder"):
        small = splice.drop_layer(
            small, f"{stack}/block/0", renumber=True, keep="relative_attention_bias"
        )
        assert sorted(small[stack]["block"]) == ["0", "1"]
        np.testing.assert_array_equal(
            small[stack]["block"]["0"]["layer"]["0"]["SelfAttention"]["relative_attention_bias"][
                "embedding"
            ],
            params[stack]["block"]["0"]["layer"]["0"]["SelfAttention"]["relative_attention_bias"][
                "embedding"
            ],
        )
    rebuilt, _ = t5_model(2)
    out = rebuilt(TOKENS, decoder_input_ids=TOKENS, params=small).last_hidden_state
    ref = model(TOKENS, decoder_input_ids=TOKENS, params=zeroed).last_hidden_state
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def gpt2_config(n_layer):
    return transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=n_layer, n_head=4, n_inner=48
    )


def gpt2_fn(p, tokens):
    """Builds GPT-2 for the blocks ``p`` holds, so it runs after a block is dropped."""
    n = len(p["transformer"]["h"])
    model = transformers.FlaxGPT2LMHeadModel(gpt2_config(n), _do_init=False)
    out = model(tokens, params=p, output_hidden_states=True)
    logp = jax.nn.log_softmax(out.logits[:, :-1])
    loss = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    return loss, out.hidden_states


@hf
def test_block_influence_on_hf_gpt2():
    params = transformers.FlaxGPT2LMHeadModel(gpt2_config(3), seed=0).params
    blocks = [f"transformer/h/{i}" for i in range(3)]
    with pytest.raises(ValueError, match=r"fn cannot run without block .*renumber=True"):
        fixed = transformers.FlaxGPT2LMHeadModel(gpt2_config(3), _do_init=False)
        splice.block_influence(
            lambda p, x: (
                jnp.mean(fixed(x, params=p).logits),
                fixed(x, params=p, output_hidden_states=True).hidden_states,
            ),
            params,
            [TOKENS],
            blocks,
        )
    inf = splice.block_influence(gpt2_fn, params, [TOKENS], blocks, renumber=True)
    assert inf.cosine.shape == inf.ablation.shape == (3,)
    assert np.all(np.isfinite(inf.cosine)) and np.all(np.isfinite(inf.ablation))
    base = float(gpt2_fn(params, TOKENS)[0])
    small = splice.drop_layer(params, "transformer/h/1", renumber=True)
    np.testing.assert_allclose(
        inf.ablation[1], float(gpt2_fn(small, TOKENS)[0]) - base, rtol=1e-5, atol=1e-6
    )


def gemma_config(hidden=32):
    return transformers.GemmaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )


@hf
def test_gemma_residual_cut_hazard_and_its_correction():
    """Residual channels that are zero everywhere are removed and Gemma rebuilt with a smaller
    hidden_size. The old advice (scale the norm weight w by sqrt(d_old / d_new)) leaves it off;
    the hazard's correction (scale 1 + w; undo the sqrt(hidden_size) embedding factor, which the
    tied lm_head then carries into the logits) gives the same logits."""
    model = transformers.FlaxGemmaForCausalLM(gemma_config(), seed=0)
    fn = lambda p, x: model(x, params=p).logits  # noqa: E731
    groups = splice.trace(fn, model.params, TOKENS)
    (res,) = [g for g in groups if ("model/embed_tokens/embedding", 1) in list(g)]
    text = " ".join(res.hazards)
    assert "1 + w" in text and "sqrt(hidden_size)" in text and "offset by a constant" in text
    assert "corrected by scaling its scale by sqrt(d_old / d_new)" not in text

    keep = np.arange(24)
    zeroed = model.params
    for m in res.members:
        leaf = _tree.get_path(zeroed, m.path)
        idx = [slice(None)] * leaf.ndim
        idx[m.axis] = slice(24, None)
        if "layernorm" in m.path or m.path.endswith("norm/weight"):
            continue  # a norm weight multiplies zeros: its value does not matter
        zeroed = _tree.set_path(zeroed, m.path, leaf.at[tuple(idx)].set(0))
    small = splice.apply_plan(zeroed, splice.make_plan([res], [keep]))
    rebuilt = transformers.FlaxGemmaForCausalLM(gemma_config(24), _do_init=False)
    ref = fn(zeroed, TOKENS)
    c = float(np.sqrt(32 / 24))

    def norms(p, f):
        leaves = [(path, x) for path, x in _tree.leaves_with_paths(p) if "norm" in path]
        for path, x in leaves:
            p = _tree.set_path(p, path, f(path, x))
        return p

    def err(p):
        out = rebuilt(TOKENS, params=p).logits
        return float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))

    naive = norms(small, lambda path, w: w * c)
    right = norms(small, lambda path, w: (1 + w) * c - 1 if path != "model/norm/weight" else w)
    emb = "model/embed_tokens/embedding"
    right = _tree.set_path(right, emb, _tree.get_path(right, emb) * c)
    assert err(small) > 1e-2 and err(naive) > 1e-2
    assert err(right) < 1e-4
