"""Process helpers the tests share: is a pid running, wait until pids are gone, clean up.

Built on ``kill_switch._planes._procfs``, the package's one ``/proc`` reader;
``tests/test_procfs.py`` checks that reader against psutil, an independent one, so a
test that trusts these helpers does not trust the code under test blindly.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

import anyio
import psutil

from kill_switch._planes import _cgroup, _procfs

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Bound on every wait for a process to go (a hang guard, never a timing claim).
WAIT = 10.0


def alive(pid: int) -> bool:
    """The pid runs (a zombie has stopped running)."""
    return _procfs.alive(pid)


def zombie(pid: int) -> bool:
    """The pid has exited and waits to be reaped by its parent."""
    return _procfs.zombie(pid)


def kill_quietly(pids: list[int]) -> None:
    """SIGKILL each pid that is still there (test cleanup)."""
    for pid in pids:
        with suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def killpg_quietly(pgid: int) -> None:
    """SIGKILL a process group if it is still there (test cleanup)."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def wait_gone(pids: list[int]) -> None:
    """Wait until every pid has exited (pidfds: no polling, and not only our children).

    Raises:
        TimeoutError: a pid is still there after ``WAIT`` seconds.
    """
    with anyio.fail_after(WAIT):
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                await anyio.wait_readable(fd)
            finally:
                os.close(fd)


def zombie_children() -> list[int]:
    """This process's descendants that are zombies (exited, never reaped)."""
    me = os.getpid()
    table = _procfs.scan(zombies=True)
    return sorted(pid for pid in _procfs.descendants_in(table, me) if table[pid].state == "Z")


@contextmanager
def no_zombies_no_leaks() -> Iterator[None]:
    """Around a test: no ``<defunct>`` children after it, the fd count back to baseline."""
    me = psutil.Process()
    before = me.num_fds()
    yield
    # An inotify instance is closed on the cgroup mover thread: done before counting.
    assert _cgroup.drain(WAIT), "the cgroup mover thread is stuck"
    zombies = zombie_children()
    assert zombies == [], f"zombie children left: {zombies}"
    assert me.num_fds() == before, "file descriptors leaked"


def cgroup_available() -> bool:
    """Whether a session cgroup can be made here (cgroup v2, writable)."""
    try:
        cg = _cgroup.SessionCgroup.create(f"probe-{os.getpid()}")
    except _cgroup.CgroupUnavailable:
        return False
    cg.remove()
    return True


def session_cgroups(pid: int | None = None) -> list[str]:
    """The session cgroups process *pid* (default: this one) made that are still there:
    their paths (a session cgroup is named ``kill_switch-<pid>-<random>``)."""
    try:
        parent = _cgroup.parent_dir()
    except _cgroup.CgroupUnavailable:
        return []
    prefix = f"{_cgroup.PREFIX}{os.getpid() if pid is None else pid}-"
    return sorted(os.path.join(parent, d) for d in os.listdir(parent) if d.startswith(prefix))


def cgroup_of(pid: int) -> str:
    """The cgroup v2 path of *pid* (``/proc/<pid>/cgroup``'s ``0::`` line); ``""`` if
    it has gone."""
    text = _procfs.read_file(f"/proc/{pid}/cgroup").decode()
    return next((line[3:] for line in text.splitlines() if line.startswith("0::")), "")
