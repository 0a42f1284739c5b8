"""The stored form of QArrays: plain dicts of arrays that restore without a target.

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

    ckpt.save(path, checkpoints.to_checkpoint(qparams))
    qparams = checkpoints.from_checkpoint(ckpt.restore(path))   # no target needed

(Orbax stores dict keys as strings: an ``nnx.List`` index ``0`` comes back as ``"0"``.)
``checkpoints.save`` / ``checkpoints.load`` do this and also store and verify a checksum per leaf.

**QArrays saved with plain Orbax** (a ``TrainState`` holding QArrays given as is to
``ocp.StandardCheckpointer``) come back as ``{"values", "scale", "zero_point", "scale_scale"}``
dicts: the pytree children, bit-exact, and nothing of the static metadata. ``plain_qarray_bits``
reads what the layout still tells (the storage width, when the scale's shape pins the original
last axis) and ``restore_qarrays(tree, like=...)`` rebuilds the QArrays from a template.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import _tree
from jaxslim._checks import at_leaf
from jaxslim.quant import formats
from jaxslim.quant._packing import pack, packed_shape, unpack
from jaxslim.quant._qarray import QArray, is_qarray, quantize
from jaxslim.quant._spec import QuantSpec, layout

MARKER = "__jaxslim_qarray__"
"""Key of the metadata array in the stored dict of a QArray."""

_FORMAT, _VERSION = "jaxslim.QArray", 2
# Version 1 stored 3-bit codes one a nibble (the 4-bit layout); version 2 packs 8 in 3 bytes.
# Version 1 files are read and their 3-bit codes repacked.
_READS = (1, 2)
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
            f"checkpoints.to_checkpoint: the spec of {path!r} has a field JSON cannot "
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
        f"checkpoints.from_checkpoint: stored QArray {path!r}: {what}; the checkpoint was "
        "changed after saving or was not written by checkpoints.to_checkpoint"
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
    if meta.get("version") not in _READS:
        raise _bad(
            path,
            f"metadata version {meta.get('version')!r} is not one of {_READS}; "
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


def _check_array(path: str, name: str, x: Any, ref: Any, bad: Any = None) -> None:
    bad = bad or _bad
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise bad(path, f"{name} must be an array, got {type(x).__name__}")
    if tuple(x.shape) != tuple(ref.shape) or jnp.dtype(x.dtype) != jnp.dtype(ref.dtype):
        raise bad(
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
    if meta["version"] == 1:
        d = _nibbles_to_3bit(d, spec, shape)
    return _assemble(path, d, spec, shape, dtype, meta["values_dtype"], _bad)


def _nibbles_to_3bit(d: Mapping[str, Any], spec: QuantSpec, shape: tuple[int, ...]) -> Any:
    """``d`` with 3-bit codes stored one a nibble (version 1, and the layout a spec-less
    checkpoint of that time has) repacked 8 to 3 bytes; anything else unchanged."""
    v = d.get("values")
    if spec.storage_bits != 3 or v is None or not hasattr(v, "shape") or not shape:
        return d
    if tuple(v.shape) != packed_shape(shape, 4) or tuple(v.shape) == packed_shape(shape, 3):
        return d  # not the nibble layout, or indistinguishable from the 3-bit one
    signed = jnp.issubdtype(jnp.dtype(spec.code_dtype), jnp.signedinteger)
    codes = unpack(jnp.asarray(v, jnp.uint8), 4, shape, signed=bool(signed))
    return {**d, "values": pack(codes, 3)}


def _assemble(path, d, spec, shape, dtype, values_dtype, bad) -> QArray:
    """The QArray of the arrays in ``d`` under ``spec``, ``shape``, ``dtype``; ``bad(path, what)``
    makes the error for arrays that are not what ``quantize`` makes (or codes off the grid)."""
    for name in ("values", "scale"):
        if d.get(name) is None:
            raise bad(path, f"{name!r} is missing")
    values, scale, zp = d["values"], d["scale"], d.get("zero_point")
    # What quantize makes for this spec and shape is the reference for every array.
    x = jax.ShapeDtypeStruct(shape, dtype)

    def fn(x, z):
        with at_leaf(path):  # quantize's messages name this leaf
            return quantize(x, spec, zero_point=z)

    try:
        ref = jax.eval_shape(fn, x, None)
    except (TypeError, ValueError) as e:
        raise bad(path, f"spec {spec} does not fit shape {shape} ({e})") from None
    if zp is not None and ref.zero_point is None:  # an explicit zero point, if the spec takes one
        try:
            z = jax.ShapeDtypeStruct(layout(spec, shape).scale_shape, jnp.int32)
            ref = jax.eval_shape(fn, x, z)
        except (TypeError, ValueError) as e:
            raise bad(path, f"zero_point given but spec {spec} takes none ({e})") from None
    if values_dtype is not None and values_dtype != jnp.dtype(ref.values.dtype).name:
        raise bad(path, f"values_dtype {values_dtype!r} is not {ref.values.dtype}")
    values = jnp.asarray(values)
    if values.dtype == jnp.uint8 and jnp.dtype(ref.values.dtype) != jnp.uint8:
        if jnp.issubdtype(ref.values.dtype, jnp.integer):
            raise bad(path, f"values are uint8, expected {ref.values.dtype}")
        values = jax.lax.bitcast_convert_type(values, ref.values.dtype)
    _check_array(path, "values", values, ref.values, bad)
    _check_array(path, "scale", scale, ref.scale, bad)
    scale = jnp.asarray(scale)
    if ref.zero_point is None:
        if zp is not None:
            raise bad(path, f"zero_point given but spec {spec} takes none")
    else:
        _check_array(path, "zero_point", zp, ref.zero_point, bad)
        zp = jnp.asarray(zp)
    ss = d.get("scale_scale")
    if (ss is None) != (ref.scale_scale is None):
        what = "missing" if ss is None else "given but the format takes none"
        raise bad(path, f"scale_scale is {what}")
    if ss is not None:
        _check_array(path, "scale_scale", ss, ref.scale_scale, bad)
        ss = jnp.asarray(ss)
    q = QArray(values, scale, zp, spec, shape, dtype, scale_scale=ss)
    if _concrete(values, scale, zp):
        scale_ok, codes_ok, zp_ok = (bool(b) for b in _valid(q))
        if not scale_ok:
            raise bad(path, "scale has a zero, negative or non-finite entry")
        for name, ok in (("codes", codes_ok), ("zero_point", zp_ok)):
            if not ok:
                raise bad(path, f"{name} outside [{spec.qmin}, {spec.qmax}]")
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


# --- QArrays saved with plain Orbax ------------------------------------------------------------

_CHILDREN = ("values", "scale", "zero_point", "scale_scale")


def is_plain_qarray(x: Any) -> bool:
    """Whether ``x`` is what a QArray becomes in a store that drops pytree metadata.

    Plain Orbax (``ocp.StandardCheckpointer`` without a target) restores a QArray as the dict of
    its children ``{"values", "scale", "zero_point", "scale_scale"}`` (``None`` where it had
    none); other stores may drop the ``None`` keys. ``values`` holds one-byte codes (``int8``,
    ``uint8``, fp8), which no float leaf has.

    >>> import numpy as np
    >>> is_plain_qarray({"values": np.zeros((4, 2), np.uint8), "scale": np.ones((1, 4)),
    ...                  "zero_point": None, "scale_scale": None})
    True
    """
    if not isinstance(x, Mapping) or MARKER in x or not {"values", "scale"} <= set(x):
        return False
    if not set(x) <= set(_CHILDREN):
        return False
    v, s = x["values"], x["scale"]
    if not (hasattr(v, "dtype") and hasattr(v, "shape") and hasattr(s, "shape")):
        return False
    dt = np.dtype(v.dtype)
    return dt.itemsize == 1 and (dt.kind in "iu" or "float8" in dt.name)


def plain_qarray_bits(d: Mapping[str, Any]) -> tuple[int | None, tuple[int, ...] | None]:
    """``(storage bits, original shape)`` of a QArray restored without its spec, or ``None``s.

    What the layout of a spec-less QArray (``is_plain_qarray``) still tells:

    * ``int8`` or fp8 codes: 8 bits a code, one code per entry, shape = ``values.shape``;
    * ``uint8`` codes ``(..., m)``: 8 bits unpacked, or 4 / 3 / 2 bits packed along the last
      axis (``quant.packed_shape``: two 4-bit codes a byte, eight 3-bit codes in 3 bytes, four
      2-bit codes a byte). The width is known when the scale's last axis has the leaf's last
      size ``n > 1`` (per-channel scales along the last axis, ``axis=-1`` with or without
      groups along axis -2) and exactly one width packs ``n`` codes into ``m`` bytes (not so
      for some small ``n``: 5 codes take 3 bytes at 4 and at 3 bits). Otherwise (per-tensor
      scales, groups without ``axis``, an ambiguous ``n``) it is not: ``(None, None)``.

    The bits are the storage width. What is never recoverable: the
    format (int, nf4, fp8 flavour), signedness, symmetry, the group size (only bounded by the
    number of groups) and the original dtype; rebuild the QArrays with
    ``restore_qarrays(tree, like=...)``.

    >>> import numpy as np
    >>> plain_qarray_bits({"values": np.zeros((64, 16), np.uint8), "scale": np.ones((2, 1, 32))})
    (4, (64, 32))
    """
    v, s = d["values"], d["scale"]
    vshape, sshape = tuple(v.shape), tuple(s.shape)
    if np.dtype(v.dtype) != np.uint8:
        return 8, vshape
    if not vshape or len(sshape) not in (len(vshape), len(vshape) + 1) or sshape[-1] <= 1:
        return None, None
    n = sshape[-1]
    widths = [b for b in (8, 4, 3, 2) if packed_shape((n,), b)[-1] == vshape[-1]]
    if len(widths) == 1:
        return widths[0], vshape[:-1] + (n,)
    return None, None


def _restore_bad(path: str, what: str) -> ValueError:
    return ValueError(
        f"checkpoints.restore_qarrays: {path!r}: {what}; pass like= the tree the checkpoint was "
        "saved from (or its jax.eval_shape), so that every QArray of it lies at the same path"
    )


def restore_qarrays(tree: Any, like: Any) -> Any:
    """Rebuilds the QArrays of ``tree`` (restored without a target) from the template ``like``.

    Plain Orbax (``ocp.StandardCheckpointer().save(path, state)`` with QArrays in ``state``,
    restored without a target) keeps every code, scale and zero point bit-exact but drops a
    QArray's static metadata (``spec``, ``shape``, ``dtype``): each QArray comes back as the dict
    ``{"values", "scale", "zero_point", "scale_scale"}`` (see ``plain_qarray_bits`` for what that
    layout still tells). ``like`` supplies the metadata: any tree holding the QArrays at the
    same paths (path strings, so Orbax's string keys ``"0"`` match list indices), e.g. the
    quantized tree itself, ``jax.eval_shape`` of the code that made it, or a freshly quantized
    model of the same config. Leaves of ``like`` that are not QArrays are ignored; everything in
    ``tree`` but the spec-less dicts passes through untouched.

    (Restoring with Orbax *with* a target, ``ckpt.restore(path, jax.eval_shape(lambda: state))``,
    also rebuilds the QArrays: the target carries the metadata.)

    Args:
      tree: a tree restored without a target (nested dicts of arrays).
      like: a tree with a ``QArray`` (concrete or abstract) at the path of every spec-less dict.

    Returns:
      ``tree`` with every spec-less QArray dict replaced by its ``QArray``, values bit-identical.

    Raises:
      ValueError: naming the path, when ``tree`` has a spec-less dict where ``like`` has no
        QArray, ``like`` has a QArray ``tree`` lacks, or the arrays are not what ``quantize``
        makes for the template's spec and shape (the wrong template).

    >>> import jax, jax.numpy as jnp
    >>> from jaxslim.quant import QuantSpec, quantize
    >>> q = quantize(jnp.ones((64, 32)), QuantSpec(4, axis=-1, group_size=32))
    >>> plain = {"w": {"values": q.values, "scale": q.scale, "zero_point": None,
    ...                "scale_scale": None}}
    >>> back = restore_qarrays(plain, like={"w": jax.eval_shape(lambda: q)})["w"]
    >>> back.spec == q.spec, back.shape, bool((back.values == q.values).all())
    (True, (64, 32), True)
    """
    flat = jax.tree_util.tree_leaves_with_path(like, is_leaf=is_qarray)
    templates = {_tree.path_str(p): x for p, x in flat if is_qarray(x)}
    seen: set[str] = set()

    def visit(path, x):
        name = _tree.path_str(path)
        if is_qarray(x):
            seen.add(name)
        if not is_plain_qarray(x):
            return x
        t = templates.get(name)
        if t is None:
            near = sorted(templates)[:3]
            raise _restore_bad(name, f"like has no QArray there (its QArrays: {near} ...)")
        seen.add(name)
        d = _nibbles_to_3bit(dict(x), t.spec, tuple(t.shape))  # saved before 3-bit packing
        return _assemble(name, d, t.spec, tuple(t.shape), t.dtype, None, _restore_bad)

    out = jax.tree_util.tree_map_with_path(visit, tree, is_leaf=_plain_or_qarray)
    missing = sorted(set(templates) - seen)
    if missing:
        raise _restore_bad(missing[0], f"like has a QArray there but tree has none ({missing})")
    return out


def _plain_or_qarray(x: Any) -> bool:
    return is_qarray(x) or is_plain_qarray(x)
