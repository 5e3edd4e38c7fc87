"""The thread plane: sync tools in worker threads bound to a session.

``await session.run_sync(fn, *args)`` runs ``fn`` in a new worker thread, in a copy of the
caller's context with the session set as current, so ``ks.check()`` and ``ks.sleep()``
inside it answer for that session. The call goes through the session's guard (it is an
async tool handed to ``session.call``), so the tool plane's cancellation reaches the
awaiting side. On interrupt the awaiting side waits, shielded and bounded, up to
``StopPolicy.thread_grace`` from the interrupt's request for the thread to return; past
that the thread is *abandoned* (Python cannot stop a thread): the awaiting side goes on,
the thread is named in the ``StopReport``, its late result is dropped, and its later
``ks.check()`` at commit points raises because the session's flag stays set.

Why one daemon thread per call rather than ``anyio.to_thread.run_sync`` with a
``CapacityLimiter``:

* an abandoned thread must never hold the process hostage: anyio's workers are non-daemon
  threads, so one stuck in a C call blocks interpreter exit; ours are daemon threads;
* the report names the thread: a thread per call carries the tool and session in its
  name, and its ident means that call only (a pooled worker's ident is every call's);
* the stop, not ``abandon_on_cancel``, decides the awaiting side's fate: completion lands
  in a future of the plane's, so the awaiting side can wait out the grace and the plane
  abandons on its own timer whatever the awaiting task's cancellation does;
* the cap counts an abandoned thread until it really exits (a ``CapacityLimiter`` token is
  released the moment the caller abandons it, while its thread still runs).

The price is a thread start per call (~75 µs here), small next to a tool that needs one.

Abandoned threads still running are counted per runtime. While a runtime has
``StopPolicy.max_abandoned_threads`` (the calling session's policy) or more of them, new
``run_sync`` calls are refused with ``ToolBlocked`` whose ``decision.code`` is
``"thread_cap"``: a guard refusal like any other, which frameworks already turn into "tool
unavailable"; it is not absorbed by the session's block. The call is not counted as an
action.

Work a sync tool hands on to other threads keeps the session only through
``kill_switch.bind(fn)`` (or ``asyncio.to_thread`` / ``anyio.to_thread``, which copy the
context); a plain ``threading.Thread`` or ``ThreadPoolExecutor.submit`` on CPython
3.11-3.13 starts with an empty context, so ``ks.check()`` there is a no-op. Such threads
are not tracked by the plane and never appear in the report.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import threading
import time
import weakref
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import attrs

from kill_switch._vocabulary._audit_event import THREAD_ABANDONED, THREAD_RETURNED
from kill_switch._vocabulary._decision import Decision
from kill_switch._vocabulary._exceptions import Interrupted
from kill_switch._vocabulary._plane import Plane, PlaneHost, StopFields
from kill_switch._vocabulary._report import InterruptRequest, ThreadOutcome, ThreadReport
from kill_switch._vocabulary._snapshots import ThreadInfo

from ._context import _current_session
from ._tool_tasks import tool_name

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

T = TypeVar("T")

#: A thread waiting in ``from_thread`` is woken by the result or by the interrupt's
#: delivery (which cancels the callback); this backstop re-reads the flag in case the
#: loop cannot run that delivery (blocked or closed), so the wait never hangs.
_FROM_THREAD_BACKSTOP = 0.1


# ------------------------------------------------------------ the abandoned pile


@attrs.define(eq=False)
class _Pile:
    """The abandoned threads of one runtime that are still running."""

    lock: threading.Lock = attrs.field(factory=threading.Lock)
    live: int = 0


# Keyed by runtime (``PlaneHost.pile_key()``) without touching it: the count dies with
# the runtime.
_piles: weakref.WeakKeyDictionary[object, _Pile] = weakref.WeakKeyDictionary()
_piles_lock = threading.Lock()


def _pile(key: object) -> _Pile:
    pile = _piles.get(key)
    if pile is None:
        with _piles_lock:
            pile = _piles.setdefault(key, _Pile())
    return pile


def abandoned_threads(runtime: object) -> int:
    """How many threads abandoned by *runtime*'s sessions are still running."""
    pile = _piles.get(runtime)
    return 0 if pile is None else pile.live


