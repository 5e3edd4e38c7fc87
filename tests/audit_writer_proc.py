"""A writer process for the audit crash tests (run as a script, never imported by pytest).

    python audit_writer_proc.py DB TAG [COUNT] [BURST]

Waits for a line on stdin ("go"), then records events in bursts and, after each
``flush()`` that says ``durable``, prints ``ack <event_id>`` per event (stdout flushed):
an ack is printed only after COMMIT returned. With COUNT it stops after that many events
and prints ``done``; without, it runs until killed.
"""

from __future__ import annotations

import asyncio
import sys

from kill_switch import AuditEvent, SqliteAudit


async def main(db: str, tag: str, count: int | None, burst: int) -> None:
    async with SqliteAudit(db, busy_timeout=10.0) as audit:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        n = 0
        while count is None or n < count:
            events = [
                AuditEvent("tool_blocked", f"{tag}-session", reason=f"{tag} {n + i}")
                for i in range(burst)
            ]
            for event in events:
                audit.record(event)
            status = await audit.flush()
            if status != "durable":
                sys.stdout.write(f"status {status}\n")
                sys.stdout.flush()
                continue
            sys.stdout.write("".join(f"ack {e.event_id}\n" for e in events))
            sys.stdout.flush()
            n += burst
    sys.stdout.write("done\n")
    sys.stdout.flush()


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(
        main(
            args[0],
            args[1],
            int(args[2]) if len(args) > 2 and args[2] != "-" else None,
            int(args[3]) if len(args) > 3 else 3,
        )
    )
