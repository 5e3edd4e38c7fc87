"""Sync work a session hands to a thread pool the runtime did not start.

Two mechanisms, neither patching a library:

* **The loop's default executor.** While a runtime runs, the loop's default executor is
  a ``SessionPoolExecutor`` (``loop.set_default_executor``, asyncio's own extension
  point). ``asyncio.to_thread`` and ``loop.run_in_executor(None, ...)`` — and every
  framework built on them (the OpenAI Agents SDK's ``asyncio.to_thread``, LangChain's
  ``run_in_executor``) — submit through it on the loop thread, in the caller's context.
  Work submitted while a session is current runs in a copy of that context (so
  ``ks.check()``/``ks.sleep()`` answer for the session even for ``run_in_executor``,
  which does not copy the context itself) and on the session's thread plane: reported
  at an interrupt, waited for up to ``StopPolicy.thread_grace``, abandoned past it, and
  the stop is not quiescent while it still runs. The pool thread carries the session's
  tag in its name while it runs the work.

* **A look at the other threads' stacks** (``session_threads``). Work handed to any
  other pool in a copy of the session's context (``anyio.to_thread.run_sync``, a
  ``ThreadPoolExecutor`` of the user's given ``kill_switch.bind(fn)``) holds that
  context in a frame of its thread: anyio's worker keeps it in a local, ``bind`` in a
  closure, ``asyncio.to_thread`` in a ``functools.partial`` of ``Context.run``. The stop
  reads the live threads' frames (``sys._current_frames``) once, when it builds the
  report; a thread found running the session's work that the plane does not know makes
  the stop not quiescent and is named in the report. This only sees a context some frame
  still holds: work given to a plain ``threading.Thread`` or ``executor.submit`` without
  ``bind`` runs in an empty context and belongs to no session.

``anyio.to_thread.run_sync`` without ``abandon_on_cancel`` needs neither: its awaiting
side is shielded, so the tool call stays in flight and the stop waits for the thread
(``unresponsive`` past ``stop_timeout``).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import sys
import threading
from typing import TYPE_CHECKING, Any

from ._context import _current_session
from ._threads import _plane

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable
    from types import FrameType

    from kill_switch._vocabulary._plane import PlaneHost

    from ._threads import ThreadPlane, _Worker


class SessionPoolExecutor(concurrent.futures.ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` that puts work submitted from a session's context on
    that session's thread plane (the loop's default executor while a runtime runs)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        session = _current_session.get()
        if session is None:
            return super().submit(fn, *args, **kwargs)
        if session.is_interrupted():
            # Nothing new starts for a stopped session (its ``ks.check()`` would refuse).
            raise session.interrupted_error()
        ctx = contextvars.copy_context()
        plane: ThreadPlane | None = None
        if session.on_loop_thread() and session.state == "running":
            try:
                plane = _plane(session)
            except RuntimeError:
                plane = None  # ended meanwhile: the work runs as any pool work
        if plane is None:
            return super().submit(ctx.run, fn, *args, **kwargs)
        worker = plane.adopt(tool_of(fn))
        return super().submit(_run, plane, worker, ctx, fn, args, kwargs)


def _run(
    plane: ThreadPlane,
    worker: _Worker,
    ctx: contextvars.Context,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run one piece of pool work as the session's (in the pool thread)."""
    thread = threading.current_thread()
    name = thread.name
    error: BaseException | None = None
    plane.pool_started(worker, thread)
    try:
        if plane.host_interrupted():
            # Queued before the interrupt, started after it: it never runs.
            error = plane.interrupted_error()
            raise error
        return ctx.run(fn, *args, **kwargs)
    except BaseException as exc:
        error = exc
        raise
    finally:
        thread.name = name
        plane.exited(worker, error)


def tool_of(fn: Callable[..., Any]) -> str:
    """The name pool work is reported under (``asyncio.to_thread`` wraps it twice)."""
    while isinstance(fn, functools.partial):
        owner = getattr(fn.func, "__self__", None)
        # ``partial(ctx.run, func, ...)`` is asyncio.to_thread's wrapping.
        fn = fn.args[0] if isinstance(owner, contextvars.Context) and fn.args else fn.func
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__qualname__


def install(loop: asyncio.AbstractEventLoop) -> bool:
    """Make *loop*'s default executor a ``SessionPoolExecutor`` unless it has one of its
    own; whether the loop's default pool is now (or already was) session-aware."""
    # asyncio has no public getter for the default executor; a user-set one is kept
    # (and then work in it is seen only by ``session_threads``). uvloop does not expose
    # the attribute: there the runtime installs its own.
    current = getattr(loop, "_default_executor", None)
    if isinstance(current, SessionPoolExecutor):
        return True
    if current is not None:
        return False
    loop.set_default_executor(SessionPoolExecutor(thread_name_prefix="asyncio"))
    return True


# ------------------------------------------------------------ other threads


def _contexts(frame: FrameType) -> list[contextvars.Context]:
    """The contexts a frame holds in its locals (directly, as ``partial(ctx.run)``, or
    as a work item's ``fn``)."""
    found: list[contextvars.Context] = []
    try:
        values = list(frame.f_locals.values())
    except Exception:  # a frame torn down under us: nothing to see
        return found
    for value in values:
        for candidate in (value, getattr(value, "fn", None)):
            if isinstance(candidate, contextvars.Context):
                found.append(candidate)
            elif isinstance(candidate, functools.partial):
                owner = getattr(candidate.func, "__self__", None)
                if isinstance(owner, contextvars.Context):
                    found.append(owner)
    return found


#: Threads of the runtime's own that never run a session's work (the loop monitor):
#: ``session_threads`` skips them, as it does the caller's.
service_threads: set[int | None] = set()


def session_threads(session: PlaneHost, known: set[int]) -> list[tuple[int, str]]:
    """Live threads (ident, name), other than the caller's, *known* and the service
    threads, with a frame holding a context whose current session is *session*: they
    run its work."""
    me = threading.get_ident()
    skip = service_threads
    found = []
    for ident, top in sys._current_frames().items():
        if ident == me or ident in known or ident in skip:
            continue
        frame: FrameType | None = top
        while frame is not None:
            if any(ctx.get(_current_session) is session for ctx in _contexts(frame)):
                found.append(ident)
                break
            frame = frame.f_back
    if not found:  # the usual case: no thread list to build
        return []
    names = {t.ident: t.name for t in threading.enumerate()}
    return [(ident, names[ident]) for ident in found if ident in names]
