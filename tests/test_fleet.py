"""Fleet control on a real redis-server with real worker processes (each its own Runtime,
as separate hosts would be): inventory, kills by id and selector, sticky kills and bans,
the dead man's switch, message authentication."""

from __future__ import annotations

import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import pytest

import kill_switch as ks
from kill_switch.fleet import FleetUnavailable, NoAnswer, _wire

from .fleet_support import KEY, ROOT, Worker
from .redis_server import RedisServer, needs

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from pathlib import Path

pytest.importorskip("redis")
T = TypeVar("T")
pytestmark = [pytest.mark.slow, needs("redis-server")]


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Worker processes started by the test; each quit (or killed) and reaped at the end."""
    started: list[Worker] = []
    try:
        yield started
    finally:
        for w in started:
            w.close()


def spawn(workers: list[Worker], server: RedisServer, name: str, **kw: object) -> Worker:
    w = Worker(server.url, name, **kw)  # type: ignore[arg-type]  # keyword options pass through
    workers.append(w)
    w.ready()
    return w


def fleet(server: RedisServer, name: str, **kw: object) -> ks.Fleet:
    return ks.Fleet(server.url, key=KEY, name=name, **kw)  # type: ignore[arg-type]  # options pass through


async def poll(pred: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    """Wait until the async predicate holds (bounded); no sleep stands for a state."""
    deadline = time.monotonic() + within
    while True:
        if await pred():
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await anyio.sleep(0.02)


async def in_thread(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Run a blocking worker call (bounded inside) off the event loop."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kw))


# ----------------------------------------------------------------------- inventory


async def test_inventory_lists_sessions_of_every_worker(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """fleet.sessions() lists the sessions of every worker process with host and pid."""
    a = spawn(workers, redis_server, "inv")
    b = spawn(workers, redis_server, "inv")
    await in_thread(a.start, "researcher", "s-a1", team="blue")
    await in_thread(b.start, "writer", "s-b1")
    async with fleet(redis_server, "inv") as f:

        async def both() -> bool:
            return {"s-a1", "s-b1"} <= {s.session_id for s in await f.sessions()}

        await poll(both)
        by_id = {s.session_id: s for s in await f.sessions()}
        assert by_id["s-a1"].runtime_id == a.runtime_id
        assert by_id["s-a1"].pid == a.proc.pid
        assert by_id["s-a1"].labels == {"team": "blue"}
        assert by_id["s-b1"].runtime_id == b.runtime_id
        assert by_id["s-b1"].state == "running"
        assert {r.runtime_id for r in await f.runtimes()} == {a.runtime_id, b.runtime_id}


async def test_sigkilled_worker_shown_lost_with_sessions_unknown(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """A SIGKILLed worker is shown lost after its lease, its sessions unknown, never running."""
    a = spawn(workers, redis_server, "lost", lease=0.5)
    await in_thread(a.start, "researcher", "s-lost")
    async with fleet(redis_server, "lost") as f:

        async def listed() -> bool:
            return any(s.session_id == "s-lost" for s in await f.sessions())

        await poll(listed)
        a.sigkill()

        async def lost() -> bool:
            return all(r.lost for r in await f.runtimes())

        await poll(lost)
        (s,) = await f.sessions()
        assert s.state == "unknown"
        (rt,) = await f.runtimes()
        assert rt.lost
        assert rt.lease_left < 0


# ---------------------------------------------------------------------------- kills


async def test_kill_by_id_returns_owner_report(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """fleet.kill(id) stops the session in its worker process and returns its StopReport."""
    a = spawn(workers, redis_server, "kid")
    b = spawn(workers, redis_server, "kid")
    await in_thread(a.start, "researcher", "s-1")
    await in_thread(b.start, "researcher", "s-2")
    async with fleet(redis_server, "kid") as f:
        report = await f.kill("s-2", reason="runaway", operator="alice")
    assert isinstance(report, ks.StopReport)
    assert report.session_id == "s-2"
    assert report.trigger == "operator"
    assert report.operator == "alice"
    assert report.quiescent
    assert report.outcome == "stopped"
    ev = await in_thread(b.stopped, "s-2")
    assert ev["operator"] == "alice"
    # The other worker's session is untouched.
    assert not any(e["event"] == "stopped" for e in a.events)


async def test_kill_is_idempotent(redis_server: RedisServer, workers: list[Worker]) -> None:
    """A second fleet kill of the same session returns the same stop (one interrupt)."""
    a = spawn(workers, redis_server, "idem")
    await in_thread(a.start, "researcher", "s-1")
    async with fleet(redis_server, "idem") as f:
        first = await f.kill("s-1", reason="one", operator="alice")
        second = await f.kill("s-1", reason="two", operator="bob")
    assert second.interrupt_id == first.interrupt_id
    assert second.reason == "one"


async def test_kill_unknown_session_says_so(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """Killing an id nobody holds says so once every live runtime answered (no hang)."""
    spawn(workers, redis_server, "unk")
    async with fleet(redis_server, "unk") as f:
        with pytest.raises(NoAnswer, match="no live runtime holds it"):
            await f.kill("nobody", reason="x", operator="alice", timeout=30)


async def test_kill_where_by_agent_and_label_across_workers(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """kill_where(agent=...) and (labels=...) stop exactly the matching sessions everywhere."""
    a = spawn(workers, redis_server, "sel")
    b = spawn(workers, redis_server, "sel")
    await in_thread(a.start, "researcher", "a-r")
    await in_thread(a.start, "writer", "a-w", team="red")
    await in_thread(b.start, "researcher", "b-r")
    await in_thread(b.start, "writer", "b-w", team="blue")
    async with fleet(redis_server, "sel") as f:
        res = await f.kill_where(agent="researcher", reason="bad tool", operator="carol")
        assert sorted(r.session_id for r in res.reports) == ["a-r", "b-r"]
        assert res.unanswered == ()
        res = await f.kill_where(labels={"team": "red"}, reason="red team", operator="carol")
        assert [r.session_id for r in res.reports] == ["a-w"]
    await in_thread(b.stopped, "b-r")
    assert not any(e["event"] == "stopped" and e["session_id"] == "b-w" for e in b.events)


async def test_kill_where_requires_a_selector(redis_server: RedisServer) -> None:
    """kill_where() without agent, labels or all=True is refused before anything is sent."""
    async with fleet(redis_server, "nosel") as f:
        with pytest.raises(ValueError, match="selector"):
            await f.kill_where(reason="x")


# ------------------------------------------------------------------ sticky and bans


async def test_sticky_kill_refused_after_worker_restart(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """A killed id is refused when a restarted worker (or any other) tries to start it."""
    a = spawn(workers, redis_server, "sticky")
    await in_thread(a.start, "researcher", "s-1")
    async with fleet(redis_server, "sticky") as f:
        await f.kill("s-1", reason="runaway", operator="alice")
        with pytest.raises(NoAnswer, match="refused wherever it starts"):
            await f.kill("s-never", reason="pre-emptive", operator="alice")
    a.close()
    again = spawn(workers, redis_server, "sticky")
    ev = await in_thread(again.start, "researcher", "s-1")
    assert ev["event"] == "refused"
    assert "killed through the fleet" in ev["reason"]
    ev = await in_thread(again.start, "researcher", "s-never")
    assert ev["event"] == "refused"
    ev = await in_thread(again.start, "researcher", "s-other")
    assert ev["event"] == "started"


async def test_ban_refuses_later_starts_fleet_wide(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """kill_where(agent, ban=...) stops the agent and refuses its later starts on every runtime."""
    a = spawn(workers, redis_server, "ban")
    await in_thread(a.start, "researcher", "s-1")
    async with fleet(redis_server, "ban") as f:
        res = await f.kill_where(agent="researcher", ban=600, reason="quarantine", operator="eve")
    assert [r.session_id for r in res.reports] == ["s-1"]
    assert res.ban_until is not None
    ev = await in_thread(a.start, "researcher", "s-2")
    assert ev["event"] == "refused"
    assert "banned on the fleet" in ev["reason"]
    later = spawn(workers, redis_server, "ban")  # joins after the ban: loads it
    ev = await in_thread(later.start, "researcher", "s-3")
    assert ev["event"] == "refused"
    ev = await in_thread(later.start, "writer", "s-4")
    assert ev["event"] == "started"


async def test_selector_kill_without_ban_lets_later_sessions_start(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """Negative control for bans: a selector kill without a ban refuses nothing later."""
    a = spawn(workers, redis_server, "noban")
    await in_thread(a.start, "researcher", "s-1")
    async with fleet(redis_server, "noban") as f:
        await f.kill_where(agent="researcher", reason="once", operator="eve")
    ev = await in_thread(a.start, "researcher", "s-2")
    assert ev["event"] == "started"


async def test_kill_during_redis_pause_honoured_after(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """A kill sent while Redis is stopped (SIGSTOP) lands and is honoured after SIGCONT."""
    a = spawn(workers, redis_server, "pause", lease=0.6, on_partition="continue")
    await in_thread(a.start, "researcher", "s-1")
    async with fleet(redis_server, "pause", lease=30) as f:
        redis_server.pause()
        await in_thread(a.expect, lambda e: e.get("kind") == "fleet_lost")
        async with anyio.create_task_group() as tg:
            got: list[ks.StopReport] = []

            async def kill() -> None:
                got.append(await f.kill("s-1", reason="while away", operator="alice"))

            tg.start_soon(kill)
            await anyio.wait_all_tasks_blocked()
            redis_server.resume()
    assert got[0].trigger == "operator"
    assert got[0].quiescent
    ev = await in_thread(a.stopped, "s-1")
    assert ev["operator"] == "alice"


async def test_kill_while_worker_stopped_names_it_then_honoured(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """A frozen worker is named as not answering; on SIGCONT it honours the kill."""
    a = spawn(workers, redis_server, "frozen", lease=30.0, on_partition="continue")
    await in_thread(a.start, "researcher", "s-1")
    async with fleet(redis_server, "frozen") as f:

        async def listed() -> bool:
            return any(s.session_id == "s-1" for s in await f.sessions())

        await poll(listed)
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(NoAnswer) as err:
                await f.kill("s-1", reason="frozen", operator="alice", timeout=1.0)
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
    assert err.value.runtimes == (a.runtime_id,)
    assert a.runtime_id in str(err.value)
    ev = await in_thread(a.stopped, "s-1")
    assert ev["operator"] == "alice"


async def test_sticky_kill_survives_redis_restart(tmp_path: Path, workers: list[Worker]) -> None:
    """Redis killed and restarted (AOF): the worker reconnects, kills reach it and stick."""
    server = RedisServer(tmp_path, persist=True)
    server.start()
    try:
        a = spawn(workers, server, "restart", lease=0.6, on_partition="continue")
        await in_thread(a.start, "researcher", "s-1")
        await in_thread(a.start, "researcher", "s-2")
        async with fleet(server, "restart") as f:
            await f.kill("s-1", reason="before", operator="alice")
        server.kill()
        await in_thread(a.expect, lambda e: e.get("kind") == "fleet_lost")
        server.start()
        await in_thread(a.expect, lambda e: e.get("kind") == "fleet_reconnected")
        async with fleet(server, "restart") as f:
            report = await f.kill("s-2", reason="after", operator="bob")
        assert report.operator == "bob"
        a.close()
        b = spawn(workers, server, "restart")
        ev = await in_thread(b.start, "researcher", "s-1")
        assert ev["event"] == "refused"
    finally:
        server.stop()


# ------------------------------------------------------------- dead man's switch


async def test_dead_mans_switch_stops_sessions_at_the_lease(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """Cut off from Redis past its lease, a worker stops its sessions (trigger fleet_lost)."""
    a = spawn(workers, redis_server, "dms", lease=0.6)
    await in_thread(a.start, "researcher", "s-1")
    redis_server.pause()
    try:
        ev = await in_thread(a.stopped, "s-1")
        assert ev["trigger"] == "fleet_lost"
        lost = await in_thread(a.expect, lambda e: e.get("kind") == "fleet_lost")
        # It fired at the lease, not before: the time since the last renewal exceeds it.
        assert lost["details"]["seconds_away"] > 0.6
        assert lost["details"]["on_partition"] == "stop"
        ev = await in_thread(a.start, "researcher", "s-2")
        assert ev["event"] == "refused"
        assert "unreachable" in ev["reason"]
    finally:
        redis_server.resume()
    await in_thread(a.expect, lambda e: e.get("kind") == "fleet_reconnected")
    ev = await in_thread(a.start, "researcher", "s-3")
    assert ev["event"] == "started"


async def test_on_partition_continue_keeps_sessions(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """With on_partition="continue" the worker notes the loss and keeps its sessions."""
    a = spawn(workers, redis_server, "cont", lease=0.6, on_partition="continue")
    await in_thread(a.start, "researcher", "s-1")
    redis_server.pause()
    try:
        lost = await in_thread(a.expect, lambda e: e.get("kind") == "fleet_lost")
        assert lost["details"]["on_partition"] == "continue"
    finally:
        redis_server.resume()
    await in_thread(a.expect, lambda e: e.get("kind") == "fleet_reconnected")
    # Still running: the first interrupt it ever gets is this operator's.
    async with fleet(redis_server, "cont") as f:
        report = await f.kill("s-1", reason="now", operator="alice")
    assert report.trigger == "operator"
    assert report.later == ()
    assert not any(e.get("trigger") == "fleet_lost" for e in a.events)


# --------------------------------------------------------------- authentication


async def test_forged_kill_dropped_and_audited(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """A kill signed with another key is dropped and audited; the session runs on."""
    a = spawn(workers, redis_server, "forge")
    await in_thread(a.start, "researcher", "s-1")
    async with fleet(redis_server, "forge") as f:
        forged = _wire.sign(
            b"not-the-fleet-key-at-all",
            {
                "v": 1,
                "type": "kill",
                "kill_id": "k1",
                "target": {"session_id": "s-1"},
                "reason": "forged",
                "operator": "mallory",
                "issued_at": time.time(),
                "ban_until": None,
            },
        )
        await f._conn().xadd(f.keys["commands"], {"m": forged})
        ev = await in_thread(a.expect, lambda e: e.get("kind") == "fleet_message_rejected")
        assert "bad signature" in ev["reason"]
        report = await f.kill("s-1", reason="real", operator="alice")
    assert report.reason == "real"
    assert report.later == ()


async def test_replayed_and_stale_kills_dropped(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """A captured kill appended again, or an old one, is dropped and audited."""
    a = spawn(workers, redis_server, "replay")
    await in_thread(a.start, "researcher", "s-1")
    await in_thread(a.start, "writer", "s-2")
    async with fleet(redis_server, "replay") as f:
        await f.kill_where(agent="researcher", reason="first", operator="alice")
        r = f._conn()
        (entry,) = cast("Any", await r.xrange(f.keys["commands"]))
        await r.xadd(f.keys["commands"], {"m": entry[1]["m"]})  # the same message again
        ev = await in_thread(a.expect, lambda e: "already on the stream" in (e.get("reason") or ""))
        assert ev["kind"] == "fleet_message_rejected"
        old = _wire.sign(
            KEY.encode(),
            {
                "v": 1,
                "type": "kill",
                "kill_id": "old",
                "target": {"agent": None, "labels": {}, "all": True},
                "reason": "last week",
                "operator": "alice",
                "issued_at": time.time() - 7 * 86400,
                "ban_until": None,
            },
        )
        await r.xadd(f.keys["commands"], {"m": old})
        ev = await in_thread(a.expect, lambda e: "stale" in (e.get("reason") or ""))
        report = await f.kill("s-2", reason="real", operator="bob")
    assert report.reason == "real"


async def test_no_message_resumes_or_instructs(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """A correctly signed message of any kind but kill is refused and audited."""
    a = spawn(workers, redis_server, "resume")
    async with fleet(redis_server, "resume") as f:
        msg = _wire.sign(KEY.encode(), {"v": 1, "type": "resume", "kill_id": "r1"})
        await f._conn().xadd(f.keys["commands"], {"m": msg})
        ev = await in_thread(a.expect, lambda e: e.get("kind") == "fleet_message_rejected")
    assert "unknown message type 'resume'" in ev["reason"]


def test_a_fleet_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key, or a short one, is a clear error: there is no unauthenticated mode."""
    monkeypatch.delenv("KILL_SWITCH_FLEET_KEY", raising=False)
    with pytest.raises(ValueError, match="needs a key"):
        ks.Fleet("redis://127.0.0.1:1")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        ks.Fleet("redis://127.0.0.1:1", key="short")
    assert KEY not in repr(ks.Fleet("redis://127.0.0.1:1", key=KEY))


