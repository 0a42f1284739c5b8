"""Data-free compression recipes: a TOML file that mirrors the prune / quant API one to one.

A recipe is what ``jaxslim compress CKPT --recipe R.toml -o OUT`` applies to a saved parameter
tree. Without calibration data and model code: magnitude or N:M pruning, then round-to-nearest
(RTN) or HQQ quantization (integer, fp8 or NF4 codes) by rules. Each table is one call of the
Python API::

    [[prune]]  where, sparsity, structure, scope
        -> params = prune.apply_mask(params, prune.topk_mask(prune.magnitude(params), sparsity,
                                     structure=structure, scope=scope, where=where))
    [quant]    default + [[quant.rules]] where, spec
        -> params, _ = quant.quantize_params(params, [(where, spec), ...], default=default)

**Methods.** A ``method`` key names a one-shot method record and its options, one to one:
``method = "gptq"`` is ``quant.GPTQ()``, ``method = {name = "gptq", damp = 0.01, block_size =
128}`` is ``quant.GPTQ(damp=0.01, block_size=128)``; prune steps take ``magnitude`` (the default),
``wanda``, ``sparsegpt`` (``prune.Magnitude/Wanda/SparseGPT``), quant rules ``rtn`` (the default),
``hqq``, ``gptq``, ``awq``, ``smoothquant`` (``quant.RTN/HQQ/GPTQ/AWQ/SmoothQuant``); ``[quant]
method`` is the method of rules (and ``default``) that name none. Calibrated methods (all but
magnitude, RTN and HQQ) need the model function and calibration batches: ``apply(recipe, params,
fn=fn, batches=batches)`` runs ``prune.oneshot`` / ``quant.oneshot(..., sequential=True)``
(``fn(params, batch)``) on the floating leaves of ndim >= 2 that ``where`` selects, and without
them raises ``RecipeError`` naming the method. Ready recipes
by name: :func:`named` (``w4a16-gptq``, ``w4a16-awq``, ``w8a8-smoothquant``,
``sparse-2of4-sparsegpt``, ``sparse50-wanda``).

``[[prune]]`` tables run in order, then ``[quant]``. "Global / local / mixed" are the same knobs as
in Python: a prune ``scope = "global"`` ranks all selected leaves together (``"layer"``: each leaf
alone); a quant ``spec`` without ``axis`` has one scale per tensor (global), ``axis = -1`` one per
output channel and ``group_size`` one per block (local); a rule list with ``spec = "float"`` rules
(``None`` in Python) and different bits per rule is mixed precision. ``where`` is a regex searched
in the leaf path (``"Dense_0/kernel"``; a trailing ``/value``, how Orbax stores an NNX Variable,
is not part of the name); without ``where`` a table selects every default kernel.

Every mistake raises ``RecipeError`` (a ``ValueError``) whose ``key`` names the offending key
(``"quant.rules[1].spec.bits"``): unknown keys, wrong types, values the API rejects, and rules
that select nothing (every ``where`` must select a leaf, and every quant rule must be the first
match of at least one leaf).

>>> import jax.numpy as jnp
>>> r = parse('''
... [[prune]]
... sparsity = 0.5
... [quant]
... default = "float"
... [[quant.rules]]
... spec = {bits = 8, axis = -1}
... ''')
>>> out, rows = apply(r, {"w": jnp.arange(1.0, 9.0).reshape(4, 2), "b": jnp.ones(2)})
>>> type(out["w"]).__name__, int((out["w"].dequantize() == 0).sum()), type(out["b"]).__name__
('QArray', 4, 'ArrayImpl')
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from jaxslim import _tree, prune, quant, report
from jaxslim._checks import at_leaf, public
from jaxslim.quant import QuantSpec
from jaxslim.structures import NM, Blocks, Channels, Structure, Unstructured

__all__ = [
    "Recipe",
    "PruneStep",
    "QuantRule",
    "RecipeError",
    "parse",
    "load",
    "dumps",
    "apply",
    "named",
    "NAMED",
    "EXAMPLE",
]

EXAMPLE = """\
# jaxslim compress recipe: data-free pruning, then quantization. Each table is one call of the
# Python API (jaxslim.prune / jaxslim.quant), with the same names and defaults.
#
# `where` is a regex searched in the leaf path ("Conv_0/kernel", "layers/3/mlp/kernel"); leave it
# out to select every float kernel (the default `where`). Each `where` must select a leaf.

