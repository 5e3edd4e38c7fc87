"""The ``kill-switch`` command line: one module per command family, sharing ``_common``
(output, the ``Exit`` codes, the control-plane client)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from kill_switch._cli import audit, control, drill

from ._common import Exit

if TYPE_CHECKING:
    from collections.abc import Sequence


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run a small fleet of scripted agents and stop them every way there is",
        description=(
            "Run scripted agents (no LLM) that call async tools in parallel, run process "
            "trees and blocking sync tools; stop them by supervisor SLA, by an operator "
            "over the demo's own HTTP control plane, by budget, by the sentinel, by "
            "parent cascade and by the demo's own SIGTERM (shutdown); print one line per "
            "stop, run a short kill drill, verify the audit chain, and exit non-zero if "
            "anything was left running."
        ),
    )
    demo.add_argument(
        "--db",
        default=None,
        help="audit database (default: $KILL_SWITCH_AUDIT_DB or kill-switch-audit.db)",
    )
    demo.add_argument("--no-audit", action="store_true", help="run without a durable audit log")
    demo.add_argument(
        "--keep-serving",
        action="store_true",
        help="keep the dashboard up after the fleet has stopped (until Ctrl-C)",
    )
    demo.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(db=args.db, audit=not args.no_audit, keep_serving=args.keep_serving)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kill-switch`` command."""
    parser = argparse.ArgumentParser(
        prog="kill-switch",
        description="The kill switch for async AI agents.",
    )
    from kill_switch import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(subparsers)
    audit.register(subparsers)
    control.register(subparsers)
    drill.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kill-switch`` command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return Exit.USAGE
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return Exit.INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
