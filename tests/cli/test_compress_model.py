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
    ref, _ = quant.oneshot(fn, params, [ids[i : i + 1] for i in range(4)], rules, method="gptq")
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
