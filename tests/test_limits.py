"""Limits and the budget ledger: boundaries, reservations, the budget tree, deadlines,
per-tool timeouts, soft warnings, and several triggers at once (FAULTS 15, 58, 60, 61)."""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kill_switch as ks
from kill_switch import Alert, Detector, Limits, LimitWarning, Sentinel, report_cost
from kill_switch._ledger import Ledger
from kill_switch.testing import FakeClock

if TYPE_CHECKING:
    from kill_switch.testing import MemoryAudit

pytestmark = pytest.mark.both_loops


async def noop(*args: Any, **kwargs: Any) -> None:
    await anyio.lowlevel.checkpoint()


async def park() -> None:
    await anyio.sleep_forever()


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_actions": -1}, ValueError),
        ({"max_actions": 1.5}, TypeError),
        ({"max_actions": True}, TypeError),
        ({"max_actions": "10"}, TypeError),
        ({"max_actions": math.nan}, TypeError),
        ({"max_cost": -0.01}, ValueError),
        ({"max_cost": math.nan}, ValueError),
        ({"max_cost": -math.inf}, ValueError),
        ({"max_cost": "1"}, TypeError),
        ({"max_cost": False}, TypeError),
        ({"max_duration": 0}, ValueError),
        ({"max_duration": -5}, ValueError),
        ({"max_duration": math.nan}, ValueError),
        ({"tool_timeout": 0.0}, ValueError),
        ({"tool_timeouts": {"t": -1}}, ValueError),
        ({"tool_timeouts": {"t": math.inf}}, ValueError),
        ({"tool_timeouts": {1: 1.0}}, TypeError),
        ({"tool_timeouts": [("t", 1.0)]}, TypeError),
        ({"warn_at": 0}, ValueError),
        ({"warn_at": 1}, ValueError),
        ({"warn_at": 1.5}, ValueError),
        ({"warn_at": math.nan}, ValueError),
    ],
)
def test_invalid_limits_rejected(kwargs: dict[str, Any], error: type[Exception]) -> None:
    """Negative, NaN, wrong types and bool-as-number are refused at construction."""
    with pytest.raises(error):
        Limits(**kwargs)


def test_none_and_inf_mean_unlimited_and_zero_is_a_limit() -> None:
    """None and +inf both mean unlimited; 0 is a real limit; huge ints are kept."""
    assert Limits(max_actions=math.inf, max_cost=math.inf, max_duration=math.inf) == Limits()
    assert Limits(max_actions=0).max_actions == 0
    assert Limits(max_cost=0).max_cost == 0.0
    assert Limits(max_actions=10**30).max_actions == 10**30
    lim = Limits(tool_timeout=2, tool_timeouts={"search": 0.5})
    assert lim.timeout_for("search") == 0.5
    assert lim.timeout_for("other") == 2.0
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        lim.max_actions = 3  # type: ignore[misc]


async def test_runtime_rejects_wrong_limits_type() -> None:
    """runtime.session() refuses a limits or sentinel of the wrong type."""
    async with ks.Runtime() as runtime:
        with pytest.raises(TypeError):
            runtime.session("a", limits={"max_actions": 1})  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            runtime.session("a", sentinel=[])  # type: ignore[arg-type]


# ------------------------------------------------------------------ boundaries


async def test_max_actions_boundary_nth_allowed_next_blocked(audit: MemoryAudit) -> None:
    """With max_actions=N the Nth action is allowed, the N+1th blocked and interrupts."""
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a", limits=Limits(max_actions=3)) as session:
            for _ in range(3):
                await session.call(noop)
            with pytest.raises(ks.LimitExceeded) as info:
                await session.call(noop, tool="fourth")
            assert isinstance(info.value, ks.ToolBlocked)
            assert info.value.decision.code == "budget"
            assert session.info().actions == 3
            raise info.value  # absorbed: the session's own limit stopped it
    report = session.report
    assert report is not None
    assert report.trigger == "budget"
    assert "max_actions=3" in report.reason
    assert "limit_exceeded" in audit.kinds(session.id)


