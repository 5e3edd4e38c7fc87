"""The runtime: inventory, selection, sticky kills, shutdown, backend check."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import anyio
import pytest

import kill_switch as ks

if TYPE_CHECKING:
    from kill_switch.testing import MemoryAudit

pytestmark = pytest.mark.both_loops


async def park() -> None:
    await anyio.sleep_forever()


async def test_inventory_lists_entered_sessions_as_snapshots() -> None:
    """``sessions()`` returns frozen snapshots of every entered session."""
    async with ks.Runtime() as runtime:
        parent = runtime.session("orchestrator", labels={"tenant": "acme"})
        assert runtime.sessions() == ()  # not entered yet
        async with parent:
            async with runtime.session("worker", parent=parent) as child:
                infos = {i.agent: i for i in runtime.sessions()}
                assert set(infos) == {"orchestrator", "worker"}
                assert infos["orchestrator"].labels == {"tenant": "acme"}
                assert infos["worker"].parent_id == parent.id
                assert infos["worker"].state == "running"
                assert runtime.get(child.id) is child
                with pytest.raises(attrs_frozen_error()):
                    infos["worker"].state = "finished"  # type: ignore[misc]
        assert runtime.sessions() == ()
        assert runtime.get(parent.id) is None


def attrs_frozen_error() -> type[Exception]:
    import attrs

    return attrs.exceptions.FrozenInstanceError


async def test_interrupt_where_selects_by_agent_and_labels() -> None:
    """Only sessions matching the agent and every label are interrupted."""
    async with ks.Runtime() as runtime, anyio.create_task_group() as tg:
        sessions = {
            name: runtime.session(agent, labels=labels)
            for name, agent, labels in [
                ("a1", "coder", {"tenant": "acme"}),
                ("a2", "coder", {"tenant": "other"}),
                ("b1", "reviewer", {"tenant": "acme"}),
            ]
        }

        async def run(s: ks.Session) -> None:
            async with s:
                await park()

        for s in sessions.values():
            tg.start_soon(run, s)
        await anyio.wait_all_tasks_blocked()
        handles = runtime.interrupt_where(
            "tenant breach", agent="coder", labels={"tenant": "acme"}, trigger="operator"
        )
        assert [h.session_id for h in handles] == [sessions["a1"].id]
        await handles[0]
        assert sessions["a2"].state == "running"
        assert sessions["b1"].state == "running"
        rest = runtime.interrupt_all("all stop", trigger="operator", operator="ops")
        assert {h.session_id for h in rest} == {sessions["a2"].id, sessions["b1"].id}
        for h in rest:
            assert (await h).operator == "ops"


async def test_terminated_session_id_cannot_start_again(audit: MemoryAudit) -> None:
    """A kill is sticky: a terminated id is refused, and the refusal is audited."""
    async with ks.Runtime(audit=audit) as runtime:
        async with runtime.session("a", session_id="job-42") as session:
            session.interrupt("x", trigger="operator")
            await park()
        with pytest.raises(ks.SessionRefused, match="terminated"):
            runtime.session("a", session_id="job-42")
    assert "session_refused" in audit.kinds("job-42")


async def test_duplicate_live_session_id_refused() -> None:
    """Two live sessions cannot share an id."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a", session_id="dup"):
            with pytest.raises(ks.SessionRefused, match="already running"):
                runtime.session("b", session_id="dup")


async def test_finished_session_id_may_run_again() -> None:
    """An id that finished normally (never killed) may be reused."""
    async with ks.Runtime() as runtime:
        async with runtime.session("a", session_id="job"):
            pass
        async with runtime.session("a", session_id="job") as again:
            pass
        assert again.state == "finished"


async def test_runtime_exit_interrupts_sessions_still_running() -> None:
    """Leaving the runtime stops sessions left running elsewhere (trigger shutdown)."""
    async with anyio.create_task_group() as tg:
        async with ks.Runtime() as runtime:
            session = runtime.session("orphan")

            async def run() -> None:
                async with session:
                    await park()

            tg.start_soon(run)
            await anyio.wait_all_tasks_blocked()
    assert session.report is not None
    assert session.report.trigger == "shutdown"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"agent": ""}, TypeError),
        ({"agent": 3}, TypeError),
        ({"agent": "a", "labels": {"k": 1}}, TypeError),
        ({"agent": "a", "labels": {"": "v"}}, ValueError),
        ({"agent": "a", "labels": ["k"]}, TypeError),
        ({"agent": "a", "session_id": ""}, ValueError),
        ({"agent": "a", "policy": {"stop_timeout": 1}}, TypeError),
    ],
)
async def test_session_arguments_are_validated(
    kwargs: dict[str, object], error: type[Exception]
) -> None:
    """Bad session arguments get a clear error and create nothing."""
    async with ks.Runtime() as runtime:
        with pytest.raises(error):
            runtime.session(**kwargs)  # type: ignore[arg-type]
        assert runtime.sessions() == ()


async def test_session_outside_runtime_block_is_refused() -> None:
    """A runtime that is not entered cannot create sessions."""
    runtime = ks.Runtime()
    with pytest.raises(RuntimeError, match="not running"):
        runtime.session("a")


async def test_task_factory_is_restored() -> None:
    """The runtime chains to and restores the loop's own task factory."""
    loop = asyncio.get_running_loop()
    before = loop.get_task_factory()
    async with ks.Runtime():
        assert loop.get_task_factory() is not before
    assert loop.get_task_factory() is before


def test_trio_backend_is_refused_clearly() -> None:
    """On trio the runtime fails at entry with an error naming the reason."""
    pytest.importorskip("trio")

    async def main() -> None:
        async with ks.Runtime():
            pass  # pragma: no cover

    with pytest.raises(RuntimeError, match="asyncio backend"):
        anyio.run(main, backend="trio")
