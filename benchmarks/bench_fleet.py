"""Fleet control on Redis, against the raw Redis round trips it is made of, same run.

A real redis-server on a free loopback port; worker processes (``tests/fleet_worker.py``)
each with its own Runtime in the fleet, as separate hosts would be.

Cases:

* ``fleet kill → StopReport`` (one worker): ``Fleet.kill(id)`` until the owner's signed
  StopReport is read, interleaved with its raw floor, measured in the same run:
  ``raw relay`` — the same Redis round trips with nothing else (one MULTI that stores
  and appends the command, a plain redis-py process blocked on XREAD that RPUSHes an
  answer, BLPOP) — plus ``local stop`` — ``interrupt()`` and ``await handle`` of a parked
  session in-process. The floor is their sum. Target (issue 16): p50 ≤ 1.5x the floor.
* ``kill_where(all) → every report``: W workers x S sessions (10 x 100; quick: 2 x 10),
  until every runtime answered with every report; against the raw relay's p50 plus the
  local stop of S sessions at once (``interrupt_all`` and every handle).
* ``fleet.sessions()``: an inventory of R runtimes x 100 sessions (10 000; quick:
  1 000) published in Redis, decoded into FleetSession objects; against the raw
  pipelined HGETALLs of the same keys. Target (issue 16): ≤ 100 ms for 10 000.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from typing import Any

import anyio

import kill_switch as ks
from benchmarks import _harness as h
from tests.fleet_support import KEY, Worker
from tests.redis_server import RedisServer

NAME = "fleet"
TARGET_KILL_RATIO = 1.5
TARGET_INVENTORY_NS = 100_000_000.0

# The raw floor's other side: a plain redis-py process that answers each command.
_RELAY = """
import sys, redis
r = redis.Redis.from_url(sys.argv[1], decode_responses=True)
print("ready", flush=True)
last = "0-0"
while True:
    for _, entries in r.xread({sys.argv[2]: last}, block=0, count=100):
        for eid, f in entries:
            last = eid
            if f["m"] == "quit":
                sys.exit(0)
            r.rpush(f["reply"], f["m"])
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["KILL_SWITCH_FLEET_KEY"] = KEY
    return env


async def _park(runtime: ks.Runtime, started: list[ks.Session], tg: Any) -> ks.Session:
    session = runtime.session("local")

    async def body() -> None:
        async with session:
            started.append(session)
            await anyio.sleep_forever()

    tg.start_soon(body)
    await h.until(lambda: session in started)
    return session


