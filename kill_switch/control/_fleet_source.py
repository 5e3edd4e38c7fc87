"""``FleetSource``: the control plane over every runtime of a fleet on Redis.

The inventory is ``Fleet.sessions()`` (a lost runtime's sessions are ``unknown``, never
``running``); a kill goes through ``Fleet.kill`` / ``Fleet.kill_where`` and answers with
the owner's StopReport. The owner records the kill in its own audit log with the
operator's token id (``fleet_kill`` and the interrupt); a runtime that does not answer in
time is named in a 504 (the kill stays sticky in Redis and runs when it is back).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import TYPE_CHECKING, Any

from kill_switch.fleet import Fleet, FleetUnavailable, NoAnswer

from ._http import Refused
from ._inventory import Page, Query, json_text
from ._sources import result_row

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from kill_switch._vocabulary._selector import Selector
    from kill_switch.fleet import FleetSession

#: What a fleet row cannot say (it lives on the owner's loop): shown as ``null``.
_LOCAL_ONLY = ("actions", "cost", "calls_in_flight", "tool_tasks", "interrupt_reason")


def fleet_row(s: FleetSession) -> dict[str, Any]:
    """A fleet session as an inventory row (the local row's keys, and where it runs)."""
    out = s.to_dict()
    out.update(dict.fromkeys(_LOCAL_ONLY))
    out["interrupt_id"] = None
    out["report"] = None
    return out


class FleetSource:
    """Every runtime's sessions and kills, through a fleet's Redis.

    Args:
        fleet: the fleet's options (``ks.Fleet(url)``); it is connected on the control
            loop while the control plane serves.
        timeout: seconds a kill waits for the owners' reports (default: the fleet's).

    Raises:
        TypeError: *fleet* is not a ``Fleet``.
    """

    scope = "fleet"

    def __init__(self, fleet: Fleet, *, timeout: float | None = None) -> None:
        if not isinstance(fleet, Fleet):
            raise TypeError(f"fleet must be a kill_switch.Fleet, not {type(fleet).__name__}")
        self.fleet = fleet
        self.timeout = timeout

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Connected to Redis while serving.

        Raises:
            FleetUnavailable: Redis did not answer (the control plane does not start).
        """
        async with self.fleet:
            yield

    async def _all(self) -> tuple[FleetSession, ...]:
        try:
            return await self.fleet.sessions()
        except FleetUnavailable as exc:
            raise Refused(503, str(exc)) from None

    async def sessions(self) -> list[dict[str, Any]]:
        """Every session of every runtime, live or lost."""
        return [fleet_row(s) for s in await self._all()]

    async def states(self) -> Counter[str]:
        """Sessions per state across the fleet (``unknown`` for a lost runtime's)."""
        return Counter(r["state"] for r in await self.sessions())

    async def page(self, query: Query) -> Page:
        """Every selected session (a fleet's rows are not paged: each is read anew)."""
        return Page(
            [
                json_text(r)
                for r in await self.sessions()
                if query.matches(r["agent"], r["state"], r["labels"])
            ]
        )

    async def session(self, session_id: str) -> dict[str, Any] | None:
        """The row; its live detail is read only by its own runtime's control plane."""
        for s in await self._all():
            if s.session_id == session_id:
                out = fleet_row(s)
                out["live"] = None
                out["live_error"] = (
                    f"a fleet session: its tool calls, processes and threads are shown by "
                    f"the control plane of its runtime {s.runtime_id} ({s.host}, pid {s.pid})"
                )
                return out
        return None

    def _wait(self, wait: bool) -> float:
        if not wait:
            return 0.0
        return self.timeout if self.timeout is not None else self.fleet.timeout

    async def kill(
        self, session_id: str, *, reason: str, operator: str, wait: bool
    ) -> tuple[int, dict[str, Any]]:
        """Kill a session listed in the fleet; the owner's StopReport (200), ``pending``
        (202, no wait), or a 504 naming the runtime that did not answer."""
        if await self.session(session_id) is None:
            raise Refused(404, "no such session in the fleet")
        try:
            report = await self.fleet.kill(
                session_id, reason=reason, operator=operator, timeout=self._wait(wait)
            )
        except NoAnswer as exc:
            if not wait:
                return 202, _pending(session_id, exc.kill_id)
            raise Refused(
                504, str(exc), extra={"kill_id": exc.kill_id, "unanswered": list(exc.runtimes)}
            ) from None
        except FleetUnavailable as exc:
            raise Refused(503, str(exc)) from None
        return 200, result_row(session_id, report)

    async def kill_where(
        self, selector: Selector, *, reason: str, operator: str, wait: bool
    ) -> tuple[int, dict[str, Any]]:
        """Kill the selector on every runtime; each owner's reports, and the runtimes
        that did not answer (504 if any did not, with the reports that came)."""
        try:
            result = await self.fleet.kill_where(
                reason=reason,
                operator=operator,
                agent=selector.agent,
                labels=selector.labels or None,
                all=selector.everything,
                timeout=self._wait(wait),
            )
        except FleetUnavailable as exc:
            raise Refused(503, str(exc)) from None
        results = [result_row(r.session_id, r) for r in result.reports]
        body: dict[str, Any] = {
            "results": results,
            "count": len(results),
            "kill_id": result.kill_id,
            "unanswered": list(result.unanswered),
        }
        if not result.unanswered:
            return 200, body
        if not wait:
            return 202, body
        names = ", ".join(result.unanswered)
        body["error"] = {
            "status": 504,
            "message": f"kill {result.kill_id} is recorded (sticky), but runtime(s) {names} "
            "did not answer in time",
        }
        return 504, body


def _pending(session_id: str, kill_id: str) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "interrupt_id": None,
        "kill_id": kill_id,
        "status": "pending",
        "report": None,
    }
