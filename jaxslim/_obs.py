"""Optimal Brain Surgeon machinery shared by GPTQ (quant/) and SparseGPT (prune/).

Both methods minimise the layer reconstruction error ``||X W - X W'||_F^2`` of one kernel, one
input row at a time, from the Hessian of that error, ``H = X^T X`` (``(K, K)``, ``K`` the number
of input features; any positive multiple such as ``X^T X / n`` gives the same result). The kernel
is seen as a ``(K, N)`` matrix: a Flax Dense kernel ``(in, out)`` as is, a Conv kernel
``(*spatial, in, out)`` flattened over all axes but the last (its input patches in the same order).

With ``U`` the upper Cholesky factor of the inverse of the damped Hessian (``H^-1 = U^T U``), the
OBS step that fixes row ``i`` of ``W`` to ``q`` and spreads its error over the rows after it is::

    e = (w_i - q) / U_ii;    w_j <- w_j - U_ij e    (j > i)

which is exact for the rows still free, because row ``i`` of ``U`` is the ``i``-th row of the
inverse Hessian of the remaining rows, rescaled (Frantar & Alistarh 2022, "Optimal Brain
Compression"; GPTQ, ICLR 2023; SparseGPT, ICML 2023). Lazy batch updates: inside a block of ``B``
rows the step touches only the block; one ``(K, B) x (B, N)`` product then carries the block's
errors to every later row (``obs_sweep``).

Under ``jax.jit`` nothing here can raise on values: a non-finite Hessian, or one that is not
positive definite after damping, makes *every* entry of the factor NaN (never a partly wrong
factor), so everything computed from it is NaN everywhere. Call eagerly (concrete arrays) to get a
``ValueError`` naming the kernel instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxslim._checks import count_nonfinite

_HI = lax.Precision.HIGHEST


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds values (not a tracer under ``jit``/``vmap``/``grad``)."""
    return not isinstance(x, jax.core.Tracer)


def check_kernel(w: Any, *, path: str = "", fn: str = "obs") -> jax.Array:
    """``w`` as an array when it is a floating-point kernel with ``ndim >= 2`` (seen as ``(K, N)``,
    ``K`` the product of all axes but the last); ``TypeError`` for a non-array and
    ``ValueError`` for another dtype or rank, naming ``fn`` and the kernel ``path``."""
    if not hasattr(w, "dtype"):
        raise TypeError(f"{fn}: expects a floating-point kernel, got {type(w).__name__}")
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating) or w.ndim < 2:
        raise ValueError(
            f"{fn}: expects a floating-point kernel with ndim >= 2, got {w.dtype} {w.shape} "
            f"for {path or 'the kernel'!r}"
        )
    return w


def check_hessian(h: Any, k: int, *, path: str = "", fn: str = "obs") -> jax.Array:
    """``h`` as a float32 ``(k, k)`` array; ``ValueError`` on a wrong shape or, when concrete, on
    a non-finite entry. The message names ``fn``, the kernel ``path`` and the bad value."""
    h = jnp.asarray(h)
    if not jnp.issubdtype(h.dtype, jnp.floating):
        raise ValueError(f"{fn}: hessian of {path!r} must be floating point, got {h.dtype}")
    if h.shape != (k, k):
        raise ValueError(
            f"{fn}: hessian of {path!r} must have shape ({k}, {k}) (the kernel's input features, "
            f"Flax layout (in, out)), got {h.shape}"
        )
    h = h.astype(jnp.float32)
    if is_concrete(h):
        n = count_nonfinite(h)
        if n:
            bad = ~np.isfinite(np.asarray(h))
            i, j = np.argwhere(bad)[0]
            raise ValueError(
                f"{fn}: hessian of {path!r} has {n} non-finite entries (first at "
                f"[{i}, {j}] = {float(h[i, j])}); recompute it from finite calibration inputs"
            )
    return h


