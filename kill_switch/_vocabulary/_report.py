"""What an interrupt did: the frozen report returned by ``await handle``."""

from __future__ import annotations

from typing import Literal

import attrs

#: ``durable``: every event of the interrupt is on disk. ``volatile``: kept in memory
#: only. ``degraded``: the durable store failed; events went to a fallback. ``disabled``:
#: the runtime has no audit sink. ``pending``: not yet acknowledged within the bound.
AuditStatus = Literal["durable", "volatile", "degraded", "disabled", "pending"]

#: ``stopped``: interrupted and verified quiescent. ``unresponsive``: not verified stopped:
#: not quiescent within the stop timeout, or a thread of the stop was abandoned and still
#: ran session work when the report was built. ``before_start``: interrupted before its
#: block began; the body never ran. ``after_end``: the session had already ended;
#: nothing was stopped.
Outcome = Literal["stopped", "unresponsive", "before_start", "after_end"]


@attrs.frozen
class InterruptRequest:
    """One call of ``interrupt()``: the first one wins, later ones are kept."""

    trigger: str
    reason: str
    operator: str | None
    requested_at: float  # wall clock, seconds since the epoch
    requested_mono: float  # monotonic clock, seconds


@attrs.frozen
class Latency:
    """Seconds between the stages of a stop (``None`` when a stage did not happen)."""

    #: interrupt() → cancellation delivered on the event loop.
    delivered: float | None
    #: interrupt() → body and every tool task exited.
    quiescent: float | None
    #: interrupt() → the report was built.
    total: float


@attrs.frozen
class LeakedTask:
    """A task created inside the session that outlived its block (it escaped structure)."""

    name: str
    coro: str
    cancelled: bool  # it was cancelled and exited within the stop timeout


@attrs.frozen
class ProcessReport:
    """What the process plane did to one tracked process (group)."""

    pid: int
    pgid: int | None
    command: tuple[str, ...]
    #: signals sent to the group, in order, by name (``("SIGTERM", "SIGKILL")``).
    signals: tuple[str, ...]
    #: exit status as ``subprocess`` reports it (negative: killed by that signal), or
    #: ``None`` if it could not be reaped.
    returncode: int | None
    #: seconds from the first signal to the process being reaped (``None``: not reaped).
    seconds_to_exit: float | None
    #: it left the process group (``setsid``/double fork) and was found elsewhere.
    escaped: bool = False
    #: still alive after the ladder (it could not be killed: EPERM, say).
    survived: bool = False
    error: str | None = None
    #: other pids found in its process group when it was stopped.
    members: tuple[int, ...] = ()
    #: how the tree was held: ``cgroup`` (a per-session cgroup v2, ``cgroup.kill``) or
    #: ``process_group`` (killpg plus a /proc search for escapees).
    containment: Literal["cgroup", "process_group"] = "process_group"
    #: started by other means: adopted with ``session.track_pid()``, or seen starting in
    #: the session's context (``subprocess``, ``asyncio``, ``os.system``, ``os.fork``).
    adopted: bool = False


ThreadOutcome = Literal["returned", "raised", "interrupted", "abandoned"]


@attrs.frozen
class ThreadReport:
    """What the thread plane saw of one sync tool's worker thread.

    ``outcome``: ``returned`` (it returned a value, which was dropped), ``raised`` (an
    error other than this session's ``Interrupted``), ``interrupted`` (it raised this
    session's ``Interrupted``, from ``ks.check()`` / ``ks.sleep()``), ``abandoned`` (not
    back within the grace: the session stopped waiting for it; it may still run, and its
    result and any commit point guarded by ``ks.check()`` are refused).

    ``running``: the thread was still running when the report was built. Any such thread
    makes the stop not quiescent (``StopReport.outcome`` is ``unresponsive``): it may go
    on writing. If it exits later, the audit says so (``thread_returned``, ``late``).
    """

    #: the thread's name (``kill_switch <agent>/<tool> [<session id prefix>]``).
    name: str
    ident: int | None
    outcome: ThreadOutcome
    #: seconds from ``interrupt()`` to the thread returning (``None``: abandoned).
    seconds: float | None
    tool: str = ""
    running: bool = False


@attrs.frozen
class CleanupReport:
    """One cleanup hook or rollback compensation, run once when the session stopped."""

    name: str
    kind: Literal["cleanup", "rollback"]
    outcome: Literal["ran", "failed", "timed_out"]
    seconds: float
    error: str | None = None


