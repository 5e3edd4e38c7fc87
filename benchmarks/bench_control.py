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

``GET /api/sessions`` with a book of 0 / 400 / 1,000 stopped sessions (each with its
StopReport; one control plane per book, interleaved): the control thread's CPU time for
one poll (``pthread_getcpuclockid``: the time it holds the GIL away from the agent's
loop), as a ratio to the empty book; the default page and ``?stopped_limit=1000`` (every
row). Target (issue 15): ≤ 1 ms with 1,000 stopped sessions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from typing import TYPE_CHECKING

import kill_switch as ks
from benchmarks import _harness as h
from kill_switch import control

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any

NAME = "control"
TARGET_P50_NS = 5_000_000.0
TARGET_ADDED_NS = 2_000_000.0
#: Stopped sessions in the control plane's book, and the target of one poll with the most.
BOOKS = (0, 400, 1000)
TARGET_POLL_NS = 1_000_000.0


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
    return rows + await inventory(loop, quick)


def control_threads() -> set[int]:
    """Idents of the control planes' server threads running now."""
    return {
        t.ident
        for t in threading.enumerate()
        if t.name == "kill_switch control plane" and t.ident is not None
    }


def poll_cpu(client: h.ControlClient, clock: int, query: str) -> float:
    """CPU ns the control thread (*clock*) spends on one ``GET /api/sessions?{query}``
    (read from the client thread while the control loop has nothing else to do)."""
    client.ready()
    t0 = time.clock_gettime_ns(clock)
    client.conn.request("GET", f"/api/sessions?{query}", headers=client.headers)
    response = client.conn.getresponse()
    body = response.read()
    t1 = time.clock_gettime_ns(clock)
    if response.status != 200:
        raise RuntimeError(f"GET /api/sessions answered {response.status}: {body[:200]!r}")
    return t1 - t0


async def fill_book(runtime: ks.Runtime, client: h.ControlClient, n: int) -> None:
    """*n* sessions stopped with one parked call each; returns once the control plane
    holds every StopReport (set-up)."""
    for _ in range(n):
        session, task = await h.parked_session(runtime, 1)
        await session.interrupt("benchmark", trigger="operator")
        await task
    loop = asyncio.get_running_loop()
    while True:
        _, body = await loop.run_in_executor(None, read_all, client)
        if sum(r["report"] is not None for r in body["sessions"]) >= n:
            return
        await asyncio.sleep(0.01)


def read_all(client: h.ControlClient) -> tuple[int, dict[str, Any]]:
    """Every row of the inventory."""
    client.ready()
    client.conn.request("GET", "/api/sessions?stopped_limit=1000", headers=client.headers)
    response = client.conn.getresponse()
    return response.status, json.loads(response.read())


async def inventory(loop: str, quick: bool) -> list[h.Row]:
    """One poll's control-thread CPU time against books of each size in BOOKS."""
    token, entry = control.new_token("viewer", "bench")
    reps, warmup = (20, 3) if quick else (200, 20)
    variants: dict[str, Callable[[], Awaitable[float]]] = {}
    aloop = asyncio.get_running_loop()
    with (
        concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="client") as pool,
        contextlib.ExitStack() as closing,
    ):
        async with contextlib.AsyncExitStack() as stack:
            for size in BOOKS:
                runtime = await stack.enter_async_context(ks.Runtime())
                before = control_threads()
                server = await stack.enter_async_context(control.serve(runtime, tokens=[entry]))
                (ident,) = control_threads() - before
                clock = time.pthread_getcpuclockid(ident)
                client = h.ControlClient(server.url, token)
                closing.callback(client.close)
                await fill_book(runtime, client, size)
                for label, query in (("", ""), (", all rows", "stopped_limit=1000")):

                    async def one(
                        c: h.ControlClient = client, k: int = clock, q: str = query
                    ) -> float:
                        return await aloop.run_in_executor(pool, poll_cpu, c, k, q)

                    variants[f"GET /api/sessions, {size} stopped{label}"] = one
            samples = await h.interleave(variants, reps=reps, warmup=warmup)
    stats = {name: h.summarize(v) for name, v in samples.items()}
    rows = []
    for name, st in stats.items():
        base_name = f"GET /api/sessions, 0 stopped{', all rows' if 'all rows' in name else ''}"
        baseline = None if name == base_name else (base_name, stats[base_name])
        row = h.make_row(NAME, "poll: control-thread CPU", name, loop, None, st, baseline=baseline)
        if name == f"GET /api/sessions, {BOOKS[-1]} stopped":
            row.target = "≤1 ms control-thread CPU"
            row.met = st.p50 <= TARGET_POLL_NS
        rows.append(row)
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
