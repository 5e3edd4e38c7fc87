"""A per-session cgroup v2: the airtight way to find and kill a session's processes.

A process cannot leave a cgroup by ``setsid()`` or a double fork, so the cgroup holds
every descendant of every process kill_switch started for the session, and
``cgroup.kill`` (Linux >= 5.14) SIGKILLs all of them at once, forks in flight included.
``cgroup.events`` reading ``populated 0`` proves they are gone; the kernel reports each
change of that file to inotify, so the plane is told when the last process has left
instead of reading the file over and over.

Only used where it works: cgroup v2 mounted (alone or in the hybrid layout's
``unified`` hierarchy, found via ``/proc/self/mountinfo``), our own cgroup writable (in
practice: root, or a delegated subtree) and ``cgroup.kill`` present. Anything else is a
``CgroupUnavailable`` with the reason, and the caller falls back to process groups.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TYPE_CHECKING, Final

from ._procfs import alive, read_file

if TYPE_CHECKING:
    import asyncio
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


def parent_dir() -> str:
    """The directory of our own cgroup, where session cgroups are made.

    Raises:
        CgroupUnavailable: no cgroup v2 hierarchy, or our cgroup is outside its mount.
    """
    mount, root = _unified_mount()
    own = _own_cgroup()
    if root != "/" and own.startswith(root):
        own = own[len(root) :]
    elif root != "/":
        raise CgroupUnavailable(f"our cgroup {own!r} is outside the mounted root {root!r}")
    return os.path.join(mount, own.lstrip("/"))


class SessionCgroup:
    """One cgroup holding the processes of one session (a directory we created).

    Loop thread only, except ``kill()`` and ``add()`` (any thread).
    """

    __slots__ = ("_events_fd", "_lock", "_procs_fd", "_watch", "path")

    def __init__(self, path: str, procs_fd: int, events_fd: int) -> None:
        self.path = path
        #: Open on ``cgroup.procs``: a child writes ``0`` to it before ``exec`` to move
        #: itself in, so it is inside before it can fork anything.
        self._procs_fd = procs_fd
        #: ``add`` runs on another thread (``add_soon``): it must never write to the fd
        #: number once ``remove`` has closed it (it may be reused by then).
        self._lock = threading.Lock()
        #: Open on ``cgroup.events``: ``populated()`` is one pread(2), not open/read/close.
        self._events_fd = events_fd
        self._watch: tuple[_Inotify, int] | None = None

    @classmethod
    def create(cls, name: str) -> SessionCgroup:
        """Create ``<our cgroup>/kill_switch-<name>``.

        Raises:
            CgroupUnavailable: cgroup v2 or ``cgroup.kill`` is missing, or not writable.
        """
        path = os.path.join(parent_dir(), PREFIX + name)
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
        try:
            events = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(fd)
            _rmdir(path)
            raise CgroupUnavailable(f"cannot open {path}/cgroup.events: {exc.strerror}") from None
        return cls(path, fd, events)

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
                if exc.errno == errno.ENOENT and not alive(pid):
                    return  # the session ended (its cgroup removed) after this one exited
                failed(pid, exc)

        _mover().submit(move)

    def procs(self) -> list[int]:
        """The pids in the cgroup now (empty if it is gone)."""
        return [int(x) for x in read_file(os.path.join(self.path, "cgroup.procs")).split()]

    def populated(self) -> bool:
        """Whether any process is still in the cgroup (``cgroup.events``)."""
        if self._events_fd < 0:
            return b"populated 1" in read_file(os.path.join(self.path, "cgroup.events"))
        try:
            # A kernfs file is generated afresh by a read at offset 0.
            return b"populated 1" in os.pread(self._events_fd, 256, 0)
        except OSError:
            return False

    def watch(self, loop: asyncio.AbstractEventLoop, callback: Callable[[bool], None]) -> bool:
        """Call ``callback(populated)`` on *loop* whenever ``cgroup.events`` changes.

        One inotify instance per event loop serves every session cgroup on it. ``False``
        if inotify cannot be had here (no ``inotify_init1``, instance limit): the caller
        then polls ``populated()``.
        """
        if self._watch is not None:
            return True
        try:
            inotify = _Inotify.for_loop(loop)
        except OSError:
            return False
        try:
            wd = inotify.add(
                os.path.join(self.path, "cgroup.events"), lambda: callback(self.populated())
            )
        except OSError:
            inotify.release()
            return False
        self._watch = (inotify, wd)
        return True

    def unwatch(self) -> None:
        """Stop the ``watch`` callbacks (idempotent)."""
        if self._watch is not None:
            inotify, wd = self._watch
            self._watch = None
            inotify.remove(wd)

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

    def remove_when_empty(self, timeout: float) -> bool:
        """Remove the directory once no process is left in it, waiting up to *timeout*
        seconds; ``False`` if it is still populated then. Any thread: it blocks (the
        watchdog's, before ``os._exit``). Leaves the fds and the watch alone: the loop
        may still hold them, and the process is about to exit.
        """
        deadline = time.monotonic() + timeout
        delay = 0.001
        while self.populated():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.02)
        return _rmdir(self.path)

    def remove(self) -> bool:
        """Remove the (empty) cgroup and close our fds; ``False`` if it is still busy."""
        with self._lock:
            if self._procs_fd >= 0 and not self.populated():
                self.unwatch()
                os.close(self._procs_fd)
                self._procs_fd = -1
                os.close(self._events_fd)
                self._events_fd = -1
        if self._procs_fd >= 0:
            return False
        return _rmdir(self.path)


@cache
def _mover() -> ThreadPoolExecutor:
    """The one thread moving adopted processes into session cgroups (made on first use)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="kill_switch-cgroup")


