"""kill_switch for pydantic-ai: one capability.

::

    from kill_switch.integrations.pydantic_ai import KillSwitch

    agent = Agent(model, tools=[...], capabilities=[KillSwitch()])
    async with runtime.session(agent="support") as session:
        await agent.run("...")            # or outside the block: KillSwitch(session)

``KillSwitch`` uses pydantic-ai's own extension points: ``wrap_tool_execute`` runs every
tool call through ``session.call`` (so the interrupt cancels it, a late result is dropped,
and a stopped session's refusal ends the run as ``Interrupted``); ``wrap_run`` installs a
thread executor whose threads are the session's (``session.run_sync``), so plain ``def``
tools poll ``ks.check()`` and are waited for or abandoned and reported; and
``wrap_model_request`` refuses any model request once the session is interrupted.
``Interrupted`` is a ``BaseException``: pydantic-ai's tool-error handling does not turn it
into a retry prompt for the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kill_switch import _tools
from kill_switch._tools import _current_session
from kill_switch._vocabulary._exceptions import ToolBlocked
from kill_switch.integrations import missing

from ._executor import SessionExecutor, tool_name

try:
    from pydantic_ai import Agent
    from pydantic_ai.capabilities import AbstractCapability
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise missing("pydantic_ai", "pydantic-ai") from exc

if TYPE_CHECKING:
    from pydantic_ai import RunContext
    from pydantic_ai.capabilities.abstract import (
        ValidatedToolArgs,
        WrapModelRequestHandler,
        WrapRunHandler,
        WrapToolExecuteHandler,
    )
    from pydantic_ai.messages import ModelResponse, ToolCallPart
    from pydantic_ai.models import ModelRequestContext
    from pydantic_ai.run import AgentRunResult
    from pydantic_ai.tools import ToolDefinition

    from kill_switch._session import Session

__all__ = ["KillSwitch"]


@dataclass
class KillSwitch(AbstractCapability[Any]):
    """Run an agent's tools and model requests under a kill_switch session.

    *session* fixes the session (for an agent run outside the session's block); without
    it, the session current where the agent runs is used.

    Raises:
        RuntimeError: (at run time) no session given and none current.
    """

    session: Session | None = None

    @classmethod
    def get_serialization_name(cls) -> str | None:
        return None  # holds a live session: not part of an agent spec

    def _session(self) -> Session:
        return _tools.resolve(self.session)

    async def wrap_run(
        self, ctx: RunContext[Any], *, handler: WrapRunHandler
    ) -> AgentRunResult[Any]:
        # The session is bound only around each tool call (wrap_tool_execute), not here:
        # the framework's own tasks are not the agent's tools, and a stop must not sweep
        # them as tasks a tool leaked.
        with Agent.using_thread_executor(SessionExecutor(self._session())):
            return await handler()

    async def wrap_model_request(
        self,
        ctx: RunContext[Any],
        *,
        request_context: ModelRequestContext,
        handler: WrapModelRequestHandler,
    ) -> ModelResponse:
        session = self._session()
        _tools.refuse_if_interrupted(session)
        response = await handler(request_context)
        # A response that lands after the kill is not handed to the agent loop.
        _tools.refuse_if_interrupted(session)
        return response

    async def wrap_tool_execute(
        self,
        ctx: RunContext[Any],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: ValidatedToolArgs,
        handler: WrapToolExecuteHandler,
    ) -> Any:
        current = _current_session.get()
        session = self.session if self.session is not None else _tools.resolve(current)
        token = tool_name.set(call.tool_name)  # names a sync tool's session thread
        # Bound for the tool (check(), current_session()) when the run is outside the block.
        bound = _current_session.set(session) if session is not current else None
        try:
            return await session.call(handler, args, tool=call.tool_name)
        except ToolBlocked as exc:
            out = _tools.as_interrupted(session, exc)
            if out is exc:
                raise
            raise out from None
        finally:
            if bound is not None:
                _current_session.reset(bound)
            tool_name.reset(token)