async def test_max_actions_zero_blocks_the_first_call() -> None:
    """max_actions=0 allows nothing."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a", limits=Limits(max_actions=0)) as session:
            assert session.guard("t").code == "budget"
            await park()
    assert session.report is not None
    assert session.report.trigger == "budget"


async def test_max_cost_boundary_exact_spend_allowed() -> None:
    """Spend may reach max_cost exactly; a call that would pass it is blocked."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a", limits=Limits(max_cost=1.0)) as session:
            await session.call(noop, cost=0.25)
            await session.call(noop, cost=0.75)
            assert session.budget() is not None
            assert session.budget()["spent"] == 1.0  # type: ignore[index]
            await session.call(noop, cost=0)  # free calls still fit
            with pytest.raises(ks.LimitExceeded) as info:
                await session.call(noop, cost=1e-9)
            raise info.value
    assert session.report is not None
    assert session.report.trigger == "budget"
    assert "max_cost=1" in session.report.reason


async def test_bad_cost_rejected_without_counting() -> None:
    """A negative or NaN cost raises and counts nothing."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a", limits=Limits(max_cost=5)) as session:
            for bad in (-1.0, math.nan, math.inf):
                with pytest.raises(ValueError, match="cost"):
                    await session.call(noop, cost=bad)
            assert session.budget()["reserved"] == 0.0  # type: ignore[index]
            assert session.info().actions == 0


# ------------------------------------------------------------------ reserve, reconcile


async def test_report_cost_reconciles_the_estimate() -> None:
    """The actual cost a tool reports replaces the caller's estimate after the call."""

    async def tool() -> str:
        await anyio.lowlevel.checkpoint()
        assert report_cost(0.2)
        return "ok"

    async with ks.Runtime() as runtime:
        async with runtime.session("a", limits=Limits(max_cost=1.0)) as session:
            assert await session.call(tool, cost=0.5) == "ok"
            budget = session.budget()
            assert budget is not None
            assert budget["spent"] == pytest.approx(0.2)
            assert budget["reserved"] == 0.0
            assert session.info().cost == pytest.approx(0.2)


async def test_report_cost_outside_a_metered_call_records_nothing() -> None:
    """report_cost() says False outside a call of a session with limits."""
    assert report_cost(1.0) is False

    async def tool() -> bool:
        await anyio.lowlevel.checkpoint()
        return report_cost(1.0)

    async with ks.Runtime() as runtime, runtime.session("a") as session:
        assert await session.call(tool) is False
    with pytest.raises(ValueError, match="actual"):
        report_cost(-1)


async def test_reservation_blocks_parallel_overspend() -> None:
    """Two calls in flight hold their estimates: a third that does not fit is refused."""
    gate = anyio.Event()

    async def slow() -> None:
        await gate.wait()

    async with ks.Runtime() as runtime:
        async with runtime.session("a", limits=Limits(max_cost=1.0)) as session:
            session.start_soon(slow, cost=0.4)
            session.start_soon(slow, cost=0.4)
            await anyio.wait_all_tasks_blocked()
            assert session.budget()["reserved"] == pytest.approx(0.8)  # type: ignore[index]
            decision = session.guard("t")  # a free call still fits
            assert decision.allowed
            with pytest.raises(ks.LimitExceeded):
                await session.call(slow, cost=0.4)
            await park()
    assert session.report is not None
    assert session.report.trigger == "budget"


async def test_actual_over_estimate_interrupts_after_the_call() -> None:
    """A tool that reports more than the budget allows stops the session."""

    async def greedy() -> str:
        await anyio.lowlevel.checkpoint()
        report_cost(5.0)
        return "late"

    async with ks.Runtime() as runtime:
        async with runtime.session("a", limits=Limits(max_cost=1.0)) as session:
            await session.call(greedy, cost=0.1)
    assert session.report is not None
    assert session.report.trigger == "budget"
    assert "spent 5" in session.report.reason
    assert session.report.late_results == 1  # the overspending result was not delivered


