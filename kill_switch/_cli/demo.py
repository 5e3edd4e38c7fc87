"""``kill-switch demo``: a small fleet of scripted agents, stopped every way there is.

No LLM: each agent is a loop of tool calls. Every plane (async tool calls, process
trees, sync tools in worker threads, the audit log) and every trigger is exercised:

* ``researcher`` — parallel async tool calls; a supervisor stops it past its SLA
  (trigger ``supervisor``);
* ``builder`` — a process tree (a shell with grandchildren and a child that ignores
  SIGTERM); an operator kills it over HTTP,
  ``POST /api/sessions/{id}/kill`` to the demo's own control plane from another thread
  (trigger ``operator``; without the server extra, ``interrupt()`` from that thread);
* ``linter`` — the builder's sub-agent, with a blocking sync tool in a worker thread and
  an async call, stopped with it (trigger ``parent``);
* ``looper`` — the same call with the same arguments again and again, stopped by the
  sentinel's repeated-call detector (trigger ``sentinel``);
* ``spender`` — overspends, stopped by its cost budget (trigger ``budget``);
* ``summarizer`` — finishes by itself;
* ``nightly`` — a long job (a process, a sync tool, an async call) still running when
  the rest of the fleet has stopped: the demo sends itself SIGTERM under
  ``graceful_shutdown``, which stops it (trigger ``shutdown``), and carries on.

Then a short kill drill, and the verdict: each stop had its trigger and was quiescent,
no process of the fleet is alive (checked here, not taken from the reports), the drill
passed and the audit chain verifies. A real Ctrl-C (or SIGTERM) at any point stops every
session (trigger ``shutdown``) and ends the demo with ``128 + signum``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import urllib.request
import warnings
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from kill_switch._drill import DrillShape, run_drills
from kill_switch._drill_results import DrillObjectives
from kill_switch._planes._context import sleep as ks_sleep
from kill_switch._planes._escalation import EscalationWarning
from kill_switch._planes._procfs import alive
from kill_switch._runtime import Runtime
from kill_switch._sentinel import Sentinel
from kill_switch._shutdown import GracefulShutdown, graceful_shutdown
from kill_switch._supervisor import supervise
from kill_switch._vocabulary._limits import Limits
from kill_switch._vocabulary._policy import StopPolicy

from ._common import Exit

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from kill_switch._session import Session
    from kill_switch._vocabulary._report import StopReport

#: The researcher's SLA: the supervisor stops it once it has run this long.
SLA = 0.6
#: Seconds the builder's process tree gets between SIGTERM and SIGKILL.
TERM_GRACE = 0.5
#: The trigger each agent must have been stopped by (the summarizer ends by itself).
EXPECTED = {
    "researcher": "supervisor",
    "builder": "operator",
    "linter": "parent",
    "looper": "sentinel",
    "spender": "budget",
    "nightly": "shutdown",
}
#: The kill drill at the end: a few synthetic sessions of every plane (a blocking thread
#: that must be reported abandoned too), each interrupted and checked from outside.
DRILL_RUNS = 10
DRILL_SHAPE = DrillShape(calls=20, processes=2, threads=2, blocking_threads=1)
#: The drill's latency target, shown but not gating the demo: on a loaded machine a p99
#: can miss it while nothing is left behind. ``kill-switch drill`` and the benchmarks
#: gate on latency; the demo's exit status is about what stopped, not how fast.
DRILL_P99_MS = 50.0
#: The identity the demo's operator token has on the control plane (recorded as
#: ``operator=`` on the kill, never the token itself).
OPERATOR_ID = "demo-operator"
#: Without the control plane, the operator's in-process identity.
LOCAL_OPERATOR = "ops-oncall"
OPERATOR_REASON = "prompt injection suspected in fetched page"

# A shell that starts two grandchildren and one child that ignores SIGTERM, then says
# "ready" so the demo can wait for the whole tree (state, not a guess).
_TREE = (
    "sleep 300 & sleep 300 & sh -c 'trap \"\" TERM; echo ready; while :; do sleep 1; done' & wait"
)
_JOB = "echo ready; exec sleep 300"


def _say(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)  # flushed: the output is read live, often through a pipe


# ---------------------------------------------------------------- tools


async def _search(query: str) -> str:
    await anyio.sleep(30)  # a slow search API
    return f"results for {query}"


async def _fetch(url: str) -> str:
    await anyio.sleep(30)
    return f"page {url}"


async def _summarise(text: str) -> str:
    await anyio.sleep(0.05)
    return text[:20]


def _index(started: Callable[[], object]) -> None:
    """A blocking sync tool that polls the interrupt between chunks of work."""
    started()
    while True:
        ks_sleep(0.05)  # one chunk of blocking work; raises at once on interrupt


# ---------------------------------------------------------------- the fleet


class _Fleet:
    """The demo's sessions and the readiness its steps wait for."""

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self.builder: Session | None = None
        self.builder_ready = anyio.Event()
        self.nightly_ready = anyio.Event()
        self.token = anyio.lowlevel.current_token()
        self.sigterm_sent = False
        self.printed: set[str] = set()

    def thread_started(self, event: anyio.Event) -> Callable[[], object]:
        """A callable for a worker thread: sets *event* on the loop (explicit crossing)."""
        return lambda: anyio.from_thread.run_sync(event.set, token=self.token)


