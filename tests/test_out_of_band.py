"""The out-of-band path: a kill that works while the agent's event loop is stuck."""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

import anyio
import pytest

import kill_switch as ks

if TYPE_CHECKING:
    from kill_switch.testing import MemoryAudit

TREE = "sleep 300 & echo ready; wait"


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie waits only for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


async def _block_loop_and_interrupt(
    session: ks.Session, pids: list[int], bound: float
) -> list[bool]:
    """Interrupt from a thread while the loop is blocked; report what died meanwhile."""
    seen: list[bool] = []
    done = threading.Event()

    def interrupter() -> None:
        session.interrupt("wedged agent", trigger="operator", operator="ops")
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline and any(running(p) for p in pids):
            done.wait(0.005)
        seen.append(not any(running(p) for p in pids))
        done.set()

    thread = threading.Thread(target=interrupter)
    thread.start()
    # The agent blocks its own event loop (a sync call inside a coroutine).
    done.wait(bound + 5)
    thread.join()
    return seen


@pytest.mark.slow
async def test_blocked_loop_still_kills_process_group(audit: MemoryAudit) -> None:
    """With the loop blocked, the tracked process group dies anyway (FAULTS 23)."""
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a") as session:
            proc = await session.open_process(["sh", "-c", TREE], stdin=None, stderr=None)
            assert proc.stdout is not None
            await proc.stdout.receive()
            pids = [proc.pid, *children_of(proc.pid)]
            assert len(pids) == 2
            seen = await _block_loop_and_interrupt(session, pids, bound=10.0)
            await anyio.sleep_forever()
    assert seen == [True]
    assert session.report is not None
    assert session.report.out_of_band
    assert "SIGKILL" in session.report.processes[0].signals
    assert "out_of_band" in audit.kinds(session.id)
    assert not any(running(p) for p in pids)


@pytest.mark.slow
async def test_negative_control_without_out_of_band_the_group_survives_the_block() -> None:
    """Negative control: with the out-of-band path pushed past the block, the group
    is still running while the loop is blocked."""
    policy = ks.StopPolicy(out_of_band_after=3600.0, term_grace=0.1)
    async with ks.Runtime(policy=policy) as runtime:
        async with runtime.session("a") as session:
            proc = await session.open_process(["sh", "-c", TREE], stdin=None, stderr=None)
            assert proc.stdout is not None
            await proc.stdout.receive()
            pids = [proc.pid, *children_of(proc.pid)]
            seen = await _block_loop_and_interrupt(session, pids, bound=0.5)
            await anyio.sleep_forever()
    assert seen == [False]
    assert session.report is not None
    assert not session.report.out_of_band
    assert not any(running(p) for p in pids)  # the loop-side ladder did it afterwards


async def test_responsive_loop_never_goes_out_of_band() -> None:
    """An interrupt the loop picks up in time takes the normal path."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            proc = await session.open_process(["sleep", "300"], stdin=None, stderr=None)
            session.interrupt("x", trigger="operator")
            await anyio.sleep_forever()
    assert session.report is not None
    assert not session.report.out_of_band
    assert not running(proc.pid)
    assert os.getpid() > 0
