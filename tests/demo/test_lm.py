"""The LM workbench decoder: shapes, the functional form, rebuilds after surgery, bits per byte."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxslim.demo import lm

CFG = lm.LMConfig(dim=32, layers=3, kv_heads=2, groups=2, head_dim=8, hidden=48)


@pytest.fixture(scope="module")
def model():
    return lm.LM(CFG, rngs=nnx.Rngs(0))


def tokens(n=2, t=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, t)), jnp.int32)


def test_corpus_is_offline_and_hashed():
    train, valid, info = lm.load_corpus()
    assert train.dtype == np.uint8 and valid.dtype == np.uint8
    assert len(train) + len(valid) == info["bytes"] > 400_000
    assert len(info["sha256"]) == 64 and info["python"].count(".") == 2
    assert 0.09 < len(valid) / info["bytes"] < 0.11


def test_shapes_and_config_round_trip(model):
    logits, hs = model(tokens(), hiddens=True)
    assert logits.shape == (2, 12, 256)
    assert len(hs) == CFG.layers + 1 and all(h.shape == (2, 12, CFG.dim) for h in hs)
    assert lm.config_of(nnx.state(model, nnx.Param)) == CFG
    assert lm.config_of(nnx.to_pure_dict(nnx.state(model, nnx.Param))) == CFG


def test_functional_form_equals_the_module(model):
    fn, params = lm.apply_fn(model)
    x = tokens()
    np.testing.assert_allclose(fn(params, x), model(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(fn)(params, x), model(x), rtol=1e-5, atol=1e-5)


def test_causal(model):
    x = tokens()
    y = x.at[:, 7:].set(0)
    np.testing.assert_allclose(model(x)[:, :7], model(y)[:, :7], rtol=1e-5, atol=1e-5)
    assert not np.allclose(model(x)[:, 7:], model(y)[:, 7:])


def test_rope_rotates_pairs_by_position():
    x = jnp.ones((1, 3, 1, 4))
    out = lm._rope(x, 10_000.0)
    # position 0 is unrotated; each (i, i + half) pair keeps its norm
    np.testing.assert_allclose(out[0, 0], x[0, 0], atol=1e-6)
    norms = jnp.sqrt(out[..., :2] ** 2 + out[..., 2:] ** 2)
    np.testing.assert_allclose(norms, jnp.sqrt(2.0) * jnp.ones_like(norms), rtol=1e-6)
    np.testing.assert_allclose(out[0, 1, 0, 0], math.cos(1.0) - math.sin(1.0), rtol=1e-6)


def test_functional_form_runs_on_a_cut_tree(model):
    """Dropping a block or shrinking the MLP leaves a tree the functional form still runs."""
    fn, params = lm.apply_fn(model)
    pure = nnx.to_pure_dict(params)
    del pure["blocks"][1]
    for b in pure["blocks"].values():
        b["mlp"]["gate"] = b["mlp"]["gate"][:, :16]
        b["mlp"]["up"] = b["mlp"]["up"][:, :16]
        b["mlp"]["down"] = b["mlp"]["down"][:16]
    assert fn(pure, tokens()).shape == (2, 12, 256)
    small = lm.rebuild(pure)
    assert lm.config_of(nnx.state(small, nnx.Param)) == lm.LMConfig(
        dim=32, layers=2, kv_heads=2, groups=2, head_dim=8, hidden=16
    )


def test_bits_per_byte_is_cross_entropy_in_bits(model):
    w = tokens(5, 9, seed=3)
    logits = model(w[:, :-1])
    nats = optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).mean()
    assert lm.bits_per_byte(model, w) == pytest.approx(float(nats) / math.log(2), rel=1e-5)
    fn, params = lm.apply_fn(model)
    assert lm.bits_per_byte(lambda x: fn(params, x), w) == pytest.approx(
        float(nats) / math.log(2), rel=1e-5
    )


@pytest.mark.standard_promotion
def test_training_lowers_bits_per_byte():
    train, valid, _ = lm.load_corpus()
    m = lm.LM(
        lm.LMConfig(dim=32, layers=1, kv_heads=1, groups=2, head_dim=8, hidden=32), rngs=nnx.Rngs(1)
    )
    windows = lm.eval_windows(valid, 32, 8)
    before = lm.bits_per_byte(m, windows)
    lm.train(m, train, steps=30, batch=8, seq=32, lr=1e-2)
    assert before > 7.5  # about log2(256) at init
    assert lm.bits_per_byte(m, windows) < before - 1.5


@pytest.mark.standard_promotion
def test_workbench_report_rows():
    """`jaxslim demo --lm` rows on a tiny decoder: every method present, sizes shrink."""
    from jaxslim.demo import lm_report

    cfg = lm.LMConfig(dim=32, layers=2, kv_heads=2, groups=2, head_dim=8, hidden=32)
    from jaxslim.demo import lm_oneshot

    grid = dict(
        methods=("magnitude", "sparsegpt"),
        settings=(lm_oneshot.SETTINGS[0], lm_oneshot.SETTINGS[3]),
        seq_settings=(),
        calib_sequences=16,
    )
    rows, info = lm_report.run(cfg=cfg, steps=3, recover=1, drop=1, oneshot=grid)
    by = {r["method"]: r for r in rows}
    dense = by["dense"]["params"]
    assert len(info["sha256"]) == 64
    assert all(np.isfinite(r["bits/byte"]) for r in rows)
    width = [r for m, r in by.items() if m.startswith("width")]
    depth = [r for m, r in by.items() if m.startswith("depth")]
    assert len(width) == 4 and len(depth) == 3  # cut, fine-tune, distill (+ scratch for width)
    assert all(r["params"] < dense // 2 for r in width)
    assert all(r["params"] < dense for r in depth)
    assert {"int8 per-channel (RTN)", "int4 group-32 (RTN)"} <= set(by)

    # --lm --oneshot: the same dense model pruned once per (method, setting), dense row first.
    one = info["oneshot"]
    assert [(r["method"], r["setting"]) for r in one] == [
        ("dense", "-"),
        ("magnitude", "50%"),
        ("magnitude", "2:4"),
        ("sparsegpt", "50%"),
        ("sparsegpt", "2:4"),
    ]
    assert one[0]["score"] == pytest.approx(by["dense"]["bits/byte"], rel=1e-6)
    assert all(r["sparsity"] == pytest.approx(0.5, abs=1e-6) for r in one[1:])
    assert all(np.isfinite(r["score"]) and r["score"] > 0 for r in one)
    assert info["oneshot_seconds"] > 0
    table = lm_oneshot.table(one, "bits/byte").splitlines()
    assert table[0] == "| method (bits/byte) | 50% | 2:4 |"
    assert [line.split(" | ")[0] for line in table[2:]] == ["| dense", "| magnitude", "| sparsegpt"]


@pytest.mark.parametrize("cut", [False, True])
def test_evaluator_equals_bits_per_byte(model, cut):
    """The report's one jitted evaluator gives `lm.bits_per_byte` on the model and on its cuts."""
    from jaxslim.demo import lm_report

    w = tokens(20, 9, seed=4)  # 20 windows: bits_per_byte averages chunks of 16 and 4
    bpb = lm_report.evaluator(model, w)
    m = model
    if cut:  # a narrower MLP and one block fewer: same evaluator, new shapes
        pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        del pure["blocks"][0]
        for b in pure["blocks"].values():
            b["mlp"]["gate"], b["mlp"]["up"] = b["mlp"]["gate"][:, :8], b["mlp"]["up"][:, :8]
            b["mlp"]["down"] = b["mlp"]["down"][:8]
        m = lm.rebuild(pure)
    ref = lm.bits_per_byte(m, w)
    assert bpb(m) == pytest.approx(ref, rel=1e-5)
    assert bpb(nnx.state(m, nnx.Param)) == pytest.approx(ref, rel=1e-5)


