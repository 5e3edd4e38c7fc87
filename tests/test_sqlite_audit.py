"""SqliteAudit against a real SQLite file: durability, append-only schema, hash chain,
tamper detection, fallback spool and replay (FAULTS 39-43, 46-49)."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

import kill_switch as ks
from kill_switch import AuditEvent, AuditLog, AuditRecord, SqliteAudit
from kill_switch import verify_audit as verify
from kill_switch._audit._chain import MIGRATIONS, SCHEMA_VERSION, row_hash
from kill_switch._cli import main as cli

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parent.parent


def ev(n: int = 0, *, kind: str = "tool_blocked", session: str = "s", **kw: object) -> AuditEvent:
    return AuditEvent(kind, session, reason=f"needle-{n:04d}", **kw)  # type: ignore[arg-type]  # test kwargs


def rows(db: Path) -> list[AuditRecord]:
    with AuditLog(db) as log:
        return log.events()


def spooled_ids(spool: Path) -> list[str]:
    if not spool.exists():
        return []
    return [json.loads(line)["event_id"] for line in spool.read_text().splitlines() if line]


async def write(db: Path, n: int, **kw: object) -> list[AuditEvent]:
    events = [ev(i) for i in range(n)]
    async with SqliteAudit(db, **kw) as audit:  # type: ignore[arg-type]  # test kwargs
        for e in events:
            audit.record(e)
        assert await audit.flush() == "durable"
    return events


def tamper(
    db: Path, *statements: str, params: tuple[object, ...] = (), restore: bool = True
) -> None:
    """What someone with the sqlite3 shell can do: drop the triggers, edit, put them back."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for name in ("events_no_update", "events_no_delete", "events_no_replace"):
            conn.execute(f"DROP TRIGGER IF EXISTS {name}")
        for sql in statements:
            conn.execute(sql, params if "?" in sql else ())
        if restore:
            for ddl in MIGRATIONS[1]:
                if "CREATE TRIGGER" in ddl:
                    conn.execute(ddl)
    finally:
        conn.close()


# ------------------------------------------------------------------ durability


async def test_flush_reports_durable_once_committed(tmp_path: Path) -> None:
    """flush() says durable and the row is in the file, read by another connection."""
    db = tmp_path / "a.db"
    async with SqliteAudit(db) as audit:
        event = ev(1, interrupt_id="i1", trigger="operator", operator="ops", details={"x": [1]})
        audit.record(event)
        assert await audit.flush() == "durable"
        (stored,) = rows(db)
    assert stored.event_id == event.event_id
    assert (stored.seq, stored.interrupt_id, stored.operator) == (1, "i1", "ops")
    assert stored.details == {"x": [1]}
    assert stored.wall_time == event.wall_time
    assert stored.mono_time == event.mono_time


async def test_connection_pragmas_and_schema(tmp_path: Path) -> None:
    """WAL, a versioned schema, and the three protective triggers."""
    db = tmp_path / "a.db"
    await write(db, 1)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        triggers = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")
        }
    finally:
        conn.close()
    assert triggers == {"events_no_update", "events_no_delete", "events_no_replace"}


async def test_record_before_entry_is_written_on_entry(tmp_path: Path) -> None:
    """Events recorded before the writer starts are kept and committed."""
    audit = SqliteAudit(tmp_path / "a.db")
    audit.record(ev(1))
    assert await audit.flush() == "pending"  # no writer yet: not durable, not lost
    async with audit:
        assert await audit.flush() == "durable"
    assert len(rows(tmp_path / "a.db")) == 1


