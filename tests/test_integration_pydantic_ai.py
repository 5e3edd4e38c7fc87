"""kill_switch.integrations.pydantic_ai with a scripted FunctionModel: every tool kind,
killed mid-tool from a task and from a thread, the agent inside and outside the block."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("pydantic_ai")

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

import kill_switch as ks
from kill_switch.integrations.pydantic_ai import KillSwitch

from .agent_kit import ARGS, KINDS, SECRET, Kit, check_stopped, is_kill

if TYPE_CHECKING:
    from pathlib import Path


def scripted(kit: Kit, kind: str) -> FunctionModel:
    """First call: run the tool; later calls: answer. Every call is noted."""
    args = ARGS[kind]

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        kit.model_called(repr(messages))
        if kit.model_calls == 1:
            return ModelResponse(parts=[ToolCallPart(kind, args)])
        return ModelResponse(parts=[TextPart("done")])

    return FunctionModel(respond)


async def refused_handler(args: Any) -> Any:
    """Never reached: the stopped session refuses the call first."""
    raise AssertionError("a tool ran after the kill")


def make_agent(kit: Kit, kind: str, capability: KillSwitch | None) -> Agent[None, str]:
    return Agent(
        scripted(kit, kind),
        tools=list(kit.tools().values()),
        capabilities=[capability] if capability is not None else [],
    )


@pytest.mark.parametrize("where", ["inside", "outside"])
@pytest.mark.parametrize("how", ["task", "thread"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_kill_mid_tool_stops_the_run(
    tmp_path: Path, kind: str, how: Any, where: Any
) -> None:
    """Killed mid-tool: no model call after it, nothing left running, an honest report."""
    kit = Kit(tmp_path)
    try:
        async with ks.Runtime() as runtime:

            async def agent(session: ks.Session | None) -> str:
                result = await make_agent(kit, kind, KillSwitch(session)).run("go")
                return result.output

            report, raised, returned = await kit.run(runtime, agent, how=how, where=where)
            check_stopped(kit, kind, report)
            assert returned is None
            assert where == "inside" or is_kill(raised), raised
            if kind != "sync_stubborn":
                assert await kit.settle_writes() == 0
            # The next run is refused before its first model request, the next tool too.
            with pytest.raises(ks.Interrupted):
                await make_agent(kit, kind, KillSwitch(kit.session)).run("again")
            assert kit.model_calls == 1
            with pytest.raises(ks.Interrupted):
                await KillSwitch(kit.session).wrap_tool_execute(
                    None,  # type: ignore[arg-type]  # the hook reads call.tool_name only
                    call=ToolCallPart(kind, ARGS[kind]),
                    tool_def=None,  # type: ignore[arg-type]
                    args=ARGS[kind],
                    handler=refused_handler,
                )
    finally:
        kit.finish()


async def test_the_published_schema_is_the_tools_own(tmp_path: Path) -> None:
    """A KillSwitch agent shows the model each tool's real parameters and docstring."""
    kit = Kit(tmp_path)
    seen: list[Any] = []

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.extend(info.function_tools)
        return ModelResponse(parts=[TextPart("done")])

    async with ks.Runtime() as runtime, runtime.session("a"):
        agent = Agent(FunctionModel(respond), tools=list(kit.tools().values()),
                      capabilities=[KillSwitch()])  # fmt: skip
        await agent.run("go")
    by_name = {t.name: t for t in seen}
    assert set(by_name["sync_poll"].parameters_json_schema["properties"]) == {"steps"}
    assert by_name["long_async"].description == "Wait for a slow service, then write its answer."


async def test_without_the_integration_a_framework_thread_outlives_the_report(
    tmp_path: Path,
) -> None:
    """Negative control: the framework's own pool (anyio's) runs the sync tool, which
    keeps writing after the report; the report is honest about it all the same: not
    quiescent, the pool thread named as still running (seen on its stack)."""
    kit = Kit(tmp_path)
    try:
        async with ks.Runtime() as runtime:

            async def agent(session: ks.Session | None) -> str:
                return (await make_agent(kit, "sync_stubborn", None).run("go")).output

            report, _, _ = await kit.run(runtime, agent, how="task", where="inside")
            assert (report.outcome, report.quiescent) == ("unresponsive", False)
            assert [(t.name, t.running) for t in report.threads] == [("AnyIO worker thread", True)]
            assert await kit.settle_writes() > 0
    finally:
        kit.finish()


async def test_outside_any_session_the_capability_says_so(tmp_path: Path) -> None:
    """Without a session given or current, the run fails with a clear error."""
    kit = Kit(tmp_path)
    with pytest.raises(RuntimeError, match="no kill_switch session"):
        await make_agent(kit, "long_async", KillSwitch()).run("go")
    assert SECRET  # the constant is shared with the other tests