@pytest.mark.standard_promotion
def test_default_optimizer_is_the_default_of_train():
    """Passing `lm.default_optimizer(steps)` trains exactly like `lm.train`'s default."""
    train, _, _ = lm.load_corpus()
    cfg = lm.LMConfig(dim=16, layers=1, kv_heads=1, groups=1, head_dim=8, hidden=16)
    a, b = lm.LM(cfg, rngs=nnx.Rngs(3)), lm.LM(cfg, rngs=nnx.Rngs(3))
    lm.train(a, train, steps=4, batch=2, seq=16)
    lm.train(b, train, steps=4, batch=2, seq=16, tx=lm.default_optimizer(4))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(a, nnx.Param), nnx.state(b, nnx.Param))


TINY = lm.LMConfig(dim=16, layers=1, kv_heads=1, groups=2, head_dim=4, hidden=16)


@pytest.mark.standard_promotion
def test_train_together_equals_separate_runs_with_one_teacher_forward_per_step(monkeypatch):
    """Lockstep training leaves each model as `lm.train` alone would (a distilled one exactly,
    a fine-tuned one up to rounding: its cross-entropy is kd_loss's hard term), and the
    teacher runs once per step however many models distill."""
    train, _, _ = lm.load_corpus()
    teacher = lm.LM(TINY, rngs=nnx.Rngs(9))
    kw = dict(steps=3, batch=2, seq=16, seed=5)
    ref_kd, ref_kd2, ref_ft = (lm.LM(TINY, rngs=nnx.Rngs(s)) for s in (1, 2, 3))
    lm.train(ref_kd, train, teacher=teacher, **kw)
    lm.train(ref_kd2, train, teacher=teacher, **kw)
    lm.train(ref_ft, train, **kw)

    calls = []
    logits = lm._logits
    monkeypatch.setattr(lm, "_logits", lambda m, x: calls.append(m) or logits(m, x))
    kd, kd2, ft = (lm.LM(TINY, rngs=nnx.Rngs(s)) for s in (1, 2, 3))
    seconds = lm.train_together(
        [kd, ft, kd2], train, teacher=teacher, distill=[True, False, True], **kw
    )
    assert len(calls) == 3 and all(m is teacher for m in calls)  # 3 steps, 2 distilled runs
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    for got, ref in ((kd, ref_kd), (kd2, ref_kd2)):
        jax.tree.map(
            np.testing.assert_array_equal, nnx.state(got, nnx.Param), nnx.state(ref, nnx.Param)
        )
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
        nnx.state(ft, nnx.Param),
        nnx.state(ref_ft, nnx.Param),
    )
    # and the runs did train: the fine-tuned model moved away from its init
    init = nnx.state(lm.LM(TINY, rngs=nnx.Rngs(3)), nnx.Param)
    assert not np.allclose(nnx.state(ft, nnx.Param)["embed"][...], init["embed"][...])


