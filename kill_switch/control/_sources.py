"""Where the control plane's inventory and kills come from: a ``SessionSource``.

* ``LocalSource``: the runtime the control plane is mounted in (its sessions, their live
  detail read on the agent's loop, kills through ``Session.interrupt``).
* ``FleetSource`` (``_fleet_source``): every runtime of a fleet on Redis.

A source answers with JSON-ready rows, never live objects, and refuses with ``Refused``
(404 unknown session, 409 nothing to stop, 503/504 a fleet that does not answer). The
handlers around it (roles, bodies, audit of refusals) are the same for every source.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio

from ._http import Refused, escape
from ._inventory import Book, Entry, Page, Query, jsonable, live_detail

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from kill_switch._runtime import Runtime
    from kill_switch._session import Session
    from kill_switch._vocabulary._report import StopReport
    from kill_switch._vocabulary._selector import Selector

    from ._metrics import Metrics

log = logging.getLogger("kill_switch.control")

#: Seconds a session's detail waits for the agent's loop to answer.
DETAIL_TIMEOUT: Final = 0.25


class SessionSource(Protocol):
    """The inventory and the kills behind a control plane (called on the control loop)."""

    #: What the inventory spans, shown by ``/api/whoami``: ``runtime`` or ``fleet``.
    scope: str

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held while the control plane serves (a fleet connects to Redis here)."""
        ...

    async def sessions(self) -> list[dict[str, Any]]:
        """Every session as a JSON-ready snapshot row."""
        ...

    async def page(self, query: Query) -> Page:
        """The rows of ``GET /api/sessions`` that *query* selects, as JSON texts."""
        ...

    async def states(self) -> Counter[str]:
        """How many sessions are in each state (``/metrics``), without building rows."""
        ...

    async def session(self, session_id: str) -> dict[str, Any] | None:
        """One session's row with its detail, or ``None`` if unknown."""
        ...

    async def kill(
        self, session_id: str, *, reason: str, operator: str, wait: bool
    ) -> tuple[int, dict[str, Any]]:
        """Interrupt *session_id* (trigger ``operator``); the HTTP status and result.

        Raises:
            Refused: 404 unknown, 409 nothing to stop, 503/504 no answer.
        """
        ...

    async def kill_where(
        self, selector: Selector, *, reason: str, operator: str, wait: bool
    ) -> tuple[int, dict[str, Any]]:
        """Interrupt every session *selector* matches; the HTTP status and results."""
        ...


def result_row(session_id: str, report: StopReport) -> dict[str, Any]:
    """A kill's answer for a session that has its StopReport."""
    return {
        "session_id": session_id,
        "interrupt_id": report.interrupt_id,
        "status": report.outcome,
        "report": jsonable(report),
    }


def _nothing() -> None:
    pass


