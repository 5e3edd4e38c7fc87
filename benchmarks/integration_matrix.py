"""The closing table of the framework integrations: framework by tool kind by where the
agent runs → stop time (``interrupt()`` → ``StopReport``) and outcome, one kill each.

Runs the integration tests' own agents and tools (``tests/agent_kit.py``), killed
mid-tool from another task, and prints one row per cell with what the report says
(outcome, quiescent, threads, processes) and what was checked outside it (model calls
after the kill, tree pids alive in /proc, writes after the report). Single samples: a
table of outcomes, not a timing claim (those are in ``bench_integrations.py``).

    PYTHONPATH=. python benchmarks/integration_matrix.py [--how task|thread]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kill_switch as ks
from tests import test_integration_langgraph as lg
from tests import test_integration_mcp as mc
from tests import test_integration_openai_agents as oa
from tests import test_integration_pydantic_ai as pa
from tests.agent_kit import KINDS, Kit, is_kill


def agents_for(kit: Kit, kind: str) -> dict[str, Any]:
    async def pydantic_ai(session: ks.Session | None) -> Any:
        return (await pa.make_agent(kit, kind, pa.KillSwitch(session)).run("go")).output

    async def openai_agents(session: ks.Session | None) -> Any:
        return (await oa.agents.Runner.run(oa.make_agent(kit, kind, session), "go")).final_output

    async def langgraph(session: ks.Session | None) -> Any:
        return await lg.invoke(kit, kind, session)

    async def mcp_stdio(session: ks.Session | None) -> Any:
        return await mc.client_loop(kit, session, kit.out.with_name("pids"), own=True)

    return {
        "pydantic-ai": pydantic_ai,
        "openai-agents": openai_agents,
        "langgraph": langgraph,
        "mcp (stdio)": mcp_stdio,
    }


async def cell(framework: str, kind: str, where: str, how: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        kit = Kit(Path(tmp))
        try:
            async with ks.Runtime() as runtime:
                agent = agents_for(kit, kind)[framework]
                report, raised, _ = await kit.run(runtime, agent, how=how, where=where)  # type: ignore[arg-type]
                later = await kit.settle_writes()
        finally:
            kit.finish()
    threads = ",".join(t.outcome for t in report.threads) or "-"
    if where == "inside":
        ended = "absorbed"
    else:
        ended = "Interrupted" if is_kill(raised) else f"NOT the kill: {raised!r}"
    return (
        f"{framework:14} {kind:14} {where:8} {report.latency.total * 1e3:8.2f} ms  "
        f"{report.outcome:8} quiescent={report.quiescent!s:5} threads={threads:11} "
        f"procs={len(report.processes)} alive={len(kit.alive())} "
        f"leaked={len(report.leaked_tasks)} "
        f"model_after_kill={kit.model_calls_after_kill} writes_after={later:3} agent={ended}"
    )


async def main(how: str) -> None:
    print(f"killed from a {how}; python {sys.version.split()[0]}")
    for framework in ("pydantic-ai", "openai-agents", "langgraph"):
        for kind in KINDS:
            for where in ("inside", "outside"):
                print(await cell(framework, kind, where, how), flush=True)
    # MCP: the server's tool starts the tree (the only kind a stdio server has here).
    for where in ("inside", "outside"):
        print(await cell("mcp (stdio)", "server tree", where, how), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--how", choices=("task", "thread"), default="task")
    asyncio.run(main(parser.parse_args().how))
