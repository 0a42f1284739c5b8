"""Hugging Face ``transformers`` Flax models as real clients (tiny configs, nothing downloaded).

``FlaxLlamaForCausalLM`` (grouped-query attention, RoPE, RMSNorm) and ``FlaxGPT2LMHeadModel``
(fused ``c_attn``, LayerNorm, ``(out, in)`` Conv1D kernels): ``splice.trace`` finds their groups,
MLP channels and whole layers that were zeroed are removed and the model rebuilt from a config
derived from the removal (``intermediate_size`` / ``n_inner``, ``num_hidden_layers`` / ``n_layer``)
gives the same logits.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    transformers = pytest.importorskip("transformers")
    from transformers import (
        FlaxGPT2LMHeadModel,
        FlaxLlamaForCausalLM,
        GPT2Config,
        LlamaConfig,
    )

from jaxslim import _tree, splice

pytestmark = [
    pytest.mark.standard_promotion,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def _hf_numerics():
    """Transformers' Flax code relies on implicit rank and dtype promotion."""
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        yield


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)


def llama_config(**kw):
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaConfig(**{**base, **kw})


def gpt2_config(**kw):
    base = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48)
    return GPT2Config(**{**base, **kw})


@pytest.fixture(scope="module")
def llama():
    return FlaxLlamaForCausalLM(llama_config(), seed=0)


@pytest.fixture(scope="module")
def gpt2():
    return FlaxGPT2LMHeadModel(gpt2_config(), seed=0)


def logits_fn(model):
    return lambda p, x: model(x, params=p).logits


def _mlp_groups(groups, marker):
    return [g for g in groups if g.removable and all(marker in p for p in g.paths)]


def test_llama_trace_finds_residual_mlp_and_kv_head_groups(llama):
    groups = splice.trace(logits_fn(llama), llama.params, TOKENS)
    residual = [g for g in groups if ("model/embed_tokens/embedding", 1) in list(g)]
    assert len(residual) == 1 and residual[0].size == 32
    assert "lm_head/kernel" in residual[0].paths
    mlp = _mlp_groups(groups, "/mlp/")
    assert len(mlp) == 2 and all(g.size == 48 for g in mlp)
    for i, g in enumerate(mlp):
        assert set(g.paths) == {
            f"model/layers/{i}/mlp/{k}_proj/kernel" for k in ("gate", "up", "down")
        }
    kv = [g for g in groups if any(p.endswith("k_proj/kernel") for p in g.paths) and g.size == 2]
    assert len(kv) == 2
    for g in kv:
        assert {p.rsplit("/", 2)[-2] for p in g.paths} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def _zero_and_remove(params, groups, n_keep):
    """Zeros all but ``n_keep`` channels (the first ones) of every group, then removes them."""
    keep = list(range(n_keep))
    zeroed = params
    for g in groups:
        for m in g.members:
            leaf = _tree.subtree(zeroed, m.path)
            idx = [slice(None)] * leaf.ndim
            idx[m.axis] = slice(n_keep, None)
            zeroed = _set(zeroed, m.path, leaf.at[tuple(idx)].set(0))
    plan = splice.make_plan(groups, [keep] * len(groups))
    return zeroed, splice.apply_plan(zeroed, plan)


def _set(tree, path, value):
    keys = path.split("/")
    if len(keys) == 1:
        return {**tree, keys[0]: value}
    return {**tree, keys[0]: _set(tree[keys[0]], "/".join(keys[1:]), value)}


def test_llama_mlp_channels_removed_and_model_rebuilt(llama):
    groups = _mlp_groups(splice.trace(logits_fn(llama), llama.params, TOKENS), "/mlp/")
    zeroed, small = _zero_and_remove(llama.params, groups, 24)
    rebuilt = FlaxLlamaForCausalLM(llama_config(intermediate_size=24), _do_init=False)
    np.testing.assert_allclose(
        rebuilt(TOKENS, params=small).logits,
        llama(TOKENS, params=zeroed).logits,
        atol=1e-5,
        rtol=1e-5,
    )
    assert small["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"].shape == (24, 32)


def test_gpt2_mlp_channels_removed_and_model_rebuilt(gpt2):
    groups = _mlp_groups(splice.trace(logits_fn(gpt2), gpt2.params, TOKENS), "/mlp/")
    assert len(groups) == 2 and all(g.size == 48 for g in groups)
    for i, g in enumerate(groups):  # the c_fc bias goes with its channels
        assert f"transformer/h/{i}/mlp/c_fc/bias" in g.paths
    zeroed, small = _zero_and_remove(gpt2.params, groups, 16)
    rebuilt = FlaxGPT2LMHeadModel(gpt2_config(n_inner=16), _do_init=False)
    np.testing.assert_allclose(
        rebuilt(TOKENS, params=small).logits,
        gpt2(TOKENS, params=zeroed).logits,
        atol=1e-5,
        rtol=1e-5,
    )


def test_gpt2_fused_qkv_heads_are_reported_not_guessed(gpt2):
    groups = splice.trace(logits_fn(gpt2), gpt2.params, TOKENS)
    attn = [g for g in groups if any("attn/c_proj/kernel" in p for p in g.paths) and g.size < 32]
    assert attn and all(not g.removable and g.reasons for g in attn)


def test_jit_and_eager_trace_agree(llama):
    fn = logits_fn(llama)
    a = [str(g) for g in splice.trace(fn, llama.params, TOKENS)]
    b = [str(g) for g in splice.trace(jax.jit(fn), llama.params, TOKENS)]
    assert a == b


