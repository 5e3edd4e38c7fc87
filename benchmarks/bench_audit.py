"""Benchmark the durable audit log against the raw primitives, measured in the same run.

    python benchmarks/bench_audit.py [--json out.json] [--quick] [--loop asyncio|uvloop]

Cases (every figure is a ratio to its baseline from this run, variants interleaved):

1. durable single event: ``record()`` → ``await flush() == "durable"`` vs raw ``sqlite3``
   BEGIN IMMEDIATE + INSERT + COMMIT with the same pragmas (WAL, synchronous=FULL) into the
   same table (target <= 1.3x). Also shown: the same raw insert into a one-index table,
   and aiosqlite doing it as three awaited statements (the stack's own floor).
2. burst: N events recorded back to back, then one flush: durable events/s with group
   commit (target >= 50 000/s).
3. interrupt fan-out: a session with N parked tool tasks is interrupted and the handle
   awaited, with SqliteAudit vs MemoryAudit as the runtime's sink (target <= 1.05x).
4. a stop's batch (30 events, the group commit of a stop of 10 trees and 8 threads):
   ``record()`` x 30 → ``flush()`` durable, vs the same 30 rows committed raw by a
   worker thread awaited from the loop, with and without a CPU-bound sibling coroutine
   on the loop (1 ms slices between checkpoints) and the 0.5 ms switch interval a stop
   sets. The sqlite3 module lets go of the GIL around every statement step, and under
   the sibling each return costs up to the switch interval: this case shows what the
   writer's statements per batch cost there.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree

import aiosqlite
import anyio

import kill_switch as ks
from kill_switch import AuditEvent, SqliteAudit
from kill_switch._audit._chain import COLUMN_SQL, COLUMNS, MIGRATIONS
from kill_switch.testing import MemoryAudit

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

INSERT = (
    f"INSERT INTO events ({COLUMN_SQL}, prev_hash, row_hash) "
    f"VALUES ({', '.join('?' * (len(COLUMNS) + 2))})"
)


@contextmanager
def gc_paused() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def pct(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, round((len(data) - 1) * q / 100))]


def raw_connection(path: Path, schema: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA recursive_triggers=ON")
    conn.execute("PRAGMA busy_timeout=500")
    if schema:
        for statement in MIGRATIONS[1]:
            conn.execute(statement)
    else:
        conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, event_id TEXT UNIQUE, x TEXT)")
    return conn


def raw_row() -> tuple[Any, ...]:
    e = AuditEvent("tool_blocked", "s", agent="bench", reason="r")
    return (e.event_id, e.wall_time, e.mono_time, "s", "bench", None, None, e.kind, None, "r",
            None, "{}", "0" * 64, "1" * 64)  # fmt: skip


# ----------------------------------------------------------------- 1. single


async def single(tmp: Path, reps: int) -> dict[str, list[float]]:
    raw_same = raw_connection(tmp / "raw_same.db", schema=True)
    raw_min = raw_connection(tmp / "raw_min.db", schema=False)
    floor = await aiosqlite.connect(tmp / "aio.db", isolation_level=None)
    await floor.execute("PRAGMA journal_mode=WAL")
    await floor.execute("PRAGMA synchronous=FULL")
    for statement in MIGRATIONS[1]:
        await floor.execute(statement)
    out: dict[str, list[float]] = {"sqliteaudit": [], "raw_same": [], "raw_min": [], "aio3": []}
    async with SqliteAudit(tmp / "audit.db") as audit:

        async def ours() -> float:
            event = AuditEvent("tool_blocked", "s", agent="bench", reason="r")
            t0 = time.perf_counter_ns()
            audit.record(event)
            status = await audit.flush()
            t1 = time.perf_counter_ns()
            assert status == "durable", status
            return t1 - t0

        def same() -> float:
            row = raw_row()
            t0 = time.perf_counter_ns()
            raw_same.execute("BEGIN IMMEDIATE")
            raw_same.execute(INSERT, row)
            raw_same.execute("COMMIT")
            return time.perf_counter_ns() - t0

        def minimal() -> float:
            row = (raw_row()[0], "r")
            t0 = time.perf_counter_ns()
            raw_min.execute("BEGIN IMMEDIATE")
            raw_min.execute("INSERT INTO events (event_id, x) VALUES (?, ?)", row)
            raw_min.execute("COMMIT")
            return time.perf_counter_ns() - t0

        async def aio3() -> float:
            row = raw_row()
            t0 = time.perf_counter_ns()
            await floor.execute("BEGIN IMMEDIATE")
            await floor.execute(INSERT, row)
            await floor.execute("COMMIT")
            return time.perf_counter_ns() - t0

        variants: dict[str, Callable[[], float | Awaitable[float]]] = {
            "sqliteaudit": ours,
            "raw_same": same,
            "raw_min": minimal,
            "aio3": aio3,
        }
        names = list(variants)
        for rep in range(reps + 20):  # 20 warm-up rounds are thrown away
            order = names[rep % len(names) :] + names[: rep % len(names)]
            with gc_paused():
                for name in order:
                    result = variants[name]()
                    value = await result if inspect.isawaitable(result) else result
                    if rep >= 20:
                        out[name].append(value)
    await floor.close()
    raw_same.close()
    raw_min.close()
    return out


# ------------------------------------------------------------------ 2. burst


async def burst(tmp: Path, n: int, reps: int) -> list[float]:
    rates = []
    for rep in range(reps):
        events = [AuditEvent("tool_blocked", "s", reason=f"{i}") for i in range(n)]
        async with SqliteAudit(tmp / f"burst{rep}.db") as audit:
            audit.record(AuditEvent("warm", "s"))
            assert await audit.flush() == "durable"
            with gc_paused():
                t0 = time.perf_counter_ns()
                for event in events:
                    audit.record(event)
                status = await audit.flush()
                elapsed = time.perf_counter_ns() - t0
            assert status == "durable", status
        rates.append(n / (elapsed / 1e9))
    return rates


# ------------------------------------------------------- 4. a stop's batch, under load

BATCH = 30


def stop_batch(k: int) -> list[AuditEvent]:
    details = {"pid": 0, "pgid": 0, "signal": 15, "returncode": -15, "tool": "t"}
    return [
        AuditEvent(
            "process_exited",
            f"s{k}",
            agent="bench",
            interrupt_id=f"i{k}",
            trigger="operator",
            reason="bench",
            operator="ops",
            details=details | {"pid": i},
        )
        for i in range(BATCH)
    ]


async def batch_under_load(tmp: Path, reps: int) -> dict[str, list[float]]:
    raw = raw_connection(tmp / "raw_batch.db", schema=True)
    loop = asyncio.get_running_loop()
    busy = asyncio.Event()

    async def sibling() -> None:
        while True:
            await busy.wait()
            end = time.perf_counter() + 0.001
            while time.perf_counter() < end:
                pass
            await anyio.lowlevel.checkpoint()

    def raw_batch() -> None:
        raw.execute("BEGIN IMMEDIATE")
        raw.executemany(INSERT, [raw_row() for _ in range(BATCH)])
        raw.execute("COMMIT")

    out: dict[str, list[float]] = {
        f"{v}_{load}": [] for v in ("ours", "raw") for load in ("none", "cpu")
    }
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # what a stop in flight sets (StopPolicy.switch_interval)
    try:
        async with SqliteAudit(tmp / "batch.db") as audit, anyio.create_task_group() as tg:
            tg.start_soon(sibling)
            for rep in range(reps + 5):  # 5 warm-up rounds are thrown away
                for load in ("none", "cpu") if rep % 2 else ("cpu", "none"):
                    (busy.set if load == "cpu" else busy.clear)()
                    await anyio.sleep(0.002)
                    events = stop_batch(rep)
                    with gc_paused():
                        t0 = time.perf_counter_ns()
                        for event in events:
                            audit.record(event)
                        status = await audit.flush()
                        t1 = time.perf_counter_ns()
                        await loop.run_in_executor(None, raw_batch)
                        t2 = time.perf_counter_ns()
                    assert status == "durable", status
                    if rep >= 5:
                        out[f"ours_{load}"].append(t1 - t0)
                        out[f"raw_{load}"].append(t2 - t1)
            tg.cancel_scope.cancel()
    finally:
        sys.setswitchinterval(interval)
        raw.close()
    return out


# ----------------------------------------------------------------- 3. fan-out


async def fanout_once(sink: Any, n: int) -> tuple[float, float]:
    """(interrupt → quiescent, interrupt → ``await handle`` resolved) in nanoseconds."""

    async def park() -> None:
        await anyio.sleep_forever()

    async with ks.Runtime(audit=sink) as runtime:
        async with runtime.session("bench") as session:
            for _ in range(n):
                session.start_soon(park)
            await anyio.wait_all_tasks_blocked()
            t0 = time.perf_counter_ns()
            handle = session.interrupt("bench", trigger="supervisor")
            await anyio.sleep_forever()
        report = await handle
        elapsed = time.perf_counter_ns() - t0
    assert report.quiescent
    assert report.latency.quiescent is not None
    return report.latency.quiescent * 1e9, elapsed


async def fanout(tmp: Path, n: int, reps: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"memory": [], "sqlite": [], "memory_h": [], "sqlite_h": []}
    for rep in range(reps + 2):
        order = ["memory", "sqlite"] if rep % 2 == 0 else ["sqlite", "memory"]
        for name in order:
            sink: Any = MemoryAudit() if name == "memory" else SqliteAudit(tmp / f"fan{rep}.db")
            with gc_paused():
                quiet, handled = await fanout_once(sink, n)
            if rep >= 2:
                out[name].append(quiet)
                out[f"{name}_h"].append(handled)
    return out


# ------------------------------------------------------------------- report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    reps = 40 if args.quick else 400
    burst_n, burst_reps = (10_000, 2) if args.quick else (50_000, 5)
    fan_n, fan_reps = (200, 6) if args.quick else (1000, 30)
    batch_reps = 10 if args.quick else 100
    tmp = Path(tempfile.mkdtemp(prefix="bench_audit_", dir=os.environ.get("BENCH_TMP")))

    async def run() -> tuple[
        dict[str, list[float]], list[float], dict[str, list[float]], dict[str, list[float]]
    ]:
        return (
            await single(tmp, reps),
            await burst(tmp, burst_n, burst_reps),
            await fanout(tmp, fan_n, fan_reps),
            await batch_under_load(tmp, batch_reps),
        )

    try:
        if args.loop == "uvloop":
            import uvloop

            one, rates, fan, batch = uvloop.run(run())
        else:
            one, rates, fan, batch = asyncio.run(run())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows: list[dict[str, Any]] = []
    base = pct(one["raw_same"], 50)
    for name, label in (
        ("raw_same", "raw sqlite3 BEGIN IMMEDIATE+INSERT+COMMIT, same table"),
        ("raw_min", "raw sqlite3, one-index table"),
        ("aio3", "aiosqlite, 3 awaited statements"),
        ("sqliteaudit", "SqliteAudit record() -> flush() durable"),
    ):
        p50, p99 = pct(one[name], 50), pct(one[name], 99)
        row = {"case": "durable single event", "variant": label, "p50_us": p50 / 1e3,
               "p99_us": p99 / 1e3, "ratio_p50": p50 / base, "samples": len(one[name])}  # fmt: skip
        if name == "sqliteaudit":
            row |= {"target": "<= 1.3x raw (same table)", "met": p50 / base <= 1.3}
        rows.append(row)
    rate = statistics.median(rates)
    rows.append({"case": f"burst of {burst_n}", "variant": "SqliteAudit group commit",
                 "events_per_s": rate, "samples": len(rates), "target": ">= 50000/s",
                 "met": rate >= 50_000})  # fmt: skip
    for suffix, what in (("", "interrupt -> quiescent"), ("_h", "interrupt -> await handle")):
        mem = pct(fan["memory" + suffix], 50)
        for name, label in (("memory", "MemoryAudit"), ("sqlite", "SqliteAudit")):
            values = fan[name + suffix]
            row = {"case": f"fan-out {fan_n} tasks: {what}", "variant": label,
                   "p50_us": pct(values, 50) / 1e3, "p99_us": pct(values, 99) / 1e3,
                   "ratio_p50": pct(values, 50) / mem, "samples": len(values)}  # fmt: skip
            if name == "sqlite" and not suffix:
                ratio = pct(values, 50) / mem
                row |= {"target": "<= 1.05x MemoryAudit", "met": ratio <= 1.05}
            rows.append(row)

    for load, what in (("none", "no load"), ("cpu", "CPU-bound sibling on the loop")):
        raw_p50 = pct(batch[f"raw_{load}"], 50)
        for name, label in (
            ("raw", f"raw sqlite3, {BATCH} rows in one transaction, in a thread"),
            ("ours", f"SqliteAudit record() x {BATCH} -> flush() durable"),
        ):
            values = batch[f"{name}_{load}"]
            p50, p99 = pct(values, 50), pct(values, 99)
            rows.append({"case": f"a stop's batch, {what}", "variant": label,
                         "p50_us": p50 / 1e3, "p99_us": p99 / 1e3,
                         "ratio_p50": p50 / raw_p50, "samples": len(values)})  # fmt: skip

    print(f"bench_audit ({args.loop}, python {platform.python_version()}, "
          f"sqlite {sqlite3.sqlite_version}, {os.cpu_count()} cpus)")  # fmt: skip
    print(f"{'case':<44} {'variant':<55} {'p50':>10} {'p99':>10} {'ratio':>7}  target")
    for row in rows:
        if "events_per_s" in row:
            cells = f"{row['events_per_s']:>10.0f} {'ev/s':>10} {'':>7}"
        else:
            cells = (f"{row['p50_us']:>8.1f}us {row['p99_us']:>8.1f}us "
                     f"{row['ratio_p50']:>6.2f}x")  # fmt: skip
        target = f"{row['target']} {'met' if row['met'] else 'NOT met'}" if "target" in row else ""
        print(f"{row['case']:<44} {row['variant']:<55} {cells}  {target}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"benchmark": "audit", "loop": args.loop, "quick": args.quick, "rows": rows},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
