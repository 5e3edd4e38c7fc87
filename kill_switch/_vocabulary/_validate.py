"""The one copy of the number checks every public parameter goes through.

Each check takes the parameter's *name* and the *value* given, rejects what is not a
number of the right kind (``bool`` is never a number here, though Python says it is an
``int``), NaN, infinity (unless the caller gives it a meaning) and values below the
bound, and returns the value normalised. The messages share one style, so a user sees
the same sentence for the same mistake whichever class took it::

    TypeError:  stop_timeout must be a number of seconds, not str
    ValueError: stop_timeout must be a finite number of seconds > 0, got nan
    ValueError: max_batch must be an int >= 1, got 0

:func:`attrs_check` adapts any of them to an ``attrs`` field validator (wrap it in
``attrs.validators.optional`` where ``None`` is allowed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import attrs


def number(
    name: str,
    value: object,
    *,
    unit: str = "",
    zero_ok: bool = False,
    inf_ok: bool = False,
) -> float:
    """*value* as a float: a number (not ``bool``), not NaN, ``> 0`` (``>= 0`` with
    *zero_ok*), finite unless *inf_ok*. *unit* names what it counts ("seconds").

    Raises:
        TypeError: *value* is not an ``int`` or ``float`` (or is a ``bool``).
        ValueError: NaN, infinite (without *inf_ok*), or below the bound.
    """
    of = f" of {unit}" if unit else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number{of}, not {type(value).__name__}")
    if (
        math.isnan(value)
        or (math.isinf(value) and not inf_ok)
        or value < 0
        or (value == 0 and not zero_ok)
    ):
        finite = "" if inf_ok else "finite "
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a {finite}number{of} {bound}, got {value!r}")
    return float(value)


def seconds(name: str, value: object, *, zero_ok: bool = False) -> float:
    """A finite duration in seconds, ``> 0`` (``>= 0`` with *zero_ok*).

    Raises:
        TypeError, ValueError: as :func:`number`.
    """
    return number(name, value, unit="seconds", zero_ok=zero_ok)


def optional_seconds(name: str, value: object, *, zero_ok: bool = False) -> float | None:
    """``None``, or a duration as :func:`seconds`."""
    return None if value is None else seconds(name, value, zero_ok=zero_ok)


def positive(name: str, value: object) -> float:
    """A finite number ``> 0`` (a rate, a window, a cost cap)."""
    return number(name, value)


def non_negative(name: str, value: object, *, inf_ok: bool = False) -> float:
    """A number ``>= 0`` (a cost), finite unless *inf_ok*."""
    return number(name, value, zero_ok=True, inf_ok=inf_ok)


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def positive_int(name: str, value: object) -> int:
    """An ``int`` (not ``bool``) ``>= 1``.

    Raises:
        TypeError: not an ``int``, or a ``bool``.
        ValueError: below 1.
    """
    return _int(name, value, 1)


def count(name: str, value: object) -> int:
    """An ``int`` (not ``bool``) ``>= 0``.

    Raises:
        TypeError: not an ``int``, or a ``bool``.
        ValueError: negative.
    """
    return _int(name, value, 0)


_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def attrs_check(check: Callable[..., object], **options: Any) -> _Validator:
    """An ``attrs`` field validator running *check* (one of the above) on the field,
    named after it: ``attrs.field(validator=attrs_check(seconds, zero_ok=True))``."""

    def validate(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        check(attr.name, value, **options)

    validate.__qualname__ = f"attrs_check({check.__name__})"
    return validate
