"""quant.rotate: the residual-stream rotation found on the jaxpr, on every jaxslim.models family,
the NNX workbench, Equinox and plain JAX; the ops it refuses, by name."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxslim import models, quant
from jaxslim.demo import lm

JIT = [lambda f: f, jax.jit]
UNTIED = {
    "llama": models.Config(head_dim=8),
    "llama-bias": models.Config(head_dim=8, attention_bias=True, o_bias=True),
    "qwen2": models.Config(family="qwen2", head_dim=8, attention_bias=True),
    "qwen3": models.Config(family="qwen3", head_dim=8, qk_norm=True),
    "mistral": models.Config(family="mistral", head_dim=8, sliding_window=3),
}
TOKENS = jnp.array([[1, 5, 7, 9, 11, 3, 2, 40], [0, 4, 4, 8, 31, 49, 6, 12]])


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _model(cfg, *, seed=0, final_norm_ones=False):
    p = models.init(
        jax.random.key(seed),
        cfg,
        vocab=50,
        hidden=24,
        layers=2,
        heads=3,
        kv_heads=1,
        intermediate=40,
        scale=0.3,
    )
    rng = np.random.default_rng(seed)
    scale = lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
    if not final_norm_ones:
        p["norm"] = scale(p["norm"])
    for lp in p["layers"]:
        for n in ("attn_norm", "mlp_norm", "q_norm", "k_norm"):
            if n in lp:
                lp[n] = scale(lp[n])
    return p


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("wrap", JIT)
@pytest.mark.parametrize("name", list(UNTIED))
def test_rotate_preserves_every_models_family(name, wrap, online):
    cfg = UNTIED[name]
    p = _model(cfg)
    f = lambda p, t: models.forward(p, t, cfg)
    rfn, rp = quant.rotate(f, p, TOKENS, online=online)
    assert _rel(wrap(rfn)(rp, TOKENS), f(p, TOKENS)) < 1e-4
    rep = rfn.rotate_report
    assert rep.width == 24
    # every block norm and the final norm were folded and are now exactly 1
    for lp in rp["layers"]:
        np.testing.assert_array_equal(np.asarray(lp["attn_norm"]), 1.0)
        np.testing.assert_array_equal(np.asarray(lp["mlp_norm"]), 1.0)
    np.testing.assert_array_equal(np.asarray(rp["norm"]), 1.0)
    assert rep.folded["layers/0/attn_norm"] == ("layers/0/q", "layers/0/k", "layers/0/v")
    assert rep.folded["norm"] == ("lm_head",)
    assert rep.roles["embed:1"] == ("table",) and rep.roles["layers/1/down:1"] == ("writer",)
    if "qwen3" in name:  # the per-head q/k norms are not on the stream: untouched
        np.testing.assert_array_equal(
            np.asarray(rp["layers"][0]["q_norm"]), np.asarray(p["layers"][0]["q_norm"])
        )
    if online:
        assert set(rep.online) == {f"layers/{i}/{k}" for i in (0, 1) for k in ("o", "down")}
    else:
        assert rep.online == ()
        np.testing.assert_array_equal(rfn(rp, TOKENS), f(rp, TOKENS))  # fn itself
    assert rep.max_rel_diff < 1e-4


def test_rotated_leaves_follow_the_formulas():
    # E Q, Q^T diag(w) W for a reader, W Q for a writer, with Q = diag(s) H / sqrt(d).
    cfg = UNTIED["llama"]
    p = _model(cfg, seed=3)
    _, rp = quant.rotate(lambda p, t: models.forward(p, t, cfg), p, TOKENS, seed=7)
    q = quant.random_hadamard(24, 7)
    f64 = lambda x: np.asarray(x, np.float64)
    np.testing.assert_allclose(f64(rp["embed"]), f64(p["embed"]) @ q, atol=1e-5)
    lp, rl = p["layers"][0], rp["layers"][0]
    want = q.T @ (f64(lp["attn_norm"])[:, None] * f64(lp["q"]))
    np.testing.assert_allclose(f64(rl["q"]), want, atol=1e-5)
    np.testing.assert_allclose(f64(rl["down"]), f64(lp["down"]) @ q, atol=1e-5)
    np.testing.assert_allclose(
        f64(rp["lm_head"]), q.T @ (f64(p["norm"])[:, None] * f64(p["lm_head"])), atol=1e-5
    )


def test_rotation_spreads_an_outlier_feature():
    # One feature 30x the others in every embedding row: after E Q no feature stands out.
    cfg = UNTIED["llama"]
    p = _model(cfg)
    p["embed"] = p["embed"].at[:, 5].multiply(30.0)
    _, rp = quant.rotate(lambda p, t: models.forward(p, t, cfg), p, TOKENS)
    ratio = lambda e: float(jnp.max(jnp.abs(e)) / jnp.sqrt(jnp.mean(e * e)))
    assert ratio(p["embed"]) > 4.0
    assert ratio(rp["embed"]) < 0.5 * ratio(p["embed"])


def test_tied_head_is_rotated_when_the_final_norm_is_one_and_refused_otherwise():
    cfg = models.Config(head_dim=8, tie_word_embeddings=True)
    f = lambda p, t: models.forward(p, t, cfg)
    p = _model(cfg, final_norm_ones=True)
    rfn, rp = quant.rotate(f, p, TOKENS)
    assert _rel(rfn(rp, TOKENS), f(p, TOKENS)) < 1e-4
    assert sorted(rfn.rotate_report.roles["embed:1"]) == ["reader", "table"]
    with pytest.raises(ValueError, match=r"quant.rotate: the norm scale 'norm' cannot be folded"):
        quant.rotate(f, _model(cfg), TOKENS)


def test_rotate_an_nnx_workbench_model():
    cfg = lm.LMConfig(dim=32, layers=2, kv_heads=2, groups=2, head_dim=8, hidden=64)
    model = lm.LM(cfg, rngs=nnx.Rngs(0))
    fn, params = lm.apply_fn(model)
    rng = np.random.default_rng(0)
    # block norms away from 1 (the final norm stays 1: the head is the tied embedding)
    params = jax.tree_util.tree_map_with_path(
        lambda kp, x: (
            jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
            if x.ndim == 1 and "blocks" in jax.tree_util.keystr(kp)
            else x
        ),
        params,
    )
    tokens = jnp.asarray(rng.integers(0, 256, (2, 12)), jnp.int32)
    for online in (False, True):
        rfn, rp = quant.rotate(fn, params, tokens, online=online)
        assert _rel(jax.jit(rfn)(rp, tokens), fn(params, tokens)) < 1e-4
    assert set(rfn.rotate_report.online) == {"blocks/0/mlp/down", "blocks/1/mlp/down"}


def test_scanned_layers_are_refused_naming_the_scan():
    cfg = lm.LMConfig(dim=32, layers=2, kv_heads=2, groups=2, head_dim=8, hidden=64)
    model = lm.LM(cfg.__class__(**{**cfg.__dict__, "scan_layers": True}), rngs=nnx.Rngs(0))
    fn, params = lm.apply_fn(model)
    with pytest.raises(ValueError, match=r"carried into a scan.*unroll the layers"):
        quant.rotate(fn, params, jnp.zeros((1, 4), jnp.int32))


class _EqxBlock(eqx.Module):
    norm1: eqx.nn.RMSNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    norm2: eqx.nn.RMSNorm
    proj: eqx.nn.Linear

    def __init__(self, d, f, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.norm1 = eqx.nn.RMSNorm(d)
        self.up = eqx.nn.Linear(d, f, key=k1)
        self.down = eqx.nn.Linear(f, d, key=k2)
        self.norm2 = eqx.nn.RMSNorm(d)
        self.proj = eqx.nn.Linear(d, d, use_bias=False, key=k3)

    def __call__(self, x):
        x = x + self.down(jax.nn.gelu(self.up(self.norm1(x))))
        return x + self.proj(self.norm2(x))


class _EqxLM(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list
    norm: eqx.nn.RMSNorm
    head: eqx.nn.Linear

    def __init__(self, key, vocab=20, d=16, f=32):
        ks = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(vocab, d, key=ks[0])
        self.blocks = [_EqxBlock(d, f, k) for k in jax.random.split(ks[1], 2)]
        self.norm = eqx.nn.RMSNorm(d)
        self.head = eqx.nn.Linear(d, vocab, key=ks[2])

    def __call__(self, ids):
        x = jax.vmap(self.embed)(ids)
        for b in self.blocks:
            x = jax.vmap(b)(x)
        return jax.vmap(self.head)(jax.vmap(self.norm)(x))


def test_rotate_an_equinox_model():
    model = _EqxLM(jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    rng = np.random.default_rng(1)
    params = jax.tree.map(  # RMSNorm weights away from 1
        lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype) if x.ndim == 1 else x,
        params,
    )
    fn = lambda p, ids: eqx.combine(p, static)(ids)
    ids = jnp.array([1, 4, 9, 19, 0])
    rfn, rp = quant.rotate(fn, params, ids, online=True)
    assert _rel(jax.jit(rfn)(rp, ids), fn(params, ids)) < 1e-4
    rep = rfn.rotate_report
    # eqx.nn.Linear is (out, in): the writers' stream axis is 0, the readers' 1
    assert rep.roles["blocks/0/down/weight:0"] == ("writer",)
    assert rep.roles["blocks/0/down/bias:0"] == ("bias",)
    assert rep.roles["blocks/0/up/weight:1"] == ("reader",)
    # eqx.nn.RMSNorm has a bias after its scale: x w + b is rotated as (x + b / w) w
    assert rep.roles["blocks/0/norm1/bias:0"] == ("norm_bias",)
    assert sorted(rep.roles["blocks/0/proj/weight:0"] + rep.roles["blocks/0/proj/weight:1"]) == [
        "reader",
        "writer",
    ]  # a (d, d) kernel reads and writes the stream
    np.testing.assert_array_equal(np.asarray(rp.norm.weight), 1.0)


def _plain(norm="rms", act_on_stream=False, scan=False):
    def fn(p, ids):
        h = p["embed"][ids]

        def block(h, lp):
            if norm == "rms":
                n = (
                    h
                    * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)
                    * lp["norm"][None, None, :]
                )
            else:  # LayerNorm: subtracts the mean
                c = h - jnp.mean(h, -1, keepdims=True)
                n = (
                    c
                    * jax.lax.rsqrt(jnp.mean(c * c, -1, keepdims=True) + 1e-6)
                    * lp["norm"][None, None, :]
                )
            h = h + jax.nn.relu(n @ lp["up"]) @ lp["down"]
            return jnp.tanh(h) if act_on_stream else h

        if scan:
            h, _ = jax.lax.scan(lambda h, lp: (block(h, lp), None), h, p["layers"])
        else:
            for lp in p["layers"]:
                h = block(h, lp)
        return h @ p["head"]

    k = iter(jax.random.split(jax.random.key(0), 16))
    layer = lambda: {
        "norm": 1 + 0.2 * jax.random.normal(next(k), (16,)),
        "up": jax.random.normal(next(k), (16, 32)) * 0.3,
        "down": jax.random.normal(next(k), (32, 16)) * 0.3,
    }
    layers = [layer(), layer()]
    if scan:
        layers = jax.tree.map(lambda *x: jnp.stack(x), *layers)
    p = {
        "embed": jax.random.normal(next(k), (12, 16)),
        "layers": layers,
        "head": jax.random.normal(next(k), (16, 12)),
    }
    return fn, p


IDS = jnp.array([[0, 3, 5, 11]])


@pytest.mark.parametrize("wrap", JIT)
def test_rotate_a_plain_jax_model(wrap):
    fn, p = _plain()
    rfn, rp = quant.rotate(fn, p, IDS, seed=2, online=True)
    assert _rel(wrap(rfn)(rp, IDS), fn(p, IDS)) < 1e-4
    # a different batch shape than the example: the online function re-traces
    ids = jnp.array([[1, 2], [3, 4], [5, 6]])
    assert _rel(rfn(rp, ids), fn(p, ids)) < 1e-4


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"norm": "layer"}, r"meets `reduce_sum`.*LayerNorm's mean.*only RMSNorm can be rotated"),
        ({"act_on_stream": True}, r"meets `tanh`.*does not commute with a rotation"),
        ({"scan": True}, r"carried into a scan"),
    ],
)
def test_what_cannot_be_rotated_is_named(kw, match):
    fn, p = _plain(**kw)
    with pytest.raises(ValueError, match=r"quant\.rotate: .*" + match):
        quant.rotate(fn, p, IDS)


def test_bad_arguments():
    fn, p = _plain()
    with pytest.raises(ValueError, match="fn returns the residual stream itself"):
        quant.rotate(
            lambda p, ids: (  # the hidden states, not logits
                p["embed"][ids]
                + jax.nn.relu(p["embed"][ids] @ p["layers"][0]["up"]) @ p["layers"][0]["down"]
            ),
            p,
            IDS,
        )
    with pytest.raises(TypeError, match="quant.rotate: seed must be an int, got 1.5"):
        quant.rotate(fn, p, IDS, seed=1.5)
    with pytest.raises(TypeError, match="quant.rotate: online must be a bool, got 'yes'"):
        quant.rotate(fn, p, IDS, online="yes")
    q = {**p, "head": quant.quantize(p["head"], quant.QuantSpec(8))}
    with pytest.raises(TypeError, match=r"quant.rotate: head is a QArray; rotate the float model"):
        quant.rotate(fn, q, IDS)
    with pytest.raises(TypeError, match=r"quant.rotate: fn must be a callable"):
        quant.rotate("fn", p, IDS)
    with pytest.raises(TypeError, match="is traced; call quant.rotate outside jit"):
        jax.jit(lambda p: quant.rotate(fn, p, IDS)[1])(p)
    odd = {"embed": jnp.ones((13, 7)), "head": jnp.ones((7, 13))}  # 7, 9, 13: no Hadamard
    odd["layers"] = [{"norm": jnp.ones(7), "up": jnp.ones((7, 9)), "down": jnp.ones((9, 7))}] * 2
    with pytest.raises(ValueError, match=r"no coupled-axis group whose width has a Hadamard"):
        quant.rotate(fn, odd, IDS)


def test_a_rotation_that_changes_the_function_is_refused(monkeypatch):
    # The result is checked on the example inputs: a broken (non-orthogonal) Q is caught.
    from jaxslim.quant import _rotate_fn

    fn, p = _plain()
    monkeypatch.setattr(_rotate_fn, "hadamard_matrix", lambda n: 1.1 * quant.hadamard_matrix(n))
    with pytest.raises(ValueError, match=r"the rotated function differs from fn by 0\.\d+"):
        quant.rotate(fn, p, IDS)
