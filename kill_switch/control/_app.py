"""The control plane's Starlette application: inventory, kill, audit, events, metrics.

Privileges (see ``kill_switch.control``'s docstring for the full table): ``viewer`` reads,
``operator`` reads and kills, ``admin`` also lists and revokes tokens. Nothing here can
resume, instruct, re-prompt or reconfigure an agent: those paths answer 403 to every
role, and every refusal of an authenticated caller is audited (``control_denied``) with
the token id, never the token.

Hostile input never reaches a parser unbounded: bodies are capped while they are read
(413), only ``application/json`` is parsed (415), JSON must be a small object with no
duplicate keys (400), and every answer to a bad request is a 4xx.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import sqlite3
import time
from collections import Counter
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from kill_switch._audit._query import AuditLog
from kill_switch._vocabulary._audit_event import (
    CONTROL_DENIED,
    CONTROL_TOKEN_REVOKED,
    INTERRUPT_REQUESTED,
    SESSION_FINISHED,
    SESSION_STARTED,
    AuditEvent,
    DurableAuditSink,
)
from kill_switch._vocabulary._triggers import MAX_REASON

from ._auth import BadCredentials, FailureLimiter, Principal, Role, TokenStore, allows, bearer_token
from ._events import Broker
from ._inventory import Book, Entry, jsonable, live_detail
from ._metrics import Metrics

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from starlette.requests import Request
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from kill_switch._audit._query import VerifyResult
    from kill_switch._runtime import Runtime
    from kill_switch._session import Session

log = logging.getLogger("kill_switch.control")

#: Largest request body read, in bytes; longer ones are refused (413) while reading.
MAX_BODY: Final = 16 * 1024
#: Largest request header block, in bytes (431 beyond it).
MAX_HEADER_BLOCK: Final = 16 * 1024
#: Host names a request may address by default (DNS rebinding: a web page's own name
#: resolving to 127.0.0.1 is refused); ``allowed_hosts`` adds others.
LOOPBACK_HOSTS: Final = ("127.0.0.1", "localhost", "[::1]")
#: Seconds a request body may take to arrive (a slow body holds a connection, not a kill).
BODY_TIMEOUT: Final = 10.0
#: Seconds a session's detail waits for the agent's loop to answer.
DETAIL_TIMEOUT: Final = 0.25
#: Audit rows per page, at most.
MAX_PAGE: Final = 1000
#: Paths that would make an agent act differently: refused to every role (403).
FORBIDDEN_ACTIONS: Final = frozenset(
    {"resume", "config", "configure", "budgets", "limits", "tools", "prompt", "instruct"}
)
#: Characters of a refused request's path written to the audit log.
MAX_AUDITED_PATH: Final = 200

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Refused(Exception):
    """Answer the request with *status* and a JSON error message."""

    def __init__(
        self, status: int, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def escape(text: str, limit: int = 300) -> str:
    """*text* safe for one log line: JSON-escaped (no newlines, no controls), bounded."""
    return json.dumps(text[:limit], ensure_ascii=True)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return _json({"error": {"status": status, "message": message}}, status, headers)


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    # ensure_ascii: a lone surrogate (a tool name from a model's JSON, a reason given
    # through the Python API) is written as a \udXXX escape instead of failing to encode
    # as UTF-8, which made every later inventory read a 500.
    body = json.dumps(jsonable(data), ensure_ascii=True, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _text(name: str, value: str) -> str:
    """*value* if it is encodable text, else a 400 (a lone surrogate is not Unicode text)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(400, f"{name} is not valid Unicode text (a lone surrogate)") from None
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object, read with every bound checked first.

    Raises:
        Refused: 415 not JSON, 413 too large, 400 malformed.
    """
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise Refused(415, "Content-Type must be application/json")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise Refused(400, "bad Content-Length")
        if int(length) > MAX_BODY:
            raise Refused(413, f"body larger than {MAX_BODY} bytes")
    body = bytearray()
    with anyio.move_on_after(BODY_TIMEOUT) as scope:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise Refused(413, f"body larger than {MAX_BODY} bytes")
    if scope.cancelled_caught:
        raise Refused(408, f"body not received within {BODY_TIMEOUT:g} s")
    if not body:
        return {}
    try:
        data = json.loads(
            bytes(body).decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Refused(400, f"invalid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise Refused(400, "the body must be a JSON object")
    return data


def _known(data: Mapping[str, Any], *keys: str) -> None:
    """Refuse a key that is not one of *keys*: a typo (``label``) must not widen a kill."""
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise Refused(400, f"unknown key {unknown[0]!r}; expected {', '.join(map(repr, keys))}")


def _reason(data: Mapping[str, Any]) -> str:
    reason = data.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise Refused(400, "'reason' must be a non-empty string")
    if len(reason) > MAX_REASON:
        raise Refused(400, f"'reason' longer than {MAX_REASON} characters")
    return _text("'reason'", reason)


def _flag(request: Request, name: str, default: bool) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise Refused(400, f"?{name}= must be true or false")


def _label_filter(raw: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Refused(400, "label filters are ?label=key=value")
        out[key] = value
    return out


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
    """The control plane's state, shared by its handlers (control loop only)."""

    def __init__(
        self,
        runtime: Runtime,
        tokens: TokenStore,
        *,
        audit_path: str | None = None,
        anchor_path: str | None = None,
        limiter: FailureLimiter | None = None,
        kill_timeout: float | None = None,
    ) -> None:
        self.runtime = runtime
        self.tokens = tokens
        self.limiter = limiter if limiter is not None else FailureLimiter()
        self.kill_timeout = kill_timeout
        sink = runtime.audit
        if audit_path is None and isinstance(sink, DurableAuditSink):
            audit_path = sink.path
            anchor_path = sink.anchor_path
        self.audit_path = audit_path
        self.anchor_path = anchor_path
        self.audit_kind = (
            "sqlite" if audit_path else ("none" if sink is None else type(sink).__name__)
        )
        self.last_verify: bool | None = None
        self.book = Book()
        self.broker = Broker()
        #: Connection counters (``open``, ``evicted``, ``header_timeouts``) for
        #: ``/metrics``, set by the server that serves this application.
        self.connections: Callable[[], Mapping[str, int]] | None = None
        self.metrics = Metrics()
        # Sessions whose stop to follow: a plain loop callback cannot start a task in a
        # task group, so it hands them to a task that can (set while serving).
        self._follow_send: MemoryObjectSendStream[Session] | None = None
        page = resources.files(__package__).joinpath("dashboard.html").read_text("utf-8")
        self.page = page
        self.page_csp = _csp(page)

    # ------------------------------------------------------------- lifespan

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        """Follow the runtime's events while the server runs."""
        loop = asyncio.get_running_loop()
        runtime = self.runtime

        def listener(event: AuditEvent) -> None:
            # Any thread, synchronously inside the recorder: cheap and never raising.
            session = (
                runtime.get(event.session_id)
                if event.session_id and event.kind in (SESSION_STARTED, INTERRUPT_REQUESTED)
                else None
            )
            with contextlib.suppress(RuntimeError):  # the control loop is closed
                loop.call_soon_threadsafe(self._on_event, event, session)

        for info in runtime.sessions():
            self.book.seen(info)
        send, receive = anyio.create_memory_object_stream["Session"](1000)
        self._follow_send = send
        remove = runtime.add_listener(listener)
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
            self._follow_send = None

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

    def _stop_wait(self, session: Session) -> float:
        if self.kill_timeout is not None:
            return self.kill_timeout
        return float(session.policy.stop_timeout) + float(session.policy.audit_timeout) + 1.0

    async def _follow(
        self, tg: anyio.abc.TaskGroup, receive: MemoryObjectReceiveStream[Session]
    ) -> None:
        async with receive:
            async for session in receive:
                tg.start_soon(self._watch, session)

    async def _watch(self, session: Session) -> None:
        with anyio.move_on_after(self._stop_wait(session) + 5.0):
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

    # ------------------------------------------------------------- auth

    def _audit_denial(
        self, request: Request, status: int, why: str, principal: Principal | None
    ) -> None:
        # A denial joins a session's trail only when an authenticated caller names a
        # session that exists: an unauthenticated URL (or a made-up id) is attacker
        # text, and the path recorded is bounded.
        session_id = request.path_params.get("session_id")
        if not (
            principal is not None
            and isinstance(session_id, str)
            and (self.runtime.get(session_id) is not None or self.book.get(session_id))
        ):
            session_id = None
        self.runtime.record(
            AuditEvent(
                CONTROL_DENIED,
                session_id,
                operator=principal.token_id if principal else None,
                reason=why[:MAX_REASON],
                details={
                    "status": status,
                    "method": request.method,
                    "path": request.url.path[:MAX_AUDITED_PATH],
                    "role": principal.role if principal else None,
                    "client": request.client.host if request.client else None,
                },
            )
        )
        log.warning(
            "denied %s %s %s: %s",
            status,
            request.method,
            escape(request.url.path),
            escape(why),
        )

    def over_budget(self, scope: Scope) -> int:
        """Seconds to tell a client over its failure budget whose credentials fail, else
        0 (a valid token, or a client with budget left, goes on to the handler)."""
        client = scope.get("client")
        host = client[0] if client else "?"
        if not self.limiter.blocked(host):
            return 0
        try:
            if self.tokens.authenticate(bearer_token(scope["headers"])) is not None:
                return 0
        except BadCredentials:
            pass
        wait = self.limiter.retry_after(host)
        if wait <= 0:
            return 0  # the budget refilled meanwhile: the handler counts and audits it
        self.metrics.rate_limited += 1
        return max(1, int(wait + 0.999))

    def authenticate(self, request: Request) -> Principal:
        """The caller, from its bearer token.

        Raises:
            Refused: 401 / 400 bad credentials, 429 a client over its failure budget.
        """
        try:
            token = bearer_token(request.scope["headers"])
            principal = self.tokens.authenticate(token)
            if principal is None:
                raise BadCredentials("unknown or revoked token")
        except BadCredentials as exc:
            client = request.client.host if request.client else "?"
            wait = self.limiter.retry_after(client)
            if wait > 0:
                self.metrics.rate_limited += 1
                raise Refused(
                    429,
                    "too many failed authentications; retry later",
                    headers={"Retry-After": str(max(1, int(wait + 0.999)))},
                ) from None
            self.metrics.auth_failures += 1
            self._audit_denial(request, exc.status, str(exc), None)
            raise Refused(
                exc.status, str(exc), headers={"WWW-Authenticate": 'Bearer realm="kill_switch"'}
            ) from None
        return principal

    def require(self, request: Request, role: Role) -> Principal:
        """Authenticate, then check *role*.

        Raises:
            Refused: as ``authenticate``, or 403 (audited) for a role too small.
        """
        principal = self.authenticate(request)
        if not allows(principal.role, role):
            self.deny(request, principal, f"role {principal.role} may not do this ({role} needed)")
        return principal

    def deny(self, request: Request, principal: Principal, why: str) -> None:
        """Refuse with 403 and audit it.

        Raises:
            Refused: always.
        """
        self.metrics.denied[principal.role] += 1
        self._audit_denial(request, 403, why, principal)
        raise Refused(403, why)

    # ------------------------------------------------------------- handlers

    def _live(self) -> list[Entry]:
        live = {}
        for info in self.runtime.sessions():
            self.book.seen(info)
            live[info.session_id] = True
        out = []
        for entry in self.book.entries():
            if entry.info.session_id in live or entry.info.state not in ("running", "created"):
                out.append(entry)
            # a "running" entry no longer live and without report: it ended unseen
        return out

    async def index(self, request: Request) -> Response:
        """The dashboard (no data in it; it reads the API with the token the user gives)."""
        return HTMLResponse(self.page, headers={"Content-Security-Policy": self.page_csp})

    async def healthz(self, request: Request) -> Response:
        """Liveness: the control loop answers."""
        return _json({"ok": True, "sessions": len(self.runtime.sessions())})

    async def whoami(self, request: Request) -> Response:
        """The caller's token id and role."""
        principal = self.require(request, "viewer")
        return _json({"token_id": principal.token_id, "role": principal.role})

    async def list_sessions(self, request: Request) -> Response:
        """The inventory, filtered by ``agent``, ``label=k=v`` (repeatable) and ``state``."""
        self.require(request, "viewer")
        agent = request.query_params.get("agent")
        state = request.query_params.get("state")
        labels = _label_filter(request.query_params.getlist("label"))
        rows = [
            e.to_json()
            for e in self._live()
            if (agent is None or e.info.agent == agent)
            and (state is None or e.info.state == state)
            and all(e.info.labels.get(k) == v for k, v in labels.items())
        ]
        return _json({"sessions": rows, "count": len(rows)})

    async def get_session(self, request: Request) -> Response:
        """One session, with tool calls in flight, processes, threads and budget use."""
        self.require(request, "viewer")
        session_id = request.path_params["session_id"]
        session = self.runtime.get(session_id)
        if session is None:
            entry = self.book.get(session_id)
            if entry is None:
                raise Refused(404, "no such session")
            out = entry.to_json()
            out["live"] = None
            return _json(out)
        info = session.info()
        self.book.seen(info)
        entry = self.book.get(session_id)
        out = entry.to_json() if entry is not None else Entry(info).to_json()
        try:
            detail = await live_detail(session, DETAIL_TIMEOUT)
        except Exception as exc:  # a plane changed under a racing stop: say so, don't 500
            detail = None
            out["live_error"] = repr(exc)[:200]
        out["live"] = detail
        if detail is None and "live_error" not in out:
            out["live_error"] = (
                f"the agent's event loop did not answer within {DETAIL_TIMEOUT} s (blocked?)"
            )
        out["budget"] = {
            "actions": info.actions,
            "cost": info.cost,
            "ledger": detail.get("budget") if detail is not None else None,
        }
        return _json(out)

    async def _kill_one(
        self, session: Session, reason: str, principal: Principal, wait: bool, started: float
    ) -> tuple[int, dict[str, Any]]:
        handle = session.interrupt(reason, trigger="operator", operator=principal.token_id)
        log.info(
            "kill session=%s by=%s reason=%s",
            escape(session.id),
            escape(principal.token_id),
            escape(reason),
        )
        out: dict[str, Any] = {
            "session_id": session.id,
            "interrupt_id": handle.interrupt_id,
            "status": "interrupting",
            "report": None,
        }
        if not wait:
            return 202, out
        report = None
        with anyio.move_on_after(self._stop_wait(session)):
            report = await handle
        if report is None:
            out["status"] = "pending"
            return 202, out
        self._stopped(session, report)
        self.metrics.http_kill_latency.observe(time.monotonic() - started)
        out["status"] = report.outcome
        out["report"] = jsonable(report)
        return 200, out

    async def kill(self, request: Request) -> Response:
        """Interrupt one session (trigger ``operator``); its StopReport once quiescent."""
        started = time.monotonic()
        principal = self.require(request, "operator")
        wait = _flag(request, "wait", True)
        data = await read_json(request)
        _known(data, "reason")
        reason = _reason(data)
        session_id = request.path_params["session_id"]
        session = self.runtime.get(session_id)
        if session is None:
            entry = self.book.get(session_id)
            if entry is not None and entry.report is not None:
                report = entry.report
                return _json(
                    {
                        "session_id": session_id,
                        "interrupt_id": report.interrupt_id,
                        "status": report.outcome,
                        "report": jsonable(report),
                    }
                )
            if entry is not None:
                raise Refused(409, f"session already {entry.info.state}; nothing to stop")
            raise Refused(404, "no such session")
        status, out = await self._kill_one(session, reason, principal, wait, started)
        return _json(out, status)

    async def kill_many(self, request: Request) -> Response:
        """Interrupt every session matching ``agent`` / ``labels``, or ``all``."""
        started = time.monotonic()
        principal = self.require(request, "operator")
        wait = _flag(request, "wait", True)
        data = await read_json(request)
        _known(data, "reason", "agent", "labels", "all")
        reason = _reason(data)
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
            _text("'agent' or 'labels'", text)
        if everything == (agent is not None or bool(labels)):
            raise Refused(400, "give either 'all': true or a selector ('agent', 'labels')")
        targets = [
            s
            for s in (self.runtime.get(i.session_id) for i in self.runtime.sessions())
            if s is not None
            and (agent is None or s.agent == agent)
            and all(s.labels.get(k) == v for k, v in (labels or {}).items())
        ]
        results: list[dict[str, Any]] = [{} for _ in targets]

        async def one(i: int, session: Session) -> None:
            _, results[i] = await self._kill_one(session, reason, principal, wait, started)

        async with anyio.create_task_group() as tg:
            for i, session in enumerate(targets):
                tg.start_soon(one, i, session)
        return _json({"results": results, "count": len(results)})

    async def forbidden(self, request: Request) -> Response:
        """Resume, instruct, re-prompt, reconfigure: no role may (terminated is terminal)."""
        principal = self.authenticate(request)
        self.deny(
            request,
            principal,
            "the control plane can stop agents, never resume, instruct or reconfigure them",
        )
        raise AssertionError("unreachable")  # deny() always raises

    async def not_found(self, request: Request) -> Response:
        """Unknown API path (after authentication: nothing is probed without a token)."""
        self.authenticate(request)
        raise Refused(404, "no such endpoint")

    def _audit_file(self) -> str:
        if not self.audit_path:
            raise Refused(
                404,
                "this runtime has no SQLite audit log (Runtime(audit='file.db') enables it)",
            )
        return self.audit_path

    async def audit(self, request: Request) -> Response:
        """Audit rows: filters ``session``, ``interrupt``, ``trigger``, ``kind``,
        ``since``/``until`` (epoch), paging by ``after``/``before`` (seq) and ``limit``,
        ``order=asc|desc``."""
        self.require(request, "viewer")
        path = self._audit_file()
        q = request.query_params

        def num(name: str, kind: type[float] | type[int]) -> Any:
            raw = q.get(name)
            if raw is None:
                return None
            try:
                value = kind(raw)
            except ValueError:
                raise Refused(400, f"?{name}= must be a number") from None
            if isinstance(value, float) and value != value:
                raise Refused(400, f"?{name}= must be a number")
            if isinstance(value, int) and not -(2**63) <= value < 2**63:
                raise Refused(400, f"?{name}= is out of range (a 64-bit integer)")
            return value

        limit = num("limit", int)
        limit = 100 if limit is None else limit
        if not 1 <= limit <= MAX_PAGE:
            raise Refused(400, f"?limit= must be within 1..{MAX_PAGE}")
        order = q.get("order", "asc")
        if order not in ("asc", "desc"):
            raise Refused(400, "?order= must be asc or desc")
        filters = {
            "session_id": q.get("session"),
            "interrupt_id": q.get("interrupt"),
            "trigger": q.get("trigger"),
            "kind": q.get("kind"),
            "since": num("since", float),
            "until": num("until", float),
        }
        after, before = num("after", int), num("before", int)

        def query() -> list[Any]:
            with AuditLog(path, spool=None) as log:
                page = log.page(
                    **filters,
                    after=after,
                    before=before,
                    order="desc" if order == "desc" else "asc",
                    limit=limit,
                )
            return [r.to_json() for r in page]

        try:
            rows = await anyio.to_thread.run_sync(query)
        except sqlite3.Error as exc:
            raise Refused(503, f"the audit log cannot be read now: {exc}") from None
        return _json({"events": rows, "count": len(rows), "limit": limit})

    async def audit_verify(self, request: Request) -> Response:
        """The hash chain and anchored head, checked now."""
        self.require(request, "viewer")
        path = self._audit_file()
        from kill_switch._audit._query import verify

        def check() -> VerifyResult:
            return verify(path, anchor=self.anchor_path)

        try:
            result = await anyio.to_thread.run_sync(check)
        except sqlite3.Error as exc:
            raise Refused(503, f"the audit log cannot be read now: {exc}") from None
        self.last_verify = result.ok
        out = jsonable(result)
        out["summary"] = result.summary()
        return _json(out)

    async def events(self, request: Request) -> Response:
        """Server-sent events: every audit event (``audit``), stop reports (``report``),
        sessions that ended (``session``), and ``dropped`` when this client lagged."""
        principal = self.require(request, "viewer")
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
        self.require(request, "viewer")
        states: Counter[str] = Counter(e.info.state for e in self._live())
        text = self.metrics.render(
            sessions=states,
            audit_kind=self.audit_kind,
            audit_ok=self.last_verify,
            events_published=self.broker.published,
            events_dropped=self.broker.dropped,
            event_clients=self.broker.clients,
            connections=self.connections() if self.connections is not None else None,
        )
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def list_tokens(self, request: Request) -> Response:
        """Token ids and roles (admin; never hashes)."""
        self.require(request, "admin")
        return _json(
            {"tokens": [{"token_id": e.token_id, "role": e.role} for e in self.tokens.entries()]}
        )

    async def revoke_token(self, request: Request) -> Response:
        """Revoke a token for this server's lifetime (admin; audited)."""
        principal = self.require(request, "admin")
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
        return _json({"revoked": token_id})


