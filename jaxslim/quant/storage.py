"""Checkpoint form of quantized trees: QArrays that restore without a target, and ``.npz`` files.

A ``QArray`` keeps its ``spec``, ``shape`` and ``dtype`` as static pytree metadata, which array
stores (Orbax, ``.npz``, safetensors) drop: restored without a target, a QArray comes back as a
dict of arrays, and a packed int4 kernel looks like an 8-bit one. ``to_checkpoint`` replaces every
QArray by a plain dict of arrays that carries that metadata itself::

    {"__jaxslim_qarray__": uint8[n]  # UTF-8 JSON: format, version, spec fields, shape, dtype
     "values": codes,               # packed uint8 / int8 codes; fp8 codes bit-cast to uint8
     "scale": float32,              # quant.layout(spec, shape).scale_shape
     "zero_point": codes}           # only when the QArray has one

and ``from_checkpoint`` turns every such dict back into the identical ``QArray`` (values, scale,
zero point, spec, shape, dtype), after checking that the arrays are exactly what ``quantize`` makes
for that spec and shape: metadata or arrays changed after saving raise a ``ValueError`` naming the
leaf path, never a QArray that dequantizes to garbage. Other leaves pass through both untouched.

With Orbax::

    ckpt.save(path, storage.to_checkpoint(qparams))
    qparams = storage.from_checkpoint(ckpt.restore(path))   # no target needed

(Orbax stores dict keys as strings: an ``nnx.List`` index ``0`` comes back as ``"0"``.)

``save_npz`` / ``load_npz`` do the same for a ``.npz`` file and also keep what numpy alone loses:
the dtype of ``bfloat16`` / fp8 leaves (numpy writes them as untyped ``|V2`` / ``|V1``), integer
dict keys, lists, ``None`` leaves and typed PRNG keys. ``load_npz`` never unpickles and reads plain
``np.savez`` files too (``|V2`` entries load as ``bfloat16``, the only 2-byte ml_dtypes type).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import _tree
from jaxslim._checks import at_leaf
from jaxslim.quant import formats
from jaxslim.quant._qarray import QArray, is_qarray, quantize
from jaxslim.quant._spec import QuantSpec, layout

__all__ = ["to_checkpoint", "from_checkpoint", "save_npz", "load_npz"]

MARKER = "__jaxslim_qarray__"
"""Key of the metadata array in the stored dict of a QArray."""

_FORMAT, _VERSION = "jaxslim.QArray", 1
_NPZ_MANIFEST, _NPZ_FORMAT, _NPZ_VERSION = "__jaxslim__", "jaxslim.npz", 1
_FIELDS = frozenset({MARKER, "values", "scale", "zero_point", "scale_scale"})


def _json_bytes(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8).copy()


def _encode(path: str, q: QArray) -> dict[str, Any]:
    spec = {f.name: getattr(q.spec, f.name) for f in dataclasses.fields(q.spec)}
    spec = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "spec": spec,
        "shape": [int(d) for d in q.shape],
        "dtype": jnp.dtype(q.dtype).name,
        "values_dtype": jnp.dtype(q.values.dtype).name,
    }
    try:
        out = {MARKER: _json_bytes(meta)}
    except TypeError as e:
        raise TypeError(
            f"quant.storage.to_checkpoint: the spec of {path!r} has a field JSON cannot "
            f"store ({e}): {q.spec!r}"
        ) from None
    values = q.values
    if jnp.dtype(values.dtype).itemsize == 1 and not jnp.issubdtype(values.dtype, jnp.integer):
        values = jax.lax.bitcast_convert_type(values, jnp.uint8)  # fp8: any store keeps uint8
    out["values"] = values
    out["scale"] = q.scale
    if q.zero_point is not None:
        out["zero_point"] = q.zero_point
    if q.scale_scale is not None:  # double-quantized scales (nf4): the second-level scales
        out["scale_scale"] = q.scale_scale
    return out


def to_checkpoint(tree: Any) -> Any:
    """Replaces every ``QArray`` in ``tree`` by its stored form, a dict of arrays (see module doc).

    The result holds only arrays (and whatever non-QArray leaves ``tree`` had), so any array store
    saves it; ``from_checkpoint`` inverts it exactly.

    >>> import jax.numpy as jnp
    >>> from jaxslim.quant import QuantSpec, quantize
    >>> stored = to_checkpoint({"w": quantize(jnp.ones((4, 2)), QuantSpec(4, axis=-1))})
    >>> sorted(stored["w"]), stored["w"]["values"].shape  # two int4 codes a byte
    (['__jaxslim_qarray__', 'scale', 'values'], (4, 1))
    """
    return jax.tree_util.tree_map_with_path(
        lambda p, x: _encode(_tree.path_str(p), x) if is_qarray(x) else x, tree, is_leaf=is_qarray
    )


def _is_stored(x: Any) -> bool:
    return isinstance(x, Mapping) and MARKER in x


def _bad(path: str, what: str) -> ValueError:
    return ValueError(
        f"quant.storage.from_checkpoint: stored QArray {path!r}: {what}; the checkpoint was "
        "changed after saving or was not written by quant.storage.to_checkpoint"
    )


def _meta(path: str, raw: Any) -> dict[str, Any]:
    arr = np.asarray(raw)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise _bad(path, f"metadata must be a 1-D uint8 array, got {arr.dtype}{list(arr.shape)}")
    try:
        meta = json.loads(arr.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"metadata is not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise _bad(path, f"metadata has no format {_FORMAT!r}")
    if meta.get("version") != _VERSION:
        raise _bad(
            path,
            f"metadata version {meta.get('version')!r} is not {_VERSION}; "
            "upgrade jaxslim to read it",
        )
    missing = {"spec", "shape", "dtype", "values_dtype"} - set(meta)
    if missing:
        raise _bad(path, f"metadata lacks {sorted(missing)}")
    return meta


def _spec_shape_dtype(path: str, meta: dict[str, Any]) -> tuple[QuantSpec, tuple[int, ...], Any]:
    fields = meta["spec"]
    if not isinstance(fields, dict):
        raise _bad(path, f"spec must be a JSON object, got {fields!r}")
    try:
        spec = QuantSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (TypeError, ValueError) as e:
        raise _bad(path, f"spec {fields} is invalid ({e})") from None
    shape = meta["shape"]
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _bad(path, f"shape must be a list of non-negative ints, got {shape!r}")
    try:
        dtype = jnp.dtype(meta["dtype"])
    except TypeError:
        raise _bad(path, f"unknown dtype {meta['dtype']!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise _bad(path, f"dtype must be a floating dtype, got {meta['dtype']!r}")
    return spec, tuple(shape), dtype


def _check_array(path: str, name: str, x: Any, ref: Any) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise _bad(path, f"{name} must be an array, got {type(x).__name__}")
    if tuple(x.shape) != tuple(ref.shape) or jnp.dtype(x.dtype) != jnp.dtype(ref.dtype):
        raise _bad(
            path,
            f"{name} is {jnp.dtype(x.dtype).name}{list(x.shape)}, expected "
            f"{jnp.dtype(ref.dtype).name}{list(ref.shape)}",
        )


def _concrete(*xs: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _decode(path: str, d: Mapping[str, Any]) -> QArray:
    extra = set(d) - _FIELDS
    if extra:
        raise _bad(path, f"unexpected keys {sorted(map(str, extra))}")
    meta = _meta(path, d[MARKER])
    spec, shape, dtype = _spec_shape_dtype(path, meta)
    for name in ("values", "scale"):
        if d.get(name) is None:
            raise _bad(path, f"{name!r} is missing")
    values, scale, zp = d["values"], d["scale"], d.get("zero_point")
    # What quantize makes for this spec and shape is the reference for every array.
    x = jax.ShapeDtypeStruct(shape, dtype)
    with at_leaf(path):
        fn = lambda x, z: quantize(x, spec, zero_point=z)  # noqa: E731
    try:
        ref = jax.eval_shape(fn, x, None)
    except (TypeError, ValueError) as e:
        raise _bad(path, f"spec {spec} does not fit shape {shape} ({e})") from None
    if zp is not None and ref.zero_point is None:  # an explicit zero point, if the spec takes one
        try:
            z = jax.ShapeDtypeStruct(layout(spec, shape).scale_shape, jnp.int32)
            ref = jax.eval_shape(fn, x, z)
        except (TypeError, ValueError) as e:
            raise _bad(path, f"zero_point given but spec {spec} takes none ({e})") from None
    if meta["values_dtype"] != jnp.dtype(ref.values.dtype).name:
        raise _bad(path, f"values_dtype {meta['values_dtype']!r} is not {ref.values.dtype}")
    values = jnp.asarray(values)
    if values.dtype == jnp.uint8 and jnp.dtype(ref.values.dtype) != jnp.uint8:
        if jnp.issubdtype(ref.values.dtype, jnp.integer):
            raise _bad(path, f"values are uint8, expected {ref.values.dtype}")
        values = jax.lax.bitcast_convert_type(values, ref.values.dtype)
    _check_array(path, "values", values, ref.values)
    _check_array(path, "scale", scale, ref.scale)
    scale = jnp.asarray(scale)
    if ref.zero_point is None:
        if zp is not None:
            raise _bad(path, f"zero_point given but spec {spec} takes none")
    else:
        _check_array(path, "zero_point", zp, ref.zero_point)
        zp = jnp.asarray(zp)
    ss = d.get("scale_scale")
    if (ss is None) != (ref.scale_scale is None):
        what = "missing" if ss is None else "given but the format takes none"
        raise _bad(path, f"scale_scale is {what}")
    if ss is not None:
        _check_array(path, "scale_scale", ss, ref.scale_scale)
        ss = jnp.asarray(ss)
    q = QArray(values, scale, zp, spec, shape, dtype, scale_scale=ss)
    if _concrete(values, scale, zp):
        scale_ok, codes_ok, zp_ok = (bool(b) for b in _valid(q))
        if not scale_ok:
            raise _bad(path, "scale has a zero, negative or non-finite entry")
        for name, ok in (("codes", codes_ok), ("zero_point", zp_ok)):
            if not ok:
                raise _bad(path, f"{name} outside [{spec.qmin}, {spec.qmax}]")
    return q


@jax.jit
def _valid(q: QArray) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(scale > 0 and finite, codes and zero point in [qmin, qmax])`` in one program."""
    yes = jnp.array(True)
    scale = q.float_scale()
    scale_ok = jnp.all(jnp.isfinite(scale) & (scale > 0))
    if q.spec.format.decode is not formats.decode_int:
        return scale_ok, yes, yes
    lo, hi = q.spec.qmin, q.spec.qmax
    c = q.codes()
    zp = q.zero_point
    zp_ok = yes if zp is None else jnp.all((zp >= lo) & (zp <= hi))
    return scale_ok, jnp.all((c >= lo) & (c <= hi)), zp_ok


