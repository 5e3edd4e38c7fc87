"""The guard before every tool call, and the meter around the calls it admits.

``Guard.admit`` is the one decision a tool call passes: terminated, not running, the tool
policy, the limits (deadline, actions, cost; this session, then each ancestor), the
sentinel. ``Guard.meter`` is what runs an admitted call when there is anything to
account for (``None`` otherwise: a plain await).

Hot path: ``admit`` reads the session's request list (shared, appended by
``interrupt()`` from any thread) and a ``running`` flag the session keeps, instead of
asking the session through properties: both are on every guarded call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from ._ledger import Ledger
from ._vocabulary._audit_event import LIMIT_EXCEEDED, LIMIT_WARNING, TOOL_BLOCKED
from ._vocabulary._decision import Decision, ToolCall
from ._vocabulary._exceptions import LimitExceeded, ToolBlocked
from ._vocabulary._limits import Limits, LimitWarning, _current_cost
from ._vocabulary._validate import non_negative

if TYPE_CHECKING:
    from ._sentinel import Sentinel, SessionWatch
    from ._vocabulary._plane import PlaneHost
    from ._vocabulary._report import InterruptRequest

T = TypeVar("T")

ToolPolicy = Callable[[ToolCall], "Decision | bool | None"]
Meter = Callable[..., Awaitable[Any]]


def check_cost(cost: object) -> float:
    """A call's or a charge's cost: a finite number >= 0."""
    return non_negative("cost", cost)


class Guard:
    """The guard and meter of one session (loop thread, except the terminated check)."""

    __slots__ = (
        "actions",
        "blocked_terminal_audited",
        "cost",
        "host",
        "ledger",
        "meter",
        "requests",
        "running",
        "tool_policy",
        "watch",
    )

    def __init__(
        self,
        host: PlaneHost,
        requests: list[InterruptRequest],
        *,
        tool_policy: ToolPolicy | None,
        limits: Limits | None,
        parent: Guard | None,
        sentinel: Sentinel | None,
        on_limit_warning: Callable[[LimitWarning], None] | None,
        clock: Callable[[], float],
    ) -> None:
        self.host = host
        #: The session's request list itself (never copied): non-empty once interrupted.
        self.requests = requests
        #: Kept by the session: its state is ``running``.
        self.running = False
        self.tool_policy = tool_policy
        self.actions = 0
        self.cost = 0.0
        self.blocked_terminal_audited = False
        # Limits and sentinel: None unless configured, so that an unlimited, unwatched
        # session pays one attribute test per call and nothing more.
        parent_ledger = parent.ledger if parent is not None else None
        self.ledger: Ledger | None = None
        if limits is not None or parent_ledger is not None:
            self.ledger = Ledger(
                host,
                limits if limits is not None else Limits(warn_at=None),
                parent_ledger,
                clock=clock,
                on_warning=on_limit_warning,
                report_warning=self.limit_warning,
            )
        self.watch: SessionWatch | None = sentinel.watch(host) if sentinel is not None else None
        self.meter: Meter | None = self._pick_meter()

    # ---------------------------------------------------------------- decide

    def terminal_decision(self) -> Decision:
        first = self.requests[0]
        return Decision.block(
            f"session interrupted ({first.trigger}): {first.reason}", "terminated"
        )

    def admit(
        self, tool: str, args: tuple[Any, ...], kwargs: dict[str, Any], cost: float
    ) -> Decision | None:
        """``None`` if the call may go ahead (and is counted), else why not."""
        if self.requests:
            return self.terminal_decision()
        if not self.running:
            if self.host.state == "created":
                return Decision.block("session has not started", "not_started")
            return Decision.block(f"session has ended ({self.host.state})", "finished")
        if self.tool_policy is not None:
            call = ToolCall(self.host.id, self.host.agent, tool, args, kwargs, cost)
            try:
                verdict = self.tool_policy(call)
            except Exception as exc:  # fail closed: a broken policy blocks, it never allows
                verdict = Decision.block(f"tool policy raised {exc!r}", "policy_error")
            if verdict is False:
                verdict = Decision.block("denied by tool policy", "denied")
            if isinstance(verdict, Decision) and not verdict.allowed:
                if self.watch is not None:
                    self.watch.on_denied(tool)
                return verdict
        if cost:
            cost = check_cost(cost)
        # Order of the automatic checks (the determinism rule when several fire on one
        # call): deadline, then budget (actions, cost; this session first, then each
        # ancestor), then the sentinel. The first to interrupt gives the primary reason.
        ledger = self.ledger
        if ledger is not None and ledger.reserve(cost) is not None:
            return self._over_limit(ledger, tool, args, kwargs, cost)
        watch = self.watch
        if watch is not None:
            watch.on_call(tool, args, kwargs, cost)
            if self.requests:
                if ledger is not None:
                    ledger.unreserve(cost)
                return self.terminal_decision()
        self.actions += 1
        if cost:
            self.cost += cost
        return None

    def unreserve(self, cost: float) -> None:
        """Undo an ``admit`` whose call will not run after all."""
        if self.ledger is not None:
            self.ledger.unreserve(cost)

    def blocked(self, decision: Decision, tool: str) -> ToolBlocked:
        """Audit a refused call (``terminated`` once) and return what to raise."""
        code = decision.code
        if code != "terminated" or not self.blocked_terminal_audited:
            if code == "terminated":
                self.blocked_terminal_audited = True
            self.host.record(
                TOOL_BLOCKED, reason=decision.reason, details={"tool": tool, "code": code}
            )
        if code == "budget" or code == "deadline":
            return LimitExceeded(decision, session_id=self.host.id, tool=tool)
        return ToolBlocked(decision, session_id=self.host.id, tool=tool)

    # ---------------------------------------------------------------- limits

    def _over_limit(
        self,
        ledger: Ledger,
        tool: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        cost: float,
    ) -> Decision:
        """A hard limit refused the call: interrupt for every limit crossed, in the
        fixed order (the first is the primary reason), and block the call."""
        refusals = ledger.refusals(cost)
        for code, reason, owner in refusals:
            self._interrupt_for_limit(code, reason, owner, tool)
        if self.watch is not None:
            # The attempt is part of the stream the sentinel watches (a later reason).
            self.watch.on_call(tool, args, kwargs, cost)
        code, reason, _ = refusals[0]
        return Decision.block(reason, code)

    def _interrupt_for_limit(self, code: str, reason: str, owner: Ledger, tool: str) -> None:
        trigger = "deadline" if code == "deadline" else "budget"
        host = self.host
        host.record(
            LIMIT_EXCEEDED,
            trigger=trigger,
            reason=reason,
            details={"tool": tool, "owner": owner.session.id, **owner.statistics()},
        )
        if owner.session is host:
            if code == "deadline":
                owner.fire_deadline()  # exactly once, shared with the loop timer
            else:
                host.interrupt(reason, trigger=trigger)
            return
        # A limit of an ancestor: this session first (so that its own reason is the
        # limit, not the cascade from the ancestor), then the ancestor, and with it
        # everything under it.
        host.interrupt(reason, trigger=trigger)
        if code == "deadline":
            owner.fire_deadline()
        else:
            owner.session.interrupt(reason, trigger=trigger)

    def _pick_meter(self) -> Meter | None:
        """What runs an admitted call: ``None`` (a plain await, nothing to account for),
        ``metered`` (limits) or ``watched`` (a sentinel that wants outcomes)."""
        if self.ledger is not None:
            return self.metered
        if self.watch is not None and self.watch.wants_outcome:
            return self.watched
        return None

    def start_limits(self) -> None:
        """The block is entered: arm the ledger's timers (a plane while they run)."""
        ledger = self.ledger
        if ledger is not None:
            ledger.start(self.host.loop)
            if ledger.has_timers:
                self.host.plane(Ledger, lambda: ledger)

    def limit_warning(
        self, warning: LimitWarning, callback: Callable[[LimitWarning], None] | None
    ) -> None:
        """A soft threshold was crossed by a call of this session: audit, then tell."""
        self.host.record(
            LIMIT_WARNING,
            reason=f"{warning.limit} at {warning.used:g} of {warning.maximum:g}",
            details=attrs.asdict(warning),
        )
        if callback is not None:
            try:
                callback(warning)
            except Exception as exc:  # a warning must not break the guard; keep the error
                self.host.note_secondary(f"on_limit_warning: {exc!r}")

    def charge(self, amount: float) -> None:
        """``session.charge``: spend not covered by a call's estimate."""
        amount = check_cost(amount)
        self.cost += amount
        if self.ledger is not None:
            over = self.ledger.charge(amount)
            if over is not None:
                self._interrupt_for_limit(*over, "")

    def move_deadline(self, seconds: float | None) -> None:
        """``session.move_deadline`` (the session checked state and thread)."""
        if self.ledger is None:
            self.ledger = Ledger(
                self.host,
                Limits(warn_at=None),
                None,
                clock=time.monotonic,
                report_warning=self.limit_warning,
            )
            self.meter = self._pick_meter()
        ledger = self.ledger
        ledger.move_deadline(self.host.loop, seconds)
        if ledger.has_timers:
            self.host.plane(Ledger, lambda: ledger)

    def _settle_cost(self, estimate: float, actual: float) -> None:
        ledger = self.ledger
        assert ledger is not None
        if actual != estimate:
            self.cost += actual - estimate
        over = ledger.spend(estimate, actual)
        if over is not None:
            self._interrupt_for_limit(*over, "")

    # ----------------------------------------------------------------- meter

    async def metered(
        self,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        tool: str,
        cost: float,
    ) -> T:
        """Run one admitted call with its timeout, cost reconciliation and outcome."""
        ledger = self.ledger
        assert ledger is not None
        # The actual cost the tool reports (report_cost) lands in this cell.
        cell: list[float | None] = [None]
        token = _current_cost.set(cell)
        error: BaseException | None = None
        try:
            if ledger.timed:
                timeout = ledger.timeouts.get(tool, ledger.default_timeout)
                if timeout is not None:
                    # asyncio.timeout, not anyio.fail_after: a CancelScope costs ~5.7 µs
                    # per call; asyncio.timeout uses the same cancel/uncancel protocol
                    # as the tool plane and cancels this call only.
                    async with asyncio.timeout(timeout):
                        return await fn(*args, **kwargs)
            return await fn(*args, **kwargs)
        except Exception as exc:
            error = exc
            raise
        finally:
            _current_cost.reset(token)
            actual = cell[0]
            if actual is None or actual == cost:
                # Spend + reserved unchanged: nothing to cross. Ledger.spend inlined
                # for a root ledger (the hot path).
                if ledger.single:
                    ledger.reserved -= cost
                    ledger.spent += cost
                else:
                    ledger.spend(cost, cost)
            else:
                self._settle_cost(cost, actual)
            watch = self.watch
            if watch is not None and watch.wants_outcome:
                watch.on_outcome(tool, error)

    async def watched(
        self,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        tool: str,
        cost: float,
    ) -> T:
        """Run one admitted call of a session with a sentinel but no limits."""
        watch = self.watch
        assert watch is not None
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            watch.on_outcome(tool, exc)
            raise
        watch.on_outcome(tool, None)
        return result
