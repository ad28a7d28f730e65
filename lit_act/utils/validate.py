"""Argument validators shared by every public constructor and by the main job's config check.

Each validator takes the argument's ``name`` and ``value``, returns the value converted to the expected type, and
raises :class:`ConfigError` (a ``ValueError``) whose message names the argument, the value and what is expected.
Hydra passes command-line values as strings when their type is ambiguous; a string is converted only when its meaning
is unambiguous (``'0.1'`` -> 0.1, ``'8'`` -> 8), never split into characters, and booleans are never numbers
(``every_n_steps=True`` is an error, not 1).

Example::

    >>> positive_int("every_n_steps", "8")
    8
    >>> finite_float("threshold", "0.1", low=0.0)
    0.1
    >>> str_sequence("params", "hidden.*")
    ('hidden.*',)
    >>> positive_int("bins", True)
    Traceback (most recent call last):
    ...
    lit_act.utils.validate.ConfigError: bins=True: expected a positive integer
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["ConfigError", "boolean", "choice", "finite_float", "float_pair", "int_pair", "non_negative_int",
           "mapping", "optional", "positive_float", "positive_int", "positive_int_sequence", "str_sequence"]


class ConfigError(ValueError):
    """A bad argument or config value; the message is one line: ``<name>=<value>: expected <what>``."""


def _fail(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{name}={value!r}: expected {expected}")


def _sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes) or _is_listconfig(value)


def _is_listconfig(value: Any) -> bool:
    return type(value).__name__ == "ListConfig"


def _to_int(name: str, value: Any, expected: str) -> int:
    if isinstance(value, bool):
        raise _fail(name, value, expected)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _fail(name, value, expected) from None
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return _to_int(name, value.item(), expected)
    raise _fail(name, value, expected)


def _to_float(name: str, value: Any, expected: str) -> float:
    if isinstance(value, bool):
        raise _fail(name, value, expected)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise _fail(name, value, expected) from None
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return _to_float(name, value.item(), expected)
    raise _fail(name, value, expected)


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def _bounded_int(name: str, value: Any, low: int, what: str, high: int | None) -> int:
    expected = what + (f" <= {high}" if high is not None else "")
    out = _to_int(name, value, expected)
    if out < low or (high is not None and out > high):
        raise _fail(name, value, expected)
    return out


def positive_int(name: str, value: Any, high: int | None = None) -> int:
    """An integer ``>= 1`` (and ``<= high`` when given); integral floats and digit strings are converted."""
    return _bounded_int(name, value, 1, "a positive integer", high)


def non_negative_int(name: str, value: Any, high: int | None = None) -> int:
    """An integer ``>= 0`` (and ``<= high`` when given)."""
    return _bounded_int(name, value, 0, "a non-negative integer", high)


def finite_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite float within the bounds (closed unless ``low_open`` / ``high_open``); numeric strings converted."""
    expected = "a finite number" + _range_text(low, high, low_open, high_open)
    out = _to_float(name, value, expected)
    if not math.isfinite(out):
        raise _fail(name, value, expected)
    if low is not None and (out <= low if low_open else out < low):
        raise _fail(name, value, expected)
    if high is not None and (out >= high if high_open else out > high):
        raise _fail(name, value, expected)
    return out


def positive_float(name: str, value: Any, high: float | None = None) -> float:
    """A finite float ``> 0`` (and ``<= high`` when given)."""
    return finite_float(name, value, low=0.0, high=high, low_open=True)


