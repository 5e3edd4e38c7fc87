"""The stop path's own cost: one group commit per stop, a short switch interval while a
stop is in flight, the cheap planes first and the thread grace counted from the request.

Real parts: a SQLite audit file, worker threads, a subprocess. Tests synchronise on
state (events the tools set, the audit's own counters), never on elapsed time.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import kill_switch as ks
from kill_switch import AuditEvent, SqliteAudit, verify_audit
from kill_switch._planes._process_plane import ProcessPlane
from kill_switch._planes._threads import ThreadPlane
from kill_switch._planes._tool_tasks import ToolTasks
from kill_switch._vocabulary._plane import Plane
from kill_switch._vocabulary._report import InterruptRequest
from kill_switch.testing import MemoryAudit

from .test_threads import run_and_interrupt

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = pytest.mark.both_loops

WAIT = 10.0  # bound on every wait for a state change (a hang guard, never a timing claim)
SHORT = 0.0005


@pytest.fixture(autouse=True)
def switch_interval_kept() -> Iterator[float]:
    """Every test leaves the interpreter's switch interval as it found it."""
    before = sys.getswitchinterval()
    yield before
    assert sys.getswitchinterval() == before


async def wait_for(event: threading.Event) -> None:
    assert await anyio.to_thread.run_sync(event.wait, WAIT)


# ------------------------------------------------------- one commit per stop


async def test_a_stop_is_one_group_commit_and_its_listeners_see_each_event_at_once(
    tmp_path: Path,
) -> None:
    """Thread and process events recorded over many loop turns reach the audit file in
    one commit with the stop's last word; listeners see each at once; the chain verifies."""
    path = tmp_path / "audit.db"
    audit = SqliteAudit(path)
    n = 3
    started = [threading.Event() for _ in range(n)]
    release = [threading.Event() for _ in range(n)]
    told: list[tuple[str, int]] = []  # (kind, events the sink held when the listener ran)
    returned = [asyncio.Event() for _ in range(n)]

    def listener(event: AuditEvent) -> None:
        told.append((event.kind, audit.statistics().recorded))
        if event.kind == "thread_returned":  # recorded on the loop thread
            returned[[k for k, _ in told].count("thread_returned") - 1].set()

    def tool(i: int) -> None:
        started[i].set()
        try:
            ks.sleep(3600)
        finally:
            release[i].wait(WAIT)  # returns when the test says, one thread at a time

    async with ks.Runtime(audit=audit, policy=ks.StopPolicy(thread_grace=WAIT)) as rt:
        rt.add_listener(listener)
        session = rt.session("agent")
        proc_started = anyio.Event()

        async def agent() -> None:
            async with session:
                await session.open_process(["sleep", "1000"])
                proc_started.set()
                async with anyio.create_task_group() as tg:
                    for i in range(n):
                        tg.start_soon(session.run_sync, tool, i)

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            await proc_started.wait()
            for event in started:
                await wait_for(event)
            assert await audit.flush() == "durable"
            before = audit.statistics()
            handle = session.interrupt("stop", trigger="operator", operator="ops")
            requested = audit.statistics().recorded
            assert requested == before.recorded + 1  # interrupt_requested: at once
            for i in range(n - 1):  # the last return ends the stop
                release[i].set()
                with anyio.fail_after(WAIT):
                    await returned[i].wait()
                # Whatever the sink holds is made durable between the returns: without
                # the stop's window each thread_returned would be a commit of its own.
                assert await audit.flush() == "durable"
                assert audit.statistics().recorded == requested
            release[-1].set()
            report = await handle
        after = audit.statistics()
    assert report.audit == "durable"
    assert report.outcome == "stopped"
    assert after.batches - before.batches <= 2  # interrupt_requested, then the stop's batch
    # Every event of the stop, its last word included, was told while the sink held none.
    kinds_told = [k for k, _ in told]
    stop_told = told[
        kinds_told.index("interrupt_requested") + 1 : kinds_told.index("interrupt_completed") + 1
    ]
    assert len(stop_told) >= n + 3
    assert all(recorded == requested for _, recorded in stop_told)
    with ks.AuditLog(str(path)) as log:
        kinds = [r.kind for r in log.events(session_id=session.id)]
    stop_kinds = kinds[kinds.index("interrupt_requested") + 1 :]
    assert stop_kinds.count("thread_returned") == n
    assert "process_exited" in stop_kinds
    assert "interrupt_delivered" in stop_kinds
    assert stop_kinds[-1] == "interrupt_completed"
    assert verify_audit(str(path)).ok


