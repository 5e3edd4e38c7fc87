"""The thread plane: sync tools in worker threads, their grace, abandonment and cap.

Real threads. Tests synchronise on state (``threading.Event``s the tools set), never on
sleeps; durations come from ``StopPolicy`` so they can be tiny. A tool that must be
abandoned blocks on an event the test releases afterwards (or sleeps briefly), so no
test leaves a thread behind (checked after every test).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pytest

import kill_switch as ks
from kill_switch import abandoned_threads, bind, from_thread
from kill_switch.testing import MemoryAudit

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = pytest.mark.both_loops

WAIT = 10.0  # bound on every wait for a state change (a hang guard, never a timing claim)


# ----------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    """Every sync tool thread a test started has exited by the end of the test."""
    yield
    for t in threading.enumerate():
        if t.name.startswith("kill_switch "):
            t.join(WAIT)
            assert not t.is_alive(), f"{t.name} still running"


async def wait_for(event: threading.Event) -> None:
    """Wait (off the loop) until a tool thread sets *event*."""
    assert await anyio.to_thread.run_sync(event.wait, WAIT)


def join_ident(ident: int | None) -> None:
    """Wait for the thread *ident* to exit (if it still runs)."""
    for t in threading.enumerate():
        if t.ident == ident:
            t.join(WAIT)
            assert not t.is_alive()


async def loop_turn() -> None:
    """Let the loop run the callbacks already queued (a thread's exit, say)."""
    await anyio.lowlevel.checkpoint()


def runtime(audit: MemoryAudit | None = None, **policy: Any) -> ks.Runtime:
    return ks.Runtime(audit=audit, policy=ks.StopPolicy(**policy))


async def run_and_interrupt(
    rt: ks.Runtime,
    tool: Callable[..., Any],
    started: threading.Event,
    *,
    after: Callable[[], None] | None = None,
) -> tuple[ks.Session, ks.StopReport]:
    """Run *tool* with ``run_sync`` in a session's body; interrupt once it has started.

    *after* runs right after ``interrupt()`` (to release a tool), before the await.
    """
    session = rt.session("agent")

    async def agent() -> None:
        async with session:
            await session.run_sync(tool)
            raise AssertionError("the body went on after its interrupt")  # pragma: no cover

    async with anyio.create_task_group() as tg:
        tg.start_soon(agent)
        await wait_for(started)
        handle = session.interrupt("stop the tool", trigger="operator", operator="ops")
        if after is not None:
            after()
        report = await handle
    return session, report


# ------------------------------------------------------------------------ basics


async def test_run_sync_returns_the_result_in_a_thread_bound_to_the_session() -> None:
    """The tool runs off the loop, sees its session, and its result comes back."""
    seen: list[Any] = []

    def tool(x: int, y: int) -> int:
        seen.append((ks.current_session(), threading.current_thread().name))
        ks.check()
        return x + y

    async with runtime() as rt, rt.session("agent") as session:
        assert await session.run_sync(tool, 2, 3) == 5
        assert session.info().actions == 1
    assert seen[0][0] is session
    assert seen[0][1].startswith("kill_switch agent/tool ")


async def test_run_sync_raises_the_tool_error() -> None:
    """An error raised in the thread is raised by ``await run_sync``."""

    def tool() -> None:
        raise LookupError("nope")

    async with runtime() as rt, rt.session("agent") as session:
        with pytest.raises(LookupError, match="nope"):
            await session.run_sync(tool)


async def test_run_sync_goes_through_the_tool_policy() -> None:
    """The guard's policy sees the tool name and arguments and can deny the call."""
    calls: list[ks.ToolCall] = []

    def policy(call: ks.ToolCall) -> bool:
        calls.append(call)
        return call.args != ("rm -rf /",)

    async with runtime() as rt, rt.session("agent", tool_policy=policy) as session:
        assert await session.run_sync(str.upper, "ls", tool="shell") == "LS"
        with pytest.raises(ks.ToolBlocked) as info:
            await session.run_sync(str.upper, "rm -rf /", tool="shell")
    assert info.value.decision.code == "denied"
    assert [(c.tool, c.args) for c in calls] == [("shell", ("ls",)), ("shell", ("rm -rf /",))]


async def test_run_sync_is_blocked_once_the_session_is_interrupted() -> None:
    """After interrupt() a new sync call is refused with ToolBlocked("terminated")."""
    ran: list[int] = []
    async with runtime() as rt:
        session = rt.session("agent")
        async with session:
            session.interrupt("stop", trigger="supervisor")
            with pytest.raises(ks.ToolBlocked) as info:
                await session.run_sync(ran.append, 1)
            assert info.value.decision.code == "terminated"
            raise info.value
    assert ran == []


@pytest.mark.parametrize("fn", [42, asyncio.sleep], ids=["not-callable", "coroutine-fn"])
async def test_run_sync_rejects_what_is_not_a_sync_callable(fn: Any) -> None:
    """A non-callable or a coroutine function is a TypeError, before any thread starts."""
    async with runtime() as rt, rt.session("agent") as session:
        with pytest.raises(TypeError):
            await session.run_sync(fn)
        assert session.info().actions == 0


async def test_threads_that_finished_before_the_interrupt_are_not_reported() -> None:
    """Only threads running when the interrupt came appear in the report."""
    async with runtime() as rt:
        session = rt.session("agent")
        async with session:
            await session.run_sync(lambda: None)
            session.interrupt("done", trigger="supervisor")
        assert session.report is not None
        assert session.report.threads == ()


# ------------------------------------------------- FAULTS 18: cooperative tools


@pytest.mark.slow
async def test_polling_tool_commits_nothing_after_the_poll_that_saw_the_flag() -> None:
    """A tool polling ks.check() stops at its next poll; no side effect lands after it."""
    started = threading.Event()
    effects: list[int] = []
    saw_flag_after: list[int] = []

    def poller() -> None:
        for i in range(100_000):
            try:
                ks.check()
            except ks.Interrupted:
                saw_flag_after.append(len(effects))
                raise
            effects.append(i)  # the side effect, committed only after a clean poll
            started.set()
            time.sleep(0.005)  # work between polls that does not look at the flag

    async with runtime(thread_grace=WAIT) as rt:
        _, report = await run_and_interrupt(rt, poller, started)
    (thread,) = report.threads
    join_ident(thread.ident)
    assert thread.outcome == "interrupted"
    assert saw_flag_after == [len(effects)]
    assert thread.seconds is not None
    assert thread.seconds < 1.0  # one poll interval (5 ms) plus generous slack


async def test_sleeping_tool_wakes_on_the_interrupt() -> None:
    """A tool in ks.sleep() raises Interrupted as soon as the flag is set."""
    started = threading.Event()

    def sleeper() -> None:
        started.set()
        ks.sleep(3600)

    async with runtime(thread_grace=3600) as rt:
        _, report = await run_and_interrupt(rt, sleeper, started)
    (thread,) = report.threads
    assert thread.outcome == "interrupted"
    assert thread.tool == "sleeper"
    assert report.quiescent


# --------------------------------------------- FAULTS 19: non-cooperative tools


@pytest.mark.slow
async def test_non_polling_tool_is_abandoned_not_reported_returned(tmp_path: Path) -> None:
    """A tool in time.sleep is abandoned after the grace; the awaiting side goes on."""
    started = threading.Event()
    release = threading.Event()

    def stubborn() -> str:
        started.set()
        release.wait(WAIT)  # a blocking call that never looks at the flag
        return "late result"

    audit = MemoryAudit()
    async with runtime(audit, thread_grace=0.05) as rt:
        _, report = await run_and_interrupt(rt, stubborn, started)
        (thread,) = report.threads
        still_running = any(t.ident == thread.ident for t in threading.enumerate())
        release.set()
        join_ident(thread.ident)
        await loop_turn()  # the thread's exit callback was queued before this
    assert still_running  # the stop resolved without it
    assert thread.outcome == "abandoned"  # the negative control: not "returned"
    assert thread.seconds is None
    assert thread.name.startswith("kill_switch agent/stubborn ")
    # It still ran when the report was built: never "stopped", never quiescent.
    assert thread.running
    assert (report.outcome, report.quiescent) == ("unresponsive", False)
    assert "STILL RUNNING" in report.summary()
    assert report.late_results == 0  # it came after the report: dropped, not delivered
    kinds = [e.kind for e in audit.events]
    assert "interrupt_completed" not in kinds
    assert kinds.index("escalated") < kinds.index("thread_returned")
    abandoned = [e for e in audit.events if e.kind == "thread_abandoned"]
    assert [(e.details["ident"], e.details["cause"]) for e in abandoned] == [
        (thread.ident, "grace")
    ]
    late = [e for e in audit.events if e.kind == "thread_returned"]
    assert [e.details["late"] for e in late] == [True]


@pytest.mark.slow
async def test_abandoned_tool_commit_point_refuses_its_side_effect(tmp_path: Path) -> None:
    """An abandoned tool that checks the flag before writing never writes."""
    started = threading.Event()
    release = threading.Event()
    target = tmp_path / "committed.txt"

    def sleeps_then_writes() -> None:
        started.set()
        release.wait(30)  # not interruptible: a plain Event, set once it is abandoned
        ks.check()  # the commit point
        target.write_text("side effect after the kill")

    async with runtime(thread_grace=0.05) as rt:
        _, report = await run_and_interrupt(rt, sleeps_then_writes, started)
        release.set()
    (thread,) = report.threads
    assert thread.outcome == "abandoned"
    join_ident(thread.ident)
    assert not target.exists()


@pytest.mark.slow
async def test_negative_control_without_a_commit_point_the_side_effect_lands(
    tmp_path: Path,
) -> None:
    """Without ks.check() before the write the file appears: the check above can fail."""
    started = threading.Event()
    release = threading.Event()
    target = tmp_path / "committed.txt"

    def sleeps_then_writes() -> None:
        started.set()
        release.wait(30)
        target.write_text("side effect after the kill")

    async with runtime(thread_grace=0.05) as rt:
        _, report = await run_and_interrupt(rt, sleeps_then_writes, started)
        release.set()
    (thread,) = report.threads
    join_ident(thread.ident)
    assert thread.outcome == "abandoned"
    assert target.exists()


async def test_tool_returning_within_the_grace_is_reported_and_its_result_dropped() -> None:
    """A non-polling tool that returns within the grace is "returned"; its result is late."""
    started = threading.Event()
    release = threading.Event()

    def quick() -> str:
        started.set()
        release.wait(WAIT)
        return "result nobody receives"

    async with runtime(thread_grace=WAIT) as rt:
        _, report = await run_and_interrupt(rt, quick, started, after=release.set)
    (thread,) = report.threads
    assert thread.outcome == "returned"
    assert thread.seconds is not None
    assert report.late_results == 1


async def test_tool_raising_after_the_interrupt_is_reported_raised() -> None:
    """A thread that fails after the interrupt is "raised" and its error kept aside."""
    started = threading.Event()
    release = threading.Event()

    def fails() -> None:
        started.set()
        release.wait(WAIT)
        raise OSError("disk went away")

    async with runtime(thread_grace=WAIT) as rt:
        _, report = await run_and_interrupt(rt, fails, started, after=release.set)
    (thread,) = report.threads
    assert thread.outcome == "raised"
    assert any("disk went away" in e for e in report.secondary_errors)


async def test_interrupted_run_sync_outside_the_body_raises_interrupted() -> None:
    """From a task outside the session's block, the awaiting side raises Interrupted."""
    started = threading.Event()

    def sleeper() -> None:
        started.set()
        ks.sleep(3600)

    caught: list[BaseException] = []
    async with runtime() as rt:
        session = rt.session("agent")

        async def outside() -> None:
            try:
                await session.run_sync(sleeper)
            except ks.Interrupted as exc:
                caught.append(exc)

        async def agent() -> None:
            async with session:
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(outside)
            await wait_for(started)
            report = await session.interrupt("stop", trigger="operator")
    assert [type(e) for e in caught] == [ks.Interrupted]
    assert [t.outcome for t in report.threads] == ["interrupted"]


async def test_run_sync_started_as_a_tool_task_is_stopped() -> None:
    """session.start_soon(session.run_sync, fn): the nested call is stopped and reported."""
    started = threading.Event()

    def sleeper() -> None:
        started.set()
        ks.sleep(3600)

    async with runtime() as rt:
        session = rt.session("agent")
        async with anyio.create_task_group() as tg:

            async def agent() -> None:
                async with session:
                    session.start_soon(session.run_sync, sleeper, tool="sleeper")
                    await anyio.sleep_forever()

            tg.start_soon(agent)
            await wait_for(started)
            report = await session.interrupt("stop", trigger="operator")
    assert [(t.tool, t.outcome) for t in report.threads] == [("sleeper", "interrupted")]
    assert report.quiescent


@pytest.mark.slow
async def test_nested_stubborn_thread_is_still_waited_for_and_abandoned() -> None:
    """A nested call leaves at the re-delivery; the stop still gives the thread its grace."""
    started = threading.Event()
    release = threading.Event()

    def stubborn() -> None:
        started.set()
        release.wait(WAIT)

    async with runtime(thread_grace=0.1) as rt:
        session = rt.session("agent")
        async with anyio.create_task_group() as tg:

            async def agent() -> None:
                async with session:
                    session.start_soon(session.run_sync, stubborn)
                    await anyio.sleep_forever()

            tg.start_soon(agent)
            await wait_for(started)
            report = await session.interrupt("stop", trigger="operator")
        release.set()
    (thread,) = report.threads
    assert thread.outcome == "abandoned"
    assert thread.running
    assert not report.quiescent


@pytest.mark.slow
async def test_stop_timeout_shorter_than_grace_abandons_at_the_stop_deadline() -> None:
    """With stop_timeout < thread_grace the thread is abandoned when the stop times out."""
    started = threading.Event()
    release = threading.Event()
    audit = MemoryAudit()

    def stubborn() -> None:
        started.set()
        release.wait(WAIT)

    async with runtime(audit, stop_timeout=0.1, thread_grace=WAIT) as rt:
        _, report = await run_and_interrupt(rt, stubborn, started)
        release.set()
    assert [t.outcome for t in report.threads] == ["abandoned"]
    causes = [e.details["cause"] for e in audit.events if e.kind == "thread_abandoned"]
    assert causes == ["stop_timeout"]


# ------------------------------------------------- FAULTS 20: the abandoned cap


@pytest.mark.slow
async def test_abandoned_threads_are_capped_per_runtime() -> None:
    """Past max_abandoned_threads new sync calls get ToolBlocked("thread_cap") until one exits."""
    started = threading.Event()
    release = threading.Event()

    def stubborn() -> None:
        started.set()
        release.wait(WAIT)

    async with runtime(thread_grace=0.05, max_abandoned_threads=1) as rt:
        _, report = await run_and_interrupt(rt, stubborn, started)
        (thread,) = report.threads
        assert thread.outcome == "abandoned"
        assert abandoned_threads(rt) == 1

        async with rt.session("other") as other:
            with pytest.raises(ks.ToolBlocked) as info:
                await other.run_sync(lambda: "never runs")
            assert other.info().actions == 0
        assert info.value.decision.code == "thread_cap"
        assert "cap 1" in info.value.decision.reason

        release.set()
        join_ident(thread.ident)
        assert abandoned_threads(rt) == 0
        async with rt.session("third") as third:
            assert await third.run_sync(lambda: "runs") == "runs"


async def test_a_cancelled_call_abandons_its_thread_at_once() -> None:
    """A cancellation that is not the interrupt abandons the thread (counted, audited)."""
    started = threading.Event()
    release = threading.Event()
    audit = MemoryAudit()

    def stubborn() -> None:
        started.set()
        release.wait(WAIT)

    async with runtime(audit) as rt:
        async with rt.session("agent") as session, anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def call() -> None:
                with scope:
                    await session.run_sync(stubborn)

            tg.start_soon(call)
            await wait_for(started)
            scope.cancel()
        assert abandoned_threads(rt) == 1
        assert session.state == "finished"
        release.set()
        for t in threading.enumerate():
            if t.name.startswith("kill_switch "):
                t.join(WAIT)
        assert abandoned_threads(rt) == 0
    abandoned = [e for e in audit.events if e.kind == "thread_abandoned"]
    assert [e.details["cause"] for e in abandoned] == ["cancelled"]


# --------------------------------------------- FAULTS 21: threads of the tool


async def test_bind_carries_the_session_into_a_thread_pool() -> None:
    """Work handed to a ThreadPoolExecutor through bind() sees the interrupt."""
    started = threading.Event()
    in_pool = threading.Barrier(3)
    outcomes: list[str] = []

    def pool_work() -> None:
        in_pool.wait(WAIT)
        try:
            ks.sleep(3600)
        except ks.Interrupted:
            outcomes.append("interrupted")
            raise

    def tool() -> None:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(bind(pool_work)) for _ in range(2)]
            in_pool.wait(WAIT)
            started.set()
            for f in futures:
                f.exception()
        ks.check()

    async with runtime() as rt:
        _, report = await run_and_interrupt(rt, tool, started)
    assert outcomes == ["interrupted", "interrupted"]
    assert [t.outcome for t in report.threads] == ["interrupted"]


