"""GGUF export: files read back with gguf-py and dequantized with its own `gguf.quants` equal
jaxslim's `quant.dequantize` (bit for bit with `gguf_quantize`, up to the documented f16 scale
rounding otherwise); metadata; bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from jaxslim import quant  # noqa: E402
from jaxslim.checkpoints import _names  # noqa: E402
from jaxslim.checkpoints._export_gguf import (  # noqa: E402
    export_gguf,
    gguf_quantize,
    gguf_spec,
)
from jaxslim.quant._spec import layout  # noqa: E402

HD = 8
HF = {
    "model_type": "llama",
    "head_dim": HD,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


KERNELS = ("q", "k", "v", "o", "gate", "up", "down")


def quantize_tree(params, fn):
    out = dict(params, layers=[dict(lp) for lp in params["layers"]])
    for lp in out["layers"]:
        for k in KERNELS:
            lp[k] = fn(lp[k])
    return out


def read(path):
    r = gguf.GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    return r, tensors


def hf_value(leaf, name, heads):
    """jaxslim's value of a leaf in GGUF row order (HF layout, llama q/k permutation)."""
    x = leaf.dequantize() if isinstance(leaf, quant.QArray) else leaf
    x = np.asarray(x, np.float32)
    x = x.T if x.ndim == 2 and not name.startswith("token_embd") else x
    return x if heads is None else _names.permute_qk(x, heads)


def heads_of(name, heads, kv):
    if ".attn_q." in name:
        return heads
    if ".attn_k." in name:
        return kv
    return None


def leaf_of(params, name):
    table = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate"}
    table.update(ffn_up="up", ffn_down="down", attn_norm="attn_norm", ffn_norm="mlp_norm")
    if name.startswith("blk."):
        _, i, kind, _ = name.split(".")
        return params["layers"][int(i)][table[kind]]
    return {"token_embd": params["embed"], "output_norm": params["norm"]}.get(
        name.split(".")[0], params.get("lm_head")
    )


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0", "q4_1"])
def test_gguf_quantize_is_bit_exact(tmp_path, type_name, tiny):
    params = tiny(jax.random.key(0))
    qp = quantize_tree(params, lambda x: gguf_quantize(x, type_name))
    qp["embed"] = gguf_quantize(params["embed"], type_name, embedding=True)
    out = export_gguf(tmp_path / "m.gguf", qp, HF)
    _, tensors = read(tmp_path / "m.gguf")
    assert set(out) == set(tensors)
    for name, t in tensors.items():
        got = gguf_dequantize(t.data, t.tensor_type).reshape(np.asarray(t.data).shape[0], -1)
        want = hf_value(leaf_of(qp, name), name, heads_of(name, 4, 2))
        got = got.reshape(want.shape)
        np.testing.assert_array_equal(got, want, err_msg=name)  # bit for bit
        assert out[name].max_abs_error == 0.0
        if name.endswith("attn_q.weight") or name == "token_embd.weight":
            assert t.tensor_type.name == type_name.upper()


