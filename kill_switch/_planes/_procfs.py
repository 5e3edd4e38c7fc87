"""The one reader of ``/proc``: a process as the kernel sees it.

Everything here reads small kernel files with plain ``os`` calls and answers "gone"
(``None``, ``b""``, ``False``, an empty list) instead of raising when a process ends
between two reads, which on a live table happens all the time. Linux only, like the
rest of the process plane.

Hand-written rather than psutil (which would be a new dependency for a handful of
reads): the stop path needs three fields of ``stat``, the ``children`` files and one
variable of ``environ`` per pid, read straight from the files.
"""

from __future__ import annotations

import os
import time
from typing import Final, NamedTuple

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
#: A process's start time is known to one clock tick.
START_RESOLUTION: Final = 1.0 / _CLK_TCK


class Stat(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` kill_switch reads."""

    #: one letter: ``R``, ``S``, ``D``, ``T``, ``Z`` (zombie), ``X`` (dead), ...
    state: str
    ppid: int
    pgid: int


def read_file(path: str) -> bytes:
    """The contents of a small kernel file, or ``b""`` if it cannot be read."""
    # os.open/os.read: a third of the cost of open() on these small kernel files.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        chunks: list[bytes] = []
        while True:
            data = os.read(fd, 65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _fields(pid: int, maxsplit: int = -1) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first)."""
    data = read_file(f"/proc/{pid}/stat")
    if not data:
        return None
    # "pid (comm) state ppid pgrp ..."; comm may hold spaces and parentheses.
    return data[data.rfind(b")") + 2 :].split(b" ", maxsplit)


def stat(pid: int) -> Stat | None:
    """``(state, ppid, pgid)`` of *pid*, or ``None`` if it is gone."""
    fields = _fields(pid, 3)  # the scan reads every pid: split no further than needed
    if fields is None or len(fields) < 3:
        return None
    return Stat(fields[0].decode(), int(fields[1]), int(fields[2]))


def alive(pid: int) -> bool:
    """Whether *pid* exists and is not a zombie (a zombie runs nothing; it waits to be
    reaped)."""
    st = stat(pid)
    return st is not None and st.state not in ("Z", "X")


def zombie(pid: int) -> bool:
    """Whether *pid* is a zombie: exited, not yet reaped by its parent."""
    st = stat(pid)
    return st is not None and st.state == "Z"


def children(pid: int) -> list[int]:
    """Direct children of *pid* (``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        out.extend(int(x) for x in read_file(f"/proc/{pid}/task/{tid}/children").split())
    return out


def thread_children(tid: int) -> list[int] | None:
    """The children forked by thread *tid* of this process, or ``None`` where the kernel
    does not list them (no ``CONFIG_PROC_CHILDREN``) or the thread has gone."""
    path = f"/proc/self/task/{tid}/children"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return [int(x) for x in os.read(fd, 65536).split()]
    except OSError:
        return None
    finally:
        os.close(fd)


def descendants(pid: int) -> list[int]:
    """Every live descendant of *pid*, found through the ``children`` files (no scan)."""
    seen: list[int] = []
    todo = children(pid)
    while todo:
        child = todo.pop()
        if child in seen:
            continue
        seen.append(child)
        todo.extend(children(child))
    return seen


def scan(*, zombies: bool = False) -> dict[int, Stat]:
    """Every live process (and every zombie, with *zombies*): pid → its :class:`Stat`."""
    out: dict[int, Stat] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit():
            pid = int(name)
            st = stat(pid)
            if st is not None and st.state != "X" and (zombies or st.state != "Z"):
                out[pid] = st
    return out


def descendants_in(table: dict[int, Stat], root: int) -> set[int]:
    """The descendants of *root* in a :func:`scan` table (zombies included if it has them)."""
    kids: dict[int, list[int]] = {}
    for pid, st in table.items():
        kids.setdefault(st.ppid, []).append(pid)
    out: set[int] = set()
    todo = list(kids.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(kids.get(pid, ()))
    return out


def cmdline(pid: int) -> tuple[str, ...]:
    """*pid*'s arguments (empty for a zombie, a kernel thread, or a process gone)."""
    data = read_file(f"/proc/{pid}/cmdline")
    return tuple(os.fsdecode(a) for a in data.split(b"\0") if a)


def command(pid: int, width: int = 60) -> str:
    """A one-line label for *pid*: its command line, else (a zombie) its name; ``?``."""
    raw = read_file(f"/proc/{pid}/cmdline").replace(b"\0", b" ").strip()
    if not raw:  # a zombie has no command line left; its name is in stat
        data = read_file(f"/proc/{pid}/stat")
        raw = data[data.find(b"(") + 1 : data.rfind(b")")]
    return raw.decode(errors="replace")[:width] or "?"


def has_in_environ(pid: int, entry: bytes) -> bool:
    """Whether *entry* (``b"NAME=value"``) occurs in *pid*'s initial environment."""
    return entry in read_file(f"/proc/{pid}/environ")


def environ_value(pid: int, name: str) -> str | None:
    """The value of *name* in *pid*'s initial environment, or ``None``."""
    prefix = f"{name}=".encode()
    for item in read_file(f"/proc/{pid}/environ").split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None


def start_time(pid: int) -> float | None:
    """Wall-clock start time of *pid* (``time.time()`` scale), or ``None`` if it is gone.

    ``/proc/<pid>/stat`` gives it in clock ticks since boot; ``btime`` (whole seconds,
    and drifting from the wall clock on virtual machines) is not precise enough, so the
    age is taken against ``CLOCK_BOOTTIME`` now, the clock those ticks count on.
    """
    fields = _fields(pid)
    if fields is None:
        return None
    try:
        ticks = int(fields[19])
    except (IndexError, ValueError):
        return None
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / _CLK_TCK
    return time.time() - age