async def _researcher(runtime: Runtime, fleet: _Fleet) -> None:
    async with runtime.session("researcher", labels={"tenant": "acme"}) as session:
        fleet.sessions.append(session)
        for q in ("kill switch", "cancel scope", "process group"):
            session.start_soon(_search, q, tool="search", cost=0.02)
        session.start_soon(_fetch, "https://example.invalid/", tool="fetch")
        await anyio.sleep_forever()  # the agent waits on its tools


async def _builder(runtime: Runtime, fleet: _Fleet) -> None:
    policy = StopPolicy(term_grace=TERM_GRACE, thread_grace=1.0)
    async with runtime.session("builder", labels={"tenant": "acme"}, policy=policy) as s:
        fleet.sessions.append(s)
        fleet.builder = s
        proc = await s.open_process(["sh", "-c", _TREE], stdin=None, stderr=None)
        assert proc.stdout is not None
        await proc.stdout.receive()  # "ready": the whole tree is running
        # The sub-agent holds the blocking thread: it is woken by the linter's own flag,
        # which the parent cascade sets, so the linter always knows why it stopped.
        async with runtime.session("linter", parent=s, policy=policy) as child:
            fleet.sessions.append(child)
            child.start_soon(_fetch, "lint://all", tool="lint")
            await child.run_sync(_index, fleet.thread_started(fleet.builder_ready), tool="index")
        await proc.wait()  # the build itself


async def _summarizer(runtime: Runtime, fleet: _Fleet) -> None:
    async with runtime.session("summarizer") as session:
        fleet.sessions.append(session)
        for text in ("first document", "second document"):
            await session.call(_summarise, text, tool="summarise", cost=0.01)


async def _looper(runtime: Runtime, fleet: _Fleet) -> None:
    """An agent stuck in a loop: the same call, the same arguments, forever."""
    async with runtime.session("looper", sentinel=Sentinel()) as session:
        fleet.sessions.append(session)
        while True:
            await session.call(_summarise, "is it done yet?", tool="status")


async def _spender(runtime: Runtime, fleet: _Fleet) -> None:
    """An agent that pays for every call and does not watch its budget."""
    async with runtime.session("spender", limits=Limits(max_cost=1.0)) as session:
        fleet.sessions.append(session)
        for page in range(100):
            await session.call(_summarise, f"page {page}", tool="translate", cost=0.3)


async def _nightly(runtime: Runtime, fleet: _Fleet) -> None:
    """A long batch job: still running when everything else has stopped."""
    async with runtime.session("nightly", labels={"job": "reindex"}) as s:
        fleet.sessions.append(s)
        proc = await s.open_process(["sh", "-c", _JOB], stdin=None, stderr=None)
        assert proc.stdout is not None
        await proc.stdout.receive()  # "ready"
        s.start_soon(_fetch, "s3://exports/nightly", tool="export")
        await s.run_sync(_index, fleet.thread_started(fleet.nightly_ready), tool="reindex")


