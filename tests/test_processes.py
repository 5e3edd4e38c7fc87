"""The process plane: real process trees stopped by a session's interrupt (FAULTS 24-32)."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

import anyio
import psutil
import pytest

import kill_switch as ks
from kill_switch import EscalationPolicy, EscalationWarning
from kill_switch._planes import _cgroup, _procfs
from kill_switch.testing import MemoryAudit

from ._procs import (
    WAIT,
    alive,
    cgroup_available,
    kill_quietly,
    no_zombies_no_leaks,
    session_cgroups,
    wait_gone,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

PY = sys.executable
# Without a cgroup the plane must still find escapees (the /proc scan).
NO_CGROUP = EscalationPolicy(cgroup=False)

#: A leader with three grandchildren, each printing its pid once it runs.
TREE = "for i in 1 2 3; do sleep 1000 & echo $!; done; wait"

#: A leader whose child setsid()s (leaves the group), then prints its pid.
SETSID = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    print(os.getpid(), flush=True)
    time.sleep(1000)
    os._exit(0)
time.sleep(1000)
"""


HAVE_CGROUP = cgroup_available()
BOTH = pytest.mark.parametrize(
    "escalation",
    [
        pytest.param(EscalationPolicy(), id="cgroup-if-available"),
        pytest.param(NO_CGROUP, id="process-group"),
    ],
)


def cgroups_left() -> list[str]:
    """The session cgroups this process created that are still there."""
    return session_cgroups()


@pytest.fixture(autouse=True)
def clean_after() -> Iterator[None]:
    """After every test: no <defunct> children, fd count back to baseline, no cgroup."""
    with no_zombies_no_leaks():
        yield
    left = cgroups_left()
    assert left == [], f"cgroups left: {left}"


@asynccontextmanager
async def running(
    audit: MemoryAudit | None = None, term_grace: float = 5.0
) -> AsyncIterator[ks.Runtime]:
    async with ks.Runtime(audit=audit, policy=ks.StopPolicy(term_grace=term_grace)) as rt:
        yield rt


async def read_lines(proc: ks.TrackedProcess, n: int) -> list[str]:
    """Read *n* lines from the process's stdout (synchronising on its state)."""
    assert proc.stdout is not None
    buf = b""
    while buf.count(b"\n") < n:
        buf += await proc.stdout.receive()
    return buf.decode().split("\n")[:n]


async def stop_with(
    runtime: ks.Runtime,
    command: list[str],
    escalation: EscalationPolicy,
    lines: int,
    before_interrupt: Callable[[ks.Session], object] | None = None,
) -> tuple[ks.StopReport, list[str], ks.TrackedProcess]:
    """Start *command* in a session, read *lines* lines, interrupt, return the report."""
    holder: dict[str, Any] = {}
    ready = anyio.Event()

    async def body() -> None:
        async with runtime.session("tool-runner") as session:
            proc = await session.open_process(command, escalation=escalation)
            holder["proc"] = proc
            holder["lines"] = await read_lines(proc, lines)
            holder["session"] = session
            if before_interrupt is not None:
                before_interrupt(session)
            ready.set()
            await proc.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(body)
        await ready.wait()
        report = await holder["session"].interrupt("stop it", trigger="operator")
    return report, holder["lines"], holder["proc"]


# ------------------------------------------------------------------- FAULT 24: trees


