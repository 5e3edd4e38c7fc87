"""The interrupt handle: awaitable from any loop, waitable from any thread."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest

import kill_switch as ks


async def park() -> None:
    await anyio.sleep_forever()


async def test_every_interrupt_returns_the_same_handle() -> None:
    """One stop per session, whatever the number of callers."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            h1 = session.interrupt("one", trigger="operator")
            h2 = session.interrupt("two", trigger="operator")
            assert h1 is h2 is session.handle
            assert not h1.done()
            await park()
        assert h1.done()
        assert h1.report is session.report


async def test_handle_awaited_from_another_loop_in_another_thread() -> None:
    """A control plane on its own loop can await the stop."""
    got: list[ks.StopReport] = []
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            handle = session.interrupt("x", trigger="operator")

            def other_loop() -> None:
                got.append(asyncio.run(handle.wait()))

            thread = threading.Thread(target=other_loop)
            thread.start()
            await park()
        await anyio.to_thread.run_sync(thread.join)
    assert got == [session.report]


async def test_result_blocks_a_thread_until_done_and_times_out() -> None:
    """``result(timeout)`` waits in a thread; it raises TimeoutError when not done."""
    async with ks.Runtime() as runtime:
        session = runtime.session("a")
        handle = session.handle
        with pytest.raises(TimeoutError):
            await anyio.to_thread.run_sync(handle.result, 0.01)
        async with session:
            session.interrupt("x", trigger="operator")
            await park()
        report = await anyio.to_thread.run_sync(handle.result, 5.0)
    assert report.outcome == "stopped"


async def test_cancelled_wait_does_not_cancel_the_stop() -> None:
    """Giving up on waiting leaves the stop going."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            handle = session.interrupt("x", trigger="operator")
            with anyio.move_on_after(0, shield=True):
                await handle
            await park()
        assert (await handle).quiescent


async def test_done_callback_runs_after_the_awaiters_and_soon_once_resolved() -> None:
    """add_done_callback calls back on the loop after the stop resolved (the awaiters
    woken first), and soon for a handle that has resolved already."""
    order: list[str] = []
    loop = asyncio.get_running_loop()
    async with ks.Runtime() as runtime:
        session = runtime.session("a")
        handle = session.handle

        async def awaiter() -> None:
            order.append(f"awaiter:{(await handle).outcome}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(awaiter)
            await anyio.wait_all_tasks_blocked()
            handle.add_done_callback(loop, lambda: order.append(f"callback:{handle.done()}"))
            async with session:
                session.interrupt("x", trigger="operator")
                await park()
    assert order == ["awaiter:stopped", "callback:True"]
    done = asyncio.Event()
    handle.add_done_callback(loop, done.set)
    assert not done.is_set()  # soon, not now
    await done.wait()
