"""tunix's NNX Llama3 and Qwen3 (``google-tunix``) as clients of jaxslim.

tunix builds its decoders from its own ``ModelConfig`` classes: ``Einsum`` attention kernels
``q (D, N, H)``, ``k``/``v`` ``(D, K, H)``, ``o (N, H, D)``, ``nnx.Linear`` MLP kernels, an
``nnx.List`` of decoder layers (its state is keyed ``0 .. n-1``). The tests work on the state of
``nnx.split(model)`` with jaxslim's public API (``jaxslim.flax`` once, in place on the module) and
rebuild the tunix model from an updated config (``num_heads`` / ``num_kv_heads``, ``hidden_dim``,
``num_layers``) with ``nnx.merge``; each cut model equals the original with the removed parts
zeroed (or, for a dropped layer, the remaining blocks run by hand). Tiny random models (2 layers,
width 32, 4 query heads over 2 key/value heads of size 8, MLP width 48); nothing is downloaded.

tunix divides its int32 positions by float32 RoPE timescales and multiplies ``(D,)`` norm scales
into ``(B, T, D)`` activations, which strict dtype and rank promotion reject: these tests run with
standard dtype promotion and rank promotion allowed.
"""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxslim import prune, quant, splice
from jaxslim.flax import splice as flax_splice

llama3 = pytest.importorskip("tunix.models.llama3.model")
qwen3 = pytest.importorskip("tunix.models.qwen3.model")

pytestmark = pytest.mark.standard_promotion


@pytest.fixture(autouse=True)
def _rank_promotion():
    with jax.numpy_rank_promotion("allow"):
        yield


VOCAB, LAYERS, D, HEADS, KV, HEAD_DIM, HIDDEN = 64, 2, 32, 4, 2, 8, 48
GROUP = HEADS // KV  # query heads per key/value head


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    module: object  # tunix.models.<family>.model
    cls: type

    def config(self, **changes):
        cfg = self.module.ModelConfig(
            num_layers=LAYERS,
            vocab_size=VOCAB,
            embed_dim=D,
            hidden_dim=HIDDEN,
            num_heads=HEADS,
            head_dim=HEAD_DIM,
            num_kv_heads=KV,
            rope_theta=10_000,
            norm_eps=1e-6,
        )
        return dataclasses.replace(cfg, **changes)

    def graphdef(self, cfg, like=None):
        """The graphdef of a tunix model built from ``cfg`` (on shapes only); with ``like``, the
        state's shapes must be the ones ``cfg`` builds."""
        graphdef, ref = nnx.split(nnx.eval_shape(lambda: self.cls(cfg, rngs=nnx.Rngs(0))))
        if like is not None:
            want = jax.tree.map(lambda x: tuple(x.shape), ref)
            got = jax.tree.map(lambda x: tuple(x.shape), like)
            assert got == want, f"{self.name}: the cut state does not match {cfg}"
        return graphdef


FAMILIES = [
    Family("llama3", llama3, llama3.Llama3),
    Family("qwen3", qwen3, qwen3.Qwen3),
]


@dataclasses.dataclass(frozen=True)
class Tiny:
    """A random tiny tunix model: its config, graphdef and state, ``fn(state, tokens) ->
    logits``, that function jitted, example tokens ``x`` and the logits ``y = fn(state, x)``."""

    family: Family
    cfg: object
    graphdef: object
    state: object
    fn: object
    jit: object
    x: jax.Array
    y: np.ndarray


