"""Server-sent events: fan-out of the runtime's audit feed to bounded per-client queues.

Loop discipline: ``publish`` and ``subscribe`` run on the control plane's event loop only;
the runtime's listener (any thread) hops onto it with ``call_soon_threadsafe``. A slow
client never slows the runtime or the other clients: its queue is bounded, and what does
not fit is dropped and counted (per client, reported to it in a ``dropped`` event, and in
``/metrics``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

#: Events kept per client before new ones are dropped.
QUEUE_SIZE = 256


def encode(event: str, data: Any, seq: int) -> bytes:
    """One SSE frame. ``json.dumps`` escapes newlines, so a reason cannot forge frames."""
    body = json.dumps(data, ensure_ascii=True, separators=(",", ":"), default=str)
    return f"id: {seq}\nevent: {event}\ndata: {body}\n\n".encode("ascii")


class _Client:
    __slots__ = ("dropped", "frames", "reported_dropped", "wakeup")

    def __init__(self) -> None:
        self.frames: deque[bytes] = deque()
        self.dropped = 0
        self.reported_dropped = 0
        # asyncio.Event rather than anyio's: set from a plain loop callback, not a task.
        self.wakeup = asyncio.Event()


class Broker:
    """Fan-out of events to every subscribed stream (control loop only)."""

    def __init__(self, *, queue_size: int = QUEUE_SIZE, max_clients: int = 64) -> None:
        self.queue_size = queue_size
        self.max_clients = max_clients
        self._clients: set[_Client] = set()
        self._seq = itertools.count(1)
        self.published = 0
        self.dropped = 0
        self.closed = asyncio.Event()

    @property
    def clients(self) -> int:
        """Streams currently open."""
        return len(self._clients)

    def full(self) -> bool:
        """Whether no further stream may open."""
        return len(self._clients) >= self.max_clients

    def publish(self, event: str, data: Any) -> None:
        """Queue *event* for every client; drop it for clients whose queue is full."""
        self.published += 1
        frame = encode(event, data, next(self._seq))
        for client in self._clients:
            if len(client.frames) >= self.queue_size:
                client.dropped += 1
                self.dropped += 1
            else:
                client.frames.append(frame)
            client.wakeup.set()

    def close(self) -> None:
        """End every stream (server shutdown)."""
        self.closed.set()
        for client in self._clients:
            client.wakeup.set()

    async def stream(self, *, heartbeat: float = 15.0) -> AsyncIterator[bytes]:
        """Frames for one client until the server closes or the client goes away.

        Cancellation (the client disconnecting) ends it at its await; nothing to clean
        but the subscription, which is synchronous.
        """
        client = _Client()
        self._clients.add(client)
        try:
            yield b": kill_switch event stream\nretry: 2000\n\n"
            while not self.closed.is_set():
                while client.frames:
                    yield client.frames.popleft()
                if client.dropped != client.reported_dropped:
                    client.reported_dropped = client.dropped
                    yield encode("dropped", {"dropped": client.dropped}, next(self._seq))
                    continue
                client.wakeup.clear()
                try:
                    await asyncio.wait_for(client.wakeup.wait(), heartbeat)
                except TimeoutError:
                    yield b": heartbeat\n\n"
        finally:
            self._clients.discard(client)
