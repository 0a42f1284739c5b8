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

Memory: ``U`` is never held whole. The sweep keeps ``M``, the lower Cholesky factor of the
row-reversed Hessian (``J H J = M M^T``, so ``U = J M^-1 J``), and solves for the ``B`` rows of
``U`` it needs at each block (``factor_rows``): besides ``H``, one ``(K, K)`` buffer (two for a
moment while it is factored), where forming ``U`` needs three. On an ``8192 x 2048`` kernel this
is what keeps a block of a 1B-parameter model within about 2 GiB.

Under ``jax.jit`` nothing here can raise on values: a non-finite Hessian, or one that is not
positive definite after damping, gives ``ok = False`` from ``obs_cholesky`` (and an all-NaN
``reversed_cholesky`` / ``inverse_cholesky``, never a partly wrong factor); the callers then
return round-to-nearest (GPTQ) or all NaN (SparseGPT). Call eagerly (concrete arrays) to get a
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
    h = _check_square(h, path, fn)
    _check_damp(damp, path, fn)
    return _damp(h, jnp.float32(damp))


def _check_square(h: Any, path: str, fn: str) -> jax.Array:
    h = jnp.asarray(h)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{fn}: hessian of {path!r} must be square (K, K), got {h.shape}")
    return check_hessian(h, h.shape[0], path=path, fn=fn)


def _check_damp(damp: Any, path: str, fn: str) -> None:
    if (
        isinstance(damp, bool)
        or not isinstance(damp, int | float | np.integer | np.floating)
        or not 0 <= damp < math.inf
    ):
        raise ValueError(f"{fn}: damp must be a finite number >= 0, got {damp!r} for {path!r}")


def _damp(h: jax.Array, damp: jax.Array) -> tuple[jax.Array, jax.Array]:
    diag = jnp.diagonal(h)
    dead = diag == 0
    diag = jnp.where(dead, jnp.float32(1), diag)
    k = h.shape[0]
    eye = jnp.eye(k, dtype=jnp.bool_)
    extra = damp * jnp.mean(diag)
    h = jnp.where(eye, (diag + extra)[:, None], h)
    return h, dead


