"""Recipes: TOML parses to the Python API's objects, and applying one equals those calls exactly."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxslim import prune, quant, recipe
from jaxslim.quant import QuantSpec


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "Conv_0": {"kernel": jax.random.normal(k[0], (5, 8, 16)), "bias": jnp.zeros(16)},
        "Dense_0": {"kernel": jax.random.normal(k[1], (128, 32)), "bias": jnp.ones(32)},
        "Dense_1": {"kernel": jax.random.normal(k[2], (32, 10)), "bias": jnp.ones(10)},
        "step": jnp.array(3, jnp.int32),
    }


def _python_api(params):
    """The EXAMPLE recipe written with the Python API."""
    for where, s, structure, scope in [
        (r"Conv_\d+/kernel", 0.5, prune.Unstructured(), "global"),
        ("Dense_0/kernel", 0.5, prune.NM(2, 4, axis=-2), "layer"),
    ]:
        mask = prune.topk_mask(
            prune.magnitude(params), s, structure=structure, scope=scope, where=where
        )
        params = prune.apply_mask(params, mask)
    rules = [
        ("Dense_1", None),
        ("Dense_0/kernel", QuantSpec(4, axis=-1, group_size=32)),
        (None, QuantSpec(8, axis=-1)),
    ]
    return quant.quantize_params(params, rules)[0]


def test_example_parses_to_the_python_objects():
    r = recipe.parse(recipe.EXAMPLE)
    assert r.prune == (
        recipe.PruneStep(0.5, r"Conv_\d+/kernel", prune.Unstructured(), "global"),
        recipe.PruneStep(0.5, "Dense_0/kernel", prune.NM(2, 4, axis=-2), "layer"),
    )
    assert r.quant == (
        recipe.QuantRule(None, "Dense_1"),
        recipe.QuantRule(QuantSpec(4, axis=-1, group_size=32), "Dense_0/kernel"),
        recipe.QuantRule(QuantSpec(8, axis=-1), None),
    )
    assert r.default is None


def _leaves_equal(a, b):
    la = jax.tree_util.tree_leaves_with_path(a)
    lb = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, p
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_apply_equals_the_python_api_bit_for_bit():
    params = _params()
    out, rows = recipe.apply(recipe.parse(recipe.EXAMPLE), params)
    ref = _python_api(params)
    _leaves_equal(out, ref)
    assert type(out["Dense_1"]["kernel"]) is not quant.QArray  # the "float" rule
    assert out["Dense_0"]["kernel"].spec == QuantSpec(4, axis=-1, group_size=32)
    by = {r["path"]: r for r in rows}
    assert by["Conv_0/kernel"]["nonzeros_after"] == 5 * 8 * 16 // 2  # global over one leaf: half
    zeros = np.asarray(out["Dense_0"]["kernel"].dequantize() == 0).reshape(32, 4, 32)
    assert (zeros.sum(axis=1) >= 2).all()  # 2:4 along the input axis (int4 may round more to 0)
    assert by["Dense_0/kernel"]["bytes_after"] == 128 * 32 // 2 + 4 * 4 * 32  # codes + scales
    assert by["Dense_1/kernel"]["bytes_after"] == by["Dense_1/kernel"]["bytes_before"]
    assert by["step"]["before"] == by["step"]["after"] == "int32"


def test_global_scope_ranks_all_selected_leaves_together():
    params = {"a": {"kernel": jnp.full((4, 4), 1.0)}, "b": {"kernel": jnp.full((4, 4), 2.0)}}
    text = '[[prune]]\nsparsity = 0.5\nscope = "global"\n'
    out, _ = recipe.apply(recipe.parse(text), params)
    assert int((out["a"]["kernel"] == 0).sum()) == 16 and int((out["b"]["kernel"] == 0).sum()) == 0
    out, _ = recipe.apply(recipe.parse(text.replace("global", "layer")), params)
    assert int((out["a"]["kernel"] == 0).sum()) == 8 and int((out["b"]["kernel"] == 0).sum()) == 8


def test_channels_structure_and_per_tensor_default():
    w = jnp.arange(1.0, 13.0).reshape(3, 4)  # column norms grow with the column index
    text = (
        '[[prune]]\nsparsity = 0.5\nstructure = {kind = "channels", axis = -1}\n'
        "[quant]\ndefault = {bits = 8}\n"
    )
    out, _ = recipe.apply(recipe.parse(text), {"w": w, "b": jnp.ones(4)})
    deq = out["w"].dequantize()
    np.testing.assert_array_equal(np.asarray(deq[:, :2]), 0.0)  # the two weakest columns go
    assert out["w"].scale.size == 1 and out["b"].spec == QuantSpec(8)  # one scale, default on b
    ref = quant.quantize(w.at[:, :2].set(0.0), QuantSpec(8))
    np.testing.assert_array_equal(np.asarray(out["w"].values), np.asarray(ref.values))


def test_nm_sparsity_defaults_to_one_minus_n_over_m():
    (step,) = recipe.parse('[[prune]]\nstructure = {kind = "nm", n = 1, m = 4}\n').prune
    assert step.sparsity == 0.75 and step.structure == prune.NM(1, 4)


def test_trailing_value_of_nnx_orbax_state_is_not_part_of_the_name():
    params = {"Dense_0": {"kernel": {"value": jnp.ones((4, 4))}}}
    out, rows = recipe.apply(
        recipe.parse('[[quant.rules]]\nwhere = "kernel$"\nspec = {}\n'), params
    )
    assert isinstance(out["Dense_0"]["kernel"]["value"], quant.QArray)
    assert [r["path"] for r in rows] == ["Dense_0/kernel"]


def test_progress_sees_every_leaf():
    seen = []

    def progress(it):
        for x in it:
            seen.append(x)
            yield x

    recipe.apply(recipe.parse("[quant]\ndefault = {bits = 8}\n"), _params(), progress=progress)
    assert len(seen) == len(jax.tree_util.tree_leaves(_params()))


def _bad(text, params=None):
    return lambda: recipe.apply(recipe.parse(text), params or _params())


BAD = [
    pytest.param(_bad("x = 1"), "x", "unknown key", id="top-key"),
    pytest.param(_bad("[[prune]]\nsparsty = 0.5"), r"prune\[0\]\.sparsty", "unknown", id="typo"),
    pytest.param(_bad("[[prune]]\nsparsity = 1.5"), r"prune\[0\]\.sparsity", r"\[0, 1\], got 1.5"),
    pytest.param(_bad("[[prune]]\nsparsity = 'a'"), r"prune\[0\]\.sparsity", "must be a number"),
    pytest.param(_bad("[[prune]]\nwhere = 'x'"), r"prune\[0\]\.sparsity", "is required"),
    pytest.param(_bad("[prune]\nsparsity = 0.5"), "prune", r"write \[\[prune\]\]"),
    pytest.param(
        _bad("[[prune]]\nsparsity = 0.5\nstructure = 'rows'"),
        r"prune\[0\]\.structure\.kind",
        "must be one of",
    ),
    pytest.param(
        _bad("[[prune]]\nstructure = {kind = 'nm', n = 5, m = 4}"),
        r"prune\[0\]\.structure",
        "0 <= n <= m",
    ),
    pytest.param(
        _bad("[[prune]]\nsparsity = 0.5\nscope = 'all'"), r"prune\[0\]\.scope", "'layer' or"
    ),
    pytest.param(
        _bad("[[prune]]\nsparsity = 0.5\nwhere = 'Nope'"),
        r"prune\[0\]\.where",
        "'Nope' selects no leaf",
    ),
    pytest.param(
        _bad("[[prune]]\nsparsity = 0.5\nwhere = '['"), r"prune\[0\]\.where", "not a valid regular"
    ),
    pytest.param(_bad("[[quant.rules]]\nwhere = 'x'"), r"quant\.rules\[0\]\.spec", "is required"),
    pytest.param(
        _bad("[[quant.rules]]\nspec = {bits = 5}"), r"quant\.rules\[0\]\.spec\.bits", "got 5"
    ),
    pytest.param(
        _bad("[[quant.rules]]\nspec = {bitz = 8}"), r"quant\.rules\[0\]\.spec\.bitz", "unknown"
    ),
    pytest.param(
        _bad("[[quant.rules]]\nspec = {fmt = 'int9'}"), r"quant\.rules\[0\]\.spec\.fmt", "'int9'"
    ),
    pytest.param(_bad("[[quant.rules]]\nspec = 'int8'"), r"quant\.rules\[0\]\.spec", '"float" or'),
    pytest.param(
        _bad("[[quant.rules]]\nspec = {}\n[[quant.rules]]\nwhere = 'kernel'\nspec = {}"),
        r"quant\.rules\[1\]\.where",
        "only leaves earlier rules already take",
    ),
    pytest.param(
        _bad("[[quant.rules]]\nwhere = 'kernel'\nspec = {bits = 4, axis = 5}"),
        r"quant\.rules\[0\]\.spec",
        "Conv_0/kernel",
    ),
    pytest.param(_bad("[[quant.rules]]\nspec = 'float'"), "quant", "quantizes nothing"),
    pytest.param(_bad(""), "recipe", "is empty"),
    pytest.param(_bad("[[prune"), "recipe", "not valid TOML"),
]


@pytest.mark.parametrize("call, key, match", BAD)
def test_bad_recipe_names_the_key(call, key, match):
    with pytest.raises(recipe.RecipeError) as e:
        call()
    assert isinstance(e.value, ValueError)
    assert str(e.value).splitlines() == [str(e.value)]  # one line
    assert re.fullmatch(key, str(e.value).split(": ")[0]), str(e.value)
    assert re.search(match, str(e.value)), str(e.value)


def test_nf4_rule_equals_the_python_api_and_survives_a_checkpoint(tmp_path):
    """QLoRA's NF4 (double-quantized scales) through a recipe, an .npz and back, bit for bit."""
    from jaxslim.quant import storage

    text = """
    [quant]
    [[quant.rules]]
    where = "Dense_0/kernel"
    spec = {fmt = "nf4", axis = -1, group_size = 64}
    """
    params = _params()
    out, _ = recipe.apply(recipe.parse(text), params)
    spec = QuantSpec(fmt="nf4", axis=-1, group_size=64)
    ref = quant.quantize_params(params, [("Dense_0/kernel", spec)])[0]
    _leaves_equal(out, ref)
    storage.save_npz(tmp_path / "q.npz", storage.to_checkpoint(out))
    back = storage.from_checkpoint(storage.load_npz(tmp_path / "q.npz"))
    _leaves_equal(back, ref)
    np.testing.assert_array_equal(
        back["Dense_0"]["kernel"].dequantize(), ref["Dense_0"]["kernel"].dequantize()
    )


