"""Grace periods and caps for stopping a session: policy values, settable per runtime and
per session (``Runtime(policy=...)``, ``runtime.session(..., policy=...)``)."""

from __future__ import annotations

from typing import Any

import attrs

from ._validate import attrs_check, optional_seconds, positive_int, seconds

_seconds = attrs_check(seconds)
_positive_int = attrs_check(positive_int)

#: ``sys.setswitchinterval`` counts in microseconds: a shorter interval reads back as 0.
_MIN_SWITCH = 1e-6


def _switch_interval(_inst: Any, attr: attrs.Attribute[Any], value: object) -> None:
    interval = optional_seconds(attr.name, value)
    if interval is not None and interval < _MIN_SWITCH:
        raise ValueError(
            f"{attr.name} must be None or >= {_MIN_SWITCH} seconds (the interpreter's "
            f"resolution), got {value!r}"
        )


@attrs.frozen
class StopPolicy:
    """How long each stage of a stop may take before kill_switch escalates.

    Attributes:
        stop_timeout: seconds from delivery of an interrupt until the session must be
            quiescent (body and every tool task exited). Past it the interrupt handle
            resolves with ``quiescent=False`` and an ``escalated`` audit event.
        term_grace: seconds between SIGTERM and SIGKILL for tracked process groups
            (trio's default is 5 s).
        thread_grace: seconds a sync tool's thread has to return, counted from the
            interrupt's request, before it is abandoned.
        max_abandoned_threads: abandoned threads still running beyond which new sync
            tool calls are refused.
        audit_timeout: seconds a stop waits for its audit events to become durable
            before it reports them ``pending`` (the stop itself never waits longer).
        cleanup_timeout: seconds each cleanup hook or rollback may run (shielded)
            before it is left behind and reported ``timed_out``.
        out_of_band_after: seconds the event loop has to pick an interrupt up before
            the out-of-band path stops the session's process groups from another thread.
        switch_interval: the interpreter's thread switch interval
            (``sys.setswitchinterval``) while a stop is in flight; ``None`` leaves it
            alone. Every call that releases the GIL on the stop's path (a ``close``, a
            ``waitpid``, each SQLite step of the audit's writer thread) must take it
            back, which can cost a whole interval (5 ms by default) when another thread
            is busy on the CPU; a short one bounds that wait. The setting is
            **process-wide and temporary**: it applies to every thread while at least
            one stop of any runtime is in flight (the shortest asked for wins), and the
            value it replaced is put back when the last of them resolves, however it
            ends (if other code set the interval meanwhile, that value is put back).
    """

    stop_timeout: float = attrs.field(default=10.0, validator=_seconds)
    term_grace: float = attrs.field(default=5.0, validator=_seconds)
    thread_grace: float = attrs.field(default=2.0, validator=_seconds)
    max_abandoned_threads: int = attrs.field(default=16, validator=_positive_int)
    audit_timeout: float = attrs.field(default=1.0, validator=_seconds)
    cleanup_timeout: float = attrs.field(default=5.0, validator=_seconds)
    out_of_band_after: float = attrs.field(default=0.05, validator=_seconds)
    switch_interval: float | None = attrs.field(default=0.0005, validator=_switch_interval)
