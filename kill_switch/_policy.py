"""Grace periods and caps for stopping a session: policy values, settable per runtime and
per session (``Runtime(policy=...)``, ``runtime.session(..., policy=...)``)."""

from __future__ import annotations

import math
from typing import Any

import attrs


def _finite_positive(_inst: Any, attr: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{attr.name} must be a number of seconds, not {type(value).__name__}")
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise ValueError(f"{attr.name} must be a finite number of seconds > 0, got {value!r}")


def _positive_int(_inst: Any, attr: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attr.name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{attr.name} must be >= 1, got {value!r}")


@attrs.frozen
class StopPolicy:
    """How long each stage of a stop may take before kill_switch escalates.

    Attributes:
        stop_timeout: seconds from delivery of an interrupt until the session must be
            quiescent (body and every tool task exited). Past it the interrupt handle
            resolves with ``quiescent=False`` and an ``escalated`` audit event.
        term_grace: seconds between SIGTERM and SIGKILL for tracked process groups
            (trio's default is 5 s).
        thread_grace: seconds a sync tool's thread has to return once interrupted before
            it is abandoned.
        max_abandoned_threads: abandoned threads still running beyond which new sync
            tool calls are refused.
        audit_timeout: seconds a stop waits for its audit events to become durable
            before it reports them ``pending`` (the stop itself never waits longer).
        cleanup_timeout: seconds each cleanup hook or rollback may run (shielded)
            before it is left behind and reported ``timed_out``.
        out_of_band_after: seconds the event loop has to pick an interrupt up before
            the out-of-band path stops the session's process groups from another thread.
    """

    stop_timeout: float = attrs.field(default=10.0, validator=_finite_positive)
    term_grace: float = attrs.field(default=5.0, validator=_finite_positive)
    thread_grace: float = attrs.field(default=2.0, validator=_finite_positive)
    max_abandoned_threads: int = attrs.field(default=16, validator=_positive_int)
    audit_timeout: float = attrs.field(default=1.0, validator=_finite_positive)
    cleanup_timeout: float = attrs.field(default=5.0, validator=_finite_positive)
    out_of_band_after: float = attrs.field(default=0.05, validator=_finite_positive)
