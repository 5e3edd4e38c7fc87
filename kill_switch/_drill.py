"""The kill drill: interrupt a session, then check independently that nothing is left.

A ``StopReport`` is the runtime's own account of a stop. A drill does not take its word
for it: after the report it looks at the world from outside the runtime's bookkeeping,

* **tasks** — every asyncio task created inside the session (the runtime's task factory
  tags them) has finished;
* **processes** — no process of the session is alive: the pids and process groups the
  report names, every process carrying the session's tracking variable in its
  environment, and (``untracked=True``) every descendant of this process started after
  the session began that no other session tracks — a tool that spawned a process
  behind the runtime's back is caught here;
* **zombies** — none of those processes is left unreaped;
* **threads** — every thread of the session has returned, or is listed in the report as
  abandoned (Python cannot stop a thread that does not poll; the report must say so);
* **model** — (synthetic sessions) the session's scripted agent loop made no model call
  that started at or after the moment the drill requested the interrupt, and has ended:
  read from the drill's own record of the calls, not from the runtime;
* **audit** — the session's interrupt is in the durable audit log, and the log's hash
  chain verifies;

and times it: *latency* is ``interrupt()`` → ``StopReport`` in the drill's hands,
*quiesced* is ``interrupt()`` → every independent check passing. ``run_drills`` repeats
the drill against synthetic sessions of a given shape and states the verdict against
latency objectives; ``kill-switch drill`` is its command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import subprocess
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio
import anyio.to_thread
import attrs

from ._drill_results import (
    DrillCheck,
    DrillObjectives,
    DrillResult,
    DrillSummary,
    DrillVerdict,
    percentile,
)
from ._planes._context import check as ks_check
from ._planes._context import sleep as ks_sleep
from ._planes._pool import session_threads
from ._planes._process_plane import TRACKING_ENV
from ._planes._procfs import (
    START_RESOLUTION,
    Stat,
    command,
    descendants_in,
    environ_value,
    scan,
    start_time,
)
from ._planes._subreaper import subreaper
from ._session import Session
from ._tools import bind_session, refuse_if_interrupted
from ._vocabulary._audit_event import (
    ESCALATED,
    INTERRUPT_COMPLETED,
    INTERRUPT_REQUESTED,
    DurableAuditSink,
)
from ._vocabulary._exceptions import Interrupted
from ._vocabulary._policy import StopPolicy
from ._vocabulary._validate import attrs_check, count, non_negative, positive_int, seconds

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from ._runtime import Runtime
    from ._vocabulary._report import StopReport

Leak = Literal["process", "orphan", "task", "thread", "model"]
LEAKS: Final[tuple[Leak, ...]] = ("process", "orphan", "task", "thread", "model")

#: How often the independent checks are re-run while waiting for quiescence.
_POLL: Final = 0.002
#: A process's start time is known to one clock tick; allow two.
_START_SLACK: Final = 2 * START_RESOLUTION


_seconds = attrs_check(seconds)
_count = attrs_check(count)


def _to_leaks(value: Iterable[Leak]) -> tuple[Leak, ...]:
    return tuple(value)


def _leaks(_inst: Any, attr: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for leak in value:
        if leak not in LEAKS:
            raise ValueError(f"unknown leak {leak!r}; expected one of {list(LEAKS)}")


@attrs.frozen
class DrillShape:
    """The synthetic session ``run_drills`` starts for each run.

    Every synthetic session also runs a scripted agent loop: a model (the drill's own
    callable, which records when each call starts) alternating with a guarded tool call
    through the session, refused before each model request once the session is
    interrupted (as the integrations do); it is parked in its third tool call when the
    interrupt comes.

    Attributes:
        calls: async tool calls parked when the interrupt comes.
        processes: subprocess trees (a shell leader and three grandchildren); the first
            one ignores SIGTERM, so the escalation to SIGKILL is drilled too.
        threads: sync tools in worker threads that poll the interrupt.
        blocking_threads: sync tools that never poll: they are abandoned after
            *thread_grace* and must be listed as such.
        term_grace: seconds between SIGTERM and SIGKILL.
        thread_grace: seconds a sync tool has to return once interrupted.
        stop_timeout: the session's bound on its own stop.
        leak: deliberate faults, to prove the drill catches them: ``"process"`` spawns a
            process behind the runtime's back, ``"orphan"`` leaves a grandchild whose
            parent exited at once (a daemon's double fork: it is reparented, and found
            only because the drill runs as a child subreaper), ``"task"`` leaves a task
            that swallows its cancellation, ``"thread"`` runs a sync tool that never
            polls in anyio's pool with ``abandon_on_cancel`` (off the thread plane; its
            caller does not wait), ``"model"`` runs the agent loop outside the session's
            block (a server's request task) in a framework whose catch-all turns the
            tool's failure, the kill included, into text for the model and does not
            guard the model request: it makes one more model call after the kill, and
            every other check still passes. Drills with a leak must fail.
    """

    calls: int = attrs.field(default=20, validator=_count)
    processes: int = attrs.field(default=2, validator=_count)
    threads: int = attrs.field(default=2, validator=_count)
    blocking_threads: int = attrs.field(default=0, validator=_count)
    term_grace: float = attrs.field(default=0.02, validator=_seconds)
    thread_grace: float = attrs.field(default=0.02, validator=_seconds)
    stop_timeout: float = attrs.field(default=2.0, validator=_seconds)
    leak: tuple[Leak, ...] = attrs.field(default=(), converter=_to_leaks, validator=_leaks)


# ------------------------------------------------------------- the checks


class _ProcessProbe:
    """Finds the processes of one session, tracked or not, from ``/proc`` alone."""

    def __init__(self, session: Session, report: StopReport | None, *, untracked: bool) -> None:
        self.session_id = session.id
        self.started_at = session.info().started_at
        self.untracked = untracked
        self.own_pgid = os.getpgid(0)
        self.pids: set[int] = set()
        self.pgids: set[int] = set()
        if report is not None:
            for p in report.processes:
                self.pids.add(p.pid)
                self.pids.update(p.members)
                if p.pgid is not None and p.pgid != self.own_pgid:
                    self.pgids.add(p.pgid)

    def belongs(self, pid: int, st: Stat, mine: set[int]) -> str | None:
        """Why *pid* is this session's, or ``None``."""
        if pid in self.pids:
            return "in the report"
        if st[2] in self.pgids:
            return f"in process group {st[2]}"
        marker = environ_value(pid, TRACKING_ENV)
        if marker is not None:
            return "tracked by this session" if marker == self.session_id else None
        if self.untracked and pid in mine and self.started_at is not None:
            start = start_time(pid)
            if start is not None and start >= self.started_at - _START_SLACK:
                return "untracked: spawned by this process after the session began"
        return None

    def scan(self) -> tuple[list[str], list[str], list[str]]:
        """``(alive, zombies, reparented)``: this session's processes still there.

        *zombies* are this process's own unreaped children; *reparented* are zombies
        whose parent died and which now wait for another reaper (init or a subreaper):
        not this process's to reap.
        """
        table = scan(zombies=True)
        me = os.getpid()
        mine = descendants_in(table, me)
        alive: list[str] = []
        zombies: list[str] = []
        reparented: list[str] = []
        for pid, st in table.items():
            if pid == me or st[0] == "X":
                continue
            # Cheap filter first: only pids the report names, the report's groups and
            # our descendants are looked at closely, or any pid carrying our marker.
            if (
                pid not in self.pids
                and st[2] not in self.pgids
                and pid not in mine
                and environ_value(pid, TRACKING_ENV) != self.session_id
            ):
                continue
            why = self.belongs(pid, st, mine)
            if why is None:
                continue
            what = f"pid {pid} ({command(pid)}) {why}"
            if st[0] != "Z":
                alive.append(what)
            elif st[1] == me:
                zombies.append(what)
            else:
                reparented.append(f"{what}, parent {st[1]}")
        return alive, zombies, reparented


def _check_tasks(session: Session) -> DrillCheck:
    alive = session.running_tasks()
    if not alive:
        return DrillCheck("tasks", True, "every task of the session has finished")
    names = ", ".join(f"{t.task} ({t.coro})" for t in alive[:5])
    more = f" and {len(alive) - 5} more" if len(alive) > 5 else ""
    return DrillCheck("tasks", False, f"{len(alive)} task(s) still running: {names}{more}")


def _check_threads(session: Session, report: StopReport | None) -> DrillCheck:
    # Seen from outside the thread plane: threads tagged with the session, and threads
    # whose stack holds a context of the session (a pool's worker running its work).
    tag = f"[{session.id[:8]}]"
    rows = report.threads if report else ()
    abandoned = {t.ident for t in rows if t.outcome == "abandoned" and t.running and t.tool}
    running = {t.ident: t.name for t in threading.enumerate() if t.name.endswith(tag)}
    running.update(session_threads(session, set()))
    unlisted = [name for ident, name in running.items() if ident not in abandoned]
    if unlisted:
        names = ", ".join(unlisted[:5])
        return DrillCheck(
            "threads",
            False,
            f"{len(unlisted)} thread(s) still running the session's work and not on its "
            f"thread plane as abandoned: {names}",
        )
    listed = len(running)
    detail = "every thread of the session has returned"
    if listed:
        detail += f", except {listed} still running and listed as abandoned"
    return DrillCheck("threads", True, detail)


def _check_processes(probe: _ProcessProbe) -> tuple[DrillCheck, DrillCheck]:
    alive, zombies, reparented = probe.scan()
    if alive:
        procs = DrillCheck("processes", False, f"{len(alive)} alive: " + "; ".join(alive[:5]))
    else:
        n = len(probe.pids)
        procs = DrillCheck("processes", True, f"none alive ({n} pid(s) in the report)")
    if zombies:
        zomb = DrillCheck("zombies", False, f"{len(zombies)} unreaped: " + "; ".join(zombies[:5]))
    else:
        detail = "none unreaped by this process"
        if reparented:
            detail += f"; {len(reparented)} reparented, awaiting their new parent's reaping"
        zomb = DrillCheck("zombies", True, detail)
    return procs, zomb


def _check_report(session: Session, report: StopReport | None, bound: float) -> DrillCheck:
    if report is None:
        return DrillCheck("report", False, f"no StopReport within {bound:.1f} s")
    running = [t for t in report.threads if t.running]
    if not report.quiescent and running and _only_threads_left(report):
        # Honest: the one thing left is threads that never poll, named as still running
        # (the threads check looks at them from outside).
        return DrillCheck(
            "report",
            True,
            f"{report.outcome}: not quiescent only because {len(running)} abandoned "
            "thread(s) still run, and it says so",
        )
    if not report.quiescent:
        leaked = sum(not t.cancelled for t in (*report.leaked_tasks, *report.swept_tasks))
        return DrillCheck(
            "report",
            False,
            f"the report says {report.outcome}, not quiescent "
            f"({leaked} leaked task(s) did not exit)",
        )
    return DrillCheck("report", True, f"{report.outcome}, quiescent, trigger {report.trigger}")


def _only_threads_left(report: StopReport) -> bool:
    """Whether everything but the threads still running settled (tasks, processes)."""
    return (
        report.latency.quiescent is not None
        and all(t.cancelled for t in (*report.leaked_tasks, *report.swept_tasks))
        and all(p.returncode is not None for p in report.processes)
    )


def _check_model(agent: _Agent | None, killed_at: float) -> DrillCheck:
    """No model call started at or after *killed_at* (the drill's clock, read just before
    it asked for the interrupt), and the agent loop has ended: from the drill's record."""
    if agent is None:
        return DrillCheck(
            "model",
            True,
            "not checked: the drill did not run this session's agent loop, so it has no "
            "record of its model calls (synthetic runs have one)",
            skipped=True,
        )
    calls = list(agent.calls)
    late = [t - killed_at for t in calls if t >= killed_at]
    if late:
        return DrillCheck(
            "model",
            False,
            f"{len(late)} model call(s) started after the interrupt was requested (the "
            f"first {min(late) * 1e3:.2f} ms after): the agent went on after the kill",
        )
    if not agent.done.is_set():
        return DrillCheck("model", False, "the agent loop still runs: it may call the model")
    return DrillCheck(
        "model",
        True,
        f"no model call after the interrupt ({len(calls)} before it); the agent loop ended",
    )


def _audit_path(session: Session) -> str | None:
    sink = session.runtime.audit
    return sink.path if isinstance(sink, DurableAuditSink) else None


def _check_audit(path: str | None, report: StopReport | None, *, verify_chain: bool) -> DrillCheck:
    if path is None:
        return DrillCheck("audit", True, "not checked: no SQLite audit log", skipped=True)
    if report is None:
        return DrillCheck("audit", False, "no report, so no interrupt to look for")
    from ._audit._query import AuditLog  # the durable layer; loaded only when used

    try:
        with AuditLog(path) as log:
            kinds = {e.kind for e in log.events(interrupt_id=report.interrupt_id)}
            # A stop that did not complete has ``escalated`` as its last word, never
            # ``interrupt_completed``.
            last = INTERRUPT_COMPLETED if report.quiescent else ESCALATED
            missing = {INTERRUPT_REQUESTED, last} - kinds
            if missing:
                return DrillCheck(
                    "audit",
                    False,
                    f"interrupt {report.interrupt_id} has no {', '.join(sorted(missing))} row",
                )
            if verify_chain:
                result = log.verify()
                if not result.ok:
                    return DrillCheck("audit", False, f"chain: {result.summary()}")
    except Exception as exc:  # any failure to read is a failed check, stated
        return DrillCheck("audit", False, f"cannot read {path}: {exc!r}")
    chain = ", chain verifies" if verify_chain else ""
    return DrillCheck("audit", True, f"{len(kinds)} kinds of row for the interrupt{chain}")


# ------------------------------------------------------------------- drill


async def drill(
    session: Session,
    *,
    reason: str = "kill drill",
    operator: str | None = "kill-switch drill",
    quiesce_within: float = 2.0,
    untracked: bool = True,
    verify_chain: bool = True,
) -> DrillResult:
    """Interrupt *session* as an operator would, then check independently that it stopped.

    Waits for the ``StopReport`` (bounded by the session's stop timeout plus
    *quiesce_within*), then re-runs the independent checks every few milliseconds until
    they all pass or *quiesce_within* seconds have passed since the interrupt. Never
    raises for what it finds: a check that fails is in the result.

    With *untracked*, any descendant of this process started after the session began
    and tracked by no other session counts as the session's: a process spawned behind
    the runtime's back is caught, and so is an unrelated one the application started
    meanwhile — turn it off in a process that spawns such children.

    The ``model`` check needs a record of the agent's model calls, which only the
    drill's synthetic sessions keep (``run_drills``): here it is skipped, and says so.

    Cancellation: a checkpoint; cancelling the drill does not undo the interrupt.

    Raises:
        TypeError: *session* is not a ``Session``.
        RuntimeError: not called on the session's event loop, or the session has not
            been entered or has already ended.
    """
    return await _drill(
        session,
        None,
        reason=reason,
        operator=operator,
        quiesce_within=quiesce_within,
        untracked=untracked,
        verify_chain=verify_chain,
    )


async def _drill(
    session: Session,
    agent: _Agent | None,
    *,
    reason: str = "kill drill",
    operator: str | None = "kill-switch drill",
    quiesce_within: float = 2.0,
    untracked: bool = True,
    verify_chain: bool = True,
) -> DrillResult:
    """``drill``, with the record of the model calls of the session's agent loop where
    the drill runs it (``model`` is skipped without one)."""
    if not isinstance(session, Session):
        raise TypeError(f"drill needs a Session, not {type(session).__name__}")
    non_negative("quiesce_within", quiesce_within)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not session.loop:
        raise RuntimeError("drill() must run on the session's event loop")
    if session.state in ("created", "finished", "failed"):
        raise RuntimeError(f"session {session.id} is {session.state}: there is nothing to drill")

    # The model check's clock is the model's own (monotonic), read before the request: a
    # call that starts at or after it came after the kill was asked for.
    killed_at = time.monotonic()
    t0 = time.perf_counter()
    handle = session.interrupt(reason, trigger="operator", operator=operator)
    bound = session.policy.stop_timeout + quiesce_within
    report: StopReport | None = None
    with anyio.move_on_after(bound):
        report = await handle
    latency = time.perf_counter() - t0 if report is not None else None
    path = _audit_path(session)
    probe = _ProcessProbe(session, report, untracked=untracked)
    deadline = t0 + max(quiesce_within, (latency or 0.0))

    quiesced: float | None = None
    while True:
        procs, zombies = _check_processes(probe)
        checks = [
            _check_report(session, report, bound),
            _check_tasks(session),
            procs,
            zombies,
            _check_threads(session, report),
            _check_model(agent, killed_at),
        ]
        if all(c.ok for c in checks):
            quiesced = time.perf_counter() - t0
            break
        if time.perf_counter() >= deadline or report is None:
            break
        await anyio.sleep(_POLL)
    checks.append(_check_audit(path, report, verify_chain=verify_chain))
    return DrillResult(session.id, session.agent, latency, quiesced, tuple(checks), report)


def _check_objectives(
    results: Sequence[DrillResult], objectives: DrillObjectives
) -> tuple[DrillVerdict, ...]:
    verdicts = []
    failed = [r for r in results if not r.ok]
    verdicts.append(
        DrillVerdict(
            "nothing left behind",
            not failed and bool(results),
            f"{len(results) - len(failed)}/{len(results)} runs passed every check",
        )
    )
    quiet_bound = objectives.quiesce_ms
    slow = [r for r in results if r.quiesced is None or r.quiesced * 1e3 > quiet_bound]
    verdicts.append(
        DrillVerdict(
            f"quiet within {quiet_bound:g} ms",
            not slow,
            f"{len(results) - len(slow)}/{len(results)} runs",
        )
    )
    data = [r.latency * 1e3 for r in results if r.latency is not None]
    for name, q in (("p50", 50.0), ("p99", 99.0), ("max", 100.0)):
        bound = getattr(objectives, f"{name}_ms")
        if bound is None:
            continue
        if len(data) < len(results) or not data:
            verdicts.append(DrillVerdict(f"{name} ≤ {bound:g} ms", False, "a run had no report"))
            continue
        value = percentile(data, q)
        verdicts.append(DrillVerdict(f"{name} ≤ {bound:g} ms", value <= bound, f"{value:.1f} ms"))
    return tuple(verdicts)


def summarize(results: Iterable[DrillResult], objectives: DrillObjectives) -> DrillSummary:
    """The verdict of a series of drills against *objectives*."""
    rs = tuple(results)
    return DrillSummary(rs, objectives, _check_objectives(rs, objectives))


# ------------------------------------------------------- synthetic sessions

# A shell leader with three grandchildren that says "ready" once they all run, so the
# drill starts from state, not from a guess. The stubborn variant ignores SIGTERM (and its
# children inherit that), so the drill also covers the escalation to SIGKILL.
_TREE: Final = "sleep 300 & sleep 300 & sleep 300 & echo ready; wait"
_STUBBORN_TREE: Final = "trap '' TERM; sleep 300 & sleep 300 & sleep 300 & echo ready; wait"


@attrs.define(eq=False)
class _Readiness:
    expected: int
    ready: int = 0
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    event: anyio.Event = attrs.field(factory=anyio.Event)
    loop: asyncio.AbstractEventLoop = attrs.field(factory=asyncio.get_running_loop)

    def one(self) -> None:
        """One more is ready (any thread: the event is set on its loop)."""
        with self.lock:
            self.ready += 1
            done = self.ready >= self.expected
        if done:
            self.loop.call_soon_threadsafe(self.event.set)


@attrs.define(eq=False)
class _Leftovers:
    """What a run's deliberate leaks left, for cleanup after the drill has looked."""

    popens: list[subprocess.Popen[bytes]] = attrs.field(factory=list)
    orphans: list[int] = attrs.field(factory=list)
    release: threading.Event = attrs.field(factory=threading.Event)


async def _parked(ready: _Readiness) -> None:
    ready.one()
    await anyio.sleep_forever()


def _polling_tool(ready: _Readiness) -> None:
    ready.one()
    while True:
        ks_sleep(0.5)  # wakes at once on interrupt
        ks_check()


def _blocking_tool(ready: _Readiness, release: threading.Event) -> None:
    ready.one()
    # Never polls the interrupt: it is abandoned after the thread grace. It ends when the
    # drill is over, so no thread outlives the drill's process for long.
    while not release.wait(0.01):
        pass


#: The scripted agent's tool calls that return at once; the next one parks.
_QUICK_STEPS: Final = 2
#: What a framework's catch-all hands the model for a failed tool call.
_TOOL_ERROR: Final = "An error occurred while running the tool. Please try again."
_FINAL: Final = "final answer"


@attrs.define(eq=False)
class _Agent:
    """The drill's scripted agent: its model, and the record of every model call.

    The record is the drill's own (``time.monotonic()`` at the start of each call), not
    the runtime's ledger, so the ``model`` check does not take the runtime's word.
    """

    calls: list[float] = attrs.field(factory=list)
    done: anyio.Event = attrs.field(factory=anyio.Event)
    #: hands the session to a loop running outside its block (``"model"`` leak)
    session: Session | None = None
    bound: anyio.Event = attrs.field(factory=anyio.Event)

    async def model(self, history: list[str]) -> str:
        """A scripted model: ask for the tool, or answer once a tool failed."""
        self.calls.append(time.monotonic())
        await anyio.lowlevel.checkpoint()
        return _FINAL if history and history[-1] == _TOOL_ERROR else "call the tool"


async def _step(ready: _Readiness, n: int) -> str:
    """The agent's tool: the first calls return, the next one is parked."""
    if n < _QUICK_STEPS:
        return f"result {n}"
    ready.one()
    await anyio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


async def _agent_loop(
    session: Session, agent: _Agent, ready: _Readiness, *, swallows_kill: bool
) -> None:
    """Model, tool, model, tool... until the model answers.

    A framework's loop: a tool's failure becomes text for the model. Guarded as the
    integrations guard one (the model request is refused once the session is
    interrupted) unless *swallows_kill*: then its catch-all takes the kill too, and the
    model request after it is not refused (the ``"model"`` leak).
    """
    try:
        history: list[str] = []
        while True:
            if not swallows_kill:
                refuse_if_interrupted(session)
            if await agent.model(history) == _FINAL:
                return
            try:
                history.append(await session.call(_step, ready, len(history), tool="step"))
            except Exception:  # the framework's catch-all: the failure, as text
                history.append(_TOOL_ERROR)
            except Interrupted:  # noqa: ASYNC103 - the fault the "model" leak drills
                if not swallows_kill:
                    raise
                history.append(_TOOL_ERROR)
    finally:
        agent.done.set()


async def _request_task(agent: _Agent, ready: _Readiness) -> None:
    """A server's request task: created outside the session's block, it binds the
    session and runs the leaky agent loop (the ``"model"`` leak)."""
    await agent.bound.wait()
    assert agent.session is not None
    with bind_session(agent.session):
        await _agent_loop(agent.session, agent, ready, swallows_kill=True)


async def _stubborn_task(release: threading.Event) -> None:
    while not release.is_set():
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:  # noqa: ASYNC103 - the fault this leak drills
            continue  # noqa: ASYNC104


async def _synthetic(  # noqa: ASYNC114 - private; started with tg.start in this module
    runtime: Runtime,
    shape: DrillShape,
    run: int,
    leftovers: _Leftovers,
    agent: _Agent,
    *,
    task_status: anyio.abc.TaskStatus[Session],
) -> None:
    policy = StopPolicy(
        term_grace=shape.term_grace,
        thread_grace=shape.thread_grace,
        stop_timeout=shape.stop_timeout,
        max_abandoned_threads=max(16, shape.blocking_threads * 4),
    )
    # +1: the agent loop, parked in its tool.
    expected = shape.calls + shape.threads + shape.blocking_threads + ("thread" in shape.leak) + 1
    ready = _Readiness(expected)
    async with anyio.create_task_group() as server:
        if "model" in shape.leak:
            # Started before the session exists, so its context is not the session's.
            server.start_soon(_request_task, agent, ready)
        async with (
            runtime.session(
                "drill", labels={"drill": "synthetic", "run": str(run)}, policy=policy
            ) as session,
            anyio.create_task_group() as body,
        ):
            await _fill(session, shape, leftovers, agent, ready, body)
            await ready.event.wait()
            task_status.started(session)
            await anyio.sleep_forever()


async def _fill(
    session: Session,
    shape: DrillShape,
    leftovers: _Leftovers,
    agent: _Agent,
    ready: _Readiness,
    body: anyio.abc.TaskGroup,
) -> None:
    """Start a synthetic session's work on every plane, and its agent loop."""
    for _ in range(shape.calls):
        session.start_soon(_parked, ready, tool="parked")
    for _ in range(shape.threads):
        session.start_soon(session.run_sync, _polling_tool, ready, tool="poll")
    for _ in range(shape.blocking_threads):
        session.start_soon(session.run_sync, _blocking_tool, ready, leftovers.release, tool="block")
    for i in range(shape.processes):
        proc = await session.open_process(
            ["sh", "-c", _STUBBORN_TREE if i == 0 else _TREE],
            stdin=None,
            stderr=None,
        )
        assert proc.stdout is not None
        await proc.stdout.receive()  # "ready": the whole tree runs
    if "process" in shape.leak:
        # Behind the runtime's back: from an empty context (as a framework's own
        # worker would), so not the session's work and not adopted by its spawn hook.
        leftovers.popens.append(
            contextvars.Context().run(
                subprocess.Popen,
                ["sleep", "300"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    if "orphan" in shape.leak:
        # A daemon's double fork, behind the runtime's back (an empty context): the
        # shell exits at once and its grandchild is orphaned.
        daemon = contextvars.Context().run(
            subprocess.Popen,
            ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        out, _ = await anyio.to_thread.run_sync(daemon.communicate)
        leftovers.orphans.append(int(out))
    if "thread" in shape.leak:
        # A pool the thread plane does not run, whose caller does not wait for it.
        session.start_soon(
            anyio.to_thread.run_sync,
            partial(_blocking_tool, ready, leftovers.release),
            abandon_on_cancel=True,
            tool="leak",
        )
    if "task" in shape.leak:
        asyncio.get_running_loop().create_task(_stubborn_task(leftovers.release))
    if "model" in shape.leak:
        agent.session = session  # to the request task outside the block
        agent.bound.set()
    else:
        # The agent loop inside the block, as an application runs it.
        body.start_soon(partial(_agent_loop, session, agent, ready, swallows_kill=False))


def _clean_leftovers(leftovers: _Leftovers) -> None:
    leftovers.release.set()
    for p in leftovers.popens:
        if p.poll() is None:
            os.killpg(p.pid, 9)
        p.wait()
    for pid in leftovers.orphans:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        with contextlib.suppress(ChildProcessError):  # ours only as the subreaper
            os.waitpid(pid, 0)


async def run_drills(
    runtime: Runtime,
    *,
    runs: int = 20,
    shape: DrillShape | None = None,
    objectives: DrillObjectives | None = None,
    on_result: Callable[[DrillResult], None] | None = None,
) -> DrillSummary:
    """Start *runs* synthetic sessions of *shape* one after another, drill each, and
    state the verdict against *objectives*.

    The chain of the audit log is verified on the last run (and on any that failed),
    not on every one, so a long series stays linear. Deliberate leaks are cleaned up
    after the drill has looked at them. While it runs this process is a child subreaper
    (process-wide, restored after): an orphan of a session's processes stays under it,
    where the process check finds it, instead of going to PID 1.

    Raises:
        TypeError, ValueError: *runs* is not an int ≥ 1.
    """
    positive_int("runs", runs)
    shape = shape if shape is not None else DrillShape()
    objectives = objectives if objectives is not None else DrillObjectives()
    with subreaper():
        # Orphans of the session's processes are reparented here, not to PID 1: the
        # process check still finds them.
        return await _run_drills(runtime, runs, shape, objectives, on_result)


async def _run_drills(
    runtime: Runtime,
    runs: int,
    shape: DrillShape,
    objectives: DrillObjectives,
    on_result: Callable[[DrillResult], None] | None,
) -> DrillSummary:
    results: list[DrillResult] = []
    for run in range(runs):
        leftovers = _Leftovers()
        agent = _Agent()
        try:
            async with anyio.create_task_group() as tg:
                session: Session = await tg.start(_synthetic, runtime, shape, run, leftovers, agent)
                result = await _drill(
                    session,
                    agent,
                    quiesce_within=objectives.quiesce_ms / 1e3,
                    verify_chain=run == runs - 1,
                )
                if not result.ok and run != runs - 1:
                    result = attrs.evolve(
                        result,
                        checks=(
                            *result.checks[:-1],
                            _check_audit(_audit_path(session), result.report, verify_chain=True),
                        ),
                    )
                tg.cancel_scope.cancel()
        finally:
            _clean_leftovers(leftovers)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return summarize(results, objectives)
