"""The feature comparison of ``docs/comparison.md``, demonstrated.

Each scenario runs against plain asyncio, anyio, trio and kill_switch with real parts:
a real process tree (a shell leader, a grandchild, and a grandchild that ignores
SIGTERM), real worker threads committing side effects, a real foreign thread. Each test
asserts what the mechanism observably does — the baselines' losses included — so the
table cannot rot: if a library starts stopping process groups one day, its test fails
and the table must change.

The baselines get their fairest setup: their subprocesses start in a new session (so
the tests can clean up with ``killpg``, and so nothing depends on sharing pytest's
process group); what they do on cancellation is their default.
"""

from __future__ import annotations

import asyncio
import selectors
import signal
import subprocess
import threading
import time
from contextlib import suppress
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pytest
import trio
import trio.lowlevel
import trio.testing

import kill_switch as ks
from kill_switch.testing import MemoryAudit

from ._procs import alive, killpg_quietly, no_zombies_no_leaks, wait_gone

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from pathlib import Path

    from anyio.abc import ByteReceiveStream, TaskStatus

WAIT = 10.0  # bound on every wait for a state change (a hang guard, never a timing claim)

#: A shell leader with two grandchildren: one that honours SIGTERM, one that ignores it.
#: Each grandchild's pid is printed once it runs (the second one after its trap is set).
TREE = "sleep 1000 & echo $!; sh -c 'trap \"\" TERM; echo $$; exec sleep 1000' & wait"

# ----------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def clean_after() -> Iterator[None]:
    """After every test: no <defunct> children and the fd count back to its baseline."""
    with no_zombies_no_leaks():
        yield


def pids_from(lines: bytes) -> list[int]:
    return [int(x) for x in lines.split()]


async def read_pids(stream: ByteReceiveStream | None, n: int) -> list[int]:
    """Read the *n* pids the tree prints once its members run (state, not a guess)."""
    assert stream is not None
    buf = b""
    with anyio.fail_after(WAIT):
        while buf.count(b"\n") < n:
            buf += await stream.receive()
    return pids_from(buf)


async def run_agent_then_interrupt(
    session: ks.Session,
    agent: Callable[[], Awaitable[Any]],
    ready: Callable[[], Awaitable[Any]],
    reason: str = "stop",
) -> ks.StopReport:
    """Run *agent* inside *session*'s block; once *ready* returns, interrupt it from
    outside the block (as an operator would) and return the StopReport."""

    async def body() -> None:
        async with session:
            await agent()

    async with anyio.create_task_group() as tg:
        tg.start_soon(body)
        await ready()
        report = await session.interrupt(reason, trigger="operator", operator="ops")
    return report


async def wait_for(event: threading.Event) -> None:
    """Wait (off the loop) until a thread sets *event*."""
    assert await anyio.to_thread.run_sync(event.wait, WAIT)


class Worker:
    """A sync tool: a loop that commits one side effect per step.

    It looks at no cancellation of any library; *poll* (``ks.check``) is what a
    cooperative tool adds. ``release`` is the test's own way to end it afterwards.
    """

    def __init__(self, poll: Callable[[], None] | None = None) -> None:
        self.poll = poll
        self.effects: list[int] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.done = threading.Event()
        self.mark: int | None = None
        self.effect_after_mark = threading.Event()

    def run(self) -> int:
        try:
            while not self.release.is_set():
                if self.poll is not None:
                    self.poll()
                self.effects.append(len(self.effects))  # the side effect
                if self.mark is not None and len(self.effects) > self.mark:
                    self.effect_after_mark.set()
                self.started.set()
                time.sleep(0.002)  # the tool's own pace between side effects
            return len(self.effects)
        finally:
            self.done.set()

    def watch(self) -> None:
        """From now on, say when one more side effect lands."""
        self.mark = len(self.effects)

    def finish(self) -> None:
        """End the tool (cleanup) and wait until its thread has left it."""
        self.release.set()
        assert self.done.wait(WAIT)


