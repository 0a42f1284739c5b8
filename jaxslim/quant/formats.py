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
* ``storage_bits``: the packing width, 2, 3 or 4 (packed into ``uint8`` by ``quant.pack``) or 8;
* ``code_dtype``: the dtype of unpacked codes for signed specs (``uint8`` for unsigned ones);
* ``scale_block``: double quantization of the scales: int8 scale codes in blocks of this many
  scales (in C order), each block with one float32 second-level scale (QLoRA's 256);
* ``scale_rule(amax) -> scale``: the float32 scale of a group from its absmax (``None``: the
  symmetric rule ``amax / ((qmax - qmin) / 2)`` floored at eps); the MX formats' power of two;
* ``scale_codec``: how scales are stored when not float32 (a ``ScaleCodec``: E8M0 bytes, E4M3
  with a float32 per-tensor scale; ``scales`` also gives nf4's int8 double quantization as one);
* ``block_size``: a block format's group size (``QuantSpec`` defaults ``group_size`` to it, and
  every axis but the group axis keeps its own scale unless ``axis`` says otherwise).

Block formats (OCP Microscaling v1.0, NVIDIA NVFP4): ``mxfp8`` (blocks of 32 E4M3 values sharing
an E8M0 power-of-two scale ``X = 2^(floor(log2 amax) - 8)``), ``mxfp4`` (blocks of 32 E2M1 values,
``X = 2^(floor(log2 amax) - 2)``), ``nvfp4`` (blocks of 16 E2M1 values, an E4M3 scale
``amax / 6`` per block stored relative to a float32 per-tensor scale). Elements are
``round_half_even(x * (1 / X))`` to the element type, saturated at its largest value (448, 6).
XLA flushes float32 subnormals to zero on CPU and GPU, so the E8M0 exponent written is at least
``-126`` (code 1): a block whose absmax is below ``2^(-126 + emax)`` (all zeros, or subnormals)
gets the scale ``2^-126``, where the OCP rule clamps at ``2^-127``; code 0 still decodes.

The registry ``FORMATS`` holds int2, int3, int4, int8, e4m3, e5m2, nf4, mxfp8, mxfp4 and nvfp4;
a new format is one ``register(Format(...))`` call:

>>> import jax.numpy as jnp
>>> [f.name for f in FORMATS.values()]
['int2', 'int3', 'int4', 'int8', 'e4m3', 'e5m2', 'nf4', 'mxfp8', 'mxfp4', 'nvfp4']
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
    "ScaleCodec",
    "round_minifloat",
    "encode_minifloat",
    "decode_minifloat",
    "pow2_scale_rule",
    "E8M0",
    "E2M1_VALUES",
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


def _floor_log2(a: jax.Array) -> jax.Array:
    """``floor(log2(a))`` (int32) of positive float32 ``a``, exact (read from the exponent)."""
    m, e = jnp.frexp(a)
    del m
    return e - 1


def round_minifloat(y: jax.Array, mbits: int, emin: int, fmax: float) -> jax.Array:
    """``y`` rounded half to even onto a small float format with ``mbits`` mantissa bits, smallest
    normal exponent ``emin`` (subnormals below it) and largest value ``fmax``, saturating at
    ``+-fmax`` (float32; NaN stays NaN). Exact: ``y`` is only scaled by powers of two.

    >>> round_minifloat(jnp.array([0.25, 0.75, 2.5, 5.0, 7.0, -1.75]), 1, 0, 6.0).tolist()
    [0.0, 1.0, 2.0, 4.0, 6.0, -2.0]
    """
    y = jnp.asarray(y, jnp.float32)
    a = jnp.clip(jnp.abs(y), 0.0, fmax)  # clip first: fmax is on the grid, rounding is monotone
    e = jnp.maximum(_floor_log2(jnp.where(a > 0, a, jnp.ones((), a.dtype))), emin)
    k = (mbits - e).astype(jnp.int32)  # a * 2^k is exact and at most 2^(mbits + 1) in magnitude
    up = _pow2(k)
    q = jnp.minimum(jnp.round(a * up) * _pow2(-k), fmax)
    return jnp.where(jnp.isnan(y), y, jnp.where(jnp.signbit(y), -q, q))


def _pow2(k: jax.Array) -> jax.Array:
    """``2.0 ** k`` as float32 for int ``k`` in ``[-126, 127]`` (built from its bits: exact)."""
    bits = (jnp.asarray(k, jnp.int32) + 127) << 23
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _minifloat_table(dtype: Any) -> np.ndarray:
    """The float32 values of all ``2^bits`` codes of a 4-bit ``ml_dtypes`` float, by code."""
    return np.arange(16, dtype=np.uint8).view(jnp.dtype(dtype)).astype(np.float32)


def encode_minifloat(dtype: Any, mbits: int, emin: int) -> Callable:
    """The encoder of a 4-bit float format (``float4_e2m1fn``): ``round_minifloat`` (half to
    even, saturating), then the code is the value's bit pattern (sign bit, then the magnitude's
    index among the non-negative values); NaN (no code) takes +0."""
    table = _minifloat_table(dtype)
    half = len(table) // 2
    fmax = float(table[half - 1])
    mags = jnp.asarray(table[:half])

    def encode(y, zero_point, qmin, qmax):
        del zero_point
        inside = jnp.abs(y) <= qmax
        q = round_minifloat(y, mbits, emin, fmax)
        a = jnp.abs(q)
        idx = jnp.searchsorted(mags, a.reshape(-1), side="left").reshape(a.shape)
        code = jnp.where(jnp.signbit(q), idx + half, idx)
        return jnp.where(jnp.isnan(y), 0, code).astype(jnp.float32), inside

    return encode


def decode_minifloat(dtype: Any) -> Callable:
    """The decoder of a 4-bit float format: the value of each code (``ml_dtypes``' table)."""
    table = _minifloat_table(dtype)

    def decode(codes, zero_point):
        del zero_point
        idx = jnp.clip(jnp.asarray(codes).astype(jnp.int32), 0, len(table) - 1)
        return jnp.asarray(table)[idx]

    return decode


E2M1_VALUES: tuple[float, ...] = tuple(float(v) for v in _minifloat_table(jnp.float4_e2m1fn))
"""The 16 values of FP4 E2M1 (``float4_e2m1fn``) by code: 0, 0.5, 1, 1.5, 2, 3, 4, 6, then the
same negated (code ``8 + i`` is ``-values[i]``, code 8 is -0)."""


@dataclasses.dataclass(frozen=True)
class ScaleCodec:
    """How a format stores its float32 scales (``QArray.scale``, ``QArray.scale_scale``).

    Args:
      name: what reports print (``"e8m0"``, ``"e4m3/f32"``, ``"int8/f32"``).
      dtype: dtype of the stored scales (``QArray.scale``).
      second: ``second(scale) -> scale_scale``, the float32 second-level scales from the float32
        scales (``None``: no second level).
      second_size: ``second_size(n_scales) -> int``, the length of ``scale_scale``.
      encode: ``encode(scale, second) -> stored``, ``scale``'s shape, ``dtype``.
      decode: ``decode(stored, second) -> scale`` (float32).

    ``decode(encode(decode(c, s2), s2), s2) == decode(c, s2)``: stored scales re-encode to
    themselves, so a kernel quantized on decoded scales (GPTQ) keeps them.
    """

    name: str
    dtype: Any
    second: Callable[[jax.Array], jax.Array] | None
    second_size: Callable[[int], int] | None
    encode: Callable[[jax.Array, Any], jax.Array]
    decode: Callable[[jax.Array, Any], jax.Array]

    def round(self, scale: jax.Array, second: Any = None) -> jax.Array:
        """``decode(encode(scale))``: the float32 scale actually stored."""
        if second is None and self.second is not None:
            second = self.second(scale)
        return self.decode(self.encode(scale, second), second)


def _e8m0_encode(scale, second):
    """E8M0 (``float8_e8m0fnu``) bytes of ``scale``: the exponent of the smallest power of two
    ``>= scale`` plus 127, clipped to ``[0, 254]`` (exact for powers of two; read from the bits,
    so the subnormal ``2^-127`` is code 0); NaN is 255, zero and negatives 0."""
    del second
    s = jnp.asarray(scale, jnp.float32)
    m, e = jnp.frexp(s)
    up = jnp.where(m == 0.5, e - 1, e)  # ceil(log2 s)
    code = jnp.where((m == 0) | jnp.signbit(s), 0, jnp.clip(up + 127, 0, 254))  # <= 0: code 0
    return jnp.where(jnp.isnan(s), 255, code).astype(jnp.uint8)


def _e8m0_decode(codes, second):
    """``2^(code - 127)`` in float32 from its bits (code 0: the subnormal ``2^-127``; 255: NaN)."""
    del second
    c = jnp.asarray(codes).astype(jnp.int32)
    bits = jnp.where(c == 0, 1 << 22, c << 23)
    bits = jnp.where(c == 255, 0x7FC00000, bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


E8M0 = ScaleCodec("e8m0", jnp.uint8, None, None, _e8m0_encode, _e8m0_decode)
"""Power-of-two scales in one byte, the bits of ``ml_dtypes.float8_e8m0fnu`` (stored as
``uint8``: ``np.asarray(q.scale).view(ml_dtypes.float8_e8m0fnu)`` reads them)."""


def pow2_scale_rule(emax_elem: int) -> Callable[[jax.Array], jax.Array]:
    """The OCP MX shared scale ``X = 2^(floor(log2(amax)) - emax_elem)``, float32, the exponent
    clipped to ``[-126, 127]`` (an all-zero block: ``2^-126``; see the module docstring)."""

    def rule(amax):
        a = jnp.asarray(amax, jnp.float32)
        e = jnp.where(a > 0, _floor_log2(jnp.where(a > 0, a, 1.0)), -1000)
        return _pow2(jnp.clip(e - emax_elem, -126, 127))

    return rule


_F8_MAX = 448.0
_TINY = float(jnp.finfo(jnp.float32).tiny)


def _tensor_second(scale):
    """NVFP4's per-tensor scale ``max(scale) / 448`` (float32, shape ``(1,)``), at least the
    smallest normal float32 (an all-zero tensor)."""
    s = jnp.asarray(scale, jnp.float32)
    top = jnp.max(jnp.where(jnp.isfinite(s), s, 0.0)) if s.size else jnp.zeros((), jnp.float32)
    return jnp.maximum(_div(top, _F8_MAX), _TINY).reshape(1)


def _div(a, c: float):
    """``a / c`` as IEEE division (XLA turns a division by a constant into a multiplication)."""
    zero = jnp.where(jnp.isfinite(a), a, jnp.zeros((), a.dtype)) * jnp.zeros((), a.dtype)
    return a / (jnp.asarray(c, a.dtype) + zero)


def _e4m3_encode(scale, second):
    s = jnp.asarray(scale, jnp.float32) / jnp.asarray(second, jnp.float32).reshape(())
    return jnp.clip(s, 0.0, _F8_MAX).astype(jnp.float8_e4m3fn)  # NaN stays NaN


def _e4m3_decode(codes, second):
    return jnp.asarray(codes).astype(jnp.float32) * jnp.asarray(second, jnp.float32).reshape(())


E4M3_TENSOR = ScaleCodec(
    "e4m3/f32", jnp.float8_e4m3fn, _tensor_second, lambda n: 1, _e4m3_encode, _e4m3_decode
)
"""NVFP4's scales: E4M3 codes of ``scale / ts`` (saturating at 448) with one float32 per-tensor
scale ``ts = max(scale) / 448`` (``scale_scale``, shape ``(1,)``); a block whose code rounds to
0 has scale 0 and codes 0."""


def _int8_codec(block: int) -> ScaleCodec:
    return ScaleCodec(
        "int8/f32",
        jnp.int8,
        lambda s: _block_second(s, block),
        lambda n: -(-n // block),
        lambda s, second: _block_codes(s, second, block),
        lambda c, second: dequantize_scale(c, second, block),
    )


@dataclasses.dataclass(frozen=True)
class Format:
    """One number format (see the module docstring for what each field means).

    Args:
      name: the registry key and what size reports print (``"int4"``, ``"e4m3"``, ``"nf4"``).
      family: the ``QuantSpec(fmt=...)`` value that selects it; formats of one family differ by
        ``bits`` (``QuantSpec(4)`` is ``int4``); a spec without ``bits`` takes the largest.
      bits: bits of information of one code.
      storage_bits: bits one code takes in memory: 2, 3, 4 (packed into ``uint8``) or 8.
      qmin, qmax: the code range of a signed spec.
      encode, decode: the rounding and the dequantization (see ``encode_int``, ``decode_int``).
      code_dtype: dtype of the unpacked codes of a signed spec.

    Keyword-only:
      unsigned: ``signed=False`` allowed (codes ``[0, qmax - qmin]``).
      affine: ``symmetric=False`` allowed (a stored zero point).
      codebook: the sorted normalized values of a codebook format.
      scale_block: double-quantize the scales in blocks of this many (int8 codes, one float32
        second-level scale per block); ``None``: float32 scales.
      scale_rule: ``scale_rule(amax) -> scale`` (float32) of a group; ``None``: the symmetric
        rule (integer, fp8 and codebook formats).
      scale_codec: a ``ScaleCodec`` storing the scales (E8M0, E4M3 + per-tensor float32).
      block_size: the group size of a block format (32 for MX, 16 for NVFP4).
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
    scale_rule: Callable[[jax.Array], jax.Array] | None = None
    scale_codec: ScaleCodec | None = None
    block_size: int | None = None

    def __post_init__(self):
        if self.storage_bits not in (2, 3, 4, 8) or not 1 <= self.bits <= self.storage_bits:
            raise ValueError(
                f"quant.formats.Format: {self.name!r} needs storage_bits in (2, 3, 4, 8) and "
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
        if self.scale_block is not None and self.scale_codec is not None:
            raise ValueError(
                f"quant.formats.Format: {self.name!r} takes scale_block or scale_codec, not both"
            )
        if self.block_size is not None and (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or self.block_size < 1
        ):
            raise ValueError(
                f"quant.formats.Format: {self.name!r} block_size must be a positive int or "
                f"None, got {self.block_size!r}"
            )
        object.__setattr__(self, "code_dtype", jnp.dtype(self.code_dtype))

    @property
    def scales(self) -> ScaleCodec | None:
        """How the scales are stored (``None``: float32): ``scale_codec``, or for a
        ``scale_block`` format its int8 double quantization."""
        if self.scale_codec is not None:
            return self.scale_codec
        if self.scale_block is not None:
            return _int8_codec(self.scale_block)
        return None

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
    _int(3, 3),
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
    Format(
        "mxfp8",
        "mxfp8",
        8,
        8,
        -448.0,
        448.0,
        _float_encoder(jnp.float8_e4m3fn),
        decode_float,
        jnp.float8_e4m3fn,
        scale_rule=pow2_scale_rule(8),
        scale_codec=E8M0,
        block_size=32,
    ),
    Format(
        "mxfp4",
        "mxfp4",
        4,
        4,
        -6.0,
        6.0,
        encode_minifloat(jnp.float4_e2m1fn, 1, 0),
        decode_minifloat(jnp.float4_e2m1fn),
        jnp.uint8,
        scale_rule=pow2_scale_rule(2),
        scale_codec=E8M0,
        block_size=32,
    ),
    Format(
        "nvfp4",
        "nvfp4",
        4,
        4,
        -6.0,
        6.0,
        encode_minifloat(jnp.float4_e2m1fn, 1, 0),
        decode_minifloat(jnp.float4_e2m1fn),
        jnp.uint8,
        scale_rule=lambda amax: _div(jnp.asarray(amax, jnp.float32), 6.0),
        scale_codec=E4M3_TENSOR,
        block_size=16,
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
    second = _block_second(s, block)
    return _block_codes(s, second, block), second


def _blocks(s: jax.Array, block: int) -> jax.Array:
    n = s.size
    nb = -(-n // block)
    return jnp.pad(s.reshape(-1), (0, nb * block - n)).reshape(nb, block)


def _block_second(scale, block: int) -> jax.Array:
    flat = _blocks(jnp.asarray(scale, jnp.float32), block)
    return jnp.maximum(jnp.max(flat, axis=1) / jnp.float32(127), jnp.finfo(jnp.float32).tiny)


def _block_codes(scale, second, block: int) -> jax.Array:
    s = jnp.asarray(scale, jnp.float32)
    flat = _blocks(s, block)
    codes = jnp.clip(jnp.round(flat * (jnp.float32(1) / second[:, None])), 1, 127)
    return codes.reshape(-1)[: s.size].astype(jnp.int8).reshape(s.shape)


def dequantize_scale(codes: jax.Array, second: jax.Array, block: int) -> jax.Array:
    """Inverse of ``quantize_scale``: ``codes * second`` per block, float32, ``codes``' shape."""
    n = codes.size
    nb = second.shape[-1]
    c = jnp.pad(codes.reshape(-1).astype(jnp.float32), (0, nb * block - n)).reshape(nb, block)
    return (c * second[:, None]).reshape(-1)[:n].reshape(codes.shape)