# Pruning, in order. One table = one call:
#   params = prune.apply_mask(params, prune.topk_mask(prune.magnitude(params), sparsity,
#                             structure=..., scope=..., where=...))
[[prune]]
where = "Conv_\\\\d+/kernel"         # all conv kernels
sparsity = 0.5                     # fraction removed: round_half_even(sparsity * n) of n groups
scope = "global"                   # "global": rank all selected leaves together;
                                   # "layer" (the default): each leaf alone
structure = "unstructured"         # or a table: {kind = "channels", axis = -1, ord = 2}
                                   #             {kind = "blocks", shape = [4, 4], ord = 2}

[[prune]]
where = "Dense_0/kernel"
structure = {kind = "nm", n = 2, m = 4, axis = -2}   # 2:4 along the input axis (Flax (in, out))
# sparsity defaults to 1 - n/m for N:M (only > 0 matters: the pattern is fixed)

# Quantization (round to nearest). One call:
#   params, _ = quant.quantize_params(params, [(where, spec), ...], default=...)
# The first rule whose `where` selects a float leaf decides; `spec = "float"` keeps it float
# (mixed precision). `default` is for float leaves no rule selects ("float" unless given).
[quant]
default = "float"

[[quant.rules]]
where = "Dense_1"                  # the classifier stays float
spec = "float"

[[quant.rules]]
where = "Dense_0/kernel"           # int4, one scale per output channel and block of 32 inputs
spec = {bits = 4, axis = -1, group_size = 32}
# method = "hqq"                   # "rtn" (round to nearest, the default) or "hqq" (quant.hqq:
                                   # half-quadratic zero points/scales, no data; affine specs)

[[quant.rules]]                    # every other kernel: int8, one scale per output channel
spec = {bits = 8, axis = -1}       # QuantSpec fields: bits, signed, symmetric, axis (int or list;
                                   # leave out for one scale per tensor), group_size, group_axis,
                                   # fmt ("int", "e4m3", "e5m2", "nf4")
"""


class RecipeError(ValueError):
    """A bad recipe: ``key`` names the offending key (``"prune[0].sparsity"``)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


@dataclasses.dataclass(frozen=True)
class PruneStep:
    """One ``[[prune]]`` table. ``method=prune.Magnitude()``: magnitude scores, ``topk_mask``,
    ``apply_mask``; ``prune.Wanda()`` / ``prune.SparseGPT(...)``: ``prune.oneshot`` on the
    calibration data (``scope`` must be ``"layer"``)."""

    sparsity: float
    where: str | None = None
    structure: Structure = Unstructured()
    scope: str = "layer"
    method: Any = prune.Magnitude()


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """One ``[[quant.rules]]`` table: ``(where, spec, method)``; ``spec=None`` keeps the leaf
    float. ``method`` is a ``quant`` method record (``quant.RTN()``, ``quant.HQQ(iters=20)``,
    ``quant.GPTQ(...)``, ...) or ``None`` for the ``[quant]`` table's ``method``."""

    spec: QuantSpec | None
    where: str | None = None
    method: Any = None