async def test_record_never_raises(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A wrong argument is reported on stderr, never raised into the caller."""
    async with SqliteAudit(tmp_path / "a.db") as audit:
        audit.record("not an event")  # type: ignore[arg-type]  # the point of the test
        unserialisable = ev(2, details={"obj": object(), "nan": float("nan")})
        audit.record(unserialisable)
        assert await audit.flush() == "durable"
    assert "audit record failed" in capfd.readouterr().err
    (stored,) = rows(tmp_path / "a.db")
    assert stored.event_id == unserialisable.event_id
    assert verify(tmp_path / "a.db").ok


async def test_group_commit_from_tasks_and_threads(tmp_path: Path) -> None:
    """Concurrent recorders (tasks and threads) land in one gap-free chain, in few commits."""
    db = tmp_path / "a.db"
    async with SqliteAudit(db) as audit:

        def burst(tag: str) -> None:
            for i in range(50):
                audit.record(ev(i, session=tag))

        async with anyio.create_task_group() as tg:
            for t in range(10):
                tg.start_soon(anyio.to_thread.run_sync, burst, f"thread-{t}")
            for t in range(10):
                tg.start_soon(_record_async, audit, f"task-{t}")
        assert await audit.flush() == "durable"
        stats = audit.statistics()
    assert stats.committed == 1000
    assert stats.batches < 1000  # group commit: fewer transactions than events
    result = verify(db)
    assert result.ok
    assert result.count == 1000
    assert result.anchor == "match"


async def test_one_batch_of_many_rows_lands_in_order_across_inserts(tmp_path: Path) -> None:
    """A batch larger than one INSERT carries (256 rows) and not a power of two lands
    whole, in record order, every value as recorded, and the chain verifies."""
    db = tmp_path / "a.db"
    events = [ev(i, interrupt_id=f"i{i}", details={"n": i, "t": [i, None]}) for i in range(301)]
    async with SqliteAudit(db) as audit:
        for e in events:
            audit.record(e)
        assert await audit.flush() == "durable"
        stats = audit.statistics()
    assert stats.batches == 1  # recorded before the writer ran: one transaction
    stored = rows(db)
    assert [r.event_id for r in stored] == [e.event_id for e in events]
    assert [r.seq for r in stored] == list(range(1, 302))
    assert [(r.reason, r.interrupt_id, r.details) for r in stored] == [
        (e.reason, e.interrupt_id, dict(e.details)) for e in events
    ]
    assert [r.wall_time for r in stored] == [e.wall_time for e in events]
    result = verify(db)
    assert (result.ok, result.count, result.anchor) == (True, 301, "match")


def test_inserts_are_powers_of_two_within_sqlites_bound_values() -> None:
    """The rows of a batch are cut into INSERTs of 2**k rows, largest first, each under
    the connection's cap on bound values (a build with a low cap gets one row each)."""
    from kill_switch._audit._store import _chunks

    conn = sqlite3.connect(":memory:")
    params = [(i,) for i in range(301)]
    assert [len(c) for c in _chunks(params, conn)] == [256, 32, 8, 4, 1]
    assert [r for c in _chunks(params, conn) for r in c] == params
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 20)  # fewer than one row's 14
    assert [len(c) for c in _chunks(params[:3], conn)] == [1, 1, 1]
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 100)  # 7 rows: 4 at most
    assert [len(c) for c in _chunks(params[:11], conn)] == [4, 4, 2, 1]
    assert list(_chunks([], conn)) == []


async def _record_async(audit: SqliteAudit, tag: str) -> None:
    for i in range(50):
        audit.record(ev(i, session=tag))
        await anyio.lowlevel.checkpoint()


async def test_same_event_recorded_twice_is_stored_once(tmp_path: Path) -> None:
    """Event ids are unique: a retried record() is idempotent."""
    db = tmp_path / "a.db"
    event = ev(1)
    async with SqliteAudit(db) as audit:
        audit.record(event)
        assert await audit.flush() == "durable"
        audit.record(event)
        audit.record(ev(2))
        assert await audit.flush() == "durable"
    assert [r.event_id for r in rows(db)].count(event.event_id) == 1
    assert verify(db).ok


async def test_cancelled_flush_caller_event_lands_exactly_once(tmp_path: Path) -> None:
    """FAULT 43: a caller cancelled while its event is being written loses nothing."""
    db = tmp_path / "a.db"
    await write(db, 1)
    holder = sqlite3.connect(db, isolation_level=None)
    event = ev(7)
    async with SqliteAudit(db, busy_timeout=60.0) as audit:
        holder.execute("BEGIN IMMEDIATE")  # the writer's batch now waits for the lock
        try:
            with anyio.CancelScope() as scope:
                audit.record(event)

                async def caller() -> None:
                    await audit.flush()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(caller)
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()
            assert scope.cancelled_caught
        finally:
            holder.execute("ROLLBACK")
        assert await audit.flush() == "durable"
        audit.record(event)  # a retry by the cancelled caller
        assert await audit.flush() == "durable"
    holder.close()
    assert [r.event_id for r in rows(db)].count(event.event_id) == 1
    assert verify(db).ok


