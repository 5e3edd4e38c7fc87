"""``ControlConfig``: the control plane's options, validated once at construction.

``ControlApp``, ``create_app``, ``ControlServer`` and ``serve`` take one ``config=`` (or
the same options as keywords, which build it), as httpx takes one ``Timeout`` or
``Limits``: an option is named, checked and documented in one place.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final, TypedDict

import attrs

from ._auth import FailureLimiter
from ._protocol import HEADER_TIMEOUT, MAX_CONNECTIONS

if TYPE_CHECKING:
    from collections.abc import Iterable

#: Host names a request may address by default (DNS rebinding: a web page's own name
#: resolving to 127.0.0.1 is refused); ``allowed_hosts`` adds others.
LOOPBACK_HOSTS: Final = ("127.0.0.1", "localhost", "[::1]")


def _seconds(optional: bool) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"{attribute.name} must be a number of seconds, not {type(value).__name__}"
            )
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{attribute.name} must be finite and > 0, got {value!r}")

    return check


def _int_within(low: int, high: int) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{attribute.name} must be an int, not {type(value).__name__}")
        if not low <= value <= high:
            raise ValueError(f"{attribute.name} must be within {low}..{high}, got {value}")

    return check


def _optional_str(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{attribute.name} must be a str or None, not {type(value).__name__}")


def _hosts(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError("allowed_hosts must be a sequence of host names, not one str")
    hosts = tuple(value)
    for h in hosts:
        if not isinstance(h, str) or not h:
            raise TypeError(f"allowed_hosts must hold non-empty str, got {h!r}")
    return hosts


@attrs.frozen(kw_only=True)
class ControlConfig:
    """The options of one control plane.

    Args:
        host: interface to bind; ``127.0.0.1`` by default. Bind to another interface
            only behind something that terminates TLS.
        port: TCP port; 0 picks a free one.
        audit_path: the SQLite audit file for ``/api/audit`` (default: the runtime's,
            if it writes one).
        anchor_path: the anchored chain head checked by ``/api/audit/verify`` (default:
            the runtime's).
        limiter: failed authentications per client (default: a ``FailureLimiter()``
            per application).
        kill_timeout: seconds a kill of the runtime's sessions waits for its StopReport
            (default: the session's stop and audit timeouts plus one second); a fleet
            source waits ``FleetSource(timeout=...)``, by default the fleet's timeout.
        max_connections: connections open at once (clamped to half the descriptor
            limit); beyond it a new connection evicts the oldest one still waiting for
            its request head, so an operator's kill always gets in.
        header_timeout: seconds a connection has to send a complete request head.
        allowed_hosts: ``Host`` names accepted besides the loopback names and *host*
            itself (port ignored; ``*.example.com`` patterns; any other name is refused
            with 400: DNS rebinding).

    Raises:
        TypeError / ValueError: an option of the wrong type or out of range.
    """

    host: str = attrs.field(default="127.0.0.1", validator=attrs.validators.instance_of(str))
    port: int = attrs.field(default=0, validator=_int_within(0, 65535))
    audit_path: str | None = attrs.field(default=None, validator=_optional_str)
    anchor_path: str | None = attrs.field(default=None, validator=_optional_str)
    limiter: FailureLimiter | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.instance_of(FailureLimiter)),
        eq=False,
    )
    kill_timeout: float | None = attrs.field(default=None, validator=_seconds(optional=True))
    max_connections: int = attrs.field(default=MAX_CONNECTIONS, validator=_int_within(1, 2**31))
    header_timeout: float = attrs.field(default=HEADER_TIMEOUT, validator=_seconds(optional=False))
    allowed_hosts: tuple[str, ...] = attrs.field(default=(), converter=_hosts)

    def hosts(self) -> list[str]:
        """Every ``Host`` name a request may address: loopback, *host*, the extra ones."""
        out = [*LOOPBACK_HOSTS, *self.allowed_hosts]
        if self.host not in ("0.0.0.0", "::", ""):
            out.append(f"[{self.host}]" if ":" in self.host else self.host)
        return out


class ControlOptions(TypedDict, total=False):
    """``ControlConfig``'s fields as keyword arguments (``**options``)."""

    host: str
    port: int
    audit_path: str | None
    anchor_path: str | None
    limiter: FailureLimiter | None
    kill_timeout: float | None
    max_connections: int
    header_timeout: float
    allowed_hosts: tuple[str, ...] | list[str]


def resolve(config: ControlConfig | None, options: ControlOptions) -> ControlConfig:
    """*config*, or one built from the keyword *options*.

    Raises:
        TypeError: both given, or an unknown option; ValueError: an option out of range.
    """
    if config is None:
        return ControlConfig(**options)
    if not isinstance(config, ControlConfig):
        raise TypeError(f"config must be a ControlConfig, not {type(config).__name__}")
    if options:
        raise TypeError(
            f"give config= or keyword options, not both (got {', '.join(sorted(options))})"
        )
    return config
