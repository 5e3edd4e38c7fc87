"""The session as its parts see it: identity, state, the interrupt, and the
``PlaneHost`` contract.

``SessionHost`` is the base of ``Session``: it holds what every part of a session shares
(the request list, the flag, the handle, the plane registry) and builds the parts — the
guard (``_guard``), the tool plane (``_tool_tasks``), the stop (``_stop``) — handing
each the containers it needs explicitly. ``interrupt()`` lives here because the planes,
the ledger and the sentinel's watch call it through ``PlaneHost``. ``Session`` adds the
public verbs: the block, tool calls, processes, threads, cleanup.

Invariant: every state transition happens on the loop thread. ``interrupt()`` only
appends to ``_requests`` (atomic under the GIL: the first element wins, with no lock a
signal handler could deadlock on), sets the flag and schedules ``_deliver`` (``Batch``: one
loop callback for every first request one call makes, ``interrupt_where``'s N included).
"""

from __future__ import annotations

import threading
import time
import types
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import anyio

from ._guard import Guard, ToolPolicy
from ._planes import _process_plane, _threads
from ._planes._tool_tasks import ToolTasks
from ._stop import SharedStopTimer, Stop
from ._vocabulary._audit_event import (
    CANCELLED_BEFORE_START,
    INTERRUPT_REPEATED,
    INTERRUPT_REQUESTED,
    AuditEvent,
    new_id,
)
from ._vocabulary._exceptions import Interrupted
from ._vocabulary._handle import InterruptHandle
from ._vocabulary._report import InterruptRequest, StopReport
from ._vocabulary._snapshots import CallInfo, ProcessInfo, SessionInfo, State, ThreadInfo
from ._vocabulary._triggers import bound_operator, bound_reason, check_trigger

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from contextvars import Token

    from ._cleanup import Hook
    from ._runtime import Runtime
    from ._sentinel import Sentinel
    from ._vocabulary._decision import Decision
    from ._vocabulary._exceptions import ToolBlocked
    from ._vocabulary._limits import Limits, LimitWarning
    from ._vocabulary._plane import LoopHost, P, Plane, PlaneHost
    from ._vocabulary._policy import StopPolicy
    from ._vocabulary._report import CleanupReport


