"""Guard overhead with every limit and the five built-in detectors enabled.

Each sample times a batch of calls (1000 by default); figures are per call. Variants,
interleaved, all from one task that is the body of two nested sessions (both calls
take the body's fast path):

* ``plain await``          — ``await noop()``: the baseline.
* ``bare guard``           — ``await bare.call(noop, cost=0.01)`` in a session with no
  limits and no sentinel (issue 2's guard, for comparison).
* ``limits + 5 detectors`` — the same call in a session with ``max_actions``,
  ``max_cost``, ``max_duration`` and ``warn_at`` set and a sentinel in enforce mode
  running the five built-in detectors (thresholds out of reach, so nothing fires).
  **Target (issue 5): ≤ 3 µs extra per call over ``plain await``, p50.**
* ``... + tool timeout``   — the same plus a per-tool timeout (``asyncio.timeout``
  around the call). Reported, no target.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kill_switch as ks
from benchmarks import _harness as h
from kill_switch import (
    CallRate,
    CostVelocity,
    DeniedCalls,
    ErrorStreak,
    Limits,
    RepeatedCall,
    Sentinel,
)

NAME = "limits"
TARGET_EXTRA_NS = 3000.0
HUGE = 10**12


async def noop() -> None:
    """The no-op async tool."""


def sentinel() -> Sentinel:
    """The five built-ins, enforcing, with thresholds the benchmark never reaches."""
    return Sentinel(
        detectors=(
            # 1M calls/s and 1M cost units/s: out of reach, with realistic memory
            # (the rate ring holds max_calls times; the cost window its own calls).
            CallRate(max_calls=10_000, window=0.01),
            RepeatedCall(max_repeats=HUGE),
            ErrorStreak(max_errors=5),
            CostVelocity(max_cost=1e5, window=0.1),
            DeniedCalls(max_denied=3, window=60.0),
        ),
        mode="enforce",
    )


LIMITS = Limits(max_actions=HUGE, max_cost=float(HUGE), max_duration=3600.0, warn_at=0.99)


BASELINE = "plain await"


async def bench(loop: str, quick: bool, batch: int) -> list[h.Row]:
    """All variants on the running loop."""
    reps, warmup = (30, 3) if quick else (300, 20)
    timeout_limits = Limits(
        max_actions=HUGE,
        max_cost=float(HUGE),
        max_duration=3600.0,
        warn_at=0.99,
        tool_timeout=3600.0,
    )
    async with (
        ks.Runtime() as runtime,
        runtime.session("bare") as bare,
        runtime.session("limited", limits=LIMITS, sentinel=sentinel()) as limited,
        runtime.session("timed", limits=timeout_limits, sentinel=sentinel()) as with_timeout,
    ):
        variants = {
            BASELINE: h.batch_timer(noop, batch),
            "bare guard": h.batch_timer(lambda: bare.call(noop, cost=0.01), batch),
            "limits + 5 detectors": h.batch_timer(lambda: limited.call(noop, cost=0.01), batch),
            "... + tool timeout": h.batch_timer(lambda: with_timeout.call(noop, cost=0.01), batch),
        }
        samples = await h.interleave(variants, reps=reps, warmup=warmup)
        assert not limited.interrupted, limited.alerts
    baselines = {name: BASELINE for name in samples if name != BASELINE}
    target = ("limits + 5 detectors", "≤3 µs extra p50", TARGET_EXTRA_NS)
    rows = h.per_call_rows(NAME, loop, batch, samples, baselines, target=target)
    h.print_extra(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    title = "guard overhead with limits and detectors, per call"
    return h.per_call_main(argv, __doc__, NAME, title, bench)


if __name__ == "__main__":
    sys.exit(main())
