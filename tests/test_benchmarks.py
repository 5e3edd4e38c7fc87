"""Smoke tests of the benchmark scripts: each runs with ``--quick`` and writes its JSON.

No timing assertions: timing claims belong to the benchmarks' own output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from .redis_server import needs

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [
    "bench_fanout",
    "bench_interrupt",
    "bench_guard",
    "bench_scale",
    "bench_integrations",
    "bench_stop_path",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {
    "benchmark",
    "case",
    "variant",
    "loop",
    "n",
    "p50_ns",
    "p99_ns",
    "samples",
    "unit",
    "baseline",
    "ratio_p50",
    "ratio_p99",
    "target",
    "met",
    "extra",
}

pytestmark = pytest.mark.slow


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _check_results(out: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    assert data["benchmark"] == name.removeprefix("bench_")
    assert data["quick"] is True
    assert {"python", "anyio", "uvloop", "cpu", "date"} <= set(data["environment"])
    assert data["rows"]
    for row in data["rows"]:
        assert set(row) >= ROW_KEYS, set(row) ^ ROW_KEYS
    assert {row["loop"] for row in data["rows"]} == {"asyncio", "uvloop"}
    return data


@pytest.mark.timeout(360)
@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_run_writes_json(name: str, tmp_path: Path) -> None:
    """A ``--quick`` run exits 0 and writes results with the harness's keys."""
    out = tmp_path / f"{name}.json"
    proc = _run([str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--json", str(out)], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_results(out, name)


@pytest.mark.timeout(360)
def test_e2e_quick_run_kills_and_verifies(tmp_path: Path) -> None:
    """``bench_e2e --quick`` kills, verifies every kill and writes its results.

    With the HTTP poller but not the CPU-burning sibling: under that load an audit flush
    can take tens of seconds on a shared machine, which a smoke test must not depend on.
    """
    out = tmp_path / "bench_e2e.json"
    script = str(ROOT / "benchmarks" / "bench_e2e.py")
    proc = _run([script, "--quick", "--load", "http", "--json", str(out)], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = _check_results(out, "bench_e2e")
    assert {"raw floor sum", "interrupt → StopReport"} <= {r["variant"] for r in data["rows"]}
    targeted = {r["variant"] for r in data["rows"] if r["target"]}
    assert {
        "interrupt → StopReport",
        "interrupt → processes reaped",
        "interrupt → threads back/abandoned",
        "audit ack: last event → durable",
    } <= targeted
    assert {"raw critical path", "no load: raw critical path"} <= {
        r["variant"] for r in data["rows"]
    }
    for load in data["load"].values():
        assert load["kills_verified"] > 0
        assert load["http_polls_per_s"] > 0
        assert load["book_stopped_sessions"][0] >= 900  # filled before the first kill


@pytest.mark.timeout(360)
def test_scaling_quick_run_writes_json_and_plot(tmp_path: Path) -> None:
    """``bench_scaling --quick --plot PATH`` writes its results and the PNG to PATH."""
    out = tmp_path / "bench_scaling.json"
    png = tmp_path / "plots" / "kill_latency.png"
    script = str(ROOT / "benchmarks" / "bench_scaling.py")
    proc = _run([script, "--quick", "--json", str(out), "--plot", str(png)], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = _check_results(out, "bench_scaling")
    assert data["plot"] == str(png)
    assert {row["case"] for row in data["rows"]} == {"kill vs tool calls", "kill vs sessions"}
    assert png.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.timeout(360)
def test_scaling_quick_plot_defaults_beside_the_json(tmp_path: Path) -> None:
    """A ``--quick`` run without ``--plot`` never replaces the committed figure."""
    out = tmp_path / "bench_scaling.json"
    script = str(ROOT / "benchmarks" / "bench_scaling.py")
    proc = _run([script, "--quick", "--loops", "asyncio", "--json", str(out)], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "kill_latency.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.timeout(360)
@needs("redis-server")
def test_fleet_quick_run_kills_across_processes(tmp_path: Path) -> None:
    """``bench_fleet --quick`` runs its redis-server and workers and writes its results."""
    pytest.importorskip("redis")
    out = tmp_path / "bench_fleet.json"
    proc = _run([str(ROOT / "benchmarks" / "bench_fleet.py"), "--quick", "--json", str(out)], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = _check_results(out, "bench_fleet")
    assert {r["case"] for r in data["rows"]} == {
        "fleet kill → StopReport",
        "kill_where(all) → every report",
        "inventory",
    }


@pytest.mark.timeout(120)
def test_scaling_without_matplotlib_says_so(tmp_path: Path) -> None:
    """Without matplotlib, bench_scaling exits 2 with a clear message, not a traceback."""
    script = ROOT / "benchmarks" / "bench_scaling.py"
    code = (
        "import runpy, sys; sys.modules['matplotlib'] = None; "
        f"sys.argv = [{str(script)!r}, '--quick', '--plot', {str(tmp_path / 'x.png')!r}]; "
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    proc = _run(["-c", code], 100)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "matplotlib" in proc.stderr
    assert ".[bench]" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.timeout(360)
def test_run_all_as_module_runs_a_named_script(tmp_path: Path) -> None:
    """``python -m benchmarks.run_all --quick --only guard`` runs it and prints the table."""
    proc = _run(
        ["-m", "benchmarks.run_all", "--quick", "--only", "guard", "--results", str(tmp_path)],
        300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "combined results" in proc.stdout
    assert json.loads((tmp_path / "bench_guard.json").read_text(encoding="utf-8"))["rows"]


@pytest.mark.timeout(360)
def test_control_soak_quick_run_kills_under_the_load(tmp_path: Path) -> None:
    """``bench_control_soak --quick`` kills with the hostile load on and off, and says
    what the load did (no timing assertion)."""
    out = tmp_path / "bench_control_soak.json"
    script = str(ROOT / "benchmarks" / "bench_control_soak.py")
    proc = _run([script, "--quick", "--json", str(out)], 300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = _check_results(out, "bench_control_soak")
    loaded = [r for r in data["rows"] if r["variant"] == "HTTP kill, soak load"]
    assert len(loaded) == 2
    for row in loaded:
        assert row["baseline"] == "HTTP kill, quiet"
        assert row["extra"]["sockets_held"] == 200
        assert row["extra"]["flood_requests"] > 0


def test_syscall_counter_counts_only_its_thread() -> None:
    """The kernel-counted system calls of a thread: exactly its own, not another's."""
    from benchmarks._harness import SyscallCounter

    counter, why = SyscallCounter.open(threading.get_native_id(), ["close", "openat"])
    if counter is None:
        pytest.skip(f"system calls cannot be counted here: {why}")

    def open_close(n: int) -> None:
        for _ in range(n):
            os.close(os.open(os.devnull, os.O_RDONLY))

    try:
        other = threading.Thread(target=open_close, args=(7,))
        before = counter.read()
        open_close(5)
        other.start()  # negative control: its 7 closes are not this thread's
        other.join()
        after = counter.read()
    finally:
        counter.close()
    calls = counter.delta(before, after)
    assert (calls["close"], calls["openat"]) == (5, 5)
    assert calls["all"] >= 10


def test_e2e_counts_an_orphaned_zombie_as_gone_but_not_a_child() -> None:
    """bench_e2e's check: an exited orphan (init reaps it later) is gone; an unreaped
    child of the bench, or a running orphan, is not."""
    from benchmarks.bench_e2e import alive, my_zombies

    child = subprocess.Popen(["true"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    assert alive(child.pid) == "Z"
    assert child.pid in my_zombies()
    child.wait()
    assert alive(child.pid) is None
    shell = subprocess.run(
        ["sh", "-c", "sleep 1 >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = int(shell.stdout)
    assert alive(orphan) not in (None, "Z")  # running: not gone
    deadline = time.monotonic() + 10.0
    while alive(orphan) is not None and time.monotonic() < deadline:
        time.sleep(0.05)  # the orphan's own 1 s sleep; nothing to wait on for a non-child
    assert alive(orphan) is None
