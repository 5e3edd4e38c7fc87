"""The session: one interrupt() through the body scope, the tool plane and the guard."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import kill_switch as ks
from kill_switch.testing import MemoryAudit

pytestmark = pytest.mark.both_loops


async def park() -> None:
    await anyio.sleep_forever()


async def echo(value: Any) -> Any:
    await anyio.lowlevel.checkpoint()
    return value


def kinds_for(audit: MemoryAudit, interrupt_id: str) -> list[str]:
    return [e.kind for e in audit.events if e.interrupt_id == interrupt_id]


# ----------------------------------------------------------------------- basics


async def test_interrupt_cancels_tools_awaiting_io(audit: MemoryAudit) -> None:
    """Tool calls parked in sleep, Event.wait and a socket read are all cancelled."""
    event = anyio.Event()
    a, b = socket.socketpair()

    async def read_socket() -> None:
        await anyio.wait_readable(a)

    try:
        async with ks.Runtime(audit=audit) as runtime:
            async with runtime.session("researcher") as session:
                session.start_soon(anyio.sleep, 3600, tool="sleep")
                session.start_soon(event.wait, tool="event")
                session.start_soon(read_socket, tool="socket")
                await anyio.wait_all_tasks_blocked()
                assert session.info().calls_in_flight == 3
                handle = session.interrupt("stop", trigger="supervisor")
                await park()
            report = await handle
    finally:
        a.close()
        b.close()
    assert report.outcome == "stopped"
    assert report.quiescent
    assert report.tool_calls_cancelled == 3
    assert session.state == "terminated"
    assert session.report is report
    assert kinds_for(audit, report.interrupt_id) == [
        "interrupt_requested",
        "interrupt_delivered",
        "interrupt_completed",
    ]


async def test_block_exit_absorbs_own_interruption() -> None:
    """Code after the block runs and can tell that, and why, the session stopped."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            session.interrupt("sla exceeded", trigger="supervisor")
            await park()
        assert session.report is not None
        assert session.report.reason == "sla exceeded"
        assert session.report.trigger == "supervisor"


async def test_body_call_interrupted_on_next_checkpoint() -> None:
    """An interrupt made on the loop thread takes effect at the body's next checkpoint."""
    reached: list[str] = []
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            session.interrupt("now", trigger="operator")
            reached.append("before checkpoint")
            await anyio.lowlevel.checkpoint()
            reached.append("after checkpoint")  # pragma: no cover - must not run
    assert reached == ["before checkpoint"]


async def test_unrelated_exception_propagates() -> None:
    """Only the session's own interruption is absorbed; other errors leave the block."""
    async with ks.Runtime() as runtime:
        with pytest.raises(KeyError):  # noqa: PT012  (the whole block is what raises)
            async with runtime.session("a") as session:
                session.interrupt("x", trigger="operator")
                raise KeyError("not ours")
        assert session.state == "terminated"


async def test_exception_without_interrupt_propagates_and_marks_failed() -> None:
    """A body error with no interrupt propagates; the session ends ``failed``."""
    async with ks.Runtime() as runtime:
        with pytest.raises(ZeroDivisionError):
            async with runtime.session("a") as session:
                1 / 0  # noqa: B018  (raising is the point)
        assert session.state == "failed"
        assert session.report is None


async def test_normal_finish() -> None:
    """A session that is never interrupted finishes with no report."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            assert await session.call(echo, 42) == 42
        assert session.state == "finished"
        assert session.report is None
        assert session.info().actions == 1


# ----------------------------------------------------------- before and after


async def test_interrupt_before_start_body_never_runs(audit: MemoryAudit) -> None:
    """Interrupted before its block begins, the body never runs (FAULTS 2)."""
    ran = False
    async with ks.Runtime(audit=audit) as runtime:
        session = runtime.session("a")
        handle = session.interrupt("too late", trigger="supervisor")
        with pytest.raises(ks.Interrupted) as info:
            async with session:
                ran = True  # pragma: no cover - must not run
        assert not ran
        assert info.value.report is not None
        assert info.value.report.outcome == "before_start"
        assert (await handle).outcome == "before_start"
        assert "cancelled_before_start" in kinds_for(audit, handle.interrupt_id)


async def test_interrupt_after_end_is_harmless() -> None:
    """Interrupting a finished session resolves at once and changes nothing."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            pass
        report = await session.interrupt("late", trigger="operator")
        assert report.outcome == "after_end"
        assert session.state == "finished"


