"""The kill drill: it passes on a clean stop, and each of its checks fails on the fault it
exists to catch (negative controls: a leaked subprocess, a leaked task, a zombie, an
unlisted thread, a model call after the kill, a missing audit row)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import pytest

import kill_switch as ks
from kill_switch import DrillObjectives, DrillShape, _drill, _drill_results, drill, run_drills
from kill_switch._planes import _subreaper as subreaper

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.filterwarnings("ignore::kill_switch.EscalationWarning")

FAST = DrillShape(calls=5, processes=1, threads=1, blocking_threads=1, stop_timeout=1.0)


def failed(result: _drill_results.DrillResult) -> set[str]:
    return {c.name for c in result.failures}


# ------------------------------------------------------------------ the drill


@pytest.mark.both_loops
async def test_clean_sessions_pass_every_check(tmp_path: Path) -> None:
    """Synthetic sessions with every plane stop and leave nothing: every check passes."""
    async with ks.Runtime(audit=str(tmp_path / "audit.db")) as runtime:
        summary = await run_drills(runtime, runs=3, shape=FAST)
    assert summary.ok, summary.summary()
    for result in summary.results:
        assert [c.name for c in result.checks] == list(_drill_results.CHECKS)
        assert not any(c.skipped for c in result.checks)
        assert result.latency is not None
        assert result.quiesced is not None
        assert result.report is not None
        assert result.report.trigger == "operator"
        assert [t.outcome for t in result.report.threads].count("abandoned") == 1
        # The blocking thread still runs: the report is honest, not "stopped".
        assert result.report.outcome == "unresponsive"
        assert not result.report.quiescent
    assert "PASS" in summary.summary()


@pytest.mark.both_loops
async def test_clean_agent_loop_makes_no_model_call_after_the_kill(tmp_path: Path) -> None:
    """The synthetic session's agent loop (guarded like the integrations) is parked in its
    tool at the kill and never calls the model again: ``model`` passes, from the drill's
    own record of the calls."""
    async with ks.Runtime(audit=str(tmp_path / "audit.db")) as runtime:
        summary = await run_drills(runtime, runs=3, shape=FAST)
    assert summary.ok, summary.summary()
    for result in summary.results:
        (check,) = [c for c in result.checks if c.name == "model"]
        assert check.ok
        assert not check.skipped
        # Three model calls before the kill (two quick tool results, then the parked one).
        assert "no model call after the interrupt (3 before it)" in check.detail


async def one_leaky_run(tmp_path: Path, shape: DrillShape) -> _drill_results.DrillResult:
    """One drill run of *shape* (a deliberate leak): it must fail."""
    async with ks.Runtime(audit=str(tmp_path / "audit.db")) as runtime:
        summary = await run_drills(
            runtime, runs=1, shape=shape, objectives=DrillObjectives(quiesce_ms=200)
        )
    (result,) = summary.results
    assert not summary.ok
    return result


async def test_leaked_subprocess_fails_the_drill(tmp_path: Path) -> None:
    """A process spawned behind the runtime's back survives the stop: the drill fails on
    ``processes``, naming it — although the StopReport itself says quiescent."""
    result = await one_leaky_run(tmp_path, attrs.evolve(FAST, leak=("process",)))
    assert failed(result) == {"processes"}
    assert result.report is not None
    # The report alone would have passed: only its named blocking thread is left.
    assert [t.running for t in result.report.threads if t.outcome == "abandoned"] == [True]
    assert result.report.latency.quiescent is not None
    detail = next(c.detail for c in result.checks if c.name == "processes")
    assert "sleep 300" in detail
    assert "untracked" in detail


async def test_an_orphaned_grandchild_fails_the_drill(tmp_path: Path) -> None:
    """A daemon's double fork behind the runtime's back: its grandchild, reparented to
    the drill (a child subreaper while it runs), fails ``processes``."""
    result = await one_leaky_run(tmp_path, attrs.evolve(FAST, leak=("orphan",)))
    assert failed(result) == {"processes"}
    detail = next(c.detail for c in result.checks if c.name == "processes")
    assert "sleep 300" in detail
    assert not subreaper.is_subreaper()  # restored after the drill


async def test_negative_control_without_the_subreaper_the_orphan_is_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the subreaper the orphan goes to PID 1, out of this process's tree: the
    drill passes while it runs (what the subreaper is for)."""
    monkeypatch.setattr(_drill, "subreaper", lambda: contextlib.nullcontext(False))
    async with ks.Runtime(audit=str(tmp_path / "audit.db")) as runtime:
        summary = await run_drills(
            runtime,
            runs=1,
            shape=attrs.evolve(FAST, leak=("orphan",)),
            objectives=DrillObjectives(quiesce_ms=200),
        )
    (result,) = summary.results
    assert "processes" not in failed(result)


