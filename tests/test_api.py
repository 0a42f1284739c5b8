"""One public surface with consistent signatures.

The public API is the names in the ``__all__`` of ``jaxslim`` and of its packages (``prune``,
``quant``, ``splice``, ``calibrate``, ``flax.*``...); implementation modules are importable but not
part of it. Every public callable is checked here, so a new function that breaks a convention fails
this file rather than surprising a user:

* it has a docstring;
* internal plumbing (``fn_name=``, ``path=`` used only for messages) is not in its signature;
* options with defaults are keyword-only, except the positional defaults DESIGN.md fixes;
* the argument that says how weights group is called ``structure=``; a ``where=`` filter is
  keyword-only and defaults to ``None``;
* the tunables of an implementation (constants, layout helpers) are not exported.
"""

from __future__ import annotations

import importlib
import inspect
import types

import pytest

PACKAGES = [
    "jaxslim",
    "jaxslim.calibrate",
    "jaxslim.checkpoints",
    "jaxslim.models",
    "jaxslim.prune",
    "jaxslim.quant",
    "jaxslim.splice",
    "jaxslim.regularize",
    "jaxslim.schedules",
    "jaxslim.distill",
    "jaxslim.structures",
    "jaxslim.report",
    "jaxslim.flax.quant",
    "jaxslim.flax.splice",
    "jaxslim.flax.distill",
]

# Positional parameters with a default that DESIGN.md fixes (name -> allowed parameter names).
POSITIONAL_DEFAULTS = {
    "kd_loss": {"labels"},
    "distill_step": {"labels"},  # kd_loss's order
    # mirrors lax.conv_general_dilated, whose arguments it receives positionally
    "conv_patches": {"lhs_dilation", "rhs_dilation", "dimension_numbers", "feature_group_count"},
    "QuantSpec": {"bits"},
    "Channels": {"axis", "ord"},
    "NM": {"n", "m", "axis"},
    "Blocks": {"shape", "ord"},
    "importance": {"groups"},
    "qdot_general": {"precision", "preferred_element_type"},  # mirrors lax.dot_general
    "step_decay": {"power"},
    "fake_quant_affine": {"axis"},
    "deepen": {"activation"},
}
# Classes whose constructor is user-facing configuration; other public classes are records the
# library returns (reports, plans, states) and are not checked.
SPECS = {"QuantSpec", "Unstructured", "Channels", "NM", "Blocks"}


def _public():
    seen = {}
    for name in PACKAGES:
        mod = importlib.import_module(name)
        for attr in getattr(mod, "__all__", ()):
            obj = getattr(mod, attr)
            if isinstance(obj, types.ModuleType):
                continue
            short = f"{name.removeprefix('jaxslim.').removeprefix('jaxslim')}.{attr}".lstrip(".")
            seen.setdefault(id(obj), (short, obj))
    return sorted(seen.values(), key=lambda x: x[0])


PUBLIC = _public()
CALLABLES = [(n, o) for n, o in PUBLIC if callable(o)]


def _signature(obj):
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def test_every_package_exports_something():
    assert len(PUBLIC) > 80


@pytest.mark.parametrize("name,obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_names_have_docstrings(name, obj):
    if isinstance(obj, int | float | str | tuple | frozenset):
        pytest.fail(f"{name} is a constant in __all__: tunables are not public API")
    assert inspect.getdoc(obj), f"{name} has no docstring"


@pytest.mark.parametrize("name,obj", CALLABLES, ids=[n for n, _ in CALLABLES])
def test_signatures_follow_the_conventions(name, obj):
    sig = _signature(obj)
    bare = name.rsplit(".", 1)[-1]
    if sig is None or (inspect.isclass(obj) and bare not in SPECS):
        return
    params = sig.parameters
    assert "fn_name" not in params, f"{name}: fn_name= is internal plumbing"
    allowed = POSITIONAL_DEFAULTS.get(bare, set())
    for p in params.values():
        if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty:
            assert p.name in allowed, (
                f"{name}: option {p.name}= has a default but is positional; make it keyword-only"
            )
        if p.name == "where":
            assert p.kind is p.KEYWORD_ONLY and p.default is None, f"{name}: where= convention"
        if p.name == "groups":
            from jaxslim import structures

            assert not isinstance(p.default, structures.Structure), (
                f"{name}: the grouping argument is called structure="
            )


def test_tunables_are_not_exported():
    from jaxslim import quant

    for name in ("INT_MIN_ROWS", "BLOCK_ROWS", "BLOCKED_BACKENDS", "EPS", "Layout", "layout"):
        assert name not in quant.__all__, name
    for name in ("int_path_applies", "blocked_path_applies"):
        assert name not in quant.__all__, name


def test_all_names_resolve():
    for name in PACKAGES:
        mod = importlib.import_module(name)
        for attr in getattr(mod, "__all__", ()):
            assert hasattr(mod, attr), f"{name}.__all__ lists {attr!r}, which is missing"


def _modules():
    import pathlib

    import jaxslim

    root = pathlib.Path(jaxslim.__file__).parent
    return root, {
        ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in sorted(root.rglob("*.py"))
    }


def test_no_public_name_shadows_a_module():
    """``quant.gptq`` the function must not hide a ``quant/gptq.py``: every exported name that is
    also a submodule's name is that module."""
    import pkgutil

    for name in PACKAGES:
        mod = importlib.import_module(name)
        subs = {m.name for m in pkgutil.iter_modules(getattr(mod, "__path__", []))}
        for attr in getattr(mod, "__all__", ()):
            if attr in subs:
                assert isinstance(getattr(mod, attr), types.ModuleType), f"{name}.{attr}"


def test_implementation_modules_are_private_and_carry_no_all():
    """Inside a package, implementation modules are ``_name.py`` and define no ``__all__``; the
    package ``__init__`` is the public surface and defines nothing itself."""
    import ast

    _, mods = _modules()
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        has_all = any(
            isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)
            for n in tree.body
        )
        leaf = name.rsplit(".", 1)[-1]
        if path.name == "__init__.py":
            defs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
            assert defs == [], f"{name} defines {defs}; define them in a module and re-export"
        elif leaf.startswith("_"):
            assert not has_all, f"{name} is private and must not carry an __all__"