def test_hqq_rule_equals_quant_hqq_and_lowers_the_error():
    text = """
    [quant]
    [[quant.rules]]
    where = "Dense_0/kernel"
    spec = {bits = 4, signed = false, symmetric = false, axis = -1, group_size = 32}
    method = "hqq"
    """
    params = _params()
    out, _ = recipe.apply(recipe.parse(text), params)
    spec = QuantSpec(4, signed=False, symmetric=False, axis=-1, group_size=32)
    w = params["Dense_0"]["kernel"]
    ref = quant.hqq(w, spec, path="Dense_0/kernel")
    _leaves_equal(out["Dense_0"]["kernel"], ref)
    rtn = quant.quantize(w, spec)
    err = lambda q: float(jnp.sum((q.dequantize() - w) ** 2))  # noqa: E731
    assert err(out["Dense_0"]["kernel"]) <= err(rtn)


def test_unknown_quant_method_names_the_key():
    text = '[quant]\n[[quant.rules]]\nspec = {bits = 8}\nmethod = "awk"\n'
    with pytest.raises(recipe.RecipeError, match=r"quant.rules\[0\].method: .*'gptq'"):
        recipe.parse(text)


RECORDS = [
    ("prune", prune.Magnitude),
    ("prune", prune.Wanda),
    ("prune", prune.SparseGPT),
    ("quant", quant.RTN),
    ("quant", quant.HQQ),
    ("quant", quant.GPTQ),
    ("quant", quant.AWQ),
    ("quant", quant.SmoothQuant),
]


