"""Last resorts: the watchdog's forced exit, and the out-of-band kill of a stuck loop.

Case ``forced exit`` — a child process arms a deadline *d* and then hangs; the parent
measures, on the system-wide monotonic clock, *exit - (armed + d)*: how late the process
is gone (negative: before the deadline). Variants, interleaved:

* ``raw-exit``   — the child sleeps until its deadline and calls ``os._exit`` itself:
  the floor of "a process ends at a time and its parent notices". **Baseline.**
* ``watchdog``   — ``Watchdog().arm(d)`` while the main thread hangs in Python
  (``time.sleep``): the orderly layer fires (exit 70).
* ``watchdog-gil`` — the same while the main thread is in a catastrophic regex that
  holds the GIL: only the C-level layer can fire (exit 1).

Target (issue 6): overshoot ≤ 50 ms at p99, with and without the GIL-holding call.

Case ``out-of-band`` — a session tracks ``sleep 300`` in its own process group; its
body blocks the event loop with a sync sleep; another thread calls ``interrupt()`` and
waits on the leader's pidfd. Variants, interleaved:

* ``raw-killpg`` — the thread calls ``os.killpg(pgid, SIGKILL)`` itself. **Baseline.**
* ``interrupt``  — the thread calls ``session.interrupt()``; the loop never answers, so
  the out-of-band path (``StopPolicy.out_of_band_after``, 50 ms) kills the group.

Target (issue 6): ``interrupt()`` → process group killed ≤ 100 ms at p99.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

import kill_switch as ks
from benchmarks import _harness as h

NAME = "watchdog"
DEADLINE = 0.4

_CHILD = textwrap.dedent(
    """
    import os, re, sys, time
    mode, deadline = sys.argv[1], float(sys.argv[2])
    if mode != "raw-exit":
        from kill_switch import Watchdog
        wd = Watchdog()
    armed = time.monotonic()
    if mode != "raw-exit":
        wd.arm(deadline)
    print(repr(armed), flush=True)
    if mode == "raw-exit":
        time.sleep(max(0.0, armed + deadline - time.monotonic()))
        os._exit(0)
    elif mode == "watchdog":
        time.sleep(3600)
    else:
        re.match(r"(a+)+$", "a" * 64 + "b")
    """
)


def forced_exit_sample(mode: str, deadline: float) -> float:
    """Seconds between the deadline and the child being gone (reaped)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, mode, str(deadline)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    pidfd = os.pidfd_open(proc.pid)
    try:
        with proc.stdout:
            armed = float(proc.stdout.readline())
        # A pidfd turns readable the moment the child exits (Popen.wait(timeout) polls
        # with sleeps, which would add its own lateness to every variant).
        if not _wait_pidfd(pidfd, 30.0):
            proc.kill()
            raise RuntimeError(f"{mode} child still running 30 s after its deadline")
        gone = time.monotonic()
    finally:
        os.close(pidfd)
        proc.wait()
    return gone - (armed + deadline)


def _wait_pidfd(pidfd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


async def out_of_band_sample(mode: str) -> float:
    """Seconds from interrupt()/killpg to the leader's exit, with the loop blocked."""
    result: list[float] = []
    async with ks.Runtime() as runtime, runtime.session("bench") as session:
        proc = await session.open_process(["sleep", "300"], stdin=None, stdout=None, stderr=None)
        pidfd = os.pidfd_open(proc.pid)

        def interrupter() -> None:
            t0 = time.perf_counter()
            if mode == "raw-killpg":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                session.interrupt("bench", trigger="operator")
            if _wait_pidfd(pidfd, 10.0):
                result.append(time.perf_counter() - t0)

        thread = threading.Thread(target=interrupter)
        thread.start()
        thread.join()  # blocks the event loop: the agent is stuck in a sync call
        os.close(pidfd)
        session.interrupt("end of sample", trigger="operator")
        await anyio.sleep_forever()
    assert result, "the process did not exit within 10 s"
    return result[0]


def main(argv: list[str] | None = None) -> int:
    parser = h.make_parser(__doc__)
    args = parser.parse_args(argv)
    env = h.environment()
    print(f"watchdog: forced exit overshoot, out-of-band kill   [{h.environment_line(env)}]")
    reps = 5 if args.quick else 30
    rows: list[h.Row] = []

    samples: dict[str, list[float]] = {"raw-exit": [], "watchdog": [], "watchdog-gil": []}
    for order in h.rotations(list(samples), reps):
        for mode in order:
            samples[mode].append(forced_exit_sample(mode, DEADLINE) * 1e9)
    base = h.summarize(samples["raw-exit"])
    for mode, values in samples.items():
        stats = h.summarize(values)
        row = h.make_row(NAME, "forced exit overshoot", mode, "-", None, stats)
        if mode != "raw-exit":
            row.baseline = "raw-exit"
            row.target = "overshoot p99 <= 50 ms"
            row.met = stats.p99 <= 50e6
            row.extra = {"raw_p50_ns": base.p50, "raw_p99_ns": base.p99}
        rows.append(row)

    for loop in h.parse_loops(args.loops):
        oob: dict[str, list[float]] = {"raw-killpg": [], "interrupt": []}
        for order in h.rotations(list(oob), reps):
            for mode in order:
                oob[mode].append(h.run_on(loop, out_of_band_sample, mode) * 1e9)
        raw = h.summarize(oob["raw-killpg"])
        rows.append(h.make_row(NAME, "out-of-band kill", "raw-killpg", loop, None, raw))
        stats = h.summarize(oob["interrupt"])
        row = h.make_row(
            NAME, "out-of-band kill", "interrupt", loop, None, stats, baseline=("raw-killpg", raw)
        )
        row.target = "p99 <= 100 ms"
        row.met = stats.p99 <= 100e6
        rows.append(row)

    h.print_table(rows, "watchdog and out-of-band summary")
    if args.json:
        h.write_json(args.json, NAME, rows, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
