"""The one /proc reader, checked against psutil (an independent reader) on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import psutil
import pytest

from kill_switch._planes import _procfs

from ._procs import killpg_quietly

if TYPE_CHECKING:
    from collections.abc import Iterator

#: A child that prints its own pid once it runs (after its exec: its command line is final).
#: One os.write per line: two children share the pipe, and print() may split a line in
#: two writes (unbuffered stdout), which would interleave.
CHILD = 'import os, time; os.write(1, b"%d\\n" % os.getpid()); time.sleep(1000)'
#: A leader (in a process group of its own) with two such children, waiting for them.
#: The marker variable is inherited by all three.
TREE = f"{sys.executable} -c '{CHILD}' & {sys.executable} -c '{CHILD}' & wait"
MARKER = "KILL_SWITCH_PROCFS_TEST"


@pytest.fixture
def tree() -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """A real shell leader and its two children, killed and reaped afterwards."""
    env = {**os.environ, MARKER: "tree-1"}
    proc = subprocess.Popen(
        ["sh", "-c", TREE], stdout=subprocess.PIPE, env=env, start_new_session=True
    )
    assert proc.stdout is not None
    try:
        kids = [int(proc.stdout.readline()), int(proc.stdout.readline())]
        yield proc, kids
    finally:
        killpg_quietly(proc.pid)  # the whole tree: it has a session of its own
        proc.wait()
        proc.stdout.close()


def test_stat_matches_psutil(tree: tuple[subprocess.Popen[bytes], list[int]]) -> None:
    """State, parent and process group agree with psutil for a leader and its children."""
    proc, kids = tree
    for pid in [proc.pid, *kids]:
        st = _procfs.stat(pid)
        assert st is not None
        p = psutil.Process(pid)
        assert (st.ppid, st.pgid) == (p.ppid(), os.getpgid(pid))
        assert st.pgid == proc.pid  # the leader's new session made it the group leader
        assert _procfs.alive(pid)
        assert not _procfs.zombie(pid)


def test_children_descendants_and_scan(tree: tuple[subprocess.Popen[bytes], list[int]]) -> None:
    """children/descendants/scan find the same tree psutil does."""
    proc, kids = tree
    expect = sorted(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
    assert sorted(kids) == expect
    assert sorted(_procfs.children(proc.pid)) == expect
    assert sorted(_procfs.descendants(proc.pid)) == expect
    table = _procfs.scan()
    assert {proc.pid, *kids} <= table.keys()
    assert _procfs.descendants_in(table, proc.pid) == set(expect)
    mine = _procfs.descendants_in(table, os.getpid())
    assert {proc.pid, *kids} <= mine


def test_command_line_and_environment(tree: tuple[subprocess.Popen[bytes], list[int]]) -> None:
    """cmdline, command and the environment agree with psutil."""
    proc, kids = tree
    assert list(_procfs.cmdline(proc.pid)) == psutil.Process(proc.pid).cmdline()
    assert _procfs.cmdline(kids[0]) == (sys.executable, "-c", CHILD)
    assert _procfs.command(kids[0]) == f"{sys.executable} -c {CHILD}"[:60]
    assert _procfs.command(proc.pid, width=5) == "sh -c"
    for pid in [proc.pid, *kids]:
        assert _procfs.environ_value(pid, MARKER) == "tree-1"
        assert _procfs.has_in_environ(pid, f"{MARKER}=tree-1".encode())
    assert _procfs.environ_value(proc.pid, "KILL_SWITCH_NO_SUCH_VARIABLE") is None
    assert not _procfs.has_in_environ(os.getpid(), f"{MARKER}=tree-1".encode())


def test_start_time_is_between_the_clock_readings_around_the_spawn() -> None:
    """start_time of a fresh process lies between time.time() before and after spawning."""
    before = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    after = time.time()
    try:
        start = _procfs.start_time(proc.pid)
        assert start is not None
        slack = 2 * _procfs.START_RESOLUTION
        assert before - slack <= start <= after + slack
    finally:
        proc.communicate(b"")


def test_a_zombie_is_not_alive_and_keeps_its_name() -> None:
    """An unreaped child is a zombie: not alive, still in a zombies scan, labelled by name."""
    proc = subprocess.Popen(["sleep", "0"])
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, left unreaped
        assert _procfs.zombie(proc.pid)
        assert not _procfs.alive(proc.pid)
        assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
        assert proc.pid in _procfs.scan(zombies=True)
        assert proc.pid not in _procfs.scan()
        assert _procfs.cmdline(proc.pid) == ()
        assert _procfs.command(proc.pid) == "sleep"
    finally:
        proc.wait()


def test_a_gone_pid_reads_as_gone() -> None:
    """After reaping, every reader answers 'gone' instead of raising."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    pid = proc.pid
    assert _procfs.stat(pid) is None
    assert not _procfs.alive(pid)
    assert not _procfs.zombie(pid)
    assert _procfs.children(pid) == []
    assert _procfs.descendants(pid) == []
    assert _procfs.cmdline(pid) == ()
    assert _procfs.command(pid) == "?"
    assert _procfs.environ_value(pid, MARKER) is None
    assert _procfs.start_time(pid) is None
    assert _procfs.read_file(f"/proc/{pid}/stat") == b""


def test_stat_survives_a_command_name_with_spaces_and_parentheses() -> None:
    """A comm like 'a) b (c' does not shift the fields (stat is parsed from the last ')')."""
    code = (
        "import ctypes, sys; ctypes.CDLL(None).prctl(15, b'a) b (c', 0, 0, 0); "
        "print('named', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"named\n"  # PR_SET_NAME done
        assert _procfs.read_file(f"/proc/{proc.pid}/comm") == b"a) b (c\n"
        st = _procfs.stat(proc.pid)
        assert st is not None
        assert st.state in ("R", "S")
        assert (st.ppid, st.pgid) == (os.getpid(), os.getpgid(0))
    finally:
        proc.communicate(b"")
