"""Fan-out: time from ``interrupt()`` until ``await handle`` resolves, N tool calls parked.

Variants, interleaved in one run on the same event loop (see ``_harness``):

* ``raw-gather``   — N asyncio tasks parked; ``task.cancel()`` each, then
  ``await asyncio.gather(*tasks, return_exceptions=True)``. **The baseline of the target.**
* ``raw-counter``  — the same N tasks, each with a done callback counting down to one
  future (registered before the window): the strictest raw floor.
* ``anyio-tg``     — N tasks in a plain anyio task group; ``tg.cancel_scope.cancel()``
  until the ``async with`` has exited.
* ``session``      — N tool calls started with ``session.start_soon(park)`` (the
  session's native tool task group) while the body is parked too;
  ``session.interrupt()`` until ``await handle`` returns the ``StopReport``.
* ``session-anyio-tg`` — N ``session.call(park)`` in tasks of the user's own anyio task
  group inside the body (``tg.start_soon(session.call, park)``); reported without a
  target: it pays anyio's own task-group cost on top.

Parking primitive (the same for every variant): by default each parked call waits on its
*own* ``asyncio.Event``. That is the fairer choice: ``anyio.sleep_forever()`` also
parks a timer (``call_later(inf)``) per task, whose cancellation and heap clean-up add
the same cost to both sides and dilute every ratio towards 1; one *shared* event would
make ``Event.wait``'s ``_waiters.remove()`` O(N) per cancelled waiter whenever the
cancel order differs from the park order — quadratic, and a cost of the primitive, not
of whoever cancels. ``--park sleep`` measures with ``anyio.sleep_forever()`` instead.

Target (issue 2): ``session`` ≤ 1.5x ``raw-gather`` at N = 1000 and 10000, on asyncio
and on uvloop. The runtime has no audit sink: this measures the stop itself.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

import kill_switch as ks
from benchmarks import _harness as h

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

NAME = "fanout"
TARGET_RATIO = 1.5
TARGET_NS = (1000, 10000)

FULL_NS = (1, 10, 100, 1000, 10000)
QUICK_NS = (1, 100, 1000)


def reps_for(n: int, quick: bool) -> tuple[int, int]:
    """(repetitions, warm-up rounds) for N parked calls."""
    if quick:
        return (15, 1) if n <= 100 else (5, 1)
    if n <= 10:
        return 300, 10
    if n <= 100:
        return 150, 5
    if n <= 1000:
        return 50, 3
    return 15, 2


class Parking:
    """The parking primitive, and a count of calls currently parked in it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.parked = 0
        # Every variant's parked tasks stay referenced until after the timed window, so
        # that no variant pays for freeing them inside it (raw-gather's list would keep
        # its tasks alive, a session's finished tool tasks would be freed at once).
        self.alive: list[asyncio.Task[Any] | None] = []

    async def park(self) -> None:
        """Wait until cancelled."""
        self.alive.append(asyncio.current_task())
        self.parked += 1
        try:
            if self.kind == "sleep":
                await anyio.sleep_forever()
            else:
                await asyncio.Event().wait()
        finally:
            self.parked -= 1

    async def until(self, n: int) -> None:
        """Return once *n* calls are parked."""
        await h.until(lambda: self.parked >= n)


async def _drain(p: Parking) -> None:
    await h.until(lambda: not p.parked)


