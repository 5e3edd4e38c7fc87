"""uvicorn's h11 protocol with the two limits it lacks: a header deadline and a
connection cap that keeps room for the next request.

What uvicorn and h11 already bound, and are configured for in ``_server``: the header
block (``h11_max_incomplete_event_size``, 400 beyond it), the idle time between two
requests on a kept-alive connection (``timeout_keep_alive``). What they do not, read from
uvicorn 0.54's ``H11Protocol``: a connection that never sends a complete request head is
never timed out (the keep-alive timer is armed only after a response, and cancelled by
the first byte of the next request), and nothing caps the number of open connections
(``limit_concurrency`` answers 503 to every *request* once reached, the operator's kill
included, and leaves idle sockets open). So an idle or half-sent socket held a descriptor
for ever, and enough of them made an operator's kill time out (EMFILE on accept).

Hence, written here because no layer offers them:

* **Header deadline**: a connection must deliver a complete request head within
  ``header_timeout`` of opening (or of its previous response); otherwise it is closed.
* **Connection cap with eviction**: at most ``max_connections`` are open (clamped to half
  the process's descriptor limit). A new connection beyond the cap evicts the *oldest
  connection still waiting for its request head* — never one whose request is being
  served (a kill waiting for its report, an event stream). An operator's new connection
  is therefore always accepted: the idle sockets make room for it. Only when every open
  connection is serving a request is the new one closed.
"""

from __future__ import annotations

import resource
import time
from typing import TYPE_CHECKING, Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    import asyncio

    from uvicorn.config import Config
    from uvicorn.server import ServerState

#: Connections open at once, by default (see ``connection_cap``).
MAX_CONNECTIONS = 256
#: Seconds a connection has to deliver its complete request head.
HEADER_TIMEOUT = 10.0


def connection_cap(requested: int) -> int:
    """*requested*, clamped to half the soft descriptor limit (at least 4): the
    connections can never exhaust the descriptors the runtime and the listener need."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(4, min(requested, soft // 2))


class LimitedH11Protocol(H11Protocol):
    """``H11Protocol`` with a request-head deadline and an evicting connection cap."""

    max_connections: int = MAX_CONNECTIONS
    header_timeout: float = HEADER_TIMEOUT
    #: Connections evicted or timed out, for ``/metrics`` (shared by every connection).
    counters: dict[str, int]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._opened = 0.0
        self._deadline: asyncio.TimerHandle | None = None

    def _waiting(self) -> bool:
        """Whether this connection is between requests (no request head received)."""
        return self.conn.their_state is h11.IDLE and (
            self.cycle is None or self.cycle.response_complete
        )

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing() and self._waiting():
            self.counters["header_timeouts"] += 1
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Accept, then make room: evict the oldest waiting connection beyond the cap."""
        super().connection_made(transport)
        self._opened = time.monotonic()
        self._arm()
        if len(self.connections) <= self.max_connections:
            return
        waiting = [
            c
            for c in self.connections
            if c is not self
            and isinstance(c, LimitedH11Protocol)
            and not c.transport.is_closing()
            and c._waiting()
        ]
        victim = min(waiting, key=lambda c: c._opened) if waiting else self
        self.counters["evicted"] += 1
        victim.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the deadline, then let uvicorn clean up."""
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse; once a complete request head has arrived the deadline no longer applies."""
        super().data_received(data)
        if self._deadline is not None and not self._waiting():
            self._disarm()

    def on_response_complete(self) -> None:
        """Between two requests on a kept-alive connection the deadline applies again."""
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()


def protocol_class(max_connections: int, header_timeout: float) -> type[LimitedH11Protocol]:
    """A ``LimitedH11Protocol`` subclass with these limits (one per server)."""
    if max_connections < 1 or not header_timeout > 0:
        raise ValueError("max_connections must be >= 1 and header_timeout > 0")
    attrs: dict[str, Any] = {
        "max_connections": connection_cap(max_connections),
        "header_timeout": header_timeout,
        "counters": {"evicted": 0, "header_timeouts": 0},
    }
    return type("ControlH11Protocol", (LimitedH11Protocol,), attrs)
