"""Tools as an agent framework sees them: guarded callables that keep their signature.

``session.wrap(fn)`` and the ``tool`` decorator turn a tool function into an ``async``
callable that runs each call through a session — ``session.call`` for a coroutine
function, ``session.run_sync`` (the session's thread plane, never the loop's thread) for a
plain function — and that still *looks like* the tool: name, docstring, annotations and
``inspect.signature`` are the tool's own (``functools.update_wrapper`` plus an explicit
``__signature__``), so frameworks that build a JSON schema from the signature publish the
real parameters, not ``(*args, **kwargs)``.

``tool`` binds to the session current at *call* time, so tools can be declared at import
time; ``bind_session`` makes a session current in a task that runs outside its block (a
server's request task, say), through the same context variable ``session.call`` and
``check()`` read.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast, overload

from ._planes._context import _current_session as _host_var
from ._vocabulary._block import is_own
from ._vocabulary._exceptions import ToolBlocked

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from contextvars import ContextVar

    from ._session import Session

#: The current-session variable, seen as holding sessions: only sessions (and
#: ``bind_session``) set it; a cast, not a wrapper, since it is read on every tool call.
_current_session = cast("ContextVar[Session | None]", _host_var)

P = ParamSpec("P")
R = TypeVar("R")

#: Keyword names ``session.call`` / ``run_sync`` take for themselves: a tool parameter of
#: that name is passed through a ``functools.partial`` instead.
_RESERVED = frozenset({"tool", "cost"})


def _name_of(fn: object) -> str:
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else repr(fn)


def is_async_callable(fn: object) -> bool:
    """Whether calling *fn* returns a coroutine (functions, methods, partials, objects)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004  # an object with an async __call__
    )


