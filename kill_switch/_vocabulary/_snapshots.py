"""Frozen snapshots of live sessions: what inventories, APIs and dashboards serialise."""

from __future__ import annotations

from typing import Any, Literal

import attrs

State = Literal["created", "running", "interrupting", "terminated", "finished", "failed"]


@attrs.frozen
class CallInfo:
    """A tool call in flight in a task other than the session's body, as it was."""

    task: str  # the task's name
    coro: str  # the qualified name of the coroutine the task runs


@attrs.frozen
class ProcessInfo:
    """A process a session tracks (a leader it started or adopted, or an escapee), as it
    was."""

    pid: int
    pgid: int | None
    command: tuple[str, ...]
    reaped: bool  # it exited and was waited for
    adopted: bool  # tracked with track_pid(), not started by the session
    escaped: bool  # found outside its group (setsid, double fork) and tracked since
    signals: tuple[str, ...]  # signals sent so far, in order


@attrs.frozen
class ThreadInfo:
    """A sync tool's worker thread of a session, as it was."""

    name: str
    ident: int | None
    tool: str
    exited: bool


@attrs.frozen
class SessionInfo:
    """A session as it was when ``info()`` was called."""

    session_id: str
    agent: str
    labels: dict[str, str] = attrs.field(hash=False)
    parent_id: str | None
    state: State
    started_at: float | None  # wall clock, seconds since the epoch
    actions: int  # tool calls the guard allowed
    cost: float  # cost reported by allowed tool calls
    calls_in_flight: int
    tool_tasks: int
    interrupt_id: str | None
    interrupt_trigger: str | None
    interrupt_reason: str | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return attrs.asdict(self)
