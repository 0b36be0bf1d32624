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
from collections.abc import Collection
from dataclasses import dataclass
from http import HTTPStatus

import h11

__all__ = ["WsReject", "WsRequest", "accept_response", "check_upgrade", "reject_response"]

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_WS_VERSION = "13"


@dataclass(frozen=True, slots=True)
class WsRequest:
    """An upgrade request that passed the checks, as the handler sees it."""

    path: str
    """Request path, without the query string."""
    query: str
    """Query string after `?` (empty when absent); tokens never travel here."""
    headers: tuple[tuple[str, str], ...]
    """All headers in arrival order; names lower-case, values decoded as latin-1."""
    peer: tuple[str, int]
    """Client address and port as the socket reports them."""

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None

    @property
    def authorization(self) -> str | None:
        """The `Authorization` header, if any (never log it)."""
        return self.header("authorization")

    @property
    def origin(self) -> str | None:
        """The `Origin` header, if any (browsers send it; native clients usually don't)."""
        return self.header("origin")


@dataclass(frozen=True, slots=True)
class WsReject:
    """Refuse an upgrade with an HTTP status (e.g. 503 not ready, 429 too many)."""

    status: int
    """HTTP status code, 400-599."""
    message: str = ""
    """Plain-text body; the status phrase when empty."""
    headers: tuple[tuple[str, str], ...] = ()
    """Extra response headers (e.g. `("retry-after", "5")`)."""

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError(f"WsReject.status must be 4xx or 5xx, got {self.status}")


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
    allowed_origins: Collection[str],
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
    if allowed_origins:
        origins = [v for k, v in headers if k == "origin"]
        if any(origin not in allowed_origins for origin in origins):
            return WsReject(403, "origin not allowed")
    return WsRequest(path=req_path, query=query, headers=tuple(headers), peer=peer)


def accept_response(request: WsRequest) -> bytes:
    """The `101 Switching Protocols` response for a checked request."""
    key = request.header("sec-websocket-key")
    assert key is not None, "check_upgrade guarantees the key"
    accept = base64.b64encode(hashlib.sha1(key.strip().encode("ascii") + _WS_GUID).digest())
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
