"""End to end: one realistic session killed under load, every plane, against the raw floors.

The session (set up outside the timed window, afresh for every kill):

* 100 async tool calls parked (``session.start_soon``);
* 10 process trees from ``session.open_process``: ``sh`` leader + 3 ``sleep``
  grandchildren each; in one tree the leader (and so its children) ignores SIGTERM;
* 8 sync tools in threads (``session.run_sync``): 3 wait in ``ks.sleep()``, 3 do 1 ms of
  blocking work between ``ks.check()`` calls, 2 never poll (``time.sleep`` in a loop) and
  are abandoned after the grace (they end once the sample is taken, so that the runtime's
  cap on abandoned threads is never reached);
* the SQLite audit on (``Runtime(audit=<file in a temporary folder>)``).

The load, running the whole time (raw floors included): a sibling session in the same
runtime whose tool burns the CPU in 1 ms slices between checkpoints, and an HTTP client
in another process polling ``GET /api/sessions`` back to back (one request at a time).

**Grace: 20 ms**, both ``term_grace`` and ``thread_grace`` (``StopPolicy``), and the same
20 ms in the raw floors. Small, so the 50 ms target is about the kill switch and not the
grace; large enough, on this loaded 2-core machine, for a SIGTERMed ``sh`` + ``sleep``
group to exit well inside it (a few ms) and for a 1 ms polling thread to notice, so that
only the SIGTERM-ignoring tree and the 2 non-polling threads escalate: the grace measures
escalation, not false escalation (which is counted and reported).

Measured, variants interleaved (see ``_harness``), ≥ 200 kills per loop:

(a) interrupt → each plane quiet, instrumented from outside:
    *tool calls* — the last of the 100 parked calls leaves its ``finally``;
    *processes* and *threads* — the last ``process_exited`` / ``thread_returned`` /
    ``thread_abandoned`` audit event of the kill, time-stamped by a runtime listener
    (``runtime.add_listener``) when it is recorded, i.e. when the leader is reaped and
    the thread is back or abandoned; *audit* — the handle resolves after the audit flush
    answered: at once if ``report.audit == "durable"``; if the flush outlived
    ``StopPolicy.audit_timeout`` (``pending``, counted and reported), when the sink's own
    ``flush()`` then returns ``durable``. Either way the ``interrupt_completed`` row is
    then read back through a separate sqlite3 connection;
(b) interrupt → StopReport: ``session.interrupt()`` + ``await handle`` on the loop;
(c) HTTP kill → StopReport: ``POST /api/sessions/{id}/kill`` with an operator token, from
    a client thread on a kept-alive connection, until the JSON report is parsed.

Raw floors, same run, same load, interleaved with the kills, each timed on its own:
100 asyncio tasks cancelled + gathered; 10 equivalent trees (``start_new_session``)
stopped with ``os.killpg`` SIGTERM, pidfd waits, SIGKILL at the grace to groups not gone,
``waitpid`` of the leaders; a ``threading.Event`` set → the 6 polling threads' exits
reach the loop (``call_soon_threadsafe``) and the loop stops waiting for the 2 others at
the grace (what the thread plane does: the grace runs from the interrupt, concurrently
with the joins); one ``sqlite3`` row committed in WAL with ``synchronous=FULL``, on the
loop's thread (the same commit from a worker thread is reported beside it, for
information). Their
**sum** is the floor the targets use. The planes of a kill run concurrently, so the sum
counts the grace twice; the *critical path* floor (tasks, trees and threads concurrently,
then the commit: max of the three + commit) is reported beside it as the stricter figure.

Every kill is verified, and the run fails loudly otherwise: report ``stopped`` and
quiescent, ≥ 100 tool calls cancelled, 10 processes reaped (SIGKILL for the stubborn tree),
8 threads reported (the 2 non-polling ones abandoned), audit durable and on disk, every
pid of the 40 gone, and no zombie child left.

Targets (issue 8): interrupt → StopReport p99 ≤ 50 ms, and p50 ≤ 2x the raw floor sum.

Run time: under the full load a round (both kills + the floors) takes ~10 s on 2 shared
cores, mostly waiting for pending audit flushes, so the default 200 kills per variant take
well over an hour; ``--reps`` trades samples for time (the committed results say how many
samples each row has).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import anyio.lowlevel

import kill_switch as ks
from benchmarks import _harness as h

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

NAME = "e2e"
ROOT = Path(__file__).resolve().parent.parent

GRACE = 0.020
N_CALLS = 100
N_TREES = 10
N_SLEEPERS = 3  # ks.sleep()
N_CHECKERS = 3  # 1 ms of work, then ks.check()
N_DEAF = 2  # never poll: abandoned after the grace
N_THREADS = N_SLEEPERS + N_CHECKERS + N_DEAF
BURN_SLICE = 0.001

TARGET_P99_NS = 50e6
TARGET_RATIO = 2.0

POLICY = ks.StopPolicy(term_grace=GRACE, thread_grace=GRACE, stop_timeout=10.0)
TREE = "sleep 1000 & sleep 1000 & sleep 1000 & echo ready; wait"
# An ignored signal stays ignored across fork and exec: the whole group ignores SIGTERM.
STUBBORN = "trap '' TERM; " + TREE
POLL_TOKEN_ENV = "KILL_SWITCH_BENCH_TOKEN"

KS_STOP = "interrupt → StopReport"
KS_HTTP = "HTTP kill → StopReport"
KS_TOOLS = "interrupt → tool calls done"
KS_PROCS = "interrupt → processes reaped"
KS_THREADS = "interrupt → threads back/abandoned"
KS_AUDIT = "interrupt → audit durable"
RAW_TASKS = "raw cancel+gather 100 tasks"
RAW_TREES = "raw killpg/wait 10 trees"
RAW_THREADS = "raw Event.set → threads"
RAW_SQLITE = "raw sqlite3 commit (FULL, WAL)"
RAW_SQLITE_THREAD = "raw sqlite3 commit in a thread (info)"
RAW_SUM = "raw floor sum"
RAW_CRITICAL = "raw critical path"


# --------------------------------------------------------------------- /proc helpers


def children(pid: int) -> list[int]:
    """The child pids of *pid* (``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out.extend(int(x) for x in f.read().split())
    except OSError:
        pass
    return out


def grandchildren(leader: int, n: int = 3) -> list[int]:
    """The *n* children of a tree's leader (forked before it said "ready")."""
    kids = children(leader)
    for _ in range(1000):
        if len(kids) >= n:
            break
        time.sleep(0.001)
        kids = children(leader)
    if len(kids) < n:
        raise RuntimeError(f"tree {leader} has {len(kids)} children, expected {n}")
    return kids


def state(pid: int) -> str | None:
    """The state letter of *pid* (``Z``: zombie), or ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def my_zombies() -> list[int]:
    """Children of this process that exited and were never reaped."""
    return [p for p in children(os.getpid()) if state(p) == "Z"]


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Wait (outside any timed window) until *pids* left ``/proc``; the ones that did not.

    A killed grandchild is reparented and reaped by init: it may be a zombie for a moment.
    """
    deadline = time.monotonic() + timeout
    left = [p for p in pids if state(p) is not None]
    while left and time.monotonic() < deadline:
        time.sleep(0.002)
        left = [p for p in left if state(p) is not None]
    return left


class KillFailed(RuntimeError):
    """A kill did not stop everything: the benchmark is void."""


# --------------------------------------------------------------------- the session shape


class Shape:
    """One session of the realistic shape; *start* returns once all of it is running."""

    def __init__(self, runtime: ks.Runtime, stamps: dict[str, dict[str, int]]) -> None:
        self.runtime = runtime
        self.stamps = stamps
        self.parked = 0
        self.tools_done_ns = 0
        self.lock = threading.Lock()
        self.threads_in = 0
        self.release = threading.Event()  # lets the abandoned threads end after the sample
        self.leaders: list[int] = []
        self.pids: list[int] = []
        self.session: ks.Session | None = None
        self.task: asyncio.Task[None] | None = None

    # tools ------------------------------------------------------------------

    async def park(self) -> None:
        self.parked += 1
        try:
            await anyio.sleep_forever()
        finally:
            self.parked -= 1
            if self.parked == 0:
                self.tools_done_ns = h.now_ns()

    def _entered(self) -> None:
        with self.lock:
            self.threads_in += 1

    def sleeper(self) -> None:
        self._entered()
        while True:
            ks.sleep(1.0)

    def checker(self) -> None:
        self._entered()
        while True:
            time.sleep(0.001)  # a chunk of blocking work
            ks.check()

    def deaf(self) -> None:
        self._entered()
        while not self.release.is_set():
            time.sleep(0.002)

    # lifetime ---------------------------------------------------------------

    async def _host(self, ready: asyncio.Future[None]) -> None:
        try:
            async with self.runtime.session("e2e", policy=POLICY) as s:
                self.session = s
                self.stamps[s.id] = {}
                for _ in range(N_CALLS):
                    s.start_soon(self.park, tool="park")
                for i in range(N_TREES):
                    proc = await s.open_process(
                        ["sh", "-c", STUBBORN if i == 0 else TREE], stdin=None, stderr=None
                    )
                    assert proc.stdout is not None
                    await proc.stdout.receive()  # "ready": the tree is forked
                    self.leaders.append(proc.pid)
                    self.pids += [proc.pid, *grandchildren(proc.pid)]
                # In the background as tool tasks, not in a task group of the body: on
                # Python 3.11 a group of the session's own Interrupted makes the block
                # raise TypeError (kill_switch/_session.py, Session._absorb).
                tools = [self.sleeper] * N_SLEEPERS + [self.checker] * N_CHECKERS
                for fn in [*tools, *[self.deaf] * N_DEAF]:
                    s.start_soon(s.run_sync, fn, tool=fn.__name__)
                await h.until(lambda: self.threads_in >= N_THREADS)
                ready.set_result(None)
                await anyio.sleep_forever()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    async def start(self) -> ks.Session:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self.task = loop.create_task(self._host(ready))
        await ready
        await h.until(lambda: self.parked >= N_CALLS)
        assert self.session is not None
        return self.session

    async def finish(
        self, report: ks.StopReport, t0: int, t_audit: int, db: str
    ) -> dict[str, float]:
        """End the shape (outside the window), verify the kill; the plane times (ns)."""
        assert self.task is not None
        assert self.session is not None
        stamps = self.stamps.pop(self.session.id, {})
        self.release.set()
        await self.task
        verify(report, self, db)
        for _ in range(5000):  # the abandoned threads end within ms of their release
            if ks.abandoned_threads(self.runtime) == 0:
                break
            await asyncio.sleep(0.001)
        else:
            raise KillFailed("abandoned threads did not end after their release")
        left = wait_gone(self.pids)
        if left:
            raise KillFailed(f"pids still in /proc after the kill: {left}")
        zombies = my_zombies()
        if zombies:
            raise KillFailed(f"zombie children left: {zombies}")
        return {
            KS_TOOLS: self.tools_done_ns - t0,
            KS_PROCS: stamps["processes"] - t0,
            KS_THREADS: stamps["threads"] - t0,
            KS_AUDIT: t_audit - t0,
        }


def verify(report: ks.StopReport, shape: Shape, db: str) -> None:
    """Fail loudly unless *report*'s kill stopped everything of *shape*."""
    problems: list[str] = []
    # The deaf threads may still run when the report is built: then the report must say
    # so (unresponsive, escalated), never stopped.
    deaf_running = any(t.running for t in report.threads)
    expected = ("unresponsive", False) if deaf_running else ("stopped", True)
    if (report.outcome, report.quiescent) != expected:
        problems.append(f"outcome {report.outcome}, quiescent {report.quiescent}")
    if any(t.running and t.tool != "deaf" for t in report.threads):
        problems.append("a polling thread still ran at the report")
    if report.tool_calls_cancelled < N_CALLS:
        problems.append(f"{report.tool_calls_cancelled} tool calls cancelled")
    if len(report.processes) != N_TREES:
        problems.append(f"{len(report.processes)} processes in the report")
    for p in report.processes:
        if p.returncode is None or p.survived or p.escaped or p.error:
            problems.append(f"process {p.pid}: {p}")
        if p.pid == shape.leaders[0] and "SIGKILL" not in p.signals:
            problems.append(f"the SIGTERM-ignoring tree got {p.signals}")
    outcomes = sorted(t.outcome for t in report.threads)
    if len(outcomes) != N_THREADS or outcomes.count("abandoned") < N_DEAF:
        problems.append(f"threads: {outcomes}")
    for t in report.threads:
        if t.tool == "deaf" and t.outcome != "abandoned":
            problems.append(f"a non-polling thread was {t.outcome}")
    if report.audit not in ("durable", "pending"):  # pending: flushed durable since
        problems.append(f"audit {report.audit}")
    for pid in shape.leaders:
        if state(pid) is not None:
            problems.append(f"leader {pid} not reaped ({state(pid)})")
    for pid in shape.pids:
        if state(pid) not in (None, "Z"):
            problems.append(f"pid {pid} alive ({state(pid)})")
    last = "escalated" if deaf_running else "interrupt_completed"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (rows,) = conn.execute(
            "SELECT count(*) FROM events WHERE interrupt_id = ? AND kind = ?",
            (report.interrupt_id, last),
        ).fetchone()
    if rows != 1:
        problems.append(f"{rows} {last} rows on disk")
    if problems:
        raise KillFailed(
            f"kill of session {report.session_id} incomplete: {'; '.join(problems)}\n"
            + report.summary()
        )


def escalations(report: ks.StopReport) -> tuple[int, int]:
    """(trees SIGKILLed beyond the stubborn one, polling threads abandoned): false
    escalations under load."""
    trees = sum("SIGKILL" in p.signals for p in report.processes) - 1
    threads = sum(t.outcome == "abandoned" for t in report.threads) - N_DEAF
    return trees, threads


# --------------------------------------------------------------------- raw floors


def start_raw_trees() -> list[tuple[subprocess.Popen[bytes], list[int]]]:
    """The 10 trees, each in a new session, started and forked (set-up, blocking)."""
    trees = []
    for i in range(N_TREES):
        proc = subprocess.Popen(
            ["sh", "-c", STUBBORN if i == 0 else TREE],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdout is not None
        proc.stdout.readline()
        trees.append((proc, [proc.pid, *grandchildren(proc.pid)]))
    return trees


async def raw_trees(grace: float) -> float:
    """killpg SIGTERM → pidfd waits → SIGKILL at *grace* to groups not gone → waitpid."""
    loop = asyncio.get_running_loop()
    trees = start_raw_trees()
    fds = {pid: os.pidfd_open(pid) for _, pids in trees for pid in pids}
    left = {proc.pid: len(pids) for proc, pids in trees}  # members alive, per group
    group_of = {pid: proc.pid for proc, pids in trees for pid in pids}
    done = loop.create_future()
    pending = len(fds)

    def exited(pid: int) -> None:
        nonlocal pending
        loop.remove_reader(fds[pid])
        pgid = group_of[pid]
        left[pgid] -= 1
        if pid == pgid:
            os.waitpid(pid, 0)  # its pidfd is readable: returns at once
        pending -= 1
        if pending == 0 and not done.done():
            done.set_result(None)

    def grace_over() -> None:
        for pgid, alive in left.items():
            if alive:
                os.killpg(pgid, signal.SIGKILL)

    t0 = h.now_ns()
    for proc, _ in trees:
        os.killpg(proc.pid, signal.SIGTERM)
    for pid, fd in fds.items():
        loop.add_reader(fd, exited, pid)
    timer = loop.call_later(grace, grace_over)
    await done
    t1 = h.now_ns()
    timer.cancel()
    for fd in fds.values():
        os.close(fd)
    for proc, _ in trees:
        proc.returncode = -signal.SIGTERM  # reaped above; keep Popen from trying again
        assert proc.stdout is not None
        proc.stdout.close()
    return t1 - t0


async def raw_threads(grace: float) -> float:
    """Event.set → the polling threads' exits reach the loop; the rest left at *grace*."""
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    release = threading.Event()
    entered = 0
    lock = threading.Lock()

    def enter() -> None:
        nonlocal entered
        with lock:
            entered += 1

    def sleeper() -> None:
        enter()
        while not stop.wait(1.0):
            pass

    def checker() -> None:
        enter()
        while not stop.is_set():
            time.sleep(0.001)

    def deaf() -> None:
        enter()
        while not release.is_set():
            time.sleep(0.002)

    futures: list[asyncio.Future[None]] = []
    threads = []
    for fn in [sleeper] * N_SLEEPERS + [checker] * N_CHECKERS + [deaf] * N_DEAF:
        fut: asyncio.Future[None] = loop.create_future()

        def main(fn: Callable[[], None] = fn, fut: asyncio.Future[None] = fut) -> None:
            try:
                fn()
            finally:
                loop.call_soon_threadsafe(fut.set_result, None)

        futures.append(fut)
        threads.append(threading.Thread(target=main, daemon=True))
    for t in threads:
        t.start()
    await h.until(lambda: entered >= len(threads))
    t0 = h.now_ns()
    stop.set()
    _, pending = await asyncio.wait(futures, timeout=grace)
    t1 = h.now_ns()
    if len(pending) < N_DEAF:
        raise KillFailed("raw floor: a non-polling thread ended before its release")
    release.set()
    await asyncio.gather(*futures)
    return t1 - t0


def raw_sqlite_open(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, body TEXT)")
    return conn


def raw_commit(conn: sqlite3.Connection) -> float:
    """One row in its own transaction, committed (fsync'd: synchronous=FULL)."""
    t0 = h.now_ns()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO events (body) VALUES (?)", ('{"kind": "interrupt_completed"}',))
    conn.execute("COMMIT")
    return h.now_ns() - t0


async def raw_commit_in_thread(conn: sqlite3.Connection) -> float:
    """The same commit in a worker thread awaited from the loop, as a writer thread does
    (not in the floor: it shows what the thread hop costs under the load)."""
    loop = asyncio.get_running_loop()
    t0 = h.now_ns()
    await loop.run_in_executor(None, raw_commit, conn)
    return h.now_ns() - t0


# --------------------------------------------------------------------- load


async def burn(counter: list[int]) -> None:
    """A CPU-bound tool: 1 ms of work between checkpoints, forever."""
    while True:
        end = time.perf_counter() + BURN_SLICE
        while time.perf_counter() < end:
            pass
        counter[0] += 1
        await anyio.lowlevel.checkpoint()


async def busy_sibling(runtime: ks.Runtime, counter: list[int]) -> None:
    async with runtime.session("busy-sibling") as s:
        s.start_soon(burn, counter, tool="burn")
        await anyio.sleep_forever()


def poller_main(url: str) -> int:
    """The HTTP load (a child process): GET /api/sessions back to back until stdin closes."""
    token = os.environ[POLL_TOKEN_ENV]
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    auth = {"Authorization": f"Bearer {token}"}
    ok = errors = 0
    t0 = time.monotonic()
    while not stop.is_set():
        try:
            conn.request("GET", "/api/sessions", headers=auth)
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                ok += 1
            else:
                errors += 1
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            time.sleep(0.01)
    seconds = time.monotonic() - t0
    print(json.dumps({"ok": ok, "errors": errors, "seconds": seconds}), flush=True)
    return 0


@contextlib.contextmanager
def poller(url: str, token: str) -> Iterator[dict[str, Any]]:
    """Run the HTTP poller in a child process; its counts land in the yielded dict."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env[POLL_TOKEN_ENV] = token
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--poll", url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    out: dict[str, Any] = {}
    try:
        yield out
    finally:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.close()  # the poller's signal to stop
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stdout = proc.stdout.read()
        proc.stdout.close()
        if stdout.strip():
            out.update(json.loads(stdout.strip().splitlines()[-1]))


@contextlib.contextmanager
def _no_poller() -> Iterator[dict[str, Any]]:
    yield {}


# --------------------------------------------------------------------- the run


class Run:
    """The variants of one loop's run, sharing a runtime, a server and the load."""

    def __init__(
        self,
        runtime: ks.Runtime,
        sink: ks.SqliteAudit,
        db: str,
        raw_db: sqlite3.Connection,
        client: h.ControlClient,
        pool: concurrent.futures.Executor,
    ) -> None:
        self.runtime = runtime
        self.sink = sink
        self.db = db
        self.raw_db = raw_db
        self.client = client
        self.pool = pool
        self.stamps: dict[str, dict[str, int]] = {}
        self.audit_pending = 0
        self.false_trees = 0
        self.false_threads = 0
        self.kills = 0

    def listener(self, event: ks.AuditEvent) -> None:
        """Time-stamps the process and thread planes' last events of each kill."""
        stamps = self.stamps.get(event.session_id or "")
        if stamps is None:
            return
        if event.kind == "process_exited":
            stamps["processes"] = h.now_ns()
        elif event.kind in ("thread_returned", "thread_abandoned"):
            stamps["threads"] = h.now_ns()

    async def _durable(self, report: ks.StopReport) -> None:
        """Wait until the audit is durable if the report could not say so in time."""
        if report.audit == "pending":
            self.audit_pending += 1
            status = await self.sink.flush()
            if status != "durable":
                raise KillFailed(f"audit of {report.session_id} ended {status}")

    def _count(self, report: ks.StopReport) -> None:
        trees, threads = escalations(report)
        self.false_trees += trees
        self.false_threads += threads
        self.kills += 1

    async def interrupt(self) -> dict[str, float]:
        shape = Shape(self.runtime, self.stamps)
        session = await shape.start()
        with h.gc_paused():
            t0 = h.now_ns()
            report = await session.interrupt("bench", trigger="operator", operator="bench")
            t1 = h.now_ns()
            await self._durable(report)
            t_audit = h.now_ns()
        planes = await shape.finish(report, t0, t_audit, self.db)
        self._count(report)
        return {KS_STOP: t1 - t0, **planes}

    async def http(self) -> dict[str, float]:
        loop = asyncio.get_running_loop()
        shape = Shape(self.runtime, self.stamps)
        session = await shape.start()
        with h.gc_paused():
            sample, data = await loop.run_in_executor(self.pool, self.client.kill, session.id)
        report = session.report
        if report is None or data["report"]["interrupt_id"] != report.interrupt_id:
            raise KillFailed(f"HTTP kill: no matching report ({data})")
        await self._durable(report)
        await shape.finish(report, 0, 0, self.db)  # verified; its plane times are not used
        self._count(report)
        return {KS_HTTP: float(sample)}

    async def raw(self) -> dict[str, float]:
        tasks = await h.raw_kill(N_CALLS)
        with h.gc_paused():
            trees = await raw_trees(GRACE)
        with h.gc_paused():
            threads = await raw_threads(GRACE)
        with h.gc_paused():
            commit = raw_commit(self.raw_db)
        with h.gc_paused():
            commit_thread = await raw_commit_in_thread(self.raw_db)
        if my_zombies():
            raise KillFailed(f"raw floor left zombies: {my_zombies()}")
        return {
            RAW_TASKS: tasks,
            RAW_TREES: trees,
            RAW_THREADS: threads,
            RAW_SQLITE: commit,
            RAW_SQLITE_THREAD: commit_thread,
            RAW_SUM: tasks + trees + threads + commit,
            RAW_CRITICAL: max(tasks, trees, threads) + commit,
        }


async def interleave_multi(
    variants: dict[str, Callable[[], Awaitable[dict[str, float]]]],
    *,
    reps: int,
    warmup: int,
) -> dict[str, list[float]]:
    """:func:`_harness.interleave` for variants that return several named measures."""
    out: dict[str, list[float]] = {}
    for i, order in enumerate(h.rotations(list(variants), warmup + reps)):
        for name in order:
            measures = await variants[name]()
            if i >= warmup:
                for key, value in measures.items():
                    out.setdefault(key, []).append(value)
    return out


LOADS = ("full", "cpu", "http", "none")


async def bench(
    loop: str, reps: int, warmup: int, load_kind: str
) -> tuple[list[h.Row], dict[str, Any]]:
    """One loop's run: runtime with audit, control plane, load; the kills and floors."""
    from kill_switch import control

    op_token, op_entry = control.new_token("operator", "bench-operator")
    view_token, view_entry = control.new_token("viewer", "bench-poller")
    burned = [0]
    with (
        tempfile.TemporaryDirectory(prefix="kill_switch-e2e-") as tmp,
        concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="client") as pool,
        contextlib.closing(raw_sqlite_open(os.path.join(tmp, "raw.db"))) as raw_db,
    ):
        db = os.path.join(tmp, "audit.db")
        sink = ks.SqliteAudit(db)
        async with (
            ks.Runtime(audit=sink, policy=POLICY) as runtime,
            control.serve(runtime, tokens=[op_entry, view_entry]) as server,
        ):
            client = h.ControlClient(server.url, op_token)
            run = Run(runtime, sink, db, raw_db, client, pool)
            remove = runtime.add_listener(run.listener)
            sibling = None
            if load_kind in ("full", "cpu"):
                sibling = asyncio.get_running_loop().create_task(busy_sibling(runtime, burned))
            http_load = load_kind in ("full", "http")
            try:
                with poller(server.url, view_token) if http_load else _no_poller() as polls:
                    t0 = time.monotonic()
                    await h.until(lambda: burned[0] > 0 or sibling is None)
                    samples = await interleave_multi(
                        {"interrupt": run.interrupt, "http": run.http, "raw": run.raw},
                        reps=reps,
                        warmup=warmup,
                    )
                    seconds = time.monotonic() - t0
                    slices = burned[0]
            finally:
                remove()
                client.close()
                runtime.interrupt_all("bench done", trigger="shutdown")
                if sibling is not None:
                    await sibling
    load = {
        "load": load_kind,
        "http_polls_per_s": polls.get("ok", 0) / max(polls.get("seconds", 1.0), 1e-9),
        "http_poll_errors": polls.get("errors"),
        "busy_slices_per_s": slices / seconds,
        "kills_verified": run.kills,
        "audit_pending_in_report": run.audit_pending,
        "false_escalations_trees": run.false_trees,
        "false_escalations_threads": run.false_threads,
    }
    if http_load and polls.get("ok", 0) == 0:
        raise KillFailed(f"the HTTP poller made no request: {polls}")
    return rows_for(loop, samples, load), load


def rows_for(loop: str, samples: dict[str, list[float]], load: dict[str, Any]) -> list[h.Row]:
    """Rows with ratios to their raw floors, and the targets checked."""
    st = {k: h.summarize(v) for k, v in samples.items()}
    floor_sum = (RAW_SUM, st[RAW_SUM])
    baselines = {
        KS_STOP: floor_sum,
        KS_HTTP: floor_sum,
        KS_TOOLS: (RAW_TASKS, st[RAW_TASKS]),
        KS_PROCS: (RAW_TREES, st[RAW_TREES]),
        KS_THREADS: (RAW_THREADS, st[RAW_THREADS]),
        KS_AUDIT: floor_sum,
    }
    rows = []
    for name, (case, baseline) in {
        KS_STOP: ("kill (b)", baselines[KS_STOP]),
        KS_HTTP: ("kill (c)", baselines[KS_HTTP]),
        KS_TOOLS: ("plane quiet (a)", baselines[KS_TOOLS]),
        KS_PROCS: ("plane quiet (a)", baselines[KS_PROCS]),
        KS_THREADS: ("plane quiet (a)", baselines[KS_THREADS]),
        KS_AUDIT: ("plane quiet (a)", baselines[KS_AUDIT]),
    }.items():
        row = h.make_row(
            NAME,
            case,
            name,
            loop,
            N_CALLS,
            st[name],
            baseline=baseline,
            p95_ns=h.percentile(samples[name], 95),
            max_ns=max(samples[name]),
            critical_path_p50_ns=st[RAW_CRITICAL].p50,
            ratio_p50_critical_path=st[name].p50 / st[RAW_CRITICAL].p50,
            grace_s=GRACE,
        )
        if name == KS_STOP:
            met_p99 = st[name].p99 <= TARGET_P99_NS
            met_ratio = st[name].p50 <= TARGET_RATIO * st[RAW_SUM].p50
            row.target = "p99 ≤ 50 ms; p50 ≤ 2x raw floor sum"
            row.met = met_p99 and met_ratio
            row.extra.update(met_p99=met_p99, met_ratio=met_ratio, load=load)
        rows.append(row)
    raws = (RAW_TASKS, RAW_TREES, RAW_THREADS, RAW_SQLITE, RAW_SQLITE_THREAD, RAW_SUM, RAW_CRITICAL)
    for name in raws:
        rows.append(
            h.make_row(
                NAME,
                "raw floor",
                name,
                loop,
                None,
                st[name],
                p95_ns=h.percentile(samples[name], 95),
                max_ns=max(samples[name]),
            )
        )
    return rows


def markdown(rows: list[h.Row]) -> str:
    """The kill_switch rows as a markdown table: p50/p95/p99/max beside the floor."""
    out = [
        "| loop | measure | p50 | p95 | p99 | max | raw floor p50 (which) | x p50 | target |",
        "|---|---|---:|---:|---:|---:|---|---:|---|",
    ]
    raw = {(r.loop, r.variant): r for r in rows if r.case == "raw floor"}
    for r in rows:
        if r.case == "raw floor":
            continue
        base = raw.get((r.loop, r.baseline or ""))
        target = f"{r.target}: **{'met' if r.met else 'MISSED'}**" if r.target else ""
        out.append(
            f"| {r.loop} | {r.variant} | {h.fmt_value(r.p50_ns)} "
            f"| {h.fmt_value(r.extra['p95_ns'])} | {h.fmt_value(r.p99_ns)} "
            f"| {h.fmt_value(r.extra['max_ns'])} "
            f"| {h.fmt_value(base.p50_ns if base else None)} ({r.baseline}) "
            f"| {h.fmt_ratio(r.ratio_p50)} | {target} |"
        )
    for r in rows:
        if r.case == "raw floor":
            out.append(
                f"| {r.loop} | {r.variant} | {h.fmt_value(r.p50_ns)} "
                f"| {h.fmt_value(r.extra['p95_ns'])} | {h.fmt_value(r.p99_ns)} "
                f"| {h.fmt_value(r.extra['max_ns'])} | | | |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = h.make_parser(__doc__)
    parser.add_argument("--reps", type=int, help="kills per variant (default 200; 2 with --quick)")
    parser.add_argument(
        "--load",
        choices=LOADS,
        default="full",
        help="the load: CPU-busy sibling and HTTP poller (full, the default), one of them, "
        "or none (a diagnostic: the targets are stated under full load)",
    )
    parser.add_argument("--poll", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.poll:
        return poller_main(args.poll)
    reps = args.reps or (2 if args.quick else 200)
    warmup = 1 if args.quick else 5
    env = h.environment()
    print(f"end-to-end kill under load, {reps} kills per variant   [{h.environment_line(env)}]")
    warnings.simplefilter("ignore", ks.EscalationWarning)  # expected: one tree per kill
    rows: list[h.Row] = []
    loads: dict[str, Any] = {}
    for loop in h.parse_loops(args.loops):
        new, loads[loop] = h.run_on(loop, bench, loop, reps, warmup, args.load)
        h.print_table(new, f"{loop}: load {loads[loop]}")
        rows += new
    h.print_table(rows, "end-to-end summary")
    print("\n" + markdown(rows))
    if args.json:
        h.write_json(args.json, NAME, rows, quick=args.quick, grace_s=GRACE, load=loads)
    if args.load != "full":
        print(f"\nnote: --load {args.load}: the targets are stated under full load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