class LocalSource:
    """The sessions of the runtime the control plane is mounted in (today's behaviour).

    Args:
        runtime: the entered runtime.
        book: the control plane's memory of sessions that left the inventory.
        metrics: kill latency is observed here.
        on_report: called with each StopReport the control plane learns of.
        kill_timeout: seconds a kill waits for its report (default: the session's stop
            and audit timeouts plus one second).
    """

    scope = "runtime"

    def __init__(
        self,
        runtime: Runtime,
        book: Book,
        metrics: Metrics,
        on_report: Callable[[Session, StopReport], object],
        kill_timeout: float | None = None,
    ) -> None:
        self.runtime = runtime
        self.book = book
        self.metrics = metrics
        self.on_report = on_report
        self.kill_timeout = kill_timeout
        #: Takes the runtime's events still on their way to the book (the control
        #: plane's ``Handoff.catch_up`` while it runs): a read sees what happened before it.
        self.catch_up: Callable[[], None] = _nothing

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Nothing to open: the runtime is the caller's."""
        yield

    def stop_wait(self, session: Session) -> float:
        """Seconds to wait for *session*'s StopReport."""
        if self.kill_timeout is not None:
            return self.kill_timeout
        return float(session.policy.stop_timeout) + float(session.policy.audit_timeout) + 1.0

    def live(self) -> list[Entry]:
        """The runtime's sessions and the remembered ones that ended with a state."""
        self.catch_up()
        live = {}
        for info in self.runtime.sessions():
            self.book.seen(info)
            live[info.session_id] = True
        out = []
        for entry in self.book.entries():
            if entry.info.session_id in live or entry.info.state not in ("running", "created"):
                out.append(entry)
            # a "running" entry no longer live and without report: it ended unseen
        return out

    async def sessions(self) -> list[dict[str, Any]]:
        """Every session as a row (live first seen, then remembered)."""
        return [e.to_json() for e in self.live()]

    async def states(self) -> Counter[str]:
        """Sessions per state, from the snapshots: a scrape never serialises the book."""
        return Counter(e.info.state for e in self.live())

    async def page(self, query: Query) -> Page:
        """The live sessions' rows, built now, after a page of the remembered ones',
        serialised once each (``Entry.text``)."""
        self.catch_up()
        live = set()
        for info in self.runtime.sessions():
            self.book.seen(info)
            live.add(info.session_id)
        return self.book.page(live, query)

    async def session(self, session_id: str) -> dict[str, Any] | None:
        """The row, with tool calls in flight, processes, threads and budget use."""
        self.catch_up()
        session = self.runtime.get(session_id)
        if session is None:
            entry = self.book.get(session_id)
            if entry is None:
                return None
            out = entry.to_json()
            out["live"] = None
            return out
        info = session.info()
        self.book.seen(info)
        entry = self.book.get(session_id)
        out = entry.to_json() if entry is not None else Entry(info).to_json()
        try:
            detail = await live_detail(session, DETAIL_TIMEOUT)
        except Exception as exc:  # a plane changed under a racing stop: say so, don't 500
            detail = None
            out["live_error"] = repr(exc)[:200]
        out["live"] = detail
        if detail is None and "live_error" not in out:
            out["live_error"] = (
                f"the agent's event loop did not answer within {DETAIL_TIMEOUT} s (blocked?)"
            )
        out["budget"] = {
            "actions": info.actions,
            "cost": info.cost,
            "ledger": detail.get("budget") if detail is not None else None,
        }
        return out

    async def _kill_one(
        self, session: Session, reason: str, operator: str, wait: bool, started: float
    ) -> tuple[int, dict[str, Any]]:
        handle = session.interrupt(reason, trigger="operator", operator=operator)
        log.info(
            "kill session=%s by=%s reason=%s",
            escape(session.id),
            escape(operator),
            escape(reason),
        )
        out: dict[str, Any] = {
            "session_id": session.id,
            "interrupt_id": handle.interrupt_id,
            "status": "interrupting",
            "report": None,
        }
        if not wait:
            return 202, out
        report = None
        with anyio.move_on_after(self.stop_wait(session)):
            report = await handle
        if report is None:
            out["status"] = "pending"
            return 202, out
        self.on_report(session, report)
        self.metrics.http_kill_latency.observe(time.monotonic() - started)
        return 200, result_row(session.id, report)

    async def kill(
        self, session_id: str, *, reason: str, operator: str, wait: bool
    ) -> tuple[int, dict[str, Any]]:
        """Interrupt one session; its report again if it was already stopped."""
        started = time.monotonic()
        session = self.runtime.get(session_id)
        if session is None:
            entry = self.book.get(session_id)
            if entry is not None and entry.report is not None:
                return 200, result_row(session_id, entry.report)
            if entry is not None and entry.info.state == "interrupting":
                # Its block has ended and its report is not in the book yet: the stop an
                # earlier kill asked for is in flight. A kill is idempotent: say so, as
                # ``?wait=false`` on a live session does (not 409, nothing refused).
                return 202, {
                    "session_id": session_id,
                    "interrupt_id": entry.info.interrupt_id,
                    "status": "interrupting",
                    "report": None,
                }
            if entry is not None:
                raise Refused(409, f"session already {entry.info.state}; nothing to stop")
            raise Refused(404, "no such session")
        return await self._kill_one(session, reason, operator, wait, started)

    async def kill_where(
        self, selector: Selector, *, reason: str, operator: str, wait: bool
    ) -> tuple[int, dict[str, Any]]:
        """Interrupt every live session *selector* matches, concurrently."""
        started = time.monotonic()
        targets = [
            s
            for s in (self.runtime.get(i.session_id) for i in self.runtime.sessions())
            if s is not None and selector.matches(s.agent, s.labels)
        ]
        results: list[dict[str, Any]] = [{} for _ in targets]

        async def one(i: int, session: Session) -> None:
            _, results[i] = await self._kill_one(session, reason, operator, wait, started)

        async with anyio.create_task_group() as tg:
            for i, session in enumerate(targets):
                tg.start_soon(one, i, session)
        return 200, {"results": results, "count": len(results)}
