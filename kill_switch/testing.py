"""Helpers for testing code that uses kill_switch."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._audit import AuditEvent
    from ._report import AuditStatus

__all__ = ["MemoryAudit"]


class MemoryAudit:
    """An ``AuditSink`` that keeps events in a list, in the order they were recorded.

    ``flush`` reports ``"volatile"``: nothing here survives the process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[AuditEvent] = []

    async def __aenter__(self) -> MemoryAudit:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def record(self, event: AuditEvent) -> None:
        """Keep *event*. Thread-safe; never blocks on I/O."""
        with self._lock:
            self._events.append(event)

    async def flush(self) -> AuditStatus:
        """Nothing to wait for; memory is all there is."""
        return "volatile"

    @property
    def events(self) -> tuple[AuditEvent, ...]:
        """Every event recorded so far."""
        with self._lock:
            return tuple(self._events)

    def kinds(self, session_id: str | None = None) -> list[str]:
        """The kinds of the events recorded so far (of one session, if given)."""
        return [e.kind for e in self.events if session_id is None or e.session_id == session_id]
