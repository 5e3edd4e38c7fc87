"""A session: one agent's run, the unit that ``interrupt()`` stops.

The session is a facade over its parts, each of which an interrupt reaches:

* the **body** (the agent loop) runs in an anyio ``CancelScope`` the interrupt cancels;
* the **planes** (``Plane``): the tool tasks (``_tool_tasks``), the sync tools' worker
  threads (``_threads``), the process trees (``_process_plane``), the limits' timers
  (``_ledger.Ledger``), each seeing the session only as a ``PlaneHost``;
* the **guard** (``_guard``): every later ``call()`` / ``guard()`` is blocked, from any
  thread, once the session has a request — before the loop has even run the fan-out;
* the **stop** (``_stop``): fan-out, settling, quiescence, the report and its audit.

What the parts share, the interrupt, and the ``PlaneHost`` contract are in
``_session_host``; this module holds the public verbs.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, TypeVar, Unpack, cast

import anyio

from . import _tools
from ._cleanup import Hook, Transaction, _hook_name, check_hook
from ._guard import ToolPolicy
from ._planes import _escalation, _spawn, _threads
from ._planes._context import _current_session
from ._planes._tool_tasks import current_task, tool_name
from ._session_host import SessionHost
from ._vocabulary import _block
from ._vocabulary._audit_event import (
    SESSION_FINISHED,
    SESSION_STARTED,
)
from ._vocabulary._decision import ALLOW, Decision
from ._vocabulary._exceptions import Interrupted
from ._vocabulary._stderr import say

if TYPE_CHECKING:
    import types
    from collections.abc import Awaitable, Callable, Mapping


T = TypeVar("T")


__all__ = ["Session", "ToolPolicy", "current_session"]


class Session(SessionHost):
    """One agent's run: its body, its tool calls, and the single way to stop them.

    Create it with ``runtime.session(...)`` and enter it with ``async with``. The block
    is the agent loop; leaving it absorbs this session's own interruption (the
    cancellation, and ``Interrupted`` / terminal ``ToolBlocked`` raised because of it).
    """

    __slots__ = ()

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

        if tools.tool_tasks and not self._requests:
            if exc is not None:
                tools.fail()
            # Deliberately not shielded: the structured wait for the tool task group is
            # cancellable from outside, and then cancels the tool tasks and waits for
            # them bounded and shielded itself (see ToolTasks.wait_drained).
            try:
                await tools.wait_drained(self.policy.stop_timeout)  # noqa: ASYNC102
            # Cancelled from outside (an enclosing scope's deadline): the block still
            # ends here — it never lingers as "running" — and that cancellation, which
            # replaces the body's outcome, is raised by _block.leave at the end.
            except BaseException as wait_exc:  # noqa: ASYNC103
                exc = wait_exc

        exit_stop = False
        if not self._requests and (
            tools.tool_tasks or any(p.busy() for p in self._planes.values())
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
            # Nothing to wait for (no sink, all quiet): finished here, without a cancel
            # scope (a shielded, bounded one costs ~7 us, N times in interrupt_all).
            if not stop.finish_now(cleanup=True):
                # Every await below is bounded and shielded on its own; this outer bound
                # is the sum of those bounds, so the block can never outlive its policy.
                with anyio.move_on_after(stop.exit_budget(), shield=True):
                    await stop.finish(cleanup=True)
                    if stop.cleanup_hooks:  # the stop finished without them (unresponsive)
                        await stop.run_cleanup()
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
        for plane in list(self._planes.values()):
            try:
                plane.close()
            except Exception as exc:  # one plane's failure must not keep the others
                say(f"kill_switch: session {self.id}: {type(plane).__name__}.close: {exc!r}")
        self._host.leave(self)
        self._unlink()

    # ----------------------------------------------------- guard and limits

    def guard(self, tool: str, args: Mapping[str, Any] | None = None) -> Decision:
        """Check a tool call a framework will run itself; an allowed call counts.

        Never raises: a bad argument or a failing policy blocks. Thread-safe for the
        terminated check; counting is only exact on the loop thread.
        """
        # Written here rather than as a Guard method: a framework calls it per tool
        # call, and the extra Python call was a tenth of its cost (bench_guard.py).
        guard = self._guard
        try:
            kwargs = dict(args) if args is not None else {}
            if not isinstance(tool, str):
                return Decision.block(
                    f"tool name must be a str, not {type(tool).__name__}", "bad_request"
                )
            decision = guard.admit(tool, (), kwargs, 0.0)
        except Exception as exc:  # guard() never raises, by contract
            return Decision.block(f"guard failed: {exc!r}", "guard_error")
        if decision is None:
            return ALLOW
        guard.blocked(decision, tool)
        return decision

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
        self, fn: Callable[..., Any], *, tool: str | None = None
    ) -> Callable[..., Awaitable[Any]]:
        """Return *fn* as a guarded tool of this session, keeping its name, docstring and
        signature; a sync *fn* runs through ``run_sync`` (see ``kill_switch.tool``)."""
        return _tools.wrap(self, fn, tool=tool)

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
        command: _spawn.Command,
        **options: Unpack[_spawn.ProcessArgs],
    ) -> _spawn.TrackedProcess:
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
        return await _spawn.open_process(self, command, **options)

    async def run_process(
        self,
        command: _spawn.Command,
        *,
        input: bytes | None = None,
        check: bool = True,
        **options: Unpack[_spawn.ProcessArgs],
    ) -> _spawn.CompletedProcess[bytes]:
        """Run *command* to completion in a tracked process group; collect its output.

        Like ``anyio.run_process`` (``stdin`` defaults to none, ``stdout``/``stderr``
        to pipes); returns when the process exits even if a grandchild still holds its
        stdout.

        Raises:
            subprocess.CalledProcessError: *check* and a nonzero exit status.
            Interrupted: the session was interrupted before the process started.
        """
        return await _spawn.run_process(self, command, input=input, check=check, **options)

    def track_pid(
        self, pid: int, *, escalation: _escalation.EscalationPolicy | None = None
    ) -> None:
        """Adopt *pid*, started by other means, so that this session's interrupt stops it.

        Raises:
            TypeError / ValueError: not a positive int, or this process itself.
            ProcessLookupError: no such process.
            Interrupted: the session was interrupted.
        """
        _spawn.track_pid(self, pid, escalation=escalation)

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


def current_session() -> Session | None:
    """Return the session whose context the caller runs in, or ``None``."""
    # Only sessions set the variable (a test may set a fake PlaneHost: it gets it back).
    return cast("Session | None", _current_session.get())