async def test_charge_counts_and_interrupts_past_the_limit() -> None:
    """session.charge() spends from the ledger; past max_cost it interrupts."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a", limits=Limits(max_cost=1.0)) as session:
            session.charge(0.6)
            assert session.info().cost == pytest.approx(0.6)
            with pytest.raises(ValueError, match="cost"):
                session.charge(-1)
            session.charge(0.6)
            await park()
    assert session.report is not None
    assert session.report.trigger == "budget"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_parallel_calls_never_overspend(data: st.DataObject) -> None:
    """Hypothesis over interleavings of starts and finishes: committed spend never
    passes max_cost, and a refused call interrupts with trigger budget."""
    n = data.draw(st.integers(1, 6), label="calls")
    estimates = data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n), label="est")
    actuals = [data.draw(st.integers(0, e), label=f"actual{i}") for i, e in enumerate(estimates)]
    max_cost = data.draw(st.integers(0, 15), label="max_cost")
    script = data.draw(st.lists(st.booleans(), min_size=2 * n, max_size=2 * n), label="ops")
    picks = data.draw(st.lists(st.integers(0, 100), min_size=2 * n, max_size=2 * n))

    async def main() -> None:
        gates = [anyio.Event() for _ in range(n)]

        async def tool(i: int) -> None:
            await gates[i].wait()
            report_cost(float(actuals[i]))

        async with ks.Runtime() as runtime:
            async with runtime.session("a", limits=Limits(max_cost=max_cost)) as session:
                started: list[int] = []
                running: list[int] = []
                for op, pick in zip(script, picks, strict=True):
                    if session.interrupted:
                        break
                    if (op or not running) and len(started) < n:
                        i = len(started)
                        started.append(i)
                        running.append(i)
                        session.start_soon(tool, i, cost=estimates[i])
                    elif running:
                        gates[running.pop(pick % len(running))].set()
                    await anyio.wait_all_tasks_blocked()
                    b = session.budget()
                    assert b is not None
                    assert b["spent"] + b["reserved"] <= max_cost
                for g in gates:
                    g.set()
            b = session.budget()
            assert b is not None
            assert b["spent"] <= max_cost
            if session.report is not None:
                assert session.report.trigger == "budget"
            else:
                assert b["spent"] == sum(actuals)

    asyncio.run(main())


# ------------------------------------------------------------------ the budget tree


async def test_child_spends_from_parent_budget() -> None:
    """A child without limits of its own cannot spend more than its parent's budget."""
    async with ks.Runtime() as runtime:
        async with runtime.session("parent", limits=Limits(max_cost=1.0)) as parent:
            await parent.call(noop, cost=0.5)
            async with runtime.session("child", parent=parent) as child:
                await child.call(noop, cost=0.5)
                assert parent.budget()["spent"] == 1.0  # type: ignore[index]
                with pytest.raises(ks.LimitExceeded) as info:
                    await child.call(noop, cost=0.1)
                assert parent.id in info.value.decision.reason
                raise info.value
            await park()
    assert child.report is not None
    assert child.report.trigger == "budget"
    assert parent.report is not None
    assert parent.report.trigger == "budget"


async def test_grandchild_with_generous_limits_cannot_bypass_root() -> None:
    """Nesting with looser limits never loosens an ancestor's limit."""
    async with ks.Runtime() as runtime:
        async with runtime.session("root", limits=Limits(max_actions=2)) as root:
            async with runtime.session("mid", parent=root, limits=Limits(max_actions=100)) as mid:
                async with runtime.session(
                    "leaf", parent=mid, limits=Limits(max_actions=1000)
                ) as leaf:
                    assert leaf.guard("a").allowed
                    assert mid.guard("b").allowed
                    decision = leaf.guard("c")
                    assert decision.code == "budget"
                    assert root.id in decision.reason
                    await park()
                await park()
            await park()
    assert root.report is not None
    assert root.report.trigger == "budget"
    assert leaf.report is not None
    assert leaf.report.trigger == "budget"


async def test_parent_tighter_tool_timeout_applies_to_child() -> None:
    """The tightest per-tool timeout along the tree wins."""
    async with ks.Runtime() as runtime:
        async with runtime.session("p", limits=Limits(tool_timeouts={"t": 0.001})) as parent:
            async with runtime.session(
                "c", parent=parent, limits=Limits(tool_timeout=3600)
            ) as child:
                with pytest.raises(TimeoutError):
                    await child.call(park, tool="t")
                assert child.state == "running"


# ------------------------------------------------------------------ deadlines