async def test_plain_thread_does_not_see_the_session() -> None:
    """Documented limitation: a plain threading.Thread has no session; check() does nothing."""
    seen: list[tuple[ks.Session | None, bool]] = []

    def probe() -> None:
        try:
            ks.check()
            raised = False
        except ks.Interrupted:
            raised = True
        seen.append((ks.current_session(), raised))

    def tool() -> None:
        session = ks.current_session()
        assert session is not None
        session.interrupt("stop", trigger="supervisor")  # from the worker thread
        plain = threading.Thread(target=probe)
        plain.start()
        plain.join()
        bound = threading.Thread(target=bind(probe))
        bound.start()
        bound.join()
        ks.check()

    async with runtime() as rt:
        session = rt.session("agent")
        async with session:
            await session.run_sync(tool)
    assert seen == [(None, False), (session, True)]


# ------------------------------------------- FAULTS 22: back into the loop


async def test_from_thread_runs_a_coroutine_on_the_loop_in_the_session() -> None:
    """from_thread runs a coroutine function on the session's loop and returns its value."""

    async def double(x: int) -> tuple[int, ks.Session | None]:
        await anyio.lowlevel.checkpoint()
        return 2 * x, ks.current_session()

    def tool() -> tuple[int, ks.Session | None]:
        return from_thread(double, 21)

    async with runtime() as rt, rt.session("agent") as session:
        assert await session.run_sync(tool) == (42, session)


