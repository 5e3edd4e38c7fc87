"""The ``kill-switch`` command: the demo runs end to end and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kill_switch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KILL_SWITCH_AUDIT_DB": ""},
    )


@pytest.mark.slow
def test_demo_runs_and_audit_verifies_then_detects_a_changed_byte(tmp_path: Path) -> None:
    """``kill-switch demo`` exits 0, its audit verifies, and a changed byte is named."""
    demo = _run(["demo"], tmp_path)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "every session stopped, nothing left running" in demo.stdout
    assert "by supervisor" in demo.stdout
    assert "by operator (ops-oncall)" in demo.stdout
    assert "by parent" in demo.stdout
    assert "by sentinel" in demo.stdout
    assert "by budget" in demo.stdout
    assert "SIGKILL" in demo.stdout
    assert "summarizer) — finished" in demo.stdout

    verify = _run(["audit", "verify"], tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "intact" in verify.stdout

    db = tmp_path / "kill-switch-audit.db"
    data = bytearray(db.read_bytes())
    # Change one byte inside a stored reason: the chain must name the row.
    at = data.find(b"SLA of")
    assert at > 0
    data[at] ^= 0x01
    db.write_bytes(bytes(data))
    tampered = _run(["audit", "verify"], tmp_path)
    assert tampered.returncode != 0
    assert "seq" in tampered.stdout + tampered.stderr


def test_no_command_prints_help_and_fails(tmp_path: Path) -> None:
    """Without a command the CLI explains itself and exits non-zero."""
    result = _run([], tmp_path)
    assert result.returncode == 2
    assert "demo" in result.stderr
