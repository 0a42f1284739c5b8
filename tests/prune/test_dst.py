"""prune: ERK / uniform layer sparsities and sparse training (RigL, SET, static, STE, SR-STE)."""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from jaxslim import prune
from jaxslim.structures import NM

VARIANTS = {"eager": lambda f: f, "jit": jax.jit}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return VARIANTS[request.param]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "l1": {
            "kernel": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
            "bias": jnp.ones(16),
        },
        "l2": {
            "kernel": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32),
            "bias": jnp.ones(4),
        },
        "scale": jnp.float32(2.0),
    }


def erk_reference(shapes, s):
    """RigL's sparse_utils.get_sparsities_erdos_renyi (float, before integer rounding)."""
    dense = set()
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for name, sh in shapes.items():
            n = math.prod(sh)
            if name in dense:
                rhs -= n * s
            else:
                rhs += n * (1 - s)
                raw[name] = sum(sh) / n
                divisor += raw[name] * n
        if not raw:  # every layer dense (s = 0 or nearly): nothing left to scale
            return dict.fromkeys(shapes, 0.0)
        eps = rhs / divisor
        mx = max(raw.values())
        if mx * eps > 1:
            dense |= {k for k, v in raw.items() if v == mx}
        else:
            break
    return {k: 0.0 if k in dense else 1 - eps * raw[k] for k in shapes}


@given(st.floats(0, 1), st.sampled_from([(8, 16), (40, 128), (3, 5, 7)]), st.integers(2, 64))
@example(0.0, (8, 16), 25)  # s = 0: every layer dense
def test_erk_matches_reference_and_total_count_is_exact(s, shape_a, width):
    shapes = {"a": shape_a, "b": (width, 10), "c": (4, 4)}
    params = {k: jnp.zeros(v) for k, v in shapes.items()}
    sp = prune.erk(params, s)
    ref = erk_reference(shapes, s) if s < 1 else dict.fromkeys(shapes, 1.0)
    n = {k: math.prod(v) for k, v in shapes.items()}
    for k in shapes:
        assert abs(sp[k] - ref[k]) * n[k] <= 1.0 + 1e-6  # integer rounding of the count only
    # topk_mask prunes round(sp * n) per leaf; those counts sum exactly to the overall count
    assert sum(round(sp[k] * n[k]) for k in shapes) == round(s * sum(n.values()))


def test_erk_redistributes_to_dense_layers():
    # a 2x2 layer has ERK density >> 1 at 50 %: it is kept dense, the rest absorbs its share
    params = {"big": jnp.zeros((64, 64)), "tiny": jnp.zeros((2, 2)), "b": jnp.zeros(64)}
    sp = prune.erk(params, 0.5)
    assert sp["tiny"] == 0.0 and sp["b"] is None
    assert round(sp["big"] * 4096) == round(0.5 * 4100)
    m = prune.topk_mask(prune.magnitude(params), sp)
    assert int((~m["big"]).sum()) == 2050 and bool(m["tiny"].all())


def test_uniform_and_per_leaf_topk_and_pruner(variant):
    params = _params()
    sp = prune.uniform(params, 0.75)
    assert sp["l1"]["kernel"] == 0.75 and sp["l1"]["bias"] is None and sp["scale"] is None
    assert prune.uniform({"w": jnp.ones((2, 2)), "n": jnp.int32(3)}, 0.5)["n"] is None
    sp = prune.erk(params, 0.8)
    tx = optax.chain(optax.sgd(0.01), prune.pruner(sp))
    state = tx.init(params)
    step = variant(lambda p, s, g: tx.update(g, s, p))
    p = params
    for _ in range(3):
        u, state = step(p, state, jax.tree.map(jnp.ones_like, p))
        p = optax.apply_updates(p, u)
    for name, n in (("l1", 128), ("l2", 64)):
        assert int((p[name]["kernel"] == 0).sum()) == round(sp[name]["kernel"] * n)
    total = sum(int((p[k]["kernel"] == 0).sum()) for k in ("l1", "l2"))
    assert total == round(0.8 * 192)


