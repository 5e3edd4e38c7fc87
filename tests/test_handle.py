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
