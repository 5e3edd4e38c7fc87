"""Server-sent events: fan-out of the runtime's audit feed to bounded per-client queues.

Loop discipline: ``publish`` and ``subscribe`` run on the control plane's event loop only;
the runtime's listener (any thread) hops onto it through a ``Handoff``: one loop wake-up
per burst of events, not one per event. A slow
client never slows the runtime or the other clients: its queue is bounded, and what does
not fit is dropped and counted (per client, reported to it in a ``dropped`` event, and in
``/metrics``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

T = TypeVar("T")

#: Events kept per client before new ones are dropped.
QUEUE_SIZE = 256
#: Streams open at once, in all, and per token.
MAX_CLIENTS = 64
MAX_PER_TOKEN = 8
#: Seconds between two checks that a stream's token is still valid (file revocation,
#: rotation); a revocation through the API ends the stream at once.
REVALIDATE = 1.0


def encode(event: str, data: Any, seq: int) -> bytes:
    """One SSE frame. ``json.dumps`` escapes newlines, so a reason cannot forge frames."""
    body = json.dumps(data, ensure_ascii=True, separators=(",", ":"), default=str)
    return f"id: {seq}\nevent: {event}\ndata: {body}\n\n".encode("ascii")


class Handoff(Generic[T]):
    """Items from any thread to *consume* on *loop*, in bursts: the first item of a burst
    schedules one callback, which takes every item queued by the time it runs.

    ``call_soon_threadsafe`` per item woke the control loop (a self-pipe write and a
    GIL hand-over) once per audit event. After a drain that took something, the next one
    is a timer on *loop* *linger* seconds later, and items put meanwhile wake nobody:
    the recorder (the runtime's loop, in the middle of a stop) pays one write per burst
    however its events are spread, and a drain that finds nothing ends the burst. The
    price is up to *linger* of delay for the dashboard's later events.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        consume: Callable[[list[T]], object],
        *,
        linger: float = 0.005,
    ) -> None:
        self._loop = loop
        self._consume = consume
        self._linger = linger
        self._items: list[T] = []
        self._scheduled = False
        self._lock = threading.Lock()

    def put(self, item: T) -> None:
        """Queue *item* (any thread; cheap, never raises: dropped once the loop closed)."""
        with self._lock:
            self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody will read them
            with self._lock:
                self._items.clear()

    def catch_up(self) -> None:
        """Consume what is queued now (on *loop*): a reader that calls this first sees
        every event recorded before it asked, lingering burst or not."""
        with self._lock:
            items, self._items = self._items, []
        if items:
            self._consume(items)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            if not items:
                self._scheduled = False  # the burst is over: the next put wakes the loop
                return
        # Still scheduled: what is put before the timer is taken by it, with no wake-up.
        self._loop.call_later(self._linger, self._drain)
        self._consume(items)


class _Client:
    __slots__ = ("dropped", "frames", "owner", "reported_dropped", "revoked", "wakeup")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.revoked = False
        self.frames: deque[bytes] = deque()
        self.dropped = 0
        self.reported_dropped = 0
        # asyncio.Event rather than anyio's: set from a plain loop callback, not a task.
        self.wakeup = asyncio.Event()


class Broker:
    """Fan-out of events to every subscribed stream (control loop only)."""

    def __init__(
        self,
        *,
        queue_size: int = QUEUE_SIZE,
        max_clients: int = MAX_CLIENTS,
        max_per_token: int = MAX_PER_TOKEN,
    ) -> None:
        self.queue_size = queue_size
        self.max_clients = max_clients
        self.max_per_token = max_per_token
        self._clients: set[_Client] = set()
        self._owners: Counter[str] = Counter()
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

    def full_for(self, owner: str) -> bool:
        """Whether token *owner* holds as many streams as one token may."""
        return self._owners[owner] >= self.max_per_token

    def revoke(self, owner: str) -> None:
        """End every stream opened with token *owner*."""
        for client in self._clients:
            if client.owner == owner:
                client.revoked = True
                client.wakeup.set()

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

    async def stream(
        self,
        owner: str = "",
        valid: Callable[[], bool] | None = None,
        *,
        heartbeat: float = 15.0,
    ) -> AsyncIterator[bytes]:
        """Frames for one client until the server closes, the client goes away, or its
        token *owner* is revoked (``revoke``, or *valid* turning false).

        Cancellation (the client disconnecting) ends it at its await; nothing to clean
        but the subscription, which is synchronous.
        """
        client = _Client(owner)
        self._clients.add(client)
        self._owners[owner] += 1
        loop = asyncio.get_running_loop()
        beat = loop.time() + heartbeat
        try:
            yield b": kill_switch event stream\nretry: 2000\n\n"
            while not self.closed.is_set():
                if client.revoked or (valid is not None and not valid()):
                    yield encode("revoked", {"token_id": owner}, next(self._seq))
                    return
                while client.frames:
                    yield client.frames.popleft()
                if client.dropped != client.reported_dropped:
                    client.reported_dropped = client.dropped
                    yield encode("dropped", {"dropped": client.dropped}, next(self._seq))
                    continue
                client.wakeup.clear()
                try:
                    await asyncio.wait_for(client.wakeup.wait(), min(REVALIDATE, heartbeat))
                except TimeoutError:
                    if loop.time() >= beat:
                        beat = loop.time() + heartbeat
                        yield b": heartbeat\n\n"
        finally:
            self._clients.discard(client)
            self._owners[owner] -= 1
            if self._owners[owner] <= 0:
                del self._owners[owner]
