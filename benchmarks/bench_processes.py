"""Benchmark: the process plane's stop against the raw primitives, in the same run.

1. group kill: a session whose tool runs a leader + 3 grandchildren is interrupted and
   awaited until all 4 are gone and the leader is reaped, vs raw ``os.killpg`` + pidfd
   waits + ``waitpid`` on the same tree.                                  target <= 1.3x
2. SIGTERM-ignoring child with grace g: interrupt -> reaped, minus g.     target <= 1 ms

    python benchmarks/bench_processes.py [--json out.json] [--rounds N] [--grace G] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import anyio

import kill_switch as ks
from kill_switch import EscalationPolicy, EscalationWarning
from kill_switch._planes import _procfs  # no public name: the bench reads the tree it built

TREE = "sleep 1000 & sleep 1000 & sleep 1000 & echo ready; wait"
STUBBORN = "trap '' TERM; echo ready; while :; do sleep 1; done"


async def _pidfd_wait(fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    pending = len(fds)
    done = loop.create_future()

    def ready(fd: int) -> None:
        nonlocal pending
        loop.remove_reader(fd)
        pending -= 1
        if pending == 0:
            done.set_result(None)

    for fd in fds:
        loop.add_reader(fd, ready, fd)
    await done


async def raw_group_kill() -> float:
    """Raw floor: killpg(SIGTERM) the tree, wait for 4 pidfds, waitpid the leader."""
    # The raw primitives themselves are what this measures.
    proc = subprocess.Popen(  # noqa: ASYNC220
        ["sh", "-c", TREE], stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    kids = _procfs.children(proc.pid)
    while len(kids) < 3:
        kids = _procfs.children(proc.pid)
    fds = [os.pidfd_open(p) for p in (proc.pid, *kids)]
    t0 = time.perf_counter()
    os.killpg(proc.pid, signal.SIGTERM)
    await _pidfd_wait(fds)
    os.waitpid(proc.pid, 0)  # noqa: ASYNC222  (its pidfd is readable: returns at once)
    t1 = time.perf_counter()
    proc.returncode = -15
    proc.stdout.close()
    for fd in fds:
        os.close(fd)
    return t1 - t0


async def session_stop(
    runtime: ks.Runtime, command: str, escalation: EscalationPolicy, children: int
) -> tuple[float, ks.StopReport]:
    """interrupt() -> await handle for a session whose body waits on the process."""
    ready = anyio.Event()
    holder: dict[str, Any] = {}

    async def body() -> None:
        async with runtime.session("bench") as session:
            proc = await session.open_process(["sh", "-c", command], escalation=escalation)
            assert proc.stdout is not None
            await proc.stdout.receive()
            # sh forked its jobs before it echoed; this only guards the bookkeeping.
            while len(_procfs.children(proc.pid)) < children:  # noqa: ASYNC110
                await anyio.sleep(0.001)
            holder["session"] = session
            holder["pids"] = [proc.pid, *_procfs.children(proc.pid)]
            ready.set()
            await proc.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(body)
        await ready.wait()
        session: ks.Session = holder["session"]
        t0 = time.perf_counter()
        handle = session.interrupt("bench", trigger="supervisor")
        report = await handle
        t1 = time.perf_counter()
    _check_gone(report, holder["pids"])
    return t1 - t0, report


async def empty_stop(runtime: ks.Runtime) -> float:
    """interrupt() -> await handle for a session with no process: the session's share."""
    ready = anyio.Event()
    holder: dict[str, ks.Session] = {}

    async def body() -> None:
        async with runtime.session("bench") as session:
            holder["session"] = session
            ready.set()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(body)
        await ready.wait()
        t0 = time.perf_counter()
        await holder["session"].interrupt("bench", trigger="supervisor")
        t1 = time.perf_counter()
    return t1 - t0


