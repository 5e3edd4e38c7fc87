"""The ``kill-switch`` command: the demo runs end to end and leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kill_switch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KILL_SWITCH_AUDIT_DB": ""},
    )


# The demo's tests run the real command in a child process with a marker in its
# environment: every process the fleet starts inherits it, so "nothing survives" is
# checked from /proc, independently of what the demo reports about itself.
_MARK = "KILL_SWITCH_DEMO_TEST_MARK"
# Hides the control plane as if the server extra were not installed.
_NO_CONTROL = "import sys; sys.modules['kill_switch.control'] = None; "
_FLEET = {
    "researcher": "supervisor",
    "builder": "operator",
    "linter": "parent",
    "looper": "sentinel",
    "spender": "budget",
    "nightly": "shutdown",
}


class Demo:
    """One finished run of ``kill-switch demo``."""

    def __init__(self, result: subprocess.CompletedProcess[str], db: Path, mark: str) -> None:
        self.result = result
        self.db = db
        self.mark = mark

    @property
    def output(self) -> str:
        return self.result.stdout + self.result.stderr

    def stops(self) -> list[tuple[str, str, str | None]]:
        """(agent, trigger, operator) of every interrupt of the fleet's agents."""
        # closing(): a connection's own `with` only commits; the fd would wait for GC.
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as conn:
            rows = conn.execute(
                'SELECT agent, "trigger", operator FROM events '
                "WHERE kind = 'interrupt_requested' ORDER BY seq"
            ).fetchall()
        return [(a, t, o) for a, t, o in rows if a in _FLEET]

    def survivors(self) -> list[int]:
        """Pids of live processes that carry this run's marker."""
        needle = f"{_MARK}={self.mark}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
            except OSError:
                continue  # gone meanwhile, or not ours to read
            if needle in environ:
                found.append(int(entry))
        return found


def _demo_env(mark: str) -> dict[str, str]:
    return {**os.environ, "KILL_SWITCH_AUDIT_DB": "", _MARK: mark, "PYTHONUNBUFFERED": "1"}


def _demo_command(db: Path, prelude: str | None) -> list[str]:
    if prelude is None:
        return [sys.executable, "-m", "kill_switch", "demo", "--db", str(db)]
    code = f"{prelude}from kill_switch._cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, "demo", "--db", str(db)]


def _run_demo(tmp: Path, prelude: str | None = None) -> Demo:
    mark = uuid.uuid4().hex
    db = tmp / "demo.db"
    result = subprocess.run(
        _demo_command(db, prelude),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=120,
        env=_demo_env(mark),
    )
    return Demo(result, db, mark)


ROOT = Path(__file__).resolve().parent.parent
#: What the audit writer and SQLite may leave beside the default database.
AUDIT_FILES = {
    "kill-switch-audit.db",
    "kill-switch-audit.db-wal",
    "kill-switch-audit.db-shm",
    "kill-switch-audit.db-journal",
    "kill-switch-audit.db.head",
    "kill-switch-audit.db.spool.jsonl",
}


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


