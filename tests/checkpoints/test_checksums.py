"""A CRC-32 per leaf: a byte flipped in a data file, a truncated file and a missing leaf are each
one ValueError naming the file and the leaf from Python, and exit code 2 with one line from the
``jaxslim`` command (inspect and compress)."""

import gc
import json
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import checkpoints, cli
from jaxslim.quant import QArray, QuantSpec, quantize

pytest.importorskip("orbax.checkpoint")

RNG = np.random.default_rng(0)
# Uniform random bits do not compress, so Orbax's zstd stores them verbatim: the test can find
# them in the data file and flip a byte inside the array's own bytes.
IDS = RNG.integers(-(2**31), 2**31 - 1, size=(128, 128), dtype=np.int64).astype(np.int32)
X = jnp.asarray(RNG.normal(size=(64, 32)).astype(np.float32))


def _tree():
    return {
        "ids": IDS,
        "dense": {"w": quantize(X, QuantSpec(4, axis=-1, group_size=32)), "b": jnp.ones(32)},
    }


def _flip_inside(directory, data: bytes) -> None:
    """Flips one bit of the stored copy of ``data`` in the checkpoint's data files."""
    needle = data[4096:4160]
    hits = []
    for f in sorted(directory.rglob("*")):
        if f.is_file() and (i := f.read_bytes().find(needle)) >= 0:
            hits.append((f, i))
    assert len(hits) == 1, hits  # exactly one data file holds the array's bytes
    f, i = hits[0]
    b = bytearray(f.read_bytes())
    b[i + 17] ^= 0x10
    f.write_bytes(bytes(b))


def _cli_error(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out)
    assert err.startswith("jaxslim: error: ") and err.count("\n") == 1, err
    return err


def _compress_argv(tmp_path, src):
    (tmp_path / "r.toml").write_text("[[prune]]\nsparsity = 0.5\n")
    return ["compress", str(src), "--recipe", str(tmp_path / "r.toml"), "-o", str(tmp_path / "o")]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["ck", "ck.npz"])
def test_save_load_round_trip_is_bit_identical(tmp_path, name):
    tree = _tree()
    checkpoints.save(tmp_path / name, tree)
    back = checkpoints.load(tmp_path / name)
    np.testing.assert_array_equal(np.asarray(back["ids"]), IDS)
    q, r = tree["dense"]["w"], back["dense"]["w"]
    assert isinstance(r, QArray) and (r.spec, r.shape) == (q.spec, q.shape)
    np.testing.assert_array_equal(np.asarray(r.values), np.asarray(q.values))
    np.testing.assert_array_equal(np.asarray(r.scale), np.asarray(q.scale))


def test_orbax_checksums_are_the_crc32_of_each_stored_leaf(tmp_path):
    """The record in Orbax's custom metadata: zlib.crc32 of each leaf's C-order bytes."""
    tree = _tree()
    checkpoints.save(tmp_path / "ck", tree)
    meta = json.loads((tmp_path / "ck" / "_CHECKPOINT_METADATA").read_text())
    leaves = meta["custom_metadata"]["jaxslim"]["leaves"]
    stored = checkpoints.to_checkpoint(tree)
    assert sorted(leaves) == sorted(
        ["ids", "dense/b", "dense/w/values", "dense/w/scale", "dense/w/__jaxslim_qarray__"]
    )
    assert leaves["ids"] == {"crc32": zlib.crc32(IDS.tobytes()), "shape": [128, 128],
                             "dtype": "int32"}  # fmt: skip
    codes = np.asarray(stored["dense"]["w"]["values"])
    assert leaves["dense/w/values"]["crc32"] == zlib.crc32(codes.tobytes())


# ------------------------------------------------------------------------------ flipped byte


def test_flipped_byte_in_orbax_data_raises_naming_the_leaf(tmp_path, capsys):
    ck = tmp_path / "ck"
    checkpoints.save(ck, _tree())
    _flip_inside(ck, IDS.tobytes())
    with pytest.raises(
        ValueError,
        match=r"^checkpoints.load_orbax: .*ck: leaf 'ids' does not match the crc32 checksum "
        r"written with it \(written 0x[0-9a-f]{8}, read 0x[0-9a-f]{8}\).*write it again$",
    ):
        checkpoints.load(ck)
    err = _cli_error(capsys, ["inspect", str(ck)])
    assert f"{ck}: leaf 'ids' does not match the crc32 checksum" in err
    err = _cli_error(capsys, _compress_argv(tmp_path, ck))
    assert f"{ck}: leaf 'ids' does not match the crc32 checksum" in err
    assert not (tmp_path / "o").exists()


def test_flipped_byte_in_npz_entry_raises_naming_the_leaf(tmp_path, capsys):
    """np.savez stores entries uncompressed: the flipped byte is in the QArray's codes."""
    f = tmp_path / "p.npz"
    tree = _tree()
    checkpoints.save(f, tree)
    codes = np.asarray(tree["dense"]["w"].values).tobytes()
    b = bytearray(f.read_bytes())
    i = b.find(codes[256:320])
    assert i >= 0 and b.find(codes[256:320], i + 1) < 0
    b[i + 5] ^= 0x01
    f.write_bytes(bytes(b))
    with pytest.raises(ValueError, match=r"load_npz: .*p.npz: leaf 'dense/w/values' is damaged"):
        checkpoints.load(f)
    err = _cli_error(capsys, ["inspect", str(f)])
    assert f"{f}: leaf 'dense/w/values' is damaged" in err
    err = _cli_error(capsys, _compress_argv(tmp_path, f))
    assert "leaf 'dense/w/values' is damaged" in err