async def test_deadline_on_injected_clock_fires_exactly_once(audit: MemoryAudit) -> None:
    """At the deadline the next call is blocked and the session interrupted once
    (FAULTS 15): the timer firing afterwards adds nothing."""
    clock = FakeClock()
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a", limits=Limits(max_duration=60), clock=clock) as session:
            clock.now += 59.999
            await session.call(noop)
            clock.now += 0.001  # exactly at the deadline: blocked
            with pytest.raises(ks.LimitExceeded) as info:
                await session.call(noop)
            assert info.value.decision.code == "deadline"
            ledger = ledger_of(session)
            assert ledger is not None
            assert ledger.fire_deadline() is False  # the loop timer, late: nothing more
            raise info.value
    assert ledger is not None
    report = session.report
    assert report is not None
    assert report.trigger == "deadline"
    assert report.reason.startswith("timeout:")
    assert report.later == ()
    assert ledger._timers == []  # the stop cancelled the loop timer
    assert audit.kinds(session.id).count("interrupt_requested") == 1


@pytest.mark.slow
async def test_deadline_timer_interrupts_a_parked_body() -> None:
    """The loop timer interrupts a session whose body makes no calls at all."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a", limits=Limits(max_duration=0.02)) as session:
            await park()
    assert session.report is not None
    assert session.report.trigger == "deadline"
    assert session.report.later == ()
    assert session.report.latency.total < 30.0  # generous: shared machines are slow


async def test_moving_deadline_earlier_fires_immediately() -> None:
    """A deadline moved into the past interrupts at once (anyio test_deadline_moved)."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a", limits=Limits(max_duration=3600)) as session:
            session.move_deadline(0)
            await park()
    assert session.report is not None
    assert session.report.trigger == "deadline"


async def test_move_deadline_without_limits_and_removal() -> None:
    """move_deadline works on an unlimited session; None removes the deadline."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            session.move_deadline(3600)
            assert session.budget()["deadline_in"] == pytest.approx(3600, abs=5)  # type: ignore[index]
            session.move_deadline(None)
            assert session.budget()["deadline_in"] is None  # type: ignore[index]
            await session.call(noop)
            with pytest.raises(ValueError, match="seconds"):
                session.move_deadline(-1)
    assert session.state == "finished"


async def test_wall_clock_jump_does_not_move_deadlines(
    monkeypatch: pytest.MonkeyPatch, audit: MemoryAudit
) -> None:
    """time.time() jumping an hour either way changes no deadline (FAULTS 61); audit
    events carry both clocks."""
    real = time.time
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a", limits=Limits(max_duration=600)) as session:
            before = session.budget()["deadline_in"]  # type: ignore[index]
            monkeypatch.setattr(time, "time", lambda: real() + 3600)
            await session.call(noop)
            monkeypatch.setattr(time, "time", lambda: real() - 3600)
            await session.call(noop)
            after = session.budget()["deadline_in"]  # type: ignore[index]
            assert 0 <= before - after < 60
            monkeypatch.setattr(time, "time", real)
    assert session.state == "finished"
    started = next(e for e in audit.events if e.kind == "session_started")
    assert started.wall_time > 0
    assert started.mono_time > 0


# ------------------------------------------------------------------ per-tool timeout


async def test_tool_timeout_cancels_that_call_only(audit: MemoryAudit) -> None:
    """A per-tool timeout raises TimeoutError for that call; the session goes on."""
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a", limits=Limits(tool_timeouts={"slow": 0.001})) as session:
            with pytest.raises(TimeoutError):
                await session.call(park, tool="slow")
            await session.call(noop, tool="fast")
            assert not session.interrupted
    assert session.state == "finished"
    assert "interrupt_requested" not in audit.kinds(session.id)


async def test_tool_timeout_in_a_tool_task() -> None:
    """The timeout also applies off the body's fast path, and cancels only that call."""
    results: list[str] = []

    async def run() -> None:
        try:
            await session.call(park, tool="slow")
        except TimeoutError:
            results.append("timeout")

    async with ks.Runtime() as runtime:
        async with runtime.session("a", limits=Limits(tool_timeout=0.001)) as session:
            # Another task, awaited at once: the call runs off the body's fast path.
            await asyncio.get_running_loop().create_task(run())
    assert results == ["timeout"]
    assert session.state == "finished"


# ------------------------------------------------------------------ soft thresholds


