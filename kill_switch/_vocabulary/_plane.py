"""The contract between a session and the parts an interrupt stops.

A *plane* is one mechanism a stop must reach: the asyncio tool tasks, the worker threads
of sync tools, the process trees, the limits' timers. Each implements :class:`Plane`;
each sees its session only through :class:`PlaneHost`, never through the session's
fields. A session, in turn, sees its runtime only through :class:`LoopHost`. (trio keeps
the same split between where a cancellation comes from and how it is carried:
``CancelScope`` against ``CancelStatus``, whose docstring names the narrow shape it
needs from its scope.)

Threads: every method runs on the session's loop thread unless its docstring says
"any thread".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

import attrs

if TYPE_CHECKING:
    import asyncio
    import contextvars
    from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
    from typing import Any

    from ._audit_event import AuditEvent
    from ._decision import Decision
    from ._exceptions import Interrupted, ToolBlocked
    from ._handle import InterruptHandle
    from ._policy import StopPolicy
    from ._report import (
        AuditStatus,
        CleanupReport,
        InterruptRequest,
        LeakedTask,
        ProcessReport,
        ThreadReport,
    )
    from ._snapshots import State

P = TypeVar("P", bound="Plane")

#: The two ways a stop is forced from outside the loop: the loop monitor's thread when
#: the loop did not deliver an interrupt in time, and the shutdown watchdog.
ForcePath = Literal["out_of_band", "watchdog"]


@attrs.frozen
class StopFields:
    """The part of a ``StopReport`` a plane contributes (merged over every plane)."""

    processes: tuple[ProcessReport, ...] = ()
    threads: tuple[ThreadReport, ...] = ()
    tool_calls_cancelled: int = 0
    leaked_tasks: tuple[LeakedTask, ...] = ()
    swept_tasks: tuple[LeakedTask, ...] = ()
    unattributed: tuple[str, ...] = ()

    @staticmethod
    def merge(parts: list[StopFields]) -> StopFields:
        """One ``StopFields`` holding every part's rows, in the planes' order."""
        if len(parts) == 1:
            return parts[0]
        return StopFields(
            processes=tuple(p for part in parts for p in part.processes),
            threads=tuple(t for part in parts for t in part.threads),
            tool_calls_cancelled=sum(part.tool_calls_cancelled for part in parts),
            leaked_tasks=tuple(t for part in parts for t in part.leaked_tasks),
            swept_tasks=tuple(t for part in parts for t in part.swept_tasks),
            unattributed=tuple(u for part in parts for u in part.unattributed),
        )


NO_FIELDS = StopFields()


class Plane(Protocol):
    """A part of a session that an interrupt must stop.

    Subclass it explicitly to inherit the defaults (nothing to settle, always quiescent,
    never busy, nothing to force, no report rows).
    """

    __slots__ = ()

    def deliver(self, request: InterruptRequest) -> None:
        """Start stopping; called once on the loop thread. Must not block or raise."""

    async def settle(self, deadline: float) -> None:
        """Wait until quiet or until *deadline* (``time.monotonic()``). Re-raises only
        cancellation."""
        return None

    def quiescent(self) -> bool:
        """Whether nothing of this plane is still running."""
        return True

    def busy(self) -> bool:
        """Whether the plane still runs work (a process) that the block's end must stop."""
        return False

    def force(self, path: ForcePath) -> None:
        """Stop what can be stopped without the loop (any thread; the loop may be stuck)."""
        return None

    def stop_fields(self) -> StopFields:
        """This plane's rows of the ``StopReport``."""
        return NO_FIELDS

    def close(self) -> None:
        """The session's block has ended: release what the plane kept for the session's
        life. Called once; must not block or raise."""
        return None


class CallGuard(Protocol):
    """What the tool plane needs of the guard to start a tool task's call."""

    #: The session's request list: non-empty once interrupted. Any thread.
    requests: list[InterruptRequest]
    #: What runs an admitted call (``None``: a plain await).
    meter: Callable[..., Awaitable[Any]] | None

    def admit(
        self, tool: str, args: tuple[Any, ...], kwargs: dict[str, Any], cost: float
    ) -> Decision | None:
        """``None`` if the call may go ahead (and is counted), else why not."""
        ...

    def blocked(self, decision: Decision, tool: str) -> ToolBlocked:
        """Audit a refused call and return what to raise."""
        ...