async def run_tool(
    session: Session,
    fn: Callable[..., Any],
    is_async: bool,
    name: str,
    cost: float,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run one call of *fn* through *session*: ``call`` if async, ``run_sync`` if not."""
    if is_async:
        if kwargs and not _RESERVED.isdisjoint(kwargs):
            return await session.call(functools.partial(fn, **kwargs), *args, tool=name, cost=cost)
        return await session.call(fn, *args, tool=name, cost=cost, **kwargs)
    # run_sync takes no keyword arguments for the tool (its own docs: use a partial).
    target = functools.partial(fn, **kwargs) if kwargs else fn
    return await session.run_sync(target, *args, tool=name, cost=cost)


def _dress(guarded: Callable[..., Any], fn: Callable[..., Any], name: str | None) -> None:
    """Give *guarded* the tool's identity: name, doc, annotations, signature."""
    functools.update_wrapper(guarded, fn)
    # A builtin without a signature: frameworks fall back to their own reading.
    with contextlib.suppress(TypeError, ValueError):
        guarded.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    if name is not None:
        guarded.__name__ = name
        guarded.__qualname__ = name


@overload
def wrap(
    session: Session, fn: Callable[P, Awaitable[R]], *, tool: str | None = ..., cost: float = ...
) -> Callable[P, Awaitable[R]]: ...
@overload
def wrap(
    session: Session, fn: Callable[P, R], *, tool: str | None = ..., cost: float = ...
) -> Callable[P, Awaitable[R]]: ...
def wrap(
    session: Session, fn: Callable[..., Any], *, tool: str | None = None, cost: float = 0.0
) -> Callable[..., Awaitable[Any]]:
    """Return *fn* as a guarded tool of *session* (see ``Session.wrap``).

    Raises:
        TypeError: *fn* is not callable.
    """
    if not callable(fn):
        raise TypeError(f"a tool must be callable, not {type(fn).__name__}")
    name = tool if tool is not None else _name_of(fn)
    is_async = is_async_callable(fn)
    call = session.call

    # The async path calls session.call directly: one coroutine frame less than going
    # through run_tool, ~0.3 us of the ≤1 us a wrapper may add (bench_integrations.py).
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        if is_async and not (kwargs and ("tool" in kwargs or "cost" in kwargs)):
            return await call(fn, *args, tool=name, cost=cost, **kwargs)
        return await run_tool(session, fn, is_async, name, cost, args, kwargs)

    _dress(guarded, fn, tool)
    return guarded


def _require_session(name: str) -> Session:
    session = _current_session.get()
    if session is None:
        raise RuntimeError(
            f"tool {name!r} was called outside any kill_switch session: call it inside "
            "`async with runtime.session(...)`, or bind one in this task with "
            "`with kill_switch.bind_session(session):`"
        )
    return session


@overload
def tool(fn: Callable[P, Awaitable[R]], /) -> Callable[P, Awaitable[R]]: ...
@overload
def tool(fn: Callable[P, R], /) -> Callable[P, Awaitable[R]]: ...
@overload
def tool(
    *, name: str | None = ..., cost: float = ...
) -> Callable[[Callable[..., Any]], Callable[..., Awaitable[Any]]]: ...
def tool(
    fn: Callable[..., Any] | None = None, /, *, name: str | None = None, cost: float = 0.0
) -> Any:
    """Declare a tool at import time; each call runs through the session current then.

    ``@kill_switch.tool`` or ``@kill_switch.tool(name=..., cost=...)``. The result is an
    ``async`` function with the tool's own name, docstring and signature; a plain ``def``
    runs in a worker thread of the session's thread plane (``session.run_sync``).

    Raises:
        TypeError: the decorated object is not callable.
        RuntimeError: (at call time) no session is current in the calling context.
        ToolBlocked, Interrupted: as ``session.call``.
    """

    def decorate(f: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        if not callable(f):
            raise TypeError(f"kill_switch.tool needs a callable, not {type(f).__name__}")
        tool_name = name if name is not None else _name_of(f)
        is_async = is_async_callable(f)

        async def guarded(*args: Any, **kwargs: Any) -> Any:
            session = _current_session.get()
            if session is None:
                session = _require_session(tool_name)
            if is_async and not (kwargs and ("tool" in kwargs or "cost" in kwargs)):
                return await session.call(f, *args, tool=tool_name, cost=cost, **kwargs)
            return await run_tool(session, f, is_async, tool_name, cost, args, kwargs)

        _dress(guarded, f, name)
        guarded.__kill_switch_tool__ = True  # type: ignore[attr-defined]
        return guarded

    if fn is not None:
        return decorate(fn)
    return decorate


@contextlib.contextmanager
def bind_session(session: Session) -> Iterator[Session]:
    """Make *session* the current one in this context until the ``with`` ends.

    For an agent loop that runs outside the session's block (a server's request task):
    inside, ``kill_switch.tool`` tools, ``check()``, ``sleep()`` and the framework
    integrations answer for *session*. Binding does not enter the block: the block's
    owner still decides when the session ends.

    Raises:
        TypeError: *session* is not a ``Session``.
    """
    from ._session import Session  # runtime import: _session imports this module

    if not isinstance(session, Session):
        raise TypeError(f"bind_session() needs a Session, not {type(session).__name__}")
    token = _current_session.set(session)
    try:
        yield session
    finally:
        _current_session.reset(token)


# ------------------------------------------------------- shared by the integrations


def resolve(session: Session | None) -> Session:
    """*session* if given, else the current one.

    Raises:
        RuntimeError: neither.
    """
    if session is not None:
        return session
    current = _current_session.get()
    if current is None:
        raise RuntimeError(
            "no kill_switch session: pass session=..., run inside the session's block, "
            "or bind one with `with kill_switch.bind_session(session):`"
        )
    return current


def refuse_if_interrupted(session: Session) -> None:
    """Raise the session's ``Interrupted`` once it was interrupted (from any thread).

    The integrations call this before every model request: ``Interrupted`` is a
    ``BaseException``, so no framework catch-all turns the refusal into a retry.
    """
    if session.interrupted or session.is_interrupted():
        raise session.interrupted_error()


def as_interrupted(session: Session, exc: ToolBlocked) -> BaseException:
    """A block raised because *session* was stopped, as the kill itself; else *exc*.

    A framework hands a ``ToolBlocked`` (an ``Exception``) to the model as tool-error text
    and carries on; a block that only says "this session is stopped" must end the agent
    loop instead, as the interrupt does.
    """
    if is_own(exc, session.id):
        return session.interrupted_error()
    return exc


async def call_strict(
    session: Session,
    fn: Callable[..., Any],
    is_async: bool,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``run_tool`` for a framework, with *session* current inside the tool (``check()``,
    ``current_session()``); a stopped session's refusal leaves as ``Interrupted``."""
    token = _current_session.set(session)
    try:
        return await run_tool(session, fn, is_async, name, 0.0, args, kwargs)
    except ToolBlocked as exc:
        out = as_interrupted(session, exc)
        if out is exc:
            raise
        raise out from None
    finally:
        _current_session.reset(token)


def framework_tool(
    fn: Callable[..., Any], session: Session | None, name: str | None = None
) -> Callable[..., Awaitable[Any]]:
    """*fn* as an ``async`` tool for a framework, bound to *session* or the current one.

    Like ``tool``, plus: a refusal because the session was stopped raises ``Interrupted``
    (see ``as_interrupted``), and ``session`` may be fixed here.
    """
    if not callable(fn):
        raise TypeError(f"a tool must be callable, not {type(fn).__name__}")
    tool_name = name if name is not None else _name_of(fn)
    is_async = is_async_callable(fn)

    async def guarded(*args: Any, **kwargs: Any) -> Any:
        current = _current_session.get()
        s = session if session is not None else current
        if s is None:
            s = _require_session(tool_name)
        if s is current:
            # Already current (the usual case): call_strict's binding inlined away.
            try:
                if is_async and not (kwargs and ("tool" in kwargs or "cost" in kwargs)):
                    return await s.call(fn, *args, tool=tool_name, **kwargs)
                return await run_tool(s, fn, is_async, tool_name, 0.0, args, kwargs)
            except ToolBlocked as exc:
                out = as_interrupted(s, exc)
                if out is exc:
                    raise
                raise out from None
        return await call_strict(s, fn, is_async, tool_name, args, kwargs)

    _dress(guarded, fn, name)
    return guarded
