"""The control plane against a careless operator and a hostile local client: issue 14."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest

from benchmarks.control_load import LoadProcess
from kill_switch import control
from tests.test_control_api import auth, harness, raw_request, request_head, run_agent

if TYPE_CHECKING:
    from collections.abc import Iterator
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
            with anyio.fail_after(10):  # evicted connections leave once their close runs
                while h.server.open_connections > 8:  # noqa: ASYNC110  (uvicorn's plain set)
                    await anyio.sleep(0.01)
            # ``Connection: close``: a kept-alive connection is itself a waiting one, closed
            # by the 1 s header timeout while the sockets below are drained; reusing it for
            # /metrics would race that close (httpx does not retry a request on a dead one).
            killed = await h.client.post(
                f"/api/sessions/{session.id}/kill",
                json={"reason": "flood"},
                headers={**auth("operator"), "Connection": "close"},
            )
            assert killed.status_code == 200, killed.text
            for sock in socks:  # evicted at once, or timed out after 1 s
                assert await anyio.to_thread.run_sync(_closed_by_peer, sock)
            metrics = (await h.client.get("/metrics", headers=auth("viewer"))).text
            closed = {
                why: int(line.rsplit(" ", 1)[1])
                for why in ("evicted", "header_timeouts")
                for line in metrics.splitlines()
                if line.startswith(
                    f'kill_switch_control_connections_closed_total{{reason="{why}"}}'
                )
            }
            assert closed["evicted"] >= 1
            assert closed["header_timeouts"] >= 1
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


# ------------------------------------------------------------------ item 7: the small ones


async def test_only_allowed_host_names_are_served(tmp_path: Path) -> None:
    """DNS rebinding: a Host that is not a loopback name (or configured) gets 400."""
    async with harness(tmp_path, sqlite=False, allowed_hosts=["agent.internal"]) as h:
        port = h.server.url.rsplit(":", 1)[1]
        for host, status in [
            (f"127.0.0.1:{port}", 200),
            (f"localhost:{port}", 200),
            (f"agent.internal:{port}", 200),
            (f"attacker.example:{port}", 400),
            ("127.0.0.1.attacker.example", 400),
        ]:
            r = await h.client.get("/api/whoami", headers={"Host": host, **auth("viewer")})
            assert r.status_code == status, (host, r.text)
        assert h.denials() == []  # refused before anything is written to the audit log


async def test_audit_paging_beyond_int64_is_a_400(tmp_path: Path) -> None:
    """``?after=`` / ``?before=`` outside a 64-bit integer: 400, not a 500 from SQLite."""
    async with harness(tmp_path) as h:
        for q in ("after=9223372036854775808", "before=-9223372036854775809"):
            r = await h.client.get(f"/api/audit?{q}", headers=auth("viewer"))
            assert r.status_code == 400, r.text
        r = await h.client.get("/api/audit?after=9223372036854775807", headers=auth("viewer"))
        assert r.status_code == 200


def test_token_file_world_writable_or_clashing_with_the_environment_is_refused(
    tmp_path: Path,
) -> None:
    """A world-writable token file, or one repeating an id of ``$KILL_SWITCH_TOKENS``,
    is refused at start-up with a clear error."""
    _, entry = control.new_token("viewer", "dup")
    _, other = control.new_token("admin", "dup")
    path = tmp_path / "tokens.txt"
    path.write_text(entry.line() + "\n")
    os.chmod(path, 0o666)
    with pytest.raises(ValueError, match="world-writable"):
        control.TokenStore(path=path)
    os.chmod(path, 0o640)
    assert [e.token_id for e in control.TokenStore(path=path).entries()] == ["dup"]
    with pytest.raises(ValueError, match=r"also in \$KILL_SWITCH_TOKENS"):
        control.TokenStore(path=path, env=other.line())


def test_token_file_changes_are_seen_whatever_the_size_and_mtime(tmp_path: Path) -> None:
    """A same-size rewrite with its mtime put back revokes the old token; so does a file
    made world-writable, or one that gains an id of ``$KILL_SWITCH_TOKENS``."""
    old_tok, old = control.new_token("operator", "ops")
    new_tok, new = control.new_token("operator", "ops")
    _, env_entry = control.new_token("viewer", "env-v")
    path = tmp_path / "tokens.txt"
    path.write_text(old.line() + "\n")
    os.chmod(path, 0o600)
    store = control.TokenStore(path=path, env=env_entry.line())
    assert store.authenticate(old_tok.encode()) is not None
    before = path.stat()
    path.write_text(new.line() + "\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert store.authenticate(old_tok.encode()) is None
    assert store.authenticate(new_tok.encode()) is not None
    os.chmod(path, 0o602)
    assert store.authenticate(new_tok.encode()) is None
    os.chmod(path, 0o600)
    assert store.authenticate(new_tok.encode()) is not None
    path.write_text(f"{new.line()}\nenv-v:admin:{'0' * 64}\n")
    assert store.authenticate(new_tok.encode()) is None


async def test_kill_bodies_with_unknown_keys_are_refused(tmp_path: Path) -> None:
    """A typo (``label`` for ``labels``) is a 400, never a wider kill."""
    async with harness(tmp_path, sqlite=False) as h, anyio.create_task_group() as tg:
        session = await tg.start(run_agent, h.runtime, "a", {"tenant": "acme"})
        r = await h.client.post(
            "/api/kill",
            json={"reason": "r", "agent": "a", "label": {"tenant": "other"}},
            headers=auth("operator"),
        )
        assert r.status_code == 400
        assert "'label'" in r.json()["error"]["message"]
        r = await h.client.post(
            f"/api/sessions/{session.id}/kill",
            json={"reason": "r", "force": True},
            headers=auth("operator"),
        )
        assert r.status_code == 400
        assert not session.interrupted
        tg.cancel_scope.cancel()


def _exchange(url: str, data: bytes) -> tuple[int, bool]:
    """Send *data* on one connection: the answer's status and whether the server then
    closed the connection (within 5 s)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        got, closed = b"", False
        try:
            while chunk := sock.recv(65536):
                got += chunk
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
    return int(got.split(b" ", 2)[1]), closed