class IdleSelector(selectors.DefaultSelector):
    """A selector that says when its event loop blocks with nothing due.

    ``idle`` is set right before the loop blocks with no timer due within a minute: the
    timeout is computed by then, so a callback queued without waking the loop (no write
    to its self-pipe) does not run until something else wakes it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.idle = threading.Event()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None or timeout > 60:
            self.idle.set()
        try:
            return super().select(timeout)
        finally:
            self.idle.clear()


def start_anyio_loop_thread(main: Callable[[], Any], selector: IdleSelector) -> threading.Thread:
    """Run ``anyio.run(main)`` on an asyncio loop over *selector* in its own thread."""
    options = {"loop_factory": partial(asyncio.SelectorEventLoop, selector)}
    thread = threading.Thread(
        target=anyio.run, args=(main,), kwargs={"backend_options": options}, daemon=True
    )
    thread.start()
    return thread


# ------------------------------------------- scenario 1: a tool's subprocess tree


async def test_tree_asyncio_task_cancel_leaves_the_whole_tree_running() -> None:
    """Task.cancel() of a task awaiting its subprocess signals nothing: all three live on."""
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", TREE, stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    pids = [proc.pid]
    try:
        pids += [int(await proc.stdout.readline()) for _ in range(2)]
        waiting = asyncio.Event()

        async def tool() -> int:
            waiting.set()
            return await proc.wait()

        task = asyncio.create_task(tool())
        await waiting.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [alive(p) for p in pids] == [True, True, True]
    finally:
        killpg_quietly(proc.pid)
        with anyio.fail_after(WAIT):
            await proc.wait()
            await proc.stdout.read()  # EOF once every holder of the pipe is gone
        await wait_gone(pids)


async def test_tree_anyio_cancel_scope_kills_the_leader_only() -> None:
    """A cancelled scope around anyio.open_process SIGKILLs the leader; both grandchildren
    (the SIGTERM-ignoring one too) live on."""
    pids: list[int] = []
    try:
        with anyio.CancelScope() as scope:
            async with await anyio.open_process(
                ["sh", "-c", TREE], stdin=None, stderr=None, start_new_session=True
            ) as proc:
                pids.append(proc.pid)
                try:
                    pids += await read_pids(proc.stdout, 2)
                except BaseException:
                    killpg_quietly(proc.pid)  # or aclose() would wait for the tree
                    raise
                scope.cancel()
                await proc.wait()
        assert scope.cancelled_caught
        assert proc.returncode == -signal.SIGKILL
        assert [alive(p) for p in pids] == [False, True, True]
    finally:
        if pids:
            killpg_quietly(pids[0])
            await wait_gone(pids)


def test_tree_trio_run_process_terminates_the_leader_only() -> None:
    """trio.run_process in a cancelled nursery SIGTERMs the leader (its default
    deliver_cancel); both grandchildren (the SIGTERM-ignoring one too) live on."""
    box: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    ["sh", "-c", TREE],
                    stdout=subprocess.PIPE,
                    check=False,
                    start_new_session=True,
                )
            )
            box["proc"] = proc
            assert proc.stdout is not None
            buf = b""
            while buf.count(b"\n") < 2:
                buf += await proc.stdout.receive_some()
            box["pids"] = [proc.pid, *pids_from(buf)]
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        pids: list[int] = box["pids"]
        assert box["proc"].returncode == -signal.SIGTERM
        assert [alive(p) for p in pids] == [False, True, True]
    finally:
        if "proc" in box:
            killpg_quietly(box["proc"].pid)
    anyio.run(wait_gone, box.get("pids", []))


@pytest.mark.slow
async def test_tree_kill_switch_interrupt_stops_every_member_and_reports_it() -> None:
    """session.open_process + interrupt(): SIGTERM to the group, SIGKILL after the grace
    for the member that ignored it; no pid is left, and the report says so."""
    pids: list[int] = []
    tree_ready = anyio.Event()
    async with ks.Runtime(policy=ks.StopPolicy(term_grace=0.2)) as runtime:
        session = runtime.session("builder")

        async def agent() -> None:
            proc = await session.open_process(["sh", "-c", TREE], stdin=None, stderr=None)
            pids.append(proc.pid)
            try:
                pids.extend(await read_pids(proc.stdout, 2))
            except BaseException:
                killpg_quietly(proc.pid)
                raise
            tree_ready.set()
            await proc.wait()

        with pytest.warns(ks.EscalationWarning, match="SIGKILL"):
            report = await run_agent_then_interrupt(session, agent, tree_ready.wait)
    assert [alive(p) for p in pids] == [False, False, False]
    (rep,) = report.processes
    # The leader went at SIGTERM; the group's SIGKILL took the member that ignored it.
    assert rep.signals == ("SIGTERM", "SIGKILL")
    assert rep.returncode == -signal.SIGTERM
    # The member that outlived the grace is listed (members are looked for after the
    # SIGTERM: the sleep that went at once may not be).
    assert pids[2] in rep.members
    assert set(rep.members) <= set(pids[1:])
    assert report.outcome == "stopped"
    assert report.quiescent


# ------------------------------------------- scenario 2: a sync tool in a thread


async def test_thread_asyncio_to_thread_cancel_leaves_the_tool_writing() -> None:
    """Cancelling a task awaiting asyncio.to_thread returns at once; the thread goes on
    committing side effects after the cancel."""
    worker = Worker()
    task = asyncio.create_task(asyncio.to_thread(worker.run))
    try:
        await wait_for(worker.started)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        worker.watch()
        await wait_for(worker.effect_after_mark)
        assert not worker.done.is_set()
    finally:
        await anyio.to_thread.run_sync(worker.finish)


async def test_thread_anyio_abandon_on_cancel_leaves_the_tool_writing() -> None:
    """anyio.to_thread.run_sync(abandon_on_cancel=True) in a cancelled scope returns at
    once; the thread goes on committing side effects after the cancel."""
    worker = Worker()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(anyio.to_thread.run_sync, worker.run, abandon_on_cancel=True))
            await wait_for(worker.started)
            tg.cancel_scope.cancel()
        worker.watch()
        await wait_for(worker.effect_after_mark)
        assert not worker.done.is_set()
    finally:
        await anyio.to_thread.run_sync(worker.finish)


def test_thread_trio_abandon_on_cancel_leaves_the_tool_writing() -> None:
    """trio.to_thread.run_sync(abandon_on_cancel=True) in a cancelled nursery returns at
    once; the thread goes on committing side effects after the cancel."""
    worker = Worker()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.to_thread.run_sync, worker.run, abandon_on_cancel=True))
            assert await trio.to_thread.run_sync(worker.started.wait, WAIT)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        worker.watch()
        assert worker.effect_after_mark.wait(WAIT)
        assert not worker.done.is_set()
    finally:
        worker.finish()


async def test_thread_kill_switch_polling_tool_commits_nothing_after_the_report() -> None:
    """A tool polling ks.check() stops at its next poll: it has left the tool, with no
    further side effect, when the StopReport arrives; the report says "interrupted"."""
    worker = Worker(poll=ks.check)
    async with ks.Runtime(policy=ks.StopPolicy(thread_grace=WAIT)) as runtime:
        session = runtime.session("indexer")
        report = await run_agent_then_interrupt(
            session,
            partial(session.run_sync, worker.run, tool="index"),
            partial(wait_for, worker.started),
        )
    assert worker.done.is_set()
    committed = len(worker.effects)
    (thread,) = report.threads
    assert (thread.tool, thread.outcome) == ("index", "interrupted")
    assert report.quiescent
    assert len(worker.effects) == committed


@pytest.mark.slow
async def test_thread_kill_switch_non_polling_tool_is_reported_abandoned() -> None:
    """A tool that never polls cannot be stopped (Python cannot): after the grace it is
    reported "abandoned" — and it does go on committing side effects."""
    worker = Worker()
    try:
        async with ks.Runtime(policy=ks.StopPolicy(thread_grace=0.05)) as runtime:
            session = runtime.session("indexer")
            report = await run_agent_then_interrupt(
                session,
                partial(session.run_sync, worker.run, tool="index"),
                partial(wait_for, worker.started),
            )
            (thread,) = report.threads
            assert (thread.tool, thread.outcome, thread.running) == ("index", "abandoned", True)
            # ... and the report does not claim it stopped.
            assert (report.outcome, report.quiescent) == ("unresponsive", False)
            assert ks.abandoned_threads(runtime) == 1
            worker.watch()
            await wait_for(worker.effect_after_mark)  # the honest part: it still writes
    finally:
        await anyio.to_thread.run_sync(worker.finish)


# --------------------------------------- scenario 3: stop from a foreign thread


@pytest.mark.slow
def test_foreign_thread_asyncio_task_cancel_is_not_delivered_to_an_idle_loop() -> None:
    """Task.cancel() from another thread only queues the cancellation: an idle loop is
    not woken, so the agent runs on until something else happens to wake it."""
    selector = IdleSelector()
    parked = threading.Event()
    box: dict[str, Any] = {}

    async def tool() -> None:
        parked.set()
        await asyncio.Event().wait()  # waits for a reply that does not come

    async def main() -> None:
        box["loop"] = asyncio.get_running_loop()
        box["task"] = task = asyncio.create_task(tool())
        await asyncio.wait({task})

    def run() -> None:
        with asyncio.Runner(loop_factory=partial(asyncio.SelectorEventLoop, selector)) as r:
            r.run(main())

    loop_thread = threading.Thread(target=run, daemon=True)
    loop_thread.start()
    try:
        assert parked.wait(WAIT)
        assert selector.idle.wait(WAIT)
        box["task"].cancel()  # from this thread: what an operator console would do
        # The loop is blocked with no timer and no I/O: it cannot run the queued
        # cancellation whatever the bound; 0.5 s only limits how long we look.
        loop_thread.join(0.5)
        assert loop_thread.is_alive()
        assert not box["task"].done()
    finally:
        box["loop"].call_soon_threadsafe(lambda: None)  # any wake-up runs the cancel
        loop_thread.join(WAIT)
    assert not loop_thread.is_alive()
    assert box["task"].cancelled()


def test_foreign_thread_anyio_cancel_raises_and_poisons_the_scope() -> None:
    """CancelScope.cancel() from another thread raises RuntimeError after marking the
    scope cancelled: nothing is delivered, and a later, correctly marshalled cancel()
    on the loop is a no-op — the scope can no longer be cancelled at all."""
    selector = IdleSelector()
    parked = threading.Event()
    ended = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["loop"] = asyncio.get_running_loop()
        box["release"] = release = anyio.Event()
        with anyio.CancelScope() as scope:
            box["scope"] = scope
            parked.set()
            await release.wait()  # the agent parked on a tool
        box["cancelled_caught"] = scope.cancelled_caught
        ended.set()

    loop_thread = start_anyio_loop_thread(main, selector)
    try:
        assert parked.wait(WAIT)
        assert selector.idle.wait(WAIT)
        scope: anyio.CancelScope = box["scope"]
        with pytest.raises(RuntimeError):
            scope.cancel()  # from this thread
        assert scope.cancel_called
        # Now cancel it the right way, on the loop; then let the loop go idle again.
        ran = threading.Event()

        def cancel_on_loop() -> None:
            scope.cancel()
            ran.set()

        box["loop"].call_soon_threadsafe(cancel_on_loop)
        assert ran.wait(WAIT)
        assert selector.idle.wait(WAIT)  # back to sleep: the body was never woken
        assert not ended.is_set()
    finally:
        box["loop"].call_soon_threadsafe(box["release"].set)
        loop_thread.join(WAIT)
    assert not loop_thread.is_alive()
    assert box["cancelled_caught"] is False  # it ended because its tool returned


def test_foreign_thread_kill_switch_interrupt_stops_an_idle_agent() -> None:
    """session.interrupt() from another thread wakes the idle loop and stops the agent;
    the thread gets the StopReport with handle.result()."""
    selector = IdleSelector()
    parked = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        async with ks.Runtime() as runtime:
            async with runtime.session("researcher") as session:
                box["session"] = session
                session.start_soon(anyio.Event().wait, tool="search")  # a reply never comes
                parked.set()
                await anyio.Event().wait()

    loop_thread = start_anyio_loop_thread(main, selector)
    try:
        assert parked.wait(WAIT)
        assert selector.idle.wait(WAIT)
        session: ks.Session = box["session"]
        handle = session.interrupt("operator console", trigger="operator", operator="ops")
        report = handle.result(WAIT)
    finally:
        loop_thread.join(WAIT)
    assert not loop_thread.is_alive()
    assert (report.outcome, report.trigger, report.operator) == ("stopped", "operator", "ops")
    assert report.tool_calls_cancelled == 1
    assert report.quiescent


# --------------------------------------- scenario 4: a tool swallows cancellation


async def test_swallow_asyncio_task_runs_on_after_one_cancel() -> None:
    """asyncio's cancel is edge-triggered: a tool that catches CancelledError goes on,
    commits its next side effect, and its task is not done."""
    effects: list[str] = []
    parked = asyncio.Event()
    committed = asyncio.Event()

    async def tool() -> None:
        try:
            parked.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # the misbehaviour under test (a broad retry loop, say)
        await asyncio.sleep(0)  # its next step
        effects.append("after the cancel")
        committed.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(tool())
    try:
        await parked.wait()
        task.cancel()
        with anyio.fail_after(WAIT):
            await committed.wait()
        assert effects == ["after the cancel"]
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.wait({task})
    assert task.cancelled()


async def test_swallow_anyio_cancel_is_delivered_again_at_the_next_await() -> None:
    """anyio's cancel scopes are level-triggered: a tool that swallows once is cancelled
    again at its next await and commits nothing."""
    effects: list[str] = []
    swallowed = 0

    async def tool() -> None:
        nonlocal swallowed
        try:
            await anyio.Event().wait()
        except anyio.get_cancelled_exc_class():
            swallowed += 1  # the misbehaviour under test
        await anyio.lowlevel.checkpoint()
        effects.append("after the cancel")

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(tool)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
    assert swallowed == 1
    assert effects == []


def test_swallow_trio_cancel_is_delivered_again_at_the_next_await() -> None:
    """trio's cancel scopes are level-triggered: a tool that swallows once is cancelled
    again at its next checkpoint and commits nothing."""
    effects: list[str] = []
    swallowed = 0

    async def tool() -> None:
        nonlocal swallowed
        try:
            await trio.Event().wait()
        except trio.Cancelled:
            swallowed += 1  # the misbehaviour under test
        await trio.lowlevel.checkpoint()
        effects.append("after the cancel")

    async def main() -> None:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tool)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert swallowed == 1
    assert effects == []


async def test_swallow_kill_switch_cancel_is_delivered_again_and_reported() -> None:
    """A tool call that swallows the interrupt once is cancelled again at its next await;
    it commits nothing and the report says stopped and quiescent."""
    effects: list[str] = []
    swallowed = 0

    async def tool() -> None:
        nonlocal swallowed
        try:
            await anyio.Event().wait()
        except asyncio.CancelledError:
            swallowed += 1  # the misbehaviour under test
        await anyio.lowlevel.checkpoint()
        effects.append("after the cancel")

    async with ks.Runtime() as runtime:
        session = runtime.session("agent")
        report = await run_agent_then_interrupt(
            session, partial(session.call, tool, tool="stubborn"), anyio.wait_all_tasks_blocked
        )
    assert swallowed == 1
    assert effects == []
    assert (report.outcome, report.quiescent) == ("stopped", True)
    assert report.tool_calls_cancelled == 1


async def test_swallow_anyio_endless_swallower_holds_the_canceller() -> None:
    """A tool that swallows every cancellation: anyio re-delivers it again and again, and
    the cancelled task group does not exit — the canceller waits as long as the tool
    likes, with nothing saying so."""
    release = False
    swallowed = 0
    redelivered = anyio.Event()
    exited = anyio.Event()

    async def endless() -> None:
        nonlocal swallowed
        while not release:
            try:
                await anyio.sleep(0.01)  # the tool's own pace
            except anyio.get_cancelled_exc_class():
                swallowed += 1
                if swallowed == 3:
                    redelivered.set()

    async def agent(*, task_status: TaskStatus[anyio.CancelScope]) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(endless)
            task_status.started(tg.cancel_scope)
        exited.set()

    async with anyio.create_task_group() as outer:
        scope = await outer.start(agent)
        scope.cancel()
        with anyio.fail_after(WAIT):
            await redelivered.wait()  # cancelled three times ...
        assert not exited.is_set()  # ... and the cancel has not finished
        release = True
    assert exited.is_set()


def test_swallow_trio_endless_swallower_holds_the_canceller() -> None:
    """A tool that swallows every cancellation: trio re-delivers it again and again, and
    the cancelled nursery does not exit — the canceller waits as long as the tool likes."""
    release = False
    swallowed = 0

    async def main() -> None:
        redelivered = trio.Event()
        exited = trio.Event()

        async def endless() -> None:
            nonlocal swallowed
            while not release:
                try:
                    await trio.sleep(0.01)  # the tool's own pace
                except trio.Cancelled:
                    swallowed += 1
                    if swallowed == 3:
                        redelivered.set()

        async def agent(*, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(endless)
                task_status.started(nursery.cancel_scope)
            exited.set()

        nonlocal release
        async with trio.open_nursery() as outer:
            scope: trio.CancelScope = await outer.start(agent)
            scope.cancel()
            with trio.fail_after(WAIT):
                await redelivered.wait()  # cancelled three times ...
            assert not exited.is_set()  # ... and the cancel has not finished
            release = True
        assert exited.is_set()

    trio.run(main)


@pytest.mark.slow
async def test_swallow_kill_switch_endless_swallower_is_reported_unresponsive() -> None:
    """A tool that swallows every cancellation: after stop_timeout the report says
    unresponsive, the audit says escalated, and the session's block exits — the tool
    itself is not stopped (nothing can), it is named."""
    audit = MemoryAudit()
    release = threading.Event()
    finished = anyio.Event()

    async def endless() -> None:
        try:
            while not release.is_set():
                with suppress(asyncio.CancelledError):  # the misbehaviour under test
                    await anyio.sleep(0.01)  # the tool's own pace
        finally:
            finished.set()

    policy = ks.StopPolicy(stop_timeout=0.3)
    async with ks.Runtime(audit=audit, policy=policy) as runtime:
        try:
            async with runtime.session("agent") as session:
                session.start_soon(endless, tool="stubborn")
                await anyio.wait_all_tasks_blocked()
                handle = session.interrupt("stop", trigger="operator")
                await anyio.Event().wait()
            report = await handle
            assert (report.outcome, report.quiescent) == ("unresponsive", False)
            kinds = [e.kind for e in audit.events if e.interrupt_id == report.interrupt_id]
            assert "escalated" in kinds
            assert "interrupt_completed" not in kinds
            assert not finished.is_set()  # the tool still runs
        finally:
            release.set()
            with anyio.fail_after(WAIT):
                await finished.wait()


# ------------------------------------------- scenario 5: who stopped what, and why


async def test_audit_kill_switch_records_who_stopped_what(tmp_path: Path) -> None:
    """Only kill_switch writes a record: the request (trigger, operator, reason) and its
    completion are rows of a hash-chained SQLite log that verifies."""
    db = str(tmp_path / "audit.db")
    async with ks.Runtime(audit=db) as runtime:
        session = runtime.session("researcher")
        report = await run_agent_then_interrupt(
            session,
            partial(session.call, anyio.sleep_forever, tool="search"),
            anyio.wait_all_tasks_blocked,
            reason="prompt injection",
        )
    with ks.AuditLog(db) as log:
        rows = log.events(interrupt_id=report.interrupt_id)
        assert log.verify().ok
    (request,) = [r for r in rows if r.kind == "interrupt_requested"]
    assert (request.trigger, request.operator, request.reason) == (
        "operator",
        "ops",
        "prompt injection",
    )
    assert request.session_id == session.id
    assert "interrupt_completed" in [r.kind for r in rows]
