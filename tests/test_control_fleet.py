"""The control plane over a whole fleet (``FleetSource``, ``kill-switch serve --fleet``):
a real redis-server, worker processes each with its own Runtime, the API over real HTTP."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest

import kill_switch as ks
from kill_switch import control
from kill_switch.testing import MemoryAudit

from . import test_fleet as fleet_tests
from .fleet_support import KEY, Worker
from .redis_server import needs
from .test_control_api import ENTRIES, TOKENS, auth
from .test_fleet import in_thread, spawn

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from .redis_server import RedisServer

pytest.importorskip("redis")
pytestmark = [pytest.mark.slow, needs("redis-server")]

# The fleet tests' fixtures: a redis-server of its own, worker processes always reaped.
workers = fleet_tests.workers


class Plane:
    """A control plane over the fleet, its serving runtime's audit events, a client."""

    def __init__(self, server: control.ControlServer, audit: MemoryAudit) -> None:
        self.server = server
        self.audit = audit
        self.client = httpx.AsyncClient(base_url=server.url, timeout=60)

    async def rows(self, role: str = "viewer") -> dict[str, dict[str, Any]]:
        """``GET /api/sessions`` by session id."""
        answer = await self.client.get("/api/sessions", headers=auth(role))
        assert answer.status_code == 200, answer.text
        return {r["session_id"]: r for r in answer.json()["sessions"]}

    async def until(self, ids: set[str], state: str | None = "running") -> dict[str, Any]:
        """The rows once every one of *ids* is listed in *state* (``None``: once none is
        listed running: a stopped session leaves its runtime's inventory), bounded."""
        with anyio.fail_after(30):
            while True:
                rows = await self.rows()
                states = [rows.get(i, {}).get("state") for i in ids]
                if all(s == state for s in states) if state else "running" not in states:
                    return rows
                await anyio.sleep(0.05)


@asynccontextmanager
async def fleet_plane(server: RedisServer, name: str, **kw: Any) -> AsyncIterator[Plane]:
    """Serve a control plane whose source is the fleet *name* (its own runtime records
    the control plane's refusals)."""
    audit = MemoryAudit()
    source = control.FleetSource(ks.Fleet(server.url, key=KEY, name=name, **kw))
    async with (
        ks.Runtime(audit=audit) as runtime,
        control.serve(runtime, tokens=ENTRIES, source=source) as served,
    ):
        plane = Plane(served, audit)
        try:
            yield plane
        finally:
            await plane.client.aclose()


async def test_sessions_of_two_workers_listed_over_http(
    redis_server: RedisServer,
    workers: list[Worker],
) -> None:
    """GET /api/sessions lists the sessions of two worker processes with where they run."""
    a = spawn(workers, redis_server, "list")
    b = spawn(workers, redis_server, "list")
    await in_thread(a.start, "researcher", "s-a", team="blue")
    await in_thread(b.start, "writer", "s-b")
    async with fleet_plane(redis_server, "list") as p:
        rows = await p.until({"s-a", "s-b"})
        assert rows["s-a"]["runtime_id"] == a.runtime_id
        assert rows["s-a"]["pid"] == a.proc.pid
        assert rows["s-a"]["labels"] == {"team": "blue"}
        assert rows["s-b"]["runtime_id"] == b.runtime_id
        assert rows["s-b"]["agent"] == "writer"
        assert rows["s-a"]["cost"] is None  # not visible from the fleet: null, not 0
        only = await p.client.get("/api/sessions?agent=writer", headers=auth("viewer"))
        assert [r["session_id"] for r in only.json()["sessions"]] == ["s-b"]
        me = await p.client.get("/api/whoami", headers=auth("viewer"))
        assert me.json()["scope"] == "fleet"


