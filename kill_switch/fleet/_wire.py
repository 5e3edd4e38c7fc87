"""What fleet messages look like on Redis: keys, signed envelopes, and reports as JSON.

Every message a runtime acts on (a kill) and every answer an operator trusts (a reply
carrying StopReports) is a JSON payload wrapped in an HMAC-SHA256 envelope keyed with
the fleet key. A process with Redis access but without the key can write to the keys
below, but cannot make a runtime stop anything or an operator believe a report.

The vocabulary is closed on purpose: ``kill`` and ``reply``. There is no message that
resumes, instructs or reconfigures an agent, so there is nothing of the kind to forge.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import TYPE_CHECKING, Any, Final

import attrs

from kill_switch._vocabulary._report import (
    CleanupReport,
    InterruptRequest,
    Latency,
    LeakedTask,
    ProcessReport,
    StopReport,
    ThreadReport,
)

if TYPE_CHECKING:
    from kill_switch._vocabulary._snapshots import SessionInfo

VERSION: Final = 1
KINDS: Final = frozenset({"kill", "reply"})


class Rejected(Exception):
    """A fleet message failed authentication or validation (why is the message)."""


def keys(name: str) -> dict[str, str]:
    """The fleet's Redis keys. One hash tag: every key of a fleet lives in one Redis
    Cluster slot, so the heartbeat script and MULTI blocks may touch several of them."""
    p = f"ks:{{{name}}}:"
    return {
        "leases": p + "leases",  # ZSET runtime id -> lease deadline (ms, Redis clock)
        "runtimes": p + "runtimes",  # HASH runtime id -> JSON (host, pid, lease, ...)
        "sessions": p + "sessions:",  # + runtime id: HASH session id -> JSON snapshot
        "killed": p + "killed",  # HASH session id -> signed kill (sticky, by id)
        "selectors": p + "selectors",  # HASH kill id -> signed kill (selector, maybe a ban)
        "commands": p + "commands",  # STREAM of signed kills, trimmed
        "reply": p + "reply:",  # + kill id: LIST of signed replies, expiring
        "audit": p + "audit",  # STREAM of signed audit entries with chain heads, trimmed
    }


def sign(key: bytes, payload: dict[str, Any]) -> str:
    """The envelope of *payload*: ``{"p": <payload JSON>, "s": <hex HMAC-SHA256>}``."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    mac = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
    return json.dumps({"p": body, "s": mac}, separators=(",", ":"))


def open_envelope(key: bytes, raw: str | bytes) -> dict[str, Any]:
    """The payload of a signed envelope.

    Raises:
        Rejected: not an envelope, a bad signature, or a payload of an unknown kind.
    """
    try:
        env = json.loads(raw)
        body, mac = env["p"], env["s"]
        if not isinstance(body, str) or not isinstance(mac, str):
            raise TypeError("envelope fields must be strings")
    except (ValueError, TypeError, KeyError) as exc:
        raise Rejected(f"not a fleet envelope: {exc!r}") from None
    expected = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, mac):
        raise Rejected("bad signature (not signed with this fleet's key)")
    payload = json.loads(body)
    if not isinstance(payload, dict) or payload.get("v") != VERSION:
        raise Rejected(f"unsupported message version {payload.get('v')!r}")
    if payload.get("type") not in KINDS:
        # Signed with the key but of a kind no runtime acts on: refused, never guessed at.
        raise Rejected(f"unknown message type {payload.get('type')!r}")
    return payload


def check_kill(msg: dict[str, Any]) -> None:
    """Check a kill's fields (a signed message may still be malformed: an old version, a
    bug).

    Raises:
        Rejected: a field is missing or of the wrong type.
    """

    def bad(what: str) -> Rejected:
        return Rejected(f"malformed kill: {what}")

    if not isinstance(msg.get("kill_id"), str) or not msg["kill_id"]:
        raise bad("kill_id")
    if not isinstance(msg.get("reason"), str):
        raise bad("reason")
    if msg.get("operator") is not None and not isinstance(msg["operator"], str):
        raise bad("operator")
    for name in ("issued_at", "ban_until"):
        value = msg.get(name)
        if (value is None and name == "ban_until") or (
            isinstance(value, (int, float)) and not isinstance(value, bool)
        ):
            continue
        raise bad(name)
    target = msg.get("target")
    if not isinstance(target, dict):
        raise bad("target")
    if "session_id" in target:
        if not isinstance(target["session_id"], str) or not target["session_id"]:
            raise bad("target session_id")
        return
    labels = target.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise bad("target labels")
    if target.get("agent") is not None and not isinstance(target["agent"], str):
        raise bad("target agent")
    if not target.get("all") and target.get("agent") is None and not labels:
        raise bad("a selector with nothing selected")


def snapshot(info: SessionInfo) -> dict[str, Any]:
    """The part of a session's snapshot published to the fleet."""
    return {
        "session_id": info.session_id,
        "agent": info.agent,
        "labels": info.labels,
        "state": info.state,
        "started_at": info.started_at,
        "parent_id": info.parent_id,
        "interrupt_trigger": info.interrupt_trigger,
    }


def report_to_dict(report: StopReport) -> dict[str, Any]:
    """A JSON-ready copy of *report*."""
    return attrs.asdict(report)


def _tuple_of(cls: type[Any], items: Any) -> tuple[Any, ...]:
    out = []
    for item in items:
        item = dict(item)
        for name in ("command", "signals", "members"):  # tuples inside ProcessReport
            if name in item and isinstance(item[name], list):
                item[name] = tuple(item[name])
        out.append(cls(**item))
    return tuple(out)


def report_from_dict(data: dict[str, Any]) -> StopReport:
    """The StopReport *data* was made from (``report_to_dict``).

    Written by hand rather than with cattrs: seven small frozen classes do not justify
    a dependency, and a field added to ``StopReport`` fails loudly here (TypeError).

    Raises:
        Rejected: *data* is not a StopReport.
    """
    try:
        d = dict(data)
        d["later"] = _tuple_of(InterruptRequest, d.get("later", ()))
        d["leaked_tasks"] = _tuple_of(LeakedTask, d.get("leaked_tasks", ()))
        d["swept_tasks"] = _tuple_of(LeakedTask, d.get("swept_tasks", ()))
        d["secondary_errors"] = tuple(d.get("secondary_errors", ()))
        d["children"] = tuple(d.get("children", ()))
        d["latency"] = Latency(**d["latency"])
        d["processes"] = _tuple_of(ProcessReport, d.get("processes", ()))
        d["threads"] = _tuple_of(ThreadReport, d.get("threads", ()))
        d["cleanup"] = _tuple_of(CleanupReport, d.get("cleanup", ()))
        return StopReport(**d)
    except (TypeError, KeyError, ValueError) as exc:
        raise Rejected(f"not a StopReport: {exc!r}") from None