def _method_recipe(where, method):
    if where == "prune":
        return f"[[prune]]\nsparsity = 0.5\nmethod = {method}\n"
    return f"[quant]\nmethod = {method}\n[[quant.rules]]\nspec = {{bits = 8, axis = -1}}\n"


def _method_of(r, where):
    return r.prune[0].method if where == "prune" else r.method


@pytest.mark.parametrize("where, cls", RECORDS, ids=[c.name for _, c in RECORDS])
def test_method_records_mirror_the_api_one_to_one(where, cls):
    assert _method_of(recipe.parse(_method_recipe(where, f'"{cls.name}"')), where) == cls()
    fields = [f for f in dataclasses.fields(cls) if f.name != "quant"]
    values = {int: 3, float: 0.25, bool: False, str: "absmax"}
    kw = {f.name: values[type(f.default)] for f in fields}
    table = "".join(
        f", {k} = {str(v).lower() if isinstance(v, bool) else repr(v)}" for k, v in kw.items()
    )
    got = _method_of(recipe.parse(_method_recipe(where, f'{{name = "{cls.name}"{table}}}')), where)
    assert got == cls(**kw)
    with pytest.raises(recipe.RecipeError, match=r"method\.bogus: unknown key"):
        recipe.parse(_method_recipe(where, f'{{name = "{cls.name}", bogus = 1}}'))