def _train(tx, params, steps, variant, seed=1):
    rng = np.random.default_rng(seed)
    state = tx.init(params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = variant(step)
    hist = []
    for _ in range(steps):
        g = jax.tree.map(
            lambda x: (
                jnp.asarray(rng.standard_normal(x.shape), x.dtype)
                if jnp.issubdtype(x.dtype, jnp.floating)
                else jnp.zeros_like(x)
            ),
            params,
        )
        before = prune.masks_of(state)
        params, state = step(params, state, g)
        hist.append((before, prune.masks_of(state), params))
    return params, state, hist


@pytest.mark.parametrize(
    "make,variant",
    [
        ("rigl", jax.jit),
        ("rigl_wrapped", jax.jit),
        ("set", jax.jit),
        ("rigl", VARIANTS["eager"]),  # eager lax.cond compiles per call: one eager case
    ],
    ids=["rigl-jit", "rigl_wrapped-jit", "set-jit", "rigl-eager"],
)
def test_dynamic_sparse_keeps_counts_exact_and_grown_start_at_zero(make, variant):
    kw = dict(update_every=2, end_step=9, drop_fraction=0.5, key=jax.random.key(3))
    tx = {
        "rigl": lambda: optax.chain(optax.sgd(0.1), prune.rigl(0.75, **kw)),
        "rigl_wrapped": lambda: prune.rigl(0.75, optimizer=optax.sgd(0.1), **kw),
        "set": lambda: optax.chain(optax.sgd(0.1), prune.set_sparse(0.75, **kw)),
    }[make]()
    steps = 12 if variant is jax.jit else 5  # eager lax.cond compiles both branches per call
    params, state, hist = _train(tx, _params(), steps, variant)
    changed = 0
    for t, (before, after, p) in enumerate(hist):
        for name, n in (("l1", 128), ("l2", 64)):
            m0, m1 = np.asarray(before[name]["kernel"]), np.asarray(after[name]["kernel"])
            assert m1.sum() == n - round(0.75 * n)  # active count exactly constant
            w = np.asarray(p[name]["kernel"])
            assert (w[~m1] == 0).all()  # inactive exactly zero
            grown = m1 & ~m0
            assert (w[grown] == 0).all()  # grown weights start at exactly zero
            if t in (2, 4, 6, 8):
                changed += int(grown.sum() > 0)
            elif t > 0:
                np.testing.assert_array_equal(m0, m1)  # no change between updates
        assert (np.asarray(p["l1"]["bias"]) != 0).all()
    assert changed >= (6 if variant is jax.jit else 2)


def test_rigl_drops_lowest_magnitude_and_grows_largest_gradient():
    w = jnp.array([[0.0, 5.0, 1.0, 3.0], [0.0, 0.0, 2.0, 4.0]])
    m = w != 0  # 5 active
    g = jnp.array([[9.0, 0.0, 0.0, 0.0], [1.0, 8.0, 0.0, 0.0]])
    tx = prune.rigl(0.5, update_every=1, end_step=2, drop_fraction=0.8, optimizer=optax.sgd(0.0))
    state = tx.init({"w": w})._replace(masks={"w": m}, count=jnp.int32(1))
    u, state = jax.jit(tx.update)({"w": g}, state, {"w": w})
    # f_1 = 0.8/2 * (1 + cos(pi/2)) = 0.4 -> k = round(0.4 * 5) = 2: drop |w| = 1, 2; grow g = 9, 8
    expect = np.array([[True, True, False, True], [False, True, False, True]])
    np.testing.assert_array_equal(prune.masks_of(state)["w"], expect)
    new = np.asarray(optax.apply_updates({"w": w}, u)["w"])
    np.testing.assert_array_equal(new, np.where(expect, np.asarray(w), 0))


def test_static_sparse_mask_fixed_and_erk(variant):
    params = _params()
    sp = prune.erk(params, 0.9)
    tx = optax.chain(optax.sgd(0.1), prune.static_sparse(0.9, distribution="erk"))
    params, state, hist = _train(tx, params, 4, variant)
    m = prune.masks_of(state)
    for name, n in (("l1", 128), ("l2", 64)):
        assert int((~m[name]["kernel"]).sum()) == round(sp[name]["kernel"] * n)
        np.testing.assert_array_equal(hist[0][0][name]["kernel"], m[name]["kernel"])
        np.testing.assert_array_equal(np.asarray(params[name]["kernel"]) != 0, m[name]["kernel"])


def test_straight_through_forward_masked_gradient_dense(variant):
    p = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)}

    def f(p):
        return jnp.sum(prune.straight_through(p, 0.5, structure=NM(2, 4))["w"] ** 2)

    m = prune.topk_mask(prune.magnitude(p), 0.5, structure=NM(2, 4))["w"]
    masked = np.where(m, np.asarray(p["w"]), 0)
    np.testing.assert_allclose(variant(f)(p), (masked**2).sum(), rtol=1e-6)
    np.testing.assert_allclose(variant(jax.grad(f))(p)["w"], 2 * masked, rtol=1e-6)