class SessionHost:
    """The state a session's parts share and the contract they see it through.

    Strictly private: agent code uses ``Session``, which derives from it.
    """

    __slots__ = (
        "__weakref__",
        "_body_task",
        "_children",
        "_cleanup_hooks",
        "_ctx_token",
        "_flag",
        "_guard",
        "_handle",
        "_host",
        "_loop",
        "_planes",
        "_requests",
        "_scope",
        "_started_at",
        "_state",
        "_stop",
        "_tools",
        "agent",
        "id",
        "labels",
        "parent",
        "policy",
        "report",
    )

    def __init__(
        self,
        host: LoopHost,
        agent: str,
        *,
        session_id: str,
        labels: Mapping[str, str],
        parent: SessionHost | None,
        policy: StopPolicy,
        tool_policy: ToolPolicy | None,
        limits: Limits | None = None,
        sentinel: Sentinel | None = None,
        on_limit_warning: Callable[[LimitWarning], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._host = host
        self._loop = host.loop
        self.id = session_id
        self.agent = agent
        self.labels: Mapping[str, str] = types.MappingProxyType(dict(labels))
        self.parent = parent
        self.policy = policy
        #: The ``StopReport`` of this session's interrupt, once it has one.
        self.report: StopReport | None = None
        self._state: State = "created"
        self._requests: list[InterruptRequest] = []
        self._handle = InterruptHandle(new_id(), session_id)
        self._flag = threading.Event()
        self._scope = anyio.CancelScope()
        self._body_task: asyncio.Task[Any] | None = None
        self._ctx_token: Token[PlaneHost | None] | None = None
        self._children: list[SessionHost] = []
        self._cleanup_hooks: list[tuple[str, Hook]] = []
        self._started_at: float | None = None
        self._guard: Guard = Guard(
            self,
            self._requests,
            tool_policy=tool_policy,
            limits=limits,
            parent=parent._guard if parent is not None else None,
            sentinel=sentinel,
            on_limit_warning=on_limit_warning,
            clock=clock,
        )
        self._tools = ToolTasks(self, self._guard, self._scope.cancel)
        # The tool plane is registered first (its report rows come first); the stop
        # delivers to the planes in its own order, the cheapest first (``_stop.py``).
        self._planes: dict[type[Plane], Plane] = {ToolTasks: self._tools}
        self._stop = Stop(
            self,
            host,
            requests=self._requests,
            planes=self._planes,
            tools=self._tools,
            children=self._children,
            cleanup_hooks=self._cleanup_hooks,
            resolve=self._resolve,
        )
        if parent is not None:
            parent._adopt(self)

    def __repr__(self) -> str:
        return f"<Session {self.id} agent={self.agent!r} state={self.state}>"

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> State:
        """``created`` → ``running`` → ``interrupting`` → ``terminated``, or ``finished``
        / ``failed`` when the block ended by itself."""
        return self._state

    def _set_state(self, state: State) -> None:
        self._state = state
        self._guard.running = state == "running"

    @property
    def runtime(self) -> Runtime:
        """The runtime this session belongs to."""
        return cast("Runtime", self._host.runtime)

    @property
    def interrupted(self) -> bool:
        """Whether ``interrupt()`` has been called (from any thread). Never reset."""
        return bool(self._requests)

    @property
    def handle(self) -> InterruptHandle:
        """The handle every ``interrupt()`` of this session returns."""
        return self._handle

    def info(self) -> SessionInfo:
        """A frozen snapshot of this session for inventories, APIs and dashboards."""
        first = self._requests[0] if self._requests else None
        guard = self._guard
        return SessionInfo(
            session_id=self.id,
            agent=self.agent,
            labels=dict(self.labels),
            parent_id=self.parent.id if self.parent is not None else None,
            state=self._state,
            started_at=self._started_at,
            actions=guard.actions,
            cost=guard.cost,
            calls_in_flight=self._tools.calls_in_flight,
            tool_tasks=len(self._tools.tool_tasks),
            interrupt_id=self._handle.interrupt_id if first else None,
            interrupt_trigger=first.trigger if first else None,
            interrupt_reason=first.reason if first else None,
        )

    def calls(self) -> tuple[CallInfo, ...]:
        """Snapshots of the tool calls in flight in tasks other than the body (tool
        tasks, tasks of a task group, tasks outside the block); the body's own call, if
        any, counts in ``info().calls_in_flight`` only."""
        return self._tools.calls()

    def running_tasks(self) -> tuple[CallInfo, ...]:
        """Snapshots of every task created in this session's context (by the runtime's
        task factory) that has not finished: tool tasks, task groups' tasks, and tasks a
        tool started with a raw ``create_task``. Loop thread only."""
        return self._tools.running_tasks()

    def processes(self) -> tuple[ProcessInfo, ...]:
        """Snapshots of the processes this session tracks now: running, or being stopped
        (a reaped process is no longer tracked; the ``StopReport`` holds its story).
        Loop thread only."""
        plane = self._planes.get(_process_plane.ProcessPlane)
        return plane.info() if isinstance(plane, _process_plane.ProcessPlane) else ()

    def threads(self) -> tuple[ThreadInfo, ...]:
        """Snapshots of the worker threads of this session's sync tools still running.
        Loop thread only."""
        plane = self._planes.get(_threads.ThreadPlane)
        return plane.info() if isinstance(plane, _threads.ThreadPlane) else ()

    def add_plane(self, plane: Plane) -> None:
        """Register a part of the session an interrupt must also stop.

        Raises:
            RuntimeError: the session was already interrupted or has ended, or a plane
                of that type is registered already.
        """
        if type(plane) in self._planes:
            raise RuntimeError(f"session {self.id} has a {type(plane).__name__} already")
        self.plane(type(plane), lambda: plane)

    def plane(self, kind: type[P], make: Callable[[], P]) -> P:
        """The session's plane of *kind*, made by *make* and registered on first use.

        Raises:
            RuntimeError: the session was already interrupted or has ended.
        """
        plane = self._planes.get(kind)
        if plane is not None:
            return plane  # type: ignore[return-value]  # keyed by its own type
        if self._requests or self._state in ("terminated", "finished", "failed"):
            raise RuntimeError(f"session {self.id} can no longer take new planes")
        new = make()
        self._planes[kind] = new
        return new

    def _adopt(self, child: SessionHost) -> None:
        """*child* was created under this session: cascade to it (now, if interrupted)."""
        self._children.append(child)
        if self._requests:
            first = self._requests[0]
            child.interrupt(
                f"parent session {self.id} interrupted: {first.reason}",
                trigger="parent",
                operator=first.operator,
            )

    def _disown(self, child: SessionHost) -> None:
        if child in self._children:
            self._children.remove(child)

    def _unlink(self) -> None:
        """The block has ended: leave the parent's list unless its cascade must see us."""
        parent = self.parent
        # A child stays on an interrupted parent's list: the parent's interrupt (from
        # another thread) may have ended this block — its flag wakes a sync tool running
        # in it — before its cascade reached the list. Once the parent has a request,
        # every child that leaves is one the cascade must still see.
        if parent is not None and not self._requests and not parent._requests:
            parent._disown(self)

    # ------------------------------------------------------------- interrupt

    def interrupt(
        self, reason: str, *, trigger: str, operator: str | None = None
    ) -> InterruptHandle:
        """Stop this session: its body, its tool calls, and every plane registered.

        Synchronous, thread-safe and cheap: it records the request, sets the flag that
        sync tools poll, cascades to child sessions and schedules the fan-out on the
        loop. Idempotent: the first reason wins, later ones are kept in the report.
        Never blocks, never raises for a session that has ended.

        Raises:
            TypeError / ValueError: bad reason, trigger or operator.
        """
        reason = bound_reason(reason)
        trigger = check_trigger(trigger)
        operator = bound_operator(operator)
        batch = Batch(self._host)
        try:
            self._request(
                InterruptRequest(trigger, reason, operator, time.time(), time.monotonic()), batch
            )
        finally:
            batch.send()
        return self._handle

    def _request(self, req: InterruptRequest, batch: Batch) -> None:
        """Append *req* (any thread; never blocks). A first request opens the stop,
        cascades to the children and joins *batch*, which audits and delivers it."""
        requests = self._requests
        requests.append(req)
        if requests[0] is not req:
            event = self._event(
                INTERRUPT_REPEATED, trigger=req.trigger, reason=req.reason, operator=req.operator
            )
            if event is not None:
                window = self._stop.window
                if window is not None:
                    window.record(event)
                else:
                    batch.events.append(event)
            return
        # The stop is in flight from its request: the switch interval is short from
        # here (the loop must win the GIL back to deliver), its events held for one
        # commit (interrupt_requested, sticky, goes with the batch's, at its end).
        stop = self._stop
        stop.open_window()
        stop.announced = batch.announced()
        # Children first, before our own flag: a sync tool of this session woken by the
        # flag may end this block, and with it the children's, before the cascade reads
        # the list. (A child leaving an interrupted parent stays on its list: _leave.)
        for child in list(self._children):
            child._request(
                InterruptRequest(
                    "parent",
                    bound_reason(f"parent session {self.id} interrupted: {req.reason}"),
                    req.operator,
                    time.time(),
                    time.monotonic(),
                ),
                batch,
            )
        self._flag.set()
        event = self._event(
            INTERRUPT_REQUESTED, trigger=req.trigger, reason=req.reason, operator=req.operator
        )
        if event is not None:
            batch.events.append(event)
        batch.fresh.append(self)

    def _event(self, kind: str, **fields: Any) -> AuditEvent | None:
        """An audit event of this session, or ``None`` when nobody listens."""
        if not self._host.audible:
            return None
        return AuditEvent(
            kind,
            self.id,
            agent=self.agent,
            interrupt_id=self._handle.interrupt_id if self._requests else None,
            **fields,
        )

    def _check_delivered(self) -> None:
        """The loop monitor's thread, ``out_of_band_after`` past the request: if the loop
        has not delivered the interrupt, stop what can be stopped without it."""
        if self._state != "created":
            self._stop.go_out_of_band()

    def _deliver(self, timers: dict[float, SharedStopTimer] | None = None) -> None:
        """Fan the interrupt out. Loop thread only; idempotent. With *timers* (a batch's
        delivery), the stop timeout is one timer shared with the batch's other stops."""
        stop = self._stop
        if stop.delivered_mono is not None:
            return
        stop.delivered_mono = time.monotonic()
        first = self._requests[0]
        state = self._state
        host = self._host
        if state == "created":
            self._set_state("terminated")
            host.note_terminated(self.id)
            self.record(CANCELLED_BEFORE_START, trigger=first.trigger, reason=first.reason)
            stop.fixed_outcome = "before_start"
            host.spawn(stop.finish)
            return
        if state in ("finished", "failed"):
            stop.fixed_outcome = "after_end"
            host.spawn(stop.finish)
            return
        self._set_state("interrupting")
        host.note_terminated(self.id)
        self._scope.cancel()
        stop.deliver(first, timers)

    def _resolve(self, report: StopReport) -> None:
        self.report = report
        self._handle._set(report)

    def check(self) -> None:
        """Raise ``Interrupted`` if this session was interrupted. Any thread; a fence
        for commit points (nothing commits after the kill).

        Raises:
            Interrupted: the session was interrupted.
        """
        if self._requests:
            raise self.interrupted_error()

    # ------------------------------------------- the PlaneHost contract
    # What planes, the ledger, the sentinel's watch and cleanup runs may use of their
    # session (kill_switch._vocabulary._plane.PlaneHost); not meant for agent code.

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the session runs on."""
        return self._loop

    @property
    def request(self) -> InterruptRequest | None:
        """The first interrupt request, or ``None``. Any thread."""
        requests = self._requests
        return requests[0] if requests else None

    @property
    def runtime_closed(self) -> bool:
        """Whether the session's runtime has closed."""
        return self._host.closed

    def interrupted_error(self) -> Interrupted:
        """The ``Interrupted`` for this session's interrupt (it must have one)."""
        first = self._requests[0]
        return Interrupted(
            first.reason,
            session_id=self.id,
            interrupt_id=self._handle.interrupt_id,
            trigger=first.trigger,
        )

    def wait_interrupted(self, timeout: float | None) -> bool:
        """Block the calling worker thread until interrupted or *timeout*; whether it was."""
        return self._flag.wait(timeout)

    def is_interrupted(self) -> bool:
        """Whether the flag sync tools poll is set (any thread)."""
        return self._flag.is_set()

    def record(self, kind: str, **fields: Any) -> None:
        """Audit an event of this session (any thread; never raises)."""
        host = self._host
        if not host.audible:
            return  # nobody to tell: building the event would be the interrupt's cost
        # While a stop is in flight its window holds the event for the stop's one
        # group commit (the listeners see it at once).
        window = self._stop.window
        (host.record if window is None else window.record)(
            AuditEvent(
                kind,
                self.id,
                agent=self.agent,
                interrupt_id=self._handle.interrupt_id if self._requests else None,
                **fields,
            )
        )

    def note_secondary(self, error: str) -> None:
        """Keep an error raised while stopping (the report's ``secondary_errors``)."""
        self._stop.secondary.append(error)

    def note_late_result(self) -> None:
        """A tool result arrived after the interrupt and was dropped."""
        self._stop.late_results += 1

    def note_cleanup(self, reports: Iterable[CleanupReport]) -> None:
        """Keep cleanup or rollback outcomes (the report's ``cleanup``)."""
        self._stop.cleanup_reports.extend(reports)

    def note_task(self, task: asyncio.Task[Any]) -> None:
        """A task was created in this session's context (the runtime's task factory)."""
        self._tools.note(task)

    def blocked(self, decision: Decision, tool: str) -> ToolBlocked:
        """Audit a refused call and return the exception to raise for it."""
        return self._guard.blocked(decision, tool)

    def on_loop_thread(self) -> bool:
        """Whether the caller runs on the session's loop thread (any thread)."""
        return threading.get_ident() == self._host.loop_thread

    def call_soon(self, fn: Callable[..., object], *args: Any) -> asyncio.Handle:
        """Schedule *fn* on the loop in the runtime's service context."""
        return self._loop.call_soon(fn, *args, context=self._host.context)

    def call_soon_threadsafe(self, fn: Callable[..., object], *args: Any) -> asyncio.Handle:
        """Schedule *fn* on the loop from any thread (``RuntimeError``: loop closed)."""
        return self._loop.call_soon_threadsafe(fn, *args, context=self._host.context)

    def call_later(
        self, delay: float, fn: Callable[..., object], *args: Any
    ) -> asyncio.TimerHandle:
        """Schedule *fn* after *delay* seconds in the runtime's service context."""
        return self._loop.call_later(delay, fn, *args, context=self._host.context)

    def pile_key(self) -> object:
        """A key that lives as long as the session's runtime (the runtime)."""
        return self._host.runtime

    def force(self, path: str) -> None:
        """Stop, from any thread, every plane that can be stopped without the loop
        (the watchdog's last resort, before it exits the process)."""
        self._stop.force(path)  # type: ignore[arg-type]  # checked by the planes


# ------------------------------------------------------------------ batches


class Batch:
    """The first requests one call makes (a session's ``interrupt()`` with its cascade,
    or ``Runtime.interrupt_where`` over N sessions), handed to the runtime together.

    Requests are appended session by session (the first one wins, as ever); ``send``
    then gives the sink their ``interrupt_requested`` events in one batch (one lock,
    one writer wake-up), arms one out-of-band check per policy and delivers every stop
    in one loop callback: from another thread, one ``call_soon_threadsafe`` hop for N
    sessions instead of N.
    """

    __slots__ = ("_announced", "events", "fresh", "host", "on_loop")

    def __init__(self, host: LoopHost) -> None:
        self.host = host
        self.on_loop = host.loop_thread == threading.get_ident()
        #: Sessions whose first request this batch made, cascaded children before their
        #: parent: the order they are delivered in.
        self.fresh: list[SessionHost] = []
        #: Audit events for the sink, in order (sticky ones: sent at the end of the call).
        self.events: list[AuditEvent] = []
        self._announced: asyncio.Future[None] | None = None

    def announced(self) -> asyncio.Future[None] | None:
        """What a stop of this batch waits for before its own events go to the sink
        (``Stop.wait_announced``): ``None`` on the loop thread, where nothing of the
        loop runs before ``send``. From another thread the loop may run a session's
        exit meanwhile — a block ending by itself sees the request — and that stop's
        rows must not reach the chain before its ``interrupt_requested``: it waits for
        this future, which the batch's loop callback resolves."""
        if self.on_loop or not self.host.audible:
            return None
        if self._announced is None:
            # Constructed here, resolved on the loop by _deliver_all.
            self._announced = self.host.loop.create_future()
        return self._announced

    def send(self) -> None:
        """Audit the batch's events, watch and schedule its deliveries (never blocks)."""
        host = self.host
        if self.events:
            host.record_many(self.events)
        fresh = self.fresh
        if not fresh:
            return
        # One out-of-band check per policy value, due at the latest request's due time
        # (a check a little late, never early).
        checks: dict[float, tuple[float, list[SessionHost]]] = {}
        for s in fresh:
            after = s.policy.out_of_band_after
            due = s._requests[0].requested_mono + after
            entry = checks.get(after)
            if entry is None:
                checks[after] = (due, [s])
            else:
                entry[1].append(s)
                if due > entry[0]:
                    checks[after] = (due, entry[1])
        for due, group in checks.values():
            host.watch_delivery(
                group[0]._check_delivered if len(group) == 1 else partial(_check_all, group),
                due,
            )
        try:
            if self.on_loop:
                host.loop.call_soon(_deliver_all, fresh, self._announced, context=host.context)
            else:
                host.loop.call_soon_threadsafe(
                    _deliver_all, fresh, self._announced, context=host.context
                )
        except RuntimeError:
            # The loop is closed: nothing of these sessions can still run.
            for s in fresh:
                stop = s._stop
                s._resolve(stop.build_report("after_end", quiescent=True, audit="disabled"))
                stop.close_window()


def interrupt_many(
    host: LoopHost,
    sessions: Sequence[SessionHost],
    reason: str,
    *,
    trigger: str,
    operator: str | None = None,
) -> tuple[InterruptHandle, ...]:
    """Interrupt *sessions* as one batch (``Runtime.interrupt_where``); their handles.

    Any thread; never blocks. Each session gets its own request, stop, handle and audit
    rows, exactly as from ``interrupt()``; what they share is done once: the arguments'
    checks, one request object, the sink hand-over, the out-of-band watch, one loop
    callback and (``SharedStopTimer``) one stop timeout.

    Raises:
        TypeError / ValueError: bad reason, trigger or operator (before any request).
    """
    reason = bound_reason(reason)
    trigger = check_trigger(trigger)
    operator = bound_operator(operator)
    req = InterruptRequest(trigger, reason, operator, time.time(), time.monotonic())
    batch = Batch(host)
    try:
        for s in sessions:
            s._request(req, batch)
    finally:
        batch.send()
    return tuple([s._handle for s in sessions])


def _check_all(sessions: Sequence[SessionHost]) -> None:
    for s in sessions:
        s._check_delivered()


def _deliver_all(sessions: Sequence[SessionHost], announced: asyncio.Future[None] | None) -> None:
    """A batch's one loop callback: every stop's ``interrupt_requested`` is in the sink
    by now (release the stops that wait for it), deliver each, then arm the shared stop
    timeouts."""
    if announced is not None and not announced.done():
        announced.set_result(None)
    timers: dict[float, SharedStopTimer] | None = {} if len(sessions) > 1 else None
    for s in sessions:
        try:
            s._deliver(timers)
        except Exception as exc:  # one session's failure must not spare the others
            s._loop.call_exception_handler(
                {
                    "message": f"kill_switch: delivering the interrupt of {s!r} failed",
                    "exception": exc,
                }
            )
    if timers:
        for timer in timers.values():
            timer.arm()