# ------------------------------------------------------------ append-only schema


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE events SET reason = 'edited' WHERE seq = 1",
        "DELETE FROM events WHERE seq = 1",
        "DELETE FROM events",
    ],
)
async def test_update_and_delete_are_rejected(tmp_path: Path, sql: str) -> None:
    """FAULT 39: the triggers abort UPDATE and DELETE (with or without WHERE)."""
    db = tmp_path / "a.db"
    await write(db, 3)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(sql)
    finally:
        conn.close()
    assert len(rows(db)) == 3
    assert verify(db).ok


def _replace(db: Path, recursive: bool) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute(f"PRAGMA recursive_triggers={'ON' if recursive else 'OFF'}")
        first = conn.execute("SELECT * FROM events WHERE seq = 1").fetchone()
        conn.execute(
            "REPLACE INTO events (seq, event_id, wall_time, mono_time, kind, details, "
            "prev_hash, row_hash) VALUES (1, ?, 0, 0, 'forged', '{}', ?, ?)",
            (first[1], first[-2], first[-1]),
        )
    finally:
        conn.close()


async def test_replace_is_rejected_by_recursive_triggers(tmp_path: Path) -> None:
    """FAULT 40: REPLACE of an existing row fires the DELETE trigger and aborts."""
    db = tmp_path / "a.db"
    await write(db, 2)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER events_no_replace")  # leave only the UPDATE/DELETE triggers
    conn.close()
    with pytest.raises(sqlite3.IntegrityError, match="DELETE rejected"):
        _replace(db, recursive=True)
    assert [r.kind for r in rows(db)] == ["tool_blocked", "tool_blocked"]


async def test_replace_bypasses_triggers_without_recursive_triggers(tmp_path: Path) -> None:
    """Negative control: with recursive_triggers off REPLACE silently swaps a row."""
    db = tmp_path / "a.db"
    await write(db, 2)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER events_no_replace")
    conn.close()
    _replace(db, recursive=False)  # no error: the DELETE trigger never fired
    assert rows(db)[0].kind == "forged"
    result = verify(db)  # ...and the chain is what catches it
    assert not result.ok
    assert result.first_bad_seq == 1


async def test_replace_rejected_by_insert_guard_even_without_pragma(tmp_path: Path) -> None:
    """The BEFORE INSERT guard refuses a duplicate event id on any connection."""
    db = tmp_path / "a.db"
    await write(db, 2)
    with pytest.raises(sqlite3.IntegrityError, match="duplicate event_id"):
        _replace(db, recursive=False)


# ------------------------------------------------------------------ hash chain


async def test_verify_intact(tmp_path: Path) -> None:
    """A log written only by SqliteAudit verifies, anchored head matching."""
    db = tmp_path / "a.db"
    await write(db, 20)
    result = verify(db)
    assert result.ok
    assert result.count == 20
    assert result.anchor == "match"
    assert result.first_bad_seq is None


async def test_verify_detects_edited_row(tmp_path: Path) -> None:
    """FAULT 41: an edited field is named by its seq."""
    db = tmp_path / "a.db"
    await write(db, 10)
    tamper(db, "UPDATE events SET reason = 'nothing to see' WHERE seq = 6")
    result = verify(db)
    assert not result.ok
    assert result.first_bad_seq == 6
    assert "altered" in (result.problem or "")


async def test_verify_detects_deleted_row(tmp_path: Path) -> None:
    """FAULT 41: a deleted row leaves a gap at its seq."""
    db = tmp_path / "a.db"
    await write(db, 10)
    tamper(db, "DELETE FROM events WHERE seq = 4")
    result = verify(db)
    assert not result.ok
    assert result.first_bad_seq == 4


