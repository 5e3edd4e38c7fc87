"""Bearer tokens, roles and the failed-authentication limiter of the control plane.

Tokens are never stored: the server knows ``<token id>:<role>:<sha256 hex>`` lines, from
a file (re-read when it changes: rotation and revocation take effect on the next
request) and/or the ``KILL_SWITCH_TOKENS`` environment variable (lines separated by
newlines, commas or semicolons). A presented token is hashed with SHA-256 and compared,
as bytes, with ``hmac.compare_digest`` against *every* configured hash, so neither the
time taken nor a ``TypeError`` on non-ASCII input tells an attacker anything.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import stat
import sys
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Final, Literal

import attrs

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

Role = Literal["viewer", "operator", "admin"]
ROLES: Final[tuple[Role, ...]] = ("viewer", "operator", "admin")
_RANK: Final[dict[str, int]] = {"viewer": 0, "operator": 1, "admin": 2}

ENV_TOKENS: Final = "KILL_SWITCH_TOKENS"
TOKEN_PREFIX: Final = "kst_"

#: An Authorization header longer than this is refused before it is looked at.
MAX_AUTH_HEADER: Final = 512
#: Largest token file read, in bytes.
MAX_TOKEN_FILE: Final = 1024 * 1024

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX_RE = re.compile(r"[0-9a-f]{64}")
# RFC 7235 token68, bounded.
_TOKEN68 = re.compile(rb"[A-Za-z0-9._~+/-]{1,256}=*")


def allows(role: str, needed: Role) -> bool:
    """Whether *role* grants what *needed* grants (admin ⊃ operator ⊃ viewer)."""
    return _RANK.get(role, -1) >= _RANK[needed]


def hash_token(token: str | bytes) -> str:
    """The SHA-256 hex digest of *token* (UTF-8 when given as ``str``)."""
    raw = token.encode("utf-8", "surrogatepass") if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()


@attrs.frozen
class TokenEntry:
    """One configured token: its public id, its role and the SHA-256 of the secret."""

    token_id: str
    role: Role
    sha256: str = attrs.field(repr=False)

    def line(self) -> str:
        """The configuration line for this entry."""
        return f"{self.token_id}:{self.role}:{self.sha256}"


@attrs.frozen
class Principal:
    """Who made a request: the token id (never the token) and its role."""

    token_id: str
    role: Role
    #: The SHA-256 of the token presented, to tell a rotated token from this one.
    sha256: str = attrs.field(default="", repr=False)


def new_token(role: Role, token_id: str | None = None) -> tuple[str, TokenEntry]:
    """Return a fresh secret token and the entry to configure for it.

    Raises:
        ValueError: unknown *role* or a malformed *token_id*.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if token_id is None:
        token_id = f"{role}-{secrets.token_hex(4)}"
    if not _ID_RE.fullmatch(token_id):
        raise ValueError(f"token id must match {_ID_RE.pattern}, got {token_id!r}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, TokenEntry(token_id, role, hash_token(token))


def parse_lines(lines: Iterable[str], *, source: str) -> list[TokenEntry]:
    """Parse ``id:role:sha256hex`` lines (``#`` comments and blanks ignored).

    Raises:
        ValueError: a malformed line, an unknown role or a duplicate id (naming *source*
            and the line number, never echoing a hash).
    """
    out: list[TokenEntry] = []
    seen: set[str] = set()
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3:
            raise ValueError(f"{source}:{n}: expected 'id:role:sha256hex'")
        token_id, role, digest = (p.strip() for p in parts)
        digest = digest.lower()
        if not _ID_RE.fullmatch(token_id):
            raise ValueError(f"{source}:{n}: bad token id {token_id!r}")
        if role not in ROLES:
            raise ValueError(f"{source}:{n}: unknown role {role!r} (one of {', '.join(ROLES)})")
        if not _HEX_RE.fullmatch(digest):
            raise ValueError(f"{source}:{n}: the hash must be 64 hex digits (SHA-256)")
        if token_id in seen:
            raise ValueError(f"{source}:{n}: duplicate token id {token_id!r}")
        seen.add(token_id)
        out.append(TokenEntry(token_id, role, digest))
    return out


class TokenStore:
    """The configured tokens; thread-safe. The file is re-read when its content changes.

    A file that becomes unreadable, malformed or world-writable, or that repeats a token
    id of ``$KILL_SWITCH_TOKENS``, revokes every token it held (fail closed) and says so
    on stderr; at start-up the same is a ``ValueError`` / ``OSError``.
    """

    def __init__(
        self,
        entries: Sequence[TokenEntry] = (),
        *,
        path: str | os.PathLike[str] | None = None,
        env: str | None = None,
    ) -> None:
        self._fixed = list(entries)
        if env:
            self._fixed += parse_lines(re.split(r"[\n,;]", env), source=f"${ENV_TOKENS}")
        self._path = os.fspath(path) if path is not None else None
        self._lock = threading.Lock()
        self._stamp: bytes | None = None
        self._from_file: list[TokenEntry] = []
        self._revoked: set[str] = set()
        self._check_unique()
        if self._path is not None:
            raw = self._read_bytes()  # raises on a bad file at start-up
            self._from_file = self._parse(raw)
            self._stamp = hashlib.sha256(raw).digest()

    @classmethod
    def from_environment(cls, path: str | os.PathLike[str] | None = None) -> TokenStore:
        """Tokens from *path* (if given) and ``$KILL_SWITCH_TOKENS``.

        Raises:
            ValueError: malformed configuration.
            OSError: the file cannot be read.
        """
        return cls(path=path, env=os.environ.get(ENV_TOKENS))

    def _check_unique(self) -> None:
        ids = [e.token_id for e in self._entries()]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"duplicate token ids across sources: {sorted(dup)}")

    def _read_bytes(self) -> bytes:
        """The token file's content, refused when anyone may write it or it is huge.

        Raises:
            OSError: unreadable. ValueError: world-writable, or over ``MAX_TOKEN_FILE``.
        """
        assert self._path is not None
        with open(self._path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & stat.S_IWOTH:
                raise ValueError(
                    f"{self._path} is world-writable (mode {stat.S_IMODE(mode):o}): anyone "
                    f"could add a token; run `chmod o-w {self._path}`"
                )
            raw = f.read(MAX_TOKEN_FILE + 1)
        if len(raw) > MAX_TOKEN_FILE:
            raise ValueError(f"{self._path} is larger than {MAX_TOKEN_FILE} bytes")
        return raw

    def _parse(self, raw: bytes) -> list[TokenEntry]:
        assert self._path is not None
        entries = parse_lines(raw.decode("utf-8").splitlines(), source=self._path)
        fixed = {e.token_id for e in self._fixed}
        clash = sorted(fixed.intersection(e.token_id for e in entries))
        if clash:
            raise ValueError(
                f"{self._path}: token id {clash[0]!r} is also in ${ENV_TOKENS} "
                "(one id, one role: remove one of them)"
            )
        return entries

    def _refresh(self) -> None:
        # The file is read and hashed on every check: size and mtime cannot tell a
        # same-size rewrite whose mtime was put back, and a token file is small.
        if self._path is None:
            return
        with self._lock:
            try:
                raw = self._read_bytes()
            except (OSError, ValueError) as exc:
                if self._stamp is not None or self._from_file:
                    sys.stderr.write(
                        f"kill_switch.control: token file unusable, its tokens are revoked: {exc}\n"
                    )
                self._stamp = None
                self._from_file = []
                return
            stamp = hashlib.sha256(raw).digest()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                self._from_file = self._parse(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                self._from_file = []
                sys.stderr.write(
                    f"kill_switch.control: token file unusable, its tokens are revoked: {exc}\n"
                )

    def _entries(self) -> list[TokenEntry]:
        return [*self._fixed, *self._from_file]

    def entries(self) -> tuple[TokenEntry, ...]:
        """Every active (configured, not revoked) entry."""
        self._refresh()
        return tuple(e for e in self._entries() if e.token_id not in self._revoked)

    def revoke(self, token_id: str) -> bool:
        """Revoke *token_id* for this server's lifetime; whether it was active."""
        active = any(e.token_id == token_id for e in self.entries())
        with self._lock:
            self._revoked.add(token_id)
        return active

    def authenticate(self, token: bytes) -> Principal | None:
        """The principal whose hash matches SHA-256(*token*), or ``None``.

        Every entry is compared (no early exit), as bytes, in constant time.
        """
        presented = hashlib.sha256(token).digest()
        found: TokenEntry | None = None
        for entry in self.entries():
            if hmac.compare_digest(presented, bytes.fromhex(entry.sha256)) and found is None:
                found = entry
        if found is None:
            return None
        return Principal(found.token_id, found.role, found.sha256)

    def is_active(self, principal: Principal) -> bool:
        """Whether *principal*'s token is still configured, unchanged and not revoked."""
        return any(
            e.token_id == principal.token_id and hmac.compare_digest(e.sha256, principal.sha256)
            for e in self.entries()
        )


# ------------------------------------------------------------ Authorization header


class BadCredentials(Exception):
    """The Authorization header is absent or malformed; ``status`` is 401 or 400."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


def bearer_token(headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The token of the single ``Authorization: Bearer <token68>`` header, as bytes.

    The scheme is case-insensitive (RFC 7235); exactly one space separates it from the
    token. Works on the raw ASGI header list so that no decoding can fail.

    Raises:
        BadCredentials: missing (401), duplicated (400), oversized (400) or malformed
            (401) credentials.
    """
    values = [v for k, v in headers if k.lower() == b"authorization"]
    if not values:
        raise BadCredentials("missing Authorization header")
    if len(values) > 1:
        raise BadCredentials("more than one Authorization header", 400)
    value = values[0]
    if len(value) > MAX_AUTH_HEADER:
        raise BadCredentials("Authorization header too long", 400)
    scheme, sep, token = value.partition(b" ")
    if not sep or scheme.lower() != b"bearer":
        raise BadCredentials("expected 'Authorization: Bearer <token>'")
    if not _TOKEN68.fullmatch(token):
        raise BadCredentials("malformed bearer token")
    return token


# ------------------------------------------------------------ failure limiter


class FailureLimiter:
    """A token bucket of failed authentications per client address; thread-safe.

    Only failures are counted: a request with a valid token never consults it, so an
    operator's kill is served during a flood of bad tokens from anywhere.
    """

    def __init__(self, *, burst: int = 20, per_second: float = 2.0, max_clients: int = 10_000):
        if burst < 1 or not (per_second > 0 and math.isfinite(per_second)):
            raise ValueError("burst must be >= 1 and per_second finite and > 0")
        self.burst = burst
        self.per_second = per_second
        self._max = max_clients
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def blocked(self, client: str) -> bool:
        """Whether *client* has no failure left now (nothing is counted)."""
        now = time.monotonic()
        with self._lock:
            state = self._buckets.get(client)
        if state is None:
            return False
        tokens, last = state
        return min(float(self.burst), tokens + (now - last) * self.per_second) < 1.0

    def retry_after(self, client: str) -> float:
        """0 if *client* may fail once more (and count that failure), else seconds to wait."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.per_second)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[client] = (tokens, now)
                wait = (1.0 - tokens) / self.per_second
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        return wait
