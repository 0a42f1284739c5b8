"""The jaxslim command: inspect reads checkpoints and .npz files and counts exactly."""

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxslim import cli


def _tree():
    kernel = jnp.zeros((4, 8)).at[0, :3].set(1.0)
    return {"dense": {"kernel": kernel, "bias": jnp.ones(8)}, "step": jnp.array(7, jnp.int32)}


def _check(text):
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert "dense/kernel" in lines and "| 3 |" in lines["dense/kernel"]  # nonzeros
    assert text.strip().splitlines()[-1].startswith("3 leaves, 41 entries, 12 nonzero")


def test_inspect_orbax_checkpoint(tmp_path, capsys):
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", _tree())
    assert cli.main(["inspect", str(tmp_path / "ckpt")]) == 0
    _check(capsys.readouterr().out)


def test_inspect_npz(tmp_path):
    t = _tree()
    flat = {
        "dense/kernel": t["dense"]["kernel"],
        "dense/bias": t["dense"]["bias"],
        "step": t["step"],
    }
    np.savez(tmp_path / "p.npz", **{k: np.asarray(v) for k, v in flat.items()})
    _check(cli.inspect(str(tmp_path / "p.npz")))


def test_inspect_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        cli.inspect(str(tmp_path / "missing"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="Orbax checkpoint directory or .npz"):
        cli.inspect(str(tmp_path / "x.txt"))