def from_checkpoint(tree: Any) -> Any:
    """Turns every stored QArray dict in ``tree`` (see ``to_checkpoint``) back into its ``QArray``.

    Raises ``ValueError`` naming the leaf path when the metadata or the arrays do not match what
    ``quantize`` makes for the stored spec and shape (shape, dtype, code range, a positive finite
    scale). Works on the tree an Orbax restore returns without a target (nested dicts of numpy or
    jax arrays) and on sharded arrays (no gather).

    >>> import jax.numpy as jnp
    >>> from jaxslim.quant import QuantSpec, quantize
    >>> q = quantize(jnp.arange(8.0).reshape(4, 2), QuantSpec(4, axis=-1))
    >>> back = from_checkpoint(to_checkpoint({"w": q}))["w"]
    >>> back.spec == q.spec, back.shape, bool((back.values == q.values).all())
    (True, (4, 2), True)
    """
    return jax.tree_util.tree_map_with_path(
        lambda p, x: _decode(_tree.path_str(p), x) if _is_stored(x) else x, tree, is_leaf=_is_stored
    )


# --- .npz -------------------------------------------------------------------------------------


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
    manifest entry ``__jaxslim__`` keeps the tree's keys, ``None`` leaves and the dtypes numpy
    cannot store (``bfloat16`` and fp8 are written as their bits). Containers come back as dicts
    (lists stay lists).

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
                f"quant.storage.save_npz: two leaves are both named {name!r}; rename one"
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
                f"quant.storage.save_npz: leaf {name!r} is a {type(leaf).__name__}, not an array "
                "or a number; drop it from the tree or convert it"
            )
        entry["dtype"] = arr.dtype.name
        if arr.dtype.kind == "V":  # bfloat16, fp8 and other ml_dtypes: store the bits
            arr = arr.view(np.dtype(f"uint{8 * arr.dtype.itemsize}"))
        arrays[name] = arr
    manifest = {"format": _NPZ_FORMAT, "version": _NPZ_VERSION, "entries": entries}
    np.savez(file, **{_NPZ_MANIFEST: _json_bytes(manifest)}, **arrays)


