"""``block_influence``: how much each residual block changes its input, and what dropping it costs.

Two scores per block, higher = more important:

* ``cosine``: Block Influence of ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language
  Models are More Redundant Than You Expect"), ``BI_i = 1 - E[cos(h_i, h_{i+1})]`` over tokens,
  ``h_i`` the residual stream entering block ``i``;
* ``ablation``: ``E[loss(params without block i)] - E[loss(params)]``, the loss increase when the
  block is replaced by the identity (:func:`jaxslim.splice.drop_layer`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxslim import _tree
from jaxslim._checks import caller, count_nonfinite, public
from jaxslim.splice._surgery import check_index, drop_layer, split_block, stack_size


def check_blocks(params: Any, blocks: Sequence[Any], axis: int = 0) -> tuple[Any, ...]:
    """Validates :func:`drop_layer` specs up front: each path must be in ``params``, and a
    ``(path, index)`` spec must name a scanned stack (one layer count on ``axis``) and a layer
    in it."""
    if isinstance(blocks, str) or not isinstance(blocks, Sequence):
        raise TypeError(
            f"{caller()}: blocks must be a list of paths ('blocks/0', ...) or (path, index) "
            f"pairs, got {type(blocks).__name__} {blocks!r}"
        )
    for blk in blocks:
        path, index = split_block(blk)
        _tree.get_path(params, path)
        if index is not None:
            n, inside = stack_size(params, path, axis)
            shape = _tree.get_path(params, inside[0]).shape
            check_index(path, index, n, inside[0], shape, axis)
    return tuple(blocks)


def loss_and_hiddens(out: Any, i: int) -> tuple[float, list[jax.Array]]:
    """Checks ``fn(params, batch_i) -> (loss, hiddens)``; hiddens in float32."""
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise TypeError(
            f"{caller()}: fn(params, batch) must return (loss, hiddens), got {type(out).__name__}"
        )
    value, hiddens = out
    if hasattr(hiddens, "ndim") and hasattr(hiddens, "shape") and hiddens.ndim >= 2:
        hiddens = [hiddens[j] for j in range(hiddens.shape[0])]  # a stacked (n + 1, ..., d)
    if not isinstance(hiddens, Sequence):
        raise TypeError(
            f"{caller()}: the hiddens fn returns must be a list of arrays, got "
            f"{type(hiddens).__name__}"
        )
    if jnp.size(value) != 1:
        raise TypeError(f"{caller()}: the loss must be a scalar, got shape {jnp.shape(value)}")
    loss = float(jnp.reshape(value, ()))
    if not np.isfinite(loss):
        raise ValueError(f"{caller()}: fn's loss on batch {i} is {loss}; scores need finite losses")
    hs = [jnp.asarray(h, jnp.float32) for h in hiddens]
    for j, h in enumerate(hs):
        if h.shape != hs[0].shape:
            raise ValueError(
                f"{caller()}: hiddens[{j}] has shape {h.shape} but hiddens[0] has {hs[0].shape}; "
                "the residual stream keeps one shape"
            )
        if count_nonfinite(h):
            raise ValueError(f"{caller()}: hiddens[{j}] on batch {i} holds NaN or inf")
    return loss, hs


class Influence(NamedTuple):
    """Per-block scores, in the order of ``blocks``."""

    blocks: tuple[Any, ...]
    cosine: np.ndarray
    ablation: np.ndarray


@public("splice.block_influence")
def block_influence(
    fn: Callable[..., tuple[jax.Array, Sequence[jax.Array]]],
    params: Any,
    batches: Iterable[Any],
    blocks: Sequence[str | tuple[str, int]],
    *,
    axis: int = 0,
    renumber: bool = False,
    keep: str | None = None,
) -> Influence:
    """Scores residual blocks for removal: ShortGPT Block Influence and the ablation loss gap.

    ``fn(params, batch) -> (loss, hiddens)``, where ``hiddens`` has ``len(blocks) + 1`` arrays of
    shape ``(..., d)``: ``hiddens[i]`` enters block ``i`` and ``hiddens[i + 1]`` leaves it. ``fn``
    must also run on ``drop_layer(params, block)`` (iterate over the blocks present, or over a
    scanned stack's layer axis); only the loss is used there. ``blocks`` are
    :func:`drop_layer` specs: a path (``"blocks/2"``; integer-keyed NNX states and their
    ``nnx.to_pure_dict`` form included) or ``(path, index)`` for a scanned stack.

    Scanned stacks (``nnx.scan`` over a module made under ``nnx.vmap``: every leaf under
    ``"blocks"`` has a leading layer axis of size ``n``): score every layer with
    ``blocks = [("blocks", i) for i in range(n)]`` (``axis=`` names another layer axis); each
    ablation slices one layer out, ``drop_layer(params, "blocks", index=i, axis=axis)``. ``fn``
    scans over whatever length the stack has and returns the scan's per-layer outputs as the
    hidden states: ``hiddens`` may be a list or one array ``(len(blocks) + 1, ..., d)``, e.g.
    ``jnp.concatenate([x[None], ys])`` for the scan's stacked outputs ``ys``
    (``jaxslim.demo.lm.apply_fn`` and ``lm.block_specs`` do this for the LM workbench).

    Hugging Face Flax and Linen models look their blocks up by number and check them against
    the config, so ``fn`` must build the model for the layers ``params`` holds, and the
    ablations renumber the blocks left (``renumber=True``, ``keep=`` as for
    :func:`drop_layer`)::

        def fn(p, tokens):
            n = len(p["model"]["layers"])
            model = FlaxLlamaForCausalLM(config_with(num_hidden_layers=n), _do_init=False)
            out = model(tokens, params=p, output_hidden_states=True)
            return loss(out.logits, tokens), out.hidden_states

    An ``fn`` that fails on the smaller params raises ``ValueError`` saying so.

    Raises ``ValueError`` for a block path not in ``params``, a ``(path, index)`` whose path
    is not a scanned stack (a list of blocks, leaves with different sizes on ``axis``) or
    an index outside it, no batches, a non-finite loss or
    hidden state (the scores would be NaN), or a count of hidden states other than
    ``len(blocks) + 1``; ``TypeError`` when ``fn`` does not return ``(loss, hiddens)``.

    Returns:
      :class:`Influence` with ``cosine`` ``= 1 - mean cos(h_i, h_{i+1})`` and ``ablation``
      ``= mean loss without the block - mean loss``, both ``(len(blocks),)`` float64. Low scores
      mark the blocks to drop first.

    >>> import jax.numpy as jnp
    >>> def fn(p, x):
    ...     hs = [x]
    ...     for w in p["blocks"]:
    ...         hs.append(hs[-1] + hs[-1] @ w)
    ...     return jnp.mean(hs[-1] ** 2), hs
    >>> p = {"blocks": [jnp.zeros((2, 2)), jnp.eye(2)]}
    >>> inf = block_influence(fn, p, [jnp.ones((3, 2))], ["blocks/0", "blocks/1"])
    >>> inf.cosine.round(6).tolist(), inf.ablation.round(6).tolist()
    ([0.0, 0.0], [0.0, -3.0])

    The same blocks as one scanned stack (a ``(2, 2, 2)`` array, the layer axis first):

    >>> def scan_fn(p, x):
    ...     def body(h, w):
    ...         h = h + h @ w
    ...         return h, h
    ...     y, ys = jax.lax.scan(body, x, p["blocks"])
    ...     return jnp.mean(y**2), jnp.concatenate([x[None], ys])
    >>> q = {"blocks": jnp.stack(p["blocks"])}
    >>> inf = block_influence(scan_fn, q, [jnp.ones((3, 2))], [("blocks", 0), ("blocks", 1)])
    >>> inf.blocks, inf.ablation.round(6).tolist()
    ((('blocks', 0), ('blocks', 1)), [0.0, -3.0])
    """
    blocks = check_blocks(params, blocks, axis)
    batches = list(batches)
    if not batches:
        raise ValueError("splice.block_influence: batches is empty")
    jfn = jax.jit(fn)
    cos = np.zeros(len(blocks))
    base = 0.0
    for n, batch in enumerate(batches):
        loss, hiddens = loss_and_hiddens(jfn(params, batch), n)
        if len(hiddens) != len(blocks) + 1:
            raise ValueError(
                f"splice.block_influence: fn returned {len(hiddens)} hidden states for "
                f"{len(blocks)} blocks; expected {len(blocks) + 1} (input of each block + output)"
            )
        for i in range(len(blocks)):
            a, b = hiddens[i], hiddens[i + 1]
            cos[i] += float(jnp.mean(optax.losses.cosine_similarity(a, b, epsilon=1e-12)))
        base += loss
    cos /= len(batches)
    base /= len(batches)
    ablation = np.zeros(len(blocks))
    for i, blk in enumerate(blocks):
        if isinstance(blk, tuple):
            smaller = drop_layer(params, blk, axis=axis)
        else:
            smaller = drop_layer(params, blk, axis=axis, renumber=renumber, keep=keep)
        losses = []
        for n, b in enumerate(batches):
            try:
                out = jfn(smaller, b)
            except Exception as e:  # noqa: BLE001 - fn's own error, explained
                raise ValueError(_cannot_run(blk, renumber, e)) from e
            losses.append(loss_and_hiddens(out, n)[0])
        ablation[i] = np.mean(losses) - base
    return Influence(blocks, 1.0 - cos, ablation)


def _cannot_run(block: Any, renumber: bool, e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    fix = (
        "build the model inside fn for the layers the params hold (a Hugging Face or Linen "
        "model made for n layers looks up every one: its config's num_hidden_layers = "
        "len(params[...]['layers']))"
    )
    if not renumber:
        fix += " and pass renumber=True so the blocks left are numbered 0 .. n - 2"
    return (
        f"splice.block_influence: fn cannot run without block {block!r} ({type(e).__name__}: "
        f"{msg}); fn must accept drop_layer(params, block{', renumber=True' if renumber else ''})"
        f": {fix}"
    )
