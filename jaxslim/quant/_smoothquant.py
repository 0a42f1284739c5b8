"""SmoothQuant: migrate activation outliers into the weights, then W8A8.

Xiao, Lin, Seznec, Wu, Demouth and Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023. For kernels ``W_i`` ``(K, N_i)`` reading one
input ``X`` ``(n, K)``, with migration strength ``alpha`` in ``[0, 1]``::

    s_j = max|X_j|^alpha / max_i max|W_i[j, :]|^(1 - alpha)

and ``X W = (X diag(1/s)) (diag(s) W)``: the ``1/s`` is folded into what produces ``X`` (a norm
scale or a previous kernel, found by ``quant.find_absorbers``) so that activations have smaller
outlier channels; then weights are int8 per output channel and activations int8 per token,
quantized on the fly (``w8a8_dot``: ``quant.qdot_general`` with ``lhs_spec``, int8 x int8 ->
int32 accumulation).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim._checks import leaf_path, public
from jaxslim.quant._awq import check_activations
from jaxslim.quant._dot import qdot_general
from jaxslim.quant._qarray import QArray
from jaxslim.quant._spec import QuantSpec

W8_SPEC = QuantSpec(8, axis=-1)
"""SmoothQuant's weights: int8, symmetric, one scale per output channel (Flax ``(in, out)``)."""


def check_alpha(alpha: object, fn: str, path: str = "") -> float:
    """``alpha`` as a float in ``[0, 1]``, else ``ValueError`` naming ``fn`` and ``path``."""
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float | np.integer | np.floating)
        or not 0.0 <= float(alpha) <= 1.0
    ):
        raise ValueError(
            f"{fn}: alpha (migration strength) must be a number in [0, 1], got {alpha!r}"
            f"{f' for {path!r}' if path else ''}"
        )
    return float(alpha)


@public("quant.smooth_scales", leaf_kwarg=True)
def smooth_scales(
    ws: Sequence[jax.Array], absmax: jax.typing.ArrayLike, *, alpha: float = 0.5
) -> jax.Array:
    """SmoothQuant's per-input-channel scales ``s`` ``(K,)``.

    Args:
      ws: kernels reading the same input, as ``(K, N_i)`` matrices (``quant.as_matrix``).
      absmax: ``(K,)`` ``max |X_j|`` over the calibration rows (``calibrate.statistics``).
      alpha: migration strength in ``[0, 1]`` (0: ``s = 1 / max|W_j|``, every weight row gets
        the range 1; 1: ``s = max|X_j|``, every activation channel gets the range 1); the paper
        uses 0.5.

    Raises ``ValueError`` naming the group on ``alpha`` outside ``[0, 1]``, a non-finite or
    all-zero activation channel, or an all-zero weight row (``alpha < 1``).

    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, -2.0], [0.5, 0.25]])
    >>> smooth_scales([w], jnp.array([4.0, 9.0]), alpha=0.5).tolist()  # sqrt(4 / 2), sqrt(9 / 0.5)
    [1.4142135381698608, 4.242640972137451]
    """
    path = leaf_path()
    fn = "quant.smooth_scales"
    alpha = check_alpha(alpha, fn, path)
    a = check_activations(absmax, fn, path, what="activation absmax")
    ws = [jnp.asarray(w, jnp.float32) for w in ws]
    if not ws or any(w.ndim != 2 or w.shape[0] != a.shape[0] for w in ws):
        raise ValueError(
            f"{fn}: kernels of {path!r} must be (K={a.shape[0]}, N) matrices, got "
            f"{[w.shape for w in ws]}"
        )
    wmax = jnp.max(jnp.stack([jnp.max(jnp.abs(w), axis=1) for w in ws]), axis=0)
    if alpha < 1:
        check_activations(wmax, fn, path, what="weight absmax per input channel")
    return a**alpha / wmax ** (1 - alpha)


@public("quant.w8a8_dot")
def w8a8_dot(x: jax.Array, w: QArray, *, impl: str = "auto") -> jax.Array:
    """``x @ W`` with ``W`` an int8 per-channel ``QArray`` ``(K, N)`` and ``x`` ``(..., K)``
    quantized per token (one int8 scale per row) on the fly: int8 x int8 -> int32 in
    ``quant.qdot_general``.

    >>> import jax.numpy as jnp
    >>> from jaxslim.quant import quantize
    >>> x, w = jnp.ones((8, 16)), jnp.full((16, 4), 0.5)
    >>> bool(jnp.allclose(w8a8_dot(x, quantize(w, W8_SPEC)), x @ w, rtol=0.01))
    True
    """
    dn = (((x.ndim - 1,), (0,)), ((), ()))
    spec = QuantSpec(8, axis=tuple(range(x.ndim - 1)))
    return qdot_general(x, w, dn, lhs_spec=spec, impl=impl)
