"""Fleet control on a real redis-server with real worker processes (each its own Runtime,
as separate hosts would be): inventory, kills by id and selector, sticky kills and bans,
the dead man's switch, message authentication."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import kill_switch as ks
from kill_switch.fleet import FleetUnavailable, NoAnswer
from kill_switch.fleet import _wire

from .fleet_support import KEY, Worker
from .redis_server import RedisServer

pytest.importorskip("redis")
pytestmark = pytest.mark.slow


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of its own on a free loopback port; always stopped."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Worker processes started by the test; each quit (or killed) and reaped at the end."""
    started: list[Worker] = []
    try:
        yield started
    finally:
        for w in started:
            w.close()


def spawn(workers: list[Worker], server: RedisServer, name: str, **kw: object) -> Worker:
    w = Worker(server.url, name, **kw)  # type: ignore[arg-type]  # keyword options pass through
    workers.append(w)
    w.ready()
    return w


def fleet(server: RedisServer, name: str, **kw: object) -> ks.Fleet:
    return ks.Fleet(server.url, key=KEY, name=name, **kw)  # type: ignore[arg-type]  # options pass through


async def poll(pred: object, timeout: float = 30.0) -> None:
    """Wait until the async predicate holds (bounded); no sleep stands for a state."""
    deadline = time.monotonic() + timeout
    while True:
        if await pred():  # type: ignore[operator]  # an async callable
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await anyio.sleep(0.02)


async def in_thread(fn: object, *args: object, **kw: object) -> object:
    """Run a blocking worker call (bounded inside) off the event loop."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kw))  # type: ignore[arg-type]  # any callable


# ----------------------------------------------------------------------- inventory


async def test_inventory_lists_sessions_of_every_worker(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """fleet.sessions() lists the sessions of every worker process with host and pid."""
    a = spawn(workers, redis_server, "inv")
    b = spawn(workers, redis_server, "inv")
    await in_thread(a.start, "researcher", "s-a1", team="blue")
    await in_thread(b.start, "writer", "s-b1")
    async with fleet(redis_server, "inv") as f:

        async def both() -> bool:
            return {"s-a1", "s-b1"} <= {s.session_id for s in await f.sessions()}

        await poll(both)
        by_id = {s.session_id: s for s in await f.sessions()}
        assert by_id["s-a1"].runtime_id == a.runtime_id
        assert by_id["s-a1"].pid == a.proc.pid
        assert by_id["s-a1"].labels == {"team": "blue"}
        assert by_id["s-b1"].runtime_id == b.runtime_id
        assert by_id["s-b1"].state == "running"
        assert {r.runtime_id for r in await f.runtimes()} == {a.runtime_id, b.runtime_id}


async def test_sigkilled_worker_shown_lost_with_sessions_unknown(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """A SIGKILLed worker is shown lost after its lease, its sessions unknown, never running."""
    a = spawn(workers, redis_server, "lost", lease=0.5)
    await in_thread(a.start, "researcher", "s-lost")
    async with fleet(redis_server, "lost") as f:

        async def listed() -> bool:
            return any(s.session_id == "s-lost" for s in await f.sessions())

        await poll(listed)
        a.sigkill()

        async def lost() -> bool:
            return all(r.lost for r in await f.runtimes())

        await poll(lost)
        (s,) = await f.sessions()
        assert s.state == "unknown"
        (rt,) = await f.runtimes()
        assert rt.lost and rt.lease_left < 0


# ---------------------------------------------------------------------------- kills


async def test_kill_by_id_returns_owner_report(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """fleet.kill(id) stops the session in its worker process and returns its StopReport."""
    a = spawn(workers, redis_server, "kid")
    b = spawn(workers, redis_server, "kid")
    await in_thread(a.start, "researcher", "s-1")
    await in_thread(b.start, "researcher", "s-2")
    async with fleet(redis_server, "kid") as f:
        report = await f.kill("s-2", reason="runaway", operator="alice")
    assert isinstance(report, ks.StopReport)
    assert report.session_id == "s-2"
    assert report.trigger == "operator"
    assert report.operator == "alice"
    assert report.quiescent and report.outcome == "stopped"
    ev = await in_thread(b.stopped, "s-2")
    assert ev["operator"] == "alice"  # type: ignore[index]
    # The other worker's session is untouched.
    assert not any(e["event"] == "stopped" for e in a.events)


async def test_kill_is_idempotent(redis_server: RedisServer, workers: list[Worker]) -> None:
    """A second fleet kill of the same session returns the same stop (one interrupt)."""
    a = spawn(workers, redis_server, "idem")
    await in_thread(a.start, "researcher", "s-1")
    async with fleet(redis_server, "idem") as f:
        first = await f.kill("s-1", reason="one", operator="alice")
        second = await f.kill("s-1", reason="two", operator="bob")
    assert second.interrupt_id == first.interrupt_id
    assert second.reason == "one"


async def test_kill_unknown_session_says_so(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """Killing an id nobody holds says so once every live runtime answered (no hang)."""
    spawn(workers, redis_server, "unk")
    async with fleet(redis_server, "unk") as f:
        with pytest.raises(NoAnswer, match="no live runtime holds it"):
            await f.kill("nobody", reason="x", operator="alice", timeout=30)


async def test_kill_where_by_agent_and_label_across_workers(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """kill_where(agent=...) and (labels=...) stop exactly the matching sessions everywhere."""
    a = spawn(workers, redis_server, "sel")
    b = spawn(workers, redis_server, "sel")
    await in_thread(a.start, "researcher", "a-r")
    await in_thread(a.start, "writer", "a-w", team="red")
    await in_thread(b.start, "researcher", "b-r")
    await in_thread(b.start, "writer", "b-w", team="blue")
    async with fleet(redis_server, "sel") as f:
        res = await f.kill_where(agent="researcher", reason="bad tool", operator="carol")
        assert sorted(r.session_id for r in res.reports) == ["a-r", "b-r"]
        assert res.unanswered == ()
        res = await f.kill_where(labels={"team": "red"}, reason="red team", operator="carol")
        assert [r.session_id for r in res.reports] == ["a-w"]
    await in_thread(b.stopped, "b-r")
    assert not any(e["event"] == "stopped" and e["session_id"] == "b-w" for e in b.events)


async def test_kill_where_requires_a_selector(redis_server: RedisServer) -> None:
    """kill_where() without agent, labels or all=True is refused before anything is sent."""
    async with fleet(redis_server, "nosel") as f:
        with pytest.raises(ValueError, match="selector"):
            await f.kill_where(reason="x")
