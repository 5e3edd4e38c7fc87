"""The synchronous side of ``SqliteAudit``: the connection's SQL, the spool and the anchor.

Everything here runs on aiosqlite's thread (the calls taking the raw connection) or on
a worker thread (the side files) and never awaits; ``_sqlite.py`` owns the async single
writer. No aiosqlite here: this side is plain ``sqlite3`` and ``os``.

Invariants:
    * A batch is one ``BEGIN IMMEDIATE`` transaction that reads the chain head and
      appends the batch (group commit: one fsync per batch, not per event); on any error
      it is rolled back and nothing of it is in the database.
    * The spool is append-only and fsynced. It is replayed in order, deduplicated by
      event id, inside the transaction of the next commit, and truncated only after
      that commit returned.
    * After each commit the chain head (row count + last hash) is anchored in a side
      file, only ever moved forward along the same chain, so ``verify`` can detect tail
      truncation and whole-chain rewrites. A database file is created only if no anchor
      says a chain existed there: a deleted log is never silently restarted.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import sqlite3
import urllib.parse
from typing import TYPE_CHECKING, Final

from kill_switch._vocabulary._stderr import say

from ._chain import (
    COLUMN_SQL,
    COLUMNS,
    GENESIS,
    MIGRATIONS,
    SCHEMA_VERSION,
    Values,
    decode_head,
    encode_head,
    event_values,
    parse_spool,
    present_ids,
    read_anchor,
    row_hash,
    unique,
    values_to_json,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from kill_switch._vocabulary._audit_event import AuditEvent

#: Bound values per row: the columns, then prev_hash and row_hash.
_WIDTH: Final = len(COLUMNS) + 2
_ROW_MARKS: Final = f"({', '.join('?' * _WIDTH)})"
#: The most rows one INSERT carries (SQLite may allow fewer bound values: see _chunks).
_MAX_ROWS: Final = 256
_HEAD: Final = "SELECT seq, row_hash FROM events ORDER BY seq DESC LIMIT 1"


@functools.lru_cache(maxsize=16)
def _insert_sql(rows: int) -> str:
    return (
        f"INSERT INTO events ({COLUMN_SQL}, prev_hash, row_hash) "
        f"VALUES {', '.join([_ROW_MARKS] * rows)}"
    )


def _chunks(params: list[Values], conn: sqlite3.Connection) -> Iterator[list[Values]]:
    """*params* cut into INSERTs of 2**k rows, largest first.

    One multi-row INSERT instead of ``executemany``: the sqlite3 module lets go of the
    GIL around every statement step, and taking it back costs up to the switch interval
    while another thread is CPU-bound (the audit writer's convoy under load: 30 rows were
    30 round trips through the GIL, now 4). Power-of-two sizes keep the
    statements few and in the connection's statement cache, where any other size
    would compile a new one each batch.
    """
    most = min(_MAX_ROWS, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _WIDTH)
    size = 1 << (max(1, most).bit_length() - 1)
    i = 0
    while i < len(params):
        while size > len(params) - i:
            size >>= 1
        yield params[i : i + size]
        i += size


class _ChainError(Exception):
    """The database no longer matches what this writer expected (gone, renumbered)."""


class _SchemaError(Exception):
    """The database was written by a newer kill_switch."""


class Store:
    """The synchronous side: runs on aiosqlite's thread (or a worker thread for files)."""

    def __init__(self, path: str, spool: str, anchor: str | None, head_to_stderr: bool):
        self.path = path
        self.spool_path = spool
        self.anchor_path = anchor
        self.head_to_stderr = head_to_stderr
        self.identity: tuple[int, int] | None = None
        self.anchor_fd: int | None = None
        self.warned_fork = False

    # ------------------------------------------------------------------ open

    def connect_uri(self) -> str:
        """An URI that creates the file only if no anchored chain says it existed."""
        anchored = self.read_anchor()
        must_exist = anchored is not None and anchored[0] > 0
        mode = "rw" if must_exist else "rwc"
        return f"file:{urllib.parse.quote(self.path)}?mode={mode}"

    def setup(self, conn: sqlite3.Connection, max_bytes: int | None) -> None:
        """Pragmas for every connection, then bring the schema to SCHEMA_VERSION."""
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode!r}; WAL is required")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA recursive_triggers=ON")
        if max_bytes is not None:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count={max(2, max_bytes // page)}")
        if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            self._migrate(conn)
        st = os.stat(self.path)
        self.identity = (st.st_dev, st.st_ino)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have migrated.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise _SchemaError(
                    f"audit database schema version {version} is newer than this "
                    f"kill_switch ({SCHEMA_VERSION})"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # ---------------------------------------------------------------- commit

    def commit(
        self, conn: sqlite3.Connection, events: Sequence[AuditEvent], replay: bool, dedup: bool
    ) -> tuple[int, str, int]:
        """Append the spool (if *replay*) then *events* as one transaction.

        Returns (head seq, head hash, rows inserted). Raises whatever SQLite raised; the
        transaction is then rolled back and nothing of the batch is in the database.
        """
        spool_fd: int | None = None
        try:
            rows: list[Values] = []
            if replay:
                spool_fd = self._lock_spool()
                rows.extend(self._read_spool_fd(spool_fd))
            rows.extend(event_values(e) for e in events)
            rows = unique(rows)
            try:
                result = self._append(conn, rows, dedup or replay)
            except sqlite3.IntegrityError:
                if dedup or replay:
                    raise
                # An event recorded twice (a caller retrying): skip what is already in.
                result = self._append(conn, rows, True)
            if spool_fd is not None:
                os.ftruncate(spool_fd, 0)
                os.fsync(spool_fd)
            self._anchor(conn, result[0], result[1], result[3])
            return result[:3]
        finally:
            if spool_fd is not None:
                fcntl.flock(spool_fd, fcntl.LOCK_UN)
                os.close(spool_fd)

    def _append(
        self, conn: sqlite3.Connection, rows: list[Values], dedup: bool
    ) -> tuple[int, str, int, tuple[int, str]]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._check_identity()
            if dedup and rows:
                present = present_ids(conn, [r[0] for r in rows])
                rows = [r for r in rows if r[0] not in present]
            head = conn.execute(_HEAD).fetchone()
            seq, prev = (head[0], head[1]) if head is not None else (0, GENESIS)
            base = (seq, prev)
            params = []
            for values in rows:
                seq += 1
                digest = row_hash(seq, values, prev)
                params.append((*values, prev, digest))
                prev = digest
            last = None
            for chunk in _chunks(params, conn):
                cursor = conn.execute(_insert_sql(len(chunk)), [v for row in chunk for v in row])
                last = cursor.lastrowid
            if params and last != seq:  # SQLite assigns max + 1: anything else breaks the chain
                raise _ChainError(f"expected head seq {seq}, database assigned {last}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                # The original error is the one to report.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        return seq, prev, len(params), base

    def _check_identity(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise _ChainError(f"audit database {self.path} is gone") from None
        if (st.st_dev, st.st_ino) != self.identity:
            raise _ChainError(f"audit database {self.path} was replaced")

    # ---------------------------------------------------------------- anchor

    def read_anchor(self) -> tuple[int, str] | None:
        return None if self.anchor_path is None else read_anchor(self.anchor_path)

    def _anchor(
        self, conn: sqlite3.Connection, count: int, head: str, base: tuple[int, str]
    ) -> None:
        """Move the anchored head forward to (count, head) if it extends the old one.

        *base* is the head this batch was appended to (read in its transaction): an
        anchor equal to it is extended without a lookup.
        """
        if self.head_to_stderr:
            say(f"kill_switch audit head {self.path}: count={count} hash={head}")
        if self.anchor_path is None:
            return
        try:
            if self.anchor_fd is None:
                self.anchor_fd = os.open(self.anchor_path, os.O_RDWR | os.O_CREAT, 0o644)
            fd = self.anchor_fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                old = decode_head(os.pread(fd, 4096, 0))
                if old is not None and old != base:
                    if old[0] >= count:
                        return  # another writer anchored further along already
                    if old[0] > 0 and not self._extends(conn, old):
                        return
                # Fixed width: rewriting in place never leaves a longer stale tail.
                os.pwrite(fd, encode_head(count, head), 0)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except (OSError, sqlite3.Error) as exc:  # rows are committed; only the anchor lags
            say(f"kill_switch: could not anchor audit head of {self.path}: {exc!r}")

    def _extends(self, conn: sqlite3.Connection, old: tuple[int, str]) -> bool:
        row = conn.execute("SELECT row_hash FROM events WHERE seq = ?", (old[0],)).fetchone()
        if row is not None and row[0] == old[1]:
            return True
        if not self.warned_fork:
            self.warned_fork = True
            say(
                f"kill_switch: audit chain {self.path} does not extend its anchored head "
                f"(row {old[0]}): it was truncated or rewritten; the anchor is kept as "
                "evidence. Run `kill-switch audit verify`."
            )
        return False

    def close_anchor(self) -> None:
        if self.anchor_fd is not None:
            fd, self.anchor_fd = self.anchor_fd, None
            os.close(fd)

    # ----------------------------------------------------------------- spool

    def _lock_spool(self) -> int | None:
        try:
            fd = os.open(self.spool_path, os.O_RDWR)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _read_spool_fd(self, fd: int | None) -> list[Values]:
        if fd is None:
            return []
        size = os.fstat(fd).st_size
        raw = os.pread(fd, size, 0) if size else b""
        return _parse_spool(raw, self.spool_path)

    def read_spool(self) -> list[Values]:
        """Every event in the spool file, in order (torn or foreign lines skipped)."""
        fd = self._lock_spool()
        try:
            return self._read_spool_fd(fd)
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def spool(self, events: Sequence[AuditEvent]) -> bool:
        """Append *events* to the spool and fsync it; ``False`` if that failed.

        A failed fsync is not retried: after one, the kernel may have dropped the data
        and a second fsync can "succeed" without it (the PostgreSQL fsync lesson).
        """
        data = b"".join(
            json.dumps(values_to_json(event_values(e)), ensure_ascii=False).encode(
                "utf-8", "backslashreplace"
            )
            + b"\n"
            for e in events
        )
        try:
            fd = os.open(self.spool_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            say(f"kill_switch: audit spool {self.spool_path} unavailable: {exc!r}")
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a torn line from a crash stays on its own line
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            return True
        except OSError as exc:
            say(f"kill_switch: audit spool {self.spool_path} write failed: {exc!r}")
            return False
        finally:
            os.close(fd)  # closing drops the flock


def _parse_spool(raw: bytes, where: str) -> list[Values]:
    out, bad = parse_spool(raw)
    if bad:
        say(f"kill_switch: skipped {bad} unreadable line(s) in audit spool {where}")
    return out
