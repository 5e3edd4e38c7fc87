"""The tool plane: the asyncio tasks running a session's tool calls.

Native asyncio, not anyio scopes: every task with a tool call in flight is cancelled
directly with ``Task.cancel()``, and the cancellation is retracted with
``Task.uncancel()`` when the call turns it into ``Interrupted`` — the protocol
``asyncio.timeout`` uses. Why not one anyio scope per call: entering and leaving a
``CancelScope`` costs ~5.7 µs, five times the guard's whole budget, and an anyio
task-group cancel of N parked tasks takes 2-2.7x raw asyncio while this path takes
0.6-0.7x (benchmarks/bench_fanout.py).

Level-triggered: a call that swallows its cancellation and is still running is cancelled
again, with back-off, until it leaves. Tasks created in the session's context that
outlive its block are swept at the stop: those created while a guarded tool call ran (a
tool's raw ``create_task``) are reported as leaked, the others (a framework's hooks and
tracing, started by the agent loop) apart, as swept.

``Session.call`` keeps the per-call bookkeeping inline (it reads and writes this plane's
public fields): a guarded call stays one coroutine frame with no extra Python call.
"""

from __future__ import annotations

import asyncio
import sys
import time
import weakref
from typing import TYPE_CHECKING, Any

import anyio

from kill_switch._vocabulary._audit_event import LEAKED_TASK
from kill_switch._vocabulary._block import is_own
from kill_switch._vocabulary._exceptions import Interrupted, ToolBlocked
from kill_switch._vocabulary._plane import NO_FIELDS, Plane, StopFields
from kill_switch._vocabulary._report import LeakedTask
from kill_switch._vocabulary._snapshots import CallInfo

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from kill_switch._vocabulary._plane import CallGuard, PlaneHost
    from kill_switch._vocabulary._report import InterruptRequest

#: Re-delivery of the tool plane's cancellation to calls that swallowed it backs off
#: from the next loop iteration up to this many seconds between rounds.
REDELIVER_MAX_DELAY = 0.05


if sys.version_info >= (3, 12):

    def current_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
        return asyncio.current_task(loop)

else:
    # On 3.11 asyncio.current_task() is a Python function costing ~0.45 us, a third of
    # the guard's budget; the dict it reads is the one C tasks (and uvloop's) update.
    _current_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] = (
        asyncio.tasks._current_tasks  # type: ignore[attr-defined]  # private on 3.11
    )

    def current_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[Any] | None:
        return _current_tasks.get(loop)


def tool_name(fn: object) -> str:
    """The name a tool is guarded and audited under when none is given."""
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else repr(fn)


def coro_name(task: asyncio.Task[Any]) -> str:
    """The qualified name of what *task* runs (for reports and snapshots)."""
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or repr(coro)


