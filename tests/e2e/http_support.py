"""Small HTTP and Server-Sent-Events clients for the tests of the HTTP API, on
raw sockets (so a test controls every header, the source address, a PROXY
protocol header, and how fast a stream is read)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _connect(url: str, source: str | None, timeout_s: float) -> tuple[socket.socket, str]:
    parts = urlsplit(url)
    sock = socket.create_connection(
        (parts.hostname or "127.0.0.1", parts.port or 80),
        timeout=timeout_s,
        source_address=(source, 0) if source else None,
    )
    return sock, parts.path + (f"?{parts.query}" if parts.query else "")


def request(
    method: str,
    url: str,
    *,
    params: list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    source: str | None = None,
    preamble: bytes = b"",
    timeout_s: float = 10,
) -> Response:
    """One request on its own connection (closed after the answer)."""
    if params:
        url += ("&" if "?" in url else "?") + urlencode(params)
    sock, target = _connect(url, source, timeout_s)
    with sock:
        lines = [f"{method} {target} HTTP/1.1", "Host: pgrelay"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if not any(k.lower() == "connection" for k in headers or {}):
            # One request per connection: a proxy in between would otherwise keep
            # the connection open for the next one, and the read below wait for it.
            lines.append("Connection: close")
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        sock.sendall(preamble + ("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return Response(int(status_line.split()[1]), found, rest)


@dataclass
class SseEvent:
    event: str
    data: dict[str, Any]
    id: str | None


@dataclass
class SseStream:
    """An open event stream; `events()` yields parsed events as they come."""

    sock: socket.socket
    status: int
    headers: dict[str, str]
    buffer: bytes = b""
    retry_ms: int | None = None
    comments: int = 0
    last_id: str | None = None
    closed: bool = False
    chunked: bool = False
    """The body comes in chunks (a proxy's HTTP/1.1 answer): decoded on arrival."""
    _raw: bytes = b""
    _pending: list[SseEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.chunked:
            self._raw, self.buffer = self.buffer, b""
            self._dechunk()

    def _received(self, data: bytes) -> None:
        if not self.chunked:
            self.buffer += data
            return
        self._raw += data
        self._dechunk()

    def _dechunk(self) -> None:
        while not self.closed:
            line_end = self._raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(self._raw[:line_end].split(b";")[0], 16)
            end = line_end + 2 + size
            if len(self._raw) < end + 2:
                return
            self.buffer += self._raw[line_end + 2 : end]
            self._raw = self._raw[end + 2 :]
            if size == 0:  # the last chunk: the body ended
                self.closed = True

    def next(self, timeout_s: float = 10) -> SseEvent | None:
        """The next event, or None when the stream ended."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._pending:
                return self._pending.pop(0)
            while b"\n\n" in self.buffer:
                block, _, self.buffer = self.buffer.partition(b"\n\n")
                self._parse(block.decode())
                if self._pending:
                    return self._pending.pop(0)
            if self.closed:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no event in time")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                self.closed = True
                continue
            self._received(chunk)

    def events(self, n: int, timeout_s: float = 10, kind: str = "event") -> list[SseEvent]:
        out: list[SseEvent] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < n:
            event = self.next(max(0.01, deadline - time.monotonic()))
            if event is None:
                raise AssertionError(f"the stream ended after {len(out)} of {n}")
            if event.event == kind:
                out.append(event)
        return out

    def _parse(self, block: str) -> None:
        event, data, ident = "message", [], None
        for line in block.split("\n"):
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "retry":
                self.retry_ms = int(value)
            elif name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                ident = value
        if data:
            if ident is not None:
                self.last_id = ident
            self._pending.append(SseEvent(event, json.loads("\n".join(data)), ident))

    def close(self) -> None:
        self.sock.close()


def open_stream(
    base: str,
    orgs: list[str],
    *,
    token: str | None = None,
    ticket: str | None = None,
    last_event_id: str | None = None,
    source: str | None = None,
    receive_buffer: int | None = None,
    timeout_s: float = 10,
) -> SseStream:
    params = [("org", org) for org in orgs]
    if ticket:
        params.append(("ticket", ticket))
    url = base + "/v1/stream?" + urlencode(params)
    parts = urlsplit(url)
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    if source:
        sock.bind((source, 0))
    sock.settimeout(timeout_s)
    sock.connect((parts.hostname or "127.0.0.1", parts.port or 80))
    lines = [
        f"GET {parts.path}?{parts.query} HTTP/1.1",
        "Host: pgrelay",
        "Accept: text/event-stream",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if last_event_id:
        lines.append(f"Last-Event-ID: {last_event_id}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    chunked = headers.get("transfer-encoding", "").lower() == "chunked"
    return SseStream(sock, int(status_line.split()[1]), headers, rest, chunked=chunked)


def iter_pages(
    base: str, token: str, org: str, cursor: str, limit: int
) -> Iterator[dict[str, Any]]:
    """GET /v1/events page after page until `complete` (bounded)."""
    for _ in range(10_000):
        page = request(
            "GET",
            base + "/v1/events",
            params=[("org", org), ("cursor", cursor), ("limit", str(limit))],
            headers={"Authorization": f"Bearer {token}"},
        )
        assert page.status == 200, (page.status, page.body)
        answer = page.json()
        yield answer
        if "resync" in answer or answer["complete"]:
            return
        cursor = answer["cursor"]
    raise AssertionError("paging never completed")