async def test_warning_fires_once_per_limit_before_the_hard_stop(audit: MemoryAudit) -> None:
    """warn_at fires the callback and one audit event per limit, before the stop."""
    seen: list[LimitWarning] = []
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session(
            "a",
            limits=Limits(max_actions=4, max_cost=10, warn_at=0.5),
            on_limit_warning=seen.append,
        ) as session:
            await session.call(noop)
            assert seen == []
            await session.call(noop)
            assert [w.limit for w in seen] == ["max_actions"]
            await session.call(noop, cost=6)
            await session.call(noop, cost=1)
            assert [w.limit for w in seen] == ["max_actions", "max_cost"]
            assert not session.interrupted
    assert (seen[0].used, seen[0].maximum) == (2, 4)
    assert audit.kinds(session.id).count("limit_warning") == 2


async def test_failing_warning_callback_does_not_break_the_guard() -> None:
    """A warning callback that raises is kept as a secondary error; the call goes on."""

    def broken(w: LimitWarning) -> None:
        raise RuntimeError("callback bug")

    async with ks.Runtime() as runtime:
        async with runtime.session(
            "a", limits=Limits(max_actions=2, warn_at=0.5), on_limit_warning=broken
        ) as session:
            await session.call(noop)
            await session.call(noop)
            assert session.guard("x").code == "budget"
            await park()
    assert session.report is not None
    assert any("callback bug" in e for e in session.report.secondary_errors)


# ------------------------------------------------------------------ several triggers


class Armed(Detector):
    """Critical on every call once armed."""

    name = "armed"

    def __init__(self) -> None:
        self.armed = False

    def fresh(self) -> Armed:
        return self  # one session only: the test arms the very detector it watches

    def on_call(
        self, tool: str, args: tuple[Any, ...], kwargs: Any, cost: float, now: float
    ) -> Alert | None:
        if self.armed:
            return Alert(self.name, "armed", "critical", 1, 0, "armed")
        return None


async def test_every_automatic_trigger_at_once_is_deterministic(audit: MemoryAudit) -> None:
    """Deadline, budget and sentinel crossed on one call: one interrupt, primary
    deadline, then budget, then sentinel as later reasons (FAULTS 60)."""
    armed = Armed()
    clock = FakeClock()
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session(
            "a",
            limits=Limits(max_actions=1, max_duration=10),
            sentinel=Sentinel(detectors=(armed,), clock=clock),
            clock=clock,
        ) as session:
            await session.call(noop)
            armed.armed = True
            clock.now += 11
            with pytest.raises(ks.LimitExceeded) as info:
                await session.call(noop)
            assert info.value.decision.code == "deadline"
            raise info.value
    report = session.report
    assert report is not None
    assert report.trigger == "deadline"
    assert [r.trigger for r in report.later] == ["budget", "sentinel"]
    completed = [e for e in audit.events if e.kind == "interrupt_completed"]
    assert len(completed) == 1


async def test_operator_first_then_deadline_and_budget_in_the_same_instant() -> None:
    """Arrival order decides: an operator kill requested first stays primary; the
    deadline and budget that fire before the fan-out are kept as later reasons."""
    clock = FakeClock()
    async with ks.Runtime() as runtime:
        async with runtime.session(
            "a", limits=Limits(max_cost=1, max_duration=10), clock=clock
        ) as session:
            clock.now += 11
            session.interrupt("ops says stop", trigger="operator", operator="oncall")
            ledger = ledger_of(session)
            assert ledger is not None
            assert ledger.fire_deadline()  # the loop timer in the same iteration
            session.charge(2.0)  # a late cost report crossing the budget
            await park()
    report = session.report
    assert report is not None
    assert (report.trigger, report.operator) == ("operator", "oncall")
    assert [r.trigger for r in report.later] == ["deadline", "budget"]


async def test_report_cost_from_a_sync_tool_thread() -> None:
    """A sync tool run by run_sync reports its actual cost from its worker thread."""

    def sync_tool() -> str:
        assert report_cost(0.3)
        return "done"

    async with ks.Runtime() as runtime:
        async with runtime.session("a", limits=Limits(max_cost=1.0)) as session:
            assert await session.run_sync(sync_tool, cost=0.9) == "done"
            budget = session.budget()
            assert budget is not None
            assert budget["spent"] == pytest.approx(0.3)


def ledger_of(session: ks.Session) -> Ledger:
    """The session's ledger, through the plane contract (a plane while its timers run)."""
    return session.plane(Ledger, lambda: pytest.fail("the session has no ledger plane"))
