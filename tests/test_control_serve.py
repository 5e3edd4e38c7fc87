"""`kill-switch serve`, the benchmark's smoke run, and a kill under load (FAULT 55)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import pytest

from tests.test_control_api import ENTRIES, TOKENS, auth, harness, park

if TYPE_CHECKING:
    import kill_switch as ks

ROOT = Path(__file__).resolve().parent.parent


def test_serve_runs_until_sigterm_and_refuses_to_run_open(tmp_path: Path) -> None:
    """`serve --port 0` prints its URL, answers, and exits 0 on SIGTERM; with no token
    configured it refuses to start (exit 2)."""
    env = {**os.environ, "KILL_SWITCH_TOKENS": ",".join(e.line() for e in ENTRIES)}
    cmd = [sys.executable, "-m", "kill_switch", "serve", "--port", "0"]
    with subprocess.Popen(
        [*cmd, "--audit-db", str(tmp_path / "a.db")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            url = line.split(" at ", 1)[1].split("/ ", 1)[0]
            assert url.startswith("http://127.0.0.1:")
            req = urllib.request.Request(f"{url}/api/sessions", headers=auth("viewer"))
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200
                assert json.loads(r.read())["count"] == 0
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    bare = {k: v for k, v in os.environ.items() if k != "KILL_SWITCH_TOKENS"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=bare, timeout=60)
    assert done.returncode == 2
    assert "no token configured" in done.stderr


def test_benchmark_quick_run_writes_json(tmp_path: Path) -> None:
    """`bench_control.py --quick` exits 0 and writes rows with the target checked."""
    out = tmp_path / "control.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_control.py"),
            "--quick",
            "--loops",
            "asyncio",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "control"
    http_rows = [r for r in data["rows"] if r["variant"].startswith("HTTP POST kill")]
    assert len(http_rows) == 1
    assert http_rows[0]["met"] in (True, False)


async def saturated_agent(
    runtime: ks.Runtime,
    *,
    task_status: anyio.abc.TaskStatus[ks.Session] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """100 parked tool calls, 20 process trees, and a body that keeps the loop busy."""
    async with runtime.session("hog") as session:
        for _ in range(100):
            session.start_soon(park, tool="park")
        null = subprocess.DEVNULL
        for _ in range(20):
            await session.open_process(
                ["sh", "-c", "sleep 60 & sleep 60 & wait"], stdin=null, stdout=null, stderr=null
            )
        task_status.started(session)
        while True:  # CPU-bound: yields to the loop only between slices of work
            sum(i * i for i in range(20_000))
            await anyio.lowlevel.checkpoint()


@pytest.mark.slow
async def test_kill_under_load_reaps_every_process(tmp_path: Path) -> None:
    """FAULT 55: a CPU-hogging agent with 100 tool calls and 20 process trees is killed
    over HTTP; the report is quiescent and every process was reaped."""
    async with harness(tmp_path) as h, anyio.create_task_group() as tg:
        s = await tg.start(saturated_agent, h.runtime)
        r = await h.client.post(
            f"/api/sessions/{s.id}/kill", json={"reason": "load"}, headers=auth("operator")
        )
        assert r.status_code == 200, r.text
        report = r.json()["report"]
        assert report["quiescent"] is True
        assert report["outcome"] == "stopped"
        assert report["tool_calls_cancelled"] >= 100
        procs = report["processes"]
        assert len(procs) >= 20
        assert all(p["returncode"] is not None and not p["survived"] for p in procs)
        for p in procs:
            with pytest.raises(ProcessLookupError):
                os.kill(p["pid"], 0)
    assert TOKENS  # the module's tokens were used, never a real one
