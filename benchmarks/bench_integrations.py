"""The framework integrations: their per-call overhead, and a stop mid-tool through each.

Two cases, variants interleaved, on each loop:

* ``per call`` — a no-op async tool called in batches (1000 calls by default) from the
  session's body, figures per call. Baseline: ``session.call(noop)``. Variants: the
  tool wrapped by ``session.wrap``, declared with ``@ks.tool``, made a framework tool
  (``_tools.framework_tool``, what the OpenAI Agents SDK and LangGraph integrations
  hand their framework), and pydantic-ai's ``KillSwitch.wrap_tool_execute`` around the
  tool. **Target (issue 13): ≤ 1 µs extra per call over ``session.call``, p50.**
* ``stop mid-tool`` — ``interrupt()`` → ``StopReport`` (``report.latency.total``) while a
  long async tool runs, through each framework with its scripted model (pydantic-ai,
  the OpenAI Agents SDK, LangGraph, an in-process MCP server), as a ratio to the same
  stop of the same tool called with ``session.call`` without a framework. No target.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kill_switch as ks
from benchmarks import _harness as h
from kill_switch import _tools

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

NAME = "integrations"
TARGET_EXTRA_NS = 1000.0
BASE_CALL = "session.call"
BASE_STOP = "no framework (session.call)"


async def noop() -> None:
    """The no-op async tool."""


@ks.tool
async def declared() -> None:
    """The no-op tool, declared with ks.tool."""


# ------------------------------------------------------------------- per call


def call_variants(session: ks.Session, batch: int) -> dict[str, Callable[[], Awaitable[float]]]:
    """Each returns the time of one batch (ns)."""
    from pydantic_ai.messages import ToolCallPart

    from kill_switch.integrations.pydantic_ai import KillSwitch

    call = session.call
    wrapped = session.wrap(noop)
    framework = _tools.framework_tool(noop, None)
    capability = KillSwitch(session)
    part = ToolCallPart("noop", {})

    async def handler(args: Any) -> None:
        return None

    async def pydantic_ai_step() -> None:
        await capability.wrap_tool_execute(
            None,  # type: ignore[arg-type]  # the hook reads only call.tool_name
            call=part,
            tool_def=None,  # type: ignore[arg-type]
            args={},
            handler=handler,
        )

    return {
        BASE_CALL: h.batch_timer(lambda: call(noop), batch),
        "session.wrap(noop)()": h.batch_timer(wrapped, batch),
        "@ks.tool": h.batch_timer(declared, batch),
        "framework_tool (openai-agents, langgraph)": h.batch_timer(framework, batch),
        "pydantic-ai wrap_tool_execute": h.batch_timer(pydantic_ai_step, batch),
    }


async def bench_calls(loop: str, quick: bool, batch: int) -> list[h.Row]:
    reps, warmup = (20, 3) if quick else (300, 20)
    async with ks.Runtime() as runtime, runtime.session("bench") as session:
        samples = await h.interleave(call_variants(session, batch), reps=reps, warmup=warmup)
    baselines = {name: BASE_CALL for name in samples if name != BASE_CALL}
    rows = h.per_call_rows(NAME, loop, batch, samples, baselines)
    for row in rows:
        if row.baseline is not None:
            row.target = "≤1 µs extra p50"
            row.met = row.extra["extra_p50_ns"] <= TARGET_EXTRA_NS
    return rows


# ------------------------------------------------------------------- stop mid-tool


async def long_tool(seconds: float) -> str:
    """The long async tool every variant is stopped in."""
    started = _started.get()
    if started is not None:
        started.set()
    await asyncio.sleep(seconds)
    return "late"


_started: Any = None  # replaced by a ContextVar in main(); set per sample


def _agents() -> dict[str, Callable[[ks.Session, asyncio.Event], Awaitable[Any]]]:
    """Each runs one agent turn that calls ``long_tool`` inside the session's body."""
    import agents
    from agents.testing import ScriptedModel, function_call
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode
    from mcp.client._memory import InMemoryTransport
    from mcp.server.mcpserver import MCPServer
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelResponse, ToolCallPart
    from pydantic_ai.models.function import FunctionModel

    from kill_switch.integrations import langgraph as ks_lg
    from kill_switch.integrations import mcp as ks_mcp
    from kill_switch.integrations import openai_agents as ks_oa
    from kill_switch.integrations.pydantic_ai import KillSwitch

    agents.set_tracing_disabled(True)

    async def bare(session: ks.Session, started: asyncio.Event) -> Any:
        _started.set(started)
        return await session.call(long_tool, 300.0)

    async def pydantic_ai(session: ks.Session, started: asyncio.Event) -> Any:
        _started.set(started)
        model = FunctionModel(
            lambda m, i: ModelResponse(parts=[ToolCallPart("long_tool", {"seconds": 300.0})])
        )
        return await Agent(model, tools=[long_tool], capabilities=[KillSwitch()]).run("go")

    async def openai_agents(session: ks.Session, started: asyncio.Event) -> Any:
        _started.set(started)
        model = ScriptedModel([[function_call("long_tool", {"seconds": 300.0}, call_id="c")]])
        agent = agents.Agent(
            name="a", model=ks_oa.guard_model(model), tools=[ks_oa.function_tool(long_tool)]
        )
        return await agents.Runner.run(agent, "go")

    class Chat(BaseChatModel):
        @property
        def _llm_type(self) -> str:
            return "scripted"

        def _generate(self, *args: Any, **kwargs: Any) -> ChatResult:
            call = {"name": "long_tool", "args": {"seconds": 300.0}, "id": "c", "type": "tool_call"}
            return ChatResult(
                generations=[ChatGeneration(message=AIMessage("", tool_calls=[call]))]
            )

    async def langgraph(session: ks.Session, started: asyncio.Event) -> Any:
        _started.set(started)
        tools = [ks_lg.tool(long_tool)]

        async def call_model(state: MessagesState) -> dict[str, Any]:
            return {"messages": [await Chat().ainvoke(state["messages"])]}

        g = StateGraph(MessagesState)
        g.add_node("model", call_model)
        g.add_node("tools", ToolNode(tools))
        g.add_edge(START, "model")
        g.add_edge("model", "tools")
        config: Any = {"callbacks": [ks_lg.KillSwitchCallback()]}
        return await g.compile().ainvoke({"messages": [("user", "go")]}, config)

    server = MCPServer("bench")
    server.tool()(long_tool)

    async def mcp(session: ks.Session, started: asyncio.Event) -> Any:
        _started.set(started)
        async with InMemoryTransport(server) as (r, w), ks_mcp.ClientSession(r, w) as client:
            await client.initialize()
            return await client.call_tool("long_tool", {"seconds": 300.0})

    return {
        BASE_STOP: bare,
        "pydantic-ai": pydantic_ai,
        "openai-agents": openai_agents,
        "langgraph": langgraph,
        "mcp (in process)": mcp,
    }


