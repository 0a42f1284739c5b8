"""The format registry: one frozen record per number format a ``QuantSpec`` can name.

A ``Format`` says everything the rest of ``jaxslim.quant`` needs to know about a format, so that
quantize, dequantize, fake-quant, packing, observers, GPTQ, the quantized dot and the size reports
read the record instead of branching on the format's name. With ``y = x * (1 / scale)`` (``x`` in
float32) and ``z`` the zero point:

* ``code range`` ``[qmin, qmax]``: the normalized values the grid spans (``(qmin - z) * scale``
  to ``(qmax - z) * scale`` is representable); for integer formats the code range itself, for a
  float format ``+-`` its largest finite value, for a codebook its smallest and largest entry;
  ``signed=False`` shifts it to ``[0, qmax - qmin]`` (integer formats only);
* ``encode(y, z, qmin, qmax) -> (codes, inside)``: the rounding: float32 codes (NaN kept where
  the format can store it) and the mask of entries inside the grid (the straight-through mask);
* ``decode(codes, z) -> y``: float32 normalized values (dequantization is ``decode(c, z) * scale``);
* ``storage_bits``: the packing width, 2 or 4 (packed into ``uint8`` by ``quant.pack``) or 8;
* ``code_dtype``: the dtype of unpacked codes for signed specs (``uint8`` for unsigned ones);
* ``scale_block``: double quantization of the scales: int8 scale codes in blocks of this many
  scales (in C order), each block with one float32 second-level scale (QLoRA's 256).

The registry ``FORMATS`` holds int2, int3, int4, int8, e4m3, e5m2 and nf4; a new format is one
``register(Format(...))`` call:

>>> import jax.numpy as jnp
>>> [f.name for f in FORMATS.values()]
['int2', 'int3', 'int4', 'int8', 'e4m3', 'e5m2', 'nf4']
>>> f = FORMATS["nf4"]
>>> f.code_range(True), f.storage_bits, len(f.codebook), f.scale_block
((-1.0, 1.0), 4, 16, 256)
>>> f.decode(f.encode(jnp.array([0.1, -0.7, 0.0]), 0, -1.0, 1.0)[0], 0).tolist()
[0.07958029955625534, -0.6961928009986877, 0.0]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Format",
    "FORMATS",
    "register",
    "lookup",
    "encode_int",
    "decode_int",
    "encode_float",
    "decode_float",
    "encode_codebook",
    "decode_codebook",
    "quantize_scale",
    "dequantize_scale",
    "NF4_CODEBOOK",
]


def encode_int(y: jax.Array, zero_point: Any, qmin: float, qmax: float):
    """Integer grid: ``clip(round_half_even(y) + z, qmin, qmax)``; NaN becomes ``z``."""
    r = jnp.round(y) + jnp.asarray(zero_point, y.dtype)
    inside = (r >= qmin) & (r <= qmax)
    q = jnp.clip(r, qmin, qmax)
    return jnp.where(jnp.isnan(q), jnp.asarray(zero_point, y.dtype), q), inside


def decode_int(codes: jax.Array, zero_point: Any) -> jax.Array:
    """``codes - z`` in float32 (exact: codes and zero points are small integers)."""
    c = jnp.asarray(codes)
    if jnp.issubdtype(c.dtype, jnp.integer):
        c = c.astype(jnp.int32) - jnp.asarray(zero_point).astype(jnp.int32)
        return c.astype(jnp.float32)
    return c.astype(jnp.float32) - jnp.asarray(zero_point).astype(jnp.float32)


def _float_encoder(dtype: Any) -> Callable:
    def encode(y, zero_point, qmin, qmax):
        del zero_point
        inside = jnp.abs(y) <= qmax
        q = jnp.clip(y, qmin, qmax).astype(dtype).astype(jnp.float32)  # round to nearest even
        return q, inside

    return encode


encode_float = _float_encoder
"""``encode_float(dtype)``: a float format's encoder: clip to ``+-max``, cast (RNE); NaN kept."""


def decode_float(codes: jax.Array, zero_point: Any) -> jax.Array:
    """The codes are the values: cast to float32."""
    del zero_point
    return jnp.asarray(codes).astype(jnp.float32)


