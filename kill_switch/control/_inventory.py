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
import functools
import itertools
import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from kill_switch._vocabulary._selector import Selector

if TYPE_CHECKING:
    from kill_switch._session import Session
    from kill_switch._vocabulary._report import StopReport
    from kill_switch._vocabulary._snapshots import SessionInfo, State

#: Sessions kept after they left the runtime's inventory.
RECENT = 1000
#: Stopped sessions in one ``GET /api/sessions`` answer unless ``?stopped_limit=`` says.
STOPPED_LIMIT = 100


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


def json_text(value: Any) -> str:
    """*value* as the control plane writes JSON: compact and ASCII only."""
    # ensure_ascii: a lone surrogate (a tool name from a model's JSON, a reason given
    # through the Python API) is written as a \udXXX escape instead of failing to encode
    # as UTF-8, which made every later inventory read a 500.
    return json.dumps(jsonable(value), ensure_ascii=True, separators=(",", ":"))


# slots=False: ``text`` is a cached_property, kept in the instance's __dict__.
@attrs.frozen(slots=False)
class Entry:
    """A session as the control plane last saw it, and its stop report if it has one.

    *seq* orders the book (it grows along it): the cursor of ``?stopped_before=``.
    """

    info: SessionInfo
    report: StopReport | None = None
    seq: int = attrs.field(default=0, eq=False)

    def to_json(self) -> dict[str, Any]:
        """The inventory row."""
        out: dict[str, Any] = jsonable(self.info)
        out["report"] = jsonable(self.report) if self.report is not None else None
        return out

    @functools.cached_property
    def text(self) -> str:
        """The inventory row as JSON text, serialised once: an entry never changes (a
        live session's next snapshot is a new entry)."""
        return json_text(self.to_json())


@attrs.frozen
class Query:
    """Which rows one ``GET /api/sessions`` answers with.

    *stopped_limit* bounds the rows of sessions no longer live (newest first), from
    those with ``seq`` below *stopped_before* if given; live sessions are all shown.
    """

    agent: str | None = None
    state: str | None = None
    labels: Mapping[str, str] = attrs.field(factory=dict)
    stopped_limit: int = STOPPED_LIMIT
    stopped_before: int | None = None
    #: The agent and label part, built once: it is asked once per row of the book.
    selector: Selector = attrs.field(init=False)

    @selector.default
    def _selector(self) -> Selector:
        return Selector(self.agent, self.labels)

    def matches(self, agent: str, state: str, labels: Mapping[str, str]) -> bool:
        """Whether a session of *agent* in *state* carrying *labels* is selected."""
        return (self.state is None or state == self.state) and self.selector.matches(agent, labels)


@attrs.frozen
class Page:
    """Rows as JSON texts (inventory order), and the ``?stopped_before=`` cursor of the
    next older page of stopped sessions (``None``: no older one matches)."""

    rows: list[str]
    stopped_next: int | None = None

    def body(self) -> str:
        """The answer: ``{"sessions": [...], "count": n, "stopped_next": cursor}``."""
        # Joined from cached row texts: re-encoding every stopped report on each poll
        # held the control thread (and the GIL) for tens of ms with a full book.
        return (
            f'{{"sessions":[{",".join(self.rows)}],"count":{len(self.rows)},'
            f'"stopped_next":{json_text(self.stopped_next)}}}'
        )


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
        self._seq = itertools.count(1)

    def seen(self, info: SessionInfo) -> None:
        """Remember the latest snapshot of a live session (its report, if any, stays)."""
        old = self._entries.pop(info.session_id, None)
        self._entries[info.session_id] = Entry(info, old.report if old else None, next(self._seq))
        self._trim()

    def ended(self, session_id: str, state: str) -> None:
        """A session finished by itself (``finished`` / ``failed``)."""
        old = self._entries.get(session_id)
        if old is not None and old.report is None and state in ("finished", "failed"):
            ended: State = "finished" if state == "finished" else "failed"
            self._entries[session_id] = Entry(  # in place: keeps its seq
                attrs.evolve(old.info, state=ended, calls_in_flight=0, tool_tasks=0),
                seq=old.seq,
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
        entry = Entry(final_state(base, report), report, next(self._seq))
        self._entries[report.session_id] = entry
        self._trim()
        return entry

    def get(self, session_id: str) -> Entry | None:
        """The remembered entry, if any."""
        return self._entries.get(session_id)

    def entries(self) -> list[Entry]:
        """Every remembered entry, oldest first."""
        return list(self._entries.values())

    def page(self, live: set[str], query: Query) -> Page:
        """The rows *query* selects: the sessions in *live* (each moved to the end by
        ``seen`` just before), after the newest ``query.stopped_limit`` remembered ones
        that ended with a state. Walks the book from its newest end and stops once the
        page is full, so a default poll costs the page, not the book."""
        fresh: list[str] = []
        stopped: list[Entry] = []
        cursor = None
        limit, before = query.stopped_limit, query.stopped_before
        for entry in reversed(self._entries.values()):
            info = entry.info
            if info.session_id in live:
                if query.matches(info.agent, info.state, info.labels):
                    fresh.append(entry.text)
                continue
            if info.state in ("running", "created"):
                continue  # no longer live and without report: it ended unseen
            if before is not None and entry.seq >= before:
                continue
            if not query.matches(info.agent, info.state, info.labels):
                continue
            if len(stopped) >= limit:
                cursor = stopped[-1].seq if stopped else entry.seq + 1
                break
            stopped.append(entry)
        stopped.reverse()
        fresh.reverse()
        return Page([e.text for e in stopped] + fresh, cursor)

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
