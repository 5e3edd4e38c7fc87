"""One pid watched for its exit: a pidfd in the plane's epoll where the kernel has pidfds,
else a poll.

``PidWatch`` is how the process plane learns that a leader or a member of a tracked
group has exited, and how it signals that one pid (trio keeps the same concern apart in
``_subprocess_platform/``). ``PidWatcher`` holds the pidfds of one plane in one epoll
set, registered ``EPOLLONESHOT``, and that one fd is the loop's reader: the exits of a
stop are collected in one ``epoll_wait`` per wake-up, and a pidfd that fired needs no
``epoll_ctl(DEL)`` (one-shot: it is disarmed; closing it drops it from the set).

Invariants:

* Loop thread only: the epoll reader and the poll timer are loop callbacks.
* A pid is signalled through its pidfd where there is one, so a recycled pid can never
  be hit; without a pidfd (old kernel, seccomp) by pid, and only while the watch has not
  seen it exit.
* The callback fires at most once, and never after ``close()``.
* A pidfd still armed is unregistered before it is closed, so no event of a closed fd
  can be read as an event of a later fd that got the same number.
"""

from __future__ import annotations

import errno
import os
import select
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


class PidWatcher:
    """The pidfds of one plane in one epoll set, read by one loop reader. Loop thread only.

    The epoll fd exists while a pidfd is registered: the last ``forget`` closes it.
    """

    __slots__ = ("_epoll", "_loop", "_watches")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll: select.epoll | None = None
        self._watches: dict[int, PidWatch] = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def watch(self, watch: PidWatch) -> None:
        """Report *watch*'s pidfd readable (its process exited) once.

        Raises:
            OSError: the epoll set could not be created or extended.
        """
        if self._epoll is None:
            self._epoll = select.epoll()
            self._loop.add_reader(self._epoll.fileno(), self._ready)
        self._epoll.register(watch.fd, select.EPOLLIN | select.EPOLLONESHOT)
        self._watches[watch.fd] = watch

    def forget(self, watch: PidWatch, *, armed: bool) -> None:
        """Stop reporting *watch* (before its fd is closed); *armed*: it has not fired."""
        if self._watches.pop(watch.fd, None) is None:
            return
        if armed and self._epoll is not None:
            self._epoll.unregister(watch.fd)
        if not self._watches and self._epoll is not None:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    def _ready(self) -> None:
        if self._epoll is None:
            return
        # Every pidfd that fired since the last wake-up, in one call.
        for fd, _mask in self._epoll.poll(0):
            watch = self._watches.get(fd)
            if watch is not None:
                watch.fired()


class PidWatch:
    """One pid watched for its exit: a pidfd in the plane's ``PidWatcher`` where the
    kernel has pidfds, else a poll with back-off. Loop thread only."""

    __slots__ = ("_cb", "_delay", "_loop", "_timer", "_watcher", "child", "exited_at", "fd", "pid")

    def __init__(
        self,
        watcher: PidWatcher,
        pid: int,
        cb: Callable[[PidWatch], None],
        *,
        child: bool,
    ) -> None:
        loop = watcher.loop
        self._loop = loop
        self._watcher = watcher
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
        try:
            watcher.watch(self)
        except OSError:  # no epoll set to be had (fd limit): poll, keeping the pidfd
            self._timer = loop.call_later(self._delay, self._poll)

    def fired(self) -> None:
        """The pidfd is readable: the process has exited (the watcher's callback).

        It stays in the watcher (disarmed) until ``close()``, which may come after the
        stop: nothing is unregistered or closed on the stop's path.
        """
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

    def close(self) -> None:
        """Stop watching and close the pidfd (idempotent)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.fd >= 0:
            self._watcher.forget(self, armed=self.exited_at is None)
            os.close(self.fd)
            self.fd = -1
        self._cb = _noop


def _noop(_watch: PidWatch) -> None:
    return None
