"""prune.owl: OWL layer-wise sparsities against a NumPy transcription of the released code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxslim import calibrate
from jaxslim.prune._owl import owl


def _stats(sq: np.ndarray, shape: tuple[int, ...], con=(0,), lead=()) -> calibrate.Stats:
    sq = jnp.asarray(sq, jnp.float32)
    k = sq.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(k, dtype=jnp.float32), (*sq.shape[:-1], k, k))
    return calibrate.Stats(
        eye, sq, jnp.sqrt(sq), jnp.ones(sq.shape[:-1], jnp.int32), con, lead, shape
    )


def _paper(scores_by_layer: list[np.ndarray], s: float, lam: float, m: float) -> np.ndarray:
    """``prune_wanda_outlier`` of luuyin/OWL: outlier ratio per layer, then the adjustment."""
    ratios = []
    for w_metric in scores_by_layer:
        flat = np.concatenate([x.ravel() for x in w_metric])
        ratios.append((flat > np.mean(flat) * m).sum() / flat.size * 100)  # check_outlier_mean
    r = np.array(ratios)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    r = r - np.mean(r) + (1 - s)
    return 1 - r


def _model(key, n_layers=4, d=16, f=32):
    keys = jax.random.split(key, 2 * n_layers + 1)
    params = {}
    for i in range(n_layers):
        q = jax.random.normal(keys[2 * i], (d, d))
        mlp = jax.random.normal(keys[2 * i + 1], (d, f)) ** 3  # heavier tails in some layers
        params[f"layer{i}"] = {"q": q * (1 + 3 * (i % 2)), "mlp": mlp if i % 2 else mlp**0}
    x = jax.random.normal(keys[-1], (64, d)) * jnp.linspace(0.1, 3.0, d)[None]
    stats = {}
    for i in range(n_layers):
        for name in ("q", "mlp"):
            stats[f"layer{i}/{name}"] = _stats(
                np.sum(np.asarray(x) ** 2, 0), (d, d if name == "q" else f)
            )
    return params, stats, x


def test_matches_released_code_per_transformer_block():
    params, stats, x = _model(jax.random.key(0))
    sq = np.sum(np.asarray(x) ** 2, 0)
    layers = []
    for i in range(4):
        p = params[f"layer{i}"]
        layers.append([np.abs(np.asarray(p[n])) * np.sqrt(sq)[:, None] for n in ("q", "mlp")])
    want = _paper(layers, 0.7, 0.08, 5.0)
    got = owl(params, stats, 0.7, lam=0.08, M=5, blocks=r"layer(\d+)/")
    for i in range(4):
        assert got[f"layer{i}/q"] == got[f"layer{i}/mlp"]
        np.testing.assert_allclose(got[f"layer{i}/q"], want[i], rtol=0, atol=1e-12)
    by_fn = owl(params, stats, 0.7, lam=0.08, M=5, blocks=lambda p: p.split("/")[0])
    assert by_fn == got


def test_per_kernel_default_weighted_mean_and_outliers_lower_sparsity():
    params, stats, _ = _model(jax.random.key(1))
    got = owl(params, stats, 0.5, lam=0.1)
    assert list(got) == list(stats)
    n = {p: params[p.split("/")[0]][p.split("/")[1]].size for p in got}
    mean = sum(got[p] * n[p] for p in got) / sum(n.values())
    assert abs(mean - 0.5) < 1e-12
    # The cubed (heavy-tailed) mlp kernels have more outliers than the constant ones.
    assert got["layer1/mlp"] < got["layer0/mlp"]
    assert max(got.values()) - min(got.values()) <= 2 * 0.1 + 1e-12


@given(
    sizes=st.lists(st.sampled_from([(4, 4), (8, 4), (4, 12), (16, 8)]), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    s=st.floats(0.0, 0.95),
    lam=st.floats(0.0, 0.3),
)
def test_size_weighted_mean_is_the_target(sizes, seed, s, lam):
    rng = np.random.default_rng(seed)
    params = {
        f"k{i}": jnp.asarray(rng.standard_t(2, sh), jnp.float32) for i, sh in enumerate(sizes)
    }
    stats = {p: _stats(rng.uniform(0.1, 4.0, w.shape[0]), w.shape) for p, w in params.items()}
    try:
        got = owl(params, stats, s, lam=lam, M=2)
    except ValueError as e:
        assert "use lam <" in str(e)
        return
    n = {p: params[p].size for p in got}
    assert abs(sum(got[p] * n[p] for p in got) / sum(n.values()) - s) < 1e-9
    assert all(0 <= v < 1 for v in got.values())
    assert max(got.values()) - min(got.values()) <= 2 * lam + 1e-9


def test_layout_from_stats_out_in_kernel_equals_in_out():
    rng = np.random.default_rng(3)
    a, b = (jnp.asarray(rng.standard_t(2, (8, 6)), jnp.float32) for _ in range(2))
    sq = {"a": rng.uniform(0.5, 2, 8), "b": rng.uniform(0.5, 2, 8)}
    flax = owl({"a": a, "b": b}, {p: _stats(sq[p], (8, 6)) for p in sq}, 0.5, M=2)
    eqx = owl({"a": a.T, "b": b.T}, {p: _stats(sq[p], (6, 8), con=(1,)) for p in sq}, 0.5, M=2)
    assert flax == eqx


def test_stacked_kernel_is_one_kernel_and_where_selects():
    rng = np.random.default_rng(4)
    stack = jnp.asarray(rng.standard_t(2, (3, 8, 4)), jnp.float32)
    other = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    stats = {
        "stack": _stats(rng.uniform(0.5, 2, (3, 8)), (3, 8, 4), con=(1,), lead=(0,)),
        "other": _stats(rng.uniform(0.5, 2, 8), (8, 4)),
    }
    got = owl({"stack": stack, "other": other}, stats, 0.5, M=2)
    assert abs((got["stack"] * 96 + got["other"] * 32) / 128 - 0.5) < 1e-12
    assert owl({"stack": stack, "other": other}, stats, 0.5, where="other") == {"other": 0.5}


def test_equal_outlier_ratios_give_the_uniform_sparsity():
    w = jnp.ones((4, 4))
    stats = {p: _stats(np.ones(4), (4, 4)) for p in ("a", "b")}
    assert owl({"a": w, "b": w}, stats, 0.3) == {"a": 0.3, "b": 0.3}


def test_calibrated_end_to_end():
    params, _, x = _model(jax.random.key(5), n_layers=2)

    def fn(p, xs):
        return [xs @ p[f"layer{i}"]["q"] @ p[f"layer{i}"]["mlp"] for i in range(2)]

    stats = calibrate.statistics(fn, params, [x])
    got = owl(params, stats, 0.6, blocks=r"layer(\d+)/")
    assert set(got) == {"layer0/q", "layer0/mlp", "layer1/q", "layer1/mlp"}
    assert got["layer0/q"] == got["layer0/mlp"] != got["layer1/q"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be a number in \[0, 1\]"),
        ({"lam": -0.01}, "lam must be finite and >= 0"),
        ({"lam": float("nan")}, "lam must be finite"),
        ({"M": 0}, "M must be finite and > 0"),
        ({"blocks": r"layer\d+/"}, "exactly one group"),
        ({"blocks": r"(layer)(\d+)/"}, "exactly one group"),
        ({"blocks": "("}, "not a valid regex"),
        ({"lam": 0.6}, r"lam=0.6 gives block .* outside \[0, 1\); use lam < 0\.\d+ for sparsity"),
        ({"where": "nothing"}, "no kernel selected"),
    ],
)
def test_bad_input(kwargs, match):
    params, stats, _ = _model(jax.random.key(6), n_layers=2)
    args = {"sparsity": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        owl(params, stats, args.pop("sparsity"), **args)


def test_bad_stats():
    params, stats, _ = _model(jax.random.key(7), n_layers=1)
    with pytest.raises(ValueError, match="not a leaf of params"):
        owl(params, {**stats, "missing": stats["layer0/q"]}, 0.5)
    with pytest.raises(ValueError, match=r"shape \(16, 16\), but params holds shape \(16, 32\)"):
        owl(params, {"layer0/mlp": stats["layer0/q"]}, 0.5)
    with pytest.raises(TypeError, match="blocks must be"):
        owl(params, stats, 0.5, blocks=3)
    with pytest.raises(TypeError, match="stats must be"):
        owl(params, [stats], 0.5)


def test_oneshot_prunes_each_kernel_at_its_owl_sparsity():
    from jaxslim import prune  # noqa: PLC0415

    params, _, x = _model(jax.random.key(8), n_layers=2)

    def fn(p, xs):
        return [xs @ p[f"layer{i}"]["q"] @ p[f"layer{i}"]["mlp"] for i in range(2)]

    sp = owl(params, calibrate.statistics(fn, params, [x]), 0.5, lam=0.1)
    _, report = prune.oneshot(fn, params, [x], sp, method=prune.Wanda())
    for row in report.rows:  # every output prunes round_half_even(s K) of its K = 16 inputs
        assert row.sparsity == round(sp[row.path] * 16) / 16
