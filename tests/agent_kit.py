"""Shared parts of the framework integration tests: the tools, the kill, the checks.

Four tool kinds, each a real thing to stop: a long async tool, a process tree started
through the session, a sync tool that polls ``ks.check()`` and one that never does. Each
writes to a file while it runs, so "nothing written after the report" is checked on disk;
the tree's pids are checked in /proc. Scripted models note every call they get and whether
the session was already interrupted then.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Literal

import anyio

import kill_switch as ks

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from pathlib import Path

WAIT = 10.0  # bound on every wait for a state change (a hang guard, never a timing claim)
SECRET = "operator-secret-reason-7f3a"  # the operator's reason: must never reach a model

Kind = Literal["long_async", "tree", "sync_poll", "sync_stubborn"]
KINDS: tuple[Kind, ...] = ("long_async", "tree", "sync_poll", "sync_stubborn")
ARGS: dict[str, dict[str, Any]] = {
    "long_async": {"seconds": 300.0},
    "tree": {"width": 2},
    "sync_poll": {"steps": 100_000},
    "sync_stubborn": {"steps": 1_000},
}
POLICY = ks.StopPolicy(thread_grace=0.2, stop_timeout=5.0)


class Kit:
    """The tools of one test, and what they and the model saw."""

    def __init__(self, tmp_path: Path) -> None:
        self.out = tmp_path / "writes.log"
        self.out.touch()
        self.started = threading.Event()
        self.release = threading.Event()
        self.pids: list[int] = []
        self.session: ks.Session | None = None
        self.model_calls = 0
        self.model_calls_after_kill = 0
        self.model_text: list[str] = []

    # ------------------------------------------------------------------ the tools

    def write(self, what: str) -> None:
        with self.out.open("a") as f:
            f.write(what + "\n")

    def writes(self) -> int:
        return len(self.out.read_text().splitlines())

    def tools(self) -> dict[str, Callable[..., Any]]:
        """The four tools, with real signatures and docstrings."""
        kit = self

        async def long_async(seconds: float) -> str:
            """Wait for a slow service, then write its answer."""
            kit.started.set()
            await anyio.sleep(seconds)
            kit.write("long_async done")
            return "late"

        async def tree(width: int) -> str:
            """Run a shell that starts *width* sleeping children and waits for them."""
            session = ks.current_session()
            assert session is not None
            script = "; ".join(["sleep 300 & echo $!"] * width) + "; echo $$; wait"
            proc = await session.open_process(["sh", "-c", script])
            assert proc.stdout is not None
            seen = b""
            while seen.count(b"\n") < width + 1:
                seen += await proc.stdout.receive()
            kit.pids.extend(int(line) for line in seen.split())
            kit.started.set()
            await proc.wait()
            kit.write("tree done")
            return "late"

        def sync_poll(steps: int) -> str:
            """Write *steps* records, checking for a stop before each."""
            kit.started.set()
            for i in range(steps):
                ks.check()
                kit.write(f"poll {i}")
                time.sleep(0.005)  # real-time: the tool's own work between two writes
            return "late"

        def sync_stubborn(steps: int) -> str:
            """Write *steps* records and never look at the kill switch."""
            kit.started.set()
            for i in range(steps):
                if kit.release.is_set():
                    break
                kit.write(f"stubborn {i}")
                time.sleep(0.005)  # real-time: the tool's own work between two writes
            return "late"

        return {f.__name__: f for f in (long_async, tree, sync_poll, sync_stubborn)}

    # ------------------------------------------------------------------ the model

    def model_called(self, text: str = "") -> None:
        """A scripted model notes each call (and whether it came after the kill)."""
        self.model_calls += 1
        self.model_text.append(text)
        if self.session is not None and self.session.interrupted:
            self.model_calls_after_kill += 1

    # ------------------------------------------------------------------ the kill

    async def kill(self, session: ks.Session, how: Literal["task", "thread"]) -> None:
        """Interrupt *session* once a tool runs: from this task or from another thread."""
        assert await anyio.to_thread.run_sync(self.started.wait, WAIT)
        if how == "task":
            session.interrupt(SECRET, trigger="operator")
            return
        t = threading.Thread(
            target=session.interrupt, args=(SECRET,), kwargs={"trigger": "operator"}
        )
        t.start()
        await anyio.to_thread.run_sync(t.join, WAIT)

    async def run(
        self,
        runtime: ks.Runtime,
        agent: Callable[[ks.Session | None], Coroutine[Any, Any, Any]],
        *,
        how: Literal["task", "thread"],
        where: Literal["inside", "outside"],
    ) -> tuple[ks.StopReport, BaseException | None, Any]:
        """Run *agent* inside the session's block or in a task outside it; kill mid-tool.

        Returns the report, what the agent raised (``None`` if it returned, or if it ran
        inside the block, whose exit absorbs the kill) and what it returned.
        """
        outcome: list[Any] = [None, None]
        task: asyncio.Task[Any] | None = None
        async with runtime.session("agent", policy=POLICY) as session:
            self.session = session
            if where == "inside":
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.kill, session, how)
                    outcome[1] = await agent(None)
            else:
                # A request task of a server: not in the session's context at all.
                task = asyncio.get_running_loop().create_task(
                    agent(session), context=contextvars.Context()
                )
                await self.kill(session, how)
                await asyncio.wait([task])
        if task is not None:
            await asyncio.wait([task])
            if task.cancelled():
                outcome[0] = asyncio.CancelledError()
            else:
                outcome[0] = task.exception()
                outcome[1] = None if outcome[0] is not None else task.result()
        report = await session.handle.wait()
        return report, outcome[0], outcome[1]

    # ------------------------------------------------------------------ the checks

    def alive(self) -> list[int]:
        """The tree's pids still alive (zombies count as dead), from /proc."""
        alive = []
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                continue
            if state not in ("Z", "X"):
                alive.append(pid)
        return alive

    async def settle_writes(self) -> int:
        """The write count once a few more steps of any writer would have landed."""
        before = self.writes()
        await anyio.sleep(0.1)  # 20 of a writer's steps: a live writer shows up
        return self.writes() - before

    def finish(self) -> None:
        """Let a stubborn thread end (it was abandoned; the test must not leak it)."""
        self.release.set()
        for t in threading.enumerate():
            if t.name.startswith("kill_switch "):
                t.join(WAIT)


