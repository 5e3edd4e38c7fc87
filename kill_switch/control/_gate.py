"""The control plane's outermost ASGI layer: malformed framing and cross-site state
changes refused before routing, clients over their failure budget answered 429 there,
security headers on every answer, and a bug turned into a logged 500 rather than a
dropped connection."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from ._http import error_response, escape

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("kill_switch.control")

#: Largest request header block, in bytes (431 beyond it).
MAX_HEADER_BLOCK: Final = 16 * 1024


class Gate:
    """Outermost ASGI layer: refuses cross-site state changes, sets security headers,
    and turns a bug into a logged 500 rather than a dropped connection."""

    def __init__(self, app: ASGIApp, over_budget: Callable[[Scope], int] | None = None) -> None:
        self.app = app
        self.over_budget = over_budget

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

        bad = malformed(scope)
        if bad is not None:
            status, why = bad
            await error_response(status, why, {"Connection": "close"})(scope, receive, send_wrapped)
            return
        refusal = cross_site(scope)
        if refusal is not None:
            await error_response(403, refusal)(scope, receive, send_wrapped)
            return
        if self.over_budget is not None:
            wait = self.over_budget(scope)
            if wait:
                # A client over its failure budget is answered here, before routing: a
                # flood of bad tokens then costs the control loop as little as it can,
                # which is what an operator's kill competes with.
                await error_response(
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
                await error_response(500, "internal error")(scope, receive, send_wrapped)


def malformed(scope: Scope) -> tuple[int, str] | None:
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


def cross_site(scope: Scope) -> str | None:
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
