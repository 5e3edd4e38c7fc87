"""kill_switch for the OpenAI Agents SDK: tools and a model guard.

::

    from kill_switch.integrations.openai_agents import function_tool, guard_model

    agent = Agent(name="a", model=guard_model(model), tools=[function_tool(search)])
    async with runtime.session(agent="support"):
        await Runner.run(agent, "...")

``function_tool`` is the SDK's own ``function_tool`` applied to a kill_switch tool: the
schema comes from the function's real signature and docstring, every call runs through
the session (``session.call``; a plain ``def`` through ``session.run_sync`` instead of the
SDK's ``asyncio.to_thread``), and a stopped session's refusal ends the run as
``Interrupted``. The SDK's tool-error formatter only sees ``Exception``s, so the kill is
never handed to the model as text. ``guard_model`` wraps any ``Model``: a request after
the kill is refused (raises ``Interrupted``), and a response that lands after it is not
delivered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kill_switch import _tools
from kill_switch.integrations import missing

try:
    import agents
    from agents.models.interface import Model
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise missing("agents", "openai-agents") from exc

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from kill_switch._session import Session

__all__ = ["KillSwitchModel", "function_tool", "guard_model"]


def function_tool(
    fn: Callable[..., Any],
    *,
    session: Session | None = None,
    name: str | None = None,
    **options: Any,
) -> agents.FunctionTool:
    """The SDK's ``function_tool`` for *fn*, every call run through the session.

    *session* fixes the session; without it, the one current at call time is used.
    *options* go to ``agents.function_tool`` (``description_override``, ...).

    Raises:
        TypeError: *fn* is not callable.
    """
    guarded = _tools.framework_tool(fn, session, name)
    return agents.function_tool(guarded, name_override=name, **options)


class KillSwitchModel(Model):
    """A ``Model`` that refuses requests once the session is interrupted."""

    def __init__(self, model: Model, session: Session | None = None) -> None:
        self.model = model
        self.session = session

    async def get_response(self, *args: Any, **kwargs: Any) -> Any:
        session = _tools.resolve(self.session)
        _tools.refuse_if_interrupted(session)
        response = await self.model.get_response(*args, **kwargs)
        _tools.refuse_if_interrupted(session)  # a response after the kill is dropped
        return response

    async def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        session = _tools.resolve(self.session)
        _tools.refuse_if_interrupted(session)
        async for event in self.model.stream_response(*args, **kwargs):
            _tools.refuse_if_interrupted(session)
            yield event

    async def close(self) -> None:
        await self.model.close()


def guard_model(model: Model, *, session: Session | None = None) -> KillSwitchModel:
    """Wrap *model* so no request starts, and no response is delivered, after a kill."""
    if not isinstance(model, Model):
        raise TypeError(f"guard_model() needs an agents Model, not {type(model).__name__}")
    return KillSwitchModel(model, session)
