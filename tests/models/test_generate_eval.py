"""jaxslim.models.generate and perplexity against step-by-step / by-hand references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import models
from jaxslim.models._eval import windows

CFG = models.Config(head_dim=8, eos_token_id=None)
PARAMS = models.init(
    jax.random.key(0),
    CFG,
    vocab=48,
    hidden=32,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate=40,
    scale=0.3,
)


def test_greedy_equals_argmax_of_forward_step_by_step():
    prompt = np.array([[3, 7, 1], [5, 5, 9]], np.int32)
    out = models.generate(PARAMS, CFG, prompt, max_tokens=6)
    assert out.shape == (2, 6) and out.dtype == np.int32
    seq = prompt
    fwd = jax.jit(models.forward, static_argnames="config")
    for i in range(6):
        logits = fwd(PARAMS, jnp.asarray(seq), config=CFG)
        nxt = np.asarray(jnp.argmax(logits[:, -1], axis=-1))
        np.testing.assert_array_equal(out[:, i], nxt)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)


def test_single_prompt_and_eos_stop():
    first = models.generate(PARAMS, CFG, [3, 7, 1], max_tokens=5)
    assert first.shape == (5,)
    cfg = models.Config(head_dim=8, eos_token_id=int(first[1]))
    out = models.generate(PARAMS, cfg, [3, 7, 1], max_tokens=5)
    np.testing.assert_array_equal(out, first[:2])  # stops after the eos
    cfg = models.Config(head_dim=8, eos_token_id=(99, int(first[0])))
    assert models.generate(PARAMS, cfg, [3, 7, 1], max_tokens=5).tolist() == [first[0]]


def test_top_p_sampling():
    key = jax.random.key(1)
    a = models.generate(PARAMS, CFG, [3, 7], max_tokens=8, temperature=1.0, key=key)
    b = models.generate(PARAMS, CFG, [3, 7], max_tokens=8, temperature=1.0, key=key)
    np.testing.assert_array_equal(a, b)  # same key, same tokens
    # a tiny nucleus keeps only the most likely token: greedy
    tiny = models.generate(PARAMS, CFG, [3, 7], max_tokens=8, temperature=0.7, top_p=1e-6, key=key)
    np.testing.assert_array_equal(tiny, models.generate(PARAMS, CFG, [3, 7], max_tokens=8))


def test_top_p_keeps_the_nucleus():
    from jaxslim.models._generate import _sample

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    sample = lambda k: _sample(logits, k, jnp.float32(1.0), jnp.float32(0.75), False)[0]
    draws = np.asarray(jax.jit(jax.vmap(sample))(keys))
    assert set(draws) == {0, 1}  # 0.5 < 0.75 <= 0.8: tokens 0 and 1 only
    assert 0.5 < np.mean(draws == 0) < 0.75  # renormalized 0.625


def test_generate_bad_input():
    with pytest.raises(ValueError, match="key=jax.random.key"):
        models.generate(PARAMS, CFG, [1], max_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        models.generate(PARAMS, CFG, [1], max_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match=r"prompt_ids must be in \[0, vocab=48\)"):
        models.generate(PARAMS, CFG, [1, 48], max_tokens=2)
    with pytest.raises(ValueError, match="P >= 1"):
        models.generate(PARAMS, CFG, [], max_tokens=2)


def _nll_by_hand(ids, wins):
    total, count = 0.0, 0
    for begin, end, first in wins:
        logp = jax.nn.log_softmax(models.forward(PARAMS, jnp.asarray(ids[None, begin:end]), CFG))
        for i in range(first, end):
            total -= float(logp[0, i - begin - 1, ids[i]])
            count += 1
    return total, count


@pytest.mark.parametrize("n,seq,stride,batch", [(50, 16, 16, 1), (50, 16, 6, 3), (10, 16, 16, 2)])
def test_perplexity_equals_exp_mean_nll_by_hand(n, seq, stride, batch):
    ids = np.asarray(jax.random.randint(jax.random.key(n), (n,), 0, 48))
    r = models.perplexity(PARAMS, CFG, ids, seq=seq, stride=stride, batch=batch, n_bytes=200)
    total, count = _nll_by_hand(ids, windows(n, seq, stride))
    assert r.tokens == count
    np.testing.assert_allclose(r.nll, total / count, rtol=1e-5)
    np.testing.assert_allclose(r.perplexity, math.exp(total / count), rtol=1e-5)
    np.testing.assert_allclose(r.bits_per_byte, total / math.log(2) / 200, rtol=1e-5)
    assert r.tokens_per_second > 0


def test_windows_follow_hf_guide():
    # HF guide: trg_len = end - prev_end, labels[:-trg_len] = -100, first label dropped by shift
    assert windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    scored = [i for _, end, first in windows(1000, 64, 16) for i in range(first, end)]
    assert scored == list(range(1, 1000))  # stride < seq: every token but the first, once


def test_perplexity_bad_input():
    with pytest.raises(ValueError, match="stride"):
        models.perplexity(PARAMS, CFG, [1, 2, 3], seq=4, stride=5, progress=False)
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, vocab=48\)"):
        models.perplexity(PARAMS, CFG, [1, 2, 300], progress=False)
    with pytest.raises(ValueError, match="N >= 2"):
        models.perplexity(PARAMS, CFG, [1], progress=False)