async def test_kill_by_id_returns_the_owners_report_audited_with_the_token_id(
    redis_server: RedisServer,
    workers: list[Worker],
    tmp_path: Path,
) -> None:
    """POST /api/sessions/{id}/kill stops the session in its worker and answers with the
    owner's StopReport; the owner's audit log holds the kill with the operator's token id."""
    db = tmp_path / "owner.db"
    a = spawn(workers, redis_server, "kid", audit=db)
    b = spawn(workers, redis_server, "kid")
    await in_thread(a.start, "researcher", "s-1")
    await in_thread(b.start, "researcher", "s-2")
    async with fleet_plane(redis_server, "kid") as p:
        await p.until({"s-1", "s-2"})
        answer = await p.client.post(
            "/api/sessions/s-1/kill", json={"reason": "runaway"}, headers=auth("operator")
        )
        assert answer.status_code == 200, answer.text
        out = answer.json()
        assert out["status"] == "stopped"
        assert out["report"]["trigger"] == "operator"
        assert out["report"]["operator"] == "operator-t"
        assert out["report"]["quiescent"]
        ev = await in_thread(a.stopped, "s-1")
        assert ev["operator"] == "operator-t"
        rows = await p.until({"s-1"}, state=None)
        assert rows["s-2"]["state"] == "running"  # the other worker's session untouched
    assert not any(e["event"] == "stopped" for e in b.events)
    a.close()
    with sqlite3.connect(db) as conn:
        audited = conn.execute(
            "SELECT kind, operator FROM events WHERE session_id = 's-1' "
            "AND kind IN ('fleet_kill', 'interrupt_requested') ORDER BY seq"
        ).fetchall()
    assert audited == [("fleet_kill", "operator-t"), ("interrupt_requested", "operator-t")]


async def test_kill_by_selector_across_workers(
    redis_server: RedisServer,
    workers: list[Worker],
) -> None:
    """POST /api/kill with an agent stops exactly that agent's sessions on every worker."""
    a = spawn(workers, redis_server, "sel")
    b = spawn(workers, redis_server, "sel")
    await in_thread(a.start, "researcher", "a-r")
    await in_thread(a.start, "writer", "a-w")
    await in_thread(b.start, "researcher", "b-r")
    async with fleet_plane(redis_server, "sel") as p:
        await p.until({"a-r", "a-w", "b-r"})
        answer = await p.client.post(
            "/api/kill", json={"agent": "researcher", "reason": "bad tool"}, headers=auth("admin")
        )
        assert answer.status_code == 200, answer.text
        out = answer.json()
        assert sorted(r["session_id"] for r in out["results"]) == ["a-r", "b-r"]
        assert all(r["report"]["operator"] == "admin-t" for r in out["results"])
        assert out["unanswered"] == []
        await in_thread(b.stopped, "b-r")
        rows = await p.until({"a-r", "b-r"}, state=None)
        assert rows["a-w"]["state"] == "running"


async def test_viewer_may_not_kill_and_the_refusal_is_audited(
    redis_server: RedisServer,
    workers: list[Worker],
) -> None:
    """A viewer's kill, by id or selector, is refused (403, audited) and stops nothing."""
    a = spawn(workers, redis_server, "view")
    await in_thread(a.start, "researcher", "s-v")
    async with fleet_plane(redis_server, "view") as p:
        await p.until({"s-v"})
        one = await p.client.post(
            "/api/sessions/s-v/kill", json={"reason": "x"}, headers=auth("viewer")
        )
        many = await p.client.post(
            "/api/kill", json={"all": True, "reason": "x"}, headers=auth("viewer")
        )
        assert (one.status_code, many.status_code) == (403, 403)
        denied = [e for e in p.audit.events if e.kind == "control_denied"]
        assert [e.operator for e in denied] == ["viewer-t", "viewer-t"]
        assert (await p.rows())["s-v"]["state"] == "running"
        # Negative control: the same request with an operator's token does stop it.
        ok = await p.client.post(
            "/api/sessions/s-v/kill", json={"reason": "x"}, headers=auth("operator")
        )
        assert ok.status_code == 200, ok.text
    assert (await in_thread(a.stopped, "s-v"))["operator"] == "operator-t"


