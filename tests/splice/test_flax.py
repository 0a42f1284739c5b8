"""NNX glue for splicing: in-place channel removal with feature updates, fold, widen, demo."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxslim import _tree, splice
from jaxslim.demo import data as D
from jaxslim.flax import splice as fsplice

EPS = 1e-5


class ResNet(nnx.Module):
    """A small ResNet-style 1-D CNN with batch norm (inference mode)."""

    def __init__(self, c=8, hidden=6, rngs=None):
        bn = lambda n: nnx.BatchNorm(n, use_running_average=True, rngs=rngs)
        self.stem, self.bn0 = nnx.Conv(1, c, (3,), rngs=rngs), bn(c)
        self.c1, self.bn1 = nnx.Conv(c, hidden, (3,), rngs=rngs), bn(hidden)
        self.c2, self.bn2 = nnx.Conv(hidden, c, (3,), rngs=rngs), bn(c)
        self.head = nnx.Linear(c, 3, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.bn0(self.stem(x)))
        h = jax.nn.relu(h + self.bn2(self.c2(jax.nn.relu(self.bn1(self.c1(h))))))
        return self.head(h.mean(1))


def randomize_stats(model, seed=0):
    for i, (_, m) in enumerate(nnx.iter_modules(model)):
        if isinstance(m, nnx.BatchNorm):
            k1, k2 = jax.random.split(jax.random.key(seed + i))
            m.mean.set_value(jax.random.normal(k1, m.mean.get_value().shape))
            m.var.set_value(jnp.abs(jax.random.normal(k2, m.var.get_value().shape)) + 0.5)
            m.bias.set_value(jax.random.normal(k2, m.bias.get_value().shape))


def call(model, x):
    """``model(x)`` as one compiled function (eager NNX calls compile every op separately)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


def zero_group(model, group, idx):
    """Independent reference: zero channels ``idx`` of every member array of ``group``."""
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    for m in group.members:
        key = tuple(int(k) if k.isdigit() else k for k in m.path.split("/"))
        a = np.array(flat[key].get_value())
        v = a.reshape(a.shape[: m.axis] + m.factors + a.shape[m.axis + 1 :])
        sl = [slice(None)] * v.ndim
        sl[m.axis + m.factor] = list(idx)
        v[tuple(sl)] = 0.0
        flat[key].set_value(jnp.asarray(v.reshape(a.shape)))


@pytest.mark.parametrize(
    "make, xshape",
    [
        (lambda: D.CNN(rngs=nnx.Rngs(0)), (4, 40)),
        (lambda: D.MLP(rngs=nnx.Rngs(0)), (4, 40)),
        (lambda: ResNet(rngs=nnx.Rngs(0)), (3, 9, 1)),
    ],
    ids=["cnn", "mlp", "resnet_bn"],
)
def test_nnx_removal_of_zeroed_channels_preserves_function_and_updates_features(make, xshape):
    model = make()
    randomize_stats(model)
    x = jax.random.normal(jax.random.key(1), xshape)
    groups = [g for g in fsplice.trace_model(model, x) if g.removable]
    for g in groups:
        zero_group(model, g, range(0, g.size, 2))
    y = call(model, x)
    rep = fsplice.prune_channels_model(model, x, sparsity=0.5)
    assert [r.size_after * 2 for r in rep.groups] == [g.size for g in groups]
    np.testing.assert_allclose(call(model, x), y, atol=EPS, rtol=EPS)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Linear):
            assert (m.in_features, m.out_features) == m.kernel.get_value().shape
            fresh = nnx.eval_shape(
                lambda m=m: nnx.Linear(m.in_features, m.out_features, rngs=nnx.Rngs(0))
            )
            assert fresh.kernel.get_value().shape == m.kernel.get_value().shape
        if isinstance(m, nnx.Conv):
            assert (m.in_features, m.out_features) == m.kernel.get_value().shape[-2:]
            fresh = nnx.eval_shape(
                lambda m=m: nnx.Conv(m.in_features, m.out_features, m.kernel_size, rngs=nnx.Rngs(0))
            )
            assert fresh.kernel.get_value().shape == m.kernel.get_value().shape
        if isinstance(m, nnx.BatchNorm):
            assert m.num_features == m.scale.get_value().shape[0]


