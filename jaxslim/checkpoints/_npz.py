""".npz files of parameter trees, QArrays included, with a CRC-32 per entry; never unpickled.

``save_npz`` writes one entry per leaf (named by its path, so plain ``np.load`` reads them too)
and a manifest entry ``__jaxslim__`` (UTF-8 JSON) that keeps what numpy alone loses: the dtype of
``bfloat16`` / fp8 leaves (numpy writes them as untyped ``|V2`` / ``|V1``), integer dict keys,
lists, ``None`` leaves, typed PRNG keys, and the CRC-32 of every entry's bytes. ``load_npz``
rebuilds the tree, restores QArrays (``from_checkpoint``) and verifies every CRC-32; it also reads
plain ``np.savez`` files (``|V2`` entries load as ``bfloat16``, the only 2-byte ml_dtypes type).
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import _tree
from jaxslim.checkpoints import _checksums
from jaxslim.checkpoints._qarrays import from_checkpoint, to_checkpoint

_NPZ_MANIFEST, _NPZ_FORMAT, _NPZ_VERSION = "__jaxslim__", "jaxslim.npz", 1


def _json_bytes(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8).copy()


def _path_keys(path: tuple[Any, ...]) -> list[list[Any]]:
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.SequenceKey):
            out.append(["seq", k.idx])
        elif isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, int | str):
            out.append(["key", k.key if isinstance(k.key, str) else int(k.key)])
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(["key", k.name])
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            out.append(["key", int(k.key)])
        else:
            out.append(["key", str(getattr(k, "key", k))])
    return out


def save_npz(file: str | os.PathLike, tree: Any) -> None:
    """Writes ``tree`` (QArrays included, via ``to_checkpoint``) to a ``.npz`` file, no pickles.

    Entries are named by leaf path (``"dense/kernel"``), so plain ``np.load`` reads them too; a
    manifest entry ``__jaxslim__`` keeps the tree's keys, ``None`` leaves, the dtypes numpy
    cannot store (``bfloat16`` and fp8 are written as their bits) and the CRC-32 of every entry's
    bytes, which ``load_npz`` verifies. Containers come back as dicts (lists stay lists).

    Raises ``TypeError`` naming the path for a leaf that is not an array or a number.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(to_checkpoint(tree), is_leaf=lambda x: x is None)
    arrays: dict[str, np.ndarray] = {}
    entries = []
    for path, leaf in flat:
        name = _tree.path_str(path) or "_"
        entry: dict[str, Any] = {"path": _path_keys(path), "name": name}
        if name in arrays or name == _NPZ_MANIFEST:
            raise ValueError(
                f"checkpoints.save_npz: two leaves are both named {name!r}; rename one"
            )
        entries.append(entry)
        if leaf is None:
            entry["kind"] = "none"
            continue
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            entry["kind"] = "key"
            entry["impl"] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        else:
            entry["kind"] = "array"
        arr = np.asarray(leaf)
        if arr.dtype == object:
            raise TypeError(
                f"checkpoints.save_npz: leaf {name!r} is a {type(leaf).__name__}, not an array "
                "or a number; drop it from the tree or convert it"
            )
        entry["dtype"] = arr.dtype.name
        if arr.dtype.kind == "V":  # bfloat16, fp8 and other ml_dtypes: store the bits
            arr = arr.view(np.dtype(f"uint{8 * arr.dtype.itemsize}"))
        entry["crc32"] = _checksums.crc32(arr)
        arrays[name] = arr
    manifest = {"format": _NPZ_FORMAT, "version": _NPZ_VERSION, "entries": entries}
    np.savez(file, **{_NPZ_MANIFEST: _json_bytes(manifest)}, **arrays)


def _npz_error(file: Any, what: str) -> ValueError:
    return ValueError(f"checkpoints.load_npz: {os.fspath(file)}: {what}")


