"""Count the system calls the event loop thread makes for one stop of 10 process trees.

Each call that releases the GIL (``close``, ``epoll_ctl``, ``wait4``, ``openat``,
``read``, ...) must take it back afterwards, which costs up to the 5 ms switch interval
when another thread is CPU-bound: their number on the loop thread is what a stop pays
under load. This runs a session with 10 trees of 4 processes (a ``sh`` leader and 3
``sleep``), interrupts it, and counts the loop thread's calls from ``interrupt()`` to
the handle's resolution under ``strace -f`` (markers: two failing ``access()`` calls).

    python benchmarks/count_stop_syscalls.py [--no-cgroup [--no-scan]] [--trees N]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import subprocess
import sys
import tempfile

TREE = "sleep 1000 & sleep 1000 & sleep 1000 & echo ready; wait"
BEGIN = "/kill-switch-count-begin"
END = "/kill-switch-count-end"
#: Calls CPython makes with the GIL released (Py_BEGIN_ALLOW_THREADS) that a stop may
#: make; kill, killpg, getpgid, pidfd_open and pidfd_send_signal keep the GIL.
GIL_RELEASING = {
    "close",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "wait4",
    "waitid",
    "openat",
    "read",
    "pread64",
    "write",
    "newfstatat",
    "statx",
    "getdents64",
    "mkdir",
    "rmdir",
    "inotify_add_watch",
    "inotify_rm_watch",
    "inotify_init1",
}


async def _stop(trees: int, cgroup: bool, scan: bool) -> None:
    import anyio

    import kill_switch as ks
    from kill_switch._planes import _procfs

    policy = ks.EscalationPolicy(cgroup=cgroup, find_escapees=scan)
    loop = asyncio.get_running_loop()
    started: asyncio.Future[ks.Session] = loop.create_future()
    async with ks.Runtime() as runtime:

        async def host() -> None:
            async with runtime.session("count") as session:
                for _ in range(trees):
                    proc = await session.open_process(["sh", "-c", TREE], escalation=policy)
                    assert proc.stdout is not None
                    await proc.stdout.receive()  # "ready": sh forked its 3 jobs before
                    while len(_procfs.children(proc.pid)) < 3:  # noqa: ASYNC110
                        await anyio.sleep(0.001)
                started.set_result(session)
                await anyio.sleep_forever()

        task = loop.create_task(host())
        session = await started
        os.access(BEGIN, os.F_OK)
        report = await session.interrupt("count", trigger="supervisor")
        os.access(END, os.F_OK)
        await task
    assert report.quiescent, report
    assert len(report.processes) == trees
    print(f"containment: {report.processes[0].containment}", file=sys.stderr)


def _count(trace: str, pid: int) -> collections.Counter[str]:
    calls: collections.Counter[str] = collections.Counter()
    inside = False
    line_re = re.compile(r"^(\d+)\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]")
    with open(trace) as f:
        for line in f:
            m = line_re.match(line)
            if m is None or int(m.group(1)) != pid:
                continue
            if BEGIN in line:
                inside = True
                continue
            if END in line:
                break
            if inside and "resumed>" not in line:
                calls[m.group(2)] += 1
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", type=int, default=10)
    parser.add_argument("--no-cgroup", action="store_true")
    parser.add_argument("--no-scan", action="store_true", help="find_escapees=False")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.inner:
        asyncio.run(_stop(ns.trees, not ns.no_cgroup, not ns.no_scan))
        return
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace")
        argv = [sys.executable, __file__, "--inner", "--trees", str(ns.trees)]
        argv += ["--no-cgroup"] * ns.no_cgroup + ["--no-scan"] * ns.no_scan
        proc = subprocess.Popen(["strace", "-f", "-qq", "-o", trace, *argv])
        if proc.wait() != 0:
            raise SystemExit(f"the stop under strace failed ({proc.returncode})")
        with open(trace) as f:
            first = f.readline()
        calls = _count(trace, int(first.split()[0]))
    released = {k: v for k, v in calls.items() if k in GIL_RELEASING}
    print(f"loop thread, one stop of {ns.trees} trees of 4 processes:")
    for name, n in calls.most_common():
        print(f"  {name:<20}{n:>5}{'  (releases the GIL)' if name in GIL_RELEASING else ''}")
    print(f"GIL-releasing calls: {sum(released.values())} (all calls: {sum(calls.values())})")


if __name__ == "__main__":
    main()