# ---------------------------------------------------------------- one thread


@attrs.define(eq=False)
class _Worker:
    """One ``run_sync`` call's thread, as the plane tracks it."""

    tool: str
    #: Resolved (loop thread) once the thread returned or was abandoned.
    settled: asyncio.Future[None]
    name: str = ""
    ident: int | None = None
    # Written by the thread before ``exited`` is set under the pile's lock; read on the
    # loop thread only after that.
    result: Any = None
    error: BaseException | None = None
    exited_mono: float | None = None
    exited: bool = False
    # Loop thread only (``counted`` also under the pile's lock).
    outcome: ThreadOutcome | None = None
    counted: bool = False
    reported: bool = False
    #: The awaiting side left without the result (cancelled or interrupted).
    orphaned: bool = False


def _outcome(session: PlaneHost, error: BaseException | None) -> ThreadOutcome:
    if error is None:
        return "returned"
    if isinstance(error, Interrupted) and error.session_id == session.id:
        return "interrupted"
    return "raised"


class ThreadPlane(Plane):
    """The sync tool threads of one session: started, waited for, or abandoned.

    Every method runs on the session's loop thread, except the worker threads' own exit
    bookkeeping (under the runtime pile's lock) and ``from_thread``'s wait.
    """

    def __init__(self, session: PlaneHost) -> None:
        self._session = session
        self._loop = session.loop
        self._pile = _pile(session.pile_key())
        #: Threads not known to have exited (abandoned ones included).
        self._running: set[_Worker] = set()
        #: Threads running when the interrupt came, in start order: the report's rows.
        self._reported: list[_Worker] = []
        #: ``from_thread`` callbacks in flight; the interrupt cancels them.
        self._callbacks: set[asyncio.Task[Any]] = set()
        #: When the threads' grace began: the interrupt's request (set on delivery).
        self._grace_from: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None

    # ------------------------------------------------------------- the Plane

    def deliver(self, request: InterruptRequest) -> None:
        """Arm the grace timer (the grace counts from the request, not from this
        delivery), cancel ``from_thread`` callbacks."""
        self._grace_from = request.requested_mono
        for w in self._running:
            self._report(w)
        if self._pending():
            grace_end = request.requested_mono + self._session.policy.thread_grace
            self._timer = self._session.call_later(
                max(0.0, grace_end - time.monotonic()), self._grace_over
            )
        for task in self._callbacks:
            task.cancel(f"kill_switch: session {self._session.id} interrupted")

    async def settle(self, deadline: float) -> None:
        """Wait for the interrupted threads up to min(deadline, request + grace), then
        abandon the rest. A checkpoint; never raises but re-raises cancellation."""
        if not self._pending():
            return
        now = time.monotonic()
        grace_end = (self._grace_from or now) + self._session.policy.thread_grace
        until = min(deadline, grace_end)
        try:
            with anyio.move_on_after(max(0.0, until - now)):
                while self._pending():
                    self._waiter = self._loop.create_future()
                    await self._waiter
        finally:
            self._waiter = None
            self._abandon_pending("stop_timeout" if deadline < grace_end else "grace")

    def quiescent(self) -> bool:
        """True when every thread of the stop has exited.

        An abandoned thread that is still running is not settled: it may go on writing,
        so the stop is not quiescent (the outcome is ``unresponsive``) until it exits.
        """
        if self._pending():
            return False
        with self._pile.lock:
            return all(w.exited for w in self._reported)

    def stop_fields(self) -> StopFields:
        """One ``ThreadReport`` per thread running at the interrupt."""
        self._abandon_pending("report")
        request = self._session.request
        first = request.requested_mono if request is not None else None
        rows = []
        for w in self._reported:
            seconds = None
            if w.outcome != "abandoned" and w.exited_mono is not None and first is not None:
                seconds = max(0.0, w.exited_mono - first)
            assert w.outcome is not None
            rows.append(
                ThreadReport(w.name, w.ident, w.outcome, seconds, tool=w.tool, running=not w.exited)
            )
        return StopFields(threads=tuple(rows))

    # ------------------------------------------------------------- threads

    def info(self) -> tuple[ThreadInfo, ...]:
        """Snapshots of the worker threads this plane runs (loop thread)."""
        return tuple(ThreadInfo(w.name, w.ident, w.tool, w.exited) for w in list(self._running))

    def start(self, fn: Callable[..., Any], args: tuple[Any, ...], tool: str) -> _Worker:
        """Start *fn* in a new daemon thread bound to the session (loop thread)."""
        session = self._session
        loop = self._loop
        w = _Worker(tool, loop.create_future())
        ctx = contextvars.copy_context()
        ctx.run(_current_session.set, session)
        exited = self.exited

        def main() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = ctx.run(fn, *args)
            except (Exception, Interrupted) as exc:  # handed to the awaiting side
                error = exc
            except BaseException as exc:
                # SystemExit / KeyboardInterrupt end this thread as they end any thread;
                # the awaiting side gets an ordinary error instead.
                error = RuntimeError(f"sync tool {tool!r} ended its thread with {exc!r}")
                raise
            finally:
                w.result = result
                exited(w, error)

        thread = threading.Thread(
            target=main,
            name=f"kill_switch {session.agent}/{tool} [{session.id[:8]}]",
            daemon=True,
        )
        w.name = thread.name
        self._running.add(w)
        try:
            thread.start()
        except BaseException:
            self._running.discard(w)
            raise
        w.ident = thread.ident
        return w

    # ------------------------------------------------- pool work (``_pool.py``)

    def adopt(self, tool: str) -> _Worker:
        """Track work submitted to a pool thread from the session's context (loop
        thread); the thread reports its start and exit (``pool_started``/``exited``).
        """
        session = self._session
        w = _Worker(tool, self._loop.create_future())
        w.name = f"kill_switch {session.agent}/pool {tool} [{session.id[:8]}]"
        self._running.add(w)
        if self._grace_from is not None:
            self._report(w)  # submitted during the stop: it is the stop's too
        return w

    def pool_started(self, w: _Worker, thread: threading.Thread) -> None:
        """A pool thread starts *w* (that thread): it carries the session's tag."""
        w.ident = thread.ident
        thread.name = w.name

    def exited(self, w: _Worker, error: BaseException | None) -> None:
        """*w*'s thread finished it (that thread): note it, tell the loop."""
        w.error = error
        w.exited_mono = time.monotonic()
        with self._pile.lock:
            w.exited = True
            if w.counted:
                self._pile.live -= 1
        with suppress(RuntimeError):  # a closed loop: nobody waits any more
            self._session.call_soon_threadsafe(self._on_exit, w)

    def host_interrupted(self) -> bool:
        """Whether the session's flag is set (any thread)."""
        return self._session.is_interrupted()

    def interrupted_error(self) -> Interrupted:
        """The session's ``Interrupted`` (any thread, once interrupted)."""
        return self._session.interrupted_error()

    def idents(self) -> set[int]:
        """The idents of the threads running this plane's work (loop thread)."""
        return {w.ident for w in list(self._running) if w.ident is not None}

    def outcome_of(self, w: _Worker) -> Any:
        """The settled thread's result for the awaiting side (raises its error)."""
        if w.outcome == "abandoned":
            session = self._session
            if session.request is not None:
                raise session.interrupted_error()
            raise RuntimeError(f"the thread of sync tool {w.tool!r} was abandoned")
        result, w.result = w.result, None
        if w.error is not None:
            raise w.error
        return result

    def orphan(self, w: _Worker) -> None:
        """The awaiting side is gone: whatever the thread produces is dropped."""
        w.orphaned = True
        if w.outcome is not None:
            self._drop(w)

    def _drop(self, w: _Worker) -> None:
        session = self._session
        if w.outcome == "returned" and session.request is not None:
            session.note_late_result()
        elif w.outcome == "raised" and session.request is not None:
            session.note_secondary(f"sync tool {w.tool}: {w.error!r}")
        w.result = None

    def grace_left(self) -> float:
        """Seconds left of the interrupted threads' grace (from the request)."""
        now = time.monotonic()
        start = self._grace_from if self._grace_from is not None else now
        return max(0.0, start + self._session.policy.thread_grace - now)

    def abandon(self, w: _Worker, cause: str) -> None:
        """Stop waiting for *w*: it is abandoned unless it has in fact exited."""
        if w.outcome is not None:
            return
        pile = self._pile
        with pile.lock:
            exited = w.exited
            if not exited:
                w.counted = True
                pile.live += 1
            live = pile.live
        if exited:
            # It returned; its exit callback is on its way. Take it now.
            self._returned(w)
            return
        self._settle(w, "abandoned")
        self._session.record(
            THREAD_ABANDONED,
            details={
                "thread": w.name,
                "ident": w.ident,
                "tool": w.tool,
                "cause": cause,
                "grace": self._session.policy.thread_grace,
                "abandoned_running": live,
            },
        )

    # ------------------------------------------------------------- internals

    def _pending(self) -> bool:
        return any(w.outcome is None for w in self._reported)

    def _report(self, w: _Worker) -> None:
        if not w.reported:
            w.reported = True
            self._reported.append(w)

    def _settle(self, w: _Worker, outcome: ThreadOutcome) -> None:
        w.outcome = outcome
        if not w.settled.done():
            w.settled.set_result(None)
        if not self._pending():
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def _grace_over(self) -> None:
        self._timer = None
        self._abandon_pending("grace")

    def _abandon_pending(self, cause: str) -> None:
        for w in list(self._reported):
            if w.outcome is None:
                self.abandon(w, cause)

    def _on_exit(self, w: _Worker) -> None:
        """A worker thread exited (loop thread, scheduled by the thread itself)."""
        self._running.discard(w)
        if w.outcome == "abandoned":
            # Its late result is dropped; say that it finally ended.
            w.result = w.error = None
            if not self._session.runtime_closed:
                self._session.record(
                    THREAD_RETURNED,
                    details={
                        "thread": w.name,
                        "ident": w.ident,
                        "tool": w.tool,
                        "outcome": "abandoned",
                        "late": True,
                        "result_dropped": True,
                    },
                )
            return
        if w.outcome is None:
            self._returned(w)

    def _returned(self, w: _Worker) -> None:
        session = self._session
        self._running.discard(w)
        request = session.request
        if request and w.exited_mono is not None and w.exited_mono >= request.requested_mono:
            self._report(w)
        outcome = _outcome(session, w.error)
        self._settle(w, outcome)
        if w.orphaned:
            self._drop(w)
        if w.reported:
            assert request is not None
            assert w.exited_mono is not None
            first = request.requested_mono
            session.record(
                THREAD_RETURNED,
                details={
                    "thread": w.name,
                    "ident": w.ident,
                    "tool": w.tool,
                    "outcome": outcome,
                    "seconds": max(0.0, w.exited_mono - first),
                },
            )