def make_variants(
    runtime: ks.Runtime, n: int, p: Parking
) -> dict[str, Callable[[], Awaitable[float]]]:
    """The interleaved variants for *n* parked calls; each returns one sample (ns)."""
    loop = asyncio.get_running_loop()

    async def raw_gather() -> float:
        tasks = [loop.create_task(p.park()) for _ in range(n)]
        await p.until(n)
        return await h.cancel_all(tasks)

    async def raw_counter() -> float:
        tasks = [loop.create_task(p.park()) for _ in range(n)]
        done: asyncio.Future[None] = loop.create_future()
        left = n

        def one_done(_: asyncio.Task[None]) -> None:
            nonlocal left
            left -= 1
            if not left:
                done.set_result(None)

        for t in tasks:
            t.add_done_callback(one_done)
        await p.until(n)
        with h.gc_paused():
            t0 = h.now_ns()
            for t in tasks:
                t.cancel()
            await done
            t1 = h.now_ns()
        return t1 - t0

    async def anyio_tg() -> float:
        ready: asyncio.Future[anyio.abc.TaskGroup] = loop.create_future()
        exited: asyncio.Future[None] = loop.create_future()

        async def host() -> None:
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(p.park)
                ready.set_result(tg)
            exited.set_result(None)

        task = loop.create_task(host())
        tg = await ready
        await p.until(n)
        with h.gc_paused():
            t0 = h.now_ns()
            tg.cancel_scope.cancel()
            await exited
            t1 = h.now_ns()
        await task
        return t1 - t0

    async def run_session(use_tg: bool) -> float:
        ready: asyncio.Future[ks.Session] = loop.create_future()

        async def host() -> None:
            async with runtime.session("bench") as session:
                if use_tg:
                    async with anyio.create_task_group() as tg:
                        for _ in range(n):
                            tg.start_soon(session.call, p.park)
                        ready.set_result(session)
                        await p.park()
                else:
                    for _ in range(n):
                        session.start_soon(p.park)
                    ready.set_result(session)
                    await p.park()

        task = loop.create_task(host())
        session = await ready
        await p.until(n + 1)  # the tool calls and the body
        sample, report = await h.timed_interrupt(session)
        await task
        assert report.quiescent, report
        assert report.tool_calls_cancelled == n, (report.tool_calls_cancelled, n)
        return sample

    async def session_native() -> float:
        return await run_session(False)

    async def session_anyio_tg() -> float:
        return await run_session(True)

    async def checked(fn: Callable[[], Awaitable[float]]) -> float:
        sample = await fn()
        await _drain(p)
        p.alive.clear()
        return sample

    variants: dict[str, Callable[[], Awaitable[float]]] = {
        "raw-gather": raw_gather,
        "raw-counter": raw_counter,
        "anyio-tg": anyio_tg,
        "session": session_native,
        "session-anyio-tg": session_anyio_tg,
    }

    def one(fn: Callable[[], Awaitable[float]]) -> Callable[[], Awaitable[float]]:
        return lambda: checked(fn)

    return {name: one(fn) for name, fn in variants.items()}


def rows_for(loop: str, n: int, samples: dict[str, list[float]], park: str) -> list[h.Row]:
    """Rows for one N on one loop: every variant against ``raw-gather``, the session
    also against ``raw-counter``."""
    stats = {name: h.summarize(v) for name, v in samples.items()}
    base = ("raw-gather", stats["raw-gather"])
    case = f"cancel→quiet ({park})"
    rows = []
    for name, st in stats.items():
        row = h.make_row(NAME, case, name, loop, n, st, baseline=base)
        if name == "session":
            counter = stats["raw-counter"]
            row.extra["ratio_p50_vs_raw_counter"] = st.p50 / counter.p50
            row.extra["ratio_p99_vs_raw_counter"] = st.p99 / counter.p99
            if n in TARGET_NS:
                row.target = f"≤{TARGET_RATIO}x raw-gather"
                row.met = row.ratio_p50 is not None and row.ratio_p50 <= TARGET_RATIO
        rows.append(row)
    return rows


async def bench(loop: str, ns: tuple[int, ...], quick: bool, park: str) -> list[h.Row]:
    """Every N on the running loop."""
    rows: list[h.Row] = []
    p = Parking(park)
    async with ks.Runtime() as runtime:
        for n in ns:
            reps, warmup = reps_for(n, quick)
            samples = await h.interleave(make_variants(runtime, n, p), reps=reps, warmup=warmup)
            new = rows_for(loop, n, samples, park)
            h.print_table(new)
            rows += new
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = h.make_parser(__doc__)
    parser.add_argument(
        "--park",
        choices=("event", "sleep"),
        default="event",
        help="parking primitive (default: %(default)s, see the docstring)",
    )
    parser.add_argument("--n", type=int, action="append", help="N to measure (repeatable)")
    args = parser.parse_args(argv)
    ns: tuple[int, ...] = tuple(args.n) if args.n else (QUICK_NS if args.quick else FULL_NS)
    title = "fan-out: interrupt() → await handle"
    summary = "fan-out summary"
    h.run_loops(args, NAME, title, summary, bench, ns, args.quick, args.park, park=args.park)
    return 0


if __name__ == "__main__":
    sys.exit(main())
