"""Processes a session's code starts by other means than ``open_process`` are the
session's: seen through the audit and at-fork hooks, adopted, stopped with it (issue 13,
item 3).

Every test starts a real process tree the way tools do (``anyio.run_process``,
``subprocess.Popen`` in a worker thread, ``os.system``, ``asyncio`` on uvloop, which
spawns from C), kills the session mid-tool and checks in ``/proc`` that no process of the
tree is left. Negative controls: the same tree started outside the session's context is
not stopped (so the checks can fail), and a spawn that cannot be attributed makes the
report say so instead of "quiescent".
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import kill_switch as ks
from kill_switch._planes import _adopt
from kill_switch._planes._process_plane import ProcessPlane
from kill_switch.testing import MemoryAudit

from ._procs import (
    alive,
    cgroup_available,
    cgroup_of,
    kill_quietly,
    session_cgroups,
    wait_gone,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

pytestmark = pytest.mark.both_loops

#: A shell leader with two grandchildren, writing their pids to a file once they run.
TREE = "sleep 1000 & a=$!; sleep 1000 & echo $$ $a $! > {out}; wait"


def tree_pids(out: Path) -> list[int]:
    text = out.read_text() if out.exists() else ""
    return [int(x) for x in text.split()] if text.endswith("\n") else []


async def until_started(out: Path) -> list[int]:
    """The tree's three pids, once every one of them runs (state, not time)."""
    with anyio.fail_after(10):
        while not (pids := tree_pids(out)):  # noqa: ASYNC110 - the file is the only signal
            await anyio.sleep(0.005)
    return pids


async def kill_mid_tool(
    tool: Any, out: Path, *, audit: MemoryAudit | None = None
) -> tuple[ks.StopReport, list[int]]:
    """Run *tool* in a session, kill the session once the tree runs, return the report."""
    async with ks.Runtime(audit=audit, policy=ks.StopPolicy(term_grace=5.0)) as rt:
        async with rt.session("spawner") as session:
            session.start_soon(tool)
            pids = await until_started(out)
            handle = session.interrupt("stop the tree", trigger="operator")
            await anyio.sleep_forever()
        report = await handle
    return report, pids


def run_tree(out: Path) -> Any:
    """A tool running the tree with ``anyio.run_process`` (the way tools usually do)."""

    async def tool() -> None:
        await anyio.run_process(["sh", "-c", TREE.format(out=out)])

    return tool


async def check_stopped(report: ks.StopReport, pids: list[int]) -> None:
    try:
        await wait_gone(pids)  # bounded: raises if a process of the tree is left
    finally:
        kill_quietly(pids)
    assert report.quiescent, report.summary()
    assert report.unattributed == ()
    assert len(report.processes) == 1, report.processes
    (row,) = report.processes
    assert row.adopted
    assert row.pid == pids[0]
    assert set(row.members) == set(pids[1:])
    assert row.signals[0] == "SIGTERM"
    assert row.command[0] in ("sh", "/bin/sh"), row.command


async def test_anyio_run_process_tree_is_stopped_with_the_session(tmp_path: Path) -> None:
    """``anyio.run_process`` in a tool (on uvloop: spawned from C, seen at the fork)."""
    out = tmp_path / "pids"
    audit = MemoryAudit()
    report, pids = await kill_mid_tool(run_tree(out), out, audit=audit)
    await check_stopped(report, pids)
    started = [e for e in audit.events if e.kind == "process_started"]
    assert [e.details["pid"] for e in started] == [pids[0]]
    assert started[0].details["adopted"] is True
    assert started[0].details["via"]


async def test_popen_in_a_worker_thread_is_stopped_with_the_session(tmp_path: Path) -> None:
    """``subprocess.Popen`` in a sync tool on the thread plane (another thread's child)."""
    out = tmp_path / "pids"
    procs: list[subprocess.Popen[bytes]] = []

    def sync_tool() -> None:
        proc = subprocess.Popen(["sh", "-c", TREE.format(out=out)])
        procs.append(proc)
        proc.wait()

    async def tool() -> None:
        await ks.current_session().run_sync(sync_tool)  # type: ignore[union-attr]

    report, pids = await kill_mid_tool(tool, out)
    await check_stopped(report, pids)
    assert procs[0].returncode == -signal.SIGTERM  # its Popen reaped it, not us


