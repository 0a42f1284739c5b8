"""Bad input to the ``jaxslim`` command: exit code 2 and one line naming the file and the cause.

One row per case: ``pytest.param(setup, exit_code, match, id=...)``; ``setup(tmp_path)`` writes the
input and returns ``(argv, file)``: the command line and the file the message must name (``None``
for usage errors).
"""

import json
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxslim import cli
from jaxslim.quant import QuantSpec, quantize
from jaxslim.quant import storage as S


def _qtree():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))
    return {"dense": {"w": quantize(x, QuantSpec(4, axis=-1))}, "b": jnp.ones(4)}


def _orbax(path: pathlib.Path, tree) -> pathlib.Path:
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, tree)
    return path


def _inspect(path):
    return ["inspect", str(path)], str(path)


def _missing(tmp):
    return _inspect(tmp / "nope.npz")


def _empty_dir(tmp):
    (tmp / "d").mkdir()
    return _inspect(tmp / "d")


def _manager_root(tmp):
    _orbax(tmp / "run" / "100", {"w": jnp.ones(2)})
    return _inspect(tmp / "run")


def _corrupt_metadata(tmp):
    p = _orbax(tmp / "ck", {"w": jnp.ones((4, 4))})
    (p / "_METADATA").write_text("{ not json")
    return _inspect(p)


def _corrupt_manifest(tmp):
    p = _orbax(tmp / "ck", {"w": jnp.ones((4, 4))})
    (p / "manifest.ocdbt").write_bytes(b"xx")
    return _inspect(p)


def _corrupt_data(tmp):
    p = _orbax(tmp / "ck", {"w": jnp.ones((64, 64))})
    for f in p.rglob("d/*"):
        f.write_bytes(b"\0" * 10)
    return _inspect(p)


def _pickle_npz(tmp):
    np.savez(tmp / "p.npz", w=np.ones(2), obj=np.array([{"a": 1}], dtype=object))
    return _inspect(tmp / "p.npz")


def _not_zip_npz(tmp):
    (tmp / "p.npz").write_text("hello")
    return _inspect(tmp / "p.npz")


def _npy_as_npz(tmp):
    with open(tmp / "p.npz", "wb") as f:
        np.save(f, np.ones(3))
    return _inspect(tmp / "p.npz")


def _fp8_plain_npz(tmp):
    np.savez(tmp / "p.npz", w=np.ones(3, ml_dtypes.bfloat16), f=np.ones(2, ml_dtypes.float8_e4m3fn))
    return _inspect(tmp / "p.npz")


def _wrong_suffix(tmp):
    (tmp / "params.msgpack").write_bytes(b"\x80")
    return _inspect(tmp / "params.msgpack")


def _tampered(stored):
    meta = json.loads(np.asarray(stored["dense"]["w"][S.MARKER]).tobytes())
    meta["shape"] = [8, 6]
    stored["dense"]["w"][S.MARKER] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return stored


def _tampered_orbax(tmp):
    return _inspect(_orbax(tmp / "ck", _tampered(S.to_checkpoint(_qtree()))))


def _tampered_npz(tmp):
    stored = _tampered(S.to_checkpoint(_qtree()))
    flat = {"dense/w/" + k: np.asarray(v) for k, v in stored["dense"]["w"].items()}
    # A save_npz file whose QArray was edited afterwards: rewrite it entry by entry.
    S.save_npz(tmp / "p.npz", _qtree())
    with np.load(tmp / "p.npz", allow_pickle=False) as f:
        entries = {k: f[k] for k in f.files}
    entries.update(flat)
    np.savez(tmp / "p.npz", **entries)
    return _inspect(tmp / "p.npz")


def _tampered_manifest(tmp):
    S.save_npz(tmp / "p.npz", _qtree())
    with np.load(tmp / "p.npz", allow_pickle=False) as f:
        entries = {k: f[k] for k in f.files}
    entries["__jaxslim__"] = np.frombuffer(b"{", np.uint8)
    np.savez(tmp / "p.npz", **entries)
    return _inspect(tmp / "p.npz")


def _compress(recipe_text, *, out="out", tree=None, recipe_name="r.toml"):
    """``compress in.npz --recipe r.toml -o out``; the message names the recipe file."""

    def setup(tmp):
        S.save_npz(tmp / "in.npz", tree if tree is not None else {"dense": {"w": jnp.ones((4, 4))}})
        if recipe_text is not None:
            (tmp / recipe_name).write_text(recipe_text)
        argv = ["compress", str(tmp / "in.npz"), "--recipe", str(tmp / recipe_name)]
        return [*argv, "-o", str(tmp / out)], str(tmp / recipe_name)

    return setup


def _compress_existing_out(tmp):
    argv, _ = _compress("[[prune]]\nsparsity = 0.5\n")(tmp)
    (tmp / "out").mkdir()
    return argv, str(tmp / "out")


def _compress_quantized_input(tmp):
    argv, _ = _compress("[[prune]]\nsparsity = 0.5\n", tree=_qtree())(tmp)
    return argv, str(tmp / "in.npz")