ALL_METHODS: Final = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]


def _handler(
    fn: Callable[[Request], Awaitable[Response]], method: str | None = None
) -> Callable[[Request], Awaitable[Response]]:
    allowed = {method, "HEAD"} if method == "GET" else {method}

    async def run(request: Request) -> Response:
        try:
            if method is not None and request.method not in allowed:
                # Before authentication: the method is wrong whoever asks.
                raise Refused(405, f"use {method}", headers={"Allow": method})
            response = await fn(request)
        except Refused as exc:
            response = _error(exc.status, exc.message, exc.headers)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


class _Guard:
    """Outermost ASGI layer: refuses cross-site state changes, sets security headers,
    and turns a bug into a logged 500 rather than a dropped connection."""

    def __init__(self, app: ASGIApp, state: ControlApp | None = None) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapped(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        malformed = _malformed(scope)
        if malformed is not None:
            status, why = malformed
            await _error(status, why, {"Connection": "close"})(scope, receive, send_wrapped)
            return
        refusal = _cross_site(scope)
        if refusal is not None:
            await _error(403, refusal)(scope, receive, send_wrapped)
            return
        if self.state is not None:
            wait = self.state.over_budget(scope)
            if wait:
                # A client over its failure budget is answered here, before routing: a
                # flood of bad tokens then costs the control loop as little as it can,
                # which is what an operator's kill competes with.
                await _error(
                    429,
                    "too many failed authentications; retry later",
                    {"Retry-After": str(wait), "Cache-Control": "no-store"},
                )(scope, receive, send_wrapped)
                return
        try:
            await self.app(scope, receive, send_wrapped)
        except Exception:  # last resort: a bug must not look like a network failure
            log.exception("internal error on %s", escape(str(scope.get("path", ""))))
            if not started:
                await _error(500, "internal error")(scope, receive, send_wrapped)


def _malformed(scope: Scope) -> tuple[int, str] | None:
    """The status and reason to refuse a request h11 let through, or ``None``; the
    connection is then closed (the request's framing cannot be trusted).

    * A header block over ``MAX_HEADER_BLOCK``: h11 bounds only a head that arrives in
      pieces (``h11_max_incomplete_event_size``); one read can deliver a larger one whole.
    * ``Content-Length`` together with ``Transfer-Encoding``: the request smuggling
      pattern (RFC 9112 6.3 allows closing the connection).
    * An encoded slash (``%2F``) in the path: the server decodes it before routing, so
      ``a%2Fb`` would route as two segments.
    """
    size = 0
    framing = set()
    for k, v in scope["headers"]:
        size += len(k) + len(v) + 4
        name = k.lower()
        if name in (b"content-length", b"transfer-encoding"):
            framing.add(name)
    if size > MAX_HEADER_BLOCK:
        return 431, f"request header block larger than {MAX_HEADER_BLOCK} bytes"
    if len(framing) == 2:
        return 400, "Content-Length together with Transfer-Encoding"
    if b"%2f" in bytes(scope.get("raw_path") or b"").lower():
        return 400, "an encoded slash (%2F) in the path"
    return None


def _cross_site(scope: Scope) -> str | None:
    """Why a state-changing request is refused as cross-site, or ``None``.

    No cookie is ever set or read, so a forged request carries no credentials anyway;
    this is defence in depth for browsers that send ``Origin`` / ``Sec-Fetch-Site``.
    """
    if scope["method"] in ("GET", "HEAD"):
        return None
    origin = host = site = None
    for k, v in scope["headers"]:
        name = k.lower()
        if name == b"origin":
            origin = v
        elif name == b"host":
            host = v
        elif name == b"sec-fetch-site":
            site = v
    if site is not None and site.lower() not in (b"same-origin", b"none"):
        return "cross-site request refused"
    if origin is not None:
        bare = origin.split(b"://", 1)[-1]
        if origin == b"null" or host is None or bare.lower() != host.lower():
            return "cross-origin request refused"
    return None


def create_app(
    runtime: Runtime,
    tokens: TokenStore,
    *,
    audit_path: str | None = None,
    anchor_path: str | None = None,
    limiter: FailureLimiter | None = None,
    kill_timeout: float | None = None,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
) -> tuple[ASGIApp, ControlApp]:
    """The ASGI application of the control plane for *runtime*, and its state.

    A request whose ``Host`` is not in *allowed_hosts* (port ignored; ``*.example.com``
    patterns as Starlette's ``TrustedHostMiddleware``) is refused with 400.
    """
    state = ControlApp(
        runtime,
        tokens,
        audit_path=audit_path,
        anchor_path=anchor_path,
        limiter=limiter,
        kill_timeout=kill_timeout,
    )
    h = _handler
    forbidden = ALL_METHODS
    routes = [
        Route("/", h(state.index, "GET"), methods=ALL_METHODS),
        Route("/healthz", h(state.healthz, "GET"), methods=ALL_METHODS),
        Route("/metrics", h(state.metrics_text, "GET"), methods=ALL_METHODS),
        Route("/api/whoami", h(state.whoami, "GET"), methods=ALL_METHODS),
        Route("/api/sessions", h(state.list_sessions, "GET"), methods=ALL_METHODS),
        Route("/api/sessions/{session_id}", h(state.get_session, "GET"), methods=ALL_METHODS),
        Route("/api/sessions/{session_id}/kill", h(state.kill, "POST"), methods=ALL_METHODS),
        Route("/api/kill", h(state.kill_many, "POST"), methods=ALL_METHODS),
        Route("/api/audit", h(state.audit, "GET"), methods=ALL_METHODS),
        Route("/api/audit/verify", h(state.audit_verify, "GET"), methods=ALL_METHODS),
        Route("/api/events", h(state.events, "GET"), methods=ALL_METHODS),
        Route("/api/tokens", h(state.list_tokens, "GET"), methods=ALL_METHODS),
        Route("/api/tokens/{token_id}/revoke", h(state.revoke_token, "POST"), methods=ALL_METHODS),
    ]
    for action in sorted(FORBIDDEN_ACTIONS):
        routes.append(Route(f"/api/{action}", h(state.forbidden), methods=forbidden))
        routes.append(
            Route(f"/api/sessions/{{session_id}}/{action}", h(state.forbidden), methods=forbidden)
        )
    routes.append(Route("/api/{rest:path}", h(state.not_found), methods=forbidden))
    app = Starlette(
        routes=routes,
        lifespan=state.lifespan,
        middleware=[
            Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)
        ],
    )
    return _Guard(app, state), state
