"""Channel removal and layer surgery on Flax NNX modules, in place.

The core :mod:`jaxslim.splice` works on pytrees. An NNX module still runs after its arrays shrink,
but keeps stale ``in_features``/``out_features``; these functions shrink the arrays *and* update
each layer's feature attributes (``Linear``, ``Conv``, ``BatchNorm``/``LayerNorm``/``RMSNorm``,
``Embed``, ``LinearGeneral``, ``MultiHeadAttention``), and apply the same plan to an
``nnx.Optimizer`` so training continues. For Linen, call the core functions on
``{"params": ...}`` with ``lambda v, x: model.apply(v, x)`` and rebuild the module with
``report.features``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxslim import _tree, splice
from jaxslim._checks import caller, public
from jaxslim.splice._remove import Plan, apply_plan_for, make_plan

__all__ = [
    "model_fn",
    "trace_model",
    "remove_channels_model",
    "prune_channels_model",
    "apply_plan_model",
    "sync_features",
    "fold_batchnorm_model",
    "widen_model",
    "fold_all_model",
    "Identity",
]

# Earlier names (``_module`` suffix), kept as deprecated aliases; ``jaxslim.flax.quant`` uses
# ``_model`` (``quantize_model``, ``qat_model``) and so does this module now.
_DEPRECATED = {
    "module_fn": "model_fn",
    "trace_module": "trace_model",
    "remove_channels_module": "remove_channels_model",
    "prune_channels_module": "prune_channels_model",
    "apply_plan_module": "apply_plan_model",
    "fold_batchnorm_module": "fold_batchnorm_model",
    "widen_module": "widen_model",
    "fold_all_module": "fold_all_model",
}


class Identity(nnx.Module):
    """``x -> x``: the stand-in for a dropped block or a folded batch norm."""

    def __call__(self, x, *args, **kwargs):
        return x


@public("flax.splice.model_fn")
def model_fn(model: nnx.Module) -> tuple[Any, Any]:
    """``(fn, state)`` with ``fn(state, *args) = model(*args)``, for the core splice functions.

    ``fn`` syncs the feature attributes of the merged copy with the state's shapes
    (:func:`sync_features`: ``num_heads``, ``qkv_features``, ``in_features`` ...), so it runs on
    a state whose arrays were cut, as the in-place functions leave the model; this is also what
    lets ``trace``'s re-trace check see that those sizes follow the parameters.
    """
    graphdef, state = nnx.split(model)

    def fn(s, *args):
        m = nnx.merge(graphdef, s)
        sync_features(m)
        return m(*args)

    return fn, state


@public("flax.splice.trace_model")
def trace_model(model: nnx.Module, *example_args: Any) -> list[splice.Group]:
    """:func:`jaxslim.splice.trace` for an NNX module; paths are its state paths
    (``"layers/0/kernel"``). Put the module in the mode you will run (``model.eval()``).

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> m = nnx.Sequential(nnx.Linear(2, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 1, rngs=nnx.Rngs(1)))
    >>> [g.paths for g in trace_model(m, jnp.ones((1, 2))) if g.removable]
    [('layers/0/bias', 'layers/0/kernel', 'layers/1/kernel')]
    """
    _check_model(model)
    fn, state = model_fn(model)
    return splice.trace(fn, state, *example_args)


def _set_features(module: Any) -> None:
    if isinstance(module, nnx.Conv | nnx.ConvTranspose):
        k = module.kernel.get_value()
        old_out, g = module.out_features, getattr(module, "feature_group_count", 1)
        if g > 1 and k.shape[-1] != old_out:
            mult = old_out // g
            if k.shape[-1] % mult == 0:
                module.feature_group_count = k.shape[-1] // mult
        module.in_features = k.shape[-2] * getattr(module, "feature_group_count", 1)
        module.out_features = k.shape[-1]
        if hasattr(module, "kernel_shape"):
            module.kernel_shape = tuple(k.shape)
    elif isinstance(module, nnx.LinearGeneral):
        k = module.kernel.get_value()
        n_in = len(module.in_features)
        module.in_features = tuple(k.shape[:n_in])
        module.out_features = tuple(k.shape[n_in:])
    elif isinstance(module, nnx.Linear):
        module.in_features, module.out_features = module.kernel.get_value().shape
    elif isinstance(module, nnx.BatchNorm | nnx.LayerNorm | nnx.RMSNorm):
        arr = next(
            v.get_value()
            for v in (getattr(module, n, None) for n in ("scale", "bias", "mean"))
            if v is not None
        )
        module.num_features = arr.shape[-1]
    elif isinstance(module, nnx.Embed):
        module.num_embeddings, module.features = module.embedding.get_value().shape
    elif isinstance(module, nnx.MultiHeadAttention):
        q = module.query.kernel.get_value()  # (in, heads, head_dim)
        module.in_features = q.shape[0]
        module.num_heads, module.head_dim = q.shape[1], q.shape[2]
        module.qkv_features = q.shape[1] * q.shape[2]
        module.out_features = module.out.kernel.get_value().shape[-1]
        module.in_kv_features = module.key.kernel.get_value().shape[0]


@public("flax.splice.sync_features")
def sync_features(model: nnx.Module) -> None:
    """Sets every layer's feature attributes from its arrays' shapes (after surgery)."""
    for _, module in nnx.iter_modules(model):
        _set_features(module)


def _check_model(model: Any) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(f"{caller()}: model must be an nnx.Module, got {type(model).__name__}")


def _check_optimizer(optimizer: Any) -> None:
    if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(
            f"{caller()}: optimizer must be an nnx.Optimizer or None, "
            f"got {type(optimizer).__name__}"
        )


def _apply_plan_model(model, plan, optimizer) -> None:
    _check_model(model)
    _check_optimizer(optimizer)
    _, state = nnx.split(model)
    new = apply_plan_for(state, plan, suffix=False)
    new_opt = None
    if optimizer is not None:  # computed before anything changes: all or nothing
        new_opt = apply_plan_for(nnx.state(optimizer), plan, suffix=True)
    nnx.update(model, new)
    sync_features(model)
    if new_opt is not None:
        nnx.update(optimizer, new_opt)


@public("flax.splice.apply_plan_model")
def apply_plan_model(
    model: nnx.Module, plan: Plan, *, optimizer: nnx.Optimizer | None = None
) -> None:
    """Applies ``plan`` to the model's state in place (and to ``optimizer``'s moments).

    The optimizer state is matched by path suffix (``opt_state/0/mu/<param path>``). Both
    shrunk trees are computed before either is written, so a bad plan changes nothing.
    """
    _apply_plan_model(model, plan, optimizer)


@public("flax.splice.remove_channels_model")
def remove_channels_model(
    model: nnx.Module,
    group: splice.Group,
    keep: Sequence[int],
    *,
    optimizer: nnx.Optimizer | None = None,
) -> None:
    """:func:`jaxslim.splice.remove_channels` on an NNX module, in place, features updated.

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> m = nnx.Sequential(nnx.Linear(2, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 1, rngs=nnx.Rngs(1)))
    >>> g = [g for g in trace_model(m, jnp.ones((1, 2))) if g.removable][0]
    >>> remove_channels_model(m, g, [0, 1, 3])
    >>> m.layers[0].out_features, m.layers[1].in_features, m(jnp.ones((1, 2))).shape
    (3, 3, (1, 1))
    """
    if not isinstance(group, splice.Group):
        raise TypeError(
            f"{caller()}: group must be a splice.Group from trace_model(), got "
            f"{type(group).__name__}"
        )
    _apply_plan_model(model, make_plan([group], [keep]), optimizer)


@public("flax.splice.prune_channels_model")
def prune_channels_model(
    model: nnx.Module,
    *example_args: Any,
    sparsity: float,
    optimizer: nnx.Optimizer | None = None,
    **kwargs: Any,
) -> splice.SpliceReport:
    """:func:`jaxslim.splice.prune_channels` on an NNX module, in place; returns the report.

    ``kwargs`` go to ``prune_channels`` (``score``, ``grads``, ``where``, ``round_to``,
    ``groups``). With ``optimizer`` its state shrinks with the parameters.
    """
    _check_model(model)
    _check_optimizer(optimizer)
    fn, state = model_fn(model)
    _, report = splice.prune_channels(fn, state, *example_args, sparsity=sparsity, **kwargs)
    _apply_plan_model(model, report.plan, optimizer)
    return report


@public("flax.splice.fold_batchnorm_model")
def fold_batchnorm_model(layer: nnx.Linear | nnx.Conv, bn: nnx.BatchNorm) -> None:
    """Folds ``bn`` (which must follow ``layer``) into ``layer`` in place; replace ``bn`` by
    :class:`Identity` afterwards (``model.bn = Identity()``). Invalid statistics raise as in
    :func:`jaxslim.splice.fold_batchnorm`, before ``layer`` changes."""
    if not isinstance(layer, nnx.Linear | nnx.Conv):
        raise TypeError(f"{caller()}: layer must be an nnx.Linear or nnx.Conv, got {layer!r}")
    if not isinstance(bn, nnx.BatchNorm):
        raise TypeError(f"{caller()}: bn must be an nnx.BatchNorm, got {type(bn).__name__}")
    k = layer.kernel.get_value()
    b = layer.bias.get_value() if layer.bias is not None else None
    get = lambda name: None if getattr(bn, name, None) is None else getattr(bn, name).get_value()
    w, b = splice.fold_batchnorm(
        k, b, get("scale"), get("bias"), bn.mean.get_value(), bn.var.get_value(), eps=bn.epsilon
    )
    layer.kernel.set_value(w)
    if layer.bias is None:
        layer.bias = nnx.Param(b)
        layer.use_bias = True
    else:
        layer.bias.set_value(b)


@public("flax.splice.widen_model")
def widen_model(
    layer1: nnx.Linear | nnx.Conv,
    layer2: nnx.Linear | nnx.Conv,
    new_width: int,
    *,
    key: jax.Array | None = None,
    between: Sequence[nnx.Module] = (),
    noise: float = 0.0,
) -> None:
    """Net2WiderNet on two NNX layers in place: ``layer1``'s outputs grow to ``new_width``.

    ``between`` are per-channel modules on the hidden units (a ``BatchNorm``), widened by
    replication too. The function is unchanged when ``noise == 0``.
    """
    for name, layer in (("layer1", layer1), ("layer2", layer2)):
        if not isinstance(layer, nnx.Linear | nnx.Conv):
            raise TypeError(
                f"flax.splice.widen_model: {name} must be an nnx.Linear or nnx.Conv, got "
                f"{type(layer).__name__}"
            )
    b1 = layer1.bias.get_value() if layer1.bias is not None else None
    names = ("scale", "bias", "mean", "var")
    extra = [
        getattr(m, n).get_value() for m in between for n in names if getattr(m, n, None) is not None
    ]
    out = splice.widen(
        layer1.kernel.get_value(),
        b1,
        layer2.kernel.get_value(),
        new_width,
        key=key,
        noise=noise,
        extra=tuple(extra),
    )
    layer1.kernel.set_value(out[0])
    layer2.kernel.set_value(out[2])
    if b1 is not None:
        layer1.bias.set_value(out[1])
    it = iter(out[3:])
    for m in between:
        for n in names:
            if getattr(m, n, None) is not None:
                getattr(m, n).set_value(next(it))
    for m in (layer1, layer2, *between):
        _set_features(m)


def count_params(model: nnx.Module) -> int:
    """Number of entries of the module's ``nnx.Param`` arrays."""
    return sum(
        math.prod(x.shape)
        for x in jax.tree.leaves(nnx.state(model, nnx.Param))
        if hasattr(x, "shape") and jnp.issubdtype(x.dtype, jnp.floating)
    )