async def test_separate_commits_are_counted(tmp_path: Path) -> None:
    """Negative control: events recorded outside a stop with a flush between them are
    one commit each, so the counter above does see separate commits."""
    audit = SqliteAudit(tmp_path / "audit.db")
    async with ks.Runtime(audit=audit) as rt:
        assert await audit.flush() == "durable"
        before = audit.statistics().batches
        for i in range(3):
            rt.record(AuditEvent("operator_note", None, reason=str(i)))
            assert await audit.flush() == "durable"
        assert audit.statistics().batches - before == 3


async def test_memory_sink_gets_the_stop_events_in_order_once_it_ends() -> None:
    """A sink sees interrupt_requested at once and the rest of the stop together, in the
    order recorded, ending with its last word; the listener saw them as they came."""
    audit = MemoryAudit()
    in_sink: list[tuple[str, bool]] = []
    started = threading.Event()

    def tool() -> None:
        started.set()
        ks.sleep(3600)

    async with ks.Runtime(audit=audit) as rt:
        rt.add_listener(lambda e: in_sink.append((e.kind, e in audit.events)))
        session, report = await run_and_interrupt(rt, tool, started)
    assert report.outcome == "stopped"
    told = dict(in_sink)
    assert told["interrupt_requested"] is True
    assert told["interrupt_delivered"] is False
    assert told["thread_returned"] is False
    kinds = audit.kinds(session.id)
    listened = [k for k, _ in in_sink]
    assert (
        kinds[: kinds.index("interrupt_completed") + 1]
        == listened[: listened.index("interrupt_completed") + 1]
    )


class _StuckFlush(MemoryAudit):
    """A sink whose flush never returns (a disk that hangs)."""

    async def flush(self) -> Any:
        await anyio.sleep_forever()


async def test_a_hung_sink_still_reports_pending_and_gets_every_event() -> None:
    """The audit timeout path keeps its behaviour: ``pending``, the events all handed
    over, the switch interval restored."""
    audit = _StuckFlush()
    policy = ks.StopPolicy(audit_timeout=0.05)
    async with ks.Runtime(audit=audit, policy=policy) as rt:
        session = rt.session("agent")
        seen: list[float] = []

        running = anyio.Event()

        async def agent() -> None:
            async with session:
                running.set()
                await anyio.sleep_forever()

        session.on_cleanup(lambda: seen.append(sys.getswitchinterval()))
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            await running.wait()
            report = await session.interrupt("stop", trigger="operator")
    assert report.audit == "pending"
    assert seen == [SHORT]
    assert "interrupt_completed" in audit.kinds(session.id)


async def test_the_runtime_hands_over_a_window_left_open_when_it_exits(
    switch_interval_kept: float,
) -> None:
    """A stop window still open at the runtime's exit gives its events to the sink and
    its switch interval back (the safety net behind Stop.finish's own close)."""
    audit = MemoryAudit()
    async with ks.Runtime(audit=audit) as rt:
        window = rt._host.open_stop(SHORT)
        window.record(AuditEvent("held_note", None))
        assert sys.getswitchinterval() == SHORT
        assert "held_note" not in audit.kinds()
    assert "held_note" in audit.kinds()
    assert sys.getswitchinterval() == switch_interval_kept


# ------------------------------------------------------ the switch interval


def _interval_tool(started: threading.Event, seen: list[float]) -> Callable[[], None]:
    def tool() -> None:
        started.set()
        try:
            ks.sleep(3600)
        finally:
            seen.append(sys.getswitchinterval())  # read in the stop, before returning

    return tool


