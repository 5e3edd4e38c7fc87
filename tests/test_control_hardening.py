"""The control plane against a careless operator and a hostile local client: issue 14."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest

from kill_switch import control
from tests.test_control_api import auth, harness, raw_request, request_head, run_agent

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio

SURROGATE_BODY = b'{"reason": "caf\\udce9 \\ud800"}'


async def test_lone_surrogates_never_make_the_api_answer_500(tmp_path: Path) -> None:
    """A surrogate in a reason is refused with 400; one in a tool name or a stored reason
    is served escaped, and the inventory keeps answering."""
    async with harness(tmp_path, sqlite=False) as h, anyio.create_task_group() as tg:
        session = await tg.start(run_agent, h.runtime, "a")
        busy = await tg.start(run_agent, h.runtime, "b", None, 0)
        busy.start_soon(anyio.sleep_forever, tool="tool-\ud800")
        head = request_head(
            "POST",
            f"/api/sessions/{session.id}/kill",
            [
                (b"Authorization", auth("operator")["Authorization"].encode()),
                (b"Content-Type", b"application/json"),
            ],
            len(SURROGATE_BODY),
        )
        status = await anyio.to_thread.run_sync(raw_request, h.server.url, head, SURROGATE_BODY)
        assert status == 400
        assert not session.interrupted
        detail = await h.client.get(f"/api/sessions/{busy.id}", headers=auth("viewer"))
        assert detail.status_code == 200, detail.text
        assert json.dumps("tool-\ud800")[1:-1] in json.dumps(detail.json())
        # A reason given through the Python API is not refused: it must not poison reads.
        await session.interrupt("caf\udce9", trigger="operator")
        listing = await h.client.get("/api/sessions", headers=auth("viewer"))
        assert listing.status_code == 200, listing.text
        assert "caf\udce9" in {s["interrupt_reason"] for s in listing.json()["sessions"]}
        one = await h.client.get(f"/api/sessions/{session.id}", headers=auth("viewer"))
        assert one.status_code == 200, one.text
        tg.cancel_scope.cancel()


def test_cli_refuses_a_reason_that_is_not_utf8_before_sending(tmp_path: Path) -> None:
    """``--reason $'caf\\xe9'`` from a Latin-1 terminal: a clear usage error, exit 2."""
    env = {**os.environ, "KILL_SWITCH_TOKEN": "kst_x", "PYTHONUTF8": "0", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kill_switch",
            "kill",
            "s1",
            "--url",
            "http://127.0.0.1:9",
            "--reason",
            os.fsencode("caf") + b"\xe9",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "not valid" in proc.stderr
    assert "Traceback" not in proc.stderr


def _open_idle(url: str, n: int, head: bytes = b"") -> list[socket.socket]:
    """*n* connections to *url*; each sends *head* (a partial request) or nothing."""
    host, port = url.removeprefix("http://").split(":")
    out = []
    for _ in range(n):
        sock = socket.create_connection((host, int(port)), timeout=10)
        if head:
            sock.sendall(head)
        out.append(sock)
    return out


def _closed_by_peer(sock: socket.socket, timeout: float = 20.0) -> bool:
    """Whether the server closes *sock* within *timeout* (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


HALF_SENT = b"GET /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


async def test_idle_and_half_sent_connections_are_capped_and_timed_out(tmp_path: Path) -> None:
    """Beyond the cap, waiting sockets make room for an operator's kill; a request head
    not complete within the header timeout closes the connection."""
    async with (
        harness(tmp_path, sqlite=False, max_connections=8, header_timeout=1.0) as h,
        anyio.create_task_group() as tg,
    ):
        session = await tg.start(run_agent, h.runtime, "a")
        socks = await anyio.to_thread.run_sync(_open_idle, h.server.url, 15)
        socks += await anyio.to_thread.run_sync(_open_idle, h.server.url, 15, HALF_SENT)
        try:
            assert h.server._server is not None
            connections = h.server._server.server_state.connections
            with anyio.fail_after(10):  # evicted connections leave once their close runs
                while len(connections) > 8:  # noqa: ASYNC110  (uvicorn's plain set)
                    await anyio.sleep(0.01)
            killed = await h.client.post(
                f"/api/sessions/{session.id}/kill",
                json={"reason": "flood"},
                headers=auth("operator"),
            )
            assert killed.status_code == 200, killed.text
            for sock in socks:  # evicted at once, or timed out after 1 s
                assert await anyio.to_thread.run_sync(_closed_by_peer, sock)
            counters = h.server._protocol.counters
            assert counters["evicted"] >= 1
            assert counters["header_timeouts"] >= 1
        finally:
            for sock in socks:
                sock.close()
        tg.cancel_scope.cancel()


def test_an_operator_kill_gets_in_under_a_small_descriptor_limit(tmp_path: Path) -> None:
    """``kill-switch serve`` under ``ulimit -n 64``: 60 idle sockets do not keep an
    operator's kill out, and the server does not flood its log with accept errors."""
    token, entry = control.new_token("operator", "ops")
    env = {**os.environ, "KILL_SWITCH_TOKENS": entry.line(), "PYTHONUNBUFFERED": "1"}
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kill_switch", "serve", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)),
        )
    socks: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        url = line.split(" at ", 1)[1].split("/ ", 1)[0]
        socks = _open_idle(url, 60)
        answer = httpx.post(
            url + "/api/kill",
            json={"all": True, "reason": "incident"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert stderr_path.stat().st_size < 16 * 1024, stderr_path.read_text()[:2000]


async def test_unauthenticated_denials_record_no_session_and_a_bounded_path(
    tmp_path: Path,
) -> None:
    """A URL without a token never joins a session's trail nor writes its length into the
    audit log; an authenticated denial naming a real session still does."""
    async with harness(tmp_path, sqlite=False) as h, anyio.create_task_group() as tg:
        session = await tg.start(run_agent, h.runtime, "a")
        long_id = "x" * 8000
        for sid in (session.id, long_id):
            assert (await h.client.get(f"/api/sessions/{sid}")).status_code == 401
        r = await h.client.post(
            f"/api/sessions/{long_id}/kill", json={"reason": "r"}, headers=auth("viewer")
        )
        assert r.status_code == 403
        r = await h.client.post(
            f"/api/sessions/{session.id}/kill", json={"reason": "r"}, headers=auth("viewer")
        )
        assert r.status_code == 403
        denials = h.denials()
        assert [d.session_id for d in denials] == [None, None, None, session.id]
        assert all(len(d.details["path"]) <= 200 for d in denials)
        tg.cancel_scope.cancel()


async def test_forwarded_for_is_not_trusted(tmp_path: Path) -> None:
    """``X-Forwarded-For`` neither resets the failure budget nor forges the audited address."""
    limiter = control.FailureLimiter(burst=3, per_second=0.01)
    async with harness(tmp_path, sqlite=False, limiter=limiter) as h:
        codes = []
        for i in range(10):
            r = await h.client.get(
                "/api/whoami",
                headers={"Authorization": f"Bearer bad{i}", "X-Forwarded-For": f"10.0.0.{i}"},
            )
            codes.append(r.status_code)
        assert codes == [401] * 3 + [429] * 7
        assert {d.details["client"] for d in h.denials()} == {"127.0.0.1"}


async def _stream_until_end(client: httpx.AsyncClient, token: str, opened: anyio.Event) -> str:
    """Read ``/api/events`` with *token* until the server ends it; its last event name."""
    last = ""
    headers = {"Authorization": f"Bearer {token}"}
    async with client.stream("GET", "/api/events", headers=headers) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith(": kill_switch"):
                opened.set()
            elif line.startswith("event: "):
                last = line[7:]
    return last


async def test_revoking_a_token_ends_the_event_streams_opened_with_it(tmp_path: Path) -> None:
    """Removed from the token file, or revoked through the API: its streams end."""
    file_tok, file_entry = control.new_token("viewer", "from-file")
    api_tok, api_entry = control.new_token("viewer", "by-api")
    admin_tok, admin_entry = control.new_token("admin", "boss")
    path = tmp_path / "tokens.txt"
    path.write_text(f"{file_entry.line()}\n{api_entry.line()}\n{admin_entry.line()}\n")
    os.chmod(path, 0o600)
    store = control.TokenStore(path=path)
    async with harness(tmp_path, sqlite=False, tokens=store) as h:
        ends: dict[str, str] = {}
        opened = {"file": anyio.Event(), "api": anyio.Event()}

        async def watch(name: str, token: str) -> None:
            ends[name] = await _stream_until_end(h.client, token, opened[name])

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, "file", file_tok)
                tg.start_soon(watch, "api", api_tok)
                await opened["file"].wait()
                await opened["api"].wait()
                path.write_text(f"# rotated\n{api_entry.line()}\n{admin_entry.line()}\n")
                r = await h.client.post(
                    "/api/tokens/by-api/revoke", headers={"Authorization": f"Bearer {admin_tok}"}
                )
                assert r.status_code == 200
        assert ends == {"file": "revoked", "api": "revoked"}


async def test_one_token_cannot_hold_every_event_stream_slot(tmp_path: Path) -> None:
    """A viewer gets 429 past its per-token share; another token still gets a stream."""
    async with harness(tmp_path, sqlite=False) as h, contextlib.AsyncExitStack() as stack:
        limits = httpx.Limits(max_connections=100)
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=h.server.url, limits=limits, timeout=30)
        )
        per = h.server.control.broker.max_per_token
        for _ in range(per):
            r = await stack.enter_async_context(
                client.stream("GET", "/api/events", headers=auth("viewer"))
            )
            assert r.status_code == 200
        over = await client.get("/api/events", headers=auth("viewer"))
        assert over.status_code == 429
        r = await stack.enter_async_context(
            client.stream("GET", "/api/events", headers=auth("operator"))
        )
        assert r.status_code == 200
