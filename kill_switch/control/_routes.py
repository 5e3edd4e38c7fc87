"""The control plane's ASGI application: its route table, each handler's method check
and error answer, and the outermost layers (Host allow-list, ``Gate``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Route

from ._app import ControlApp
from ._config import resolve
from ._gate import Gate
from ._http import Refused, error_response

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Unpack

    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.types import ASGIApp

    from kill_switch._runtime import Runtime

    from ._auth import TokenStore
    from ._config import ControlConfig, ControlOptions
    from ._sources import SessionSource

#: Paths that would make an agent act differently: refused to every role (403).
FORBIDDEN_ACTIONS: Final = frozenset(
    {"resume", "config", "configure", "budgets", "limits", "tools", "prompt", "instruct"}
)
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
            response = error_response(exc.status, exc.message, exc.headers, exc.extra)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def create_app(
    runtime: Runtime,
    tokens: TokenStore,
    config: ControlConfig | None = None,
    *,
    source: SessionSource | None = None,
    **options: Unpack[ControlOptions],
) -> tuple[ASGIApp, ControlApp]:
    """The ASGI application of the control plane for *runtime* (or *source*), and its
    state.

    A request whose ``Host`` is not one of ``config.hosts()`` (the loopback names, the
    bound host and ``allowed_hosts``; port ignored; ``*.example.com`` patterns as
    Starlette's ``TrustedHostMiddleware``) is refused with 400.

    Raises:
        TypeError / ValueError: a bad option, or both *config* and keyword options.
    """
    config = resolve(config, options)
    state = ControlApp(runtime, tokens, config, source=source)
    h = _handler
    audit = state.audit_api
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
        Route("/api/audit", h(audit.audit, "GET"), methods=ALL_METHODS),
        Route("/api/audit/verify", h(audit.audit_verify, "GET"), methods=ALL_METHODS),
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
            Middleware(TrustedHostMiddleware, allowed_hosts=config.hosts(), www_redirect=False)
        ],
    )
    return Gate(app, state.access.over_budget), state
