"""The `compressed-tensors` package (vLLM's and tpu-inference's checkpoint format) reads
jaxslim's exports: its config model validates our `quantization_config`, its own compressors
(`PackedQuantizationCompressor`, `IntQuantizationCompressor`) decompress our tensors to exactly
`jaxslim.quant.dequantize` (float32 scales; float16 scales: off by exactly the scale rounding;
FP8 per channel, per tensor and in 128 x 128 blocks through `FloatQuantizationCompressor`),
and transformers loads the directories (plain and compressed) and computes `models.forward`'s
logits."""

import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("compressed_tensors")
pytest.importorskip("safetensors")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from jaxslim import models, quant  # noqa: E402
from jaxslim.checkpoints._export_safetensors import (  # noqa: E402
    export_compressed_tensors,
    export_hf,
)

KERNELS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def tiny(*, vocab=96, d=256, layers=2, heads=8, kv=4, hd=32, f=512, seed=0):
    ks = iter(jax.random.split(jax.random.key(seed), 64))

    def w(*shape, scale=None):
        scale = shape[0] ** -0.5 if scale is None else scale
        return scale * jax.random.normal(next(ks), shape, jnp.float32)

    params = {
        "embed": w(vocab, d, scale=1.0),
        "layers": [
            {
                "attn_norm": 1.0 + w(d, scale=0.1),
                "q": w(d, heads * hd),
                "k": w(d, kv * hd),
                "v": w(d, kv * hd),
                "o": w(heads * hd, d),
                "mlp_norm": 1.0 + w(d, scale=0.1),
                "gate": w(d, f),
                "up": w(d, f),
                "down": w(f, d),
            }
            for _ in range(layers)
        ],
        "norm": 1.0 + w(d, scale=0.1),
        "lm_head": w(d, vocab),
    }
    config = models.Config(head_dim=hd, rope_theta=10000.0, rms_norm_eps=1e-5)
    return params, config


def quantize_tree(params, spec):
    out = dict(params, layers=[dict(lp) for lp in params["layers"]])
    for lp in out["layers"]:
        for k in KERNELS:
            lp[k] = quant.quantize(lp[k], spec)
    return out


SPECS = {
    "w4a16": quant.QuantSpec(4, axis=-1, group_size=128),
    "w4a16-asym": quant.QuantSpec(4, axis=-1, group_size=128, symmetric=False),
    "w4a16-uint-asym-g64": quant.QuantSpec(
        4, axis=-1, group_size=64, signed=False, symmetric=False
    ),
    "w4a16-channel": quant.QuantSpec(4, axis=-1),
    "w8a8": quant.QuantSpec(8, axis=-1),
    "fp8-channel": quant.QuantSpec(fmt="e4m3", axis=-1),
    "fp8-tensor": quant.QuantSpec(fmt="e4m3"),
    "fp8-block": quant.QuantSpec(fmt="e4m3", group_size=(128, 128)),
}


def decompress_with_package(directory):
    """Every quantized Linear decompressed by compressed-tensors' own compressor for its scheme:
    `{module name: weight (out, in) float32}`."""
    import json

    cfg = json.loads(pathlib.Path(directory, "config.json").read_text())
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])
    tensors = load_file(str(pathlib.Path(directory, "model.safetensors")))
    out = {}
    for scheme in qc.config_groups.values():
        fmt = scheme.format or qc.format
        compressor = BaseCompressor.get_value_from_registry(fmt)
        names = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight_scale")}
        for name in sorted(names):
            local = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
            if not _targeted(name, scheme.targets):
                continue
            out[name] = compressor.decompress(local, scheme)["weight"].float().numpy()
    return out


def _targeted(name, targets):
    import re

    for t in targets:
        if t == "Linear" or t == name or (t.startswith("re:") and re.match(t[3:], name)):
            return True
    return False


@pytest.mark.parametrize("kind", list(SPECS))
def test_package_decompresses_to_dequantize(tmp_path, kind):
    params, config = tiny()
    qp = quantize_tree(params, SPECS[kind])
    d = export_compressed_tensors(tmp_path / kind, qp, config)
    got = decompress_with_package(d)
    assert len(got) == 2 * len(KERNELS)
    for i, lp in enumerate(qp["layers"]):
        for k, stem in KERNELS.items():
            want = np.asarray(lp[k].dequantize()).T
            np.testing.assert_array_equal(got[f"model.layers.{i}.{stem}"], want)  # exact