async def bench_kill(loop: str, server: RedisServer, quick: bool) -> list[h.Row]:
    reps, warmup = (8, 2) if quick else (200, 20)
    name = f"bench-kill-{loop}"
    worker = Worker(server.url, name, lease=5.0, loop=loop, quiet=True)
    relay = subprocess.Popen(  # noqa: ASYNC220  (set-up, outside every timed window)
        [sys.executable, "-c", _RELAY, server.url, f"relay-{loop}"],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        worker.ready()
        assert relay.stdout is not None
        assert relay.stdout.readline().strip() == "ready"
        ids = [f"{loop}-k{i}" for i in range(reps + warmup)]
        for sid in ids:
            assert worker.start("agent", sid)["event"] == "started"
        pending = iter(ids)
        async with ks.Fleet(server.url, key=KEY, name=name) as fleet:
            r = fleet._conn()

            async def listed() -> bool:
                return len(await fleet.sessions()) == len(ids)

            with anyio.fail_after(120):
                while not await listed():  # noqa: ASYNC110  (another process's state, in Redis)
                    await anyio.sleep(0.01)
            async with ks.Runtime() as runtime, anyio.create_task_group() as tg:
                parked: list[ks.Session] = []

                async def fleet_kill() -> float:
                    sid = next(pending)
                    with h.gc_paused(collect=False):
                        t0 = h.now_ns()
                        report = await fleet.kill(sid, reason="bench", operator="bench")
                        t1 = h.now_ns()
                    assert report.quiescent
                    return float(t1 - t0)

                async def raw_relay() -> float:
                    reply = f"bench:{loop}:reply:{h.now_ns()}"
                    with h.gc_paused(collect=False):
                        t0 = h.now_ns()
                        async with r.pipeline(transaction=True) as pipe:
                            pipe.hset(f"bench:{loop}:store", reply, "x")
                            pipe.xadd(f"relay-{loop}", {"m": "x", "reply": reply})
                            pipe.time()
                            pipe.zrange(f"bench:{loop}:leases", 0, -1, withscores=True)
                            await pipe.execute()
                        got = await r.blpop([reply], timeout=10)
                        t1 = h.now_ns()
                    assert got is not None
                    return float(t1 - t0)

                async def local_stop() -> float:
                    session = await _park(runtime, parked, tg)
                    with h.gc_paused(collect=False):
                        t0 = h.now_ns()
                        await session.interrupt("bench", trigger="operator")
                        t1 = h.now_ns()
                    return float(t1 - t0)

                variants = {
                    "fleet kill → StopReport": fleet_kill,
                    "raw relay": raw_relay,
                    "local stop": local_stop,
                }
                samples = await h.interleave(variants, reps=reps, warmup=warmup)
                tg.cancel_scope.cancel()
            await r.xadd(f"relay-{loop}", {"m": "quit", "reply": ""})
    finally:
        worker.close()
        relay.wait(timeout=10)
        if relay.stdout is not None:
            relay.stdout.close()
    stats = {k: h.summarize(v) for k, v in samples.items()}
    relay_s, local_s = stats["raw relay"], stats["local stop"]
    floor = h.Stats(
        relay_s.samples,
        relay_s.p50 + local_s.p50,
        relay_s.p99 + local_s.p99,
        relay_s.mean + local_s.mean,
        relay_s.minimum + local_s.minimum,
    )
    case = "fleet kill → StopReport"
    rows = [
        h.make_row(NAME, case, "raw relay", loop, 1, relay_s),
        h.make_row(NAME, case, "local stop", loop, 1, local_s),
        h.make_row(NAME, case, "raw floor sum", loop, 1, floor),
    ]
    row = h.make_row(NAME, case, case, loop, 1, stats[case], baseline=("raw floor sum", floor))
    row.target = f"p50 ≤ {TARGET_KILL_RATIO}x floor"
    row.met = row.ratio_p50 is not None and row.ratio_p50 <= TARGET_KILL_RATIO
    rows.append(row)
    return rows


async def bench_kill_all(
    loop: str, server: RedisServer, quick: bool, relay_p50: float
) -> list[h.Row]:
    workers_n, per = (2, 10) if quick else (10, 100)
    reps = 1 if quick else 3
    name = f"bench-all-{loop}"
    workers = [
        Worker(server.url, name, lease=10.0, loop=loop, quiet=True) for _ in range(workers_n)
    ]
    samples: list[float] = []
    local: list[float] = []
    try:
        for w in workers:
            w.ready()
        async with ks.Fleet(server.url, key=KEY, name=name, timeout=120) as fleet:
            for rep in range(reps):
                for wi, w in enumerate(workers):
                    for i in range(per):
                        w.send(f"start agent {loop}-{rep}-{wi}-{i}")
                for wi, w in enumerate(workers):
                    last = f"{loop}-{rep}-{wi}-{per - 1}"
                    w.expect(lambda e, last=last: e.get("session_id") == last)

                async def all_listed(rep: int = rep) -> bool:
                    mine = [s for s in await fleet.sessions() if s.state == "running"]
                    return len(mine) == workers_n * per

                with anyio.fail_after(120):
                    while not await all_listed():  # noqa: ASYNC110  (other processes' state)
                        await anyio.sleep(0.02)
                with h.gc_paused():
                    t0 = h.now_ns()
                    res = await fleet.kill_where(all=True, reason="bench", operator="bench")
                    t1 = h.now_ns()
                assert len(res.reports) == workers_n * per, len(res.reports)
                assert res.unanswered == ()
                samples.append(float(t1 - t0))
                # The local floor for one runtime's share: S sessions stopped at once.
                async with ks.Runtime() as runtime, anyio.create_task_group() as tg:
                    parked: list[ks.Session] = []
                    for _ in range(per):
                        await _park(runtime, parked, tg)
                    with h.gc_paused():
                        t0 = h.now_ns()
                        for handle in runtime.interrupt_all("bench", trigger="operator"):
                            await handle
                        t1 = h.now_ns()
                    local.append(float(t1 - t0))
                    tg.cancel_scope.cancel()
    finally:
        for w in workers:
            w.close()
    st = h.summarize(samples)
    lst = h.summarize(local)
    floor = h.Stats(lst.samples, lst.p50 + relay_p50, lst.p99 + relay_p50, 0.0, 0.0)
    case = "kill_where(all) → every report"
    return [
        h.make_row(NAME, case, f"local stop of {per}", loop, per, lst),
        h.make_row(NAME, case, "raw floor sum", loop, per, floor),
        h.make_row(
            NAME,
            case,
            f"{workers_n} workers x {per}",
            loop,
            workers_n * per,
            st,
            baseline=("raw floor sum", floor),
        ),
    ]


async def bench_inventory(loop: str, server: RedisServer, quick: bool) -> list[h.Row]:
    runtimes, per = (10, 100) if quick else (100, 100)
    reps, warmup = (5, 1) if quick else (30, 3)
    name = f"bench-inv-{loop}"
    async with ks.Fleet(server.url, key=KEY, name=name) as fleet:
        r = fleet._conn()
        k = fleet.keys
        now_ms = int(time.time() * 1000)
        async with r.pipeline(transaction=False) as pipe:
            for i in range(runtimes):
                rid = f"rt{i:04d}"
                pipe.zadd(k["leases"], {rid: now_ms + 3_600_000})
                pipe.hset(k["runtimes"], rid, json.dumps({"host": f"h{i}", "pid": 1000 + i}))
                snaps = {
                    f"{rid}-s{j}": json.dumps(
                        {
                            "session_id": f"{rid}-s{j}",
                            "agent": "researcher",
                            "labels": {"team": "blue", "tier": "prod"},
                            "state": "running",
                            "started_at": time.time(),
                            "parent_id": None,
                            "interrupt_trigger": None,
                        }
                    )
                    for j in range(per)
                }
                pipe.hset(k["sessions"] + rid, mapping=snaps)  # type: ignore[arg-type]  # redis-py's Mapping is invariant
            await pipe.execute()
        keys = [k["sessions"] + f"rt{i:04d}" for i in range(runtimes)]

        async def inventory() -> float:
            with h.gc_paused(collect=False):
                t0 = h.now_ns()
                got = await fleet.sessions()
                t1 = h.now_ns()
            assert len(got) == runtimes * per
            return float(t1 - t0)

        async def raw() -> float:
            with h.gc_paused(collect=False):
                t0 = h.now_ns()
                async with r.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.hgetall(key)
                    got = await pipe.execute()
                t1 = h.now_ns()
            assert sum(len(x) for x in got) == runtimes * per
            return float(t1 - t0)

        samples = await h.interleave(
            {"fleet.sessions()": inventory, "raw HGETALL pipeline": raw},
            reps=reps,
            warmup=warmup,
        )
    st = {n: h.summarize(v) for n, v in samples.items()}
    case = "inventory"
    n = runtimes * per
    row = h.make_row(
        NAME,
        case,
        "fleet.sessions()",
        loop,
        n,
        st["fleet.sessions()"],
        baseline=("raw HGETALL pipeline", st["raw HGETALL pipeline"]),
    )
    if n >= 10_000:
        row.target = "≤ 100 ms"
        row.met = row.p50_ns <= TARGET_INVENTORY_NS
    return [
        h.make_row(NAME, case, "raw HGETALL pipeline", loop, n, st["raw HGETALL pipeline"]),
        row,
    ]


async def bench(loop: str, server: RedisServer, quick: bool) -> list[h.Row]:
    rows = await bench_kill(loop, server, quick)
    relay_p50 = next(r.p50_ns for r in rows if r.variant == "raw relay")
    rows += await bench_kill_all(loop, server, quick, relay_p50)
    rows += await bench_inventory(loop, server, quick)
    h.print_table(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = h.make_parser(__doc__)
    args = parser.parse_args(argv)
    os.environ.setdefault("KILL_SWITCH_FLEET_KEY", KEY)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            title = "fleet control on Redis"
            h.run_loops(args, NAME, title, "fleet summary", bench, server, args.quick)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
