"""`jaxslim compress MODEL --recipe R --calib TEXT -o OUT`: block-streamed, on a tiny HF model."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="the models extra (pip install 'jaxslim[models]')")
pytest.importorskip("tokenizers", reason="the models extra (pip install 'jaxslim[models]')")

from jaxslim import cli, models, quant  # noqa: E402

spec = importlib.util.spec_from_file_location(
    "eval_generate", __file__.replace("test_compress_model.py", "test_eval_generate.py")
)
_eg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(_eg)

TEXT = "abc hag fed bead cafe " * 40


def _setup(tmp_path):
    d, params, cfg = _eg._model_dir(tmp_path)
    (tmp_path / "calib.txt").write_text(TEXT)
    return d, params, cfg


def test_compress_model_with_a_ready_recipe_streams_and_exports(tmp_path, capsys):
    d, params, cfg = _setup(tmp_path)
    out = tmp_path / "out"
    argv = ["compress", str(d), "--recipe", "w4a16-gptq", "--calib", str(tmp_path / "calib.txt"),
            "--samples", "4", "--seq", "16", "-o", str(out), "--format", "hf"]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("2 layers (0 resumed) written to") and "## layers.0" in text
    assert "gptq" in text and "exported as hf" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["done"] == ["layers.0", "layers.1"]
    q, c, tok = models.load_streamed(out)
    assert isinstance(q["layers"][0]["q"], quant.QArray) and q["layers"][0]["q"].spec.bits == 4
    np.testing.assert_array_equal(q["embed"], params["embed"])  # the tied embedding stays float
    # Equal to the in-memory sequential GPTQ of the same kernels on the same tokens
    from jaxslim import recipe as R

    ids = np.asarray(tok.encode(TEXT)[: 4 * 16], np.int32).reshape(4, 16)
    fn = lambda p, x: models.forward(p, x, cfg)  # noqa: E731
    rules = [(r.where, r.spec) for r in R.named("w4a16-gptq").quant]
    rules = [("^layers/", s) for w, s in rules if s is not None][:1]
    method = R.named("w4a16-gptq").method  # GPTQ(act_order=True)
    ref, _ = quant.oneshot(fn, params, [ids[i : i + 1] for i in range(4)], rules, method=method)
    for leaf in ("q", "down"):
        np.testing.assert_allclose(
            quant.dequantize(q["layers"][1][leaf]),
            quant.dequantize(ref["layers"][1][leaf]),
            rtol=1e-5,
            atol=1e-6,
        )
    hf, hc, _ = models.load(str(out / "hf"))  # the HF export: dequantized, loads back
    np.testing.assert_allclose(hf["layers"][0]["q"], quant.dequantize(q["layers"][0]["q"]))
    assert hc == c
    # Run again: every layer is read back (resumed), nothing recomputed
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith("2 layers (2 resumed)")


W4 = ["--recipe", "w4a16-gptq", "--calib", "{calib}"]
BAD = [
    (["--recipe", "w4a16-gptq"], r"needs --calib TEXT"),
    (
        [*W4, "--samples", "4", "--seq", "16", "--format", "gguf"],
        r"/o: --format gguf: .*'layers/0/q' .* no GGUF type",
    ),
    ([*W4, "--samples", "64"], r"calib\.txt: has .* tokens; --samples 64"),
    (
        ["--recipe", "no-such-recipe", "--calib", "{calib}"],
        r"no-such-recipe: no such file \(ready recipes: w4a16-gptq",
    ),
    ([*W4, "--seq", "0"], r"--seq must be a positive int"),
    (["--recipe", "w4a16-gptq", "--calib", "{missing}"], r"missing\.txt: cannot read it"),
]


@pytest.mark.parametrize("extra, match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, match):
    d, _, _ = _setup(tmp_path)
    paths = {"calib": tmp_path / "calib.txt", "missing": tmp_path / "missing.txt"}
    extra = [a.format(**{k: str(v) for k, v in paths.items()}) for a in extra]
    assert cli.main(["compress", str(d), *extra, "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    errors = [ln for ln in err.splitlines() if ln.startswith("jaxslim:")]  # (after progress bars)
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1], err
    assert errors[0].startswith("jaxslim: error: ") and re.search(match, errors[0]), err


# ---------------------------------------------------------------------------------------------
# `jaxslim eval OUT` on what `jaxslim compress` wrote: quantized leaves stay QArrays

G32 = """\
[quant]
method = "gptq"
[[quant.rules]]
where = '^layers/'
spec = {bits = 4, axis = -1, group_size = 32}
"""


def _gguf_sized(tmp_path):
    """A tiny HF model whose kernels' input widths are multiples of 32 (GGUF blocks)."""
    import jax
    from safetensors.numpy import save_file

    hf = {"model_type": "llama", "head_dim": 16, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
          "bos_token_id": 0, "eos_token_id": 1}  # fmt: skip
    cfg = models.Config.from_hf(hf)
    params = models.init(
        jax.random.key(1), cfg, vocab=12, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96
    )
    params = jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x, params)
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_hf(params)))
    save_file(models.to_hf_tensors(params, cfg), str(d / "model.safetensors"))
    (d / "tokenizer.json").write_text(_eg._tokenizer_json())
    (tmp_path / "calib.txt").write_text(TEXT)
    (tmp_path / "g32.toml").write_text(G32)
    return d