def _check_gone(report: ks.StopReport, pids: list[int]) -> None:
    """Outside the timing: every pid of the tree has exited, the leader was reaped."""
    for pid in pids:
        # gone, or a zombie: the grandchildren are init's to reap
        assert not _procfs.alive(pid), (pid, _procfs.stat(pid))
    assert report.quiescent
    assert report.processes[0].returncode is not None


def _p50(xs: list[float]) -> float:
    return statistics.median(xs)


async def main(rounds: int, grace: float) -> dict[str, Any]:
    raw: list[float] = []
    ours_cg: list[float] = []
    ours_pg: list[float] = []
    stubborn: list[float] = []
    empty: list[float] = []
    containment = "?"
    async with ks.Runtime() as runtime:
        for _ in range(3):  # warm up
            await raw_group_kill()
            await session_stop(runtime, TREE, EscalationPolicy(), 3)
        for _ in range(rounds):
            # interleaved so that both see the same machine state
            raw.append(await raw_group_kill())
            dt, report = await session_stop(runtime, TREE, EscalationPolicy(), 3)
            containment = report.processes[0].containment
            ours_cg.append(dt)
            dt, report = await session_stop(
                runtime, TREE, EscalationPolicy(cgroup=False, find_escapees=False), 3
            )
            ours_pg.append(dt)
            empty.append(await empty_stop(runtime))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EscalationWarning)
            for _ in range(max(5, rounds // 4)):
                dt, report = await session_stop(runtime, STUBBORN, EscalationPolicy(grace=grace), 0)
                assert report.processes[0].signals == ("SIGTERM", "SIGKILL")
                stubborn.append(dt - grace)
    raw50 = _p50(raw)
    rows = {
        "raw_killpg_wait_us": raw50 * 1e6,
        "session_without_processes_us": _p50(empty) * 1e6,
        "session_group_kill_us": _p50(ours_cg) * 1e6,
        "session_group_kill_ratio": _p50(ours_cg) / raw50,
        "containment": containment,
        "session_group_kill_pgroup_only_us": _p50(ours_pg) * 1e6,
        "session_group_kill_pgroup_only_ratio": _p50(ours_pg) / raw50,
        "sigkill_overhead_beyond_grace_ms": _p50(stubborn) * 1e3,
        "grace_s": grace,
        "rounds": rounds,
        "python": sys.version.split()[0],
    }
    return rows


def _print(rows: dict[str, Any]) -> None:
    print(f"process plane benchmark (p50, {rows['rounds']} rounds, Python {rows['python']})")
    print(f"{'measure':<52}{'value':>12}{'target':>10}")
    print("-" * 74)
    print(
        f"{'raw killpg + pidfd wait + waitpid (4 pids)':<52}"
        f"{rows['raw_killpg_wait_us']:>9.0f} us{'':>10}"
    )
    print(
        f"{'session interrupt, no process (the session share)':<52}"
        f"{rows['session_without_processes_us']:>9.0f} us{'':>10}"
    )
    print(
        f"{'session interrupt -> all 4 reaped (' + rows['containment'] + ')':<52}"
        f"{rows['session_group_kill_us']:>9.0f} us{'':>10}"
    )
    print(f"{'  ratio to raw':<52}{rows['session_group_kill_ratio']:>11.2f}x{'<= 1.3x':>10}")
    print(
        f"{'session interrupt, process group only, no /proc scan':<52}"
        f"{rows['session_group_kill_pgroup_only_us']:>9.0f} us{'':>10}"
    )
    print(f"{'  ratio to raw':<52}{rows['session_group_kill_pgroup_only_ratio']:>11.2f}x{'':>10}")
    print(
        f"{'SIGTERM-ignoring child: overhead beyond grace':<52}"
        f"{rows['sigkill_overhead_beyond_grace_ms']:>9.3f} ms{'<= 1 ms':>10}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--grace", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 rounds")
    ns = parser.parse_args()
    result = asyncio.run(main(5 if ns.quick else ns.rounds, ns.grace))
    _print(result)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=2)