# ---------------------------------------------------------------- the operator


class _ControlPlane:
    """Where the operator's HTTP kill goes: the served control plane and its token."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token


def _http_kill(control: _ControlPlane, session_id: str) -> dict[str, Any]:
    """``POST /api/sessions/{id}/kill`` as the operator would, from a thread."""
    request = urllib.request.Request(
        f"{control.url}/api/sessions/{session_id}/kill",
        data=json.dumps({"reason": OPERATOR_REASON}).encode(),
        headers={
            "Authorization": f"Bearer {control.token}",
            "Content-Type": "application/json",
        },
        method="POST",
    )
    # No proxy: the control plane is on loopback, and $http_proxy must not see a token.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        body: dict[str, Any] = json.load(response)
        body["http_status"] = response.status
        return body


def _local_kill(session: Session) -> StopReport:
    """The same kill without the control plane: ``interrupt()`` from another thread."""
    handle = session.interrupt(OPERATOR_REASON, trigger="operator", operator=LOCAL_OPERATOR)
    return handle.result(timeout=30)


async def _operator(control: _ControlPlane | None, session: Session, failures: list[str]) -> None:
    if control is not None:
        path = f"/api/sessions/{session.id}/kill"
        _say(f"operator: POST {path} as {OPERATOR_ID!r} (urllib, from a thread)")
        try:
            body = await anyio.to_thread.run_sync(_http_kill, control, session.id)
        except (OSError, ValueError) as exc:  # urllib.error.URLError is an OSError
            failures.append(f"the operator's HTTP kill failed: {exc}")
            _say(f"operator: HTTP kill failed ({exc}); interrupting in-process instead")
        else:
            _say(f"operator: {body['http_status']} {body['status']}")
            return
    else:
        _say("operator: interrupt() from another thread (no control plane)")
    await anyio.to_thread.run_sync(_local_kill, session)


@contextlib.asynccontextmanager
async def _control_plane(runtime: Runtime, db: str | None) -> AsyncIterator[_ControlPlane | None]:
    """Serve the control plane and dashboard while the demo runs, if it can be imported."""
    try:
        from kill_switch import control
    except ImportError as exc:
        _say(
            f"no control plane ({exc}): no dashboard, and the operator's kill is an "
            "in-process interrupt() from another thread instead of HTTP"
        )
        yield None
        return
    token, entry = control.new_token("operator", OPERATOR_ID)
    async with control.serve(runtime, tokens=[entry], audit_path=db) as server:
        # The token travels in the URL fragment, which browsers never send to a server.
        _say(f"dashboard: {server.url}/#token={token}")
        yield _ControlPlane(server.url, token)


# ---------------------------------------------------------------- reporting


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _what(report: StopReport) -> str:
    parts = ["agent loop"]
    if report.tool_calls_cancelled:
        parts.append(_plural(report.tool_calls_cancelled, "tool call"))
    for p in report.processes:
        parts.append(f"process group of {len({p.pid, *p.members})}")
    for t in report.threads:
        parts.append(f"thread {t.outcome}")
    if report.children:
        parts.append(_plural(len(report.children), "child session"))
    if report.leaked_tasks:
        parts.append(_plural(len(report.leaked_tasks), "leaked task"))
    if not report.quiescent:
        parts.append(f"NOT QUIESCENT ({report.outcome})")
    return ", ".join(parts)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _stop_lines(session: Session) -> list[str]:
    """One line for the stop, then one per process and thread, indented."""
    report = session.report
    if report is None:
        return [f"  {session.agent:<11}{session.state} by itself, nothing to stop"]
    who = report.trigger + (f" ({report.operator})" if report.operator else "")
    reason = report.reason if len(report.reason) <= 88 else report.reason[:87] + "…"
    lines = [
        f"  {report.agent:<11}{who:<26}{_ms(report.latency.total):>9}  {_what(report)}",
        f"  {'':<11}reason: {reason}",
    ]
    for p in report.processes:
        state = "reaped" if p.returncode is not None else "NOT reaped"
        secs = "" if p.seconds_to_exit is None else f" in {_ms(p.seconds_to_exit)}"
        others = sorted(set(p.members) - {p.pid})
        members = f", members {' '.join(map(str, others))}" if others else ""
        lines.append(
            f"  {'':<11}process {p.pid} ({p.containment}{members}): "
            f"{', '.join(p.signals) or 'no signal'} → {state}{secs}"
            + (" [escaped]" if p.escaped else "")
        )
    for t in report.threads:
        secs = "" if t.seconds is None else f" after {_ms(t.seconds)}"
        lines.append(f"  {'':<11}thread {t.name!r}: {t.outcome}{secs}")
    return lines


def _print_stops(fleet: _Fleet, where: Callable[[Session], bool] = lambda s: True) -> None:
    """Print the stops not printed yet, in the order they were asked for."""

    def order(s: Session) -> float:
        return s.report.requested_at if s.report is not None else float("inf")

    todo = [s for s in fleet.sessions if s.id not in fleet.printed and where(s)]
    for session in sorted(todo, key=order):
        fleet.printed.add(session.id)
        _say(*_stop_lines(session))


def _check(sessions: list[Session], control: bool) -> list[str]:
    """Each stop had its trigger and was quiescent; no process of the fleet is alive."""
    failures = []
    by_agent = {s.agent: s for s in sessions}
    for agent, trigger in EXPECTED.items():
        report = by_agent[agent].report if agent in by_agent else None
        if report is None or report.trigger != trigger:
            got = "no stop" if report is None else f"trigger {report.trigger}"
            failures.append(f"{agent}: expected a stop by {trigger}, got {got}")
        elif not report.quiescent:
            failures.append(f"{agent}: not quiescent ({report.outcome})")
    builder = by_agent.get("builder")
    operator = builder.report.operator if builder and builder.report else None
    if control and operator != OPERATOR_ID:
        failures.append(f"builder: stopped as operator {operator!r}, not {OPERATOR_ID!r}")
    summarizer = by_agent.get("summarizer")
    if summarizer is None or summarizer.state != "finished":
        failures.append("summarizer did not finish by itself")
    return failures + _survivors(sessions)


def _survivors(sessions: list[Session]) -> list[str]:
    """Every process a report names that is still running (checked now, not reported)."""
    running = []
    for session in sessions:
        if session.report is None:
            continue
        for p in session.report.processes:
            for pid in sorted({p.pid, *p.members}):
                if alive(pid):
                    running.append(f"process {pid} of {session.agent} is still alive")
    return running


# ---------------------------------------------------------------- the run


async def _fleet(runtime: Runtime, fleet: _Fleet, control: _ControlPlane | None) -> list[str]:
    """Run the fleet until every agent but ``nightly`` has stopped."""
    failures: list[str] = []
    researcher = "researcher"
    async with (
        supervise(
            runtime,
            max_age=SLA,
            where=lambda info: info.agent == researcher,
            interval=0.05,
            reason=f"SLA of {SLA:g} s",
        ),
        anyio.create_task_group() as tg,
    ):
        for agent in (_researcher, _builder, _summarizer, _looper, _spender):
            tg.start_soon(agent, runtime, fleet)
        await fleet.builder_ready.wait()  # its tree, its sub-agent and its thread run
        assert fleet.builder is not None
        await _operator(control, fleet.builder, failures)
    return failures


async def _self_sigterm(fleet: _Fleet, shutdown: GracefulShutdown) -> None:
    """Send this process SIGTERM once ``nightly`` runs; graceful_shutdown takes it."""
    await fleet.nightly_ready.wait()
    if shutdown.signal is not None:
        return  # a real signal came first: ours would be its second, an immediate exit
    _say(f"\nshutdown: the fleet has stopped but nightly runs on; kill -TERM {os.getpid()}")
    fleet.sigterm_sent = True
    os.kill(os.getpid(), signal.SIGTERM)
    # graceful_shutdown cancels this block from its handler; the bound only turns a
    # signal that never came into a failure instead of a hang.
    with anyio.move_on_after(30):
        await anyio.sleep_forever()


async def _drill(runtime: Runtime, failures: list[str]) -> int | None:
    """Run the kill drill and print its verdict; the exit code if a signal stopped it."""
    shape = DRILL_SHAPE
    _say(
        f"\n{DRILL_RUNS} synthetic sessions for the kill drill ({shape.calls} tool calls, "
        f"{shape.processes} process trees, {shape.threads} polling and "
        f"{shape.blocking_threads} blocking thread): each interrupted, then checked "
        "from outside the runtime"
    )
    with warnings.catch_warnings():
        # The drill's SIGTERM-ignoring tree escalates on purpose, every run: that is in
        # its reports and the audit log, not worth a warning each time.
        warnings.simplefilter("ignore", EscalationWarning)
        async with graceful_shutdown(runtime, deadline=10.0) as shutdown:
            summary = await run_drills(
                runtime, runs=DRILL_RUNS, shape=shape, objectives=DrillObjectives()
            )
    if shutdown.signal is not None:
        _say(f"\nstopped by {shutdown.signal.name} during the drill")
        return shutdown.exit_code or 1
    _say(summary.summary())
    p99 = summary.percentiles().get("p99")
    if p99 is not None:
        met = "met" if p99 <= DRILL_P99_MS else "missed (a loaded machine?)"
        _say(f"  target p99 ≤ {DRILL_P99_MS:g} ms: {p99:.1f} ms, {met}; not a check here")
    if not summary.ok:
        failures.append("the kill drill found something left behind")
    return None


async def _main(db: str | None, keep_serving: bool) -> int:
    fleet = _Fleet()
    failures: list[str] = []
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    async with Runtime(audit=db) as runtime, _control_plane(runtime, db) as control:
        async with (
            graceful_shutdown(runtime, deadline=10.0) as shutdown,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(_nightly, runtime, fleet)
            failures += await _fleet(runtime, fleet, control)
            _say("\nstops (agent, trigger, interrupt → report, what stopped):")
            _print_stops(fleet, lambda s: s.agent != "nightly")
            await _self_sigterm(fleet, shutdown)
            failures.append("SIGTERM sent but never handled")
        own = fleet.sigterm_sent and shutdown.signal is signal.SIGTERM
        if shutdown.signal is not None and not own:
            # A real Ctrl-C or SIGTERM: every session was interrupted (trigger
            # shutdown); the watchdog stays armed, so the process ends by its deadline.
            _say(f"\nstopped by {shutdown.signal.name}: every session interrupted")
            _print_stops(fleet)
            _say(*(_survivors(fleet.sessions) or ["nothing left running"]))
            return shutdown.exit_code or 1
        # Our own SIGTERM: the shutdown is done; live on, and let a real signal start
        # a new one (the shutdown's handler would exit at once on a "second" signal).
        shutdown.disarm()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        _print_stops(fleet)
        failures += _check(fleet.sessions, control is not None)
        from kill_switch.fleet import _demo as fleet_demo  # a second process, killed via Redis

        failures += await fleet_demo.run(_say)

        stopped = await _drill(runtime, failures)
        if stopped is not None:
            return stopped

        if keep_serving and control is not None:
            _say("\nthe fleet has stopped; the dashboard stays up until Ctrl-C")
            async with graceful_shutdown(runtime, deadline=10.0):
                await anyio.sleep_forever()

    _say("")
    if db is not None:
        from kill_switch._audit._query import verify

        result = verify(db)
        _say(f"audit verify {db}: {result.summary()}")
        if not result.ok:
            failures.append("the audit chain does not verify")
    else:
        _say("audit verify: skipped, the demo ran without an audit log (--no-audit)")
    if failures:
        _say("FAIL: " + "; ".join(failures))
        return Exit.FAILED
    _say("PASS: every session stopped by its trigger, nothing left running")
    return Exit.OK


def run(*, db: str | None = None, audit: bool = True, keep_serving: bool = False) -> int:
    """Run the demo; return the process exit code."""
    from .audit import DEFAULT_DB, ENV_DB

    path = (db or os.environ.get(ENV_DB) or DEFAULT_DB) if audit else None
    if path is not None:
        _say(f"audit log: {path}")
    rc: Any = anyio.run(_main, path, keep_serving)
    sys.stdout.flush()
    return int(rc)