async def test_interrupt_as_last_statement_counts_as_stopped() -> None:
    """An interrupt that races the body's natural end wins: one terminal outcome."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            session.interrupt("race", trigger="supervisor")
        assert session.state == "terminated"
        assert session.report is not None
        assert session.report.outcome == "stopped"


async def test_racing_natural_completion_has_exactly_one_outcome() -> None:
    """A thread interrupting at random moments yields exactly one outcome per session."""
    async with ks.Runtime() as runtime:
        for i in range(40):
            session = runtime.session("racer")
            go = threading.Event()

            def fire(s: ks.Session = session, ev: threading.Event = go) -> None:
                ev.wait()
                s.interrupt("race", trigger="supervisor")

            thread = threading.Thread(target=fire)
            thread.start()
            async with session:
                go.set()
                for _ in range(i % 5):
                    await anyio.lowlevel.checkpoint()
            await anyio.to_thread.run_sync(thread.join)
            report = await session.handle
            if session.state == "terminated":
                assert report.outcome == "stopped"
            else:
                assert session.state == "finished"
                assert report.outcome == "after_end"


# ------------------------------------------------------------ many interrupters


async def test_fifty_concurrent_interrupters_one_cancellation(audit: MemoryAudit) -> None:
    """Fifty threads interrupting at once: one stop, every attempt audited (FAULTS 3)."""
    barrier = threading.Barrier(50)
    handles: list[ks.InterruptHandle] = []
    lock = threading.Lock()
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a") as session:

            def hammer(n: int) -> None:
                barrier.wait()
                h = session.interrupt(f"reason {n}", trigger="operator", operator=f"op{n}")
                with lock:
                    handles.append(h)

            threads = [threading.Thread(target=hammer, args=(n,)) for n in range(50)]
            for t in threads:
                t.start()
            # The body ends only once all fifty calls returned, so the report holds
            # every one of them (a bounded shield keeps the join from being cancelled).
            with anyio.move_on_after(30, shield=True):
                for t in threads:
                    await anyio.to_thread.run_sync(t.join)
            await park()
    report = session.report
    assert report is not None
    assert len({id(h) for h in handles}) == 1
    assert len(report.later) == 49
    reasons = {report.reason, *(r.reason for r in report.later)}
    assert reasons == {f"reason {n}" for n in range(50)}
    kinds = kinds_for(audit, report.interrupt_id)
    assert kinds.count("interrupt_requested") == 1
    assert kinds.count("interrupt_repeated") == 49
    assert kinds.count("interrupt_delivered") == 1


async def test_first_reason_wins() -> None:
    """Later reasons are kept but never replace the first."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            session.interrupt("first", trigger="budget")
            session.interrupt("second", trigger="operator", operator="ops")
            await park()
    assert session.report is not None
    assert (session.report.trigger, session.report.reason) == ("budget", "first")
    assert [(r.trigger, r.reason, r.operator) for r in session.report.later] == [
        ("operator", "second", "ops")
    ]


# -------------------------------------------------------------- foreign threads


