"""`jaxslim eval` and `jaxslim generate` on a tiny Hugging Face directory written here."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors", reason="the models extra (pip install 'jaxslim[models]')")
pytest.importorskip("tokenizers", reason="the models extra (pip install 'jaxslim[models]')")

from jaxslim import cli, models  # noqa: E402

CHARS = "abcdefgh "


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as tm

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate(CHARS)}}
    tok = Tokenizer(tm.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok.to_str()


def _model_dir(tmp_path, tokenizer=True):
    from safetensors.numpy import save_file

    hf = {
        "model_type": "llama",
        "head_dim": 8,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    cfg = models.Config.from_hf(hf)
    params = models.init(
        jax.random.key(0), cfg, vocab=12, hidden=16, layers=2, heads=2, kv_heads=1, intermediate=24
    )
    params = jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 else x, params)  # a peaked model
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_hf(params)))
    save_file(models.to_hf_tensors(params, cfg), str(d / "model.safetensors"))
    if tokenizer:
        (d / "tokenizer.json").write_text(_tokenizer_json())
    return d, params, cfg


def test_eval_prints_the_perplexity_of_the_text(tmp_path, capsys):
    d, params, cfg = _model_dir(tmp_path)
    text = "abc hag fed " * 20
    (tmp_path / "t.txt").write_text(text)
    assert cli.main(["eval", str(d), "--text", str(tmp_path / "t.txt"), "--seq", "32"]) == 0
    out = capsys.readouterr().out
    # By hand: disjoint windows of 32 tokens, the first token of each unscored.
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(_tokenizer_json()).encode(text).ids
    nll, n = 0.0, 0
    for b in range(0, len(ids), 32):
        w = ids[b : b + 32]
        logp = jax.nn.log_softmax(models.forward(params, jnp.asarray([w]), cfg)[0], axis=-1)
        nll -= float(sum(logp[t, w[t + 1]] for t in range(len(w) - 1)))
        n += len(w) - 1
    assert f"perplexity {math.exp(nll / n):.3f}" in out
    bpb = nll / (math.log(2) * len(text.encode()))
    assert f"{bpb:.4f} bits/byte over {n:,} tokens" in out


def test_generate_prints_the_greedy_continuation(tmp_path, capsys):
    d, params, cfg = _model_dir(tmp_path)
    assert cli.main(["generate", str(d), "--prompt", "abc", "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    ids = [0, 3, 4, 5]  # <s> a b c
    new = []
    for _ in range(6):  # greedy by hand, no cache
        nxt = int(jnp.argmax(models.forward(params, jnp.asarray([ids]), cfg)[0, -1]))
        if nxt == 1:
            break
        ids.append(nxt)
        new.append(nxt)
    vocab = {2: "<unk>", **{3 + i: c for i, c in enumerate(CHARS)}}  # <s>, </s> are special
    assert out == "".join(vocab.get(i, "") for i in new)


BAD = [
    (["eval", "{d}", "--text", "{missing}"], r"missing\.txt: cannot read it as UTF-8 text"),
    (["eval", "{d}", "--text", "{empty}"], r"empty\.txt: the text has 1 token\(s\)"),
    (["eval", "{d}", "--text", "{t}", "--seq", "0"], r"--seq must be a positive int, got 0"),
    (["eval", "{d}", "--text", "{t}", "--seq", "8", "--stride", "9"], r"--stride \(9\)"),
    (["eval", "{nodir}", "--text", "{t}"], r"nodir: no such file or directory"),
    (["eval", "{notok}", "--text", "{t}"], r"model: the checkpoint has no tokenizer"),
    (["eval", "{d}"], r"the following arguments are required: --text"),
    (["generate", "{d}", "--prompt", "ab", "--max-tokens", "0"], r"--max-tokens must be"),
    (["generate", "{d}", "--prompt", "ab", "--top-p", "1.5"], r"--top-p in \(0, 1\]"),
    (["generate", "{broken}", "--prompt", "ab"], r"broken"),
    (["eval", "{unfinished}", "--text", "{t}"], r"unfinished: .*\(0 of 2 layers done\); run"),
]


@pytest.mark.parametrize("argv, match", BAD, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, match):
    import re

    d, _, _ = _model_dir(tmp_path)
    (tmp_path / "t.txt").write_text("abc " * 10)
    (tmp_path / "empty.txt").write_text("")
    notok = tmp_path / "notok"
    notok.mkdir()
    nd, _, _ = _model_dir(notok, tokenizer=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    unfinished = tmp_path / "unfinished"  # an interrupted `jaxslim compress` output
    unfinished.mkdir()
    (unfinished / "manifest.json").write_text('{"blocks": ["layers.0", "layers.1"], "done": []}')
    paths = {
        "d": d,
        "t": tmp_path / "t.txt",
        "missing": tmp_path / "missing.txt",
        "empty": tmp_path / "empty.txt",
        "nodir": tmp_path / "nodir",
        "notok": nd,
        "broken": broken,
        "unfinished": unfinished,
    }
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jaxslim: error: ")
    assert re.search(match, err), err


def test_eval_matches_models_perplexity(tmp_path, capsys):
    d, params, cfg = _model_dir(tmp_path)
    text = "hag bad cafe " * 30
    (tmp_path / "t.txt").write_text(text)
    argv = ["eval", str(d), "--text", str(tmp_path / "t.txt"), "--seq", "24", "--stride", "12"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    p, c, tok = models.load(str(d))
    r = models.perplexity(p, c, tok.encode(text), seq=24, stride=12, progress=False)
    assert f"perplexity {r.perplexity:.3f}" in out and np.isfinite(r.perplexity)


def test_eval_of_a_quantized_gguf_runs_on_the_file_codes(tmp_path, capsys):
    """Q8_0 / Q4_0 tensors load as QArrays equal to the ones exported (codes, f16 scales), gguf-py
    reads the same values, and ``jaxslim eval`` equals the in-memory perplexity of those QArrays."""
    gguf = pytest.importorskip("gguf")
    from jaxslim import checkpoints, quant

    cfg = models.Config(head_dim=16, tie_word_embeddings=False)
    params = models.init(
        jax.random.key(2), cfg, vocab=12, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96
    )
    q = dict(params, layers=[dict(lp) for lp in params["layers"]])
    for i, lp in enumerate(q["layers"]):
        for k in ("q", "k", "v", "o", "gate", "up", "down"):
            lp[k] = checkpoints.gguf_quantize(lp[k] * 8.0, "q4_0" if i == 0 else "q8_0")
    q["embed"] = checkpoints.gguf_quantize(params["embed"], "q8_0", embedding=True)
    q["lm_head"] = checkpoints.gguf_quantize(params["lm_head"], "q4_0")
    path = tmp_path / "m.gguf"
    report = checkpoints.export_gguf(path, q, cfg, tokenizer_json=_tokenizer_json())
    assert all(t.max_abs_error == 0.0 for t in report.values())
    loaded, c, tok = models.load(str(path), dequantize=False)
    dense, _, _ = models.load(str(path))
    flat = jax.tree_util.tree_leaves_with_path(q, is_leaf=quant.is_qarray)
    got = dict(jax.tree_util.tree_leaves_with_path(loaded, is_leaf=quant.is_qarray))
    got_dense = dict(jax.tree_util.tree_leaves_with_path(dense))
    n_q = 0
    for p, want in flat:
        if not quant.is_qarray(want):
            continue
        g = got[p]
        assert quant.is_qarray(g) and g.spec == want.spec and g.shape == want.shape, p
        np.testing.assert_array_equal(g.codes(), want.codes())
        np.testing.assert_array_equal(g.scale, want.scale)
        np.testing.assert_array_equal(got_dense[p], quant.dequantize(want))
        n_q += 1
    assert n_q == 16
    reader = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    t = reader["blk.0.ffn_down.weight"]  # (out, in) rows, as llama.cpp reads them
    np.testing.assert_array_equal(
        gguf.quants.dequantize(t.data, t.tensor_type), quant.dequantize(q["layers"][0]["down"]).T
    )
    text = "abchagfedbeadcafe" * 8  # no spaces: the GGUF tokenizer is byte-level
    (tmp_path / "t.txt").write_text(text)
    ids = tok.encode(text)
    want = models.perplexity(q, cfg, ids, seq=32, progress=False)
    plain = models.perplexity(quant.dequantize_params(q), cfg, ids, seq=32, progress=False)
    assert plain.perplexity == pytest.approx(want.perplexity, rel=1e-6)
    assert cli.main(["eval", str(path), "--text", str(tmp_path / "t.txt"), "--seq", "32"]) == 0
    assert f"perplexity {want.perplexity:.3f}" in capsys.readouterr().out
