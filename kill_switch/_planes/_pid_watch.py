"""One pid watched for its exit: a pidfd reader where the kernel has pidfds, else a poll.

``PidWatch`` is how the process plane learns that a leader or a member of a tracked
group has exited, and how it signals that one pid (trio keeps the same concern apart in
``_subprocess_platform/``).

Invariants:

* Loop thread only: the pidfd reader and the poll timer are loop callbacks.
* A pid is signalled through its pidfd where there is one, so a recycled pid can never
  be hit; without a pidfd (old kernel, seccomp) by pid, and only while the watch has not
  seen it exit.
* The callback fires at most once, and never after ``close()``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from typing import TYPE_CHECKING, Final

from ._procfs import alive

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

#: The poll's first and longest delay (seconds) where there is no pidfd; the plane's
#: short rechecks use the first one too.
POLL_MIN: Final = 0.001
POLL_MAX: Final = 0.05


def signal_result(exc: OSError) -> str:
    """How a failed signal is written in the audit and the report."""
    if exc.errno == errno.ESRCH:
        return "esrch"
    if exc.errno == errno.EPERM:
        return "eperm"
    return f"error: {exc.strerror or exc!r}"


def _status_to_returncode(code: int, status: int) -> int:
    return -status if code in (os.CLD_KILLED, os.CLD_DUMPED) else status


class PidWatch:
    """One pid watched for its exit: a pidfd reader where the kernel has pidfds, else a
    poll with back-off. Loop thread only."""

    __slots__ = ("_cb", "_delay", "_loop", "_timer", "child", "exited_at", "fd", "pid")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pid: int,
        cb: Callable[[PidWatch], None],
        *,
        child: bool,
    ) -> None:
        self._loop = loop
        self.pid = pid
        self._cb = cb
        self.child = child
        self.exited_at: float | None = None
        self.fd = -1
        self._timer: asyncio.TimerHandle | None = None
        self._delay = POLL_MIN
        try:
            self.fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.exited_at = time.monotonic()
            loop.call_soon(self._fire)
            return
        except (AttributeError, OSError):  # no pidfd here (old kernel, seccomp): poll
            self._timer = loop.call_later(self._delay, self._poll)
            return
        loop.add_reader(self.fd, self._ready)

    def _ready(self) -> None:
        self._loop.remove_reader(self.fd)
        self.exited_at = time.monotonic()
        self._fire()

    def _poll(self) -> None:
        self._timer = None
        if self._gone():
            self.exited_at = time.monotonic()
            self._fire()
            return
        self._delay = min(POLL_MAX, self._delay * 2)
        self._timer = self._loop.call_later(self._delay, self._poll)

    def _gone(self) -> bool:
        if self.child:
            try:
                res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True
            return res is not None
        return not alive(self.pid)

    def _fire(self) -> None:
        cb = self._cb
        self._cb = _noop
        cb(self)

    def send(self, sig: int) -> str:
        """Signal this pid; ``"exited"`` without signalling if it is known gone."""
        if self.exited_at is not None:
            return "exited"
        try:
            if self.fd >= 0:
                signal.pidfd_send_signal(self.fd, sig)
            else:
                os.kill(self.pid, sig)
        except OSError as exc:
            return signal_result(exc)
        return "sent"

    def peek_returncode(self) -> int | None:
        """The exit status of a child of ours without reaping it (``None``: unknown)."""
        try:
            if self.fd >= 0:
                res = os.waitid(os.P_PIDFD, self.fd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            else:
                res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except OSError:
            return None
        if res is None:
            return None
        return _status_to_returncode(res.si_code, res.si_status)

    def reap_if_ours(self) -> None:
        """Reap this pid if it exited and is our child: an orphan reparented to this
        process as a child subreaper, which no ``Popen`` will ever wait for."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):  # ECHILD: not ours to reap
            os.waitid(os.P_PIDFD, self.fd, os.WEXITED | os.WNOHANG)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.fd >= 0:
            if self.exited_at is None:
                self._loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        self._cb = _noop


def _noop(_watch: PidWatch) -> None:
    return None
