"""jaxslim._jaxpr: the shared walker, control-flow records, kernel uses and the hooked evaluator."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.extend.core import Literal

from jaxslim import _jaxpr

F32 = jnp.float32


def rnd(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, F32)


# ---------------------------------------------------------------- control-flow records


def test_control_reads_scan_while_cond_and_calls_on_this_jax():
    def fn(w, x):
        def body(c, xi):
            return (jnp.tanh(c[0] @ w) + xi, c[1] + 1.0), c[1]

        (c, _), _ = lax.scan(body, (x, x), jnp.ones((3, 2)), reverse=True)
        c = lax.while_loop(lambda c: (c @ w).sum() < 1.0, lambda c: c @ w, c)
        c = lax.cond(c.sum() > 0, lambda c: c @ w, lambda c: c, c)
        c = jax.jit(lambda c: c * 2)(c)
        c = jax.checkpoint(lambda c: c * 2)(c)
        return jax.nn.relu(c)

    t = _jaxpr.make_jaxpr(fn, jnp.ones((2, 2)), jnp.ones(2))
    records = [(e.primitive.name, _jaxpr.control(e)) for e in t.jaxpr.eqns]
    records = [(n, c) for n, c in records if c is not None]
    (scan,) = [c for _, c in records if isinstance(c, _jaxpr.Scan)]
    assert (scan.length, scan.reverse, scan.num_consts, scan.num_carry) == (3, True, 1, 2)
    assert len(scan.body.invars) == 1 + 2 + 1 and len(scan.body.outvars) == 2 + 1
    (loop,) = [c for _, c in records if isinstance(c, _jaxpr.While)]
    assert (loop.cond_nconsts, loop.body_nconsts) == (1, 1)
    (cond,) = [c for _, c in records if isinstance(c, _jaxpr.Cond)]
    assert len(cond.branches) == 2 and all(hasattr(b, "eqns") for b in cond.branches)
    calls = [n for n, c in records if isinstance(c, _jaxpr.Call)]
    assert len(calls) == 3 and "custom_jvp_call" in calls  # jit, remat, relu's custom_jvp


class _CountTanh(_jaxpr.Walker):
    """A consumer that differs only per equation: counts tanh wherever it is."""

    def __init__(self):
        super().__init__()
        self.found = []

    def equation(self, eqn, ins):
        if eqn.primitive.name == "tanh":
            self.found.append(self.site)
        return super().equation(eqn, ins)


def test_walker_visits_every_sub_jaxpr_once_in_documented_order():
    def fn(w, x):
        x = jnp.tanh(x)
        x, _ = lax.scan(lambda c, _: (jnp.tanh(c), None), x, length=4)
        x = lax.cond(x.sum() > 0, jnp.tanh, lambda c: jnp.tanh(jnp.tanh(c)), x)
        x = lax.while_loop(lambda c: jnp.tanh(c).sum() < 0, jnp.tanh, x)
        x = jax.jit(jnp.tanh)(x)
        return x @ w

    t = _jaxpr.make_jaxpr(fn, jnp.ones((2, 2)), jnp.ones(2))
    w = _CountTanh()
    w.walk(t.jaxpr, [None, None], t.consts)
    assert len(w.found) == 8
    assert w.found == sorted(w.found)  # pre-order: lexicographic order of sites
    depth = [len(s) for s in w.found]
    assert depth[0] == 1 and depth[-1] == 3
    # scan body 0; cond branches 0 (false: two tanh) and 1 (true); while condition 0 and body 1
    assert [s[1] for s in w.found if len(s) == 3] == [0, 0, 0, 1, 0, 1, 0]


def test_sites_number_matmuls_in_lexicographic_site_order():
    def fn(w, x):
        x = x @ w
        x, _ = lax.scan(lambda c, _: (c @ w, None), x, length=2)
        x = lax.cond(x.sum() > 0, lambda c: c @ w, lambda c: (c @ w) @ w, x)
        x = lax.while_loop(lambda c: (c @ w).sum() < 0, lambda c: c @ w, x)
        return x

    t = _jaxpr.make_jaxpr(fn, jnp.ones((2, 2)), jnp.ones(2))
    s = _jaxpr.sites(t.jaxpr)
    assert sorted(s.values()) == list(range(7))
    assert sorted(s, key=s.get) == sorted(s)
    assert [site[1] for site in sorted(s) if len(site) == 3] == [0, 0, 0, 1, 0, 1]


# ---------------------------------------------------------------- kernel uses


def _conv(dn):
    return lambda x, w: lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=dn)


def _stacked_scan(p, x):
    return lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, p["w"])[0]


def _fori(p, x):
    return lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c @ p["w"][i]), x)


def _unstack(p, x):
    a, b = p["w"]
    return x @ a + x @ b


def _cast(p, x):
    return x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16)


def _cond(p, x):
    return lax.cond(x.sum() > 0, lambda x: x @ p["w"], lambda x: -(x @ p["w"]), x)


# (fn, w shape, x shape, expected [(contracted, output, batch, spatial, indexed, in_loop), ...])
LAYOUTS = [
    pytest.param(
        lambda p, x: x @ p["w"], (3, 4), (2, 3), [((0,), (1,), (), (), (), False)], id="flax-in-out"
    ),
    pytest.param(
        lambda p, x: p["w"] @ x, (4, 3), (3,), [((1,), (0,), (), (), (), False)], id="eqx-out-in"
    ),
    pytest.param(
        lambda p, x: x @ p["w"].T, (4, 3), (2, 3), [((1,), (0,), (), (), (), False)], id="transpose"
    ),
    pytest.param(
        lambda p, x: jnp.einsum("d,hdf->hf", x, p["w"]),
        (2, 3, 4),
        (3,),
        [((1,), (0, 2), (), (), (), False)],
        id="per-head-einsum",
    ),
    pytest.param(
        lambda p, x: jnp.einsum("hd,hdf->hf", x, p["w"]),
        (2, 3, 4),
        (2, 3),
        [((1,), (2,), (0,), (), (), False)],
        id="batched-einsum",
    ),
    pytest.param(
        lambda p, x: x @ p["w"].reshape(3, 8),
        (3, 2, 4),
        (3,),
        [((0,), (1, 2), (), (), (), False)],
        id="fused-out",
    ),
    pytest.param(
        lambda p, x: x.reshape(6) @ p["w"].reshape(6, 4),
        (2, 3, 4),
        (2, 3),
        [((0, 1), (2,), (), (), (), False)],
        id="flattened-in",
    ),
    pytest.param(
        lambda p, x: _conv(("NWC", "WIO", "NWC"))(x, p["w"]),
        (3, 2, 5),
        (1, 6, 2),
        [((1,), (2,), (), (0,), (), False)],
        id="conv-flax",
    ),
    pytest.param(
        lambda p, x: _conv(("NWC", "OIW", "NWC"))(x, p["w"]),
        (5, 2, 3),
        (1, 6, 2),
        [((1,), (0,), (), (2,), (), False)],
        id="conv-eqx",
    ),
    pytest.param(
        _stacked_scan, (3, 4, 4), (2, 4), [((1,), (2,), (), (), (0,), True)], id="scan-stack"
    ),
    pytest.param(_fori, (3, 4, 4), (2, 4), [((1,), (2,), (), (), (0,), True)], id="fori-index"),
    pytest.param(_unstack, (2, 3, 4), (3,), [((1,), (2,), (), (), (0,), False)] * 2, id="unstack"),
    pytest.param(_cast, (3, 4), (2, 3), [((0,), (1,), (), (), (), False)], id="bf16-cast"),
    pytest.param(_cond, (3, 4), (2, 3), [((0,), (1,), (), (), (), False)] * 2, id="cond-branches"),
    pytest.param(
        lambda p, x: jax.jit(lambda x, w: jax.checkpoint(jnp.matmul)(x, w))(x, p["w"]),
        (3, 4),
        (2, 3),
        [((0,), (1,), (), (), (), False)],
        id="jit-remat",
    ),
]


@pytest.mark.parametrize("fn, wshape, xshape, expected", LAYOUTS)
def test_kernel_uses_reads_contracted_and_output_axes_from_the_jaxpr(fn, wshape, xshape, expected):
    p = {"w": rnd(0, *wshape), "b": rnd(1, 2)}
    uses = _jaxpr.kernel_uses(fn, p, rnd(2, *xshape))
    assert list(uses) == ["w"]
    got = [(u.contracted, u.output, u.batch, u.spatial, u.indexed, u.in_loop) for u in uses["w"]]
    assert got == expected
    assert [u.index for u in uses["w"]] == list(range(len(expected)))
    assert {u.primitive for u in uses["w"]} <= {"dot_general", "conv_general_dilated"}


def test_kernel_uses_names_linen_and_nnx_paths_in_execution_order():
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(5)(x)
            return nn.Dense(2)(jax.nn.relu(h))

    model = Mlp()
    v = model.init(jax.random.key(0), jnp.ones((1, 3)))
    uses = _jaxpr.kernel_uses(lambda v, x: model.apply(v, x), v, jnp.ones((1, 3)))
    assert [(k, u[0].contracted, u[0].output, u[0].index) for k, u in uses.items()] == [
        ("params/Dense_0/kernel", (0,), (1,), 0),
        ("params/Dense_1/kernel", (0,), (1,), 1),
    ]

    lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(lin)
    uses = _jaxpr.kernel_uses(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.ones((1, 3)))
    assert [(k, u[0].contracted, u[0].output) for k, u in uses.items()] == [("kernel", (0,), (1,))]


def test_make_jaxpr_keeps_shardings_and_names_inputs():
    mesh = jax.make_mesh((8,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
    w = jax.device_put(rnd(0, 4, 16), sharding)
    assert _jaxpr.abstract(w).sharding == sharding
    sds = jax.ShapeDtypeStruct((4, 16), F32, sharding=sharding)
    assert _jaxpr.abstract(sds).sharding == sharding
    t = _jaxpr.make_jaxpr(lambda p, x: x @ p["w"], {"w": w}, jnp.ones((2, 4)))
    assert t.param_paths == ("w",) and t.arg_paths == ("0",) and t.labels == ("w", None)
    assert jax.tree.structure(jnp.ones(1)) == t.out_tree


# ---------------------------------------------------------------- hooked evaluation


def _model(p, x):
    h = jnp.tanh(x @ p["inp"])
    h, _ = lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, p["ws"])
    h = lax.cond(h.sum() > 0, lambda h: h @ p["pos"], lambda h: h @ p["neg"], h)
    h = lax.fori_loop(0, 2, lambda i, h: jax.nn.relu(h @ p["loop"]), h)
    h = jax.jit(lambda h: h * 2.0)(h)
    return h @ p["out"]


def _model_params():
    return {
        "inp": rnd(0, 3, 4),
        "ws": rnd(1, 3, 4, 4) * 0.5,
        "pos": rnd(2, 4, 4),
        "neg": rnd(3, 4, 4),
        "loop": rnd(4, 4, 4) * 0.5,
        "out": rnd(5, 4, 2),
    }


def _reference_grams(p, x):
    """X^T X of the lhs of every matmul, by site index, computed by hand."""
    h0 = jnp.tanh(x @ p["inp"])
    grams = {0: x.T @ x, 1: jnp.zeros((4, 4))}
    h = h0
    for layer in range(3):
        grams[1] = grams[1] + h.T @ h
        h = jnp.tanh(h @ p["ws"][layer])
    pos = bool(h.sum() > 0)
    # lax.cond's branches are (false, true): site 2 is the "neg" branch, site 3 the "pos" one
    grams[2], grams[3] = (jnp.zeros((4, 4)), h.T @ h) if pos else (h.T @ h, jnp.zeros((4, 4)))
    h = h @ (p["pos"] if pos else p["neg"])
    grams[4] = jnp.zeros((4, 4))
    for _ in range(2):
        grams[4] = grams[4] + h.T @ h
        h = jax.nn.relu(h @ p["loop"])
    h = h * 2.0
    grams[5] = h.T @ h
    return grams, pos


def _gram_hook(state, call):
    lhs = call.operands[0]
    return {**state, call.index: state[call.index] + lhs.T @ lhs}


@pytest.mark.parametrize("loops", ["lax", "python"])
@pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["x-pos", "x-neg"])
def test_run_matches_fn_and_accumulates_grams_through_scan_cond_while(loops, transform, sign):
    p = _model_params()
    x = sign * jnp.abs(rnd(6, 5, 3))
    p["inp"] = jnp.abs(p["inp"])
    state0 = {i: jnp.zeros((k, k)) for i, k in enumerate([3, 4, 4, 4, 4, 4])}
    out, grams = transform(
        lambda p, x: _jaxpr.run(_model, p, x, hook=_gram_hook, state=state0, loops=loops)
    )(p, x)
    np.testing.assert_allclose(out, _model(p, x), rtol=1e-6, atol=1e-6)
    ref, _ = _reference_grams(p, x)
    assert sorted(grams) == sorted(ref)
    for i in ref:
        np.testing.assert_allclose(grams[i], ref[i], rtol=1e-5, atol=1e-5, err_msg=f"site {i}")


def test_python_loops_call_the_hook_per_iteration_with_concrete_arrays_and_kernels():
    p = _model_params()
    x = jnp.abs(rnd(6, 5, 3))
    p["inp"] = jnp.abs(p["inp"])
    _, pos = _reference_grams(p, x)

    def hook(calls, call):
        assert not isinstance(call.operands[0], jax.core.Tracer)
        return [*calls, (call.index, tuple(k.path for k in call.kernels))]

    _, calls = _jaxpr.run(_model, p, x, hook=hook, state=[], loops="python")
    branch = (3, ("pos",)) if pos else (2, ("neg",))
    assert calls == [
        (0, ("inp",)),
        *[(1, ("ws",))] * 3,
        branch,
        *[(4, ("loop",))] * 2,
        (5, ("out",)),
    ]


def test_eval_jaxpr_without_hook_equals_jax_eval_and_rejects_bad_loops():
    closed = jax.make_jaxpr(_model)(_model_params(), jnp.ones((2, 3)))
    leaves = jax.tree.leaves((_model_params(), jnp.ones((2, 3))))
    outs, state = _jaxpr.eval_jaxpr(closed, None, *leaves)
    np.testing.assert_allclose(outs[0], _model(_model_params(), jnp.ones((2, 3))), rtol=1e-6)
    assert state is None
    with pytest.raises(ValueError, match=r"jaxslim\.eval_jaxpr: loops must be 'lax' or 'python'"):
        _jaxpr.eval_jaxpr(closed, None, *leaves, loops="unroll")


# ---------------------------------------------------------------- the internal API


@pytest.mark.parametrize("fn, wshape, xshape, expected", LAYOUTS)
def test_kernel_uses_of_a_traced_fn_equals_kernel_uses(fn, wshape, xshape, expected):
    p = {"w": rnd(0, *wshape), "b": rnd(1, 2)}
    x = rnd(2, *xshape)
    t = _jaxpr.make_jaxpr(fn, p, x)
    assert _jaxpr.kernel_uses_of(t) == _jaxpr.kernel_uses(fn, p, x)


def test_bind_evaluates_every_ordinary_equation_like_jax():
    """Binding the equations one by one, eagerly and under jit, gives ``fn``'s output."""

    def fn(w, x):
        y = jnp.einsum("bi,io->bo", x, w, precision=lax.Precision.HIGHEST)
        y = jnp.split(jnp.cumsum(jax.nn.softmax(y, axis=-1), axis=0), 2, axis=1)  # multi-result
        return jnp.concatenate([y[1], y[0]], axis=1).astype(jnp.bfloat16)

    w, x = rnd(0, 3, 4), rnd(1, 2, 3)
    closed = jax.make_jaxpr(fn)(w, x)

    def run(w, x):
        env = dict(zip(closed.jaxpr.invars, (w, x), strict=True))
        env.update(zip(closed.jaxpr.constvars, closed.consts, strict=True))
        for eqn in closed.jaxpr.eqns:
            ins = [v.val if isinstance(v, Literal) else env[v] for v in eqn.invars]
            outs = _jaxpr.bind(eqn, ins)
            assert isinstance(outs, list) and len(outs) == len(eqn.outvars)
            env.update(zip(eqn.outvars, outs, strict=True))
        return env[closed.jaxpr.outvars[0]]

    for wrap in (lambda f: f, jax.jit):
        got = wrap(run)(w, x)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(fn(w, x), np.float32))


