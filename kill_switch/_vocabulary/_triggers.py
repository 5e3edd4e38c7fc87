"""Who or what asked for an interrupt, and the bounded free-text reason it gave."""

from __future__ import annotations

from typing import Final, Literal, get_args

Trigger = Literal[
    "operator",
    "supervisor",
    "budget",
    "deadline",
    "sentinel",
    "parent",
    "shutdown",
    "watchdog",
    "fleet_lost",
]

TRIGGERS: Final[frozenset[str]] = frozenset(get_args(Trigger))

#: Longest reason kept, in characters. Longer reasons are cut, never refused: a kill must
#: not be lost because its explanation was verbose.
MAX_REASON: Final = 1000

#: Longest operator identity kept, in characters.
MAX_OPERATOR: Final = 200


def check_trigger(trigger: object) -> Trigger:
    """Return *trigger* if it names a known trigger.

    Raises:
        TypeError: *trigger* is not a string.
        ValueError: *trigger* is not one of ``TRIGGERS``.
    """
    if not isinstance(trigger, str):
        raise TypeError(f"trigger must be a str, not {type(trigger).__name__}")
    if trigger not in TRIGGERS:
        raise ValueError(f"unknown trigger {trigger!r}; expected one of {sorted(TRIGGERS)}")
    return trigger  # type: ignore[return-value]  # narrowed by the membership test above


def bound_text(text: object, what: str, limit: int) -> str:
    """Return *text* cut to *limit* characters, marking the cut.

    Raises:
        TypeError: *text* is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    return f"{text[:limit]}…[{cut} more characters cut]"


def bound_reason(reason: object) -> str:
    """Return *reason* bounded to ``MAX_REASON`` characters.

    Raises:
        TypeError: *reason* is not a string.
    """
    return bound_text(reason, "reason", MAX_REASON)


def bound_operator(operator: object) -> str | None:
    """Return *operator* (or ``None``) bounded to ``MAX_OPERATOR`` characters.

    Raises:
        TypeError: *operator* is neither a string nor ``None``.
    """
    if operator is None:
        return None
    return bound_text(operator, "operator", MAX_OPERATOR)