def test_depthwise_conv_feature_group_count_is_updated():
    class DW(nnx.Module):
        def __init__(self, rngs):
            self.pw = nnx.Conv(2, 6, (1,), rngs=rngs)
            self.dw = nnx.Conv(6, 6, (3,), feature_group_count=6, rngs=rngs)
            self.out = nnx.Linear(6, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.relu(self.dw(jax.nn.relu(self.pw(x)))).mean(1))

    model = DW(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 2))
    (g,) = [g for g in fsplice.trace_model(model, x) if g.removable]
    fsplice.remove_channels_model(model, g, [0, 2, 5])
    assert model.dw.feature_group_count == 3 and model.dw.in_features == 3
    assert model(x).shape == (2, 2)


def test_optimizer_state_shrinks_and_training_continues():
    model = D.MLP(hidden=(8,), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    x, y = jax.random.normal(jax.random.key(0), (16, 40)), jnp.arange(16) % 10
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    step = nnx.jit(lambda m, o: o.update(m, nnx.grad(loss)(m)))
    step(model, opt)
    trace_before = np.asarray(opt.opt_state[0].trace["layers"][0]["kernel"].get_value())
    rep = fsplice.prune_channels_model(model, x, sparsity=0.5, optimizer=opt)
    keep = list(rep.plan.keep[0])
    np.testing.assert_array_equal(
        opt.opt_state[0].trace["layers"][0]["kernel"].get_value(), trace_before[:, keep]
    )
    jloss = nnx.jit(loss)
    before = float(jloss(model))
    for _ in range(3):
        step(model, opt)
    assert float(jloss(model)) < before


def test_fold_batchnorm_module_and_widen_module_preserve_function():
    model = ResNet(rngs=nnx.Rngs(1))
    randomize_stats(model, seed=3)
    x = jax.random.normal(jax.random.key(2), (2, 9, 1))
    y = model(x)
    fsplice.fold_batchnorm_model(model.c1, model.bn1)
    model.bn1 = fsplice.Identity()
    np.testing.assert_allclose(model(x), y, atol=EPS, rtol=EPS)
    fsplice.widen_model(model.stem, model.c1, 12, key=jax.random.key(0), between=[model.bn0])
    # the stem's channels also feed the residual add: widen c1's hidden units instead
    model = ResNet(rngs=nnx.Rngs(1))
    randomize_stats(model, seed=3)
    fsplice.widen_model(model.c1, model.c2, 11, key=jax.random.key(0), between=[model.bn1])
    assert model.c1.out_features == 11 and model.c2.in_features == 11
    assert model.bn1.num_features == 11
    np.testing.assert_allclose(model(x), y, atol=EPS, rtol=EPS)


def test_demo_section_rows():
    data = D.load_mnist1d()
    data = (data[0][:512], data[1][:512], data[2][:256], data[3][:256])
    from jaxslim.demo import splice as demo

    with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes int32 counts with floats
        dense = D.make_model("cnn")
        ref = D.accuracy(dense, data[2], data[3])
        rows = demo.run(data, dense, steps=5)
    assert [r["method"].split(":")[0] for r in rows] == ["splice"] * 3
    for r in rows:
        assert set(r) == {"method", "accuracy", "size", "seconds", "note"}
        assert 0 <= r["accuracy"] <= 1 and r["seconds"] >= 0
    assert rows[2]["accuracy"] == pytest.approx(ref, abs=1e-9)  # Net2Wider preserves
    assert D.count_params(dense) == 8010  # dense untouched


# --- drop_layer / block_influence / merge_similar_blocks on integer-keyed NNX states ---------

D_MODEL, N_BLOCKS = 3, 3


class Res(nnx.Module):
    def __init__(self, seed, scale=1.0):
        rngs = nnx.Rngs(seed)
        self.l1 = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)
        self.l2 = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)
        for lin in (self.l1, self.l2):
            lin.kernel.set_value(scale * lin.kernel.get_value())
            lin.bias.set_value(scale * jax.random.normal(jax.random.key(seed + 7), (D_MODEL,)))

    def __call__(self, x):
        return x + self.l2(jax.nn.relu(self.l1(x)))