def test_abstract_keeps_shape_dtype_and_passes_non_arrays_through():
    a = _jaxpr.abstract(jnp.ones((2, 3), jnp.bfloat16))
    assert isinstance(a, jax.ShapeDtypeStruct) and (a.shape, a.dtype) == ((2, 3), jnp.bfloat16)
    assert _jaxpr.abstract(np.zeros((4,), np.int8)).dtype == np.int8
    assert _jaxpr.abstract(1.5) == 1.5 and _jaxpr.abstract(None) is None


def test_no_module_uses_an_underscored_name_of_jaxpr():
    """The internal API of the private ``_jaxpr`` is its names without an underscore: every name
    another jaxslim module (or benchmark) takes from ``_jaxpr`` is one, and each is documented."""
    import ast
    import pathlib

    root = pathlib.Path(_jaxpr.__file__).parent
    used = {}
    for f in sorted(root.rglob("*.py")) + sorted((root.parent / "benchmarks").glob("*.py")):
        if f.name == "_jaxpr.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "_jaxpr":
                used.setdefault(node.attr, f.name)
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_jaxpr"):
                for alias in node.names:
                    used.setdefault(alias.name, f.name)
    assert used, "no module uses _jaxpr?"
    assert {name: f for name, f in used.items() if name.startswith("_")} == {}
    assert all(getattr(_jaxpr, name).__doc__ for name in used)
