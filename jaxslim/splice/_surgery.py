"""Layer surgery: merge (``fold_batchnorm``, ``fuse_linear``), cut (``drop_layer``) and add
(``widen``, ``deepen``) layers.

Layouts follow Flax: a Dense kernel is ``(in, out)``, a Conv kernel ``(*spatial, in, out)``.
``fold_batchnorm``, ``fuse_linear``, ``widen`` and ``deepen`` preserve the function (to float
rounding); ``drop_layer`` replaces a residual block by the identity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxslim import _tree
from jaxslim._checks import caller, public

_HI = jax.lax.Precision.HIGHEST


def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as a numpy array, or ``None`` when it is traced (under ``jit``/``vmap``/``grad``)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_array(fn: str, name: str, x: Any, optional: bool) -> None:
    if x is None and optional:
        return
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{fn}: {name} must be a jax or numpy array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: {name} must be a floating-point array, got dtype {x.dtype}")


def _static_int(fn: str, name: str, x: Any, low: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int | np.integer):
        raise TypeError(
            f"{fn}: {name} must be a Python int (it sets a shape, so it cannot be traced), "
            f"got {type(x).__name__} {x!r}"
        )
    if x < low:
        raise ValueError(f"{fn}: {name} must be >= {low}, got {x}")
    return int(x)


def _check_bn_arg(name: str, x: Any, n: int | None, optional: bool) -> None:
    fn = "splice.fold_batchnorm"
    if x is None:
        if optional:
            return
        raise TypeError(f"{fn}: {name} must be an array, got None")
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{fn}: {name} must be a jax or numpy array, got {type(x).__name__} {x!r}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: {name} must be a floating-point array, got dtype {x.dtype}")
    if n is not None and tuple(x.shape) != (n,):
        raise ValueError(
            f"{fn}: {name} must have shape ({n},) to match the kernel's output axis (the last: "
            f"Flax layout), got {tuple(x.shape)}"
        )


def _first_bad(ok: np.ndarray) -> tuple[int, int]:
    bad = np.flatnonzero(~ok)
    return int(bad[0]), int(bad.size)


def _raise_bad_bn(stats: dict[str, np.ndarray | None], v: np.ndarray, eps: float) -> None:
    """Explains the first invalid channel of concrete statistics (see fold_batchnorm)."""
    fn = "splice.fold_batchnorm"
    for name, c in stats.items():
        if c is not None and not np.all(np.isfinite(c)):
            i, k = _first_bad(np.isfinite(c))
            raise ValueError(
                f"{fn}: {name}[{i}] = {c[i]} is not finite ({k} such channel(s)); the "
                "statistics are corrupted: recompute them before folding"
            )
    var = stats["var"]
    if np.any(var < 0):
        i, k = _first_bad(var >= 0)
        raise ValueError(
            f"{fn}: var[{i}] = {var[i]} is negative ({k} such channel(s)); a variance is >= 0: "
            "recompute the running statistics before folding"
        )
    i, k = _first_bad(v > 0)
    raise ValueError(
        f"{fn}: var[{i}] + eps = {var[i]} + {eps} is 0 in {v.dtype} ({k} such channel(s)), so "
        "the scale 1/sqrt(var + eps) is infinite; pass the eps the batch norm ran with (Flax: "
        "1e-5), or remove the dead channel first"
    )


@public("splice.fold_batchnorm")
def fold_batchnorm(
    w: jax.Array,
    b: jax.Array | None,
    gamma: jax.Array | None,
    beta: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    *,
    eps: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """Folds an inference-mode batch norm that follows a Dense or Conv layer into the layer.

    ``BN(x W + b) = x W' + b'`` with ``s = gamma / sqrt(var + eps)``, ``W' = W * s`` (scaled on the
    output-channel axis, the last) and ``b' = (b - mean) * s + beta``. ``b``, ``gamma``, ``beta``
    may be ``None`` (0, 1, 0). ``eps`` defaults to Flax's ``BatchNorm`` value. Folding a batch
    norm into a *following* zero-padded convolution would be inexact at the borders, which is why
    only the preceding layer is a target here. ``s`` and ``b'`` are computed in float32 (float64
    if a statistic is float64) and cast to ``w``'s dtype.

    Invalid statistics (concrete arrays): ``ValueError`` naming the channel and value for
    ``var < 0``, ``var + eps == 0`` (``var = 0`` with ``eps = 0``), a NaN or inf in ``b``,
    ``gamma``, ``beta``, ``mean`` or ``var``, and for ``eps`` < 0 or not finite; ``TypeError``
    for an argument that is not a floating-point array (``var=None``); ``ValueError`` for a
    shape other than ``(out,)``. Under ``jit`` (traced statistics) nothing can raise: each
    invalid channel's column of ``W'`` and entry of ``b'`` are NaN — never a finite wrong value
    — and ``jax.experimental.checkify.checkify(f, errors=checkify.float_checks)`` reports
    ``nan generated by primitive: ...``.

    Args:
      w: kernel ``(in, out)`` or ``(*spatial, in, out)``; b: ``(out,)`` or None.
      gamma, beta, mean, var: batch-norm scale, bias, running mean and variance, ``(out,)``.
      eps: the batch norm's epsilon, a float ``>= 0``.

    Returns:
      ``(w', b')`` with the shapes of ``w`` and ``(out,)``.

    >>> import jax.numpy as jnp
    >>> w, b = fold_batchnorm(jnp.ones((2, 1)), None, jnp.array([2.0]), jnp.array([1.0]),
    ...                       jnp.array([0.5]), jnp.array([4.0]), eps=0.0)
    >>> w.tolist(), b.tolist()
    ([[1.0], [1.0]], [0.5])
    """
    fn = "splice.fold_batchnorm"
    _check_bn_arg("w", w, None, optional=False)
    if w.ndim < 2:
        raise ValueError(
            f"{fn}: w must be a Dense (in, out) or Conv (*spatial, in, out) kernel, got shape "
            f"{tuple(w.shape)}"
        )
    n = w.shape[-1]
    stats = {"b": b, "gamma": gamma, "beta": beta, "mean": mean, "var": var}
    for name, x in stats.items():
        _check_bn_arg(name, x, n, optional=name in ("b", "gamma", "beta"))
    if isinstance(eps, bool) or not (isinstance(eps, int | float) or hasattr(eps, "dtype")):
        raise TypeError(f"{fn}: eps must be a float, got {type(eps).__name__} {eps!r}")
    eps_c = _concrete(eps)
    if eps_c is not None and (eps_c.ndim != 0 or not np.isfinite(eps_c) or eps_c < 0):
        raise ValueError(f"{fn}: eps must be a finite float >= 0, got {eps!r}")
    wide = any(x is not None and x.dtype == np.float64 for x in stats.values())
    ct = jax.dtypes.canonicalize_dtype(jnp.float64) if wide else jnp.dtype(jnp.float32)
    f = {k: None if x is None else jnp.asarray(x).astype(ct) for k, x in stats.items()}
    v = f["var"] + jnp.asarray(eps, ct)
    ok = v > 0
    for x in f.values():
        if x is not None:
            ok = ok & jnp.isfinite(x)
    ok_c = _concrete(ok)  # concrete only when every statistic and eps are
    if ok_c is not None and not ok_c.all():
        concrete = {k: None if x is None else np.asarray(x) for k, x in f.items()}
        _raise_bad_bn(concrete, np.asarray(v), float(eps_c))
    # Traced input: an invalid channel takes rsqrt(-1) = NaN (never a finite wrong value), which
    # checkify's float_checks report as "nan generated by primitive: ...".
    s = jax.lax.rsqrt(jnp.where(ok, v, jnp.asarray(-1.0, ct)))
    if f["gamma"] is not None:
        s = f["gamma"] * s
    b0 = jnp.zeros((n,), ct) if f["b"] is None else f["b"]
    b_new = (b0 - f["mean"]) * s
    if f["beta"] is not None:
        b_new = b_new + f["beta"]
    w_new = w * s.astype(w.dtype).reshape((1,) * (w.ndim - 1) + (n,))
    b_new = b_new.astype(w.dtype)
    b_c = _concrete(b_new)
    if b_c is not None and not np.all(np.isfinite(b_c)):
        i, k = _first_bad(np.isfinite(b_c))
        raise ValueError(
            f"{fn}: the folded bias overflows {w.dtype} at channel {i} ({b_c[i]}; {k} such "
            f"channel(s)): var[{i}] + eps is too small for gamma and mean there"
        )
    w_c = _concrete(w_new)
    if w_c is not None and not np.all(np.isfinite(w_c) | ~np.isfinite(np.asarray(w))):
        bad = ~np.isfinite(w_c) & np.isfinite(np.asarray(w))
        i, k = _first_bad(~bad.reshape(-1, n).any(0))
        raise ValueError(
            f"{fn}: the folded kernel overflows {w.dtype} at channel {i} ({k} such channel(s)): "
            f"the scale gamma / sqrt(var + eps) there is {np.asarray(s)[i]}"
        )
    return w_new, b_new


@public("splice.fuse_linear")
def fuse_linear(
    w1: jax.Array, b1: jax.Array | None, w2: jax.Array, b2: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Merges two affine layers with nothing non-linear between: ``(W1 W2, b1 W2 + b2)``.

    ``w1`` is a Dense ``(in, mid)`` or Conv ``(*spatial, in, mid)`` kernel; ``w2`` a Dense
    ``(mid, out)`` kernel or a 1x1 Conv kernel ``(1, ..., 1, mid, out)``. The product is taken at
    ``Precision.HIGHEST``.

    >>> import jax.numpy as jnp
    >>> w, b = fuse_linear(jnp.eye(2), jnp.ones(2), 2 * jnp.eye(2), None)
    >>> w.tolist(), b.tolist()
    ([[2.0, 0.0], [0.0, 2.0]], [2.0, 2.0])
    """
    fn = "splice.fuse_linear"
    for name, x, optional in (("w1", w1, False), ("b1", b1, True), ("w2", w2, False)):
        _check_array(fn, name, x, optional)
    _check_array(fn, "b2", b2, True)
    if w1.ndim < 2 or w2.ndim < 2:
        raise ValueError(
            f"{fn}: w1 and w2 must be kernels of ndim >= 2, got shapes {tuple(w1.shape)} and "
            f"{tuple(w2.shape)}"
        )
    if b1 is not None and tuple(b1.shape) != (w1.shape[-1],):
        raise ValueError(f"{fn}: b1 must have shape ({w1.shape[-1]},), got {tuple(b1.shape)}")
    if b2 is not None and tuple(b2.shape) != (w2.shape[-1],):
        raise ValueError(f"{fn}: b2 must have shape ({w2.shape[-1]},), got {tuple(b2.shape)}")
    if w2.ndim > 2:
        if any(s != 1 for s in w2.shape[:-2]):
            raise ValueError(
                "splice.fuse_linear: w2 must be a Dense kernel or a 1x1 Conv kernel, "
                f"got shape {tuple(w2.shape)}"
            )
        w2 = w2.reshape(w2.shape[-2:])
    if w1.shape[-1] != w2.shape[0]:
        raise ValueError(
            f"splice.fuse_linear: w1 output width {w1.shape[-1]} does not match w2 "
            f"input width {w2.shape[0]} (shapes {tuple(w1.shape)}, {tuple(w2.shape)})"
        )
    w = jnp.matmul(w1, w2, precision=_HI)
    b = jnp.zeros((w2.shape[1],), w.dtype) if b2 is None else b2
    if b1 is not None:
        b = b + jnp.matmul(b1, w2, precision=_HI)
    return w, b