def _f16_scales(q):
    """The streamed tree with each QArray's scales rounded to float16, as a GGUF file holds it."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    def f(x):
        if not isinstance(x, quant.QArray):
            return x
        s = x.scale.astype(jnp.float16).astype(jnp.float32)
        return dataclasses.replace(x, scale=s)

    return jax.tree.map(f, q, is_leaf=quant.is_qarray)


def _qarrays(tree):
    import jax

    leaves = jax.tree.leaves(tree, is_leaf=quant.is_qarray)
    return [x for x in leaves if isinstance(x, quant.QArray)]


def test_eval_of_every_output_format_equals_the_compressed_params(tmp_path, capsys):
    pytest.importorskip("gguf", reason="the models extra (pip install 'jaxslim[models]')")
    import jax

    d = _gguf_sized(tmp_path)
    out = tmp_path / "out"
    base = ["compress", str(d), "--recipe", str(tmp_path / "g32.toml"), "--calib",
            str(tmp_path / "calib.txt"), "--samples", "4", "--seq", "16"]  # fmt: skip
    for fmt in ("npz", "hf", "compressed-tensors", "gguf"):
        assert cli.main([*base, "-o", str(out), "--format", fmt]) == 0
    gguf_file = tmp_path / "m.gguf"  # -o FILE.gguf: the file, layers in FILE.gguf.layers
    assert cli.main([*base, "-o", str(gguf_file), "--format", "gguf"]) == 0
    text = capsys.readouterr().out
    assert f"written to {gguf_file}.layers" in text and f"exported as gguf in {gguf_file}" in text
    q, cfg, tok = models.load_streamed(out)
    assert len(_qarrays(q)) == 14  # 7 kernels x 2 layers, all int4 g32
    eval_text = "bad cafe hag " * 12
    (tmp_path / "e.txt").write_text(eval_text)
    ids = tok.encode(eval_text)
    ref = models.perplexity(q, cfg, ids, seq=32, progress=False).perplexity
    # The same tree dequantized: quant.quantized's products equal the float ones to rounding
    dense = models.perplexity(quant.dequantize_params(q), cfg, ids, seq=32, progress=False)
    assert dense.perplexity == pytest.approx(ref, rel=1e-6)

    gq, _, gtok = models.load(str(gguf_file), dequantize=False)
    cases = {  # path: (reference perplexity, tokenizer, number of QArray leaves loaded)
        out: (ref, tok, 14),
        out / "compressed-tensors": (ref, tok, 14),
        out / "hf": (ref, tok, 0),  # a plain HF checkpoint: dequantized floats
        out / "model.gguf": (None, gtok, 14),
        gguf_file: (None, gtok, 14),
    }
    for path, (want, t, n_q) in cases.items():
        p, c, _ = models.load(str(path), dequantize=False)
        assert c == cfg, path
        assert len(_qarrays(p)) == n_q, path
        pids = t.encode(eval_text)
        if want is None:  # GGUF: f16 scales; codes as GPTQ made them
            want = models.perplexity(_f16_scales(q), cfg, pids, seq=32, progress=False).perplexity
            for a, b in zip(_qarrays(p), _qarrays(q), strict=True):
                np.testing.assert_array_equal(a.codes(), b.codes())
                np.testing.assert_array_equal(a.scale, _f16_scales(b).scale)
        got = models.perplexity(p, c, pids, seq=32, progress=False).perplexity
        assert got == pytest.approx(want, rel=1e-6), path
        assert cli.main(["eval", str(path), "--text", str(tmp_path / "e.txt"), "--seq", "32"]) == 0
        assert f"perplexity {want:.3f}" in capsys.readouterr().out, path
    # dequantize=True (the default): float leaves, the same values
    for path in (out, out / "compressed-tensors", gguf_file):
        p, _, _ = models.load(str(path))
        assert not _qarrays(p)
        ql, _, _ = models.load(str(path), dequantize=False)
        for a, b in zip(
            jax.tree.leaves(p), jax.tree.leaves(quant.dequantize_params(ql)), strict=True
        ):
            np.testing.assert_array_equal(a, b)


CT_SPECS = [
    (quant.QuantSpec(4, axis=-1, group_size=32), None),
    (quant.QuantSpec(4, symmetric=False, axis=-1, group_size=32), None),
    (quant.QuantSpec(4, signed=False, symmetric=False, axis=-1, group_size=32), None),
    (quant.QuantSpec(3, axis=-1, group_size=32), None),
    (quant.QuantSpec(4, axis=-1), None),
    (quant.QuantSpec(8, axis=-1), "int8-dynamic-token"),
]


@pytest.mark.parametrize("spec, act", CT_SPECS, ids=[str(i) for i in range(len(CT_SPECS))])
def test_compressed_tensors_load_back_as_the_same_qarrays(tmp_path, spec, act):
    import jax

    from jaxslim import checkpoints

    cfg = models.Config(head_dim=16)
    p = models.init(
        jax.random.key(0), cfg, vocab=40, hidden=64, layers=1, heads=4, kv_heads=2, intermediate=96
    )
    q, _ = quant.quantize_params(p, [(r"^layers/\d+/(q|k|v|o|gate|up|down)$", spec)])
    checkpoints.export_compressed_tensors(tmp_path / "ct", q, cfg, activations=act)
    loaded, c, _ = models.load(str(tmp_path / "ct"), dequantize=False)
    dense, _, _ = models.load(str(tmp_path / "ct"))
    assert c == cfg
    for k in ("q", "k", "v", "o", "gate", "up", "down"):
        got, want = loaded["layers"][0][k], q["layers"][0][k]
        assert isinstance(got, quant.QArray) and got.spec.bits == spec.bits
        assert got.spec.group_size == spec.group_size and got.spec.symmetric == spec.symmetric
        np.testing.assert_array_equal(quant.dequantize(got), quant.dequantize(want))
        np.testing.assert_array_equal(dense["layers"][0][k], quant.dequantize(want))
    np.testing.assert_array_equal(loaded["embed"], p["embed"])
