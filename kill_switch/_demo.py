"""``kill-switch demo``: a small fleet of scripted agents, stopped every way there is.

No LLM: each agent is a loop of tool calls. The fleet shows

* ``researcher`` — parallel async tool calls, stopped by a supervisor on an SLA deadline;
* ``builder`` — a process tree (a shell with grandchildren and a child that ignores
  SIGTERM) and a blocking sync tool in a worker thread, stopped from another thread as
  an operator would; its sub-agent ``linter`` is stopped with it (parent cascade);
* ``summarizer`` — finishes normally;
* ``looper`` — calls the same tool with the same arguments again and again, stopped by
  the sentinel's repeated-call detector;
* ``spender`` — overspends, stopped by its cost budget.

The fleet runs under ``graceful_shutdown``: Ctrl-C stops every session (trigger
``shutdown``) and the watchdog guarantees the process ends.

Then it checks, independently of the reports, that no process of the fleet is alive and
that the audit chain verifies.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

import anyio

from ._current import sleep as ks_sleep
from ._limits import Limits
from ._policy import StopPolicy
from ._runtime import Runtime
from ._sentinel import Sentinel

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ._report import StopReport
    from ._session import Session
from ._shutdown import graceful_shutdown

#: The supervisor's SLA for the researcher, and when the operator presses kill on the
#: builder. Short, so the demo finishes in a few seconds.
SLA = 0.6
OPERATOR_AFTER = 0.9

# A shell that starts two grandchildren and one child that ignores SIGTERM, then says
# "ready" so the demo can wait for the whole tree (state, not a guess).
_TREE = (
    "sleep 300 & sleep 300 & sh -c 'trap \"\" TERM; echo ready; while :; do sleep 1; done' & wait"
)


async def _search(query: str) -> str:
    await anyio.sleep(30)  # a slow search API
    return f"results for {query}"


async def _fetch(url: str) -> str:
    await anyio.sleep(30)
    return f"page {url}"


async def _summarise(text: str) -> str:
    await anyio.sleep(0.05)
    return text[:20]


def _index_repository(progress: list[int]) -> int:
    """A blocking sync tool that polls the interrupt between chunks of work."""
    for chunk in range(10_000):
        ks_sleep(0.05)  # one chunk of blocking work; wakes at once on interrupt
        progress.append(chunk)
    return len(progress)


async def _researcher(runtime: Runtime, done: list[Session]) -> None:
    async with runtime.session("researcher", labels={"tenant": "acme"}) as session:
        done.append(session)
        for q in ("kill switch", "cancel scope", "process group"):
            session.start_soon(_search, q, tool="search", cost=0.02)
        session.start_soon(_fetch, "https://example.invalid/", tool="fetch")
        await anyio.sleep_forever()  # the agent waits on its tools


async def _builder(runtime: Runtime, done: list[Session], ready: anyio.Event) -> None:
    policy = StopPolicy(term_grace=0.5, thread_grace=1.0)
    async with runtime.session("builder", labels={"tenant": "acme"}, policy=policy) as s:
        done.append(s)
        proc = await s.open_process(["sh", "-c", _TREE], stdin=None, stderr=None)
        assert proc.stdout is not None
        await proc.stdout.receive()  # "ready": the whole tree is running
        async with runtime.session("linter", parent=s, policy=policy) as child:
            done.append(child)
            child.start_soon(_fetch, "lint://all", tool="lint")
            progress: list[int] = []
            ready.set()
            await s.run_sync(_index_repository, progress, tool="index")


async def _summarizer(runtime: Runtime, done: list[Session]) -> None:
    async with runtime.session("summarizer") as session:
        done.append(session)
        for text in ("first document", "second document"):
            await session.call(_summarise, text, tool="summarise", cost=0.01)


async def _looper(runtime: Runtime, done: list[Session]) -> None:
    """An agent stuck in a loop: the same call, the same arguments, forever."""
    async with runtime.session("looper", sentinel=Sentinel()) as session:
        done.append(session)
        while True:
            await session.call(_summarise, "is it done yet?", tool="status")


async def _spender(runtime: Runtime, done: list[Session]) -> None:
    """An agent that pays for every call and does not watch its budget."""
    async with runtime.session("spender", limits=Limits(max_cost=1.0)) as session:
        done.append(session)
        for page in range(100):
            await session.call(_summarise, f"page {page}", tool="translate", cost=0.3)


async def _supervisor(runtime: Runtime) -> None:
    """An SLA supervisor: past its deadline, the researcher is interrupted."""
    await anyio.sleep(SLA)
    runtime.interrupt_where(
        f"SLA of {SLA:.1f} s exceeded", agent="researcher", trigger="supervisor"
    )


def _operator_kill(runtime: Runtime) -> None:
    """An operator in another thread (a console, an HTTP handler) presses kill."""
    session = next(s for s in runtime._sessions.values() if s.agent == "builder")
    session.interrupt(
        "prompt injection suspected in fetched page",
        trigger="operator",
        operator="ops-oncall",
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not running; it only waits to be reaped by its parent.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _print_report(report: StopReport) -> None:
    print(report.summary())
    for p in report.processes:
        status = "reaped" if p.returncode is not None else "NOT reaped"
        secs = "" if p.seconds_to_exit is None else f" in {p.seconds_to_exit * 1e3:.1f} ms"
        print(
            f"  process {p.pid} (group {p.pgid}) {' '.join(p.command)[:40]!r}: "
            f"signals {', '.join(p.signals) or 'none'} → {status}{secs}"
            + (" [escaped]" if p.escaped else "")
        )
        if p.members:
            others = [m for m in p.members if m != p.pid]
            print(f"    group members ({p.containment}): {', '.join(map(str, others))}")
    for t in report.threads:
        secs = "" if t.seconds is None else f" after {t.seconds * 1e3:.1f} ms"
        print(f"  thread {t.name} ({t.tool}): {t.outcome}{secs}")


@contextlib.asynccontextmanager
async def _dashboard(runtime: Runtime, db: str | None) -> AsyncIterator[None]:
    """Serve the control plane while the fleet runs, if the server extra is installed."""
    try:
        from . import control
    except ImportError as exc:
        print(f"(no dashboard: {exc})")
        yield
        return
    token, entry = control.new_token("operator", "demo-operator")
    async with control.serve(runtime, tokens=[entry], audit_path=db) as server:
        # The token travels in the URL fragment, which browsers never send to a server.
        print(f"dashboard: {server.url}/#token={token}")
        yield


async def _main(db: str | None, keep_serving: bool) -> int:
    done: list[Session] = []
    ready = anyio.Event()
    async with Runtime(audit=db) as runtime, _dashboard(runtime, db):
        async with (
            graceful_shutdown(runtime, deadline=10.0) as shutdown,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(_researcher, runtime, done)
            tg.start_soon(_builder, runtime, done, ready)
            tg.start_soon(_summarizer, runtime, done)
            tg.start_soon(_looper, runtime, done)
            tg.start_soon(_spender, runtime, done)
            tg.start_soon(_supervisor, runtime)
            await ready.wait()
            await anyio.sleep(OPERATOR_AFTER - SLA)
            operator = threading.Thread(target=_operator_kill, args=(runtime,))
            operator.start()
            await anyio.to_thread.run_sync(operator.join)
        if shutdown.signal is not None:
            print(f"\nstopped by {shutdown.signal.name}")
        elif keep_serving:
            print("the fleet has stopped; the dashboard stays up until Ctrl-C")
            async with graceful_shutdown(runtime, deadline=5.0):
                await anyio.sleep_forever()

    failures: list[str] = []
    for session in done:
        print()
        if session.report is None:
            print(f"session {session.id} ({session.agent}) — {session.state}, not interrupted")
            continue
        _print_report(session.report)
        if not session.report.quiescent:
            failures.append(f"{session.agent} not quiescent")
        for p in session.report.processes:
            for pid in {p.pid, *p.members}:
                if _alive(pid):
                    failures.append(f"process {pid} of {session.agent} still alive")
    print()
    if db is not None:
        from ._audit_query import verify

        result = verify(db)
        print(f"audit {db}: {result.summary()}")
        if not result.ok:
            failures.append("audit chain does not verify")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("every session stopped, nothing left running")
    return 0


def run(*, db: str | None = None, audit: bool = True, keep_serving: bool = False) -> int:
    """Run the demo; return the process exit code."""
    from ._audit_cli import DEFAULT_DB, ENV_DB

    path = (db or os.environ.get(ENV_DB) or DEFAULT_DB) if audit else None
    if path is not None:
        print(f"audit log: {path}")
    rc: Any = anyio.run(_main, path, keep_serving)
    sys.stdout.flush()
    return int(rc)