async def test_request_framing_h11_lets_through_is_refused(tmp_path: Path) -> None:
    """Content-Length with chunked: 400 and closed; a 100 KiB header block: 431 (or 400
    from the parser); an encoded slash in the path: 400."""
    async with harness(tmp_path, sqlite=False) as h, anyio.create_task_group() as tg:
        session = await tg.start(run_agent, h.runtime, "a")
        token = auth("operator")["Authorization"].encode()
        smuggle = (
            f"POST /api/sessions/{session.id}/kill HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
            + b"Authorization: "
            + token
            + b"\r\nContent-Type: application/json\r\nContent-Length: 4\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n10\r\n{"reason": "sm"}\r\n0\r\n\r\n'
        )
        status, closed = await anyio.to_thread.run_sync(_exchange, h.server.url, smuggle)
        assert (status, closed) == (400, True)
        bad_chunk = smuggle.replace(b"\r\n10\r\n", b"\r\n11\r\n")  # one byte short
        status, closed = await anyio.to_thread.run_sync(_exchange, h.server.url, bad_chunk)
        assert (status, closed) == (400, True)
        big = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        big += b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(100)) + b"\r\n"
        status, _ = await anyio.to_thread.run_sync(_exchange, h.server.url, big)
        assert status in (400, 431)
        for path in (f"/api/sessions/{session.id}%2Fx/kill", "/api/sessions/a%2fb"):
            head = request_head("GET", path, [(b"Authorization", token)])
            assert await anyio.to_thread.run_sync(raw_request, h.server.url, head) == 400
        assert not session.interrupted
        tg.cancel_scope.cancel()


