"""Bit packing of 2-, 3- and 4-bit integer codes into ``uint8``, at exactly ``b`` bits a code.

Codes are packed along the last axis in little-endian words: ``b``-bit storage packs ``c`` codes
into a word of ``w`` bytes (``c * b = 8 w``: 2 bits 4 codes / 1 byte, 4 bits 2 / 1, 3 bits 8 / 3,
8 bits 1 / 1); the code of element ``k c + j`` is in bits ``[j b, (j + 1) b)`` of word ``k``,
whose byte ``i`` is bits ``[8 i, 8 i + 8)``. For 4 bits element ``2i`` is the low nibble of byte
``i`` and ``2i+1`` the high one; for 3 bits elements ``8k .. 8k+7`` fill bytes ``3k .. 3k+2``. A
last axis whose length is not a multiple of ``c`` is padded with zero codes. Signed codes are
stored in two's complement and sign-extended on unpacking.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp

from jaxslim._checks import public

_WORDS = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}


def word(bits: int, fn: str = "quant.pack") -> tuple[int, int]:
    """``(codes, bytes)`` of one packed word of ``bits``-bit codes: ``(4, 1)`` for 2 bits,
    ``(8, 3)`` for 3, ``(2, 1)`` for 4, ``(1, 1)`` for 8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in _WORDS:
        raise ValueError(f"{fn}: storage bits must be 2, 3, 4 or 8, got {bits!r}")
    return _WORDS[bits]


@public("quant.packed_shape")
def packed_shape(shape: tuple[int, ...], bits: int) -> tuple[int, ...]:
    """Shape of the packed ``uint8`` array for codes of ``shape`` (a scalar packs as ``(1,)``).

    >>> packed_shape((3, 5), 4), packed_shape((8,), 2), packed_shape((), 4), packed_shape((16,), 3)
    ((3, 3), (2,), (1,), (6,))
    """
    codes, nbytes = word(bits, "quant.packed_shape")
    shape = tuple(shape) or (1,)
    return shape[:-1] + (-(-shape[-1] // codes) * nbytes,)


@public("quant.pack")
def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Packs integer ``codes`` (values fitting ``bits`` bits, signed or not) into ``uint8``.

    >>> import jax.numpy as jnp
    >>> pack(jnp.array([1, -1, 7], jnp.int8), 4).tolist()  # 0xF1, then 0x07
    [241, 7]
    >>> pack(jnp.arange(8), 3).tolist()  # 0o76543210 = 0xFAC688, little-endian
    [136, 198, 250]
    """
    fn = "quant.pack"
    per, nbytes = word(bits, fn)
    codes = jnp.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"{fn}: codes must be an integer array, got {codes.dtype}")
    if not isinstance(codes, jax.core.Tracer) and codes.size:
        lo, hi = int(jnp.min(codes)), int(jnp.max(codes))
        if lo < -(2 ** (bits - 1)) or hi > 2**bits - 1:
            raise ValueError(
                f"{fn}: codes must fit {bits} bits ([{-(2 ** (bits - 1))}, {2**bits - 1}]), got "
                f"values in [{lo}, {hi}]"
            )
    if codes.ndim == 0:
        codes = codes.reshape(1)
    if per == 1:
        return codes.astype(jnp.uint8)
    n = codes.shape[-1]
    pad = -n % per
    u = codes.astype(jnp.int32) & (2**bits - 1)
    if pad:
        u = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)])
    u = u.reshape(u.shape[:-1] + (u.shape[-1] // per, per))
    shifts = (jnp.arange(per, dtype=jnp.int32) * bits).reshape((1,) * (u.ndim - 1) + (per,))
    w = jnp.sum(u << shifts, axis=-1, dtype=jnp.int32)  # one word, at most 24 bits
    if nbytes == 1:
        return w.astype(jnp.uint8)
    by = (8 * jnp.arange(nbytes, dtype=jnp.int32)).reshape((1,) * w.ndim + (nbytes,))
    b = (w[..., None] >> by) & 0xFF
    return b.reshape(b.shape[:-2] + (b.shape[-2] * nbytes,)).astype(jnp.uint8)


@public("quant.unpack")
def unpack(packed: jax.Array, bits: int, shape: tuple[int, ...], *, signed: bool) -> jax.Array:
    """Inverse of ``pack``: ``int8`` codes (``uint8`` when unsigned) of ``shape``.

    >>> import jax.numpy as jnp
    >>> unpack(jnp.array([241, 7], jnp.uint8), 4, (3,), signed=True).tolist()
    [1, -1, 7]
    >>> unpack(jnp.array([136, 198, 250], jnp.uint8), 3, (8,), signed=True).tolist()
    [0, 1, 2, 3, -4, -3, -2, -1]
    """
    fn = "quant.unpack"
    per, _ = word(bits, fn)
    shape = tuple(shape)
    packed = jnp.asarray(packed)
    if not jnp.issubdtype(packed.dtype, jnp.integer) or packed.dtype.itemsize != 1:
        raise ValueError(f"{fn}: packed must be a uint8 (or int8) array, got {packed.dtype}")
    want = packed_shape(shape, bits) if per > 1 else shape
    if tuple(packed.shape) != tuple(want):
        raise ValueError(
            f"{fn}: packed has shape {tuple(packed.shape)}, but {bits}-bit codes of shape {shape} "
            f"pack to {tuple(want)}"
        )
    return _unpack(packed, bits, tuple(operator.index(d) for d in shape), bool(signed))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpack(packed: jax.Array, bits: int, shape: tuple[int, ...], signed: bool) -> jax.Array:
    # One compiled program per shape and width, also when called eagerly.
    per, nbytes = word(bits, "quant.unpack")
    out_dtype = jnp.int8 if signed else jnp.uint8
    flat_shape = shape or (1,)
    if per == 1:
        return packed.astype(out_dtype).reshape(shape)
    p = packed.astype(jnp.int32)
    if nbytes > 1:  # bytes -> little-endian words
        p = p.reshape(p.shape[:-1] + (p.shape[-1] // nbytes, nbytes))
        by = (8 * jnp.arange(nbytes, dtype=jnp.int32)).reshape((1,) * (p.ndim - 1) + (nbytes,))
        p = jnp.sum(p << by, axis=-1, dtype=jnp.int32)
    shifts = (jnp.arange(per, dtype=jnp.int32) * bits).reshape((1,) * p.ndim + (per,))
    u = (p[..., None] >> shifts) & (2**bits - 1)
    u = u.reshape(u.shape[:-2] + (u.shape[-2] * per,))[..., : flat_shape[-1]]
    if signed:
        u = jnp.where(u >= 2 ** (bits - 1), u - 2**bits, u)
    return u.astype(out_dtype).reshape(shape)