_RTN = quant.RTN()  # (inside Recipe, `quant` is the field)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A parsed recipe: prune steps in order, then quant rules (``quant=None``: no quantization);
    ``method`` is the quant method of rules (and ``default``) that name none."""

    prune: tuple[PruneStep, ...] = ()
    quant: tuple[QuantRule, ...] | None = None
    default: QuantSpec | None = None
    method: Any = _RTN


_PRUNE_METHODS = {"magnitude": prune.Magnitude, "wanda": prune.Wanda, "sparsegpt": prune.SparseGPT}
_QUANT_METHODS = {
    "rtn": quant.RTN,
    "hqq": quant.HQQ,
    "gptq": quant.GPTQ,
    "awq": quant.AWQ,
    "smoothquant": quant.SmoothQuant,
}
_DATA_FREE = (prune.Magnitude, quant.RTN, quant.HQQ)
_NOT_IN_TOML = {"quant"}  # prune.SparseGPT(quant=...) takes a Python callable


def _method(key: str, v: Any, table: Mapping[str, type]) -> Any:
    """A method record from ``"name"`` or ``{name = "...", option = value, ...}``."""
    short = isinstance(v, str)
    if short:
        v = {"name": v}
    if not isinstance(v, Mapping):
        raise RecipeError(key, f"must be a method name or a table with 'name', got {v!r}")
    name = v.get("name")
    if name not in table:
        where = f"{key}.name" if "name" in v and not short else key
        raise RecipeError(where, f"must be one of {list(table)}, got {name!r}")
    cls = table[name]
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_IN_TOML]
    _keys(key, v, ["name", *fields])
    kwargs = {k: tuple(x) if isinstance(x, list) else x for k, x in v.items() if k != "name"}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        msg = str(e).split(": ", 1)[-1]
        raise RecipeError(_named(key, kwargs, msg), str(e)) from None


_STRUCTURES: dict[str, type[Structure]] = {
    "unstructured": Unstructured,
    "channels": Channels,
    "nm": NM,
    "blocks": Blocks,
}


def _keys(key: str, table: Any, allowed: Iterable[str], required: Iterable[str] = ()) -> None:
    if not isinstance(table, Mapping):
        raise RecipeError(key, f"must be a table, got {type(table).__name__} {table!r}")
    allowed = list(allowed)
    for k in table:
        if k not in allowed:
            raise RecipeError(f"{key}.{k}" if key else k, f"unknown key; known keys: {allowed}")
    for k in required:
        if k not in table:
            raise RecipeError(f"{key}.{k}" if key else k, "is required")


def _where(key: str, v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise RecipeError(key, f"must be a regex string, got {type(v).__name__} {v!r}")
    try:
        re.compile(v)
    except re.error as e:
        raise RecipeError(key, f"{v!r} is not a valid regular expression ({e})") from None
    return v


def _number(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise RecipeError(key, f"must be a number, got {type(v).__name__} {v!r}")
    return float(v)


def _named(key: str, kwargs: Mapping[str, Any], msg: str) -> str:
    """``key.field`` when the error message names exactly one of the given fields, else ``key``."""
    named = [k for k in kwargs if msg.startswith(f"{k} ") or f"{k}=" in msg]
    return f"{key}.{named[0]}" if len(named) == 1 else key


def _structure(key: str, v: Any) -> Structure:
    if isinstance(v, str):
        v = {"kind": v}
    if not isinstance(v, Mapping):
        raise RecipeError(key, f"must be a name or a table with 'kind', got {v!r}")
    kind = v.get("kind")
    if kind not in _STRUCTURES:
        raise RecipeError(f"{key}.kind", f"must be one of {list(_STRUCTURES)}, got {kind!r}")
    cls = _STRUCTURES[kind]
    fields = [f.name for f in dataclasses.fields(cls)]
    _keys(key, v, ["kind", *fields])
    kwargs = {k: tuple(x) if isinstance(x, list) else x for k, x in v.items() if k != "kind"}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        msg = str(e).removeprefix(f"{cls.__name__}: ")
        raise RecipeError(_named(key, kwargs, msg), str(e)) from None


def _spec(key: str, v: Any) -> QuantSpec | None:
    if v == "float":
        return None
    if not isinstance(v, Mapping):
        raise RecipeError(key, f'must be "float" or a table of QuantSpec fields, got {v!r}')
    fields = [f.name for f in dataclasses.fields(QuantSpec) if f.name != "_"]
    _keys(key, v, fields)
    kwargs = {k: tuple(x) if isinstance(x, list) else x for k, x in v.items()}
    try:
        return QuantSpec(**kwargs)
    except (TypeError, ValueError) as e:
        msg = str(e).removeprefix("QuantSpec: ")
        raise RecipeError(_named(key, kwargs, msg), msg) from None


def _prune_step(key: str, t: Any) -> PruneStep:
    _keys(key, t, ["where", "sparsity", "structure", "scope", "method"])
    method = _method(f"{key}.method", t.get("method", "magnitude"), _PRUNE_METHODS)
    structure = _structure(f"{key}.structure", t.get("structure", "unstructured"))
    if "sparsity" in t:
        s = _number(f"{key}.sparsity", t["sparsity"])
    elif isinstance(structure, NM):
        s = 1.0 - structure.n / structure.m
    else:
        raise RecipeError(f"{key}.sparsity", "is required (a fraction in [0, 1])")
    if not 0.0 <= s <= 1.0:
        raise RecipeError(f"{key}.sparsity", f"must be in [0, 1], got {t['sparsity']!r}")
    scope = t.get("scope", "layer")
    if scope not in ("layer", "global"):
        raise RecipeError(f"{key}.scope", f"must be 'layer' or 'global', got {scope!r}")
    if not isinstance(method, prune.Magnitude):
        if scope != "layer":
            raise RecipeError(f"{key}.scope", f"must be 'layer' for method {method.name!r}")
        if not isinstance(structure, Unstructured | NM):
            raise RecipeError(
                f"{key}.structure",
                f"must be unstructured or nm for method {method.name!r} (prune.oneshot)",
            )
    return PruneStep(s, _where(f"{key}.where", t.get("where")), structure, scope, method)


@public("recipe.parse")
def parse(source: str | Mapping[str, Any]) -> Recipe:
    """Parses a recipe from TOML text (or the dict ``tomllib`` makes of it).

    Raises ``RecipeError`` naming the key for anything the Python API would reject, and for
    unknown keys (a typo never passes silently).
    """
    if isinstance(source, str):
        try:
            source = tomllib.loads(source)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError("recipe", f"not valid TOML ({e})") from None
    _keys("", source, ["prune", "quant"])
    if not source:
        raise RecipeError("recipe", "is empty; give [[prune]] tables and/or a [quant] table")
    steps = source.get("prune", [])
    if not isinstance(steps, list):
        raise RecipeError("prune", "must be an array of tables: write [[prune]], not [prune]")
    out = [_prune_step(f"prune[{i}]", t) for i, t in enumerate(steps)]
    if "quant" not in source:
        return Recipe(tuple(out))
    q = source["quant"]
    _keys("quant", q, ["default", "rules", "method"])
    default = _spec("quant.default", q.get("default", "float"))
    table_method = _method("quant.method", q.get("method", "rtn"), _QUANT_METHODS)
    rules = q.get("rules", [])
    if not isinstance(rules, list):
        raise RecipeError("quant.rules", "must be an array of tables: write [[quant.rules]]")
    parsed = []
    for i, t in enumerate(rules):
        key = f"quant.rules[{i}]"
        _keys(key, t, ["where", "spec", "method"], required=["spec"])
        spec = _spec(f"{key}.spec", t["spec"])
        method = _method(f"{key}.method", t["method"], _QUANT_METHODS) if "method" in t else None
        parsed.append(QuantRule(spec, _where(f"{key}.where", t.get("where")), method))
    if default is None and all(r.spec is None for r in parsed):
        raise RecipeError("quant", "quantizes nothing: give a rule with a spec or a default")
    return Recipe(tuple(out), tuple(parsed), default, table_method)


def _toml_string(v: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped, the rest as is."""
    out = []
    for ch in v:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(key: str, v: Any) -> str:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)  # TOML reads Python's int and float reprs (1e-05, inf, nan) as they are
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_value(key, x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(f'{key}.{k}', x)}" for k, x in v.items()) + "}"
    raise ValueError(
        f"recipe.dumps: {key} = {v!r} ({type(v).__name__}) has no TOML form; recipes hold "
        "numbers, strings, booleans and lists of them"
    )


