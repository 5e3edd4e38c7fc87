"""The control plane over real HTTP (uvicorn on 127.0.0.1, port 0): FAULTS 50-57."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import threading
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx
import pytest

import kill_switch as ks
from kill_switch import AuditEvent, control

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from kill_switch.control._auth import TokenEntry
from kill_switch.testing import MemoryAudit

ROLES = ("viewer", "operator", "admin")
#: One token per role, fixed for the module: role -> (token, entry).
TOKENS: dict[str, tuple[str, TokenEntry]] = {r: control.new_token(r, f"{r}-t") for r in ROLES}  # type: ignore[arg-type]
ENTRIES = [e for _, e in TOKENS.values()]


def auth(role: str) -> dict[str, str]:
    """The Authorization header of *role*'s token."""
    return {"Authorization": f"Bearer {TOKENS[role][0]}"}


async def park() -> None:
    """A tool call that waits until cancelled."""
    await anyio.sleep_forever()


async def run_agent(
    runtime: ks.Runtime,
    agent: str,
    labels: dict[str, str] | None = None,
    calls: int = 2,
    *,
    task_status: anyio.abc.TaskStatus[ks.Session] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """A session with *calls* parked tool calls, running until it is interrupted."""
    async with runtime.session(agent, labels=labels) as session:
        for _ in range(calls):
            session.start_soon(park, tool="park")
        task_status.started(session)
        await anyio.sleep_forever()


class Harness:
    """A runtime, its control plane on its own thread, a client, and every audit event."""

    def __init__(self, runtime: ks.Runtime, server: control.ControlServer) -> None:
        self.runtime = runtime
        self.server = server
        self.events: list[AuditEvent] = []
        self.client = httpx.AsyncClient(base_url=server.url, timeout=30)

    def denials(self) -> list[AuditEvent]:
        """The ``control_denied`` events recorded so far."""
        return [e for e in self.events if e.kind == "control_denied"]


@asynccontextmanager
async def harness(tmp_path: Path, *, sqlite: bool = True, **kwargs: Any) -> AsyncIterator[Harness]:
    """Open a runtime (SQLite audit by default) and serve its control plane."""
    audit: Any = str(tmp_path / "audit.db") if sqlite else MemoryAudit()
    kwargs.setdefault("tokens", ENTRIES)
    async with ks.Runtime(audit=audit) as runtime:
        events: list[AuditEvent] = []
        remove = runtime.add_listener(events.append)
        async with control.serve(runtime, **kwargs) as server:
            h = Harness(runtime, server)
            h.events = events
            try:
                yield h
            finally:
                await h.client.aclose()
        remove()


def raw_request(url: str, head: bytes, body: bytes = b"") -> int:
    """Send raw bytes as one HTTP/1.1 request; the response status (0: closed, no answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b"HTTP/1."):
        return 0
    return int(data.split(b" ", 2)[1])


def request_head(
    method: str, path: str, headers: list[tuple[bytes, bytes]], length: int | None = None
) -> bytes:
    """A raw request head with Host and Connection: close."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    lines += [k + b": " + v for k, v in headers]
    if length is not None:
        lines.append(b"Content-Length: " + str(length).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


# ------------------------------------------------------------------ inventory and kill


async def test_inventory_lists_filters_and_details_sessions(tmp_path: Path) -> None:
    """GET /api/sessions filters by agent, label and state; the detail has live planes."""
    async with harness(tmp_path) as h, anyio.create_task_group() as tg:
        a = await tg.start(run_agent, h.runtime, "researcher", {"tenant": "acme"})
        b = await tg.start(run_agent, h.runtime, "coder", {"tenant": "zeta"})
        c = h.client
        everyone = (await c.get("/api/sessions", headers=auth("viewer"))).json()
        assert {s["session_id"] for s in everyone["sessions"]} == {a.id, b.id}
        by_agent = (await c.get("/api/sessions?agent=coder", headers=auth("viewer"))).json()
        assert [s["session_id"] for s in by_agent["sessions"]] == [b.id]
        by_label = await c.get("/api/sessions?label=tenant=acme", headers=auth("viewer"))
        assert [s["session_id"] for s in by_label.json()["sessions"]] == [a.id]
        none = await c.get("/api/sessions?state=terminated", headers=auth("viewer"))
        assert none.json()["count"] == 0
        detail = (await c.get(f"/api/sessions/{a.id}", headers=auth("viewer"))).json()
        assert detail["state"] == "running"
        assert detail["calls_in_flight"] == 2
        assert len(detail["live"]["tool_calls"]) == 2
        assert detail["live"]["processes"] == []
        assert detail["live"]["threads"] == []
        assert detail["budget"]["actions"] == 2
        h.runtime.interrupt_all("test over", trigger="shutdown")


async def test_kill_returns_the_stop_report_once_quiescent_and_is_idempotent(
    tmp_path: Path,
) -> None:
    """POST kill answers with the StopReport; a second kill returns the same interrupt."""
    async with harness(tmp_path) as h, anyio.create_task_group() as tg:
        s = await tg.start(run_agent, h.runtime, "researcher")
        first = await h.client.post(
            f"/api/sessions/{s.id}/kill",
            json={"reason": "prompt injection"},
            headers=auth("operator"),
        )
        assert first.status_code == 200, first.text
        body = first.json()
        report = body["report"]
        assert report["quiescent"] is True
        assert report["outcome"] == "stopped"
        assert report["operator"] == "operator-t"
        assert report["trigger"] == "operator"
        assert report["reason"] == "prompt injection"
        assert report["tool_calls_cancelled"] == 2
        again = await h.client.post(
            f"/api/sessions/{s.id}/kill", json={"reason": "again"}, headers=auth("admin")
        )
        assert again.status_code == 200
        assert again.json()["interrupt_id"] == body["interrupt_id"]
        assert again.json()["report"]["reason"] == "prompt injection"
        listing = await h.client.get("/api/sessions?state=terminated", headers=auth("viewer"))
        assert [r["session_id"] for r in listing.json()["sessions"]] == [s.id]
        assert listing.json()["sessions"][0]["report"]["interrupt_id"] == body["interrupt_id"]


async def test_kill_without_waiting_answers_202_with_the_interrupt_id(tmp_path: Path) -> None:
    """?wait=false returns 202 and the interrupt id; the stop then completes."""
    async with harness(tmp_path) as h, anyio.create_task_group() as tg:
        s = await tg.start(run_agent, h.runtime, "researcher")
        r = await h.client.post(
            f"/api/sessions/{s.id}/kill?wait=false",
            json={"reason": "r"},
            headers=auth("operator"),
        )
        assert r.status_code == 202
        assert r.json()["interrupt_id"] == s.handle.interrupt_id
        report = await s.handle
        assert report.operator == "operator-t"
        assert report.quiescent


async def test_bulk_kill_by_agent_label_and_all(tmp_path: Path) -> None:
    """POST /api/kill stops what the selector matches, one result per session."""
    async with harness(tmp_path) as h, anyio.create_task_group() as tg:
        a = await tg.start(run_agent, h.runtime, "researcher", {"tenant": "acme"})
        b = await tg.start(run_agent, h.runtime, "researcher", {"tenant": "zeta"})
        c = await tg.start(run_agent, h.runtime, "coder", {"tenant": "acme"})
        op = auth("operator")
        empty = await h.client.post("/api/kill", json={"reason": "x"}, headers=op)
        assert empty.status_code == 400  # no selector: never "everything" by accident
        r = await h.client.post(
            "/api/kill",
            json={"reason": "x", "agent": "researcher", "labels": {"tenant": "zeta"}},
            headers=op,
        )
        assert [x["session_id"] for x in r.json()["results"]] == [b.id]
        r = await h.client.post(
            "/api/kill", json={"reason": "x", "labels": {"tenant": "acme"}}, headers=op
        )
        assert {x["session_id"] for x in r.json()["results"]} == {a.id, c.id}
        assert all(x["report"]["quiescent"] for x in r.json()["results"])
        r = await h.client.post("/api/kill", json={"reason": "x", "all": True}, headers=op)
        assert r.json() == {"results": [], "count": 0}


async def test_kill_through_http_while_the_agent_loop_is_blocked(tmp_path: Path) -> None:
    """The control plane answers a kill while the agent's loop is stuck in time.sleep:
    202 at once, the guard blocks at once, and the session is terminated when the loop
    turns again."""
    blocked = threading.Event()
    answered = threading.Event()
    seen: dict[str, Any] = {}

    async with harness(tmp_path) as h, anyio.create_task_group() as tg:
        s = await tg.start(run_agent, h.runtime, "researcher")
        url = h.server.url

        def operator() -> None:
            blocked.wait(10)
            with httpx.Client(base_url=url, timeout=10) as c:
                r = c.post(
                    f"/api/sessions/{s.id}/kill?wait=false",
                    json={"reason": "stuck agent"},
                    headers=auth("operator"),
                )
                seen["kill"] = r.status_code, r.json()
                seen["guard"] = s.guard("search")
                seen["detail"] = c.get(f"/api/sessions/{s.id}", headers=auth("viewer")).json()
                seen["still_blocked"] = not answered.is_set()
            answered.set()

        thread = threading.Thread(target=operator)
        thread.start()

        def stuck() -> None:
            blocked.set()
            deadline = time.monotonic() + 20
            while not answered.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)

        stuck()  # called on the loop thread: the agent's loop is blocked until it returns
        thread.join(10)
        assert seen["still_blocked"] is True
        status, body = seen["kill"]
        assert status == 202
        assert body["interrupt_id"] == s.handle.interrupt_id
        assert seen["guard"].action == "block"
        assert seen["detail"]["live"] is None
        assert "did not answer" in seen["detail"]["live_error"]
        report = await s.handle  # the loop turns again: the fan-out runs, the stop completes
        assert report.outcome == "stopped"
        assert report.quiescent
        assert report.operator == "operator-t"
        assert report.reason == "stuck agent"


async def test_unknown_session_404_and_finished_session_409(tmp_path: Path) -> None:
    """Kill of an unknown id is 404; of a session that finished by itself, 409."""
    async with harness(tmp_path) as h:
        r = await h.client.post(
            "/api/sessions/nope/kill", json={"reason": "x"}, headers=auth("operator")
        )
        assert r.status_code == 404
        async with h.runtime.session("quick") as s:
            pass
        await anyio.wait_all_tasks_blocked()
        for _ in range(100):  # the end of the session hops to the control loop
            listed = await h.client.get("/api/sessions?state=finished", headers=auth("viewer"))
            if listed.json()["count"]:
                break
        r = await h.client.post(
            f"/api/sessions/{s.id}/kill", json={"reason": "x"}, headers=auth("operator")
        )
        assert r.status_code == 409


# ------------------------------------------------------------------ FAULT 51: the matrix

NEEDS: list[tuple[str, str, str | None]] = [
    # (method, path template, least role; None: no role may)
    ("GET", "/api/sessions", "viewer"),
    ("GET", "/api/sessions/{id}", "viewer"),
    ("GET", "/api/audit", "viewer"),
    ("GET", "/api/audit/verify", "viewer"),
    ("GET", "/metrics", "viewer"),
    ("GET", "/api/whoami", "viewer"),
    ("POST", "/api/sessions/{id}/kill?wait=false", "operator"),
    ("POST", "/api/kill?wait=false", "operator"),
    ("GET", "/api/tokens", "admin"),
    *[
        ("POST", f"/api/sessions/{{id}}/{a}", None)
        for a in ("resume", "config", "budgets", "tools", "prompt")
    ],
    *[("POST", f"/api/{a}", None) for a in ("resume", "config", "budgets", "tools", "prompt")],
]
RANK = {"viewer": 0, "operator": 1, "admin": 2}


async def test_role_endpoint_matrix_every_cell_and_every_denial_audited(tmp_path: Path) -> None:
    """Each role gets 2xx where allowed, 403 (audited with its token id) elsewhere; no
    token gets 401; nothing resumes, configures or instructs an agent."""
    async with harness(tmp_path) as h, anyio.create_task_group() as tg:
        s = await tg.start(run_agent, h.runtime, "researcher", {"t": "1"})
        cells = 0
        for method, template, need in NEEDS:
            path = template.format(id=s.id)
            body: dict[str, Any] = {"reason": "matrix"}
            if path.startswith("/api/kill"):
                body["labels"] = {"t": "nobody"}
            none = await h.client.request(method, path, json=body)
            assert none.status_code == 401, (method, path)
            for role in ROLES:
                before = len(h.denials())
                r = await h.client.request(method, path, json=body, headers=auth(role))
                allowed = need is not None and RANK[role] >= RANK[need]
                if allowed:
                    assert 200 <= r.status_code < 300, (role, method, path, r.text)
                    assert len(h.denials()) == before
                else:
                    assert r.status_code == 403, (role, method, path, r.text)
                    await anyio.wait_all_tasks_blocked()
                    for _ in range(100):
                        if len(h.denials()) > before:
                            break
                        await anyio.lowlevel.checkpoint()
                    denial = h.denials()[-1]
                    assert denial.operator == f"{role}-t"
                    assert denial.details["role"] == role
                    assert denial.details["status"] == 403
                cells += 1
        assert cells == len(NEEDS) * 3
        blob = json.dumps([repr(e) for e in h.events])
        assert not any(tok in blob for tok, _ in TOKENS.values())  # ids, never tokens
        h.runtime.interrupt_all("test over", trigger="shutdown")


async def test_unknown_paths_need_a_token_before_they_404(tmp_path: Path) -> None:
    """Unknown API paths: 401 without a token, 404 with one."""
    async with harness(tmp_path) as h:
        assert (await h.client.get("/api/nothing")).status_code == 401
        r = await h.client.get("/api/nothing", headers=auth("viewer"))
        assert r.status_code == 404


# ------------------------------------------------------------------ FAULT 50: credentials

BAD_AUTH: list[list[tuple[bytes, bytes]]] = [
    [],
    [(b"Authorization", b"Bearer")],
    [(b"Authorization", b"Bearer ")],
    [(b"Authorization", b"Basic dXNlcjpwYXNz")],
    [(b"Authorization", b"Bearer  " + TOKENS["operator"][0].encode())],
    [(b"Authorization", b"Bearer " + TOKENS["operator"][0].encode() + b" x")],
    [(b"Authorization", b"Bearer \xc3\xa9t\xc3\xa9")],
    [(b"Authorization", b"Bearer \xff\xfe")],
    [(b"Authorization", b"Bearer " + b"a" * 5000)],
    [(b"Authorization", b"Bearer " + TOKENS["operator"][0].encode())] * 2,
    [(b"Authorization", b"Bearer abc\x00def")],
    [(b"Authorization", b"Bearer " + b"a" * 1_000_000)],
]


async def test_malformed_credentials_are_refused_never_with_a_5xx(tmp_path: Path) -> None:
    """Missing, empty, wrong scheme, extra spaces, non-ASCII, NUL, oversized, duplicated
    Authorization headers: 400/401/431 (or the connection refused), never a 5xx."""
    limiter = control.FailureLimiter(burst=1000, per_second=1000)
    async with harness(tmp_path, limiter=limiter) as h:
        url = h.server.url
        for headers in BAD_AUTH:
            head = request_head("GET", "/api/sessions", headers)
            status = await anyio.to_thread.run_sync(raw_request, url, head)
            assert status in (400, 401), (headers[:1], status)
        ok = request_head(
            "GET", "/api/sessions", [(b"authorization", b"bearer " + TOKENS["viewer"][0].encode())]
        )
        assert await anyio.to_thread.run_sync(raw_request, url, ok) == 200  # RFC 7235


async def test_a_hash_is_not_a_token_and_the_agent_holds_none(tmp_path: Path) -> None:
    """FAULT 52: what an agent's tool can read (env, token file) authenticates nothing."""
    lines = "\n".join(e.line() for e in ENTRIES)
    async with harness(tmp_path) as h, anyio.create_task_group() as tg:
        s = await tg.start(run_agent, h.runtime, "researcher")
        assert h.server.url.startswith("http://127.0.0.1:")
        url = h.server.url

        def tool() -> list[int]:
            candidates = [v for k, v in os.environ.items() if "TOKEN" in k.upper()]
            candidates += lines.replace(":", "\n").split()
            codes = []
            with httpx.Client(base_url=url, timeout=10) as c:
                for cand in candidates:
                    r = c.post(
                        f"/api/sessions/{s.id}/kill",
                        json={"reason": "self"},
                        headers={"Authorization": f"Bearer {cand}"},
                    )
                    codes.append(r.status_code)
            return codes

        codes = await anyio.to_thread.run_sync(tool)
        assert codes
        assert all(c in (401, 429) for c in codes)
        assert not s.interrupted
        h.runtime.interrupt_all("test over", trigger="shutdown")


# ------------------------------------------------------------------ FAULT 53: CSRF


async def test_cross_site_posts_are_refused_and_no_cookie_or_cors_is_offered(
    tmp_path: Path,
) -> None:
    """A cross-origin POST is 403 even with a token; cookies alone are 401; no CORS."""
    async with harness(tmp_path) as h, anyio.create_task_group() as tg:
        s = await tg.start(run_agent, h.runtime, "researcher")
        path = f"/api/sessions/{s.id}/kill"
        body = {"reason": "csrf"}
        evil = await h.client.post(
            path, json=body, headers={**auth("operator"), "Origin": "https://evil.example"}
        )
        assert evil.status_code == 403
        site = await h.client.post(
            path, json=body, headers={**auth("operator"), "Sec-Fetch-Site": "cross-site"}
        )
        assert site.status_code == 403
        cookie = await h.client.post(
            path, json=body, headers={"Cookie": f"token={TOKENS['operator'][0]}"}
        )
        assert cookie.status_code == 401
        assert (await h.client.get(path)).status_code == 405
        pre = await h.client.options(path, headers={"Origin": "https://evil.example"})
        assert pre.status_code in (401, 403, 405)
        for r in (evil, site, cookie, pre):
            assert "set-cookie" not in r.headers
            assert "access-control-allow-origin" not in r.headers
        assert not s.interrupted
        h.runtime.interrupt_all("test over", trigger="shutdown")


# ------------------------------------------------------------------ FAULT 54: flood


async def test_auth_flood_is_rate_limited_and_a_valid_kill_still_succeeds(
    tmp_path: Path,
) -> None:
    """Bad tokens get 429 + Retry-After once over budget; an operator's kill sent in the
    middle of the flood is served with its StopReport."""
    limiter = control.FailureLimiter(burst=10, per_second=0.01)
    async with harness(tmp_path, limiter=limiter) as h, anyio.create_task_group() as tg:
        s = await tg.start(run_agent, h.runtime, "researcher")
        codes: list[int] = []
        retry: list[str] = []
        kill: dict[str, Any] = {}
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=h.server.url, limits=limits, timeout=30) as c:

            async def bad(i: int) -> None:
                r = await c.get("/api/sessions", headers={"Authorization": f"Bearer bad{i}"})
                codes.append(r.status_code)
                if r.status_code == 429:
                    retry.append(r.headers["retry-after"])

            async def good() -> None:
                r = await c.post(
                    f"/api/sessions/{s.id}/kill",
                    json={"reason": "during flood"},
                    headers=auth("operator"),
                )
                kill["r"] = r

            async with anyio.create_task_group() as flood:
                for i in range(400):
                    flood.start_soon(bad, i)
                    if i == 200:
                        flood.start_soon(good)
        assert set(codes) <= {401, 429}
        assert codes.count(401) == 10
        assert codes.count(429) == 390
        assert all(int(x) >= 1 for x in retry)
        assert kill["r"].status_code == 200
        assert kill["r"].json()["report"]["quiescent"]
        rate_events = [e for e in h.events if e.kind == "control_denied"]
        assert len(rate_events) == 10  # 429s are counted, not written one by one