@BOTH
async def test_interrupt_kills_leader_and_grandchildren(escalation: EscalationPolicy) -> None:
    """An interrupt leaves no process of a tool's tree alive and reaps the leader."""
    async with running() as rt:
        report, lines, proc = await stop_with(rt, ["sh", "-c", TREE], escalation, 3)
    grandchildren = [int(x) for x in lines]
    assert not any(alive(p) for p in [proc.pid, *grandchildren])
    (rep,) = report.processes
    assert rep.pid == proc.pid
    assert rep.pgid == proc.pid
    assert rep.signals == ("SIGTERM",)
    assert rep.returncode == -signal.SIGTERM
    # Members are looked for after the SIGTERM, not before it: one that went at once is
    # not listed. Those listed are the tree's, and none of the tree is left.
    assert set(rep.members) <= set(grandchildren)
    assert rep.seconds_to_exit is not None
    assert not rep.survived
    assert report.outcome == "stopped"
    assert report.quiescent
    expected = "cgroup" if escalation.cgroup and HAVE_CGROUP else "process_group"
    assert rep.containment == expected


def test_negative_control_grandchild_survives_plain_kill() -> None:
    """Without a process group of its own, killing the child leaves the grandchild."""
    proc = subprocess.Popen(["sh", "-c", "sleep 1000 & echo $!; wait"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    try:
        proc.kill()
        proc.wait()
        assert alive(grandchild), "the survivor check cannot fail: it proves nothing"
    finally:
        kill_quietly([grandchild])
        proc.stdout.close()


@BOTH
async def test_audit_records_each_step(escalation: EscalationPolicy) -> None:
    """Start, signal and exit of a stopped process are audit events."""
    audit = MemoryAudit()
    async with running(audit) as rt:
        report, _, proc = await stop_with(rt, ["sh", "-c", TREE], escalation, 3)
    kinds = audit.kinds(report.session_id)
    assert {"process_started", "process_signal", "process_exited"} <= set(kinds)
    signals = [e.details for e in audit.events if e.kind == "process_signal"]
    assert signals[0]["signal"] == "SIGTERM"
    assert signals[0]["pgid"] == proc.pid


# ------------------------------------------------------ FAULT 25: ignores SIGTERM


@pytest.mark.slow
@BOTH
async def test_sigterm_ignoring_child_is_sigkilled_after_grace(
    escalation: EscalationPolicy,
) -> None:
    """A child that ignores SIGTERM gets SIGKILL after term_grace, with a warning."""
    audit = MemoryAudit()
    # exec: the ignored SIGTERM carries over to sleep. A shell looping over `sleep 1`
    # would fork into the group during the grace whenever the loop turned (more often
    # on a loaded host), and that process, still exiting when the leader is reaped, is
    # rightly reported as a second row (a member found late): not this test's subject.
    cmd = ["sh", "-c", "trap '' TERM; echo ready; exec sleep 1000"]
    async with running(audit, term_grace=0.2) as rt:
        with pytest.warns(EscalationWarning, match="SIGKILL"):
            report, _, proc = await stop_with(rt, cmd, escalation, 1)
    (rep,) = report.processes
    assert rep.signals == ("SIGTERM", "SIGKILL")
    assert rep.returncode == -signal.SIGKILL
    assert rep.seconds_to_exit is not None
    # The grace counts from the request; the SIGTERM went when the loop delivered it.
    assert report.latency.delivered is not None
    assert rep.seconds_to_exit + report.latency.delivered >= 0.2
    assert not alive(proc.pid)
    kills = [
        e for e in audit.events if e.kind == "process_signal" and e.details["signal"] == "SIGKILL"
    ]
    assert kills, "the SIGKILL escalation is not audited"


# ------------------------------------------------------------ FAULT 26: escapees


#: A member that leaves the group (setsid) when it gets SIGTERM, and keeps running (a
#: second SIGTERM, which it gets if the plane finds it outside the group, changes nothing).
LEAVES_ON_TERM = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: os.getpgrp() != os.getpid() and os.setsid())
signal.signal(signal.SIGUSR1, lambda *_: print("alive", flush=True))
print(os.getpid(), flush=True)
time.sleep(1000)
"""


async def test_member_leaving_the_group_after_sigterm_is_killed() -> None:
    """Without a cgroup, a member that leaves the group on SIGTERM is still SIGKILLed."""
    cmd = ["sh", "-c", f"{PY} -c '{LEAVES_ON_TERM}' & wait"]
    async with running(term_grace=0.05) as rt:
        with pytest.warns(EscalationWarning):
            report, lines, _ = await stop_with(rt, cmd, NO_CGROUP, 1)
    member = int(lines[0])
    try:
        assert not alive(member)
        assert report.quiescent
        # The search runs after the SIGTERM: it finds the member still in the group (a
        # member, SIGKILLed by its pidfd) or already out of it (an escapee, SIGKILLed by
        # its pidfd too). Either way it is in the report, and stopped.
        leader = report.processes[0]
        escaped = [p.pid for p in report.processes if p.escaped]
        assert member in [*leader.members, *escaped]
        assert not any(p.survived for p in report.processes)
    finally:
        kill_quietly([member])
        await wait_gone([member])


def test_negative_control_member_leaving_the_group_escapes_killpg() -> None:
    """A member that setsid()s on SIGTERM outlives a SIGKILL sent to its old group."""
    cmd = ["sh", "-c", f"{PY} -c '{LEAVES_ON_TERM}' & wait"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    member = int(proc.stdout.readline())
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + WAIT
        while os.getpgid(member) == proc.pid:  # until its handler has run setsid()
            assert time.monotonic() < deadline, "the member never left the group"
            time.sleep(0.001)  # real-time: polls a state (its group) with a deadline
        os.killpg(proc.pid, signal.SIGKILL)  # the leader is unreaped: the group is there
        # A signal sent after SIGKILL is handled only by a process SIGKILL never reached.
        os.kill(member, signal.SIGUSR1)
        assert proc.stdout.readline() == b"alive\n", "the survivor check proves nothing"
    finally:
        kill_quietly([member])
        proc.wait()
        proc.stdout.close()


@BOTH
async def test_setsid_grandchild_is_found_and_killed(escalation: EscalationPolicy) -> None:
    """A grandchild that setsid()s out of the group is killed and reported escaped."""
    audit = MemoryAudit()
    async with running(audit) as rt:
        report, lines, _proc = await stop_with(rt, [PY, "-c", SETSID], escalation, 1)
    escapee = int(lines[0])
    assert not alive(escapee)
    escaped = [p for p in report.processes if p.escaped]
    assert [p.pid for p in escaped] == [escapee]
    assert escaped[0].pgid == escapee
    assert "process_escaped" in audit.kinds(report.session_id)


@BOTH
async def test_double_forked_orphan_is_found_and_killed(escalation: EscalationPolicy) -> None:
    """A double-forked, setsid()ed orphan (parent: init) is still found and killed."""
    script = """
import os, time
mid = os.fork()
if mid == 0:
    if os.fork() == 0:
        os.setsid()
        while os.getppid() == mid:  # wait until orphaned
            time.sleep(0.001)
        print(os.getpid(), flush=True)
        time.sleep(1000)
    os._exit(0)
os.waitpid(mid, 0)
time.sleep(1000)
"""
    async with running() as rt:
        report, lines, _ = await stop_with(rt, [PY, "-c", script], escalation, 1)
    orphan = int(lines[0])
    assert not alive(orphan)
    assert orphan in [p.pid for p in report.processes if p.escaped]


#: A leader whose child setsid()s, notes each SIGTERM in a file and ignores it.
ESCAPEE_NOTES_TERM = """
import os, signal, sys, time
if os.fork() == 0:
    os.setsid()
    def note(*_):
        with open(sys.argv[1], "a") as f:
            f.write("TERM\\n")
    signal.signal(signal.SIGTERM, note)
    print(os.getpid(), flush=True)
    while True:
        time.sleep(1000)
time.sleep(1000)
"""


@pytest.mark.skipif(not HAVE_CGROUP, reason="needs a writable cgroup v2 with cgroup.kill")
async def test_escapee_inside_the_cgroup_gets_sigterm_before_sigkill(tmp_path: Path) -> None:
    """An escapee in the session cgroup gets its own SIGTERM, then SIGKILL at the grace."""
    notes = tmp_path / "notes"
    cmd = [PY, "-c", ESCAPEE_NOTES_TERM, str(notes)]
    async with running(term_grace=0.3) as rt:
        with pytest.warns(EscalationWarning, match="SIGKILL"):
            report, lines, proc = await stop_with(rt, cmd, EscalationPolicy(), 1)
    escapee = int(lines[0])
    assert not alive(escapee)
    (row,) = [p for p in report.processes if p.escaped]
    # Out of the leader's group: killpg could not have given it the SIGTERM it noted.
    assert (row.pid, row.pgid) == (escapee, escapee)
    assert row.pgid != proc.pid
    assert row.signals == ("SIGTERM", "SIGKILL")
    assert row.containment == "cgroup"
    assert notes.read_text() == "TERM\n"


def _pidfds() -> int:
    """How many pidfds this process holds open."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sum("pidfd" in link for link in links)


@pytest.mark.skipif(not HAVE_CGROUP, reason="needs a writable cgroup v2 with cgroup.kill")
async def test_cgroup_and_pidfds_are_released_after_the_handle_resolves() -> None:
    """The report comes first: the pidfds and the session cgroup are released after it."""
    at_resolution: list[tuple[list[str], int]] = []

    def watch_handle(session: ks.Session) -> None:
        loop = asyncio.get_running_loop()
        session.handle.add_done_callback(
            loop, lambda: at_resolution.append((cgroups_left(), _pidfds()))
        )

    async with running() as rt:
        report, _, _ = await stop_with(rt, ["sh", "-c", TREE], EscalationPolicy(), 3, watch_handle)
        assert report.quiescent
        ((cgroups, pidfds),) = at_resolution
        assert cgroups, "the cgroup was removed before the report"
        assert pidfds >= 1, "the leader's pidfd was closed before the report"
        with anyio.fail_after(WAIT):
            while cgroups_left() or _pidfds():  # noqa: ASYNC110 - nothing to wait on
                await anyio.sleep(0.01)


@pytest.mark.parametrize("containment", ["cgroup", "process_group"])
async def test_cgroup_stop_opens_no_pidfd_and_reads_no_proc_file(
    monkeypatch: pytest.MonkeyPatch, containment: str
) -> None:
    """With the cgroup, a stop opens no pidfd per member and reads no /proc file per pid;
    without it (the negative control) the same stop does both."""
    if containment == "cgroup" and not HAVE_CGROUP:
        pytest.skip("needs a writable cgroup v2 with cgroup.kill")
    counts = {"pidfd_open": 0, "proc_read": 0}
    counting = False
    real_pidfd_open = os.pidfd_open
    real_read_file = _procfs.read_file

    def pidfd_open(pid: int, flags: int = 0) -> int:
        counts["pidfd_open"] += counting
        return real_pidfd_open(pid, flags)

    def read_file(path: str) -> bytes:
        counts["proc_read"] += counting
        return real_read_file(path)

    monkeypatch.setattr(os, "pidfd_open", pidfd_open)
    monkeypatch.setattr(_procfs, "read_file", read_file)

    def start_counting(_session: ks.Session) -> None:
        nonlocal counting
        counting = True

    escalation = EscalationPolicy(cgroup=containment == "cgroup")
    async with running() as rt:
        report, lines, _ = await stop_with(rt, ["sh", "-c", TREE], escalation, 3, start_counting)
        counting = False
    assert report.processes[0].containment == containment
    assert not any(alive(int(p)) for p in lines)
    if containment == "cgroup":
        assert counts == {"pidfd_open": 0, "proc_read": 0}
    else:
        assert counts["proc_read"] > 0


@pytest.mark.skipif(not HAVE_CGROUP, reason="needs a writable cgroup v2 with cgroup.kill")
async def test_cgroup_stop_completes_without_inotify(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where inotify cannot be had, populated 0 is polled and the stop still completes."""

    def no_inotify(_loop: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(_cgroup._Inotify, "for_loop", no_inotify)
    async with running() as rt:
        report, lines, proc = await stop_with(rt, ["sh", "-c", TREE], EscalationPolicy(), 3)
    assert report.quiescent
    assert report.processes[0].containment == "cgroup"
    assert not any(alive(p) for p in [proc.pid, *map(int, lines)])


@pytest.mark.slow
@BOTH
async def test_grace_counts_from_the_request(escalation: EscalationPolicy) -> None:
    """SIGKILL comes at the request's time plus the grace, not the delivery's: a loop
    that delivered late leaves the group less than the grace after its SIGTERM."""
    cmd = ["sh", "-c", "trap '' TERM; echo ready; exec sleep 1000"]

    def late_delivery(session: ks.Session) -> None:
        # Interrupted from another thread while this loop is busy for 0.8 s of the 1 s grace.
        thread = threading.Thread(
            target=session.interrupt, args=("late",), kwargs={"trigger": "operator"}
        )
        thread.start()
        thread.join()
        time.sleep(0.8)  # the loop blocked on purpose: a late delivery

    # The loop monitor must not force the stop from its thread meanwhile (no SIGTERM).
    policy = ks.StopPolicy(term_grace=1.0, out_of_band_after=30.0)
    async with ks.Runtime(policy=policy) as rt:
        with pytest.warns(EscalationWarning):
            report, _, _ = await stop_with(rt, cmd, escalation, 1, late_delivery)
    (rep,) = report.processes
    assert rep.signals == ("SIGTERM", "SIGKILL")
    assert report.latency.delivered is not None
    assert report.latency.delivered >= 0.8
    assert rep.seconds_to_exit is not None
    # Counted from the delivery (the SIGTERM), the group would have had the full second.
    assert rep.seconds_to_exit < 1.0


# ------------------------------------------------------- FAULTS 27-28: pipes


@pytest.mark.slow
async def test_run_process_returns_when_grandchild_holds_stdout() -> None:
    """run_process returns at the child's exit although a grandchild keeps stdout open."""
    async with running() as rt:
        async with rt.session("tool") as session:
            with anyio.fail_after(10):
                result = await session.run_process(
                    ["sh", "-c", "sleep 1000 & echo $!; exit 0"], check=True
                )
            holder = int(result.stdout.split()[0])
            assert alive(holder)
            # The holder outlived its leader; the session's interrupt still finds it.
            session.interrupt("done", trigger="supervisor")
            await anyio.sleep_forever()
        assert not alive(holder)
        assert session.report is not None
        assert holder in [p.pid for p in session.report.processes]


async def test_wait_returns_on_child_exit_and_aclose_does_not_hang() -> None:
    """wait() returns at exit, not at EOF; aclose() closes pipes a grandchild holds."""
    async with running() as rt, rt.session("tool") as session:
        proc = await session.open_process(["sh", "-c", "sleep 1000 & echo $!; exit 7"])
        holder = int((await read_lines(proc, 1))[0])
        with anyio.fail_after(10):
            assert await proc.wait() == 7
            await proc.aclose()
        assert alive(holder)
        session.interrupt("cleanup", trigger="supervisor")
        await anyio.sleep_forever()
    assert not alive(holder)


async def test_child_blocked_on_full_pipe_closes() -> None:
    """Closing a process whose child is blocked writing into a full pipe completes."""
    script = "import sys; print('go', flush=True); sys.stdout.write('x' * 10**7)"
    async with running() as rt, rt.session("tool") as session:
        proc = await session.open_process([PY, "-c", script], stderr=subprocess.DEVNULL)
        await read_lines(proc, 1)
        with anyio.fail_after(10):
            await proc.aclose()  # our end closes: the writer gets EPIPE and exits
        assert proc.returncode not in (None, 0)


@BOTH
async def test_interrupt_while_child_blocked_on_full_pipe(escalation: EscalationPolicy) -> None:
    """An interrupt stops a child blocked writing into a pipe nobody reads."""
    script = "import sys; print('go', flush=True); sys.stdout.write('x' * 10**7)"
    async with running() as rt:
        report, _, proc = await stop_with(rt, [PY, "-c", script], escalation, 1)
    assert not alive(proc.pid)
    assert report.processes[0].returncode == -signal.SIGTERM


# -------------------------------------------------------- FAULT 29: ESRCH / EPERM


async def test_killpg_esrch_is_reported_and_pids_still_signalled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """killpg raising ESRCH marks the group empty; live pids still get the signal."""
    audit = MemoryAudit()
    calls: list[tuple[int, int]] = []

    def killpg(pgid: int, sig: int) -> None:
        calls.append((pgid, sig))
        raise ProcessLookupError(errno.ESRCH, "No such process")

    monkeypatch.setattr(os, "killpg", killpg)
    async with running(audit) as rt:
        report, lines, proc = await stop_with(rt, ["sh", "-c", TREE], NO_CGROUP, 3)
    assert len(calls) == 1, "a group known to be empty was signalled again"
    results = [e.details["result"] for e in audit.events if e.kind == "process_signal"]
    assert results[0] == "esrch"
    assert not any(alive(p) for p in [proc.pid, *map(int, lines)])
    assert report.quiescent


@pytest.mark.slow
async def test_eperm_everywhere_reports_survivor_without_crashing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When every signal fails with EPERM the process is reported survived, no crash."""

    def refuse(*_args: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    policy = EscalationPolicy(grace=0, kill_timeout=0.2, cgroup=False)
    with monkeypatch.context() as m:
        m.setattr(os, "killpg", refuse)
        m.setattr(os, "kill", refuse)
        m.setattr(signal, "pidfd_send_signal", refuse)
        async with running() as rt:
            with pytest.warns(EscalationWarning):
                report, _, proc = await stop_with(
                    rt, ["sh", "-c", "echo ready; exec sleep 1000"], policy, 1
                )
    try:
        (rep,) = report.processes
        assert rep.survived
        assert rep.returncode is None
        assert rep.error is not None
        assert "eperm" in rep.error
        assert report.outcome == "unresponsive"
        assert not report.quiescent
        assert alive(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        os.waitpid(proc.pid, 0)  # noqa: ASYNC222  (SIGKILLed just above: returns at once)
        proc._group.popen.returncode = -9  # type: ignore[union-attr]
        proc._group.close()


async def test_own_process_group_is_never_signalled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracked pid in our own process group is signalled alone, never via killpg."""
    real_killpg = os.killpg
    groups: list[int] = []

    def spy(pgid: int, sig: int) -> None:
        groups.append(pgid)
        real_killpg(pgid, sig)

    monkeypatch.setattr(os, "killpg", spy)
    # Started by other means, in the test's own process group, on purpose.
    child = subprocess.Popen(["sleep", "1000"])  # noqa: ASYNC220
    try:
        async with running() as rt:
            async with rt.session("tool") as session:
                session.track_pid(child.pid, escalation=NO_CGROUP)
                session.interrupt("stop", trigger="operator")
                await anyio.sleep_forever()
            report = session.report
            assert report is not None
            assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        kill_quietly([child.pid])
        child.wait()
    assert os.getpgrp() not in groups
    (rep,) = report.processes
    assert rep.pgid is None
    assert rep.adopted
    assert rep.returncode == -signal.SIGTERM


# ------------------------------------------------------ FAULTS 30-31: bomb, zombies


@pytest.mark.slow
@BOTH
async def test_bounded_fork_bomb_is_stopped(escalation: EscalationPolicy) -> None:
    """Fifty children started in a burst all die with the interrupt."""
    bomb = "for i in $(seq 50); do sleep 1000 & echo $!; done; wait"
    async with running() as rt:
        report, lines, proc = await stop_with(rt, ["sh", "-c", bomb], escalation, 50)
    pids = [proc.pid, *map(int, lines)]
    assert not any(alive(p) for p in pids)
    assert report.quiescent


async def test_natural_exit_is_reaped_and_untracked() -> None:
    """A process that exits by itself is reaped and leaves the plane."""
    async with running() as rt, rt.session("tool") as session:
        result = await session.run_process(
            ["sh", "-c", "echo out; echo err >&2; exit 3"], check=False
        )
        assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
        with pytest.raises(subprocess.CalledProcessError):
            await session.run_process(["false"])
        assert session.processes() == ()  # every process reaped and untracked


async def test_run_process_feeds_input() -> None:
    """run_process passes *input* to the child's stdin."""
    async with running() as rt, rt.session("tool") as session:
        result = await session.run_process(["cat"], input=b"hello")
    assert result.stdout == b"hello"


async def test_track_pid_adopts_and_stops_a_foreign_group() -> None:
    """A process started by other means is adopted, stopped, and left to its parent."""
    # Started by other means (what track_pid is for), on purpose.
    child = subprocess.Popen(["sleep", "1000"], start_new_session=True)  # noqa: ASYNC220
    try:
        async with running() as rt:
            async with rt.session("tool") as session:
                session.track_pid(child.pid)
                session.interrupt("stop", trigger="operator")
                await anyio.sleep_forever()
            report = session.report
            assert report is not None
        # Its Popen still owns its status: we did not steal it.
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        kill_quietly([child.pid])
        child.wait()
    (rep,) = report.processes
    assert rep.adopted
    assert rep.pgid == child.pid
    assert rep.returncode == -signal.SIGTERM


async def test_cancelled_aclose_kills_the_whole_group() -> None:
    """A cancellation that is not the interrupt takes the whole group down in aclose."""
    async with running() as rt, rt.session("tool") as session:
        with anyio.CancelScope() as scope:
            async with await session.open_process(["sh", "-c", TREE]) as proc:
                pids = [proc.pid, *map(int, await read_lines(proc, 3))]
                scope.cancel()
                await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        # the grandchildren got the group's SIGKILL too
        with anyio.fail_after(10):
            await wait_gone(pids)
    # The session cgroup lives as long as the session: gone with its block.
    assert cgroups_left() == []


# ------------------------------------------------------ FAULT 32: spawn vs interrupt


async def test_open_process_after_interrupt_starts_nothing() -> None:
    """Once interrupted (even before delivery), open_process starts no process."""
    before = set(psutil.Process().children(recursive=True))
    async with running() as rt, rt.session("tool") as session:
        session.interrupt("stop", trigger="operator")
        with pytest.raises(ks.Interrupted):
            await session.open_process(["sleep", "1000"])
        assert set(psutil.Process().children(recursive=True)) == before
        with pytest.raises(ks.Interrupted):
            session.track_pid(os.getppid())


async def test_open_process_in_cancelled_scope_starts_nothing() -> None:
    """A cancelled caller gets the cancellation before any process is started."""
    before = set(psutil.Process().children(recursive=True))
    async with running() as rt, rt.session("tool") as session:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await session.open_process(["sleep", "1000"])
        assert scope.cancelled_caught
        assert set(psutil.Process().children(recursive=True)) == before


@pytest.mark.slow
@BOTH
async def test_interrupt_from_thread_while_spawning_leaves_no_orphan(
    escalation: EscalationPolicy,
) -> None:
    """An interrupt from another thread racing a spawn loop leaves no process behind."""
    started: list[int] = []
    async with running() as rt:
        session = rt.session("spawner")
        go = threading.Event()

        def interrupter() -> None:
            go.wait()
            session.interrupt("race", trigger="supervisor")

        t = threading.Thread(target=interrupter)
        t.start()
        try:
            async with session:
                for i in range(200):
                    proc = await session.open_process(
                        ["sleep", "1000"], stdout=None, escalation=escalation
                    )
                    started.append(proc.pid)
                    if i == 5:
                        go.set()
        finally:
            go.set()
            t.join()
        report = session.report
    assert report is not None
    assert report.quiescent
    assert started
    assert not any(alive(p) for p in started)
    assert {p.pid for p in report.processes} >= set(started)


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize("command", [[], "", "   ", ()])
async def test_empty_command_is_rejected(command: Any) -> None:
    """An empty command is a ValueError, and nothing is started."""
    async with running() as rt, rt.session("tool") as session:
        with pytest.raises(ValueError, match="empty"):
            await session.open_process(command)


async def test_nonexistent_executable_is_a_clear_error() -> None:
    """A missing executable raises FileNotFoundError and tracks nothing."""
    audit = MemoryAudit()
    async with running(audit) as rt, rt.session("tool") as session:
        with pytest.raises(FileNotFoundError):
            await session.open_process(["/nonexistent/kill-switch-no-such-tool"])
    assert "process_started" not in audit.kinds()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"grace": -1.0}, ValueError),
        ({"grace": float("nan")}, ValueError),
        ({"grace": float("inf")}, ValueError),
        ({"grace": "5"}, TypeError),
        ({"grace": True}, TypeError),
        ({"kill_timeout": 0}, ValueError),
        ({"kill_timeout": float("nan")}, ValueError),
        ({"cgroup": "yes"}, TypeError),
    ],
)
def test_invalid_escalation_policy_is_rejected(kwargs: dict[str, Any], error: type) -> None:
    """Negative, NaN, infinite or mistyped policy values raise at construction."""
    with pytest.raises(error):
        EscalationPolicy(**kwargs)


