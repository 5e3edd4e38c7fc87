"""Exceptions raised by kill_switch.

The hierarchy::

    BaseException
    ├── Interrupted                 the current session was interrupted (carries the reason)
    └── Exception
        └── KillSwitchError         base of every *error* kill_switch raises
            ├── ToolBlocked         the guard refused a tool call (carries the Decision)
            │   └── LimitExceeded   ... because a budget or deadline was exhausted
            └── SessionRefused      a session could not start (terminated id, duplicate id)

``Interrupted`` is a cancellation, not an error: like ``asyncio.CancelledError`` (moved out
of ``Exception`` in Python 3.8 for this reason), ``trio.Cancelled`` and anyio's cancel
class, it derives from ``BaseException`` so that no catch-all ``except Exception`` — in a
tool, in user code or in an agent framework's tool-error handler — turns a kill into a
value the agent loop carries on with. Code that handles both catches
``(Interrupted, KillSwitchError)``. Leaving the session's own block absorbs it; nothing
else of kill_switch swallows it. Its ``str()`` carries the operator's reason: never hand
it to a model (the integrations never do).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._decision import Decision
    from ._report import StopReport


class KillSwitchError(Exception):
    """Base class of every exception raised by kill_switch."""


class Interrupted(BaseException):
    """The session this code runs for was interrupted.

    Raised by ``check()``, ``sleep()`` and by a tool call whose task was cancelled by the
    interrupt outside the session's own block. Leaving the session's block absorbs it.
    A ``BaseException``, like ``asyncio.CancelledError``: ``except Exception`` does not
    catch it. Re-raise it if you catch it.
    """

    def __init__(
        self,
        reason: str,
        *,
        session_id: str,
        interrupt_id: str,
        trigger: str,
        report: StopReport | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.session_id = session_id
        self.interrupt_id = interrupt_id
        self.trigger = trigger
        #: Set when the interrupt was fully handled before this was raised (for example a
        #: session interrupted before its block started).
        self.report = report

    def __str__(self) -> str:
        return f"session {self.session_id} interrupted ({self.trigger}): {self.reason}"


class ToolBlocked(KillSwitchError):
    """The guard refused a tool call; ``decision`` says why."""

    def __init__(self, decision: Decision, *, session_id: str, tool: str) -> None:
        super().__init__(decision.reason)
        self.decision = decision
        self.session_id = session_id
        self.tool = tool

    def __str__(self) -> str:
        return (
            f"tool {self.tool!r} blocked in session {self.session_id} "
            f"[{self.decision.code}]: {self.decision.reason}"
        )


class LimitExceeded(ToolBlocked):
    """A tool call was refused because a budget or a deadline was exhausted."""


class SessionRefused(KillSwitchError):
    """A session could not be started (its id was terminated, or is already running)."""
