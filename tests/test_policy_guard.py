"""Tool policy in the guard: allow/deny lists, patterns and a predicate (ToolRules)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest

import kill_switch as ks
from kill_switch import Limits, ToolRules

if TYPE_CHECKING:
    from kill_switch.testing import MemoryAudit

pytestmark = pytest.mark.both_loops


async def noop(*args: Any, **kwargs: Any) -> None:
    await anyio.lowlevel.checkpoint()


def call(tool: str, **kwargs: Any) -> ks.ToolCall:
    return ks.ToolCall("s", "agent", tool, (), kwargs)


def test_deny_wins_over_allow_and_patterns_match() -> None:
    """deny beats allow; fnmatch patterns work in both lists."""
    rules = ToolRules(allow={"search", "fs.*"}, deny={"fs.delete"})
    assert rules(call("search")) is None
    assert rules(call("fs.read")) is None
    denied = rules(call("fs.delete"))
    assert denied is not None
    assert denied.code == "denied"
    not_allowed = rules(call("shell"))
    assert not_allowed is not None
    assert "allow list" in not_allowed.reason


def test_predicate_sees_tool_and_args() -> None:
    """The predicate decides over the whole call."""
    rules = ToolRules(predicate=lambda c: not str(c.kwargs.get("path", "")).startswith("/etc"))
    assert rules(call("read", path="/tmp/x")) is None
    refused = rules(call("read", path="/etc/shadow"))
    assert refused is not None
    assert refused.code == "denied"


@pytest.mark.parametrize(
    "kwargs",
    [{"allow": "search"}, {"deny": [1]}, {"predicate": 3}, {"allow": 5}],
)
def test_invalid_rules_rejected(kwargs: dict[str, Any]) -> None:
    """A bare string, non-str names or a non-callable predicate are refused."""
    with pytest.raises(TypeError):
        ToolRules(**kwargs)


async def test_rules_block_and_audit_in_a_session(audit: MemoryAudit) -> None:
    """A denied call raises ToolBlocked, is audited, counts no action; others run."""
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a", tool_policy=ToolRules(deny={"shell"})) as session:
            await session.call(noop, tool="search")
            with pytest.raises(ks.ToolBlocked) as info:
                await session.call(noop, tool="shell")
            assert not isinstance(info.value, ks.LimitExceeded)
            assert info.value.decision.code == "denied"
            assert session.guard("shell").code == "denied"
            assert session.info().actions == 1
    assert session.state == "finished"
    blocked = [e for e in audit.events if e.kind == "tool_blocked"]
    assert [e.details["tool"] for e in blocked] == ["shell", "shell"]


async def test_raising_predicate_fails_closed() -> None:
    """A predicate that raises blocks the call with policy_error."""

    def bug(c: ks.ToolCall) -> bool:
        raise KeyError("oops")

    async with ks.Runtime() as runtime:
        async with runtime.session("a", tool_policy=ToolRules(predicate=bug)) as session:
            assert session.guard("t").code == "policy_error"


async def test_policy_callable_still_supported() -> None:
    """A plain callable returning Decision | bool | None keeps working."""

    def policy(c: ks.ToolCall) -> ks.Decision | bool | None:
        if c.tool == "a":
            return None
        if c.tool == "b":
            return True
        if c.tool == "c":
            return ks.Decision.block("custom", "custom_code")
        return False

    async with ks.Runtime() as runtime:
        async with runtime.session("s", tool_policy=policy) as session:
            assert session.guard("a").allowed
            assert session.guard("b").allowed
            assert session.guard("c").code == "custom_code"
            assert session.guard("d").code == "denied"


async def test_denied_call_does_not_use_budget() -> None:
    """A denied call reserves nothing and counts no action against limits."""
    async with ks.Runtime() as runtime:
        async with runtime.session(
            "a", tool_policy=ToolRules(deny={"x"}), limits=Limits(max_actions=1, max_cost=1.0)
        ) as session:
            for _ in range(5):
                assert session.guard("x").code == "denied"
            await session.call(noop, tool="y", cost=1.0)
            budget = session.budget()
            assert budget is not None
            assert budget["actions"] == 1