def encode_codebook(codebook: tuple[float, ...]) -> Callable:
    """The encoder of a codebook format: the index of the nearest entry of the sorted
    ``codebook`` (a value exactly between two entries takes the lower one, as bitsandbytes);
    NaN takes the entry closest to 0."""
    table = np.asarray(codebook, np.float32)
    mids = (table[1:] + table[:-1]) / np.float32(2)
    zero = int(np.argmin(np.abs(table)))

    def encode(y, zero_point, qmin, qmax):
        del zero_point
        inside = (y >= qmin) & (y <= qmax)
        # The number of midpoints strictly below y: ties go to the lower entry.
        idx = jnp.searchsorted(jnp.asarray(mids), y.reshape(-1), side="left").reshape(y.shape)
        return jnp.where(jnp.isnan(y), zero, idx).astype(jnp.float32), inside

    return encode


def decode_codebook(codebook: tuple[float, ...]) -> Callable:
    """The decoder of a codebook format: ``codebook[codes]``."""
    table = np.asarray(codebook, np.float32)

    def decode(codes, zero_point):
        del zero_point
        idx = jnp.clip(jnp.asarray(codes).astype(jnp.int32), 0, len(table) - 1)
        return jnp.asarray(table)[idx]

    return decode


@dataclasses.dataclass(frozen=True)
class Format:
    """One number format (see the module docstring for what each field means).

    Args:
      name: the registry key and what size reports print (``"int4"``, ``"e4m3"``, ``"nf4"``).
      family: the ``QuantSpec(fmt=...)`` value that selects it; formats of one family differ by
        ``bits`` (``QuantSpec(4)`` is ``int4``); a spec without ``bits`` takes the largest.
      bits: bits of information of one code.
      storage_bits: bits one code takes in memory: 2, 4 (packed into ``uint8``) or 8.
      qmin, qmax: the code range of a signed spec.
      encode, decode: the rounding and the dequantization (see ``encode_int``, ``decode_int``).
      code_dtype: dtype of the unpacked codes of a signed spec.

    Keyword-only:
      unsigned: ``signed=False`` allowed (codes ``[0, qmax - qmin]``).
      affine: ``symmetric=False`` allowed (a stored zero point).
      codebook: the sorted normalized values of a codebook format.
      scale_block: double-quantize the scales in blocks of this many (int8 codes, one float32
        second-level scale per block); ``None``: float32 scales.
    """

    name: str
    family: str
    bits: int
    storage_bits: int
    qmin: float
    qmax: float
    encode: Callable[..., tuple[jax.Array, jax.Array]]
    decode: Callable[..., jax.Array]
    code_dtype: Any
    _: dataclasses.KW_ONLY
    unsigned: bool = False
    affine: bool = False
    codebook: tuple[float, ...] | None = None
    scale_block: int | None = None

    def __post_init__(self):
        if self.storage_bits not in (2, 4, 8) or not 1 <= self.bits <= self.storage_bits:
            raise ValueError(
                f"quant.formats.Format: {self.name!r} needs storage_bits in (2, 4, 8) and "
                f"1 <= bits <= storage_bits, got bits={self.bits}, storage_bits={self.storage_bits}"
            )
        if not self.qmin < self.qmax:
            raise ValueError(
                f"quant.formats.Format: {self.name!r} needs qmin < qmax, got {self.qmin}, "
                f"{self.qmax}"
            )
        if self.scale_block is not None and self.scale_block < 1:
            raise ValueError(
                f"quant.formats.Format: {self.name!r} scale_block must be a positive int or "
                f"None, got {self.scale_block!r}"
            )
        object.__setattr__(self, "code_dtype", jnp.dtype(self.code_dtype))

    def code_range(self, signed: bool = True) -> tuple[float, float]:
        """``(qmin, qmax)``; unsigned specs shift the range to start at 0."""
        if signed:
            return self.qmin, self.qmax
        return type(self.qmin)(0), self.qmax - self.qmin

    def codes_dtype(self, signed: bool = True) -> jnp.dtype:
        """dtype of the unpacked codes."""
        return self.code_dtype if signed else jnp.dtype(jnp.uint8)

    def storage_dtype(self, signed: bool = True) -> jnp.dtype:
        """dtype of ``QArray.values``: ``uint8`` when packed, else the code dtype."""
        return jnp.dtype(jnp.uint8) if self.storage_bits < 8 else self.codes_dtype(signed)


FORMATS: dict[str, Format] = {}
"""Every registered format by name, in registration order."""


def register(fmt: Format) -> Format:
    """Adds ``fmt`` to ``FORMATS``; raises if its name, or its ``(family, bits)``, is taken by a
    different record. Returns ``fmt``."""
    if not isinstance(fmt, Format):
        raise TypeError(f"quant.formats.register: expects a Format, got {fmt!r}")
    old = FORMATS.get(fmt.name)
    if old is not None and old != fmt:
        raise ValueError(f"quant.formats.register: a different format {fmt.name!r} exists")
    for other in FORMATS.values():
        if other.name != fmt.name and (other.family, other.bits) == (fmt.family, fmt.bits):
            raise ValueError(
                f"quant.formats.register: fmt={fmt.family!r} with bits={fmt.bits} is already "
                f"{other.name!r}"
            )
    FORMATS[fmt.name] = fmt
    return fmt


