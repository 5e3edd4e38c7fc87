"""The control plane's HTTP vocabulary: refusals, JSON answers, and request bodies and
query parameters read with every bound checked first.

Hostile input never reaches a parser unbounded: bodies are capped while they are read
(413), only ``application/json`` is parsed (415), JSON must be a small object with no
duplicate keys (400), and every answer to a bad request is a 4xx.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

import anyio
from starlette.responses import Response

from kill_switch._vocabulary._triggers import MAX_REASON

from ._inventory import json_text

if TYPE_CHECKING:
    from collections.abc import Mapping

    from starlette.requests import Request

#: Largest request body read, in bytes; longer ones are refused (413) while reading.
MAX_BODY: Final = 16 * 1024
#: Seconds a request body may take to arrive (a slow body holds a connection, not a kill).
BODY_TIMEOUT: Final = 10.0


class Refused(Exception):
    """Answer the request with *status* and a JSON error message (and *extra* fields
    beside ``error`` in the body)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def escape(text: str, limit: int = 300) -> str:
    """*text* safe for one log line: JSON-escaped (no newlines, no controls), bounded."""
    return json.dumps(text[:limit], ensure_ascii=True)


def error_response(
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    """The JSON error answer: ``{"error": {"status": ..., "message": ...}, **extra}``."""
    body = {**(extra or {}), "error": {"status": status, "message": message}}
    return json_response(body, status, headers)


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """*data* as a JSON answer (snapshots expanded, ASCII only: ``json_text``)."""
    return json_body(json_text(data), status, headers)


def json_body(body: str, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """*body*, JSON text already encoded by ``json_text``, as the answer."""
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def checked_text(name: str, value: str) -> str:
    """*value* if it is encodable text, else a 400 (a lone surrogate is not Unicode text)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(400, f"{name} is not valid Unicode text (a lone surrogate)") from None
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object, read with every bound checked first.

    Raises:
        Refused: 415 not JSON, 413 too large, 400 malformed.
    """
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise Refused(415, "Content-Type must be application/json")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise Refused(400, "bad Content-Length")
        if int(length) > MAX_BODY:
            raise Refused(413, f"body larger than {MAX_BODY} bytes")
    body = bytearray()
    with anyio.move_on_after(BODY_TIMEOUT) as scope:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise Refused(413, f"body larger than {MAX_BODY} bytes")
    if scope.cancelled_caught:
        raise Refused(408, f"body not received within {BODY_TIMEOUT:g} s")
    if not body:
        return {}
    try:
        data = json.loads(
            bytes(body).decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Refused(400, f"invalid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise Refused(400, "the body must be a JSON object")
    return data


def known_keys(data: Mapping[str, Any], *keys: str) -> None:
    """Refuse a key that is not one of *keys*: a typo (``label``) must not widen a kill."""
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise Refused(400, f"unknown key {unknown[0]!r}; expected {', '.join(map(repr, keys))}")


def reason_of(data: Mapping[str, Any]) -> str:
    """The body's ``reason``: a non-empty, bounded, encodable string, else a 400."""
    reason = data.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise Refused(400, "'reason' must be a non-empty string")
    if len(reason) > MAX_REASON:
        raise Refused(400, f"'reason' longer than {MAX_REASON} characters")
    return checked_text("'reason'", reason)


def flag(request: Request, name: str, default: bool) -> bool:
    """The boolean query parameter *name* (*default* when absent), else a 400."""
    value = request.query_params.get(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise Refused(400, f"?{name}= must be true or false")


def count_param(request: Request, name: str, most: int | None = None) -> int | None:
    """The non-negative integer query parameter *name* (at most *most*; ``None`` when
    absent), else a 400."""
    value = request.query_params.get(name)
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise Refused(400, f"?{name}= must be a whole number")
    number = int(value)
    if most is not None and number > most:
        raise Refused(400, f"?{name}= must be at most {most}")
    return number


def label_filter(raw: list[str]) -> dict[str, str]:
    """``?label=key=value`` parameters as a mapping, else a 400."""
    out: dict[str, str] = {}
    for item in raw:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Refused(400, "label filters are ?label=key=value")
        out[key] = value
    return out
