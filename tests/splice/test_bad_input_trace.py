"""Bad input for splice.trace / count_flops / find_foldable / register_rule and jaxslim._jaxpr:
one row per case; each asserts the exception type and that the message names the function and
the bad path or value."""

import jax
import jax.numpy as jnp
import pytest

from jaxslim import _jaxpr, splice

P = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 3))}
X = jnp.ones((2, 4))


def mlp(p, x):
    return jax.nn.relu(x @ p["w1"]) @ p["w2"]


def raises_value_error(p, x):
    raise ValueError("block 3 has no weights")


def converts_to_python(p, x):
    return x * float(p["w1"].sum())


ENTRY = [
    pytest.param(splice.trace, "splice.trace", id="trace"),
    pytest.param(splice.count_flops, "splice.count_flops", id="count_flops"),
    pytest.param(splice.find_foldable, "splice.find_foldable", id="find_foldable"),
    pytest.param(_jaxpr.kernel_uses, "jaxslim.kernel_uses", id="kernel_uses"),
]

CASES = [
    pytest.param(
        lambda f: f({"w": 1}, P, X),
        TypeError,
        r"{}: fn must be a callable .* got dict",
        id="fn-dict",
    ),
    pytest.param(
        lambda f: f(None, P, X), TypeError, r"{}: fn must be a callable .*NoneType", id="fn-none"
    ),
    pytest.param(
        lambda f: f(mlp, {"n": jnp.arange(3)}, X),
        ValueError,
        r"{}: params has no floating-point array leaf \(leaves: \['n'\]\)",
        id="int-params",
    ),
    pytest.param(
        lambda f: f(mlp, {}, X),
        ValueError,
        r"{}: params has no floating-point array leaf \(leaves: \[\]\)",
        id="empty-params",
    ),
    pytest.param(
        lambda f: f(mlp, {"w1": P["w1"], "name": "dense"}, X),
        TypeError,
        r"{}: params leaf 'name' is a str \('dense'\), not an array",
        id="str-leaf",
    ),
    pytest.param(
        lambda f: f(mlp, P, {"x": X, "mode": object()}),
        TypeError,
        r"{}: args leaf '0/mode' is a object .*not an array",
        id="object-arg",
    ),
    pytest.param(
        lambda f: f(mlp, P, jnp.ones((2, 5))),
        TypeError,
        r"{}: fn\(params, \*args\) raised TypeError while traced on shapes \(fn=mlp\): "
        r"dot_general .*Hint: .*check their shapes",
        id="shape-mismatch",
    ),
    pytest.param(
        lambda f: f(raises_value_error, P, X),
        ValueError,
        r"{}: fn\(params, \*args\) raised ValueError .*\(fn=raises_value_error\): block 3 has no "
        r"weights\. Hint",
        id="fn-raises",
    ),
    pytest.param(
        lambda f: f(converts_to_python, P, X),
        TypeError,
        r"{}: fn\(params, \*args\) raised .*\(fn=converts_to_python\).*Hint: .*float\(x\)",
        id="concretization",
    ),
    pytest.param(
        lambda f: f(mlp, P),
        TypeError,
        r"{}: fn\(params, \*args\) raised TypeError .*\(fn=mlp\).*missing 1 required positional",
        id="missing-arg",
    ),
]


@pytest.mark.parametrize("call,exc,match", CASES)
@pytest.mark.parametrize("entry,name", ENTRY)
def test_bad_input_to_traced_functions(entry, name, call, exc, match):
    with pytest.raises(exc, match=match.format(name.replace(".", r"\."))):
        call(entry)


def _prim(name):
    return jax.extend.core.Primitive(name)


OTHER = [
    pytest.param(
        lambda: splice.register_rule("tanh")(lambda w, eqn, ins: ins),
        ValueError,
        r"splice\.register_rule: primitive 'tanh' already has a rule; pass override=True",
        id="rule-exists",
    ),
    pytest.param(
        lambda: splice.register_rule(_prim("bad_role"), fold="affine"),
        ValueError,
        r"splice\.register_rule: fold must be None, 'cast' or 'vector' for 'bad_role', "
        r"got 'affine'",
        id="rule-fold-role",
    ),
    pytest.param(
        lambda: splice.register_rule(3),
        TypeError,
        r"splice\.register_rule: primitive must be a name or a jax Primitive, got 3",
        id="rule-primitive-int",
    ),
    pytest.param(
        lambda: splice.register_rule("bad_flops", flops=4),
        TypeError,
        r"splice\.register_rule: flops must be a callable eqn -> int, got 4",
        id="rule-flops-int",
    ),
    pytest.param(
        lambda: splice.register_rule("bad_fn")(None),
        TypeError,
        r"splice\.register_rule: the rule for 'bad_fn' must be callable",
        id="rule-not-callable",
    ),
    pytest.param(
        lambda: _jaxpr.run(mlp, P, X, loops="scan"),
        ValueError,
        r"jaxslim\.eval_jaxpr: loops must be 'lax' or 'python', got 'scan'",
        id="eval-loops",
    ),
    pytest.param(
        lambda: _jaxpr.run(mlp, P, jnp.ones((2, 7))),
        TypeError,
        r"jaxslim\.run: fn\(params, \*args\) raised TypeError .*\(fn=mlp\)",
        id="run-shape-mismatch",
    ),
]


@pytest.mark.parametrize("call,exc,match", OTHER)
def test_bad_input_other(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