class ListNet(nnx.Module):
    """Blocks in an ``nnx.List``: state paths ``blocks/<int>/...``."""

    def __init__(self, blocks):
        self.blocks = nnx.List(blocks)

    def stack(self):
        return list(self.blocks)

    def __call__(self, x):
        hs = [x]
        for b in self.stack():
            hs.append(b(hs[-1]))
        return hs


class SeqNet(ListNet):
    """Blocks in an ``nnx.Sequential``: state paths ``body/layers/<int>/...``."""

    def __init__(self, blocks):
        self.body = nnx.Sequential(*blocks)

    def stack(self):
        return list(self.body.layers)


def similar_blocks():
    """Block 0 random; blocks 1 and 2 equal and small, so their updates point the same way."""
    return [Res(0), Res(1, scale=0.01), Res(1, scale=0.01)]


FORMS = [(net, form) for net in (ListNet, SeqNet) for form in ("state", "pure_dict")]
FORMS.append((ListNet, "plain_list"))


def setup(net, form, blocks):
    """``(params, fn, prefix)``: ``fn(params, x) -> (loss, hiddens)`` runs on any block count."""
    model = net(blocks)
    prefix = "blocks" if net is ListNet else "body/layers"
    graphdefs = {n: nnx.graphdef(net(similar_blocks()[:n])) for n in range(1, N_BLOCKS + 1)}
    templates = {n: nnx.state(net(similar_blocks()[:n])) for n in range(1, N_BLOCKS + 1)}
    state = nnx.state(model)

    def out(hs):
        return jnp.mean(hs[-1] ** 2), hs

    if form == "state":
        count = lambda s: len(s["blocks"] if net is ListNet else s["body"]["layers"])
        return state, lambda s, x: out(nnx.merge(graphdefs[count(s)], s)(x)), prefix
    pure = nnx.to_pure_dict(state)
    if form == "pure_dict":

        def fn(p, x):
            n = len(p["blocks"] if net is ListNet else p["body"]["layers"])
            s = jax.tree.map(lambda v: v, templates[n])
            nnx.replace_by_pure_dict(s, p)
            return out(nnx.merge(graphdefs[n], s)(x))

        return pure, fn, prefix
    plain = {"blocks": [pure["blocks"][i] for i in range(len(pure["blocks"]))]}

    def fn(p, x):
        hs = [x]
        for b in p["blocks"]:
            h = hs[-1]
            u = jax.nn.relu(h @ b["l1"]["kernel"] + b["l1"]["bias"][None])
            hs.append(h + u @ b["l2"]["kernel"] + b["l2"]["bias"][None])
        return out(hs)

    return plain, fn, prefix


def identity_at(blocks, i):
    return [fsplice.Identity() if j == i else b for j, b in enumerate(blocks)]


XS = [jax.random.normal(jax.random.key(k), (4, D_MODEL)) for k in (10, 11)]