async def test_unknown_session_is_404_and_records_no_sticky_kill(
    redis_server: RedisServer,
    workers: list[Worker],
) -> None:
    """An id the fleet does not list is 404 for detail and kill, and the kill is not
    recorded: that id can still start afterwards."""
    a = spawn(workers, redis_server, "unk")
    async with fleet_plane(redis_server, "unk") as p:
        detail = await p.client.get("/api/sessions/nobody", headers=auth("viewer"))
        kill = await p.client.post(
            "/api/sessions/nobody/kill", json={"reason": "x"}, headers=auth("operator")
        )
        assert (detail.status_code, kill.status_code) == (404, 404)
    assert (await in_thread(a.start, "researcher", "nobody"))["event"] == "started"


async def test_lost_runtime_shown_unknown_and_its_kill_names_it(
    redis_server: RedisServer,
    workers: list[Worker],
) -> None:
    """A SIGKILLed worker's session is shown ``unknown``, and a kill of it answers 504
    naming that runtime (the kill is sticky there)."""
    a = spawn(workers, redis_server, "lost", lease=0.5)
    await in_thread(a.start, "researcher", "s-lost")
    async with fleet_plane(redis_server, "lost", timeout=2.0) as p:
        await p.until({"s-lost"})
        a.sigkill()
        await p.until({"s-lost"}, state="unknown")
        detail = await p.client.get("/api/sessions/s-lost", headers=auth("viewer"))
        assert detail.json()["state"] == "unknown"
        answer = await p.client.post(
            "/api/sessions/s-lost/kill", json={"reason": "x"}, headers=auth("operator")
        )
        assert answer.status_code == 504, answer.text
        assert answer.json()["unanswered"] == [a.runtime_id]
        assert a.runtime_id in answer.json()["error"]["message"]


def test_cli_serve_fleet_lists_the_fleet(
    redis_server: RedisServer,
    workers: list[Worker],
) -> None:
    """``kill-switch serve --fleet URL`` serves the API over the fleet's sessions."""
    a = spawn(workers, redis_server, "cli")
    a.start("researcher", "s-cli")
    env = {
        **os.environ,
        "KILL_SWITCH_TOKENS": TOKENS["viewer"][1].line(),
        "KILL_SWITCH_FLEET_KEY": KEY,
        "PYTHONUNBUFFERED": "1",
    }
    args = ["--fleet", redis_server.url, "--fleet-name", "cli", "--port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kill_switch", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "over the fleet" in line, line
        url = line.split(" at ", 1)[1].split("/ ", 1)[0]
        deadline = time.monotonic() + 30
        while True:
            rows = httpx.get(url + "/api/sessions", headers=auth("viewer"), timeout=10).json()
            if [s["session_id"] for s in rows["sessions"]] == ["s-cli"]:
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.05)  # polling the fleet's inventory for a state, bounded
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.parametrize(
    ("env", "url", "code", "message"),
    [
        ({"KILL_SWITCH_FLEET_KEY": ""}, "redis://127.0.0.1:1/0", 2, "a fleet needs a key"),
        ({"KILL_SWITCH_FLEET_KEY": KEY}, "http://example", 2, "must be redis://"),
        ({"KILL_SWITCH_FLEET_KEY": KEY}, "redis://127.0.0.1:1/0", 3, "cannot reach"),
    ],
)
def test_cli_serve_fleet_refuses_clearly(
    env: dict[str, str], url: str, code: int, message: str
) -> None:
    """``serve --fleet`` without a key or with a bad URL is a usage error (2); a Redis
    out of reach is 3 with the reason, never a hang."""
    full = {**os.environ, "KILL_SWITCH_TOKENS": TOKENS["viewer"][1].line(), **env}
    done = subprocess.run(
        [sys.executable, "-m", "kill_switch", "serve", "--fleet", url, "--port", "0"],
        capture_output=True,
        text=True,
        env=full,
        timeout=60,
        check=False,
    )
    assert done.returncode == code, done.stderr
    assert message in done.stderr