async def test_interrupt_from_foreign_thread() -> None:
    """interrupt() from another thread is marshalled onto the loop (FAULTS 4)."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            session.start_soon(park)
            await anyio.wait_all_tasks_blocked()
            thread = threading.Thread(
                target=session.interrupt, args=("from thread",), kwargs={"trigger": "operator"}
            )
            thread.start()
            await park()
        thread.join()
    assert session.report is not None
    assert session.report.quiescent
    assert session.report.tool_calls_cancelled == 1


async def test_scope_still_cancellable_after_foreign_interrupt() -> None:
    """Regression for the poisoned-scope trap: after a foreign-thread interrupt the body
    scope was cancelled on the loop, so the cancellation actually landed."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            await anyio.to_thread.run_sync(lambda: session.interrupt("foreign", trigger="operator"))
            await park()
        # park() returned only because the scope's cancellation landed on the loop.
        assert session.state == "terminated"
    assert session.report is not None
    assert session.report.outcome == "stopped"
    assert session.report.latency.delivered is not None


@pytest.mark.slow
def test_negative_control_raw_foreign_cancel_loses_the_kill(tmp_path: Any) -> None:
    """Negative control: calling CancelScope.cancel() from a foreign thread (what
    interrupt() must never do) does not stop the body within a generous bound."""
    import subprocess
    import sys

    script = tmp_path / "poison.py"
    script.write_text(
        "import anyio, threading\n"
        "async def main():\n"
        "    scope = anyio.CancelScope()\n"
        "    with scope:\n"
        "        def t():\n"
        "            try: scope.cancel()\n"
        "            except Exception: pass\n"
        "        th = threading.Thread(target=t); th.start()\n"
        "        await anyio.to_thread.run_sync(th.join)\n"
        "        scope.cancel()\n"
        "        await anyio.sleep(3600)\n"
        "    print('stopped', flush=True)\n"
        "anyio.run(main)\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=5
        ).stdout
    except subprocess.TimeoutExpired:
        out = ""
    assert "stopped" not in out


async def test_interrupt_from_signal_handler() -> None:
    """A signal handler that only calls interrupt() stops the session (FAULTS 5)."""
    loop = asyncio.get_running_loop()
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            loop.add_signal_handler(
                signal.SIGUSR1, lambda: session.interrupt("signal", trigger="shutdown")
            )
            try:
                os.kill(os.getpid(), signal.SIGUSR1)
                await park()
            finally:
                loop.remove_signal_handler(signal.SIGUSR1)
    assert session.report is not None
    assert session.report.trigger == "shutdown"


# ---------------------------------------------------------- misbehaving tools


async def test_tool_swallowing_once_is_cancelled_again() -> None:
    """Level semantics in the body: a tool that swallows once is cancelled again."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        try:
            await anyio.sleep_forever()
        except asyncio.CancelledError:
            swallowed += 1
        await anyio.sleep_forever()

    async def interrupt_when_parked(session: ks.Session) -> None:
        await anyio.wait_all_tasks_blocked()
        session.interrupt("x", trigger="operator")

    async with ks.Runtime() as runtime, anyio.create_task_group() as tg:
        async with runtime.session("a") as session:
            tg.start_soon(interrupt_when_parked, session)
            await session.call(stubborn)
    assert swallowed == 1
    assert session.report is not None
    assert session.report.quiescent


async def test_tool_swallowing_in_tool_task_is_cancelled_again() -> None:
    """Level semantics on the tool plane: a tool task that swallows is cancelled again."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        try:
            await anyio.sleep_forever()
        except asyncio.CancelledError:
            swallowed += 1
        await anyio.sleep_forever()

    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            session.start_soon(stubborn)
            await anyio.wait_all_tasks_blocked()
            session.interrupt("x", trigger="operator")
            await park()
    assert swallowed == 1
    assert session.report is not None
    assert session.report.quiescent


