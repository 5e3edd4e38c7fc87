"""The last resort: a watchdog that ends the process when a stop or a shutdown hangs.

Two layers, both outside the event loop (a stuck loop must not be able to stop them):

1. An **orderly** OS thread, started when the watchdog is created and *armed* by setting
   an event (no thread is started, no lock held long, at the moment of arming — arming
   happens in signal handlers). It fires ``lead`` seconds before the deadline: it writes
   every thread's traceback to stderr and to a side file, runs the forced-exit actions
   (each in its own thread, bounded: record ``forced_exit`` durably, SIGKILL the tracked
   process groups), then calls ``os._exit(EXIT_FORCED)``.
2. A **C-level** layer, ``faulthandler.dump_traceback_later(exit=True)``, armed for the
   deadline itself. Its thread needs no GIL, so it fires on time even while a C call
   holds the GIL (a catastrophic regex), where the orderly thread cannot run; it exits
   with status 1 after writing the tracebacks to the side file (or stderr).

Not ``atexit``: it does not run when a non-daemon thread blocks interpreter exit. Not a
``threading.Timer`` alone: it fired seconds late while a C call held the GIL.

faulthandler has one ``dump_traceback_later`` per process: arming the watchdog replaces
a host's own (pytest's ``faulthandler_timeout``, say) and disarming cancels it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Final

from ._vocabulary._stderr import say

#: Exit status of an orderly forced exit (EX_SOFTWARE): the deadline passed, the
#: tracebacks and the ``forced_exit`` record were written, process groups killed.
EXIT_FORCED: Final = 70
#: Exit status when the C-level layer fired (faulthandler's own, not configurable):
#: the orderly thread could not run in time, typically because a C call held the GIL.
EXIT_FORCED_C_LEVEL: Final = 1

Action = Callable[[], object]


class Watchdog:
    """Force the process to exit if it is still running at a deadline.

    Create it early (it starts its thread then), ``arm(seconds)`` when a shutdown or an
    escalated stop begins — safe in a signal handler: it only sets an event and arms
    faulthandler — and ``disarm()`` if the process is meant to live on.

    Args:
        traceback_file: side file the tracebacks go to, for the post-mortem (appended).
        lead: seconds before the deadline the orderly layer fires, so it can finish
            its actions before the C-level layer fires at the deadline.
        action_timeout: seconds each forced-exit action may take before it is left
            behind (it runs in its own daemon thread).
        exit_code: status of an orderly forced exit.
    """

    def __init__(
        self,
        *,
        traceback_file: str | os.PathLike[str] | None = None,
        lead: float = 0.25,
        action_timeout: float = 0.2,
        exit_code: int = EXIT_FORCED,
    ) -> None:
        if not 0 < lead < 60 or not 0 < action_timeout < 60:
            raise ValueError("lead and action_timeout must be seconds in (0, 60)")
        self.traceback_file = os.fspath(traceback_file) if traceback_file is not None else None
        self.lead = lead
        self.action_timeout = action_timeout
        self.exit_code = exit_code
        self._actions: list[tuple[str, Action]] = []
        self._armed = threading.Event()
        self._disarmed = threading.Event()
        self._deadline: float | None = None  # monotonic
        self._reason = ""
        self._side: IO[str] | None = None
        self._thread = threading.Thread(target=self._run, name="kill_switch watchdog", daemon=True)
        self._thread.start()

    @property
    def armed(self) -> bool:
        """Whether a deadline is set and not disarmed."""
        return self._armed.is_set() and not self._disarmed.is_set()

    @property
    def deadline(self) -> float | None:
        """The monotonic time the process will be gone by, once armed."""
        return self._deadline

    def add_action(self, name: str, action: Action) -> None:
        """Run *action* (bounded, in its own thread) before a forced exit."""
        self._actions.append((name, action))

    def arm(self, seconds: float, reason: str = "shutdown") -> None:
        """Make sure the process is gone *seconds* from now. Idempotent: the first
        deadline stands. Safe to call from a signal handler."""
        if self._armed.is_set() or self._disarmed.is_set():
            return
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds!r}")
        self._deadline = time.monotonic() + seconds
        self._reason = reason
        if self.traceback_file is not None:
            try:
                self._side = open(self.traceback_file, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                say(f"kill_switch watchdog: cannot open {self.traceback_file}: {exc}\n")
        faulthandler.dump_traceback_later(
            seconds, exit=True, file=self._side if self._side is not None else sys.stderr
        )
        self._armed.set()

    def disarm(self) -> None:
        """Let the process live on (cancels the C-level layer as well)."""
        self._disarmed.set()
        self._armed.set()  # wake the thread so it can end
        faulthandler.cancel_dump_traceback_later()

    def _run(self) -> None:
        self._armed.wait()
        if self._disarmed.is_set():
            return
        assert self._deadline is not None
        fire_at = self._deadline - min(self.lead, (self._deadline - time.monotonic()) / 2)
        if self._disarmed.wait(max(0.0, fire_at - time.monotonic())):
            return
        self._fire()

    def _fire(self) -> None:
        header = (
            f"kill_switch watchdog: {self._reason} did not finish by its deadline; "
            f"forcing exit with status {self.exit_code} (pid {os.getpid()})\n"
        )
        say(header)
        targets: list[IO[str]] = [sys.stderr]
        if self._side is not None:
            targets.insert(0, self._side)
            with contextlib.suppress(OSError, ValueError):
                self._side.write(header)
                self._side.flush()
        for target in targets:
            with contextlib.suppress(OSError, ValueError):  # a closed stream: go on exiting
                faulthandler.dump_traceback(file=target, all_threads=True)
        for name, action in self._actions:
            done = threading.Event()

            def run(
                action: Action = action, done: threading.Event = done, name: str = name
            ) -> None:
                try:
                    action()
                except Exception as exc:  # reported; the forced exit goes on regardless
                    say(f"kill_switch watchdog: action {name} failed: {exc!r}\n")
                finally:
                    done.set()

            threading.Thread(target=run, name=f"kill_switch watchdog {name}", daemon=True).start()
            if not done.wait(self.action_timeout):
                say(f"kill_switch watchdog: action {name} timed out, left behind\n")
        os._exit(self.exit_code)