async def test_os_system_in_a_worker_thread_is_stopped(tmp_path: Path) -> None:
    """``os.system`` blocks its thread until the tree is stopped; then the thread returns."""
    out = tmp_path / "pids"
    status: list[int] = []

    async def tool() -> None:
        session = ks.current_session()
        assert session is not None
        status.append(await session.run_sync(os.system, TREE.format(out=out)))

    report, pids = await kill_mid_tool(tool, out)
    await check_stopped(report, pids)
    assert [t.outcome for t in report.threads] in ([], ["returned"])


async def test_create_subprocess_exec_in_a_tool_is_stopped(tmp_path: Path) -> None:
    """``asyncio.create_subprocess_exec``: the tool's own transport, not the runtime's."""
    out = tmp_path / "pids"

    async def tool() -> None:
        proc = await asyncio.create_subprocess_exec("sh", "-c", TREE.format(out=out))
        await proc.wait()

    report, pids = await kill_mid_tool(tool, out)
    await check_stopped(report, pids)


async def test_an_orphan_of_an_adopted_process_is_held_by_the_cgroup(tmp_path: Path) -> None:
    """A tool's process whose child outlives it (the double fork of a daemon) is still
    the session's: moved into the session cgroup when adopted, it cannot reach PID 1."""
    if not cgroup_available():
        pytest.skip("no writable cgroup v2 here")  # CI runs as root with one
    out = tmp_path / "pids"
    ready = tmp_path / "ready"
    # The leader waits until the runtime has seen it, then daemonises a grandchild and
    # exits: the grandchild is reparented away from this process.
    script = f"while [ ! -e {ready} ]; do sleep 0.01; done; (sleep 1000 & echo $! > {out}) & wait"
    procs: list[subprocess.Popen[bytes]] = []

    async def tool() -> None:
        procs.append(subprocess.Popen(["sh", "-c", script]))  # noqa: ASYNC220 - the tool's way
        await anyio.sleep_forever()

    async with ks.Runtime() as rt:
        async with rt.session("daemoniser") as session:
            session.start_soon(tool)
            with anyio.fail_after(10):
                # Adopted on the loop, then moved into the cgroup by the mover thread.
                while not session.processes() or not _in_session_cgroup(procs[0].pid):  # noqa: ASYNC110
                    await anyio.sleep(0.005)
            ready.touch()
            await anyio.to_thread.run_sync(procs[0].wait, 10)
            with anyio.fail_after(10):
                while not out.exists() or not out.read_text().endswith("\n"):  # noqa: ASYNC110
                    await anyio.sleep(0.005)
            orphan = int(out.read_text())
            assert alive(orphan)
            assert _parent(orphan) != os.getpid()  # not ours: reparented
            handle = session.interrupt("stop", trigger="operator")
            await anyio.sleep_forever()
        report = await handle
    try:
        await wait_gone([orphan])
    finally:
        kill_quietly([orphan])
    assert report.quiescent, report.summary()


async def test_a_spawn_after_the_kill_is_refused(tmp_path: Path) -> None:
    """A sync tool that does not poll and spawns after the kill: ``Popen`` raises the
    session's ``Interrupted`` and nothing starts."""
    marker = tmp_path / "started"
    go = threading.Event()
    raised: list[BaseException] = []

    def late_spawner() -> None:
        go.wait(10)
        try:
            subprocess.Popen(["sh", "-c", f"touch {marker}"]).wait()
        except BaseException as exc:
            raised.append(exc)
            raise

    async with ks.Runtime(policy=ks.StopPolicy(thread_grace=10.0)) as rt:
        async with rt.session("late") as session:
            session.start_soon(session.run_sync, late_spawner)
            with anyio.fail_after(10):
                while not session.threads():  # noqa: ASYNC110
                    await anyio.sleep(0.005)
            handle = session.interrupt("stop", trigger="operator")
            go.set()
            await anyio.sleep_forever()
        report = await handle
    assert len(raised) == 1
    assert isinstance(raised[0], ks.Interrupted)
    assert not marker.exists()
    assert report.quiescent