def _get(model: Any, path: str) -> Any:
    """The submodule at a state path (``"blocks/0/linear"``): attributes, and integer or string
    items of ``nnx.List``/``nnx.Sequential``/``nnx.Dict``/list attributes."""
    node = model
    for k in path.split("/") if path else ():
        node = _child(node, k, path)
    return node


def _child(node: Any, k: str, path: str) -> Any:
    if isinstance(k, str) and not k.lstrip("-").isdigit() and hasattr(node, k):
        return getattr(node, k)
    for key in (int(k), k) if k.lstrip("-").isdigit() else (k,):
        try:
            return node[key]
        except (KeyError, IndexError, TypeError, AttributeError):
            continue
    raise ValueError(
        f"{caller()}: {path!r} is not in the model (no attribute or item {k!r} in a "
        f"{type(node).__name__})"
    )


def _replace(model: Any, path: str, new: Any) -> None:
    parent, _, last = path.rpartition("/")
    node = _get(model, parent)
    _child(node, last, path)  # raises if missing
    if last.lstrip("-").isdigit() and not hasattr(node, last):
        node[int(last)] = new
    elif hasattr(node, last):
        setattr(node, last, new)
    else:
        node[last] = new


@public("flax.splice.fold_all_model")
def fold_all_model(
    model: nnx.Module, *example_args: Any, fuse: bool = True
) -> list[splice.Fold | splice.Fuse]:
    """Folds every batch norm (and fuses every linear pair) found in an NNX module, in place.

    Runs :func:`jaxslim.splice.find_foldable` on the module (put it in inference mode first:
    ``model.eval()``), then :func:`~jaxslim.splice.fold_all` and, with ``fuse``,
    :func:`~jaxslim.splice.fuse_all`. Each folded norm and each fused-away second layer is replaced
    by :class:`Identity`; the kept layers get the new kernels and biases (a bias is created where
    a layer had none) and their feature attributes are updated. Returns the records applied.

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> m = nnx.Sequential(nnx.Linear(2, 4, rngs=nnx.Rngs(0)),
    ...                    nnx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(1)))
    >>> [type(r).__name__ for r in fold_all_model(m, jnp.ones((1, 2)))]
    ['Fold']
    >>> type(m.layers[1]).__name__, m(jnp.ones((1, 2))).shape
    ('Identity', (1, 4))
    """
    _check_model(model)
    fn, state = model_fn(model)
    found = splice.find_foldable(fn, state, *example_args)
    if not fuse:
        found = [r for r in found if isinstance(r, splice.Fold)]
    new = splice.fold_all(state, found)
    new = splice.fuse_all(new, found)
    leaves = dict(_tree.leaves_with_paths(new))
    gone: set[str] = set()
    for r in found:
        gone.update(r.absorbed)
        if isinstance(r, splice.Fuse):
            gone.update(p for p in r.second if p is not None)
    modules: dict[str, None] = {}
    for path in sorted(gone):
        module = path.rpartition("/")[0]
        owned = [p for p, _ in _tree.leaves_with_paths(nnx.state(_get(model, module)))]
        left = [p for p in owned if f"{module}/{p}" not in gone]
        if left:
            raise ValueError(
                f"{caller()}: module {module!r} keeps {left} after folding; "
                "only whole modules (a BatchNorm, a fused-away Linear) can be removed"
            )
        modules[module] = None
    kept = [r.kernel if isinstance(r, splice.Fold) else r.first[0] for r in found]
    for kernel in kept:
        module = kernel.rpartition("/")[0]
        layer = _get(model, module)
        layer.kernel.set_value(leaves[kernel])
        b = leaves[f"{module}/bias" if module else "bias"]
        if getattr(layer, "bias", None) is None:
            layer.bias = nnx.Param(b)
            layer.use_bias = True
        else:
            layer.bias.set_value(b)
        _set_features(layer)
    for module in modules:
        _replace(model, module, Identity())
    return found


def _deprecated(old: str, new: Callable[..., Any]) -> Callable[..., Any]:
    def alias(*args: Any, **kwargs: Any) -> Any:
        if new is apply_plan_model and len(args) == 3:  # old form: (model, plan, optimizer)
            kwargs["optimizer"] = args[2]
            args = args[:2]
        if new is remove_channels_model and len(args) == 4:
            kwargs["optimizer"] = args[3]
            args = args[:3]
        if new is widen_model and len(args) == 4:  # old form: (layer1, layer2, width, key)
            kwargs["key"] = args[3]
            args = args[:3]
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old
    alias.__doc__ = f"Deprecated alias of :func:`{new.__name__}`."
    return alias


def __getattr__(name: str) -> Any:
    """The deprecated ``_module`` names: a ``DeprecationWarning``, then the ``_model`` one."""
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(
            f"jaxslim.flax.splice.{name} is deprecated; use {new} (jaxslim.flax uses the "
            "_model suffix throughout)",
            DeprecationWarning,
            stacklevel=2,
        )
        return _deprecated(name, globals()[new])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