def test_npz_entry_rewritten_with_other_bytes_fails_the_manifest_checksum(tmp_path):
    """An entry replaced by other bytes of the same shape (valid zip, valid codes): only the
    manifest's CRC-32 can tell."""
    f = tmp_path / "p.npz"
    checkpoints.save(f, _tree())
    with np.load(f, allow_pickle=False) as z:
        entries = {k: z[k] for k in z.files}
    entries["ids"] = entries["ids"].copy()
    entries["ids"][3, 4] += 1
    np.savez(f, **entries)
    with pytest.raises(ValueError, match=r"p.npz: leaf 'ids' does not match the crc32 checksum"):
        checkpoints.load(f)


# ------------------------------------------------------------------------ truncated, missing


# Orbax's reader leaves the coroutines of the other shards unawaited after one fails; they are
# collected here (gc.collect below) so that their "exception ignored" report stays in this test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_orbax_data_file_raises(tmp_path, capsys):
    ck = tmp_path / "ck"
    checkpoints.save(ck, _tree())
    data = max((p for p in ck.rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(
        ValueError, match=r"load_orbax: .*ck: corrupted or unreadable Orbax checkpoint: .*again$"
    ):
        checkpoints.load(ck)
    err = _cli_error(capsys, ["inspect", str(ck)])
    assert f"{ck}: corrupted or unreadable Orbax checkpoint" in err
    gc.collect()


def test_truncated_npz_raises(tmp_path, capsys):
    f = tmp_path / "p.npz"
    checkpoints.save(f, _tree())
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"load_npz: .*p.npz: not a readable .npz .*truncated"):
        checkpoints.load(f)
    assert "truncated or damaged" in _cli_error(capsys, ["inspect", str(f)])


def test_leaf_missing_from_orbax_checkpoint_raises_naming_it(tmp_path, capsys):
    ck = tmp_path / "ck"
    checkpoints.save(ck, _tree())
    meta = json.loads((ck / "_METADATA").read_text())
    del meta["tree_metadata"]["('dense', 'b')"]  # Orbax no longer knows the leaf
    (ck / "_METADATA").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"ck: leaf 'dense/b' is missing \(it was written with"):
        checkpoints.load(ck)
    assert "leaf 'dense/b' is missing" in _cli_error(capsys, ["inspect", str(ck)])


def test_leaf_missing_from_npz_raises_naming_it(tmp_path, capsys):
    f = tmp_path / "p.npz"
    checkpoints.save(f, _tree())
    with np.load(f, allow_pickle=False) as z:
        entries = {k: z[k] for k in z.files if k != "dense/b"}
    np.savez(f, **entries)
    with pytest.raises(ValueError, match=r"p.npz: leaf 'dense/b' is missing"):
        checkpoints.load(f)
    assert "leaf 'dense/b' is missing" in _cli_error(capsys, ["inspect", str(f)])


# ----------------------------------------------------------------- files without checksums


def test_files_written_before_checksums_load_unchecked(tmp_path):
    """A plain Orbax save of the stored form, and a .npz whose manifest has no crc32 fields."""
    import orbax.checkpoint as ocp

    tree = _tree()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((tmp_path / "ck").resolve(), checkpoints.to_checkpoint(tree))
    back = checkpoints.load(tmp_path / "ck")
    assert isinstance(back["dense"]["w"], QArray)
    f = tmp_path / "p.npz"
    checkpoints.save(f, tree)
    with np.load(f, allow_pickle=False) as z:
        entries = {k: z[k] for k in z.files}
    manifest = json.loads(entries["__jaxslim__"].tobytes())
    for e in manifest["entries"]:
        e.pop("crc32", None)
    entries["__jaxslim__"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    entries["ids"] = entries["ids"] + 1  # would fail a checksum; there is none to fail
    np.savez(f, **entries)
    np.testing.assert_array_equal(np.asarray(checkpoints.load(f)["ids"]), IDS + 1)


def test_save_refuses_an_existing_path(tmp_path):
    checkpoints.save(tmp_path / "p.npz", {"w": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"save: .*p.npz already exists; pass force=True"):
        checkpoints.save(tmp_path / "p.npz", {"w": jnp.ones(2)})
    checkpoints.save(tmp_path / "p.npz", {"w": jnp.zeros(2)}, force=True)
    assert float(checkpoints.load(tmp_path / "p.npz")["w"].sum()) == 0.0


@pytest.mark.parametrize("name", ["ck", "p.npz"])
def test_open_recognizes_parameter_trees_and_points_to_load(tmp_path, name):
    """checkpoints.open reads models one tensor at a time; a saved tree is read with load."""
    checkpoints.save(tmp_path / name, _tree())
    with pytest.raises(
        ValueError,
        match=rf"open: '.*{name}' is a parameter tree \(an Orbax checkpoint directory or a \.npz "
        r"file\), not a model checkpoint: read it whole with checkpoints.load\(path\)$",
    ):
        checkpoints.open(tmp_path / name)
