"""``ControlConfig``: the control plane's options, validated once, built from keywords."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

import kill_switch as ks
from kill_switch import control

from .test_control_api import ENTRIES, auth


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"port": 70000}, ValueError, "port must be within 0..65535"),
        ({"port": "80"}, TypeError, "port must be an int"),
        ({"kill_timeout": float("nan")}, ValueError, "kill_timeout must be finite and > 0"),
        ({"kill_timeout": 0}, ValueError, "kill_timeout must be finite and > 0"),
        ({"header_timeout": True}, TypeError, "header_timeout must be a number of seconds"),
        ({"max_connections": 0}, ValueError, "max_connections must be within"),
        ({"allowed_hosts": "agent.internal"}, TypeError, "not one str"),
        ({"allowed_hosts": [""]}, TypeError, "non-empty str"),
        ({"audit_path": 3}, TypeError, "audit_path must be a str or None"),
        ({"limiter": object()}, TypeError, "limiter"),
    ],
)
def test_bad_options_are_refused_at_construction(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Each bad option is a clear TypeError/ValueError when the config is built."""
    with pytest.raises(error, match=message):
        control.ControlConfig(**options)


def test_keywords_build_the_same_config() -> None:
    """The keyword options of ControlServer build the config it holds; both at once are
    refused."""
    runtime = ks.Runtime()
    server = control.ControlServer(
        runtime, tokens=ENTRIES, port=0, kill_timeout=2.0, allowed_hosts=["agent.internal"]
    )
    assert server.config == control.ControlConfig(
        port=0, kill_timeout=2.0, allowed_hosts=("agent.internal",)
    )
    with pytest.raises(TypeError, match="not both"):
        control.ControlServer(runtime, control.ControlConfig(), tokens=ENTRIES, port=1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        control.ControlServer(runtime, tokens=ENTRIES, prot=1)  # type: ignore[call-arg]  # the typo under test


def test_hosts_are_loopback_the_bound_host_and_the_extra_ones() -> None:
    """``hosts()`` is the loopback names, the bound host (not a wildcard) and the extras."""
    assert control.ControlConfig(host="10.1.2.3", allowed_hosts=["a.example"]).hosts() == [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "a.example",
        "10.1.2.3",
    ]
    assert "0.0.0.0" not in control.ControlConfig(host="0.0.0.0").hosts()
    assert control.ControlConfig(host="::1").hosts()[-1] == "[::1]"


async def test_served_with_a_config_object() -> None:
    """``serve(runtime, config)`` serves with that config's options (a foreign Host is
    refused, an allowed one answered)."""
    config = control.ControlConfig(allowed_hosts=("agent.internal",))
    async with (
        ks.Runtime() as runtime,
        control.serve(runtime, config, tokens=ENTRIES) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
    ):
        assert server.config is config
        ok = await client.get("/api/whoami", headers={**auth("viewer"), "Host": "agent.internal"})
        bad = await client.get("/api/whoami", headers={**auth("viewer"), "Host": "evil.example"})
        assert (ok.status_code, bad.status_code) == (200, 400)
        assert ok.json()["scope"] == "runtime"
