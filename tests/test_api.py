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