def damped_hessian(
    h: jax.typing.ArrayLike, damp: float, *, path: str = "", fn: str = "obs.damped_hessian"
) -> tuple[jax.Array, jax.Array]:
    """The damped Hessian ``H + damp * mean(diag(H)) * I`` and the mask of dead inputs.

    An input that is always zero has ``H_ii = 0``; as in the GPTQ/SparseGPT reference code its
    diagonal entry is set to 1 (before the mean is taken) and the caller must zero its weight row
    (``jnp.where(dead[:, None], 0, w)``): nothing downstream can see that weight.

    Args:
      h: ``(K, K)`` symmetric positive semi-definite, e.g. ``X^T X`` of the kernel's inputs.
      damp: fraction of the mean diagonal added to the diagonal (the papers use ``0.01``), >= 0.
      path: the kernel's name, for error messages.
      fn: the public function to name in error messages.

    Returns:
      ``(h_damped, dead)``: float32 ``(K, K)`` and bool ``(K,)``.

    >>> import jax.numpy as jnp
    >>> hd, dead = damped_hessian(jnp.array([[2.0, 0.0], [0.0, 0.0]]), 0.5)
    >>> hd.tolist(), dead.tolist()
    ([[2.75, 0.0], [0.0, 1.75]], [False, True])
    """
    h = jnp.asarray(h)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{fn}: hessian of {path!r} must be square (K, K), got {h.shape}")
    h = check_hessian(h, h.shape[0], path=path, fn=fn)
    if (
        isinstance(damp, bool)
        or not isinstance(damp, int | float | np.integer | np.floating)
        or not 0 <= damp < math.inf
    ):
        raise ValueError(f"{fn}: damp must be a finite number >= 0, got {damp!r} for {path!r}")
    diag = jnp.diagonal(h)
    dead = diag == 0
    diag = jnp.where(dead, jnp.float32(1), diag)
    k = h.shape[0]
    eye = jnp.eye(k, dtype=jnp.bool_)
    extra = jnp.float32(damp) * jnp.mean(diag)
    h = jnp.where(eye, (diag + extra)[:, None], h)
    return h, dead


def inverse_cholesky(
    h: jax.typing.ArrayLike, *, path: str = "", fn: str = "obs.inverse_cholesky"
) -> jax.Array:
    """Upper-triangular ``U`` with ``H^-1 = U^T U`` and ``U_ii > 0``.

    One Cholesky and one triangular solve, no explicit inverse: with ``J`` the row reversal and
    ``J H J = M M^T``, ``H = R R^T`` for the upper ``R = J M J``, so ``U = R^-1 = J M^-1 J``. The
    reference code (``cholesky`` -> ``cholesky_inverse`` -> ``cholesky(upper=True)``) gives the
    same factor. Entries below the diagonal are exact zeros.

    For a concrete ``H`` that is not positive definite (Cholesky breaks down) this raises
    ``ValueError`` naming ``path``; under ``jit`` every entry of ``U`` is NaN instead.

    >>> import jax.numpy as jnp
    >>> h = jnp.array([[4.0, 2.0], [2.0, 3.0]])
    >>> u = inverse_cholesky(h)
    >>> bool(jnp.allclose(u.T @ u, jnp.linalg.inv(h))), float(u[1, 0])
    (True, 0.0)
    """
    h = jnp.asarray(h)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{fn}: hessian of {path!r} must be square (K, K), got {h.shape}")
    h = check_hessian(h, h.shape[0], path=path, fn=fn)
    u = _inverse_cholesky(h)
    if is_concrete(u) and not bool(jnp.isfinite(u[0, 0])):
        raise ValueError(
            f"{fn}: the damped hessian of {path!r} is not positive definite (Cholesky failed); "
            f"raise damp (the fraction of the mean diagonal added to it) or calibrate on more "
            f"samples"
        )
    return u