class PlaneHost(Protocol):
    """All a plane (or the ledger, the sentinel's watch, a cleanup run) may know of its
    session. ``Session`` implements it; tests can pass a fake."""

    @property
    def id(self) -> str: ...

    @property
    def agent(self) -> str: ...

    @property
    def policy(self) -> StopPolicy: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def state(self) -> State: ...

    @property
    def handle(self) -> InterruptHandle:
        """The handle every ``interrupt()`` of the session returns. Any thread."""
        ...

    @property
    def request(self) -> InterruptRequest | None:
        """The first interrupt request, or ``None``. Any thread."""
        ...

    @property
    def runtime_closed(self) -> bool:
        """Whether the session's runtime has closed (nobody records any more)."""
        ...

    def interrupted_error(self) -> Interrupted:
        """The ``Interrupted`` to raise for this session's interrupt (it must have one)."""
        ...

    def interrupt(
        self, reason: str, *, trigger: str, operator: str | None = None
    ) -> InterruptHandle:
        """Stop the session (any thread; never blocks)."""
        ...

    def is_interrupted(self) -> bool:
        """Whether the flag sync tools poll is set. Any thread."""
        ...

    def wait_interrupted(self, timeout: float | None) -> bool:
        """Block the calling (worker) thread until interrupted or *timeout*; whether it was."""
        ...

    def record(self, kind: str, **fields: Any) -> None:
        """Audit an event of this session. Any thread."""
        ...

    def note_secondary(self, error: str) -> None:
        """Keep an error raised while stopping (the report's ``secondary_errors``)."""
        ...

    def note_late_result(self) -> None:
        """A tool result arrived after the interrupt and was dropped."""
        ...

    def note_cleanup(self, reports: Iterable[CleanupReport]) -> None:
        """Keep the outcomes of cleanup hooks or rollbacks (the report's ``cleanup``)."""
        ...

    def note_task(self, task: asyncio.Task[Any]) -> None:
        """A task was created in the session's context (the runtime's task factory)."""
        ...

    def blocked(self, decision: Decision, tool: str) -> ToolBlocked:
        """Audit a refused call and return the exception to raise for it."""
        ...

    def on_loop_thread(self) -> bool:
        """Whether the caller runs on the session's loop thread. Any thread."""
        ...

    def call_soon(self, fn: Callable[..., object], *args: Any) -> asyncio.Handle:
        """Schedule *fn* on the loop in the runtime's service context."""
        ...

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> asyncio.Handle:
        """Schedule *fn* on the loop from any thread (``RuntimeError``: loop closed)."""
        ...

    def call_later(
        self, delay: float, fn: Callable[..., object], *args: Any
    ) -> asyncio.TimerHandle:
        """Schedule *fn* after *delay* seconds in the runtime's service context."""
        ...

    def plane(self, kind: type[P], make: Callable[[], P]) -> P:
        """The session's plane of *kind*, made and registered on first use.

        Raises:
            RuntimeError: the session was interrupted or has ended.
        """
        ...

    def pile_key(self) -> object:
        """A key living as long as the runtime: per-runtime state of a plane (the count
        of abandoned threads) is kept under it."""
        ...


class StopWindow(Protocol):
    """One stop in flight, as the runtime sees it (``LoopHost.open_stop``).

    Any thread. ``record`` shows an event of the stop to the listeners at once and holds
    it for the sink (a sticky kind goes to the sink at once: a kill is final);
    ``hand_over`` gives the sink every held event together, in order (one group commit),
    after which events go straight through; ``close`` hands over what is left and ends
    the window (the switch interval it shortened is put back). Both are idempotent.
    """

    def record(self, event: AuditEvent) -> None: ...

    def hand_over(self) -> None: ...

    def close(self) -> None: ...


class LoopHost(Protocol):
    """What a session needs from its runtime (``Runtime`` hands one to each session).

    Read on every interrupt and audit event: an implementation should hold these as
    plain attributes."""

    #: The runtime itself (a ``Runtime``: the session hands it to users; planes key
    #: per-runtime state under it).
    runtime: object
    loop: asyncio.AbstractEventLoop
    loop_thread: int
    #: The runtime's service context (no current session in it).
    context: contextvars.Context
    #: Whether anybody listens to audit events (a sink or a listener).
    audible: bool
    #: Whether ``flush`` has a sink to wait for (else it says ``"disabled"`` at once).
    flushes: bool

    @property
    def closed(self) -> bool: ...

    def record(self, event: AuditEvent) -> None:
        """Hand *event* to the sink and the listeners. Any thread; never raises."""
        ...

    def record_many(self, events: Sequence[AuditEvent]) -> None:
        """Hand *events* to the sink as one batch, then to the listeners. Any thread;
        never raises."""
        ...

    async def flush(self) -> AuditStatus:
        """Wait (shielded, bounded) until every recorded event is durable; its status."""
        ...

    def open_stop(self, switch_interval: float | None) -> StopWindow:
        """A stop begins (any thread, at its request): hold its events for one group
        commit and, unless *switch_interval* is ``None``, shorten the interpreter's
        switch interval until the window closes (the runtime closes any left open when
        it exits)."""
        ...

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a bounded service coroutine on the loop (loop thread only)."""
        ...

    def watch_delivery(self, check: Callable[[], None], due_mono: float) -> None:
        """Call *check* on the monitor's thread at *due_mono* (out-of-band path)."""
        ...

    def enter(self, session: Any) -> None:
        """The session's block is entered (``SessionRefused``: a kill is sticky)."""
        ...

    def leave(self, session: Any) -> None:
        """The session's block has ended."""
        ...

    def note_terminated(self, session_id: str) -> None:
        """The session id is terminated for good (a kill is sticky)."""
        ...
