"""One session's stop: fan the interrupt out to the planes, wait (bounded) for them to
settle, prove quiescence, build the report, audit it, resolve the handle.

The session owns where a stop comes from (``interrupt()``, its state machine, its
block); this module owns how it is carried out — the split trio makes between
``CancelScope`` and ``CancelStatus``. It sees the session through ``PlaneHost`` and the
containers the session hands it at construction, never through the session's fields.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio

from ._cleanup import Hook, run_hooks
from ._planes._pool import session_threads
from ._planes._process_plane import ProcessPlane
from ._planes._threads import ThreadPlane
from ._planes._tool_tasks import ToolTasks
from ._vocabulary._audit_event import (
    ESCALATED,
    INTERRUPT_COMPLETED,
    INTERRUPT_DELIVERED,
    LATE_RESULT,
    OUT_OF_BAND,
)
from ._vocabulary._plane import StopFields
from ._vocabulary._report import CleanupReport, Latency, StopReport, ThreadReport

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Sequence

    from ._vocabulary._plane import ForcePath, LoopHost, Plane, PlaneHost, StopWindow
    from ._vocabulary._report import AuditStatus, InterruptRequest, Outcome


#: How often the stop looks again at threads of other pools running the session's work
#: while they have their grace (they return once they poll the flag).
_POOL_RESCAN = 0.005

#: The order planes get the interrupt in: the cheapest first, so that no plane's start
#: waits for a slower one's — the thread plane arms its grace timer, the process plane
#: sends its signals, the tool plane cancels its tasks; every other plane (bookkeeping,
#: the limits' timers) follows in the order it was registered.
_DELIVERY_ORDER: dict[type[Plane], int] = {ThreadPlane: 0, ProcessPlane: 1, ToolTasks: 2}


class SharedStopTimer:
    """One stop timeout for the stops a batch delivered together (``interrupt_where``):
    armed once, after the batch's last delivery, instead of one timer per stop; it
    fires for those still running and is cancelled when the last of them finishes.

    Armed at the end of the batch's loop callback, it runs out at most that callback's
    duration after a stop's own timeout would have: late, never early.
    """

    __slots__ = ("handle", "left", "stops", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.stops: list[Stop] = []
        self.left = 0
        self.handle: asyncio.TimerHandle | None = None

    def add(self, stop: Stop) -> None:
        self.stops.append(stop)
        self.left += 1

    def arm(self) -> None:
        if self.left > 0 and self.handle is None:
            self.handle = self.stops[0].host.call_later(self.timeout, self._fire)

    def finished(self) -> None:
        """One of the stops finished (before the timeout)."""
        self.left -= 1
        if self.left <= 0:
            self.stops = []
            if self.handle is not None:
                self.handle.cancel()
                self.handle = None

    def _fire(self) -> None:
        self.handle = None
        stops, self.stops = self.stops, []
        for stop in stops:
            if stop.shared_timer is self:
                stop.shared_timer = None
                stop._on_stop_timeout()


class Stop:
    """The stop of one session (loop thread, except ``go_out_of_band``/``force``)."""

    __slots__ = (
        "announced",
        "children",
        "cleanup_hooks",
        "cleanup_reports",
        "delivered_mono",
        "finish_started",
        "fixed_outcome",
        "host",
        "late_results",
        "loop_host",
        "oob_mono",
        "planes",
        "pool_threads",
        "requests",
        "resolve",
        "secondary",
        "shared_timer",
        "stop_timer",
        "tools",
        "window",
    )

    def __init__(
        self,
        host: PlaneHost,
        loop_host: LoopHost,
        *,
        requests: list[InterruptRequest],
        planes: dict[type[Plane], Plane],
        tools: ToolTasks,
        children: Sequence[PlaneHost],
        cleanup_hooks: list[tuple[str, Hook]],
        resolve: Callable[[StopReport], None],
    ) -> None:
        self.host = host
        self.loop_host = loop_host
        # The session's own containers, shared (never copied): the stop reads them as
        # they are when it runs.
        self.requests = requests
        self.planes = planes
        self.tools = tools
        self.children = children
        self.cleanup_hooks = cleanup_hooks
        self.resolve = resolve
        self.secondary: list[str] = []
        self.late_results = 0
        self.cleanup_reports: list[CleanupReport] = []
        self.delivered_mono: float | None = None
        self.oob_mono: float | None = None
        self.stop_timer: asyncio.TimerHandle | None = None
        #: The stop timeout shared with the other stops of a batch (instead of stop_timer).
        self.shared_timer: SharedStopTimer | None = None
        #: Resolved once this stop's ``interrupt_requested`` is in the sink, when a batch
        #: from another thread hands it over after the stop may have begun (``Batch``).
        self.announced: asyncio.Future[None] | None = None
        #: Threads of pools the runtime did not start seen running the session's work
        #: when the report was built (``_planes/_pool.py``): (ident, name).
        self.pool_threads: list[tuple[int, str]] = []
        self.finish_started = False
        #: Set when nothing was running to stop (``before_start`` / ``after_end``).
        self.fixed_outcome: Outcome | None = None
        #: The stop in flight as the runtime sees it, from request until it resolves:
        #: the session's events go through it (``LoopHost.open_stop``).
        self.window: StopWindow | None = None

    # ---------------------------------------------------------------- deliver

    def deliver(
        self, first: InterruptRequest, timers: dict[float, SharedStopTimer] | None = None
    ) -> None:
        """Fan *first* out to every plane (the cheapest first), audit it, arm the stop
        timeout (with *timers*, join the batch's shared timer for it instead)."""
        planes = self.planes
        if len(planes) == 1:  # the tool plane alone: nothing to order
            ordered: list[Plane] = list(planes.values())
        else:
            last = len(_DELIVERY_ORDER)
            ordered = [
                p
                for _, p in sorted(planes.items(), key=lambda kv: _DELIVERY_ORDER.get(kv[0], last))
            ]
        for plane in ordered:
            try:
                plane.deliver(first)
            except Exception as exc:  # a plane must not stop the others from stopping
                self.secondary.append(f"plane {type(plane).__name__}.deliver: {exc!r}")
        assert self.delivered_mono is not None
        if self.loop_host.audible:  # the details cost more than the rest of the event
            self.host.record(
                INTERRUPT_DELIVERED,
                trigger=first.trigger,
                details={
                    "tool_calls": self.tools.tool_calls_cancelled,
                    "children": [c.id for c in self.children],
                    "seconds": self.delivered_mono - first.requested_mono,
                },
            )
        timeout = self.host.policy.stop_timeout
        if timers is None:
            self.stop_timer = self.host.call_later(timeout, self._on_stop_timeout)
            return
        shared = timers.get(timeout)
        if shared is None:
            shared = timers[timeout] = SharedStopTimer(timeout)
        shared.add(self)
        self.shared_timer = shared

    def open_window(self) -> None:
        """The stop is in flight (from its request, any thread): hold its events for one
        group commit and shorten the switch interval (``StopPolicy.switch_interval``)
        until it resolves."""
        if self.window is None:
            self.window = self.loop_host.open_stop(self.host.policy.switch_interval)

    def close_window(self) -> None:
        window, self.window = self.window, None
        if window is not None:
            window.close()

    def _on_stop_timeout(self) -> None:
        self.stop_timer = None
        if not self.host.handle.done() and not self.finish_started:
            self.loop_host.spawn(self.finish)

    # ------------------------------------------------------------------ settle

    def quiescent(self) -> bool:
        return not self.pool_threads and all(p.quiescent() for p in self.planes.values())

    def scan_pools(self) -> list[tuple[int, str]]:
        """Threads the planes do not know that still run the session's work."""
        plane = self.planes.get(ThreadPlane)
        known = plane.idents() if isinstance(plane, ThreadPlane) else set()
        return session_threads(self.host, known)

    async def wait_pools(self, deadline: float, found: list[tuple[int, str]] | None = None) -> None:
        """Give threads of other pools running the session's work (*found*, or found
        now) their grace (from the request, bounded by *deadline*) to see the flag and
        return; keep those left."""
        if found is None:
            found = self.scan_pools()
        if found:
            until = min(deadline, self.requests[0].requested_mono + self.host.policy.thread_grace)
            with anyio.move_on_after(max(0.0, until - time.monotonic()), shield=True):
                while found:
                    await anyio.sleep(_POOL_RESCAN)
                    found = self.scan_pools()
        self.pool_threads = found

    def settle_now(self) -> bool:
        """Do what settling can do at once; whether a plane is left to wait for."""
        tools = self.tools
        if tools.body_done and not tools.swept:
            # What the tool plane's settle does first, done here: at a block's exit it
            # usually makes the plane quiet at once, sparing the stop a cancel scope.
            tools.sweep()
            tools.check_quiet()
        return not all(p.quiescent() for p in self.planes.values())

    async def wait_quiet(self, deadline: float) -> None:
        """Wait (shielded, bounded by *deadline*) until every plane is quiet; the planes
        settle concurrently."""
        # Only planes with something left to settle get a task, and one alone is awaited
        # directly: a task group costs ~150 us on the stop's path
        # (benchmarks/bench_threads.py).
        self.settle_now()
        pending = [p for p in self.planes.values() if not p.quiescent()]
        if not pending:
            return
        with anyio.move_on_after(max(0.0, deadline - time.monotonic()), shield=True):
            if len(pending) == 1:
                await pending[0].settle(deadline)
                return
            async with anyio.create_task_group() as tg:
                for plane in pending:
                    tg.start_soon(plane.settle, deadline)

    def exit_budget(self) -> float:
        """The most the block's exit may take: the stop, each cleanup hook, the audit."""
        p = self.host.policy
        hooks = len(self.cleanup_hooks) + 1
        return p.stop_timeout + hooks * p.cleanup_timeout + p.audit_timeout + 1.0

    async def run_cleanup(self) -> None:
        """Run the cleanup hooks still registered (shielded, each bounded)."""
        if self.cleanup_hooks:
            self.cleanup_reports.extend(await run_hooks(self.host, self.cleanup_hooks, "cleanup"))

    # ------------------------------------------------------------------ finish

    async def finish(self, *, cleanup: bool = False) -> None:
        """Build the report, audit it, resolve the handle. Bounded; runs once.

        With *cleanup*, the session's cleanup hooks run (shielded, each bounded) once
        everything is quiet and before the report is built, so it holds their outcomes.
        """
        host = self.host
        if self.finish_started:
            with anyio.move_on_after(host.policy.stop_timeout + 1.0, shield=True):
                await host.handle
            return
        self.finish_started = True
        try:
            await self._finish(cleanup=cleanup)
        finally:
            self.close_window()

    async def wait_announced(self) -> None:
        """Wait until this stop's ``interrupt_requested`` is in the sink (a batch from
        another thread hands it over at its end): the stop's own rows come after it."""
        announced = self.announced
        if announced is not None:
            if not announced.done():
                await announced
            self.announced = None

    async def _finish(self, *, cleanup: bool) -> None:
        host = self.host
        # Each wait is awaited only when there is something to wait for: a coroutine
        # that returns at once still costs its call, N times in interrupt_all.
        if self.announced is not None:
            await self.wait_announced()
        assert self.delivered_mono is not None
        outcome = self.fixed_outcome
        if outcome is None:
            deadline = self.delivered_mono + host.policy.stop_timeout
            if self.settle_now():
                await self.wait_quiet(deadline)
            found = self.scan_pools()
            if found:
                await self.wait_pools(deadline, found)
            else:
                self.pool_threads = found
            outcome = "stopped" if self.quiescent() else "unresponsive"
            if cleanup and self.cleanup_hooks:
                await self.run_cleanup()
        fields = self._conclude(outcome)
        status = await self.loop_host.flush()
        self.resolve(StopReport(audit=status, **fields))

    def finish_now(self, *, cleanup: bool) -> bool:
        """Finish at once, without awaiting, when nothing is left to wait for: no batch
        hand-over pending, every plane quiet once settled, no pool thread running the
        session's work, no cleanup hook to run, no audit sink to flush. Whether it did
        (if not, ``finish`` does it, shielded and bounded). Runs once, like ``finish``.

        A stop that never awaits needs no shielded cancel scope around it: no
        cancellation can reach a task between two awaits.
        """
        if self.finish_started or self.announced is not None or self.loop_host.flushes:
            return False
        outcome = self.fixed_outcome
        if outcome is None:
            if self.settle_now() or self.scan_pools() or (cleanup and self.cleanup_hooks):
                return False
            outcome = "stopped"
        self.finish_started = True
        try:
            fields = self._conclude(outcome)
            self.resolve(StopReport(audit="disabled", **fields))
        finally:
            self.close_window()
        return True

    def _conclude(self, outcome: Outcome) -> dict[str, Any]:
        """The stop has settled as *outcome*: disarm its timeout, audit its last word,
        hand its events to the sink; the report's fields (but the audit status)."""
        host = self.host
        first = self.requests[0]
        if self.stop_timer is not None:
            self.stop_timer.cancel()
            self.stop_timer = None
        shared, self.shared_timer = self.shared_timer, None
        if shared is not None:
            shared.finished()
        quiescent = outcome != "unresponsive"
        if outcome == "unresponsive":
            tools = self.tools
            host.record(
                ESCALATED,
                trigger=first.trigger,
                details={
                    "status": "unresponsive",
                    "body_exited": tools.body_done,
                    "calls_in_flight": tools.calls_in_flight,
                    "tool_tasks": len(tools.tool_tasks),
                    "pool_threads": [name for _, name in self.pool_threads],
                },
            )
        if self.late_results:
            host.record(LATE_RESULT, details={"count": self.late_results})
        # The report's fields are read now, the report built once the audit's status is
        # known (one construction instead of a build and an ``attrs.evolve``).
        fields = self.report_fields(outcome, quiescent=quiescent)
        # An unresponsive session is never said to have completed: its last word in
        # the audit is ``escalated``.
        if quiescent and self.loop_host.audible:
            host.record(
                INTERRUPT_COMPLETED,
                trigger=first.trigger,
                details={
                    "outcome": outcome,
                    "quiescent": quiescent,
                    "tool_calls_cancelled": fields["tool_calls_cancelled"],
                    "leaked_tasks": len(fields["leaked_tasks"]),
                    "seconds": fields["latency"].total,
                },
            )
        # The stop's events (every plane's, then its last word) go to the sink
        # together: one commit on the stop's critical path.
        if self.window is not None:
            self.window.hand_over()
        return fields

    def build_report(self, outcome: Outcome, *, quiescent: bool, audit: AuditStatus) -> StopReport:
        return StopReport(audit=audit, **self.report_fields(outcome, quiescent=quiescent))

    def report_fields(self, outcome: Outcome, *, quiescent: bool) -> dict[str, Any]:
        """The ``StopReport``'s fields as they are now, but its audit status."""
        first = self.requests[0]
        now = time.monotonic()
        delivered = self.delivered_mono
        quiet = self.tools.quiet_mono
        fields = StopFields.merge([p.stop_fields() for p in self.planes.values()])
        # Empty containers read as the shared empty tuple: N reports in interrupt_all.
        requests, children, pool = self.requests, self.children, self.pool_threads
        threads = fields.threads
        if pool:
            threads += tuple(
                ThreadReport(name, ident, "abandoned", None, tool="", running=True)
                for ident, name in pool
            )
        return {
            "session_id": self.host.id,
            "agent": self.host.agent,
            "interrupt_id": self.host.handle.interrupt_id,
            "trigger": first.trigger,
            "reason": first.reason,
            "operator": first.operator,
            "requested_at": first.requested_at,
            "outcome": outcome,
            "quiescent": quiescent,
            "later": tuple(requests[1:]) if len(requests) > 1 else (),
            "tool_calls_cancelled": fields.tool_calls_cancelled,
            "late_results": self.late_results,
            "leaked_tasks": fields.leaked_tasks,
            "swept_tasks": fields.swept_tasks,
            "secondary_errors": tuple(self.secondary) if self.secondary else (),
            # Every child still listed was cascaded to (or will be: see interrupt()).
            "children": tuple([c.id for c in children]) if children else (),
            "cleanup": tuple(self.cleanup_reports) if self.cleanup_reports else (),
            "out_of_band": self.oob_mono is not None,
            "latency": Latency(
                delivered=None if delivered is None else delivered - first.requested_mono,
                quiescent=None if quiet is None else quiet - first.requested_mono,
                total=now - first.requested_mono,
            ),
            "processes": fields.processes,
            "unattributed": fields.unattributed,
            "threads": threads,
        }

    # ------------------------------------------------------------ out of band

    def go_out_of_band(self) -> None:
        """The loop did not deliver the interrupt in time (the monitor's thread)."""
        if self.oob_mono is not None or self.delivered_mono is not None:
            return
        self.oob_mono = time.monotonic()
        first = self.requests[0]
        self.host.record(
            OUT_OF_BAND,
            trigger=first.trigger,
            details={
                "seconds_since_request": self.oob_mono - first.requested_mono,
                "planes": [type(p).__name__ for p in list(self.planes.values())],
            },
        )
        self.force("out_of_band")

    def force(self, path: ForcePath) -> None:
        """Stop, from any thread, every plane that can be stopped without the loop."""
        for plane in list(self.planes.values()):
            try:
                plane.force(path)
            except Exception as exc:  # one plane's failure must not spare the others
                self.secondary.append(f"plane {type(plane).__name__}.force: {exc!r}")
