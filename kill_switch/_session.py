"""A session: one agent's run, the unit that ``interrupt()`` stops.

Planes of a stop handled here (see DESIGN.md, "One interrupt, four planes"):

* **scopes** — the body (the agent loop) runs in an anyio ``CancelScope``; the tool plane
  is native asyncio: every task with a tool call in flight is cancelled directly with
  ``Task.cancel()`` and the cancellation is retracted with ``Task.uncancel()`` when the
  call turns it into ``Interrupted`` — the protocol ``asyncio.timeout`` uses. Why not one
  anyio scope per call: entering and leaving a ``CancelScope`` costs ~5.7 µs, five times
  the guard's whole budget, and an anyio task-group cancel of N parked tasks takes 2-2.7x
  raw asyncio while this path takes 0.6-0.7x (benchmarks/bench_fanout.py).
* **threads** — ``_flag`` (a ``threading.Event``) is set synchronously by ``interrupt()``
  in the caller's thread; ``check()`` and ``sleep()`` read it through the context.
* **guard** — ``_requests`` is non-empty from the first ``interrupt()`` on, so every later
  call is blocked, from any thread, before the loop has even run the fan-out.

Invariant: every state transition happens on the loop thread. ``interrupt()`` only
appends to ``_requests`` (atomic under the GIL: the first element wins, with no lock a
signal handler could deadlock on), sets the flag and schedules ``_deliver``.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import types
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import attrs

from . import _processes, _threads
from ._audit import (
    CANCELLED_BEFORE_START,
    ESCALATED,
    INTERRUPT_COMPLETED,
    INTERRUPT_DELIVERED,
    INTERRUPT_REPEATED,
    INTERRUPT_REQUESTED,
    LATE_RESULT,
    LEAKED_TASK,
    LIMIT_EXCEEDED,
    LIMIT_WARNING,
    OUT_OF_BAND,
    SESSION_FINISHED,
    SESSION_STARTED,
    TOOL_BLOCKED,
    AuditEvent,
    new_id,
)
from ._cleanup import Hook, Transaction, _hook_name, check_hook, run_hooks
from ._current import _current_session
from ._decision import ALLOW, Decision, ToolCall
from ._exceptions import Interrupted, LimitExceeded, ToolBlocked
from ._handle import InterruptHandle
from ._info import CallInfo, ProcessInfo, SessionInfo, State, ThreadInfo
from ._limits import (
    Ledger,
    LedgerPlane,
    Limits,
    LimitWarning,
    _current_cost,
)
from ._report import (
    CleanupReport,
    InterruptRequest,
    Latency,
    LeakedTask,
    Outcome,
    StopReport,
)
from ._triggers import bound_operator, bound_reason, check_trigger
from ._validate import non_negative

if TYPE_CHECKING:
    from contextvars import Token

    from ._policy import StopPolicy
    from ._runtime import Runtime
    from ._sentinel import Sentinel, Watch

T = TypeVar("T")

ToolPolicy = Callable[[ToolCall], "Decision | bool | None"]
_Meter = Callable[..., Awaitable[Any]]

#: Blocks raised because this session was (or, by that very block, is being) interrupted:
#: leaving the block absorbs them.
_OWN_BLOCK_CODES = frozenset({"terminated", "budget", "deadline"})

#: Re-delivery of the tool plane's cancellation to calls that swallowed it backs off
#: from the next loop iteration up to this many seconds between rounds.
_REDELIVER_MAX_DELAY = 0.05


class Plane(Protocol):
    """A part of a session that an interrupt must stop (threads, processes, ...)."""

    def deliver(self, request: InterruptRequest) -> None:
        """Start stopping; called once on the loop thread. Must not block or raise."""

    async def settle(self, deadline: float) -> None:
        """Wait until quiet or until *deadline* (``time.monotonic()``). Never raises."""

    def quiescent(self) -> bool:
        """Whether nothing of this plane is still running."""

    def report_fields(self) -> dict[str, Any]:
        """Fields this plane contributes to the ``StopReport``."""

    # Optional: ``busy() -> bool``, whether the plane still runs work (a process) that
    # the block's end must stop; ``force(path)``, stop what can be stopped from any
    # thread without the loop (the out-of-band path and the watchdog).


if sys.version_info >= (3, 12):

    def _current_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
        return asyncio.current_task(loop)

else:
    # On 3.11 asyncio.current_task() is a Python function costing ~0.45 us, a third of
    # the guard's budget; the dict it reads is the one C tasks (and uvloop's) update.
    _current_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] = (
        asyncio.tasks._current_tasks  # type: ignore[attr-defined]  # private on 3.11
    )

    def _current_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
        return _current_tasks.get(loop)


def _busy(plane: Plane) -> bool:
    """Whether *plane* still runs work of its own (optional part of the protocol)."""
    busy = getattr(plane, "busy", None)
    return bool(busy()) if busy is not None else False


def _tool_name(fn: object) -> str:
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else repr(fn)


def _coro_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or repr(coro)


class Session:
    """One agent's run: its body, its tool calls, and the single way to stop them.

    Create it with ``runtime.session(...)`` and enter it with ``async with``. The block
    is the agent loop; leaving it absorbs this session's own interruption (the
    cancellation, and ``Interrupted`` / terminal ``ToolBlocked`` raised because of it).
    """

    __slots__ = (
        "__weakref__",
        "_actions",
        "_blocked_terminal_audited",
        "_body_done",
        "_body_task",
        "_calls_in_flight",
        "_cancels",
        "_children",
        "_cleanup_hooks",
        "_cleanup_reports",
        "_cost",
        "_ctx_token",
        "_delivered_mono",
        "_drained",
        "_failing",
        "_finish_started",
        "_flag",
        "_handle",
        "_inflight",
        "_late_results",
        "_leaked",
        "_ledger",
        "_loop",
        "_meter",
        "_oob_mono",
        "_planes",
        "_quiet",
        "_quiet_mono",
        "_redeliver_delay",
        "_requests",
        "_runtime",
        "_scope",
        "_secondary",
        "_started_at",
        "_state",
        "_stop_timer",
        "_swept",
        "_tasks",
        "_tool_calls_cancelled",
        "_tool_calls_running",
        "_tool_errors",
        "_tool_policy",
        "_tool_tasks",
        "_watch",
        "agent",
        "id",
        "labels",
        "parent",
        "policy",
        "report",
    )

    def __init__(
        self,
        runtime: Runtime,
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
        self._runtime = runtime
        self._loop = runtime._loop
        self.id = session_id
        self.agent = agent
        self.labels: Mapping[str, str] = types.MappingProxyType(dict(labels))
        self.parent = parent
        self.policy = policy
        #: The ``StopReport`` of this session's interrupt, once it has one.
        self.report: StopReport | None = None
        self._tool_policy = tool_policy
        self._state: State = "created"
        self._requests: list[InterruptRequest] = []
        self._handle = InterruptHandle(new_id(), session_id)
        self._flag = threading.Event()
        self._scope = anyio.CancelScope()
        self._body_task: asyncio.Task[Any] | None = None
        self._body_done = False
        self._swept = False
        self._ctx_token: Token[Session | None] | None = None
        self._inflight: dict[asyncio.Task[Any], int] = {}
        self._calls_in_flight = 0
        self._cancels: dict[asyncio.Task[Any], int] = {}
        self._tool_tasks: set[asyncio.Task[Any]] = set()
        self._tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._leaked: dict[asyncio.Task[Any], bool] = {}
        self._children: list[Session] = []
        self._planes: list[Plane] = []
        self._cleanup_hooks: list[tuple[str, Hook]] = []
        self._cleanup_reports: list[CleanupReport] = []
        self._oob_mono: float | None = None
        self._actions = 0
        self._cost = 0.0
        self._started_at: float | None = None
        self._delivered_mono: float | None = None
        self._quiet_mono: float | None = None
        self._quiet: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._stop_timer: asyncio.TimerHandle | None = None
        self._redeliver_delay = 0.0
        self._tool_calls_cancelled = 0
        self._tool_calls_running = 0
        self._late_results = 0
        self._secondary: list[str] = []
        self._tool_errors: list[BaseException] = []
        self._failing = False
        self._finish_started = False
        self._blocked_terminal_audited = False
        # Limits and sentinel (issue 5): None unless configured, so that an unlimited,
        # unwatched session pays one attribute test per call and nothing more.
        parent_ledger = parent._ledger if parent is not None else None
        self._ledger: Ledger | None = None
        if limits is not None or parent_ledger is not None:
            self._ledger = Ledger(
                self,
                limits if limits is not None else Limits(warn_at=None),
                parent_ledger,
                clock=clock,
                on_warning=on_limit_warning,
            )
        self._watch: Watch | None = sentinel.watch(self) if sentinel is not None else None
        self._meter: _Meter | None = self._pick_meter()

    def __repr__(self) -> str:
        return f"<Session {self.id} agent={self.agent!r} state={self.state}>"

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> State:
        """``created`` → ``running`` → ``interrupting`` → ``terminated``, or ``finished``
        / ``failed`` when the block ended by itself."""
        return self._state

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
        return SessionInfo(
            session_id=self.id,
            agent=self.agent,
            labels=dict(self.labels),
            parent_id=self.parent.id if self.parent is not None else None,
            state=self._state,
            started_at=self._started_at,
            actions=self._actions,
            cost=self._cost,
            calls_in_flight=self._calls_in_flight,
            tool_tasks=len(self._tool_tasks),
            interrupt_id=self._handle.interrupt_id if first else None,
            interrupt_trigger=first.trigger if first else None,
            interrupt_reason=first.reason if first else None,
        )

    def calls(self) -> tuple[CallInfo, ...]:
        """Snapshots of the tool calls in flight in tasks other than the body (tool
        tasks, tasks of a task group, tasks outside the block); the body's own call, if
        any, counts in ``info().calls_in_flight`` only."""
        tasks = dict.fromkeys([*self._tool_tasks, *self._inflight])
        return tuple(CallInfo(t.get_name(), _coro_name(t)) for t in tasks if not t.done())

    def processes(self) -> tuple[ProcessInfo, ...]:
        """Snapshots of the processes this session tracks now: running, or being stopped
        (a reaped process is no longer tracked; the ``StopReport`` holds its story).
        Loop thread only."""
        return tuple(
            row for p in self._planes if isinstance(p, _processes.ProcessPlane) for row in p.info()
        )

    def threads(self) -> tuple[ThreadInfo, ...]:
        """Snapshots of the worker threads of this session's sync tools still running.
        Loop thread only."""
        return tuple(
            row for p in self._planes if isinstance(p, _threads.ThreadPlane) for row in p.info()
        )

    def add_plane(self, plane: Plane) -> None:
        """Register a part of the session an interrupt must also stop.

        Raises:
            RuntimeError: the session was already interrupted or has ended.
        """
        if self._requests or self._state in ("terminated", "finished", "failed"):
            raise RuntimeError(f"session {self.id} can no longer take new planes")
        self._planes.append(plane)

    # -------------------------------------------------------------- the block

    async def __aenter__(self) -> Session:
        if self._state != "created":
            raise RuntimeError(f"session {self.id} was already entered")
        task = asyncio.current_task()
        if task is None or task.get_loop() is not self._loop:
            raise RuntimeError("a session must be entered on its runtime's event loop")
        self._runtime._enter_session(self)
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
        self._state = "running"
        self._scope.__enter__()
        self._ctx_token = _current_session.set(self)
        self._record(SESSION_STARTED, details={"labels": dict(self.labels)})
        if self._ledger is not None:
            self._start_limits()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> bool:
        original = exc
        try:
            if self._scope.__exit__(exc_type, exc, tb):
                exc = None
        # The scope raised anew: that exception replaces exc, and is raised (or
        # absorbed, if it is this session's own) by _leave below.
        except BaseException as scope_exc:  # noqa: ASYNC103
            exc = scope_exc
        finally:
            if self._ctx_token is not None:
                _current_session.reset(self._ctx_token)
                self._ctx_token = None
            self._body_done = True
            self._body_task = None

        if self._tool_tasks and not self._requests:
            if exc is not None:
                self._fail()
            # Deliberately not shielded: the structured wait for the tool task group is
            # cancellable from outside, and then cancels the tool tasks and waits for
            # them bounded and shielded itself (see _wait_tool_tasks).
            await self._wait_tool_tasks()  # noqa: ASYNC102

        exit_stop = False
        if not self._requests and any(_busy(p) for p in self._planes):
            # The block ended (an error, a cancellation from an enclosing scope, or a
            # plain return) while a plane still runs work — a process tree, say. Nothing
            # of a session outlives its block: stop it through the one entry point, as
            # its enclosing code's doing. The block's own exception still propagates.
            why = "returned" if exc is None else f"exited with {type(exc).__name__}"
            self.interrupt(f"session block {why} while its work still ran", trigger="parent")
            exit_stop = True

        if self._requests:
            # Interrupted before the block ended (a request that raced the natural end
            # and whose delivery is still queued counts: exactly one terminal outcome).
            self._deliver()
            # Every await below is bounded and shielded on its own; this outer bound is
            # the sum of those bounds, so the block can never outlive its policy.
            with anyio.move_on_after(self._exit_budget(), shield=True):
                await self._finish_stop(cleanup=True)
                if self._cleanup_hooks:  # the stop finished without them (unresponsive)
                    reports = await run_hooks(self, self._cleanup_hooks, "cleanup")
                    self._cleanup_reports.extend(reports)
            self._state = "terminated"
            self._runtime._leave_session(self)
            absorb = exc is None if exit_stop else self._absorb(exc)
            return self._leave(absorb, exc, original)

        if self._cleanup_hooks:
            with anyio.move_on_after(self._exit_budget(), shield=True):
                reports = await run_hooks(self, self._cleanup_hooks, "cleanup")
                self._cleanup_reports.extend(reports)
        self._state = "failed" if (exc is not None or self._tool_errors) else "finished"
        self._record(
            SESSION_FINISHED,
            details={"state": self._state, "actions": self._actions, "cost": self._cost},
        )
        self._runtime._leave_session(self)
        if self._tool_errors:
            errors = list(self._tool_errors)
            if exc is not None:
                errors.insert(0, exc)
            raise BaseExceptionGroup(f"errors in tool tasks of session {self.id}", errors)
        return self._leave(False, exc, original)

    def _exit_budget(self) -> float:
        """The most the block's exit may take: the stop, each cleanup hook, the audit."""
        p = self.policy
        hooks = len(self._cleanup_hooks) + 1
        return p.stop_timeout + hooks * p.cleanup_timeout + p.audit_timeout + 1.0

    @staticmethod
    def _leave(absorb: bool, exc: BaseException | None, original: BaseException | None) -> bool:
        """What ``__aexit__`` returns: an exception the block's own machinery raised in
        place of the body's is raised here (returning False would re-raise the body's)."""
        if absorb or exc is None or exc is original:
            return absorb
        raise exc

    def _is_own(self, exc: BaseException) -> bool:
        """Whether *exc* was raised because this session was interrupted."""
        if isinstance(exc, Interrupted):
            return exc.session_id == self.id
        if isinstance(exc, ToolBlocked):
            return exc.session_id == self.id and exc.decision.code in _OWN_BLOCK_CODES
        return False

    def _absorb(self, exc: BaseException | None) -> bool:
        """Decide what leaves the block of an interrupted session."""
        if exc is None or self._is_own(exc):
            return True
        if isinstance(exc, BaseExceptionGroup):
            # A lambda, not the bound method: 3.11's split() accepts only a function.
            _, rest = exc.split(lambda e: self._is_own(e))
            if rest is None:
                return True
            if rest is not exc:
                raise rest
            return False
        # An exception raised while handling this session's cancellation (a tool that
        # turns cancellation into ValueError, say): the stop wins, the error is kept.
        ctx: BaseException | None = exc.__context__
        while ctx is not None:
            if isinstance(ctx, asyncio.CancelledError) or self._is_own(ctx):
                self._secondary.append(repr(exc))
                return True
            ctx = ctx.__context__
        return False

    # ------------------------------------------------------------- interrupt

    def interrupt(
        self, reason: str, *, trigger: str, operator: str | None = None
    ) -> InterruptHandle:
        """Stop this session: its body, its tool calls, and every plane registered.

        Synchronous, thread-safe and cheap: it records the request and schedules the
        fan-out on the session's event loop; it never blocks and never waits for the
        stop. Idempotent: the first call's reason wins, later ones are kept in the
        report. Await the returned handle (from any loop) for the ``StopReport``.

        Raises:
            TypeError: *reason* or *operator* is not a string, *trigger* not a string.
            ValueError: *trigger* is not a known trigger.
        """
        req = InterruptRequest(
            check_trigger(trigger),
            bound_reason(reason),
            bound_operator(operator),
            time.time(),
            time.monotonic(),
        )
        requests = self._requests
        requests.append(req)
        if requests[0] is not req:
            self._record(
                INTERRUPT_REPEATED,
                trigger=req.trigger,
                reason=req.reason,
                operator=req.operator,
            )
            return self._handle
        # Children first, in the caller's thread, before this session's own flag: what
        # the flag stops synchronously (a sync tool of this session waking in ks.sleep
        # inside a child's block) can end a child's block before the loop runs, and the
        # child must already know why. (A child that leaves meanwhile stays listed; see
        # Runtime._leave_session.)
        for child in list(self._children):
            child.interrupt(
                f"parent session {self.id} interrupted: {req.reason}",
                trigger="parent",
                operator=req.operator,
            )
        self._flag.set()
        self._record(
            INTERRUPT_REQUESTED, trigger=req.trigger, reason=req.reason, operator=req.operator
        )
        monitor = self._runtime._monitor
        if monitor is not None:
            monitor.watch(self, req.requested_mono)
        loop = self._loop
        try:
            if self._runtime._loop_thread == threading.get_ident():
                loop.call_soon(self._deliver, context=self._runtime._context)
            else:
                loop.call_soon_threadsafe(self._deliver, context=self._runtime._context)
        except RuntimeError:
            # The loop is closed: nothing of this session can still run.
            self._handle._set(self._build_report("after_end", quiescent=True, audit="disabled"))
        return self._handle

    def _interrupted_exc(self) -> Interrupted:
        first = self._requests[0]
        return Interrupted(
            first.reason,
            session_id=self.id,
            interrupt_id=self._handle.interrupt_id,
            trigger=first.trigger,
        )

    def _deliver(self) -> None:
        """Fan the interrupt out. Loop thread only; idempotent."""
        if self._delivered_mono is not None:
            return
        self._delivered_mono = time.monotonic()
        first = self._requests[0]
        state = self._state
        if state == "created":
            self._state = "terminated"
            self._runtime._note_terminated(self)
            self._record(CANCELLED_BEFORE_START, trigger=first.trigger, reason=first.reason)
            self._runtime._spawn(self._finish_stop)
            return
        if state in ("finished", "failed"):
            self._runtime._spawn(self._finish_stop)
            return

        self._state = "interrupting"
        self._runtime._note_terminated(self)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        # Calls in flight outside tool tasks, plus every tool task (running a call or
        # not yet started).
        self._tool_calls_cancelled = (
            self._calls_in_flight - self._tool_calls_running + len(self._tool_tasks)
        )
        self._scope.cancel()
        for task in list(self._inflight):
            self._cancel_task(task)
        msg = f"kill_switch: session {self.id} interrupted"
        for task in self._tool_tasks:
            # A tool task ends on this cancellation (it absorbs it): no uncancel
            # bookkeeping needed, unless a nested call() registered it above.
            if task not in self._inflight:
                task.cancel(msg)
        for plane in self._planes:
            try:
                plane.deliver(first)
            except Exception as exc:  # a plane must not stop the others from stopping
                self._secondary.append(f"plane {type(plane).__name__}.deliver: {exc!r}")
        self._record(
            INTERRUPT_DELIVERED,
            trigger=first.trigger,
            details={
                "tool_calls": self._tool_calls_cancelled,
                "children": [c.id for c in self._children],
                "seconds": self._delivered_mono - first.requested_mono,
            },
        )
        self._stop_timer = self._loop.call_later(
            self.policy.stop_timeout, self._on_stop_timeout, context=self._runtime._context
        )
        if self._inflight or self._tool_tasks:
            self._schedule_redeliver()
        self._check_quiet()

    def _cancel_task(self, task: asyncio.Task[Any]) -> None:
        if task.done():
            return
        self._cancels[task] = self._cancels.get(task, 0) + 1
        task.cancel(f"kill_switch: session {self.id} interrupted")

    def _schedule_redeliver(self) -> None:
        delay = self._redeliver_delay
        self._redeliver_delay = min(_REDELIVER_MAX_DELAY, max(0.001, delay * 2))
        if delay == 0.0:
            self._loop.call_soon(self._redeliver, context=self._runtime._context)
        else:
            self._loop.call_later(delay, self._redeliver, context=self._runtime._context)

    def _redeliver(self) -> None:
        """Level-triggered tool plane: a call that swallowed its cancellation and is still
        running is cancelled again, with back-off, until it leaves."""
        if not (self._inflight or self._tool_tasks) or self._handle.done():
            return
        for task in list(self._inflight):
            self._cancel_task(task)
        msg = f"kill_switch: session {self.id} interrupted"
        for task in list(self._tool_tasks):
            if task not in self._inflight:
                task.cancel(msg)
        self._schedule_redeliver()

    def _on_stop_timeout(self) -> None:
        self._stop_timer = None
        if not self._handle.done() and not self._finish_started:
            self._runtime._spawn(self._finish_stop)

    def _check_quiet(self) -> None:
        if (
            self._delivered_mono is not None
            and self._quiet_mono is None
            and self._swept
            and not self._inflight
            and not self._tool_tasks
            and not any(not t.done() for t in self._leaked)
        ):
            self._quiet_mono = time.monotonic()
            if self._quiet is not None and not self._quiet.done():
                self._quiet.set_result(None)

    def _quiescent(self) -> bool:
        return self._quiet_mono is not None and all(p.quiescent() for p in self._planes)

    async def _wait_quiet(self, deadline: float) -> None:
        """Wait (shielded, bounded by *deadline*) until body, tool plane and every other
        plane are quiet; the planes settle concurrently with the body."""

        async def body_and_tools() -> None:
            if self._body_done:
                self._sweep_leaks()
            self._check_quiet()
            if self._quiet_mono is None:
                self._quiet = self._loop.create_future()
                self._check_quiet()
                await self._quiet

        # Only planes with something left to settle get a task: a task group costs
        # ~150 us on the stop's path (benchmarks/bench_threads.py).
        pending = [p for p in self._planes if not p.quiescent()]
        with anyio.move_on_after(max(0.0, deadline - time.monotonic()), shield=True):
            if not pending:
                await body_and_tools()
                return
            async with anyio.create_task_group() as tg:
                for plane in pending:
                    tg.start_soon(plane.settle, deadline)
                await body_and_tools()

    def _sweep_leaks(self) -> None:
        """Cancel tasks created in this session that outlived its structure.

        Runs once the body has exited; quiescence is not declared before it ran.
        """
        self._swept = True
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task.done() or task is current or task in self._tool_tasks:
                continue
            if task in self._leaked:
                continue
            self._leaked[task] = False
            self._cancel_task(task)
            task.add_done_callback(self._leak_done)
            self._record(LEAKED_TASK, details={"task": task.get_name(), "coro": _coro_name(task)})

    def _leak_done(self, task: asyncio.Task[Any]) -> None:
        self._leaked[task] = True
        self._check_quiet()

    async def _finish_stop(self, *, cleanup: bool = False) -> None:
        """Build the report, audit it, resolve the handle. Bounded; runs once.

        With *cleanup*, the session's cleanup hooks run (shielded, each bounded) once
        everything is quiet and before the report is built, so it holds their outcomes.
        """
        if self._finish_started:
            with anyio.move_on_after(self.policy.stop_timeout + 1.0, shield=True):
                await self._handle
            return
        self._finish_started = True
        first = self._requests[0]
        assert self._delivered_mono is not None
        outcome: Outcome
        if self._state == "terminated" and self._started_at is None:
            outcome = "before_start"
        elif self._state in ("finished", "failed"):
            outcome = "after_end"
        else:
            await self._wait_quiet(self._delivered_mono + self.policy.stop_timeout)
            outcome = "stopped" if self._quiescent() else "unresponsive"
            if cleanup and self._cleanup_hooks:
                self._cleanup_reports.extend(await run_hooks(self, self._cleanup_hooks, "cleanup"))
        if self._stop_timer is not None:
            self._stop_timer.cancel()
            self._stop_timer = None
        quiescent = outcome != "unresponsive"
        if outcome == "unresponsive":
            self._record(
                ESCALATED,
                trigger=first.trigger,
                details={
                    "status": "unresponsive",
                    "body_exited": self._body_done,
                    "calls_in_flight": self._calls_in_flight,
                    "tool_tasks": len(self._tool_tasks),
                },
            )
        if self._late_results:
            self._record(LATE_RESULT, details={"count": self._late_results})
        report = self._build_report(outcome, quiescent=quiescent, audit="pending")
        # An unresponsive session is never said to have completed: its last word in
        # the audit is ``escalated``.
        if quiescent:
            self._record(
                INTERRUPT_COMPLETED,
                trigger=first.trigger,
                details={
                    "outcome": outcome,
                    "quiescent": quiescent,
                    "tool_calls_cancelled": report.tool_calls_cancelled,
                    "leaked_tasks": len(report.leaked_tasks),
                    "seconds": report.latency.total,
                },
            )
        status = await self._runtime._flush_audit()
        report = _evolve_audit(report, status)
        self.report = report
        self._handle._set(report)

    def _build_report(self, outcome: Outcome, *, quiescent: bool, audit: Any) -> StopReport:
        first = self._requests[0]
        now = time.monotonic()
        delivered = self._delivered_mono
        extra: dict[str, Any] = {}
        for plane in self._planes:
            extra.update(plane.report_fields())
        return StopReport(
            session_id=self.id,
            agent=self.agent,
            interrupt_id=self._handle.interrupt_id,
            trigger=first.trigger,
            reason=first.reason,
            operator=first.operator,
            requested_at=first.requested_at,
            outcome=outcome,
            quiescent=quiescent,
            later=tuple(self._requests[1:]),
            tool_calls_cancelled=self._tool_calls_cancelled,
            late_results=self._late_results,
            leaked_tasks=tuple(
                LeakedTask(t.get_name(), _coro_name(t), done) for t, done in self._leaked.items()
            ),
            secondary_errors=tuple(self._secondary),
            # Every child still listed was cascaded to (or will be: see interrupt()).
            children=tuple(c.id for c in self._children),
            cleanup=tuple(self._cleanup_reports),
            out_of_band=self._oob_mono is not None,
            audit=audit,
            latency=Latency(
                delivered=None if delivered is None else delivered - first.requested_mono,
                quiescent=(
                    None if self._quiet_mono is None else self._quiet_mono - first.requested_mono
                ),
                total=now - first.requested_mono,
            ),
            **extra,
        )

    # ----------------------------------------------------------------- guard

    def _terminal_decision(self) -> Decision:
        first = self._requests[0]
        return Decision.block(
            f"session interrupted ({first.trigger}): {first.reason}", "terminated"
        )

    def _admit(
        self, tool: str, args: tuple[Any, ...], kwargs: dict[str, Any], cost: float
    ) -> Decision | None:
        """The guard: ``None`` if the call may go ahead (and is counted), else why not."""
        if self._requests:
            return self._terminal_decision()
        state = self._state
        if state != "running":
            if state == "created":
                return Decision.block("session has not started", "not_started")
            return Decision.block(f"session has ended ({state})", "finished")
        if self._tool_policy is not None:
            call = ToolCall(self.id, self.agent, tool, args, kwargs, cost)
            try:
                verdict = self._tool_policy(call)
            except Exception as exc:  # fail closed: a broken policy blocks, it never allows
                verdict = Decision.block(f"tool policy raised {exc!r}", "policy_error")
            if verdict is False:
                verdict = Decision.block("denied by tool policy", "denied")
            if isinstance(verdict, Decision) and not verdict.allowed:
                if self._watch is not None:
                    self._watch.on_denied(tool)
                return verdict
        if cost:
            cost = non_negative("cost", cost)
        # Order of the automatic checks (the determinism rule when several fire on one
        # call): deadline, then budget (actions, cost; this session first, then each
        # ancestor), then the sentinel. The first to interrupt gives the primary reason.
        ledger = self._ledger
        if ledger is not None and ledger.reserve(cost) is not None:
            return self._over_limit(ledger, tool, args, kwargs, cost)
        watch = self._watch
        if watch is not None:
            watch.on_call(tool, args, kwargs, cost)
            if self._requests:
                if ledger is not None:
                    ledger.unreserve(cost)
                return self._terminal_decision()
        self._actions += 1
        if cost:
            self._cost += cost
        return None

    def _blocked(self, decision: Decision, tool: str) -> ToolBlocked:
        code = decision.code
        if code != "terminated" or not self._blocked_terminal_audited:
            if code == "terminated":
                self._blocked_terminal_audited = True
            self._record(TOOL_BLOCKED, reason=decision.reason, details={"tool": tool, "code": code})
        if code == "budget" or code == "deadline":
            return LimitExceeded(decision, session_id=self.id, tool=tool)
        return ToolBlocked(decision, session_id=self.id, tool=tool)

    def _over_limit(
        self,
        ledger: Ledger,
        tool: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        cost: float,
    ) -> Decision:
        """A hard limit refused the call: interrupt for every limit crossed, in the
        fixed order (the first is the primary reason), and block the call."""
        refusals = ledger.refusals(cost)
        for code, reason, owner in refusals:
            self._interrupt_for_limit(code, reason, owner, tool)
        if self._watch is not None:
            # The attempt is part of the stream the sentinel watches (a later reason).
            self._watch.on_call(tool, args, kwargs, cost)
        code, reason, _ = refusals[0]
        return Decision.block(reason, code)

    def _interrupt_for_limit(self, code: str, reason: str, owner: Ledger, tool: str) -> None:
        trigger = "deadline" if code == "deadline" else "budget"
        self._record(
            LIMIT_EXCEEDED,
            trigger=trigger,
            reason=reason,
            details={"tool": tool, "owner": owner.session.id, **owner.statistics()},
        )
        if owner.session is self:
            if code == "deadline":
                owner.fire_deadline()  # exactly once, shared with the loop timer
            else:
                self.interrupt(reason, trigger=trigger)
            return
        # A limit of an ancestor: this session first (so that its own reason is the
        # limit, not the cascade from the ancestor), then the ancestor, and with it
        # everything under it.
        self.interrupt(reason, trigger=trigger)
        if code == "deadline":
            owner.fire_deadline()
        else:
            owner.session.interrupt(reason, trigger=trigger)

    def _pick_meter(self) -> _Meter | None:
        """What runs an admitted call: ``None`` (a plain await, nothing to account for),
        ``_metered`` (limits) or ``_watched`` (a sentinel that wants outcomes)."""
        if self._ledger is not None:
            return self._metered
        if self._watch is not None and self._watch.wants_outcome:
            return self._watched
        return None

    def _start_limits(self) -> None:
        assert self._ledger is not None
        self._ledger.start(self._loop)
        if self._ledger._timers:
            self.add_plane(LedgerPlane(self._ledger))

    def _settle_cost(self, estimate: float, actual: float) -> None:
        ledger = self._ledger
        assert ledger is not None
        if actual != estimate:
            self._cost += actual - estimate
        over = ledger.settle(estimate, actual)
        if over is not None:
            self._interrupt_for_limit(*over, "")

    def _limit_warning(
        self, warning: LimitWarning, callback: Callable[[LimitWarning], None] | None
    ) -> None:
        self._record(
            LIMIT_WARNING,
            reason=f"{warning.limit} at {warning.used:g} of {warning.maximum:g}",
            details=attrs.asdict(warning),
        )
        if callback is not None:
            try:
                callback(warning)
            except Exception as exc:  # a warning must not break the guard; keep the error
                self._secondary.append(f"on_limit_warning: {exc!r}")

    def charge(self, amount: float) -> None:
        """Add *amount* of actual cost not covered by a call's estimate.

        For spend the guard did not see (a model call made outside ``session.call``).
        Counts against this session's and every ancestor's ``max_cost``; spend that
        crosses a limit interrupts the session (trigger ``budget``). Not a checkpoint.

        Raises:
            TypeError / ValueError: *amount* is not a finite number >= 0.
        """
        amount = non_negative("cost", amount)
        self._cost += amount
        if self._ledger is not None:
            over = self._ledger.charge(amount)
            if over is not None:
                self._interrupt_for_limit(*over, "")

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
        if threading.get_ident() != self._runtime._loop_thread:
            raise RuntimeError("move_deadline() must be called on the loop thread")
        if self._ledger is None:
            self._ledger = Ledger(self, Limits(warn_at=None), None, clock=time.monotonic)
            self._meter = self._pick_meter()
        had_plane = bool(self._ledger._timers)
        self._ledger.move_deadline(self._loop, seconds)
        if self._ledger._timers and not had_plane:
            self.add_plane(LedgerPlane(self._ledger))

    def budget(self) -> dict[str, Any] | None:
        """A JSON-ready snapshot of this session's ledger (``None``: no limits)."""
        return None if self._ledger is None else self._ledger.statistics()

    @property
    def alerts(self) -> tuple[Any, ...]:
        """The sentinel alerts audited for this session so far (``Alert`` snapshots)."""
        return () if self._watch is None else tuple(self._watch.alerts)

    async def _metered(
        self,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        tool: str,
        cost: float,
    ) -> T:
        """Run one admitted call with its timeout, cost reconciliation and outcome."""
        ledger = self._ledger
        assert ledger is not None
        # The actual cost the tool reports (report_cost) lands in this cell.
        cell: list[float | None] = [None]
        token = _current_cost.set(cell)
        error: BaseException | None = None
        try:
            if ledger.timed:
                timeout = ledger.timeouts.get(tool, ledger.default_timeout)
                if timeout is not None:
                    # asyncio.timeout, not anyio.fail_after: a CancelScope costs ~5.7 µs
                    # per call; asyncio.timeout uses the same cancel/uncancel protocol
                    # as the tool plane and cancels this call only.
                    async with asyncio.timeout(timeout):
                        return await fn(*args, **kwargs)
            return await fn(*args, **kwargs)
        except Exception as exc:
            error = exc
            raise
        finally:
            _current_cost.reset(token)
            actual = cell[0]
            if actual is None or actual == cost:
                # Spend + reserved unchanged: nothing to cross. Ledger.settle inlined
                # for a root ledger (the hot path).
                if ledger._single:
                    ledger.reserved -= cost
                    ledger.spent += cost
                else:
                    ledger.settle(cost, cost)
            else:
                self._settle_cost(cost, actual)
            watch = self._watch
            if watch is not None and watch.wants_outcome:
                watch.on_outcome(tool, error)

    async def _watched(
        self,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        tool: str,
        cost: float,
    ) -> T:
        """Run one admitted call of a session with a sentinel but no limits."""
        watch = self._watch
        assert watch is not None
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            watch.on_outcome(tool, exc)
            raise
        watch.on_outcome(tool, None)
        return result

    def guard(self, tool: str, args: Mapping[str, Any] | None = None) -> Decision:
        """Check a tool call a framework will run itself; an allowed call counts.

        Never raises: a bad argument or a failing policy blocks. Thread-safe for the
        terminated check; counting is only exact on the loop thread.
        """
        try:
            kwargs = dict(args) if args is not None else {}
            if not isinstance(tool, str):
                return Decision.block(
                    f"tool name must be a str, not {type(tool).__name__}", "bad_request"
                )
            decision = self._admit(tool, (), kwargs, 0.0)
        except Exception as exc:  # guard() never raises, by contract
            return Decision.block(f"guard failed: {exc!r}", "guard_error")
        if decision is None:
            return ALLOW
        self._blocked(decision, tool)
        return decision

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
        name = tool if tool is not None else _tool_name(fn)
        decision = self._admit(name, args, kwargs, cost)
        if decision is not None:
            raise self._blocked(decision, name)
        task = _current_task(self._loop)
        self._calls_in_flight += 1
        if task is self._body_task:
            # Fast path: the body runs inside the session's cancel scope, which the
            # interrupt cancels; nothing else to track.
            try:
                if self._meter is not None:
                    result: T = await self._meter(fn, args, kwargs, name, cost)
                else:
                    result = await fn(*args, **kwargs)
            finally:
                self._calls_in_flight -= 1
            if self._requests:
                self._late_results += 1
                raise self._interrupted_exc()
            return result
        if task is None or task.get_loop() is not self._loop:
            self._calls_in_flight -= 1
            if self._ledger is not None:
                self._ledger.unreserve(cost)
            raise RuntimeError("session.call() must run on its runtime's event loop")
        inflight = self._inflight
        inflight[task] = inflight.get(task, 0) + 1
        try:
            if self._meter is not None:
                result = await self._meter(fn, args, kwargs, name, cost)
            else:
                result = await fn(*args, **kwargs)
        except BaseException as exc:
            ours = self._cancels.pop(task, 0) if self._cancels else 0
            if not ours:
                raise
            for _ in range(ours):
                task.uncancel()
            if not self._requests or task.cancelling():
                # Not an interrupt (a failing tool task cancelled its siblings), or an
                # enclosing scope cancels this task too: that cancellation is not ours
                # to turn into anything else.
                raise
            if not isinstance(exc, asyncio.CancelledError):
                self._secondary.append(repr(exc))
            # Our own native cancellation, turned into the user-facing exception at the
            # one place that caught it (the call it was aimed at), its count retracted.
            raise self._interrupted_exc() from exc  # noqa: ASYNC104
        finally:
            self._calls_in_flight -= 1
            n = inflight[task] - 1
            if n:
                inflight[task] = n
            else:
                del inflight[task]
                if self._delivered_mono is not None:
                    self._check_quiet()
        if self._requests:
            ours = self._cancels.pop(task, 0)
            for _ in range(ours):
                task.uncancel()
            self._late_results += 1
            raise self._interrupted_exc()
        return result

    def wrap(
        self, fn: Callable[..., Awaitable[T]], *, tool: str | None = None
    ) -> Callable[..., Awaitable[T]]:
        """Return *fn* as a guarded tool of this session (``session.call`` on each call)."""
        name = tool if tool is not None else _tool_name(fn)

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
            tool_name = tool if tool is not None else _tool_name(fn)
            raise self._blocked(self._terminal_decision(), tool_name)
        if self._state != "running" or self._body_done:
            raise RuntimeError(f"session {self.id} is not running ({self._state})")
        if threading.get_ident() != self._runtime._loop_thread:
            raise RuntimeError("session.start_soon() must be called on the loop thread")
        task = self._loop.create_task(
            self._tool_task(fn, args, kwargs, tool, cost),
            name=name or f"kill_switch tool {tool or _tool_name(fn)}",
        )
        self._tool_tasks.add(task)
        task.add_done_callback(self._tool_task_done)

    async def _tool_task(
        self,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        tool: str | None,
        cost: float,
    ) -> None:
        # The tool runs here directly, not through call(): one coroutine frame and no
        # Interrupted built per task only to be absorbed, and the bookkeeping is done
        # in this frame rather than in a done callback — together ~3 us per task on an
        # interrupt's way out (benchmarks/bench_fanout.py).
        task = _current_task(self._loop)
        assert task is not None
        task.remove_done_callback(self._tool_task_done)  # only for never-started tasks
        error: BaseException | None = None
        try:
            name = tool if tool is not None else _tool_name(fn)
            decision = self._admit(name, args, kwargs, cost)
            if decision is not None:
                if self._requests:
                    return  # blocked because the session is terminated: nothing to run
                raise self._blocked(decision, name)
            self._calls_in_flight += 1
            self._tool_calls_running += 1
            try:
                if self._meter is not None:
                    await self._meter(fn, args, kwargs, name, cost)
                else:
                    await fn(*args, **kwargs)
            finally:
                self._calls_in_flight -= 1
                self._tool_calls_running -= 1
            if self._requests:
                self._late_results += 1  # the result is discarded anyway: count it
        # Absorbed: this task group's own cancellation (the task ends here).
        except asyncio.CancelledError:  # noqa: ASYNC103
            if not (self._requests or self._failing):
                raise
        except (Interrupted, ToolBlocked) as exc:
            if not self._is_own(exc):
                error = exc
        except BaseException as exc:  # kept, and raised at the block's exit as a group
            if self._requests and isinstance(exc.__context__, asyncio.CancelledError):
                # A tool that turned the interrupt's cancellation into another error.
                self._secondary.append(repr(exc))
            else:
                error = exc
        finally:
            self._tool_tasks.discard(task)
            self._cancels.pop(task, None)
            if error is not None:
                self._tool_errors.append(error)
                self._fail()
            if not self._tool_tasks:
                drained = self._drained
                if drained is not None and not drained.done():
                    drained.set_result(None)
            if self._delivered_mono is not None:
                self._check_quiet()

    def _tool_task_done(self, task: asyncio.Task[Any]) -> None:
        """A tool task cancelled before its first step (its coroutine never ran)."""
        self._tool_tasks.discard(task)
        self._cancels.pop(task, None)
        if not self._tool_tasks and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._check_quiet()

    def _fail(self) -> None:
        """A tool task failed (or the body did): cancel the rest, as a task group does."""
        if self._failing:
            return
        self._failing = True
        if not self._body_done:
            self._scope.cancel()
        for t in self._tool_tasks:
            self._cancel_task(t)

    async def _wait_tool_tasks(self) -> None:
        """Wait for the tool task group to drain (the block's structured end).

        A checkpoint. Cancelled from outside, it cancels the tool tasks and waits for
        them (shielded, bounded by the stop timeout) before letting the cancellation on.
        """
        if not self._tool_tasks:
            return
        # Resolved when the tool tasks drain, or by _deliver: once interrupted, the
        # wait is the stop's, bounded by the stop timeout (an unresponsive tool task
        # must not make the block unkillable).
        self._drained = self._loop.create_future()
        try:
            await asyncio.shield(self._drained)
        except BaseException:
            for t in self._tool_tasks:
                self._cancel_task(t)
            with anyio.move_on_after(self.policy.stop_timeout, shield=True):
                await self._drained
            raise

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

    def check(self) -> None:
        """Raise ``Interrupted`` if this session was interrupted. Any thread; a fence
        for commit points (nothing commits after the kill).

        Raises:
            Interrupted: the session was interrupted.
        """
        if self._requests:
            raise self._interrupted_exc()

    # -------------------------------------------------------- out of band

    def _go_out_of_band(self) -> None:
        """The loop did not deliver the interrupt in time (the monitor's thread)."""
        if self._oob_mono is not None or self._delivered_mono is not None:
            return
        self._oob_mono = time.monotonic()
        first = self._requests[0]
        self._record(
            OUT_OF_BAND,
            trigger=first.trigger,
            details={
                "seconds_since_request": self._oob_mono - first.requested_mono,
                "planes": [type(p).__name__ for p in self._planes],
            },
        )
        self._force_planes("out_of_band")

    def _force_planes(self, path: str) -> None:
        """Stop, from any thread, every plane that can be stopped without the loop."""
        for plane in list(self._planes):
            force = getattr(plane, "force", None)
            if force is None:
                continue
            try:
                force(path)
            except Exception as exc:  # one plane's failure must not spare the others
                self._secondary.append(f"plane {type(plane).__name__}.force: {exc!r}")

    # ------------------------------------------- process plane entry points
    # (kill_switch._processes implements them; keep this section thin.)

    async def open_process(
        self,
        command: _processes.Command,
        *,
        stdin: _processes.StdIO = _processes.PIPE,
        stdout: _processes.StdIO = _processes.PIPE,
        stderr: _processes.StdIO = _processes.PIPE,
        cwd: _processes.PathArg = None,
        env: Mapping[str, str] | None = None,
        pass_fds: _processes.Fds = (),
        user: str | int | None = None,
        group: str | int | None = None,
        extra_groups: _processes.GroupList = None,
        umask: int = -1,
        escalation: _processes.EscalationPolicy | None = None,
    ) -> _processes.TrackedProcess:
        """Start *command* in a new process group that this session's interrupt stops.

        Like ``anyio.open_process`` (a ``str`` runs in the shell). A checkpoint before
        the process starts, none after: a started process is always tracked.

        Raises:
            ValueError / TypeError: an empty or malformed command, a bad policy.
            OSError: the command could not be started (``FileNotFoundError``, ...).
            Interrupted: the session was interrupted; nothing was started.
        """
        return await _processes.open_process(
            self,
            command,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            env=env,
            pass_fds=pass_fds,
            user=user,
            group=group,
            extra_groups=extra_groups,
            umask=umask,
            escalation=escalation,
        )

    async def run_process(
        self,
        command: _processes.Command,
        *,
        input: bytes | None = None,
        stdin: _processes.StdIO = None,
        stdout: _processes.StdIO = _processes.PIPE,
        stderr: _processes.StdIO = _processes.PIPE,
        check: bool = True,
        cwd: _processes.PathArg = None,
        env: Mapping[str, str] | None = None,
        pass_fds: _processes.Fds = (),
        user: str | int | None = None,
        group: str | int | None = None,
        extra_groups: _processes.GroupList = None,
        umask: int = -1,
        escalation: _processes.EscalationPolicy | None = None,
    ) -> _processes.CompletedProcess[bytes]:
        """Run *command* to completion in a tracked process group; collect its output.

        Like ``anyio.run_process``; returns when the process exits even if a grandchild
        still holds its stdout.

        Raises:
            subprocess.CalledProcessError: *check* and a nonzero exit status.
            Interrupted: the session was interrupted before the process started.
        """
        return await _processes.run_process(
            self,
            command,
            input=input,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            check=check,
            cwd=cwd,
            env=env,
            pass_fds=pass_fds,
            user=user,
            group=group,
            extra_groups=extra_groups,
            umask=umask,
            escalation=escalation,
        )

    def track_pid(self, pid: int, *, escalation: _processes.EscalationPolicy | None = None) -> None:
        """Adopt *pid*, started by other means, so that this session's interrupt stops it.

        Raises:
            TypeError / ValueError: not a positive int, or this process itself.
            ProcessLookupError: no such process.
            Interrupted: the session was interrupted.
        """
        _processes.track_pid(self, pid, escalation=escalation)

    # -------------------------------------------- thread plane entry points
    # (kill_switch._threads implements them; keep this section thin.)

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

    # ----------------------------------------------------------------- audit

    def _record(self, kind: str, **fields: Any) -> None:
        runtime = self._runtime
        if runtime._sink is None and not runtime._listeners:
            return  # nobody to tell: building the event would be the interrupt's cost
        runtime._record(
            AuditEvent(
                kind,
                self.id,
                agent=self.agent,
                interrupt_id=self._handle.interrupt_id if self._requests else None,
                **fields,
            )
        )


def _evolve_audit(report: StopReport, status: Any) -> StopReport:
    return attrs.evolve(report, audit=status)
