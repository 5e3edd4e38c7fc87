"""kill_switch.integrations.langgraph with a scripted bind_tools chat model and a ToolNode
that turns tool errors into text: every tool kind, killed mid-tool from a task and from
a thread, the graph inside and outside the block."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("langgraph")

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import StructuredTool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

import kill_switch as ks
from kill_switch.integrations.langgraph import KillSwitchCallback, tool

from .agent_kit import ARGS, KINDS, Kit, check_stopped, is_kill

if TYPE_CHECKING:
    from pathlib import Path


class ScriptedChat(BaseChatModel):
    """First call: a tool call of ``kind``; later calls: an answer. Notes every call."""

    kit: Any
    kind: str

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        self.kit.model_called(repr(messages))
        if self.kit.model_calls == 1:
            call = {"name": self.kind, "args": ARGS[self.kind], "id": "c1", "type": "tool_call"}
            msg = AIMessage(content="", tool_calls=[call])
        else:
            msg = AIMessage(content="done")
        return ChatResult(generations=[ChatGeneration(message=msg)])


def make_graph(kit: Kit, kind: str, tools: list[StructuredTool]) -> Any:
    model = ScriptedChat(kit=kit, kind=kind).bind_tools(tools)

    async def call_model(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    g = StateGraph(MessagesState)
    g.add_node("model", call_model)
    g.add_node("tools", ToolNode(tools, handle_tool_errors=True))
    g.add_edge(START, "model")
    g.add_conditional_edges("model", tools_condition)
    g.add_edge("tools", "model")
    g.add_edge("model", END)
    return g.compile()


async def invoke(kit: Kit, kind: str, session: ks.Session | None, integrated: bool = True) -> Any:
    if integrated:
        tools = [tool(f, session=session) for f in kit.tools().values()]
        config: Any = {"callbacks": [KillSwitchCallback(session)]}
    else:
        tools = [
            StructuredTool.from_function(coroutine=f)
            if inspect.iscoroutinefunction(f)
            else StructuredTool.from_function(f)
            for f in kit.tools().values()
        ]
        config = {}
    out = await make_graph(kit, kind, tools).ainvoke({"messages": [("user", "go")]}, config)
    return out["messages"][-1].content


@pytest.mark.parametrize("where", ["inside", "outside"])
@pytest.mark.parametrize("how", ["task", "thread"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_kill_mid_tool_stops_the_graph(
    tmp_path: Path, kind: str, how: Any, where: Any
) -> None:
    """Killed mid-tool: no model call after it, nothing left running, an honest report."""
    kit = Kit(tmp_path)
    try:
        async with ks.Runtime() as runtime:

            async def agent(session: ks.Session | None) -> Any:
                return await invoke(kit, kind, session)

            report, raised, returned = await kit.run(runtime, agent, how=how, where=where)
            check_stopped(kit, kind, report)
            assert returned is None
            assert where == "inside" or is_kill(raised), raised
            if kind != "sync_stubborn":
                assert await kit.settle_writes() == 0
            with pytest.raises(ks.Interrupted):
                await invoke(kit, kind, kit.session)
            assert kit.model_calls == 1
            with pytest.raises(ks.Interrupted):
                await tool(kit.tools()[kind], session=kit.session).ainvoke(ARGS[kind])
    finally:
        kit.finish()


def test_the_tool_schema_is_the_functions_own(tmp_path: Path) -> None:
    """tool() publishes the real parameters and docstring, not (*args, **kwargs)."""
    t = tool(Kit(tmp_path).tools()["tree"])
    assert set(t.args) == {"width"}
    assert "sleeping children" in t.description


async def test_without_the_integration_the_kill_reaches_the_model_as_text(
    tmp_path: Path,
) -> None:
    """Negative control: outside the block the graph's own pool runs the sync tool unseen,
    and the graph calls the model again after the kill and returns normally."""
    kit = Kit(tmp_path)
    try:
        async with ks.Runtime() as runtime:

            async def agent(session: ks.Session | None) -> Any:
                return await invoke(kit, "sync_stubborn", session, integrated=False)

            report, raised, returned = await kit.run(runtime, agent, how="task", where="outside")
            assert report.threads == ()
            assert raised is None
            assert returned == "done"
            assert kit.model_calls_after_kill == 1
    finally:
        kit.finish()


async def test_a_tools_raw_task_is_the_leak_and_the_graphs_own_task_is_swept_apart(
    tmp_path: Path,
) -> None:
    """A tool that leaks a raw create_task is named in leaked_tasks; what LangGraph leaves
    of its own (its callback manager's error hook) is swept apart, in swept_tasks."""
    import asyncio

    import anyio

    kit = Kit(tmp_path)
    escaped: list[asyncio.Task[None]] = []

    async def long_async(seconds: float) -> str:
        """Wait for a slow service, leaving a helper task behind."""
        escaped.append(asyncio.get_running_loop().create_task(anyio.sleep(seconds), name="esc"))
        kit.started.set()
        await anyio.sleep(seconds)
        return "late"

    try:
        async with ks.Runtime() as runtime:
            session = runtime.session("agent")

            async def agent() -> None:
                async with session:
                    graph = make_graph(kit, "long_async", [tool(long_async)])
                    await graph.ainvoke(
                        {"messages": [("user", "go")]}, {"callbacks": [KillSwitchCallback()]}
                    )

            async with anyio.create_task_group() as tg:
                tg.start_soon(agent)
                await anyio.to_thread.run_sync(kit.started.wait, 10.0)
                report = await session.interrupt("stop", trigger="operator")
    finally:
        kit.finish()
    assert [t.name for t in report.leaked_tasks] == ["esc"], report.summary()
    assert escaped[0].done()
    assert all(t.name != "esc" for t in report.swept_tasks)
    assert report.quiescent
