"""``Fleet``: the fleet's options, and the operator's client (inventory and kills)."""

from __future__ import annotations

import json
import math
import os
import time
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio
import attrs

from kill_switch._vocabulary._audit_event import new_id
from kill_switch._vocabulary._exceptions import KillSwitchError
from kill_switch._vocabulary._triggers import bound_operator, bound_reason
from kill_switch.fleet import _wire

if TYPE_CHECKING:
    from collections.abc import Mapping

    from redis.asyncio import Redis

    from kill_switch._vocabulary._report import StopReport

ENV_URL: Final = "KILL_SWITCH_FLEET"
ENV_KEY: Final = "KILL_SWITCH_FLEET_KEY"
MIN_KEY_BYTES: Final = 16

OnPartition = Literal["stop", "continue"]


class FleetError(KillSwitchError):
    """A fleet operation failed (Redis unreachable, a runtime not answering, ...)."""


class FleetUnavailable(FleetError):
    """Redis could not be reached within the bound."""


class NoAnswer(FleetError):
    """A kill was recorded (it is sticky) but the runtime(s) named did not answer in time,
    or no live runtime holds the session."""

    def __init__(self, message: str, *, kill_id: str, runtimes: tuple[str, ...]) -> None:
        super().__init__(message)
        self.kill_id = kill_id
        self.runtimes = runtimes


@attrs.frozen
class FleetRuntime:
    """A runtime of the fleet as its lease shows it."""

    runtime_id: str
    host: str
    pid: int
    started_at: float
    lease: float
    on_partition: str
    #: its lease lapsed: its sessions are shown as ``unknown``.
    lost: bool
    #: seconds until its lease lapses (negative: since it lapsed).
    lease_left: float


@attrs.frozen
class FleetSession:
    """A session somewhere in the fleet, as its runtime last published it."""

    session_id: str
    agent: str
    labels: dict[str, str] = attrs.field(hash=False)
    #: the session's state, or ``unknown`` when its runtime's lease lapsed.
    state: str
    started_at: float | None
    parent_id: str | None
    interrupt_trigger: str | None
    runtime_id: str
    host: str
    pid: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return attrs.asdict(self)


@attrs.frozen
class FleetKillResult:
    """What a selector kill did: one report per session stopped, and who did not answer."""

    kill_id: str
    reports: tuple[StopReport, ...]
    #: live runtimes that did not answer within the timeout (their kills stay sticky).
    unanswered: tuple[str, ...]
    #: end of the ban, wall clock (``None``: no ban).
    ban_until: float | None


def _check_key(key: bytes | str | None) -> bytes:
    if key is None:
        env = os.environ.get(ENV_KEY)
        if not env:
            raise ValueError(
                f"a fleet needs a key: pass key=... or set ${ENV_KEY} "
                "(fleet messages are authenticated; there is no unauthenticated mode)"
            )
        key = env
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes):
        raise TypeError(f"key must be bytes or str, not {type(key).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the fleet key must be at least {MIN_KEY_BYTES} bytes")
    return key