def stop_variants(runtime: ks.Runtime) -> dict[str, Callable[[], Awaitable[float]]]:
    """Each runs one agent in a fresh session, kills it mid-tool, returns the stop (ns)."""

    def variant(
        agent: Callable[[ks.Session, asyncio.Event], Awaitable[Any]],
    ) -> Callable[[], Awaitable[float]]:
        async def kill(session: ks.Session, started: asyncio.Event) -> None:
            await started.wait()
            session.interrupt("bench", trigger="operator")

        async def run() -> float:
            started = asyncio.Event()
            async with runtime.session("bench") as session:
                # The agent runs in the session's body, as in an application; the kill
                # comes from a task of its own (not the session's: nothing to sweep).
                killer = asyncio.get_running_loop().create_task(
                    kill(session, started), context=contextvars.Context()
                )
                await agent(session, started)
            await killer
            report = await session.handle.wait()
            assert report.outcome == "stopped", report.summary()
            return report.latency.total * 1e9

        return run

    return {name: variant(agent) for name, agent in _agents().items()}


async def bench_stops(loop: str, quick: bool) -> list[h.Row]:
    reps, warmup = (3, 1) if quick else (60, 5)
    async with ks.Runtime() as runtime:
        samples = await h.interleave(stop_variants(runtime), reps=reps, warmup=warmup)
    stats = {n: h.summarize(vs) for n, vs in samples.items()}
    rows = []
    for name, st in stats.items():
        base = None if name == BASE_STOP else (BASE_STOP, stats[BASE_STOP])
        rows.append(h.make_row(NAME, "stop mid-tool", name, loop, None, st, baseline=base))
    return rows


def main(argv: list[str] | None = None) -> int:
    global _started
    _started = contextvars.ContextVar("bench_started", default=None)
    parser = h.make_parser(__doc__)
    parser.add_argument("--batch", type=int, default=1000, help="calls per sample")
    args = parser.parse_args(argv)
    env = h.environment()
    print(f"framework integrations   [{h.environment_line(env)}]")
    rows: list[h.Row] = []
    for loop in h.parse_loops(args.loops):
        rows += h.run_on(loop, bench_calls, loop, args.quick, args.batch)
        rows += h.run_on(loop, bench_stops, loop, args.quick)
    print("\n== integrations summary")
    h.print_extra(rows)
    if args.json:
        h.write_json(args.json, NAME, rows, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
