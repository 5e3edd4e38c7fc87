"""A session: one agent's run, the unit that ``interrupt()`` stops.

The session is a facade over its parts, each of which an interrupt reaches:

* the **body** (the agent loop) runs in an anyio ``CancelScope`` the interrupt cancels;
* the **planes** (``Plane``): the tool tasks (``_tool_tasks``), the sync tools' worker
  threads (``_threads``), the process trees (``_processes``), the limits' timers
  (``_limits.Ledger``), each seeing the session only as a ``PlaneHost``;
* the **guard** (``_guard``): every later ``call()`` / ``guard()`` is blocked, from any
  thread, once ``_requests`` is non-empty — before the loop has even run the fan-out;
* the **stop** (``_stop``): fan-out, settling, quiescence, the report and its audit.

Invariant: every state transition happens on the loop thread. ``interrupt()`` only
appends to ``_requests`` (atomic under the GIL: the first element wins, with no lock a
signal handler could deadlock on), sets the flag and schedules ``_deliver``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import types
from typing import TYPE_CHECKING, Any, TypeVar, Unpack, cast

import anyio

from . import _block, _processes, _threads
from ._audit import (
    CANCELLED_BEFORE_START,
    INTERRUPT_REPEATED,
    INTERRUPT_REQUESTED,
    SESSION_FINISHED,
    SESSION_STARTED,
    AuditEvent,
    new_id,
)
from ._cleanup import Hook, Transaction, _hook_name, check_hook
from ._current import _current_session
from ._exceptions import Interrupted
from ._guard import Guard, ToolPolicy
from ._handle import InterruptHandle
from ._info import CallInfo, ProcessInfo, SessionInfo, State, ThreadInfo
from ._report import InterruptRequest, StopReport
from ._stop import Stop
from ._tool_tasks import ToolTasks, current_task, tool_name
from ._triggers import bound_operator, bound_reason, check_trigger

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Mapping
    from contextvars import Token

    from ._decision import Decision
    from ._exceptions import ToolBlocked
    from ._limits import Limits, LimitWarning
    from ._plane import LoopHost, P, Plane, PlaneHost
    from ._policy import StopPolicy
    from ._report import CleanupReport
    from ._runtime import Runtime
    from ._sentinel import Sentinel

T = TypeVar("T")

__all__ = ["Session", "ToolPolicy"]


class Session:
    """One agent's run: its body, its tool calls, and the single way to stop them.

    Create it with ``runtime.session(...)`` and enter it with ``async with``. The block
    is the agent loop; leaving it absorbs this session's own interruption (the
    cancellation, and ``Interrupted`` / terminal ``ToolBlocked`` raised because of it).
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
        parent: Session | None,
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
        self._children: list[Session] = []
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
        # The tool plane is first: the fan-out cancels the calls before anything slower.
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
        return self._host.runtime

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
        plane = self._planes.get(_processes.ProcessPlane)
        return plane.info() if isinstance(plane, _processes.ProcessPlane) else ()

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

    # -------------------------------------------------------------- the block

    async def __aenter__(self) -> Session:
        if self._state != "created":
            raise RuntimeError(f"session {self.id} was already entered")
        task = asyncio.current_task()
        if task is None or task.get_loop() is not self._loop:
            raise RuntimeError("a session must be entered on its runtime's event loop")
        self._host.enter(self)
        if self._requests:
            # Interrupted before it started: the body never runs.
            self._deliver()
            report = await self._handle
            first = self._requests[0]
            raise Interrupted(
                first.reason,
                session_id=self.id,
                interrupt_id=self._handle.interrupt_id,
                trigger=first.trigger,
                report=report,
            )
        self._body_task = task
        self._started_at = time.time()
        self._set_state("running")
        self._scope.__enter__()
        self._ctx_token = _current_session.set(self)
        self.record(SESSION_STARTED, details={"labels": dict(self.labels)})
        self._guard.start_limits()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> bool:
        original = exc
        tools = self._tools
        try:
            if self._scope.__exit__(exc_type, exc, tb):
                exc = None
        # The scope raised anew: that exception replaces exc, and is raised (or
        # absorbed, if it is this session's own) by _block.leave below.
        except BaseException as scope_exc:  # noqa: ASYNC103
            exc = scope_exc
        finally:
            if self._ctx_token is not None:
                _current_session.reset(self._ctx_token)
                self._ctx_token = None
            tools.body_done = True
            self._body_task = None

        cancelled_from_outside = False
        if tools.tool_tasks and not self._requests:
            if exc is not None:
                tools.fail()
            # Deliberately not shielded: the structured wait for the tool task group is
            # cancellable from outside, and then cancels the tool tasks and waits for
            # them bounded and shielded itself (see ToolTasks.wait_drained).
            try:
                await tools.wait_drained(self.policy.stop_timeout)  # noqa: ASYNC102
            # Cancelled from outside (an enclosing scope's deadline) while tool tasks
            # ran: the block still ends here — stopped below, so it never lingers as
            # "running" — and that cancellation, which replaces the body's outcome, is
            # raised by _block.leave at the end.
            except BaseException as wait_exc:  # noqa: ASYNC103
                cancelled_from_outside = True
                exc = wait_exc

        exit_stop = False
        if not self._requests and (
            cancelled_from_outside or any(p.busy() for p in self._planes.values())
        ):
            # The block ended (an error, a cancellation from an enclosing scope, or a
            # plain return) while work of it still ran — a process tree, a tool task
            # that would not leave. Nothing of a session outlives its block: stop it
            # through the one entry point, as its enclosing code's doing. The block's
            # own exception still propagates.
            why = "returned" if exc is None else f"exited with {type(exc).__name__}"
            self.interrupt(f"session block {why} while its work still ran", trigger="parent")
            exit_stop = True

        stop = self._stop
        if self._requests:
            # Interrupted before the block ended (a request that raced the natural end
            # and whose delivery is still queued counts: exactly one terminal outcome).
            self._deliver()
            # Every await below is bounded and shielded on its own; this outer bound is
            # the sum of those bounds, so the block can never outlive its policy.
            with anyio.move_on_after(stop.exit_budget(), shield=True):
                await stop.finish(cleanup=True)
                await stop.run_cleanup()  # the stop finished without them (unresponsive)
            self._set_state("terminated")
            self._leave()
            if exit_stop:
                absorbed = exc is None
            else:
                absorbed = _block.absorb(exc, self.id, self.note_secondary)
            return _block.leave(absorbed, exc, original)

        if self._cleanup_hooks:
            with anyio.move_on_after(stop.exit_budget(), shield=True):
                await stop.run_cleanup()
        self._set_state("failed" if (exc is not None or tools.tool_errors) else "finished")
        guard = self._guard
        self.record(
            SESSION_FINISHED,
            details={"state": self._state, "actions": guard.actions, "cost": guard.cost},
        )
        self._leave()
        if tools.tool_errors:
            errors = list(tools.tool_errors)
            if exc is not None:
                errors.insert(0, exc)
            raise BaseExceptionGroup(f"errors in tool tasks of session {self.id}", errors)
        return _block.leave(False, exc, original)

    def _leave(self) -> None:
        self._host.leave(self)
        parent = self.parent
        # A child stays on an interrupted parent's list: the parent's interrupt (from
        # another thread) may have ended this block — its flag wakes a sync tool running
        # in it — before its cascade reached the list. Once the parent has a request,
        # every child that leaves is one the cascade must still see.
        if parent is not None and not self._requests and not parent._requests:
            parent._disown(self)

    def _adopt(self, child: Session) -> None:
        """*child* was created under this session: cascade to it (now, if interrupted)."""
        self._children.append(child)
        if self._requests:
            first = self._requests[0]
            child.interrupt(
                f"parent session {self.id} interrupted: {first.reason}",
                trigger="parent",
                operator=first.operator,
            )

    def _disown(self, child: Session) -> None:
        if child in self._children:
            self._children.remove(child)

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
        req = InterruptRequest(trigger, reason, operator, time.time(), time.monotonic())
        requests = self._requests
        requests.append(req)
        if requests[0] is not req:
            self.record(INTERRUPT_REPEATED, trigger=trigger, reason=reason, operator=operator)
            return self._handle
        # Children first, before our own flag: a sync tool of this session woken by the
        # flag may end this block, and with it the children's, before the cascade reads
        # the list. (A child leaving an interrupted parent stays on its list: _leave.)
        for child in list(self._children):
            child.interrupt(
                f"parent session {self.id} interrupted: {req.reason}",
                trigger="parent",
                operator=req.operator,
            )
        self._flag.set()
        self.record(
            INTERRUPT_REQUESTED, trigger=req.trigger, reason=req.reason, operator=req.operator
        )
        host = self._host
        stop = self._stop
        host.watch_delivery(
            self._check_delivered, req.requested_mono + self.policy.out_of_band_after
        )
        try:
            if host.loop_thread == threading.get_ident():
                self._loop.call_soon(self._deliver, context=host.context)
            else:
                self._loop.call_soon_threadsafe(self._deliver, context=host.context)
        except RuntimeError:
            # The loop is closed: nothing of this session can still run.
            self._resolve(stop.build_report("after_end", quiescent=True, audit="disabled"))
        return self._handle

    def _check_delivered(self) -> None:
        """The loop monitor's thread, ``out_of_band_after`` past the request: if the loop
        has not delivered the interrupt, stop what can be stopped without it."""
        if self._state != "created":
            self._stop.go_out_of_band()

    def _deliver(self) -> None:
        """Fan the interrupt out. Loop thread only; idempotent."""
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
        stop.deliver(first)

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

    # ----------------------------------------------------- guard and limits

    def guard(self, tool: str, args: Mapping[str, Any] | None = None) -> Decision:
        """Check a tool call a framework will run itself; an allowed call counts.

        Never raises: a bad argument or a failing policy blocks. Thread-safe for the
        terminated check; counting is only exact on the loop thread.
        """
        return self._guard.check(tool, args)

    def charge(self, amount: float) -> None:
        """Add *amount* of actual cost not covered by a call's estimate.

        For spend the guard did not see (a model call made outside ``session.call``).
        Counts against this session's and every ancestor's ``max_cost``; spend that
        crosses a limit interrupts the session (trigger ``budget``). Not a checkpoint.

        Raises:
            TypeError / ValueError: *amount* is not a finite number >= 0.
        """
        self._guard.charge(amount)

    def move_deadline(self, seconds: float | None) -> None:
        """Set this session's deadline *seconds* from now (``None``: no deadline).

        A deadline already past interrupts the session at once (trigger ``deadline``).
        Loop thread only; the session must be running.

        Raises:
            RuntimeError: the session is not running, or this is not its loop's thread.
            TypeError / ValueError: *seconds* is not a number >= 0.
        """
        if self._state != "running" or self._requests:
            raise RuntimeError(f"session {self.id} is not running ({self._state})")
        if not self.on_loop_thread():
            raise RuntimeError("move_deadline() must be called on the loop thread")
        self._guard.move_deadline(seconds)

    def budget(self) -> dict[str, Any] | None:
        """A JSON-ready snapshot of this session's ledger (``None``: no limits)."""
        ledger = self._guard.ledger
        return None if ledger is None else ledger.statistics()

    @property
    def alerts(self) -> tuple[Any, ...]:
        """The sentinel alerts audited for this session so far (``Alert`` snapshots)."""
        watch = self._guard.watch
        return () if watch is None else tuple(watch.alerts)

    # ------------------------------------------------------------- tool calls

    async def call(
        self,
        fn: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        tool: str | None = None,
        cost: float = 0.0,
        **kwargs: Any,
    ) -> T:
        """Run an async tool under the guard, so that an interrupt cancels it.

        ``tool`` names the tool for the guard and the audit (default: ``fn.__name__``);
        ``cost`` is added to the session's spend. Works from the body, from tasks inside
        it, and from tasks outside the session's block (there the interrupt surfaces as
        ``Interrupted`` instead of a cancellation). A result that arrives after the
        session was interrupted is dropped and ``Interrupted`` raised instead.

        Raises:
            ToolBlocked: the guard refused the call (``decision.code == "terminated"``
                once the session is interrupted).
            Interrupted: the session was interrupted while the call ran.
        """
        # The one coroutine frame of a guarded call: the guard and the tool plane's
        # bookkeeping are read and written here through their fields (attribute loads,
        # no further calls) — the guard's whole budget is ~100-200 ns.
        name = tool if tool is not None else tool_name(fn)
        guard = self._guard
        decision = guard.admit(name, args, kwargs, cost)
        if decision is not None:
            raise guard.blocked(decision, name)
        tools = self._tools
        meter = guard.meter
        task = current_task(self._loop)
        tools.calls_in_flight += 1
        if task is self._body_task:
            # Fast path: the body runs inside the session's cancel scope, which the
            # interrupt cancels; nothing else to track.
            try:
                if meter is not None:
                    result: T = await meter(fn, args, kwargs, name, cost)
                else:
                    result = await fn(*args, **kwargs)
            finally:
                tools.calls_in_flight -= 1
            if self._requests:
                raise tools.late_result(None)
            return result
        if task is None or task.get_loop() is not self._loop:
            tools.calls_in_flight -= 1
            guard.unreserve(cost)
            raise RuntimeError("session.call() must run on its runtime's event loop")
        inflight = tools.inflight
        inflight[task] = inflight.get(task, 0) + 1
        try:
            if meter is not None:
                result = await meter(fn, args, kwargs, name, cost)
            else:
                result = await fn(*args, **kwargs)
        except BaseException as exc:
            instead = tools.call_cancelled(task, exc)
            if instead is None:
                raise
            # Our own native cancellation, turned into the user-facing exception at the
            # one place that caught it (the call it was aimed at), its count retracted.
            raise instead from exc  # noqa: ASYNC104
        finally:
            tools.calls_in_flight -= 1
            n = inflight[task] - 1
            if n:
                inflight[task] = n
            else:
                del inflight[task]
                if tools.delivered:
                    tools.check_quiet()
        if self._requests:
            raise tools.late_result(task)
        return result

    def wrap(
        self, fn: Callable[..., Awaitable[T]], *, tool: str | None = None
    ) -> Callable[..., Awaitable[T]]:
        """Return *fn* as a guarded tool of this session (``session.call`` on each call)."""
        name = tool if tool is not None else tool_name(fn)

        async def guarded(*args: Any, **kwargs: Any) -> T:
            return await self.call(fn, *args, tool=name, **kwargs)

        guarded.__name__ = name
        guarded.__qualname__ = name
        guarded.__doc__ = fn.__doc__
        return guarded

    def start_soon(
        self,
        fn: Callable[..., Awaitable[Any]],
        /,
        *args: Any,
        tool: str | None = None,
        cost: float = 0.0,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Start a guarded tool call in the session's tool task group.

        The block does not end before its tool tasks do (structured, like a task group):
        the first tool task to fail cancels the body and the other tool tasks, and the
        errors leave the block as an exception group. Results are discarded.

        Raises:
            ToolBlocked: the session is interrupted.
            RuntimeError: the session is not running, or this is not its loop's thread.
        """
        if self._requests:
            tool_label = tool if tool is not None else tool_name(fn)
            raise self._guard.blocked(self._guard.terminal_decision(), tool_label)
        if self._state != "running" or self._tools.body_done:
            raise RuntimeError(f"session {self.id} is not running ({self._state})")
        if not self.on_loop_thread():
            raise RuntimeError("session.start_soon() must be called on the loop thread")
        self._tools.start_soon(fn, args, kwargs, tool, cost, name)

    # ------------------------------------------------ cleanup and rollback

    def on_cleanup(self, fn: Hook, *, name: str | None = None) -> None:
        """Run *fn* when the session ends, however it ends (last registered, first run).

        Shielded and bounded by ``policy.cleanup_timeout`` each; outcomes go to the
        ``StopReport`` and the audit. Sync hooks run in a worker thread.

        Raises:
            TypeError: *fn* is not callable.
            RuntimeError: the session has ended.
        """
        check_hook(fn)
        if self._state in ("terminated", "finished", "failed"):
            raise RuntimeError(f"session {self.id} has ended ({self._state})")
        self._cleanup_hooks.append((_hook_name(fn, name), fn))

    def transaction(self) -> Transaction:
        """Compensations for half-done work, rolled back if the session stops (see
        ``Transaction``)."""
        return Transaction(self)

    # ------------------------------------------- process and thread planes

    async def open_process(
        self,
        command: _processes.Command,
        **options: Unpack[_processes.ProcessArgs],
    ) -> _processes.TrackedProcess:
        """Start *command* in a new process group that this session's interrupt stops.

        Like ``anyio.open_process`` (a ``str`` runs in the shell; ``stdin``, ``stdout``
        and ``stderr`` default to pipes; ``cwd``, ``env``, ``pass_fds``, ``user``,
        ``group``, ``extra_groups``, ``umask`` as there), plus ``escalation``, the
        SIGTERM → SIGKILL policy. A checkpoint before the process starts, none after: a
        started process is always tracked.

        Raises:
            ValueError / TypeError: an empty or malformed command, a bad policy.
            OSError: the command could not be started (``FileNotFoundError``, ...).
            Interrupted: the session was interrupted; nothing was started.
        """
        return await _processes.open_process(self, command, **options)

    async def run_process(
        self,
        command: _processes.Command,
        *,
        input: bytes | None = None,
        check: bool = True,
        **options: Unpack[_processes.ProcessArgs],
    ) -> _processes.CompletedProcess[bytes]:
        """Run *command* to completion in a tracked process group; collect its output.

        Like ``anyio.run_process`` (``stdin`` defaults to none, ``stdout``/``stderr``
        to pipes); returns when the process exits even if a grandchild still holds its
        stdout.

        Raises:
            subprocess.CalledProcessError: *check* and a nonzero exit status.
            Interrupted: the session was interrupted before the process started.
        """
        return await _processes.run_process(self, command, input=input, check=check, **options)

    def track_pid(self, pid: int, *, escalation: _processes.EscalationPolicy | None = None) -> None:
        """Adopt *pid*, started by other means, so that this session's interrupt stops it.

        Raises:
            TypeError / ValueError: not a positive int, or this process itself.
            ProcessLookupError: no such process.
            Interrupted: the session was interrupted.
        """
        _processes.track_pid(self, pid, escalation=escalation)

    async def run_sync(
        self, fn: Callable[..., T], /, *args: Any, tool: str | None = None, cost: float = 0.0
    ) -> T:
        """Run the sync tool *fn* in a worker thread bound to this session.

        A guarded tool call (``tool`` and ``cost`` as for ``call``): inside the thread
        ``ks.check()`` / ``ks.sleep()`` answer for this session. On interrupt the
        awaiting side waits, shielded and bounded, up to ``policy.thread_grace`` for the
        thread to return; past it the thread is abandoned (named in the report, its
        result dropped) and the awaiting side goes on. Keyword arguments: use
        ``functools.partial``.

        Raises:
            ToolBlocked: the guard refused the call; ``decision.code`` is
                ``"terminated"`` once interrupted, ``"thread_cap"`` while the runtime has
                ``policy.max_abandoned_threads`` abandoned threads still running.
            Interrupted: the session was interrupted while the thread ran (from a task
                outside the session's body; the body itself sees its cancellation).
            TypeError: *fn* is not callable, or is a coroutine function.
        """
        return await _threads.run_sync(self, fn, *args, tool=tool, cost=cost)

    # ------------------------------------------- the PlaneHost contract
    # What planes, the ledger, the sentinel's watch and cleanup runs may use of their
    # session (kill_switch._plane.PlaneHost); not meant for agent code.

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
        host.record(
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
        self._tools.tasks.add(task)

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


def current_session() -> Session | None:
    """Return the session whose context the caller runs in, or ``None``."""
    # Only sessions set the variable (a test may set a fake PlaneHost: it gets it back).
    return cast("Session | None", _current_session.get())