async def test_endless_swallower_reported_unresponsive(audit: MemoryAudit) -> None:
    """A tool that swallows every cancellation: after the stop timeout the handle says
    unresponsive, the audit says escalated (never completed), and the block still
    exits — an unresponsive tool must not make the session unkillable (FAULTS 7)."""
    release = threading.Event()
    swallowed = 0

    async def endless() -> None:
        nonlocal swallowed
        while not release.is_set():
            try:
                await anyio.sleep(0.01)  # the tool's own pace, not a test synchronisation
            except asyncio.CancelledError:
                swallowed += 1

    policy = ks.StopPolicy(stop_timeout=0.3)
    async with ks.Runtime(audit=audit, policy=policy) as runtime:
        async with runtime.session("a") as session:
            session.start_soon(endless)
            await anyio.wait_all_tasks_blocked()
            handle = session.interrupt("x", trigger="operator")
            await park()
        report = await handle
        release.set()
    assert report.outcome == "unresponsive"
    assert not report.quiescent
    kinds = kinds_for(audit, report.interrupt_id)
    assert "escalated" in kinds
    assert "interrupt_completed" not in kinds
    assert swallowed > 1


async def test_tool_converting_cancellation_into_error() -> None:
    """A tool turning cancellation into ValueError: the stop wins, the error is kept."""

    async def converter() -> None:
        try:
            await anyio.sleep_forever()
        except asyncio.CancelledError:
            raise ValueError("converted") from None

    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            session.start_soon(converter)
            await anyio.wait_all_tasks_blocked()
            session.interrupt("x", trigger="operator")
            await park()
    assert session.report is not None
    assert session.report.outcome == "stopped"
    assert any("converted" in e for e in session.report.secondary_errors)


async def test_tool_returning_value_after_interrupt_is_not_delivered() -> None:
    """A result that arrives after the interrupt is dropped (FAULTS 8, 17)."""
    got: list[Any] = []

    async def sneaky(session: ks.Session) -> str:
        session.interrupt("x", trigger="operator")
        return "secret"

    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            got.append(await session.call(sneaky, session))
    assert got == []
    assert session.report is not None
    assert session.report.late_results == 1


async def test_tool_returning_after_swallowing_is_not_delivered_outside() -> None:
    """From a task outside the block, a swallowed cancellation still yields Interrupted."""
    outcome: list[object] = []

    async def swallow_and_return() -> str:
        with contextlib.suppress(asyncio.CancelledError):
            await anyio.sleep_forever()
        return "late"

    async with ks.Runtime() as runtime, anyio.create_task_group() as tg:
        session = runtime.session("a")
        ready = anyio.Event()

        async def outside() -> None:
            await ready.wait()
            try:
                outcome.append(await session.call(swallow_and_return))
            except ks.Interrupted as exc:
                outcome.append(exc)
            outcome.append(asyncio.current_task().cancelling())  # type: ignore[union-attr]

        tg.start_soon(outside)
        async with session:
            ready.set()
            await anyio.wait_all_tasks_blocked()
            session.interrupt("x", trigger="operator")
            await park()
    assert isinstance(outcome[0], ks.Interrupted)
    assert outcome[1] == 0
    assert session.report is not None
    assert session.report.late_results == 1


async def test_uncancel_by_tool_does_not_lose_the_kill() -> None:
    """A tool calling uncancel() and raising a bare CancelledError (asyncpg pattern):
    the kill still lands and the host's cancelling() count is unchanged (FAULTS 11)."""

    async def rude() -> None:
        try:
            await anyio.sleep_forever()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            raise asyncio.CancelledError from None

    host = asyncio.current_task()
    assert host is not None
    before = host.cancelling()
    async with ks.Runtime() as runtime:
        async with asyncio.timeout(60):
            async with runtime.session("a") as session:
                session.start_soon(rude)
                await anyio.wait_all_tasks_blocked()
                session.interrupt("x", trigger="operator")
                await session.call(rude)
        assert host.cancelling() == before
        # an enclosing asyncio.timeout still works afterwards
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await anyio.sleep_forever()
    assert session.report is not None
    assert session.report.quiescent


