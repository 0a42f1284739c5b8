"""``quant.quantize_params`` with a grouped spec and the default ``where``: only contracted 2-D
kernels are quantized, on real Hugging Face Flax model code (BERT, OPT, BART; tiny random
configs, nothing downloaded). Token-type and position tables, embeddings and BART's
``final_logits_bias`` stay float; every Dense kernel is quantized exactly as ``quant.quantize``
does it; the model's output stays close to the float model's."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import _tree, quant
from jaxslim.quant import QArray, QuantSpec

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    transformers = pytest.importorskip("transformers")
    from transformers import (
        BartConfig,
        BertConfig,
        FlaxBartForConditionalGeneration,
        FlaxBertModel,
        FlaxOPTForCausalLM,
        OPTConfig,
    )

pytestmark = [
    pytest.mark.standard_promotion,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

INT4_G32 = QuantSpec(4, group_size=32)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)


@pytest.fixture(scope="module", autouse=True)
def _hf_numerics():
    """Transformers' Flax code relies on implicit rank and dtype promotion."""
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        yield


def _bert():
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    m = FlaxBertModel(cfg, seed=0)
    return m, lambda p, x: m(x, params=p).last_hidden_state


def _opt():
    cfg = OPTConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=128,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=64,
    )
    m = FlaxOPTForCausalLM(cfg, seed=0)
    return m, lambda p, x: m(x, params=p).logits


def _bart():
    cfg = BartConfig(
        vocab_size=64,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
    )
    m = FlaxBartForConditionalGeneration(cfg, seed=0)
    return m, lambda p, x: m(x, decoder_input_ids=x, params=p).logits


MODELS = {"bert": _bert, "opt": _opt, "bart": _bart}
# The tables each model gathers rows of (and BART's (1, vocab) bias): never quantized.
FLOAT_2D = {
    "bert": [
        "embeddings/position_embeddings/embedding",
        "embeddings/token_type_embeddings/embedding",
        "embeddings/word_embeddings/embedding",
    ],
    "opt": ["model/decoder/embed_positions/embedding", "model/decoder/embed_tokens/embedding"],
    "bart": [
        "final_logits_bias",
        "model/decoder/embed_positions/embedding",
        "model/encoder/embed_positions/embedding",
        "model/shared/embedding",
    ],
}
# Relative L2 error of the output with int4 g32 kernels (measured: 0.008, 0.16, 0.004).
TOLERANCE = {"bert": 0.05, "opt": 0.3, "bart": 0.05}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    m, fn = MODELS[request.param]()
    return request.param, m.params, fn


def _leaves(tree):
    flat = jax.tree_util.tree_leaves_with_path(tree, is_leaf=quant.is_qarray)
    return {_tree.path_str(p): x for p, x in flat}


def test_with_fn_exactly_the_dense_kernels_are_quantized(model):
    name, params, fn = model
    q, report = quant.quantize_params(params, INT4_G32, fn=fn, example_args=(IDS,))
    before, after = _leaves(params), _leaves(q)
    # The independent reference: HF Flax names every nn.Dense weight "kernel", (in, out).
    kernels = {p for p, x in before.items() if p.endswith("/kernel") and x.ndim == 2}
    quantized = {p for p, x in after.items() if isinstance(x, QArray)}
    assert quantized == kernels and len(kernels) == {"bert": 13, "opt": 12, "bart": 16}[name]
    for p in kernels:  # bit-identical to quantize itself
        ref = quant.quantize(before[p], INT4_G32)
        np.testing.assert_array_equal(np.asarray(after[p].values), np.asarray(ref.values))
        np.testing.assert_array_equal(np.asarray(after[p].scale), np.asarray(ref.scale))
    assert (
        sorted(p for p, x in after.items() if not isinstance(x, QArray) and x.ndim == 2)
        == (FLOAT_2D[name])
    )
    for p, x in after.items():  # everything else untouched, bit for bit
        if p not in kernels:
            assert x is before[p]
    assert sum(r.spec is not None for r in report.rows) == len(kernels)


def test_quantized_model_stays_close_jitted_and_eager(model):
    name, params, fn = model
    q, _ = quant.quantize_params(params, INT4_G32, fn=fn, example_args=(IDS,))
    ref = fn(params, IDS)
    eager = fn(quant.dequantize_params(q), IDS)
    jitted = jax.jit(lambda q, x: fn(quant.dequantize_params(q), x))(q, IDS)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)
    err = float(jnp.linalg.norm(eager - ref) / jnp.linalg.norm(ref))
    assert 0 < err < TOLERANCE[name], err


def test_without_fn_the_shape_rule_leaves_small_tables_and_biases_float(model):
    """No function: 2-D leaves with a whole group of 32 along axis -2. BERT's token-type table
    (2, 64) and BART's final_logits_bias (1, 64) stay float; tables as large as a kernel cannot
    be told from one by shape (pass fn for those)."""
    name, params, _ = model
    q, _ = quant.quantize_params(params, INT4_G32)
    after = _leaves(q)
    float_2d = sorted(p for p, x in after.items() if not isinstance(x, QArray) and x.ndim == 2)
    assert (
        float_2d
        == {
            "bert": ["embeddings/token_type_embeddings/embedding"],
            "opt": [],
            "bart": ["final_logits_bias"],
        }[name]
    )
    assert all(x.ndim == 2 and x.shape[0] >= 32 for x in after.values() if isinstance(x, QArray))


def test_a_rule_naming_a_table_still_quantizes_it():
    """Only the default where is narrowed: a where= that names a leaf decides."""
    m, fn = _bert()
    tt = "embeddings/token_type_embeddings/embedding"
    rules = [(re.escape(tt), QuantSpec(4, axis=-1, group_size=32)), (None, INT4_G32)]
    q, _ = quant.quantize_params(m.params, rules, fn=fn, example_args=(IDS,))
    assert isinstance(_leaves(q)[tt], QArray)


def test_ungrouped_specs_keep_selecting_every_2d_leaf():
    """Per-channel int8 with the default where: unchanged, tables included."""
    m, _ = _bert()
    q, _ = quant.quantize_params(m.params, QuantSpec(8, axis=-1))
    after = _leaves(q)
    assert isinstance(after["embeddings/token_type_embeddings/embedding"], QArray)
    assert all(isinstance(x, QArray) for x in after.values() if x.ndim == 2)
