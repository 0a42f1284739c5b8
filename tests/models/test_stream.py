"""models.compress_streamed / load_streamed: layer-by-layer compression of a checkpoint equals the
in-memory one-shot methods with sequential calibration, and resumes bit for bit."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")
from safetensors.numpy import save_file  # noqa: E402

from jaxslim import models, prune, quant  # noqa: E402
from jaxslim.models._stream import compress_streamed, load_streamed  # noqa: E402

HF = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "vocab_size": 50,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
KERNELS = r"layers/\d+/(q|k|v|o|gate|up|down)$"
SPEC = quant.QuantSpec(4, axis=-1, group_size=16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 2-layer HF safetensors directory (float32, two shards) and its in-memory tree."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = models.Config.from_hf(HF)
    params = models.init(
        jax.random.key(0), cfg, vocab=50, hidden=32, layers=2, heads=4, kv_heads=2,
        intermediate=64, scale=0.3,
    )  # fmt: skip
    tensors = models.to_hf_tensors(params, cfg)
    names = sorted(tensors)
    half = {n: tensors[n] for n in names[: len(names) // 2]}
    rest = {n: tensors[n] for n in names[len(names) // 2 :]}
    save_file(half, str(d / "model-00001-of-00002.safetensors"))
    save_file(rest, str(d / "model-00002-of-00002.safetensors"))
    index = {n: "model-00001-of-00002.safetensors" for n in half}
    index |= {n: "model-00002-of-00002.safetensors" for n in rest}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    (d / "config.json").write_text(json.dumps(HF))
    loaded, cfg2, _ = models.load(d)
    return d, loaded, cfg2


CALIB = np.asarray(jax.random.randint(jax.random.key(1), (4, 12), 0, 50, jnp.int32))


def _fn(cfg):
    return lambda p, x: models.forward(p, x, cfg)


def _tree_equal(a, b):
    la = jax.tree_util.tree_leaves_with_path(a)
    lb = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    worst = 0.0
    for (p, x), (_, y) in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, p
        if not np.array_equal(x, y):
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y))))
    return worst


def _batches():
    return [CALIB[i : i + 2] for i in range(0, 4, 2)]


KW = dict(sparsity=0.5, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def pruned(ckpt, tmp_path_factory):
    """An uninterrupted SparseGPT 50 % streamed run."""
    out = tmp_path_factory.mktemp("pruned") / "o"
    res = compress_streamed(ckpt[0], out, CALIB, **KW)
    return out, res


def test_sparsegpt_streamed_equals_in_memory_sequential(ckpt, pruned):
    _, params, cfg = ckpt
    out, res = pruned
    assert res.names == ("layers.0", "layers.1") and not res.resumed
    assert [r[0].method.name for r in res.reports.values()] == ["sparsegpt"] * 2
    ref, _ = prune.oneshot(_fn(cfg), params, _batches(), 0.5, method=prune.SparseGPT(),
                           where=KERNELS, sequential=True)  # fmt: skip
    got, cfg2, tok = load_streamed(out)
    assert cfg2 == cfg and tok is None
    assert _tree_equal(got, ref) == 0.0  # bit for bit
    assert float(jnp.mean(got["layers"][1]["down"] == 0)) == 0.5


def test_gptq_streamed_equals_in_memory_sequential(ckpt, tmp_path):
    d, params, cfg = ckpt
    rules = [(KERNELS, SPEC)]
    compress_streamed(
        d, tmp_path / "o", CALIB, quant_rules=rules, quant_method=quant.GPTQ(), batch_size=2,
        progress=False,
    )  # fmt: skip
    ref, _ = quant.oneshot(_fn(cfg), params, _batches(), rules, method=quant.GPTQ())
    got, _, _ = load_streamed(tmp_path / "o")
    assert isinstance(got["layers"][1]["q"], quant.QArray)
    assert _tree_equal(got, ref) == 0.0
    logits = quant.quantized(_fn(cfg))(got, CALIB[:1])
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_gptq_qep_streamed_matches_in_memory_sequential(ckpt, tmp_path):
    # QEP across layers: the stream carries the float model's activations beside its own. The
    # in-memory path computes the pair in one program vmapped over (compressed, float) model,
    # the stream runs each layer alone: the statistics agree to float rounding, so layer 0 (no
    # quantized input yet) is bit-equal and later layers are equally good, not bit-equal.
    d, params, cfg = ckpt
    rules = [(KERNELS, quant.QuantSpec(3, axis=-1, group_size=16))]
    method = quant.GPTQ(qep=0.5)
    compress_streamed(
        d, tmp_path / "o", CALIB, quant_rules=rules, quant_method=method, batch_size=2,
        progress=False,
    )  # fmt: skip
    ref, _ = quant.oneshot(_fn(cfg), params, _batches(), rules, method=method)
    plain, _ = quant.oneshot(_fn(cfg), params, _batches(), rules, method=quant.GPTQ())
    got, _, _ = load_streamed(tmp_path / "o")
    for k in ("q", "k", "v", "o", "gate", "up", "down"):
        np.testing.assert_array_equal(got["layers"][0][k].values, ref["layers"][0][k].values)
    f = _fn(cfg)
    dense = f(params, CALIB)

    def error(p):
        out = f(quant.dequantize_params(p), CALIB)
        return float(jnp.linalg.norm(out - dense) / jnp.linalg.norm(dense))

    e_stream, e_mem, e_plain = error(got), error(ref), error(plain)
    assert abs(e_stream - e_mem) <= 0.1 * e_mem, (e_stream, e_mem)
    assert e_stream < 0.6 * e_plain and e_mem < 0.6 * e_plain, (e_stream, e_mem, e_plain)


class Stop(Exception):
    """Raised by a compress callback to interrupt a run."""


def test_interrupted_run_resumes_to_identical_files(ckpt, pruned, tmp_path, monkeypatch):
    d, kw, a = ckpt[0], KW, pruned[0]

    real = prune.oneshot
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise Stop
        return real(*a, **k)

    monkeypatch.setattr(prune, "oneshot", failing)
    with pytest.raises(Stop):
        compress_streamed(d, tmp_path / "b", CALIB, **kw)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["done"] == ["layers.0"]
    monkeypatch.setattr(prune, "oneshot", real)
    res = compress_streamed(d, tmp_path / "b", CALIB, **kw)
    assert res.resumed == ("layers.0",) and list(res.reports) == ["layers.1"]
    files = sorted(os.listdir(a))
    assert files == sorted(os.listdir(tmp_path / "b"))
    for f in files:
        assert (a / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    again = compress_streamed(d, tmp_path / "b", CALIB, **kw)  # finished: nothing left to do
    assert again.resumed == ("layers.0", "layers.1") and not again.reports


def test_other_recipe_or_calibration_in_the_same_directory_raises(ckpt, pruned):
    d, out = ckpt[0], pruned[0]
    with pytest.raises(ValueError, match=r"o'.*different recipe.*'sparsity': 0.25"):
        compress_streamed(d, out, CALIB, **{**KW, "sparsity": 0.25})
    with pytest.raises(ValueError, match=r"different recipe.*'tokens'"):
        compress_streamed(d, out, CALIB[:, ::-1], **KW)


def test_load_streamed_refuses_an_unfinished_run(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"blocks": ["layers.0"], "done": []}))
    with pytest.raises(ValueError, match=r"unfinished \(0 of 1 layers"):
        load_streamed(tmp_path)


def test_rules_selecting_layer_0_only_leave_layer_1_as_read(ckpt, tmp_path):
    """A layer no quantization rule selects is written as it was read."""
    path, loaded, _ = ckpt
    rules = [(r"^layers/0/(q|k|v|o|gate|up|down)$", quant.QuantSpec(8, axis=-1))]
    compress_streamed(path, tmp_path / "out", CALIB, quant_rules=rules, progress=False)
    out, _, _ = load_streamed(tmp_path / "out")
    assert all(
        isinstance(out["layers"][0][k], quant.QArray)
        for k in ("q", "k", "v", "o", "gate", "up", "down")
    )
    for name, leaf in out["layers"][1].items():  # float and bit-identical to the source
        assert not isinstance(leaf, quant.QArray), name
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(loaded["layers"][1][name]))


def test_per_kernel_sparsities_equal_in_memory_sequential_oneshot(ckpt, tmp_path):
    # prune.owl's form: {path: sparsity} over the whole tree; layer 1's v and all of layer 0's
    # kernels left out stay dense
    _, params, cfg = ckpt
    sparsity = {"layers/0/q": 0.25, "layers/0/down": 0.75, "layers/1/up": 0.5}
    compress_streamed(ckpt[0], tmp_path / "o", CALIB, sparsity=sparsity, batch_size=2,
                      progress=False)  # fmt: skip
    got, _, _ = load_streamed(tmp_path / "o")
    ref, _ = prune.oneshot(_fn(cfg), params, _batches(), sparsity, method=prune.SparseGPT(),
                           sequential=True)  # fmt: skip
    assert _tree_equal(got, ref) == 0.0  # bit for bit
    for path, s in sparsity.items():
        _, i, k = path.split("/")
        assert float(jnp.mean(got["layers"][int(i)][k] == 0)) == s
    np.testing.assert_array_equal(got["layers"][1]["v"], params["layers"][1]["v"])
    np.testing.assert_array_equal(got["layers"][0]["gate"], params["layers"][0]["gate"])


@pytest.mark.parametrize(
    "sparsity",
    [{"layers/2/q": 0.5}, {"layers/0/attn_norm": 0.5}, {"layer/0/q": 0.5}, {"layers/0/q/x": 0.5}],
)
def test_per_kernel_sparsity_paths_must_be_layer_kernels(ckpt, tmp_path, sparsity):
    with pytest.raises(
        ValueError, match=r"models.compress_streamed: sparsity names \[.*which are "
    ):
        compress_streamed(ckpt[0], tmp_path / "o", CALIB, sparsity=sparsity, progress=False)
