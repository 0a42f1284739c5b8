"""``rotate_model``: QuaRot's function-preserving rotations of a ``jaxslim.models`` decoder.

An orthogonal ``Q`` (``Q Q^T = I``) applied to the residual stream changes no output when every
kernel that reads the stream is rotated back (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al.
2024, learns ``Q``). RMSNorm commutes with ``Q`` once its scale is folded away: ``||x Q|| = ||x||``,
so ``x Q / rms(x Q) = (x / rms(x)) Q``. A LayerNorm subtracts the mean, which ``Q`` does not
preserve, so it cannot be rotated. With the kernels in Flax ``(in, out)`` layout (``y = x W``):

* each RMSNorm scale ``w`` is folded into the kernels it feeds, ``W -> diag(w) W`` (q/k/v after
  ``attn_norm``, gate/up after ``mlp_norm``, the head after ``norm``), and set to 1;
* ``embed E -> E Q``; kernels reading the stream ``W -> Q^T W`` (q, k, v, gate, up, the head);
  kernels writing it ``W -> W Q`` (o, down; and ``o_bias -> o_bias Q``);
* per head, values and the o-projection input: ``Wv -> Wv (I (x) Qh)``, ``v_bias`` likewise,
  ``Wo -> (I (x) Qh)^T Wo``, exact because attention mixes values across tokens only;
* online (``online=True``): the MLP activation before ``down`` is rotated by ``Qf = diag(s_f) H_F``
  in the model (leaf ``down_hadamard = s_f``) and ``Wdown -> Qf^T Wdown Q``; queries and keys are
  rotated per head after RoPE by ``diag(s_k) H_hd`` (leaf ``qk_hadamard = s_k``), which leaves
  ``q k^T`` unchanged and spreads key outliers before KV-cache quantization. q and k are not
  rotated offline inside the head: RoPE (and Qwen3's per-head q/k RMSNorm) sit between the
  kernel and the product.

``Q = quant.random_hadamard(d, seed)``, ``Qh = random_hadamard(hd, seed + 1)``, ``s_f =
random_signs(F, seed + 2)``, ``s_k = random_signs(hd, seed + 3)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxslim.quant._hadamard import hadamard_matrix, random_signs
from jaxslim.quant._qarray import is_qarray

_FN = "quant.rotate_model"
_LAYER = {"attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down"}
_OPTIONAL = {"q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm"}
_ONLINE = ("down_hadamard", "qk_hadamard")


def _rotation(n: int, seed: int, what: str) -> np.ndarray:
    try:
        return random_signs(n, seed)[:, None] * hadamard_matrix(n)
    except ValueError as e:
        raise ValueError(f"{_FN}: {what}: {e}") from e


def _f64(x: Any, path: str) -> np.ndarray:
    if is_qarray(x):
        raise TypeError(
            f"{_FN}: {path} is a QArray; rotate the float model first, then quantize it"
        )
    return np.asarray(x, np.float64)


def _check_layer(lp: Any, prefix: str, config: Any) -> None:
    if not isinstance(lp, Mapping):
        raise ValueError(f"{_FN}: {prefix} must be a dict of leaves, got {type(lp).__name__}")
    for name in lp:
        if name in _ONLINE:
            raise ValueError(
                f"{_FN}: {prefix}{name} is present: this tree is rotated already (rotating it "
                "again would need the two online rotations composed); rotate the original tree"
            )
        if name in _LAYER or name in _OPTIONAL:
            continue
        if "norm" in name:
            raise ValueError(
                f"{_FN}: {prefix}{name}: a norm with a bias or a mean subtraction (LayerNorm) is "
                "not invariant under a rotation of the residual stream (it subtracts the mean, "
                "which Q does not preserve); only RMSNorm can be rotated"
            )
        raise ValueError(
            f"{_FN}: {prefix}{name} is not a leaf of a jaxslim.models layer; no rotation is "
            f"defined for it (known leaves: {sorted(_LAYER | _OPTIONAL)})"
        )
    missing = sorted(n for n in _LAYER if n not in lp)
    if missing:
        raise ValueError(f"{_FN}: {prefix} has no leaves {missing}; see jaxslim.models.forward")
    if config.qk_norm and not {"q_norm", "k_norm"} <= set(lp):
        raise ValueError(f"{_FN}: config.qk_norm is set but {prefix} has no q_norm/k_norm")


def rotate_model(
    params: Mapping[str, Any], config: Any, *, seed: int = 0, online: bool = True
) -> tuple[dict[str, Any], Any]:
    """Rotates a ``jaxslim.models`` decoder (QuaRot): same function, activations without outliers.

    Folds every RMSNorm scale into the kernels it feeds (the norms become 1), rotates the
    residual stream by ``Q = random_hadamard(d, seed)`` (``E -> E Q``, readers ``W -> Q^T W``,
    writers ``W -> W Q``), values and the o-projection input per head by ``Qh``, and with
    ``online`` the MLP activation before ``down`` and the keys and queries after RoPE by online
    Hadamard transforms the model applies (module docstring). ``models.forward(rotated, x,
    new_config)`` equals ``models.forward(params, x, config)`` up to float rounding; the rotated
    activations have no outlier channels, so per-token 4-bit activations and a 4-bit KV cache
    (``models.forward(..., activations=TokenQuant(4), kv=TokenQuant(4, ...))``) and 4-bit weights
    of the rotated kernels lose far less (QuaRot: LLaMA-2-70B at W4A4KV4 within 0.29 WikiText
    perplexity).

    Tied embeddings: the head becomes ``Q^T diag(w_norm) E^T`` and ``E`` becomes ``E Q``, which
    are no longer each other's transpose unless the final norm's scale is all ones; the head is
    then untied (a new ``lm_head`` leaf, ``tie_word_embeddings=False`` in the returned config).

    Computed on the host in float64, each leaf returned in its own dtype. The online leaves
    (``down_hadamard`` (F,), ``qk_hadamard`` (hd,), signs) are read by ``jaxslim.models``;
    ``online=False`` leaves the architecture plain (exportable to HF) with only the offline
    rotations.

    Args:
      params: a ``jaxslim.models`` parameter tree (float leaves; rotate before quantizing).
      config: its ``models.Config``.
      seed: picks the random signs of the rotations.
      online: add the online Hadamard transforms (``down`` input, keys and queries).

    Returns:
      ``(rotated_params, config)``: ``config`` with ``tie_word_embeddings=False`` when the head
      was untied, else unchanged.

    Raises:
      ValueError: a width that has no Hadamard matrix (``d``, ``head_dim``, ``F`` must be ``2^k``
        or ``2^k * m``, ``m`` in 12, 20, 28, 36, 40), a leaf no rotation is defined for (a
        LayerNorm's bias, an unknown leaf), a tree rotated already.
      TypeError: a ``QArray`` leaf.

    >>> import jax
    >>> from jaxslim import models, quant
    >>> cfg = models.Config(head_dim=8, tie_word_embeddings=True)
    >>> p = models.init(jax.random.key(0), cfg, vocab=32, hidden=24, layers=1, heads=3,
    ...                 kv_heads=1, intermediate=40)
    >>> rp, rcfg = quant.rotate_model(p, cfg, seed=0)
    >>> x = jnp.array([[1, 2, 3]])
    >>> bool(jnp.allclose(models.forward(rp, x, rcfg), models.forward(p, x, cfg), atol=1e-6))
    True
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"{_FN}: seed must be an int, got {seed!r}")
    for attr in ("head_dim", "tie_word_embeddings", "qk_norm", "attention_bias", "o_bias"):
        if not hasattr(config, attr):
            raise TypeError(f"{_FN}: config must be a jaxslim.models.Config, got {config!r}")
    if not isinstance(params, Mapping) or not {"embed", "layers", "norm"} <= set(params):
        raise ValueError(
            f"{_FN}: params must be a jaxslim.models tree with embed, layers and norm; got "
            f"{sorted(params) if isinstance(params, Mapping) else type(params).__name__}"
        )
    layers = params["layers"]
    if not isinstance(layers, Sequence):
        raise ValueError(f"{_FN}: 'layers' must be a list of per-layer dicts")
    emb = _f64(params["embed"], "embed")
    if emb.ndim != 2:
        raise ValueError(f"{_FN}: 'embed' must be (vocab, d), got shape {emb.shape}")
    d, hd = emb.shape[1], config.head_dim
    q_res = _rotation(d, seed, f"hidden width d={d} (embed)")
    q_head = _rotation(hd, seed + 1, f"head_dim={hd}")
    out: dict[str, Any] = {k: v for k, v in params.items() if k != "layers"}
    cast = lambda x, like: jnp.asarray(x, jnp.asarray(like).dtype)
    out["embed"] = cast(emb @ q_res, params["embed"])
    new_layers = []
    for i, lp in enumerate(layers):
        prefix = f"layers/{i}/"
        _check_layer(lp, prefix, config)
        w = {k: _f64(v, prefix + k) for k, v in lp.items()}
        r = {}  # the rotated leaves, float64
        for norm, names in (("attn_norm", ("q", "k", "v")), ("mlp_norm", ("gate", "up"))):
            for n in names:  # Q^T diag(w) W
                r[n] = q_res.T @ (w[norm][:, None] * w[n])
            r[norm] = np.ones_like(w[norm])
        kvh, heads = w["v"].shape[1] // hd, w["o"].shape[0] // hd
        r["v"] = (r["v"].reshape(d, kvh, hd) @ q_head).reshape(d, kvh * hd)
        if "v_bias" in w:
            r["v_bias"] = (w["v_bias"].reshape(kvh, hd) @ q_head).reshape(-1)
        wo = np.einsum("ji,hjd->hid", q_head, w["o"].reshape(heads, hd, d))
        r["o"] = wo.reshape(heads * hd, d) @ q_res
        if "o_bias" in w:
            r["o_bias"] = w["o_bias"] @ q_res
        r["down"] = w["down"] @ q_res
        nl = dict(lp)
        nl.update({k: cast(v, lp[k]) for k, v in r.items()})
        if online:
            f = w["down"].shape[0]
            s_f = random_signs(f, seed + 2)
            q_mlp = _rotation(f, seed + 2, f"{prefix}down: MLP width F={f}")  # diag(s_f) H_F
            nl["down"] = cast(q_mlp.T @ r["down"], lp["down"])
            nl["down_hadamard"] = cast(s_f, lp["down"])
            nl["qk_hadamard"] = cast(random_signs(hd, seed + 3), lp["q"])
        new_layers.append(nl)
    out["layers"] = new_layers
    wn = _f64(params["norm"], "norm")
    new_config = config
    if config.tie_word_embeddings:
        head, like = emb.T, params["embed"]
        if not np.all(wn == 1):
            new_config = dataclasses.replace(config, tie_word_embeddings=False)
    else:
        head, like = _f64(params["lm_head"], "lm_head"), params["lm_head"]
    if not new_config.tie_word_embeddings:
        out["lm_head"] = cast(q_res.T @ (wn[:, None] * head), like)
    out["norm"] = cast(np.ones_like(wn), params["norm"])
    return out, new_config
