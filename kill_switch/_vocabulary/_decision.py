"""The guard's verdict on one tool call."""

from __future__ import annotations

from typing import Any, Final, Literal

import attrs

Action = Literal["allow", "block"]


@attrs.frozen
class Decision:
    """What the guard decided for a tool call.

    ``code`` is stable and machine-readable (``"terminated"``, ``"finished"``,
    ``"not_started"``, ``"denied"``, ``"policy_error"``, ...); ``reason`` is for people.
    """

    action: Action = attrs.field(validator=attrs.validators.in_(("allow", "block")))
    reason: str = ""
    code: str = ""

    @property
    def allowed(self) -> bool:
        """Whether the call may go ahead."""
        return self.action == "allow"

    @classmethod
    def block(cls, reason: str, code: str) -> Decision:
        """Return a blocking decision."""
        return cls("block", reason, code)


ALLOW: Final = Decision("allow")


@attrs.frozen
class ToolCall:
    """A tool call as a policy hook sees it (a snapshot; the hook cannot change it)."""

    session_id: str
    agent: str
    tool: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = attrs.field(factory=dict, hash=False)
    cost: float = 0.0