def _plane(session: PlaneHost) -> ThreadPlane:
    """The session's thread plane, registered on first use.

    Raises:
        RuntimeError: the session was interrupted or has ended.
    """
    return session.plane(ThreadPlane, lambda: ThreadPlane(session))


class _Caller(PlaneHost, Protocol):
    """A ``PlaneHost`` that also runs guarded tool calls (the session)."""

    async def call(
        self,
        fn: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        tool: str | None = ...,
        cost: float = ...,
    ) -> T: ...


# ------------------------------------------------------------------- run_sync


async def run_sync(
    session: _Caller, fn: Callable[..., T], *args: Any, tool: str | None, cost: float = 0.0
) -> T:
    """Run *fn* in a worker thread bound to *session* (see ``Session.run_sync``)."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"{tool_name(fn)} is a coroutine function: use session.call()")
    name = tool if tool is not None else tool_name(fn)
    plane: ThreadPlane | None = None
    if session.request is None and session.state == "running":
        pile = _pile(session.pile_key())
        cap = session.policy.max_abandoned_threads
        if pile.live >= cap:
            decision = Decision.block(
                f"{pile.live} abandoned threads are still running (cap {cap})", "thread_cap"
            )
            raise session.blocked(decision, name)
        try:
            plane = _plane(session)
        except RuntimeError:
            plane = None  # interrupted meanwhile: the guard below blocks the call
    worker: _Worker | None = None
    consumed = False

    async def sync_tool(*_args: Any) -> T:
        nonlocal worker, consumed
        if plane is None:
            raise session.interrupted_error()
        worker = plane.start(fn, args, name)
        # Shielded: cancelling the awaiting side must not cancel the plane's future.
        await asyncio.shield(worker.settled)
        consumed = True
        result: T = plane.outcome_of(worker)
        return result

    try:
        return await session.call(sync_tool, *args, tool=name, cost=cost)
    except BaseException:
        if worker is None or plane is None or consumed:
            raise
        plane.orphan(worker)
        if worker.outcome is None:
            if session.request is None:
                # Cancelled by something other than this session's interrupt (a timeout,
                # a failing sibling): no one will set the flag, so waiting is pointless.
                plane.abandon(worker, "cancelled")
                raise
            # Wait out the grace, shielded from the body scope's cancellation, bounded.
            # A call nested in another ``session.call`` is cancelled again by the tool
            # plane's re-delivery and leaves early: the thread keeps its grace anyway
            # (the plane's timer and ``settle`` wait for it before the stop resolves).
            with anyio.move_on_after(plane.grace_left(), shield=True) as scope:
                await asyncio.shield(worker.settled)
            if scope.cancel_called:
                plane.abandon(worker, "grace")
        raise


# ---------------------------------------------------------------- from_thread


def from_thread(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run the coroutine function *fn* on the current session's event loop and wait.

    For sync tools (threads started by ``session.run_sync`` or bound with
    ``kill_switch.bind``) that need the loop. It checks the session's flag first, runs
    *fn* as a task in the session's context, and wakes on the result or on the interrupt
    (whose delivery cancels the task); it never waits for an interrupted session.

    Raises:
        Interrupted: the session was interrupted before or during the call.
        RuntimeError: no current session, called on the loop's own thread, or the
            session has ended.
    """
    session = _current_session.get()
    if session is None:
        raise RuntimeError(
            "kill_switch.from_thread() needs a current session: call it from a sync tool "
            "run by session.run_sync() or bound with kill_switch.bind()"
        )
    if session.on_loop_thread():
        raise RuntimeError("kill_switch.from_thread() called on the event loop's thread")
    if session.is_interrupted():
        raise session.interrupted_error()
    done: concurrent.futures.Future[T] = concurrent.futures.Future()
    try:
        session.loop.call_soon_threadsafe(
            _start_callback, session, fn, args, done, context=contextvars.copy_context()
        )
    except RuntimeError:
        raise RuntimeError(f"the event loop of session {session.id} is closed") from None
    while True:
        try:
            return done.result(timeout=_FROM_THREAD_BACKSTOP)
        except TimeoutError:
            if session.is_interrupted():
                raise session.interrupted_error() from None


def _start_callback(
    session: PlaneHost,
    fn: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    done: concurrent.futures.Future[T],
) -> None:
    """Start a ``from_thread`` callback as a task (loop thread, session's context)."""
    if session.request is not None:
        done.set_exception(session.interrupted_error())
        return
    try:
        if session.state != "running":
            raise RuntimeError(f"session {session.id} has ended ({session.state})")
        plane = _plane(session)
    except RuntimeError as exc:
        done.set_exception(exc)
        return
    task = session.loop.create_task(_callback(session, fn, args, done))
    plane._callbacks.add(task)
    task.add_done_callback(plane._callbacks.discard)


async def _callback(
    session: PlaneHost,
    fn: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    done: concurrent.futures.Future[T],
) -> None:
    try:
        done.set_result(await fn(*args))
    except (Exception, Interrupted) as exc:  # handed to the waiting thread
        done.set_exception(exc)
    finally:
        if not done.done():
            # Cancelled (the interrupt) or a BaseException: the thread must not hang.
            done.set_exception(
                session.interrupted_error()
                if session.request is not None
                else RuntimeError(f"callback {tool_name(fn)} was cancelled")
            )