async def test_a_tree_started_outside_the_sessions_context_is_not_stopped(
    tmp_path: Path,
) -> None:
    """Negative control: the same tree from an empty context (a framework's own worker)
    is not the session's, and the /proc checks above see it still running."""
    out = tmp_path / "pids"
    procs: list[subprocess.Popen[bytes]] = []

    async def tool() -> None:
        def outside() -> None:
            procs.append(
                subprocess.Popen(["sh", "-c", TREE.format(out=out)], start_new_session=True)
            )

        contextvars.Context().run(outside)
        await anyio.sleep_forever()

    report, pids = await kill_mid_tool(tool, out)
    try:
        assert all(alive(p) for p in pids)
        assert report.processes == ()
    finally:
        os.killpg(pids[0], signal.SIGKILL)
        procs[0].wait()
        await wait_gone(pids)


async def test_a_spawn_that_cannot_be_attributed_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the kernel does not list a thread's children, the stop names the spawn and
    is not quiescent (fault injected: the children file reads as missing)."""
    monkeypatch.setattr(_adopt, "thread_children", lambda _tid: None)
    out = tmp_path / "pids"
    report, pids = await kill_mid_tool(run_tree(out), out)
    kill_quietly(pids)
    await wait_gone(pids)
    assert not report.quiescent
    assert len(report.unattributed) == 1
    assert "cannot be found" in report.unattributed[0]
    assert "NOT attributed" in report.summary()


def _in_session_cgroup(pid: int) -> bool:
    with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
        return "/kill_switch-" in f.read()


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        data = f.read()
    return int(data[data.rfind(")") + 2 :].split()[1])


def test_the_hook_ignores_spawns_outside_any_session() -> None:
    """Outside a session the hooks do nothing: a plain ``subprocess.run`` works."""
    _adopt.install()
    assert subprocess.run([sys.executable, "-c", "pass"], check=False).returncode == 0


async def test_a_process_that_cannot_join_the_cgroup_is_audited_and_still_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injected: the move into the session cgroup fails (EACCES). The audit says
    so, and the tree is still found through /proc and stopped."""
    if not cgroup_available():
        pytest.skip("no writable cgroup v2 here")
    from kill_switch._planes import _cgroup

    def refuse(self: _cgroup.SessionCgroup, pid: int) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_cgroup.SessionCgroup, "add", refuse)
    out = tmp_path / "pids"
    audit = MemoryAudit()
    report, pids = await kill_mid_tool(run_tree(out), out, audit=audit)
    await check_stopped(report, pids)
    refused = [
        e.details
        for e in audit.events
        if e.kind == "process_containment" and e.details.get("pid") == pids[0]
    ]
    assert len(refused) == 1
    assert "Permission denied" in refused[0]["reason"]


# ----------------------------------------------------- a spawn pending across the stop