def _seconds(name: str, value: object, *, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not (math.isfinite(value) and value >= minimum):
        raise ValueError(f"{name} must be finite and >= {minimum}, got {value!r}")
    return float(value)


def _redis_errors() -> tuple[type[Exception], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


class Fleet:
    """A fleet of runtimes sharing one Redis: options for ``Runtime(fleet=...)``, and the
    operator's client (``async with Fleet(url) as fleet``).

    Args:
        url: ``redis://[user:password@]host:port/db`` or ``rediss://`` (TLS); default
            ``$KILL_SWITCH_FLEET``.
        key: the fleet key (bytes or str, >= 16 bytes) authenticating every message;
            default ``$KILL_SWITCH_FLEET_KEY``. Required.
        lease: seconds a runtime's registration lives without a heartbeat; it renews
            every third of it. Past it the fleet shows the runtime as lost.
        on_partition: ``"stop"`` (default): a runtime that cannot reach Redis for longer
            than its lease interrupts its sessions (trigger ``fleet_lost``) and refuses
            new ones until it is back; ``"continue"``: it keeps them running.
        name: the fleet's name (one Redis may hold several fleets).
        timeout: seconds an operator waits for the owners' reports (default 30).
        stream_length: approximate bound on the command and audit streams.
        retention: seconds a lost runtime stays listed, and a kill without a ban is
            replayed to runtimes that reconnect.

    Raises:
        TypeError / ValueError: bad arguments, or no key.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        key: bytes | str | None = None,
        lease: float = 15.0,
        on_partition: OnPartition = "stop",
        name: str = "default",
        timeout: float = 30.0,
        stream_length: int = 10_000,
        retention: float = 86_400.0,
    ) -> None:
        if url is None:
            url = os.environ.get(ENV_URL)
            if not url:
                raise ValueError(f"no fleet URL: pass one or set ${ENV_URL}")
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"the fleet URL must be redis://, rediss:// or unix://, got {url!r}")
        if on_partition not in ("stop", "continue"):
            raise ValueError(f"on_partition must be 'stop' or 'continue', got {on_partition!r}")
        if not isinstance(name, str) or not name or "{" in name or "}" in name:
            raise ValueError(f"name must be a non-empty str without braces, got {name!r}")
        if isinstance(stream_length, bool) or not isinstance(stream_length, int):
            raise TypeError("stream_length must be an int")
        if stream_length < 100:
            raise ValueError("stream_length must be >= 100")
        self.url = url
        self._key = _check_key(key)
        self.lease = _seconds("lease", lease, minimum=0.05)
        self.on_partition: OnPartition = on_partition
        self.name = name
        self.timeout = _seconds("timeout", timeout, minimum=0.0)
        self.stream_length = stream_length
        self.retention = _seconds("retention", retention, minimum=1.0)
        self.keys = _wire.keys(name)
        self._redis: Redis | None = None
        self._offset = 0.0  # Redis's clock minus this host's, measured on entry
        #: replies dropped because they failed authentication (newest last, bounded).
        self.rejected: list[str] = []

    def __repr__(self) -> str:
        # Never the key, nor a password in the URL.
        return f"<Fleet {self.name!r} lease={self.lease} on_partition={self.on_partition!r}>"

    # ------------------------------------------------------------ connection

    def _client(self, *, blocking: bool = False) -> Redis:
        try:
            from redis.asyncio import Redis
        except ImportError:  # pragma: no cover - depends on the install
            raise ImportError(
                "kill_switch.fleet needs redis-py: pip install 'kill-switch[fleet]'"
            ) from None
        bound = max(self.lease / 3, 0.05)
        return Redis.from_url(
            self.url,
            decode_responses=True,
            socket_connect_timeout=bound,
            # Blocking reads (XREAD BLOCK, BLPOP) are bounded by the caller's cancel scope;
            # redis-py drops a connection whose command was cancelled (since 4.5.4).
            socket_timeout=None if blocking else bound,
            health_check_interval=0,
        )

    async def __aenter__(self) -> Fleet:
        """Connect to Redis (bounded by the lease).

        Raises:
            FleetUnavailable: Redis did not answer.
        """
        self._redis = self._client(blocking=True)
        try:
            with anyio.fail_after(max(self.lease, 1.0)):
                before = time.time()
                sec, usec = await self._redis.time()
                after = time.time()
            # Kills are dated on Redis's clock (runtimes compare that date with the time
            # Redis appended them to spot replays), whatever this host's clock says.
            self._offset = sec + usec / 1e6 - (before + after) / 2
        except _redis_errors() as exc:
            with anyio.move_on_after(1.0, shield=True):
                await self._redis.aclose()
            self._redis = None
            raise FleetUnavailable(f"cannot reach the fleet's Redis: {exc!r}") from None
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._redis is not None:
            with anyio.move_on_after(1.0, shield=True):
                await self._redis.aclose()
            self._redis = None

    def _conn(self) -> Redis:
        if self._redis is None:
            raise RuntimeError("use the fleet as `async with Fleet(url) as fleet:` first")
        return self._redis

    # ------------------------------------------------------------- inventory

    async def runtimes(self) -> tuple[FleetRuntime, ...]:
        """Every runtime listed in the fleet, live or lost.

        Raises:
            FleetUnavailable: Redis did not answer within the fleet's timeout.
        """
        rts, _ = await self._inventory(sessions=False)
        return rts

    async def sessions(self) -> tuple[FleetSession, ...]:
        """Every session of every runtime; those of lost runtimes are ``unknown``.

        Raises:
            FleetUnavailable: Redis did not answer within the fleet's timeout.
        """
        _, sessions = await self._inventory(sessions=True)
        return sessions

    async def _inventory(
        self, *, sessions: bool
    ) -> tuple[tuple[FleetRuntime, ...], tuple[FleetSession, ...]]:
        r = self._conn()
        k = self.keys
        try:
            with anyio.fail_after(self.timeout or None):
                async with r.pipeline(transaction=False) as pipe:
                    pipe.time()
                    pipe.zrange(k["leases"], 0, -1, withscores=True)
                    pipe.hgetall(k["runtimes"])
                    now_t, leases, infos = await pipe.execute()
                rids = [rid for rid, _ in leases]
                blobs: list[dict[str, str]] = []
                if sessions and rids:
                    async with r.pipeline(transaction=False) as pipe:
                        for rid in rids:
                            pipe.hgetall(k["sessions"] + rid)
                        blobs = await pipe.execute()
        except _redis_errors() as exc:
            raise FleetUnavailable(f"cannot read the fleet inventory: {exc!r}") from None
        now_ms = int(now_t[0]) * 1000 + int(now_t[1]) // 1000
        runtimes = []
        out: list[FleetSession] = []
        for i, (rid, deadline) in enumerate(leases):
            info = json.loads(infos.get(rid, "{}"))
            lost = deadline < now_ms
            rt = FleetRuntime(
                runtime_id=rid,
                host=str(info.get("host", "?")),
                pid=int(info.get("pid", 0)),
                started_at=float(info.get("started_at", 0.0)),
                lease=float(info.get("lease", 0.0)),
                on_partition=str(info.get("on_partition", "?")),
                lost=lost,
                lease_left=(deadline - now_ms) / 1000,
            )
            runtimes.append(rt)
            if not sessions:
                continue
            # One json.loads per runtime, not per session: the decoding, not Redis, is
            # most of a 10 000-session inventory (benchmarks/bench_fleet.py).
            snaps = json.loads("[" + ",".join(blobs[i].values()) + "]") if blobs[i] else []
            host, pid = rt.host, rt.pid
            out.extend(
                FleetSession(
                    s["session_id"],
                    s["agent"],
                    s["labels"],
                    "unknown" if lost else s["state"],
                    s["started_at"],
                    s["parent_id"],
                    s["interrupt_trigger"],
                    rid,
                    host,
                    pid,
                )
                for s in snaps
            )
        return tuple(runtimes), tuple(out)

    # ----------------------------------------------------------------- kills

    def _kill_message(
        self,
        *,
        reason: str,
        operator: str | None,
        target: dict[str, Any],
        ban: float | None,
    ) -> tuple[str, dict[str, Any]]:
        now = time.time() + self._offset
        payload = {
            "v": _wire.VERSION,
            "type": "kill",
            "kill_id": new_id(),
            "target": target,
            "reason": bound_reason(reason),
            "operator": bound_operator(operator),
            "issued_at": now,
            "ban_until": now + ban if ban is not None else None,
        }
        return _wire.sign(self._key, payload), payload

    async def kill(
        self,
        session_id: str,
        *,
        reason: str,
        operator: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  # bounds remote answers; the kill is sent regardless
    ) -> StopReport:
        """Kill *session_id* wherever it runs and return its owner's StopReport.

        The kill is recorded in Redis first: it is sticky (the id is refused on every
        runtime from now on, and a runtime that is away honours it when it is back).
        Idempotent: killing a stopped session returns its report again (outcome
        ``after_end`` if it had already ended).

        Raises:
            NoAnswer: its runtime did not answer within *timeout* (it is named), or no
                live runtime holds the session.
            FleetUnavailable: Redis did not answer.
            ValueError / TypeError: bad arguments.
        """
        if not isinstance(session_id, str) or not session_id or len(session_id) > 200:
            raise ValueError(f"session_id must be a non-empty str of <= 200 chars: {session_id!r}")
        wait = self._wait(timeout)
        raw, payload = self._kill_message(
            reason=reason, operator=operator, target={"session_id": session_id}, ban=None
        )
        kill_id = payload["kill_id"]
        live = await self._publish(raw, store=("killed", session_id))
        got = await self._collect(kill_id, live, wait, want=session_id)
        reports, answered = got
        for rep in reports:
            if rep.session_id == session_id:
                return rep
        missing = tuple(sorted(set(live) - answered))
        if missing:
            raise NoAnswer(
                f"kill {kill_id} of session {session_id} is recorded (sticky), but "
                f"runtime(s) {', '.join(missing)} did not answer in time",
                kill_id=kill_id,
                runtimes=missing,
            )
        lost = await self._lost_owner(session_id)
        where = (
            f"its runtime {lost} is lost (lease lapsed); it will stop there when it is back"
            if lost
            else "no live runtime holds it"
        )
        raise NoAnswer(
            f"kill {kill_id} of session {session_id} is recorded (sticky; the id is refused "
            f"wherever it starts), but {where}",
            kill_id=kill_id,
            runtimes=(lost,) if lost else (),
        )

    async def kill_where(
        self,
        *,
        reason: str,
        operator: str | None = None,
        agent: str | None = None,
        labels: Mapping[str, str] | None = None,
        all: bool = False,
        ban: float | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  # bounds remote answers; the kill is sent regardless
    ) -> FleetKillResult:
        """Kill every session of *agent* and/or carrying every one of *labels* (or
        ``all=True``: every session) on every runtime; wait for every live runtime's
        answer. With *ban* (seconds), sessions matching the selector that start later,
        on any runtime, are refused until it ends.

        Raises:
            FleetUnavailable: Redis did not answer.
            ValueError / TypeError: no selector, or bad arguments.
        """
        if agent is None and not labels and not all:
            raise ValueError("name a selector: agent=..., labels=... or all=True")
        if all and (agent is not None or labels):
            raise ValueError("all=True takes no other selector")
        if agent is not None and (not isinstance(agent, str) or not agent):
            raise ValueError(f"agent must be a non-empty str, got {agent!r}")
        wanted = dict(labels or {})
        for lk, lv in wanted.items():
            if not isinstance(lk, str) or not isinstance(lv, str) or not lk:
                raise TypeError(f"labels must map non-empty str to str, got {lk!r}: {lv!r}")
        if ban is not None:
            ban = _seconds("ban", ban, minimum=0.0)
        wait = self._wait(timeout)
        target = {"agent": agent, "labels": wanted, "all": bool(all)}
        raw, payload = self._kill_message(reason=reason, operator=operator, target=target, ban=ban)
        kill_id = payload["kill_id"]
        live = await self._publish(raw, store=("selectors", kill_id))
        reports, answered = await self._collect(kill_id, live, wait, want=None)
        return FleetKillResult(
            kill_id=kill_id,
            reports=tuple(reports),
            unanswered=tuple(sorted(set(live) - answered)),
            ban_until=payload["ban_until"],
        )

    async def _publish(self, raw: str, *, store: tuple[str, str]) -> list[str]:
        """Store the kill (sticky), append it to the command stream; return the live
        runtimes expected to answer."""
        r = self._conn()
        k = self.keys
        try:
            with anyio.fail_after(self.timeout or None):
                async with r.pipeline(transaction=True) as pipe:
                    pipe.hset(k[store[0]], store[1], raw)
                    pipe.xadd(
                        k["commands"], {"m": raw}, maxlen=self.stream_length, approximate=True
                    )
                    pipe.time()
                    pipe.zrange(k["leases"], 0, -1, withscores=True)
                    res = await pipe.execute()
        except _redis_errors() as exc:
            raise FleetUnavailable(f"cannot record the kill: {exc!r}") from None
        now_t, leases = res[2], res[3]
        now_ms = int(now_t[0]) * 1000 + int(now_t[1]) // 1000
        return [rid for rid, deadline in leases if deadline >= now_ms]

    def _wait(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else _seconds("timeout", timeout, minimum=0.0)

    async def _collect(
        self, kill_id: str, live: list[str], wait: float, *, want: str | None
    ) -> tuple[list[StopReport], set[str]]:
        """Read signed replies until every live runtime answered (or, for a kill by id,
        the report came), or the timeout passed. Forged replies are dropped."""
        r = self._conn()
        key = self.keys["reply"] + kill_id
        reports: list[StopReport] = []
        answered: set[str] = set()
        pending = set(live)
        with anyio.move_on_after(wait):
            while pending:
                try:
                    item = await r.blpop([key], timeout=max(min(wait, 1.0), 0.01))
                except _redis_errors() as exc:
                    raise FleetUnavailable(
                        f"lost Redis while waiting for reports: {exc!r}"
                    ) from None
                if item is None:
                    continue
                try:
                    msg = _wire.open_envelope(self._key, item[1])
                    if msg["type"] != "reply" or msg.get("kill_id") != kill_id:
                        raise _wire.Rejected("not a reply to this kill")
                    got = [_wire.report_from_dict(d) for d in msg["reports"]]
                except _wire.Rejected as exc:
                    self.rejected = [*self.rejected[-99:], str(exc)]
                    continue
                answered.add(str(msg["runtime_id"]))
                pending.discard(str(msg["runtime_id"]))
                reports.extend(got)
                if want is not None and any(rep.session_id == want for rep in got):
                    break
        return reports, answered

    async def _lost_owner(self, session_id: str) -> str | None:
        """The lost runtime that last listed *session_id*, if any."""
        rts = await self.runtimes()
        r = self._conn()
        for rt in rts:
            if rt.lost and await r.hexists(self.keys["sessions"] + rt.runtime_id, session_id):
                return rt.runtime_id
        return None
