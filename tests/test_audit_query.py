"""Reading the audit log: queries, the cascade tree, JSONL export and the CLI."""

from __future__ import annotations

import io
import json
import sqlite3
from typing import TYPE_CHECKING

import anyio
import pytest

import kill_switch as ks
from kill_switch import AuditEvent, AuditLog, SqliteAudit
from kill_switch._audit._query import open_readonly
from kill_switch._audit._store import Store
from kill_switch._cli import main as cli

if TYPE_CHECKING:
    from pathlib import Path

    from kill_switch import StopReport


async def parent_and_child(db: Path) -> StopReport:
    """A parent session with a child, interrupted by an operator; returns the report."""
    async with ks.Runtime(audit=str(db)) as runtime:
        async with (
            runtime.session("lead", session_id="p") as parent,
            runtime.session("helper", session_id="c", parent=parent),
        ):
            handle = parent.interrupt("pivot", trigger="operator", operator="ops")
            await anyio.sleep_forever()
        return await handle


async def test_cascade_tree_reaches_the_child_session(tmp_path: Path) -> None:
    """by interrupt: the request, its steps, and the child's stop (trigger parent) below."""
    db = tmp_path / "a.db"
    report = await parent_and_child(db)
    with AuditLog(db) as log:
        tree = log.cascade(report.interrupt_id)
    assert tree is not None
    assert tree.record.kind == "interrupt_requested"
    assert tree.record.session_id == "p"
    nodes = list(tree.walk())
    assert {r.kind for _, r in nodes if r.session_id == "p"} >= {
        "interrupt_delivered",
        "interrupt_completed",
    }
    child = [(d, r) for d, r in nodes if r.session_id == "c"]
    assert child
    assert child[0][1].kind == "interrupt_requested"
    assert child[0][1].trigger == "parent"
    assert child[0][0] >= 2


async def test_queries_by_session_trigger_and_time(tmp_path: Path) -> None:
    """Filters combine; time ranges use wall time; results come in seq order."""
    db = tmp_path / "a.db"
    async with SqliteAudit(db) as audit:
        for i, (session, trigger) in enumerate(
            [("s1", "operator"), ("s2", "budget"), ("s1", "budget"), ("s2", "operator")]
        ):
            audit.record(AuditEvent("k", session, trigger=trigger, wall_time=100.0 + i))
        assert await audit.flush() == "durable"
    with AuditLog(db) as log:
        assert [r.seq for r in log.events(session_id="s1")] == [1, 3]
        assert [r.seq for r in log.events(trigger="budget")] == [2, 3]
        assert [r.seq for r in log.events(session_id="s2", trigger="operator")] == [4]
        assert [r.seq for r in log.events(since=101.0, until=103.0)] == [2, 3]
        assert [r.seq for r in log.events(limit=2)] == [1, 2]
        out = io.StringIO()
        assert log.export_jsonl(out, session_id="s1") == 2
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [d["seq"] for d in lines] == [1, 3]
    assert lines[0]["trigger"] == "operator"


