"""kill_switch.integrations.mcp: a stdio server the session owns, killed mid-tool from a
task and from a thread with the client inside and outside the block; an in-process
server's tool calls guarded the same way."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("mcp")

import mcp
from mcp.client._memory import InMemoryTransport
from mcp.server.mcpserver import MCPServer

import kill_switch as ks
from kill_switch.integrations.mcp import ClientSession, stdio_client

from .agent_kit import WAIT, Kit, is_kill

SERVER = Path(__file__).with_name("mcp_server.py")


async def wait_for_pids(kit: Kit, pidfile: Path) -> None:
    """Mark the tool started once the server wrote its children's pids."""
    # The pids live in another process's file: polled (no event crosses the process).
    with anyio.fail_after(WAIT):
        while len(await anyio.to_thread.run_sync(_pids, pidfile)) < 2:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    kit.pids.extend(await anyio.to_thread.run_sync(_pids, pidfile))
    kit.started.set()


def _pids(pidfile: Path) -> list[int]:
    return [int(p) for p in pidfile.read_text().split()] if pidfile.exists() else []


async def client_loop(kit: Kit, session: ks.Session | None, pidfile: Path, *, own: bool) -> Any:
    """One "model turn", one tool call over stdio, another "model turn"."""
    params = mcp.StdioServerParameters(command=sys.executable, args=[str(SERVER)])
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for_pids, kit, pidfile)
        if own:
            async with stdio_client(params, session=session) as (r, w):
                async with ClientSession(r, w, kill_switch_session=session) as client:
                    await client.initialize()
                    kit.model_called()
                    await client.call_tool("tree", {"width": 2, "pidfile": str(pidfile)})
                    kit.model_called()
        else:
            from mcp.client.stdio import stdio_client as sdk_stdio_client

            async with sdk_stdio_client(params) as (r, w):
                async with mcp.ClientSession(r, w) as client:
                    await client.initialize()
                    kit.model_called()
                    await client.call_tool("tree", {"width": 2, "pidfile": str(pidfile)})
                    kit.model_called()
    return "done"


@pytest.mark.parametrize("where", ["inside", "outside"])
@pytest.mark.parametrize("how", ["task", "thread"])
async def test_a_kill_mid_call_stops_the_stdio_server_and_its_tree(
    tmp_path: Path, how: Any, where: Any
) -> None:
    """The server and the children its tool started are gone, and the call raised the kill."""
    kit = Kit(tmp_path)
    pidfile = tmp_path / "pids"
    async with ks.Runtime() as runtime:

        async def agent(session: ks.Session | None) -> Any:
            return await client_loop(kit, session, pidfile, own=True)

        report, raised, returned = await kit.run(runtime, agent, how=how, where=where)
    assert report.outcome == "stopped", report.summary()
    assert returned is None
    assert where == "inside" or is_kill(raised), raised
    assert kit.model_calls == 1
    assert kit.model_calls_after_kill == 0
    assert len(report.processes) == 1
    assert report.processes[0].returncode is not None
    assert kit.pids
    assert kit.alive() == []


async def test_the_sdks_own_stdio_client_is_adopted_by_the_spawn_hook(tmp_path: Path) -> None:
    """Without the integration, the SDK's own stdio_client spawns the server in the
    session's context: the spawn hook adopts it, and its whole tree stops with the
    session (``tests/test_spawn_attribution.py`` has the hook's negative control)."""
    kit = Kit(tmp_path)
    pidfile = tmp_path / "pids"
    async with ks.Runtime() as runtime:

        async def agent(session: ks.Session | None) -> Any:
            return await client_loop(kit, session, pidfile, own=False)

        report, _, _ = await kit.run(runtime, agent, how="task", where="inside")
    assert report.quiescent, report.summary()
    (row,) = report.processes
    assert row.adopted
    assert kit.pids
    assert kit.alive() == []


@pytest.mark.parametrize("how", ["task", "thread"])
async def test_an_in_process_servers_call_is_cancelled_and_the_next_refused(
    tmp_path: Path, how: Any
) -> None:
    """In process: the guarded call_tool raises the kill, the next one is refused."""
    kit = Kit(tmp_path)
    server = MCPServer("slow")

    @server.tool()
    async def slow(seconds: float) -> str:
        """Wait, then answer."""
        kit.started.set()
        await anyio.sleep(seconds)
        kit.write("slow done")
        return "late"

    async with ks.Runtime() as runtime:
        async with InMemoryTransport(server) as (r, w):
            async with ClientSession(r, w) as client:
                await client.initialize()
                outcome: list[BaseException] = []

                async def agent(session: ks.Session | None) -> Any:
                    with ks.bind_session(session) if session else contextlib.nullcontext():
                        try:
                            await client.call_tool("slow", {"seconds": 300})
                        except ks.Interrupted as exc:
                            outcome.append(exc)
                            raise

                report, raised, _ = await kit.run(runtime, agent, how=how, where="outside")
                assert is_kill(raised)
                assert outcome
                assert report.outcome == "stopped"
                with ks.bind_session(report_session(kit)), pytest.raises(ks.Interrupted):
                    await client.call_tool("slow", {"seconds": 0})
    assert kit.writes() == 0


def report_session(kit: Kit) -> ks.Session:
    assert kit.session is not None
    return kit.session
