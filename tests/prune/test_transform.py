"""prune: sparsity schedules, the pruner and keep_mask transforms, masks_of."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxslim import prune
from jaxslim.structures import Channels

VARIANTS = {"eager": lambda f: f, "jit": jax.jit}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return VARIANTS[request.param]


def zhu_gupta(t, final, t0, t1, initial, power, freq):
    """Independent reference of Zhu & Gupta's formula, in float64."""
    if t < t0:
        return initial
    if t >= t1:
        return final
    last = t0 + ((t - t0) // freq) * freq
    return final + (initial - final) * (1 - (last - t0) / (t1 - t0)) ** power


@given(
    st.floats(0, 1),
    st.floats(0, 1),
    st.integers(0, 50),
    st.integers(1, 200),
    st.integers(1, 20),
    st.sampled_from([1, 2, 3]),
)
def test_polynomial_schedule_matches_formula(final, initial, t0, span, freq, power):
    sched = prune.polynomial_schedule(
        final, t0, t0 + span, initial=initial, power=power, frequency=freq
    )
    ts = np.arange(0, t0 + span + 5)
    got = np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(ts)))
    ref = np.array([zhu_gupta(t, final, t0, t0 + span, initial, power, freq) for t in ts])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_schedules_bad_input():
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        prune.polynomial_schedule(1.2, 0, 10)
    with pytest.raises(ValueError, match="end_step > begin_step"):
        prune.polynomial_schedule(0.5, 10, 10)
    with pytest.raises(ValueError, match="frequency"):
        prune.polynomial_schedule(0.5, 0, 10, frequency=0)
    with pytest.raises(ValueError, match="at_step"):
        prune.one_shot_schedule(0.5, -1)
    with pytest.raises(ValueError, match="sparsity"):
        prune.constant_schedule(-0.5)


def _params():
    rng = np.random.default_rng(0)
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


def _run(tx, params, steps, variant, grad_seed=1):
    state = tx.init(params)
    rng = np.random.default_rng(grad_seed)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = variant(step)
    for _ in range(steps):
        grads = jax.tree.map(
            lambda p: (
                jnp.asarray(rng.standard_normal(p.shape), p.dtype)
                if jnp.issubdtype(p.dtype, jnp.floating)
                else jnp.zeros_like(p)
            ),
            params,
        )
        params, state = step(params, state, grads)
    return params, state


def test_pruner_gradual_reaches_exact_sparsity_and_zeros_stay(variant):
    sched = prune.polynomial_schedule(0.9, 2, 12, frequency=2)
    tx = optax.chain(optax.sgd(0.01), prune.pruner(sched))
    params, state = _run(tx, _params(), 20, variant)
    for name in ("l1", "l2"):
        k = np.asarray(params[name]["kernel"])
        assert (k == 0).sum() == round(0.9 * k.size)
        assert (np.asarray(params[name]["bias"]) != 0).all()
    masks = prune.masks_of(state)
    for name in ("l1", "l2"):
        np.testing.assert_array_equal(
            masks[name]["kernel"], np.asarray(params[name]["kernel"]) != 0
        )
    assert masks["l1"]["bias"] is None and masks["scale"] is None


def test_pruner_masks_are_monotone_and_update_only_when_schedule_changes():
    calls = []

    def counting_score(p):
        jax.debug.callback(lambda: calls.append(1))
        return prune.magnitude(p)

    sched = prune.polynomial_schedule(0.5, 0, 6, frequency=3)  # updates at t = 0, 3, 6
    tx = optax.chain(optax.sgd(0.05), prune.pruner(sched, score=counting_score))
    params = _params()
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    prev = None
    for t in range(10):
        g = jax.tree.map(lambda p: jnp.ones_like(p) * (t % 3 - 1), params)
        updates, state = step(params, state, g)
        params = optax.apply_updates(params, updates)
        m = np.asarray(prune.masks_of(state)["l1"]["kernel"])
        if prev is not None:
            assert (m <= prev).all()  # a pruned weight never comes back
        prev = m
    jax.effects_barrier()
    assert len(calls) == 3


def test_pruner_channels_and_global_scope(variant):
    tx = optax.chain(optax.sgd(0.01), prune.pruner(0.5, structure=Channels(), scope="global"))
    params, _ = _run(tx, _params(), 3, variant)
    zero_cols = [(np.asarray(params[n]["kernel"]) == 0).all(0).sum() for n in ("l1", "l2")]
    assert sum(zero_cols) == round(0.5 * (16 + 4))
    for n in ("l1", "l2"):
        k = np.asarray(params[n]["kernel"])
        assert ((k == 0).all(0) | (k != 0).all(0)).all()  # whole channels only


@pytest.mark.standard_promotion
def test_pruner_is_jit_stable_no_retrace():
    tx = optax.chain(optax.adam(1e-2), prune.pruner(prune.polynomial_schedule(0.8, 0, 5)))
    params = _params()
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(6):
        params, state = step(params, state, jax.tree.map(jnp.ones_like, params))
    assert len(traces) == 1


def test_pruner_preserves_bf16_dtypes():
    params = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, _params()
    )
    tx = optax.chain(optax.sgd(0.1), prune.pruner(0.5))
    out, _ = _run(tx, params, 2, jax.jit)
    assert out["l1"]["kernel"].dtype == jnp.bfloat16
    assert int((out["l1"]["kernel"] == 0).sum()) == 64