@pytest.mark.parametrize("net, form", FORMS, ids=[f"{n.__name__}-{f}" for n, f in FORMS])
def test_drop_layer_and_block_influence_on_integer_keyed_blocks(net, form):
    blocks = [Res(0), Res(1), Res(2)]
    params, fn, prefix = setup(net, form, blocks)
    paths = [f"{prefix}/{i}" for i in range(N_BLOCKS)]
    for i in range(N_BLOCKS):
        small = splice.drop_layer(params, paths[i])
        assert len(fn(small, XS[0])[1]) == N_BLOCKS  # n - 1 blocks: n hidden states
        for j in range(N_BLOCKS - 1):  # block j of the result is block j (or j + 1) of the input
            got = _tree.get_path(small, paths[j])
            want = _tree.get_path(params, paths[j if j < i else j + 1])
            jax.tree.map(np.testing.assert_array_equal, got, want)
        ref = net(identity_at(blocks, i))(XS[0])[-1]  # the block replaced by the identity
        np.testing.assert_allclose(jax.jit(fn)(small, XS[0])[1][-1], ref, atol=1e-6, rtol=1e-6)
    inf = splice.block_influence(fn, params, XS, paths)
    loss = lambda m: np.mean([float(jnp.mean(m(x)[-1] ** 2)) for x in XS])
    base = loss(net(blocks))
    ablation = [loss(net(identity_at(blocks, i))) - base for i in range(N_BLOCKS)]
    np.testing.assert_allclose(inf.ablation, ablation, atol=1e-6, rtol=1e-5)
    hs = [net(blocks)(x) for x in XS]
    cos = [
        np.mean([np.mean(optax.losses.cosine_similarity(h[i], h[i + 1])) for h in hs])
        for i in range(N_BLOCKS)
    ]
    np.testing.assert_allclose(inf.cosine, 1 - np.asarray(cos), atol=1e-6)


@pytest.mark.parametrize("net, form", FORMS, ids=[f"{n.__name__}-{f}" for n, f in FORMS])
def test_merge_similar_blocks_on_integer_keyed_blocks(net, form):
    blocks = similar_blocks()
    params, fn, prefix = setup(net, form, blocks)
    paths = [f"{prefix}/{i}" for i in range(N_BLOCKS)]
    new, rep = splice.merge_similar_blocks(fn, params, XS, paths, threshold=0.99, where="l2")
    assert rep.similarity[0] < 0.99 <= rep.similarity[1]
    assert rep.merged == ((paths[1], paths[2]),)
    # reference: block 1 with its output projection doubled, block 2 replaced by the identity
    ref_blocks = similar_blocks()
    for name in ("kernel", "bias"):
        v = getattr(ref_blocks[1].l2, name)
        v.set_value(2 * v.get_value())
    ref_model = net(identity_at(ref_blocks, 2))
    for x in XS:
        np.testing.assert_allclose(fn(new, x)[1][-1], ref_model(x)[-1], atol=1e-6, rtol=1e-6)
    assert len(fn(new, XS[0])[1]) == N_BLOCKS  # two blocks left
    np.testing.assert_allclose(
        rep.loss_after, np.mean([float(jnp.mean(ref_model(x)[-1] ** 2)) for x in XS]), rtol=1e-6
    )


def test_deprecated_module_names_warn_and_keep_their_old_call_forms():
    assert not [n for n in fsplice.__all__ if n.endswith("_module")]
    x = jnp.ones((1, 4))

    def make():
        return nnx.Sequential(
            nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.Linear(6, 2, rngs=nnx.Rngs(1))
        )

    with pytest.warns(DeprecationWarning, match="trace_module is deprecated; use trace_model"):
        trace_module = fsplice.trace_module
    model = make()
    (g,) = [g for g in trace_module(model, x) if g.removable]
    opt = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    with pytest.warns(DeprecationWarning, match="use remove_channels_model"):
        fsplice.remove_channels_module(model, g, [0, 2], opt)  # optimizer was positional
    assert model.layers[0].kernel.get_value().shape == (4, 2)
    assert opt.opt_state[0].trace["layers"][1]["kernel"].get_value().shape == (2, 2)
    ref = make()
    y = ref(x)
    with pytest.warns(DeprecationWarning, match="use widen_model"):
        fsplice.widen_module(ref.layers[0], ref.layers[1], 9, jax.random.key(0))  # key positional
    assert ref.layers[0].out_features == 9
    np.testing.assert_allclose(ref(x), y, atol=EPS, rtol=EPS)
    with pytest.warns(DeprecationWarning, match="use prune_channels_model"):
        rep = fsplice.prune_channels_module(make(), x, sparsity=0.5)
    assert rep.groups[0].size_after == 3
    with pytest.raises(AttributeError, match="no attribute 'nothing_module'"):
        fsplice.nothing_module  # noqa: B018
