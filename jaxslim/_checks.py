"""The name errors carry, and the argument checks every public function shares.

**Naming the public call.** Every public function is decorated with :func:`public`, which records
its name (``"quant.quantize"``) in a context variable for the duration of the call; private
helpers build their messages with :func:`caller` (``f"{caller()}: ..."``), so an error names the
function the user called and no name is passed down through helpers. The outermost public call
wins: ``quant.oneshot`` calling ``quant.quantize`` reports ``quant.oneshot``. A closure a public
function returns (an optax ``update_fn``, an observer's ``update``) is wrapped the same way, so
it names its maker when it is called later. A tree-walking function states the leaf it is
working on with :func:`at_leaf`, and helpers read it with :func:`leaf_path`. Both are Python state
read at trace time, so they work under ``jax.jit``, ``vmap`` and ``grad`` (a traced function
raises while it is traced, inside the call).

**Argument checks**, one home for them like ``optax/_src/numerics.py``: a public function passes
its own public name (``fn="prune.lottery"``) and the argument's name, and the error says both with
the bad value.

A *concrete* value (a Python number, a NumPy scalar or 0-d array, a 0-d ``jax.Array`` outside
``jit``) is checked eagerly and raises ``ValueError`` when out of range (``TypeError`` when it is
not a real number at all). Only a *traced* value (inside ``jit``, e.g. from a schedule at a traced
step) skips the range check; :func:`hyper` then returns a traced flag the caller uses to turn its
term off with ``jnp.where``, as its docstring says.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

_F = TypeVar("_F", bound=Callable[..., Any])

# The public call in progress (the outermost one) and the leaf path it is working on.
_CALL: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxslim_call", default=None)
_LEAF: contextvars.ContextVar[str] = contextvars.ContextVar("jaxslim_leaf", default="")


def caller() -> str:
    """The name of the public call in progress, ``"jaxslim"`` outside any.

    >>> caller()
    'jaxslim'
    >>> public("quant.quantize")(caller)()
    'quant.quantize'
    """
    return _CALL.get() or "jaxslim"


@contextlib.contextmanager
def calling(name: str, *, replace: bool = False) -> Iterator[None]:
    """Within the block :func:`caller` is ``name``; without ``replace``, only if no public call
    is in progress (the outermost call keeps its name)."""
    if _CALL.get() is not None and not replace:
        yield
        return
    token = _CALL.set(name)
    try:
        yield
    finally:
        _CALL.reset(token)


def public(name: str, *, leaf_kwarg: bool = False) -> Callable[[_F], _F]:
    """Decorates a public function (or a closure it returns) so that its errors name ``name``.

    Unless a public call is already in progress, :func:`caller` is ``name`` until the function
    returns. The wrapper keeps the signature, docstring and module (``functools.wraps``).

    ``leaf_kwarg=True``: the function used to take ``path=`` (the leaf name for its messages);
    the wrapper still accepts it for one release, warns ``DeprecationWarning`` and runs the
    function under :func:`at_leaf`, which is where the function now reads the leaf path from.

    >>> @public("demo.f")
    ... def f():
    ...     return caller()
    >>> f(), public("demo.g")(f)()
    ('demo.f', 'demo.g')
    """

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if leaf_kwarg and "path" in kwargs:
                path = kwargs.pop("path")
                warnings.warn(
                    f"{name}(path=...) is deprecated and will be removed: the leaf path in its "
                    "errors comes from the tree-wide function calling it",
                    DeprecationWarning,
                    stacklevel=2,
                )
                with at_leaf(str(path)):
                    return wrapper(*args, **kwargs)
            if _CALL.get() is not None:
                return fn(*args, **kwargs)
            token = _CALL.set(name)
            try:
                return fn(*args, **kwargs)
            finally:
                _CALL.reset(token)

        return wrapper  # type: ignore[return-value]

    return decorate


def leaf_path() -> str:
    """The leaf path the public call in progress is working on (``""`` when none)."""
    return _LEAF.get()


@contextlib.contextmanager
def at_leaf(path: str) -> Iterator[None]:
    """Within the block, :func:`leaf_path` is ``path``."""
    token = _LEAF.set(path)
    try:
        yield
    finally:
        _LEAF.reset(token)


def scalar(fn: str, name: str, value: Any) -> float | None:
    """The float value of a concrete real scalar, or ``None`` for a traced one.

    Concrete: a Python ``int``/``float``, a NumPy scalar, a 0-d NumPy array, a 0-d ``jax.Array``
    outside ``jit``. Raises ``TypeError`` naming ``fn`` for anything else: ``bool``, strings,
    complex numbers, arrays with more than one entry (traced ones included).

    >>> scalar("f", "x", np.float32(0.5))
    0.5
    """
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{fn}: {name} must be a real number, got the bool {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    dtype, shape = getattr(value, "dtype", None), getattr(value, "shape", None)
    if dtype is None or shape is None or not isinstance(value, np.ndarray | np.generic | jax.Array):
        raise TypeError(f"{fn}: {name} must be a real number, got {value!r}")
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{fn}: {name} must be a real number, got an array of dtype {dtype}")
    if tuple(shape) != ():
        raise TypeError(f"{fn}: {name} must be a scalar, got an array of shape {tuple(shape)}")
    if isinstance(value, jax.core.Tracer):
        return None
    return float(value)


def number(fn: str, name: str, value: Any, *, positive: bool) -> float:
    """A concrete finite number, ``> 0`` (``positive=True``) or ``>= 0``; traced values raise."""
    v = scalar(fn, name, value)
    if v is None:
        raise TypeError(f"{fn}: {name} must be a concrete number, not a value traced under jit")
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{fn}: {name} must be finite and {need}, got {v!r}")
    return v


def fraction(fn: str, value: Any, what: str = "sparsity") -> float:
    """A concrete number in ``[0, 1]`` (NaN fails); traced values raise ``TypeError``.

    >>> fraction("prune.f", 0.25)
    0.25
    """
    v = scalar(fn, what, value)
    if v is None:
        raise TypeError(f"{fn}: {what} must be a concrete number, not a traced value")
    if not 0.0 <= v <= 1.0:  # NaN fails too
        raise ValueError(f"{fn}: {what} must be a number in [0, 1], got {value!r}")
    return v


def integer(fn: str, what: str, value: Any, *, low: int | None) -> int:
    """A Python or NumPy int (not a bool), at least ``low`` when given."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {what} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{fn}: {what} must be an int >= {low}, got {value!r}")
    return int(value)


