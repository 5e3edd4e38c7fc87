"""``kill-switch audit``: list, export and verify the audit log (read-only, safe on a live
file).

    kill-switch audit [--db PATH] [--session ID] [--interrupt ID] [--trigger T] [--json]
    kill-switch audit verify [--db PATH] [--anchor PATH | --no-anchor]

The database is ``--db``, else ``$KILL_SWITCH_AUDIT_DB``, else ``kill-switch-audit.db``
in the current directory. ``verify`` exits 0 if the log is intact, 1 naming the first bad
row if not, 3 if the file cannot be opened as a database (``_common.Exit``).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from typing import TYPE_CHECKING, Any

from kill_switch._audit._query import AuditLog, verify

from ._common import Exit
from ._common import err as _err
from ._common import out as _out

if TYPE_CHECKING:
    from kill_switch._audit._query import AuditRecord

DEFAULT_DB = "kill-switch-audit.db"
ENV_DB = "KILL_SWITCH_AUDIT_DB"


def _db_path(args: argparse.Namespace) -> str:
    db: str | None = getattr(args, "db", None)
    return db or os.environ.get(ENV_DB) or DEFAULT_DB


def _add_db(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    parser.add_argument(
        "--db",
        metavar="PATH",
        # On the subcommand, SUPPRESS keeps `audit --db X verify` from being reset to None.
        default=argparse.SUPPRESS if suppress else None,
        help=f"audit database (default: ${ENV_DB} or ./{DEFAULT_DB})",
    )


def register(subparsers: Any) -> None:
    """Add the ``audit`` command to an ``argparse`` subparsers object.

    Each parser sets ``func``: call ``args.func(args)`` for the exit code.
    """
    audit = subparsers.add_parser(
        "audit",
        help="show or verify the audit log",
        description="Show the audit log (read-only), or verify its hash chain.",
    )
    _add_db(audit, suppress=False)
    audit.add_argument("--session", metavar="ID", help="only this session's events")
    audit.add_argument("--interrupt", metavar="ID", help="only this interrupt (as a tree)")
    audit.add_argument("--trigger", help="only events with this trigger")
    audit.add_argument("--kind", help="only events of this kind")
    audit.add_argument("--since", type=float, metavar="EPOCH", help="wall time >= EPOCH")
    audit.add_argument("--until", type=float, metavar="EPOCH", help="wall time < EPOCH")
    audit.add_argument("--limit", type=int, help="at most this many events")
    audit.add_argument("--json", action="store_true", help="JSON lines (an export)")
    audit.set_defaults(func=run_list)
    commands = audit.add_subparsers(dest="audit_command", metavar="{verify}")
    check = commands.add_parser(
        "verify",
        help="verify the hash chain and the anchored head",
        description="Exit 0 if the log is intact; 1 naming the first bad row if not.",
    )
    _add_db(check, suppress=True)
    anchor = check.add_mutually_exclusive_group()
    anchor.add_argument("--anchor", metavar="PATH", help="anchor file (default: DB.head)")
    anchor.add_argument("--no-anchor", action="store_true", help="skip the anchored-head check")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.set_defaults(func=run_verify)


def _line(record: AuditRecord, depth: int = 0) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.wall_time))
    frac = f"{record.wall_time % 1:.3f}"[1:]
    seq = "spool" if record.seq is None else record.seq  # durable, not yet in the chain
    parts = [f"{seq:>6}", f"{when}{frac}Z", "  " * depth + record.kind]
    for label, value in (
        ("session", record.session_id),
        ("agent", record.agent),
        ("trigger", record.trigger),
        ("operator", record.operator),
        ("interrupt", record.interrupt_id),
    ):
        if value:
            parts.append(f"{label}={value}")
    if record.reason:
        parts.append(f"reason={json.dumps(record.reason, ensure_ascii=True)}")
    return "  ".join(parts)


def run_list(args: argparse.Namespace) -> int:
    """``kill-switch audit``: print matching events (text, or JSON lines with --json)."""
    path = _db_path(args)
    try:
        with AuditLog(path) as log:
            if args.interrupt and not args.json:
                tree = log.cascade(args.interrupt)
                if tree is None:
                    _err(f"no events for interrupt {args.interrupt}")
                    return Exit.OK
                for depth, record in tree.walk():
                    _out(_line(record, depth))
                return Exit.OK
            filters = {
                "session_id": args.session,
                "interrupt_id": args.interrupt,
                "trigger": args.trigger,
                "kind": args.kind,
                "since": args.since,
                "until": args.until,
                "limit": args.limit,
            }
            if args.json:
                log.export_jsonl(sys.stdout, **filters)
            else:
                for record in log.events(**filters):
                    _out(_line(record))
    except sqlite3.Error as exc:
        _err(f"kill-switch audit: cannot read {path}: {exc}")
        return Exit.UNAVAILABLE
    return Exit.OK


def run_verify(args: argparse.Namespace) -> int:
    """``kill-switch audit verify``: 0 intact, 1 tampered (first bad row), 3 unreadable."""
    path = _db_path(args)
    if not os.path.exists(path):
        _err(f"kill-switch audit verify: no database at {path}")
        return Exit.UNAVAILABLE
    anchor: str | None = "default"
    if args.no_anchor:
        anchor = None
    elif args.anchor:
        anchor = args.anchor
    try:
        result = verify(path, anchor=anchor)
    except sqlite3.Error as exc:
        _err(f"kill-switch audit verify: {path} is not a readable database: {exc}")
        return Exit.UNAVAILABLE
    if args.json:
        _out(
            json.dumps(
                {
                    "ok": result.ok,
                    "count": result.count,
                    "head": result.head,
                    "first_bad_seq": result.first_bad_seq,
                    "problem": result.problem,
                    "anchor": result.anchor,
                    "anchored_count": result.anchored_count,
                    "spooled": result.spooled,
                }
            )
        )
    else:
        _out(f"{path}: {result.summary()}")
    return Exit.OK if result.ok else Exit.FAILED
