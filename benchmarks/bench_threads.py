"""Thread plane: a sync tool in ``ks.sleep()`` stopped by ``interrupt()``, and ``ks.check()``.

Case ``thread stop`` — time from the loop's ``interrupt()`` / ``Event.set()`` until the
loop has what it waits for, variants interleaved in one run (see ``_harness``):

* ``raw-event``   — a plain ``threading.Thread`` parked in ``threading.Event.wait()``;
  ``event.set()`` on the loop → the thread wakes and ``call_soon_threadsafe`` resolves a
  future → the loop resumes. **The baseline of the target** (≈95 µs on our machines).
* ``session``     — a session whose body awaits ``session.run_sync(tool)`` while the tool
  sleeps in ``ks.sleep(3600)``; ``session.interrupt()`` → ``await handle`` returns the
  ``StopReport`` (thread reported ``interrupted``, session quiescent).
* ``session-no-thread`` — the same session with its body parked on an ``asyncio.Event``
  and no thread: what the stop costs without the thread plane (no target).

Case ``check()`` — nanoseconds per call, in a loop of calls inside one timed window:

* ``empty-call``  — calling a function that does nothing: the floor of any call.
* ``no-session``  — ``ks.check()`` outside any session (it returns at once).
* ``in-session``  — ``ks.check()`` inside a running session. **Target ≤ 300 ns.**

Targets (issue 3): ``session`` ≤ 1.5x ``raw-event``; ``in-session`` ≤ 300 ns per call.
The runtime has no audit sink: this measures the stop itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kill_switch as ks
from benchmarks import _harness as h

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

NAME = "threads"
TARGET_RATIO = 1.5
TARGET_CHECK_NS = 300.0
#: After the tool said it is about to wait, give its thread time to really park in
#: ``Event.wait()`` (set-up, outside the timed window; the same for every variant).
PARK_SETTLE = 0.001


def make_stop_variants(runtime: ks.Runtime) -> dict[str, Callable[[], Awaitable[float]]]:
    """The interleaved ``thread stop`` variants; each returns one sample (ns)."""
    loop = asyncio.get_running_loop()

    async def raw_event() -> float:
        event = threading.Event()
        ready = threading.Event()
        woke: asyncio.Future[None] = loop.create_future()

        def worker() -> None:
            ready.set()
            event.wait()
            loop.call_soon_threadsafe(woke.set_result, None)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        await h.until(ready.is_set)
        await asyncio.sleep(PARK_SETTLE)
        with h.gc_paused(collect=False):
            t0 = h.now_ns()
            event.set()
            await woke
            t1 = h.now_ns()
        thread.join()
        return t1 - t0

    async def run_session(with_thread: bool) -> float:
        ready = threading.Event()
        entered: asyncio.Future[ks.Session] = loop.create_future()

        def tool() -> None:
            ready.set()
            ks.sleep(3600)

        async def host() -> None:
            async with runtime.session("bench") as session:
                entered.set_result(session)
                if with_thread:
                    await session.run_sync(tool)
                else:
                    ready.set()
                    await asyncio.Event().wait()

        task = loop.create_task(host())
        session = await entered
        await h.until(ready.is_set)
        await asyncio.sleep(PARK_SETTLE)
        sample, report = await h.timed_interrupt(session, collect=False)
        await task
        assert report.quiescent, report
        if with_thread:
            assert [t.outcome for t in report.threads] == ["interrupted"], report.threads
        return sample

    async def session_thread() -> float:
        return await run_session(True)

    async def session_no_thread() -> float:
        return await run_session(False)

    return {
        "raw-event": raw_event,
        "session": session_thread,
        "session-no-thread": session_no_thread,
    }


def _empty() -> None:
    return None


def make_check_variants(
    calls: int, outside: contextvars.Context, inside: contextvars.Context
) -> dict[str, Callable[[], float]]:
    """The ``check()`` variants; each returns ns per call over *calls* calls.

    *outside* is a context with no current session, *inside* one whose current session
    is running (what a sync tool's thread sees).
    """
    check = ks.check

    def timed(fn: Callable[[], None]) -> float:
        rng = range(calls)
        with h.gc_paused(collect=False):
            t0 = h.now_ns()
            for _ in rng:
                fn()
            t1 = h.now_ns()
        return (t1 - t0) / calls

    return {
        "empty-call": lambda: outside.run(timed, _empty),
        "no-session": lambda: outside.run(timed, check),
        "in-session": lambda: inside.run(timed, check),
    }


async def bench(loop: str, quick: bool) -> list[h.Row]:
    """Both cases on the running loop."""
    rows: list[h.Row] = []
    reps, warmup = (20, 3) if quick else (300, 20)
    async with ks.Runtime() as runtime:
        samples = await h.interleave(make_stop_variants(runtime), reps=reps, warmup=warmup)
        stats = {name: h.summarize(v) for name, v in samples.items()}
        base = ("raw-event", stats["raw-event"])
        for name, st in stats.items():
            row = h.make_row(NAME, "thread stop", name, loop, None, st, baseline=base)
            if name == "session":
                # What the thread adds to the session's own stop, for the closing note.
                floor = stats["session-no-thread"]
                row.extra["thread_increment_p50_ns"] = st.p50 - floor.p50
                row.extra["thread_increment_vs_raw_event_p50"] = (st.p50 - floor.p50) / base[1].p50
                row.target = f"≤{TARGET_RATIO}x raw-event"
                row.met = row.ratio_p50 is not None and row.ratio_p50 <= TARGET_RATIO
            rows.append(row)

        calls = 20_000 if quick else 200_000
        check_reps = 5 if quick else 30
        outside = contextvars.copy_context()
        async with runtime.session("bench-check"):
            inside = contextvars.copy_context()
            variants = make_check_variants(calls, outside, inside)
            samples_sync = h.interleave_sync(variants, reps=check_reps, warmup=2)
        cstats = {name: h.summarize(v) for name, v in samples_sync.items()}
        cbase = ("empty-call", cstats["empty-call"])
        for name, st in cstats.items():
            row = h.make_row(NAME, "check() per call", name, loop, calls, st, baseline=cbase)
            if name == "in-session":
                row.target = f"≤{TARGET_CHECK_NS:.0f} ns"
                row.met = st.p50 <= TARGET_CHECK_NS
            rows.append(row)
    h.print_table(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = h.make_parser(__doc__)
    args = parser.parse_args(argv)
    title = "threads: interrupt() → await handle, ks.check()"
    h.run_loops(args, NAME, title, "thread plane summary", bench, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