@pytest.mark.standard_promotion
def test_keep_mask_holds_zeros(variant):
    params = _params()
    mask = prune.topk_mask(prune.magnitude(params), 0.75)
    params = prune.apply_mask(params, mask)
    tx = optax.chain(optax.adam(0.1), prune.keep_mask(mask))
    out, state = _run(tx, params, 5, variant)
    for n in ("l1", "l2"):
        np.testing.assert_array_equal(np.asarray(out[n]["kernel"]) != 0, mask[n]["kernel"])
    assert prune.masks_of(state)["l1"]["kernel"].shape == (8, 16)


def test_transforms_bad_input():
    params = _params()
    with pytest.raises(ValueError, match="params are required"):
        tx = prune.pruner(0.5)
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="structures differ"):
        prune.keep_mask({"l1": None}).init(params)
    bad = prune.topk_mask(prune.magnitude(params), 0.5)
    bad["l1"]["kernel"] = jnp.ones((3, 3), bool)
    with pytest.raises(ValueError, match="'l1/kernel'"):
        prune.keep_mask(bad).init(params)
    with pytest.raises(ValueError, match="selects no"):
        prune.pruner(0.5, where="conv").init(params)
    with pytest.raises(ValueError, match="NM.*'l1/kernel'"):
        prune.pruner(0.5, structure=prune.NM(2, 3)).init(params)
    with pytest.raises(ValueError, match="no pruner"):
        prune.masks_of(optax.sgd(0.1).init(params))
    with pytest.raises(TypeError, match="schedule"):
        prune.pruner("gradual")


def test_pruner_traced_nan_schedule_keeps_masks_and_out_of_range_is_clipped():
    params = {"w": jnp.asarray(np.random.default_rng(5).standard_normal((8, 4)), jnp.float32)}
    values = jnp.array([0.25, 0.5, jnp.nan, jnp.nan, 0.75, -1.0, 2.0], jnp.float32)
    tx = prune.pruner(lambda t: values[jnp.minimum(t, 6)])
    state = tx.init(params)
    update = jax.jit(tx.update)
    zeros = {"w": jnp.zeros((8, 4))}
    pruned = []
    for _ in range(7):
        _, state = update(zeros, state, params)
        pruned.append(int((~prune.masks_of(state)["w"]).sum()))
    # 0.25, 0.5, NaN (keep), NaN (keep), 0.75, -1 -> 0, 2 -> 1
    assert pruned == [8, 16, 16, 16, 24, 0, 32]


@pytest.mark.parametrize("structure", [prune.Unstructured(), Channels()], ids=["unstr", "chan"])
def test_pruner_masks_equal_topk_mask_on_update_steps_and_stay_between(variant, structure):
    # the pruner's own per-leaf selection (a small program) against the reference topk_mask
    sched = prune.polynomial_schedule(0.75, 0, 6, frequency=2)  # updates at t = 0, 2, 4, 6
    tx = prune.pruner(sched, structure=structure)
    params = _params()
    params["l1"]["kernel"] = params["l1"]["kernel"].at[0, :4].set(0.5)  # ties at the threshold
    state = tx.init(params)
    update = variant(tx.update)
    rng = np.random.default_rng(3)
    for t in range(8):
        prev = prune.masks_of(state)
        updates, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
        got = prune.masks_of(state)
        if t in (0, 2, 4, 6):
            scores = prune.magnitude(prune.apply_mask(params, prev))
            want = prune.topk_mask(scores, sched(t), structure=structure)
        else:
            want = prev  # no update: the very same masks
        for name in ("l1", "l2"):
            np.testing.assert_array_equal(got[name]["kernel"], want[name]["kernel"])
        params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape)), params)
        params = optax.apply_updates(params, updates)


def test_pruner_per_leaf_sparsities_equal_topk_mask(variant):
    params = _params()
    sp = prune.erk(params, 0.8)
    tx = prune.pruner(sp)
    _, state = variant(tx.update)(params, tx.init(params), params)
    want = prune.topk_mask(prune.magnitude(params), sp)
    for name in ("l1", "l2"):
        np.testing.assert_array_equal(prune.masks_of(state)[name]["kernel"], want[name]["kernel"])


@pytest.mark.parametrize("shape", [(7,), (8, 16), (3, 5, 4), (260, 256)])
def test_lowest_k_leaf_equals_lowest_k_with_ties(shape):
    # the 4x8-bit path (< 65536 keys) and the 2x16-bit path (260 * 256 keys)
    from jaxslim.prune._masks import lowest_k
    from jaxslim.prune._transform import lowest_k_leaf

    rng = np.random.default_rng(0)
    n = int(np.prod(shape))
    pool = np.array([0, 5, 70000, 65537 * 3, 0xFFFFFFFE, 0xFFFFFFFF], np.uint32)
    keys = [
        rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32),
        rng.choice(pool, shape),  # mostly ties
    ]
    f = jax.jit(lowest_k_leaf)
    for key in map(jnp.asarray, keys):
        for k in sorted({0, 1, n // 3, n - 1, n}):
            got = np.asarray(f(key, jnp.int32(k)))
            want = np.asarray(lowest_k([key], jnp.int32(k))[0])
            np.testing.assert_array_equal(got, want)
            assert got.sum() == k


def test_keep_mask_state_survives_a_donating_step():
    params = _params()
    mask = prune.topk_mask(prune.magnitude(params), 0.5)
    tx = optax.chain(optax.sgd(0.1), prune.keep_mask(mask))
    step = jax.jit(
        lambda p, s: tx.update(jax.tree.map(jnp.ones_like, p), s, p), donate_argnums=(1,)
    )
    for _ in range(2):  # a second init after the first state was donated
        _, state = step(params, tx.init(params))
    np.testing.assert_array_equal(prune.masks_of(state)["l1"]["kernel"], mask["l1"]["kernel"])
