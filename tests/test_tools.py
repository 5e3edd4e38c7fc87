"""Tools as frameworks see them (session.wrap, ks.tool, bind_session) and a kill that no
catch-all ``except Exception`` can swallow."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import kill_switch as ks

WAIT = 10.0


async def lookup(city: str, *, units: str = "metric") -> dict[str, str]:
    """Look the weather up."""
    await anyio.lowlevel.checkpoint()
    return {"city": city, "units": units}


def add(a: int, b: int = 2) -> int:
    """Add two numbers."""
    assert threading.current_thread() is not threading.main_thread()
    return a + b


@ks.tool
def thread_name() -> str:
    """Name the thread this runs in."""
    return threading.current_thread().name


@ks.tool(name="priced", cost=1.5)
async def priced(x: int) -> int:
    """A tool with a cost."""
    return x


@pytest.mark.parametrize("fn", [lookup, add])
async def test_wrap_keeps_name_signature_annotations_and_doc(fn: Any) -> None:
    """A wrapped tool looks like the function to a schema builder."""
    async with ks.Runtime() as runtime, runtime.session("a") as session:
        guarded = session.wrap(fn)
    assert guarded.__name__ == fn.__name__
    assert guarded.__doc__ == fn.__doc__
    assert inspect.signature(guarded) == inspect.signature(fn)
    assert guarded.__annotations__ == fn.__annotations__
    assert getattr(guarded, "__wrapped__", None) is fn
    assert inspect.iscoroutinefunction(guarded)


async def test_wrap_runs_a_sync_tool_in_a_session_thread() -> None:
    """A sync tool runs off the loop thread, in the session's thread plane."""
    async with ks.Runtime() as runtime, runtime.session("a") as session:
        assert await session.wrap(add)(1, b=5) == 6
        assert await session.wrap(lookup)("Oslo", units="si") == {"city": "Oslo", "units": "si"}
        name = await thread_name()
    assert name.startswith("kill_switch a/thread_name")


async def test_a_tool_parameter_named_like_calls_own_keywords_still_works() -> None:
    """A tool whose parameters are called ``tool`` and ``cost`` gets them."""

    async def bill(tool: str, cost: float) -> str:
        return f"{tool}:{cost}"

    async with ks.Runtime() as runtime, runtime.session("a") as session:
        assert await session.wrap(bill)(tool="x", cost=2.0) == "x:2.0"


async def test_tool_binds_at_call_time_and_counts_its_cost() -> None:
    """A decorated tool runs through the session current when it is called."""
    async with ks.Runtime() as runtime, runtime.session("a", limits=ks.Limits(max_cost=10)) as s:
        assert await priced(3) == 3
        assert s.info().cost == 1.5


async def test_tool_outside_any_session_says_how_to_bind_one() -> None:
    """Called with no current session, a decorated tool raises a clear error."""
    with pytest.raises(RuntimeError, match="bind_session"):
        await priced(1)


async def test_bind_session_makes_a_session_current_outside_its_block() -> None:
    """A task outside the block binds the session; its tools and check() answer for it."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:

            async def request() -> None:
                assert ks.current_session() is None
                with ks.bind_session(session):
                    assert ks.current_session() is session
                    await thread_name()
                assert ks.current_session() is None

            task = asyncio.get_running_loop().create_task(request(), context=contextvars.Context())
            await task
    with pytest.raises(TypeError, match="Session"):
        with ks.bind_session("nope"):  # type: ignore[arg-type]
            pass


# ------------------------------------------------------------- not swallowed


async def agent_loop(session: ks.Session, tool: Any, calls: list[str]) -> str:
    """A typical agent loop: a tool error becomes text for the model, and it goes on."""
    for _ in range(3):
        calls.append("model")
        try:
            await tool()
        except Exception as exc:  # what frameworks and users write
            calls.append(f"error text: {type(exc).__name__}")
    return "finished"


async def test_except_exception_in_an_agent_loop_does_not_swallow_the_kill() -> None:
    """The kill leaves a catch-all loop at once: no further model turn, no 'finished'."""
    started = anyio.Event()

    async def slow() -> None:
        started.set()
        await anyio.sleep(300)

    calls: list[str] = []
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            task = asyncio.get_running_loop().create_task(
                agent_loop(session, session.wrap(slow), calls), context=contextvars.Context()
            )
            await started.wait()
            session.interrupt("stop", trigger="operator")
            await asyncio.wait([task])
    assert isinstance(task.exception(), ks.Interrupted)
    assert calls == ["model"]


async def test_except_exception_still_catches_the_refusal_of_a_stopped_session() -> None:
    """Negative control: the later refusal (ToolBlocked, an Exception) is caught as text,
    which is why the integrations turn it into the kill."""
    calls: list[str] = []
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            session.interrupt("stop", trigger="operator")
            await anyio.lowlevel.checkpoint()
        assert await agent_loop(session, session.wrap(lookup), calls) == "finished"
    assert calls.count("error text: ToolBlocked") == 3


async def test_a_sync_tool_catching_exception_around_check_is_still_stopped() -> None:
    """ks.check() inside ``try/except Exception`` in a sync tool still ends the tool."""
    running = threading.Event()
    outcome: list[str] = []

    def careless() -> None:
        running.set()
        for _ in range(100_000):
            try:
                ks.check()
            except Exception:  # the careless tool under test
                outcome.append("swallowed")
            ks.sleep(0.005)

    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            async with anyio.create_task_group() as tg:
                tg.start_soon(session.run_sync, careless)
                assert await anyio.to_thread.run_sync(running.wait, WAIT)
                session.interrupt("stop", trigger="operator")
    report = await session.handle.wait()
    assert outcome == []
    assert [t.outcome for t in report.threads] == ["interrupted"]
