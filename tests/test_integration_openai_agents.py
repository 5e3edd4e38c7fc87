"""kill_switch.integrations.openai_agents with a scripted Model: every tool kind, killed
mid-tool from a task and from a thread, the agent inside and outside the block."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("agents")

import agents
from agents.testing import ScriptedModel, assistant_message, function_call

import kill_switch as ks
from kill_switch._tools import framework_tool
from kill_switch.integrations.openai_agents import function_tool, guard_model

from .agent_kit import ARGS, KINDS, Kit, check_stopped, is_kill

if TYPE_CHECKING:
    from pathlib import Path

agents.set_tracing_disabled(True)  # no network: nothing to export traces to


class NotingModel(ScriptedModel):
    """The SDK's scripted model, noting each request (and whether it came after the kill)."""

    def __init__(self, kit: Kit, kind: str) -> None:
        super().__init__(
            [
                [function_call(kind, ARGS[kind], call_id="c1")],
                [assistant_message("done")],
                [assistant_message("again")],
            ]
        )
        self.kit = kit

    async def get_response(self, *args: Any, **kwargs: Any) -> Any:
        self.kit.model_called(repr((args, kwargs)))
        return await super().get_response(*args, **kwargs)


def make_agent(
    kit: Kit, kind: str, session: ks.Session | None, *, integrated: bool = True
) -> agents.Agent[Any]:
    model = NotingModel(kit, kind)
    if not integrated:
        return agents.Agent(
            name="a", model=model, tools=[agents.function_tool(f) for f in kit.tools().values()]
        )
    tools: list[agents.Tool] = [function_tool(f, session=session) for f in kit.tools().values()]
    return agents.Agent(name="a", model=guard_model(model, session=session), tools=tools)


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

            async def agent(session: ks.Session | None) -> Any:
                result = await agents.Runner.run(make_agent(kit, kind, session), "go")
                return result.final_output

            report, raised, returned = await kit.run(runtime, agent, how=how, where=where)
            check_stopped(kit, kind, report)
            assert returned is None
            assert where == "inside" or is_kill(raised), raised
            if kind != "sync_stubborn":
                assert await kit.settle_writes() == 0
            with pytest.raises(ks.Interrupted):
                await agents.Runner.run(make_agent(kit, kind, kit.session), "again")
            assert kit.model_calls == 1
            # The next tool call (the function function_tool hands the SDK) is refused.
            with pytest.raises(ks.Interrupted):
                await framework_tool(kit.tools()[kind], kit.session)(**ARGS[kind])
    finally:
        kit.finish()


async def test_the_tool_schema_is_the_functions_own(tmp_path: Path) -> None:
    """function_tool publishes the real parameters and docstring of a wrapped tool."""
    kit = Kit(tmp_path)
    tool = function_tool(kit.tools()["sync_poll"])
    assert tool.name == "sync_poll"
    assert set(tool.params_json_schema["properties"]) == {"steps"}
    assert tool.description.startswith("Write *steps* records")


async def test_without_the_integration_the_model_is_called_after_the_kill(
    tmp_path: Path,
) -> None:
    """Negative control: the SDK's own pool runs the sync tool unseen and, outside the
    block, the run goes on to call the model after the kill."""
    kit = Kit(tmp_path)
    try:
        async with ks.Runtime() as runtime:

            async def agent(session: ks.Session | None) -> Any:
                result = await agents.Runner.run(
                    make_agent(kit, "sync_stubborn", session, integrated=False), "go"
                )
                return result.final_output

            report, raised, returned = await kit.run(runtime, agent, how="task", where="outside")
            assert report.threads == ()
            assert raised is None
            assert returned == "done"
            assert kit.model_calls_after_kill == 1
    finally:
        kit.finish()