@jax.jit
def _inverse_cholesky(h: jax.Array) -> jax.Array:
    k = h.shape[0]
    m = jnp.linalg.cholesky(h[::-1, ::-1])
    u = jax.scipy.linalg.solve_triangular(m, jnp.eye(k, dtype=h.dtype), lower=True)[::-1, ::-1]
    u = jnp.triu(u)
    # A failed factorisation (or an infinite H) leaves NaN, inf or 0 on the diagonal in some
    # entries: make every entry NaN, never a partial U.
    ok = jnp.all(jnp.isfinite(h)) & jnp.all(jnp.isfinite(u)) & jnp.all(jnp.diagonal(u) > 0)
    return jnp.where(ok, u, jnp.float32(jnp.nan))


def obs_factor(
    h: jax.typing.ArrayLike, damp: float, *, path: str = "", fn: str = "obs.obs_factor"
) -> tuple[jax.Array, jax.Array]:
    """``(U, dead)``: ``inverse_cholesky(damped_hessian(h, damp)[0])`` and the dead inputs.

    >>> import jax.numpy as jnp
    >>> u, dead = obs_factor(jnp.array([[1.0, 0.0], [0.0, 0.0]]), 0.0)
    >>> u.tolist(), dead.tolist()
    ([[1.0, 0.0], [0.0, 1.0]], [False, True])
    """
    hd, dead = damped_hessian(h, damp, path=path, fn=fn)
    return inverse_cholesky(hd, path=path, fn=fn), dead


def obs_row_update(wb: jax.Array, ub: jax.Array, j: Any, q: jax.Array) -> tuple[jax.Array, Any]:
    """Fixes row ``j`` of the block ``wb`` ``(B, N)`` to ``q`` ``(N,)``; returns ``(wb, e)``.

    ``e = (wb[j] - q) / ub[j, j]`` and ``wb <- wb - outer(ub[j], e)``: rows after ``j`` absorb the
    error, rows before it are untouched (``ub`` is upper triangular) and row ``j`` becomes ``q``
    up to rounding. ``ub`` is the ``(B, B)`` diagonal block of ``U``; ``j`` may be traced.
    """
    e = (wb[j] - q) / ub[j, j]
    return wb - ub[j][:, None] * e[None, :], e


def obs_sweep(
    w: jax.Array,
    u: jax.Array,
    block_size: int,
    process_block: Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, jax.Array, Any]],
    carry: Any = None,
) -> tuple[jax.Array, Any]:
    """Runs ``process_block`` over blocks of ``block_size`` rows with lazy batch updates.

    For ``i1 = 0, B, 2B, ...`` (``B = block_size`` must divide ``K``):
    ``qb, eb, carry = process_block(i1, w[i1:i1+B], U[i1:i1+B, i1:i1+B], carry)`` returns the
    block's final rows ``qb`` ``(B, N)`` and its scaled errors ``eb`` ``(B, N)`` (the ``e`` of
    ``obs_row_update``); then ``w[i1+B:] -= U[i1:i1+B, i1+B:]^T eb`` and ``w[i1:i1+B] = qb``.
    The loop is a ``lax.fori_loop`` (static shapes; one compiled block body). Rows before the
    block get an exact zero update (``U`` is upper triangular), so the product runs over all of
    ``U``'s block rows without masks.

    Returns ``(w_final, carry)``.
    """
    k = w.shape[0]
    b = block_size

    def block(i, state):
        w, carry = state
        i1 = i * b
        wb = lax.dynamic_slice_in_dim(w, i1, b)
        ub = lax.dynamic_slice(u, (i1, i1), (b, b))
        qb, eb, carry = process_block(i1, wb, ub, carry)
        ur = lax.dynamic_slice_in_dim(u, i1, b)  # (B, K): zero left of the block
        w = w - jnp.matmul(ur.T, eb, precision=_HI)
        return lax.dynamic_update_slice_in_dim(w, qb, i1, 0), carry

    return lax.fori_loop(0, k // b, block, (w, carry))
