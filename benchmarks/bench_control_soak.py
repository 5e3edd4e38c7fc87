"""An operator's HTTP kill under a hostile local load, vs the same kill without it.

Every sample stops a fresh session with N tool calls parked (N = 100 by default) through
``POST /api/sessions/{id}/kill`` (operator token, kept-alive ``http.client`` connection
from a client thread) until the JSON StopReport is read — as ``bench_control``. Set-up
and tear-down stay outside the timed window.

Variants, interleaved (the load is switched on or off between samples, outside the
window):

* ``HTTP kill, soak load`` — while another process (``benchmarks/control_load.py``) holds
  200 sockets open (100 idle, 100 with a half-sent request head) and floods the server
  with bad bearer tokens on 4 kept-alive connections (401, then 429 once over budget).
* ``HTTP kill, quiet`` — the same kill with the load process idle and its sockets
  closed: the baseline.

Target (issue 14): the kill under load ≤ 1.5 times the quiet kill, p50 and p99. The load
process competes for the same CPUs (2 on the reference machine), so part of the ratio
is the machine, not the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from typing import TYPE_CHECKING, Any

import anyio

import kill_switch as ks
from benchmarks import _harness as h
from benchmarks.control_load import LoadProcess
from kill_switch import control

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

NAME = "control_soak"
TARGET_RATIO = 1.5
#: Bad-token requests per second of the flood: 250 times the failure limiter's refill
#: rate (2/s), 25 times its burst, every second.
FLOOD_RATE = 500.0
#: Bad-token requests the flood must have sent since the load was (re)checked before a
#: loaded sample starts: the flood is running during the sample, not ramping up.
FLOOD_WARM = 20
LOADED = "HTTP kill, soak load"
QUIET = "HTTP kill, quiet"


def make_variants(
    runtime: ks.Runtime,
    server: control.ControlServer,
    n: int,
    client: h.ControlClient,
    load: LoadProcess,
    pool: concurrent.futures.Executor,
    counts: dict[str, Any],
) -> dict[str, Callable[[], Awaitable[float]]]:
    """The interleaved variants, each returning one sample in ns."""
    loop = asyncio.get_running_loop()

    async def kill(loaded: bool) -> float:
        if loaded and not load.running:
            counts["sockets"] = await loop.run_in_executor(pool, load.on)
            with anyio.fail_after(30):
                await h.until(lambda: server.open_connections >= counts["sockets"])
        elif not loaded and load.running:
            await loop.run_in_executor(pool, load.off)
            # The server has seen every close: the quiet sample does not pay for them.
            with anyio.fail_after(30):
                await h.until(lambda: server.open_connections <= 1)
        if loaded:  # the flood is running now: it has sent FLOOD_WARM more requests
            start = (await loop.run_in_executor(pool, load.stats))["requests"]
            while (await loop.run_in_executor(pool, load.stats))["requests"] < start + FLOOD_WARM:  # noqa: ASYNC110  (another process)
                await asyncio.sleep(0.001)
        session, task = await h.parked_session(runtime, n)
        sample, _ = await loop.run_in_executor(pool, client.kill, session.id, n)
        await task
        return sample

    async def loaded() -> float:
        return await kill(True)

    async def quiet() -> float:
        return await kill(False)

    return {LOADED: loaded, QUIET: quiet}


def rows_for(loop: str, n: int, samples: dict[str, list[float]], **extra: Any) -> list[h.Row]:
    """The quiet row and the loaded row (as a ratio to it), the target checked."""
    quiet = h.summarize(samples[QUIET])
    loaded = h.summarize(samples[LOADED])
    base = h.make_row(NAME, "kill → StopReport", QUIET, loop, n, quiet)
    row = h.make_row(
        NAME, "kill → StopReport", LOADED, loop, n, loaded, baseline=(QUIET, quiet), **extra
    )
    row.target = f"≤{TARGET_RATIO:g}x quiet, p50 and p99"
    row.met = (row.ratio_p50 or 0) <= TARGET_RATIO and (row.ratio_p99 or 0) <= TARGET_RATIO
    return [base, row]


async def bench(loop: str, n: int, quick: bool, rate: float) -> list[h.Row]:
    """N parked calls, on the running loop, against a control plane on its own thread."""
    # Each refused token is a warning line on stderr until the failure budget runs out.
    logging.getLogger("kill_switch.control").setLevel(logging.ERROR)
    token, entry = control.new_token("operator", "bench")
    reps, warmup = (10, 2) if quick else (200, 10)
    counts: dict[str, Any] = {}
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="client") as pool:
        async with ks.Runtime() as runtime, control.serve(runtime, tokens=[entry]) as server:
            client = h.ControlClient(server.url, token)
            load = LoadProcess(server.url, rate=rate)
            try:
                variants = make_variants(runtime, server, n, client, load, pool, counts)
                samples = await h.interleave(variants, reps=reps, warmup=warmup)
                stats = await loop_run(pool, load.stats)
            finally:
                client.close()
                await loop_run(pool, load.close)
    rows = rows_for(
        loop,
        n,
        samples,
        sockets_held=counts.get("sockets"),
        flood_rate=rate or "max",
        flood_requests=stats["requests"],
        flood_statuses=stats["statuses"],
        sockets_reopened=stats["reopened"],
    )
    h.print_table(rows)
    print(
        f"  load: {counts.get('sockets')} sockets held, {stats['requests']} bad-token "
        f"requests ({stats['statuses']}), {stats['reopened']} sockets re-opened"
    )
    return rows


async def loop_run(pool: concurrent.futures.Executor, fn: Callable[[], Any]) -> Any:
    """*fn* on the client thread (the load process is driven with blocking pipes)."""
    return await asyncio.get_running_loop().run_in_executor(pool, fn)


def main(argv: list[str] | None = None) -> int:
    parser = h.make_parser(__doc__)
    parser.add_argument("--n", type=int, default=100, help="tool calls parked (default 100)")
    parser.add_argument(
        "--rate",
        type=float,
        default=FLOOD_RATE,
        help=f"bad-token requests per second (default {FLOOD_RATE:g}; 0: as fast as answered)",
    )
    args = parser.parse_args(argv)
    n = 10 if args.quick else args.n
    title = "control plane kill under a hostile load"
    summary = "control plane under load: summary"
    h.run_loops(args, NAME, title, summary, bench, n, args.quick, args.rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