async def test_from_thread_after_the_interrupt_raises_without_running() -> None:
    """A thread whose session was interrupted gets Interrupted at once; nothing runs."""
    started = threading.Event()
    release = threading.Event()
    ran: list[int] = []

    async def callback() -> None:
        await anyio.lowlevel.checkpoint()
        ran.append(1)

    def tool() -> None:
        started.set()
        release.wait(WAIT)
        from_thread(callback)

    async with runtime(thread_grace=WAIT) as rt:
        _, report = await run_and_interrupt(rt, tool, started, after=release.set)
    assert [t.outcome for t in report.threads] == ["interrupted"]
    assert ran == []


async def test_from_thread_waiting_on_the_loop_is_woken_by_the_interrupt() -> None:
    """A thread parked in from_thread(sleep_forever) never hangs: the interrupt wakes it."""
    started = threading.Event()
    entered = anyio.Event()

    async def park() -> None:
        entered.set()
        await anyio.sleep_forever()

    def tool() -> None:
        from_thread(park)

    async with runtime(thread_grace=WAIT) as rt:
        session = rt.session("agent")

        async def agent() -> None:
            async with session:
                await session.run_sync(tool)

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            await entered.wait()
            started.set()
            report = await session.interrupt("stop", trigger="operator")
    assert [t.outcome for t in report.threads] == ["interrupted"]


