"""Process shutdown and the watchdog, run as real child processes (FAULTS 33-38)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import kill_switch as ks
from kill_switch import EXIT_FORCED, EXIT_FORCED_C_LEVEL

from ._procs import alive, cgroup_available, session_cgroups

CHILD = Path(__file__).with_name("shutdown_child.py")

pytestmark = pytest.mark.slow


class Child:
    def __init__(self, mode: str, tmp: Path) -> None:
        self.db = tmp / "audit.db"
        self.tb = tmp / "tracebacks.txt"
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), mode, str(self.db), str(self.tb)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", line + self.proc.stderr.read()  # type: ignore[union-attr]

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait_stderr(self, text: str) -> str:
        assert self.proc.stderr is not None
        seen = ""
        while text not in seen:
            line = self.proc.stderr.readline()
            assert line, f"child ended before printing {text!r}: {seen}"
            seen += line
        return seen

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out, err

    def spooled_kinds(self) -> list[str]:
        spool = Path(str(self.db) + ".spool.jsonl")
        if not spool.exists():
            return []
        return [json.loads(line)["kind"] for line in spool.read_text().splitlines() if line]


def test_orderly_shutdown_exits_with_signal_status(tmp_path: Path) -> None:
    """SIGTERM: every session stopped (trigger shutdown), the entry point ends itself."""
    child = Child("plain", tmp_path)
    child.signal()
    rc, out, _ = child.finish()
    assert rc == 128 + signal.SIGTERM
    assert "orderly exit 143" in out
    log = ks.AuditLog(child.db)
    kinds = [r.kind for r in log.events()]
    assert "interrupt_completed" in kinds
    assert any(r.trigger == "shutdown" for r in log.events())


def test_hung_cleanup_forces_exit_with_documented_code(tmp_path: Path) -> None:
    """A cleanup hook that hangs past the deadline: the watchdog exits the process with
    EXIT_FORCED, tracebacks in the side file and a durable forced_exit record (FAULTS 10, 33)."""
    child = Child("hung_cleanup", tmp_path)
    child.signal()
    rc, _, err = child.finish()
    assert rc == EXIT_FORCED, err
    assert "forcing exit" in err
    assert "forced_exit" in child.spooled_kinds()
    assert "Thread" in child.tb.read_text()


def test_post_mortem_readers_see_the_spooled_forced_exit(tmp_path: Path) -> None:
    """After a forced exit the forced_exit record is only in the spool: AuditLog, the
    ``audit`` command and ``audit verify`` all show it, marked as not yet in the chain."""
    child = Child("hung_cleanup", tmp_path)
    child.signal()
    rc, _, err = child.finish()
    assert rc == EXIT_FORCED, err
    assert "forced_exit" in child.spooled_kinds()  # the premise: no writer replayed it
    with ks.AuditLog(child.db) as log:
        chained = log.events(spooled=False)
        everything = log.events()
        spooled = log.spooled()
    assert "forced_exit" not in [r.kind for r in chained]
    assert [r.kind for r in spooled] == ["forced_exit"]
    last = everything[-1]
    assert (last.kind, last.seq, last.row_hash, last.in_chain) == ("forced_exit", None, None, False)
    assert last.trigger == "watchdog"
    assert everything[: len(chained)] == chained
    result = ks.verify_audit(child.db)
    assert result.ok
    assert result.spooled == 1
    assert result.summary().endswith("; 1 spooled record not yet in the chain")

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "kill_switch", "audit", "--db", str(child.db), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    listing = cli().splitlines()
    assert listing[-1].split()[0] == "spool"
    assert "forced_exit" in listing[-1]
    assert json.loads(cli("--json").splitlines()[-1])["seq"] is None
    verified = cli("verify")
    assert "intact" in verified
    assert "1 spooled record not yet in the chain" in verified
    assert json.loads(cli("verify", "--json"))["spooled"] == 1


def test_next_writer_moves_the_spooled_record_into_the_chain(tmp_path: Path) -> None:
    """Negative control of the above: once a writer opens the log again, the record is a
    chained row and nothing is reported as spooled any more."""
    import anyio

    child = Child("hung_cleanup", tmp_path)
    child.signal()
    rc, _, err = child.finish()
    assert rc == EXIT_FORCED, err

    async def reopen() -> None:
        async with ks.SqliteAudit(child.db) as audit:
            assert await audit.flush() == "durable"

    anyio.run(reopen)
    with ks.AuditLog(child.db) as log:
        assert log.spooled() == []
        forced = log.events(kind="forced_exit")
    assert len(forced) == 1
    assert forced[0].in_chain
    result = ks.verify_audit(child.db)
    assert (result.ok, result.spooled) == (True, 0)
    assert "spooled" not in result.summary()


def stuck_loop_with_a_process(mode: str, tmp: Path) -> tuple[int, list[str], list[str]]:
    """A child whose loop blocks with a process in its session cgroup, SIGTERMed until
    the watchdog exits it: the process's pid, the child's session cgroups before the
    signal and after the exit."""
    child = Child(mode, tmp)
    pid = int(Path(str(child.db) + ".pid").read_text())
    before = session_cgroups(child.proc.pid)
    child.signal()
    rc, _, err = child.finish()
    assert rc == EXIT_FORCED, err
    return pid, before, session_cgroups(child.proc.pid)


@pytest.mark.skipif(not cgroup_available(), reason="needs a writable cgroup v2")
def test_the_watchdogs_forced_stop_removes_the_session_cgroup(tmp_path: Path) -> None:
    """The loop is stuck, the watchdog forces the exit: it kills the session's processes
    and removes the session cgroup first (no loop will after the exit)."""
    pid, before, after = stuck_loop_with_a_process("stuck_loop", tmp_path)
    assert len(before) == 1
    assert after == []
    assert not alive(pid)


@pytest.mark.skipif(not cgroup_available(), reason="needs a writable cgroup v2")
def test_negative_control_a_forced_exit_without_the_removal_leaves_the_cgroup(
    tmp_path: Path,
) -> None:
    """Negative control: without the forced stop's removal the child leaves its session
    cgroup behind, which the check above sees."""
    _, before, after = stuck_loop_with_a_process("stuck_loop_keeps_cgroup", tmp_path)
    try:
        assert after == before
        assert len(after) == 1
    finally:
        for path in after:
            os.rmdir(path)


def test_gil_holding_call_still_exits(tmp_path: Path) -> None:
    """A C call holding the GIL (catastrophic regex): the C-level layer still exits (FAULTS 34)."""
    child = Child("gil_regex", tmp_path)
    child.signal()
    rc, _, _ = child.finish()
    assert rc in (EXIT_FORCED, EXIT_FORCED_C_LEVEL)
    assert "Thread" in child.tb.read_text() or "Timeout" in child.tb.read_text()


def test_non_daemon_thread_does_not_block_exit(tmp_path: Path) -> None:
    """A non-daemon thread blocking interpreter exit: the armed watchdog still ends the
    process, though atexit never runs (FAULTS 35)."""
    child = Child("non_daemon", tmp_path)
    child.signal()
    rc, out, _ = child.finish()
    assert "orderly exit" in out  # the entry point itself finished ...
    assert rc == EXIT_FORCED  # ... but only the watchdog ended the process


def test_second_signal_exits_immediately(tmp_path: Path) -> None:
    """A second signal during a hung shutdown exits at once with 128 + signum (FAULTS 5, 38)."""
    child = Child("two_signals", tmp_path)
    child.signal(signal.SIGINT)
    child.wait_stderr("SIGINT received")
    child.signal(signal.SIGTERM)
    rc, _, err = child.finish()
    assert rc == 128 + signal.SIGTERM
    assert "second SIGTERM" in err


def test_negative_control_without_watchdog_hung_cleanup_outlives_deadline(
    tmp_path: Path,
) -> None:
    """Negative control: with the watchdog disarmed the same hung cleanup is still
    running well past the deadline (proves the forced exit is the watchdog's doing)."""
    script = tmp_path / "no_watchdog.py"
    script.write_text(
        CHILD.read_text().replace(
            'print("ready", flush=True)',
            "shutdown.watchdog.disarm = lambda: None\n"
            "                shutdown.watchdog.arm = lambda *a, **k: None\n"
            '                print("ready", flush=True)',
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), "hung_cleanup", str(tmp_path / "a.db"), str(tmp_path / "t")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    with proc.stdout:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=4)  # four times the deadline
        proc.kill()
        proc.wait()


def test_graceful_shutdown_refuses_non_main_thread() -> None:
    """Signals are delivered to the main thread only: elsewhere it is a clear error."""
    import anyio

    async def main() -> None:
        async with ks.Runtime() as runtime, ks.graceful_shutdown(runtime):
            pass  # pragma: no cover

    errors: list[BaseException] = []

    def run() -> None:
        try:
            anyio.run(main)
        except BaseException as exc:
            errors.append(exc)

    import threading

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert isinstance(errors[0], RuntimeError)


def test_watchdog_validates_and_disarms() -> None:
    """Bad watchdog settings are refused; a disarmed watchdog never fires."""
    from kill_switch import Watchdog

    with pytest.raises(ValueError, match="lead"):
        Watchdog(lead=0)
    wd = Watchdog()
    wd.arm(0.5)
    assert wd.armed
    wd.disarm()
    assert not wd.armed
    wd._thread.join(5)
    assert not wd._thread.is_alive()  # disarmed: its thread ended, the process lives on
