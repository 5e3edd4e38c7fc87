"""``SqliteAudit``: the durable, tamper-evident audit sink (the one module using aiosqlite).

Invariants:
    * ``record()`` only appends to a list under a lock and wakes the writer; it never
      touches the disk, never blocks on I/O and never raises.
    * One writer task owns the connection. Each batch is committed as a single call on
      aiosqlite's thread (``Store.commit``: one transaction; its own invariants, and the
      spool's and the anchor's, are at the top of ``_store.py``).
    * An event counts as durable only after ``COMMIT`` returned with
      ``synchronous=FULL``. If the database is locked past ``busy_timeout``, full,
      read-only, corrupt or gone, the batch goes to an append-only, fsynced JSONL spool
      (and to stderr if even that fails) and ``flush()`` says ``"degraded"``. The spool
      is replayed in order, deduplicated by event id, once the database works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import aiosqlite
import anyio
import attrs

from kill_switch._vocabulary._audit_event import STICKY_KINDS, AuditEvent
from kill_switch._vocabulary._stderr import say
from kill_switch._vocabulary._validate import positive_int, seconds

from ._chain import HEAD_SUFFIX, SPOOL_SUFFIX, event_values, values_to_json
from ._store import Store

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from kill_switch._vocabulary._report import AuditStatus

T = TypeVar("T")

# SQLite's error names for "someone else holds the lock": the connection is fine.
_BUSY: Final = frozenset({"SQLITE_BUSY", "SQLITE_BUSY_SNAPSHOT", "SQLITE_LOCKED"})

if not hasattr(aiosqlite.Connection, "_execute"):  # pragma: no cover - guards an upgrade
    raise ImportError(
        "kill_switch needs aiosqlite's Connection._execute (aiosqlite 0.17-0.22); "
        "this aiosqlite has none"
    )

State = Literal["new", "durable", "degraded", "closing", "closed"]


@attrs.frozen
class AuditStatistics:
    """A snapshot of a ``SqliteAudit``: what it holds and where its events went."""

    path: str
    #: ``durable``: the last write committed; ``degraded``: the database is failing and
    #: events go to the spool; ``new`` / ``closing`` / ``closed``: its lifetime.
    state: State
    recorded: int
    committed: int
    #: events written to the spool file since entry (replayed or not).
    spooled: int
    #: recorded events not (yet) in the database.
    unsaved: int
    batches: int
    head_seq: int | None
    head_hash: str | None
    last_error: str | None


def _fallback_lines(events: Sequence[AuditEvent], why: str) -> None:
    """The last resort: one stderr line per event, carrying its event id."""
    for event in events:
        data = values_to_json(event_values(event))
        say(f"kill_switch audit fallback ({why}): {json.dumps(data, ensure_ascii=True)}")


def _describe(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return f"{name}: {exc}" if name else f"{type(exc).__name__}: {exc}"


def _is_busy(exc: BaseException) -> bool:
    return getattr(exc, "sqlite_errorname", None) in _BUSY


async def _on_connection(db: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run *fn* with the raw connection on aiosqlite's thread, as one hop.

    aiosqlite has no public way to run a callable on its thread; ``_execute`` is what
    each of its public methods uses. One hop per batch instead of five (BEGIN, SELECT,
    INSERT, SELECT, COMMIT) is what keeps a durable ack close to raw sqlite3.
    """
    result: T = await db._execute(lambda: fn(db._conn))  # type: ignore[no-untyped-call]  # aiosqlite leaves _execute untyped
    return result


