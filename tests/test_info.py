"""Frozen snapshots of a live session's processes and threads (``Session.processes()``,
``Session.threads()``): what the control plane serialises instead of reading planes."""

from __future__ import annotations

import threading

import anyio
import attrs
import pytest

import kill_switch as ks


async def test_processes_and_threads_are_frozen_snapshots() -> None:
    """A running tree and a running sync tool show up as snapshots; mutating one fails;
    after the stop neither is tracked any more (the StopReport holds their story)."""
    release = threading.Event()
    started = threading.Event()

    def indexer() -> None:
        started.set()
        release.wait(30)

    async with ks.Runtime() as runtime, anyio.create_task_group() as tg:

        async def agent(*, task_status: anyio.abc.TaskStatus[ks.Session]) -> None:
            async with runtime.session("snap", policy=ks.StopPolicy(term_grace=0.05)) as s:
                assert s.processes() == ()
                assert s.threads() == ()
                proc = await s.open_process(
                    ["sh", "-c", "echo ready; sleep 300"], stdin=None, stderr=None
                )
                assert proc.stdout is not None
                await proc.stdout.receive()
                s.start_soon(s.run_sync, indexer)
                task_status.started(s)
                await anyio.sleep_forever()

        session = await tg.start(agent)
        assert await anyio.to_thread.run_sync(started.wait, 30)
        (p,) = session.processes()
        (t,) = session.threads()
        assert p.command[:2] == ("sh", "-c")
        assert p.pgid == p.pid
        assert not p.reaped
        assert p.signals == ()
        assert t.tool == "indexer"
        assert t.ident is not None
        assert not t.exited
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            p.reaped = True
        release.set()
        report = await session.interrupt("snapshot test", trigger="operator")
        tg.cancel_scope.cancel()
    assert report.quiescent
    assert session.processes() == ()
    assert session.threads() == ()
    assert [r.pid for r in report.processes] == [p.pid]
