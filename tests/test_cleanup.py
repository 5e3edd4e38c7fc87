"""Cleanup hooks, rollback of half-done work, and fencing (issue: graceful cleanup)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import anyio
import pytest

import kill_switch as ks

if TYPE_CHECKING:
    from pathlib import Path

    from kill_switch.testing import MemoryAudit

pytestmark = pytest.mark.both_loops


async def park() -> None:
    await anyio.sleep_forever()


async def test_rollbacks_run_in_reverse_exactly_once_on_interrupt(audit: MemoryAudit) -> None:
    """Interrupted mid-transaction, compensations run last-first, once each."""
    undone: list[str] = []
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a") as session:
            async with session.transaction() as tx:
                for step in ("create branch", "push commit", "open PR"):

                    def undo(step: str = step) -> None:
                        undone.append(step)

                    tx.on_rollback(undo, name=step)
                session.interrupt("x", trigger="operator")
                await park()
    assert undone == ["open PR", "push commit", "create branch"]
    assert tx.state == "rolled_back"
    assert session.report is not None
    assert [(c.name, c.kind, c.outcome) for c in session.report.cleanup] == [
        ("open PR", "rollback", "ran"),
        ("push commit", "rollback", "ran"),
        ("create branch", "rollback", "ran"),
    ]
    assert audit.kinds(session.id).count("rollback") == 3


async def test_transaction_commits_on_success() -> None:
    """A transaction that completes commits: no compensation runs."""
    undone: list[str] = []
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            async with session.transaction() as tx:
                tx.on_rollback(lambda: undone.append("x"))
    assert tx.state == "committed"
    assert undone == []
    with pytest.raises(RuntimeError, match="committed"):
        tx.on_rollback(lambda: None)


async def test_transaction_rolls_back_on_error_and_reraises() -> None:
    """An exception rolls back and still propagates."""
    undone: list[str] = []
    async with ks.Runtime() as runtime:
        with pytest.raises(ValueError, match="boom"):  # noqa: PT012  (the whole block raises)
            async with runtime.session("a") as session, session.transaction() as tx:
                tx.on_rollback(lambda: undone.append("x"))
                raise ValueError("boom")
    assert undone == ["x"]


async def test_failing_and_hung_hooks_do_not_stop_the_others() -> None:
    """A failing hook and a hung one are reported; every other hook still runs."""
    ran: list[str] = []
    release = threading.Event()

    async def hung() -> None:
        await anyio.sleep_forever()

    def failing() -> None:
        raise OSError("disk gone")

    def blocking_sync() -> None:
        release.wait(10)  # left behind in its worker thread at the timeout

    policy = ks.StopPolicy(cleanup_timeout=0.2)
    async with ks.Runtime(policy=policy) as runtime:
        async with runtime.session("a") as session:
            session.on_cleanup(lambda: ran.append("first"), name="first")
            session.on_cleanup(blocking_sync, name="blocking")
            session.on_cleanup(hung, name="hung")
            session.on_cleanup(failing, name="failing")
            session.on_cleanup(lambda: ran.append("last"), name="last")
            session.interrupt("x", trigger="operator")
            await park()
    release.set()
    assert ran == ["last", "first"]
    assert session.report is not None
    outcomes = {c.name: c.outcome for c in session.report.cleanup}
    assert outcomes == {
        "last": "ran",
        "failing": "failed",
        "hung": "timed_out",
        "blocking": "timed_out",
        "first": "ran",
    }
    failing_report = next(c for c in session.report.cleanup if c.name == "failing")
    assert failing_report.error is not None
    assert "disk gone" in failing_report.error


async def test_cleanup_hooks_run_on_normal_finish() -> None:
    """Cleanup hooks run however the session ends."""
    ran: list[str] = []

    async def close_browser() -> None:
        ran.append("closed")

    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            session.on_cleanup(close_browser)
    assert ran == ["closed"]
    with pytest.raises(RuntimeError, match="ended"):
        session.on_cleanup(close_browser)


async def test_hook_must_be_callable() -> None:
    """A non-callable hook is a clear error at registration."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            with pytest.raises(TypeError, match="callable"):
                session.on_cleanup("not a function")  # type: ignore[arg-type]


async def test_commit_point_fences_side_effects_after_the_kill(tmp_path: Path) -> None:
    """A sync tool that checks its commit point writes nothing after the kill."""
    marker = tmp_path / "committed.txt"
    started = threading.Event()
    proceed = threading.Event()

    def tool(tx: ks.Transaction) -> None:
        started.set()
        proceed.wait(10)
        tx.commit_point()  # raises: the session was interrupted meanwhile
        marker.write_text("side effect")  # pragma: no cover - must not run

    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session, session.transaction() as tx:

            async def interrupt_then_release() -> None:
                await anyio.to_thread.run_sync(started.wait)
                session.interrupt("x", trigger="operator")
                proceed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(interrupt_then_release)
                await session.run_sync(tool, tx)
    assert not marker.exists()
    assert session.report is not None


async def test_negative_control_without_fence_the_side_effect_lands(tmp_path: Path) -> None:
    """Negative control: the same tool without its commit point writes after the kill."""
    marker = tmp_path / "committed.txt"
    started = threading.Event()
    proceed = threading.Event()

    def tool() -> None:
        started.set()
        proceed.wait(10)
        marker.write_text("side effect")

    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:

            async def interrupt_then_release() -> None:
                await anyio.to_thread.run_sync(started.wait)
                session.interrupt("x", trigger="operator")
                proceed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(interrupt_then_release)
                await session.run_sync(tool)
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        await anyio.to_thread.run_sync(proceed.wait, 0.01)
    assert marker.exists()