# ------------------------------------------------------------------ FAULT 56: payloads


async def test_hostile_payloads_get_4xx(tmp_path: Path) -> None:
    """10 MB reason, bad JSON, wrong type, deep nesting, duplicates, NaN, bad UTF-8."""
    async with harness(tmp_path) as h, anyio.create_task_group() as tg:
        s = await tg.start(run_agent, h.runtime, "researcher")
        path = f"/api/sessions/{s.id}/kill"
        op = auth("operator")
        js = {**op, "Content-Type": "application/json"}
        big = json.dumps({"reason": "x" * 10_000_000})
        cases: list[tuple[dict[str, str], bytes | str, int]] = [
            (js, big, 413),
            (js, "{not json", 400),
            ({**op, "Content-Type": "text/plain"}, '{"reason": "x"}', 415),
            (op, '{"reason": "x"}', 415),
            (js, "[" * 12000 + "]" * 12000, 413),
            (js, "[" * 8000 + "]" * 8000, 400),
            (js, '{"reason": "a", "reason": "b"}', 400),
            (js, '{"reason": NaN}', 400),
            (js, b'{"reason": "\xff\xfe"}', 400),
            (js, '"just a string"', 400),
            (js, '{"reason": ""}', 400),
            (js, json.dumps({"reason": "r" * 1001}), 400),
            (js, '{"reason": 5}', 400),
        ]
        for headers, content, status in cases:
            r = await h.client.post(path, content=content, headers=headers)
            assert r.status_code == status, (content[:40], r.status_code, r.text[:200])

        def chunked() -> int:
            body = b"{" + b" " * 40_000 + b"}"
            head = (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                f"Authorization: Bearer {TOKENS['operator'][0]}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
            framed = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
            return raw_request(h.server.url, head, framed)

        assert await anyio.to_thread.run_sync(chunked) == 413  # capped while reading
        assert not s.interrupted
        h.runtime.interrupt_all("test over", trigger="shutdown")


async def test_reason_with_newlines_and_sql_is_stored_verbatim_and_logged_escaped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Log injection and SQL metacharacters: stored exactly (bound parameters), one log
    line per kill with the reason escaped."""
    reason = "x'); DROP TABLE events; --\nFAKE LOG LINE\r\n<script>alert(1)</script>"
    caplog.set_level(logging.INFO, logger="kill_switch.control")
    async with harness(tmp_path) as h, anyio.create_task_group() as tg:
        s = await tg.start(run_agent, h.runtime, "researcher")
        r = await h.client.post(
            f"/api/sessions/{s.id}/kill", json={"reason": reason}, headers=auth("operator")
        )
        assert r.status_code == 200
        assert r.json()["report"]["reason"] == reason
        rows = await h.client.get(
            f"/api/audit?session={s.id}&kind=interrupt_requested", headers=auth("viewer")
        )
        assert [e["reason"] for e in rows.json()["events"]] == [reason]
        verified = await h.client.get("/api/audit/verify", headers=auth("viewer"))
        assert verified.json()["ok"] is True
    kills = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("kill ")]
    assert len(kills) == 1
    assert "\n" not in kills[0]
    assert "\r" not in kills[0]
    assert "\\nFAKE LOG LINE" in kills[0]


async def test_audit_endpoints_page_and_say_when_there_is_no_sqlite_log(tmp_path: Path) -> None:
    """/api/audit pages by seq; without a SQLite audit it is 404 with a clear message."""
    async with harness(tmp_path) as h, anyio.create_task_group() as tg:
        for _ in range(3):
            s = await tg.start(run_agent, h.runtime, "a")
            await h.client.post(
                f"/api/sessions/{s.id}/kill", json={"reason": "r"}, headers=auth("operator")
            )
        v = auth("viewer")
        page1 = (await h.client.get("/api/audit?limit=2", headers=v)).json()["events"]
        page2 = (
            await h.client.get(f"/api/audit?limit=2&after={page1[-1]['seq']}", headers=v)
        ).json()["events"]
        assert [e["seq"] for e in page1] + [e["seq"] for e in page2] == [1, 2, 3, 4]
        desc = (await h.client.get("/api/audit?order=desc&limit=1", headers=v)).json()
        assert desc["events"][0]["seq"] > 4
        for bad in ("limit=0", "limit=x", "order=up", "since=nan"):
            assert (await h.client.get(f"/api/audit?{bad}", headers=v)).status_code == 400
    async with harness(tmp_path / "m", sqlite=False) as h:
        r = await h.client.get("/api/audit", headers=auth("viewer"))
        assert r.status_code == 404
        assert "no SQLite audit" in r.json()["error"]["message"]
        r = await h.client.get("/api/audit/verify", headers=auth("viewer"))
        assert r.status_code == 404


# ------------------------------------------------------------------ FAULT 57: rotation


async def test_revoked_or_rotated_token_is_rejected_on_the_next_request(tmp_path: Path) -> None:
    """Removing a token from the file (or revoking it by API) takes effect at once."""
    token, entry = control.new_token("operator", "rotating")
    admin_tok, admin = control.new_token("admin", "boss")
    path = tmp_path / "tokens.txt"
    path.write_text(f"{entry.line()}\n{admin.line()}\n")
    store = control.TokenStore(path=path)
    async with harness(tmp_path, tokens=store) as h:
        hdr = {"Authorization": f"Bearer {token}"}
        assert (await h.client.get("/api/whoami", headers=hdr)).json()["token_id"] == "rotating"
        new_token, new_entry = control.new_token("operator", "rotating")
        path.write_text(f"# rotated\n{new_entry.line()}\n{admin.line()}\n")
        assert (await h.client.get("/api/whoami", headers=hdr)).status_code == 401
        hdr2 = {"Authorization": f"Bearer {new_token}"}
        assert (await h.client.get("/api/whoami", headers=hdr2)).status_code == 200
        boss = {"Authorization": f"Bearer {admin_tok}"}
        listed = (await h.client.get("/api/tokens", headers=boss)).json()["tokens"]
        assert {"token_id": "rotating", "role": "operator"} in listed
        assert "sha256" not in json.dumps(listed)
        r = await h.client.post("/api/tokens/rotating/revoke", headers=boss)
        assert r.status_code == 200
        assert (await h.client.get("/api/whoami", headers=hdr2)).status_code == 401
        revoked = [e for e in h.events if e.kind == "control_token_revoked"]
        assert revoked[0].operator == "boss"
        assert revoked[0].details["token_id"] == "rotating"
        blob = repr(h.events)
        assert token not in blob
        assert new_token not in blob
        assert admin_tok not in blob


def test_token_configuration_is_validated() -> None:
    """Bad lines, unknown roles and duplicate ids are refused at start-up."""
    good = ENTRIES[0].line()
    with pytest.raises(ValueError, match="unknown role"):
        control.TokenStore(env=good.replace("viewer", "root"))
    with pytest.raises(ValueError, match="64 hex"):
        control.TokenStore(env="a:viewer:1234")
    with pytest.raises(ValueError, match="duplicate"):
        control.TokenStore(env=f"{good};{good}")
    store = control.TokenStore(env=f"{good}, {ENTRIES[1].line()}\n# comment")
    assert [e.token_id for e in store.entries()] == ["viewer-t", "operator-t"]
    assert store.authenticate("é".encode()) is None  # non-ASCII never raises
    with pytest.raises(ValueError, match="no control-plane token"):
        control.ControlServer(object(), tokens=[])  # type: ignore[arg-type]


# ------------------------------------------------------------------ events and metrics


async def test_event_stream_carries_interrupts_and_reports(tmp_path: Path) -> None:
    """GET /api/events streams audit events and the stop report of a kill."""
    async with harness(tmp_path) as h, anyio.create_task_group() as tg:
        s = await tg.start(run_agent, h.runtime, "researcher")
        got: list[str] = []
        opened = anyio.Event()

        async def listen() -> None:
            async with h.client.stream("GET", "/api/events", headers=auth("viewer")) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                async for line in r.aiter_lines():
                    if line.startswith(":"):
                        opened.set()
                    if line.startswith("event: "):
                        got.append(line[7:])
                        if line == "event: report":
                            return

        async with anyio.create_task_group() as inner:
            inner.start_soon(listen)
            await opened.wait()
            await h.client.post(
                f"/api/sessions/{s.id}/kill", json={"reason": "r"}, headers=auth("operator")
            )
        assert "audit" in got
        assert got[-1] == "report"
        metrics = (await h.client.get("/metrics", headers=auth("viewer"))).text
        assert 'kill_switch_interrupts_total{trigger="operator"} 1' in metrics
        assert 'kill_switch_sessions{state="terminated"} 1' in metrics
        assert "kill_switch_kill_latency_seconds_count 1" in metrics
        assert 'kill_switch_audit_info{kind="sqlite"} 1' in metrics


async def test_slow_event_clients_lose_events_not_the_runtime(tmp_path: Path) -> None:
    """A client that does not read has a bounded queue; drops are counted."""
    async with harness(tmp_path) as h:
        broker = h.server.control.broker
        frames = broker.stream()
        await anext(frames)  # subscribed
        done = threading.Event()

        def record_many() -> None:
            for i in range(broker.queue_size + 50):
                h.runtime.record(AuditEvent("test_event", None, reason=str(i)))
            done.set()

        await anyio.to_thread.run_sync(record_many)
        for _ in range(1000):
            if broker.dropped >= 50:
                break
            await anyio.sleep(0.001)
        assert broker.dropped >= 50
        await frames.aclose()  # type: ignore[attr-defined]  # an async generator


def test_dashboard_page_has_a_strict_policy_and_no_cookies(tmp_path: Path) -> None:
    """GET / serves the page with a hash-based CSP, no cookies, no framing."""

    async def main() -> httpx.Response:
        async with harness(tmp_path) as h:
            return await h.client.get("/")

    r = anyio.run(main)
    assert r.status_code == 200
    assert "kill_switch" in r.text
    csp = r.headers["content-security-policy"]
    assert "'unsafe-inline'" not in csp
    assert "sha256-" in csp
    assert "frame-ancestors 'none'" in csp
    assert "set-cookie" not in r.headers
    assert r.headers["x-frame-options"] == "DENY"


# ------------------------------------------------------------------ CLI


def _cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "kill_switch", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    return proc.returncode, proc.stdout, proc.stderr


async def test_cli_lists_and_kills_through_http(tmp_path: Path) -> None:
    """`sessions` prints a table (or JSON); `kill ID` and `kill --agent` stop sessions."""
    async with harness(tmp_path) as h, anyio.create_task_group() as tg:
        a = await tg.start(run_agent, h.runtime, "researcher", {"tenant": "acme"})
        b = await tg.start(run_agent, h.runtime, "coder")
        env = {"KILL_SWITCH_URL": h.server.url, "KILL_SWITCH_TOKEN": TOKENS["operator"][0]}
        code, out, _ = await anyio.to_thread.run_sync(lambda: _cli("sessions", env=env))
        assert code == 0
        assert "SESSION" in out
        assert a.id in out
        assert "tenant=acme" in out
        code, out, _ = await anyio.to_thread.run_sync(lambda: _cli("sessions", "--json", env=env))
        assert json.loads(out)["count"] == 2
        code, out, _ = await anyio.to_thread.run_sync(
            lambda: _cli("kill", a.id, "--reason", "cli", env=env)
        )
        assert code == 0
        assert "stopped, quiescent" in out
        code, out, _ = await anyio.to_thread.run_sync(
            lambda: _cli("kill", "--agent", "coder", "--reason", "cli", "--json", env=env)
        )
        assert code == 0
        assert json.loads(out)["results"][0]["session_id"] == b.id
        viewer = {**env, "KILL_SWITCH_TOKEN": TOKENS["viewer"][0]}
        code, _, err = await anyio.to_thread.run_sync(
            lambda: _cli("kill", "--all", "--reason", "x", env=viewer)
        )
        assert code == 1
        assert "refused (403)" in err


def test_cli_errors_when_unreachable_or_misused(tmp_path: Path) -> None:
    """Unreachable server: exit 3 with a clear message; no token: exit 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"KILL_SWITCH_URL": f"http://127.0.0.1:{port}", "KILL_SWITCH_TOKEN": "kst_x"}
    code, _, err = _cli("sessions", env=env)
    assert code == 3
    assert "cannot reach the control plane" in err
    code, _, err = _cli("sessions", env={**env, "KILL_SWITCH_TOKEN": ""})
    assert code == 2
    assert "no token" in err
    code, _, err = _cli("kill", "--reason", "x", env=env)
    assert code == 2


