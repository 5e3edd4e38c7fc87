"""Hard limits on a session (actions, cost, duration, per-tool timeouts) and the tool
rules: the values; ``_ledger`` enforces them.

Boundary rule: a limit of *N* allows exactly *N*. With ``max_actions=500`` the 500th
action is allowed and the 501st is blocked; with ``max_cost=100.0`` the spend may reach
exactly 100.0 and a call that would take it past is blocked; with ``max_duration=60`` the
deadline is ``start + 60`` on the monotonic clock and a call at or after it is blocked.
``0`` is a valid limit (nothing allowed); ``None`` (or ``math.inf``) means unlimited.

The ledger reserves a call's estimated cost *before* the call (so calls running in
parallel can never commit more than the budget together) and reconciles it *after*
with the actual cost the tool reported through :func:`report_cost` (the estimate stands
if it reported none). A child session's ledger spends from every ancestor's too, so a
limit cannot be bypassed by nesting.
"""

from __future__ import annotations

import fnmatch
import math
import types
from collections.abc import Callable, Collection, Mapping
from contextvars import ContextVar
from typing import Any, Literal

import attrs

from ._decision import Decision, ToolCall
from ._validate import count, non_negative, number

Clock = Callable[[], float]
LimitName = Literal["max_actions", "max_cost", "max_duration"]


# ------------------------------------------------------------------ validation