# ------------------------------------------------------------ unavailable, audit


async def test_redis_unavailable_at_start_is_a_clear_error(tmp_path: Path) -> None:
    """A runtime whose fleet's Redis is down refuses to start, within its lease."""
    from .redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(FleetUnavailable, match="cannot join the fleet"):
        async with ks.Runtime(fleet=ks.Fleet(url, key=KEY, lease=0.5)):
            pass
    with pytest.raises(FleetUnavailable):
        async with ks.Fleet(url, key=KEY, lease=0.5):
            pass


async def test_fleet_kill_in_owner_log_and_fleet_stream(
    redis_server: RedisServer, workers: list[Worker], tmp_path: Path
) -> None:
    """The owner's SQLite log holds the fleet kill with the requester; the fleet's audit
    stream quotes a chain head that is in that log."""
    db = tmp_path / "owner.db"
    a = spawn(workers, redis_server, "audit", audit=db)
    await in_thread(a.start, "researcher", "s-1")
    async with fleet(redis_server, "audit") as f:
        report = await f.kill("s-1", reason="audit me", operator="alice")

        async def appended() -> bool:  # the audit entry follows the reply
            return bool(await f._conn().xlen(f.keys["audit"]))

        await poll(appended)
        (entry,) = cast("Any", await f._conn().xrange(f.keys["audit"]))
    assert report.audit == "durable"
    stream = _wire.open_envelope(KEY.encode(), entry[1]["m"])
    assert stream["sessions"] == ["s-1"]
    assert stream["operator"] == "alice"
    a.close()
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT kind, operator, details FROM events WHERE session_id = 's-1' ORDER BY seq"
        ).fetchall()
        kinds = [r[0] for r in rows]
        assert "fleet_kill" in kinds
        assert "interrupt_requested" in kinds
        fk = next(r for r in rows if r[0] == "fleet_kill")
        assert fk[1] == "alice"
        assert json.loads(fk[2])["kill_id"] == stream["kill_id"]
        head = stream["head"]
        (row_hash,) = conn.execute(
            "SELECT row_hash FROM events WHERE seq = ?", (head["seq"],)
        ).fetchone()
        assert row_hash == head["hash"]


