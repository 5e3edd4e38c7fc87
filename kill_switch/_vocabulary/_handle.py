"""The handle ``interrupt()`` returns: await it (from any event loop) or wait on it (from
any thread) for the ``StopReport``."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from collections.abc import Callable, Generator

    from ._report import StopReport


def _resolve(fut: asyncio.Future[StopReport], report: StopReport) -> None:
    if not fut.done():
        fut.set_result(report)


@attrs.define(eq=False)
class InterruptHandle:
    """A pending or finished stop of one session.

    Every ``interrupt()`` of the same session returns the same handle: there is one stop
    per session, whatever the number of callers. It resolves once the session is verified
    quiescent, or once its stop timeout has passed (then ``report.quiescent`` is false).
    """

    interrupt_id: str
    session_id: str
    _done: threading.Event = attrs.field(factory=threading.Event, alias="_done")
    _lock: threading.Lock = attrs.field(factory=threading.Lock, alias="_lock")
    _report: StopReport | None = attrs.field(default=None, alias="_report")
    _waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[StopReport]]] = attrs.field(
        factory=list, alias="_waiters"
    )

    def done(self) -> bool:
        """Whether the report is available."""
        return self._done.is_set()

    @property
    def report(self) -> StopReport | None:
        """The report, or ``None`` while the stop is still in progress."""
        return self._report

    async def wait(self) -> StopReport:
        """Wait for the report. Works from any asyncio event loop in any thread.

        This is a checkpoint when it waits. Cancelling the wait does not cancel the stop.
        """
        report = self._report
        if report is not None:
            return report
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[StopReport] = loop.create_future()
        with self._lock:
            report = self._report
            if report is None:
                self._waiters.append((loop, fut))
        if report is not None:
            return report
        try:
            return await fut
        finally:
            with self._lock:
                if (loop, fut) in self._waiters:
                    self._waiters.remove((loop, fut))

    def add_done_callback(
        self, loop: asyncio.AbstractEventLoop, callback: Callable[[], object]
    ) -> None:
        """Call *callback* on *loop* (from its own thread) once the handle has resolved,
        after the callbacks of those awaiting it then; soon if it has already."""
        with self._lock:
            resolved = self._report is not None
            if not resolved:
                fut: asyncio.Future[StopReport] = loop.create_future()
                fut.add_done_callback(lambda _f: loop.call_soon(callback))
                self._waiters.append((loop, fut))
        if resolved:
            loop.call_soon(callback)

    def __await__(self) -> Generator[Any, None, StopReport]:
        return self.wait().__await__()

    def result(self, timeout: float | None = None) -> StopReport:
        """Block the calling thread until the report is ready (never call it on the loop).

        Raises:
            TimeoutError: the report was not ready within *timeout* seconds.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(
                f"interrupt {self.interrupt_id} of session {self.session_id} "
                f"not finished within {timeout} s"
            )
        assert self._report is not None
        return self._report

    def _set(self, report: StopReport) -> bool:
        """Resolve the handle once; later calls are ignored. Thread-safe."""
        with self._lock:
            if self._report is not None:
                return False
            self._report = report
            waiters, self._waiters = self._waiters, []
            self._done.set()
        for loop, fut in waiters:
            try:
                running = asyncio._get_running_loop()
                if running is loop:
                    _resolve(fut, report)
                else:
                    loop.call_soon_threadsafe(_resolve, fut, report)
            except RuntimeError:
                pass  # that waiter's loop is closed: nobody is left to tell
        return True