@attrs.frozen
class StopReport:
    """What one interrupt did to one session, and whether everything really stopped."""

    session_id: str
    agent: str
    interrupt_id: str
    trigger: str
    reason: str
    operator: str | None
    requested_at: float
    outcome: Outcome
    #: body, every tool task and every thread of the session's work exited (never true
    #: for ``unresponsive``; false while an abandoned thread still runs).
    quiescent: bool
    #: interrupt() calls after the first, in order; their reasons never replace the first.
    later: tuple[InterruptRequest, ...] = ()
    #: tool calls in flight that the interrupt cancelled.
    tool_calls_cancelled: int = 0
    #: tool results that arrived after the interrupt and were not delivered to the agent.
    late_results: int = 0
    #: tasks a tool created (while its guarded call ran) that outlived the block: a tool
    #: escaped structure; swept (cancelled) at the stop.
    leaked_tasks: tuple[LeakedTask, ...] = ()
    #: tasks created in the session's context outside any tool call (a framework's hooks
    #: or tracing, started by the agent loop) that outlived the block: swept too, but no
    #: tool escaped.
    swept_tasks: tuple[LeakedTask, ...] = ()
    #: exceptions that tools raised while being cancelled (kept, not propagated).
    secondary_errors: tuple[str, ...] = ()
    #: child sessions interrupted with this one (trigger ``parent``).
    children: tuple[str, ...] = ()
    audit: AuditStatus = "disabled"
    latency: Latency = Latency(None, None, 0.0)
    #: the process plane: every tracked process of the session.
    processes: tuple[ProcessReport, ...] = ()
    #: processes started in the session's context by other means (``subprocess``,
    #: ``os.system``, ...) that could not be attributed to it, or whose process had not
    #: appeared yet when the report was built, each with why: any makes the stop not
    #: quiescent (they may still run).
    unattributed: tuple[str, ...] = ()
    #: the thread plane: every sync tool thread (``session.run_sync``, or a pool thread
    #: running work submitted from the session's context) running when the interrupt
    #: came; one still ``running`` makes the stop ``unresponsive``.
    threads: tuple[ThreadReport, ...] = ()
    #: cleanup hooks and rollbacks, in the order they ran.
    cleanup: tuple[CleanupReport, ...] = ()
    #: the loop did not pick the interrupt up in time, and the out-of-band path stopped
    #: what it could from another thread (process groups).
    out_of_band: bool = False

    def summary(self) -> str:
        """A few readable lines describing the stop."""
        lines = [
            f"session {self.session_id} ({self.agent}) — {self.outcome}, "
            f"{'quiescent' if self.quiescent else 'NOT quiescent'}",
            f"  interrupt {self.interrupt_id} by {self.trigger}"
            + (f" ({self.operator})" if self.operator else "")
            + f": {self.reason}",
        ]
        for req in self.later:
            lines.append(f"  also {req.trigger}: {req.reason}")
        lines.append(
            f"  tool calls cancelled: {self.tool_calls_cancelled}, "
            f"late results dropped: {self.late_results}, "
            f"leaked tasks: {len(self.leaked_tasks)}"
            + (f", framework tasks swept: {len(self.swept_tasks)}" if self.swept_tasks else "")
        )
        if self.processes:
            reaped = sum(1 for p in self.processes if p.returncode is not None)
            killed = sum(1 for p in self.processes if "SIGKILL" in p.signals)
            lines.append(
                f"  processes: {len(self.processes)} stopped, {reaped} reaped, "
                f"{killed} needed SIGKILL, {sum(p.escaped for p in self.processes)} escaped"
            )
        for why in self.unattributed:
            lines.append(f"  NOT attributed: {why}")
        if self.threads:
            outcomes = ", ".join(
                f"{t.name}: {t.outcome}" + (" (STILL RUNNING)" if t.running else "")
                for t in self.threads
            )
            lines.append(f"  threads: {outcomes}")
        if self.cleanup:
            done = ", ".join(f"{c.kind} {c.name}: {c.outcome}" for c in self.cleanup)
            lines.append(f"  cleanup: {done}")
        if self.out_of_band:
            lines.append("  the event loop did not answer: stopped out of band")
        if self.children:
            lines.append(f"  children interrupted: {', '.join(self.children)}")
        for err in self.secondary_errors:
            lines.append(f"  secondary error: {err}")
        lat = self.latency
        parts = [f"total {lat.total * 1e3:.2f} ms"]
        if lat.delivered is not None:
            parts.insert(0, f"delivered {lat.delivered * 1e3:.2f} ms")
        if lat.quiescent is not None:
            parts.insert(1, f"quiescent {lat.quiescent * 1e3:.2f} ms")
        lines.append(f"  latency: {', '.join(parts)}; audit: {self.audit}")
        return "\n".join(lines)
