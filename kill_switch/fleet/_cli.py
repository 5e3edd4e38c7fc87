"""``kill-switch sessions --fleet`` and ``kill-switch kill --fleet``: the operator's
commands over every runtime of a fleet instead of one control plane.

The URL comes from ``--fleet URL`` or, with a bare ``--fleet``, ``$KILL_SWITCH_FLEET``;
the key only from ``$KILL_SWITCH_FLEET_KEY``: a key on a command line is visible to
every user of the machine (``ps``), so there is no option for it.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import sys
from typing import TYPE_CHECKING, Any

import anyio

from kill_switch._vocabulary._selector import Selector
from kill_switch.fleet._fleet import ENV_KEY, ENV_URL, Fleet, FleetError, FleetUnavailable, NoAnswer
from kill_switch.fleet._wire import report_to_dict

if TYPE_CHECKING:
    import argparse

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_arguments(parser: argparse.ArgumentParser, *, kill: bool = False) -> None:
    """Add ``--fleet`` (and for ``kill``: ``--ban``, ``--operator``) to *parser*."""
    parser.add_argument(
        "--fleet",
        nargs="?",
        const="",
        default=None,
        metavar="URL",
        help=f"act on the whole fleet in Redis (URL, or bare: ${ENV_URL}); key from ${ENV_KEY}",
    )
    parser.add_argument("--fleet-name", default="default", help="the fleet's name (default)")
    if kill:
        parser.add_argument(
            "--ban", metavar="DURATION", help="with a selector: refuse later starts (10m, 2h)"
        )
        parser.add_argument("--operator", help="who asks (default: user@host)")


def wanted(args: argparse.Namespace) -> bool:
    """Whether the command was asked to act on the fleet."""
    return getattr(args, "fleet", None) is not None


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``30s``, ``10m``, ``2h`` or ``1d``.

    Raises:
        ValueError: anything else.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if m is None:
        raise ValueError(f"a duration is a number with s, m, h or d: got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")


def _safe(text: object) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _fleet(args: argparse.Namespace) -> Fleet:
    url = args.fleet or os.environ.get(ENV_URL)
    if not url:
        raise ValueError(f"--fleet needs a URL, or ${ENV_URL}")
    return Fleet(url, name=args.fleet_name, timeout=args.timeout)


def _labels(raw: list[str]) -> dict[str, str]:
    out = {}
    for item in raw:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"--label takes key=value, got {item!r}")
        out[k] = v
    return out


def _guard(fn: Any, args: argparse.Namespace) -> int:
    try:
        code: int = anyio.run(fn, args)
    except (ValueError, TypeError) as exc:
        _err(f"kill-switch {args.command} --fleet: {exc}")
        return EXIT_USAGE
    except FleetUnavailable as exc:
        _err(f"kill-switch {args.command} --fleet: {exc}")
        return EXIT_UNREACHABLE
    except FleetError as exc:
        _err(f"kill-switch {args.command} --fleet: {exc}")
        return EXIT_REFUSED
    return code


def run_sessions(args: argparse.Namespace) -> int:
    """``kill-switch sessions --fleet``: every session of every runtime."""

    async def go(args: argparse.Namespace) -> int:
        wanted_labels = _labels(args.label)
        async with _fleet(args) as fleet:
            sessions = await fleet.sessions()
        wanted = Selector(args.agent, wanted_labels)
        rows = [
            s
            for s in sessions
            if (args.state is None or s.state == args.state) and wanted.matches(s.agent, s.labels)
        ]
        if args.json:
            _out(json.dumps({"sessions": [s.to_dict() for s in rows]}))
            return EXIT_OK
        table = [
            [
                s.session_id,
                s.agent,
                ",".join(f"{k}={v}" for k, v in s.labels.items()),
                s.state,
                s.host,
                str(s.pid),
                s.runtime_id[:12],
            ]
            for s in rows
        ]
        header = ["SESSION", "AGENT", "LABELS", "STATE", "HOST", "PID", "RUNTIME"]
        widths = [max(len(h), *(len(_safe(r[i])) for r in table)) for i, h in enumerate(header)]
        for r in [header, *table]:
            _out("  ".join(_safe(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        return EXIT_OK

    return _guard(go, args)


def run_kill(args: argparse.Namespace) -> int:
    """``kill-switch kill --fleet``: stop a session, or a selection, wherever it runs."""

    async def go(args: argparse.Namespace) -> int:
        selector = bool(args.all) + bool(args.agent or args.label)
        if bool(args.session_id) + selector != 1:
            raise ValueError("give a session ID, or --all, or --agent/--label")
        if args.ban is not None and args.session_id:
            raise ValueError("--ban goes with a selector (a killed id is refused for good)")
        if args.no_wait:
            raise ValueError("--no-wait is not supported with --fleet")
        ban = parse_duration(args.ban) if args.ban is not None else None
        operator = args.operator or f"{getpass.getuser()}@{socket.gethostname()}"
        unanswered: tuple[str, ...] = ()
        kill_id: str | None = None
        async with _fleet(args) as fleet:
            if args.session_id:
                try:
                    report = await fleet.kill(
                        args.session_id, reason=args.reason, operator=operator
                    )
                except NoAnswer as exc:
                    if args.json:
                        _out(json.dumps({"kill_id": exc.kill_id, "unanswered": exc.runtimes}))
                    _err(f"kill-switch kill --fleet: {exc}")
                    return EXIT_REFUSED
                reports = [report]
            else:
                result = await fleet.kill_where(
                    reason=args.reason,
                    operator=operator,
                    agent=args.agent,
                    labels=_labels(args.label) or None,
                    all=bool(args.all),
                    ban=ban,
                )
                reports, unanswered, kill_id = (
                    list(result.reports),
                    result.unanswered,
                    result.kill_id,
                )
        if args.json:
            _out(
                json.dumps(
                    {
                        "kill_id": kill_id,
                        "reports": [report_to_dict(r) for r in reports],
                        "unanswered": list(unanswered),
                    }
                )
            )
        else:
            if not reports:
                _out("no matching session")
            for r in reports:
                q = "quiescent" if r.quiescent else "NOT quiescent"
                _out(_safe(f"{r.session_id}: {r.outcome}, {q}, audit {r.audit}"))
            for rid in unanswered:
                _err(f"runtime {rid} did not answer in time (its kill is sticky)")
        return EXIT_REFUSED if unanswered else EXIT_OK

    return _guard(go, args)