def check_stopped(kit: Kit, kind: str, report: ks.StopReport) -> None:
    """The report is honest and nothing of the tool runs any more (but an unpolled thread)."""
    if kind == "sync_stubborn":
        # A thread that never polls is abandoned and still runs: never "stopped".
        assert (report.outcome, report.quiescent) == ("unresponsive", False), report.summary()
    else:
        assert (report.outcome, report.quiescent) == ("stopped", True), report.summary()
    # No tool of the kit escapes structure: what a framework leaves of its own is swept
    # apart (swept_tasks), never counted as a tool's leak.
    assert report.leaked_tasks == (), report.summary()
    assert kit.model_calls == 1, kit.model_calls
    assert kit.model_calls_after_kill == 0
    assert all(SECRET not in text for text in kit.model_text)
    assert report.late_results == 0 or kind.startswith("sync")
    if kind == "tree":
        assert len(kit.pids) == 3
        assert kit.alive() == []
        assert report.processes
        assert all(p.returncode is not None for p in report.processes)
    if kind == "sync_poll":
        assert [(t.outcome, t.running) for t in report.threads] == [("interrupted", False)], (
            report.summary()
        )
    if kind == "sync_stubborn":
        assert [(t.outcome, t.running) for t in report.threads] == [("abandoned", True)], (
            report.summary()
        )


def is_kill(exc: BaseException | None) -> bool:
    """Whether the agent ended with the kill (``Interrupted``, possibly in a group)."""
    if isinstance(exc, ks.Interrupted):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(is_kill(e) for e in exc.exceptions)
    return False


def pid_exists(pid: int) -> bool:
    """Whether *pid* names a live process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
