"""The Redis client's cancellation safety, which the fleet relies on: fleet operations
cancelled mid-command under load must never let a reply reach another request (the
2023 redis-py incident, CVE-2023-28858/28859). A naive client without the fix is the
negative control: the same workload shows crossed replies."""

from __future__ import annotations

import contextlib
import random
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import pytest

import kill_switch as ks

from .fleet_support import KEY
from .redis_server import needs

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .redis_server import RedisServer

pytest.importorskip("redis")
pytestmark = [pytest.mark.slow, needs("redis-server")]

KEYS = 200
TASKS = 40
ROUNDS = 30
DELAY = 0.003  # seconds each reply is held: longer than the shorter deadlines


class NaiveClient:
    """One RESP connection that reads a reply only if the caller is not cancelled first:
    what a client without the fix does. For the negative control only."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.buf = b""
        self.lock = anyio.Lock()

    async def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.buf += await self.stream.receive()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    async def get(self, key: str) -> str | None:
        async with self.lock:
            cmd = f"*2\r\n$3\r\nGET\r\n${len(key)}\r\n{key}\r\n".encode()
            with anyio.CancelScope(shield=True):
                await self.stream.send(cmd)  # sent whole: the bug is on the reply side
            head = await self._line()  # cancelled here, the reply stays unread
            if head == b"$-1":
                return None
            return (await self._line()).decode()


class SlowLink:
    """A TCP proxy in front of Redis that holds every reply for *delay* seconds (a loaded
    server or a long link, as in redis-py issue #2665's reproduction): a deadline shorter
    than the delay cancels a command after it was sent and before its reply."""

    def __init__(self, port: int, delay: float) -> None:
        self.target = port
        self.delay = delay
        self.port = 0

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            task_status.started()
            await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", self.target) as server:
            # Either side closing (redis-py drops a cancelled command's connection) ends
            # this proxied connection only.
            gone = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)

            async def up() -> None:
                with contextlib.suppress(*gone):
                    async for chunk in client:
                        await server.send(chunk)
                tg.cancel_scope.cancel()

            async def down() -> None:
                with contextlib.suppress(*gone):
                    async for chunk in server:
                        await anyio.sleep(self.delay)
                        await client.send(chunk)
                tg.cancel_scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(up)
                tg.start_soon(down)


async def _workload(
    get: Callable[[str], Awaitable[Any]], tasks: int = TASKS
) -> tuple[int, int, int]:
    """Concurrent GETs of distinct keys, a third cancelled at a random point (before
    sending, or between send and reply). Returns (answered, cancelled, crossed)."""
    answered = cancelled = crossed = 0
    rng = random.Random(1234)

    async def one() -> None:
        nonlocal answered, cancelled, crossed
        for _ in range(ROUNDS):
            i = rng.randrange(KEYS)
            deadline = rng.choice([0.0, 0.0005, 0.001, 0.002]) if rng.random() < 0.33 else 5.0
            with anyio.move_on_after(deadline) as scope:
                got = await get(f"k{i}")
            if scope.cancelled_caught:
                cancelled += 1
                continue
            answered += 1
            if got != f"v{i}":
                crossed += 1

    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(one)
    return answered, cancelled, crossed


async def _seed(url: str) -> None:
    from redis.asyncio import Redis

    r = Redis.from_url(url, decode_responses=True)
    async with r:
        await r.mset({f"k{i}": f"v{i}" for i in range(KEYS)})


async def test_fleet_client_never_crosses_replies_when_cancelled(redis_server: RedisServer) -> None:
    """The fleet's client (redis-py asyncio, pooled) under cancellation: no crossed reply."""
    await _seed(redis_server.url)
    link = SlowLink(redis_server.port, DELAY)
    async with anyio.create_task_group() as tg:
        await tg.start(link.serve)
        url = f"redis://127.0.0.1:{link.port}/0"
        async with ks.Fleet(url, key=KEY, name="cancel") as fleet:
            conn = fleet._conn()
            answered, cancelled, crossed = await _workload(conn.get)
            # Fleet operations themselves, cancelled mid-pipeline, leave clean inventories.
            for d in (0.0, 0.0005, 0.001, 0.002, 0.004) * 10:
                with anyio.move_on_after(d):
                    await fleet.runtimes()
            assert await fleet.runtimes() == ()
            assert await conn.get("k7") == "v7"
        tg.cancel_scope.cancel()
    assert cancelled > 50
    assert answered > 50
    assert crossed == 0, (answered, cancelled, crossed)


async def test_negative_control_naive_client_crosses_replies(redis_server: RedisServer) -> None:
    """Without discarding a cancelled connection, the same workload crosses replies."""
    await _seed(redis_server.url)
    link = SlowLink(redis_server.port, DELAY)
    async with anyio.create_task_group() as tg:
        await tg.start(link.serve)
        async with await anyio.connect_tcp("127.0.0.1", link.port) as stream:
            client = NaiveClient(stream)
            # One task: its short deadlines expire while it waits for the delayed reply
            # (with many, they expire queued on the single connection's lock).
            answered, cancelled, crossed = await _workload(client.get, tasks=1)
        tg.cancel_scope.cancel()
    assert cancelled > 3
    assert crossed > 0, (answered, cancelled, crossed)