async def test_switch_interval_is_short_during_a_stop_and_restored_after(
    switch_interval_kept: float,
) -> None:
    """A thread of the stopped session sees the short interval; the old one is back once
    the stop resolves."""
    started, seen = threading.Event(), list[float]()
    async with ks.Runtime() as rt:
        await run_and_interrupt(rt, _interval_tool(started, seen), started)
        assert sys.getswitchinterval() == switch_interval_kept
    assert seen == [SHORT]


async def test_switch_interval_none_leaves_it_alone(switch_interval_kept: float) -> None:
    """Negative control: with ``switch_interval=None`` the stop does not touch it."""
    started, seen = threading.Event(), list[float]()
    async with ks.Runtime(policy=ks.StopPolicy(switch_interval=None)) as rt:
        await run_and_interrupt(rt, _interval_tool(started, seen), started)
    assert seen == [switch_interval_kept]


async def test_concurrent_and_nested_stops_keep_it_short_until_the_last(
    switch_interval_kept: float,
) -> None:
    """With a parent, its child and another session in flight, the shortest claim holds
    while any remains; the first interval comes back only after the last resolves."""
    hold = threading.Event()
    started = {name: threading.Event() for name in ("parent", "child", "other")}
    seen: dict[str, float] = {}

    def tool(name: str) -> None:
        started[name].set()
        try:
            ks.sleep(3600)
        finally:
            if name == "other":
                hold.wait(WAIT)  # the other session's stop outlives the parent's
            seen[name] = sys.getswitchinterval()

    async with ks.Runtime(policy=ks.StopPolicy(switch_interval=0.002)) as rt:
        parent = rt.session("parent")
        child = rt.session("child", parent=parent)
        other = rt.session("other", policy=ks.StopPolicy(switch_interval=0.001))

        async def body(session: ks.Session, name: str) -> None:
            async with session:
                await session.run_sync(tool, name)

        async def family() -> None:
            async with parent:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(body, child, "child")
                    await parent.run_sync(tool, "parent")

        async with anyio.create_task_group() as tg:
            tg.start_soon(family)
            tg.start_soon(body, other, "other")
            for event in started.values():
                await wait_for(event)
            other_handle = other.interrupt("stop", trigger="operator")
            report = await parent.interrupt("stop", trigger="operator")
            assert report.outcome == "stopped"
            assert child.report is not None
            assert not other_handle.done()
            assert sys.getswitchinterval() == 0.001  # the other stop's claim is left
            hold.set()
            await other_handle
            assert sys.getswitchinterval() == switch_interval_kept
    assert seen["parent"] == seen["child"] == 0.001  # the shortest claim in flight wins


async def test_a_value_set_during_a_stop_is_the_one_put_back(
    switch_interval_kept: float,
) -> None:
    """Other code setting the interval during a stop: its value is restored after."""
    async with ks.Runtime() as rt:
        session = rt.session("agent")
        theirs = 0.01

        def change() -> None:
            sys.setswitchinterval(theirs)

        session.on_cleanup(change)

        running = anyio.Event()

        async def agent() -> None:
            async with session:
                running.set()
                await anyio.sleep_forever()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                await running.wait()
                await session.interrupt("stop", trigger="operator")
            assert sys.getswitchinterval() == theirs
        finally:
            sys.setswitchinterval(switch_interval_kept)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), 1e-9, "fast", True])
def test_switch_interval_is_validated(bad: object) -> None:
    """Zero, negative, non-finite, below the interpreter's resolution, or not a number."""
    with pytest.raises((TypeError, ValueError), match="switch_interval"):
        ks.StopPolicy(switch_interval=bad)  # type: ignore[arg-type]


# ------------------------------------------------- order and grace from the request


