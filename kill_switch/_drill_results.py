"""The results of a kill drill: frozen values a drill returns and how they read.

``_drill.py`` runs drills and makes the checks; this module holds what they produce
(each check, each run, a series' verdicts and summary, the latency histogram), so a
surface can read a result without the drill's machinery.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs

from ._vocabulary._validate import attrs_check, positive

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._vocabulary._report import StopReport

CheckName = Literal["report", "tasks", "processes", "zombies", "threads", "model", "audit"]
CHECKS: Final[tuple[CheckName, ...]] = (
    "report",
    "tasks",
    "processes",
    "zombies",
    "threads",
    "model",
    "audit",
)

_positive_or_none = attrs.validators.optional(attrs_check(positive))
_positive = attrs_check(positive)


# ------------------------------------------------------------------ results


@attrs.frozen
class DrillCheck:
    """One independent check of a drill: its name, whether it passed, and what it saw."""

    name: CheckName
    ok: bool
    detail: str
    #: The check could not be made (no durable audit log to read, say); it does not fail
    #: the drill, and the summary says it was skipped.
    skipped: bool = False

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class DrillResult:
    """The outcome of one drill against one session."""

    session_id: str
    agent: str
    #: Seconds from ``interrupt()`` to the ``StopReport`` in the drill's hands; ``None``
    #: if no report came within the bound.
    latency: float | None
    #: Seconds from ``interrupt()`` until every independent check had passed, measured
    #: at the end of the round of checks that passed, so it includes the drill's own
    #: look (a full ``/proc`` scan: a few milliseconds); ``None`` if they did not all
    #: pass within the bound.
    quiesced: float | None
    checks: tuple[DrillCheck, ...]
    report: StopReport | None = attrs.field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """Every check passed (skipped checks do not count against it)."""
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> tuple[DrillCheck, ...]:
        return tuple(c for c in self.checks if not c.ok)

    def summary(self) -> str:
        """One line: verdict, timings, and the failed checks' details."""
        verdict = "PASS" if self.ok else "FAIL"
        lat = _ms(self.latency)
        qui = _ms(self.quiesced)
        line = f"{verdict} {self.agent} [{self.session_id}]: report {lat}, quiet {qui}"
        for c in self.failures:
            line += f"; {c.name}: {c.detail}"
        return line

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "agent": self.agent,
            "ok": self.ok,
            "latency_ms": None if self.latency is None else self.latency * 1e3,
            "quiesced_ms": None if self.quiesced is None else self.quiesced * 1e3,
            "checks": [c.to_json() for c in self.checks],
        }


@attrs.frozen
class DrillObjectives:
    """What a series of drills must show to pass, in milliseconds.

    Percentiles apply to *latency* (``interrupt()`` → ``StopReport``). Every run must
    also pass every check within *quiesce_ms* of its ``interrupt()``.

    Raises:
        TypeError, ValueError: an objective is not a finite number > 0.
    """

    p50_ms: float | None = attrs.field(default=None, validator=_positive_or_none)
    p99_ms: float | None = attrs.field(default=None, validator=_positive_or_none)
    max_ms: float | None = attrs.field(default=None, validator=_positive_or_none)
    quiesce_ms: float = attrs.field(default=2000.0, validator=_positive)


@attrs.frozen
class DrillVerdict:
    """One objective of a series: met or not, with the measured value."""

    name: str
    ok: bool
    detail: str


@attrs.frozen
class DrillSummary:
    """A series of drills, their latency distribution and the verdict."""

    results: tuple[DrillResult, ...]
    objectives: DrillObjectives
    verdicts: tuple[DrillVerdict, ...]

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(v.ok for v in self.verdicts)

    def latencies_ms(self) -> list[float]:
        return [r.latency * 1e3 for r in self.results if r.latency is not None]

    def percentiles(self) -> dict[str, float]:
        data = self.latencies_ms()
        if not data:
            return {}
        return {
            "p50": percentile(data, 50),
            "p95": percentile(data, 95),
            "p99": percentile(data, 99),
            "max": max(data),
        }

    def summary(self) -> str:
        """DrillVerdict line, percentiles, a histogram, each objective, and failed runs."""
        passed = sum(r.ok for r in self.results)
        lines = [
            f"kill drill: {'PASS' if self.ok else 'FAIL'} — {passed}/{len(self.results)} "
            "runs left nothing behind"
        ]
        pct = self.percentiles()
        if pct:
            quiet = [r.quiesced * 1e3 for r in self.results if r.quiesced is not None]
            lines.append(
                "  interrupt → StopReport: " + ", ".join(f"{k} {v:.1f} ms" for k, v in pct.items())
            )
            if quiet:
                lines.append(
                    f"  interrupt → independently quiet: p50 {percentile(quiet, 50):.1f} ms, "
                    f"max {max(quiet):.1f} ms"
                )
            lines.extend("  " + row for row in histogram(self.latencies_ms()))
        for v in self.verdicts:
            lines.append(f"  [{'ok' if v.ok else 'FAIL'}] {v.name}: {v.detail}")
        shown = 0
        for r in self.results:
            if not r.ok and shown < 5:
                lines.append("  " + r.summary())
                shown += 1
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "runs": len(self.results),
            "passed": sum(r.ok for r in self.results),
            "latency_ms": self.percentiles(),
            "objectives": attrs.asdict(self.objectives),
            "verdicts": [attrs.asdict(v) for v in self.verdicts],
            "results": [r.to_json() for r in self.results],
        }


def _ms(seconds: float | None) -> str:
    return "none" if seconds is None else f"{seconds * 1e3:.1f} ms"


def percentile(data: Sequence[float], q: float) -> float:
    xs = sorted(data)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


_BUCKETS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)


def histogram(values_ms: Sequence[float], width: int = 40) -> list[str]:
    """Text rows of a latency histogram over fixed 1-2-5 buckets (empty edges dropped)."""
    counts = [0] * (len(_BUCKETS) + 1)
    for v in values_ms:
        i = next((i for i, edge in enumerate(_BUCKETS) if v < edge), len(_BUCKETS))
        counts[i] += 1
    used = [i for i, c in enumerate(counts) if c]
    if not used:
        return []
    top = max(counts)
    rows = []
    for i in range(used[0], used[-1] + 1):
        lo = 0.0 if i == 0 else _BUCKETS[i - 1]
        label = f">= {lo:g} ms" if i == len(_BUCKETS) else f"{lo:g}-{_BUCKETS[i]:g} ms"
        bar = "#" * max(1 if counts[i] else 0, round(width * counts[i] / top))
        rows.append(f"{label:>14} | {bar} {counts[i]}")
    return rows
