"""calibrate.stream: block-by-block compression with cached activations, resumable, sharded."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxslim import calibrate, prune, quant
from jaxslim.quant import storage

D, F, L = 16, 32, 3


def _block(p, batch):
    """A residual MLP block; the batch is ``(h, scale)``: ``scale`` is aux passed along."""
    h, scale = batch
    return h + jax.nn.relu(h @ p["up"]) @ p["down"] * scale


def _params(seed=0):
    keys = jax.random.split(jax.random.key(seed), 2 * L)
    return [
        {
            "up": 0.3 * jax.random.normal(keys[2 * i], (D, F)),
            "down": 0.3 * jax.random.normal(keys[2 * i + 1], (F, D)),
        }
        for i in range(L)
    ]


PARAMS = _params()
XS = [jax.random.normal(jax.random.key(9 + b), (24, D)) for b in range(2)]
SCALE = jnp.float32(0.5)


def _blocks(params=PARAMS, loaded=None):
    def load(i):
        if loaded is not None:
            loaded.append(i)
        return params[i]

    return [(f"block{i}", lambda i=i: load(i)) for i in range(len(params))]


def _full(ps, x):
    for p in ps:
        x = _block(p, (x, SCALE))
    return x


def _sparsegpt(p, hs):
    return prune.oneshot(_block, p, hs, 0.5, method=prune.SparseGPT())


def test_equals_sequential_oneshot_on_the_whole_model():
    res = calibrate.stream(_block, _blocks(), [(x, SCALE) for x in XS], _sparsegpt, progress=False)
    ref, _ = prune.oneshot(_full, PARAMS, XS, 0.5, method=prune.SparseGPT(), sequential=True)
    for got, want in zip(res.blocks, ref, strict=True):
        for k in ("up", "down"):
            np.testing.assert_array_equal(got[k], want[k])
    np.testing.assert_array_equal(res.hidden[0][0], _full(ref, XS[0]))
    assert res.hidden[0][1] is SCALE  # aux passed on
    assert list(res.reports) == ["block0", "block1", "block2"]
    assert res.peak_rss > 0 and set(res.seconds) == set(res.reports)


def _gptq(p, hs):
    return quant.oneshot(_block, p, hs, quant.QuantSpec(4, axis=-1), method=quant.GPTQ())


def test_quantized_blocks_feed_their_dequantized_weights_forward():
    hs = [(x, SCALE) for x in XS]
    res = calibrate.stream(_block, _blocks(), hs, _gptq, progress=False)
    assert isinstance(res.blocks[0]["up"], quant.QArray)
    ref, _ = quant.oneshot(_full, PARAMS, XS, quant.QuantSpec(4, axis=-1), method=quant.GPTQ())
    for got, want in zip(res.blocks, ref, strict=True):
        np.testing.assert_array_equal(got["up"].values, want["up"].values)
        np.testing.assert_array_equal(got["down"].scale, want["down"].scale)
    # run= the quantized dot instead: same codes for block 0, activations within float error
    res2 = calibrate.stream(
        _block, _blocks(), hs, _gptq, run=quant.quantized(_block), progress=False
    )
    np.testing.assert_array_equal(res2.blocks[0]["up"].values, res.blocks[0]["up"].values)
    np.testing.assert_allclose(res2.hidden[0][0], res.hidden[0][0], rtol=1e-4, atol=1e-4)


def _qep(p, hs, refs):
    spec = quant.QuantSpec(3, axis=-1)
    return quant.oneshot(_block, p, hs, spec, method=quant.GPTQ(qep=0.5), reference_batches=refs)


def test_reference_carries_the_float_activations_and_qep_equals_the_whole_model():
    hs = [(x, SCALE) for x in XS]
    seen = []

    def spy(p, hs, refs):
        seen.append([r[0] for r in refs])
        return _qep(p, hs, refs)

    res = calibrate.stream(_block, _blocks(), hs, spy, progress=False, reference=True)
    # the reference activations at block i are the float model's
    for i, refs in enumerate(seen):
        for x, r in zip(XS, refs, strict=True):
            np.testing.assert_allclose(r, _full(PARAMS[:i], x), rtol=1e-5, atol=1e-5)
    spec = quant.QuantSpec(3, axis=-1)
    ref, _ = quant.oneshot(_full, PARAMS, XS, spec, method=quant.GPTQ(qep=0.5))
    for got, want in zip(res.blocks, ref, strict=True):
        for k in ("up", "down"):
            np.testing.assert_array_equal(got[k].values, want[k].values)
            np.testing.assert_allclose(got[k].scale, want[k].scale, rtol=1e-6)


class Stop(Exception):
    """Raised by a compress callback to interrupt a run."""


def _run(out, compress=_gptq, **kw):
    return calibrate.stream(
        _block,
        kw.pop("blocks", None) or _blocks(),
        kw.pop("hidden", None) or [(x, SCALE) for x in XS],
        compress,
        out=out,
        save=storage.save_npz,
        load=storage.load_npz,
        recipe=kw.pop("recipe", {"method": quant.GPTQ(), "bits": 4}),
        progress=False,
        **kw,
    )


def test_interrupted_run_resumes_bit_for_bit(tmp_path):
    whole = _run(tmp_path / "a")
    calls = []

    def fails_on_block_2(p, hs):
        calls.append(1)
        if len(calls) == 2:
            raise Stop
        return _gptq(p, hs)

    with pytest.raises(Stop):
        _run(tmp_path / "b", fails_on_block_2)
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["done"] == ["block0"] and m["blocks"] == ["block0", "block1", "block2"]
    loaded = []
    res = _run(tmp_path / "b", blocks=_blocks(loaded=loaded))
    assert res.resumed == ("block0",) and loaded == [1, 2]  # block 0 is not read again
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == sorted(os.listdir(tmp_path / "b"))
    assert [f for f in files if "partial" in f] == []
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    np.testing.assert_array_equal(res.hidden[1][0], whole.hidden[1][0])
    assert res.blocks is None and set(res.reports) == {"block1", "block2"}


def test_mismatched_manifest_names_the_directory_and_the_difference(tmp_path):
    _run(tmp_path, compress=lambda p, hs: (p, None))
    with pytest.raises(ValueError, match=r"different recipe.*'bits': 8"):
        _run(tmp_path, recipe={"method": quant.GPTQ(), "bits": 8})
    with pytest.raises(ValueError, match=rf"{tmp_path}'.*different calibration data"):
        _run(tmp_path, hidden=[(x + 1, SCALE) for x in XS])
    with pytest.raises(ValueError, match=r"different block list"):
        _run(tmp_path, blocks=_blocks()[:2])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not ours")
    with pytest.raises(ValueError, match=r"not empty and has no manifest"):
        _run(tmp_path / "other")


def test_bad_arguments(tmp_path):
    hs = [(x, SCALE) for x in XS]
    with pytest.raises(TypeError, match=r"return \(new_params, report\)"):
        calibrate.stream(_block, _blocks(), hs, lambda p, h: p, progress=False)
    with pytest.raises(ValueError, match="file name stem"):
        calibrate.stream(_block, [("a/b", lambda: PARAMS[0])], hs, _gptq, progress=False)
    with pytest.raises(ValueError, match="hidden is empty"):
        calibrate.stream(_block, _blocks(), [], _gptq, progress=False)
    with pytest.raises(TypeError, match="needs save"):
        calibrate.stream(_block, _blocks(), hs, _gptq, out=tmp_path / "x", progress=False)
    with pytest.raises(TypeError, match=r"stream: reference must be a bool, got 'yes'"):
        calibrate.stream(_block, _blocks(), hs, _gptq, progress=False, reference="yes")


def test_progress_prints_the_estimate_and_peak_rss(capsys):
    calibrate.stream(_block, _blocks(), [(XS[0], SCALE)], lambda p, hs: (p, None))
    err = capsys.readouterr().err
    assert "memory estimate: block weights" in err and "peak RSS" in err


def test_sharded_block_statistics_equal_unsharded():
    """A block's weights sharded over 8 devices (output axis of ``up``, input of ``down``) and
    the activations over the batch: the Hessians equal the unsharded ones and the compressed
    weights keep their shardings."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    specs = {"up": NamedSharding(mesh, P(None, "x")), "down": NamedSharding(mesh, P("x", None))}
    rows = NamedSharding(mesh, P("x", None))
    seen = []

    def compress(p, hs):
        seen.append(calibrate.statistics(_block, p, hs))
        return _sparsegpt(p, hs)

    sharded = [{k: jax.device_put(v, specs[k]) for k, v in p.items()} for p in PARAMS]
    hs = [(jax.device_put(x, rows), SCALE) for x in XS]
    res = calibrate.stream(_block, _blocks(sharded), hs, compress, progress=False)
    plain = calibrate.stream(_block, _blocks(), [(x, SCALE) for x in XS], compress, progress=False)
    for i, (s, u) in enumerate(zip(seen[:L], seen[L:], strict=True)):
        # block 0 sees the same inputs; later blocks see them through the compressed blocks
        # before, whose weights differ by float rounding (about 1e-6) between the two runs
        tol = 1e-5 if i == 0 else 5e-5
        for k in ("up", "down"):
            np.testing.assert_allclose(s[k].xtx, u[k].xtx, rtol=tol, atol=tol)
    for got, want in zip(res.blocks, plain.blocks, strict=True):
        for k in ("up", "down"):
            assert got[k].sharding == specs[k]
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)


def test_interrupted_run_with_reference_resumes_bit_for_bit(tmp_path):
    rec = {"method": quant.GPTQ(qep=0.5), "bits": 3}
    whole = _run(tmp_path / "a", _qep, reference=True, recipe=rec)
    calls = []

    def fails_on_block_2(p, hs, refs):
        calls.append(1)
        if len(calls) == 2:
            raise Stop
        return _qep(p, hs, refs)

    with pytest.raises(Stop):
        _run(tmp_path / "b", fails_on_block_2, reference=True, recipe=rec)
    loaded = []
    res = _run(tmp_path / "b", _qep, reference=True, recipe=rec, blocks=_blocks(loaded=loaded))
    # block 0's float weights are read again (the float activations), its compressed file kept
    assert res.resumed == ("block0",) and loaded == [0, 1, 2]
    for f in sorted(os.listdir(tmp_path / "a")):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    np.testing.assert_array_equal(res.hidden[1][0], whole.hidden[1][0])


def test_a_run_with_reference_is_another_run(tmp_path):
    _run(tmp_path / "a")
    with pytest.raises(ValueError, match=r"different recipe"):
        _run(tmp_path / "a", _qep, reference=True)
