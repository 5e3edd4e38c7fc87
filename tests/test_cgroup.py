"""The session cgroup: created, entered, watched through inotify, killed and removed."""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import TYPE_CHECKING

import anyio
import pytest

from kill_switch._planes import _cgroup

from ._procs import WAIT, no_zombies_no_leaks

if TYPE_CHECKING:
    from collections.abc import Iterator


def _create(name: str) -> _cgroup.SessionCgroup | None:
    try:
        return _cgroup.SessionCgroup.create(f"test-{os.getpid()}-{name}")
    except _cgroup.CgroupUnavailable:
        return None


_probe = _create("probe")
HAVE_CGROUP = _probe is not None and _probe.remove()
pytestmark = pytest.mark.skipif(not HAVE_CGROUP, reason="needs a writable cgroup v2")


@pytest.fixture
def cgroup() -> Iterator[_cgroup.SessionCgroup]:
    """A fresh session cgroup, removed (and its fds closed) afterwards."""
    with no_zombies_no_leaks():
        cg = _create(os.urandom(4).hex())
        assert cg is not None
        try:
            yield cg
        finally:
            if cg.populated():
                cg.kill()
            # Each process leaves the cgroup as it is reaped (the tests reap theirs).
            assert cg.remove()


def _spawn_into(cg: _cgroup.SessionCgroup) -> subprocess.Popen[bytes]:
    # Started by hand into the cgroup, as the process plane does.
    return subprocess.Popen(["sleep", "1000"], preexec_fn=cg.enter_from_child)


async def test_watch_reports_populated_and_then_empty(cgroup: _cgroup.SessionCgroup) -> None:
    """inotify reports the cgroup filling and emptying, each time with the file's state."""
    seen: list[bool] = []
    changed = asyncio.Event()

    def callback(populated: bool) -> None:
        seen.append(populated)
        changed.set()

    assert cgroup.watch(asyncio.get_running_loop(), callback)
    assert not cgroup.populated()
    proc = _spawn_into(cgroup)
    try:
        assert cgroup.populated()
        with anyio.fail_after(WAIT):
            while not seen or not seen[-1]:
                await changed.wait()
                changed.clear()
        proc.kill()
        with anyio.fail_after(WAIT):
            while seen[-1]:
                await changed.wait()
                changed.clear()
    finally:
        proc.kill()
        proc.wait()
    assert not cgroup.populated()
    cgroup.unwatch()


async def test_one_inotify_per_loop_closed_with_its_last_watch() -> None:
    """Two cgroups on one loop share one inotify fd, closed when both are removed."""
    loop = asyncio.get_running_loop()
    with no_zombies_no_leaks():
        a, b = _create("a"), _create("b")
        assert a is not None
        assert b is not None
        assert a.watch(loop, lambda _p: None)
        assert b.watch(loop, lambda _p: None)
        inotify = _cgroup._Inotify._by_loop[loop]
        assert inotify.users == 2
        assert a.remove()
        assert _cgroup._Inotify._by_loop[loop] is inotify
        assert b.remove()
        assert loop not in _cgroup._Inotify._by_loop


def test_kill_empties_the_cgroup(cgroup: _cgroup.SessionCgroup) -> None:
    """cgroup.kill SIGKILLs every process in it, and populated() then reads false."""
    procs = [_spawn_into(cgroup) for _ in range(3)]
    assert sorted(cgroup.procs()) == sorted(p.pid for p in procs)
    cgroup.kill()
    assert [p.wait(timeout=WAIT) for p in procs] == [-9, -9, -9]
    assert not cgroup.populated()
