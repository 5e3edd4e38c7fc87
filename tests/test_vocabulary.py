"""Triggers, reasons, policies and decisions: validated at construction."""

from __future__ import annotations

import math

import anyio
import pytest

import kill_switch as ks
from kill_switch._vocabulary._triggers import MAX_REASON, bound_reason, check_trigger


@pytest.mark.parametrize("trigger", sorted(ks.TRIGGERS))
def test_known_triggers_accepted(trigger: str) -> None:
    """Every documented trigger is accepted."""
    assert check_trigger(trigger) == trigger


def test_trigger_set_is_the_documented_one() -> None:
    """The trigger vocabulary is exactly the one the design names."""
    assert {
        "operator", "supervisor", "budget", "deadline",
        "sentinel", "parent", "shutdown", "watchdog", "fleet_lost",
    } == ks.TRIGGERS  # fmt: skip


@pytest.mark.parametrize(("trigger", "error"), [("Operator", ValueError), (None, TypeError)])
def test_bad_trigger_rejected(trigger: object, error: type[Exception]) -> None:
    """Unknown or non-string triggers raise a clear error."""
    with pytest.raises(error):
        check_trigger(trigger)


def test_long_reason_is_cut_not_refused() -> None:
    """A 10 MB reason is bounded; the kill is never refused for its explanation."""
    reason = bound_reason("x" * 10_000_000)
    assert len(reason) < MAX_REASON + 50
    assert reason.endswith("characters cut]")


async def test_bad_interrupt_arguments_raise_before_anything_happens() -> None:
    """A bad trigger or reason type is an immediate error; the session is untouched."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a") as session:
            with pytest.raises(ValueError, match="unknown trigger"):
                session.interrupt("x", trigger="nope")
            with pytest.raises(TypeError, match="reason"):
                session.interrupt(b"bytes", trigger="operator")  # type: ignore[arg-type]
            assert not session.interrupted
            await anyio.lowlevel.checkpoint()
        assert session.state == "finished"


@pytest.mark.parametrize("field", ["stop_timeout", "term_grace", "thread_grace", "audit_timeout"])
@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf])
def test_policy_rejects_non_positive_or_non_finite(field: str, value: float) -> None:
    """Grace periods must be finite and positive."""
    with pytest.raises(ValueError, match=field):
        ks.StopPolicy(**{field: value})  # type: ignore[arg-type]  # float fields only


@pytest.mark.parametrize("value", ["1", True, None])
def test_policy_rejects_wrong_types(value: object) -> None:
    """Grace periods must be numbers (bool is not a number of seconds)."""
    with pytest.raises(TypeError):
        ks.StopPolicy(stop_timeout=value)  # type: ignore[arg-type]


def test_policy_cap_must_be_positive_int() -> None:
    """The abandoned-thread cap is a positive int."""
    with pytest.raises(ValueError, match="max_abandoned_threads"):
        ks.StopPolicy(max_abandoned_threads=0)
    with pytest.raises(TypeError):
        ks.StopPolicy(max_abandoned_threads=1.5)  # type: ignore[arg-type]


def test_decision_action_validated() -> None:
    """A Decision is allow or block, nothing else."""
    assert ks.Decision("allow").allowed
    assert not ks.Decision.block("no", "denied").allowed
    with pytest.raises(ValueError, match="action"):
        ks.Decision("maybe")  # type: ignore[arg-type]


def test_ids_are_unique_in_a_process_its_threads_and_a_forked_child() -> None:
    """Event ids stay unique where they could collide: many at once from threads, and in
    a forked child (which must not continue its parent's sequence; negative control:
    without the at-fork reseed the child's next id is the parent's)."""
    import os
    import threading

    from kill_switch._vocabulary import _audit_event
    from kill_switch._vocabulary._audit_event import new_id

    ids: list[str] = []

    def many() -> None:
        ids.extend(new_id() for _ in range(5000))

    threads = [threading.Thread(target=many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == len(ids) == 20_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)

    def child_and_parent_ids(reseed: bool) -> tuple[str, str]:
        r, w = os.pipe()
        saved = _audit_event._reseed
        if not reseed:  # the negative control: the child keeps its parent's sequence
            _audit_event._reseed = lambda: None
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                os.write(w, new_id().encode())
                os._exit(0)
        finally:
            _audit_event._reseed = saved
        os.close(w)
        with os.fdopen(r) as f:
            forked = f.read()
        os.waitpid(pid, 0)
        return forked, new_id()

    forked, mine = child_and_parent_ids(reseed=True)
    assert forked[:16] != mine[:16]
    assert forked != mine
    forked, mine = child_and_parent_ids(reseed=False)
    assert forked == mine  # without the reseed the two processes make the same id