# ------------------------------------------------------------------------------ CLI


def _cli(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("KILL_SWITCH_FLEET_KEY", None)
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "kill_switch", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_sessions_and_kill_over_the_fleet(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """`kill-switch sessions/kill --fleet` from a CLI process list and stop a worker's session."""
    a = spawn(workers, redis_server, "default")
    await in_thread(a.start, "researcher", "s-cli")
    env = {"KILL_SWITCH_FLEET_KEY": KEY, "KILL_SWITCH_FLEET": redis_server.url}

    def listed() -> bool:
        out = _cli(["sessions", "--fleet", "--json"], env)
        assert out.returncode == 0, out.stderr
        return any(s["session_id"] == "s-cli" for s in json.loads(out.stdout)["sessions"])

    deadline = time.monotonic() + 30
    while not await in_thread(listed):
        assert time.monotonic() < deadline, "the session never showed in the fleet inventory"
    out = await in_thread(
        _cli,
        ["kill", "s-cli", "--fleet", redis_server.url, "--reason", "cli", "--operator", "ops"],
        {"KILL_SWITCH_FLEET_KEY": KEY},
    )
    assert out.returncode == 0, out.stderr
    assert "s-cli: stopped, quiescent" in out.stdout
    ev = await in_thread(a.stopped, "s-cli")
    assert ev["operator"] == "ops"


def test_cli_fleet_key_only_from_the_environment(redis_server: RedisServer) -> None:
    """The CLI takes no key option, and without $KILL_SWITCH_FLEET_KEY says so (exit 2)."""
    out = _cli(["sessions", "--fleet", redis_server.url], {})
    assert out.returncode == 2
    assert "KILL_SWITCH_FLEET_KEY" in out.stderr
    out = _cli(["sessions", "--fleet", redis_server.url, "--fleet-key", KEY], {})
    assert out.returncode == 2
    assert "unrecognized arguments" in out.stderr


async def test_redis_password_in_the_url(tmp_path: Path, workers: list[Worker]) -> None:
    """A password-protected Redis: the right URL joins and kills; a wrong one is refused."""
    server = RedisServer(tmp_path, password="s3cret-pass")
    server.start()
    try:
        a = spawn(workers, server, "acl")
        await in_thread(a.start, "researcher", "s-1")
        async with fleet(server, "acl") as f:
            report = await f.kill("s-1", reason="acl", operator="alice")
        assert report.quiescent
        bad = server.url.replace("s3cret-pass", "wrong")
        with pytest.raises(FleetUnavailable):
            async with ks.Fleet(bad, key=KEY, lease=0.5):
                pass
        assert "s3cret-pass" not in repr(ks.Fleet(server.url, key=KEY))
    finally:
        server.stop()


@needs("openssl")
async def test_redis_over_tls(tmp_path: Path, workers: list[Worker]) -> None:
    """A TLS-only Redis (``rediss://``, a CA of its own): a fleet that trusts the CA joins
    and kills across processes; one that does not trust it is refused, never downgraded."""
    server = RedisServer(tmp_path, tls=True)
    server.start()
    try:
        a = spawn(workers, server, "tls")
        await in_thread(a.start, "researcher", "s-1")
        async with fleet(server, "tls") as f:
            report = await f.kill("s-1", reason="over tls", operator="alice")
        assert report.quiescent
        untrusted = server.url.split("?", 1)[0]  # the system's CAs only: verification fails
        with pytest.raises(FleetUnavailable):
            async with ks.Fleet(untrusted, key=KEY, lease=0.5):
                pass
        plain = untrusted.replace("rediss://", "redis://")  # no TLS: the server refuses
        with pytest.raises(FleetUnavailable):
            async with ks.Fleet(plain, key=KEY, lease=0.5):
                pass
    finally:
        server.stop()


async def test_concurrent_kills_from_two_operators_make_one_stop(
    redis_server: RedisServer, workers: list[Worker], tmp_path: Path
) -> None:
    """Two operators killing one session at once get the same stop; the log has one request."""
    db = tmp_path / "owner.db"
    a = spawn(workers, redis_server, "twice", audit=db)
    await in_thread(a.start, "researcher", "s-1")
    got: dict[str, ks.StopReport] = {}
    async with fleet(redis_server, "twice") as f1, fleet(redis_server, "twice") as f2:

        async def kill(f: ks.Fleet, who: str) -> None:
            got[who] = await f.kill("s-1", reason=f"by {who}", operator=who)

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill, f1, "alice")
            tg.start_soon(kill, f2, "bob")
    assert got["alice"].interrupt_id == got["bob"].interrupt_id
    a.close()
    with sqlite3.connect(db) as conn:
        kinds = [
            r[0]
            for r in conn.execute("SELECT kind FROM events WHERE session_id = 's-1'").fetchall()
        ]
    assert kinds.count("interrupt_requested") == 1
    assert kinds.count("interrupt_completed") == 1


# ----------------------------------------------------------------------------- demo


async def test_demo_kills_a_second_worker_through_the_fleet(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's fleet step kills a second worker process's session via Redis."""
    from kill_switch.fleet import _demo

    monkeypatch.setenv("KILL_SWITCH_FLEET", redis_server.url)
    monkeypatch.delenv("KILL_SWITCH_FLEET_KEY", raising=False)
    said: list[str] = []
    failures = await _demo.run(lambda *lines: said.extend(lines))
    assert failures == []
    text = "\n".join(said)
    assert "quiescent, trigger operator (demo-operator)" in text


async def test_demo_says_when_the_fleet_is_not_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $KILL_SWITCH_FLEET, or with a Redis that does not answer, the step says so."""
    from kill_switch.fleet import _demo

    from .redis_server import free_port

    said: list[str] = []
    monkeypatch.delenv("KILL_SWITCH_FLEET", raising=False)
    assert await _demo.run(lambda *lines: said.extend(lines)) == []
    assert "skipped (set $KILL_SWITCH_FLEET" in "\n".join(said)
    monkeypatch.setenv("KILL_SWITCH_FLEET", f"redis://127.0.0.1:{free_port()}/0")
    said.clear()
    assert await _demo.run(lambda *lines: said.extend(lines)) == []
    assert "is not usable" in "\n".join(said)


async def test_malformed_signed_kill_dropped_and_listener_lives_on(
    redis_server: RedisServer, workers: list[Worker]
) -> None:
    """A signed kill with a malformed target is dropped and audited; later kills still work."""
    a = spawn(workers, redis_server, "malformed")
    await in_thread(a.start, "researcher", "s-1")
    async with fleet(redis_server, "malformed") as f:
        bad = _wire.sign(
            KEY.encode(),
            {
                "v": 1,
                "type": "kill",
                "kill_id": "m1",
                "target": ["s-1"],
                "reason": "x",
                "operator": None,
                "issued_at": time.time(),
                "ban_until": None,
            },
        )
        await f._conn().xadd(f.keys["commands"], {"m": bad})
        ev = await in_thread(a.expect, lambda e: e.get("kind") == "fleet_message_rejected")
        assert "malformed kill: target" in ev["reason"]
        report = await f.kill("s-1", reason="real", operator="alice")
    assert report.reason == "real"


def test_import_kill_switch_does_not_import_redis() -> None:
    """`import kill_switch` (and a Runtime without a fleet) never imports redis-py."""
    code = (
        "import sys, anyio, kill_switch as ks\n"
        "async def main():\n"
        "    async with ks.Runtime() as rt:\n"
        "        async with rt.session('a'):\n"
        "            pass\n"
        "anyio.run(main)\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
        "assert 'kill_switch.fleet._link' not in sys.modules, 'fleet link imported'\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


async def test_runtime_joins_with_a_url_and_the_key_from_the_environment(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runtime(fleet="redis://...") reads the key from $KILL_SWITCH_FLEET_KEY and joins."""
    monkeypatch.setenv("KILL_SWITCH_FLEET_KEY", KEY)
    with pytest.raises(TypeError, match="fleet must be a Fleet"):
        ks.Runtime(fleet=123)  # type: ignore[arg-type]  # the wrong type on purpose
    async with ks.Runtime(fleet=redis_server.url):
        async with fleet(redis_server, "default") as f:
            (rt,) = await f.runtimes()
            assert not rt.lost
            assert rt.pid == os.getpid()
    async with fleet(redis_server, "default") as f:
        assert await f.runtimes() == ()  # it left the fleet when it closed