def test_bits_per_byte_compiles_once_per_shape(model, caplog):
    """`lm.bits_per_byte` reuses one compiled evaluation across calls, models of one shape and
    window counts (the last chunk is padded, its copies dropped): the mean over windows."""
    other = lm.LM(CFG, rngs=nnx.Rngs(1))
    caplog.set_level("WARNING")
    with jax.log_compiles():
        for m, n in ((model, 20), (model, 5), (other, 33)):
            w = tokens(n, 11, seed=n)  # seq 10: a shape no other test evaluates
            per_window = [
                optax.softmax_cross_entropy_with_integer_labels(m(x[None, :-1]), x[None, 1:])
                for x in w
            ]
            ref = float(np.mean([float(c.mean()) for c in per_window])) / math.log(2)
            assert lm.bits_per_byte(m, w) == pytest.approx(ref, rel=1e-5)
    compiles = [r for r in caplog.messages if r.startswith("Compiling jit(_window_nats")]
    assert len(compiles) == 1


@pytest.mark.parametrize(
    "call, exc, match",
    [
        pytest.param(
            lambda: lm.train_together(
                [lm.LM(TINY, rngs=nnx.Rngs(0))],
                np.zeros(64, np.uint8),
                steps=1,
                distill=[True, False],
            ),
            ValueError,
            r"lm.train_together: distill has 2 entries for 1 models",
            id="train_together-distill-length",
        ),
        pytest.param(
            lambda: lm.train_together(
                [lm.LM(TINY, rngs=nnx.Rngs(0))], np.zeros(64, np.uint8), steps=1, distill=[True]
            ),
            ValueError,
            r"lm.train_together: distill=\[True\] asks for a teacher; pass teacher=",
            id="train_together-no-teacher",
        ),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
