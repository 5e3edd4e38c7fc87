"""``Runtime.interrupt_all`` / ``interrupt_where`` as one batch (``_session_host.Batch``):
one loop hop from another thread for N sessions, one audit hand-over, and every
session's own rows in a valid chain, in order, even for a session that ends during
the call.

asyncio only: the hop counter wraps the loop's ``call_soon_threadsafe``, which uvloop's
compiled loop does not let a test replace.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import kill_switch as ks
from kill_switch._stop import Stop

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from anyio.abc import TaskGroup, TaskStatus

N = 24


class HopCounter:
    """Counts the loop's ``call_soon_threadsafe`` calls made by ``run``'s thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.real = loop.call_soon_threadsafe
        self.thread: int | None = None
        self.hops = 0
        loop.call_soon_threadsafe = self._shim  # type: ignore[method-assign,assignment]  # the shim

    def _shim(self, *args: Any, **kwargs: Any) -> asyncio.Handle:
        if threading.get_ident() == self.thread:
            self.hops += 1
        return self.real(*args, **kwargs)

    def run(self, fn: Callable[[], Any]) -> Any:
        """Call *fn* on this (worker) thread, counting its hops to the loop."""
        self.thread = threading.get_ident()
        try:
            return fn()
        finally:
            self.thread = None

    def close(self) -> None:
        del self.loop.call_soon_threadsafe  # back to the class's method


async def _park(s: ks.Session, *, task_status: TaskStatus[None]) -> None:
    async with s:
        task_status.started()
        await anyio.sleep_forever()


async def park_sessions(
    runtime: ks.Runtime, tg: TaskGroup, n: int, **kwargs: Any
) -> list[ks.Session]:
    """*n* sessions entered, each parked in its body."""
    sessions = [runtime.session("worker", **kwargs) for _ in range(n)]
    for s in sessions:
        await tg.start(_park, s)
    return sessions


async def test_interrupt_all_from_another_thread_is_one_loop_hop() -> None:
    """N sessions, a parent's children included, are delivered by one loop callback."""
    async with ks.Runtime() as runtime, anyio.create_task_group() as tg:
        counter = HopCounter(asyncio.get_running_loop())
        try:
            parent = (await park_sessions(runtime, tg, 1))[0]
            children = await park_sessions(runtime, tg, 2, parent=parent)
            others = await park_sessions(runtime, tg, N)
            handles = await anyio.to_thread.run_sync(
                counter.run, lambda: runtime.interrupt_all("batch", trigger="operator")
            )
        finally:
            counter.close()
        assert counter.hops == 1
        assert [h.session_id for h in handles] == [s.id for s in [parent, *children, *others]]
        reports = [await h for h in handles]
        assert all(r.quiescent and r.outcome == "stopped" for r in reports)
        assert [r.trigger for r in reports[1:3]] == ["parent", "parent"]  # cascade first
        assert all(r.reason == "batch" for r in reports[3:])


async def test_per_session_interrupts_from_another_thread_are_n_hops() -> None:
    """Negative control for the hop count: one ``interrupt()`` per session is N hops."""
    async with ks.Runtime() as runtime, anyio.create_task_group() as tg:
        counter = HopCounter(asyncio.get_running_loop())
        try:
            sessions = await park_sessions(runtime, tg, N)

            def one_by_one() -> list[ks.InterruptHandle]:
                return [s.interrupt("one", trigger="operator") for s in sessions]

            handles = await anyio.to_thread.run_sync(counter.run, one_by_one)
        finally:
            counter.close()
        assert counter.hops == N
        for h in handles:
            await h


async def test_second_interrupt_all_returns_the_same_handles_first_reason_wins() -> None:
    """Idempotent: the same handles, the first reason wins, the later one is kept."""
    async with ks.Runtime() as runtime, anyio.create_task_group() as tg:
        await park_sessions(runtime, tg, N)
        # Back to back on the loop thread: the sessions are all still live for the second.
        first = runtime.interrupt_all("first", trigger="operator")
        again = runtime.interrupt_all("second", trigger="shutdown")
        assert len(first) == N
        assert all(a is b for a, b in zip(first, again, strict=True))
        for h in first:
            report = await h
            assert report.reason == "first"
            assert [r.reason for r in report.later] == ["second"]


async def test_interrupt_all_checks_its_arguments_with_no_session_to_stop() -> None:
    """A bad trigger or reason is an error even when nothing matches."""
    async with ks.Runtime() as runtime:
        with pytest.raises(ValueError, match="unknown trigger"):
            runtime.interrupt_all("x", trigger="nope")
        with pytest.raises(TypeError):
            runtime.interrupt_where(42, trigger="operator", agent="none")  # type: ignore[arg-type]


def rows_by_session(db: Path) -> dict[str, list[ks.AuditRecord]]:
    with ks.AuditLog(db) as log:
        out: dict[str, list[ks.AuditRecord]] = {}
        for r in log.events():
            if r.session_id is not None:
                out.setdefault(r.session_id, []).append(r)
    return out


