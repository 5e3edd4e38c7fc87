"""What every ``kill-switch`` command shares: output, exit codes, the control-plane client.

One ``Exit`` for every command, so that a code means the same whatever printed it:

====  ===========  ==================================================================
code  name         meaning
====  ===========  ==================================================================
0     OK           done: the kill answered, the drill passed, the audit chain is intact
1     FAILED       the answer is "no": the server refused (4xx), a drill objective was
                   missed, the audit chain is broken, the demo left something running
2     USAGE        bad arguments or configuration (argparse's own code too)
3     UNAVAILABLE  what the command works on cannot be reached or read: the control
                   plane (unreachable, a 5xx, an answer that is not the control plane's),
                   the audit database
130   INTERRUPTED  Ctrl-C
====  ===========  ==================================================================
"""

from __future__ import annotations

import enum
import json
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse
    import urllib.request
    from collections.abc import Iterable

ENV_URL = "KILL_SWITCH_URL"
ENV_TOKEN = "KILL_SWITCH_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8477"


class Exit(enum.IntEnum):
    """The exit code of every ``kill-switch`` command (table in the module docstring)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    UNAVAILABLE = 3
    INTERRUPTED = 130


def out(line: str) -> None:
    """*line* on stdout."""
    sys.stdout.write(line + "\n")


def err(line: str) -> None:
    """*line* on stderr."""
    sys.stderr.write(line + "\n")


class Failure(Exception):
    """A command ends with *code* and this message on stderr."""

    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_labels(raw: Iterable[str], option: str = "--label") -> dict[str, str]:
    """``key=value`` items as a dict.

    Raises:
        Failure: an item without ``=`` or with an empty key (``Exit.USAGE``).
    """
    out: dict[str, str] = {}
    for item in raw:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise Failure(Exit.USAGE, f"{option} takes key=value, got {item!r}")
        out[k] = v
    return out


def _no_redirects() -> urllib.request.OpenerDirector:
    import urllib.request

    class Refuse(urllib.request.HTTPRedirectHandler):
        # urllib follows redirects by default and carries the Authorization header to
        # the new location, whatever its origin. The control plane never redirects, so
        # a redirect is answered as what it is: not the control plane.
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    return urllib.request.build_opener(Refuse)


class ControlClient:
    """HTTP to a control plane: bearer token, JSON in and out, errors as ``Failure``."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ControlClient:
        """``--url`` / ``$KILL_SWITCH_URL`` and ``--token`` / ``$KILL_SWITCH_TOKEN``."""
        return cls(
            args.url or os.environ.get(ENV_URL) or DEFAULT_URL,
            args.token or os.environ.get(ENV_TOKEN),
            args.timeout,
        )

    def request(
        self, method: str, path: str, body: Any = None, **params: Any
    ) -> tuple[int, dict[str, Any]]:
        """The status and JSON object of ``method path?params`` with *body* as JSON.

        Raises:
            Failure: no token or a bad URL or argument (USAGE); a 4xx (FAILED); the
                server unreachable, a 5xx, a redirect or an answer that is not a JSON
                object (UNAVAILABLE).
        """
        import urllib.error
        import urllib.parse
        import urllib.request

        url = self.url
        if not self.token:
            raise Failure(Exit.USAGE, f"no token: pass --token or set ${ENV_TOKEN}")
        if not url.startswith(("http://", "https://")):
            raise Failure(Exit.USAGE, f"bad URL {url!r}: expected http:// or https://")
        try:  # an argument from a non-UTF-8 terminal holds lone surrogates (surrogateescape)
            query = urllib.parse.urlencode(
                [
                    (k, v)
                    for k, vs in params.items()
                    if vs is not None
                    for v in (vs if isinstance(vs, list) else [vs])
                ]
            )
            data = None
            if body is not None:
                data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise Failure(
                Exit.USAGE,
                "an argument is not valid UTF-8 text (is the terminal's encoding UTF-8?)",
            ) from None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            url + path + (f"?{query}" if query else ""), data=data, headers=headers, method=method
        )
        try:
            with _no_redirects().open(request, timeout=self.timeout) as response:
                status, raw, reason = response.status, response.read(), response.reason
        except urllib.error.HTTPError as exc:
            status, raw, reason = exc.code, exc.read(), exc.reason
        except (urllib.error.URLError, OSError, ValueError) as exc:
            why = getattr(exc, "reason", exc)
            raise Failure(
                Exit.UNAVAILABLE, f"cannot reach the control plane at {url}: {why}"
            ) from None
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        if status >= 500:
            raise Failure(Exit.UNAVAILABLE, f"server error {status} from {url}")
        if status >= 400:
            msg = payload.get("error", {}).get("message") if isinstance(payload, dict) else None
            raise Failure(Exit.FAILED, f"refused ({status}): {msg or reason}")
        if 300 <= status < 400:
            raise Failure(
                Exit.UNAVAILABLE,
                f"{url} answered a redirect ({status}), not followed: "
                "is --url the control plane's address?",
            )
        if not isinstance(payload, dict):
            raise Failure(
                Exit.UNAVAILABLE,
                f"{url} answered {status} without a JSON object: is --url the control plane?",
            )
        return status, payload


def request(
    args: argparse.Namespace, method: str, path: str, body: Any = None, **params: Any
) -> tuple[int, dict[str, Any]]:
    """``ControlClient.from_args(args).request(...)``."""
    return ControlClient.from_args(args).request(method, path, body, **params)


def expect(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    """*data* if it holds every key of *keys*.

    Raises:
        Failure: an answer of another shape (``Exit.UNAVAILABLE``).
    """
    missing = [k for k in keys if k not in data]
    if missing:
        raise Failure(
            Exit.UNAVAILABLE, f"unexpected answer from the control plane (no {missing[0]!r})"
        )
    return data
