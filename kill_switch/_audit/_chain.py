"""The audit log's on-disk format: schema versions, canonical row content and its hash.

Every row of ``events`` carries ``row_hash = sha256(canonical(tag, seq, content,
prev_hash))`` where ``prev_hash`` is the previous row's ``row_hash`` (``GENESIS`` for
seq 1). The writer (``_store``) and the verifier (``_query``) both use the functions
here, so the two can never disagree about what a row's hash covers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import sqlite3

    from kill_switch._vocabulary._audit_event import AuditEvent

#: ``PRAGMA user_version`` of a database this code writes.
SCHEMA_VERSION: Final = 1
#: The ``prev_hash`` of row 1.
GENESIS: Final = "0" * 64
#: Domain separation: a hash of this format cannot be confused with any other sha256.
HASH_TAG: Final = "kill_switch.audit.v1"

#: The side files a database at PATH has by default: its anchored head and its spool.
HEAD_SUFFIX: Final = ".head"
SPOOL_SUFFIX: Final = ".spool.jsonl"

#: The columns a writer supplies, in order (``seq`` and the hashes are added by the chain).
COLUMNS: Final = (
    "event_id",
    "wall_time",
    "mono_time",
    "session_id",
    "agent",
    "interrupt_id",
    "parent_event_id",
    "kind",
    "trigger",
    "reason",
    "operator",
    "details",
)
#: ``trigger`` is an SQL keyword: always quote the column list.
COLUMN_SQL: Final = ", ".join(f'"{c}"' for c in COLUMNS)

#: Rows a writer hands to the chain: the values of ``COLUMNS``, in order.
Values = tuple[Any, ...]

_APPEND_ONLY = "kill_switch audit log is append-only"

# Version 1. Later versions append their own statement lists to MIGRATIONS; a database
# is brought forward one version at a time inside one BEGIN IMMEDIATE transaction.
_V1: Final = (
    """
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,            -- assigned by SQLite: max + 1, gap-free
        event_id TEXT NOT NULL UNIQUE,      -- retries and spool replays are idempotent
        wall_time REAL NOT NULL,
        mono_time REAL NOT NULL,
        session_id TEXT,
        agent TEXT,
        interrupt_id TEXT,
        parent_event_id TEXT,
        kind TEXT NOT NULL,
        "trigger" TEXT,
        reason TEXT,
        operator TEXT,
        details TEXT NOT NULL,              -- canonical JSON
        prev_hash TEXT NOT NULL,
        row_hash TEXT NOT NULL
    )
    """,
    "CREATE INDEX events_session ON events(session_id)",
    "CREATE INDEX events_interrupt ON events(interrupt_id)",
    f"""
    CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}: UPDATE rejected'); END
    """,
    f"""
    CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}: DELETE rejected'); END
    """,
    # REPLACE deletes the conflicting row without firing DELETE triggers unless
    # recursive_triggers is on (the writer turns it on; a sqlite3 shell does not).
    f"""
    CREATE TRIGGER events_no_replace BEFORE INSERT ON events
    WHEN EXISTS (SELECT 1 FROM events WHERE event_id = NEW.event_id)
    BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}: duplicate event_id rejected'); END
    """,
)

#: version → statements that bring a database from ``version - 1`` to ``version``.
MIGRATIONS: Final[Mapping[int, Sequence[str]]] = {1: _V1}
#: Triggers whose absence ``verify`` reports as tampering.
TRIGGERS: Final = ("events_no_delete", "events_no_replace", "events_no_update")


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: SQLite cannot store them
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _number(value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]  # anything float() takes
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0  # SQLite stores NaN as NULL


# Built once: json.dumps(**options) builds a new encoder per call, a third of the cost.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr
)
_HASH_INPUT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def canonical_json(value: object) -> str:
    """Serialise *value* as canonical JSON (sorted keys, no spaces); never raises."""
    if not value and isinstance(value, dict):
        return "{}"
    try:
        text = _CANONICAL.encode(value)
    except (TypeError, ValueError) as exc:  # circular, non-str keys: keep what it was
        text = json.dumps({"unserialisable": repr(value), "error": repr(exc)})
    return _text(text) or "{}"


def event_values(event: AuditEvent) -> Values:
    """The column values of *event*, cleaned so that SQLite always accepts them."""
    details = event.details
    return (
        _text(event.event_id) or "",
        _number(event.wall_time),
        _number(event.mono_time),
        _text(event.session_id),
        _text(event.agent),
        _text(event.interrupt_id),
        _text(event.parent_event_id),
        _text(event.kind) or "",
        _text(event.trigger),
        _text(event.reason),
        _text(event.operator),
        canonical_json(dict(details) if isinstance(details, Mapping) else details),
    )


def row_hash(seq: int, values: Sequence[Any], prev_hash: str) -> str:
    """The chain hash of the row at *seq* with column *values* after *prev_hash*."""
    payload = _HASH_INPUT.encode([HASH_TAG, seq, *values, prev_hash])
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


def values_to_json(values: Sequence[Any]) -> dict[str, Any]:
    """A spool/export mapping of column values (``details`` parsed back into JSON)."""
    out = dict(zip(COLUMNS, values, strict=True))
    out["details"] = json.loads(out["details"])
    return out


def values_from_json(data: Mapping[str, Any]) -> Values:
    """Column values from a spool line written by ``values_to_json``.

    Raises:
        KeyError / TypeError / ValueError: the line is not a spooled event.
    """
    if not isinstance(data.get("event_id"), str) or not isinstance(data.get("kind"), str):
        raise ValueError("not a spooled audit event")
    return (
        data["event_id"],
        _number(data["wall_time"]),
        _number(data["mono_time"]),
        _text(data.get("session_id")),
        _text(data.get("agent")),
        _text(data.get("interrupt_id")),
        _text(data.get("parent_event_id")),
        data["kind"],
        _text(data.get("trigger")),
        _text(data.get("reason")),
        _text(data.get("operator")),
        canonical_json(data.get("details", {})),
    )


HEAD_WIDTH: Final = 128


def encode_head(count: int, head: str) -> bytes:
    """The anchor line for a chain of *count* rows ending in *head* (fixed width)."""
    line = json.dumps({"count": count, "head": head}, separators=(",", ":"))
    return line.ljust(HEAD_WIDTH - 1).encode() + b"\n"


def decode_head(raw: bytes) -> tuple[int, str] | None:
    """Parse an anchor line; ``None`` if it is empty or unreadable."""
    try:
        data = json.loads(raw.decode())
        count, head = data["count"], data["head"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    if isinstance(count, int) and count >= 0 and isinstance(head, str):
        return count, head
    return None


def parse_spool(raw: bytes) -> tuple[list[Values], int]:
    """The events of a spool file's contents, in order, and how many lines were
    unreadable (a line torn by a crash, or not an event)."""
    out: list[Values] = []
    bad = 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            out.append(values_from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            bad += 1
    return out, bad


def read_spool(path: str) -> tuple[list[Values], int]:
    """The events in the spool at *path* (none if there is no file), and the count of
    unreadable lines. Read under a shared ``flock``, held only for the read: a writer
    appends and replays under an exclusive one.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return [], 0
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        size = os.fstat(fd).st_size
        raw = os.pread(fd, size, 0) if size else b""
    finally:
        os.close(fd)  # closing drops the flock
    return parse_spool(raw)


def unique(values: list[Values]) -> list[Values]:
    """*values* with each event id once (its first), in order: an event can be spooled
    twice (a retried record, or a batch spooled while it was committing)."""
    seen: set[str] = set()
    out = []
    for v in values:
        if v[0] not in seen:
            seen.add(v[0])
            out.append(v)
    return out


def present_ids(conn: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
    """The event ids among *ids* that are rows of ``events`` already (the table must
    exist); asked 500 at a time, under SQLite's cap on bound parameters."""
    present: set[str] = set()
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT event_id FROM events WHERE event_id IN ({marks})"
        present.update(r[0] for r in conn.execute(sql, chunk))
    return present


def read_anchor(path: str) -> tuple[int, str] | None:
    """The head anchored in the file at *path*, or ``None`` (no file, or unreadable).

    Read under a shared ``flock``: the writer rewrites it in place under an exclusive one.
    """
    try:
        with open(path, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            return decode_head(f.read(4096))
    except FileNotFoundError:
        return None