async def test_batch_stop_audit_chain_verifies_with_each_sessions_rows(tmp_path: Path) -> None:
    """A batch stop from another thread with a real SQLite log: two hops (delivery and
    the writer's wake-up), every report durable, the chain valid, and each session with
    one ``interrupt_requested`` before its one ``interrupt_completed``."""
    db = tmp_path / "audit.db"
    async with ks.Runtime(audit=db) as runtime, anyio.create_task_group() as tg:
        sessions = await park_sessions(runtime, tg, N)
        counter = HopCounter(asyncio.get_running_loop())
        try:
            handles = await anyio.to_thread.run_sync(
                counter.run,
                lambda: runtime.interrupt_all("batch", trigger="operator", operator="ops"),
            )
        finally:
            counter.close()
        assert counter.hops == 2
        reports = [await h for h in handles]
        assert all(r.audit == "durable" and r.quiescent for r in reports)
    result = ks.verify_audit(db)
    assert result.ok, result.problem
    rows = rows_by_session(db)
    for s, h in zip(sessions, handles, strict=True):
        kinds = [r.kind for r in rows[s.id]]
        assert kinds.count("interrupt_requested") == 1
        assert kinds.count("interrupt_completed") == 1
        assert kinds.index("interrupt_requested") < kinds.index("interrupt_completed")
        requested = next(r for r in rows[s.id] if r.kind == "interrupt_requested")
        assert requested.interrupt_id == h.interrupt_id
        assert requested.operator == "ops"


class ExitDuringBatch(threading.Event):
    """A session's flag that, when the batch's thread sets it, lets the session's block
    end on the loop and waits (bounded) until the loop has run as far as it can with
    it — the session ends during the batch, before the batch hands its events over."""

    def __init__(self, loop: asyncio.AbstractEventLoop, session: ks.Session) -> None:
        super().__init__()
        self.loop = loop
        self.session = session
        self.go_home = asyncio.Event()
        self.batch_thread: int | None = None
        self.finish_began = False

    def set(self) -> None:
        super().set()
        if threading.get_ident() != self.batch_thread:
            return
        self.loop.call_soon_threadsafe(self.go_home.set)
        stop = self.session._stop
        poll = threading.Event()
        deadline = time.monotonic() + 10.0
        while not stop.finish_started and time.monotonic() < deadline:
            poll.wait(0.001)  # polling the stop's state, bounded
        self.finish_began = stop.finish_started
        # Once the loop has run a callback queued now, the step that began the finish
        # has run as far as it could go.
        ran = threading.Event()
        self.loop.call_soon_threadsafe(ran.set)
        ran.wait(10.0)


async def _leave_when_told(
    s: ks.Session, flag: ExitDuringBatch, *, task_status: TaskStatus[None]
) -> None:
    async with s:
        task_status.started()
        await flag.go_home.wait()  # then the block ends by itself


async def stop_with_one_ending_during_the_batch(db: Path) -> tuple[str, list[str]]:
    """A batch from another thread over N sessions, one of which ends during it; that
    session's id and the order of its rows' kinds."""
    async with ks.Runtime(audit=db) as runtime, anyio.create_task_group() as tg:
        await park_sessions(runtime, tg, N // 2)
        early = runtime.session("early")
        flag = ExitDuringBatch(asyncio.get_running_loop(), early)
        early._flag = flag
        await tg.start(_leave_when_told, early, flag)
        await park_sessions(runtime, tg, N // 2)

        def batch() -> tuple[ks.InterruptHandle, ...]:
            flag.batch_thread = threading.get_ident()
            return runtime.interrupt_all("batch", trigger="operator")

        handles = await anyio.to_thread.run_sync(batch)
        assert flag.finish_began  # the session did end during the batch
        reports = [await h for h in handles]
        assert all(r.quiescent and r.audit == "durable" for r in reports)
        assert early.report is not None
        assert early.report.reason == "batch"
    result = ks.verify_audit(db)
    assert result.ok, result.problem
    return early.id, [r.kind for r in rows_by_session(db)[early.id]]


async def test_session_ending_during_a_foreign_batch_keeps_its_rows_in_order(
    tmp_path: Path,
) -> None:
    """The stop of a session whose block ends during a batch from another thread waits
    for the batch's hand-over: its ``interrupt_requested`` comes first in the chain."""
    _, kinds = await stop_with_one_ending_during_the_batch(tmp_path / "audit.db")
    assert kinds.count("interrupt_requested") == 1
    assert kinds.count("interrupt_completed") == 1
    assert kinds.index("interrupt_requested") < kinds.index("interrupt_completed")


async def test_without_waiting_for_the_batch_a_stop_ending_during_it_is_out_of_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: without ``Stop.wait_announced`` the session's own rows reach the
    chain before its ``interrupt_requested``."""

    async def no_wait(self: Stop) -> None:
        self.announced = None

    monkeypatch.setattr(Stop, "wait_announced", no_wait)
    _, kinds = await stop_with_one_ending_during_the_batch(tmp_path / "audit.db")
    assert kinds.index("interrupt_completed") < kinds.index("interrupt_requested")
