"""Helpers for testing code that uses kill_switch."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._vocabulary._audit_event import AuditEvent
    from ._vocabulary._report import AuditStatus

__all__ = ["FakeClock", "MemoryAudit"]


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


class FakeClock:
    """A monotonic clock that moves only when the test moves it.

    Pass it where kill_switch takes a ``clock`` (``runtime.session(clock=...)``,
    ``Sentinel(clock=...)``, ``supervise(clock=...)``) to make windows, cooldowns,
    ages and ``max_duration`` deterministic: set :attr:`now` or call :meth:`advance`.
    It does not move the event loop's own clock, so timers the loop schedules (a
    deadline's ``call_at``) still fire in real time.
    """

    def __init__(self, start: float = 1000.0) -> None:
        #: The time the clock reads, in seconds.
        self.now = float(start)

    def __call__(self) -> float:
        """The current reading."""
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by *seconds*; returns the new reading.

        Raises:
            ValueError: *seconds* is negative or NaN (a monotonic clock never goes back).
        """
        if not seconds >= 0:
            raise ValueError(f"a monotonic clock only moves forward, got {seconds!r}")
        self.now += seconds
        return self.now

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now!r})"