def _changed(record: Any, base: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The fields of a dataclass record that differ from ``base``'s (in field order)."""
    out = {}
    for f in dataclasses.fields(record):
        if f.name == "_" or f.name in skip:
            continue
        v = getattr(record, f.name)
        if v != getattr(base, f.name):
            out[f.name] = v
    return out


def _spec_table(spec: QuantSpec | None) -> Any:
    if spec is None:
        return "float"
    fmt = {} if spec.fmt == "int" else {"fmt": spec.fmt}
    return fmt | _changed(spec, QuantSpec(fmt=spec.fmt), ("fmt",))


def _method_table(key: str, method: Any, table: Mapping[str, type]) -> Any:
    name = getattr(method, "name", None)
    if name not in table or not isinstance(method, table[name]):
        raise ValueError(f"recipe.dumps: {key} = {method!r} is not one of {list(table)}")
    for f in _NOT_IN_TOML:
        if getattr(method, f, None) is not None:
            raise ValueError(
                f"recipe.dumps: {key} = {method!r} has {f}= (a Python object), which a TOML "
                "recipe cannot hold"
            )
    changed = _changed(method, table[name](), _NOT_IN_TOML)
    return {"name": name, **changed} if changed else name


def _structure_table(structure: Structure) -> Any:
    kind = next(k for k, cls in _STRUCTURES.items() if type(structure) is cls)
    fields = {f.name: getattr(structure, f.name) for f in dataclasses.fields(structure)}
    return {"kind": kind, **fields} if fields else kind


@public("recipe.dumps")
def dumps(recipe: Recipe | Iterable[tuple[str | None, QuantSpec | None]]) -> str:
    """A recipe as TOML text that :func:`parse` reads back to an equal ``Recipe``.

    ``recipe`` is a ``Recipe`` or a list of ``(where, spec)`` rules (``spec=None``: float), e.g.
    what ``quant.allocate`` returns: then the text is a ``[quant]`` table with ``default =
    "float"`` and one ``[[quant.rules]]`` table per rule, to read, edit and pass to ``jaxslim
    compress --recipe``. Specs, methods and structures are written with the fields that differ
    from their defaults only.

    Raises ``TypeError`` for anything else, ``ValueError`` for a record a TOML recipe cannot
    hold (``prune.SparseGPT(quant=...)``, a ``where`` predicate) and for a recipe that would not
    parse back (empty, or rules that are all float).

    >>> from jaxslim.quant import QuantSpec
    >>> text = dumps([("^w$", QuantSpec(4, axis=-1, group_size=128)), ("^b$", None)])
    >>> print(text)
    [quant]
    default = "float"
    <BLANKLINE>
    [[quant.rules]]
    where = "^w$"
    spec = {bits = 4, axis = [-1], group_size = 128}
    <BLANKLINE>
    [[quant.rules]]
    where = "^b$"
    spec = "float"
    <BLANKLINE>
    >>> parse(text).quant[0].spec == QuantSpec(4, axis=-1, group_size=128)
    True
    """
    if not isinstance(recipe, Recipe):
        if isinstance(recipe, str | Mapping) or not isinstance(recipe, Iterable):
            raise TypeError(
                f"recipe.dumps: recipe must be a Recipe or a list of (where, spec) rules, got "
                f"{type(recipe).__name__}"
            )
        rules = []
        for i, rule in enumerate(recipe):
            if not (isinstance(rule, tuple | list) and len(rule) == 2):
                raise TypeError(
                    f"recipe.dumps: rule {i} must be a (where, spec) pair, got {rule!r}"
                )
            where, spec = rule
            if where is not None and not isinstance(where, str):
                raise ValueError(
                    f"recipe.dumps: rule {i} has where={where!r}; a TOML recipe holds a regex "
                    "string or no where"
                )
            if spec is not None and not isinstance(spec, QuantSpec):
                raise TypeError(
                    f"recipe.dumps: rule {i} has spec={spec!r}, not a QuantSpec or None"
                )
            rules.append(QuantRule(spec, where))
        recipe = Recipe(quant=tuple(rules))
    lines: list[str] = []
    for i, step in enumerate(recipe.prune):
        key = f"prune[{i}]"
        where = [] if step.where is None else [f"where = {_toml_value(key, step.where)}"]
        lines += ["[[prune]]", *where]
        lines.append(f"sparsity = {_toml_value(key, step.sparsity)}")
        if not isinstance(step.structure, Unstructured):
            structure = _structure_table(step.structure)
            lines.append(f"structure = {_toml_value(f'{key}.structure', structure)}")
        if step.scope != "layer":
            lines.append(f"scope = {_toml_value(key, step.scope)}")
        if not isinstance(step.method, prune.Magnitude) or step.method != prune.Magnitude():
            m = _method_table(f"{key}.method", step.method, _PRUNE_METHODS)
            lines.append(f"method = {_toml_value(f'{key}.method', m)}")
        lines.append("")
    if recipe.quant is not None:
        default = _toml_value("quant.default", _spec_table(recipe.default))
        lines += ["[quant]", f"default = {default}"]
        if recipe.method != _RTN:
            m = _method_table("quant.method", recipe.method, _QUANT_METHODS)
            lines.append(f"method = {_toml_value('quant.method', m)}")
        lines.append("")
        for i, rule in enumerate(recipe.quant):
            key = f"quant.rules[{i}]"
            lines.append("[[quant.rules]]")
            if rule.where is not None:
                lines.append(f"where = {_toml_value(key, rule.where)}")
            lines.append(f"spec = {_toml_value(f'{key}.spec', _spec_table(rule.spec))}")
            if rule.method is not None:
                m = _method_table(f"{key}.method", rule.method, _QUANT_METHODS)
                lines.append(f"method = {_toml_value(f'{key}.method', m)}")
            lines.append("")
    text = "\n".join(lines)
    try:
        parse(text)
    except RecipeError as e:
        raise ValueError(
            f"recipe.dumps: the recipe would not parse back ({e}); give at least one prune step "
            "or quant rule with a spec (an all-float rule list quantizes nothing)"
        ) from None
    return text


@public("recipe.load")
def load(path: str) -> Recipe:
    """Reads and parses the TOML recipe file at ``path`` (``OSError`` if it cannot be read)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise RecipeError("recipe", f"not UTF-8 text ({e})") from None
    return parse(text)


def _name(path: Any) -> str:
    name = _tree.path_str(path)
    return name[: -len("/value")] if name.endswith("/value") else name


def _pred(where: str | None) -> Callable[[str, Any], bool] | None:
    """``where`` as a predicate on the name without a trailing ``/value`` (Orbax's NNX form)."""
    if where is None:
        return None
    rx = re.compile(where)
    return lambda path, leaf: rx.search(path.removesuffix("/value")) is not None


def _kernels(where: str | None) -> Callable[[str, Any], bool] | None:
    """``where`` for calibrated methods: only floating leaves of ndim >= 2 (the kernels; a
    regex alone also selects a norm's scale)."""
    pred = _pred(where)
    if pred is None:
        return None
    return lambda path, leaf: _tree.is_float_array(leaf) and leaf.ndim >= 2 and pred(path, leaf)


def _leaves(params: Any) -> list[tuple[str, Any]]:
    import jax

    flat = jax.tree_util.tree_leaves_with_path(params, is_leaf=quant.is_qarray)
    return [(_name(p), x) for p, x in flat]


def _selects(where: str | None, name: str, leaf: Any) -> bool:
    return _tree.is_selected(_pred(where), name, leaf)


def check(recipe: Recipe, params: Any) -> None:
    """Raises ``RecipeError`` when a ``where`` selects no leaf of ``params`` or a quant rule is
    never the first match (every leaf it selects is taken by an earlier rule)."""
    leaves = [(n, x) for n, x in _leaves(params) if _tree.is_float_array(x)]
    names = [n for n, _ in leaves][:8]
    shown = f"{names}{' ...' if len(leaves) > 8 else ''}"
    for i, step in enumerate(recipe.prune):
        if not any(_selects(step.where, n, x) for n, x in leaves):
            what = "every default kernel" if step.where is None else repr(step.where)
            raise RecipeError(f"prune[{i}].where", f"{what} selects no leaf; float leaves: {shown}")
    for i, rule in enumerate(recipe.quant or ()):
        hits = [n for n, x in leaves if _selects(rule.where, n, x)]
        key = f"quant.rules[{i}].where"
        what = "every default kernel" if rule.where is None else repr(rule.where)
        if not hits:
            raise RecipeError(key, f"{what} selects no leaf; float leaves: {shown}")
        firsts = [
            n
            for n, x in leaves
            if _selects(rule.where, n, x)
            and not any(_selects(r.where, n, x) for r in recipe.quant[:i])
        ]
        if not firsts:
            raise RecipeError(
                key, f"{what} selects only leaves earlier rules already take: {hits[:8]}"
            )


def _calibrated(key: str, method: Any, fn: Any, batches: Any) -> None:
    if fn is None or batches is None:
        raise RecipeError(
            key,
            f"method {method.name!r} is calibrated: it needs the model function and calibration "
            "data (recipe.apply(..., fn=fn, batches=batches); on the command line --calib TEXT); "
            "data-free methods are magnitude, rtn and hqq",
        )


@public("recipe.apply")
def apply(
    recipe: Recipe,
    params: Any,
    *,
    fn: Callable[[Any, Any], Any] | None = None,
    batches: Iterable[Any] | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Applies ``recipe`` to ``params``: ``(compressed tree, per-leaf rows)``.

    The result equals the Python API calls in the module docstring bit for bit: data-free steps
    as written there, calibrated ones as ``prune.oneshot(fn, params, batches, sparsity,
    method=..., structure=..., where=...)`` and ``quant.oneshot(fn, params, batches, rules,
    method=...)`` (one call per distinct calibrated quant method, with the rules of other methods
    as ``None``, so the first matching rule still decides each leaf). ``rows`` has one dict per
    array leaf: ``path, shape, before, after`` (dtype or format), ``nonzeros_before``,
    ``nonzeros_after``, ``bytes_before``, ``bytes_after``. ``progress`` wraps the iteration over
    leaves during data-free quantization (e.g. ``tqdm.tqdm``).

    Args:
      recipe: a parsed recipe (``parse``, ``load``, ``named``).
      params: the parameter tree.
      fn: ``fn(params, batch)``, the model (needed by calibrated methods only).
      batches: calibration batches for ``fn`` (needed by calibrated methods only).
      progress: wraps the leaf iteration.

    Raises ``RecipeError`` naming the key for a rule that selects nothing (``check``), a spec
    that does not fit a leaf it selects, or a calibrated method without ``fn`` and ``batches``.
    """
    check(recipe, params)
    if batches is not None:
        batches = list(batches)
    before = params
    for i, step in enumerate(recipe.prune):
        try:
            if isinstance(step.method, prune.Magnitude):
                mask = prune.topk_mask(
                    prune.magnitude(params),
                    step.sparsity,
                    structure=step.structure,
                    scope=step.scope,
                    where=_pred(step.where),
                )
                params = prune.apply_mask(params, mask)
                continue
            _calibrated(f"prune[{i}].method", step.method, fn, batches)
            params, _ = prune.oneshot(
                fn,
                params,
                batches,
                step.sparsity,
                method=step.method,
                structure=step.structure,
                where=_kernels(step.where),
            )
        except RecipeError:
            raise
        except (TypeError, ValueError) as e:
            raise RecipeError(f"prune[{i}]", str(e)) from None
    if recipe.quant is not None:
        params = _quantize_calibrated(recipe, params, fn, batches)
        params = _quantize(recipe, params, progress)
    return params, _rows(before, params)


def _method_of(recipe: Recipe, rule: QuantRule | None) -> Any:
    return recipe.method if rule is None or rule.method is None else rule.method


def _quantize_calibrated(recipe: Recipe, params: Any, fn: Any, batches: Any) -> Any:
    """``quant.oneshot`` once per calibrated method, on the leaves whose first rule names it."""
    rules = [*recipe.quant, QuantRule(recipe.default, None, None)]
    keys = [f"quant.rules[{i}]" for i in range(len(recipe.quant))] + ["quant.default"]
    methods = []
    for rule in rules:
        m = _method_of(recipe, rule)
        if rule.spec is not None and not isinstance(m, _DATA_FREE) and m not in methods:
            methods.append(m)
    for m in methods:
        key = next(
            f"{k}.method" if r.method is not None else "quant.method"
            for k, r in zip(keys, rules, strict=True)
            if r.spec is not None and _method_of(recipe, r) == m
        )
        _calibrated(key, m, fn, batches)
        mine = [(_kernels(r.where), r.spec if _method_of(recipe, r) == m else None) for r in rules]
        try:
            params, _ = quant.oneshot(fn, params, batches, mine, method=m)
        except (TypeError, ValueError) as e:
            raise RecipeError(key, str(e)) from None
    return params


def _quantize(recipe: Recipe, params: Any, progress: Any) -> Any:
    """``quant.quantize_params(params, rules, default=...)`` one leaf at a time (for progress),
    for the leaves whose first rule has a data-free method (QArrays pass through)."""
    import jax

    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=quant.is_qarray)
    items = progress(flat) if progress is not None else flat
    out, any_quantized = [], False
    for path, leaf in items:
        name = _name(path)
        if quant.is_qarray(leaf):
            out.append(leaf)
            any_quantized = True
            continue
        if not _tree.is_float_array(leaf):
            out.append(leaf)
            continue
        spec, key, method = recipe.default, "quant.default", _method_of(recipe, None)
        for i, rule in enumerate(recipe.quant):
            if _selects(rule.where, name, leaf):
                spec, key, method = rule.spec, f"quant.rules[{i}].spec", _method_of(recipe, rule)
                break
        if spec is None or not isinstance(method, _DATA_FREE):
            out.append(leaf)
            continue
        try:
            if isinstance(method, quant.HQQ):
                with at_leaf(name):
                    out.append(quant.hqq(leaf, spec, iters=method.iters))
            else:
                with at_leaf(name):
                    out.append(quant.quantize(leaf, spec))
        except (TypeError, ValueError) as e:
            raise RecipeError(key, str(e)) from None
        any_quantized = True
    if not any_quantized:
        raise RecipeError("quant", "the rules quantize no leaf")
    return jax.tree_util.tree_unflatten(treedef, out)


_W4 = "{bits = 4, axis = -1, group_size = 128}"
_NOT_EMBED = "^(?!.*(embed|lm_head))"  # every kernel but the embedding and the output head

NAMED = {
    "w4a16-gptq": f"""\
# int4 weights (one scale per output and 128 inputs), 16-bit activations; GPTQ with
# activation order (inputs with the largest activations first; scales of the original kernel).
[quant]
method = {{name = "gptq", act_order = true}}
[[quant.rules]]
where = '{_NOT_EMBED}'
spec = {_W4}
""",
    "w4a16-awq": f"""\
# int4 weights (one scale per output and 128 inputs), 16-bit activations; AWQ.
[quant]
method = "awq"
[[quant.rules]]
where = '{_NOT_EMBED}'
spec = {_W4}
""",
    "w8a8-smoothquant": f"""\
# int8 weights per output channel, int8 activations per token (quant.w8a8_dot); SmoothQuant.
[quant]
method = "smoothquant"
[[quant.rules]]
where = '{_NOT_EMBED}'
spec = {{bits = 8, axis = -1}}
""",
    "sparse-2of4-sparsegpt": f"""\
# 2:4 sparsity along the inputs of every kernel; SparseGPT.
[[prune]]
where = '{_NOT_EMBED}'
structure = {{kind = "nm", n = 2, m = 4}}
method = "sparsegpt"
""",
    "sparse50-wanda": f"""\
# 50 % unstructured sparsity per output; Wanda.
[[prune]]
where = '{_NOT_EMBED}'
sparsity = 0.5
method = "wanda"
""",
}
"""Ready recipes by name, as TOML text (``named(name)`` parses one)."""


@public("recipe.named")
def named(name: str) -> Recipe:
    """A ready recipe by name (:data:`NAMED`): ``w4a16-gptq``, ``w4a16-awq``,
    ``w8a8-smoothquant``, ``sparse-2of4-sparsegpt``, ``sparse50-wanda``. Each leaves the
    embedding and ``lm_head`` alone and needs calibration data (``apply(..., fn=, batches=)``).

    >>> named("w4a16-gptq").method
    GPTQ(damp=0.01, block_size=128, clip_candidates=1, act_order=True, qep=0.0)
    """
    if name not in NAMED:
        raise RecipeError("recipe", f"no ready recipe {name!r}; the names are {list(NAMED)}")
    return parse(NAMED[name])


def _rows(before: Any, after: Any) -> list[dict[str, Any]]:
    a = {r["path"].removesuffix("/value"): r for r in report.summary(before)}
    b = {r["path"].removesuffix("/value"): r for r in report.summary(after)}
    rows = []
    for path, r in a.items():
        s = b.get(path, r)
        rows.append(
            {
                "path": path,
                "shape": r["shape"],
                "before": r["dtype"],
                "after": s["dtype"],
                "nonzeros_before": r["nonzeros"],
                "nonzeros_after": s["nonzeros"],
                "bytes_before": r["bytes"],
                "bytes_after": s["bytes"],
            }
        )
    return rows