def lookup(family: str, bits: int | None = None) -> Format:
    """The record ``QuantSpec(bits, fmt=family)`` names (``bits=None``: the family's largest).

    Raises ``ValueError`` naming the registered families or bit widths when there is none.
    """
    members = [f for f in FORMATS.values() if f.family == family]
    if not members:
        families = sorted({f.family for f in FORMATS.values()})
        raise ValueError(f"QuantSpec: fmt must be one of {families}, got {family!r}")
    if bits is None:
        return max(members, key=lambda f: f.bits)
    for f in members:
        if f.bits == bits:
            return f
    widths = tuple(sorted(f.bits for f in members))
    if len(widths) == 1:
        raise ValueError(f"QuantSpec: fmt={family!r} needs bits={widths[0]}, got bits={bits!r}")
    raise ValueError(f"QuantSpec: bits must be one of {widths} for fmt={family!r}, got {bits!r}")


def _int(bits: int, storage_bits: int) -> Format:
    return Format(
        name=f"int{bits}",
        family="int",
        bits=bits,
        storage_bits=storage_bits,
        qmin=-(2 ** (bits - 1)),
        qmax=2 ** (bits - 1) - 1,
        encode=encode_int,
        decode=decode_int,
        code_dtype=jnp.int8,
        unsigned=True,
        affine=True,
    )


def _fp8(name: str, dtype: Any) -> Format:
    fmax = float(jnp.finfo(dtype).max)
    return Format(name, name, 8, 8, -fmax, fmax, _float_encoder(dtype), decode_float, dtype)


NF4_CODEBOOK: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
"""NormalFloat-4 (Dettmers et al., "QLoRA", 2023): quantiles of N(0, 1), 8 positive and 7
negative (the asymmetric construction that gives an exact 0), normalized to [-1, 1]; the values
bitsandbytes uses."""

for _f in (
    _int(2, 2),
    _int(3, 4),
    _int(4, 4),
    _int(8, 8),
    _fp8("e4m3", jnp.float8_e4m3fn),
    _fp8("e5m2", jnp.float8_e5m2),
    Format(
        name="nf4",
        family="nf4",
        bits=4,
        storage_bits=4,
        qmin=-1.0,
        qmax=1.0,
        encode=encode_codebook(NF4_CODEBOOK),
        decode=decode_codebook(NF4_CODEBOOK),
        code_dtype=jnp.uint8,
        codebook=NF4_CODEBOOK,
        scale_block=256,
    ),
):
    register(_f)


def quantize_scale(scale: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Double quantization: ``(codes, second)`` for positive float32 ``scale``.

    The scales, flattened in C order, are cut into blocks of ``block`` (the last one may be
    shorter); a block's second-level scale is ``max(block) / 127`` (float32, ``(ceil(n/block),)``)
    and its codes ``clip(round_half_even(s / second), 1, 127)`` (``int8``, ``scale``'s shape),
    never 0, so a dequantized scale is never 0.

    >>> c, s2 = quantize_scale(jnp.array([[1.0, 0.5], [0.25, 2.0]]), 256)
    >>> c.tolist(), (dequantize_scale(c, s2, 256) * 127 / 2).tolist()
    ([[64, 32], [16, 127]], [[64.0, 32.0], [16.0, 127.0]])
    """
    s = jnp.asarray(scale, jnp.float32)
    n = s.size
    nb = -(-n // block)
    flat = jnp.pad(s.reshape(-1), (0, nb * block - n)).reshape(nb, block)
    second = jnp.maximum(jnp.max(flat, axis=1) / jnp.float32(127), jnp.finfo(jnp.float32).tiny)
    codes = jnp.clip(jnp.round(flat * (jnp.float32(1) / second[:, None])), 1, 127)
    return codes.reshape(-1)[:n].astype(jnp.int8).reshape(s.shape), second


def dequantize_scale(codes: jax.Array, second: jax.Array, block: int) -> jax.Array:
    """Inverse of ``quantize_scale``: ``codes * second`` per block, float32, ``codes``' shape."""
    n = codes.size
    nb = second.shape[-1]
    c = jnp.pad(codes.reshape(-1).astype(jnp.float32), (0, nb * block - n)).reshape(nb, block)
    return (c * second[:, None]).reshape(-1)[:n].reshape(codes.shape)