def _npz_error(file: Any, what: str) -> ValueError:
    return ValueError(f"quant.storage.load_npz: {os.fspath(file)}: {what}")


def _plain_dtype(file: Any, name: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind != "V":
        return arr
    if arr.dtype.itemsize == 2 and arr.dtype.names is None:
        return arr.view(jnp.bfloat16)
    raise _npz_error(
        file,
        f"entry {name!r} has the untyped dtype {arr.dtype.str!r} (how numpy writes float8 and "
        "int4 arrays); the format is lost: save it with jaxslim.quant.storage.save_npz instead",
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


def _from_manifest(file: Any, f: Any, raw: np.ndarray) -> Any:
    try:
        manifest = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _npz_error(file, f"the manifest is not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _NPZ_FORMAT:
        raise _npz_error(file, f"the manifest has no format {_NPZ_FORMAT!r}")
    if manifest.get("version") != _NPZ_VERSION:
        raise _npz_error(file, f"manifest version {manifest.get('version')!r} is not supported")
    root: dict = {}
    for e in manifest.get("entries", []):
        try:
            name, keys, kind = e["name"], e["path"], e["kind"]
            if kind == "none":
                value = None
            else:
                arr = f[name]
                dtype = jnp.dtype(e["dtype"])
                if arr.dtype != dtype:
                    if arr.dtype.itemsize != dtype.itemsize or arr.dtype.kind not in "uV":
                        raise _npz_error(
                            file, f"entry {name!r} is {arr.dtype}, the manifest says {dtype}"
                        )
                    arr = arr.view(dtype)
                value = jax.random.wrap_key_data(arr, impl=e["impl"]) if kind == "key" else arr
            if not keys:
                return value
            _insert(root, keys, value, file, name)
        except (KeyError, TypeError, IndexError) as err:
            raise _npz_error(file, f"manifest entry {e!r} is invalid ({err!r})") from None
    return _build(root)


def load_npz(file: str | os.PathLike) -> Any:
    """Reads a ``.npz`` file into a tree, QArrays restored (``from_checkpoint``); never unpickles.

    A file written by ``save_npz`` comes back with its structure, dtypes and QArrays. A plain
    ``np.savez`` file comes back as a flat dict ``{name: array}``, ``|V2`` entries as ``bfloat16``.
    Raises ``ValueError`` naming the file and the entry for anything else: not a zip, a pickled
    (object) entry, an untyped 1-byte dtype, a tampered manifest or QArray.
    """
    try:
        with open(file, "rb") as fh:
            head = fh.read(6)
        if head.startswith(b"\x93NUMPY"):
            raise _npz_error(file, "is a single .npy array, not an .npz archive")
        if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            raise _npz_error(file, f"not a .npz file (no zip header; starts with {head!r})")
        f = np.load(file, allow_pickle=False)
        with f:
            if _NPZ_MANIFEST in f.files:
                tree = _from_manifest(file, f, f[_NPZ_MANIFEST])
            else:
                tree = {n: _plain_dtype(file, n, f[n]) for n in f.files}
    except ValueError as e:
        if str(e).startswith("quant.storage.load_npz"):
            raise
        if "allow_pickle" in str(e):
            raise _npz_error(
                file, "holds pickled Python objects; jaxslim never unpickles: save arrays only"
            ) from None
        raise _npz_error(file, f"not a readable .npz ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise _npz_error(file, f"not a readable .npz ({type(e).__name__}: {e})") from None
    try:
        return from_checkpoint(tree)
    except ValueError as e:
        raise _npz_error(file, str(e).removeprefix("quant.storage.from_checkpoint: ")) from None
