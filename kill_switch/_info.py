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
