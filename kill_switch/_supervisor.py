"""SLA supervisors: interrupt sessions from outside when they run past a deadline.

A session's own ``Limits(max_duration=...)`` is the first line; a supervisor is the
second, owned by whoever runs the agents (an SLA, a priority pivot)::

    async with ks.supervise(runtime, max_age=300, where=lambda i: i.agent == "crawler"):
        ...  # every matching session older than 5 minutes is interrupted

    async with ks.supervise(runtime) as sup:
        sup.watch(session, deadline=60)  # this one session, 60 s from now

Every interrupt it makes has trigger ``supervisor`` and goes through ``interrupt()``.
Ages are measured on the monotonic clock (a wall-clock step moves nothing) from when
the supervisor first saw the session in the runtime's inventory, so a session that
started before the supervisor is aged from the supervisor's start.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from typing import TYPE_CHECKING, Any

import anyio

from ._vocabulary._validate import seconds

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from ._runtime import Runtime
    from ._session import Session
    from ._vocabulary._handle import InterruptHandle
    from ._vocabulary._snapshots import SessionInfo


class Supervisor:
    """Interrupts a runtime's sessions past their age or deadline (trigger ``supervisor``).

    Run it with :func:`supervise`; :meth:`scan` may also be called by hand (tests, or a
    supervisor driven by some other scheduler).

    Raises:
        TypeError / ValueError: a bad runtime, age, interval or predicate.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        max_age: float | None = None,
        where: Callable[[SessionInfo], bool] | None = None,
        interval: float = 1.0,
        reason: str = "SLA exceeded",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from ._runtime import Runtime  # runtime imports come later in the layering

        if not isinstance(runtime, Runtime):
            raise TypeError(f"runtime must be a Runtime, not {type(runtime).__name__}")
        if where is not None and not callable(where):
            raise TypeError("where must be a callable over SessionInfo")
        self.runtime = runtime
        self.max_age = None if max_age is None else seconds("max_age", max_age, zero_ok=True)
        self.interval = seconds("interval", interval)
        self.where = where
        self.reason = reason
        self._clock = clock
        self._first_seen: dict[str, float] = {}
        self._done: set[str] = set()
        self._timers: list[asyncio.TimerHandle] = []
        self._running = False

    async def _run(self) -> None:
        while True:
            self.scan()
            await anyio.sleep(self.interval)

    def scan(self) -> tuple[InterruptHandle, ...]:
        """One pass over the inventory: interrupt each matching session past *max_age*.

        Synchronous and never blocks; each session is interrupted at most once.
        """
        if self.max_age is None:
            return ()
        now = self._clock()
        handles = []
        live = set()
        for info in self.runtime.sessions():
            sid = info.session_id
            live.add(sid)
            first = self._first_seen.setdefault(sid, now)
            if sid in self._done or info.interrupt_id is not None:
                continue
            if now - first < self.max_age:
                continue
            if self.where is not None and not self.where(info):
                continue
            session = self.runtime.get(sid)
            if session is None:
                continue
            self._done.add(sid)
            handles.append(
                session.interrupt(
                    f"{self.reason}: running {now - first:.3g} s > max_age {self.max_age:g} s",
                    trigger="supervisor",
                )
            )
        # Forget sessions that left the inventory: memory follows the live set.
        for sid in [s for s in self._first_seen if s not in live]:
            del self._first_seen[sid]
            self._done.discard(sid)
        return tuple(handles)

    def watch(self, session: Session, *, deadline: float, reason: str | None = None) -> None:
        """Interrupt *session* *deadline* seconds from now unless it has ended by then.

        Loop thread only, inside the supervisor's block.

        Raises:
            RuntimeError: the supervisor is not running.
            TypeError / ValueError: *deadline* is not a number >= 0.
        """
        if not self._running:
            raise RuntimeError("Supervisor.watch() needs `async with supervise(...)`")
        delay = seconds("deadline", deadline, zero_ok=True)
        loop = asyncio.get_running_loop()
        why = reason or f"{self.reason}: deadline of {delay:g} s passed"
        self._timers.append(loop.call_later(delay, _fire, weakref.ref(session), why))


@contextlib.asynccontextmanager
async def supervise(
    runtime: Runtime,
    *,
    max_age: float | None = None,
    where: Callable[[SessionInfo], bool] | None = None,
    interval: float = 1.0,
    reason: str = "SLA exceeded",
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[Supervisor]:
    """Run a :class:`Supervisor` for the duration of the block.

    While the block runs, a background task scans the inventory every *interval*
    seconds (if *max_age* is set) and per-session timers set with
    :meth:`Supervisor.watch` are armed. Leaving the block stops both (the scan task is
    cancelled at its sleep); it interrupts nothing by itself.

    Raises:
        TypeError / ValueError: a bad runtime, age, interval or predicate.
    """
    sup = Supervisor(
        runtime, max_age=max_age, where=where, interval=interval, reason=reason, clock=clock
    )
    async with anyio.create_task_group() as tg:
        if sup.max_age is not None:
            tg.start_soon(sup._run)
        sup._running = True
        try:
            yield sup
        finally:
            sup._running = False
            for t in sup._timers:
                t.cancel()
            sup._timers.clear()
            tg.cancel_scope.cancel()


def _fire(ref: weakref.ref[Any], reason: str) -> None:
    session = ref()
    if session is None or session.interrupted:
        return
    if session.state in ("created", "running"):
        session.interrupt(reason, trigger="supervisor")
