"""``kill-switch serve | sessions | kill | token``: the operator's commands.

    kill-switch serve [--host H] [--port P] [--tokens-file F] [--audit-db PATH]
                      [--allow-host NAME ...] [--fleet [URL]]
    kill-switch sessions [--agent A] [--label k=v] [--state S] [--json]
    kill-switch kill ID --reason TEXT [--no-wait] [--json]
    kill-switch kill (--all | --agent A | --label k=v ...) --reason TEXT [--json]
    kill-switch token create --role {viewer,operator,admin} [--id ID] [--json]

``sessions`` and ``kill`` talk HTTP to a running control plane: ``--url`` or
``$KILL_SWITCH_URL`` (default ``http://127.0.0.1:8477``), token from ``--token`` or
``$KILL_SWITCH_TOKEN``. Exit codes (``_common.Exit``): 0 done, 1 refused (a 4xx), 2 usage,
3 unreachable, a server error, or an answer that is not the control plane's.

``serve`` runs a runtime with its control plane and no agents of its own: the normal use
is to mount the control plane inside the agent's process (``kill_switch.control.serve``),
where the sessions are. ``serve --fleet [URL]`` serves the dashboard and API over every
runtime of a fleet on Redis instead (same roles and rules; key from
``$KILL_SWITCH_FLEET_KEY``).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ._common import DEFAULT_URL, ENV_TOKEN, ENV_URL, Exit, Failure, expect
from ._common import err as _err
from ._common import out as _out
from ._common import parse_labels as _labels
from ._common import request as _request

if TYPE_CHECKING:
    import argparse

from kill_switch.fleet import _cli as fleet_cli  # no redis import until a fleet connects

DEFAULT_PORT = 8477


def _safe(text: object) -> str:
    """One terminal-safe cell: control characters (escape sequences too) shown escaped."""
    s = str(text)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def register(subparsers: Any) -> None:
    """Add ``serve``, ``sessions``, ``kill`` and ``token`` to an argparse subparsers object.

    Each parser sets ``func``: call ``args.func(args)`` for the exit code.
    """
    serve = subparsers.add_parser(
        "serve",
        help="serve the control plane (API + dashboard) for a runtime",
        description=(
            "Run a runtime with the control plane on its own thread. It hosts no agents: "
            "the normal use is kill_switch.control.serve() inside the agent's process."
        ),
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT})")
    serve.add_argument(
        "--tokens-file", metavar="PATH", help="token hash lines (also $KILL_SWITCH_TOKENS)"
    )
    serve.add_argument("--audit-db", metavar="PATH", help="SQLite audit log for the runtime")
    serve.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name to accept besides the loopback names (repeatable)",
    )
    serve.set_defaults(func=run_serve)
    fleet_cli.add_arguments(serve)  # fleet: --fleet URL, the dashboard over every runtime

    def client(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", help=f"control plane URL (${ENV_URL}, default {DEFAULT_URL})")
        p.add_argument("--token", help=f"bearer token (default ${ENV_TOKEN})")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")

    sessions = subparsers.add_parser("sessions", help="list the agent sessions")
    client(sessions)
    sessions.add_argument("--agent")
    sessions.add_argument("--label", action="append", default=[], metavar="K=V")
    sessions.add_argument("--state")
    sessions.set_defaults(func=run_sessions)
    fleet_cli.add_arguments(sessions)  # fleet: --fleet URL

    kill = subparsers.add_parser(
        "kill",
        help="stop a session, or every session of a selector",
        description="Interrupt (trigger operator). Terminated is terminal: there is no resume.",
    )
    client(kill)
    kill.add_argument("session_id", nargs="?", metavar="ID")
    kill.add_argument("--reason", required=True)
    kill.add_argument("--all", action="store_true", help="every session")
    kill.add_argument("--agent", help="every session of this agent")
    kill.add_argument("--label", action="append", default=[], metavar="K=V")
    kill.add_argument("--no-wait", action="store_true", help="do not wait for the StopReport")
    kill.set_defaults(func=run_kill)
    fleet_cli.add_arguments(kill, kill=True)  # fleet: --fleet URL, --ban, --operator

    token = subparsers.add_parser("token", help="control-plane tokens")
    tcmd = token.add_subparsers(dest="token_command", metavar="{create}", required=True)
    create = tcmd.add_parser(
        "create",
        help="print a new token and the hash line to configure",
        description=(
            "Print a new random token (give it to the operator; it is shown once) and "
            "its 'id:role:sha256' line (put it in the token file or $KILL_SWITCH_TOKENS)."
        ),
    )
    create.add_argument("--role", required=True, choices=("viewer", "operator", "admin"))
    create.add_argument("--id", dest="token_id", help="token id (default: role-<random>)")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=run_token_create)


# ---------------------------------------------------------------- HTTP


def _table(rows: list[list[str]], header: list[str]) -> None:
    cells = [header, *[[_safe(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        _out("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())


def _run(fn: Any, args: argparse.Namespace) -> int:
    try:
        code: int = fn(args)
    except Failure as exc:
        _err(f"kill-switch {args.command}: {exc}")
        return exc.code
    return code


def run_sessions(args: argparse.Namespace) -> int:
    """``kill-switch sessions``: the inventory as a table (or JSON)."""
    if fleet_cli.wanted(args):  # fleet: every runtime's sessions, from Redis
        return fleet_cli.run_sessions(args)

    def go(args: argparse.Namespace) -> int:
        _, data = _request(
            args,
            "GET",
            "/api/sessions",
            agent=args.agent,
            state=args.state,
            label=args.label or None,
        )
        expect(data, "sessions")
        if args.json:
            _out(json.dumps(data))
            return Exit.OK
        rows = [
            [
                s["session_id"],
                s["agent"],
                ",".join(f"{k}={v}" for k, v in s["labels"].items()),
                s["state"],
                # A fleet control plane cannot see these (they live on each owner's loop).
                "-" if s["actions"] is None else str(s["actions"]),
                "-" if s["cost"] is None else f"{s['cost']:.2f}",
                "-" if s["calls_in_flight"] is None else str(s["calls_in_flight"]),
                s.get("interrupt_reason") or "",
            ]
            for s in data["sessions"]
        ]
        _table(rows, ["SESSION", "AGENT", "LABELS", "STATE", "ACTIONS", "COST", "CALLS", "REASON"])
        return Exit.OK

    return _run(go, args)


def _result_line(r: dict[str, Any]) -> str:
    report = r.get("report")
    if report:
        q = "quiescent" if report["quiescent"] else "NOT quiescent"
        return (
            f"{r['session_id']}: {report['outcome']}, {q}, "
            f"{report['tool_calls_cancelled']} tool calls cancelled, "
            f"audit {report['audit']}, interrupt {r['interrupt_id']}"
        )
    return f"{r['session_id']}: {r['status']} (interrupt {r['interrupt_id']})"


def run_kill(args: argparse.Namespace) -> int:
    """``kill-switch kill``: stop one session or a selection; print each result."""
    if fleet_cli.wanted(args):  # fleet: kill wherever it runs, through Redis
        return fleet_cli.run_kill(args)

    def go(args: argparse.Namespace) -> int:
        selectors = bool(args.all) + bool(args.agent or args.label)
        if bool(args.session_id) + selectors != 1:
            raise Failure(Exit.USAGE, "give a session ID, or --all, or --agent/--label")
        wait = "false" if args.no_wait else None
        if args.session_id:
            _, data = _request(
                args,
                "POST",
                f"/api/sessions/{quote(args.session_id, safe='')}/kill",
                {"reason": args.reason},
                wait=wait,
            )
            results = [expect(data, "session_id", "interrupt_id", "status")]
        else:
            body: dict[str, Any] = {"reason": args.reason}
            if args.all:
                body["all"] = True
            if args.agent:
                body["agent"] = args.agent
            if args.label:
                body["labels"] = _labels(args.label)
            _, data = _request(args, "POST", "/api/kill", body, wait=wait)
            results = expect(data, "results")["results"]
        if args.json:
            _out(json.dumps(data))
        elif not results:
            _out("no matching session")
        else:
            for r in results:
                _out(_safe(_result_line(r)))
        return Exit.OK

    return _run(go, args)


def run_token_create(args: argparse.Namespace) -> int:
    """``kill-switch token create``: a new token and its hash line."""
    from kill_switch.control._auth import new_token

    try:
        token, entry = new_token(args.role, args.token_id)
    except ValueError as exc:
        _err(f"kill-switch token create: {exc}")
        return Exit.USAGE
    if args.json:
        _out(
            json.dumps(
                {
                    "token": token,
                    "token_id": entry.token_id,
                    "role": entry.role,
                    "line": entry.line(),
                }
            )
        )
    else:
        _out(f"token:     {token}")
        _out(f"hash line: {entry.line()}")
        _err(
            "Give the token to its holder (it is not stored anywhere); add the hash line to "
            "the token file or $KILL_SWITCH_TOKENS."
        )
    return Exit.OK


def run_serve(args: argparse.Namespace) -> int:
    """``kill-switch serve``: a runtime with its control plane, until SIGINT/SIGTERM."""
    import asyncio

    from kill_switch.control._auth import TokenStore

    try:
        store = TokenStore.from_environment(args.tokens_file)
    except (OSError, ValueError) as exc:
        _err(f"kill-switch serve: bad token configuration: {exc}")
        return Exit.USAGE
    if not store.entries():
        _err(
            "kill-switch serve: no token configured; create one with "
            "`kill-switch token create --role operator` and pass --tokens-file or "
            "$KILL_SWITCH_TOKENS"
        )
        return Exit.USAGE
    source = None
    if fleet_cli.wanted(args):
        from kill_switch.control import FleetSource
        from kill_switch.fleet import Fleet

        try:  # the URL from --fleet or $KILL_SWITCH_FLEET; the key only from the environment
            source = FleetSource(Fleet(args.fleet or None, name=args.fleet_name))
        except (TypeError, ValueError) as exc:
            _err(f"kill-switch serve --fleet: {exc}")
            return Exit.USAGE

    async def main() -> None:
        import anyio

        from kill_switch._runtime import Runtime
        from kill_switch._shutdown import graceful_shutdown
        from kill_switch.control import serve

        async with (
            Runtime(audit=args.audit_db) as runtime,
            serve(
                runtime,
                host=args.host,
                port=args.port,
                tokens=store,
                allowed_hosts=args.allow_host,
                source=source,
            ) as server,
            # SIGINT/SIGTERM: every session stopped (trigger shutdown), then the block
            # ends; the requested end of a server, hence exit 0.
            graceful_shutdown(runtime),
        ):
            over = " over the fleet" if source is not None else ""
            _out(f"kill_switch control plane{over} at {server.url}/ (Ctrl-C to stop)")
            sys.stdout.flush()
            await anyio.sleep_forever()

    try:
        asyncio.run(main())
    except OSError as exc:
        _err(f"kill-switch serve: cannot listen on {args.host}:{args.port}: {exc}")
        return Exit.UNAVAILABLE
    except RuntimeError as exc:  # the control plane did not start: it says why
        _err(f"kill-switch serve: {exc}")
        return Exit.UNAVAILABLE
    return Exit.OK
