"""Hard limits on a session (actions, cost, duration, per-tool timeouts), the tool rules,
and the budget ledger that enforces them.

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
import time
import types
import weakref
from collections.abc import Callable, Collection, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal

import attrs

from ._decision import Decision, ToolCall
from ._plane import Plane
from ._validate import count, non_negative, number

if TYPE_CHECKING:
    import asyncio

    from ._plane import PlaneHost
    from ._report import InterruptRequest

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


#: (code, reason, owner ledger) of a refused reservation.
Refusal = tuple[str, str, "Ledger"]
#: Where a ledger hands a crossed soft threshold: the acting session's guard, with the
#: owning level's ``on_limit_warning`` callback.
WarningSink = Callable[["LimitWarning", "Callable[[LimitWarning], None] | None"], None]


class Ledger(Plane):
    """One session's budget: counts, reservations, deadline; part of a tree.

    Loop-thread only (the guard counts exactly on the loop thread). Cheap on the hot
    path: a few comparisons per level of the tree. While its timers run it is a plane of
    its session: the interrupt cancels them, so a deadline cannot fire into a session
    that is already stopping.
    """

    __slots__ = (
        "__weakref__",
        "_a_mark",
        "_c_mark",
        "_chain",
        "_clock",
        "_deadline_fired",
        "_has_deadline",
        "_timers",
        "_warn_actions",
        "_warn_cost",
        "_warned",
        "actions",
        "deadline",
        "default_timeout",
        "limits",
        "on_warning",
        "parent",
        "report_warning",
        "reserved",
        "session",
        "single",
        "spent",
        "timed",
        "timeouts",
    )

    def __init__(
        self,
        session: PlaneHost,
        limits: Limits,
        parent: Ledger | None,
        *,
        clock: Clock = time.monotonic,
        on_warning: Callable[[LimitWarning], None] | None = None,
        report_warning: WarningSink,
    ) -> None:
        self.session = session
        #: Audits a soft threshold crossed by a call of *session* (at any level above).
        self.report_warning = report_warning
        self.limits = limits
        self.parent = parent
        self._clock = clock
        self.on_warning = on_warning
        self.actions = 0
        self.spent = 0.0
        self.reserved = 0.0
        #: monotonic deadline (set when the session's block is entered).
        self.deadline: float | None = None
        self._deadline_fired = False
        self._timers: list[asyncio.TimerHandle] = []
        self._warned: set[str] = set()
        w = limits.warn_at
        self._warn_actions = (
            math.inf if w is None or limits.max_actions is None else w * limits.max_actions
        )
        self._warn_cost = math.inf if w is None or limits.max_cost is None else w * limits.max_cost
        self._chain: tuple[Ledger, ...] = (self, *(parent._chain if parent else ()))
        self.single = parent is None
        self._has_deadline = False
        self._a_mark = self._c_mark = math.inf
        self._update_marks()
        # The tightest timeout along the tree wins.
        timeouts: dict[str, float] = {}
        default: float | None = None
        for led in reversed(self._chain):
            lim = led.limits
            if lim.tool_timeout is not None:
                default = lim.tool_timeout if default is None else min(default, lim.tool_timeout)
            for tool, t in lim.tool_timeouts.items():
                timeouts[tool] = min(t, timeouts.get(tool, t))
        self.timeouts = timeouts
        self.default_timeout = default
        #: whether any call of this session has a timeout (the hot path tests only this).
        self.timed = bool(timeouts) or default is not None

    # ---------------------------------------------------------------- timers

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the duration clock (the session's block was entered)."""
        self._has_deadline = any(led.limits.max_duration is not None for led in self._chain)
        max_duration = self.limits.max_duration
        if max_duration is None:
            return
        now = self._clock()
        self.deadline = now + max_duration
        ref = weakref.ref(self)
        # loop.call_at runs on the loop's monotonic clock; the timer is relative, so an
        # injected clock only moves the guard's check, never the loop's.
        self._timers.append(loop.call_at(loop.time() + max_duration, _fire_deadline, ref))
        w = self.limits.warn_at
        if w is not None:
            self._timers.append(loop.call_at(loop.time() + w * max_duration, _fire_warn, ref))

    @property
    def has_timers(self) -> bool:
        """Whether a deadline or warning timer is armed."""
        return bool(self._timers)

    def deliver(self, request: InterruptRequest) -> None:
        """The session is interrupted: its timers must not fire any more."""
        self.stop_timers()

    def stop_timers(self) -> None:
        """Cancel the pending timers (the session stopped)."""
        for t in self._timers:
            t.cancel()
        self._timers.clear()

    def move_deadline(self, loop: asyncio.AbstractEventLoop, seconds: float | None) -> None:
        """Set the deadline *seconds* from now (``None``: none); a past one fires now."""
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        if seconds is None:
            self.deadline = None
            self._has_deadline = any(led.deadline is not None for led in self._chain[1:])
            return
        seconds = non_negative("seconds", seconds, inf_ok=True)
        self.deadline = self._clock() + seconds
        self._has_deadline = True
        self._timers.append(loop.call_at(loop.time() + seconds, _fire_deadline, weakref.ref(self)))

    def fire_deadline(self) -> bool:
        """Interrupt the session for its deadline, exactly once; whether it did."""
        if self._deadline_fired:
            return False
        self._deadline_fired = True
        session = self.session
        # A session already stopping still records its deadline (as a later reason) if
        # it comes before the stop's fan-out cancels this timer: several triggers in
        # the same instant are all kept. An ended session has nothing left to stop.
        if session.state in ("finished", "failed", "terminated") or session.handle.done():
            return False
        limit = self.limits.max_duration
        session.interrupt(
            f"timeout: max_duration={limit}s exceeded"
            if limit is not None
            else "timeout: deadline passed",
            trigger="deadline",
        )
        return True

    # ---------------------------------------------------------------- budget

    def reserve(self, cost: float) -> Refusal | None:
        """Count one action and reserve *cost* on every level, or refuse (and count
        nothing) if any level's deadline, action or cost limit would be crossed.

        Returns the first refusal in the fixed order: deadlines, then per level from
        this session up, ``max_actions`` then ``max_cost``.
        """
        if self.single:
            # Fast path of a root ledger: one test per limit; anything near a limit or
            # a soft threshold (the marks) takes the exact path below.
            if self._has_deadline and self._clock() >= self.deadline:  # type: ignore[operator]
                return self.refusals(cost)[0]
            a = self.actions + 1
            if a <= self._a_mark and self.spent + self.reserved + cost < self._c_mark:
                self.actions = a
                self.reserved += cost
                return None
        return self._reserve_exact(cost)

    def _reserve_exact(self, cost: float) -> Refusal | None:
        chain = self._chain
        if self._has_deadline:
            now = self._clock()
            for led in chain:
                if led.deadline is not None and now >= led.deadline:
                    return self.refusals(cost)[0]
        for led in chain:
            lim = led.limits
            if (lim.max_actions is not None and led.actions >= lim.max_actions) or (
                lim.max_cost is not None and led.spent + led.reserved + cost > lim.max_cost
            ):
                return self.refusals(cost)[0]
        for led in chain:
            led.actions += 1
            led.reserved += cost
            if led.actions >= led._warn_actions:
                led._warn("max_actions", led.actions, self)
            if led.spent + led.reserved >= led._warn_cost:
                led._warn("max_cost", led.spent + led.reserved, self)
        return None

    def refusals(self, cost: float) -> list[Refusal]:
        """Every limit a call of *cost* would cross now, in the fixed order (slow path)."""
        out: list[Refusal] = []
        now = self._clock() if self._has_deadline else None
        for led in self._chain:
            if now is not None and led.deadline is not None and now >= led.deadline:
                out.append(
                    (
                        "deadline",
                        f"timeout: max_duration={led.limits.max_duration}s of session "
                        f"{led.session.id} is up",
                        led,
                    )
                )
        for led in self._chain:
            lim = led.limits
            if lim.max_actions is not None and led.actions >= lim.max_actions:
                out.append(
                    (
                        "budget",
                        f"budget: max_actions={lim.max_actions} exhausted in session "
                        f"{led.session.id} (action {led.actions + 1} refused)",
                        led,
                    )
                )
            if lim.max_cost is not None and led.spent + led.reserved + cost > lim.max_cost:
                out.append(
                    (
                        "budget",
                        f"budget: max_cost={lim.max_cost:g} would be exceeded in session "
                        f"{led.session.id}: spent {led.spent:g} + reserved {led.reserved:g}"
                        f" + this call {cost:g}",
                        led,
                    )
                )
        return out

    def unreserve(self, cost: float) -> None:
        """Undo a ``reserve`` whose call will not run after all."""
        for led in self._chain:
            led.actions -= 1
            led.reserved = max(0.0, led.reserved - cost)

    def spend(self, estimate: float, actual: float) -> Refusal | None:
        """Release a reservation of *estimate* and spend *actual*; return the refusal of
        the first level now over its ``max_cost`` (the tool overran its estimate)."""
        if self.single and actual == estimate:
            # Spend + reserved is unchanged: no limit or threshold can be crossed.
            self.reserved -= estimate
            self.spent += actual
            return None
        over: Refusal | None = None
        for led in self._chain:
            led.reserved = max(0.0, led.reserved - estimate)
            led.spent += actual
            max_cost = led.limits.max_cost
            if over is None and max_cost is not None and led.spent > max_cost:
                over = (
                    "budget",
                    f"budget: max_cost={max_cost:g} exceeded in session {led.session.id}: "
                    f"spent {led.spent:g} (a call reported {actual:g}, estimated {estimate:g})",
                    led,
                )
            if led.spent + led.reserved >= led._warn_cost:
                led._warn("max_cost", led.spent + led.reserved, self)
        return over

    def charge(self, amount: float) -> Refusal | None:
        """Spend *amount* not reserved by any call (``session.charge``)."""
        return self.spend(0.0, amount)

    def _warn(self, limit: LimitName, used: float, acting: Ledger) -> None:
        if limit in self._warned:
            return
        self._warned.add(limit)
        self._update_marks()
        maximum = getattr(self.limits, limit)
        warning = LimitWarning(
            acting.session.id, self.session.id, limit, float(used), float(maximum)
        )
        acting.report_warning(warning, self.on_warning)

    def _update_marks(self) -> None:
        """Recompute the fast path's marks: a new action count above ``_a_mark`` or a
        committed cost at or above ``_c_mark`` needs the exact path (a limit, or a soft
        threshold not yet warned of)."""
        lim = self.limits
        a_mark = math.inf if lim.max_actions is None else float(lim.max_actions)
        if "max_actions" not in self._warned and self._warn_actions != math.inf:
            a_mark = min(a_mark, math.ceil(self._warn_actions) - 1.0)
        c_mark = math.inf if lim.max_cost is None else math.nextafter(lim.max_cost, math.inf)
        if "max_cost" not in self._warned and self._warn_cost != math.inf:
            c_mark = min(c_mark, self._warn_cost)
        self._a_mark = a_mark
        self._c_mark = c_mark

    def statistics(self) -> dict[str, Any]:
        """A JSON-ready snapshot of this level."""
        return {
            "actions": self.actions,
            "spent": self.spent,
            "reserved": self.reserved,
            "deadline_in": None if self.deadline is None else self.deadline - self._clock(),
            "limits": self.limits.to_dict(),
        }


def _fire_deadline(ref: weakref.ref[Ledger]) -> None:
    ledger = ref()
    if ledger is not None:
        ledger.fire_deadline()


def _fire_warn(ref: weakref.ref[Ledger]) -> None:
    ledger = ref()
    if ledger is None:
        return
    session = ledger.session
    limit = ledger.limits.max_duration
    if session.request is not None or session.state != "running" or limit is None:
        return
    ledger._warn("max_duration", (ledger.limits.warn_at or 0.0) * limit, ledger)