async def test_from_thread_refuses_without_a_session_or_on_the_loop() -> None:
    """No current session, or the loop's own thread: a clear RuntimeError, no hang."""

    async def nothing() -> None:
        await anyio.lowlevel.checkpoint()

    with pytest.raises(RuntimeError, match="needs a current session"):
        await anyio.to_thread.run_sync(from_thread, nothing)
    async with runtime() as rt, rt.session("agent"):
        with pytest.raises(RuntimeError, match="event loop's thread"):
            from_thread(nothing)


# ------------------------------------------------------- independent sessions


async def test_two_sessions_threads_are_interrupted_independently() -> None:
    """Interrupting one session stops its thread only; the other's keeps running."""
    a_started = threading.Event()
    b_started = threading.Event()
    b_release = threading.Event()
    b_results: list[str] = []

    def a_tool() -> None:
        a_started.set()
        ks.sleep(3600)

    def b_tool() -> str:
        b_started.set()
        b_release.wait(WAIT)
        ks.check()
        return "b done"

    async with runtime() as rt:
        a = rt.session("a")
        b = rt.session("b")

        async def run(session: ks.Session, tool: Callable[[], Any]) -> None:
            async with session:
                b_results.append(await session.run_sync(tool))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, a, a_tool)
            tg.start_soon(run, b, b_tool)
            await wait_for(a_started)
            await wait_for(b_started)
            report = await a.interrupt("stop a", trigger="operator")
            assert not b.interrupted
            b_release.set()
    assert [(t.tool, t.outcome) for t in report.threads] == [("a_tool", "interrupted")]
    assert b_results == ["b done"]
    assert b.state == "finished"


# ------------------------------------------------------------------- the audit


async def test_audit_records_each_interrupted_thread() -> None:
    """thread_returned carries the thread, its outcome and the interrupt's id."""
    started = threading.Event()
    audit = MemoryAudit()

    def sleeper() -> None:
        started.set()
        ks.sleep(3600)

    async with runtime(audit) as rt:
        _, report = await run_and_interrupt(rt, sleeper, started)
    (thread,) = report.threads
    (event,) = [e for e in audit.events if e.kind == "thread_returned"]
    assert event.interrupt_id == report.interrupt_id
    assert event.details["ident"] == thread.ident
    assert event.details["outcome"] == "interrupted"