def test_cli_token_create_prints_a_token_and_its_hash_line() -> None:
    """`token create --role operator`: the token authenticates against its hash line."""
    code, out, _ = _cli("token", "create", "--role", "operator", "--json")
    assert code == 0
    data = json.loads(out)
    store = control.TokenStore(env=data["line"])
    principal = store.authenticate(data["token"].encode())
    assert principal is not None
    assert principal.role == "operator"
    assert data["token"] not in data["line"]


# ------------------------------------------------------------------ a runtime on a thread


def slow_query() -> None:
    """A sync tool that waits, interruptibly, in its worker thread."""
    ks.sleep(60)


async def run_busy_agent(
    runtime: ks.Runtime,
    *,
    task_status: anyio.abc.TaskStatus[ks.Session] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """A session with parked tool calls, a process and a sync tool in a worker thread."""
    async with runtime.session("builder", labels={"tenant": "acme"}) as session:
        for _ in range(3):
            session.start_soon(park, tool="park")
        null = subprocess.DEVNULL  # nobody reads its output
        await session.open_process(["sleep", "60"], stdin=null, stdout=null, stderr=null)
        session.start_soon(session.run_sync, slow_query, tool="slow_query")
        task_status.started(session)
        await anyio.sleep_forever()


class BackgroundControl:
    """A runtime with agents and its control plane, run on a thread of its own, for
    tests that must stay synchronous (Hypothesis, Playwright's sync API)."""

    def __init__(
        self,
        tmp_path: Path,
        agents: list[tuple[str, dict[str, str]]],
        *,
        busy: bool = False,
    ) -> None:
        self._db = str(tmp_path / "audit.db")
        self._agents = agents
        self._busy = busy
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: anyio.Event | None = None
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="test runtime")
        self.url = ""
        self.sessions: list[ks.Session] = []

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # re-raised in the test's thread by __exit__
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = anyio.Event()
        async with (
            ks.Runtime(audit=self._db) as runtime,
            control.serve(runtime, tokens=ENTRIES) as server,
            anyio.create_task_group() as tg,
        ):
            self.url = server.url
            for agent, labels in self._agents:
                self.sessions.append(await tg.start(run_agent, runtime, agent, labels, 2))
            if self._busy:
                self.sessions.append(await tg.start(run_busy_agent, runtime))
            self._ready.set()
            await self._stop.wait()
            runtime.interrupt_all("test over", trigger="shutdown")

    def __enter__(self) -> BackgroundControl:
        self._thread.start()
        if not self._ready.wait(60) or self._error is not None or not self.url:
            self.__exit__()
            raise RuntimeError(f"background runtime did not start: {self._error!r}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        assert not self._thread.is_alive(), "the background runtime did not stop"
        if self._error is not None:
            raise self._error
