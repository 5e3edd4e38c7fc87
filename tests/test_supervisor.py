"""SLA supervisors: sessions past their age or deadline are interrupted from outside."""

from __future__ import annotations

import time

import anyio
import pytest

import kill_switch as ks
from kill_switch import Supervisor, supervise
from kill_switch.testing import FakeClock

pytestmark = pytest.mark.both_loops


async def park() -> None:
    await anyio.sleep_forever()


async def test_scan_interrupts_old_matching_sessions_once() -> None:
    """Past max_age a matching session is interrupted (trigger supervisor), once;
    young ones and ones the predicate leaves out are untouched."""
    clock = FakeClock(50.0)
    sessions: dict[str, ks.Session] = {}
    done = anyio.Event()

    async def agent(name: str, tier: str) -> None:
        async with runtime.session(name, labels={"tier": tier}) as session:
            sessions[name] = session
            await done.wait()

    async with ks.Runtime() as runtime, anyio.create_task_group() as tg:
        sup = Supervisor(
            runtime, max_age=10, where=lambda i: i.labels.get("tier") == "batch", clock=clock
        )
        tg.start_soon(agent, "old", "batch")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(agent, "vip", "gold")
        await anyio.wait_all_tasks_blocked()
        assert sup.scan() == ()
        clock.now += 10
        tg.start_soon(agent, "young", "batch")
        await anyio.wait_all_tasks_blocked()
        handles = sup.scan()
        assert len(handles) == 1
        assert sup.scan() == ()
        report = await handles[0]
        assert not sessions["young"].interrupted
        assert not sessions["vip"].interrupted
        done.set()
    assert report.session_id == sessions["old"].id
    assert report.trigger == "supervisor"
    assert "max_age 10" in report.reason


async def test_wall_clock_jump_does_not_age_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wall-clock step does not make a session look old (monotonic ages)."""
    real = time.time
    async with ks.Runtime() as runtime, runtime.session("a") as session:
        sup = Supervisor(runtime, max_age=60)
        sup.scan()
        monkeypatch.setattr(time, "time", lambda: real() + 7200)
        assert sup.scan() == ()
        assert not session.interrupted


async def test_watch_with_zero_deadline_fires_at_once() -> None:
    """watch(session, deadline=0) interrupts at the next loop iteration."""
    async with ks.Runtime() as runtime, supervise(runtime) as sup:
        async with runtime.session("a") as session:
            sup.watch(session, deadline=0, reason="priority pivot")
            await park()
    assert session.report is not None
    assert session.report.trigger == "supervisor"
    assert session.report.reason == "priority pivot"


@pytest.mark.slow
async def test_background_scan_interrupts_a_parked_session() -> None:
    """Inside its block the supervisor scans by itself and stops an overdue session."""
    async with ks.Runtime() as runtime, supervise(runtime, max_age=0, interval=0.01):
        async with runtime.session("a") as session:
            await park()
    assert session.report is not None
    assert session.report.trigger == "supervisor"


async def test_watch_outside_the_block_and_bad_values_refused() -> None:
    """watch() needs the block; ages and intervals are validated."""
    async with ks.Runtime() as runtime, runtime.session("a") as session:
        with pytest.raises(RuntimeError, match="async with"):
            Supervisor(runtime).watch(session, deadline=1)
        with pytest.raises(ValueError, match="interval"):
            Supervisor(runtime, interval=0)
        with pytest.raises(TypeError, match="max_age"):
            Supervisor(runtime, max_age="1")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="Runtime"):
            Supervisor(object())  # type: ignore[arg-type]
