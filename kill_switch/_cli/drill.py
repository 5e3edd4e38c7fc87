"""``kill-switch drill``: a game day for the kill switch, from the command line.

    kill-switch drill [--runs N] [--calls N] [--processes N] [--threads N]
                      [--blocking-threads N] [--term-grace S] [--thread-grace S]
                      [--p50-ms X] [--p99-ms X] [--max-ms X] [--quiesce-ms X]
                      [--db PATH | --no-audit] [--loop asyncio|uvloop]
                      [--inject process|orphan|task|thread|model] [--json]
    kill-switch drill --session ID [--url URL] [--token T] [--reason R]
                      [--quiesce-ms X] [--p99-ms X] [--json]

Without ``--session`` it starts synthetic sessions of the given shape in this process,
one per run, drills each (``kill_switch._drill``) and prints the latency histogram and
the verdict. With ``--session`` it drills a live session of another process through its
control plane: an HTTP kill as operator, then checks from this host that none of the
processes the report names is alive, that the report says quiescent with no leaked
task, and that the audit log holds the interrupt and verifies. (The tasks and threads of
a remote process cannot be seen from here: for those it relies on the report; its model
calls cannot be seen at all, and the ``model`` check says so.)

Exit codes: 0 every objective met, 1 a check or objective failed, 2 usage, 3 the control
plane could not be reached.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any

from kill_switch._drill import LEAKS, DrillShape, run_drills, summarize
from kill_switch._drill_results import DrillCheck, DrillObjectives, DrillResult
from kill_switch._vocabulary._audit_event import ESCALATED, INTERRUPT_COMPLETED, INTERRUPT_REQUESTED

from ._common import Exit, Failure
from ._common import err as _err
from ._common import out as _out
from ._common import request as _request

if TYPE_CHECKING:
    from kill_switch._drill_results import DrillSummary


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _runs(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError("at least one run")
    return value


def register(subparsers: Any) -> None:
    """Add the ``drill`` command to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "drill",
        help="interrupt sessions and check independently that nothing is left",
        description=(
            "A kill drill: interrupt a session, wait for its StopReport, then check "
            "from outside the runtime's bookkeeping that no task, process, zombie or "
            "unlisted thread of it is left, that its agent made no model call after the "
            "kill (synthetic sessions), and that the audit log holds the stop; "
            "pass or fail against the objectives given. Synthetic sessions in this "
            "process by default; a live one of another process with --session."
        ),
    )
    shape = p.add_argument_group("synthetic sessions (the default)")
    shape.add_argument("--runs", type=_runs, default=20, help="drills to run (20)")
    shape.add_argument("--calls", type=_count, default=20, help="parked async calls (20)")
    shape.add_argument(
        "--processes",
        type=_count,
        default=2,
        help="process trees, leader + 3 grandchildren; the first ignores SIGTERM (2)",
    )
    shape.add_argument("--threads", type=_count, default=2, help="polling sync tools (2)")
    shape.add_argument(
        "--blocking-threads",
        type=_count,
        default=0,
        help="sync tools that never poll, abandoned after the thread grace (0)",
    )
    shape.add_argument("--term-grace", type=_positive, default=0.02, help="seconds (0.02)")
    shape.add_argument("--thread-grace", type=_positive, default=0.02, help="seconds (0.02)")
    audit = shape.add_mutually_exclusive_group()
    audit.add_argument("--db", metavar="PATH", help="audit database (default: a temporary one)")
    audit.add_argument("--no-audit", action="store_true", help="run without an audit log")
    shape.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    shape.add_argument(
        "--inject",
        choices=LEAKS,
        action="append",
        default=[],
        help=(
            "a deliberate leak, to prove the drill catches it (the drill must then fail): "
            "process, orphan (a double fork), task, thread (a pool off the thread plane), "
            "model (an agent loop outside the block that calls the model after the kill)"
        ),
    )
    live = p.add_argument_group("a live session, through its control plane")
    live.add_argument("--session", metavar="ID", help="the session to drill")
    live.add_argument("--url", help="control plane URL ($KILL_SWITCH_URL)")
    live.add_argument("--token", help="operator token ($KILL_SWITCH_TOKEN)")
    live.add_argument("--reason", default="kill drill", help="the reason recorded")
    live.add_argument("--timeout", type=_positive, default=30.0, help="seconds per request")
    obj = p.add_argument_group("objectives, in milliseconds")
    obj.add_argument("--p50-ms", type=_positive, help="p50 of interrupt → StopReport")
    obj.add_argument("--p99-ms", type=_positive, help="p99 of interrupt → StopReport")
    obj.add_argument("--max-ms", type=_positive, help="worst interrupt → StopReport")
    obj.add_argument(
        "--quiesce-ms",
        type=_positive,
        default=2000.0,
        help="every check must pass within this of the interrupt (2000)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``kill-switch drill``; return its exit code."""
    objectives = DrillObjectives(
        p50_ms=args.p50_ms, p99_ms=args.p99_ms, max_ms=args.max_ms, quiesce_ms=args.quiesce_ms
    )
    if args.session is not None:
        try:
            summary = _remote(args, objectives)
        except Failure as exc:
            _err(f"kill-switch drill: {exc}")
            return exc.code
    else:
        summary = _synthetic(args, objectives)
    if args.json:
        _out(json.dumps(summary.to_json(), indent=2))
    else:
        _out(summary.summary())
    return Exit.OK if summary.ok else Exit.FAILED


# ------------------------------------------------------------------ synthetic


def _synthetic(args: argparse.Namespace, objectives: DrillObjectives) -> DrillSummary:
    import warnings

    import anyio

    from kill_switch._planes._escalation import EscalationWarning
    from kill_switch._runtime import Runtime

    shape = DrillShape(
        calls=args.calls,
        processes=args.processes,
        threads=args.threads,
        blocking_threads=args.blocking_threads,
        term_grace=args.term_grace,
        thread_grace=args.thread_grace,
        leak=tuple(dict.fromkeys(args.inject)),
    )
    verbose = not args.json

    async def main(db: str | None) -> DrillSummary:
        async with Runtime(audit=db) as runtime:
            return await run_drills(runtime, runs=args.runs, shape=shape, objectives=objectives)

    def go(db: str | None) -> DrillSummary:
        if verbose:
            _out(
                f"kill drill: {args.runs} run(s) of {shape.calls} async call(s), "
                f"{shape.processes} process tree(s), {shape.threads} polling and "
                f"{shape.blocking_threads} blocking thread(s); audit "
                f"{db or 'off'}; loop {args.loop}"
                + (f"; injected leaks: {', '.join(shape.leak)}" if shape.leak else "")
            )
        with warnings.catch_warnings():
            # The SIGTERM-ignoring tree is drilled on purpose: its escalation is
            # expected, and it is in the report and the audit log.
            warnings.simplefilter("ignore", EscalationWarning)
            summary: DrillSummary = anyio.run(
                main, db, backend_options={"use_uvloop": args.loop == "uvloop"}
            )
        return summary

    if args.no_audit:
        return go(None)
    if args.db:
        return go(args.db)
    with tempfile.TemporaryDirectory(prefix="kill-switch-drill-") as tmp:
        return go(os.path.join(tmp, "audit.db"))


# ------------------------------------------------------------------- remote


def _remote(args: argparse.Namespace, objectives: DrillObjectives) -> DrillSummary:
    sid = args.session
    t0 = time.perf_counter()
    _, body = _request(args, "POST", f"/api/sessions/{sid}/kill", {"reason": args.reason})
    latency = time.perf_counter() - t0
    report = body.get("report") if isinstance(body, dict) else None
    checks: list[DrillCheck] = []
    if not isinstance(report, dict):
        checks.append(DrillCheck("report", False, f"no StopReport (status {body!r:.80})"))
        result = DrillResult(sid, "?", None, None, tuple(checks))
        return summarize([result], objectives)
    agent = str(report.get("agent", "?"))
    leaked = [t for t in report.get("leaked_tasks", ()) if not t.get("cancelled")]
    if not report.get("quiescent"):
        checks.append(
            DrillCheck("report", False, f"the report says {report.get('outcome')}, not quiescent")
        )
    else:
        checks.append(DrillCheck("report", True, f"{report.get('outcome')}, quiescent"))
    checks.append(
        DrillCheck(
            "tasks",
            not leaked,
            (f"{len(leaked)} leaked task(s) did not exit" if leaked else "none left")
            + " (per the report: a remote process's tasks cannot be seen from here)",
        )
    )
    deadline = t0 + objectives.quiesce_ms / 1e3
    quiesced = None
    while True:
        procs, zombies = _remote_processes(report)
        if procs.ok and zombies.ok:
            quiesced = time.perf_counter() - t0
            break
        if time.perf_counter() >= deadline:
            break
        time.sleep(0.005)
    checks += [procs, zombies]
    abandoned = [t for t in report.get("threads", ()) if t.get("outcome") == "abandoned"]
    checks.append(
        DrillCheck(
            "threads",
            True,
            f"{len(report.get('threads', ()))} thread(s) in the report, {len(abandoned)} "
            "listed as abandoned (a remote process's threads cannot be seen from here)",
            skipped=True,
        )
    )
    checks.append(
        DrillCheck(
            "model",
            True,
            "not checked: a remote process's model calls cannot be seen from here",
            skipped=True,
        )
    )
    checks.append(_remote_audit(args, str(report.get("interrupt_id")), bool(report["quiescent"])))
    if not all(c.ok for c in checks):
        quiesced = None
    result = DrillResult(sid, agent, latency, quiesced, tuple(checks))
    return summarize([result], objectives)


def _remote_processes(report: dict[str, Any]) -> tuple[DrillCheck, DrillCheck]:
    from kill_switch._planes._procfs import stat as _stat

    alive: list[str] = []
    zombies: list[str] = []
    pids: set[int] = set()
    for p in report.get("processes", ()):
        pids.add(int(p["pid"]))
        pids.update(int(m) for m in p.get("members", ()))
    for pid in sorted(pids):
        st = _stat(pid)
        if st is None or (st[0] == "Z" and st[1] == 1):
            # Gone, or an orphan's zombie waiting for init: it runs nothing, and only init
            # can reap it (some reap only every few seconds).
            continue
        (zombies if st[0] == "Z" else alive).append(f"pid {pid} (parent {st[1]})")
    procs = DrillCheck(
        "processes",
        not alive,
        f"{len(alive)} alive: {'; '.join(alive[:5])}"
        if alive
        else f"none of the {len(pids)} pid(s) in the report is alive on this host",
    )
    zomb = DrillCheck(
        "zombies",
        not zombies,
        f"{len(zombies)} unreaped: {'; '.join(zombies[:5])}" if zombies else "none",
    )
    return procs, zomb


def _remote_audit(args: argparse.Namespace, interrupt_id: str, quiescent: bool) -> DrillCheck:
    try:
        _, rows = _request(args, "GET", "/api/audit", interrupt=interrupt_id)
    except Failure as exc:
        if "404" in str(exc):
            return DrillCheck("audit", True, "not checked: no SQLite audit log", skipped=True)
        return DrillCheck("audit", False, f"cannot read the audit log: {exc}")
    events = rows.get("events", []) if isinstance(rows, dict) else []
    kinds = {e.get("kind") for e in events if isinstance(e, dict)}
    last = INTERRUPT_COMPLETED if quiescent else ESCALATED
    missing = {INTERRUPT_REQUESTED, last} - kinds
    if missing:
        return DrillCheck(
            "audit", False, f"interrupt {interrupt_id} has no {', '.join(sorted(missing))} row"
        )
    _, verdict = _request(args, "GET", "/api/audit/verify")
    if not (isinstance(verdict, dict) and verdict.get("ok")):
        return DrillCheck("audit", False, f"chain does not verify: {verdict!r:.200}")
    return DrillCheck("audit", True, f"{len(kinds)} kinds of row for the interrupt, chain verifies")