def test_bad_method_option_names_the_option():
    with pytest.raises(recipe.RecipeError, match=r"^quant\.method\.block_size: .*block_size"):
        recipe.parse(_method_recipe("quant", '{name = "gptq", block_size = 0}'))
    with pytest.raises(recipe.RecipeError, match=r"^prune\[0\]\.scope: must be 'layer'"):
        recipe.parse("[[prune]]\nsparsity = 0.5\nscope = 'global'\nmethod = 'wanda'\n")


def _mlp():
    k = jax.random.split(jax.random.key(3), 4)
    params = {
        "embed": jax.random.normal(k[0], (20, 16)),
        "norm": jnp.ones(16),
        "up": jax.random.normal(k[1], (16, 64)),
        "down": jax.random.normal(k[2], (64, 16)),
        "lm_head": jax.random.normal(k[3], (16, 20)),
    }

    def fn(p, ids):
        h = jnp.take(p["embed"], ids, axis=0) * p["norm"][None, None]
        h = h + jax.nn.relu(h @ p["up"]) @ p["down"]
        return h @ p["lm_head"]

    ids = [jax.random.randint(jax.random.key(5 + i), (4, 8), 0, 20, jnp.int32) for i in range(2)]
    return params, fn, ids


KERNELS = r"^(up|down)$"


@pytest.mark.parametrize("name", sorted(recipe.NAMED))
def test_named_recipes_equal_the_python_api(name):
    params, fn, ids = _mlp()
    r = recipe.named(name)
    with pytest.raises(recipe.RecipeError, match=r"method '\w+' is calibrated"):
        recipe.apply(r, params)
    out, rows = recipe.apply(r, params, fn=fn, batches=ids)
    if r.prune:
        step = r.prune[0]
        ref, _ = prune.oneshot(fn, params, ids, step.sparsity, method=step.method,
                               structure=step.structure, where=KERNELS)  # fmt: skip
    else:
        spec = r.quant[0].spec
        ref, _ = quant.oneshot(fn, params, ids, [(KERNELS, spec)], method=r.method)
    _leaves_equal(out, ref)
    for k in ("embed", "lm_head", "norm"):
        np.testing.assert_array_equal(out[k], params[k])
    assert {row["path"] for row in rows} == set(params)


