"""Reading the audit log: queries, the cascade tree of an interrupt, JSONL export, and
``verify`` — all through a read-only connection, safe on a file a writer is using."""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.parse
from typing import IO, TYPE_CHECKING, Any, Literal

import attrs

from ._audit import INTERRUPT_DELIVERED, INTERRUPT_REQUESTED, STICKY_KINDS
from ._audit_chain import (
    COLUMN_SQL,
    COLUMNS,
    GENESIS,
    SCHEMA_VERSION,
    TRIGGERS,
    read_anchor,
    row_hash,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

_STICKY_MARKS = ", ".join("?" * len(STICKY_KINDS))
_SELECT = f"SELECT seq, {COLUMN_SQL}, prev_hash, row_hash FROM events"


@attrs.frozen
class AuditRecord:
    """One stored row of the audit log."""

    seq: int
    event_id: str
    wall_time: float
    mono_time: float
    session_id: str | None
    agent: str | None
    interrupt_id: str | None
    parent_event_id: str | None
    kind: str
    trigger: str | None
    reason: str | None
    operator: str | None
    details: Mapping[str, Any]
    prev_hash: str
    row_hash: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping of every field."""
        out = attrs.asdict(self)
        out["details"] = dict(self.details)
        return out


@attrs.frozen
class CascadeNode:
    """An event of an interrupt and the events caused by it (plane steps, child stops)."""

    record: AuditRecord
    children: tuple[CascadeNode, ...] = ()

    def walk(self) -> Iterator[tuple[int, AuditRecord]]:
        """Every (depth, record) of the tree, depth first."""
        stack: list[tuple[int, CascadeNode]] = [(0, self)]
        while stack:
            depth, node = stack.pop()
            yield depth, node.record
            stack.extend((depth + 1, c) for c in reversed(node.children))


AnchorState = Literal["match", "behind", "missing", "mismatch", "disabled"]


@attrs.frozen
class VerifyResult:
    """What ``verify`` found: ``ok`` only if every check passed."""

    ok: bool
    #: rows in the database.
    count: int
    head: str | None
    #: the first sequence number that is missing, out of place or altered.
    first_bad_seq: int | None = None
    problem: str | None = None
    #: ``match``: the anchored head is row N of this chain. ``behind``: it is, and rows
    #: after it are not anchored yet (a crash between commit and anchor). ``missing``:
    #: no anchor file. ``mismatch``: truncated or rewritten. ``disabled``: not checked.
    anchor: AnchorState = "disabled"
    anchored_count: int | None = None
    missing_triggers: tuple[str, ...] = ()

    def summary(self) -> str:
        """One readable line."""
        if self.ok:
            extra = "" if self.anchor in ("match", "disabled") else f" (anchor {self.anchor})"
            return f"intact: {self.count} rows, head {self.head}{extra}"
        where = f" at seq {self.first_bad_seq}" if self.first_bad_seq is not None else ""
        return f"TAMPERED{where}: {self.problem}"


def open_readonly(path: str | os.PathLike[str], *, timeout: float = 5.0) -> sqlite3.Connection:
    """Open *path* read-only (``mode=ro``): it never creates, migrates or writes.

    Raises:
        sqlite3.Error: the file is missing or not a database.
    """
    uri = f"file:{urllib.parse.quote(os.path.abspath(os.fspath(path)))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
    try:
        conn.execute("PRAGMA query_only=ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _record(row: tuple[Any, ...]) -> AuditRecord:
    fields = dict(zip(("seq", *COLUMNS, "prev_hash", "row_hash"), row, strict=True))
    try:
        details = json.loads(fields["details"])
    except (TypeError, ValueError):
        details = {"unparseable": fields["details"]}
    fields["details"] = details if isinstance(details, dict) else {"value": details}
    return AuditRecord(**fields)


class AuditLog:
    """A read-only view of an audit database; use it as a context manager.

    Raises:
        sqlite3.Error: the file is missing or not a database (on construction).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, anchor: str | os.PathLike[str] | None = None
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.anchor_path = os.path.abspath(os.fspath(anchor)) if anchor is not None else None
        self._conn = open_readonly(self.path)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def events(
        self,
        *,
        session_id: str | None = None,
        interrupt_id: str | None = None,
        trigger: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[AuditRecord]:
        """Rows matching every given filter, in sequence order (time range on wall time)."""
        where, args = _where(session_id, interrupt_id, trigger, kind, since, until)
        sql = _SELECT + where + " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [_record(r) for r in self._conn.execute(sql, args)]

    def cascade(self, interrupt_id: str) -> CascadeNode | None:
        """The tree of an interrupt: its request, each step, and child sessions' stops."""
        return self._cascade(interrupt_id, set())

    def _cascade(self, interrupt_id: str, seen: set[str]) -> CascadeNode | None:
        if interrupt_id in seen:
            return None
        seen.add(interrupt_id)
        records = self.events(interrupt_id=interrupt_id)
        if not records:
            return None
        root = next((r for r in records if r.kind == INTERRUPT_REQUESTED), records[0])
        ids = {r.event_id for r in records}
        kids: dict[str, list[AuditRecord]] = {}
        for r in records:
            if r is root:
                continue
            parent = r.parent_event_id if r.parent_event_id in ids else root.event_id
            kids.setdefault(parent, []).append(r)

        def build(record: AuditRecord) -> CascadeNode:
            children = [build(k) for k in kids.get(record.event_id, [])]
            if record.kind == INTERRUPT_DELIVERED:
                for child_session in record.details.get("children", ()) or ():
                    node = self._child_stop(str(child_session), record, seen)
                    if node is not None:
                        children.append(node)
            return CascadeNode(record, tuple(children))

        return build(root)

    def _child_stop(
        self, session_id: str, delivered: AuditRecord, seen: set[str]
    ) -> CascadeNode | None:
        rows = self._conn.execute(
            "SELECT interrupt_id FROM events WHERE session_id = ? AND kind = ? "
            "AND interrupt_id IS NOT NULL AND seq > ? ORDER BY seq LIMIT 1",
            (session_id, INTERRUPT_REQUESTED, 0),
        ).fetchall()
        return self._cascade(rows[0][0], seen) if rows else None

    def terminated_session_ids(self) -> set[str]:
        """Session ids with an ``interrupt_requested`` or ``cancelled_before_start`` row."""
        rows = self._conn.execute(
            f"SELECT DISTINCT session_id FROM events WHERE kind IN ({_STICKY_MARKS}) "
            "AND session_id IS NOT NULL",
            tuple(STICKY_KINDS),
        )
        return {r[0] for r in rows}

    def export_jsonl(self, out: IO[str], **filters: Any) -> int:
        """Write matching rows to *out* as JSON lines; returns how many."""
        n = 0
        for record in self.events(**filters):
            out.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
            n += 1
        return n

    def verify(self) -> VerifyResult:
        """Check every row's hash, the chain links, the sequence and the anchored head."""
        anchored = read_anchor(self.anchor_path) if self.anchor_path else None
        conn = self._conn
        conn.execute("BEGIN")  # one snapshot, taken after reading the anchor
        try:
            return _verify(conn, self.anchor_path, anchored)
        finally:
            conn.execute("COMMIT")


def _where(
    session_id: str | None,
    interrupt_id: str | None,
    trigger: str | None,
    kind: str | None,
    since: float | None,
    until: float | None,
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in (
        ("session_id", session_id),
        ("interrupt_id", interrupt_id),
        ('"trigger"', trigger),
        ("kind", kind),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        clauses.append("wall_time >= ?")
        args.append(float(since))
    if until is not None:
        clauses.append("wall_time < ?")
        args.append(float(until))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def _bad(count: int, head: str | None, seq: int, problem: str, **kw: Any) -> VerifyResult:
    return VerifyResult(False, count, head, first_bad_seq=seq, problem=problem, **kw)


def _verify(
    conn: sqlite3.Connection, anchor_path: str | None, anchored: tuple[int, str] | None
) -> VerifyResult:
    schema = {(r[0], r[1]) for r in conn.execute("SELECT type, name FROM sqlite_master")}
    has_table = ("table", "events") in schema
    missing = tuple(t for t in TRIGGERS if ("trigger", t) not in schema)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    expected, prev, head = 1, GENESIS, None
    try:
        for row in conn.execute(_SELECT + " ORDER BY seq") if has_table else ():
            seq, values, stored_prev, stored_hash = row[0], row[1:-2], row[-2], row[-1]
            if seq != expected:
                what = "missing" if seq > expected else "out of sequence"
                return _bad(expected - 1, head, expected, f"row {expected} is {what}")
            if stored_prev != prev:
                return _bad(
                    seq - 1,
                    head,
                    seq,
                    f"row {seq} does not link to row {seq - 1} "
                    "(deleted, inserted or reordered rows)",
                )
            if row_hash(seq, values, stored_prev) != stored_hash:
                return _bad(seq - 1, head, seq, f"row {seq} was altered (content != its hash)")
            prev = head = stored_hash
            expected += 1
    except sqlite3.DatabaseError as exc:  # a damaged page: the rows after are unreadable
        return _bad(expected - 1, head, expected, f"unreadable from row {expected}: {exc}")
    count = expected - 1
    try:
        check = [r[0] for r in conn.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as exc:
        check = [str(exc)]
    anchor_state: AnchorState = "disabled"
    anchored_count = None
    if anchor_path is not None:
        if anchored is None:
            anchor_state = "missing"
        else:
            anchored_count, anchored_head = anchored
            if anchored_count > count:
                return _bad(
                    count,
                    head,
                    count + 1,
                    f"rows {count + 1}..{anchored_count} are missing: the anchored head "
                    f"says {anchored_count} rows (truncated)",
                    anchor="mismatch",
                    anchored_count=anchored_count,
                )
            at = (
                conn.execute(
                    "SELECT row_hash FROM events WHERE seq = ?", (anchored_count,)
                ).fetchone()
                if has_table
                else None
            )
            if anchored_count > 0 and (at is None or at[0] != anchored_head):
                return _bad(
                    count,
                    head,
                    anchored_count,
                    f"row {anchored_count} differs from the anchored head (the chain was "
                    "rewritten)",
                    anchor="mismatch",
                    anchored_count=anchored_count,
                )
            anchor_state = "match" if anchored_count == count else "behind"
    problems = []
    if not has_table:
        problems.append("no events table")
    if missing:
        problems.append(f"protective triggers dropped: {', '.join(missing)}")
    if check != ["ok"]:
        problems.append(f"integrity check: {'; '.join(check[:5])}")
    if version != SCHEMA_VERSION:
        problems.append(f"schema version {version}, expected {SCHEMA_VERSION}")
    return VerifyResult(
        not problems,
        count,
        head,
        problem="; ".join(problems) or None,
        anchor=anchor_state,
        anchored_count=anchored_count,
        missing_triggers=missing,
    )


def verify(
    path: str | os.PathLike[str], *, anchor: str | os.PathLike[str] | None = "default"
) -> VerifyResult:
    """Verify the audit database at *path* (read-only) against its anchored head.

    *anchor* defaults to ``<path>.head``; ``None`` skips the anchor check.

    Raises:
        sqlite3.Error: the file is missing or not a database at all.
    """
    db = os.path.abspath(os.fspath(path))
    anchor_path = db + ".head" if anchor == "default" else anchor
    with AuditLog(db, anchor=anchor_path) as log:
        return log.verify()
