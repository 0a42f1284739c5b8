"""QEP: fit a layer to the float model's outputs from the inputs the compressed model gives it.

Arai and Ichikawa, "Quantization Error Propagation: Revisiting Layer-Wise Post-Training
Quantization", 2025 (qwix's ``QepRule``); the same objective as GPTAQ (Li et al., 2025,
"GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration").

GPTQ fits ``Q`` to ``||X W - X Q||^2`` with ``X`` the layer's inputs in the model whose earlier
layers are already quantized (``X_q``), so the error those layers made is inherited, never
corrected. The asymmetric objective uses the float model's inputs ``X_f`` for the target::

    ||X_f W - X_q Q||^2 = ||X_q (W* - Q)||^2 + const,   W* = H^-1 X_q^T X_f W
                                                           = W + H^-1 (C - H) W

with ``H = X_q^T X_q`` and ``C = X_q^T X_f`` (``calibrate.Stats.cross``). So GPTQ on the
corrected kernel ``W*`` with the usual Hessian ``H`` minimises it. QEP scales the correction by
``alpha``, usually in ``[0, 1]`` (``0``: plain GPTQ; ``1``: the exact least-squares target, which
can over-fit a small calibration set; the paper's default ``0.5``; larger values over-correct),
and damps ``H`` as GPTQ does.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxslim import _obs
from jaxslim._checks import leaf_path, number, public
from jaxslim.quant._numerics import is_concrete
from jaxslim.quant._qarray import check_finite

_HI = lax.Precision.HIGHEST


@public("quant.qep_correct")
def qep_correct(
    w: jax.typing.ArrayLike,
    hessian: jax.typing.ArrayLike,
    cross: jax.typing.ArrayLike,
    *,
    alpha: float = 0.5,
    damp: float = 0.01,
) -> jax.Array:
    """The QEP-corrected kernel ``W + alpha * (H + damp * mean(diag H) I)^-1 (C - H) W``.

    Args:
      w: a float kernel ``(*contraction, out)`` (seen as ``(K, N)``, ``K`` the product of all
        axes but the last, as ``quant.gptq`` does).
      hessian: ``H = X_q^T X_q`` ``(K, K)``, the inputs of the layer in the model being
        compressed (``calibrate.Stats.xtx``; a sum or a mean, as long as ``cross`` matches).
      cross: ``C = X_q^T X_f`` ``(K, K)``, those inputs against the float model's
        (``calibrate.Stats.cross``, from ``calibrate.sequential(..., cross=True)``).
      alpha: the strength of the correction, ``>= 0`` (``1``: ``W* = H^-1 C W``).
      damp: added to the diagonal of ``H`` as a fraction of its mean; inputs that are always
        zero (``H_jj = 0``) keep their rows unchanged.

    Returns:
      ``W*`` of ``w``'s shape, float32 (then ``quant.gptq(W*, hessian, spec)``). A concrete
      non-finite input, or ``H`` not positive definite after damping, raises ``ValueError``
      naming the kernel; under ``jit`` a factor that is not finite returns ``w`` unchanged.

    >>> import jax, jax.numpy as jnp
    >>> xf = jax.random.normal(jax.random.key(0), (64, 8))
    >>> xq = xf + 0.1 * jax.random.normal(jax.random.key(1), (64, 8))
    >>> w = jax.random.normal(jax.random.key(2), (8, 4))
    >>> ws = qep_correct(w, xq.T @ xq, xq.T @ xf, alpha=1.0, damp=0.0)
    >>> lsq = jnp.linalg.lstsq(xq, xf @ w)[0]  # argmin ||X_q V - X_f W||
    >>> bool(jnp.allclose(ws, lsq, atol=1e-3))
    True
    """
    fn = "quant.qep_correct"
    path = leaf_path()
    w = _obs.check_kernel(w, path=path, fn=fn)
    k = math.prod(w.shape[:-1])
    mats = []
    for name, m in (("hessian", hessian), ("cross", cross)):
        if m is None or not hasattr(m, "shape"):
            raise TypeError(
                f"{fn}: {name} must be a ({k}, {k}) array, got {type(m).__name__} for "
                f"{path or 'the kernel'!r}"
                + (
                    "; calibrate with calibrate.sequential(..., cross=True) or "
                    "calibrate.statistics(..., reference=float_params)"
                    if name == "cross"
                    else ""
                )
            )
        m = jnp.asarray(m)
        if not jnp.issubdtype(m.dtype, jnp.floating) or m.shape != (k, k):
            raise ValueError(
                f"{fn}: {name} must be a floating ({k}, {k}) array for the kernel {w.shape} of "
                f"{path or 'the kernel'!r}, got {m.dtype} {m.shape}"
            )
        mats.append(m.astype(jnp.float32))
    alpha = number(fn, "alpha", alpha, positive=False)
    damp = number(fn, "damp", damp, positive=False)
    check_finite(w, path)
    check_finite(mats[0], f"hessian of {path}" if path else "hessian")
    check_finite(mats[1], f"cross of {path}" if path else "cross")
    out, ok = _qep(w.astype(jnp.float32), *mats, alpha, damp)
    if is_concrete(ok) and not bool(ok):
        raise ValueError(
            f"{fn}: the hessian of {path or 'the kernel'!r} is not positive definite after "
            f"damping (damp={damp}); raise damp or calibrate on more (and finite) inputs"
        )
    return out


@partial(jax.jit, static_argnums=(3, 4))
def _qep(w, h, c, alpha, damp):
    k = h.shape[0]
    w2 = w.reshape(k, -1)
    hd, dead = _obs.damped_hessian(h, damp, fn="quant.qep_correct")
    chol = jnp.linalg.cholesky(hd)
    rhs = jnp.matmul(c - h, w2, precision=_HI)
    rhs = jnp.where(dead[:, None], 0.0, rhs)
    delta = jax.scipy.linalg.cho_solve((chol, True), rhs)
    ok = jnp.all(jnp.isfinite(delta))
    out = jnp.where(ok, w2 + alpha * delta, w2)
    return out.reshape(w.shape), ok