@jax.jit
def _damped_cholesky(h: jax.Array, damp: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    # one program: the damped copy and the reversed one are fused into Cholesky's operand
    hd, dead = _damp(h, damp)
    m, ok = _cholesky_ok(hd)
    return m, dead, ok


def reversed_cholesky(
    h: jax.typing.ArrayLike, *, path: str = "", fn: str = "obs.reversed_cholesky"
) -> jax.Array:
    """Lower-triangular ``M`` with ``J H J = M M^T`` (``J`` the row reversal), ``M_ii > 0``.

    The one ``(K, K)`` array an OBS sweep keeps: with ``R = J M J`` (upper), ``H = R R^T`` and
    the factor of the inverse is ``U = R^-1 = J M^-1 J`` (``H^-1 = U^T U``, ``U`` upper). Rows
    of ``U`` are computed from ``M`` a block at a time (``factor_rows``), so ``U`` itself is never
    held: a sweep needs one ``(K, K)`` buffer beside ``H`` instead of three.

    For a concrete ``H`` that is not positive definite (Cholesky breaks down) this raises
    ``ValueError`` naming ``path``; under ``jit`` every entry of ``M`` is NaN instead.

    >>> import jax.numpy as jnp
    >>> m = reversed_cholesky(jnp.array([[4.0, 2.0], [2.0, 3.0]]))
    >>> bool(jnp.allclose(m[::-1, ::-1] @ m[::-1, ::-1].T, jnp.array([[4.0, 2.0], [2.0, 3.0]])))
    True
    """
    m = _reversed_cholesky(_check_square(h, path, fn))
    if is_concrete(m) and not bool(jnp.isfinite(m[0, 0])):
        raise ValueError(
            f"{fn}: the damped hessian of {path!r} is not positive definite (Cholesky failed); "
            f"raise damp (the fraction of the mean diagonal added to it) or calibrate on more "
            f"samples"
        )
    return m


@jax.jit
def _reversed_cholesky(h: jax.Array) -> jax.Array:
    m, ok = _cholesky_ok(h)
    return jnp.where(ok, m, jnp.float32(jnp.nan))  # never a partial M


def _cholesky_ok(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(M, ok)``: ``M`` unmasked (garbage when ``ok`` is False), so a sweep holds one ``(K, K)``
    buffer; callers check ``ok`` (and the finiteness of what they compute from ``M``)."""
    finite = jnp.all(jnp.isfinite(h))
    m = lax.linalg.cholesky(h[::-1, ::-1], symmetrize_input=False)  # NaN where it breaks down
    d = jnp.diagonal(m)
    return m, finite & jnp.all(jnp.isfinite(d)) & jnp.all(d > 0)


def factor_rows(m: jax.Array, i1: Any, b: int) -> jax.Array:
    """Rows ``i1 .. i1 + b`` of ``U = J M^-1 J``, ``(b, K)``, from ``M`` (``reversed_cholesky``).

    They are rows ``K - i1 - b .. K - i1`` of ``M^-1`` reversed in both axes, the solution
    ``X`` of ``X M = E`` for the matching rows ``E`` of the identity: one triangular solve with
    ``b`` right-hand sides (``b K^2`` flops; over all blocks the ``K^3`` of one full inverse).
    Entries left of the diagonal are exact zeros. ``i1`` may be traced.
    """
    k = m.shape[0]
    r0 = k - i1 - b
    rows = lax.broadcasted_iota(jnp.int32, (b, k), 0)
    cols = lax.broadcasted_iota(jnp.int32, (b, k), 1)
    e = (cols == rows + r0).astype(m.dtype)
    y = lax.linalg.triangular_solve(m.T, e.T, left_side=True, lower=False)
    return y.T[::-1, ::-1]


def inverse_cholesky(
    h: jax.typing.ArrayLike, *, path: str = "", fn: str = "obs.inverse_cholesky"
) -> jax.Array:
    """Upper-triangular ``U`` with ``H^-1 = U^T U`` and ``U_ii > 0`` (the whole ``(K, K)``).

    ``J M^-1 J`` for ``M = reversed_cholesky(H)``: one Cholesky and one triangular solve, no
    explicit inverse. The reference code (``cholesky`` -> ``cholesky_inverse`` ->
    ``cholesky(upper=True)``) gives the same factor. Entries below the diagonal are exact zeros.
    Sweeps do not need it whole (``factor_rows``); it is here for tests and small kernels.

    For a concrete ``H`` that is not positive definite this raises ``ValueError`` naming
    ``path``; under ``jit`` every entry of ``U`` is NaN instead.

    >>> import jax.numpy as jnp
    >>> h = jnp.array([[4.0, 2.0], [2.0, 3.0]])
    >>> u = inverse_cholesky(h)
    >>> bool(jnp.allclose(u.T @ u, jnp.linalg.inv(h))), float(u[1, 0])
    (True, 0.0)
    """
    m = reversed_cholesky(h, path=path, fn=fn)
    u = jnp.triu(factor_rows(m, 0, m.shape[0]))
    ok = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.diagonal(u) > 0)  # False too when M is NaN
    return jnp.where(ok, u, jnp.float32(jnp.nan))  # never a partly wrong factor


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


def obs_cholesky(
    h: jax.typing.ArrayLike, damp: float, *, path: str = "", fn: str = "obs.obs_cholesky"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(M, dead, ok)``: ``M`` the ``reversed_cholesky`` of ``damped_hessian(h, damp)[0]``, what
    ``obs_sweep`` runs on; ``dead`` the dead inputs; ``ok`` a bool scalar, False when the damped
    Hessian is not finite or not positive definite (``M`` is then meaningless: it is not masked,
    to keep one ``(K, K)`` buffer). A concrete failure raises ``ValueError`` naming ``path``.

    >>> import jax.numpy as jnp
    >>> m, dead, ok = obs_cholesky(jnp.array([[1.0, 0.0], [0.0, 0.0]]), 0.0)
    >>> m.tolist(), dead.tolist(), bool(ok)
    ([[1.0, 0.0], [0.0, 1.0]], [False, True], True)
    """
    h = _check_square(h, path, fn)
    _check_damp(damp, path, fn)
    m, dead, ok = _damped_cholesky(h, jnp.float32(damp))
    if is_concrete(ok) and not bool(ok):
        raise ValueError(
            f"{fn}: the damped hessian of {path!r} is not positive definite (Cholesky failed); "
            f"raise damp (the fraction of the mean diagonal added to it) or calibrate on more "
            f"samples"
        )
    return m, dead, ok


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
    m: jax.Array,
    block_size: int,
    process_block: Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, jax.Array, Any]],
    carry: Any = None,
) -> tuple[jax.Array, Any]:
    """Runs ``process_block`` over blocks of ``block_size`` rows with lazy batch updates.

    ``m`` is ``reversed_cholesky`` of the damped Hessian (``obs_cholesky``); the rows of ``U``
    are computed from it block by block (``factor_rows``), never all at once.
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
        ur = factor_rows(m, i1, b)  # (B, K): zero left of the block
        ub = lax.dynamic_slice_in_dim(ur, i1, b, axis=1)
        qb, eb, carry = process_block(i1, wb, ub, carry)
        w = w - jnp.matmul(ur.T, eb, precision=_HI)
        return lax.dynamic_update_slice_in_dim(w, qb, i1, 0), carry

    return lax.fori_loop(0, k // b, block, (w, carry))