async def test_call_from_outside_task_raises_interrupted_and_task_goes_on() -> None:
    """A tool call from a task outside the block is cancelled; that task survives."""
    after: list[str] = []
    async with ks.Runtime() as runtime, anyio.create_task_group() as tg:
        session = runtime.session("a")
        started = anyio.Event()

        async def framework_worker() -> None:
            await started.wait()
            with pytest.raises(ks.Interrupted):
                await session.call(park)
            await anyio.lowlevel.checkpoint()  # no stray cancellation left behind
            after.append("alive")

        tg.start_soon(framework_worker)
        async with session:
            started.set()
            await anyio.wait_all_tasks_blocked()
            session.interrupt("x", trigger="operator")
            await park()
    assert after == ["alive"]
    assert session.report is not None
    assert session.report.tool_calls_cancelled == 1


async def test_leaked_raw_task_is_reported_and_cancelled() -> None:
    """A tool that escapes structure with a raw create_task is found and stopped (FAULTS 12)."""
    leaked: list[asyncio.Task[None]] = []

    async def escapee() -> None:
        leaked.append(asyncio.get_running_loop().create_task(park(), name="escapee"))

    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            await session.call(escapee)
            session.interrupt("x", trigger="operator")
            await park()
    assert session.report is not None
    assert [t.name for t in session.report.leaked_tasks] == ["escapee"]
    assert session.report.leaked_tasks[0].cancelled
    assert leaked[0].done()


async def test_negative_control_leak_not_found_without_task_tracking() -> None:
    """Negative control: with task tracking off the same leak goes unreported."""

    async def escapee() -> None:
        asyncio.get_running_loop().create_task(park(), name="escapee")

    async with ks.Runtime(track_tasks=False) as runtime:
        async with runtime.session("a") as session:
            await session.call(escapee)
            session.interrupt("x", trigger="operator")
            await park()
    assert session.report is not None
    assert session.report.leaked_tasks == ()
    for task in asyncio.all_tasks():
        if task.get_name() == "escapee":
            task.cancel()


async def test_except_star_catching_real_error_keeps_cancellation() -> None:
    """User ``except*`` taking the real error of a mixed group does not lose the stop."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            try:
                async with anyio.create_task_group() as tg:

                    async def fail_after_interrupt() -> None:
                        session.interrupt("x", trigger="operator")
                        await anyio.lowlevel.checkpoint()

                    async def boom() -> None:
                        await anyio.wait_all_tasks_blocked()
                        raise ValueError("real")

                    tg.start_soon(session.call, park)
                    tg.start_soon(boom)
                    tg.start_soon(fail_after_interrupt)
            except* ValueError:
                pass
            await park()
    assert session.report is not None
    assert session.report.outcome == "stopped"


async def test_interrupt_during_audit_write_is_delivered_after() -> None:
    """An interrupt made from inside the runtime's own audit write completes cleanly."""

    class Reentrant(MemoryAudit):
        session: ks.Session | None = None

        def record(self, event: ks.AuditEvent) -> None:
            super().record(event)
            if event.kind == "session_started" and self.session is not None:
                self.session.interrupt("from sink", trigger="sentinel")

    sink = Reentrant()
    async with ks.Runtime(audit=sink) as runtime:
        session = runtime.session("a")
        sink.session = session
        async with session:
            await park()
    assert session.report is not None
    assert session.report.quiescent
    assert sink.kinds(session.id) == [
        "session_started",
        "interrupt_requested",
        "interrupt_delivered",
        "interrupt_completed",
    ]


# ------------------------------------------------------------------ structure


async def test_tool_task_error_fails_the_block() -> None:
    """A failing tool task cancels the body and leaves the block as an exception group."""
    async with ks.Runtime() as runtime:

        async def broken() -> None:
            raise ValueError("tool bug")

        with pytest.RaisesGroup(ValueError):
            async with runtime.session("a") as session:
                session.start_soon(session.call, park)
                session.start_soon(broken)
                await park()
        assert session.state == "failed"


