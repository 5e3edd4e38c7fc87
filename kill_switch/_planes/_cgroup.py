"""A per-session cgroup v2: the airtight way to find and kill a session's processes.

A process cannot leave a cgroup by ``setsid()`` or a double fork, so the cgroup holds
every descendant of every process kill_switch started for the session, and
``cgroup.kill`` (Linux >= 5.14) SIGKILLs all of them at once, forks in flight included.
``cgroup.events`` reading ``populated 0`` proves they are gone.

Only used where it works: cgroup v2 mounted (alone or in the hybrid layout's
``unified`` hierarchy, found via ``/proc/self/mountinfo``), our own cgroup writable (in
practice: root, or a delegated subtree) and ``cgroup.kill`` present. Anything else is a
``CgroupUnavailable`` with the reason, and the caller falls back to process groups.
"""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TYPE_CHECKING

from ._procfs import read_file

if TYPE_CHECKING:
    from collections.abc import Callable

#: Prefix of the cgroups kill_switch creates, so that stale ones can be recognised.
PREFIX = "kill_switch-"


class CgroupUnavailable(Exception):
    """cgroup v2 cannot be used here; ``str()`` says why."""


def _unified_mount() -> tuple[str, str]:
    """``(mount point, mount root)`` of the cgroup v2 hierarchy."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise CgroupUnavailable(f"cannot read /proc/self/mountinfo: {exc}") from None
    for line in lines:
        # "id parent maj:min root mountpoint options [optional...] - fstype source super"
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        if right.split(" ", 1)[0] != "cgroup2":
            continue
        fields = left.split(" ")
        if len(fields) < 5:
            continue
        return _unescape(fields[4]), _unescape(fields[3])
    raise CgroupUnavailable("no cgroup v2 hierarchy is mounted")


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    if "\\" not in path:
        return path
    return path.encode().decode("unicode_escape")


def _own_cgroup() -> str:
    try:
        with open("/proc/self/cgroup", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise CgroupUnavailable(f"cannot read /proc/self/cgroup: {exc}") from None
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    raise CgroupUnavailable("this process is not in a cgroup v2 hierarchy")


class SessionCgroup:
    """One cgroup holding the processes of one session (a directory we created)."""

    __slots__ = ("_lock", "_procs_fd", "path")

    def __init__(self, path: str, procs_fd: int) -> None:
        self.path = path
        #: Open on ``cgroup.procs``: a child writes ``0`` to it before ``exec`` to move
        #: itself in, so it is inside before it can fork anything.
        self._procs_fd = procs_fd
        #: ``add`` runs on another thread (``add_soon``): it must never write to the fd
        #: number once ``remove`` has closed it (it may be reused by then).
        self._lock = threading.Lock()

    @classmethod
    def create(cls, name: str) -> SessionCgroup:
        """Create ``<our cgroup>/kill_switch-<name>``.

        Raises:
            CgroupUnavailable: cgroup v2 or ``cgroup.kill`` is missing, or not writable.
        """
        mount, root = _unified_mount()
        own = _own_cgroup()
        if root != "/" and own.startswith(root):
            own = own[len(root) :]
        elif root != "/":
            raise CgroupUnavailable(f"our cgroup {own!r} is outside the mounted root {root!r}")
        parent = os.path.join(mount, own.lstrip("/"))
        path = os.path.join(parent, PREFIX + name)
        try:
            os.mkdir(path, 0o755)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create {path}: {exc.strerror}") from None
        try:
            if not os.path.exists(os.path.join(path, "cgroup.kill")):
                raise CgroupUnavailable("cgroup.kill is missing (Linux < 5.14)")
            fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        except (OSError, CgroupUnavailable) as exc:
            _rmdir(path)
            if isinstance(exc, CgroupUnavailable):
                raise
            raise CgroupUnavailable(f"cannot open {path}/cgroup.procs: {exc.strerror}") from None
        return cls(path, fd)

    def enter_from_child(self) -> None:
        """Move the calling process into this cgroup (a ``preexec_fn``: one write(2))."""
        os.write(self._procs_fd, b"0")

    def add(self, pid: int) -> None:
        """Move the running process *pid* into this cgroup (what it forks from then on
        is born inside). Any thread.

        Raises:
            OSError: the write failed (the process has gone, no permission, or the
                cgroup was removed).
        """
        with self._lock:
            if self._procs_fd < 0:
                raise OSError(errno.ENOENT, "the cgroup was removed")
            os.write(self._procs_fd, str(pid).encode())

    def add_soon(self, pid: int, failed: Callable[[int, OSError], object]) -> None:
        """``add`` on the cgroup mover thread; ``failed(pid, error)`` there if it fails
        for another reason than the process having gone.

        A migration between cgroups takes milliseconds in the kernel (it waits for an
        RCU grace period), too long for an event loop's thread; one thread does them in
        order (``ThreadPoolExecutor``: nothing to hand-write).
        """

        def move() -> None:
            try:
                self.add(pid)
            except ProcessLookupError:
                pass  # exited already: nothing left to hold
            except OSError as exc:
                failed(pid, exc)

        _mover().submit(move)

    def procs(self) -> list[int]:
        """The pids in the cgroup now (empty if it is gone)."""
        return [int(x) for x in read_file(os.path.join(self.path, "cgroup.procs")).split()]

    def populated(self) -> bool:
        """Whether any process is still in the cgroup (``cgroup.events``)."""
        return b"populated 1" in read_file(os.path.join(self.path, "cgroup.events"))

    def kill(self) -> None:
        """SIGKILL every process in the cgroup at once (``cgroup.kill``).

        Raises:
            OSError: the write failed.
        """
        fd = os.open(os.path.join(self.path, "cgroup.kill"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)

    def remove(self) -> bool:
        """Remove the (empty) cgroup and close our fd; ``False`` if it is still busy."""
        with self._lock:
            if self._procs_fd >= 0 and not self.populated():
                os.close(self._procs_fd)
                self._procs_fd = -1
        if self._procs_fd >= 0:
            return False
        return _rmdir(self.path)


@cache
def _mover() -> ThreadPoolExecutor:
    """The one thread moving adopted processes into session cgroups (made on first use)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="kill_switch-cgroup")


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except OSError as exc:
        return exc.errno == errno.ENOENT
    return True