@public("splice.widen_map")
def widen_map(width: int, new_width: int, *, key: jax.Array | None = None) -> jax.Array:
    """Net2WiderNet unit map ``g``: ``g[j] = j`` for ``j < width``, then copies of old units.

    With ``key`` the extra units copy uniformly random old units (Chen et al., 2016), otherwise
    they copy ``0, 1, 2, ...`` in turn. Returns an int32 array of shape ``(new_width,)``.

    >>> widen_map(3, 5).tolist()
    [0, 1, 2, 0, 1]
    """
    width = _static_int("splice.widen", "width", width, 1)
    new_width = _static_int("splice.widen", "new_width", new_width, 1)
    if new_width < width:
        raise ValueError(f"splice.widen: new_width={new_width} is smaller than the width {width}")
    extra = new_width - width
    if key is None:
        rest = jnp.arange(extra, dtype=jnp.int32) % width
    else:
        rest = jax.random.randint(key, (extra,), 0, width, dtype=jnp.int32)
    return jnp.concatenate([jnp.arange(width, dtype=jnp.int32), rest])


@public("splice.widen")
def widen(
    w1: jax.Array,
    b1: jax.Array | None,
    w2: jax.Array,
    new_width: int,
    *,
    key: jax.Array | None = None,
    noise: float = 0.0,
    extra: tuple[jax.Array | None, ...] = (),
) -> tuple[Any, ...]:
    """Net2WiderNet: widens the hidden layer between ``w1`` and ``w2`` to ``new_width`` units.

    Units are replicated by ``g = widen_map(width, new_width, key=key)``; the outgoing weights of
    each copy are divided by the number of copies ``c``: ``W1' = W1[..., g]``, ``b1' = b1[g]``,
    ``W2'[..., j, :] = W2[..., g[j], :] / c[g[j]]`` — the function is unchanged (Chen et al., 2016,
    "Net2Net"). ``noise > 0`` adds ``noise * N(0, 1) * std(W2)`` to the copies' outgoing weights
    to break symmetry (then the function changes by about that much; needs ``key``). ``extra``
    are per-unit arrays between the layers (a batch norm's scale, bias, mean, var), replicated too.

    Args:
      w1: ``(..., in, width)``; b1: ``(width,)`` or None; w2: ``(..., width, out)``.
      new_width: static int ``>= width``.

    Returns:
      ``(w1', b1', w2', *extra')``.

    >>> import jax.numpy as jnp
    >>> w1, b1, w2 = widen(jnp.ones((2, 1)), jnp.zeros(1), jnp.full((1, 1), 3.0), new_width=3)
    >>> w2.ravel().tolist()
    [1.0, 1.0, 1.0]
    """
    fn = "splice.widen"
    for name, x, optional in (("w1", w1, False), ("b1", b1, True), ("w2", w2, False)):
        _check_array(fn, name, x, optional)
    if isinstance(noise, bool) or not isinstance(noise, int | float) or not noise >= 0:
        raise ValueError(f"{fn}: noise must be a finite float >= 0, got {noise!r}")
    if not np.isfinite(noise):
        raise ValueError(f"{fn}: noise must be a finite float >= 0, got {noise!r}")
    if noise and key is None:
        raise ValueError(f"{fn}: noise > 0 needs a key")
    width = w1.shape[-1]
    if b1 is not None and tuple(b1.shape) != (width,):
        raise ValueError(f"{fn}: b1 must have shape ({width},), got {tuple(b1.shape)}")
    if w2.ndim < 2 or w2.shape[-2] != width:
        raise ValueError(
            f"splice.widen: w2 input axis (-2) must be {width} like w1's output axis, "
            f"got shapes {tuple(w1.shape)} and {tuple(w2.shape)}"
        )
    g = widen_map(
        width, new_width, key=key if noise == 0.0 or key is None else jax.random.fold_in(key, 1)
    )
    lead = (1,) * (w2.ndim - 2)
    counts = jnp.bincount(g, length=width)[g].astype(w2.dtype).reshape(lead + (new_width, 1))
    w1n = jnp.take(w1, g, axis=-1)
    w2n = jnp.take(w2, g, axis=-2) / counts
    if noise:
        copies = jnp.asarray(np.arange(new_width) >= width).reshape(lead + (new_width, 1))
        eps = noise * jnp.std(w2) * jax.random.normal(key, w2n.shape, w2n.dtype)
        w2n = jnp.where(copies, w2n + eps, w2n)
    out = [w1n, None if b1 is None else jnp.take(b1, g, axis=-1), w2n]
    for x in extra:
        if x is not None and x.shape[-1] != width:
            raise ValueError(f"splice.widen: extra arrays must end in {width}, got {x.shape}")
        out.append(None if x is None else jnp.take(x, g, axis=-1))
    return tuple(out)