class _Gate:
    """Holds one thread's ``subprocess.Popen`` between its audit event and its fork."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.popen: list[subprocess.Popen[bytes]] = []
        self.returned = threading.Event()
        #: the spawning thread lives on until this is set (a pool's worker does): its
        #: children stay listed as its own
        self.leave = threading.Event()
        self.left = threading.Event()
        self.tid = 0  # the spawning thread's native id


#: Threads (ident) whose next ``subprocess.Popen`` event waits on their gate.
_gates: dict[int, _Gate] = {}
_gate_hook_added = False


def _gate_hook(event: str, args: tuple[Any, ...]) -> None:
    if event == "subprocess.Popen":
        gate = _gates.pop(threading.get_ident(), None)
        if gate is not None:
            gate.entered.set()
            gate.release.wait(30)


def _held_spawn(*, stay: bool) -> _Gate:
    """Start ``Popen(["sleep", "1000"])`` in a plain thread in the current (the
    session's) context, held after the runtime's audit hook has seen it and before the
    process exists.

    The seam is a second audit hook: hooks run in the order they were added, and the
    runtime's is added first, so the spawn is noted (pending on the session's process
    plane) while the fork has not happened yet.
    """
    global _gate_hook_added
    _adopt.install()
    if not _gate_hook_added:
        sys.addaudithook(_gate_hook)  # cannot be removed: inert for threads without a gate
        _gate_hook_added = True
    gate = _Gate()

    def spawn() -> None:
        gate.tid = threading.get_native_id()
        _gates[threading.get_ident()] = gate
        try:
            gate.popen.append(subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL))
        finally:
            _gates.pop(threading.get_ident(), None)
            gate.returned.set()
            if stay:
                gate.leave.wait(30)
            gate.left.set()

    ctx = contextvars.copy_context()  # the session's context: its spawn is the session's
    threading.Thread(target=ctx.run, args=(spawn,), daemon=True).start()
    return gate


@contextlib.asynccontextmanager
async def _pending_spawn(
    stop_timeout: float, *, stay: bool = True
) -> AsyncIterator[tuple[ks.Session, _Gate]]:
    """A session (its block in a task of its own, so that the interrupt does not cancel
    the caller) whose held spawn waits on its process plane; cleaned up after."""
    async with (
        ks.Runtime(policy=ks.StopPolicy(stop_timeout=stop_timeout)) as rt,
        anyio.create_task_group() as tg,
    ):
        gates: list[_Gate] = []

        async def agent(*, task_status: anyio.abc.TaskStatus[ks.Session]) -> None:
            async with rt.session("forking") as session:
                gates.append(_held_spawn(stay=stay))
                task_status.started(session)
                await anyio.sleep_forever()

        session = await tg.start(agent)
        (gate,) = gates
        try:
            assert await anyio.to_thread.run_sync(gate.entered.wait, 10)
            with anyio.fail_after(10):
                while (plane := _plane(session)) is None or not plane.spawns_pending():  # noqa: ASYNC110
                    await anyio.sleep(0.001)
            yield session, gate
        finally:
            await anyio.to_thread.run_sync(_reap, gate)
            tg.cancel_scope.cancel()


def _plane(session: ks.Session) -> ProcessPlane | None:
    plane = session._planes.get(ProcessPlane)
    return plane if isinstance(plane, ProcessPlane) else None


def _reap(gate: _Gate) -> None:
    """Test cleanup: let the spawn go, kill and wait for its child."""
    gate.release.set()
    gate.leave.set()
    assert gate.left.wait(10)
    for p in gate.popen:
        kill_quietly([p.pid])
        p.wait()


async def test_a_spawn_pending_at_the_stop_is_waited_for_then_adopted_and_killed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child still being forked when the interrupt is delivered: the stop waits for it,
    adopts and kills it, and only then says quiescent: its pid is in the report, dead."""
    monkeypatch.setattr(_adopt, "_GIVE_UP", 30.0)  # the search outlasts any slow machine
    async with _pending_spawn(stop_timeout=10.0) as (session, gate):
        plane = _plane(session)
        assert plane is not None
        handle = session.interrupt("stop", trigger="operator")
        with anyio.fail_after(10):
            while not plane.delivered:  # noqa: ASYNC110 - the plane's own state
                await anyio.sleep(0.001)
        assert plane.spawns_pending()  # delivered while the child did not exist yet
        assert not handle.done()
        gate.release.set()  # now the fork: the child appears after the delivery
        with anyio.fail_after(10):
            report = await handle
        # At the report the child no longer runs (a zombie until its Popen reaps it).
        assert await anyio.to_thread.run_sync(gate.returned.wait, 10)
        at_report = _state(gate.popen[0].pid)
    assert report.quiescent, report.summary()
    assert report.unattributed == ()
    (row,) = report.processes
    assert row.pid == gate.popen[0].pid
    assert row.adopted
    assert "SIGKILL" in row.signals  # tracked after the interrupt: killed at once
    assert at_report in ("Z", None), at_report


async def test_a_spawn_still_pending_at_the_stop_timeout_is_reported_not_quiescent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fork held past ``stop_timeout``: the report is not quiescent and names the spawn
    whose process had not appeared."""
    monkeypatch.setattr(_adopt, "_GIVE_UP", 30.0)
    async with _pending_spawn(stop_timeout=0.2) as (session, _gate):
        handle = session.interrupt("stop", trigger="operator")
        with anyio.fail_after(10):
            report = await handle  # the gate is still closed
    assert not report.quiescent
    (why,) = report.unattributed
    assert why.startswith("subprocess.Popen: sleep 1000"), why
    assert "had not appeared" in why
    assert "NOT attributed" in report.summary()


async def test_negative_control_without_the_wait_the_report_says_quiescent_too_early(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Negative control: with pending spawns ignored (the wait switched off), the stop
    resolves quiescent while the child is still coming, and the child then runs (seen in
    /proc) although the report named no process."""
    monkeypatch.setattr(_adopt, "_GIVE_UP", 30.0)
    async with _pending_spawn(stop_timeout=10.0) as (session, gate):
        monkeypatch.setattr(ProcessPlane, "spawns_pending", lambda self: False)
        handle = session.interrupt("stop", trigger="operator")
        with anyio.fail_after(10):
            report = await handle  # the gate is still closed
        # Let the fork go while this loop is held, so nothing adopts (and kills) the
        # child before /proc is read: blocking the loop on purpose, bounded.
        gate.release.set()
        assert gate.returned.wait(10)
        state = _state(gate.popen[0].pid)
    assert report.quiescent
    assert report.processes == ()
    assert report.unattributed == ()
    assert state not in ("Z", None), state  # running after a report that said quiescent