async def test_leaked_pool_thread_fails_the_drill(tmp_path: Path) -> None:
    """A never-polling tool in a pool off the thread plane still writes after the report:
    the drill fails on ``threads``, having found it on the thread's stack."""
    result = await one_leaky_run(tmp_path, attrs.evolve(FAST, leak=("thread",)))
    assert "threads" in failed(result)
    (check,) = [c for c in result.checks if c.name == "threads"]
    assert "AnyIO worker thread" in check.detail


async def test_leaked_task_fails_the_drill(tmp_path: Path) -> None:
    """A task that swallows its cancellation outlives the session: the drill fails on
    ``tasks`` (and the report says not quiescent)."""
    shape = attrs.evolve(FAST, leak=("task",), stop_timeout=0.2)
    async with ks.Runtime(audit=str(tmp_path / "audit.db")) as runtime:
        summary = await run_drills(
            runtime, runs=1, shape=shape, objectives=DrillObjectives(quiesce_ms=200)
        )
    (result,) = summary.results
    assert "tasks" in failed(result)
    assert "report" in failed(result)
    detail = next(c.detail for c in result.checks if c.name == "tasks")
    assert "_stubborn_task" in detail
    # The stop that did not complete is audited as escalated; the audit check holds.
    assert "audit" not in failed(result)


async def test_a_model_call_after_the_kill_fails_the_drill(tmp_path: Path) -> None:
    """The agent loop outside the session's block, in a framework whose catch-all turns
    the kill into tool-error text and that does not guard the model request: it calls the
    model once more after the kill. Only ``model`` fails: every other check, the report
    included, passes — the model check, not chance, catches it."""
    result = await one_leaky_run(tmp_path, attrs.evolve(FAST, leak=("model",)))
    assert failed(result) == {"model"}, result.summary()
    detail = next(c.detail for c in result.checks if c.name == "model")
    assert "1 model call(s) started after the interrupt was requested" in detail
    assert result.report is not None
    assert not result.report.leaked_tasks
    assert not result.report.swept_tasks


async def test_model_check_reads_only_the_drills_own_record() -> None:
    """The check looks at the drill's record of model calls and the agent loop's end:
    a call at the kill's own clock reading counts as after it; a loop still running
    fails; without a record (a user's session) it is skipped, saying why."""
    agent = _drill._Agent()
    agent.calls.extend([1.0, 2.0])
    agent.done.set()
    assert _drill._check_model(agent, 2.5).ok
    assert not _drill._check_model(agent, 2.0).ok  # started at the kill: after it
    running = _drill._Agent()
    assert not _drill._check_model(running, 0.0).ok
    skipped = _drill._check_model(None, 0.0)
    assert skipped.ok
    assert skipped.skipped
    assert "no record of its model calls" in skipped.detail


async def test_untracked_off_does_not_see_a_leaked_subprocess(tmp_path: Path) -> None:
    """Negative control of the ``untracked`` rule: without it, the same leak goes unseen —
    the rule, not chance, is what catches it."""
    leftovers = _drill._Leftovers()
    shape = attrs.evolve(FAST, leak=("process",))
    try:
        async with ks.Runtime() as runtime, anyio.create_task_group() as tg:
            session = await tg.start(
                _drill._synthetic, runtime, shape, 0, leftovers, _drill._Agent()
            )
            result = await drill(session, quiesce_within=0.1, untracked=False)
            tg.cancel_scope.cancel()
    finally:
        pid = leftovers.popens[0].pid
        was_alive = leftovers.popens[0].poll() is None
        _drill._clean_leftovers(leftovers)
    assert was_alive
    assert result.ok, result.summary()
    assert str(pid) not in json.dumps(result.to_json())


async def test_zombie_child_fails_the_drill() -> None:
    """A child the session's tool killed but never reaped is a zombie of this process: the
    drill fails on ``zombies``."""
    popen: list[subprocess.Popen[bytes]] = []

    def spawn_and_forget() -> None:
        p = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL)
        popen.append(p)
        os.kill(p.pid, signal.SIGKILL)  # dead, not waited for: a zombie

    try:
        async with ks.Runtime() as runtime, anyio.create_task_group() as tg:

            async def agent(*, task_status: anyio.abc.TaskStatus[ks.Session]) -> None:
                async with runtime.session("zombie-maker") as session:
                    await session.run_sync(spawn_and_forget)
                    task_status.started(session)
                    await anyio.sleep_forever()

            session = await tg.start(agent)
            result = await drill(session, quiesce_within=0.1)
            tg.cancel_scope.cancel()
    finally:
        for p in popen:
            p.wait()
    assert failed(result) == {"zombies"}, result.summary()
    assert str(popen[0].pid) in next(c.detail for c in result.checks if c.name == "zombies")


