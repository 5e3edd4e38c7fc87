"""Sync work a session hands to pools the runtime did not start (``_planes/_pool.py``).

Real pools: asyncio's default executor (``asyncio.to_thread``,
``loop.run_in_executor(None, ...)``), anyio's worker threads (``anyio.to_thread``, with
and without ``abandon_on_cancel``) and a user's ``ThreadPoolExecutor`` given
``kill_switch.bind(fn)``. For each: a tool that polls is stopped and the report says
quiescent; one that never polls goes on writing, and the report says so (``unresponsive``,
a thread row still running). Tools block on events the test releases afterwards.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import kill_switch as ks
from kill_switch.testing import MemoryAudit

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

pytestmark = pytest.mark.both_loops

WAIT = 10.0  # bound on every wait for a state change (a hang guard, never a timing claim)

_USER_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="user-pool")


@pytest.fixture(autouse=True)
async def pool_threads_idle() -> AsyncIterator[None]:
    """Every tool a test started is released while its loop runs (the loop's end waits
    for its default pool); nothing keeps writing after the test."""
    try:
        yield
    finally:
        for tool in list(_Tool.live):
            await anyio.to_thread.run_sync(tool.finish)


class _Tool:
    """A sync tool that writes until released; it polls ``ks.check()`` or never does."""

    live: set[_Tool] = set()  # noqa: RUF012  # test bookkeeping

    def __init__(self, *, polls: bool) -> None:
        self.polls = polls
        self.started = threading.Event()
        self.release = threading.Event()
        self.done = threading.Event()
        self.writes = 0
        _Tool.live.add(self)

    def __call__(self) -> str:
        self.started.set()
        try:
            while not self.release.wait(0.002):
                if self.polls:
                    ks.check()
                self.writes += 1  # the side effect
            return "done"
        finally:
            self.done.set()

    def finish(self) -> None:
        self.release.set()
        assert self.done.wait(WAIT)
        _Tool.live.discard(self)


def _to_thread(tool: _Tool) -> Awaitable[Any]:
    return asyncio.to_thread(tool)


def _default_executor(tool: _Tool) -> Awaitable[Any]:
    return asyncio.get_running_loop().run_in_executor(None, tool)


def _anyio_abandoning(tool: _Tool) -> Awaitable[Any]:
    return anyio.to_thread.run_sync(tool, abandon_on_cancel=True)


def _user_pool_bound(tool: _Tool) -> Awaitable[Any]:
    return asyncio.get_running_loop().run_in_executor(_USER_POOL, ks.bind(tool))


POOLS: dict[str, Callable[[_Tool], Awaitable[Any]]] = {
    "asyncio.to_thread": _to_thread,
    "run_in_executor(None)": _default_executor,
    "anyio.to_thread(abandon_on_cancel)": _anyio_abandoning,
    "user pool + bind": _user_pool_bound,
}


async def _kill_mid_tool(
    start: Callable[[_Tool], Awaitable[Any]], tool: _Tool, audit: MemoryAudit | None = None
) -> ks.StopReport:
    """Run *tool* through *start* as a guarded call in a session; kill it mid-tool."""
    policy = ks.StopPolicy(thread_grace=0.1, stop_timeout=2.0)
    async with ks.Runtime(audit=audit, policy=policy) as rt:
        session = rt.session("agent")

        async def work() -> Any:
            return await start(tool)

        async def agent() -> None:
            async with session:
                await session.call(work, tool="pooled")

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            assert await anyio.to_thread.run_sync(tool.started.wait, WAIT)
            report = await session.interrupt("stop", trigger="operator")
        return report


@pytest.mark.parametrize("pool", list(POOLS))
async def test_polling_pool_work_is_stopped_and_the_report_is_quiescent(pool: str) -> None:
    """Pool work that polls raises at the flag; the stop is quiescent and the work ended."""
    tool = _Tool(polls=True)
    report = await _kill_mid_tool(POOLS[pool], tool)
    assert tool.done.wait(WAIT)
    assert (report.outcome, report.quiescent) == ("stopped", True), report.summary()
    assert not any(t.running for t in report.threads)
    assert not tool.release.is_set()  # it ended on the flag, not on its release


@pytest.mark.parametrize("pool", list(POOLS))
async def test_non_polling_pool_work_makes_the_stop_unresponsive(pool: str) -> None:
    """Pool work that never polls still writes after the report: the report says so."""
    tool = _Tool(polls=False)
    audit = MemoryAudit()
    report = await _kill_mid_tool(POOLS[pool], tool, audit)
    seen = tool.writes
    assert (report.outcome, report.quiescent) == ("unresponsive", False), report.summary()
    (row,) = [t for t in report.threads if t.running]
    assert row.outcome == "abandoned"
    kinds = [e.kind for e in audit.events]
    assert "escalated" in kinds
    assert "interrupt_completed" not in kinds
    # The honest part: it really is still writing.
    await anyio.to_thread.run_sync(lambda: _wait_until(lambda: tool.writes > seen))
    assert not tool.done.is_set()
    await anyio.to_thread.run_sync(tool.finish)  # before the loop waits for its pool


async def test_default_pool_work_is_named_for_the_session() -> None:
    """Work of asyncio.to_thread runs in a pool thread tagged with the session, and its
    row names the tool; the thread's own name comes back afterwards."""
    tool = _Tool(polls=False)
    names: list[str] = []
    report = await _kill_mid_tool(_to_thread, tool)
    (row,) = report.threads
    assert row.name.startswith("kill_switch agent/pool _Tool ")
    assert row.name.endswith(f"[{report.session_id[:8]}]")
    names = [t.name for t in threading.enumerate() if t.ident == row.ident]
    assert names == [row.name]
    await anyio.to_thread.run_sync(tool.finish)
    await anyio.to_thread.run_sync(
        lambda: _wait_until(
            lambda: all(t.name != row.name for t in threading.enumerate() if t.ident == row.ident)
        )
    )