async def test_block_waits_for_tool_tasks() -> None:
    """The block does not end before its tool tasks (structured)."""
    done: list[int] = []

    async def work(n: int) -> None:
        await anyio.lowlevel.checkpoint()
        done.append(n)

    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            for n in range(5):
                session.start_soon(work, n)
        assert sorted(done) == [0, 1, 2, 3, 4]
        assert session.state == "finished"


async def test_parent_cascade() -> None:
    """Interrupting a parent interrupts its children with trigger ``parent``."""
    async with ks.Runtime() as runtime:
        async with runtime.session("orchestrator") as parent:
            child = runtime.session("worker", parent=parent)
            async with child:
                parent.interrupt("stop the fleet", trigger="operator", operator="ops")
                await park()
    assert child.report is not None
    assert child.report.trigger == "parent"
    assert child.report.operator == "ops"
    assert "stop the fleet" in child.report.reason
    assert parent.report is not None
    assert parent.report.children == (child.id,)


async def test_parent_cascade_reaches_a_child_its_interrupt_already_ended() -> None:
    """A foreign-thread interrupt of a parent reaches a child whose block the parent's
    flag ends (the parent's sync tool, running inside the child's block, wakes in
    ``ks.sleep``): the child is interrupted first, so it ends terminated, knowing why.

    The interrupter is held, through an audit listener, after the flag is set and until
    the child's block has ended: the widest the window can be. (It missed the child when
    the cascade ran after the flag and the child left the parent's list on its way out.)
    """
    ended = threading.Event()
    raised: list[ks.Interrupted] = []

    def hold(event: ks.AuditEvent) -> None:
        if event.kind == "interrupt_requested" and event.trigger == "operator":
            assert ended.wait(10), "the child's block never ended"

    def tool() -> None:
        ks.sleep(30)  # wakes at once on the parent's flag

    async with ks.Runtime() as runtime:
        remove = runtime.add_listener(hold)
        async with runtime.session("orchestrator") as parent:
            child = runtime.session("worker", parent=parent)
            interrupter = threading.Thread(
                target=lambda: parent.interrupt("stop", trigger="operator", operator="ops")
            )
            try:
                async with child:
                    interrupter.start()
                    await parent.run_sync(tool)
            except ks.Interrupted as exc:
                raised.append(exc)  # the parent's, through the child's block
            finally:
                ended.set()  # the child's block is over
            await park()  # the parent's own interrupt ends its block here
        await anyio.to_thread.run_sync(interrupter.join, 10)
        assert child.interrupted, "the cascade missed the child"
        with anyio.fail_after(10):
            report = await child.handle
        remove()
    # However the block ended (the parent's flag, or the child's own delivery, which
    # now comes first), the child knew why.
    assert all(e.session_id in (parent.id, child.id) for e in raised)
    assert child.state == "terminated"
    assert report.outcome == "stopped"
    assert report.trigger == "parent"
    assert report.operator == "ops"
    assert parent.report is not None
    assert parent.report.children == (child.id,)


async def test_own_interrupts_in_a_task_group_are_absorbed() -> None:
    """Sync tools in a task group inside the body, interrupted from another thread whose
    listener delays the delivery: their ``Interrupted`` (raised by ``ks.sleep`` before
    the cancellation arrives) leave the task group as an ``ExceptionGroup``, and the
    session's block absorbs it — on 3.11 ``ExceptionGroup.split`` refused the bound
    method it was given, and the block raised ``TypeError`` instead."""
    both_raised = threading.Event()
    raised: list[int] = []
    lock = threading.Lock()

    def hold(event: ks.AuditEvent) -> None:
        if event.kind == "interrupt_requested":
            assert both_raised.wait(10), "the tools never raised"

    def sleeper() -> None:
        try:
            while True:
                ks.sleep(30)
        finally:
            with lock:
                raised.append(1)
                if len(raised) == 2:
                    both_raised.set()

    async with ks.Runtime() as runtime:
        remove = runtime.add_listener(hold)
        async with runtime.session("group") as session:
            started = threading.Barrier(3)

            def tool() -> None:
                started.wait(10)
                sleeper()

            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    tg.start_soon(session.run_sync, tool)
                await anyio.to_thread.run_sync(started.wait, 10)
                interrupter = threading.Thread(
                    target=session.interrupt, args=("stop",), kwargs={"trigger": "operator"}
                )
                interrupter.start()
                await park()
        await anyio.to_thread.run_sync(interrupter.join, 10)
        remove()
    assert session.state == "terminated"
    assert session.report is not None
    assert session.report.quiescent


