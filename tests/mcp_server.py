"""An MCP stdio server for the integration tests: a tool that starts a process tree."""

from __future__ import annotations

import subprocess
import sys

import anyio
from mcp.server.mcpserver import MCPServer

server = MCPServer("tree")


@server.tool()
async def tree(width: int, pidfile: str) -> str:
    """Start *width* sleeping children, note their pids, and wait."""
    # Blocking on purpose: a tool that starts processes the way tools usually do.
    kids = [subprocess.Popen(["sleep", "300"]) for _ in range(width)]  # noqa: ASYNC220
    with open(pidfile, "w") as f:  # noqa: ASYNC230
        f.write("\n".join(str(p.pid) for p in kids) + "\n")
    await anyio.sleep(300)
    return "late"


if __name__ == "__main__":
    sys.exit(server.run("stdio"))