async def test_verify_detects_reordered_rows(tmp_path: Path) -> None:
    """FAULT 41: two rows swapped (content moved, seq kept) break the link."""
    db = tmp_path / "a.db"
    await write(db, 10)
    r3, r4 = rows(db)[2], rows(db)[3]
    cols = "event_id=?, wall_time=?, mono_time=?, reason=?, prev_hash=?, row_hash=?"

    def values(r: AuditRecord, event_id: str) -> tuple[object, ...]:
        return (event_id, r.wall_time, r.mono_time, r.reason, r.prev_hash, r.row_hash)

    tamper(db, f"UPDATE events SET {cols} WHERE seq = 3", params=(*values(r4, "tmp"),))
    tamper(db, f"UPDATE events SET {cols} WHERE seq = 4", params=(*values(r3, r3.event_id),))
    tamper(db, "UPDATE events SET event_id = ? WHERE seq = 3", params=(r4.event_id,))
    result = verify(db)
    assert not result.ok
    assert result.first_bad_seq == 3


async def test_verify_detects_inserted_row(tmp_path: Path) -> None:
    """FAULT 41: a forged row slid in (later rows renumbered) breaks the next link."""
    db = tmp_path / "a.db"
    await write(db, 10)
    r2 = rows(db)[1]
    assert r2.row_hash is not None  # a chained row
    forged = ("forged-id", 1.0, 1.0, None, None, None, None, "forged", None, "x", None, "{}")
    digest = row_hash(3, forged, r2.row_hash)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER events_no_update")
    for seq in range(10, 2, -1):
        conn.execute("UPDATE events SET seq = seq + 1 WHERE seq = ?", (seq,))
    conn.execute(
        "INSERT INTO events VALUES (3, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (*forged, r2.row_hash, digest),
    )
    conn.close()
    result = verify(db)
    assert not result.ok
    assert result.first_bad_seq == 4


async def test_verify_detects_tail_truncation_by_anchor(tmp_path: Path) -> None:
    """FAULT 41: deleting the last rows keeps a valid chain; the anchored head catches it."""
    db = tmp_path / "a.db"
    await write(db, 10)
    tamper(db, "DELETE FROM events WHERE seq > 7")
    assert verify(db, anchor=None).ok  # without the anchor the chain alone looks fine
    result = verify(db)
    assert not result.ok
    assert result.first_bad_seq == 8
    assert result.anchor == "mismatch"


async def test_verify_detects_full_rewrite_by_anchor(tmp_path: Path) -> None:
    """FAULT 41: a consistently re-hashed chain differs from the anchored head."""
    db = tmp_path / "a.db"
    await write(db, 5)
    prev = "0" * 64
    updates = []
    for r in rows(db):
        values = (
            r.event_id,
            r.wall_time,
            r.mono_time,
            r.session_id,
            r.agent,
            r.interrupt_id,
            r.parent_event_id,
            r.kind,
            r.trigger,
            "rewritten",
            r.operator,
            "{}",
        )
        assert r.seq is not None  # a chained row
        digest = row_hash(r.seq, values, prev)
        updates.append(
            f"UPDATE events SET reason='rewritten', details='{{}}', prev_hash='{prev}', "
            f"row_hash='{digest}' WHERE seq={r.seq}"
        )
        prev = digest
    tamper(db, *updates)
    assert verify(db, anchor=None).ok
    result = verify(db)
    assert not result.ok
    assert result.first_bad_seq == 5
    assert result.anchor == "mismatch"


async def test_verify_reports_dropped_trigger(tmp_path: Path) -> None:
    """FAULT 41: a dropped trigger is tampering even if no row changed yet."""
    db = tmp_path / "a.db"
    await write(db, 3)
    tamper(db, restore=False)
    result = verify(db)
    assert not result.ok
    assert result.first_bad_seq is None
    assert "events_no_delete" in result.missing_triggers