def test_sr_ste_adds_decay_on_pruned_weights_and_2_4_from_scratch(variant):
    p = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((8, 4)), jnp.float32)}
    g = {"w": jnp.asarray(np.random.default_rng(2).standard_normal((8, 4)), jnp.float32)}
    tx = prune.sr_ste(0.5, structure=NM(2, 4), decay=0.1)
    u, state = variant(tx.update)(g, tx.init(p), p)
    m = np.asarray(prune.topk_mask(prune.magnitude(p), 0.5, structure=NM(2, 4))["w"])
    ref = np.asarray(g["w"]) + 0.1 * np.where(m, 0, np.asarray(p["w"]))
    np.testing.assert_allclose(u["w"], ref, rtol=1e-6)
    np.testing.assert_array_equal(prune.masks_of(state)["w"], m)
    u0, _ = prune.ste(0.5, structure=NM(2, 4)).update(g, tx.init(p), p)
    np.testing.assert_array_equal(u0["w"], g["w"])
    # every run of 4 along the input axis keeps exactly 2
    assert (m.reshape(2, 4, 4).sum(1) == 2).all()


def test_sr_ste_trains_a_2_4_regression_from_scratch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    w_true = rng.standard_normal((8, 2)) * np.tile([[1], [1], [0], [0]], (2, 2))
    y = x @ jnp.asarray(w_true, jnp.float32)
    p = {"w": jnp.asarray(rng.standard_normal((8, 2)) * 0.1, jnp.float32)}
    tx = optax.chain(prune.sr_ste(0.5, structure=NM(2, 4), decay=1e-3), optax.sgd(0.05))
    state = tx.init(p)

    @jax.jit
    def step(p, s):
        loss = lambda p: jnp.mean(
            (x @ prune.straight_through(p, 0.5, structure=NM(2, 4))["w"] - y) ** 2
        )  # noqa: E731,E501
        val, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, val

    for _ in range(300):
        p, state, loss = step(p, state)
    assert float(loss) < 1e-3
    final = prune.apply_mask(p, prune.topk_mask(prune.magnitude(p), 0.5, structure=NM(2, 4)))
    np.testing.assert_array_equal(np.asarray(final["w"]) != 0, w_true != 0)


@pytest.mark.standard_promotion
def test_rigl_with_adam_no_retrace():
    params = _params()
    tx = prune.rigl(prune.erk(params, 0.9), update_every=2, end_step=10, optimizer=optax.adam(1e-2))
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(5):
        params, state = step(params, state, jax.tree.map(jnp.ones_like, params))
    assert len(traces) == 1


def _drop_grow_reference(m, w, g, k):
    """Drop the k lowest |w| active, then grow the k largest |g| not active; ties by flat index."""
    m, w, g = np.asarray(m).ravel(), np.asarray(w).ravel(), np.asarray(g).ravel()
    active = np.flatnonzero(m)
    drop = active[np.argsort(np.abs(w[active]), kind="stable")[:k]]
    after = m.copy()
    after[drop] = False
    free = np.flatnonzero(~after)
    grow = free[np.argsort(-np.abs(g[free]), kind="stable")[:k]]
    after[grow] = True
    return after


