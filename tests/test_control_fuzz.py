"""Hypothesis fuzz of the control plane's headers and bodies: never a 5xx (FAULTS 50, 56)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_control_api import TOKENS, BackgroundControl, raw_request, request_head

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundControl]:
    """One runtime with two agents and its control plane, for the whole module."""
    path: Path = tmp_path_factory.mktemp("fuzz")
    with BackgroundControl(path, [("researcher", {"tenant": "acme"}), ("coder", {})]) as bg:
        yield bg


def _line(b: bytes) -> bytes:
    # CR/LF would end the header line: that is framing, not a header value.
    return b.replace(b"\r", b"").replace(b"\n", b"")


header_bytes = st.binary(max_size=700).map(_line)
tokens = st.sampled_from([t for t, _ in TOKENS.values()])
authorization = st.one_of(
    st.none(),
    header_bytes,
    header_bytes.map(lambda b: b"Bearer " + b),
    st.tuples(tokens, header_bytes).map(lambda t: b"Bearer " + t[0].encode() + t[1]),
    tokens.map(lambda t: b"Bearer " + t.encode()),
    tokens.map(lambda t: b"bEaReR " + t.encode()),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)
bodies = st.one_of(
    st.binary(max_size=3000),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=1500).map(lambda r: json.dumps({"reason": r}).encode()),
    st.integers(1, 30_000).map(lambda n: b"[" * n + b"]" * n),
    st.just(b"x" * 40_000),
)
content_types = st.one_of(
    st.none(),
    st.sampled_from([b"application/json", b"application/json; charset=utf-8", b"text/plain"]),
    header_bytes,
)


@pytest.mark.slow
@FUZZ
@given(
    auth=authorization,
    extra=st.lists(
        st.tuples(st.sampled_from([b"Authorization", b"Origin", b"X-F", b"Cookie"]), header_bytes),
        max_size=3,
    ),
    path=st.sampled_from(
        [
            "/api/sessions",
            "/api/sessions/{id}",
            "/metrics",
            "/api/audit",
            "/api/whoami",
            "/api/sessions/{id}/resume",
            "/api/nope",
            "/",
        ]
    ),
    query=st.text(alphabet="abcdefghijklmnopqrstuvwxyz=&%0123456789", max_size=40),
)
def test_fuzzed_headers_never_get_a_5xx(
    plane: BackgroundControl,
    auth: bytes | None,
    extra: list[tuple[bytes, bytes]],
    path: str,
    query: str,
) -> None:
    """Any Authorization, Origin or Cookie bytes on any read path: an answer below 500."""
    headers = ([(b"Authorization", auth)] if auth is not None else []) + extra
    target = path.format(id=plane.sessions[0].id) + ("?" + query if query else "")
    status = raw_request(plane.url, request_head("GET", target, headers))
    assert status < 500, (target, headers)


@pytest.mark.slow
@FUZZ
@given(
    auth=authorization,
    ctype=content_types,
    body=bodies,
    path=st.sampled_from(
        [
            "/api/sessions/no-such-session/kill",
            "/api/kill?wait=false&x=1",
            "/api/sessions/{id}/prompt",
            "/api/tokens/x/revoke",
        ]
    ),
    declared=st.sampled_from(["exact", "none", "short", "huge"]),
)
def test_fuzzed_bodies_never_get_a_5xx(
    plane: BackgroundControl,
    auth: bytes | None,
    ctype: bytes | None,
    body: bytes,
    path: str,
    declared: str,
) -> None:
    """Any body, content type and Content-Length on the state-changing paths: below 500,
    and no session is stopped by a selector it did not name."""
    headers = [(b"Authorization", auth)] if auth is not None else []
    if ctype is not None:
        headers.append((b"Content-Type", ctype))
    length = {"exact": len(body), "none": None, "short": len(body) // 2, "huge": 10**9}[declared]
    if length is None:
        body = b""
    target = path.format(id=plane.sessions[1].id)
    status = raw_request(plane.url, request_head("POST", target, headers, length), body)
    assert status < 500, (target, status)
