"""The control plane's state and handlers: inventory, kill, events, metrics, tokens.

Privileges (see ``kill_switch.control``'s docstring for the full table): ``viewer`` reads,
``operator`` reads and kills, ``admin`` also lists and revokes tokens. Nothing here can
resume, instruct, re-prompt or reconfigure an agent: those paths answer 403 to every
role, and every refusal of an authenticated caller is audited (``control_denied``) with
the token id, never the token (``_access``).

The sessions shown and killed come from a ``SessionSource`` (``_sources``): the runtime
the control plane is mounted in, or a whole fleet (``_fleet_source``). Request bodies and
parameters are read by ``_http``; the audit endpoints are ``_audit_api``; the routes and
the outermost ASGI layer are assembled in ``_routes``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from starlette.responses import HTMLResponse, Response, StreamingResponse

from kill_switch._vocabulary._audit_event import (
    CONTROL_TOKEN_REVOKED,
    INTERRUPT_REQUESTED,
    SESSION_FINISHED,
    SESSION_STARTED,
    AuditEvent,
    DurableAuditSink,
)
from kill_switch._vocabulary._selector import Selector

from ._access import Access
from ._audit_api import AuditApi
from ._auth import FailureLimiter, TokenStore
from ._config import ControlConfig, ControlOptions, resolve
from ._events import Broker, Handoff
from ._http import (
    Refused,
    checked_text,
    count_param,
    flag,
    json_body,
    json_response,
    known_keys,
    label_filter,
    read_json,
    reason_of,
)
from ._inventory import RECENT, STOPPED_LIMIT, Book, Entry, Query, jsonable
from ._metrics import Metrics
from ._sources import LocalSource, SessionSource

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Mapping
    from typing import Unpack

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from starlette.applications import Starlette
    from starlette.requests import Request

    from kill_switch._runtime import Runtime
    from kill_switch._session import Session


def _csp(page: str) -> str:
    hashes = {"script": [], "style": []}  # type: dict[str, list[str]]
    for tag in hashes:
        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S):
            digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
            hashes[tag].append(f"'sha256-{digest}'")
    return (
        "default-src 'none'; "
        f"script-src {' '.join(hashes['script']) or chr(39) + 'none' + chr(39)}; "
        f"style-src {' '.join(hashes['style']) or chr(39) + 'none' + chr(39)}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


class ControlApp:
    """The control plane's state, shared by its handlers (control loop only).

    Args:
        runtime: the entered runtime the control plane is mounted in: it records the
            control plane's own audit events (refusals, revocations), and is the source
            of sessions unless *source* is given.
        tokens: the token store.
        config: the options (``ControlConfig``); or give them as keywords.
        source: where the sessions shown and killed come from (default: *runtime*;
            ``FleetSource(fleet)``: every runtime of a fleet).

    Raises:
        TypeError / ValueError: a bad option, or both *config* and keyword options.
    """

    def __init__(
        self,
        runtime: Runtime,
        tokens: TokenStore,
        config: ControlConfig | None = None,
        *,
        source: SessionSource | None = None,
        **options: Unpack[ControlOptions],
    ) -> None:
        self.config = config = resolve(config, options)
        self.runtime = runtime
        self.tokens = tokens
        self.limiter = config.limiter if config.limiter is not None else FailureLimiter()
        self.kill_timeout = config.kill_timeout
        audit_path, anchor_path = config.audit_path, config.anchor_path
        sink = runtime.audit
        if audit_path is None and isinstance(sink, DurableAuditSink):
            audit_path = sink.path
            anchor_path = sink.anchor_path
        self.audit_kind = (
            "sqlite" if audit_path else ("none" if sink is None else type(sink).__name__)
        )
        self.book = Book()
        self.broker = Broker()
        #: Connection counters (``open``, ``evicted``, ``header_timeouts``) for
        #: ``/metrics``, set by the server that serves this application.
        self.connections: Callable[[], Mapping[str, int]] | None = None
        self.metrics = Metrics()
        #: Why the application did not start (a fleet source that cannot reach Redis).
        self.startup_error: Exception | None = None
        self.local = LocalSource(runtime, self.book, self.metrics, self._stopped, self.kill_timeout)
        self.source: SessionSource = source if source is not None else self.local
        self.access = Access(tokens, self.limiter, self.metrics, runtime.record, self._known)
        self.audit_api = AuditApi(self.access, audit_path, anchor_path)
        # Sessions whose stop to follow: a plain loop callback cannot start a task in a
        # task group, so it hands them to a task that can (set while serving).
        self._follow_send: MemoryObjectSendStream[Session] | None = None
        page = resources.files(__package__).joinpath("dashboard.html").read_text("utf-8")
        self.page = page
        self.page_csp = _csp(page)

    def _known(self, session_id: str) -> bool:
        return self.runtime.get(session_id) is not None or self.book.get(session_id) is not None

    # ------------------------------------------------------------- lifespan

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        """Follow the runtime's events, and hold the source open, while the server runs.

        Raises:
            FleetUnavailable: a fleet source cannot reach Redis (the server does not start).
        """
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.source.running())
            except Exception as exc:
                self.startup_error = exc  # ControlServer.start reports it
                raise
            handoff: Handoff[tuple[AuditEvent, Session | None]] = Handoff(
                asyncio.get_running_loop(), self._on_events
            )
            runtime = self.runtime

            def listener(event: AuditEvent) -> None:
                # Any thread, synchronously inside the recorder: cheap and never raising.
                session = (
                    runtime.get(event.session_id)
                    if event.session_id and event.kind in (SESSION_STARTED, INTERRUPT_REQUESTED)
                    else None
                )
                handoff.put((event, session))

            for info in runtime.sessions():
                self.book.seen(info)
            send, receive = anyio.create_memory_object_stream["Session"](1000)
            self._follow_send = send
            remove = runtime.add_listener(listener)
            self.local.catch_up = handoff.catch_up
            try:
                async with send, anyio.create_task_group() as tg:
                    tg.start_soon(self._follow, tg, receive)
                    try:
                        yield
                    finally:
                        self.broker.close()
                        tg.cancel_scope.cancel()
            finally:
                remove()
                self.local.catch_up = lambda: None
                self._follow_send = None

    def _on_events(self, burst: list[tuple[AuditEvent, Session | None]]) -> None:
        for event, session in burst:
            self._on_event(event, session)

    def _on_event(self, event: AuditEvent, session: Session | None) -> None:
        data = jsonable(event)
        self.broker.publish("audit", data)
        kind = event.kind
        if kind == INTERRUPT_REQUESTED:
            self.metrics.interrupts[event.trigger or "unknown"] += 1
        if session is not None:
            self.book.seen(session.info())
            if kind == INTERRUPT_REQUESTED and self._follow_send is not None:
                with contextlib.suppress(
                    anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError
                ):
                    self._follow_send.send_nowait(session)
        elif kind == SESSION_FINISHED and event.session_id:
            self.book.ended(event.session_id, str(event.details.get("state", "")))
            self.broker.publish("session", {"session_id": event.session_id})

    async def _follow(
        self, tg: anyio.abc.TaskGroup, receive: MemoryObjectReceiveStream[Session]
    ) -> None:
        async with receive:
            async for session in receive:
                tg.start_soon(self._watch, session)

    async def _watch(self, session: Session) -> None:
        with anyio.move_on_after(self.local.stop_wait(session) + 5.0):
            report = await session.handle
            self._stopped(session, report)

    def _stopped(self, session: Session, report: Any) -> Entry:
        known = self.book.get(session.id)
        if known is not None and known.report is report:
            return known
        entry = self.book.stopped(session.info(), report)
        self.metrics.kill_latency.observe(report.latency.total)
        self.metrics.report_audit[report.audit] += 1
        self.broker.publish("report", {"session_id": session.id, "report": jsonable(report)})
        return entry

    # ------------------------------------------------------------- handlers

    async def index(self, request: Request) -> Response:
        """The dashboard (no data in it; it reads the API with the token the user gives)."""
        return HTMLResponse(self.page, headers={"Content-Security-Policy": self.page_csp})

    async def healthz(self, request: Request) -> Response:
        """Liveness: the control loop answers."""
        return json_response({"ok": True, "sessions": len(self.runtime.sessions())})

    async def whoami(self, request: Request) -> Response:
        """The caller's token id and role, and what the inventory spans."""
        principal = self.access.require(request, "viewer")
        return json_response(
            {"token_id": principal.token_id, "role": principal.role, "scope": self.source.scope}
        )

    async def list_sessions(self, request: Request) -> Response:
        """The inventory, filtered by ``agent``, ``label=k=v`` (repeatable) and ``state``:
        every live session and the newest ``stopped_limit`` stopped ones (older ones by
        ``stopped_before``, the ``stopped_next`` of the previous answer)."""
        self.access.require(request, "viewer")
        params = request.query_params
        limit = count_param(request, "stopped_limit", RECENT)
        query = Query(
            agent=params.get("agent"),
            state=params.get("state"),
            labels=label_filter(params.getlist("label")),
            stopped_limit=STOPPED_LIMIT if limit is None else limit,
            stopped_before=count_param(request, "stopped_before"),
        )
        return json_body((await self.source.page(query)).body())

    async def get_session(self, request: Request) -> Response:
        """One session, with tool calls in flight, processes, threads and budget use."""
        self.access.require(request, "viewer")
        out = await self.source.session(request.path_params["session_id"])
        if out is None:
            raise Refused(404, "no such session")
        return json_response(out)

    async def kill(self, request: Request) -> Response:
        """Interrupt one session (trigger ``operator``); its StopReport once quiescent."""
        principal = self.access.require(request, "operator")
        wait = flag(request, "wait", True)
        data = await read_json(request)
        known_keys(data, "reason")
        reason = reason_of(data)
        status, out = await self.source.kill(
            request.path_params["session_id"],
            reason=reason,
            operator=principal.token_id,
            wait=wait,
        )
        return json_response(out, status)

    async def kill_many(self, request: Request) -> Response:
        """Interrupt every session matching ``agent`` / ``labels``, or ``all``."""
        principal = self.access.require(request, "operator")
        wait = flag(request, "wait", True)
        data = await read_json(request)
        known_keys(data, "reason", "agent", "labels", "all")
        reason = reason_of(data)
        agent = data.get("agent")
        labels = data.get("labels")
        everything = data.get("all", False)
        if agent is not None and not isinstance(agent, str):
            raise Refused(400, "'agent' must be a string")
        if labels is not None and (
            not isinstance(labels, dict)
            or len(labels) > 64
            or not all(isinstance(v, str) for v in labels.values())
        ):
            raise Refused(400, "'labels' must be an object of at most 64 strings")
        if not isinstance(everything, bool):
            raise Refused(400, "'all' must be true or false")
        for text in [agent or "", *(labels or {}).keys(), *(labels or {}).values()]:
            checked_text("'agent' or 'labels'", text)
        if everything == (agent is not None or bool(labels)):
            raise Refused(400, "give either 'all': true or a selector ('agent', 'labels')")
        status, out = await self.source.kill_where(
            Selector(agent, labels or {}, everything),
            reason=reason,
            operator=principal.token_id,
            wait=wait,
        )
        return json_response(out, status)

    async def forbidden(self, request: Request) -> Response:
        """Resume, instruct, re-prompt, reconfigure: no role may (terminated is terminal)."""
        principal = self.access.authenticate(request)
        self.access.deny(
            request,
            principal,
            "the control plane can stop agents, never resume, instruct or reconfigure them",
        )
        raise AssertionError("unreachable")  # deny() always raises

    async def not_found(self, request: Request) -> Response:
        """Unknown API path (after authentication: nothing is probed without a token)."""
        self.access.authenticate(request)
        raise Refused(404, "no such endpoint")

    async def events(self, request: Request) -> Response:
        """Server-sent events: every audit event (``audit``), stop reports (``report``),
        sessions that ended (``session``), and ``dropped`` when this client lagged."""
        principal = self.access.require(request, "viewer")
        if self.broker.full():
            raise Refused(503, "too many event streams open")
        if self.broker.full_for(principal.token_id):
            raise Refused(
                429, f"this token holds {self.broker.max_per_token} event streams already"
            )
        return StreamingResponse(
            self.broker.stream(principal.token_id, lambda: self.tokens.is_active(principal)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def metrics_text(self, request: Request) -> Response:
        """Prometheus text exposition."""
        self.access.require(request, "viewer")
        states = await self.source.states()
        text = self.metrics.render(
            sessions=states,
            audit_kind=self.audit_kind,
            audit_ok=self.audit_api.last_verify,
            events_published=self.broker.published,
            events_dropped=self.broker.dropped,
            event_clients=self.broker.clients,
            connections=self.connections() if self.connections is not None else None,
        )
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def list_tokens(self, request: Request) -> Response:
        """Token ids and roles (admin; never hashes)."""
        self.access.require(request, "admin")
        return json_response(
            {"tokens": [{"token_id": e.token_id, "role": e.role} for e in self.tokens.entries()]}
        )

    async def revoke_token(self, request: Request) -> Response:
        """Revoke a token for this server's lifetime (admin; audited)."""
        principal = self.access.require(request, "admin")
        token_id = request.path_params["token_id"]
        if not self.tokens.revoke(token_id):
            raise Refused(404, "no such active token")
        self.broker.revoke(token_id)
        self.runtime.record(
            AuditEvent(
                CONTROL_TOKEN_REVOKED,
                None,
                operator=principal.token_id,
                details={"token_id": token_id},
            )
        )
        return json_response({"revoked": token_id})
