"""Scale: N concurrent idle sessions in one process (10 000 by default).

Each session is entered in its own task and parks in its body. Reported against the
same number of raw asyncio tasks parked on the same primitive (a per-task
``asyncio.Event``):

* **memory per session** — ``tracemalloc`` (Python allocations) and the RSS delta
  (``/proc/self/statm``), each measured in a fresh child process per variant so that
  neither sees the other's freed arenas, and without tracemalloc for the RSS figure.
* **stop time** — ``runtime.interrupt_all(...)`` until every handle has resolved, vs
  ``task.cancel()`` of every raw task + ``gather``; interleaved in one process. The
  cost of the ``interrupt_all()`` call itself is reported too.

No targets: issue 2 asks for these to be reported.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kill_switch as ks
from benchmarks import _harness as h

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

NAME = "scale"
ROOT = Path(__file__).resolve().parent.parent


def rss_bytes() -> int:
    """The resident set size of this process, in bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class Crowd:
    """N parked tasks, either raw or each holding an entered session."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.parked = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.sessions: list[ks.Session] = []

    async def park(self) -> None:
        self.parked += 1
        try:
            await asyncio.Event().wait()
        finally:
            self.parked -= 1

    async def one_session(self, runtime: ks.Runtime) -> None:
        async with runtime.session("idle") as session:
            self.sessions.append(session)
            await self.park()

    async def start(self, runtime: ks.Runtime | None) -> None:
        """Start the N tasks and return once all of them are parked."""
        loop = asyncio.get_running_loop()
        if runtime is None:
            self.tasks = [loop.create_task(self.park()) for _ in range(self.n)]
        else:
            self.tasks = [loop.create_task(self.one_session(runtime)) for _ in range(self.n)]
        await h.until(lambda: self.parked >= self.n)

    async def stop_raw(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# --------------------------------------------------------------------- memory (child)


async def _measure_memory(variant: str, n: int, mode: str) -> dict[str, float]:
    crowd = Crowd(n)
    async with ks.Runtime() as runtime:
        await asyncio.sleep(0)
        gc.collect()
        if mode == "tracemalloc":
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
        else:
            base = rss_bytes()
        await crowd.start(runtime if variant == "sessions" else None)
        gc.collect()
        if mode == "tracemalloc":
            used = tracemalloc.get_traced_memory()[0] - base
            tracemalloc.stop()
        else:
            used = rss_bytes() - base
        if variant == "sessions":
            handles = runtime.interrupt_all("bench done", trigger="shutdown")
            for handle in handles:
                await handle
        else:
            await crowd.stop_raw()
        await asyncio.gather(*crowd.tasks, return_exceptions=True)
    return {"bytes": float(used), "per_task": used / n}


def child_main(variant: str, n: int, mode: str, loop: str) -> int:
    """Entry point of a memory child: prints one JSON object."""
    result = h.run_on(loop, _measure_memory, variant, n, mode)
    print(json.dumps(result))
    return 0


def memory_in_child(variant: str, n: int, mode: str, loop: str) -> dict[str, float]:
    """Run one memory measurement in a fresh interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            variant,
            "--n",
            str(n),
            "--mode",
            mode,
            "--loops",
            loop,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def memory_rows(n: int, loop: str, reps: int) -> list[h.Row]:
    """Memory per session vs per raw task (children interleaved, median of *reps*)."""
    rows = []
    for mode in ("tracemalloc", "rss"):
        per: dict[str, list[float]] = {"raw tasks": [], "sessions": []}
        for order in h.rotations(["raw tasks", "sessions"], reps):
            for variant in order:
                child = "raw" if variant == "raw tasks" else "sessions"
                per[variant].append(memory_in_child(child, n, mode, loop)["per_task"])
        stats = {k: h.summarize(v) for k, v in per.items()}
        for name, st in stats.items():
            rows.append(
                h.make_row(
                    NAME,
                    f"memory per task ({mode})",
                    name,
                    loop,
                    n,
                    st,
                    baseline=("raw tasks", stats["raw tasks"]),
                    unit="B",
                    extra_per_session_bytes=st.p50 - stats["raw tasks"].p50,
                )
            )
    return rows


# --------------------------------------------------------------------- stop time


def make_variants(runtime: ks.Runtime, n: int) -> dict[str, Callable[[], Awaitable[float]]]:
    """Stop-time variants; each returns one sample (ns)."""

    async def raw() -> float:
        crowd = Crowd(n)
        await crowd.start(None)
        with h.gc_paused():
            t0 = h.now_ns()
            await crowd.stop_raw()
            t1 = h.now_ns()
        return t1 - t0

    async def sessions() -> float:
        crowd = Crowd(n)
        await crowd.start(runtime)
        with h.gc_paused():
            t0 = h.now_ns()
            handles = runtime.interrupt_all("bench", trigger="operator", operator="bench")
            for handle in handles:
                await handle
            t1 = h.now_ns()
        await asyncio.gather(*crowd.tasks, return_exceptions=True)
        assert len(handles) == n, len(handles)
        return t1 - t0

    return {"raw tasks": raw, "sessions": sessions}


async def stop_rows(loop: str, n: int, reps: int) -> list[h.Row]:
    """``interrupt_all`` until every handle resolved, vs raw cancel + gather."""
    async with ks.Runtime() as runtime:
        samples = await h.interleave(make_variants(runtime, n), reps=reps, warmup=1)
    stats = {k: h.summarize(v) for k, v in samples.items()}
    base = ("raw tasks", stats["raw tasks"])
    rows = [
        h.make_row(NAME, "interrupt_all → all handles", k, loop, n, st, baseline=base)
        for k, st in stats.items()
    ]
    return rows


async def call_rows(loop: str, n: int, reps: int) -> list[h.Row]:
    """The cost of the ``interrupt_all()`` call itself, per session."""
    samples: list[float] = []
    async with ks.Runtime() as runtime:
        for _ in range(reps):
            crowd = Crowd(n)
            await crowd.start(runtime)
            with h.gc_paused():
                t0 = h.now_ns()
                handles = runtime.interrupt_all("bench", trigger="operator")
                t1 = h.now_ns()
            for handle in handles:
                await handle
            await asyncio.gather(*crowd.tasks, return_exceptions=True)
            samples.append(t1 - t0)
    st = h.summarize(samples)
    return [
        h.make_row(
            NAME, "interrupt_all() call itself", "sessions", loop, n, st, per_session_ns=st.p50 / n
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = h.make_parser(__doc__)
    parser.add_argument("--n", type=int, help="sessions (default 10000; 1000 with --quick)")
    parser.add_argument("--child", choices=("raw", "sessions"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--mode", choices=("tracemalloc", "rss"), default="rss", help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    n = args.n or (1000 if args.quick else 10000)
    loops = h.parse_loops(args.loops)
    if args.child:
        return child_main(args.child, n, args.mode, loops[0])
    env = h.environment()
    print(f"scale: {n} idle sessions   [{h.environment_line(env)}]")
    mem_reps, stop_reps = (1, 2) if args.quick else (3, 8)
    rows: list[h.Row] = []
    for loop in loops:
        new = memory_rows(n, loop, mem_reps)
        new += h.run_on(loop, stop_rows, loop, n, stop_reps)
        new += h.run_on(loop, call_rows, loop, n, stop_reps)
        h.print_table(new)
        rows += new
    h.print_table(rows, "scale summary")
    extra: dict[str, Any] = {"sessions": n}
    if args.json:
        h.write_json(args.json, NAME, rows, quick=args.quick, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