@pytest.mark.parametrize(
    "spec,gtype",
    [
        (quant.QuantSpec(8, axis=-1, group_size=32), "Q8_0"),
        (quant.QuantSpec(8, axis=-1), "Q8_0"),  # per channel: one scale repeated per block
        (quant.QuantSpec(8), "Q8_0"),  # per tensor
        (quant.QuantSpec(4, axis=-1, group_size=32), "Q4_0"),
        (quant.QuantSpec(4, axis=-1, group_size=64), "Q4_0"),
        (quant.QuantSpec(4, axis=-1, group_size=32, symmetric=False), "Q4_1"),
        (quant.QuantSpec(4, axis=-1, group_size=32, signed=False, symmetric=False), "Q4_1"),
        (quant.QuantSpec(4, axis=-1, group_size=32, signed=False), "Q4_1"),  # z = 7
        (quant.QuantSpec(8, axis=-1, group_size=32, signed=False), "Q8_0"),  # z = 128
    ],
)
def test_float32_scales_differ_by_exactly_the_f16_rounding(tmp_path, spec, gtype, tiny):
    params = tiny(jax.random.key(1), layers=1)
    qp = quantize_tree(params, lambda x: quant.quantize(x, spec))
    out = export_gguf(tmp_path / "m.gguf", qp, HF)
    _, tensors = read(tmp_path / "m.gguf")
    for k in KERNELS:
        name = f"blk.0.{_names.hf_to_gguf_name(f'model.layers.0.{_suffix(k)}.weight')[6:]}"
        t = tensors[name]
        assert t.tensor_type.name == gtype
        q = qp["layers"][0][k]
        heads = heads_of(name, 4, 2)
        got = gguf_dequantize(t.data, t.tensor_type).reshape(q.shape[::-1])
        # The reference: jaxslim's codes with f16-rounded scales, in gguf-py's own arithmetic.
        codes = np.asarray(q.codes(), np.float32)
        lay = layout(q.spec, q.shape)
        s = np.asarray(lay.expand(np.asarray(q.scale)), np.float32)
        d = s.astype(np.float16).astype(np.float32)
        if q.zero_point is None:
            ref = codes * d
        else:
            z = np.asarray(lay.expand(np.asarray(q.zero_point)), np.float32)
            if gtype == "Q8_0":
                ref = (codes - z) * d
            else:
                m = ((q.spec.qmin - z) * d).astype(np.float16).astype(np.float32)
                ref = (codes - q.spec.qmin) * d + m
        ref = ref.T if heads is None else _names.permute_qk(ref.T, heads)
        np.testing.assert_array_equal(got, ref, err_msg=name)
        # ... and against quant.dequantize: within |c - z| * |f16(s) - s| (+ Q4_1's m rounding).
        want = hf_value(q, name, heads)
        bound = np.abs(codes - (0 if q.zero_point is None else z)) * np.abs(d - s)
        if gtype == "Q4_1":
            bound = bound + np.abs(m - (q.spec.qmin - z) * d)
        bound = bound.T if heads is None else _names.permute_qk(bound.T, heads)
        # (plus one float32 rounding of each product)
        assert np.all(np.abs(got - want) <= bound + 2.0**-23 * np.abs(want)), name
        assert out[name].max_abs_error == pytest.approx(float(np.abs(got - want).max()))
        assert out[name].max_abs_error <= 1e-3 * float(np.abs(want).max())


def _suffix(k):
    return {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }[k]


def test_q4_0_nibble_layout_matches_gguf_quants(tmp_path, tiny):
    # gguf-py's own Q4_0 quantizer on data whose block max is -8 * d: same codes, same bytes.
    x = np.zeros((64, 32), np.float32)  # Flax (in=64, out=32): HF rows of 64
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, size=x.shape)
    codes[0] = -8  # every block's absmax is -8 * d, so gguf-py's d = max / -8 is ours
    codes[32] = -8
    x = (codes * 0.125).astype(np.float32)
    q = quant.quantize(jnp.asarray(x), gguf_spec("q4_0"), scale=np.float32(0.125))
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)
    params = tiny(jax.random.key(2), d=64, layers=1, heads=4, kv=4, f=96)
    params["layers"][0]["v"] = q
    export_gguf(tmp_path / "m.gguf", params, HF)
    _, tensors = read(tmp_path / "m.gguf")
    ref = gguf.quants.quantize(x.T, gguf.GGMLQuantizationType.Q4_0)
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_v.weight"].data), ref)