async def test_a_spawn_whose_thread_exits_before_its_child_is_found_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The spawning thread exits before the loop finds its child (which the kernel then
    hands to another thread) and the child runs: once the search gives up, the spawn is
    reported as not attributed instead of dropped, and the stop is not quiescent."""
    monkeypatch.setattr(_adopt, "_GIVE_UP", 0.2)  # within the stop's 10 s
    async with _pending_spawn(stop_timeout=10.0, stay=False) as (session, gate):
        # The fork and the thread's exit happen while this loop is held (bounded), so
        # the loop's next look at the thread's children finds the thread gone.
        gate.release.set()
        assert gate.left.wait(10)
        _until_thread_gone(gate.tid)
        handle = session.interrupt("stop", trigger="operator")
        with anyio.fail_after(10):
            report = await handle
        child = gate.popen[0].pid
        assert _state(child) not in ("Z", None)  # it runs: the report must not say quiet
    assert not report.quiescent
    (why,) = report.unattributed
    assert "exited before it was found" in why


def _until_thread_gone(tid: int) -> None:
    """Block until thread *tid* of this process has left the kernel's list (bounded)."""
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/self/task/{tid}"):
        assert time.monotonic() < deadline, f"thread {tid} still there"
        time.sleep(0.001)  # polling /proc: the kernel's word is the only signal


def _state(pid: int) -> str | None:
    """The process state letter from /proc (``None``: gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(")") + 2 :].split()[0]


# ------------------------------------------------------ the session cgroup's lifetime
# One cgroup per session, not per spawn: made at the session's first process, kept while
# it has none, removed when the block ends (or its stop's handle resolved), on every path.

needs_cgroup = pytest.mark.skipif(
    not cgroup_available(), reason="needs a writable cgroup v2 (CI runs as root with one)"
)


async def held_in(pid: int) -> str:
    """The session cgroup adopted *pid* was moved into (the mover thread moves it after
    the adoption: polled, bounded)."""
    with anyio.fail_after(10):
        while "/kill_switch-" not in (path := cgroup_of(pid)):  # noqa: ASYNC110 - no event
            await anyio.sleep(0.005)
    return os.path.basename(path)


async def held_and_gone(session: ks.Session) -> str:
    """Start a process the tool's way, wait until the session cgroup holds it, end it and
    wait until the session has seen it go; the cgroup's name."""
    async with await anyio.open_process(["sleep", "1000"]) as proc:
        try:
            name = await held_in(proc.pid)
        finally:
            proc.kill()
    with anyio.fail_after(10):
        while session.processes():  # noqa: ASYNC110 - untracked when its exit is seen
            await anyio.sleep(0.005)
    return name


def names(paths: list[str]) -> list[str]:
    return [os.path.basename(p) for p in paths]


async def two_spawns(*, wait_removed: bool) -> tuple[list[str], list[list[str]]]:
    """Two processes one after the other in one session: the cgroup each was held in,
    and the session cgroups there were once each had gone (*wait_removed*: once none)."""
    held: list[str] = []
    between: list[list[str]] = []
    async with ks.Runtime() as rt, rt.session("twice") as session:
        for _ in range(2):
            held.append(await held_and_gone(session))
            with anyio.fail_after(10):
                while wait_removed and session_cgroups():  # noqa: ASYNC110 - no event
                    await anyio.sleep(0.005)
            between.append(names(session_cgroups()))
    return held, between


@needs_cgroup
async def test_the_session_cgroup_is_kept_between_spawns() -> None:
    """Two processes started one after the other are held in the same session cgroup,
    which stays while the session has no process, and goes with the session."""
    held, between = await two_spawns(wait_removed=False)
    assert held[0] == held[1]
    assert between == [[held[0]], [held[0]]]
    assert session_cgroups() == []


