"""A ``concurrent.futures.Executor`` whose work runs on a session's thread plane.

Frameworks that run plain ``def`` callbacks in "an executor" (pydantic-ai's
``using_thread_executor``, ``loop.run_in_executor(executor, ...)``) get this one, so the
thread is a session worker: ``check()``/``sleep()`` answer for the session, an interrupt
waits for it up to ``policy.thread_grace`` and abandons it past that, and the report
names it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

    from kill_switch._session import Session

T = TypeVar("T")

#: The tool a framework is running in this context (named in the audit and the report).
tool_name: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kill_switch_integration_tool", default=None
)


class SessionExecutor(concurrent.futures.Executor):
    """Runs each submitted callable through ``session.run_sync`` on the session's loop.

    ``submit`` must be called on the session's loop thread (``loop.run_in_executor`` does).
    The relay task runs in an empty context: it belongs to the thread plane, not to the
    agent, so a stop does not count it as a task the agent leaked.
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        self._relays: set[asyncio.Task[None]] = set()

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        loop = asyncio.get_running_loop()
        if loop is not self._session.loop:
            raise RuntimeError("SessionExecutor.submit() must run on the session's event loop")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        name = tool_name.get() or getattr(fn, "__name__", None) or repr(fn)
        target = functools.partial(fn, *args, **kwargs)
        task = loop.create_task(self._relay(target, name, future), context=contextvars.Context())
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)
        return future

    async def _relay(
        self, target: Callable[[], T], name: str, future: concurrent.futures.Future[T]
    ) -> None:
        try:
            result = await self._session.run_sync(target, tool=name)
        except asyncio.CancelledError:
            if not future.cancelled():
                future.cancel()
            raise
        # Anything else (Interrupted included) goes to the awaiting side, or it had
        # gone: nothing else waits for this relay.
        except BaseException as exc:  # noqa: ASYNC103
            if not future.cancelled():
                future.set_exception(exc)
        else:
            if not future.cancelled():
                future.set_result(result)
