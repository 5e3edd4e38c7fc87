"""What the control plane shows about sessions: JSON-ready snapshots, never live objects.

* The inventory is ``runtime.sessions()`` (frozen ``SessionInfo``), plus a bounded book
  of sessions that have left it (terminated, finished, failed) with their ``StopReport``:
  an operator must still see what was stopped and how.
* A session's detail adds its tool calls in flight, processes and threads. Those live on
  the agent's event loop and may only be read there, so the read is marshalled onto that
  loop and waited for, bounded: when the agent's loop is blocked, the detail says so
  instead of hanging the control plane.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from kill_switch._session import Session
    from kill_switch._vocabulary._report import StopReport
    from kill_switch._vocabulary._snapshots import SessionInfo, State

#: Sessions kept after they left the runtime's inventory.
RECENT = 1000


def jsonable(value: Any) -> Any:
    """*value* with attrs classes expanded, tuples as lists and non-finite floats as None."""
    if attrs.has(type(value)):
        value = attrs.asdict(value, recurse=False)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


@attrs.frozen
class Entry:
    """A session as the control plane last saw it, and its stop report if it has one."""

    info: SessionInfo
    report: StopReport | None = None

    def to_json(self) -> dict[str, Any]:
        """The inventory row."""
        out: dict[str, Any] = jsonable(self.info)
        out["report"] = jsonable(self.report) if self.report is not None else None
        return out


def final_state(info: SessionInfo, report: StopReport) -> SessionInfo:
    """*info* as it ends with *report*."""
    return attrs.evolve(
        info,
        state="terminated" if report.outcome != "after_end" else info.state,
        interrupt_id=report.interrupt_id,
        interrupt_trigger=report.trigger,
        interrupt_reason=report.reason,
        calls_in_flight=0 if report.quiescent else info.calls_in_flight,
    )


class Book:
    """Bounded memory of sessions seen, for those no longer in the inventory.

    Control loop only.
    """

    def __init__(self, size: int = RECENT) -> None:
        self._size = size
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    def seen(self, info: SessionInfo) -> None:
        """Remember the latest snapshot of a live session (its report, if any, stays)."""
        old = self._entries.pop(info.session_id, None)
        self._entries[info.session_id] = Entry(info, old.report if old else None)
        self._trim()

    def ended(self, session_id: str, state: str) -> None:
        """A session finished by itself (``finished`` / ``failed``)."""
        old = self._entries.get(session_id)
        if old is not None and old.report is None and state in ("finished", "failed"):
            ended: State = "finished" if state == "finished" else "failed"
            self._entries[session_id] = Entry(
                attrs.evolve(old.info, state=ended, calls_in_flight=0, tool_tasks=0)
            )

    def stopped(self, info: SessionInfo | None, report: StopReport) -> Entry:
        """A session's stop finished with *report*."""
        old = self._entries.pop(report.session_id, None)
        base = info or (old.info if old else None)
        if base is None:
            from kill_switch._vocabulary._snapshots import SessionInfo as _Info

            base = _Info(
                session_id=report.session_id,
                agent=report.agent,
                labels={},
                parent_id=None,
                state="terminated",
                started_at=None,
                actions=0,
                cost=0.0,
                calls_in_flight=0,
                tool_tasks=0,
                interrupt_id=report.interrupt_id,
                interrupt_trigger=report.trigger,
                interrupt_reason=report.reason,
            )
        entry = Entry(final_state(base, report), report)
        self._entries[report.session_id] = entry
        self._trim()
        return entry

    def get(self, session_id: str) -> Entry | None:
        """The remembered entry, if any."""
        return self._entries.get(session_id)

    def entries(self) -> list[Entry]:
        """Every remembered entry, oldest first."""
        return list(self._entries.values())

    def _trim(self) -> None:
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


def _plane_rows(session: Session) -> dict[str, Any]:
    """Live detail of *session*, read on its own loop thread (its planes are loop-only),
    from the session's frozen snapshots only."""
    processes = [
        {
            "pid": p.pid,
            "pgid": p.pgid,
            "command": list(p.command),
            "reaped": p.reaped,
            "adopted": p.adopted,
            "escaped": p.escaped,
            "signals": list(p.signals),
        }
        for p in session.processes()
    ]
    threads = [
        {"name": t.name, "ident": t.ident, "tool": t.tool, "exited": t.exited}
        for t in session.threads()
    ]
    calls = [{"task": c.task, "coro": c.coro} for c in session.calls()]
    budget = session.budget()
    return {
        "tool_calls": calls,
        "processes": processes,
        "threads": threads,
        "budget": jsonable(budget) if budget is not None else None,
        "alerts": jsonable(session.alerts),
    }


async def live_detail(session: Session, wait: float) -> dict[str, Any] | None:
    """The session's live detail, read on its loop; ``None`` if that loop does not answer
    within *wait* seconds (blocked, or closed). A checkpoint; not shielded."""
    fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

    def read() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(_plane_rows(session))
        except Exception as exc:  # a racing stop may change a plane under us: report it
            fut.set_exception(exc)

    try:
        session.loop.call_soon_threadsafe(read)
    except RuntimeError:  # the agent's loop is closed
        return None
    try:
        return await asyncio.wait_for(asyncio.wrap_future(fut), wait)
    except TimeoutError:
        fut.cancel()
        return None