@needs_cgroup
async def test_negative_control_a_cgroup_per_spawn_is_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Negative control: with the former lifetime (an idle plane drops its cgroup) each
    spawn gets a cgroup of its own, which the checks above see."""
    monkeypatch.setattr(ProcessPlane, "_keeps_cgroup", lambda _self: False)
    held, between = await two_spawns(wait_removed=True)
    assert held[0] != held[1]
    assert between == [[], []]
    assert session_cgroups() == []


@needs_cgroup
async def test_the_session_cgroup_is_removed_when_the_block_returns() -> None:
    """A block that returns after its processes ended: its cgroup is gone with it."""
    async with ks.Runtime() as rt:
        async with rt.session("done") as session:
            name = await held_and_gone(session)
            assert names(session_cgroups()) == [name]
        assert session.state == "finished"
        assert session_cgroups() == []


async def held_then_raise(session: ks.Session) -> None:
    """The block: a process held in the cgroup and gone, then an error."""
    async with session:
        name = await held_and_gone(session)
        assert names(session_cgroups()) == [name]
        raise RuntimeError("the tool failed")


@needs_cgroup
async def test_the_session_cgroup_is_removed_when_the_block_raises() -> None:
    """A block that raises after its processes ended: its cgroup is gone with it."""
    async with ks.Runtime() as rt:
        session = rt.session("fails")
        with pytest.raises(RuntimeError, match="the tool failed"):
            await held_then_raise(session)
        assert session.state == "failed"
        assert session_cgroups() == []


@needs_cgroup
async def test_the_session_cgroup_is_removed_after_a_kill(tmp_path: Path) -> None:
    """A session killed mid-tool: its cgroup is gone once the stop is over."""
    out = tmp_path / "pids"
    report, pids = await kill_mid_tool(run_tree(out), out)
    await check_stopped(report, pids)
    assert report.processes[0].containment == "cgroup"
    assert session_cgroups() == []


@needs_cgroup
async def test_the_session_cgroup_is_removed_after_the_blocks_own_stop(tmp_path: Path) -> None:
    """A block that returns while its tool's tree still runs stops it: the cgroup is gone
    once that stop is over."""
    out = tmp_path / "pids"
    tree = ["sh", "-c", TREE.format(out=out)]
    async with ks.Runtime(policy=ks.StopPolicy(term_grace=5.0)) as rt:
        async with rt.session("leaves") as session:
            await anyio.open_process(tree, stdin=None, stdout=None, stderr=None)
            pids = await until_started(out)
            assert len(session_cgroups()) == 1
        report = session.report
    assert report is not None
    await check_stopped(report, pids)
    assert session.state == "terminated"
    assert session_cgroups() == []


def still_populated(audit: MemoryAudit) -> list[ks.AuditEvent]:
    return [e for e in audit.events if e.details.get("result") == "still populated"]


@needs_cgroup
async def test_a_session_cgroup_an_orphan_keeps_is_audited(tmp_path: Path) -> None:
    """A process left running in the cgroup after the block returned (a daemon whose
    parent exited) keeps the cgroup: the audit names it (``still populated``)."""
    out = tmp_path / "pid"
    ready = tmp_path / "ready"
    script = f"while [ ! -e {ready} ]; do sleep 0.01; done; sleep 1000 & echo $! > {out}"
    audit = MemoryAudit()
    orphan = 0
    try:
        async with ks.Runtime(audit=audit) as rt:
            async with rt.session("daemoniser") as session:
                async with await anyio.open_process(["sh", "-c", script]) as proc:
                    await held_in(proc.pid)
                    ready.touch()
                    await proc.wait()
                with anyio.fail_after(10):
                    while session.processes() or not out.read_text().endswith("\n"):  # noqa: ASYNC110
                        await anyio.sleep(0.005)
                orphan = int(out.read_text())
            assert session.state == "finished"
            with anyio.fail_after(10):
                while not still_populated(audit):  # noqa: ASYNC110 - the audit is the signal
                    await anyio.sleep(0.01)
        (event,) = still_populated(audit)
        assert event.details["pids"] == [orphan]
        assert names(session_cgroups()) == [os.path.basename(event.details["path"])]
    finally:
        kill_quietly([orphan] if orphan else [])
        await wait_gone([orphan] if orphan else [])
        for path in session_cgroups():
            os.rmdir(path)