def _plain_dtype(file: Any, name: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind != "V":
        return arr
    if arr.dtype.itemsize == 2 and arr.dtype.names is None:
        return arr.view(jnp.bfloat16)
    raise _npz_error(
        file,
        f"entry {name!r} has the untyped dtype {arr.dtype.str!r} (how numpy writes float8 and "
        "int4 arrays); the format is lost: save it with jaxslim.checkpoints.save_npz instead",
    )


def _insert(root: dict, keys: list[list[Any]], value: Any, file: Any, name: str) -> None:
    node = root
    for kind, k in keys[:-1]:
        node = node.setdefault((kind, k), {})
        if not isinstance(node, dict):
            raise _npz_error(file, f"entry {name!r} is inside a leaf")
    node[tuple(keys[-1])] = value


def _build(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    keys = list(node)
    if keys and all(kind == "seq" for kind, _ in keys):
        return [_build(node[k]) for k in sorted(keys, key=lambda kk: kk[1])]
    return {k: _build(v) for (_, k), v in node.items()}


_FIX = "restore the file from a good copy or write it again"


def _entry(file: Any, f: Any, name: str) -> np.ndarray:
    """Entry ``name`` of the open archive; a missing or damaged entry raises naming the leaf."""
    if name not in f.files:
        raise _npz_error(file, f"leaf {name!r} is missing (it was written with the file); {_FIX}")
    try:
        return f[name]
    except (zipfile.BadZipFile, EOFError, OSError) as e:  # zip's own CRC, a short entry
        raise _npz_error(
            file, f"leaf {name!r} is damaged ({type(e).__name__}: {e}); {_FIX}"
        ) from None


def _from_manifest(file: Any, f: Any, raw: np.ndarray) -> tuple[Any, str | None]:
    """``(tree, the first checksum mismatch or None)``: mismatches are reported after the
    QArrays are checked, so that a QArray edited in place is named as such."""
    try:
        manifest = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _npz_error(file, f"the manifest is not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _NPZ_FORMAT:
        raise _npz_error(file, f"the manifest has no format {_NPZ_FORMAT!r}")
    if manifest.get("version") != _NPZ_VERSION:
        raise _npz_error(file, f"manifest version {manifest.get('version')!r} is not supported")
    root: dict = {}
    mismatch = None
    for e in manifest.get("entries", []):
        try:
            name, keys, kind = e["name"], e["path"], e["kind"]
            if kind == "none":
                value = None
            else:
                arr = _entry(file, f, name)
                crc = e.get("crc32")  # absent in files written before checksums: no check
                if mismatch is None and crc is not None and _checksums.crc32(arr) != crc:
                    mismatch = (
                        f"leaf {name!r} does not match the crc32 checksum written with it "
                        f"(written {crc:#010x}, read {_checksums.crc32(arr):#010x}): its data "
                        f"changed after writing (a flipped bit, a damaged copy); {_FIX}"
                    )
                dtype = jnp.dtype(e["dtype"])
                if arr.dtype != dtype:
                    if arr.dtype.itemsize != dtype.itemsize or arr.dtype.kind not in "uV":
                        raise _npz_error(
                            file, f"entry {name!r} is {arr.dtype}, the manifest says {dtype}"
                        )
                    arr = arr.view(dtype)
                value = jax.random.wrap_key_data(arr, impl=e["impl"]) if kind == "key" else arr
            if not keys:
                return value, mismatch
            _insert(root, keys, value, file, name)
        except (KeyError, TypeError, IndexError) as err:
            raise _npz_error(file, f"manifest entry {e!r} is invalid ({err!r})") from None
    return _build(root), mismatch


def load_npz(file: str | os.PathLike) -> Any:
    """Reads a ``.npz`` file into a tree, QArrays restored (``from_checkpoint``); never unpickles.

    A file written by ``save_npz`` comes back with its structure, dtypes and QArrays. A plain
    ``np.savez`` file comes back as a flat dict ``{name: array}``, ``|V2`` entries as ``bfloat16``.
    Raises ``ValueError`` naming the file and the entry for anything else: not a zip, a pickled
    (object) entry, an untyped 1-byte dtype, a tampered manifest or QArray, a truncated file, a
    leaf missing from the archive, and a leaf whose bytes do not match the CRC-32 written with it
    (the zip's own CRC-32 or the manifest's). Files written before the manifest held checksums
    load without the manifest check.
    """
    mismatch = None
    try:
        with open(file, "rb") as fh:  # np.load(path) leaks its handle on a bad zip
            head = fh.read(6)
            if head.startswith(b"\x93NUMPY"):
                raise _npz_error(file, "is a single .npy array, not an .npz archive")
            if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
                raise _npz_error(file, f"not a .npz file (no zip header; starts with {head!r})")
            fh.seek(0)
            with np.load(fh, allow_pickle=False) as f:
                if _NPZ_MANIFEST in f.files:
                    tree, mismatch = _from_manifest(file, f, _entry(file, f, _NPZ_MANIFEST))
                else:
                    tree = {n: _plain_dtype(file, n, f[n]) for n in f.files}
    except ValueError as e:
        if str(e).startswith("checkpoints.load_npz"):
            raise
        if "allow_pickle" in str(e):
            raise _npz_error(
                file, "holds pickled Python objects; jaxslim never unpickles: save arrays only"
            ) from None
        raise _npz_error(file, f"not a readable .npz ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise _npz_error(
            file, f"not a readable .npz ({type(e).__name__}: {e}); truncated or damaged: {_FIX}"
        ) from None
    try:
        tree = from_checkpoint(tree)
    except ValueError as e:
        raise _npz_error(file, str(e).removeprefix("checkpoints.from_checkpoint: ")) from None
    if mismatch is not None:
        raise _npz_error(file, mismatch)
    return tree