def hyper(fn: str, name: str, value: Any, *, positive: bool = False):
    """``(value, ok)``: a concrete value is checked (``ValueError``) and ``ok`` is ``True``.

    A traced value cannot be checked: ``ok`` is the traced test and the returned value is a safe
    stand-in (1 or 0) where it fails; the caller turns its term off where ``ok`` is ``False``.
    """
    v = scalar(fn, name, value)
    need = "> 0" if positive else ">= 0"
    if v is not None:
        if not math.isfinite(v) or (v <= 0 if positive else v < 0):
            raise ValueError(f"{fn}: {name} must be finite and {need}, got {value!r}")
        return v, True
    x = jnp.asarray(value, jnp.float32)
    ok = jnp.isfinite(x) & ((x > 0) if positive else (x >= 0))
    return jnp.where(ok, x, jnp.float32(1.0 if positive else 0.0)), ok


def nonnegative(fn: str, name: str, value: Any) -> float:
    """A concrete finite number ``>= 0``; traced values and negatives raise ``ValueError``."""
    v = scalar(fn, name, value)
    if v is None or not math.isfinite(v) or v < 0:
        raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {value!r}")
    return v


@jax.jit
def _nonfinite(x: jax.Array) -> jax.Array:
    return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


def count_nonfinite(x: Any) -> int:
    """The NaN and +-inf entries of a concrete array: one compiled reduction per shape and dtype
    (eager ``jnp`` compiles each primitive on its own), computed where a sharded array lies.

    >>> count_nonfinite(jnp.array([1.0, jnp.nan, -jnp.inf]))
    2
    """
    return int(_nonfinite(x))
