"""A fleet worker for the tests: one process, one Runtime in a fleet, agent sessions that
wait forever, driven by lines on stdin and reporting JSON lines on stdout.

    python tests/fleet_worker.py URL NAME LEASE ON_PARTITION [AUDIT_DB]

stdin commands: ``start AGENT [SESSION_ID] [k=v ...]`` (``-`` for a generated id),
``quit``. stdout events: ``ready`` (runtime id), ``started``, ``refused``, ``stopped``
(with the report's trigger and operator), ``audit`` (fleet events of the log),
``error``. The fleet key comes from $KILL_SWITCH_FLEET_KEY.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio
import anyio.abc

import kill_switch as ks

# $FLEET_WORKER_QUIET=1: no ``stopped`` lines (the benchmarks time kills; a reader thread
# woken in the benchmark's process by each line would be timed with them).
QUIET = os.environ.get("FLEET_WORKER_QUIET") == "1"


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def run_session(
    runtime: ks.Runtime, agent: str, sid: str | None, labels: dict[str, str]
) -> None:
    try:
        session = runtime.session(agent, session_id=sid, labels=labels)
    except ks.SessionRefused as exc:
        emit(event="refused", session_id=sid, agent=agent, reason=str(exc))
        return
    async with session:
        emit(event="started", session_id=session.id, agent=agent)
        await anyio.sleep_forever()
    report = await session.handle
    if QUIET:
        return
    emit(
        event="stopped",
        session_id=session.id,
        trigger=report.trigger,
        operator=report.operator,
        reason=report.reason,
        outcome=report.outcome,
    )


async def main() -> None:
    url, name, lease, on_partition = sys.argv[1:5]
    audit = sys.argv[5] if len(sys.argv) > 5 else None
    fleet = ks.Fleet(url, name=name, lease=float(lease), on_partition=on_partition)  # type: ignore[arg-type]  # the test passes a valid literal
    try:
        runtime = ks.Runtime(audit=audit, fleet=fleet)
        async with runtime:
            link = runtime._fleet_link
            assert link is not None

            def listener(event: ks.AuditEvent) -> None:
                if event.kind.startswith("fleet_"):
                    emit(event="audit", kind=event.kind, reason=event.reason, details=event.details)

            runtime.add_listener(listener)
            emit(event="ready", runtime_id=link.runtime_id)
            async with anyio.create_task_group() as tg:
                async for line in _stdin_lines():
                    words = line.split()
                    if not words:
                        continue
                    if words[0] == "quit":
                        break
                    if words[0] == "start":
                        agent = words[1]
                        sid = words[2] if len(words) > 2 and words[2] != "-" else None
                        labels = dict(w.split("=", 1) for w in words[3:])
                        tg.start_soon(run_session, runtime, agent, sid, labels)
                tg.cancel_scope.cancel()
    except ks.KillSwitchError as exc:
        emit(event="error", error=type(exc).__name__, message=str(exc))
        sys.exit(3)


async def _stdin_lines() -> Any:
    stream = anyio.wrap_file(sys.stdin)
    async for line in stream:
        yield line


if __name__ == "__main__":
    # $FLEET_WORKER_LOOP=uvloop: the benchmarks run the worker on the loop they measure.
    uvloop = os.environ.get("FLEET_WORKER_LOOP") == "uvloop"
    anyio.run(main, backend_options={"use_uvloop": uvloop})