class SqliteAudit:
    """The durable, tamper-evident ``AuditSink``: a hash-chained SQLite log.

    Use it as the runtime's sink (``Runtime(audit="audit.db")`` builds one), or on its
    own as an async context manager on an asyncio loop. ``record`` never blocks and never
    raises; ``flush`` reports ``"durable"`` only once every event recorded before it is
    committed with ``synchronous=FULL``.

    Args:
        path: the database file (created with its schema if missing, unless its anchor
            says a chain existed there: a deleted log is never silently restarted).
        spool: the fallback JSONL file (default ``<path>.spool.jsonl``).
        anchor: the side file holding the chain head (default ``<path>.head``);
            ``None`` disables it (``verify`` then cannot see tail truncation).
        busy_timeout: seconds a batch waits for another writer's lock before it spools.
        retry_interval: seconds after a failure before the database is tried again
            (new events meanwhile go straight to the spool). ``0`` retries every batch.
        close_timeout: bound on draining and closing at exit.
        max_batch: most events committed in one transaction.
        max_bytes: cap on the database size; past it writes fail as "disk full" and
            events are spooled.
        head_to_stderr: also write the chain head to stderr after every commit (for
            journald or a log shipper: an anchor outside this machine's disk).

    Raises:
        TypeError / ValueError: bad arguments.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        spool: str | os.PathLike[str] | None = None,
        anchor: str | os.PathLike[str] | Literal["default"] | None = "default",
        busy_timeout: float = 0.5,
        retry_interval: float = 1.0,
        close_timeout: float = 5.0,
        max_batch: int = 10_000,
        max_bytes: int | None = None,
        head_to_stderr: bool = False,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        seconds("busy_timeout", busy_timeout, zero_ok=True)
        seconds("retry_interval", retry_interval, zero_ok=True)
        seconds("close_timeout", close_timeout, zero_ok=True)
        positive_int("max_batch", max_batch)
        if max_bytes is not None:
            positive_int("max_bytes", max_bytes)
        db = os.path.abspath(os.fspath(path))
        spool_path = os.path.abspath(os.fspath(spool)) if spool is not None else db + SPOOL_SUFFIX
        if anchor == "default":
            anchor_path: str | None = db + HEAD_SUFFIX
        else:
            anchor_path = os.path.abspath(os.fspath(anchor)) if anchor is not None else None
        self.path = db
        self.spool_path = spool_path
        self.anchor_path = anchor_path
        self._store = Store(db, spool_path, anchor_path, head_to_stderr)
        self._busy_timeout = float(busy_timeout)
        self._retry_interval = float(retry_interval)
        self._close_timeout = float(close_timeout)
        self._max_batch = max_batch
        self._max_bytes = max_bytes

        self._lock = threading.Lock()
        self._pending: list[tuple[int, AuditEvent]] = []  # recorded, not yet taken
        self._recorded = 0  # local index of the last recorded event
        self._state: State = "new"
        # Writer-task state (loop thread only).
        self._settled = 0  # every event up to this index is in the database or spooled
        self._unsaved: list[tuple[int, AuditEvent]] = []  # settled but not in the database
        self._inflight: list[tuple[int, AuditEvent]] = []
        self._spool_dirty = False
        self._retry_requested = False
        self._last_failure: float | None = None
        self._last_error: str | None = None
        self._committed = 0
        self._spooled = 0
        self._batches = 0
        self._head: tuple[int, str] | None = None
        self._db: aiosqlite.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake: asyncio.Event | None = None
        self._progress: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._spool_limiter = anyio.CapacityLimiter(1)

    def __repr__(self) -> str:
        return f"<SqliteAudit {self.path!r} {self._state}>"

    # --------------------------------------------------------------- lifetime

    async def __aenter__(self) -> SqliteAudit:
        """Open the database and start the writer; never fails because of the disk.

        Raises:
            RuntimeError: entered twice, or not on an asyncio event loop.
        """
        if self._state != "new":
            raise RuntimeError("a SqliteAudit can be entered once")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "SqliteAudit needs an asyncio event loop: aiosqlite does not run on trio"
            ) from None
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()  # asyncio, not anyio: record() must set it cheaply
        self._progress = asyncio.Event()
        self._spool_dirty = await anyio.to_thread.run_sync(self._spool_has_data)
        await self._connect()
        # The writer must outlive any cancel scope of its caller and be closed by
        # __aexit__, which may run inside another scope: an own task, not a task group
        # (a task group held across __aenter__/__aexit__ would break scope nesting).
        self._task = loop.create_task(
            self._run(), name=f"kill_switch audit writer {self.path}", context=contextvars.Context()
        )
        self._state = "degraded" if self._db is None else "durable"
        self._wake.set()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Drain, replay what can be, close the connection; shielded and bounded."""
        task = self._task
        with self._lock:
            if self._state in ("closing", "closed"):
                return
            self._state = "closing"
        if task is None:
            self._state = "closed"
            return
        assert self._wake is not None
        self._wake.set()
        try:
            with anyio.move_on_after(self._close_timeout, shield=True):
                await asyncio.wait({task})
            if not task.done():
                task.cancel()
                with anyio.move_on_after(self._close_timeout, shield=True):
                    await asyncio.wait({task})
        finally:
            with self._lock:
                self._state = "closed"
            if task.done() and not task.cancelled() and task.exception() is not None:
                say(f"kill_switch: audit writer failed: {task.exception()!r}")

    def _spool_has_data(self) -> bool:
        try:
            return os.path.getsize(self.spool_path) > 0
        except OSError:
            return False

    # ------------------------------------------------------------ the contract

    def record_now(self, event: AuditEvent) -> bool:
        """Make *event* durable now, synchronously, without the event loop.

        For the watchdog's last word while the loop may be stuck: the event is appended
        to the fsynced spool (replayed into the database, in order and without
        duplicates, by the next writer). Returns whether the spool write succeeded;
        never raises.
        """
        try:
            return self._store.spool([event])
        except Exception as exc:  # the last word must never raise
            say(f"kill_switch: could not spool {event.kind} {event.event_id}: {exc!r}")
            return False

    def record(self, event: AuditEvent) -> None:
        """Queue *event* for the writer. Thread-safe; never blocks on I/O; never raises."""
        try:
            if not isinstance(event, AuditEvent):
                raise TypeError(f"expected an AuditEvent, got {type(event).__name__}")
            with self._lock:
                closed = self._state == "closed"
                if not closed:
                    self._recorded += 1
                    self._pending.append((self._recorded, event))
            if closed:
                _fallback_lines([event], "recorded after the audit log closed")
                return
            self._wake_writer()
        except Exception as exc:  # the contract: a sink never raises into a stop
            say(f"kill_switch: audit record failed: {exc!r}")

    def record_many(self, events: Sequence[AuditEvent]) -> None:
        """Queue *events* for the writer, in order, with one lock and one wake-up (the
        writer takes them as one batch). Thread-safe; never blocks on I/O; never raises."""
        try:
            good = []
            for event in events:
                if isinstance(event, AuditEvent):
                    good.append(event)
                else:
                    say(
                        f"kill_switch: audit record failed: expected an AuditEvent, got "
                        f"{type(event).__name__}"
                    )
            if not good:
                return
            with self._lock:
                closed = self._state == "closed"
                if not closed:
                    pending = self._pending
                    n = self._recorded
                    for event in good:
                        n += 1
                        pending.append((n, event))
                    self._recorded = n
            if closed:
                _fallback_lines(good, "recorded after the audit log closed")
                return
            self._wake_writer()
        except Exception as exc:  # the contract: a sink never raises into a stop
            say(f"kill_switch: audit record failed: {exc!r}")

    def _wake_writer(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return  # not entered yet: the writer takes the queue when it starts
        if threading.get_ident() == self._loop_thread:
            wake.set()
        else:
            # A closed loop: __aexit__ already spooled the rest.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    async def flush(self) -> AuditStatus:
        """Wait until every event recorded so far is committed or spooled; say which.

        Returns ``"durable"`` when all of them are committed, ``"degraded"`` when some
        are only in the spool (or on stderr), ``"pending"`` if the sink is not running.
        Cancellable at its only await: cancelling it loses and duplicates nothing, the
        writer carries on.
        """
        with self._lock:
            target = self._recorded
        retried = False
        while True:
            task, progress = self._task, self._progress
            if self._settled >= target:
                unsaved = self._unsaved
                if not (unsaved and unsaved[0][0] <= target):
                    return "durable"
                if retried or not self._retry_due() or task is None or task.done():
                    return "degraded"
                # Spooled events are due for another try: give the database one chance.
                retried = True
                self._retry_requested = True
            elif task is None or task.done():
                return "pending" if self._state == "new" else "degraded"
            assert progress is not None
            self._wake_writer()
            await progress.wait()

    # -------------------------------------------------------------- extras

    async def terminated_session_ids(self) -> frozenset[str]:
        """Session ids with an ``interrupt_requested`` / ``cancelled_before_start`` event.

        Reads the database read-only in a worker thread, plus the spool and events not
        yet written. An unreadable database contributes nothing (and says so on stderr).
        """
        from ._query import AuditLog

        def read() -> set[str]:
            ids: set[str] = set()
            try:
                with AuditLog(self.path, anchor=None) as log:
                    ids |= log.terminated_session_ids()
            except (sqlite3.Error, OSError) as exc:
                say(f"kill_switch: could not read terminated sessions: {exc!r}")
            for values in self._store.read_spool():
                if values[7] in STICKY_KINDS and values[3] is not None:
                    ids.add(values[3])
            return ids

        ids = await anyio.to_thread.run_sync(read)
        with self._lock:
            queued = [e for _, e in self._pending]
        for event in [e for _, e in self._unsaved] + [e for _, e in self._inflight] + queued:
            if event.kind in STICKY_KINDS and event.session_id is not None:
                ids.add(event.session_id)
        return frozenset(ids)

    async def verify(self) -> Any:
        """Verify the chain and its anchor (read-only, in a worker thread).

        Returns a ``VerifyResult``.
        """
        from ._query import verify

        return await anyio.to_thread.run_sync(
            lambda: verify(self.path, anchor=self.anchor_path, spool=self.spool_path)
        )

    def statistics(self) -> AuditStatistics:
        """A snapshot of what this sink holds and where its events went."""
        with self._lock:
            recorded, state, pending = self._recorded, self._state, len(self._pending)
        head = self._head
        return AuditStatistics(
            path=self.path,
            state=state,
            recorded=recorded,
            committed=self._committed,
            spooled=self._spooled,
            unsaved=len(self._unsaved) + len(self._inflight) + pending,
            batches=self._batches,
            head_seq=head[0] if head else None,
            head_hash=head[1] if head else None,
            last_error=self._last_error,
        )

    # -------------------------------------------------------------- writer

    def _take(self) -> tuple[list[tuple[int, AuditEvent]], bool]:
        with self._lock:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            return batch, self._state == "closing"

    def _retry_due(self) -> bool:
        last = self._last_failure
        return last is None or time.monotonic() - last >= self._retry_interval

    def _needs_replay(self) -> bool:
        return bool(self._unsaved) or self._spool_dirty

    def _notify(self) -> None:
        progress = self._progress
        self._progress = asyncio.Event()
        if progress is not None:
            progress.set()

    def _idle_wait(self) -> float:
        """Seconds until the spool is due for a retry with no new events."""
        last = self._last_failure
        if last is None:
            return 0.0
        return max(0.0, max(self._retry_interval, 0.05) - (time.monotonic() - last))

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        final = False
        try:
            while True:
                wake.clear()  # before taking: a record() after this sets it again
                batch, closing = self._take()
                replay = self._needs_replay() and (
                    self._retry_requested or self._idle_wait() == 0.0 or (closing and not final)
                )
                if batch or replay:
                    final = final or (closing and not batch)
                    self._retry_requested = False
                    self._inflight = batch
                    await self._write(batch, force=replay)
                    self._inflight = []
                    continue
                if closing:
                    return
                if self._needs_replay():
                    with anyio.move_on_after(self._idle_wait()):
                        await wake.wait()
                else:
                    await wake.wait()
        finally:
            self._last_resort()
            with anyio.move_on_after(2 * self._close_timeout + 1.0, shield=True):
                await self._disconnect()

    def _last_resort(self) -> None:
        """Exit path: whatever is not settled goes to the spool (or stderr). Sync, bounded."""
        with self._lock:
            rest = self._inflight + self._pending
            self._pending = []
            self._state = "closed" if self._state == "closing" else self._state
        self._inflight = []
        if rest:
            # A cancelled in-flight batch may still commit on aiosqlite's thread: spooling
            # it too is safe, replay skips event ids already in the database.
            if self._store.spool([e for _, e in rest]):
                self._spooled += len(rest)
            else:
                _fallback_lines([e for _, e in rest], "audit log closing")
            self._unsaved.extend(rest)
            self._settled = max(self._settled, rest[-1][0])
            self._notify()

    async def _write(self, batch: list[tuple[int, AuditEvent]], *, force: bool) -> None:
        if (force or self._retry_due()) and await self._commit(batch):
            if batch:
                self._settled = batch[-1][0]
            self._notify()
            return
        await self._fallback(batch)

    async def _commit(self, batch: list[tuple[int, AuditEvent]]) -> bool:
        if self._db is None and not await self._connect():
            return False
        db = self._db
        assert db is not None
        events = [e for _, e in self._unsaved] + [e for _, e in batch]
        replay, dedup = self._spool_dirty, bool(self._unsaved)
        store = self._store
        try:
            seq, head, inserted = await _on_connection(
                db, lambda conn: store.commit(conn, events, replay, dedup)
            )
        except Exception as exc:  # any disk-path failure: spool, never raise
            self._failed(exc)
            if not _is_busy(exc):
                await self._disconnect()
            return False
        self._committed += inserted
        self._batches += 1
        self._head = (seq, head)
        self._unsaved = []
        self._spool_dirty = False
        self._last_failure = None
        with self._lock:
            if self._state == "degraded":
                self._state = "durable"
        return True

    async def _fallback(self, batch: list[tuple[int, AuditEvent]]) -> None:
        if batch:
            events = [e for _, e in batch]
            ok = await anyio.to_thread.run_sync(
                self._store.spool, events, limiter=self._spool_limiter
            )
            if ok:
                self._spooled += len(batch)
                self._spool_dirty = True
            else:
                _fallback_lines(events, "database and spool unavailable")
            self._unsaved.extend(batch)
            self._settled = batch[-1][0]
        self._notify()

    def _failed(self, exc: BaseException) -> None:
        first = self._last_failure is None
        self._last_failure = time.monotonic()
        self._last_error = _describe(exc)
        with self._lock:
            if self._state == "durable":
                self._state = "degraded"
        if first:
            say(
                f"kill_switch: audit database {self.path} failed ({self._last_error}); "
                f"events go to {self.spool_path} until it works again"
            )

    async def _connect(self) -> bool:
        store = self._store
        db: aiosqlite.Connection | None = None
        try:
            uri = await anyio.to_thread.run_sync(store.connect_uri)
            db = aiosqlite.connect(uri, uri=True, isolation_level=None, timeout=self._busy_timeout)
            await db
            max_bytes = self._max_bytes
            await _on_connection(db, lambda conn: store.setup(conn, max_bytes))
        except Exception as exc:  # unopenable/read-only/corrupt/newer: spool
            self._failed(exc)
            if db is not None:
                self._db = db
                await self._disconnect()
            return False
        self._db = db
        return True

    async def _disconnect(self) -> None:
        """Close the connection, shielded and bounded; stop its thread if that hangs."""
        db, self._db = self._db, None
        if db is None:
            return
        closed = False
        with anyio.move_on_after(self._close_timeout, shield=True):
            try:
                await db.close()
                closed = True
            except Exception as exc:  # a broken connection may fail to close
                say(f"kill_switch: closing audit database failed: {exc!r}")
            # After a failed connect aiosqlite stops its thread without waiting for it; the
            # thread then posts to this loop, which must still be open (aiosqlite#241).
            thread = getattr(db, "_thread", None)
            if thread is not None and thread.is_alive():
                await anyio.to_thread.run_sync(thread.join, self._close_timeout)
        if closed:
            self._store.close_anchor()
        else:
            db.stop()  # ends aiosqlite's thread once its queue drains: no hang at exit
