"""The out-of-band path: stop what can be stopped when the event loop does not answer.

A tool that blocks the loop (``time.sleep`` or a CPU loop inside a coroutine) makes
every loop-side plane deaf: the scope cancellation, the tool plane and the process
ladder all wait for the loop. ``interrupt()`` hands each first request to this monitor's
thread; if the loop has not delivered it within ``StopPolicy.out_of_band_after``, the
monitor stops, from its own thread, every plane that can be stopped without the loop
(process groups: SIGKILL, or ``cgroup.kill``), and the report says so. Thread flags and
the guard need no loop: ``interrupt()`` already set them.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


class LoopMonitor:
    """One daemon thread per runtime watching that interrupts reach the loop."""

    def __init__(self) -> None:
        # SimpleQueue.put is reentrant: safe from signal handlers and any thread.
        self._queue: queue.SimpleQueue[tuple[Callable[[], None], float] | None] = (
            queue.SimpleQueue()
        )
        self._closed = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="kill_switch loop monitor", daemon=True
        )
        self._thread.start()

    @property
    def ident(self) -> int | None:
        """The monitor thread's ident."""
        return self._thread.ident

    def watch(self, check: Callable[[], None], due_mono: float) -> None:
        """Call *check* on the monitor's thread at *due_mono* (``time.monotonic()``);
        it tests whether the loop delivered an interrupt and, if not, forces the stop.
        Never blocks."""
        self._queue.put((check, due_mono))

    def close(self) -> None:
        """Stop the thread (bounded: it only ever waits on events)."""
        self._closed.set()
        self._queue.put(None)
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._closed.is_set():
                return
            check, due = item
            if self._closed.wait(max(0.0, due - time.monotonic())):
                return
            check()