@pytest.mark.parametrize("variant", [jax.jit, VARIANTS["eager"]], ids=["jit", "eager"])
def test_rigl_update_equals_reference_with_ties(variant):
    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.choice([0.5, -0.5, 1.0, 2.0], (8, 16)), jnp.float32)  # |w| ties
    g = jnp.asarray(rng.choice([0.0, 1.0, -1.0, 3.0], (8, 16)), jnp.float32)  # |g| ties
    m = jnp.asarray(rng.random((8, 16)) < 0.4)
    tx = prune.rigl(0.5, update_every=1, end_step=2, drop_fraction=0.8, optimizer=optax.sgd(0.0))
    state = tx.init({"w": w})._replace(masks={"w": m}, count=jnp.int32(1))
    _, state = variant(tx.update)({"w": g}, state, {"w": jnp.where(m, w, 0)})
    k = round(0.4 * int(m.sum()))  # f_1 = 0.8 / 2 * (1 + cos(pi / 2)) = 0.4
    want = _drop_grow_reference(m, w, g, k).reshape(8, 16)
    np.testing.assert_array_equal(prune.masks_of(state)["w"], want)


def test_sparse_state_survives_a_donating_step():
    params = _params()
    tx = optax.chain(optax.sgd(0.1), prune.set_sparse(0.5, update_every=1, end_step=5))
    step = jax.jit(
        lambda p, s: tx.update(jax.tree.map(jnp.ones_like, p), s, p), donate_argnums=(1,)
    )
    inits = []
    for _ in range(2):  # the second init must not see the key the first step donated
        state = tx.init(params)
        inits.append(np.asarray(prune.masks_of(state)["l1"]["kernel"]))
        _, state = step(params, state)
    np.testing.assert_array_equal(inits[0], inits[1])  # the same key: the same initial mask


def _set_growth_bits_reference(key, t, path, shape):
    """SET's growth order: ``jax.random.bits``' 32-bit output (``x0 ^ x1`` of threefry-2x32) at
    the counter ``(crc32(path) & 0x7FFFFFFF, flat index)`` under ``fold_in(key, t)``."""
    from jax.extend.random import threefry_2x32

    n = math.prod(shape)
    hi = np.full(n, zlib.crc32(path.encode()) & 0x7FFFFFFF, np.uint32)
    counts = jnp.asarray(np.concatenate([hi, np.arange(n, dtype=np.uint32)]))
    out = np.asarray(threefry_2x32(jax.random.key_data(jax.random.fold_in(key, t)), counts))
    return out[:n] ^ out[n:]


@pytest.mark.parametrize("variant", [jax.jit, VARIANTS["eager"]], ids=["jit", "eager"])
@pytest.mark.parametrize("t", [1, 5])
def test_set_update_equals_reference_random_growth(variant, t):
    rng = np.random.default_rng(11)
    w = jnp.asarray(rng.choice([0.5, -0.5, 1.0, 2.0], (8, 16)), jnp.float32)  # |w| ties
    m = jnp.asarray(rng.random((8, 16)) < 0.4)
    key = jax.random.key(5)
    tx = prune.set_sparse(0.5, update_every=1, end_step=8, drop_fraction=0.8, key=key)
    state = tx.init({"w": w})._replace(masks={"w": m}, count=jnp.int32(t))
    params = {"w": jnp.where(m, w, 0)}
    u, state = variant(tx.update)({"w": jnp.ones((8, 16))}, state, params)
    k = round(0.4 * (1 + math.cos(math.pi * t / 8)) * int(m.sum()))
    assert k > 0
    # drop the k lowest |w| (ties by flat index), then grow the k inactive entries with the
    # lowest random bits: a uniformly random k-subset of the inactive entries
    bits = np.minimum(_set_growth_bits_reference(key, t, "w", (8, 16)), 2**32 - 2)
    mm, ww = np.asarray(m).ravel(), np.asarray(w).ravel()
    active = np.flatnonzero(mm)
    want = mm.copy()
    want[active[np.argsort(np.abs(ww[active]), kind="stable")[:k]]] = False
    free = np.flatnonzero(~want)
    want[free[np.argsort(bits[free], kind="stable")[:k]]] = True
    want = want.reshape(8, 16)
    np.testing.assert_array_equal(prune.masks_of(state)["w"], want)
    new = np.asarray(optax.apply_updates(params, u)["w"])
    kept = want & np.asarray(m)
    np.testing.assert_array_equal(new, np.where(kept, np.asarray(params["w"]) + 1.0, 0.0))


