"""kill_switch for MCP clients: a stdio server the session owns, guarded tool calls.

::

    from mcp import StdioServerParameters
    from kill_switch.integrations.mcp import ClientSession, stdio_client

    async with runtime.session(agent="support"):
        async with stdio_client(StdioServerParameters(command="my-server")) as (r, w):
            async with ClientSession(r, w) as client:
                await client.initialize()
                await client.call_tool("search", {"q": "..."})

``stdio_client`` starts the server with ``session.open_process`` instead of the SDK's own
spawn: it runs in its own process group (its own cgroup where available) that the
session's interrupt stops — the server *and every process its tools started* — and the
report names it. ``ClientSession`` is the SDK's client session whose ``call_tool`` runs
through ``session.call``: the interrupt cancels it, a late result is dropped, and a
stopped session's refusal raises ``Interrupted``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import anyio

from kill_switch import _tools
from kill_switch.integrations import missing

try:
    import mcp
    import mcp_types
    from mcp.client.stdio import get_default_environment
    from mcp.shared.message import SessionMessage
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise missing("mcp", "mcp") from exc

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from kill_switch._session import Session

__all__ = ["ClientSession", "stdio_client"]


@contextlib.asynccontextmanager
async def stdio_client(
    server: mcp.StdioServerParameters, *, session: Session | None = None
) -> AsyncIterator[
    tuple[
        MemoryObjectReceiveStream[SessionMessage | Exception],
        MemoryObjectSendStream[SessionMessage],
    ]
]:
    """Start the MCP server *server* as a process of the session; yield its streams.

    Newline-delimited JSON-RPC over the server's stdin/stdout, as the SDK's own
    ``stdio_client`` (hand-written here because the SDK's spawns the process itself).
    Leaving the block closes stdin and stops the process group through the session.

    Raises:
        RuntimeError: no session given and none current.
        Interrupted: the session was interrupted; nothing was started.
        OSError: the server could not be started.
    """
    owner = _tools.resolve(session)
    env = get_default_environment() | (server.env or {})
    cwd = None if server.cwd is None else str(server.cwd)
    proc = await owner.open_process([server.command, *server.args], env=env, cwd=cwd)
    assert proc.stdin is not None
    assert proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)

    async def reader() -> None:
        buffer = b""
        async with read_writer:
            with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError,
                                     anyio.BrokenResourceError):  # fmt: skip
                while True:
                    buffer += await stdout.receive()
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        try:
                            message = mcp_types.jsonrpc_message_adapter.validate_json(
                                line, by_name=False
                            )
                        except ValueError as exc:  # handed to the client session, as the SDK
                            await read_writer.send(exc)
                            continue
                        await read_writer.send(SessionMessage(message))

    async def writer() -> None:
        async with write_reader:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                async for msg in write_reader:
                    data = msg.message.model_dump_json(by_alias=True, exclude_unset=True)
                    await stdin.send(data.encode() + b"\n")

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        tg.start_soon(writer)
        try:
            yield read_stream, write_stream
        finally:
            tg.cancel_scope.cancel()
            with anyio.move_on_after(owner.policy.stop_timeout, shield=True):
                await stdin.aclose()
                await proc.aclose()


class ClientSession(mcp.ClientSession):
    """The SDK's ``ClientSession``, each ``call_tool`` run through a kill_switch session.

    Keyword ``kill_switch_session`` fixes the session; without it, the one current at
    each call is used.
    """

    def __init__(
        self, *args: Any, kill_switch_session: Session | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._ks_session = kill_switch_session

    async def call_tool(self, name: str, *args: Any, **kwargs: Any) -> Any:
        session = _tools.resolve(self._ks_session)
        _tools.refuse_if_interrupted(session)
        call = super().call_tool
        return await _tools.call_strict(session, call, True, name, (name, *args), kwargs)