async def test_byte_edit_of_the_file_names_the_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """FAULT 41: one byte changed in the file; `kill-switch audit verify` names the row."""
    db = tmp_path / "a.db"
    await write(db, 30)
    assert not (tmp_path / "a.db-wal").exists()  # closed: everything is in the main file
    data = bytearray(db.read_bytes())
    at = data.index(b"needle-0016")
    data[at + 3] ^= 0x01
    db.write_bytes(bytes(data))
    assert cli(["audit", "verify", "--db", str(db)]) == 1
    out = capsys.readouterr().out
    assert "TAMPERED at seq 17" in out  # needle-0016 is the 17th event
    await write(tmp_path / "b.db", 3)
    assert cli(["audit", "verify", "--db", str(tmp_path / "b.db")]) == 0
    assert "intact: 3 rows" in capsys.readouterr().out


# ------------------------------------------------------------ degraded: spool


@contextlib.contextmanager
def read_only(db: Path) -> Iterator[None]:
    """Make *db* and its directory unwritable (``chattr +i`` when running as root)."""
    assert not Path(f"{db}-wal").exists()
    assert not Path(f"{db}-shm").exists()
    targets = [str(db), str(db.parent)]
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", *targets], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["chattr", "-i", *targets], capture_output=True, check=False)
            pytest.skip("root can make a file read-only only with chattr +i, unavailable here")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", *targets], check=True)
    else:
        db.chmod(0o444)
        db.parent.chmod(0o555)
        try:
            yield
        finally:
            db.parent.chmod(0o755)
            db.chmod(0o644)


async def test_read_only_database_spools_then_replays(tmp_path: Path) -> None:
    """FAULT 46: read-only → degraded + spooled; writable again → replayed once, in order."""
    db = tmp_path / "ro" / "a.db"
    db.parent.mkdir()
    spool, anchor = tmp_path / "spool.jsonl", tmp_path / "a.head"
    first = await write(db, 2, spool=spool, anchor=anchor)
    late = [ev(10), ev(11)]
    async with contextlib.AsyncExitStack() as stack:
        with read_only(db):
            sink = SqliteAudit(db, spool=spool, anchor=anchor, retry_interval=0)
            audit = await stack.enter_async_context(sink)
            for e in late:
                audit.record(e)
            assert await audit.flush() == "degraded"
            assert spooled_ids(spool) == [e.event_id for e in late]
            assert audit.statistics().state == "degraded"
        after = ev(12)
        audit.record(after)
        assert await audit.flush() == "durable"
    ids = [r.event_id for r in rows(db)]
    assert ids == [e.event_id for e in [*first, *late, after]]
    assert spooled_ids(spool) == []
    assert verify(db, anchor=anchor).ok


async def test_locked_database_spools_then_replays(tmp_path: Path) -> None:
    """FAULT 47: a lock held past busy_timeout → degraded; released → replayed once."""
    db = tmp_path / "a.db"
    await write(db, 1)
    holder = sqlite3.connect(db, isolation_level=None)
    locked, after = ev(1), ev(2)
    async with SqliteAudit(db, busy_timeout=0.05, retry_interval=0) as audit:
        holder.execute("BEGIN IMMEDIATE")
        try:
            audit.record(locked)
            assert await audit.flush() == "degraded"
            assert spooled_ids(Path(audit.spool_path)) == [locked.event_id]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        audit.record(after)
        assert await audit.flush() == "durable"
        assert spooled_ids(Path(audit.spool_path)) == []
    ids = [r.event_id for r in rows(db)]
    assert ids[1:] == [locked.event_id, after.event_id]
    assert verify(db).ok


async def test_disk_full_spools_and_a_later_writer_replays(tmp_path: Path) -> None:
    """FAULT 46: SQLITE_FULL → degraded; the next writer replays the spool without dups."""
    db = tmp_path / "a.db"
    async with SqliteAudit(db, max_bytes=64 * 1024) as audit:
        audit.record(ev(0))
        assert await audit.flush() == "durable"
        big = [ev(i, details={"blob": "x" * 4000}) for i in range(1, 40)]
        for e in big:
            audit.record(e)
        assert await audit.flush() == "degraded"
        assert "SQLITE_FULL" in (audit.statistics().last_error or "")
    assert spooled_ids(tmp_path / "a.db.spool.jsonl") == [e.event_id for e in big]
    async with SqliteAudit(db) as audit:  # no cap: the disk "has room" again
        audit.record(ev(99))
        assert await audit.flush() == "durable"
    stored = [r.event_id for r in rows(db)]
    assert len(stored) == len(set(stored)) == 41
    assert stored[1:40] == [e.event_id for e in big]
    assert not (tmp_path / "a.db.spool.jsonl").read_text()
    assert verify(db).ok


