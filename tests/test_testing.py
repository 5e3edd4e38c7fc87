"""The public test helpers in ``kill_switch.testing``."""

from __future__ import annotations

import math

import pytest

import kill_switch as ks
from kill_switch.testing import FakeClock, MemoryAudit


def test_fake_clock_moves_only_when_moved() -> None:
    """FakeClock reads its start until set or advanced; advance returns the new reading."""
    clock = FakeClock(5.0)
    assert clock() == clock() == 5.0
    assert clock.advance(2.5) == 7.5
    clock.now = 100.0
    assert clock() == 100.0
    assert repr(clock) == "FakeClock(now=100.0)"


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_fake_clock_never_goes_back(bad: float) -> None:
    """A monotonic clock refuses to move backwards (or by NaN)."""
    clock = FakeClock()
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(bad)
    assert clock() == 1000.0


async def noop() -> None:
    """A tool that does nothing."""


async def test_fake_clock_drives_a_session_deadline() -> None:
    """A session given a FakeClock meets its max_duration when the clock is moved there."""
    clock = FakeClock()
    async with (
        ks.Runtime(audit=MemoryAudit()) as runtime,
        runtime.session("a", limits=ks.Limits(max_duration=3600), clock=clock) as session,
    ):
        clock.advance(3599.0)
        await session.call(noop)
        clock.advance(1.0)
        with pytest.raises(ks.LimitExceeded) as info:
            await session.call(noop)
    assert info.value.decision.code == "deadline"