def test_no_module_imports_an_underscored_name_of_another():
    """Helpers shared across modules have public names in a private module (``_checks``,
    ``_rules``...); nothing imports ``_name`` from another jaxslim module."""
    import ast

    _, mods = _modules()
    bad = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxslim"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if a.name.startswith("_") and full not in mods:
                        bad.append(f"{name} imports {a.name} from {node.module}")
    assert bad == []


def test_the_library_never_imports_the_demo_or_the_cli():
    import ast

    _, mods = _modules()
    for name, path in mods.items():
        if name.startswith(("jaxslim.demo", "jaxslim.cli")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = node.module or ""
                assert not target.startswith(("jaxslim.demo", "jaxslim.cli")), (name, target)
                if target == "jaxslim":
                    assert not {a.name for a in node.names} & {"demo", "cli"}, name


# --- errors name the public call: one mechanism (``_checks.public``), nothing threaded --------

# Every public package, the ones without conventions tests above included.
ALL_PACKAGES = [
    *PACKAGES,
    "jaxslim.recipe",
    "jaxslim.flax",
]
# ``path`` that is a file path or the where-predicate's argument, not a leaf name for messages.
PATH_ALLOWED = {  # a file or directory path, a dataclass field, or a where-predicate's argument
    "checkpoints.open",
    "checkpoints.export_gguf",
    "checkpoints.load",
    "checkpoints.save",
    "checkpoints.load_orbax",
    "checkpoints.save_orbax",
    "recipe.load",
    "structures.kernel_like",
}
# The public functions that took ``path=`` (a leaf name for messages) before it came from the
# tree-wide caller; they accept it for one release with a DeprecationWarning.
FORMER_PATH = [
    "quant.quantize",
    "quant.fake_quant",
    "quant.qparams",
    "quant.gptq",
    "quant.gptq_hessian",
    "quant.hqq",
    "quant.awq_scales",
    "quant.smooth_scales",
    "prune.sparsegpt",
    "checkpoints.gguf_quantize",
]


def _public_functions():
    seen = {}
    for name in ALL_PACKAGES:
        mod = importlib.import_module(name)
        for attr in getattr(mod, "__all__", ()):
            obj = getattr(mod, attr)
            if inspect.isfunction(inspect.unwrap(obj)):
                short = f"{name.removeprefix('jaxslim.').removeprefix('jaxslim')}.{attr}"
                seen.setdefault(id(obj), (short.lstrip("."), obj))
    return sorted(seen.values(), key=lambda x: x[0])


FUNCTIONS = _public_functions()


def test_the_function_list_covers_every_package():
    names = {n for n, _ in FUNCTIONS}
    assert len(FUNCTIONS) > 140
    for pkg in ("quant", "prune", "splice", "calibrate", "checkpoints", "models", "distill"):
        assert any(n.startswith(pkg + ".") for n in names), pkg
    for pkg in ("regularize", "schedules", "structures", "recipe", "flax.quant", "report"):
        assert any(n.startswith(pkg + ".") for n in names), pkg
    assert set(FORMER_PATH) <= names and PATH_ALLOWED <= names


@pytest.mark.parametrize("name,obj", FUNCTIONS, ids=[n for n, _ in FUNCTIONS])
def test_no_public_function_takes_fn_name_or_a_leaf_path(name, obj):
    params = inspect.signature(obj).parameters
    assert "fn_name" not in params, f"{name}: fn_name= is internal plumbing"
    if name not in PATH_ALLOWED:
        assert "path" not in params, f"{name}: the leaf path comes from the tree-wide caller"
    # the decorator keeps what users and docs read
    assert obj.__name__ == name.rsplit(".", 1)[-1] and inspect.getdoc(obj)
    assert inspect.signature(obj) == inspect.signature(inspect.unwrap(obj)), name


def test_no_module_mentions_fn_name():
    import re

    _, mods = _modules()
    hits = [
        f"{name}:{i}"
        for name, path in mods.items()
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bfn_name\b", line)
    ]
    assert hits == []


def test_a_helper_names_each_public_caller_eagerly_and_under_jit():
    """``quant._spec.layout`` (a private helper) raises for an axis the array does not have; the
    message names the public function the user called and the leaf that function works on."""
    import jax
    import jax.numpy as jnp

    from jaxslim import _checks, quant

    x = jnp.ones((8, 4))
    bad = quant.QuantSpec(8, axis=5)
    tail = r"axis 5 is out of range for {} with ndim 2"
    cases = [
        (lambda: quant.quantize(x, bad), "quant.quantize", "'the input'"),
        (lambda: quant.fake_quant(x, bad), "quant.fake_quant", "'the input'"),
        (lambda: quant.quantize_params({"enc": {"w": x}}, bad), "quant.quantize_params", "'enc/w'"),
        (lambda: jax.jit(lambda a: quant.quantize(a, bad))(x), "quant.quantize", "'the input'"),
        (lambda: jax.jit(lambda a: quant.fake_quant(a, bad))(x), "quant.fake_quant", "'the input'"),
        (
            lambda: jax.jit(lambda p: quant.quantize_params(p, bad))({"enc": {"w": x}}),
            "quant.quantize_params",
            "'enc/w'",
        ),
        (
            lambda: jax.vmap(lambda a: quant.fake_quant(a, bad))(x[None]),
            "quant.fake_quant",
            "'the input'",
        ),
    ]
    for call, fn, leaf in cases:
        with pytest.raises(ValueError, match="^" + fn + ": " + tail.format(leaf)):
            call()
        # the names are reset after the error
        assert _checks.caller() == "jaxslim" and _checks.leaf_path() == ""


def test_the_outermost_public_call_names_the_error():
    """``quant.qdot_general`` quantizes its activations with ``quant.quantize``: a NaN in them is
    reported by the function the user called, naming the operand."""
    import jax.numpy as jnp

    from jaxslim import quant

    w = quant.quantize(jnp.ones((4, 3)), quant.QuantSpec(8, axis=-1))
    lhs = jnp.ones((2, 4)).at[1, 2].set(jnp.nan)
    dn = (((1,), (0,)), ((), ()))
    with pytest.raises(ValueError, match=r"^quant\.qdot_general: 'lhs' has 1 non-finite"):
        quant.qdot_general(lhs, w, dn, lhs_spec=quant.QuantSpec(8))


def test_a_returned_closure_names_its_maker():
    """An optax transform's ``init`` runs after ``prune.pruner`` returned; its errors still name
    ``prune.pruner``."""
    import jax.numpy as jnp

    from jaxslim import prune

    tx = prune.pruner(0.5, where="nothing_matches")
    with pytest.raises(ValueError, match=r"^prune\.pruner: where='nothing_matches' selects no"):
        tx.init({"w": jnp.ones((4, 4))})


def _former_path_calls():
    import jax.numpy as jnp
    import numpy as np

    from jaxslim import checkpoints, prune, quant

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    h = quant.gptq_hessian(x)
    a = jnp.abs(x).mean(0) + 0.1
    s4 = quant.QuantSpec(4, axis=-1, group_size=16)
    return {
        "quant.quantize": lambda **kw: quant.quantize(w, s4, **kw),
        "quant.fake_quant": lambda **kw: quant.fake_quant(w, s4, **kw),
        "quant.qparams": lambda **kw: quant.qparams(w, s4, **kw),
        "quant.gptq": lambda **kw: quant.gptq(w, h, s4, **kw),
        "quant.gptq_hessian": lambda **kw: quant.gptq_hessian(x, **kw),
        "quant.hqq": lambda **kw: quant.hqq(w, s4, iters=2, **kw),
        "quant.awq_scales": lambda **kw: quant.awq_scales([w], h, a, s4, n_grid=2, **kw),
        "quant.smooth_scales": lambda **kw: quant.smooth_scales([w], a, **kw),
        "prune.sparsegpt": lambda **kw: prune.sparsegpt(w, h, 0.5, **kw),
        "checkpoints.gguf_quantize": lambda **kw: checkpoints.gguf_quantize(w.T, "q8_0", **kw),
    }


@pytest.mark.parametrize("name", FORMER_PATH)
def test_path_keyword_is_deprecated_and_still_works(name):
    import jax

    call = _former_path_calls()[name]
    expected = call()
    with pytest.warns(DeprecationWarning, match=rf"^{name}\(path=\.\.\.\) is deprecated"):
        got = call(path="enc/w")
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        assert (e == g).all()


def test_deprecated_path_still_names_the_leaf():
    import jax.numpy as jnp

    from jaxslim import _checks, quant

    x = jnp.ones((8, 4)).at[2, 1].set(jnp.nan)
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(ValueError, match=r"^quant\.quantize: 'enc/w' has 1 non-finite"),
    ):
        quant.quantize(x, quant.QuantSpec(8), path="enc/w")
    assert _checks.leaf_path() == ""
