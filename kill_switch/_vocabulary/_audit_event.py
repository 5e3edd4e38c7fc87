"""The audit vocabulary: events every interrupt path writes, and the sink they go to.

Every step of a stop is an ``AuditEvent`` handed to the runtime's ``AuditSink``. The
interrupt id correlates the events of one interrupt; ``parent_event_id`` draws the
cascade (request → each plane's step, parent session → child).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._report import AuditStatus

# ------------------------------------------------------------------ event kinds
#
# Every kind of event kill_switch writes, in one place: ``KINDS`` answers "which events
# can the log contain?" (``tests/test_audit_kinds.py`` holds every writer to it). A sink
# must still accept any kind string: a user's own code may record more.

# The session and its interrupt (the runtime).
SESSION_STARTED: Final = "session_started"
SESSION_FINISHED: Final = "session_finished"
#: The runtime refused to open a session (terminated id, id already running).
SESSION_REFUSED: Final = "session_refused"
INTERRUPT_REQUESTED: Final = "interrupt_requested"
#: A second interrupt of a session already being stopped (joins the first).
INTERRUPT_REPEATED: Final = "interrupt_repeated"
INTERRUPT_DELIVERED: Final = "interrupt_delivered"
#: The session was interrupted before its block began: it never ran.
CANCELLED_BEFORE_START: Final = "cancelled_before_start"
#: The stop ended quiescent (the last event of a clean stop).
INTERRUPT_COMPLETED: Final = "interrupt_completed"
#: The stop passed ``stop_timeout`` without quiescence (the last event of such a stop).
ESCALATED: Final = "escalated"
LATE_RESULT: Final = "late_result"
LEAKED_TASK: Final = "leaked_task"
TOOL_BLOCKED: Final = "tool_blocked"
#: The loop did not pick the interrupt up in time; another thread stopped the processes.
OUT_OF_BAND: Final = "out_of_band"
#: The watchdog or ``graceful_shutdown`` ended the process (status 70).
FORCED_EXIT: Final = "forced_exit"

# The ledger (``Limits``).
LIMIT_WARNING: Final = "limit_warning"
LIMIT_EXCEEDED: Final = "limit_exceeded"

# The sentinel.
SENTINEL_ALERT: Final = "sentinel_alert"
SENTINEL_ERROR: Final = "sentinel_error"

# The thread plane.
THREAD_RETURNED: Final = "thread_returned"
THREAD_ABANDONED: Final = "thread_abandoned"

# The process plane.
PROCESS_STARTED: Final = "process_started"
PROCESS_SIGNAL: Final = "process_signal"
PROCESS_EXITED: Final = "process_exited"
PROCESS_ESCAPED: Final = "process_escaped"
PROCESS_CONTAINMENT: Final = "process_containment"
#: A process started in a session's context by other means could not be attributed.
PROCESS_UNATTRIBUTED: Final = "process_unattributed"

# Cleanup hooks and transaction rollbacks (one event per hook run).
CLEANUP: Final = "cleanup"
ROLLBACK: Final = "rollback"

# The control plane (``kill_switch.control``).
#: A request refused by authentication or authorisation.
CONTROL_DENIED: Final = "control_denied"
CONTROL_TOKEN_REVOKED: Final = "control_token_revoked"

# Fleet control (``kill_switch.fleet``), in the owning runtime's log.
#: A kill that reached this runtime through the fleet (the requester's identity kept).
FLEET_KILL: Final = "fleet_kill"
#: A fleet message dropped: forged, replayed, stale, malformed or of an unknown type.
FLEET_MESSAGE_REJECTED: Final = "fleet_message_rejected"
#: The fleet was out of reach for longer than the lease (the dead man's switch).
FLEET_LOST: Final = "fleet_lost"
FLEET_RECONNECTED: Final = "fleet_reconnected"

#: Every kind kill_switch itself writes.
KINDS: Final[frozenset[str]] = frozenset(
    {
        SESSION_STARTED,
        SESSION_FINISHED,
        SESSION_REFUSED,
        INTERRUPT_REQUESTED,
        INTERRUPT_REPEATED,
        INTERRUPT_DELIVERED,
        CANCELLED_BEFORE_START,
        INTERRUPT_COMPLETED,
        ESCALATED,
        LATE_RESULT,
        LEAKED_TASK,
        TOOL_BLOCKED,
        OUT_OF_BAND,
        FORCED_EXIT,
        LIMIT_WARNING,
        LIMIT_EXCEEDED,
        SENTINEL_ALERT,
        SENTINEL_ERROR,
        THREAD_RETURNED,
        THREAD_ABANDONED,
        PROCESS_STARTED,
        PROCESS_SIGNAL,
        PROCESS_EXITED,
        PROCESS_ESCAPED,
        PROCESS_CONTAINMENT,
        PROCESS_UNATTRIBUTED,
        CLEANUP,
        ROLLBACK,
        CONTROL_DENIED,
        CONTROL_TOKEN_REVOKED,
        FLEET_KILL,
        FLEET_MESSAGE_REJECTED,
        FLEET_LOST,
        FLEET_RECONNECTED,
    }
)

#: Kinds that mark a session terminated for good: the store keeps their session ids so
#: that a restarted runtime refuses those sessions (``Runtime`` reads them at start).
STICKY_KINDS: Final[frozenset[str]] = frozenset({INTERRUPT_REQUESTED, CANCELLED_BEFORE_START})


def _reseed() -> None:
    global _prefix, _counter
    _prefix = os.urandom(8).hex()
    _counter = itertools.count()


_prefix: str
_counter: itertools.count[int]
_reseed()


def _in_forked_child() -> None:
    _reseed()  # looked up at fork time: a forked child never continues its parent's ids


os.register_at_fork(after_in_child=_in_forked_child)


def new_id() -> str:
    """Return a fresh id (128 bits, hex): unique across processes and restarts.

    64 random bits drawn once per process (again in a forked child), then a 64-bit
    counter. Not ``os.urandom(16)`` per id: ``getrandom`` lets go of the GIL, and a stop
    makes an id per audit event on the loop thread, where each return of the GIL costs
    up to the switch interval under a CPU-bound thread. Ids are unique, not secret:
    nothing is authorised by knowing one.
    """
    return f"{_prefix}{next(_counter):016x}"


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
class BatchAuditSink(AuditSink, Protocol):
    """An ``AuditSink`` that takes several events in one call (``SqliteAudit``): the
    runtime hands a batch over with it (``interrupt_all``'s N ``interrupt_requested``
    events, a stop's held events) — one lock, one wake-up of the writer. Same contract
    as ``record``: in order, thread-safe, never blocks on I/O, never raises."""

    def record_many(self, events: Sequence[AuditEvent]) -> None: ...


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