def test_llama_query_heads_within_a_kv_group_are_removable_and_head_dim_is_not(llama):
    """GQA: the kv head group holds its query group (q/k/v/o), the query heads within a group
    are their own removable group (the ``jnp.repeat`` of kv heads does not pin them), head_dim is
    not offered. HF Llama derives head_dim = hidden_size / num_attention_heads, so its config
    cannot express fewer heads: the groups are found, rebuilding needs a model that can."""
    groups = splice.trace(logits_fn(llama), llama.params, TOKENS)
    for i in range(2):
        pre = f"model/layers/{i}/self_attn/"
        (kv,) = [g for g in groups if (pre + "k_proj/kernel", 1) in list(g)]
        assert kv.removable and kv.size == 2
        (q,) = [g for g in groups if set(g.paths) == {pre + "q_proj/kernel", pre + "o_proj/kernel"}]
        assert q.removable and q.size == 2
        assert {(m.factors, m.factor) for m in q.members} == {((2, 2, 8), 1)}
        inner = [g for g in groups if (pre + "v_proj/kernel", 1) in list(g) and g is not kv]
        assert inner and all(not g.removable and "within-head" in g.reasons[0] for g in inner)


def _zero_block(params, layer, leaves):
    out = params
    for name in leaves:
        path = f"model/layers/{layer}/{name}/kernel"
        out = _set(out, path, jnp.zeros_like(_tree.subtree(out, path)))
    return out


def test_llama_layer_zeroed_dropped_renumbered_and_rebuilt():
    model = FlaxLlamaForCausalLM(llama_config(num_hidden_layers=3), seed=1)
    zeroed = _zero_block(model.params, 1, ("self_attn/o_proj", "mlp/down_proj"))  # identity
    small = splice.drop_layer(zeroed, "model/layers/1", renumber=True)
    assert sorted(small["model"]["layers"]) == ["0", "1"]
    rebuilt = FlaxLlamaForCausalLM(llama_config(num_hidden_layers=2), _do_init=False)
    np.testing.assert_allclose(
        rebuilt(TOKENS, params=small).logits,
        model(TOKENS, params=zeroed).logits,
        atol=1e-5,
        rtol=1e-5,
    )


def test_gpt2_layer_zeroed_dropped_renumbered_and_rebuilt():
    """GPT-2 holds its blocks under ``transformer/h`` with string-int keys; its ``c_proj``
    projections carry a bias, so a block is the identity once both projections (kernel and
    bias) are zero. Dropping it with ``renumber=True`` gives the params of ``n_layer - 1``."""
    model = FlaxGPT2LMHeadModel(gpt2_config(n_layer=3), seed=1)
    zeroed = model.params
    for name in ("attn/c_proj/kernel", "attn/c_proj/bias", "mlp/c_proj/kernel", "mlp/c_proj/bias"):
        path = f"transformer/h/1/{name}"
        zeroed = _set(zeroed, path, jnp.zeros_like(_tree.subtree(zeroed, path)))
    small = splice.drop_layer(zeroed, "transformer/h/1", renumber=True)
    assert sorted(small["transformer"]["h"]) == ["0", "1"]
    h = model.params["transformer"]["h"]
    np.testing.assert_array_equal(  # the old block 2 is the new block 1, bit for bit
        small["transformer"]["h"]["1"]["attn"]["c_attn"]["kernel"],
        h["2"]["attn"]["c_attn"]["kernel"],
    )
    rebuilt = FlaxGPT2LMHeadModel(gpt2_config(n_layer=2), _do_init=False)
    dense = model(TOKENS, params=zeroed).logits
    for fn in (logits_fn(rebuilt), jax.jit(logits_fn(rebuilt))):
        np.testing.assert_allclose(fn(small, TOKENS), dense, atol=1e-5, rtol=1e-5)
    # not vacuous: block 1 was live before it was zeroed
    assert float(jnp.max(jnp.abs(model(TOKENS).logits - dense))) > 1e-2


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_int8_per_channel_every_projection_keeps_logits(name, llama, gpt2):
    """int8 per output channel on every projection (GPT-2's Conv1D kernels are (out, in): the
    layout comes from the jaxpr), run through ``quant.quantized`` on the QArray tree."""
    from jaxslim import quant
    from jaxslim.quant import QuantSpec

    model = {"llama": llama, "gpt2": gpt2}[name]
    fn = logits_fn(model)
    proj = r"(proj|c_attn|c_fc)/kernel$"
    qparams, rep = quant.oneshot(fn, model.params, [TOKENS], [(proj, QuantSpec(8, axis=-1))])
    kernels = list(rep.rows)
    per_layer = 7 if name == "llama" else 4
    assert len(kernels) == 2 * per_layer
    leaves = jax.tree_util.tree_leaves_with_path(qparams, is_leaf=quant.is_qarray)
    quantized = [_tree.path_str(p) for p, x in leaves if quant.is_qarray(x)]
    assert len(quantized) == 2 * per_layer and all("/h/" in p or "/layers/" in p for p in quantized)
    ref = fn(model.params, TOKENS)
    out = quant.quantized(fn)(qparams, TOKENS)
    deq = fn(quant.dequantize_params(qparams), TOKENS)
    np.testing.assert_allclose(out, deq, atol=1e-4, rtol=1e-4)
    # int8 per channel: logits move by well under 1 % of their spread
    assert float(jnp.max(jnp.abs(out - ref))) < 0.01 * float(jnp.std(ref)) + 1e-3
