"""A runtime's membership of a fleet: lease, inventory, kills, and the dead man's switch.

The link uses only the runtime's public surface (``sessions()``, ``get()``,
``interrupt_where()``, ``interrupt_all()``, ``add_listener()``) plus the two things the
runtime hands it when it attaches: its audit recorder and its audit sink (for the chain
head quoted in the fleet's audit stream).

Its two service tasks are its own asyncio tasks, not a task group: like the audit
writer, they must outlive the cancel scopes of ``Runtime.__aenter__``'s caller and be
closed by ``__aexit__`` (a task group held across the two would break scope nesting).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, cast

import anyio

from kill_switch._vocabulary._audit_event import (
    FLEET_KILL,
    FLEET_LOST,
    SESSION_FINISHED,
    SESSION_REFUSED,
    SESSION_STARTED,
    AuditEvent,
    new_id,
)
from kill_switch._vocabulary._audit_event import FLEET_MESSAGE_REJECTED as FLEET_REJECTED
from kill_switch._vocabulary._audit_event import FLEET_RECONNECTED as FLEET_BACK
from kill_switch._vocabulary._exceptions import SessionRefused
from kill_switch._vocabulary._selector import Selector
from kill_switch.fleet import _wire

from ._fleet import Fleet, FleetUnavailable, _redis_errors

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from redis.asyncio import Redis

    from kill_switch._runtime import Runtime
    from kill_switch._vocabulary._handle import InterruptHandle


#: Most seconds between a kill's signature time and its stream entry (Redis clock): a
#: replayed old message is older than this. Covers clock skew between hosts.
MAX_SKEW = 60.0

#: Seconds a session start or stop waits before it is published (see the heartbeat).
_DEBOUNCE = 0.2

_WAKE_KINDS = frozenset({SESSION_STARTED, SESSION_FINISHED, "interrupt_completed"})


def check(fleet: object) -> Fleet:
    """*fleet* as a ``Fleet`` (a URL string becomes ``Fleet(url)``).

    Raises:
        TypeError / ValueError: not a Fleet or URL, or no key.
    """
    if isinstance(fleet, str):
        return Fleet(fleet)
    if not isinstance(fleet, Fleet):
        raise TypeError(f"fleet must be a Fleet or a redis:// URL, not {type(fleet).__name__}")
    return fleet


def _matches(sel: Mapping[str, Any], agent: str, labels: Mapping[str, str]) -> bool:
    selector = Selector(sel.get("agent"), sel.get("labels", {}), bool(sel.get("all")))
    return selector.matches(agent, labels)


class Link:
    """One runtime's membership of a fleet (``Runtime(fleet=...)`` builds it)."""

    def __init__(
        self, fleet: Fleet, runtime: Runtime, record: Callable[[AuditEvent], None], sink: Any
    ) -> None:
        self.fleet = fleet
        self.runtime = runtime
        self.runtime_id = new_id()
        self._record_fn = record
        self._sink = sink
        self._key = fleet._key
        self.keys = fleet.keys
        self.interval = max(fleet.lease / 3, 0.02)
        self._ops: Redis | None = None
        self._blocking: Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._kill_tasks: set[asyncio.Task[None]] = set()
        self._held: list[AuditEvent] = []  # recorded before the runtime's sink is open
        self._started = False
        # Sticky state, mirrored from Redis: session id -> kill payload; kill id -> payload.
        self.killed: dict[str, dict[str, Any]] = {}
        self.selectors: dict[str, dict[str, Any]] = {}
        self._applied: set[str] = set()  # kill ids applied here
        self._streamed: dict[str, float] = {}  # kill id -> stream time (replay detection)
        self._last_id = "0-0"
        self._published: dict[str, tuple[Any, ...]] = {}  # session id -> what changes
        self._resync = True
        self.last_ok = time.monotonic()
        self.lost = False
        self.lost_at: float | None = None  # monotonic
        self.last_error: str | None = None
        self._wake = asyncio.Event()  # asyncio: set from call_soon_threadsafe by a listener
        self._remove_listener: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.rejected = 0
        # Reports of the stops this runtime made for the fleet, so a repeated kill of a
        # stopped session answers with its report again (bounded, oldest dropped).
        self._reports: dict[str, Any] = {}
        self._me = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_at": time.time(),
                "lease": fleet.lease,
                "on_partition": fleet.on_partition,
            }
        )

    # --------------------------------------------------------------- lifetime

    async def connect(self) -> None:
        """Reach Redis, load every sticky kill and register (bounded by the lease).

        Raises:
            FleetUnavailable: Redis did not answer: the runtime does not start (a fleet
                member that cannot see the fleet's kills must not run agents unseen).
        """
        self._loop = asyncio.get_running_loop()
        self._ops = self.fleet._client()
        self._blocking = self.fleet._client(blocking=True)
        failure: BaseException | None = None
        try:
            with anyio.fail_after(max(self.fleet.lease, 1.0)):
                last: Any = await self._ops.xrevrange(self.keys["commands"], count=1)
                self._last_id = str(last[0][0]) if last else "0-0"
                await self._sync()
                await self._beat()
        except _redis_errors() as exc:
            failure = exc
        if failure is not None:
            await self._close_clients()
            raise FleetUnavailable(
                f"cannot join the fleet {self.fleet.name!r}: Redis did not answer ({failure!r})"
            )
        self.last_ok = time.monotonic()

    def start(self) -> None:
        """Start the heartbeat and the command listener (loop thread, after the runtime
        and its audit sink are open)."""
        self._started = True
        for event in self._held:
            self._record_fn(event)
        self._held.clear()
        loop = self._loop
        assert loop is not None

        def listener(event: AuditEvent) -> None:
            if event.kind in _WAKE_KINDS:
                loop.call_soon_threadsafe(self._wake.set)

        self._remove_listener = self.runtime.add_listener(listener)
        self._tasks = [
            loop.create_task(self._heartbeat_loop(), name="kill_switch fleet heartbeat"),
            loop.create_task(self._command_loop(), name="kill_switch fleet commands"),
        ]

    async def close(self) -> None:
        """Stop the service tasks and leave the fleet (deregister). Bounded, shielded."""
        if self._remove_listener is not None:
            self._remove_listener()
        bound = max(self.fleet.lease, 1.0)
        # Answers in flight go out first: a session killed through the fleet often ends
        # the worker's last session, and so its runtime, before its report is sent.
        with anyio.move_on_after(bound, shield=True):
            if self._kill_tasks:
                await asyncio.wait(set(self._kill_tasks))
        tasks = [*self._tasks, *self._kill_tasks]
        for t in tasks:
            t.cancel()
        with anyio.move_on_after(bound, shield=True):
            if tasks:
                await asyncio.wait(tasks)
            if self._ops is not None and not self.lost:
                k = self.keys
                try:
                    async with self._ops.pipeline(transaction=True) as pipe:
                        pipe.zrem(k["leases"], self.runtime_id)
                        pipe.hdel(k["runtimes"], self.runtime_id)
                        pipe.delete(k["sessions"] + self.runtime_id)
                        await pipe.execute()
                except _redis_errors() as exc:  # it shows as lost after its lease
                    sys.stderr.write(f"kill_switch: could not leave the fleet: {exc!r}\n")
            await self._close_clients()

    async def _close_clients(self) -> None:
        with anyio.move_on_after(1.0, shield=True):
            for c in (self._ops, self._blocking):
                if c is not None:
                    await c.aclose()

    def _record(self, event: AuditEvent) -> None:
        if self._started:
            self._record_fn(event)
        else:
            self._held.append(event)

    # --------------------------------------------------------- refusal (sync)

    def refuse(self, session_id: str, agent: str, labels: Mapping[str, str]) -> None:
        """Refuse a session the fleet forbids: a killed id, a banned agent or label, or
        any start while the fleet is lost under ``on_partition="stop"``.

        Raises:
            SessionRefused: with the reason (also audited as ``session_refused``).
        """
        why = self._forbidden(session_id, agent, labels, time.time())
        if why is not None:
            self._record(AuditEvent(SESSION_REFUSED, session_id, agent=agent, reason=why))
            raise SessionRefused(why)

    def _forbidden(
        self, session_id: str, agent: str, labels: Mapping[str, str], now: float
    ) -> str | None:
        if self.lost and self.fleet.on_partition == "stop":
            return (
                f"the fleet {self.fleet.name!r} is unreachable (lease lapsed): no session "
                "starts until it is back (on_partition='stop')"
            )
        kill = self.killed.get(session_id)
        if kill is not None:
            return (
                f"session {session_id} was killed through the fleet (kill {kill['kill_id']} "
                f"by {kill['operator']}); a kill is final"
            )
        for sel in self.selectors.values():
            until = sel.get("ban_until")
            if until is not None and now < until and _matches(sel["target"], agent, labels):
                return (
                    f"banned on the fleet until {time.strftime('%H:%M:%S', time.gmtime(until))}"
                    f" UTC (kill {sel['kill_id']} by {sel['operator']}: {sel['reason']})"
                )
        return None

    # ----------------------------------------------------------- heartbeat

    async def _heartbeat_loop(self) -> None:
        while True:
            began = time.monotonic()
            try:
                with anyio.fail_after(self.interval):
                    if self._resync:
                        await self._sync()
                    await self._beat()
            except (*_redis_errors(), _wire.Rejected) as exc:  # type: ignore[misc]  # a tuple of Exception classes
                self._resync = True
                self.last_error = repr(exc)
            except Exception as exc:  # a bug must not silence the dead man's switch below
                self._resync = True
                self.last_error = repr(exc)
                sys.stderr.write(f"kill_switch: fleet heartbeat failed: {exc!r}\n")
            else:
                self.last_ok = began
                if self.lost:
                    self.lost = False
                    self._record(
                        AuditEvent(
                            FLEET_BACK,
                            None,
                            reason="the fleet is reachable again",
                            details={"runtime_id": self.runtime_id},
                        )
                    )
            self._check_lease()
            self._sweep()
            with anyio.move_on_after(max(self.interval - (time.monotonic() - began), 0)):
                await self._wake.wait()
                # Debounce: a burst of starts and stops is published in one beat, after
                # the kills that caused it have answered (off their critical path).
                await anyio.sleep(min(_DEBOUNCE, self.interval))
            self._wake.clear()

    def _check_lease(self) -> None:
        """The dead man's switch: past the lease without a renewal, this runtime is lost
        to the fleet (the fleet already shows it so); by default it stops its sessions."""
        away = time.monotonic() - self.last_ok
        if self.lost or away <= self.fleet.lease:
            return
        self.lost = True
        self.lost_at = time.monotonic()
        stop = self.fleet.on_partition == "stop"
        reason = (
            f"fleet {self.fleet.name!r} unreachable for {away:.3f} s, longer than the "
            f"{self.fleet.lease} s lease ({self.last_error})"
        )
        self._record(
            AuditEvent(
                FLEET_LOST,
                None,
                reason=reason,
                details={
                    "runtime_id": self.runtime_id,
                    "on_partition": self.fleet.on_partition,
                    "seconds_away": away,
                },
            )
        )
        if stop:
            self.runtime.interrupt_all(reason, trigger="fleet_lost")

    async def _beat(self) -> None:
        """Renew the lease and publish what changed in the inventory (one round trip)."""
        assert self._ops is not None
        k = self.keys
        # Only what changed is encoded and sent: a beat with hundreds of sessions runs on
        # the same loop as the kills it must not delay.
        full = self._resync or not self._published
        current: dict[str, tuple[Any, ...]] = {}
        changed: dict[str, str] = {}
        for info in self.runtime.sessions():
            sid = info.session_id
            key = (info.state, info.interrupt_trigger, info.started_at)
            current[sid] = key
            if full or self._published.get(sid) != key:
                changed[sid] = json.dumps(_wire.snapshot(info), separators=(",", ":"))
        gone = [sid for sid in self._published if sid not in current]
        skey = k["sessions"] + self.runtime_id
        async with self._ops.pipeline(transaction=True) as pipe:
            pipe.eval(
                _HEARTBEAT,
                2,
                k["leases"],
                k["runtimes"],
                self.runtime_id,
                int(self.fleet.lease * 1000),
                int(self.fleet.retention * 1000),
                self._me,
            )
            if full:
                pipe.delete(skey)
            elif gone:
                pipe.hdel(skey, *gone)
            if changed:
                pipe.hset(skey, mapping=cast("Any", changed))  # redis-py's Mapping is invariant
            pipe.pexpire(skey, int(self.fleet.retention * 1000))
            await pipe.execute()
        self._published = current

    async def _sync(self) -> None:
        """Load every sticky kill and ban from Redis and apply what is new (at start and
        after every failure: kills issued while this runtime was away)."""
        assert self._ops is not None
        async with self._ops.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys["killed"])
            pipe.hgetall(self.keys["selectors"])
            killed, selectors = await pipe.execute()
        now = time.time()
        for field, raw in [*killed.items(), *selectors.items()]:
            msg = self._verify(raw, source="store")
            if msg is None:
                continue
            target = msg["target"]
            if "session_id" in target:
                if target["session_id"] != field:
                    self._reject("a signed kill stored under another session id", raw)
                    continue
            elif field != msg["kill_id"]:
                self._reject("a signed kill stored under another kill id", raw)
                continue
            expires = max(msg["issued_at"] + self.fleet.retention, msg.get("ban_until") or 0)
            if "session_id" not in target and expires < now:
                continue  # an old selector kill without a live ban: nothing left to do
            self._apply(msg, reply=False)
        self._resync = False

    # ------------------------------------------------------------- commands

    async def _command_loop(self) -> None:
        while True:
            try:
                assert self._blocking is not None
                block_ms = max(int(self.interval * 1000), 10)
                with anyio.fail_after(self.interval * 2 + 1.0):
                    got: Any = await self._blocking.xread(
                        {self.keys["commands"]: self._last_id}, count=100, block=block_ms
                    )
            except _redis_errors() as exc:
                self.last_error = repr(exc)
                self._resync = True
                await anyio.sleep(self.interval)  # back off; the heartbeat resyncs
                continue
            except Exception as exc:  # reported, and the listener goes on
                self.last_error = repr(exc)
                self._resync = True
                sys.stderr.write(f"kill_switch: fleet command read failed: {exc!r}\n")
                await anyio.sleep(self.interval)
                continue
            for _stream, entries in got or ():
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    raw = fields.get("m")
                    if raw is None:
                        self._reject("a command stream entry without a message", str(fields))
                        continue
                    msg = self._verify(raw, source="stream", entry_id=entry_id)
                    if msg is not None:
                        self._apply(msg, reply=True)

    def _verify(
        self, raw: str, *, source: str, entry_id: str | None = None
    ) -> dict[str, Any] | None:
        try:
            msg = _wire.open_envelope(self._key, raw)
            if msg["type"] != "kill":
                raise _wire.Rejected(f"a {msg['type']} message where only kills are acted on")
            _wire.check_kill(msg)
            kill_id = msg["kill_id"]
            if entry_id is not None:
                stamp = int(entry_id.split("-", 1)[0]) / 1000
                if abs(stamp - float(msg["issued_at"])) > MAX_SKEW:
                    raise _wire.Rejected(
                        f"replayed or stale kill {kill_id}: signed at {msg['issued_at']:.3f}, "
                        f"appended at {stamp:.3f}"
                    )
                if kill_id in self._streamed:
                    raise _wire.Rejected(f"replayed kill {kill_id}: already on the stream")
                # Older entries than the skew window are refused as stale anyway: only
                # the window's kill ids need remembering.
                self._streamed[kill_id] = stamp
                if len(self._streamed) > 1000:
                    self._streamed = {
                        k: t for k, t in self._streamed.items() if t > stamp - 2 * MAX_SKEW
                    }
        except (_wire.Rejected, KeyError, TypeError, ValueError) as exc:
            self._reject(str(exc), raw, source=source)
            return None
        return msg

    def _reject(self, why: str, raw: str, *, source: str = "store") -> None:
        self.rejected += 1
        self._record(
            AuditEvent(
                FLEET_REJECTED,
                None,
                reason=f"fleet message dropped: {why}",
                details={"runtime_id": self.runtime_id, "source": source, "message": raw[:500]},
            )
        )

    def _apply(self, msg: dict[str, Any], *, reply: bool) -> None:
        """Act on a verified kill once: remember it (sticky), interrupt what it hits here,
        and (from the stream) answer with the reports."""
        kill_id = msg["kill_id"]
        target = msg["target"]
        if "session_id" in target:
            self.killed[target["session_id"]] = msg
        else:
            self.selectors[kill_id] = msg
        first = kill_id not in self._applied
        self._applied.add(kill_id)
        handles = self._hit(msg, interrupt=first)
        if reply or (first and handles):
            assert self._loop is not None
            task = self._loop.create_task(self._answer(msg, handles))
            self._kill_tasks.add(task)
            task.add_done_callback(self._kill_tasks.discard)

    def _hit(self, msg: dict[str, Any], *, interrupt: bool) -> list[InterruptHandle]:
        """The stops of the live sessions *msg* covers; *interrupt*: start them (the
        first time this kill is applied here), else only those already under way."""
        target = msg["target"]
        if "session_id" in target:
            session = self.runtime.get(target["session_id"])
            sessions = [session] if session is not None else []
        else:
            limit = max(msg["issued_at"], msg.get("ban_until") or 0)
            sessions = []
            for info in self.runtime.sessions():
                started = info.started_at if info.started_at is not None else time.time()
                s = self.runtime.get(info.session_id)
                if s is not None and started <= limit and _matches(target, s.agent, s.labels):
                    sessions.append(s)
        handles = []
        for s in sessions:
            if not interrupt:
                if s.interrupted:
                    handles.append(s.handle)
                continue
            self._record(
                AuditEvent(
                    FLEET_KILL,
                    s.id,
                    agent=s.agent,
                    trigger="operator",
                    reason=msg["reason"],
                    operator=msg["operator"],
                    details={
                        "kill_id": msg["kill_id"],
                        "runtime_id": self.runtime_id,
                        "target": target,
                        "ban_until": msg.get("ban_until"),
                    },
                )
            )
            handles.append(s.interrupt(msg["reason"], trigger="operator", operator=msg["operator"]))
        return handles

    def _sweep(self) -> None:
        """Interrupt any live session a known kill or ban covers (a session created before
        its kill arrived and entered after it, say)."""
        now = time.time()
        for info in self.runtime.sessions():
            if info.interrupt_id is not None:
                continue
            why = self._forbidden(info.session_id, info.agent, info.labels, now)
            if why is not None and not (self.lost and self.fleet.on_partition == "stop"):
                s = self.runtime.get(info.session_id)
                if s is not None:
                    s.interrupt(why, trigger="operator")

    async def _answer(self, msg: dict[str, Any], handles: list[InterruptHandle]) -> None:
        """Wait for the stops (each handle resolves within its stop timeout), then push
        one signed reply and one signed audit entry quoting this log's chain head."""
        reports = [await h for h in handles]
        for rep in reports:
            self._reports[rep.session_id] = rep
            if len(self._reports) > 10_000:
                del self._reports[next(iter(self._reports))]
        sid = msg["target"].get("session_id")
        if sid is not None and not reports and sid in self._reports:
            reports = [self._reports[sid]]  # killed here before: the same stop, again
        head = None
        stats = getattr(self._sink, "statistics", None)
        if callable(stats):
            st = stats()
            head = {"seq": getattr(st, "head_seq", None), "hash": getattr(st, "head_hash", None)}
        payload = {
            "v": _wire.VERSION,
            "type": "reply",
            "kill_id": msg["kill_id"],
            "runtime_id": self.runtime_id,
            "reports": [_wire.report_to_dict(r) for r in reports],
            "head": head,
        }
        audit = {
            "v": _wire.VERSION,
            "type": "reply",
            "kill_id": msg["kill_id"],
            "runtime_id": self.runtime_id,
            "operator": msg["operator"],
            "sessions": [r.session_id for r in reports],
            "interrupt_ids": [r.interrupt_id for r in reports],
            "reports": [],
            "head": head,
        }
        assert self._ops is not None
        rkey = self.keys["reply"] + msg["kill_id"]
        try:
            with anyio.fail_after(max(self.fleet.lease, 1.0)):
                # The reply first, alone (one script: push and expire together), then
                # the audit entry, off the waiting operator's path.
                await self._ops.eval(
                    _REPLY, 1, rkey, _wire.sign(self._key, payload),
                    int(max(self.fleet.timeout, 60.0) * 1000),
                )  # fmt: skip
                if reports:
                    await self._ops.xadd(
                        self.keys["audit"],
                        {"m": _wire.sign(self._key, audit)},
                        maxlen=self.fleet.stream_length,
                        approximate=True,
                    )
        except _redis_errors() as exc:  # the kill happened; only its answer is lost
            self.last_error = repr(exc)
            sys.stderr.write(
                f"kill_switch: could not answer fleet kill {msg['kill_id']}: {exc!r}\n"
            )

    def statistics(self) -> dict[str, Any]:
        """A snapshot of this membership (for tests, the CLI and the dashboard)."""
        return {
            "runtime_id": self.runtime_id,
            "lost": self.lost,
            "seconds_since_renewal": time.monotonic() - self.last_ok,
            "killed": len(self.killed),
            "selectors": len(self.selectors),
            "rejected": self.rejected,
            "last_error": self.last_error,
        }


# Push a reply and give its list an expiry, atomically (a list never outlives its kill).
_REPLY = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# Renew one lease on Redis's clock (so hosts' clocks do not matter), register the
# runtime, and forget runtimes lost for longer than the retention.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[4])
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
for _, rid in ipairs(old) do
  redis.call('ZREM', KEYS[1], rid)
  redis.call('HDEL', KEYS[2], rid)
end
return now
"""
