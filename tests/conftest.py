"""Shared fixtures. Interrupt tests run on asyncio and on uvloop (``pytestmark = both_loops``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import pytest

from kill_switch.testing import MemoryAudit

from .redis_server import RedisServer

if TYPE_CHECKING:
    from pathlib import Path

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _factories() -> dict[str, LoopFactory]:
    factories: dict[str, LoopFactory] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a test dependency on Linux
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_loops: run this async test on asyncio and on uvloop")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, LoopFactory]:
    if item.get_closest_marker("both_loops") is not None:
        return _factories()
    # pytest-asyncio requires a non-empty mapping from every call of this hook.
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
def audit() -> MemoryAudit:
    """An in-memory audit sink to assert on."""
    return MemoryAudit()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of its own on a free loopback port; always stopped (the fleet's
    tests, which skip where it is not installed)."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
