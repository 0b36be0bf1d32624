"""The opening handshake (RFC 6455 section 4.2), as pure functions.

h11 parses the request head; `check_upgrade` decides between an upgrade and
an HTTP refusal, and the response bytes are built here. No socket is touched:
the server shell feeds bytes in and writes bytes out. No extension (such as
permessage-deflate) and no subprotocol is ever negotiated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from http import HTTPStatus

import h11

__all__ = [
    "OriginPolicy",
    "WsReject",
    "WsRequest",
    "accept_response",
    "check_upgrade",
    "reject_response",
]

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_WS_VERSION = "13"


@dataclass(frozen=True, slots=True)
class WsRequest:
    """An upgrade request that passed the checks, as the handler sees it.

    It lives as long as its connection, so it keeps only what the handler and
    the handshake use, not every header.
    """

    path: str
    """Request path, without the query string."""
    query: str
    """Query string after `?` (empty when absent); tokens never travel here."""
    peer: tuple[str, int]
    """Client address and port as the socket reports them."""
    authorization: str | None = field(default=None, repr=False)
    """The first `Authorization` header, if any (never log it)."""
    origin: str | None = None
    """The first `Origin` header, if any (browsers send it; native clients usually don't)."""
    key: str = field(default="", repr=False)
    """`Sec-WebSocket-Key`, for the `101` response."""


@dataclass(frozen=True, slots=True)
class WsReject:
    """Refuse an upgrade with an HTTP status (e.g. 503 not ready, 429 too many)."""

    status: int
    """HTTP status code, 400-599."""
    message: str = ""
    """Plain-text body; the status phrase when empty."""
    headers: tuple[tuple[str, str], ...] = ()
    """Extra response headers (e.g. `("retry-after", "5")`)."""
    reason: str = "handshake"
    """Why, for metrics and logs: `origin`, `capacity`, `per_ip`, `stopping`,
    `handshake` (a malformed or non-WebSocket request)..."""

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError(f"WsReject.status must be 4xx or 5xx, got {self.status}")


_ORIGIN = re.compile(
    r"^(https?)://(\*\.)?(\[[0-9a-f:.]+\]|[a-z0-9-]+(?:\.[a-z0-9-]+)*)(:\d{1,5})?$"
)


class OriginPolicy:
    """Which browser origins may connect: exact origins (`https://app.example.com`)
    and subdomain patterns (`https://*.example.com` matches any host under
    example.com, at any depth, not example.com itself). Scheme and port must
    match exactly; comparison ignores case. An empty policy allows every origin."""

    __slots__ = ("_exact", "_suffixes")

    def __init__(self, patterns: Collection[str] = ()) -> None:
        """Raises ValueError naming the first pattern that is not an origin."""
        self._exact: set[str] = set()
        self._suffixes: list[tuple[str, str, str]] = []
        for pattern in patterns:
            match = _ORIGIN.match(pattern.lower())
            if match is None:
                raise ValueError(
                    f"{pattern!r} is not an origin like https://app.example.com or "
                    "https://*.example.com (a * may only stand for the leftmost labels)"
                )
            scheme, wildcard, host, port = match.groups()
            if wildcard and host.startswith("["):
                raise ValueError(f"{pattern!r}: a * cannot stand before an IP address")
            if wildcard:
                self._suffixes.append((scheme, "." + host, port or ""))
            else:
                self._exact.add(pattern.lower())

    def __bool__(self) -> bool:
        return bool(self._exact or self._suffixes)

    def allows(self, origin: str) -> bool:
        """Whether a request with this `Origin` header may connect."""
        if not self:
            return True
        origin = origin.lower()
        if origin in self._exact:
            return True
        match = _ORIGIN.match(origin)
        if match is None or match.group(2):
            return False
        scheme, _, host, port = match.groups()
        return any(
            scheme == s and host.endswith(suffix) and (port or "") == p
            for s, suffix, p in self._suffixes
        )


def _first(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _tokens(headers: list[tuple[str, str]], name: str) -> set[str]:
    return {
        token.strip().lower()
        for key, value in headers
        if key == name
        for token in value.split(",")
        if token.strip()
    }


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        return False


def check_upgrade(
    request: h11.Request,
    peer: tuple[str, int],
    *,
    path: str,
    allowed_origins: OriginPolicy | Collection[str],
) -> WsRequest | WsReject:
    """Decide on a parsed request head: a `WsRequest` to upgrade, or why not.

    Order: path (404), method (405), upgrade headers (426), version (426),
    key (400), then Origin (403) when `allowed_origins` is not empty. A
    request without `Origin` (a native client) is allowed.
    """
    target = request.target.decode("latin-1")
    req_path, _, query = target.partition("?")
    if req_path != path:
        return WsReject(404)
    if request.method != b"GET":
        return WsReject(405, headers=(("allow", "GET"),))
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
    upgrade_needed = (
        ("upgrade", "websocket"),
        ("connection", "upgrade"),
        ("sec-websocket-version", _WS_VERSION),
    )
    if "websocket" not in _tokens(headers, "upgrade") or "upgrade" not in _tokens(
        headers, "connection"
    ):
        return WsReject(426, "WebSocket upgrade required", upgrade_needed)
    versions = [v.strip() for k, v in headers if k == "sec-websocket-version"]
    if versions != [_WS_VERSION]:
        return WsReject(426, "unsupported WebSocket version", upgrade_needed)
    keys = [v.strip() for k, v in headers if k == "sec-websocket-key"]
    if len(keys) != 1 or not _valid_key(keys[0]):
        return WsReject(400, "bad Sec-WebSocket-Key")
    policy = (
        allowed_origins
        if isinstance(allowed_origins, OriginPolicy)
        else OriginPolicy(allowed_origins)
    )
    if policy:
        for origin in (v for k, v in headers if k == "origin"):
            if not policy.allows(origin):
                return WsReject(403, f"origin not allowed: {origin[:200]}", reason="origin")
    return WsRequest(
        path=path,  # == req_path; the server's string is shared by every request
        query=query,
        peer=peer,
        authorization=_first(headers, "authorization"),
        origin=_first(headers, "origin"),
        key=keys[0],
    )


def accept_response(request: WsRequest) -> bytes:
    """The `101 Switching Protocols` response for a checked request."""
    accept = base64.b64encode(hashlib.sha1(request.key.encode("ascii") + _WS_GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


def reject_response(reject: WsReject) -> bytes:
    """A complete `Connection: close` HTTP response refusing the upgrade."""
    try:
        phrase = HTTPStatus(reject.status).phrase
    except ValueError:
        phrase = "Error"
    body = (reject.message or phrase).encode("utf-8") + b"\n"
    lines = [f"HTTP/1.1 {reject.status} {phrase}"]
    lines += [f"{name}: {value}" for name, value in reject.headers]
    lines += [
        "content-type: text/plain; charset=utf-8",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
