"""Who may do what on the control plane: bearer tokens checked, roles enforced, clients
over their failure budget slowed, and every refusal of an authenticated caller audited
(``control_denied``) with the token id, never the token."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from kill_switch._vocabulary._audit_event import CONTROL_DENIED, AuditEvent
from kill_switch._vocabulary._triggers import MAX_REASON

from ._auth import BadCredentials, FailureLimiter, Principal, Role, TokenStore, allows, bearer_token
from ._http import Refused, escape

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.requests import Request
    from starlette.types import Scope

    from ._metrics import Metrics

log = logging.getLogger("kill_switch.control")

#: Characters of a refused request's path written to the audit log.
MAX_AUDITED_PATH: Final = 200


class Access:
    """Authentication and authorisation of the control plane's requests (control loop).

    Args:
        tokens: the token store.
        limiter: failed authentications per client.
        metrics: counters of failures, denials and rate limiting.
        record: writes an audit event (the runtime's recorder).
        known: whether a session id names a session this control plane shows (a denial
            joins that session's trail only then).
    """

    def __init__(
        self,
        tokens: TokenStore,
        limiter: FailureLimiter,
        metrics: Metrics,
        record: Callable[[AuditEvent], object],
        known: Callable[[str], bool],
    ) -> None:
        self.tokens = tokens
        self.limiter = limiter
        self.metrics = metrics
        self.record = record
        self.known = known

    def audit_denial(
        self, request: Request, status: int, why: str, principal: Principal | None
    ) -> None:
        """Record a refusal (``control_denied``) and log it on one escaped line."""
        # A denial joins a session's trail only when an authenticated caller names a
        # session that exists: an unauthenticated URL (or a made-up id) is attacker
        # text, and the path recorded is bounded.
        session_id = request.path_params.get("session_id")
        if not (principal is not None and isinstance(session_id, str) and self.known(session_id)):
            session_id = None
        self.record(
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
            self.audit_denial(request, exc.status, str(exc), None)
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
        self.audit_denial(request, 403, why, principal)
        raise Refused(403, why)