async def test_planes_get_the_interrupt_cheapest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads' timer, then processes' signals, then task cancellation, then the rest."""
    order: list[str] = []

    class Bookkeeping(Plane):
        def deliver(self, request: InterruptRequest) -> None:
            order.append("Bookkeeping")

    for kind in (ToolTasks, ThreadPlane, ProcessPlane):
        original = kind.deliver

        def spy(
            self: Any,
            request: InterruptRequest,
            name: str = kind.__name__,
            original: Any = original,
        ) -> None:
            order.append(name)
            original(self, request)

        monkeypatch.setattr(kind, "deliver", spy)

    started = threading.Event()

    def tool() -> None:
        started.set()
        ks.sleep(3600)

    async with ks.Runtime() as rt:
        session = rt.session("agent")

        async def agent() -> None:
            async with session:
                session.add_plane(Bookkeeping())  # registered before the others
                await session.open_process(["sleep", "1000"])
                await session.run_sync(tool)

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            await wait_for(started)
            await session.interrupt("stop", trigger="operator")
    assert order == ["ThreadPlane", "ProcessPlane", "ToolTasks", "Bookkeeping"]


class _Host:
    """The least of a ``PlaneHost`` the thread plane's delivery uses; it notes the
    delay of every timer asked for."""

    id = "s1"
    agent = "agent"
    runtime_closed = False

    def __init__(self, loop: asyncio.AbstractEventLoop, grace: float) -> None:
        self.loop = loop
        self.policy = ks.StopPolicy(thread_grace=grace)
        self.delays: list[float] = []
        self.request: InterruptRequest | None = None

    def pile_key(self) -> object:
        return self

    def call_later(self, delay: float, fn: Callable[..., object]) -> asyncio.TimerHandle:
        self.delays.append(delay)
        return self.loop.call_later(delay, fn)

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> asyncio.Handle:
        return self.loop.call_soon_threadsafe(fn, *args)

    def record(self, kind: str, **fields: Any) -> None:
        pass

    def is_interrupted(self) -> bool:
        return self.request is not None


@pytest.mark.parametrize("age", [0.3, 5.0])
async def test_thread_grace_counts_from_the_request(age: float) -> None:
    """Delivered *age* seconds after the request, the grace timer is armed for what is
    left of the grace (none, once it is over), not for a whole grace from delivery."""
    grace = 1.0
    host = _Host(asyncio.get_running_loop(), grace)
    plane = ThreadPlane(host)  # type: ignore[arg-type]  # the part it uses
    release = threading.Event()
    threads: list[threading.Thread] = []

    def tool() -> None:
        threads.append(threading.current_thread())
        release.wait(WAIT)

    plane.start(tool, (), "tool")
    try:
        requested = time.monotonic() - age
        host.request = InterruptRequest("operator", "stop", None, time.time() - age, requested)
        plane.deliver(host.request)
        (delay,) = host.delays
        left = max(0.0, grace - age)
        assert delay <= left  # what is left of it, not a fresh grace from the delivery
        assert plane.grace_left() <= left
    finally:
        release.set()
        for t in threads:
            await anyio.to_thread.run_sync(t.join, WAIT)


class _FailingSettle(Plane):
    """A plane whose settling fails (a bug in a plane): the stop's finish raises."""

    def deliver(self, request: InterruptRequest) -> None:
        return None

    def quiescent(self) -> bool:
        return False

    async def settle(self, deadline: float) -> None:
        raise LookupError("plane broke while settling")


@pytest.mark.slow  # the runtime's exit waits out the stop timeout for the unresolved handle
async def test_a_failing_stop_still_restores_the_interval_and_hands_over(
    switch_interval_kept: float,
) -> None:
    """A stop whose finish fails still closes its window: the interval comes back and
    its held events reach the sink."""
    audit = MemoryAudit()
    async with ks.Runtime(audit=audit, policy=ks.StopPolicy(stop_timeout=0.2)) as rt:
        session = rt.session("agent")
        session.add_plane(_FailingSettle())
        running = anyio.Event()

        async def agent() -> None:
            async with session:
                running.set()
                await anyio.sleep_forever()

        async def stop_it() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                await running.wait()
                session.interrupt("stop", trigger="operator")

        with pytest.raises(BaseExceptionGroup) as failed:
            await stop_it()
        assert failed.group_contains(LookupError, match="plane broke", depth=None)
        assert sys.getswitchinterval() == switch_interval_kept
        assert "interrupt_delivered" in audit.kinds(session.id)
