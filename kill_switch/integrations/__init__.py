"""Drop-in integrations of kill_switch with agent frameworks.

Each submodule needs its framework, installed with the extra of the same name
(``pip install 'kill-switch[pydantic-ai]'``); none is imported until asked for:

* ``kill_switch.integrations.pydantic_ai`` — a pydantic-ai capability.
* ``kill_switch.integrations.openai_agents`` — tools and a model wrapper for the OpenAI
  Agents SDK.
* ``kill_switch.integrations.langgraph`` — tools and a callback handler for LangGraph /
  LangChain.
* ``kill_switch.integrations.mcp`` — an MCP client whose stdio server the session owns.

Every one of them: runs each tool call through the session (``session.call``, or
``session.run_sync`` for a plain ``def``) with the tool's own signature; lets the kill
(``Interrupted``, a ``BaseException``) through the framework's tool-error handling instead
of handing it to the model; and refuses the next model request after a kill.
"""

from __future__ import annotations


def missing(module: str, extra: str) -> ImportError:
    """The ImportError to raise when the framework *module* is not installed: it names the
    extra that installs it."""
    return ImportError(
        f"kill_switch.integrations.{extra.replace('-', '_')} needs {module!r}: "
        f"install the {extra!r} extra (pip install 'kill-switch[{extra}]')"
    )
