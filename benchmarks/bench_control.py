"""End-to-end kill through the control plane vs interrupt() in-process, same run.

Every sample stops a fresh session with N tool calls parked (N = 100 by default): the
set-up (session entered, N calls parked) and the tear-down (the session's block exits)
stay outside the timed window. The control plane runs as in production: uvicorn on its
own thread and event loop, the agent's runtime on the benchmark's loop.

Variants, interleaved:

* ``HTTP POST kill → StopReport`` — ``POST /api/sessions/{id}/kill`` with an operator
  token, from a client thread on a kept-alive connection (``http.client``), until the
  JSON StopReport is read and parsed.
* ``in-process interrupt() + await`` — ``session.interrupt()`` and ``await handle`` on
  the session's own loop (the baseline the issue names).
* ``foreign-thread interrupt() + result()`` — ``interrupt()`` and ``handle.result()``
  from another OS thread: what the control plane does, minus HTTP.
* ``HTTP GET /healthz`` — one authenticated-free round trip on the same connection: the
  HTTP floor of this machine.

Target (issue 7): HTTP kill p50 ≤ 5 ms, and HTTP adds ≤ 2 ms (p50) over in-process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from typing import TYPE_CHECKING

import kill_switch as ks
from benchmarks import _harness as h
from kill_switch import control

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

NAME = "control"
TARGET_P50_NS = 5_000_000.0
TARGET_ADDED_NS = 2_000_000.0


def make_variants(
    runtime: ks.Runtime, n: int, client: h.ControlClient, pool: concurrent.futures.Executor
) -> dict[str, Callable[[], Awaitable[float]]]:
    """The interleaved variants, each returning one sample in ns."""
    loop = asyncio.get_running_loop()

    async def http_kill() -> float:
        session, task = await h.parked_session(runtime, n)
        sample, _ = await loop.run_in_executor(pool, client.kill, session.id, n)
        await task
        return sample

    async def in_process() -> float:
        session, task = await h.parked_session(runtime, n)
        with h.gc_paused(collect=False):
            t0 = h.now_ns()
            report = await session.interrupt("benchmark", trigger="operator", operator="bench")
            t1 = h.now_ns()
        await task
        assert report.quiescent
        return t1 - t0

    def foreign(session: ks.Session) -> float:
        with h.gc_paused(collect=False):
            t0 = h.now_ns()
            report = session.interrupt("benchmark", trigger="operator").result(30)
            t1 = h.now_ns()
        assert report.quiescent
        return t1 - t0

    async def foreign_thread() -> float:
        session, task = await h.parked_session(runtime, n)
        sample = await loop.run_in_executor(pool, foreign, session)
        await task
        return sample

    async def health() -> float:
        return await loop.run_in_executor(pool, client.health)

    return {
        "HTTP POST kill → StopReport": http_kill,
        "in-process interrupt() + await": in_process,
        "foreign-thread interrupt() + result()": foreign_thread,
        "HTTP GET /healthz": health,
    }


def rows_for(loop: str, n: int, samples: dict[str, list[float]]) -> list[h.Row]:
    """Rows for one N on one loop, with the targets checked."""
    stats = {name: h.summarize(v) for name, v in samples.items()}
    base_name = "in-process interrupt() + await"
    base = stats[base_name]
    rows = []
    for name, st in stats.items():
        baseline = None if name == base_name else (base_name, base)
        row = h.make_row(NAME, "kill → StopReport", name, loop, n, st, baseline=baseline)
        if name == "HTTP POST kill → StopReport":
            added = st.p50 - base.p50
            row.target = "≤5 ms p50, ≤2 ms over in-process"
            row.met = st.p50 <= TARGET_P50_NS and added <= TARGET_ADDED_NS
            row.extra["added_p50_ns"] = added
        rows.append(row)
    return rows


async def bench(loop: str, n: int, quick: bool) -> list[h.Row]:
    """N parked calls, on the running loop, against a control plane on its own thread."""
    token, entry = control.new_token("operator", "bench")
    reps, warmup = (20, 3) if quick else (300, 20)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="client") as pool:
        async with ks.Runtime() as runtime, control.serve(runtime, tokens=[entry]) as server:
            client = h.ControlClient(server.url, token)
            try:
                variants = make_variants(runtime, n, client, pool)
                samples = await h.interleave(variants, reps=reps, warmup=warmup)
            finally:
                client.close()
    rows = rows_for(loop, n, samples)
    h.print_table(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = h.make_parser(__doc__)
    parser.add_argument("--n", type=int, default=100, help="tool calls parked (default 100)")
    args = parser.parse_args(argv)
    title = "control plane kill, end to end"
    h.run_loops(args, NAME, title, "control plane summary", bench, args.n, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