@pytest.mark.parametrize("grace", [-1.0, float("nan"), 0])
def test_invalid_term_grace_is_rejected(grace: float) -> None:
    """StopPolicy.term_grace must be a finite number > 0."""
    with pytest.raises(ValueError, match="term_grace"):
        ks.StopPolicy(term_grace=grace)


async def test_bad_escalation_and_pid_arguments() -> None:
    """A non-policy escalation and a bad pid are type/value errors."""
    async with running() as rt, rt.session("tool") as session:
        with pytest.raises(TypeError, match="EscalationPolicy"):
            await session.open_process(["true"], escalation=5.0)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            session.track_pid("12")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="cannot track"):
            session.track_pid(os.getpid())
        with pytest.raises(ProcessLookupError):
            session.track_pid(2**22 + 12345)


async def test_processes_do_not_outlive_a_session_cancelled_from_outside() -> None:
    """A session ended by an enclosing scope's cancellation (not an interrupt) still
    stops its process tree: nothing of a session outlives its block."""
    async with ks.Runtime() as runtime:
        with anyio.move_on_after(60) as outer:
            async with runtime.session("a") as session:
                proc = await session.open_process(
                    ["sh", "-c", "sleep 300 & echo ready; wait"], stdin=None, stderr=None
                )
                assert proc.stdout is not None
                await proc.stdout.receive()
                with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:  # noqa: ASYNC230
                    grandchild = [int(p) for p in f.read().split()]
                outer.cancel()
                await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert session.report is not None
    assert session.report.trigger == "parent"
    assert not any(alive(p) for p in [proc.pid, *grandchild])


async def test_processes_do_not_outlive_a_session_that_returns() -> None:
    """A block that returns while a tracked process still runs stops it too."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            proc = await session.open_process(["sleep", "300"], stdin=None, stderr=None)
        assert session.state == "terminated"
        assert session.report is not None
        assert "returned" in session.report.reason
        assert not alive(proc.pid)