async def test_child_of_interrupted_parent_never_starts() -> None:
    """A child created after its parent was interrupted is stopped before it starts."""
    async with ks.Runtime() as runtime:
        async with runtime.session("orchestrator") as parent:
            parent.interrupt("x", trigger="operator")
            child = runtime.session("worker", parent=parent)
            with pytest.raises(ks.Interrupted):
                async with child:
                    pass  # pragma: no cover
            await park()
    assert child.report is not None
    assert child.report.outcome == "before_start"


async def test_sessions_are_independent() -> None:
    """Interrupting one session leaves another untouched."""
    async with ks.Runtime() as runtime, anyio.create_task_group() as tg:
        other_result: list[int] = []
        victim_started = anyio.Event()
        victim = runtime.session("victim")

        async def run_victim() -> None:
            async with victim:
                victim_started.set()
                await victim.call(park)

        tg.start_soon(run_victim)
        async with runtime.session("bystander") as bystander:
            await victim_started.wait()
            await anyio.wait_all_tasks_blocked()
            await victim.interrupt("x", trigger="operator")
            other_result.append(await bystander.call(echo, 7))
        assert bystander.state == "finished"
        assert other_result == [7]
        assert victim.state == "terminated"


# ---------------------------------------------------------------------- guard


async def test_terminated_session_blocks_every_call() -> None:
    """After the interrupt every call is blocked with a typed reason (FAULTS guard plane)."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            session.interrupt("injection", trigger="operator")
            decision = await anyio.to_thread.run_sync(session.guard, "search", {"q": "x"})
            assert decision.action == "block"
            assert decision.code == "terminated"
            with pytest.raises(ks.ToolBlocked) as info:
                await session.call(asyncio.sleep, 0)
            assert info.value.decision.code == "terminated"
            assert "injection" in str(info.value)
            with pytest.raises(ks.ToolBlocked):
                session.start_soon(park)
            raise info.value  # absorbed: raised because of this session's interrupt


async def test_guard_never_raises_and_fails_closed() -> None:
    """A policy hook that raises blocks the call; guard() itself never raises."""

    def broken_policy(call: ks.ToolCall) -> bool:
        raise RuntimeError("policy bug")

    async with ks.Runtime() as runtime:
        async with runtime.session("a", tool_policy=broken_policy) as session:
            decision = session.guard("search", {"q": 1})
            assert decision.code == "policy_error"
            assert session.guard(123, None).code == "bad_request"  # type: ignore[arg-type]
            with pytest.raises(ks.ToolBlocked):
                await session.call(asyncio.sleep, 0)


async def test_tool_policy_denies() -> None:
    """A deny predicate blocks the tools it names and allows the rest."""

    def no_shell(call: ks.ToolCall) -> bool:
        return call.tool != "shell"

    async with ks.Runtime() as runtime:
        async with runtime.session("a", tool_policy=no_shell) as session:
            assert session.guard("search").allowed
            assert session.guard("shell").code == "denied"
            with pytest.raises(ks.ToolBlocked):
                await session.call(asyncio.sleep, 0, tool="shell")
            assert session.info().actions == 1


async def test_guard_before_start_and_after_end() -> None:
    """Calls before the block starts or after it ends are blocked."""
    async with ks.Runtime() as runtime:
        session = runtime.session("a")
        assert session.guard("t").code == "not_started"
        async with session:
            pass
        assert session.guard("t").code == "finished"


async def test_wrap_makes_a_guarded_tool() -> None:
    """``session.wrap`` turns a tool function into a guarded, named one."""

    async def search(q: str) -> str:
        return q.upper()

    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            guarded = session.wrap(search)
            assert guarded.__name__ == "search"
            assert await guarded("x") == "X"
            session.interrupt("x", trigger="operator")
            with pytest.raises(ks.ToolBlocked):
                await guarded("y")


async def test_cost_is_validated_and_accounted() -> None:
    """Cost must be a finite non-negative number and is summed per session."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            await session.call(asyncio.sleep, 0, cost=0.25)
            await session.call(asyncio.sleep, 0, cost=0.5)
            for bad in (-1.0, float("nan"), float("inf")):
                with pytest.raises(ValueError, match="cost"):
                    await session.call(asyncio.sleep, 0, cost=bad)
            assert session.info().cost == pytest.approx(0.75)