async def test_trace_on_a_forbidden_path_is_403_and_audited(tmp_path: Path) -> None:
    """TRACE is "any method" too: 403 for every role, audited."""
    async with harness(tmp_path, sqlite=False) as h:
        r = await h.client.request("TRACE", "/api/resume", headers=auth("admin"))
        assert r.status_code == 403
        assert [d.details["method"] for d in h.denials()] == ["TRACE"]


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request as its server's ``answer`` says; records what it got."""

    def do_GET(self) -> None:
        """Record the request, then answer."""
        server: Any = self.server
        server.seen.append(dict(self.headers))
        status, headers, body = server.answer
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Quiet."""


@contextlib.contextmanager
def _http_server(answer: tuple[int, dict[str, str], bytes]) -> Iterator[Any]:
    """A plain HTTP server on 127.0.0.1 answering *answer* to everything."""
    server: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen, server.answer = [], answer
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _cli(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kill_switch", "sessions", "--url", url, "--token", "kst_t"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_never_follows_a_redirect_nor_crashes_on_an_odd_answer() -> None:
    """A redirect elsewhere is not followed (the token stays home): exit 3; a 2xx that is
    not the control plane's JSON: exit 3 with a message, never a traceback."""
    with _http_server((200, {}, b"{}")) as elsewhere:
        port = elsewhere.server_address[1]
        moved = (307, {"Location": f"http://localhost:{port}/api/sessions"}, b"")
        with _http_server(moved) as first:
            done = _cli(f"http://127.0.0.1:{first.server_address[1]}")
        assert done.returncode == 3, done.stderr
        assert "redirect" in done.stderr
        assert elsewhere.seen == []
    for answer in [
        (200, {"Content-Type": "text/html"}, b"<html>hello</html>"),
        (204, {}, b""),
        (200, {"Content-Type": "application/json"}, b'{"unexpected": 1}'),
        (302, {"Location": "/login"}, b""),
    ]:
        with _http_server(answer) as odd:
            done = _cli(f"http://127.0.0.1:{odd.server_address[1]}")
        assert done.returncode == 3, (answer, done.stderr)
        assert "Traceback" not in done.stderr
        assert done.stderr.startswith("kill-switch sessions: ")


# ------------------------------------------------------------------ soak


async def test_soak_an_operator_kill_answers_within_a_second_under_a_hostile_load(
    tmp_path: Path,
) -> None:
    """200 idle and half-sent sockets plus a bad-token flood from another process: each
    operator kill still answers (with its report) in under a second, and the flood
    costs the audit log no more than the failure budget."""
    limiter = control.FailureLimiter(burst=20, per_second=2.0)
    async with harness(tmp_path, limiter=limiter) as h, anyio.create_task_group() as tg:
        sessions = [await tg.start(run_agent, h.runtime, f"a{i}") for i in range(3)]
        load = await anyio.to_thread.run_sync(LoadProcess, h.server.url)
        try:
            assert await anyio.to_thread.run_sync(load.on) == 200
            with anyio.fail_after(30):
                while (await anyio.to_thread.run_sync(load.stats))["requests"] < 100:  # noqa: ASYNC110  (another process's counter)
                    await anyio.sleep(0.05)
            for session in sessions:
                started = time.monotonic()
                r = await h.client.post(
                    f"/api/sessions/{session.id}/kill",
                    json={"reason": "soak"},
                    headers=auth("operator"),
                )
                elapsed = time.monotonic() - started
                assert r.status_code == 200, r.text
                assert r.json()["report"]["quiescent"]
                assert elapsed < 1.0, f"kill took {elapsed:.3f} s under load"
            stats = await anyio.to_thread.run_sync(load.stats)
        finally:
            await anyio.to_thread.run_sync(load.close)
        assert stats["open"] == 200
        assert set(stats["statuses"]) <= {"401", "429"}
        assert stats["statuses"].get("429", 0) > 0
        assert len([d for d in h.denials() if d.operator is None]) <= 20 + 2 * 60
