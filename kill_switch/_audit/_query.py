"""Reading the audit log: queries, the cascade tree of an interrupt, JSONL export, and
``verify`` — all through a read-only connection, safe on a file a writer is using.

Events a writer could not put into the database (a busy or failing file, or the
watchdog's ``forced_exit`` record written while the event loop was stuck) wait in the
spool next to it until the next writer replays them into the chain. A reader shows
them too, after the chained rows, as records with ``seq=None`` ("spooled, not yet in
the chain"), and ``verify`` counts them: a post-mortem must see the last word.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import urllib.parse
from typing import IO, TYPE_CHECKING, Any, Literal

import attrs

from kill_switch._vocabulary._audit_event import (
    INTERRUPT_DELIVERED,
    INTERRUPT_REQUESTED,
    STICKY_KINDS,
)

from ._chain import (
    COLUMN_SQL,
    COLUMNS,
    GENESIS,
    HEAD_SUFFIX,
    SCHEMA_VERSION,
    SPOOL_SUFFIX,
    TRIGGERS,
    Values,
    present_ids,
    read_anchor,
    read_spool,
    row_hash,
    unique,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

_STICKY_MARKS = ", ".join("?" * len(STICKY_KINDS))
_SELECT = f"SELECT seq, {COLUMN_SQL}, prev_hash, row_hash FROM events"


@attrs.frozen
class AuditRecord:
    """One stored row of the audit log, or one event still in its spool.

    A spooled event is durable (fsynced) but not yet in the hash chain: its ``seq``,
    ``prev_hash`` and ``row_hash`` are ``None`` until the next writer appends it.
    """

    #: the row's place in the chain; ``None``: spooled, not yet in the chain.
    seq: int | None
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
    prev_hash: str | None
    row_hash: str | None

    @property
    def in_chain(self) -> bool:
        """Whether the event is a row of the hash chain (``False``: still spooled)."""
        return self.seq is not None

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
    #: durable events in the spool, not yet in the chain (the next writer appends them;
    #: the watchdog's ``forced_exit`` waits there after a forced exit).
    spooled: int = 0

    def summary(self) -> str:
        """One readable line."""
        if self.ok:
            extra = "" if self.anchor in ("match", "disabled") else f" (anchor {self.anchor})"
            line = f"intact: {self.count} rows, head {self.head}{extra}"
        else:
            where = f" at seq {self.first_bad_seq}" if self.first_bad_seq is not None else ""
            line = f"TAMPERED{where}: {self.problem}"
        if self.spooled:
            s = "" if self.spooled == 1 else "s"
            line += f"; {self.spooled} spooled record{s} not yet in the chain"
        return line


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
        self,
        path: str | os.PathLike[str],
        *,
        anchor: str | os.PathLike[str] | None = None,
        spool: str | os.PathLike[str] | None = "default",
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.anchor_path = os.path.abspath(os.fspath(anchor)) if anchor is not None else None
        #: the spool read beside the database (``None``: the database alone).
        self.spool_path = _side(self.path, spool, SPOOL_SUFFIX)
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
        spooled: bool = True,
    ) -> list[AuditRecord]:
        """Rows matching every given filter, in sequence order (time range on wall time),
        then the matching events still in the spool (``seq=None``) unless not *spooled*."""
        where, args = _where(session_id, interrupt_id, trigger, kind, since, until)
        sql = _SELECT + where + " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with self._snapshot_and_spool(spooled) as pending:
            # no table yet: a writer that never got to create it spooled everything
            rows = self._conn.execute(sql, args) if _has_events(self._conn) else ()
            records = [_record(r) for r in rows]
        room = None if limit is None else max(0, int(limit) - len(records))
        equal = {
            "session_id": session_id,
            "interrupt_id": interrupt_id,
            "trigger": trigger,
            "kind": kind,
        }
        wanted = _matching(pending, equal, since, until)
        records.extend(_spooled_record(v) for v in wanted[:room])
        return records

    def page(
        self,
        *,
        session_id: str | None = None,
        interrupt_id: str | None = None,
        trigger: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after: int | None = None,
        before: int | None = None,
        order: Literal["asc", "desc"] = "asc",
        limit: int = 100,
    ) -> list[AuditRecord]:
        """One page of chained rows for a paging reader (the control plane's API): the
        filters of ``events``, plus ``seq`` strictly between *after* and *before*, in
        *order* of ``seq``. Spooled events have no ``seq`` and are not paged."""
        where, args = _where(session_id, interrupt_id, trigger, kind, since, until)
        extra = []
        if after is not None:
            extra.append("seq > ?")
            args.append(int(after))
        if before is not None:
            extra.append("seq < ?")
            args.append(int(before))
        if extra:
            where += (" AND " if where else " WHERE ") + " AND ".join(extra)
        direction = "DESC" if order == "desc" else "ASC"
        args.append(int(limit))
        with _snapshot(self._conn):
            if not _has_events(self._conn):
                return []
            sql = f"{_SELECT}{where} ORDER BY seq {direction} LIMIT ?"
            return [_record(r) for r in self._conn.execute(sql, args)]

    def spooled(self) -> list[AuditRecord]:
        """The events in the spool that are not in the chain yet, in spool order."""
        with self._snapshot_and_spool() as pending:
            return [_spooled_record(v) for v in pending]

    @contextlib.contextmanager
    def _snapshot_and_spool(self, spooled: bool = True) -> Iterator[list[Values]]:
        """One read transaction, yielding the spooled events not in the chain in it.

        The spool is read first, then the check for replayed ids runs in the snapshot
        the caller's queries see: an event a writer replays meanwhile is seen exactly
        once. Not *spooled*: the snapshot alone.
        """
        pending: list[Values] = []
        if spooled and self.spool_path is not None:
            pending, _bad = read_spool(self.spool_path)  # torn lines: the writer reports
        with _snapshot(self._conn):
            yield _not_in_chain(self._conn, pending)

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
        # one snapshot, taken after reading the anchor and the spool
        with self._snapshot_and_spool() as pending:
            result = _verify(self._conn, self.anchor_path, anchored)
            spooled = len(pending)
        return attrs.evolve(result, spooled=spooled) if spooled else result


def _side(db: str, path: str | os.PathLike[str] | None, suffix: str) -> str | None:
    """A side file's path: ``"default"`` is *db* + *suffix*; ``None`` is none."""
    if path is None:
        return None
    return db + suffix if path == "default" else os.path.abspath(os.fspath(path))


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction: every query inside sees the same state of the file."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def _has_events(conn: sqlite3.Connection) -> bool:
    sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
    return conn.execute(sql).fetchone() is not None


def _not_in_chain(conn: sqlite3.Connection, values: list[Values]) -> list[Values]:
    """The spooled events whose ids are not rows yet (a writer that crashed between its
    commit and the spool's truncation leaves both), each once, in spool order."""
    if not values:
        return []
    values = unique(values)
    present = present_ids(conn, [v[0] for v in values]) if _has_events(conn) else set()
    return [v for v in values if v[0] not in present]


def _matching(
    values: list[Values],
    equal: Mapping[str, str | None],
    since: float | None,
    until: float | None,
) -> list[Values]:
    """The filters of :func:`_where` (*equal*: column → wanted value, ``None`` for any),
    applied to spooled events."""
    wanted = [(COLUMNS.index(column), want) for column, want in equal.items() if want is not None]
    out = []
    for v in values:
        if any(v[i] != want for i, want in wanted):
            continue
        if (since is not None and v[1] < since) or (until is not None and v[1] >= until):
            continue
        out.append(v)
    return out


def _spooled_record(values: Values) -> AuditRecord:
    return _record((None, *values, None, None))


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
    path: str | os.PathLike[str],
    *,
    anchor: str | os.PathLike[str] | None = "default",
    spool: str | os.PathLike[str] | None = "default",
) -> VerifyResult:
    """Verify the audit database at *path* (read-only) against its anchored head, and
    count the spooled events not yet in its chain.

    *anchor* defaults to ``<path>.head`` and *spool* to ``<path>.spool.jsonl``; ``None``
    skips the anchor check, or the spool.

    Raises:
        sqlite3.Error: the file is missing or not a database at all.
    """
    db = os.path.abspath(os.fspath(path))
    with AuditLog(db, anchor=_side(db, anchor, HEAD_SUFFIX), spool=spool) as log:
        return log.verify()