class ToolTasks(Plane):
    """The tool calls of one session in asyncio tasks (loop thread only)."""

    __slots__ = (
        "body_done",
        "calls_in_flight",
        "cancel_body",
        "cancels",
        "delivered",
        "drained",
        "failing",
        "guard",
        "host",
        "inflight",
        "leaked",
        "loop",
        "quiet",
        "quiet_mono",
        "redeliver_delay",
        "spawned",
        "swept",
        "tasks",
        "tool_calls_cancelled",
        "tool_calls_running",
        "tool_errors",
        "tool_tasks",
    )

    def __init__(self, host: PlaneHost, guard: CallGuard, cancel_body: Callable[[], None]) -> None:
        self.host = host
        self.loop = host.loop
        self.guard = guard
        #: Cancels the session body's scope (a failing tool task, like a task group).
        self.cancel_body = cancel_body
        #: Tasks other than the body with a call in flight: how many calls each.
        self.inflight: dict[asyncio.Task[Any], int] = {}
        self.calls_in_flight = 0
        #: Our own cancellations of each task, to retract (uncancel) where they land.
        self.cancels: dict[asyncio.Task[Any], int] = {}
        self.tool_tasks: set[asyncio.Task[Any]] = set()
        #: Every task created in the session's context (the runtime's task factory).
        self.tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self.leaked: dict[asyncio.Task[Any], bool] = {}
        #: Tasks created while a guarded tool call ran in their creating task (or by
        #: such a task): swept, they are a tool's escape; the rest are the framework's.
        self.spawned: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self.redeliver_delay = 0.0
        self.drained: asyncio.Future[None] | None = None
        self.quiet: asyncio.Future[None] | None = None
        self.quiet_mono: float | None = None
        self.tool_calls_cancelled = 0
        self.tool_calls_running = 0
        self.tool_errors: list[BaseException] = []
        self.failing = False
        self.delivered = False
        self.body_done = False
        self.swept = False

    # ------------------------------------------------------------- the Plane

    def deliver(self, request: InterruptRequest) -> None:
        """Cancel every call in flight and every tool task; re-deliver until they leave."""
        self.delivered = True
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        # Calls in flight outside tool tasks, plus every tool task (running a call or
        # not yet started).
        self.tool_calls_cancelled = (
            self.calls_in_flight - self.tool_calls_running + len(self.tool_tasks)
        )
        if not (self.inflight or self.tool_tasks):  # a body alone: nothing to cancel here
            self.check_quiet()
            return
        for task in list(self.inflight):
            self.cancel_task(task)
        msg = f"kill_switch: session {self.host.id} interrupted"
        for task in self.tool_tasks:
            # A tool task ends on this cancellation (it absorbs it): no uncancel
            # bookkeeping needed, unless a nested call() registered it above.
            if task not in self.inflight:
                task.cancel(msg)
        if self.inflight or self.tool_tasks:
            self._schedule_redeliver()
        self.check_quiet()

    async def settle(self, deadline: float) -> None:
        """Wait until the body, every call and every swept task have left (the caller
        bounds the wait)."""
        if self.body_done:
            self.sweep()
        self.check_quiet()
        if self.quiet_mono is None:
            self.quiet = self.loop.create_future()
            self.check_quiet()
            await self.quiet

    def quiescent(self) -> bool:
        return self.quiet_mono is not None

    def stop_fields(self) -> StopFields:
        if not self.leaked:
            n = self.tool_calls_cancelled
            return StopFields(tool_calls_cancelled=n) if n else NO_FIELDS
        rows = [
            (t, LeakedTask(t.get_name(), coro_name(t), done)) for t, done in self.leaked.items()
        ]
        return StopFields(
            tool_calls_cancelled=self.tool_calls_cancelled,
            leaked_tasks=tuple(row for t, row in rows if t in self.spawned),
            swept_tasks=tuple(row for t, row in rows if t not in self.spawned),
        )

    def note(self, task: asyncio.Task[Any]) -> None:
        """*task* was created in the session's context (the runtime's task factory, in
        the creating task): kept, and marked a tool's if a guarded call was running."""
        self.tasks.add(task)
        parent = current_task(self.loop)
        if parent is None:
            return
        if parent in self.inflight or parent in self.tool_tasks or parent in self.spawned:
            self.spawned.add(task)
        elif self.calls_in_flight > self.tool_calls_running + sum(self.inflight.values()):
            # A call in flight that is neither a tool task's nor another task's: the
            # body's (its fast path keeps no per-task count). Creations in the body's
            # concurrent siblings meanwhile count as the tool's: the safe side.
            self.spawned.add(task)

    # ------------------------------------------------------------- snapshots

    def calls(self) -> tuple[CallInfo, ...]:
        """Tool calls in flight in tasks other than the body."""
        tasks = dict.fromkeys([*self.tool_tasks, *self.inflight])
        return tuple(CallInfo(t.get_name(), coro_name(t)) for t in tasks if not t.done())

    def running_tasks(self) -> tuple[CallInfo, ...]:
        """Every task created in the session's context that has not finished (the
        calling task excepted)."""
        current = asyncio.current_task()
        return tuple(
            CallInfo(t.get_name(), coro_name(t))
            for t in list(self.tasks)
            if not t.done() and t is not current
        )

    # ------------------------------------------------------------- tool tasks

    def start_soon(
        self,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        tool: str | None,
        cost: float,
        name: str | None,
    ) -> None:
        task = self.loop.create_task(
            self._tool_task(fn, args, kwargs, tool, cost),
            name=name or f"kill_switch tool {tool or tool_name(fn)}",
        )
        self.tool_tasks.add(task)
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
        task = current_task(self.loop)
        assert task is not None
        task.remove_done_callback(self._tool_task_done)  # only for never-started tasks
        guard = self.guard
        host = self.host
        error: BaseException | None = None
        try:
            name = tool if tool is not None else tool_name(fn)
            decision = guard.admit(name, args, kwargs, cost)
            if decision is not None:
                if guard.requests:
                    return  # blocked because the session is terminated: nothing to run
                raise guard.blocked(decision, name)
            self.calls_in_flight += 1
            self.tool_calls_running += 1
            try:
                meter = guard.meter
                if meter is not None:
                    await meter(fn, args, kwargs, name, cost)
                else:
                    await fn(*args, **kwargs)
            finally:
                self.calls_in_flight -= 1
                self.tool_calls_running -= 1
            if guard.requests:
                host.note_late_result()  # the result is discarded anyway: count it
        # Absorbed: this task group's own cancellation (the task ends here).
        except asyncio.CancelledError:  # noqa: ASYNC103
            if not (guard.requests or self.failing):
                raise
        except (Interrupted, ToolBlocked) as exc:
            if not is_own(exc, host.id):
                error = exc
        except BaseException as exc:  # kept, and raised at the block's exit as a group
            if guard.requests and isinstance(exc.__context__, asyncio.CancelledError):
                # A tool that turned the interrupt's cancellation into another error.
                host.note_secondary(repr(exc))
            else:
                error = exc
        finally:
            self.tool_tasks.discard(task)
            self.cancels.pop(task, None)
            if error is not None:
                self.tool_errors.append(error)
                self.fail()
            if not self.tool_tasks:
                drained = self.drained
                if drained is not None and not drained.done():
                    drained.set_result(None)
            if self.delivered:
                self.check_quiet()

    def _tool_task_done(self, task: asyncio.Task[Any]) -> None:
        """A tool task cancelled before its first step (its coroutine never ran)."""
        self.tool_tasks.discard(task)
        self.cancels.pop(task, None)
        if not self.tool_tasks and self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.check_quiet()

    def fail(self) -> None:
        """A tool task failed (or the body did): cancel the rest, as a task group does."""
        if self.failing:
            return
        self.failing = True
        if not self.body_done:
            self.cancel_body()
        for t in self.tool_tasks:
            self.cancel_task(t)

    async def wait_drained(self, stop_timeout: float) -> None:
        """Wait for the tool tasks to finish (the block's structured end).

        A checkpoint. Cancelled from outside, it cancels the tool tasks and waits for
        them (shielded, bounded by *stop_timeout*) before letting the cancellation on.
        """
        if not self.tool_tasks:
            return
        # Resolved when the tool tasks drain, or by deliver(): once interrupted, the
        # wait is the stop's, bounded by the stop timeout (an unresponsive tool task
        # must not make the block unkillable).
        self.drained = self.loop.create_future()
        try:
            await asyncio.shield(self.drained)
        except BaseException:
            for t in self.tool_tasks:
                self.cancel_task(t)
            with anyio.move_on_after(stop_timeout, shield=True):
                await self.drained
            raise

    # ------------------------------------------------------- cancellation

    def call_cancelled(self, task: asyncio.Task[Any], exc: BaseException) -> Interrupted | None:
        """A call in *task* ended with *exc*: the ``Interrupted`` to raise instead if it
        was our own cancellation (its count retracted), else ``None`` (re-raise)."""
        ours = self.cancels.pop(task, 0) if self.cancels else 0
        if not ours:
            return None
        for _ in range(ours):
            task.uncancel()
        if not self.guard.requests or task.cancelling():
            # Not an interrupt (a failing tool task cancelled its siblings), or an
            # enclosing scope cancels this task too: that cancellation is not ours
            # to turn into anything else.
            return None
        if not isinstance(exc, asyncio.CancelledError):
            self.host.note_secondary(repr(exc))
        return self.host.interrupted_error()

    def late_result(self, task: asyncio.Task[Any] | None) -> Interrupted:
        """A call returned after the interrupt: drop the result, retract our
        cancellations of *task*, and return what to raise."""
        if task is not None:
            for _ in range(self.cancels.pop(task, 0)):
                task.uncancel()
        self.host.note_late_result()
        return self.host.interrupted_error()

    def cancel_task(self, task: asyncio.Task[Any]) -> None:
        if task.done():
            return
        self.cancels[task] = self.cancels.get(task, 0) + 1
        task.cancel(f"kill_switch: session {self.host.id} interrupted")

    def _schedule_redeliver(self) -> None:
        delay = self.redeliver_delay
        self.redeliver_delay = min(REDELIVER_MAX_DELAY, max(0.001, delay * 2))
        if delay == 0.0:
            self.host.call_soon(self._redeliver)
        else:
            self.host.call_later(delay, self._redeliver)

    def _redeliver(self) -> None:
        """Level-triggered tool plane: a call that swallowed its cancellation and is still
        running is cancelled again, with back-off, until it leaves."""
        if not (self.inflight or self.tool_tasks) or self.host.handle.done():
            return
        for task in list(self.inflight):
            self.cancel_task(task)
        msg = f"kill_switch: session {self.host.id} interrupted"
        for task in list(self.tool_tasks):
            if task not in self.inflight:
                task.cancel(msg)
        self._schedule_redeliver()

    # ------------------------------------------------------- quiescence

    def check_quiet(self) -> None:
        if (
            self.delivered
            and self.quiet_mono is None
            and self.swept
            and not self.inflight
            and not self.tool_tasks
            and not any(not t.done() for t in self.leaked)
        ):
            self.quiet_mono = time.monotonic()
            if self.quiet is not None and not self.quiet.done():
                self.quiet.set_result(None)

    def sweep(self) -> None:
        """Cancel tasks created in this session that outlived its structure.

        Runs once the body has exited; quiescence is not declared before it ran.
        """
        self.swept = True
        if not self.tasks:  # the usual case: nothing created in the session's context
            return
        current = asyncio.current_task()
        for task in list(self.tasks):
            if task.done() or task is current or task in self.tool_tasks:
                continue
            if task in self.leaked:
                continue
            self.leaked[task] = False
            self.cancel_task(task)
            task.add_done_callback(self._leak_done)
            self.host.record(
                LEAKED_TASK,
                details={
                    "task": task.get_name(),
                    "coro": coro_name(task),
                    "by": "tool" if task in self.spawned else "session",
                },
            )

    def _leak_done(self, task: asyncio.Task[Any]) -> None:
        self.leaked[task] = True
        self.check_quiet()