def boolean(name: str, value: Any) -> bool:
    """``True``/``False`` (also the strings ``true``/``false``, any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _fail(name, value, "true or false")


def choice(name: str, value: Any, valid: Iterable[Any]) -> Any:
    """``value`` if it is one of ``valid``; the error lists the valid choices."""
    valid = list(valid)
    if value not in valid:
        raise _fail(name, value, f"one of the valid choices; valid: {valid!r}")
    return value


def str_sequence(name: str, value: Any) -> tuple[str, ...]:
    """A tuple of strings; a single string is one item (``"hidden.*"`` -> ``("hidden.*",)``), never split."""
    if isinstance(value, str):
        return (value,)
    if _sequence(value) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _fail(name, value, "a string or a list of strings")


def positive_int_sequence(name: str, value: Any, high: int | None = None, allow_empty: bool = False) -> tuple[int, ...]:
    """A list of positive integers (e.g. hidden widths); a bare number is an error: a list is meant."""
    expected = ("a list of positive integers" + (f" <= {high}" if high is not None else "")
                + ("" if allow_empty else " (at least one)"))
    if not _sequence(value) or (not value and not allow_empty):
        raise _fail(name, value, expected)
    try:
        return tuple(positive_int(name, v, high) for v in value)
    except ConfigError:
        raise _fail(name, value, expected) from None


def int_pair(name: str, value: Any, low: int = 0, high: int | None = None) -> tuple[int, int]:
    """A pair of integers in ``[low, high]``, e.g. rational degrees ``(5, 4)``; floats such as 2.7 and strings such as
    ``'54'`` are errors (no rounding, no splitting into digits)."""
    expected = f"a pair of integers >= {low}" + (f" and <= {high}" if high is not None else "")
    if not _sequence(value) or len(value) != 2:
        raise _fail(name, value, expected)
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | str) or isinstance(v, str) and not v.strip().lstrip(
                "-").isdigit():
            raise _fail(name, value, expected)
        v = int(v)
        if v < low or (high is not None and v > high):
            raise _fail(name, value, expected)
        out.append(v)
    return out[0], out[1]


def float_pair(name: str, value: Any, increasing: bool = True) -> tuple[float, float]:
    """A pair of finite floats (``low < high`` when ``increasing``), e.g. ``x_range=(-3, 3)``; a bare number is an
    error."""
    expected = "a pair of finite numbers (low, high) with low < high" if increasing else "a pair of finite numbers"
    if not _sequence(value) or len(value) != 2:
        raise _fail(name, value, expected)
    try:
        a, b = (finite_float(name, v) for v in value)
    except ConfigError:
        raise _fail(name, value, expected) from None
    if increasing and not a < b:
        raise _fail(name, value, expected)
    return a, b


def optional(validator, name: str, value: Any, *args, **kwargs) -> Any:
    """``None`` passes through; anything else goes through ``validator(name, value, *args, **kwargs)``."""
    return None if value is None else validator(name, value, *args, **kwargs)


def mapping(name: str, value: Any) -> Mapping:
    """A mapping (dict or DictConfig)."""
    if isinstance(value, Mapping) or type(value).__name__ == "DictConfig":
        return value
    raise _fail(name, value, "a mapping")


__all__ += ["MAX_BINS", "callable_or_none", "integer", "module_selector", "probe_schedule"]

MAX_BINS = 100_000  # upper bound on histogram bins: counts are allocated per module before any data is seen


def integer(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An integer in ``[low, high]`` (either bound optional), e.g. a seed, a dimension or ``points >= 2``."""
    expected = "an integer" + _range_text(low, high, False, False)
    out = _to_int(name, value, expected)
    if (low is not None and out < low) or (high is not None and out > high):
        raise _fail(name, value, expected)
    return out


def callable_or_none(name: str, value: Any) -> Any:
    """``None`` or a callable (a user function such as ``loss_fn`` / ``logits_fn``)."""
    if value is None or callable(value):
        return value
    raise _fail(name, value, "a callable or None")


def module_selector(name: str, value: Any) -> Any:
    """A module selector (:mod:`lit_act.selection`): ``None``, one preset or glob string (never split into
    characters), a list of strings, a module type or tuple of types, a ``{name: module}`` mapping or a predicate
    ``(name, module) -> bool``; Hydra's ListConfig / DictConfig become a list / dict."""
    if value is None or isinstance(value, str | type | Mapping) or callable(value):
        return value
    if type(value).__name__ == "DictConfig":
        return dict(value)
    if _sequence(value) and value and (all(isinstance(s, str) and s for s in value)
                                       or all(isinstance(t, type) for t in value)):
        return list(value) if _is_listconfig(value) else value
    raise _fail(name, value, "a preset or glob string, a list of strings, a module type or tuple of types, a "
                             "{name: module} mapping, or a predicate (name, module) -> bool")


def probe_schedule(name: str, value: Any, keywords: Sequence[str] = ("epoch",)) -> str | int | None:
    """``None``, one of ``keywords`` (e.g. ``"epoch"``, ``"auto"``) or a positive number of steps (digit strings
    converted, booleans rejected)."""
    if value is None or (isinstance(value, str) and value in keywords):
        return value
    expected = f"None, {', '.join(repr(k) for k in keywords)} or a positive number of steps"
    try:
        return positive_int(name, value)
    except ConfigError:
        raise _fail(name, value, expected) from None
