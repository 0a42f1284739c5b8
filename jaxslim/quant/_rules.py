"""Quantization rules and the one first-match matcher every rule-driven function uses.

A rule pairs a leaf filter with what to do with the leaves it selects: a ``QuantSpec``, or ``None``
to keep them float (mixed precision). ``quantize_params``, ``quant.oneshot``, the Flax
``quantize_model`` and ``jaxslim compress`` recipes all read rules through :func:`normalize` and
:func:`match` (qwix keeps one ``QuantizationRule`` and one matcher the same way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxslim import _tree
from jaxslim._checks import calling
from jaxslim.quant._spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class Rule:
    """``Rule(where, spec)``: leaves selected by ``where`` get ``spec`` (``None``: stay float).

    ``where`` is ``None`` (every floating-point leaf of ndim >= 2), a regex searched in the leaf's
    path string (``"layers/0/q"``), or a predicate ``(path, leaf) -> bool``. A list of rules is
    read in order and the first rule that selects a leaf decides it. A ``(where, spec)`` pair is
    accepted wherever a ``Rule`` is.

    >>> import jax.numpy as jnp
    >>> rules = normalize([Rule("lm_head", None), (None, QuantSpec(8, axis=-1))], "doc")
    >>> match(rules, "lm_head", jnp.ones((4, 4))) is None
    True
    >>> match(rules, "layers/0/q", jnp.ones((4, 4))).bits
    8
    """

    where: Any
    spec: QuantSpec | None


def normalize(rules: Any, fn: str) -> tuple[Rule, ...]:
    """Checked rules from a ``QuantSpec`` (one rule for ``where=None``) or a list of rules/pairs.

    Raises ``TypeError``/``ValueError`` naming ``fn`` and the rule's index on a bad pair, a bad
    spec or an invalid regex.
    """
    if isinstance(rules, QuantSpec):
        return (Rule(None, rules),)
    if isinstance(rules, Rule):
        rules = [rules]
    if not isinstance(rules, Sequence) or isinstance(rules, str):
        raise TypeError(
            f"{fn}: rules must be a QuantSpec or a list of (where, QuantSpec or None) pairs, "
            f"got {rules!r}"
        )
    out = []
    for i, rule in enumerate(rules):
        if isinstance(rule, Rule):
            where, spec = rule.where, rule.spec
        elif isinstance(rule, tuple | list) and len(rule) == 2:
            where, spec = rule
        else:
            raise TypeError(f"{fn}: rule {i} must be a (where, spec) pair, got {rule!r}")
        if spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(
                f"{fn}: rule {i} ({where!r}, ...): spec must be a QuantSpec or None, got {spec!r}"
            )
        with calling(f"{fn}: rule {i}", replace=True):
            _tree.check_where(where)
        out.append(Rule(where, spec))
    return tuple(out)


def first(rules: Sequence[Rule], path: str, leaf: Any) -> Rule | None:
    """The first rule that selects ``(path, leaf)``, or ``None``."""
    for rule in rules:
        if _tree.is_selected(rule.where, path, leaf):
            return rule
    return None


def match(
    rules: Sequence[Rule], path: str, leaf: Any, *, default: QuantSpec | None = None
) -> QuantSpec | None:
    """The spec of the first rule that selects ``(path, leaf)``; ``default`` when none does."""
    rule = first(rules, path, leaf)
    return default if rule is None else rule.spec
