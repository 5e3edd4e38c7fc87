"""interrupt() call cost on the caller's side, with N tool calls parked in the session.

Only the call itself is timed: ``interrupt()`` records the request, sets the thread flag
and schedules the fan-out, which then runs on the loop outside the window. Every
sample uses a new session (the first ``interrupt()`` of a session is the one that
counts; later ones only append a reason), with N calls parked through
``session.start_soon`` and the body parked as well.

Variants, interleaved:

* ``loop-thread``   — ``session.interrupt()`` from a task on the session's loop.
* ``loop-thread, warm`` — the same, right after interrupting a spare session that was
  never entered: the code path is in the CPU caches (the first variant runs cold, after
  the loop has walked N tasks' worth of memory: the realistic case for a kill switch).
* ``foreign-thread`` — ``session.interrupt()`` from another OS thread (it marshals the
  fan-out with ``call_soon_threadsafe``).
* ``raw task.cancel()`` — cancelling one parked asyncio task (the loop-thread floor).
* ``raw call_soon_threadsafe`` — from the same foreign thread (the foreign floor).
* ``anyio scope.cancel()`` — ``CancelScope.cancel()`` of a task group holding the same
  N parked tasks; anyio delivers the cancellation to every task inside the call.

Target (issue 2): ≤ 10 µs p50 at every N, from both threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from typing import TYPE_CHECKING

import anyio
import anyio.abc

import kill_switch as ks
from benchmarks import _harness as h

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

NAME = "interrupt"
TARGET_NS = 10_000.0

FULL_NS = (1, 10, 100, 1000, 10000)
QUICK_NS = (1, 100, 1000)


def reps_for(n: int, quick: bool) -> tuple[int, int]:
    """(repetitions, warm-up rounds) for N parked calls."""
    if quick:
        return (30, 2) if n <= 100 else (8, 1)
    if n <= 100:
        return 300, 10
    if n <= 1000:
        return 100, 5
    return 25, 2


async def _park() -> None:
    await asyncio.Event().wait()


def make_variants(
    runtime: ks.Runtime, n: int, pool: concurrent.futures.ThreadPoolExecutor
) -> dict[str, Callable[[], Awaitable[float]]]:
    """The interleaved variants for *n* parked calls; each returns one sample (ns)."""
    loop = asyncio.get_running_loop()

    async def with_session(measure: Callable[[ks.Session], Awaitable[float]]) -> float:
        session, task = await h.parked_session(runtime, n, _park, tool=None)
        sample = await measure(session)
        await session.handle
        await task
        return sample

    async def on_loop(session: ks.Session) -> float:
        with h.gc_paused(collect=False):
            t0 = h.now_ns()
            session.interrupt("bench", trigger="supervisor")
            t1 = h.now_ns()
        return t1 - t0

    async def on_loop_warm(session: ks.Session) -> float:
        # The same call right after interrupting a spare session that was never
        # entered: the interrupt() code path is in the CPU caches, the session is not.
        spare = runtime.session("warm-up")
        with h.gc_paused(collect=False):
            spare.interrupt("warm-up", trigger="supervisor")
            t0 = h.now_ns()
            session.interrupt("bench", trigger="supervisor")
            t1 = h.now_ns()
        await spare.handle
        return t1 - t0

    def in_thread(session: ks.Session) -> float:
        with h.gc_paused(collect=False):
            t0 = h.now_ns()
            session.interrupt("bench", trigger="operator", operator="bench")
            t1 = h.now_ns()
        return t1 - t0

    async def on_foreign(session: ks.Session) -> float:
        return await loop.run_in_executor(pool, in_thread, session)

    async def loop_thread() -> float:
        return await with_session(on_loop)

    async def loop_thread_warm() -> float:
        return await with_session(on_loop_warm)

    async def foreign_thread() -> float:
        return await with_session(on_foreign)

    async def raw_cancel() -> float:
        task = loop.create_task(_park())
        await asyncio.sleep(0)
        with h.gc_paused(collect=False):
            t0 = h.now_ns()
            task.cancel()
            t1 = h.now_ns()
        await asyncio.gather(task, return_exceptions=True)
        return t1 - t0

    def threadsafe(done: asyncio.Future[None]) -> float:
        with h.gc_paused(collect=False):
            t0 = h.now_ns()
            loop.call_soon_threadsafe(done.set_result, None)
            t1 = h.now_ns()
        return t1 - t0

    async def raw_threadsafe() -> float:
        done: asyncio.Future[None] = loop.create_future()
        sample = await loop.run_in_executor(pool, threadsafe, done)
        await done
        return sample

    async def anyio_scope() -> float:
        ready: asyncio.Future[anyio.abc.TaskGroup] = loop.create_future()
        parked = 0

        async def park_counted() -> None:
            nonlocal parked
            parked += 1
            await _park()

        async def host() -> None:
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(park_counted)
                ready.set_result(tg)

        task = loop.create_task(host())
        tg = await ready
        await h.until(lambda: parked >= n)
        with h.gc_paused(collect=False):
            t0 = h.now_ns()
            tg.cancel_scope.cancel()
            t1 = h.now_ns()
        await task
        return t1 - t0

    return {
        "loop-thread": loop_thread,
        "loop-thread, warm": loop_thread_warm,
        "foreign-thread": foreign_thread,
        "raw task.cancel()": raw_cancel,
        "raw call_soon_threadsafe": raw_threadsafe,
        "anyio scope.cancel()": anyio_scope,
    }


BASELINES = {
    "loop-thread": "raw task.cancel()",
    "loop-thread, warm": "raw task.cancel()",
    "foreign-thread": "raw call_soon_threadsafe",
    "anyio scope.cancel()": "raw task.cancel()",
}


def rows_for(loop: str, n: int, samples: dict[str, list[float]]) -> list[h.Row]:
    """Rows for one N on one loop."""
    stats = {name: h.summarize(v) for name, v in samples.items()}
    rows = []
    for name, st in stats.items():
        base = BASELINES.get(name)
        row = h.make_row(
            NAME,
            "interrupt() call",
            name,
            loop,
            n,
            st,
            baseline=(base, stats[base]) if base else None,
        )
        if name in ("loop-thread", "loop-thread, warm", "foreign-thread"):
            row.target = "≤10 µs p50"
            row.met = st.p50 <= TARGET_NS
        rows.append(row)
    return rows


async def bench(loop: str, ns: tuple[int, ...], quick: bool) -> list[h.Row]:
    """Every N on the running loop."""
    rows: list[h.Row] = []
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="foreign") as pool:
        async with ks.Runtime() as runtime:
            for n in ns:
                reps, warmup = reps_for(n, quick)
                variants = make_variants(runtime, n, pool)
                samples = await h.interleave(variants, reps=reps, warmup=warmup)
                new = rows_for(loop, n, samples)
                h.print_table(new)
                rows += new
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = h.make_parser(__doc__)
    parser.add_argument("--n", type=int, action="append", help="N to measure (repeatable)")
    args = parser.parse_args(argv)
    ns: tuple[int, ...] = tuple(args.n) if args.n else (QUICK_NS if args.quick else FULL_NS)
    h.run_loops(args, NAME, "interrupt() call cost", "interrupt() summary", bench, ns, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