def close_soon(fd: int) -> None:
    """Close *fd* on the mover thread (now, on this one, once the interpreter is
    shutting down). Nothing else may use *fd* from now on."""
    try:
        _mover().submit(os.close, fd)
    except RuntimeError:  # no new futures at interpreter shutdown
        os.close(fd)


def drain(timeout: float) -> bool:
    """Wait until the mover thread has done what was handed to it so far; ``False`` if
    it had not within *timeout* seconds. Any thread but the mover's (tests, shutdown)."""
    try:
        _mover().submit(lambda: None).result(timeout)
    except TimeoutError:
        return False
    return True


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except OSError as exc:
        return exc.errno == errno.ENOENT
    return True


# ------------------------------------------------------------------------------ inotify

_IN_MODIFY: Final = 0x00000002
_IN_Q_OVERFLOW: Final = 0x00004000
_EVENT: Final = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library's inotify calls.

    Hand-written through ctypes: the standard library has no inotify binding, and the
    packages that have one (inotify_simple, ...) wrap these same three calls, which a
    new dependency would buy nothing over.

    Raises:
        OSError: there is no inotify in this C library.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    except AttributeError:
        raise OSError(errno.ENOSYS, "no inotify in this C library") from None
    return libc


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class _Inotify:
    """One inotify instance of one event loop: its reader dispatches by watch descriptor.

    It lives while a watch is on it (the last ``remove`` closes it), so that a loop that
    ends leaves no fd behind. Loop thread only.
    """

    _by_loop: dict[asyncio.AbstractEventLoop, _Inotify] = {}  # noqa: RUF012 - a registry

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop = loop
        self.fd = fd
        self.callbacks: dict[int, Callable[[], None]] = {}
        self.users = 0

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop) -> _Inotify:
        """The loop's instance, created on first use (call ``release`` or ``remove``).

        Raises:
            OSError: no inotify here, or no instance left (``fs.inotify.max_user_instances``).
        """
        inotify = cls._by_loop.get(loop)
        if inotify is None:
            fd = _check(_libc().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
            inotify = cls._by_loop[loop] = cls(loop, fd)
            loop.add_reader(fd, inotify._ready)
        inotify.users += 1
        return inotify

    def add(self, path: str, callback: Callable[[], None]) -> int:
        """Watch *path* for modification; its watch descriptor.

        Raises:
            OSError: the watch could not be added (``fs.inotify.max_user_watches``).
        """
        wd = _check(_libc().inotify_add_watch(self.fd, os.fsencode(path), _IN_MODIFY))
        self.callbacks[wd] = callback
        return wd

    def remove(self, wd: int) -> None:
        """Drop watch *wd* and this user (the file may be gone already: that drops it)."""
        if self.callbacks.pop(wd, None) is not None:
            _libc().inotify_rm_watch(self.fd, wd)  # EINVAL when the file is gone: fine
        self.release()

    def release(self) -> None:
        """One user less; the last one closes the instance (on the mover thread)."""
        self.users -= 1
        if self.users <= 0 and self._by_loop.get(self.loop) is self:
            del self._by_loop[self.loop]
            self.loop.remove_reader(self.fd)
            # Closing an inotify instance waits in the kernel for an SRCU grace period
            # (p50 ~4 ms, up to 35 ms measured): not on the loop's thread.
            close_soon(self.fd)

    def _ready(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # BlockingIOError: another reader took them
            return
        fired: list[int] = []
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            if mask & _IN_Q_OVERFLOW:
                fired = list(self.callbacks)  # events were lost: tell every watcher
                break
            if wd not in fired:
                fired.append(wd)
        for wd in fired:
            callback = self.callbacks.get(wd)
            if callback is not None:
                callback()
