"""The spawn hook's cost: what attributing processes started by other means adds.

Once a ``Runtime`` has started, an audit hook (PEP 578) and an at-fork callback are
installed for the life of the process (``kill_switch/_planes/_adopt.py``): every audit
event the interpreter raises goes through the hook, and every spawn in a session's
context is attributed to the session. Variants, interleaved, on the same loop:

per audit event (a batch of calls per sample, figures per call):

* ``plain f(event, args)``: a Python function of the hook's shape that returns: the
  baseline;
* ``hook, no session``: the hook on an event it does not watch, outside any session (what
  every ``open``, ``import``, ``socket`` event of the process pays);
* ``hook, in a session``: the same inside a session's context.
  **Target: ≤ 100 ns extra per event, p50.**

per spawn (a batch of ``anyio.run_process(["true"])`` per sample, figures per spawn):

* ``run_process, outside``: from an empty context (the hook sees no session): the
  baseline;
* ``run_process, in a session``: inside a session's context: the thread's children read
  before the spawn, the child adopted (its pidfd watched, moved into the session cgroup
  where there is one: made at the first spawn, kept while the session lives) and
  dropped when it exits. **Target: ≤ 1.3x the baseline, p50.**
"""

from __future__ import annotations

import contextvars
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

import kill_switch as ks
from benchmarks import _harness as h
from kill_switch._planes import _adopt

NAME = "spawn_hook"
TARGET_EXTRA_NS = 100.0
TARGET_SPAWN_RATIO = 1.3
SPAWNS_PER_SAMPLE = 5


def plain(event: str, args: tuple[object, ...]) -> None:
    """The baseline: a function of the hook's shape that returns."""


def timed(fn: object, batch: int) -> float:
    """ns of *batch* calls of ``fn("open", ())``."""
    call = fn  # local name: the loop pays the same lookup in every variant
    args: tuple[object, ...] = ()
    with h.gc_paused(collect=False):
        t0 = h.now_ns()
        for _ in range(batch):
            call("open", args)  # type: ignore[operator]
        t1 = h.now_ns()
    return t1 - t0


async def spawns(n: int) -> float:
    t0 = h.now_ns()
    for _ in range(n):
        await anyio.run_process(["true"])
    return h.now_ns() - t0


async def bench(loop: str, quick: bool, batch: int) -> list[h.Row]:
    """Both groups of variants on the running loop."""
    reps, warmup = (20, 2) if quick else (200, 10)
    spawn_reps = 10 if quick else 60
    hook = _adopt._audit_hook  # the hook itself: sys.audit adds the same C call to both
    async with ks.Runtime() as runtime, runtime.session("bench") as session:
        empty = contextvars.Context()

        async def baseline() -> float:
            return empty.run(timed, plain, batch)

        async def no_session() -> float:
            return empty.run(timed, hook, batch)

        async def in_session() -> float:
            return timed(hook, batch)

        per_event = await h.interleave(
            {
                "plain f(event, args)": baseline,
                "hook, no session": no_session,
                "hook, in a session": in_session,
            },
            reps=reps,
            warmup=warmup,
        )

        async def outside() -> float:
            # A task created in an empty context: not the session's.
            task = empty.run(lambda: session.loop.create_task(spawns(SPAWNS_PER_SAMPLE)))
            return await task

        async def inside() -> float:
            return await spawns(SPAWNS_PER_SAMPLE)

        per_spawn = await h.interleave(
            {"run_process, outside": outside, "run_process, in a session": inside},
            reps=spawn_reps,
            warmup=2,
        )
        adopted = len([p for p in session.processes() if p.adopted])
    rows = h.per_call_rows(
        NAME,
        loop,
        batch,
        per_event,
        {
            "hook, no session": "plain f(event, args)",
            "hook, in a session": "plain f(event, args)",
        },
        target=("hook, in a session", f"≤{TARGET_EXTRA_NS:.0f} ns extra p50", TARGET_EXTRA_NS),
    )
    spawn_rows = h.per_call_rows(
        NAME,
        loop,
        SPAWNS_PER_SAMPLE,
        per_spawn,
        {"run_process, in a session": "run_process, outside"},
    )
    for row in spawn_rows:
        row.case = "per spawn"
        if row.baseline is not None:
            row.target = f"≤{TARGET_SPAWN_RATIO}x p50"
            row.met = row.ratio_p50 is not None and row.ratio_p50 <= TARGET_SPAWN_RATIO
            row.extra["still_tracked_after_exit"] = adopted
    rows += spawn_rows
    h.print_extra(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    return h.per_call_main(argv, __doc__, NAME, "spawn hook overhead", bench)


if __name__ == "__main__":
    sys.exit(main())