def test_float16_scales_error_is_the_scale_rounding(tmp_path):
    params, config = tiny(layers=1)
    qp = quantize_tree(params, SPECS["w4a16"])
    d = export_compressed_tensors(tmp_path / "ct", qp, config, scale_dtype="float16")
    got = decompress_with_package(d)
    worst = 0.0
    for k, stem in KERNELS.items():
        q = qp["layers"][0][k]
        want = np.asarray(q.dequantize()).T
        codes = np.asarray(q.codes(), np.float32).T
        s = np.asarray(q.scale)[:, 0, :].T.repeat(128, axis=1)
        s16 = s.astype(np.float16).astype(np.float32)
        # compressed-tensors dequantizes in the scale's dtype (float16): one more f16 rounding.
        bound = np.abs(codes) * np.abs(s16 - s) + 2.0**-11 * np.abs(codes * s16)
        diff = np.abs(got[f"model.layers.0.{stem}"] - want)
        assert np.all(diff <= bound + 1e-12), stem
        worst = max(worst, float(diff.max() / np.abs(want).max()))
    print(f"\nfloat16 scales: max |ct - jaxslim| / max |w| = {worst:.2e}")
    assert worst < 2.0**-10


def _hf_logits(directory, ids, **kw):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        # "You passed `quantization_config` ... the one from the model will be used": expected.
        warnings.filterwarnings("ignore", "You passed `quantization_config`", UserWarning)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kw)
    model.eval()
    with torch.no_grad():
        return model, model(torch.tensor([ids])).logits[0].numpy()


def test_transformers_loads_export_hf(tmp_path):
    params, config = tiny()
    ids = list(range(1, 40))
    d = export_hf(tmp_path / "hf", params, config)
    _, got = _hf_logits(d, ids)
    want = np.asarray(models.forward(params, jnp.asarray([ids]), config)[0])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("kind", ["w4a16", "w4a16-asym", "w8a8", "fp8-block"])
def test_transformers_loads_compressed(tmp_path, kind):
    from transformers.utils.quantization_config import CompressedTensorsConfig

    params, config = tiny()
    qp = quantize_tree(params, SPECS[kind])
    d = export_compressed_tensors(tmp_path / kind, qp, config)
    ids = list(range(1, 40))
    model, got = _hf_logits(d, ids, quantization_config=CompressedTensorsConfig(dequantize=True))
    for i, lp in enumerate(qp["layers"]):
        for k, stem in KERNELS.items():
            mod = model.get_submodule(f"model.layers.{i}.{stem}")
            np.testing.assert_array_equal(
                mod.weight.detach().float().numpy(), np.asarray(lp[k].dequantize()).T
            )
    want = np.asarray(models.forward(quant.dequantize_params(qp), jnp.asarray([ids]), config)[0])
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"\n{kind}: transformers vs jaxslim logits, max rel diff {rel:.2e}")
    # dequantize=True: transformers runs the decompressed weights (W8A8's dynamic activation
    # quantization is vLLM's kernel, not applied here), so only the summation order differs.
    assert rel < 1e-5


def test_fp8_blocks_of_widths_128_does_not_divide(tmp_path):
    # d 192 and MLP 320: the last block of each axis is shorter, as compressed-tensors reads it
    params, config = tiny(d=192, heads=6, kv=2, f=320, layers=1)
    qp = quantize_tree(params, SPECS["fp8-block"])
    d = export_compressed_tensors(tmp_path / "fp8", qp, config)
    got = decompress_with_package(d)
    for k, stem in KERNELS.items():
        want = np.asarray(qp["layers"][0][k].dequantize()).T
        np.testing.assert_array_equal(got[f"model.layers.0.{stem}"], want)
    import json

    cfg = json.loads(pathlib.Path(d, "config.json").read_text())["quantization_config"]
    (group,) = cfg["config_groups"].values()
    assert cfg["format"] == "float-quantized"
    assert group["weights"]["strategy"] == "block"
    assert group["weights"]["block_structure"] == [128, 128]
    assert group["input_activations"] is None
