"""kill_switch for LangGraph / LangChain: tools and a callback handler.

::

    from kill_switch.integrations.langgraph import KillSwitchCallback, tool

    tools = [tool(search), tool(run_tests)]
    graph = build_graph(model.bind_tools(tools), ToolNode(tools))
    async with runtime.session(agent="support"):
        await graph.ainvoke(inputs, config={"callbacks": [KillSwitchCallback()]})

``tool`` makes a LangChain ``StructuredTool`` whose coroutine is a kill_switch tool: the
argument schema and description are the function's own, every call runs through the
session (``session.call``; a plain ``def`` through ``session.run_sync`` instead of
LangChain's executor), and a stopped session's refusal ends the run as ``Interrupted``.
``ToolNode``'s ``handle_tool_errors`` catches ``Exception`` only, so the kill — and the
operator's reason it carries — never reaches the model as tool-error text.
``KillSwitchCallback`` (a LangChain callback handler with ``raise_error``) refuses every
chat-model or LLM start after the kill, and drops a response that ends after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kill_switch import _tools
from kill_switch.integrations import missing

try:
    from langchain_core.callbacks import AsyncCallbackHandler
    from langchain_core.tools import BaseTool, StructuredTool
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise missing("langchain_core", "langgraph") from exc

if TYPE_CHECKING:
    from collections.abc import Callable

    from kill_switch._session import Session

__all__ = ["KillSwitchCallback", "guard_tool", "tool"]


def tool(
    fn: Callable[..., Any],
    *,
    session: Session | None = None,
    name: str | None = None,
    **options: Any,
) -> StructuredTool:
    """A ``StructuredTool`` for *fn*, every call run through the session.

    *session* fixes the session; without it, the one current at call time is used.
    *options* go to ``StructuredTool.from_function`` (``return_direct``, ...).

    Raises:
        TypeError: *fn* is not callable.
    """
    guarded = _tools.framework_tool(fn, session, name)
    return StructuredTool.from_function(coroutine=guarded, name=name or guarded.__name__, **options)


def guard_tool(base: BaseTool, *, session: Session | None = None) -> StructuredTool:
    """An existing ``StructuredTool`` (``@langchain_core.tools.tool``) made a guarded one.

    Raises:
        TypeError: *base* is not a ``StructuredTool`` (other tools: wrap their function
            with ``tool`` instead).
    """
    if not isinstance(base, StructuredTool):
        raise TypeError(f"guard_tool() needs a StructuredTool, not {type(base).__name__}")
    fn = base.coroutine if base.coroutine is not None else base.func
    if fn is None:
        raise TypeError(f"tool {base.name!r} has no function to guard")
    guarded = _tools.framework_tool(fn, session, base.name)
    return base.model_copy(update={"coroutine": guarded, "func": None})


class KillSwitchCallback(AsyncCallbackHandler):
    """Refuses model starts (and drops model ends) once the session is interrupted."""

    raise_error = True  # LangChain re-raises a handler's error instead of logging it
    run_inline = True  # on the caller's task, not an executor thread

    def __init__(self, session: Session | None = None) -> None:
        self.session = session

    def _refuse(self) -> None:
        _tools.refuse_if_interrupted(_tools.resolve(self.session))

    async def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self._refuse()

    async def on_llm_start(self, *args: Any, **kwargs: Any) -> None:
        self._refuse()

    async def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
        self._refuse()
