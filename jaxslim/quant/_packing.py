"""Bit packing of 2-, 3- and 4-bit integer codes into ``uint8``.

Codes are packed along the last axis: with ``b``-bit storage a byte holds ``8 // b`` codes, the
code of element ``k * (8 // b) + j`` in bits ``[j*b, (j+1)*b)`` — for 4 bits element ``2i`` in the
low nibble and ``2i+1`` in the high nibble. A last axis whose length is not a multiple of
``8 // b`` is padded with zero codes. Signed codes are stored in two's complement and sign-extended
on unpacking.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp

from jaxslim._checks import public


def _per_byte(bits: int, fn: str = "quant.pack") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 4, 8):
        raise ValueError(f"{fn}: storage bits must be 2, 4 or 8, got {bits!r}")
    return 8 // bits


@public("quant.packed_shape")
def packed_shape(shape: tuple[int, ...], bits: int) -> tuple[int, ...]:
    """Shape of the packed ``uint8`` array for codes of ``shape`` (a scalar packs as ``(1,)``).

    >>> packed_shape((3, 5), 4), packed_shape((8,), 2), packed_shape((), 4)
    ((3, 3), (2,), (1,))
    """
    per = _per_byte(bits, "quant.packed_shape")
    shape = tuple(shape) or (1,)
    return shape[:-1] + (-(-shape[-1] // per),)


@public("quant.pack")
def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Packs integer ``codes`` (values fitting ``bits`` bits, signed or not) into ``uint8``.

    >>> import jax.numpy as jnp
    >>> pack(jnp.array([1, -1, 7], jnp.int8), 4).tolist()  # 0xF1, then 0x07
    [241, 7]
    """
    fn = "quant.pack"
    per = _per_byte(bits, fn)
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
    return jnp.sum(u << shifts, axis=-1, dtype=jnp.int32).astype(jnp.uint8)


@public("quant.unpack")
def unpack(packed: jax.Array, bits: int, shape: tuple[int, ...], *, signed: bool) -> jax.Array:
    """Inverse of ``pack``: ``int8`` codes (``uint8`` when unsigned) of ``shape``.

    >>> import jax.numpy as jnp
    >>> unpack(jnp.array([241, 7], jnp.uint8), 4, (3,), signed=True).tolist()
    [1, -1, 7]
    """
    fn = "quant.unpack"
    per = _per_byte(bits, fn)
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
    per = _per_byte(bits, "quant.unpack")
    out_dtype = jnp.int8 if signed else jnp.uint8
    flat_shape = shape or (1,)
    if per == 1:
        return packed.astype(out_dtype).reshape(shape)
    p = packed.astype(jnp.int32)
    shifts = (jnp.arange(per, dtype=jnp.int32) * bits).reshape((1,) * p.ndim + (per,))
    u = (p[..., None] >> shifts) & (2**bits - 1)
    u = u.reshape(u.shape[:-2] + (u.shape[-2] * per,))[..., : flat_shape[-1]]
    if signed:
        u = jnp.where(u >= 2 ** (bits - 1), u - 2**bits, u)
    return u.astype(out_dtype).reshape(shape)
