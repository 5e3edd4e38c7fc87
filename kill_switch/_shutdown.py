"""Graceful shutdown on SIGTERM/SIGINT, for entry points only (never on import).

First signal: every session is interrupted (trigger ``shutdown``), the watchdog is armed
for the deadline, and the entry point's block is cancelled so it can wind down. Second
signal: immediate exit with status ``128 + signum``, as a shell reports it.

The handlers are Python-level (``signal.signal``), not ``loop.add_signal_handler``: they
run between bytecodes of the main thread even while a coroutine blocks the loop in
Python code or in an interruptible sleep, where a loop callback would never run. They
only append, set events and write to the loop's self-pipe — no lock held across a wait.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import anyio

from ._vocabulary._audit_event import FORCED_EXIT, AuditEvent, DurableAuditSink
from ._watchdog import Watchdog

if TYPE_CHECKING:
    from types import FrameType, TracebackType

    from ._runtime import Runtime
    from ._session import Session

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulShutdown:
    """``async with ks.graceful_shutdown(runtime, deadline=10.0) as shutdown:``

    Wrap an entry point's main work (inside the runtime's block). On the first
    SIGTERM/SIGINT, sessions are interrupted, the block is cancelled (and the
    cancellation absorbed at its exit), and the process is guaranteed gone *deadline*
    seconds later — by the watchdog if the orderly path hangs. ``shutdown.signal`` then
    names the signal and ``shutdown.exit_code`` is ``128 + signum`` for the entry point to
    return. The watchdog stays armed after the block: once a shutdown has begun, the
    process ends by the deadline whatever else happens (a non-daemon thread blocking
    interpreter exit, say). ``disarm()`` lets it live on.

    Raises:
        RuntimeError: not called from the main thread (Python delivers signals there).
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        deadline: float = 10.0,
        traceback_file: str | os.PathLike[str] | None = None,
    ) -> None:
        if not deadline > 0:
            raise ValueError(f"deadline must be > 0 seconds, got {deadline!r}")
        self.runtime = runtime
        self.deadline = deadline
        self.signal: signal.Signals | None = None
        self._traceback_file = traceback_file
        self.watchdog: Watchdog | None = None  # its thread starts on entry
        self._count = 0
        self._scope = anyio.CancelScope()
        self._previous: dict[int, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def exit_code(self) -> int | None:
        """``128 + signum`` once a signal started the shutdown, else ``None``."""
        return None if self.signal is None else 128 + int(self.signal)

    def disarm(self) -> None:
        """Let the process live on after a signal-started shutdown."""
        if self.watchdog is not None:
            self.watchdog.disarm()

    async def __aenter__(self) -> GracefulShutdown:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("graceful_shutdown() must run in the main thread")
        self._loop = asyncio.get_running_loop()
        # Started now, armed later: arming in a signal handler starts no thread.
        self.watchdog = Watchdog(traceback_file=self._traceback_file)
        self.watchdog.add_action("audit", self._record_forced_exit)
        self.watchdog.add_action("processes", self._kill_process_groups)
        for sig in SHUTDOWN_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._scope.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            swallowed = self._scope.__exit__(exc_type, exc, tb)
        finally:
            if self.signal is not None and self.watchdog is not None:
                handles = [s.handle for s in self._live()]
                remaining = (self.watchdog.deadline or 0) - time.monotonic()
                with anyio.move_on_after(max(0.0, remaining), shield=True):
                    for handle in handles:
                        await handle
        # Keep the second-signal handler until the process is gone: restoring the
        # default SIGINT handler here would turn a second Ctrl-C into a traceback.
        if self.signal is None:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            self.disarm()  # no shutdown began: the watchdog's thread ends
        return bool(swallowed)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._count += 1
        sig = signal.Signals(signum)
        if self._count > 1:
            os.write(2, f"kill_switch: second {sig.name}, exiting now\n".encode())
            os._exit(128 + signum)
        self.signal = sig
        os.write(2, f"kill_switch: {sig.name} received, stopping every session\n".encode())
        if self.watchdog is not None:
            self.watchdog.arm(self.deadline, reason=f"shutdown on {sig.name}")
        self.runtime.interrupt_all(f"received {sig.name}", trigger="shutdown")
        if self._loop is not None:
            # Writes the loop's self-pipe: wakes a loop parked in select().
            self._loop.call_soon_threadsafe(self._scope.cancel)

    # -- forced-exit actions (run in watchdog threads while the loop may be stuck)

    def _record_forced_exit(self) -> None:
        event = AuditEvent(
            FORCED_EXIT,
            None,
            trigger="watchdog",
            reason=f"shutdown did not finish within {self.deadline} s",
            details={
                "signal": self.signal.name if self.signal else None,
                "sessions": [info.session_id for info in self.runtime.sessions()],
            },
        )
        sink = self.runtime.audit
        if isinstance(sink, DurableAuditSink):
            sink.record_now(event)
        elif sink is not None:
            sink.record(event)

    def _kill_process_groups(self) -> None:
        for session in self._live():
            session.force("watchdog")

    def _live(self) -> list[Session]:
        """The runtime's live sessions (any thread: the watchdog's, say)."""
        live = (self.runtime.get(info.session_id) for info in self.runtime.sessions())
        return [s for s in live if s is not None]


def graceful_shutdown(
    runtime: Runtime,
    *,
    deadline: float = 10.0,
    traceback_file: str | os.PathLike[str] | None = None,
) -> GracefulShutdown:
    """Stop every session on SIGTERM/SIGINT and guarantee exit by *deadline* seconds.

    For entry points only. See ``GracefulShutdown``.
    """
    return GracefulShutdown(runtime, deadline=deadline, traceback_file=traceback_file)