async def test_corrupt_database_spools(tmp_path: Path) -> None:
    """FAULT 46: SQLITE_NOTADB → degraded, events spooled with their ids, never durable."""
    db = tmp_path / "a.db"
    db.write_bytes(b"this is not a database " * 400)
    event = ev(1)
    async with SqliteAudit(db) as audit:
        audit.record(event)
        assert await audit.flush() == "degraded"
        assert "NOTADB" in (audit.statistics().last_error or "")
    assert spooled_ids(tmp_path / "a.db.spool.jsonl") == [event.event_id]


async def test_deleted_database_is_not_reported_durable(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """FAULT 46: a database deleted under an open connection is 'gone', not durable."""
    db = tmp_path / "d" / "a.db"
    db.parent.mkdir()
    spool, anchor = tmp_path / "spool.jsonl", tmp_path / "a.head"
    async with SqliteAudit(db, spool=spool, anchor=anchor, retry_interval=0) as audit:
        audit.record(ev(0))
        assert await audit.flush() == "durable"
        for f in db.parent.iterdir():
            f.unlink()
        db.parent.rmdir()
        event = ev(1)
        audit.record(event)
        assert await audit.flush() == "degraded"
        assert "a.db is gone" in capfd.readouterr().err
        # The anchor says a chain existed: the log is never silently started afresh.
        audit.record(ev(2))
        assert await audit.flush() == "degraded"
    assert not db.exists()
    assert event.event_id in spooled_ids(spool)


async def test_newer_schema_is_not_written(tmp_path: Path) -> None:
    """A database from a newer kill_switch is left alone; events go to the spool."""
    db = tmp_path / "a.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    async with SqliteAudit(db) as audit:
        audit.record(ev(1))
        assert await audit.flush() == "degraded"
        assert "newer" in (audit.statistics().last_error or "")


async def test_no_spool_either_falls_back_to_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Database and spool both unavailable: a stderr line per event, status degraded."""
    event = ev(1)
    gone = tmp_path / "missing"
    async with SqliteAudit(gone / "a.db", spool=gone / "s.jsonl", anchor=None) as audit:
        audit.record(event)
        assert await audit.flush() == "degraded"
    err = capfd.readouterr().err
    assert f'"event_id": "{event.event_id}"' in err
    assert "audit fallback" in err


# -------------------------------------------------------- lifetime and backends


def test_needs_asyncio() -> None:
    """FAULT 49: outside an asyncio loop entering says so clearly (aiosqlite is asyncio-only)."""
    audit = SqliteAudit("unused.db")
    coro = audit.__aenter__()
    with pytest.raises(RuntimeError, match="asyncio event loop"):
        coro.send(None)
    coro.close()


@pytest.mark.slow
def test_unclosed_sink_does_not_hang_exit(tmp_path: Path) -> None:
    """FAULT 48: a sink never exited: asyncio.run still closes it, no traceback, no hang."""
    script = textwrap.dedent(
        f"""
        import asyncio
        from kill_switch import AuditEvent, SqliteAudit

        async def main():
            audit = SqliteAudit({str(tmp_path / "a.db")!r})
            await audit.__aenter__()
            audit.record(AuditEvent("tool_blocked", "s"))
            print(await audit.flush())

        asyncio.run(main())
        print("exited")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["durable", "exited"]
    assert "Traceback" not in done.stderr
    assert "Event loop is closed" not in done.stderr


# ------------------------------------------------------------ with the runtime


async def test_runtime_interrupt_is_audited_durably(tmp_path: Path) -> None:
    """Runtime(audit=path): requested/delivered/completed rows share the interrupt id."""
    db = tmp_path / "audit.db"
    async with ks.Runtime(audit=str(db)) as runtime:
        async with runtime.session("researcher", session_id="s-1") as session:
            handle = session.interrupt("prompt injection", trigger="operator", operator="ops")
            await anyio.sleep_forever()
        report = await handle
    assert report.audit == "durable"
    assert report.quiescent
    with AuditLog(db) as log:
        mine = log.events(interrupt_id=report.interrupt_id)
    kinds = [r.kind for r in mine]
    assert kinds[0] == "interrupt_requested"
    assert {"interrupt_delivered", "interrupt_completed"} <= set(kinds)
    assert mine[0].operator == "ops"
    assert mine[0].reason == "prompt injection"
    assert verify(db).ok


async def test_runtime_kill_completes_with_unwritable_database(tmp_path: Path) -> None:
    """FAULT 46: the database cannot be opened; the stop completes, audit says degraded."""
    spool = tmp_path / "spool.jsonl"
    sink = SqliteAudit(tmp_path / "missing" / "audit.db", spool=spool, anchor=None)
    async with ks.Runtime(audit=sink) as runtime:
        async with runtime.session("researcher") as session:
            handle = session.interrupt("stop", trigger="operator")
            await anyio.sleep_forever()
        report = await handle
    assert report.outcome == "stopped"
    assert report.quiescent
    assert report.audit == "degraded"
    lines = [json.loads(line) for line in spool.read_text().splitlines()]
    assert {"interrupt_requested", "interrupt_completed"} <= {
        d["kind"] for d in lines if d["interrupt_id"] == report.interrupt_id
    }


async def test_runtime_kill_does_not_wait_for_a_stuck_database(tmp_path: Path) -> None:
    """FAULT 47: the stop finishes while the audit write is provably still blocked."""
    db = tmp_path / "audit.db"
    await write(db, 1)
    holder = sqlite3.connect(db, isolation_level=None)
    sink = SqliteAudit(db, busy_timeout=60.0)
    policy = ks.StopPolicy(audit_timeout=0.05)
    try:
        async with ks.Runtime(audit=sink, policy=policy) as runtime:
            holder.execute("BEGIN IMMEDIATE")
            async with runtime.session("researcher") as session:
                handle = session.interrupt("stop", trigger="operator")
                await anyio.sleep_forever()
            report = await handle
            assert report.quiescent
            assert report.audit == "pending"
            assert sink.statistics().unsaved > 0  # still waiting for the lock
            holder.execute("ROLLBACK")
            assert await sink.flush() == "durable"
    finally:
        holder.close()
    assert report.interrupt_id in {r.interrupt_id for r in rows(db)}


async def test_kill_is_sticky_across_runtimes(tmp_path: Path) -> None:
    """A session id terminated in the log is refused by a later runtime, and that is audited."""
    db = tmp_path / "audit.db"
    async with (
        ks.Runtime(audit=str(db)) as runtime,
        runtime.session("researcher", session_id="s-1") as session,
    ):
        session.interrupt("stop", trigger="operator")
        await anyio.sleep_forever()
    async with ks.Runtime(audit=str(db)) as runtime:
        with pytest.raises(ks.SessionRefused, match="terminated"):
            runtime.session("researcher", session_id="s-1")
        async with runtime.session("researcher", session_id="s-2"):
            pass
    assert "session_refused" in [r.kind for r in rows(db) if r.session_id == "s-1"]


async def test_terminated_ids_include_spooled_events(tmp_path: Path) -> None:
    """A kill only in the spool (database down) is still sticky."""
    spool = tmp_path / "spool.jsonl"
    missing = tmp_path / "missing" / "a.db"
    async with SqliteAudit(missing, spool=spool, anchor=None) as audit:
        audit.record(AuditEvent("interrupt_requested", "s-9"))
        assert await audit.flush() == "degraded"
    async with SqliteAudit(missing, spool=spool, anchor=None) as audit:
        assert await audit.terminated_session_ids() == frozenset({"s-9"})


def test_only_the_writer_module_imports_aiosqlite() -> None:
    """aiosqlite is imported by ``_audit/_sqlite.py`` alone (the store, the chain and the
    readers are plain sqlite3); finding that one module is the scan's own control."""
    package = Path(ks.__file__).parent
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            if any(n == "aiosqlite" or n.startswith("aiosqlite.") for n in names):
                importers.add(path.relative_to(package).as_posix())
    assert importers == {"_audit/_sqlite.py"}