def test_mixed_methods_first_rule_decides():
    """gptq for ``up``, hqq for ``down``: one quant.oneshot for gptq, quant.hqq for the rest."""
    params, fn, ids = _mlp()
    text = """
    [quant]
    method = {name = "gptq", damp = 0.05}
    [[quant.rules]]
    where = "^up$"
    spec = {bits = 4, axis = -1, group_size = 8}
    [[quant.rules]]
    where = "^down$"
    spec = {bits = 4, signed = false, symmetric = false, axis = -1, group_size = 16}
    method = "hqq"
    """
    r = recipe.parse(text)
    assert r.method == quant.GPTQ(damp=0.05) and r.quant[1].method == quant.HQQ()
    with pytest.raises(recipe.RecipeError, match=r"^quant\.method: method 'gptq' is calibrated"):
        recipe.apply(r, params)
    out, _ = recipe.apply(r, params, fn=fn, batches=ids)
    up_spec, down_spec = r.quant[0].spec, r.quant[1].spec
    ref, _ = quant.oneshot(fn, params, ids, [("^up$", up_spec), ("^down$", None)],
                           method=quant.GPTQ(damp=0.05))  # fmt: skip
    _leaves_equal(out["up"], ref["up"])
    _leaves_equal(out["down"], quant.hqq(params["down"], down_spec, path="down"))
    np.testing.assert_array_equal(out["embed"], params["embed"])


# -- dumps: TOML text that parse reads back -------------------------------------------------------

ROUND_TRIP_SPECS = [
    None,
    QuantSpec(8, axis=-1),
    QuantSpec(4, axis=-1, group_size=128),
    QuantSpec(3, axis=-1, group_size=128),
    QuantSpec(2, axis=(0,), group_size=64, symmetric=False),
    QuantSpec(fmt="nf4", axis=-1, group_size=64),
    QuantSpec(fmt="mxfp4"),
    QuantSpec(fmt="nvfp4"),
    QuantSpec(fmt="mxfp8"),
    QuantSpec(fmt="e4m3", axis=-1),
    QuantSpec(fmt="e4m3", group_size=(128, 128)),
    QuantSpec(8, signed=False, symmetric=False),
]


@pytest.mark.parametrize("name", [*recipe.NAMED, "EXAMPLE"])
def test_dumps_round_trips_the_example_and_the_named_recipes(name):
    r = recipe.parse(recipe.EXAMPLE) if name == "EXAMPLE" else recipe.named(name)
    assert recipe.parse(recipe.dumps(r)) == r


def test_dumps_round_trips_every_spec_method_and_structure():
    r = recipe.Recipe(
        prune=(
            recipe.PruneStep(0.25, "Dense", prune.Channels(axis=-1, ord=1), "global"),
            recipe.PruneStep(0.5, None, prune.NM(2, 4), "layer", prune.SparseGPT(damp=0.1)),
            recipe.PruneStep(0.3, r"conv\d", prune.Blocks((2, 4)), "layer", prune.Magnitude()),
            recipe.PruneStep(0.5, None, prune.Unstructured(), "layer", prune.Wanda()),
        ),
        quant=tuple(
            recipe.QuantRule(spec, f"^k{i}$", quant.HQQ(iters=7) if i == 2 else None)
            for i, spec in enumerate(ROUND_TRIP_SPECS)
        ),
        default=QuantSpec(8, axis=-1),
        method=quant.GPTQ(act_order=True, clip_candidates=4),
    )
    text = recipe.dumps(r)
    assert recipe.parse(text) == r
    assert 'method = {name = "gptq", clip_candidates = 4, act_order = true}' in text
    assert 'spec = {fmt = "mxfp4"}' in text  # defaults left out