async def test_reader_is_read_only(tmp_path: Path) -> None:
    """The query connection cannot write, and a missing file is not created."""
    db = tmp_path / "a.db"
    async with SqliteAudit(db) as audit:
        audit.record(AuditEvent("k", "s"))
        assert await audit.flush() == "durable"
        conn = open_readonly(db)  # while the writer is live
        try:
            with pytest.raises(sqlite3.OperationalError):
                conn.execute("CREATE TABLE x (y)")
        finally:
            conn.close()
    with pytest.raises(sqlite3.OperationalError):
        open_readonly(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


async def test_cli_lists_exports_and_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kill-switch audit` text and --json; `audit verify` exit codes; env default path."""
    db = tmp_path / "a.db"
    report = await parent_and_child(db)
    assert cli(["audit", "--db", str(db), "--session", "p"]) == 0
    text = capsys.readouterr().out
    assert "interrupt_requested" in text
    assert 'reason="pivot"' in text
    assert "session=c" not in text
    monkeypatch.setenv("KILL_SWITCH_AUDIT_DB", str(db))
    assert cli(["audit", "--json", "--interrupt", report.interrupt_id]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines
    assert {d["interrupt_id"] for d in lines} == {report.interrupt_id}
    assert cli(["audit", "--interrupt", report.interrupt_id]) == 0
    assert "session=c" in capsys.readouterr().out  # the tree includes the child's stop
    assert cli(["audit", "verify"]) == 0
    assert "intact" in capsys.readouterr().out
    assert cli(["audit", "verify", "--db", str(tmp_path / "none.db")]) == 3
    (tmp_path / "junk.db").write_bytes(b"junk" * 1000)
    assert cli(["audit", "verify", "--db", str(tmp_path / "junk.db")]) == 3


def append_torn_line(path: str) -> None:
    """Append half a line, as a crash in the middle of a spool write leaves it."""
    with open(path, "ab") as spool:
        spool.write(b'{"event_id": "torn", "wall_ti\n')


async def test_spooled_events_are_filtered_deduplicated_and_counted(tmp_path: Path) -> None:
    """Spooled events follow the chained rows under the same filters; one already in the
    chain (a crash between commit and spool truncation) and torn lines are not shown."""
    db = tmp_path / "a.db"
    chained = [AuditEvent("k", "s1", trigger="operator", wall_time=100.0 + i) for i in range(3)]
    async with SqliteAudit(db) as audit:
        for event in chained:
            audit.record(event)
        assert await audit.flush() == "durable"
    late = AuditEvent("forced_exit", "s2", trigger="watchdog", wall_time=200.0)
    writer = SqliteAudit(db)  # never entered: record_now is the watchdog's synchronous path
    assert writer.record_now(chained[1])  # already a row
    assert writer.record_now(late)
    assert writer.record_now(late)  # spooled twice: shown once
    append_torn_line(writer.spool_path)
    with AuditLog(db) as log:
        assert [(r.seq, r.kind) for r in log.events()] == [
            (1, "k"), (2, "k"), (3, "k"), (None, "forced_exit"),
        ]  # fmt: skip
        assert [r.event_id for r in log.events(session_id="s2")] == [late.event_id]
        assert [r.seq for r in log.events(trigger="operator")] == [1, 2, 3]
        assert [r.seq for r in log.events(since=150.0)] == [None]
        assert [r.seq for r in log.events(limit=3)] == [1, 2, 3]
        assert [r.seq for r in log.events(limit=4)] == [1, 2, 3, None]
        assert log.events(spooled=False) == log.events(limit=3)
        assert [r.event_id for r in log.spooled()] == [late.event_id]
        assert log.spooled()[0].details == dict(late.details)
    with AuditLog(db, spool=None) as log:  # the database alone
        assert [r.seq for r in log.events()] == [1, 2, 3]
    result = ks.verify_audit(db)
    assert (result.ok, result.count, result.spooled) == (True, 3, 1)
    assert ks.verify_audit(db, spool=None).spooled == 0


async def test_a_spool_longer_than_one_id_lookup_is_deduplicated_whole(tmp_path: Path) -> None:
    """1,200 spooled events (three lookups of 500 ids), every other one already a row:
    the reader shows exactly the others, once; the next writer appends only those."""
    db = tmp_path / "a.db"
    events = [AuditEvent("k", "s", wall_time=float(i)) for i in range(1200)]
    chained, pending = events[::2], events[1::2]
    async with SqliteAudit(db) as audit:
        for event in chained:
            audit.record(event)
        assert await audit.flush() == "durable"
    # One fsynced append of all of them, as a writer that lost its commit's outcome does.
    assert Store(str(db), SqliteAudit(db).spool_path, None, False).spool(events)
    with AuditLog(db) as log:
        assert [r.event_id for r in log.spooled()] == [e.event_id for e in pending]
        assert len(log.events()) == 1200
    assert ks.verify_audit(db).spooled == 600
    async with SqliteAudit(db):
        pass  # closing replays the spool
    with AuditLog(db) as log:
        assert [r.event_id for r in log.events()] == [e.event_id for e in chained + pending]
        assert log.spooled() == []
    assert (ks.verify_audit(db).ok, ks.verify_audit(db).count) == (True, 1200)


def test_cli_lists_spooled_events_without_a_sequence_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``kill-switch audit`` prints a spooled event with ``spool`` for its seq even where
    the writer never created the table; ``verify`` says so and still counts the spool."""
    db = tmp_path / "a.db"
    sqlite3.connect(db).close()  # a database file without the table yet
    assert SqliteAudit(db).record_now(AuditEvent("forced_exit", None, trigger="watchdog"))
    assert cli(["audit", "--db", str(db)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.split()[0] == "spool"
    assert "forced_exit" in line
    assert cli(["audit", "verify", "--db", str(db), "--no-anchor"]) == 1  # no events table
    verdict = capsys.readouterr().out
    assert "no events table" in verdict
    assert verdict.rstrip().endswith("; 1 spooled record not yet in the chain")
