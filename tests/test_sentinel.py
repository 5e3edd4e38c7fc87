"""The sentinel: each built-in detector fires on its pattern and stays quiet on a normal
run; enforce vs observe; fail-closed and fail-open; time box; cooldown and hysteresis
(FAULTS 59)."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import kill_switch as ks
from kill_switch import (
    Alert,
    CallRate,
    CostVelocity,
    DeniedCalls,
    Detector,
    ErrorStreak,
    RepeatedCall,
    Sentinel,
    ToolRules,
    default_detectors,
)
from kill_switch.testing import FakeClock

if TYPE_CHECKING:
    from kill_switch._sentinel import SessionWatch
    from kill_switch.testing import MemoryAudit

pytestmark = pytest.mark.both_loops


async def noop(*args: Any, **kwargs: Any) -> None:
    await anyio.lowlevel.checkpoint()


async def fail(*args: Any) -> None:
    await anyio.lowlevel.checkpoint()
    raise OSError("tool failed")


async def park() -> None:
    await anyio.sleep_forever()


def alerts(audit: MemoryAudit, session_id: str) -> list[dict[str, Any]]:
    return [
        dict(e.details)
        for e in audit.events
        if e.session_id == session_id and e.kind == "sentinel_alert"
    ]


async def normal_run(session: ks.Session, clock: FakeClock) -> None:
    """A well-behaved agent: varied calls, a few a second, cheap, mostly successful."""
    for i in range(200):
        clock.now += 0.25
        with contextlib.suppress(OSError):
            await session.call(noop if i % 7 else fail, i % 5, tool=f"tool{i % 3}", cost=0.01)


async def calls_until_blocked(
    session: ks.Session,
    *args: Any,
    clock: FakeClock | None = None,
    step: float = 0.0,
    **kwargs: Any,
) -> tuple[int, ks.ToolBlocked]:
    """Make the same call until the guard blocks it; how many went through, and why not."""
    for n in range(10_000):  # pragma: no branch
        if clock is not None:
            clock.now += step
        try:
            await session.call(noop, *args, **kwargs)
        except ks.ToolBlocked as exc:
            return n, exc
    raise AssertionError("never blocked")


# ------------------------------------------------------------------ quiet on normal runs


async def test_default_detectors_stay_quiet_on_a_normal_run(audit: MemoryAudit) -> None:
    """The five built-ins with their defaults raise no alert on ordinary traffic."""
    clock = FakeClock()
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session(
            "a", sentinel=Sentinel(clock=clock), tool_policy=ToolRules(deny={"shell"})
        ) as session:
            await normal_run(session, clock)
            with pytest.raises(ks.ToolBlocked):
                await session.call(noop, tool="shell")  # one denial is not probing
    assert session.state == "finished"
    assert alerts(audit, session.id) == []
    assert len(default_detectors()) == 5


# ------------------------------------------------------------------ each detector fires


async def test_call_rate_spike_interrupts() -> None:
    """More than max_calls within the window: a critical alert stops the session."""
    clock = FakeClock()
    sentinel = Sentinel(detectors=(CallRate(max_calls=10, window=1.0),), clock=clock)
    async with ks.Runtime() as runtime:
        async with runtime.session("a", sentinel=sentinel) as session:
            for i in range(10):
                clock.now += 0.5  # 2 calls/s: fine
                await session.call(noop, i)
            n, blocked = await calls_until_blocked(session, clock=clock, step=0.01)  # a burst
            # Two calls of the slow phase are still in the 1 s window: 2 + 9 > 10.
            assert n == 8
            assert blocked.decision.code == "terminated"
            raise blocked
    report = session.report
    assert report is not None
    assert report.trigger == "sentinel"
    assert "calls_per_window" in report.reason


async def test_repeated_call_loop_interrupts() -> None:
    """The same call over and over is a loop: stopped at max_repeats."""
    sentinel = Sentinel(detectors=(RepeatedCall(max_repeats=5),))
    async with ks.Runtime() as runtime:
        async with runtime.session("looper", sentinel=sentinel) as session:
            for _ in range(4):
                await session.call(noop, "same", tool="search", q="x")
            await session.call(noop, "other", tool="search", q="x")  # breaks the streak
            calls, _ = await calls_until_blocked(session, "same", tool="search", q="x")
            assert calls == 4  # the 5th identical call in a row is refused
            await park()
    assert session.report is not None
    assert session.report.trigger == "sentinel"
    assert "same_call_repeats" in session.report.reason


async def test_repeated_call_with_unhashable_and_weird_args() -> None:
    """Lists, dicts and arguments whose == raises are handled without errors."""

    class Weird:
        def __eq__(self, other: object) -> bool:
            raise RuntimeError("no comparing me")

        __hash__ = object.__hash__

    sentinel = Sentinel(detectors=(RepeatedCall(max_repeats=3),))
    async with ks.Runtime() as runtime:
        async with runtime.session("a", sentinel=sentinel) as session:
            for _ in range(5):
                await session.call(noop, Weird())
            await session.call(noop, [1], {"a": [2]})
            await session.call(noop, [1], {"a": [2]})
            with pytest.raises(ks.ToolBlocked):
                await session.call(noop, [1], {"a": [2]})
            await park()
    assert session.report is not None
    assert session.report.trigger == "sentinel"


async def test_error_streak_interrupts_and_success_resets() -> None:
    """max_errors failures in a row stop the session; a success in between resets."""
    sentinel = Sentinel(detectors=(ErrorStreak(max_errors=3),))
    async with ks.Runtime() as runtime:
        async with runtime.session("a", sentinel=sentinel) as session:
            for _ in range(2):
                with pytest.raises(OSError, match="tool failed"):
                    await session.call(fail)
            await session.call(noop)
            for _ in range(2):
                with pytest.raises(OSError, match="tool failed"):
                    await session.call(fail)
            assert not session.interrupted
            with pytest.raises(OSError, match="tool failed"):
                await session.call(fail)
            assert session.interrupted
            await park()
    assert session.report is not None
    assert "errors_in_a_row" in session.report.reason


async def test_cost_velocity_interrupts() -> None:
    """Spending more than max_cost within the window stops the session."""
    clock = FakeClock()
    sentinel = Sentinel(detectors=(CostVelocity(max_cost=1.0, window=10.0),), clock=clock)
    async with ks.Runtime() as runtime:
        async with runtime.session("a", sentinel=sentinel) as session:
            for _ in range(20):
                clock.now += 5.0  # 0.4 per 10 s: slow enough
                await session.call(noop, cost=0.2)
            n, _ = await calls_until_blocked(session, clock=clock, step=0.1, cost=0.2)
            # 0.4 of the slow phase is still in the 10 s window: 0.4 + 4 x 0.2 > 1.0.
            assert n == 3
            await park()
    assert session.report is not None
    assert "cost_per_window" in session.report.reason


async def test_denied_attempts_feed_the_sentinel(audit: MemoryAudit) -> None:
    """Repeated denied calls are probing: the sentinel stops the session."""
    sentinel = Sentinel(detectors=(DeniedCalls(max_denied=2, window=60),))
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session(
            "prober", sentinel=sentinel, tool_policy=ToolRules(deny={"shell", "net.*"})
        ) as session:
            for tool in ("shell", "net.http"):
                assert session.guard(tool).code == "denied"
            assert not session.interrupted
            assert session.guard("net.dns").code == "denied"
            assert session.interrupted
            await park()
    assert session.report is not None
    assert session.report.trigger == "sentinel"
    assert "denied_per_window" in session.report.reason
    assert audit.kinds(session.id).count("tool_blocked") >= 3


# ------------------------------------------------------------------ modes and severities


async def test_observe_mode_audits_without_interrupting(audit: MemoryAudit) -> None:
    """In observe mode a critical alert is audited and the session goes on."""
    seen: list[Alert] = []
    sentinel = Sentinel(
        detectors=(RepeatedCall(max_repeats=3),), mode="observe", on_alert=seen.append
    )
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a", sentinel=sentinel) as session:
            for _ in range(10):
                await session.call(noop)
    assert session.state == "finished"
    found = alerts(audit, session.id)
    assert len(found) == 1
    assert found[0]["metric"] == "same_call_repeats"
    assert found[0]["enforced"] is False
    assert [a.detector for a in seen] == ["repeated_call"]
    assert session.alerts == tuple(seen)


async def test_warning_severity_is_not_enforced(audit: MemoryAudit) -> None:
    """Only critical alerts interrupt in enforce mode."""
    sentinel = Sentinel(detectors=(RepeatedCall(max_repeats=3, severity="warning"),))
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a", sentinel=sentinel) as session:
            for _ in range(10):
                await session.call(noop)
    assert session.state == "finished"
    assert alerts(audit, session.id)[0]["severity"] == "warning"


async def test_detector_state_is_per_session() -> None:
    """One Sentinel shared by two sessions keeps separate detector state."""
    sentinel = Sentinel(detectors=(RepeatedCall(max_repeats=4),))
    async with ks.Runtime() as runtime:
        async with runtime.session("a", sentinel=sentinel) as a:
            async with runtime.session("b", sentinel=sentinel) as b:
                for _ in range(3):
                    await a.call(noop)
                    await b.call(noop)
                assert not a.interrupted
                assert not b.interrupted


# ------------------------------------------------------------------ failures


class Broken(Detector):
    name = "broken"

    def on_call(
        self, tool: str, args: tuple[Any, ...], kwargs: Any, cost: float, now: float
    ) -> Alert | None:
        raise ZeroDivisionError("detector bug")


class Slow(Detector):
    name = "slow"

    def on_call(
        self, tool: str, args: tuple[Any, ...], kwargs: Any, cost: float, now: float
    ) -> Alert | None:
        time.sleep(0.02)  # a detector that hangs for a while
        return None


async def test_raising_detector_fails_closed(audit: MemoryAudit) -> None:
    """A detector that raises interrupts the session with reason sentinel_error."""
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a", sentinel=Sentinel(detectors=(Broken(),))) as session:
            with pytest.raises(ks.ToolBlocked) as info:
                await session.call(noop)
            assert info.value.decision.code == "terminated"
            raise info.value
    report = session.report
    assert report is not None
    assert report.trigger == "sentinel"
    assert report.reason.startswith("sentinel_error")
    assert "ZeroDivisionError" in report.reason
    assert "sentinel_error" in audit.kinds(session.id)


async def test_raising_detector_fail_open_is_audited_and_disabled(audit: MemoryAudit) -> None:
    """Configured fail-open: the failure is audited, the detector switched off."""
    sentinel = Sentinel(detectors=(Broken(), RepeatedCall(max_repeats=50)), fail_open=True)
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a", sentinel=sentinel) as session:
            for _ in range(5):
                await session.call(noop)
    assert session.state == "finished"
    errors = [e for e in audit.events if e.kind == "sentinel_error"]
    assert len(errors) == 1
    assert errors[0].details["fail_open"] is True
    assert errors[0].details["disabled"] == "broken"


async def test_slow_detector_is_time_boxed() -> None:
    """A detector that overruns its time box counts as a failure: fail closed."""
    sentinel = Sentinel(detectors=(Slow(),), max_detector_seconds=0.001)
    async with ks.Runtime() as runtime:
        async with runtime.session("a", sentinel=sentinel) as session:
            await session.call(noop)  # admitted: the overrun is found after it ran
            await park()
    assert session.report is not None
    assert session.report.reason.startswith("sentinel_error")
    assert "time box" in session.report.reason


async def test_failing_on_alert_callback_fails_closed() -> None:
    """The on_alert callback is part of the sentinel: if it raises, fail closed."""

    def broken(alert: Alert) -> None:
        raise RuntimeError("pager down")

    sentinel = Sentinel(detectors=(RepeatedCall(2),), mode="observe", on_alert=broken)
    async with ks.Runtime() as runtime:
        async with runtime.session("a", sentinel=sentinel) as session:
            for _ in range(3):
                await session.call(noop)
            await park()
    assert session.report is not None
    assert "pager down" in session.report.reason


# ------------------------------------------------------------------ cooldown, hysteresis


class Always(Detector):
    name = "always"
    watch: SessionWatch | None = None

    def fresh(self) -> Always:
        return self  # one session only: the test reads the watch it was attached to

    def attach(self, watch: SessionWatch) -> None:
        self.watch = watch

    def on_call(
        self, tool: str, args: tuple[Any, ...], kwargs: Any, cost: float, now: float
    ) -> Alert | None:
        return Alert(self.name, "m", "warning", 1, 0, "always")


async def test_cooldown_suppresses_repeated_alerts(audit: MemoryAudit) -> None:
    """One detector's alerts are audited at most once per cooldown."""
    clock = FakeClock()
    always = Always()
    sentinel = Sentinel(detectors=(always,), cooldown=10.0, clock=clock)
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a", sentinel=sentinel) as session:
            for _ in range(20):
                clock.now += 1.0
                await session.call(noop)
            assert always.watch is not None
            assert always.watch.suppressed == 18
    assert len(alerts(audit, session.id)) == 2


