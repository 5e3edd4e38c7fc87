"""Counters the control plane keeps, and their Prometheus text exposition.

Control loop only (no locks): everything is updated from request handlers or from the
runtime's events after they hopped onto the control loop.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

#: Upper bounds (seconds) of the kill latency histogram buckets.
BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Histogram:
    """A cumulative histogram in seconds."""

    def __init__(self, buckets: Iterable[float] = BUCKETS) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Add one observation."""
        self.count += 1
        self.total += seconds
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        """Exposition lines (``_bucket``, ``_sum``, ``_count``)."""
        out = [
            f'{name}_bucket{{le="{b:g}"}} {c}'
            for b, c in zip(self.bounds, self.counts, strict=False)
        ]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.total:.9f}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """What ``/metrics`` exposes besides the live inventory."""

    def __init__(self) -> None:
        self.interrupts: Counter[str] = Counter()
        self.report_audit: Counter[str] = Counter()
        self.denied: Counter[str] = Counter()
        self.auth_failures = 0
        self.rate_limited = 0
        self.kill_latency = Histogram()
        self.http_kill_latency = Histogram()

    def render(
        self,
        *,
        sessions: Counter[str],
        audit_kind: str,
        audit_ok: bool | None,
        events_published: int,
        events_dropped: int,
        event_clients: int,
        connections: Mapping[str, int] | None = None,
    ) -> str:
        """The Prometheus text format (version 0.0.4)."""
        lines: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")

        family("kill_switch_sessions", "gauge", "Sessions known to the control plane by state.")
        for state in ("running", "interrupting", "terminated", "finished", "failed", "created"):
            lines.append(f'kill_switch_sessions{{state="{state}"}} {sessions.get(state, 0)}')
        family("kill_switch_interrupts_total", "counter", "Interrupts requested, by trigger.")
        for trigger, n in sorted(self.interrupts.items()):
            lines.append(f'kill_switch_interrupts_total{{trigger="{_label(trigger)}"}} {n}')
        family(
            "kill_switch_kill_latency_seconds",
            "histogram",
            "interrupt() to StopReport, per stop seen by the control plane.",
        )
        lines += self.kill_latency.lines("kill_switch_kill_latency_seconds")
        family(
            "kill_switch_http_kill_latency_seconds",
            "histogram",
            "POST kill received to StopReport ready, per HTTP kill that waited.",
        )
        lines += self.http_kill_latency.lines("kill_switch_http_kill_latency_seconds")
        family("kill_switch_stop_reports_total", "counter", "Stop reports by audit durability.")
        for status, n in sorted(self.report_audit.items()):
            lines.append(f'kill_switch_stop_reports_total{{audit="{_label(status)}"}} {n}')
        family("kill_switch_audit_info", "gauge", "The runtime's audit sink (1 = configured).")
        lines.append(f'kill_switch_audit_info{{kind="{_label(audit_kind)}"}} 1')
        family(
            "kill_switch_audit_chain_ok",
            "gauge",
            "Last /api/audit/verify result: 1 intact, 0 tampered, -1 never checked.",
        )
        lines.append(f"kill_switch_audit_chain_ok {-1 if audit_ok is None else int(audit_ok)}")
        family("kill_switch_control_denied_total", "counter", "Authenticated requests denied.")
        for role, n in sorted(self.denied.items()):
            lines.append(f'kill_switch_control_denied_total{{role="{_label(role)}"}} {n}')
        family("kill_switch_control_auth_failures_total", "counter", "Failed authentications.")
        lines.append(f"kill_switch_control_auth_failures_total {self.auth_failures}")
        family("kill_switch_control_rate_limited_total", "counter", "Answers 429.")
        lines.append(f"kill_switch_control_rate_limited_total {self.rate_limited}")
        family("kill_switch_events_published_total", "counter", "Events fanned out.")
        lines.append(f"kill_switch_events_published_total {events_published}")
        family("kill_switch_events_dropped_total", "counter", "Events dropped for slow clients.")
        lines.append(f"kill_switch_events_dropped_total {events_dropped}")
        family("kill_switch_event_streams", "gauge", "Open event streams.")
        lines.append(f"kill_switch_event_streams {event_clients}")
        if connections is not None:
            family("kill_switch_control_connections", "gauge", "Open HTTP connections.")
            lines.append(f"kill_switch_control_connections {connections['open']}")
            family(
                "kill_switch_control_connections_closed_total",
                "counter",
                "Connections closed by a limit: evicted for a new one, or no request head in time.",
            )
            for why in ("evicted", "header_timeouts"):
                lines.append(
                    f'kill_switch_control_connections_closed_total{{reason="{why}"}} '
                    f"{connections[why]}"
                )
        return "\n".join(lines) + "\n"
