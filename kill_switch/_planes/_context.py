"""The session the running code belongs to, and the checks sync tools make against it.

The current session travels in a context variable, not a thread-local: it follows the
session's context into tasks and into worker threads started by ``anyio.to_thread`` /
``session.run_sync`` (which copy the context), not the thread id.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
from contextvars import ContextVar
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from kill_switch._vocabulary._validate import non_negative

if TYPE_CHECKING:
    from collections.abc import Callable

    from kill_switch._vocabulary._plane import PlaneHost

P = ParamSpec("P")
R = TypeVar("R")

#: The session the running code belongs to (``kill_switch.current_session()``).
_current_session: ContextVar[PlaneHost | None] = ContextVar(
    "kill_switch_current_session", default=None
)


def check() -> None:
    """Raise ``Interrupted`` if the current session has been interrupted.

    Cheap (a context-variable read and a flag test), callable from coroutines and worker
    threads alike; use it at commit points so no side effect lands after a kill. Outside
    any session it does nothing. It is not a checkpoint: it never yields.

    Raises:
        Interrupted: the current session was interrupted.
    """
    session = _current_session.get()
    if session is not None and session.is_interrupted():
        raise session.interrupted_error()


def sleep(seconds: float) -> None:
    """Block the calling worker thread for *seconds*, waking early if interrupted.

    Event-driven (it waits on the session's flag, it does not poll). Outside any session
    it is a plain sleep.

    Raises:
        Interrupted: the current session was interrupted before or during the sleep.
        ValueError: *seconds* is negative or NaN.
        RuntimeError: called on a thread running an event loop (it would block the loop;
            use ``await anyio.sleep()`` there).
    """
    non_negative("seconds", seconds, inf_ok=True)
    if asyncio._get_running_loop() is not None:
        raise RuntimeError(
            "kill_switch.sleep() blocks its thread; in a coroutine use `await anyio.sleep()`"
        )
    session = _current_session.get()
    if session is None:
        import threading

        threading.Event().wait(seconds)
        return
    if session.wait_interrupted(None if math.isinf(seconds) else seconds):
        raise session.interrupted_error()


def bind(fn: Callable[P, R]) -> Callable[P, R]:
    """Return *fn* bound to the caller's context, so the current session follows it.

    Hand the result to a thread pool or a ``threading.Thread`` started inside a sync
    tool: there ``check()`` and ``sleep()`` answer for the session that was current when
    ``bind`` was called. Each call runs in a fresh copy of that context, so the bound
    callable may run in several threads at once. Without it, a plain thread starts with
    an empty context (CPython 3.11-3.13) and ``check()`` there does nothing.
    """
    ctx = contextvars.copy_context()

    def bound(*args: P.args, **kwargs: P.kwargs) -> R:
        return ctx.copy().run(fn, *args, **kwargs)

    functools.update_wrapper(bound, fn)
    return bound