async def test_thread_not_listed_as_abandoned_fails() -> None:
    """A session thread still running must be in the report as abandoned: the same thread
    with the report's list emptied fails the ``threads`` check."""
    release = threading.Event()
    started = threading.Event()

    def blocking() -> None:
        started.set()
        release.wait(30)

    async with ks.Runtime() as runtime, anyio.create_task_group() as tg:
        policy = ks.StopPolicy(thread_grace=0.01)

        async def agent(*, task_status: anyio.abc.TaskStatus[ks.Session]) -> None:
            async with runtime.session("blocker", policy=policy) as session:
                session.start_soon(session.run_sync, blocking)
                task_status.started(session)
                await anyio.sleep_forever()

        session = await tg.start(agent)
        try:
            assert await anyio.to_thread.run_sync(started.wait, 30)
            result = await drill(session, quiesce_within=0.1)
            assert result.ok, result.summary()
            assert result.report is not None
            hidden = attrs.evolve(result.report, threads=())
            check = _drill._check_threads(session, hidden)
        finally:
            release.set()
            tg.cancel_scope.cancel()
    assert not check.ok
    assert "not on its thread plane as abandoned" in check.detail


async def test_missing_audit_row_and_tampered_chain_fail(tmp_path: Path) -> None:
    """The audit check fails for an interrupt the log does not hold, and for a log whose
    chain no longer verifies."""
    db = str(tmp_path / "audit.db")
    async with ks.Runtime(audit=db) as runtime:
        summary = await run_drills(runtime, runs=1, shape=DrillShape(processes=0, threads=0))
    (result,) = summary.results
    assert result.ok, result.summary()
    assert result.report is not None
    other = attrs.evolve(result.report, interrupt_id="0" * 32)
    missing = _drill._check_audit(db, other, verify_chain=False)
    assert not missing.ok
    assert "no interrupt_completed, interrupt_requested row" in missing.detail
    with sqlite3.connect(db) as conn:  # tamper: bypass the append-only triggers
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]
        for name in names:
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute(
            "UPDATE events SET reason = 'nothing to see' WHERE kind = 'interrupt_requested'"
        )
    tampered = _drill._check_audit(db, result.report, verify_chain=True)
    assert not tampered.ok
    assert "chain" in tampered.detail


async def test_drill_of_a_user_session_with_a_process_tree() -> None:
    """``drill()`` on an ordinary session: the tree is gone, the report arrives, it passes."""
    async with ks.Runtime() as runtime, anyio.create_task_group() as tg:

        async def agent(*, task_status: anyio.abc.TaskStatus[ks.Session]) -> None:
            async with runtime.session("builder", policy=ks.StopPolicy(term_grace=0.05)) as s:
                proc = await s.open_process(
                    ["sh", "-c", "sleep 300 & echo ready; wait"], stdin=None, stderr=None
                )
                assert proc.stdout is not None
                await proc.stdout.receive()
                task_status.started(s)
                await anyio.sleep_forever()

        session = await tg.start(agent)
        result = await drill(session)
    assert result.ok, result.summary()
    assert result.report is not None
    assert len(result.report.processes) == 1
    audit = next(c for c in result.checks if c.name == "audit")
    assert audit.skipped  # no SQLite log to read: said, not silently passed
    model = next(c for c in result.checks if c.name == "model")
    assert model.skipped  # the drill did not run this agent: said, not claimed


async def test_objectives_are_judged_on_measured_latency(tmp_path: Path) -> None:
    """An objective no real stop can meet fails the series; a generous one passes."""
    async with ks.Runtime() as runtime:
        summary = await run_drills(runtime, runs=2, shape=DrillShape(processes=0, threads=0))
    strict = _drill.summarize(summary.results, DrillObjectives(p99_ms=1e-6))
    loose = _drill.summarize(summary.results, DrillObjectives(p99_ms=60_000, p50_ms=60_000))
    assert not strict.ok
    assert [v.ok for v in strict.verdicts if v.name.startswith("p99")] == [False]
    assert loose.ok