def tiny(family, seed=0):
    """Builds the model on shapes only and fills it from NumPy (tunix zero-initializes its MLP;
    NumPy needs no compilation per shape)."""
    cfg = family.config()
    graphdef, state = nnx.split(nnx.eval_shape(lambda: family.cls(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(x):
        if x.ndim == 1:  # norm scales
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(x.shape), jnp.float32)
        fan_in = x.shape[0] if x.ndim == 2 else D
        return jnp.asarray(rng.standard_normal(x.shape) / math.sqrt(fan_in), jnp.float32)

    state = jax.tree.map(fill, state)
    fn = logits_fn(graphdef)
    jitted, x = jax.jit(fn), tokens(0)
    return Tiny(family, cfg, graphdef, state, fn, jitted, x, np.asarray(jitted(state, x)))


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def model(request):
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        return tiny(request.param)


def causal(tokens):
    """tunix's ``positions (B, T)`` and ``attention_mask (B, T, T)`` for causal decoding."""
    b, t = tokens.shape
    return jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.broadcast_to(
        jnp.tril(jnp.ones((t, t), bool)), (b, t, t)
    )


def logits_fn(graphdef):
    """``fn(state, tokens) -> logits (B, T, vocab)``: the tunix model, no cache."""

    def fn(state, tokens):
        positions, mask = causal(tokens)
        logits, _ = nnx.merge(graphdef, state)(tokens, positions, None, mask)
        return logits

    return fn


def tokens(seed, batch=2, length=8):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def value(state, path):
    """The array at ``path`` (``"layers/0/attn/q_proj/w"``) of a state or mask tree, as NumPy."""
    node = state
    for key in path.split("/"):
        node = node[int(key) if key.isdigit() else key]
    return np.asarray(node.get_value() if hasattr(node, "get_value") else node)


def replaced(state, changes):
    """``state`` with the arrays at ``changes``' paths replaced (other leaves as they were)."""

    def f(p, x):  # a state path ends in the Param's ``value`` attribute
        path = "/".join(str(k.key) for k in p if isinstance(k, jax.tree_util.DictKey))
        return jnp.asarray(changes[path]) if path in changes else x

    out = jax.tree_util.tree_map_with_path(f, state)
    for path, new in changes.items():
        np.testing.assert_array_equal(value(out, path), new)
    return out


def assert_runs_as(fn, state, reference, x, atol=1e-5, eager=True):
    """``fn(state, x)`` equals ``reference``, jitted (and eager: one op at a time)."""
    for f in (fn, jax.jit(fn)) if eager else (jax.jit(fn),):
        np.testing.assert_allclose(np.asarray(f(state, x)), reference, rtol=0, atol=atol)


def test_kv_head_group_removed_equals_its_heads_zeroed(model):
    groups = [g for g in splice.trace(model.fn, model.state, model.x) if g.removable]
    kv = [g for g in groups if any(p.endswith("k_proj/w") and a == 1 for p, a in g)]
    assert [g.size for g in kv] == [KV] * LAYERS
    gone = 1  # key/value head 1 with its query heads 2 and 3, in every layer
    cut = splice.apply_plan(model.state, splice.make_plan(kv, [[0]] * LAYERS))

    small = dataclasses.replace(model.cfg, num_heads=HEADS - GROUP, num_kv_heads=KV - 1)
    new_fn = logits_fn(model.family.graphdef(small, like=cut))
    heads = list(range(gone * GROUP, (gone + 1) * GROUP))
    zeroed = {}
    for i in range(LAYERS):
        pre = f"layers/{i}/attn"
        q = value(model.state, f"{pre}/q_proj/w")
        np.testing.assert_array_equal(value(cut, f"{pre}/q_proj/w"), np.delete(q, heads, 1))
        for name in ("k_proj", "v_proj"):
            w = value(model.state, f"{pre}/{name}/w")
            np.testing.assert_array_equal(value(cut, f"{pre}/{name}/w"), np.delete(w, gone, 1))
        o = value(model.state, f"{pre}/o_proj/w").copy()
        o[heads] = 0.0
        zeroed[f"{pre}/o_proj/w"] = o
    cut_logits = np.asarray(model.jit(cut, model.x))  # the old graphdef on the cut arrays
    assert_runs_as(new_fn, cut, cut_logits, model.x)
    assert_runs_as(model.fn, replaced(model.state, zeroed), cut_logits, model.x, eager=False)
    assert np.abs(cut_logits - model.y).max() > 0.1  # the heads did matter


def test_half_the_heads_removed_with_prune_channels(model):
    """``where="attn"``: the key/value head group loses one head with its query heads, and the
    query-head group one query head of every key/value head: 4 query heads over 2 -> 1 over 1."""
    cut, report = splice.prune_channels(model.fn, model.state, model.x, sparsity=0.5, where="attn")
    assert [(g.size_before, g.size_after) for g in report.groups] == [(2, 1)] * (2 * LAYERS)
    small = dataclasses.replace(model.cfg, num_heads=1, num_kv_heads=1)
    new_fn = logits_fn(model.family.graphdef(small, like=cut))
    zeroed = {}
    for i in range(LAYERS):
        pre = f"layers/{i}/attn"
        kv, q = report.groups[2 * i : 2 * i + 2]
        assert f"{pre}/k_proj/w" in kv.paths and f"{pre}/k_proj/w" not in q.paths
        kept_kv, kept_j = 1 - kv.removed[0], 1 - q.removed[0]
        head = kept_kv * GROUP + kept_j  # query head j of key/value head k is k * GROUP + j
        np.testing.assert_array_equal(
            value(cut, f"{pre}/q_proj/w"), value(model.state, f"{pre}/q_proj/w")[:, [head]]
        )
        o = value(model.state, f"{pre}/o_proj/w").copy()
        o[[h for h in range(HEADS) if h != head]] = 0.0
        zeroed[f"{pre}/o_proj/w"] = o
    cut_logits = np.asarray(model.jit(cut, model.x))
    assert_runs_as(new_fn, cut, cut_logits, model.x, eager=False)
    assert_runs_as(model.fn, replaced(model.state, zeroed), cut_logits, model.x, eager=False)


def test_mlp_channels_removed_with_prune_channels(model):
    cut, report = splice.prune_channels(model.fn, model.state, model.x, sparsity=0.25, where="mlp")
    kept = HIDDEN - 12  # round_half_even(0.25 * 48) channels go
    assert [(g.size_before, g.size_after) for g in report.groups] == [(HIDDEN, kept)] * LAYERS
    assert report.sizes["layers/0/mlp/gate_proj"]["kernel"] == (D, kept)

    hidden = report.sizes["layers/0/mlp/down_proj"]["kernel"][0]
    small = dataclasses.replace(model.cfg, hidden_dim=hidden)
    new_fn = logits_fn(model.family.graphdef(small, like=cut))
    zeroed = {}
    for i, g in enumerate(report.groups):
        pre = f"layers/{i}/mlp"
        gate, up, down = (
            value(model.state, f"{pre}/{n}/kernel") for n in ("gate_proj", "up_proj", "down_proj")
        )
        l2 = (gate**2).sum(0) + (up**2).sum(0) + (down**2).sum(1)  # score="l2", squared
        assert g.removed == tuple(sorted(np.argsort(l2, kind="stable")[:12].tolist()))
        np.testing.assert_array_equal(
            value(cut, f"{pre}/up_proj/kernel"), np.delete(up, g.removed, 1)
        )
        down = down.copy()
        down[list(g.removed)] = 0.0
        zeroed[f"{pre}/down_proj/kernel"] = down
    cut_logits = np.asarray(model.jit(cut, model.x))
    assert_runs_as(new_fn, cut, cut_logits, model.x, eager=False)
    assert_runs_as(model.fn, replaced(model.state, zeroed), cut_logits, model.x, eager=False)
    assert np.abs(cut_logits - model.y).max() > 0.1

    # the same in place on the tunix module (jaxslim.flax): its nnx.Linear widths follow
    m = nnx.merge(model.graphdef, jax.tree.map(lambda a: a, model.state))  # fresh Variables
    positions, mask = causal(model.x)
    flax_splice.prune_channels_model(m, model.x, positions, None, mask, sparsity=0.25, where="mlp")
    assert m.layers[1].mlp.down_proj.in_features == hidden
    chex.assert_trees_all_equal(nnx.state(m), cut)
    np.testing.assert_allclose(
        np.asarray(m(model.x, positions, None, mask)[0]), cut_logits, atol=1e-5
    )
    assert value(model.state, "layers/0/mlp/up_proj/kernel").shape == (D, HIDDEN)


def test_drop_layer_equals_the_remaining_blocks_run_by_hand(model):
    state = model.state
    small = splice.drop_layer(state, "layers/0")  # the nnx.List state: layer 1 becomes 0
    for path in ("attn/q_proj/w", "mlp/down_proj/kernel", "input_layernorm/w"):
        np.testing.assert_array_equal(
            value(small, f"layers/0/{path}"), value(state, f"layers/1/{path}")
        )
    cfg = dataclasses.replace(model.cfg, num_layers=LAYERS - 1)
    new_fn = logits_fn(model.family.graphdef(cfg, like=small))

    @jax.jit
    def by_hand(state, tokens):  # tunix's own modules, block 0 skipped
        m = nnx.merge(model.graphdef, state)
        positions, mask = causal(tokens)
        h = m.embedder.encode(tokens)
        for layer in list(m.layers)[1:]:
            _, h = layer(h, positions, None, mask)
        return m.lm_head(m.final_norm(h))

    # a block whose attention output and MLP down projections are zero adds nothing
    zeroed = {
        f"layers/0/{p}": np.zeros_like(value(state, f"layers/0/{p}"))
        for p in ("attn/o_proj/w", "mlp/down_proj/kernel")
    }
    reference = np.asarray(by_hand(state, model.x))
    assert_runs_as(new_fn, small, reference, model.x, eager=False)
    assert_runs_as(model.fn, replaced(state, zeroed), reference, model.x, eager=False)
    assert np.abs(reference - model.y).max() > 0.1


def _kernels():
    """The paths of every matmul kernel (the embedding table is gathered, not multiplied)."""
    names = ["attn/q_proj/w", "attn/k_proj/w", "attn/v_proj/w", "attn/o_proj/w"]
    names += ["mlp/gate_proj/kernel", "mlp/up_proj/kernel", "mlp/down_proj/kernel"]
    return {f"layers/{i}/{n}" for i in range(LAYERS) for n in names} | {"lm_head/w"}


def _contracted(path):
    """The axes a kernel contracts: ``o (N, H, D)`` contracts two, the others their first."""
    return (0, 1) if path.endswith("o_proj/w") else (0,)


def _relative(y, reference):
    return float(np.linalg.norm(y - reference) / np.linalg.norm(reference))


def _batches():
    return [tokens(seed, batch=4, length=16) for seed in (1, 2)]


# sequential=False: every kernel calibrated on the dense model, one compilation of the hooked
# model per family, shared by both methods (and by quant.oneshot below).
@pytest.mark.parametrize("method", [prune.Wanda(), prune.SparseGPT()], ids=["wanda", "sparsegpt"])
def test_prune_oneshot_half_of_every_kernel(model, method):
    new, report = prune.oneshot(
        model.fn, model.state, _batches(), 0.5, method=method, sequential=False
    )
    assert {r.path for r in report.rows} == _kernels()  # not the embedding table
    for r in report.rows:
        w, w_new = value(model.state, r.path), value(new, r.path)
        mask = value(report.masks, r.path)
        axes = _contracted(r.path)
        inputs = math.prod(w.shape[a] for a in axes)
        assert r.sparsity == 0.5 and r.size == w.size
        # half of every output's inputs, exact zeros there, and nowhere else
        np.testing.assert_array_equal(mask.sum(axes), inputs // 2)
        assert np.all(w_new[~mask] == 0.0) and np.count_nonzero(w_new) == w.size // 2
        if isinstance(method, prune.Wanda):  # no weight update
            np.testing.assert_array_equal(w_new[mask], w[mask])
    for path in ("embedder/input_embedding", "final_norm/w", "layers/0/input_layernorm/w"):
        np.testing.assert_array_equal(value(new, path), value(model.state, path))
    y = np.asarray(model.jit(new, model.x))
    err = _relative(y, model.y)
    mean, base = (np.mean([getattr(r, k) for r in report.rows]) for k in ("error", "baseline"))
    name = f"{model.family.name} {r.method} 50 %"
    print(f"{name}: logits {err:.3f}, mean layer error {mean:.3f} (magnitude {base:.3f})")
    assert np.all(np.isfinite(y)) and 0.0 < err < 1.0
    assert mean < base  # calibrated beats magnitude pruning on the layers' own outputs


# Relative logit errors measured (2 random layers, 15 quantized matmuls; llama3 / qwen3): int8
# per-channel RTN 0.019 / 0.023, int4 group-32 GPTQ 0.28 / 0.37; tolerances about 1.5x (2x at
# int8). Wanda / SparseGPT at 50 %: 0.74 / 0.69 and 0.87 / 0.88.
QUANT = [
    pytest.param(quant.QuantSpec(8, axis=-1), "rtn", 0.04, id="int8-rtn"),
    pytest.param(quant.QuantSpec(4, axis=-1, group_size=32), quant.GPTQ(), 0.55, id="int4g32-gptq"),
]


@pytest.mark.parametrize("spec, method, tol", QUANT)
def test_quant_oneshot_runs_through_quantized(model, spec, method, tol):
    qstate, report = quant.oneshot(
        model.fn, model.state, _batches(), spec, method=method, sequential=False
    )
    assert {r.path for r in report.rows} == _kernels()
    assert "embedder/input_embedding" in report.skipped
    leaves = jax.tree.leaves(qstate, is_leaf=quant.is_qarray)
    assert sum(quant.is_qarray(leaf) for leaf in leaves) == len(_kernels())
    y_q = np.asarray(jax.jit(quant.quantized(model.fn))(qstate, model.x))
    y_deq = np.asarray(model.jit(quant.dequantize_params(qstate), model.x))
    np.testing.assert_allclose(y_q, y_deq, rtol=0, atol=1e-5)
    err = _relative(y_q, model.y)
    mean, base = (np.mean([getattr(r, k) for r in report.rows]) for k in ("error", "baseline"))
    name = f"{model.family.name} int{spec.bits} {report.rows[0].method}"
    print(f"{name}: logits {err:.4f}, mean layer error {mean:.4f} (round-to-nearest {base:.4f})")
    assert err < tol
    assert mean < base if isinstance(method, quant.GPTQ) else mean == base