def test_set_growth_bits_are_jax_random_bits_and_uniform():
    # leaf id 0 is the counter stream of jax.random.bits itself
    key = jax.random.key(2)
    for t in (1, 7):
        ref = np.asarray(jax.random.bits(jax.random.fold_in(key, t), (3, 5)))
        counts = np.concatenate([np.zeros(15, np.uint32), np.arange(15, dtype=np.uint32)])
        out = np.asarray(
            jax.extend.random.threefry_2x32(
                jax.random.key_data(jax.random.fold_in(key, t)), jnp.asarray(counts)
            )
        )
        np.testing.assert_array_equal((out[:15] ^ out[15:]).reshape(3, 5), ref)
    # every inactive entry is grown about equally often: chi-square over 400 updates
    w = jnp.asarray(np.arange(1.0, 17.0).reshape(2, 8), jnp.float32)
    m = jnp.asarray(np.arange(16).reshape(2, 8) < 8)  # row 0 active
    tx = prune.set_sparse(0.5, update_every=1, end_step=10**6, drop_fraction=0.125, key=key)
    state0 = tx.init({"w": w})._replace(masks={"w": m})

    @jax.jit
    def step(t):
        return prune.masks_of(tx.update({"w": w}, state0._replace(count=t), {"w": w})[1])

    after_drop = np.asarray(m).ravel().copy()
    after_drop[0] = False  # k = round(~0.125 * 8) = 1: the lowest |w| (flat 0) is dropped
    counts = np.zeros(16)
    for t in range(1, 401):
        grown = np.asarray(step(jnp.int32(t))["w"]).ravel() & ~after_drop
        assert grown.sum() == 1  # and one of the 9 free entries is grown
        counts += grown
    # the dropped entry (flat 0) rejoins the 8 inactive ones: 9 equally likely candidates
    cand = np.r_[0, 8:16]
    assert counts[1:8].sum() == 0
    chi2 = ((counts[cand] - 400 / 9) ** 2 / (400 / 9)).sum()
    assert chi2 < 26.1  # chi-square, 8 degrees of freedom, p = 0.001


def test_set_update_uses_no_rolled_threefry_loop():
    # jax.random lowers threefry to a rolled while loop on CPU whose full-size carried arrays
    # cost every step (the untaken cond branch included): SET generates its bits elementwise
    params = _params()
    tx = optax.chain(optax.sgd(0.1), prune.set_sparse(0.9, update_every=2, end_step=10))
    state = tx.init(params)
    jaxpr = str(jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p))(params, state, params))
    assert "threefry2x32" not in jaxpr and "random_bits" not in jaxpr
    assert "cond" in jaxpr


@pytest.mark.parametrize(
    "key",
    [jax.random.PRNGKey(4), jax.random.key(4, impl="rbg")],
    ids=["raw-uint32", "rbg"],
)
def test_set_with_other_key_kinds_keeps_counts_exact(key):
    kw = dict(update_every=1, end_step=6, drop_fraction=0.5, key=key)
    tx = optax.chain(optax.sgd(0.1), prune.set_sparse(0.75, **kw))
    params, state, hist = _train(tx, _params(), 4, jax.jit)
    grown = 0
    for before, after, p in hist:
        for name, n in (("l1", 128), ("l2", 64)):
            m0, m1 = np.asarray(before[name]["kernel"]), np.asarray(after[name]["kernel"])
            assert m1.sum() == n - round(0.75 * n)
            w = np.asarray(p[name]["kernel"])
            assert (w[~m1] == 0).all() and (w[m1 & ~m0] == 0).all()
            grown += int((m1 & ~m0).sum())
    assert grown > 0