def test_bad_arguments_are_refused() -> None:
    """Shapes and objectives are validated at construction with clear errors."""
    with pytest.raises(ValueError, match="calls"):
        DrillShape(calls=-1)
    with pytest.raises(TypeError, match="threads"):
        DrillShape(threads=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown leak"):
        DrillShape(leak=("memory",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="p99_ms"):
        DrillObjectives(p99_ms=float("nan"))
    with pytest.raises(ValueError, match="quiesce_ms"):
        DrillObjectives(quiesce_ms=0)


async def test_drill_refuses_what_it_cannot_drill() -> None:
    """Not a session: TypeError; a session that already finished: RuntimeError."""
    with pytest.raises(TypeError, match="Session"):
        await drill("not a session")  # type: ignore[arg-type]
    async with ks.Runtime() as runtime:
        async with runtime.session("done") as session:
            pass
        with pytest.raises(RuntimeError, match="finished"):
            await drill(session)
        async with ks.Runtime() as runtime2:
            with pytest.raises(ValueError, match="runs"):
                await run_drills(runtime2, runs=0)


def test_histogram_rows() -> None:
    """Latencies land in 1-2-5 buckets; empty edge buckets are dropped."""
    rows = _drill_results.histogram([3.0, 4.0, 12.0, 700.0])
    assert rows[0].strip().startswith("2-5 ms")
    assert rows[-1].strip().startswith("500-1000 ms")
    assert rows[0].endswith(" 2")
    assert _drill_results.histogram([]) == []


# --------------------------------------------------------------------- CLI


def _cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kill_switch", "drill", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_cli_passes_and_prints_json() -> None:
    """``kill-switch drill --json`` exits 0 with every run passing."""
    proc = _cli("--runs", "3", "--blocking-threads", "1", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is True
    assert data["passed"] == 3
    assert set(data["latency_ms"]) == {"p50", "p95", "p99", "max"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("leak", "check"),
    [("process", "processes"), ("orphan", "processes"), ("task", "tasks"), ("model", "model")],
)
def test_cli_fails_on_an_injected_leak(leak: str, check: str) -> None:
    """``--inject`` plants the fault; the drill exits 1 and names the check that caught it."""
    proc = _cli("--runs", "1", "--inject", leak, "--quiesce-ms", "200")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "kill drill: FAIL" in proc.stdout
    assert f"{check}:" in proc.stdout


@pytest.mark.slow
def test_cli_fails_an_objective_it_cannot_meet() -> None:
    """An unmeetable ``--p99-ms`` exits 1 with the verdict."""
    proc = _cli("--runs", "2", "--processes", "0", "--p99-ms", "0.000001")
    assert proc.returncode == 1
    assert "[FAIL] p99" in proc.stdout


@pytest.mark.parametrize(
    "argv",
    [["--runs", "0"], ["--p99-ms", "nan"], ["--calls", "-1"], ["--inject", "memory"]],
)
def test_cli_usage_errors(argv: list[str]) -> None:
    """Bad arguments exit 2 with a message, and run nothing."""
    proc = _cli(*argv)
    assert proc.returncode == 2
    assert "error" in proc.stderr


# ------------------------------------------------------------- live session


async def test_cli_drills_a_live_session_through_the_control_plane(tmp_path: Path) -> None:
    """``kill-switch drill --session`` kills over HTTP and checks the report's pids on this
    host and the audit log through the API; an unknown session is refused (exit 1); an
    unreachable control plane exits 3."""
    control = pytest.importorskip("kill_switch.control")
    token, entry = control.new_token("operator", "drill-operator")
    pids: list[int] = []
    async with (
        ks.Runtime(audit=str(tmp_path / "audit.db")) as runtime,
        control.serve(runtime, tokens=[entry]) as server,
        anyio.create_task_group() as tg,
    ):

        async def agent(*, task_status: anyio.abc.TaskStatus[ks.Session]) -> None:
            async with runtime.session("remote", policy=ks.StopPolicy(term_grace=0.05)) as s:
                proc = await s.open_process(
                    ["sh", "-c", "sleep 300 & echo $!; wait"], stdin=None, stderr=None
                )
                assert proc.stdout is not None
                pids.extend([proc.pid, int((await proc.stdout.receive()).split()[0])])
                task_status.started(s)
                await anyio.sleep_forever()

        session = await tg.start(agent)
        env = {"KILL_SWITCH_URL": server.url, "KILL_SWITCH_TOKEN": token}
        done = await anyio.to_thread.run_sync(
            lambda: _cli("--session", session.id, "--json", env=env)
        )
        unknown = await anyio.to_thread.run_sync(lambda: _cli("--session", "f" * 32, env=env))
        tg.cancel_scope.cancel()
    assert done.returncode == 0, done.stdout + done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    (result,) = data["results"]
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["processes"]["ok"]
    assert checks["audit"]["ok"]
    assert not checks["audit"]["skipped"]
    # Model calls happen in the other process: not seen from here, and said so.
    assert checks["model"]["skipped"]
    assert "cannot be seen from here" in checks["model"]["detail"]
    assert not [p for p in pids if _running(p)]
    assert unknown.returncode == 1
    assert "404" in unknown.stderr
    gone = _cli("--session", "f" * 32, "--url", "http://127.0.0.1:9", "--token", "x")
    assert gone.returncode == 3


def _running(pid: int) -> bool:
    """The pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