# ------------------------------------------------------------- ks.check/sleep


async def test_check_in_coroutine_raises_after_interrupt() -> None:
    """``ks.check()`` raises Interrupted in the session's context; absorbed at exit."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            ks.check()
            session.interrupt("x", trigger="operator")
            with pytest.raises(ks.Interrupted):
                ks.check()
            ks.check()  # raised again and absorbed by the block


async def test_sleep_in_thread_wakes_on_interrupt() -> None:
    """``ks.sleep()`` in a worker thread returns early, raising, on interrupt."""
    woke: list[str] = []

    def sync_tool(started: threading.Event) -> None:
        started.set()
        try:
            ks.sleep(3600)
        except ks.Interrupted:
            woke.append("interrupted")

    started = threading.Event()
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, sync_tool, started)
                await anyio.to_thread.run_sync(started.wait)
                session.interrupt("x", trigger="operator")
    assert woke == ["interrupted"]


async def test_block_left_by_an_outer_cancellation_ends_with_its_tool_tasks() -> None:
    """A block left by an enclosing scope's cancellation while start_soon tools run
    cancels them, ends (``failed``, out of the inventory) and lets the enclosing scope
    have its cancellation — it does not linger as ``running``."""
    # A stop timeout far beyond the test's own timeout: an exit that waited for it
    # fails the test instead of passing slowly.
    policy = ks.StopPolicy(stop_timeout=600.0)
    tool_exited = anyio.Event()

    async def tool() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            tool_exited.set()

    async with ks.Runtime(policy=policy) as runtime:
        with anyio.CancelScope() as outer:
            async with runtime.session("a") as session:
                session.start_soon(tool)
                await anyio.wait_all_tasks_blocked()
                outer.cancel()
                await anyio.sleep_forever()
        assert outer.cancelled_caught
        assert tool_exited.is_set()
        assert session.state == "failed"
        assert runtime.sessions() == ()
        assert runtime.get(session.id) is None
    assert session.report is None  # nothing was interrupted: the block ended it all


async def test_a_task_the_agent_loop_left_is_swept_apart_from_a_tools_leak() -> None:
    """A task created outside any tool call (a framework's hook) is swept and reported
    in swept_tasks; a tool's raw create_task is the leak (leaked_tasks)."""

    async def escapee() -> None:
        asyncio.get_running_loop().create_task(park(), name="escapee")

    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            asyncio.get_running_loop().create_task(park(), name="hook")  # the agent loop's
            await session.call(escapee)
            session.interrupt("x", trigger="operator")
            await park()
    report = session.report
    assert report is not None
    assert [t.name for t in report.leaked_tasks] == ["escapee"]
    assert [(t.name, t.cancelled) for t in report.swept_tasks] == [("hook", True)]
    assert report.quiescent