@pytest.mark.slow
def test_quick_start_demo_leaves_git_status_clean(tmp_path: Path) -> None:
    """The Quick start's demo (default database, in the checkout) writes only the audit
    log and its side files, and the repository's .gitignore covers every one of them."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".gitignore")
    _git(tmp_path, "commit", "-q", "-m", "clone")
    result = subprocess.run(
        [sys.executable, "-m", "kill_switch", "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_demo_env(uuid.uuid4().hex),  # KILL_SWITCH_AUDIT_DB empty: the default path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    left = {p.name for p in tmp_path.iterdir()} - {".git", ".gitignore"}
    assert {"kill-switch-audit.db", "kill-switch-audit.db.head"} <= left <= AUDIT_FILES, left
    assert _git(tmp_path, "status", "--porcelain") == ""
    # Negative control: without the anchor's pattern the same checkout is dirty.
    ignore = tmp_path / ".gitignore"
    ignore.write_text(ignore.read_text().replace("*.db.head\n", ""))
    assert "?? kill-switch-audit.db.head" in _git(tmp_path, "status", "--porcelain")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """One run of ``kill-switch demo`` shared by the tests that read its outcome."""
    return _run_demo(tmp_path_factory.mktemp("demo"))


@pytest.mark.slow
def test_demo_exits_zero_and_passes(demo: Demo) -> None:
    """``kill-switch demo`` exits 0 and its own verdict is a pass."""
    assert demo.result.returncode == 0, demo.output
    assert "PASS: every session stopped by its trigger" in demo.result.stdout
    assert "summarizer finished by itself" in demo.result.stdout


@pytest.mark.slow
def test_demo_stops_one_agent_per_trigger(demo: Demo) -> None:
    """The audit log holds exactly one interrupt per agent, each by its own trigger."""
    got = {agent: trigger for agent, trigger, _ in demo.stops()}
    assert len(demo.stops()) == len(_FLEET), demo.stops()
    assert got == _FLEET


@pytest.mark.slow
def test_demo_operator_kills_over_http(demo: Demo) -> None:
    """The operator's kill came through the control plane, as its token's id."""
    assert ("builder", "operator", "demo-operator") in demo.stops()
    assert ("linter", "parent", "demo-operator") in demo.stops()
    assert "POST /api/sessions/" in demo.result.stdout


@pytest.mark.slow
def test_demo_ends_with_the_drill_verdict_then_audit_verify(demo: Demo) -> None:
    """The kill drill's verdict is printed, then the audit verification, then the verdict."""
    out = demo.result.stdout
    assert "kill drill: PASS" in out, demo.output
    assert out.index("kill drill: PASS") < out.index("audit verify") < out.index("PASS: every")


@pytest.mark.slow
def test_demo_leaves_no_process_behind(demo: Demo) -> None:
    """No process the fleet started is alive once the demo has exited."""
    assert demo.result.returncode == 0, demo.output
    assert "SIGKILL" in demo.result.stdout  # the tree that ignores SIGTERM was there
    assert demo.survivors() == []


@pytest.mark.slow
def test_demo_audit_verifies_then_detects_a_changed_byte(demo: Demo, tmp_path: Path) -> None:
    """The demo's audit verifies; a changed byte in a stored reason is named by seq."""
    assert "audit verify" in demo.result.stdout
    verify = _run(["audit", "verify", "--db", str(demo.db)], tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "intact" in verify.stdout

    db = tmp_path / "copy.db"
    shutil.copy(demo.db, db)
    shutil.copy(f"{demo.db}.head", f"{db}.head")
    data = bytearray(db.read_bytes())
    at = data.find(b"SLA of")  # inside the supervisor's reason
    assert at > 0
    data[at] ^= 0x01
    db.write_bytes(bytes(data))
    tampered = _run(["audit", "verify", "--db", str(db)], tmp_path)
    assert tampered.returncode != 0
    assert "seq" in tampered.stdout + tampered.stderr


@pytest.mark.slow
def test_demo_without_control_plane_falls_back_to_interrupt(tmp_path: Path) -> None:
    """Without the control plane the demo still passes; the operator kills in-process."""
    run = _run_demo(tmp_path, prelude=_NO_CONTROL)
    assert run.result.returncode == 0, run.output
    assert "no control plane" in run.result.stdout
    assert ("builder", "operator", "ops-oncall") in run.stops()
    assert {agent: trigger for agent, trigger, _ in run.stops()} == _FLEET
    assert run.survivors() == []


@pytest.mark.slow
def test_demo_ctrl_c_stops_everything(tmp_path: Path) -> None:
    """A real Ctrl-C while the fleet runs stops every session and exits 130."""
    mark = uuid.uuid4().hex
    db = tmp_path / "demo.db"
    proc = subprocess.Popen(
        _demo_command(db, None),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_demo_env(mark),
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # the fleet runs once the operator steps in
            seen.append(line)
            if line.startswith("operator:"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run = Demo(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), db, mark)
    assert proc.returncode == 128 + signal.SIGINT, "".join(seen) + run.output
    assert "stopped by SIGINT" in out
    assert ("nightly", "shutdown", None) in run.stops()
    assert run.survivors() == []
    verify = _run(["audit", "verify", "--db", str(db)], tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_no_command_prints_help_and_fails(tmp_path: Path) -> None:
    """Without a command the CLI explains itself and exits non-zero."""
    result = _run([], tmp_path)
    assert result.returncode == 2
    assert "demo" in result.stderr
