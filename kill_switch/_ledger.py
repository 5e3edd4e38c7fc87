"""The budget ledger: what enforces a session's ``Limits``.

The ledger reserves a call's estimated cost *before* the call (so calls running in
parallel can never commit more than the budget together) and reconciles it *after*
with the actual cost the tool reported through ``report_cost`` (the estimate stands
if it reported none). A child session's ledger spends from every ancestor's too, so a
limit cannot be bypassed by nesting. While its timers run it is a plane of its session.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._vocabulary._limits import Clock, LimitName, Limits, LimitWarning
from ._vocabulary._plane import Plane
from ._vocabulary._validate import non_negative

if TYPE_CHECKING:
    import asyncio

    from ._vocabulary._plane import PlaneHost
    from ._vocabulary._report import InterruptRequest


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
