"""Hadamard transforms: the orthonormal ``n x n`` Hadamard matrix, its fast transform, random
Hadamard rotations.

Sizes ``n = 2^k`` (Sylvester's matrix, the one ``scipy.linalg.hadamard`` builds) and ``n = 2^k *
m`` with ``m`` in ``{12, 20, 28, 36, 40}``: ``H_n = H_{2^k} (x) H_m`` (Kronecker product), with
``H_m`` a fixed Hadamard matrix of order ``m`` (``H_m H_m^T = m I``) from Paley's constructions:

* Paley I (``q`` prime, ``q = 3 mod 4``, order ``q + 1``): ``H = I + [[0, 1^T], [-1, Q]]`` with the
  Jacobsthal matrix ``Q_ij = chi(j - i)`` (``chi`` the quadratic character mod ``q``): ``m = 12``
  (``q = 11``), ``m = 20`` (``q = 19``);
* Paley II (``q`` prime, ``q = 1 mod 4``, order ``2 (q + 1)``): ``H = C (x) [[1, 1], [1, -1]] + I
  (x) [[1, -1], [-1, -1]]`` with ``C = [[0, 1^T], [1, Q]]``: ``m = 28`` (``q = 13``), ``m = 36``
  (``q = 17``);
* ``m = 40 = 2 * 20`` is ``H_2 (x) H_20``, i.e. ``2^(k+1) * 20``.

The transform multiplies by the orthonormal matrix ``H = H_n / sqrt(n)`` in ``O(n log n)``
butterflies for the ``2^k`` factor and one ``m x m`` product for the other (QuaRot, Ashkboos et al.
2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs"; SmolLM2's hidden 576 = 16 * 36, MLP
1536 = 128 * 12, head_dim 64).
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ORDERS = (12, 20, 28, 36, 40)
_PALEY = {12: (1, 11), 20: (1, 19), 28: (2, 13), 36: (2, 17)}


def _residues(q: int) -> np.ndarray:
    """``chi(a)`` for ``a = 0 .. q-1``: 0, 1 (a nonzero square mod ``q``) or -1."""
    chi = -np.ones(q, np.int64)
    chi[0] = 0
    chi[[(i * i) % q for i in range(1, q)]] = 1
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    chi = _residues(q)
    i = np.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


@functools.cache
def _order_m(m: int) -> np.ndarray:
    """The fixed ``m x m`` Hadamard matrix (entries +-1, int64) for ``m`` in ``ORDERS``."""
    if m == 40:
        return np.kron(np.array([[1, 1], [1, -1]], np.int64), _order_m(20))
    kind, q = _PALEY[m]
    qm = _jacobsthal(q)
    ones = np.ones((1, q), np.int64)
    if kind == 1:
        s = np.block([[np.zeros((1, 1), np.int64), ones], [-ones.T, qm]])
        return np.eye(q + 1, dtype=np.int64) + s
    c = np.block([[np.zeros((1, 1), np.int64), ones], [ones.T, qm]])
    a = np.array([[1, 1], [1, -1]], np.int64)
    b = np.array([[1, -1], [-1, -1]], np.int64)
    return np.kron(c, a) + np.kron(np.eye(q + 1, dtype=np.int64), b)


def _split(n: Any, fn: str) -> tuple[int, int]:
    """``(2^k, m)`` with ``n = 2^k * m``, ``m`` 1 or one of the Paley orders; ``ValueError``
    naming ``n`` and the supported forms otherwise."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{fn}: n must be a positive int, got {n!r}")
    n = int(n)
    for m in (1, 12, 20, 28, 36):
        if n % m == 0 and (n // m) & (n // m - 1) == 0:
            return n // m, m
    raise ValueError(
        f"{fn}: no Hadamard matrix of size n={n}; supported sizes are 2^k and 2^k * m with m in "
        f"{ORDERS} (e.g. 64, 576 = 16 * 36, 1536 = 128 * 12); pad or choose another width"
    )


def hadamard_matrix(n: int, *, normalize: bool = True) -> np.ndarray:
    """The ``n x n`` Hadamard matrix ``H_n = H_{2^k} (x) H_m`` as a float64 numpy array.

    ``H_{2^k}`` is Sylvester's (``scipy.linalg.hadamard(2^k)``), ``H_m`` the fixed Paley matrix of
    order ``m`` (module docstring). ``normalize=True`` divides by ``sqrt(n)``: ``H H^T = I``;
    ``normalize=False`` keeps the +-1 entries: ``H H^T = n I``. ``hadamard(x)`` equals ``x @
    hadamard_matrix(n)``.

    >>> h = hadamard_matrix(12, normalize=False)
    >>> bool((h @ h.T == 12 * np.eye(12)).all())
    True
    """
    p, m = _split(n, "quant.hadamard_matrix")
    syl = np.ones((1, 1), np.int64)
    while syl.shape[0] < p:
        syl = np.block([[syl, syl], [syl, -syl]])
    h = np.kron(syl, _order_m(m) if m > 1 else np.ones((1, 1), np.int64)).astype(np.float64)
    return h / np.sqrt(n) if normalize else h


def hadamard(x: jax.typing.ArrayLike, *, axis: int = -1, transpose: bool = False) -> jax.Array:
    """The fast orthonormal Hadamard transform along ``axis``: ``x @ H`` (``x @ H^T`` when
    ``transpose``), ``H = hadamard_matrix(n)``, ``n = x.shape[axis]``.

    ``O(n log n)``: ``k`` butterfly stages ``(a, b) -> (a + b, a - b)`` for the ``2^k`` factor and
    one ``m x m`` product for the Paley factor, then a ``1 / sqrt(n)`` scale; same shape and dtype
    as ``x`` (a float). ``H`` is orthogonal, so ``hadamard(hadamard(x), transpose=True) == x``
    (for ``n = 2^k`` ``H`` is symmetric and ``transpose`` changes nothing). Runs under ``jit``.

    Args:
      x: a float array.
      axis: the axis of length ``n = 2^k`` or ``2^k * m``, ``m`` in ``{12, 20, 28, 36, 40}``.
      transpose: multiply by ``H^T`` instead of ``H``.

    Raises:
      ValueError: for an unsupported ``n`` (naming it and the supported forms).

    >>> y = hadamard(jnp.array([1.0, 0.0, 0.0, 0.0]))
    >>> y.tolist()
    [0.5, 0.5, 0.5, 0.5]
    """
    fn = "quant.hadamard"
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: x must be a float array, got dtype {x.dtype}")
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{fn}: axis {axis} is out of range for shape {x.shape}")
    _split(x.shape[axis], fn)
    return _hadamard(x, operator.index(axis) % x.ndim, bool(transpose))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _hadamard(x: jax.Array, axis: int, transpose: bool) -> jax.Array:
    # One compiled program per shape, dtype and axis, also when called eagerly (the stages as
    # separate eager ops compiled one program each).
    n = x.shape[axis]
    p, m = _split(n, "quant.hadamard")
    y = jnp.moveaxis(x, axis, -1)
    lead = y.shape[:-1]
    if m > 1:
        hm = _order_m(m).T if transpose else _order_m(m)
        y = jnp.matmul(
            y.reshape((*lead, p, m)), jnp.asarray(hm, y.dtype), precision=jax.lax.Precision.HIGHEST
        )
    y = y.reshape((*lead, p, m))
    half = p // 2
    stride = 1
    while stride < p:  # stage: pairs (i, i + half) within blocks of p / stride
        y = y.reshape((*lead, stride, 2, half // stride, m))
        a, b = y[..., 0, :, :], y[..., 1, :, :]
        y = jnp.stack([a + b, a - b], axis=-3)
        stride *= 2
    y = y.reshape((*lead, n)) * jnp.asarray(1.0 / np.sqrt(n), y.dtype)
    return jnp.moveaxis(y, -1, axis)


def random_signs(n: int, seed: int) -> np.ndarray:
    """``n`` random signs (+-1.0, float64) from ``numpy.random.default_rng(seed)``."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"quant.random_signs: seed must be an int, got {seed!r}")
    return np.where(np.random.default_rng(int(seed)).random(int(n)) < 0.5, -1.0, 1.0)


def random_hadamard(n: int, seed: int, *, dtype: Any = jnp.float32) -> jax.Array:
    """A random orthogonal ``n x n`` matrix ``Q = diag(s) H``: random signs ``s =
    random_signs(n, seed)`` times the orthonormal Hadamard matrix (QuaRot's randomized Hadamard).

    ``x @ Q == hadamard(x * s)`` and ``Q Q^T = I``. Computed in float64, returned in ``dtype``.

    >>> q = random_hadamard(12, 1)
    >>> bool(jnp.allclose(q @ q.T, jnp.eye(12), atol=1e-6))
    True
    """
    _split(n, "quant.random_hadamard")
    q = random_signs(n, seed)[:, None] * hadamard_matrix(n)
    return jnp.asarray(q, dtype)
