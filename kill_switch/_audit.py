"""The audit vocabulary: events every interrupt path writes, and the sink they go to.

Every step of a stop is an ``AuditEvent`` handed to the runtime's ``AuditSink``. The
interrupt id correlates the events of one interrupt; ``parent_event_id`` draws the
cascade (request → each plane's step, parent session → child).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    from ._report import AuditStatus

# Event kinds written by the runtime. Sinks must accept any kind string: planes add their
# own (process signals, thread abandonment, cleanup outcomes).
SESSION_STARTED: Final = "session_started"
SESSION_FINISHED: Final = "session_finished"
SESSION_REFUSED: Final = "session_refused"
INTERRUPT_REQUESTED: Final = "interrupt_requested"
INTERRUPT_REPEATED: Final = "interrupt_repeated"
INTERRUPT_DELIVERED: Final = "interrupt_delivered"
CANCELLED_BEFORE_START: Final = "cancelled_before_start"
INTERRUPT_COMPLETED: Final = "interrupt_completed"
ESCALATED: Final = "escalated"
LATE_RESULT: Final = "late_result"
LEAKED_TASK: Final = "leaked_task"
TOOL_BLOCKED: Final = "tool_blocked"
OUT_OF_BAND: Final = "out_of_band"
FORCED_EXIT: Final = "forced_exit"


def new_id() -> str:
    """Return a fresh random id (128 bits, hex): unique across processes and restarts."""
    return os.urandom(16).hex()


def _json_mapping(_inst: Any, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{attr.name} must be a mapping, not {type(value).__name__}")


@attrs.frozen
class AuditEvent:
    """One immutable audit record. ``details`` must be JSON-serialisable."""

    kind: str
    session_id: str | None
    agent: str | None = None
    interrupt_id: str | None = None
    parent_event_id: str | None = None
    trigger: str | None = None
    reason: str | None = None
    operator: str | None = None
    details: Mapping[str, Any] = attrs.field(factory=dict, validator=_json_mapping, hash=False)
    event_id: str = attrs.field(factory=new_id)
    wall_time: float = attrs.field(factory=time.time)
    mono_time: float = attrs.field(factory=time.monotonic)


@runtime_checkable
class AuditSink(Protocol):
    """Where audit events go. The runtime enters the sink for its own lifetime.

    Contract:
        ``record`` is synchronous, thread-safe, never blocks on I/O and never raises:
        a stop must not wait for, or fail because of, its own audit trail.
        ``flush`` waits until every event recorded so far is as durable as the sink can
        make it, and says how durable that is. It must never claim ``"durable"`` for an
        event that is not. The runtime bounds the wait from outside (a shielded
        ``move_on_after``) and reports ``"pending"`` if it runs out, so ``flush`` must be
        cancellable at its awaits without losing or duplicating an event.
    """

    async def __aenter__(self) -> AuditSink: ...

    async def __aexit__(self, *exc_info: object) -> bool | None: ...

    def record(self, event: AuditEvent) -> None: ...

    async def flush(self) -> AuditStatus: ...


@runtime_checkable
class DurableAuditSink(AuditSink, Protocol):
    """An ``AuditSink`` on disk (``SqliteAudit``): the abilities the runtime and the
    operations use when a sink has them, found with ``isinstance`` (never by probing
    for attributes).

    ``path`` and ``anchor_path`` (``None``: no anchor) name the log and its anchored
    head; ``record_now`` writes one event synchronously from any thread, without the
    loop (the watchdog's last word before a forced exit), and says whether it reached
    the disk; ``terminated_session_ids`` reads every session id a stop was recorded for
    (a kill is sticky across restarts).
    """

    path: str
    anchor_path: str | None

    def record_now(self, event: AuditEvent) -> bool: ...

    async def terminated_session_ids(self) -> frozenset[str]: ...