async def test_hysteresis_keeps_a_flapping_rate_to_one_alert(audit: MemoryAudit) -> None:
    """A rate flapping just around its threshold alerts once; it re-arms only after
    falling below the re-arm level."""
    clock = FakeClock()
    sentinel = Sentinel(
        detectors=(CallRate(max_calls=4, window=1.0, rearm=0.5),),
        mode="observe",
        cooldown=0.0,
        clock=clock,
    )
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a", sentinel=sentinel) as session:
            for _ in range(40):  # 5 calls per window, then 4, then 5 ...: flapping
                clock.now += 0.2
                await session.call(noop)
            assert len(alerts(audit, session.id)) == 1
            clock.now += 10  # quiet: the window empties and the detector re-arms
            await session.call(noop)
            for _ in range(10):
                clock.now += 0.01
                await session.call(noop)
    assert len(alerts(audit, session.id)) == 2


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "make",
    [
        lambda: CallRate(0),
        lambda: CallRate(True),
        lambda: CallRate(5, window=float("nan")),
        lambda: CallRate(5, rearm=1.5),
        lambda: RepeatedCall(-1),
        lambda: ErrorStreak(2.5),  # type: ignore[arg-type]
        lambda: CostVelocity(float("inf")),
        lambda: DeniedCalls(3, window=0),
        lambda: Sentinel(mode="kill"),  # type: ignore[arg-type]
        lambda: Sentinel(detectors=[object()]),
        lambda: Sentinel(cooldown=-1),
        lambda: Sentinel(fail_open="yes"),  # type: ignore[arg-type]
    ],
)
def test_invalid_sentinel_config_rejected(make: Any) -> None:
    """Bad thresholds, modes and detectors are refused at construction."""
    with pytest.raises((TypeError, ValueError)):
        make()
