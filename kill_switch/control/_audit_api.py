"""The audit log over HTTP: ``GET /api/audit`` pages the SQLite log with filters, and
``GET /api/audit/verify`` checks its hash chain and anchored head now. Reads run in a
worker thread; a log that cannot be read answers 503."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Final

import anyio

from kill_switch._audit._query import AuditLog, verify

from ._http import Refused, json_response
from ._inventory import jsonable

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from kill_switch._audit._query import VerifyResult

    from ._access import Access

#: Audit rows per page, at most.
MAX_PAGE: Final = 1000


class AuditApi:
    """The audit endpoints of one control plane (control loop).

    Args:
        access: who may read (viewers and up).
        audit_path: the SQLite audit file (``None``: these endpoints answer 404).
        anchor_path: the anchored chain head, if any.
    """

    def __init__(self, access: Access, audit_path: str | None, anchor_path: str | None) -> None:
        self.access = access
        self.audit_path = audit_path
        self.anchor_path = anchor_path
        #: The outcome of the last verification (``None``: never verified), for ``/metrics``.
        self.last_verify: bool | None = None

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
        self.access.require(request, "viewer")
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
        return json_response({"events": rows, "count": len(rows), "limit": limit})

    async def audit_verify(self, request: Request) -> Response:
        """The hash chain and anchored head, checked now."""
        self.access.require(request, "viewer")
        path = self._audit_file()

        def check() -> VerifyResult:
            return verify(path, anchor=self.anchor_path)

        try:
            result = await anyio.to_thread.run_sync(check)
        except sqlite3.Error as exc:
            raise Refused(503, f"the audit log cannot be read now: {exc}") from None
        self.last_verify = result.ok
        out = jsonable(result)
        out["summary"] = result.summary()
        return json_response(out)