def test_metadata_and_pruned_sizes(tmp_path, tiny):
    params = tiny(jax.random.key(3), vocab=64, d=64, layers=3, heads=2, kv=1, f=40, tied=True)
    tok = {
        "model": {
            "type": "BPE",
            "vocab": {chr(65 + i): i for i in range(60)},
            "merges": ["A B", ["C", "D"]],
        },
        "added_tokens": [{"id": 60, "content": "<s>", "special": True}],
    }
    export_gguf(tmp_path / "m.gguf", params, HF, tokenizer_json=json.dumps(tok), name="tiny")
    r, tensors = read(tmp_path / "m.gguf")

    def val(key):
        return r.fields[key].contents()

    assert val("general.architecture") == "llama"
    assert val("llama.embedding_length") == 64
    assert val("llama.block_count") == 3
    assert val("llama.feed_forward_length") == 40
    assert val("llama.attention.head_count") == 2
    assert val("llama.attention.head_count_kv") == 1
    assert val("llama.rope.dimension_count") == HD
    assert val("llama.context_length") == 128
    assert val("llama.vocab_size") == 64
    assert val("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert val("tokenizer.ggml.model") == "gpt2"
    toks = val("tokenizer.ggml.tokens")
    assert len(toks) == 64 and toks[0] == "A" and toks[60] == "<s>" and toks[63] == "[PAD63]"
    assert list(val("tokenizer.ggml.token_type"))[59:] == [1, 3, 5, 5, 5]
    assert val("tokenizer.ggml.merges") == ["A B", "C D"]
    assert val("tokenizer.ggml.bos_token_id") == 1
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tuple(tensors["blk.0.ffn_gate.weight"].shape) == (64, 40)  # GGUF order: [in, out]
    assert tensors["output_norm.weight"].tensor_type.name == "F32"


def test_copies_tokenizer_from_gguf(tmp_path, tiny):
    params = tiny(jax.random.key(4), vocab=61, layers=1)
    tok = {"model": {"type": "BPE", "vocab": {chr(65 + i): i for i in range(61)}, "merges": []}}
    export_gguf(tmp_path / "a.gguf", params, HF, tokenizer_json=json.dumps(tok))
    export_gguf(tmp_path / "b.gguf", params, HF, tokenizer_gguf=str(tmp_path / "a.gguf"))
    a, _ = read(tmp_path / "a.gguf")
    b, _ = read(tmp_path / "b.gguf")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.model"):
        assert b.fields[key].types == a.fields[key].types
        assert list(b.fields[key].contents()) == list(a.fields[key].contents())
    params = tiny(jax.random.key(4), vocab=64, layers=1)
    with pytest.raises(ValueError, match="61 tokens but the embedding 64 rows"):
        export_gguf(tmp_path / "c.gguf", params, HF, tokenizer_gguf=str(tmp_path / "a.gguf"))
    assert not (tmp_path / "c.gguf").exists() and not (tmp_path / "c.gguf.partial").exists()


def test_f16_and_qwen2_arch(tmp_path, tiny):
    params = tiny(jax.random.key(5), layers=1)
    lp = params["layers"][0]
    lp["q_bias"], lp["k_bias"], lp["v_bias"] = jnp.ones(32), jnp.ones(16), jnp.ones(16)
    out = export_gguf(tmp_path / "m.gguf", params, dict(HF, model_type="qwen2"), dtype="f16")
    r, tensors = read(tmp_path / "m.gguf")
    assert r.fields["general.architecture"].contents() == "qwen2"
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_q.bias"].tensor_type.name == "F32"
    got = np.asarray(tensors["blk.0.attn_q.weight"].data, np.float32)
    np.testing.assert_array_equal(got, np.asarray(lp["q"]).T.astype(np.float16))  # no permute
    assert 0 < out["blk.0.attn_q.weight"].max_abs_error < 1e-3


@pytest.mark.parametrize(
    "spec,match",
    [
        (quant.QuantSpec(4, axis=-1, group_size=16), r"blocks are 32.*QuantSpec\(bits=4.*Q4_0"),
        (quant.QuantSpec(3, axis=-1, group_size=32), r"3-bit.*Q4_0"),
        (quant.QuantSpec(4, fmt="nf4", axis=-1, group_size=64), r"nf4.*Q4_0"),
        (quant.QuantSpec(8, axis=-1, symmetric=False), r"symmetric.*Q8_0"),
        (quant.QuantSpec(8, axis=0), r"input axis.*Q8_0"),  # a scale per input channel
    ],
)
def test_unsupported_spec_names_leaf_and_nearest(tmp_path, spec, match, tiny):
    params = tiny(jax.random.key(6), layers=1)
    params["layers"][0]["up"] = quant.quantize(params["layers"][0]["up"], spec)
    with pytest.raises(ValueError, match="'layers/0/up'.*" + match):
        export_gguf(tmp_path / "m.gguf", params, HF)


def test_bad_input(tmp_path, tiny):
    params = tiny(jax.random.key(7), layers=1)
    with pytest.raises(ValueError, match="does not exist"):
        export_gguf(tmp_path / "nope" / "m.gguf", params, HF)
    broken = dict(params, layers=[{k: v for k, v in params["layers"][0].items() if k != "up"}])
    with pytest.raises(ValueError, match=r"layers/0 has no \['up'\]"):
        export_gguf(tmp_path / "m.gguf", broken, HF)
    with pytest.raises(ValueError, match="has no 'embed'"):
        export_gguf(tmp_path / "m.gguf", {"layers": params["layers"]}, HF)
    odd = dict(params, layers=[dict(params["layers"][0], mystery=jnp.ones(3))])
    with pytest.raises(ValueError, match="mystery"):
        export_gguf(tmp_path / "m.gguf", odd, HF)
    bad = dict(params, layers=[dict(params["layers"][0], o=jnp.ones((5, 64)))])
    with pytest.raises(ValueError, match="layers/0/o has shape"):
        export_gguf(tmp_path / "m.gguf", bad, HF)
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(tmp_path / "m.gguf", params, HF, dtype="q4_0")
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        export_gguf(tmp_path / "m.gguf", params, dict(HF, model_type="gpt2"))
    with pytest.raises(ValueError, match="GGUF type must be"):
        gguf_spec("q5_k")
    assert not list(tmp_path.iterdir())
