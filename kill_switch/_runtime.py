"""The runtime: the process's inventory of agent sessions, its audit sink, and the
service tasks that finish stops."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio

from ._loop_monitor import LoopMonitor
from ._planes import _adopt
from ._planes._context import _current_session
from ._planes._pool import install as install_pool
from ._planes._pool import service_threads
from ._sentinel import Sentinel
from ._session import Session
from ._session_host import interrupt_many
from ._vocabulary._audit_event import (
    SESSION_REFUSED,
    STICKY_KINDS,
    AuditEvent,
    AuditSink,
    BatchAuditSink,
    DurableAuditSink,
)
from ._vocabulary._exceptions import SessionRefused
from ._vocabulary._limits import Limits, LimitWarning
from ._vocabulary._policy import StopPolicy
from ._vocabulary._selector import Selector
from ._vocabulary._triggers import bound_text

if TYPE_CHECKING:
    from types import ModuleType

    from ._guard import ToolPolicy
    from ._vocabulary._handle import InterruptHandle
    from ._vocabulary._report import AuditStatus
    from ._vocabulary._snapshots import SessionInfo
    from .fleet import Fleet
    from .fleet._link import Link

T = TypeVar("T")

_MAX_AGENT = 200
_MAX_LABELS = 64


class _SwitchInterval:
    """The interpreter's switch interval while stops are in flight (process-wide).

    Each stop in flight holds a claim; the shortest interval claimed applies, and the
    interval found before the first claim is put back when the last one is released. A
    value other code set meanwhile is the one put back instead.
    """

    def __init__(self) -> None:
        # Reentrant: interrupt() claims, and may run in a signal handler on a thread
        # that is releasing a claim.
        self._lock = threading.RLock()
        # Claims counted by interval: N stops in flight (interrupt_all) cost O(1) each,
        # not a scan of N claims.
        self._claims: dict[float, int] = {}
        self._saved = self._applied = sys.getswitchinterval()

    def claim(self, interval: float) -> None:
        with self._lock:
            claims = self._claims
            claims[interval] = claims.get(interval, 0) + 1
            self._apply()

    def release(self, interval: float) -> None:
        with self._lock:
            claims = self._claims
            left = claims[interval] - 1
            if left:
                claims[interval] = left
            else:
                del claims[interval]
            self._apply()

    def _apply(self) -> None:
        current = sys.getswitchinterval()
        if current != self._applied:
            self._saved = current  # set by other code: the value to put back at the end
        want = min(self._claims) if self._claims else self._saved
        if want != current:
            sys.setswitchinterval(want)
        self._applied = sys.getswitchinterval()  # read back: microsecond resolution


_switch_interval = _SwitchInterval()


class _StopWindow:
    """One stop in flight, as its runtime sees it (the ``StopWindow`` contract).

    Its session's events reach the listeners at once but the sink only together, when
    the stop hands them over (one group commit instead of one per loop iteration);
    sticky kinds (a kill is final) go to the sink at once. It holds the stop's claim on
    the switch interval until closed.
    """

    __slots__ = ("_events", "_interval", "_lock", "_runtime")

    def __init__(self, runtime: Runtime, switch_interval: float | None) -> None:
        self._runtime = runtime
        self._lock = threading.RLock()  # reentrant: interrupt() may run in a signal handler
        self._events: list[AuditEvent] | None = []
        self._interval = switch_interval
        if switch_interval is not None:
            _switch_interval.claim(switch_interval)
        runtime._windows.add(self)

    def record(self, event: AuditEvent) -> None:
        runtime = self._runtime
        if event.kind not in STICKY_KINDS:
            with self._lock:
                held = self._events
                if held is not None:
                    held.append(event)
            if held is not None:
                runtime._tell(event)
                return
        runtime._record(event)

    def hand_over(self) -> None:
        # Under the lock: an event recorded meanwhile by another thread waits, and so
        # reaches the sink after the held ones, in order.
        with self._lock:
            held, self._events = self._events, None
            if held:
                self._runtime._to_sink(held)

    def close(self) -> None:
        self.hand_over()
        with self._lock:
            interval, self._interval = self._interval, None
        if interval is not None:
            _switch_interval.release(interval)
        self._runtime._windows.discard(self)


def _fleet_link() -> ModuleType:
    from .fleet import _link  # lazy: fleet control only when a runtime joins a fleet

    return _link


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise TypeError(f"labels must be a mapping of str to str, not {type(labels).__name__}")
    if len(labels) > _MAX_LABELS:
        raise ValueError(f"at most {_MAX_LABELS} labels, got {len(labels)}")
    out: dict[str, str] = {}
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"labels must map str to str, got {k!r}: {v!r}")
        if not k:
            raise ValueError("label names must not be empty")
        out[bound_text(k, "label name", 100)] = bound_text(v, "label value", 200)
    return out


class Runtime:
    """The process's kill switch: an inventory of sessions and where their audit goes.

    Use it as an async context manager on an asyncio event loop (uvloop included)::

        async with Runtime(audit=sink) as runtime:
            async with runtime.session("researcher") as session:
                ...

    Leaving the block interrupts every session still running (trigger ``shutdown``) and
    waits, bounded by the policy's stop timeout, for them to stop.

    ``fleet`` (a ``Fleet`` or a ``redis://`` URL) joins a fleet: see ``kill_switch.fleet``.
    """

    def __init__(
        self,
        *,
        audit: AuditSink | str | os.PathLike[str] | None = None,
        policy: StopPolicy | None = None,
        track_tasks: bool = True,
        fleet: Fleet | str | None = None,
    ) -> None:
        if isinstance(audit, (str, os.PathLike)):
            from ._audit._sqlite import SqliteAudit  # lazy: aiosqlite only when asked for

            audit = SqliteAudit(audit)
        if audit is not None and not isinstance(audit, AuditSink):
            raise TypeError(
                f"audit must be an AuditSink, a database path or None, not {type(audit).__name__}"
            )
        if policy is not None and not isinstance(policy, StopPolicy):
            raise TypeError(f"policy must be a StopPolicy, not {type(policy).__name__}")
        self._sink = audit
        # A sink that takes several events in one call gets a batch with one wake-up.
        self._sink_many = audit.record_many if isinstance(audit, BatchAuditSink) else None
        self.policy = policy if policy is not None else StopPolicy()
        self._track_tasks = track_tasks
        self._sessions: dict[str, Session] = {}
        self._terminated: set[str] = set()
        self._service: set[asyncio.Task[Any]] = set()
        self._listeners: tuple[Callable[[AuditEvent], None], ...] = ()
        #: Stops in flight (``_StopWindow``): closed by the stop, or at exit at the latest.
        self._windows: set[_StopWindow] = set()
        self._monitor: LoopMonitor | None = None
        self._entered = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set on entry
        self._loop_thread = 0
        self._context = contextvars.copy_context()
        self._factory: Callable[..., asyncio.Task[Any]] | None = None
        self._prev_factory: Any = None
        # Fleet control (kill_switch.fleet; redis-py is imported only when one is given).
        self._fleet = None if fleet is None else _fleet_link().check(fleet)
        self._fleet_link: Link | None = None
        self._host = _RuntimeHost(self)

    # --------------------------------------------------------------- lifetime

    async def __aenter__(self) -> Runtime:
        if self._entered:
            raise RuntimeError("a Runtime can be entered once")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            backend = "trio" if "trio" in sys.modules else "a non-asyncio event loop"
            raise RuntimeError(
                f"kill_switch needs the asyncio backend (uvloop included), not {backend}: "
                "its tool plane cancels asyncio tasks directly and its audit log uses "
                "aiosqlite, which runs only on asyncio"
            ) from None
        self._entered = True
        # Processes a session's code starts by other means are seen, and attributed.
        _adopt.install()
        if self._fleet is not None:  # fleet: join (loads sticky kills) or refuse to start
            self._fleet_link = _fleet_link().Link(self._fleet, self, self._record, self._sink)
            await self._fleet_link.connect()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        ctx = contextvars.copy_context()
        ctx.run(_current_session.set, None)
        self._context = ctx
        if self._sink is not None:
            await self._sink.__aenter__()
            if isinstance(self._sink, DurableAuditSink):  # a kill is sticky
                self._terminated |= await self._sink.terminated_session_ids()
        if self._track_tasks:
            self._install_task_factory()
        # asyncio.to_thread / run_in_executor(None, ...) work of a session on its thread
        # plane (kept installed: outside a session it is a plain pool).
        install_pool(loop)
        self._monitor = LoopMonitor()
        # Never runs a session's work: a stop's search for such threads skips it.
        service_threads.add(self._monitor.ident)
        host = self._host
        host.loop, host.loop_thread, host.context = loop, self._loop_thread, ctx
        host.monitor = self._monitor
        if self._fleet_link is not None:  # fleet: heartbeat and command listener
            self._fleet_link.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            live = [s for s in self._sessions.values() if s.state != "created"]
            handles = interrupt_many(self._host, live, "runtime closing", trigger="shutdown")
            with anyio.move_on_after(self.policy.stop_timeout + 1.0, shield=True):
                for h in handles:
                    await h
                while self._service:
                    await asyncio.wait(set(self._service))
        finally:
            self._closed = True
            self._uninstall_task_factory()
            if self._monitor is not None:
                service_threads.discard(self._monitor.ident)
                self._monitor.close()
            for window in list(self._windows):
                window.close()  # a stop that never finished: its events, its interval
            if self._fleet_link is not None:  # fleet: leave it before the audit closes
                with anyio.move_on_after(self.policy.stop_timeout + 1.0, shield=True):
                    await self._fleet_link.close()
            if self._sink is not None:
                with anyio.move_on_after(self.policy.stop_timeout, shield=True):
                    await self._sink.__aexit__(*exc_info)

    def _install_task_factory(self) -> None:
        loop = self._loop
        prev = loop.get_task_factory()

        def factory(
            loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
        ) -> asyncio.Task[Any]:
            if prev is not None:
                # typeshed says a factory returns a Future; create_task needs a Task.
                task: asyncio.Task[Any] = prev(loop, coro, **kwargs)  # type: ignore[assignment]
            else:
                task = asyncio.Task(coro, loop=loop, **kwargs)
            ctx = kwargs.get("context")
            session = ctx.get(_current_session) if ctx is not None else _current_session.get()
            if session is not None and not self._closed:
                # A WeakSet, not a set plus a done callback: the callback cost ~1.5 us
                # per task on every interrupt's way out (benchmarks/bench_fanout.py).
                session.note_task(task)
            return task

        self._prev_factory = prev
        self._factory = factory
        loop.set_task_factory(factory)  # type: ignore[arg-type]  # typeshed lags **kwargs

    def _uninstall_task_factory(self) -> None:
        if self._factory is not None and self._loop.get_task_factory() is self._factory:
            self._loop.set_task_factory(self._prev_factory)
        self._factory = None

    # ---------------------------------------------------------------- sessions

    def session(
        self,
        agent: str,
        *,
        labels: Mapping[str, str] | None = None,
        session_id: str | None = None,
        parent: Session | None = None,
        policy: StopPolicy | None = None,
        tool_policy: ToolPolicy | None = None,
        limits: Limits | None = None,
        sentinel: Sentinel | None = None,
        on_limit_warning: Callable[[LimitWarning], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Session:
        """Create a session for *agent*; enter it with ``async with``.

        ``limits`` bound its actions, cost and duration (a child also spends from every
        ancestor's limits); ``tool_policy`` (a callable over ``ToolCall``, or
        ``ToolRules``) allows or denies each call; ``sentinel`` watches its stream of
        calls; ``on_limit_warning`` is called when a soft threshold is crossed;
        ``clock`` is the monotonic clock the limits read (tests inject one).

        Raises:
            TypeError / ValueError: a bad agent name, label, id, parent, policy, limits
                or sentinel.
            SessionRefused: *session_id* was terminated earlier (a kill is sticky) or is
                already running.
            RuntimeError: the runtime is not running.
        """
        if not self._entered or self._closed:
            raise RuntimeError("the runtime is not running (use `async with Runtime()`)")
        if not isinstance(agent, str) or not agent:
            raise TypeError(f"agent must be a non-empty str, got {agent!r}")
        agent = bound_text(agent, "agent", _MAX_AGENT)
        checked = _check_labels(labels)
        if session_id is None:
            from ._vocabulary._audit_event import new_id

            session_id = new_id()
        elif not isinstance(session_id, str) or not session_id or len(session_id) > 200:
            raise ValueError(f"session_id must be a non-empty str of <= 200 chars: {session_id!r}")
        if parent is not None and (not isinstance(parent, Session) or parent.runtime is not self):
            raise ValueError("parent must be a session of this runtime")
        if policy is not None and not isinstance(policy, StopPolicy):
            raise TypeError(f"policy must be a StopPolicy, not {type(policy).__name__}")
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"limits must be a Limits, not {type(limits).__name__}")
        if sentinel is not None and not isinstance(sentinel, Sentinel):
            raise TypeError(f"sentinel must be a Sentinel, not {type(sentinel).__name__}")
        if tool_policy is not None and not callable(tool_policy):
            raise TypeError("tool_policy must be callable")
        self._refuse_if_taken(session_id, agent)
        if self._fleet_link is not None:  # fleet: a killed id or a banned agent/label
            self._fleet_link.refuse(session_id, agent, checked)
        session = Session(
            self._host,
            agent,
            session_id=session_id,
            labels=checked,
            parent=parent,
            policy=policy if policy is not None else self.policy,
            tool_policy=tool_policy,
            limits=limits,
            sentinel=sentinel,
            on_limit_warning=on_limit_warning,
            clock=clock,
        )
        return session

    def _refuse_if_taken(self, session_id: str, agent: str) -> None:
        why = None
        if session_id in self._terminated:
            why = f"session {session_id} was terminated; a kill is final"
        elif session_id in self._sessions:
            why = f"session {session_id} is already running"
        if why is not None:
            self._record(AuditEvent(SESSION_REFUSED, session_id, agent=agent, reason=why))
            raise SessionRefused(why)

    def _enter_session(self, session: Session) -> None:
        if session.id not in self._terminated or session.interrupted:
            if self._sessions.get(session.id, session) is not session:
                self._refuse_if_taken(session.id, session.agent)
            self._sessions[session.id] = session
            return
        self._refuse_if_taken(session.id, session.agent)

    def _leave_session(self, session: Session) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    def sessions(self) -> tuple[SessionInfo, ...]:
        """Snapshots of every session currently entered (running or stopping)."""
        return tuple(s.info() for s in list(self._sessions.values()))

    def get(self, session_id: str) -> Session | None:
        """The live session with this id, or ``None``."""
        return self._sessions.get(session_id)

    def interrupt_all(
        self, reason: str, *, trigger: str, operator: str | None = None
    ) -> tuple[InterruptHandle, ...]:
        """Interrupt every live session. Thread-safe; never blocks."""
        return self.interrupt_where(reason, trigger=trigger, operator=operator)

    def interrupt_where(
        self,
        reason: str,
        *,
        trigger: str,
        operator: str | None = None,
        agent: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> tuple[InterruptHandle, ...]:
        """Interrupt the live sessions of *agent* and/or carrying every one of *labels*.

        Thread-safe; never blocks. With neither filter it interrupts them all. Each
        session gets what ``interrupt()`` gives it (its own handle, request, audit rows
        and cascade to its children); the batch shares the rest: one audit hand-over for
        their ``interrupt_requested`` events and one loop callback delivering every stop
        (one ``call_soon_threadsafe`` from another thread, whatever the number).

        Raises:
            TypeError / ValueError: bad reason, trigger, operator or filter (checked
                even when no session matches).
        """
        wanted = Selector(agent, _check_labels(labels))
        targets = [s for s in list(self._sessions.values()) if wanted.matches(s.agent, s.labels)]
        return interrupt_many(self._host, targets, reason, trigger=trigger, operator=operator)

    # ------------------------------------------------------------------ audit

    @property
    def audit(self) -> AuditSink | None:
        """Where this runtime's audit events go (``None``: nowhere). Read-only."""
        return self._sink

    def record(self, event: AuditEvent) -> None:
        """Record *event* (an operator's action, say) in this runtime's audit: the sink
        and every listener. Any thread; never blocks; never raises for a failing sink
        or listener (the failure is reported on stderr)."""
        self._record(event)

    async def on_loop(self, fn: Callable[[], T], within: float) -> T:
        """Run *fn* on this runtime's event loop and return its result; for code on
        another loop or thread (the control plane). A checkpoint; not shielded.

        Raises:
            TimeoutError: the loop did not run *fn* within *within* seconds (blocked).
            RuntimeError: the runtime is not running or its loop is closed.
            Exception: whatever *fn* raised.
        """
        if not self._entered:
            raise RuntimeError("the runtime is not running")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except Exception as exc:  # handed to the caller
                fut.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(run, context=self._context)
        except RuntimeError:
            raise RuntimeError("the runtime's event loop is closed") from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), within)
        except TimeoutError:
            fut.cancel()
            raise

    def add_listener(self, listener: Callable[[AuditEvent], None]) -> Callable[[], None]:
        """Call *listener* with every audit event this runtime records; return a remover.

        For live views (the control plane's event stream). The listener is called
        synchronously in whatever thread recorded the event — often the loop thread,
        sometimes an interrupter's — so it must be cheap, thread-safe and must not
        raise (an exception is reported on stderr and the listener is kept).
        """
        self._listeners = (*self._listeners, listener)
        self._host.audible = True

        def remove() -> None:
            self._listeners = tuple(x for x in self._listeners if x is not listener)
            self._host.audible = self._sink is not None or bool(self._listeners)

        return remove

    def _record(self, event: AuditEvent) -> None:
        self._to_sink((event,))
        self._tell(event)

    def _record_many(self, events: Sequence[AuditEvent]) -> None:
        """Hand *events* to the sink as one batch, then show each to the listeners."""
        self._to_sink(events)
        if self._listeners:
            for event in events:
                self._tell(event)

    def _to_sink(self, events: Sequence[AuditEvent]) -> None:
        """Hand *events* to the sink back to back: recorded in one stretch, with no
        await between them, ``SqliteAudit``'s writer takes them as one batch (and a
        ``BatchAuditSink`` in one call: one lock, one wake-up of its writer)."""
        sink = self._sink
        if sink is None:
            return
        many = self._sink_many
        if many is not None and len(events) > 1:
            try:
                many(events)
            except Exception as exc:  # a sink must never raise; if it does, say so, go on
                sys.stderr.write(
                    f"kill_switch: audit sink failed to record {len(events)} events "
                    f"({events[0].kind} {events[0].event_id}, ...): {exc!r}\n"
                )
            return
        for event in events:
            try:
                sink.record(event)
            except Exception as exc:  # a sink must never raise; if it does, say so, go on
                sys.stderr.write(
                    f"kill_switch: audit sink failed to record {event.kind} "
                    f"{event.event_id}: {exc!r}\n"
                )

    def _tell(self, event: AuditEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception as exc:  # a live view must never break the audit path
                sys.stderr.write(f"kill_switch: event listener {listener!r} failed: {exc!r}\n")

    async def _flush_audit(self) -> AuditStatus:
        sink = self._sink
        if sink is None:
            return "disabled"
        status: AuditStatus = "pending"
        with anyio.move_on_after(self.policy.audit_timeout, shield=True):
            try:
                status = await sink.flush()
            except Exception as exc:  # reported; the stop's audit status says degraded
                sys.stderr.write(f"kill_switch: audit flush failed: {exc!r}\n")
                status = "degraded"
        return status

    def _spawn(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a bounded service coroutine on the loop (loop thread only)."""
        task = self._loop.create_task(fn(), context=self._context)
        self._service.add(task)
        task.add_done_callback(self._service.discard)


class _RuntimeHost:
    """What a session may use of its runtime (the ``LoopHost`` protocol): handed to each
    session at construction instead of the session reading the runtime's fields.

    Plain attributes, bound methods included, not properties: a session reads them on
    every interrupt and every audit event, where a property call would be the cost.
    The runtime fills in the loop's values when it is entered (no session exists
    before) and keeps ``audible`` current as listeners come and go.
    """

    __slots__ = (
        "__weakref__",
        "audible",
        "context",
        "enter",
        "flush",
        "flushes",
        "leave",
        "loop",
        "loop_thread",
        "monitor",
        "record",
        "record_many",
        "runtime",
        "spawn",
    )

    def __init__(self, runtime: Runtime) -> None:
        self.runtime: object = runtime
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set on entry
        self.loop_thread = 0
        self.context = runtime._context
        self.monitor: LoopMonitor | None = None
        self.audible = runtime._sink is not None
        self.record = runtime._record
        self.record_many = runtime._record_many
        self.flush = runtime._flush_audit
        self.flushes = runtime._sink is not None
        self.spawn = runtime._spawn
        self.enter = runtime._enter_session
        self.leave = runtime._leave_session

    def open_stop(self, switch_interval: float | None) -> _StopWindow:
        return _StopWindow(cast("Runtime", self.runtime), switch_interval)

    @property
    def closed(self) -> bool:
        return cast("Runtime", self.runtime)._closed

    def watch_delivery(self, check: Callable[[], None], due_mono: float) -> None:
        if self.monitor is not None:
            self.monitor.watch(check, due_mono)

    def note_terminated(self, session_id: str) -> None:
        cast("Runtime", self.runtime)._terminated.add(session_id)
