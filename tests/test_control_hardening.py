"""The control plane against a careless operator and a hostile local client: issue 14."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import anyio
import pytest

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
            os.fsencode("caf") + b"\xe9",  # type: ignore[list-item]
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "not valid" in proc.stderr and "Traceback" not in proc.stderr