ROWS = [
    pytest.param(_missing, 2, "no such file or directory", id="missing-file"),
    pytest.param(
        _empty_dir, 2, r"not an Orbax checkpoint directory \(no _METADATA", id="empty-dir"
    ),
    pytest.param(_manager_root, 2, "holds checkpoints: 100; pass one of them", id="manager-root"),
    pytest.param(
        _corrupt_metadata, 2, "corrupted or unreadable Orbax checkpoint: JSONDecodeError", id="meta"
    ),
    pytest.param(
        _corrupt_manifest, 2, "corrupted or unreadable Orbax checkpoint: .*DATA_LOSS", id="manifest"
    ),
    pytest.param(_corrupt_data, 2, "corrupted or unreadable Orbax checkpoint: ", id="data"),
    pytest.param(_pickle_npz, 2, "pickled Python objects; jaxslim never unpickles", id="pickle"),
    pytest.param(_not_zip_npz, 2, r"not a \.npz file \(no zip header", id="not-a-zip"),
    pytest.param(_npy_as_npz, 2, r"single \.npy array", id="npy-as-npz"),
    pytest.param(_fp8_plain_npz, 2, r"entry 'f' has the untyped dtype '\|V1'", id="fp8-npz"),
    pytest.param(_wrong_suffix, 2, r"expected an Orbax .* got a \.msgpack file", id="suffix"),
    pytest.param(
        _tampered_orbax,
        2,
        r"from_checkpoint: stored QArray 'dense/w': values is uint8\[8, 2\], expected",
        id="tampered-orbax",
    ),
    pytest.param(
        _tampered_npz, 2, r"stored QArray 'dense/w': values is uint8\[8, 2\]", id="tampered-npz"
    ),
    pytest.param(_tampered_manifest, 2, "the manifest is not JSON", id="tampered-manifest"),
    pytest.param(
        lambda tmp: (["squash", "x"], None), 2, "invalid choice: 'squash'", id="subcommand"
    ),
    pytest.param(lambda tmp: ([], None), 2, "arguments are required", id="no-subcommand"),
    pytest.param(
        lambda tmp: (["compress", "x.npz", "-o", "y"], None),
        2,
        "compress needs --recipe",
        id="compress-no-recipe",
    ),
    pytest.param(_compress(None), 2, "no such file", id="compress-recipe-missing"),
    pytest.param(_compress("[[prune"), 2, "recipe: not valid TOML", id="compress-toml"),
    pytest.param(_compress(""), 2, "recipe: is empty", id="compress-empty"),
    pytest.param(_compress("sparsity = 1"), 2, "sparsity: unknown key", id="compress-top-key"),
    pytest.param(
        _compress("[[prune]]\nsparsity = 2"),
        2,
        r"prune\[0\]\.sparsity: must be in \[0, 1\], got 2$",
        id="compress-sparsity",
    ),
    pytest.param(
        _compress("[[prune]]\nsparsity = 0.5\nwhere = 'conv'"),
        2,
        r"prune\[0\]\.where: 'conv' selects no leaf; float leaves: \['dense/w'\]",
        id="compress-where-matches-nothing",
    ),
    pytest.param(
        _compress("[[quant.rules]]\nspec = {bits = 6}"),
        2,
        r"quant\.rules\[0\]\.spec\.bits: bits must be one of .* got 6",
        id="compress-bits",
    ),
    pytest.param(
        _compress("[[quant.rules]]\nspec = {bits = 4, axis = 3}"),
        2,
        r"quant\.rules\[0\]\.spec: .*'dense/w'",
        id="compress-spec-does-not-fit",
    ),
    pytest.param(
        _compress_existing_out, 2, "already exists; pass --force", id="compress-out-exists"
    ),
    pytest.param(
        _compress_quantized_input, 2, "holds 1 quantized leaves", id="compress-quantized-input"
    ),
    pytest.param(lambda tmp: (["inspect"], None), 2, "required: path", id="inspect-no-path"),
    pytest.param(
        lambda tmp: (["demo", "--steps", "x"], None), 2, "invalid int value: 'x'", id="steps-type"
    ),
    pytest.param(
        lambda tmp: (["demo", "--steps", "0"], None), 2, "--steps must be a positive", id="steps-0"
    ),
    pytest.param(
        lambda tmp: (["demo", "--lm", "--sweep"], None),
        2,
        "argument --sweep: not allowed with argument --lm",
        id="demo-lm-and-sweep",
    ),
    pytest.param(
        lambda tmp: (["demo", "--sweep", "--oneshot"], None),
        2,
        "--oneshot prunes a trained model: pass it with --lm or alone",
        id="demo-sweep-oneshot",
    ),
    pytest.param(
        lambda tmp: (["demo", "--sweep", "--steps", "-3"], None),
        2,
        "--steps must be a positive int, got -3",
        id="demo-sweep-steps",
    ),
]


@pytest.mark.parametrize("setup, code, match", ROWS)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, setup, code, match):
    argv, file = setup(tmp_path)
    capsys.readouterr()
    assert cli.main(argv) == code
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    prefix = "jaxslim: error: " + (f"{file}: " if file is not None else "")
    assert lines[0].startswith(prefix), lines[0]
    assert re.search(match, lines[0]), lines[0]


def test_console_command_prints_one_line_for_corrupted_orbax(tmp_path):
    """The installed entry point, end to end: no traceback, no late asyncio noise, exit 2."""
    (argv, file) = _corrupt_data(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "jaxslim.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith(f"jaxslim: error: {file}: corrupted or unreadable Orbax checkpoint")