def _opt_count(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return None  # inf is the explicit spelling of "unlimited"
    return count("max_actions", value)


def _amount(name: str, value: object) -> float | None:
    if value is None:
        return None
    v = non_negative(name, value, inf_ok=True)
    return None if math.isinf(v) else v  # inf is the explicit spelling of "unlimited"


def _seconds(name: str, value: object) -> float | None:
    if value is None:
        return None
    v = number(name, value, unit="seconds", inf_ok=True)
    return None if math.isinf(v) else v  # inf is the explicit spelling of "no timeout"


def _max_cost(value: object) -> float | None:
    return _amount("max_cost", value)


def _max_duration(value: object) -> float | None:
    return _seconds("max_duration", value)


def _tool_timeout(value: object) -> float | None:
    return _seconds("tool_timeout", value)


def _timeouts(value: object) -> Mapping[str, float]:
    if not isinstance(value, Mapping):
        raise TypeError(f"tool_timeouts must be a mapping, not {type(value).__name__}")
    out: dict[str, float] = {}
    for tool, seconds in value.items():
        if not isinstance(tool, str) or not tool:
            raise TypeError(f"tool_timeouts keys must be non-empty str, got {tool!r}")
        checked = _seconds(f"tool_timeouts[{tool!r}]", seconds)
        if checked is None:
            raise ValueError(f"tool_timeouts[{tool!r}] must be finite; omit the tool instead")
        out[tool] = checked
    return types.MappingProxyType(out)


def _warn_at(value: object) -> float | None:
    if value is None:
        return None
    v = number("warn_at", value)
    if not v < 1:
        raise ValueError(f"warn_at must be a fraction in (0, 1) or None, got {value!r}")
    return float(v)


# ------------------------------------------------------------------ Limits


@attrs.frozen
class Limits:
    """Hard limits on one session (and, through the budget tree, on its children).

    Attributes:
        max_actions: tool calls the guard may allow (``None``: unlimited).
        max_cost: total cost the session may commit, in the caller's unit.
        max_duration: seconds on the monotonic clock from entering the session's block;
            when they are up the session is interrupted (trigger ``deadline``).
        tool_timeout: seconds any one tool call may take; past it that call alone is
            cancelled and raises ``TimeoutError`` (the session goes on).
        tool_timeouts: per-tool override of ``tool_timeout``, by tool name.
        warn_at: fraction of ``max_actions`` / ``max_cost`` / ``max_duration`` at which
            a ``limit_warning`` audit event and the session's ``on_limit_warning``
            callback fire, once per limit (``None``: no soft threshold).

    Raises:
        TypeError: a value of the wrong type (``bool`` is not a number here).
        ValueError: a negative or NaN value, a zero duration, ``warn_at`` outside (0, 1).
    """

    max_actions: int | None = attrs.field(default=None, converter=_opt_count)
    max_cost: float | None = attrs.field(default=None, converter=_max_cost)
    max_duration: float | None = attrs.field(default=None, converter=_max_duration)
    tool_timeout: float | None = attrs.field(default=None, converter=_tool_timeout)
    tool_timeouts: Mapping[str, float] = attrs.field(factory=dict, converter=_timeouts, hash=False)
    warn_at: float | None = attrs.field(default=0.8, converter=_warn_at)

    def timeout_for(self, tool: str) -> float | None:
        """The timeout of one call of *tool*, or ``None``."""
        return self.tool_timeouts.get(tool, self.tool_timeout)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (for the audit)."""
        d = attrs.asdict(self)
        d["tool_timeouts"] = dict(self.tool_timeouts)
        return d


@attrs.frozen
class LimitWarning:
    """A soft threshold was crossed: what the ``on_limit_warning`` callback receives."""

    session_id: str
    #: the session whose limit it is (an ancestor, for a limit inherited through the tree).
    owner_id: str
    limit: LimitName
    used: float
    maximum: float


# ------------------------------------------------------------------ tool rules


def _names(value: object) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Collection):
        raise TypeError(f"tool lists must be collections of str, not {type(value).__name__}")
    for v in value:
        if not isinstance(v, str):
            raise TypeError(f"tool names must be str, got {v!r}")
    return frozenset(value)


def _split(names: frozenset[str] | None) -> tuple[frozenset[str], tuple[str, ...]]:
    if not names:
        return frozenset(), ()
    globs = tuple(sorted(n for n in names if any(c in n for c in "*?[")))
    return frozenset(names.difference(globs)), globs


@attrs.frozen
class ToolRules:
    """Allow/deny lists and a predicate for ``runtime.session(tool_policy=...)``.

    ``deny`` wins over ``allow``; ``allow=None`` allows every tool not denied. Names may
    be ``fnmatch`` patterns (``"shell.*"``). ``predicate(call)`` gets the ``ToolCall``
    (tool, args, kwargs, cost) and returns whether the call may go ahead; if it raises,
    the call is blocked (``policy_error``). A denied call is blocked with code
    ``denied``, audited, and fed to the session's sentinel.
    """

    allow: frozenset[str] | None = attrs.field(default=None, converter=_names)
    deny: frozenset[str] | None = attrs.field(default=None, converter=_names)
    predicate: Callable[[ToolCall], bool] | None = None
    _allow_split: tuple[frozenset[str], tuple[str, ...]] = attrs.field(
        init=False, eq=False, repr=False
    )
    _deny_split: tuple[frozenset[str], tuple[str, ...]] = attrs.field(
        init=False, eq=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        if self.predicate is not None and not callable(self.predicate):
            raise TypeError("predicate must be callable")
        object.__setattr__(self, "_allow_split", _split(self.allow))
        object.__setattr__(self, "_deny_split", _split(self.deny))

    def __call__(self, call: ToolCall) -> Decision | None:
        """The verdict on *call*: ``None`` to allow it, else a blocking ``Decision``."""
        tool = call.tool
        exact, globs = self._deny_split
        if tool in exact or any(fnmatch.fnmatchcase(tool, g) for g in globs):
            return Decision.block(f"tool {tool!r} is on the deny list", "denied")
        if self.allow is not None:
            exact, globs = self._allow_split
            if tool not in exact and not any(fnmatch.fnmatchcase(tool, g) for g in globs):
                return Decision.block(f"tool {tool!r} is not on the allow list", "denied")
        if self.predicate is not None and not self.predicate(call):
            return Decision.block(f"tool {tool!r} refused by the predicate", "denied")
        return None


# ------------------------------------------------------------------ report_cost


#: The actual cost of the metered call running in this context, as the tool reported it
#: (a one-element list: cheaper to make per call than an object).
_current_cost: ContextVar[list[float | None] | None] = ContextVar(
    "kill_switch_call_cost", default=None
)


def report_cost(actual: float) -> bool:
    """Report the actual cost of the tool call running now (replaces its estimate).

    Call it inside a tool run by ``session.call(..., cost=estimate)`` (or
    ``run_sync``) of a session with limits; the ledger reconciles the reservation
    with *actual* when the call ends. Reporting twice keeps the last value. Returns
    whether there was a metered call to report to (``False``: the session has no
    limits, or no call is running; nothing is recorded).

    Raises:
        TypeError / ValueError: *actual* is not a finite number >= 0.
    """
    value = non_negative("actual", actual)
    cell = _current_cost.get()
    if cell is None:
        return False
    cell[0] = value
    return True


# ------------------------------------------------------------------ the ledger