async def test_pool_work_finished_before_the_kill_is_not_held_against_the_stop() -> None:
    """An idle pool thread that ran the session's work earlier is not reported."""

    async def agent_work() -> None:
        tool = _Tool(polls=False)
        tool.release.set()
        await asyncio.to_thread(tool)
        await anyio.to_thread.run_sync(tool, abandon_on_cancel=True)

    async with ks.Runtime() as rt:
        session = rt.session("agent")
        async with anyio.create_task_group() as tg:

            async def agent() -> None:
                async with session:
                    await session.call(agent_work, tool="twice")
                    await anyio.sleep_forever()

            tg.start_soon(agent)
            await anyio.wait_all_tasks_blocked()
            report = await session.interrupt("stop", trigger="operator")
    assert (report.outcome, report.quiescent, report.threads) == ("stopped", True, ())


async def test_anyio_to_thread_default_holds_the_stop_until_it_returns() -> None:
    """anyio.to_thread without abandon_on_cancel shields its caller: a non-polling thread
    keeps the tool call in flight, so the stop is unresponsive, never stopped."""
    tool = _Tool(polls=False)
    policy = ks.StopPolicy(thread_grace=0.05, stop_timeout=0.2)
    async with ks.Runtime(policy=policy) as rt:
        session = rt.session("agent")

        async def agent() -> None:
            async with session:
                await session.call(anyio.to_thread.run_sync, tool, tool="shielded")

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            assert await anyio.to_thread.run_sync(tool.started.wait, WAIT)
            report = await session.interrupt("stop", trigger="operator")
            await anyio.to_thread.run_sync(tool.finish)
    assert (report.outcome, report.quiescent) == ("unresponsive", False)


async def test_negative_control_a_plain_thread_is_not_the_sessions() -> None:
    """A plain threading.Thread starts with an empty context: not the session's work,
    not seen, and the report says stopped while it writes — why tools must use a pool
    or ``bind`` (the checks above are not vacuous)."""
    tool = _Tool(polls=False)

    async def work() -> None:
        threading.Thread(target=tool, daemon=True).start()
        await anyio.sleep_forever()

    report = await _kill_mid_tool(lambda _: work(), tool)
    seen = tool.writes
    assert (report.outcome, report.quiescent) == ("stopped", True)
    await anyio.to_thread.run_sync(lambda: _wait_until(lambda: tool.writes > seen))
    await anyio.to_thread.run_sync(tool.finish)


def test_the_runtime_keeps_a_default_executor_of_the_users() -> None:
    """A loop whose default executor the user set keeps it (the pool is then seen only by
    the stack look); without one, the runtime's is installed."""
    mine = ThreadPoolExecutor(max_workers=1)

    async def main() -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(mine)
        async with ks.Runtime():
            kept = loop._default_executor  # type: ignore[attr-defined]
        return kept, None

    async def fresh() -> Any:
        async with ks.Runtime():
            return asyncio.get_running_loop()._default_executor  # type: ignore[attr-defined]

    kept, _ = asyncio.run(main())
    assert kept is mine
    from kill_switch._planes._pool import SessionPoolExecutor

    assert isinstance(asyncio.run(fresh()), SessionPoolExecutor)
    mine.shutdown()


def _wait_until(cond: Callable[[], bool]) -> None:
    ev = threading.Event()
    for _ in range(int(WAIT / 0.002)):
        if cond():
            return
        ev.wait(0.002)
    raise AssertionError("condition not reached")
