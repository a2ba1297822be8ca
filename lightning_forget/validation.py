"""Argument checks shared by every public class: one message format, one exception rule.

Rule: a value of the wrong *type* raises :class:`TypeError`; a value of the right type but a
wrong *value* (out of range, NaN, not one of the choices) raises :class:`ValueError`. Every
message names the argument, shows the value, and says how to fix it::

    `buffer_size` must be an int >= 1, got 0 (int). Fix: pass the number of samples to keep, e.g. buffer_size=500.

``bool`` is not accepted where an ``int`` or ``float`` is expected (``True`` is an ``int`` in
Python, but ``buffer_size=True`` is a mistake). Each check returns the value it accepted
(converted to ``float`` by :func:`check_float`), so ``__init__`` can write
``self.alpha = check_float("alpha", alpha, min=0)``.

No Lightning in this module.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Sequence
from typing import Any, Optional, TypeVar

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_int_sequence",
    "check_str",
    "check_type",
    "message",
]

T = TypeVar("T")


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def message(name: str, requirement: str, value: Any, fix: Optional[str] = None) -> str:
    """The one message format: ```name` must be <requirement>, got <value> (<type>). Fix: <fix>``."""
    text = f"`{name}` must be {requirement}, got {_show(value)}."
    if fix:
        text += f" Fix: {fix.rstrip('.')}."
    return text


def _range_text(min: Any, max: Any, min_inclusive: bool, max_inclusive: bool) -> str:
    parts = []
    if min is not None:
        parts.append(f"{'>=' if min_inclusive else '>'} {min}")
    if max is not None:
        parts.append(f"{'<=' if max_inclusive else '<'} {max}")
    return " and ".join(parts)


def _check_range(
    name: str, value: Any, kind: str, min: Any, max: Any, min_inclusive: bool, max_inclusive: bool, fix: Optional[str]
) -> None:
    low = min is not None and (value < min if min_inclusive else value <= min)
    high = max is not None and (value > max if max_inclusive else value >= max)
    if low or high:
        raise ValueError(message(name, f"{kind} {_range_text(min, max, min_inclusive, max_inclusive)}", value, fix))


def check_int(
    name: str,
    value: Any,
    *,
    min: Optional[int] = None,
    max: Optional[int] = None,
    allow_none: bool = False,
    fix: Optional[str] = None,
) -> Optional[int]:
    """``value`` as an ``int`` within ``[min, max]`` (``None`` passes when ``allow_none``).

    Raises:
        TypeError: not an integer (``bool`` and ``float`` included, even ``2.0``).
        ValueError: outside the bounds.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "an int" + (" or None" if allow_none else "")
        bounds = _range_text(min, max, True, True)
        raise TypeError(message(name, f"{kind}{' ' + bounds if bounds else ''}", value, fix))
    value = int(value)
    _check_range(name, value, "an int", min, max, True, True, fix)
    return value


def check_float(
    name: str,
    value: Any,
    *,
    min: Optional[float] = None,
    max: Optional[float] = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    allow_none: bool = False,
    finite: bool = True,
    fix: Optional[str] = None,
) -> Optional[float]:
    """``value`` (an int or float, not a bool) as a finite ``float`` within the bounds.

    Raises:
        TypeError: not a real number.
        ValueError: NaN, infinite (unless ``finite=False``), or outside the bounds.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a float" + (" or None" if allow_none else "")
        raise TypeError(message(name, kind, value, fix))
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        bounds = _range_text(min, max, min_inclusive, max_inclusive)
        raise ValueError(message(name, f"a finite float{' ' + bounds if bounds else ''}", value, fix))
    _check_range(name, value, "a float", min, max, min_inclusive, max_inclusive, fix)
    return value


def check_bool(name: str, value: Any, *, fix: Optional[str] = None) -> bool:
    """``value`` if it is a ``bool`` (``0``/``1`` are refused: say ``False``/``True``)."""
    if not isinstance(value, bool):
        raise TypeError(message(name, "a bool (True or False)", value, fix))
    return value


def check_str(
    name: str, value: Any, *, allow_empty: bool = False, allow_none: bool = False, fix: Optional[str] = None
) -> Optional[str]:
    """``value`` if it is a ``str`` (non-empty unless ``allow_empty``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise TypeError(message(name, "a str" + (" or None" if allow_none else ""), value, fix))
    if not value and not allow_empty:
        raise ValueError(message(name, "a non-empty str", value, fix))
    return value


def check_choice(name: str, value: Any, choices: Collection[T], *, fix: Optional[str] = None) -> T:
    """``value`` if it is one of ``choices`` (``ValueError`` listing them otherwise)."""
    try:
        ok = value in choices
    except TypeError:  # unhashable value against a set
        ok = False
    if not ok:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(message(name, f"one of {listed}", value, fix))
    return value


def check_type(
    name: str,
    value: Any,
    types: type | tuple[type, ...],
    *,
    allow_none: bool = False,
    fix: Optional[str] = None,
) -> Any:
    """``value`` if it is an instance of ``types`` (``TypeError`` naming them otherwise)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, types):
        names = [t.__name__ for t in (types if isinstance(types, tuple) else (types,))]
        kind = " or ".join(names) + (" or None" if allow_none else "")
        raise TypeError(message(name, f"a {kind}", value, fix))
    return value


def check_int_sequence(
    name: str,
    value: Any,
    *,
    min: Optional[int] = None,
    allow_empty: bool = False,
    allow_none: bool = False,
    fix: Optional[str] = None,
) -> Optional[list[int]]:
    """``value`` as a list of ints, each ``>= min`` (e.g. layer sizes, input shapes)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(message(name, "a list of ints", value, fix))
    if not value and not allow_empty:
        raise ValueError(message(name, "a non-empty list of ints", value, fix))
    out = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(message(name, f"a list of ints (item {i} is not)", value, fix))
        if min is not None and item < min:
            raise ValueError(message(name, f"a list of ints >= {min} (item {i} is {item})", value, fix))
        out.append(int(item))
    return out
