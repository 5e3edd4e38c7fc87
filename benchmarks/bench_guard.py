"""Guard overhead: a guarded call of a no-op async tool vs a plain ``await``.

Each sample times a batch of calls (1000 by default) to get far above the timer's
resolution; figures are per call. Variants, interleaved, all inside one session's body
on the same loop:

* ``plain await``    — ``await noop()``: the baseline.
* ``session.call``   — ``await session.call(noop)`` from the body (the fast path).
  **Target (issue 2): ≤ 1 µs extra per call, p50** (floor on this machine: +134 ns for
  a flag check and a counter).
* ``session.call, other task`` — the same from a task that is not the body (the slow
  path: the call is tracked so an interrupt can cancel that task). No target.
* ``plain f(tool, args)`` and ``session.guard(tool, {})`` — the check a framework that
  runs its tools itself makes, against a plain function call of the same shape.
  No target.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kill_switch as ks
from benchmarks import _harness as h

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

NAME = "guard"
TARGET_EXTRA_NS = 1000.0


async def noop() -> None:
    """The no-op async tool."""


def plain_check(tool: str, args: dict[str, Any]) -> None:
    """A plain function with ``guard``'s shape: the baseline of ``session.guard``."""


def make_variants(session: ks.Session, batch: int) -> dict[str, Callable[[], Awaitable[float]]]:
    """The interleaved variants; each returns the time of one batch (ns)."""
    loop = asyncio.get_running_loop()
    call = session.call
    guard = session.guard

    async def plain() -> float:
        with h.gc_paused(collect=False):
            t0 = h.now_ns()
            for _ in range(batch):
                await noop()
            t1 = h.now_ns()
        return t1 - t0

    async def guarded() -> float:
        with h.gc_paused(collect=False):
            t0 = h.now_ns()
            for _ in range(batch):
                await call(noop)
            t1 = h.now_ns()
        return t1 - t0

    async def guarded_other_task() -> float:
        return await loop.create_task(guarded())

    async def plain_sync() -> float:
        args: dict[str, Any] = {}
        with h.gc_paused(collect=False):
            t0 = h.now_ns()
            for _ in range(batch):
                plain_check("tool", args)
            t1 = h.now_ns()
        return t1 - t0

    async def guard_sync() -> float:
        args: dict[str, Any] = {}
        with h.gc_paused(collect=False):
            t0 = h.now_ns()
            for _ in range(batch):
                guard("tool", args)
            t1 = h.now_ns()
        return t1 - t0

    return {
        "plain await": plain,
        "session.call": guarded,
        "session.call, other task": guarded_other_task,
        "plain f(tool, args)": plain_sync,
        "session.guard(tool, {})": guard_sync,
    }


BASELINES = {
    "session.call": "plain await",
    "session.call, other task": "plain await",
    "session.guard(tool, {})": "plain f(tool, args)",
}


async def bench(loop: str, quick: bool, batch: int) -> list[h.Row]:
    """All variants on the running loop."""
    reps, warmup = (30, 3) if quick else (400, 20)
    async with ks.Runtime() as runtime, runtime.session("bench") as session:
        samples = await h.interleave(make_variants(session, batch), reps=reps, warmup=warmup)
    rows = h.per_call_rows(
        NAME,
        loop,
        batch,
        samples,
        BASELINES,
        target=("session.call", "≤1 µs extra p50", TARGET_EXTRA_NS),
    )
    h.print_extra(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    return h.per_call_main(argv, __doc__, NAME, "guard overhead, per call", bench)


if __name__ == "__main__":
    sys.exit(main())