def test_dumps_of_allocate_rules_applies_like_the_rules():
    k = jax.random.split(jax.random.key(0), 3)
    params = {"a": jax.random.normal(k[0], (64, 32)), "b": jax.random.normal(k[1], (64, 32))}
    errors = {"a": (1.0, 5.0), "b": (1.0, 9.0)}
    cands = [QuantSpec(8, axis=-1), QuantSpec(4, axis=-1, group_size=32)]
    rules = quant.allocate(errors, 6.5, cands, params=params)
    text = recipe.dumps(rules)
    assert text.startswith('[quant]\ndefault = "float"\n')
    got, _ = recipe.apply(recipe.parse(text), params)
    want, _ = quant.quantize_params(params, rules)
    for name in params:
        assert got[name].spec == want[name].spec
        np.testing.assert_array_equal(got[name].values, want[name].values)


@pytest.mark.parametrize(
    "arg,err,match",
    [
        ("[quant]", TypeError, "must be a Recipe or a list of \\(where, spec\\) rules, got str"),
        (3, TypeError, "got int"),
        ([("w",)], TypeError, "rule 0 must be a \\(where, spec\\) pair"),
        ([("w", 8)], TypeError, "rule 0 has spec=8, not a QuantSpec or None"),
        ([(lambda p, x: True, None)], ValueError, "a TOML recipe holds a regex string"),
        (
            recipe.Recipe(
                (recipe.PruneStep(0.5, method=prune.SparseGPT(quant=lambda p, w: None)),)
            ),
            ValueError,
            "has quant= \\(a Python object\\)",
        ),
    ],
)
def test_dumps_bad_input(arg, err, match):
    with pytest.raises(err, match=match):
        recipe.dumps(arg)


@pytest.mark.parametrize(
    "where",
    ['a"b', "back\\slash", r"layers/\d+/(q|k)$", "café/😀", "tab\there", "del\x7f", ""],
)
def test_dumps_round_trips_any_where_string(where):
    r = recipe.Recipe(
        prune=(recipe.PruneStep(0.5, where),),
        quant=(recipe.QuantRule(QuantSpec(8, axis=-1), where),),
        method=quant.GPTQ(damp=1e-5),
    )
    assert recipe.parse(recipe.dumps(r)) == r


def test_dumps_keeps_an_empty_where_that_selects_every_leaf():
    params = {"w": jnp.arange(1.0, 9.0).reshape(4, 2), "b": jnp.array([1.0, 2.0, 3.0, 4.0])}
    r = recipe.Recipe(prune=(recipe.PruneStep(0.5, ""),))
    want, _ = recipe.apply(r, params)
    got, _ = recipe.apply(recipe.parse(recipe.dumps(r)), params)
    np.testing.assert_array_equal(got["b"], [0.0, 0.0, 3.0, 4.0])
    np.testing.assert_array_equal(got["b"], want["b"])


def test_dumps_writes_numpy_scalars_as_numbers():
    r = recipe.Recipe(quant=(recipe.QuantRule(QuantSpec(4), None, quant.HQQ(iters=np.int64(7))),))
    assert "iters = 7" in recipe.dumps(r)
    assert recipe.parse(recipe.dumps(r)).quant[0].method == quant.HQQ(iters=7)


@pytest.mark.parametrize(
    "arg", [[("^a$", None)], [], recipe.Recipe()], ids=["all-float", "no-rules", "empty"]
)
def test_dumps_refuses_a_recipe_that_would_not_parse_back(arg):
    with pytest.raises(ValueError, match="recipe.dumps: the recipe would not parse back"):
        recipe.dumps(arg)
