"""``kill-switch serve | sessions | kill | token``: the operator's commands.

    kill-switch serve [--host H] [--port P] [--tokens-file F] [--audit-db PATH]
    kill-switch sessions [--agent A] [--label k=v] [--state S] [--json]
    kill-switch kill ID --reason TEXT [--no-wait] [--json]
    kill-switch kill (--all | --agent A | --label k=v ...) --reason TEXT [--json]
    kill-switch token create --role {viewer,operator,admin} [--id ID] [--json]

``sessions`` and ``kill`` talk HTTP to a running control plane: ``--url`` or
``$KILL_SWITCH_URL`` (default ``http://127.0.0.1:8477``), token from ``--token`` or
``$KILL_SWITCH_TOKEN``. Exit codes: 0 done, 1 refused (401/403/404/409/4xx), 2 usage,
3 unreachable or a server error.

``serve`` runs a runtime with its control plane and no agents of its own: the normal use
is to mount the control plane inside the agent's process (``kill_switch.control.serve``),
where the sessions are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .fleet import _cli as fleet_cli  # no redis import until a fleet connects

ENV_URL = "KILL_SWITCH_URL"
ENV_TOKEN = "KILL_SWITCH_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8477"
DEFAULT_PORT = 8477

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")


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
    serve.set_defaults(func=run_serve)

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


class _Failure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _request(
    args: argparse.Namespace, method: str, path: str, body: Any = None, **params: Any
) -> tuple[int, Any]:
    import urllib.error
    import urllib.parse
    import urllib.request

    url = (args.url or os.environ.get(ENV_URL) or DEFAULT_URL).rstrip("/")
    token = args.token or os.environ.get(ENV_TOKEN)
    if not token:
        raise _Failure(EXIT_USAGE, f"no token: pass --token or set ${ENV_TOKEN}")
    if not url.startswith(("http://", "https://")):
        raise _Failure(EXIT_USAGE, f"bad URL {url!r}: expected http:// or https://")
    query = urllib.parse.urlencode(
        [
            (k, v)
            for k, vs in params.items()
            if vs is not None
            for v in (vs if isinstance(vs, list) else [vs])
        ]
    )
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(
        url + path + (f"?{query}" if query else ""), data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            status, raw, reason = response.status, response.read(), response.reason
    except urllib.error.HTTPError as exc:
        status, raw, reason = exc.code, exc.read(), exc.reason
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", exc)
        raise _Failure(
            EXIT_UNREACHABLE, f"cannot reach the control plane at {url}: {why}"
        ) from None
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if status >= 500:
        raise _Failure(EXIT_UNREACHABLE, f"server error {status} from {url}")
    if status >= 400:
        msg = payload.get("error", {}).get("message") if isinstance(payload, dict) else None
        raise _Failure(EXIT_REFUSED, f"refused ({status}): {msg or reason}")
    return status, payload


def _table(rows: list[list[str]], header: list[str]) -> None:
    cells = [header, *[[_safe(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        _out("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())


def _run(fn: Any, args: argparse.Namespace) -> int:
    try:
        code: int = fn(args)
    except _Failure as exc:
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
        if args.json:
            _out(json.dumps(data))
            return EXIT_OK
        rows = [
            [
                s["session_id"],
                s["agent"],
                ",".join(f"{k}={v}" for k, v in s["labels"].items()),
                s["state"],
                str(s["actions"]),
                f"{s['cost']:.2f}",
                str(s["calls_in_flight"]),
                s.get("interrupt_reason") or "",
            ]
            for s in data["sessions"]
        ]
        _table(rows, ["SESSION", "AGENT", "LABELS", "STATE", "ACTIONS", "COST", "CALLS", "REASON"])
        return EXIT_OK

    return _run(go, args)


def _labels(raw: list[str]) -> dict[str, str]:
    out = {}
    for item in raw:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise _Failure(EXIT_USAGE, f"--label takes key=value, got {item!r}")
        out[k] = v
    return out


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
            raise _Failure(EXIT_USAGE, "give a session ID, or --all, or --agent/--label")
        wait = "false" if args.no_wait else None
        if args.session_id:
            _, data = _request(
                args,
                "POST",
                f"/api/sessions/{args.session_id}/kill",
                {"reason": args.reason},
                wait=wait,
            )
            results = [data]
        else:
            body: dict[str, Any] = {"reason": args.reason}
            if args.all:
                body["all"] = True
            if args.agent:
                body["agent"] = args.agent
            if args.label:
                body["labels"] = _labels(args.label)
            _, data = _request(args, "POST", "/api/kill", body, wait=wait)
            results = data["results"]
        if args.json:
            _out(json.dumps(data))
        elif not results:
            _out("no matching session")
        else:
            for r in results:
                _out(_safe(_result_line(r)))
        return EXIT_OK

    return _run(go, args)


def run_token_create(args: argparse.Namespace) -> int:
    """``kill-switch token create``: a new token and its hash line."""
    from .control._auth import new_token

    try:
        token, entry = new_token(args.role, args.token_id)
    except ValueError as exc:
        _err(f"kill-switch token create: {exc}")
        return EXIT_USAGE
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
    return EXIT_OK


def run_serve(args: argparse.Namespace) -> int:
    """``kill-switch serve``: a runtime with its control plane, until SIGINT/SIGTERM."""
    import asyncio
    import signal

    from .control._auth import TokenStore

    try:
        store = TokenStore.from_environment(args.tokens_file)
    except (OSError, ValueError) as exc:
        _err(f"kill-switch serve: bad token configuration: {exc}")
        return EXIT_USAGE
    if not store.entries():
        _err(
            "kill-switch serve: no token configured; create one with "
            "`kill-switch token create --role operator` and pass --tokens-file or "
            "$KILL_SWITCH_TOKENS"
        )
        return EXIT_USAGE

    async def main() -> None:
        import anyio

        from ._runtime import Runtime
        from .control import serve

        stop = anyio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # an entry point may install handlers
            loop.add_signal_handler(sig, stop.set)
        try:
            async with (
                Runtime(audit=args.audit_db) as runtime,
                serve(runtime, host=args.host, port=args.port, tokens=store) as server,
            ):
                _out(f"kill_switch control plane at {server.url}/ (Ctrl-C to stop)")
                sys.stdout.flush()
                await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        asyncio.run(main())
    except OSError as exc:
        _err(f"kill-switch serve: cannot listen on {args.host}:{args.port}: {exc}")
        return EXIT_UNREACHABLE
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run these commands on their own (``python -m kill_switch._control_cli ...``)."""
    parser = argparse.ArgumentParser(prog="kill-switch")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
