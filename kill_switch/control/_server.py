"""The control plane's server: uvicorn on its own thread and its own event loop.

Why a thread: an operator's kill must be answered while the agent's event loop is stuck
(a blocking call in a coroutine, a CPU-bound tool). The control loop only needs the
runtime's thread-safe surface — ``sessions()``, ``get()``, ``interrupt()`` and awaiting
an ``InterruptHandle`` from any loop — so it never waits on the agent's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import anyio

from ._auth import TokenStore
from ._config import ControlConfig, ControlOptions, resolve
from ._protocol import protocol_class
from ._routes import create_app

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from typing import Unpack

    import uvicorn

    from kill_switch._runtime import Runtime

    from ._app import ControlApp
    from ._auth import TokenEntry
    from ._sources import SessionSource

    Tokens = TokenStore | Sequence[TokenEntry] | str | os.PathLike[str] | None

log = logging.getLogger("kill_switch.control")

#: The listening socket's backlog. asyncio 3.11's accept loop, on EMFILE, schedules one
#: retry per remaining slot of the backlog instead of one (uvicorn's default is 2048): a
#: small backlog bounds that storm. An operator's kill needs one slot.
BACKLOG = 128
_ACCEPT_ERROR = "socket.accept() out of system resource"

#: Seconds ``start`` waits for the server to listen, and ``stop`` for it to finish.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def _tokens(tokens: Tokens) -> TokenStore:
    if isinstance(tokens, TokenStore):
        return tokens
    if tokens is None:
        return TokenStore.from_environment()
    if isinstance(tokens, (str, os.PathLike)):
        return TokenStore(path=tokens, env=os.environ.get("KILL_SWITCH_TOKENS"))
    return TokenStore(list(tokens))


class ControlServer:
    """The control plane of *runtime*, served from a thread of its own.

    ``start()`` returns once the socket listens (``url`` is then valid); ``stop()``
    returns once the thread has ended, bounded by ``STOP_TIMEOUT`` (then it forces the
    exit and joins again). Also a context manager.

    Args:
        runtime: the entered runtime whose sessions it shows and stops (and which
            records the control plane's own audit events).
        config: the options (``ControlConfig``: host, port, audit path, limits, allowed
            hosts...); or give them as keywords, which build it.
        tokens: a ``TokenStore``, token entries, a token file path, or ``None`` for
            ``$KILL_SWITCH_TOKENS``.
        source: where the sessions come from (default: *runtime*;
            ``FleetSource(ks.Fleet(url))``: every runtime of a fleet).

    Raises:
        ValueError: no token is configured (an open kill switch is refused), or a limit
            is out of range.
    """

    def __init__(
        self,
        runtime: Runtime,
        config: ControlConfig | None = None,
        *,
        tokens: Tokens = None,
        source: SessionSource | None = None,
        **options: Unpack[ControlOptions],
    ) -> None:
        self.config = config = resolve(config, options)
        self._protocol = protocol_class(config.max_connections, config.header_timeout)
        store = _tokens(tokens)
        if not store.entries():
            raise ValueError(
                "no control-plane token configured: create one with "
                "`kill-switch token create --role operator` and pass its hash line "
                "(tokens=..., a token file, or $KILL_SWITCH_TOKENS)"
            )
        self.tokens = store
        self.app, self.state = create_app(runtime, store, config, source=source)
        self.state.connections = lambda: {
            "open": self.open_connections,
            **self._protocol.counters,
        }
        self._host = config.host
        self._port = config.port
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accept_error_logged = -60.0
        self.url = ""

    @property
    def open_connections(self) -> int:
        """HTTP connections open now (for tests and benchmarks; bounded by the cap)."""
        server = self._server
        return len(server.server_state.connections) if server is not None else 0

    @property
    def control(self) -> ControlApp:
        """The application's state (for tests and embedding)."""
        return self.state

    def start(self) -> ControlServer:
        """Bind, start the server thread and wait until it serves.

        Raises:
            OSError: the address cannot be bound.
            RuntimeError: the server did not start within ``START_TIMEOUT``, or its
                source could not be opened (a fleet's Redis out of reach); it says why.
        """
        import uvicorn

        if self._thread is not None:
            raise RuntimeError("a ControlServer can be started once")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says
        # TCP; with proto 0 every response waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self.url = (
            f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
        )
        config = uvicorn.Config(
            self.app,
            lifespan="on",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=1,
            # The request head (line and headers) is bounded by h11: 400 beyond 16 KiB.
            h11_max_incomplete_event_size=16 * 1024,
            # Idle time between two requests on a kept-alive connection; the time to send
            # a request head, and the connection cap, are the protocol's (``_protocol``).
            timeout_keep_alive=5,
            # The client address is the TCP peer: X-Forwarded-For from anyone (uvicorn
            # trusts it from loopback by default) would reset the failure limiter and
            # forge the audited address.
            proxy_headers=False,
            forwarded_allow_ips="",
            loop="asyncio",
            http=self._protocol,
            backlog=BACKLOG,
        )
        server = uvicorn.Server(config)
        self._server = server
        ready = threading.Event()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._loop.set_exception_handler(self._on_loop_error)
            serving = asyncio.ensure_future(server.serve(sockets=[sock]))
            while not server.started and not serving.done():  # noqa: ASYNC110  (uvicorn sets a plain flag)
                await asyncio.sleep(0.005)
            ready.set()
            await serving

        def run() -> None:
            try:
                asyncio.run(main())
            except Exception as exc:  # reported by start(); the thread ends
                self._error = exc
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name="kill_switch control plane", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT) or not server.started:
            self.stop()
            why = self._error or self.state.startup_error
            raise RuntimeError(f"control plane did not start: {why}")
        return self

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # asyncio reports every failed accept (EMFILE...) with a traceback; out of
        # descriptors that is a flood of identical lines. Say it once a minute. The same
        # goes for the retries it scheduled meanwhile (``_start_serving``), which fail
        # with "Invalid file descriptor" once the listening socket has closed.
        message = str(context.get("message", ""))
        if message == _ACCEPT_ERROR or "_start_serving" in message:
            now = time.monotonic()
            if now - self._accept_error_logged < 60.0:
                return
            self._accept_error_logged = now
            log.error(
                "control plane: accept() failed (%s); the same error is muted for 60 s",
                context.get("exception"),
            )
            return
        loop.default_exception_handler(context)

    def stop(self) -> None:
        """Stop serving and join the thread (bounded; idempotent)."""
        thread, server = self._thread, self._server
        if thread is None or server is None:
            return
        if self._loop is not None:
            # End the event streams first: uvicorn waits for open connections before it
            # runs the application's shutdown, and a stream never ends by itself.
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self.state.broker.close)
        server.should_exit = True
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            server.force_exit = True
            thread.join(STOP_TIMEOUT)
        if self._sock is not None:
            self._sock.close()
        if thread.is_alive():
            raise RuntimeError("the control plane's thread did not stop")

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.asynccontextmanager
async def serve(
    runtime: Runtime,
    config: ControlConfig | None = None,
    *,
    tokens: Tokens = None,
    source: SessionSource | None = None,
    **options: Unpack[ControlOptions],
) -> AsyncIterator[ControlServer]:
    """Serve *runtime*'s control plane (or *source*'s: a fleet) while the block runs;
    yields the server (``.url``). Arguments as ``ControlServer``'s.

    Start-up and shut-down run in a worker thread (the agent's loop is not blocked);
    shut-down is shielded and bounded by twice ``STOP_TIMEOUT``.

    Raises:
        ValueError: no token configured, or a limit out of range. OSError: the address
            cannot be bound.
    """
    server = ControlServer(runtime, config, tokens=tokens, source=source, **options)
    try:
        # Inside the try: a cancellation that arrives while the thread starts the server
        # (the wait is not abandoned) still stops it.
        await anyio.to_thread.run_sync(server.start)
        yield server
    finally:
        with anyio.move_on_after(2 * STOP_TIMEOUT + 1, shield=True):
            await anyio.to_thread.run_sync(server.stop)