_IDEMPOTENT = {
    None: None,
    "linear": None,
    "identity": None,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "hard_tanh": jax.nn.hard_tanh,
}


@public("splice.deepen")
def deepen(
    width: int,
    activation: str | None = "relu",
    *,
    kernel_size: tuple[int, ...] | None = None,
    dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """Net2DeeperNet: an identity layer ``(W, b)`` to insert after a layer of ``width`` units.

    Dense: ``W = I`` ``(width, width)``, ``b = 0``. Conv (``kernel_size`` given, odd sizes,
    stride 1, ``SAME`` padding): ``W[centre, i, i] = 1``, zero elsewhere. The inserted layer
    computes ``act(h W + b) = act(h)``, equal to ``h`` when ``h`` already went through ``act`` —
    so ``activation`` must be idempotent (``relu``, ``relu6``, ``hard_tanh``, or none).

    >>> w, b = deepen(2)
    >>> w.tolist(), b.tolist()
    ([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    """
    if activation is not None and not isinstance(activation, str):
        raise TypeError(
            f"splice.deepen: activation must be a name such as 'relu' or None, got "
            f"{type(activation).__name__}"
        )
    if activation not in _IDEMPOTENT:
        raise ValueError(
            f"splice.deepen: activation={activation!r} is not idempotent, so an identity layer "
            f"would change the function; use one of {[k for k in _IDEMPOTENT if k]} or None"
        )
    width = _static_int("splice.deepen", "width", width, 1)
    eye = jnp.eye(width, dtype=dtype)
    if kernel_size is None:
        return eye, jnp.zeros((width,), dtype)
    ks = tuple(int(k) for k in kernel_size)
    if any(k < 1 or k % 2 == 0 for k in ks):
        raise ValueError(f"splice.deepen: kernel_size must be odd, got {kernel_size!r}")
    w = jnp.zeros((*ks, width, width), dtype).at[tuple(k // 2 for k in ks)].set(eye)
    return w, jnp.zeros((width,), dtype)


def split_block(block: Any, index: Any = None) -> tuple[str, int | None]:
    """``(path, index)`` of a block spec: a path, ``(path, index)``, or a path and ``index=``."""
    if isinstance(block, tuple):
        if index is not None:
            raise TypeError(
                f"{caller()}: give the layer index once, as (path, index) or as index=, got "
                f"block={block!r} and index={index!r}"
            )
        ok = len(block) == 2 and isinstance(block[0], str)
        ok = ok and isinstance(block[1], int | np.integer) and not isinstance(block[1], bool)
        if not ok:
            raise TypeError(
                f"{caller()}: a scanned-stack block is (path, int index), got {block!r}"
            )
        return block[0], int(block[1])
    if isinstance(block, str):
        if index is not None and (
            isinstance(index, bool) or not isinstance(index, int | np.integer)
        ):
            raise TypeError(
                f"{caller()}: index must be a Python int (it sets the stack's new length, so it "
                f"cannot be traced), got {type(index).__name__} {index!r} for {block!r}"
            )
        return block, None if index is None else int(index)
    raise TypeError(
        f"{caller()}: block must be a path such as 'blocks/1' or (path, index) for a "
        f"scanned stack, got {type(block).__name__} {block!r}"
    )


def _is_block_list(node: Any) -> bool:
    """A list/tuple of blocks or a mapping keyed ``0 .. n-1`` (the state of an ``nnx.List``)."""
    if isinstance(node, list | tuple) and not hasattr(node, "_fields"):
        return True
    if isinstance(node, Mapping) and len(node) > 0:
        keys = list(node)
        return all(type(k) is int for k in keys) and sorted(keys) == list(range(len(keys)))
    return False


def stack_size(params: Any, path: str, axis: int) -> tuple[int, list[str]]:
    """``(layers, leaf paths)`` of the scanned stack at ``path``: every array leaf under it has
    the same size ``layers`` on ``axis``. Raises ``ValueError`` naming the path otherwise."""
    if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
        raise TypeError(f"{caller()}: axis must be an int >= 0, got {axis!r}")
    names = [p for p, _ in _tree.leaves_with_paths(params)]
    leaves = [
        (p, x) for p, x in _tree.leaves_with_paths(params) if p == path or p.startswith(path + "/")
    ]
    if not leaves:
        raise ValueError(f"{caller()}: no leaf under {path!r}; leaves are {names[:8]}")
    node = _tree.get_path(params, path)
    if _is_block_list(node):
        raise ValueError(
            f"{caller()}: {path!r} holds a list of {len(node)} blocks, not a scanned stack (one "
            f"array per leaf with a layer axis {axis}); drop a listed block by its path, e.g. "
            f"'{path}/0'"
        )
    sizes: dict[int, str] = {}
    for name, x in leaves:
        if not hasattr(x, "shape"):
            raise ValueError(
                f"{caller()}: {name!r} under the scanned stack {path!r} is a "
                f"{type(x).__name__}, not an array with a layer axis {axis}"
            )
        if x.ndim <= axis:
            raise ValueError(
                f"{caller()}: {name!r} with shape {tuple(x.shape)} has no layer axis {axis}, so "
                f"{path!r} is not a scanned stack on that axis"
            )
        sizes.setdefault(int(x.shape[axis]), name)
    if len(sizes) > 1:
        seen = ", ".join(f"{n!r}: {k}" for k, n in sizes.items())
        raise ValueError(
            f"{caller()}: {path!r} is not a scanned stack: its leaves have different sizes on "
            f"axis {axis} ({seen}), but a stacked layer axis holds one layer count; pass the "
            "path of the stacked module (every leaf under it with the layer axis) or the axis"
        )
    return next(iter(sizes)), [n for n, _ in leaves]


def check_index(path: str, index: int, n: int, name: str, shape: Any, axis: int):
    if not 0 <= index < n:
        raise ValueError(
            f"{caller()}: layer {index} is out of range for {name!r} with shape {tuple(shape)} "
            f"on axis {axis}: the scanned stack {path!r} has {n} layers (index 0 .. {n - 1})"
        )


def _renumbered(params: Any, path: str) -> Any:
    """``params`` with the string-keyed siblings after the dropped ``path`` shifted down:
    ``"2"`` -> ``"1"``, ``"layer_3"`` -> ``"layer_2"`` (keys of the same prefix only)."""
    parent, _, name = path.rpartition("/")
    m = re.fullmatch(r"(.*?)(\d+)", name)
    if m is None:
        raise ValueError(
            f"{caller()}: renumber=True needs a block key ending in its number ('3', "
            f"'layer_3', 'h_3'), got {name!r}"
        )
    prefix, dropped = m.group(1), int(m.group(2))
    node = _tree.get_path(params, parent) if parent else params
    if not isinstance(node, Mapping) or any(not isinstance(k, str) for k in node):
        return params  # a list or an integer-keyed state already shifted down

    def key(k: str) -> str:
        km = re.fullmatch(re.escape(prefix) + r"(\d+)", k)
        if km is None or int(km.group(1)) <= dropped:
            return k
        return f"{prefix}{int(km.group(1)) - 1}"

    items = {key(k): v for k, v in node.items()}
    new = items if type(node) is dict else type(node)(items)
    return _tree.set_path(params, parent, new) if parent else new


def _successor(params: Any, path: str) -> str | None:
    """The path of the string-keyed sibling that takes the number of ``path`` when it is
    dropped with ``renumber=True`` (``".../block/1"`` for ``".../block/0"``), or ``None``."""
    parent, _, name = path.rpartition("/")
    m = re.fullmatch(r"(.*?)(\d+)", name)
    node = _tree.get_path(params, parent) if parent else params
    if m is None or not isinstance(node, Mapping):
        return None
    later = [
        (int(k[len(m.group(1)) :]), k)
        for k in node
        if isinstance(k, str) and re.fullmatch(re.escape(m.group(1)) + r"\d+", k)
    ]
    later = sorted((n, k) for n, k in later if n > int(m.group(2)))
    return f"{parent}/{later[0][1]}" if parent and later else (later[0][1] if later else None)


def _relative(params: Any, path: str) -> dict[str, Any]:
    sub = _tree.get_path(params, path)
    return dict(_tree.leaves_with_paths(sub))


def _put(tree: Any, path: str, value: Any) -> Any:
    """``tree`` with ``value`` at ``path``, creating the missing mappings on the way."""
    keys = path.split("/")
    for i in range(1, len(keys)):
        head = "/".join(keys[:i])
        try:
            _tree.get_path(tree, head)
        except ValueError:
            tree = _tree.set_path(tree, head, {}, create=True)
    return _tree.set_path(tree, path, value, create=True)


def _owned(params: Any, path: str, keep: str | None) -> dict[str, Any]:
    """The leaves of the dropped block that the block taking its number lacks: parameters the
    model reads at that position for every block (T5's block 0 owns the
    ``relative_attention_bias`` all blocks use). Those ``keep`` matches are returned (to be
    moved to the new block); any other raises ``ValueError`` naming them."""
    nxt = _successor(params, path)
    if nxt is None:
        return {}
    mine, theirs = _relative(params, path), _relative(params, nxt)
    extra = {k: v for k, v in mine.items() if k not in theirs}
    kept = {k: v for k, v in extra.items() if keep is not None and re.search(keep, k)}
    lost = [k for k in extra if k not in kept]
    if lost:
        hint = lost[0].split("/")[-2] if "/" in lost[0] else lost[0]
        raise ValueError(
            f"splice.drop_layer: {path!r} holds parameters that {nxt!r}, which takes its "
            f"number, lacks: {lost[:6]}{' ...' if len(lost) > 6 else ''}. A model rebuilt with "
            "one layer fewer reads them at that position, often for every block (T5's block 0 "
            "owns the relative_attention_bias all blocks share), so dropping them breaks it. "
            f"Pass keep={hint!r} (a regex over those paths) to move them to the new "
            f"{path.rpartition('/')[2]!r}, or drop another block"
        )
    return kept


@public("splice.drop_layer")
def drop_layer(
    params: Any,
    block: str | tuple[str, int],
    *,
    index: int | None = None,
    axis: int = 0,
    renumber: bool = False,
    keep: str | None = None,
) -> Any:
    """Removes a residual block (the model then treats it as the identity); returns a new tree.

    * ``block="blocks/1"``: the subtree at that path is removed — popped from a list (later blocks
      shift down) or deleted from a dict. A dict keyed exactly ``0 .. n-1`` — the NNX ``State``
      of an ``nnx.List``, ``nnx.Sequential`` or list attribute, or its ``nnx.to_pure_dict`` form
      — behaves like a list: later blocks shift down, so the result is the state of the same
      model with ``n - 1`` blocks (``nnx.merge`` it with that model's graphdef). ``fn`` must
      iterate over what is there.
    * ``block=("blocks", 1)``, or ``block="blocks", index=1``: a scanned stack, every leaf
      under ``blocks`` having a layer axis ``axis`` of the same size ``n``: index 1 is sliced
      out of each, leaving ``n - 1`` layers (an ``nnx.scan``-stacked state — a module created
      under ``nnx.vmap`` — has the layer axis 0 on every leaf under the stacked module). The
      model that scans over that axis then runs one layer fewer (rebuild an NNX model from a
      config with ``layers - 1``, or ``nnx.update`` it: a scan takes its length from the arrays).
      ``ValueError`` when the path holds a list of blocks (drop ``"blocks/1"`` instead), when
      its leaves disagree on the size of ``axis`` (not a stack), for an index outside
      ``0 .. n-1`` and for the last layer; ``TypeError`` for a traced index.
    * ``renumber=True``: string keys numbered like the dropped one (Hugging Face Flax
      ``".../layers/0"``, ``".../h/0"``; Linen ``"layer_0"``, ``"blocks_0"``) shift down, so the
      tree is the parameters of the same model with one layer fewer: rebuild the model from its
      config with ``num_hidden_layers - 1`` (``n_layer - 1`` for GPT-2; a Linen module with
      ``num_layers - 1``) and pass the tree. Without it the keys keep their gap, and a Linen or
      HF model built for ``n - 1`` layers looks for the missing key.

      >>> from transformers import FlaxLlamaForCausalLM  # doctest: +SKIP
      >>> small = drop_layer(model.params, "model/layers/2", renumber=True)  # doctest: +SKIP
      >>> config.num_hidden_layers -= 1  # doctest: +SKIP
      >>> FlaxLlamaForCausalLM(config, _do_init=False)(tokens, params=small)  # doctest: +SKIP

      A block may own parameters the block taking its number lacks: T5's block 0 holds the
      ``relative_attention_bias`` every block reads. Dropping it with ``renumber=True`` raises
      ``ValueError`` naming them, unless ``keep`` (a regex over their paths inside the block)
      matches them: they then move to the block that takes the number (``keep=
      "relative_attention_bias"`` gives the new block 0 the old one's bias, as T5 expects).

    >>> import jax.numpy as jnp
    >>> p = {"blocks": [{"w": jnp.ones(2)}, {"w": jnp.zeros(2)}], "head": jnp.ones(2)}
    >>> len(drop_layer(p, "blocks/0")["blocks"])
    1
    >>> drop_layer({"stack": {"w": jnp.ones((3, 2))}}, ("stack", 1))["stack"]["w"].shape
    (2, 2)
    >>> drop_layer({"stack": {"w": jnp.ones((3, 2))}}, "stack", index=2)["stack"]["w"].shape
    (2, 2)
    >>> sorted(drop_layer({"layer_0": 0, "layer_1": 1, "layer_2": 2}, "layer_0", renumber=True))
    ['layer_0', 'layer_1']
    """
    path, index = split_block(block, index)
    if index is not None:
        n, inside = stack_size(params, path, axis)
        shape = _tree.get_path(params, inside[0]).shape
        check_index(path, index, n, inside[0], shape, axis)
        if n == 1:
            raise ValueError(
                f"{caller()}: the scanned stack {path!r} has a single layer left ({inside[0]!r} "
                f"with shape {tuple(shape)}); a stack cannot be empty"
            )
        keep = np.delete(np.arange(n), index)
        chosen = set(inside)

        def cut(p, x):
            return jnp.take(x, keep, axis=axis) if _tree.path_str(p) in chosen else x

        return jax.tree_util.tree_map_with_path(cut, params)
    if not isinstance(renumber, bool):
        raise TypeError(f"splice.drop_layer: renumber must be a bool, got {renumber!r}")
    if keep is not None and not isinstance(keep, str):
        raise TypeError(f"splice.drop_layer: keep must be a regex string, got {keep!r}")
    if keep is not None and not renumber:
        raise ValueError(
            "splice.drop_layer: keep= moves a dropped block's own parameters to the block that "
            "takes its number, so it needs renumber=True"
        )
    owned = _owned(params, path, keep) if renumber else {}
    out = _tree.delete_path(params, path)
    if not renumber:
        return out
    out = _renumbered(out, path)
    for rel, leaf in owned.items():
        out = _put(out, f"{path}/{rel}", leaf)
    return out
