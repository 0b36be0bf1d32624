"""Plain HTTP on the WebSocket port: one request per connection, answered with
a whole response or with a stream (Server-Sent Events).

`WsServer` parses each request head with h11; a request that is not a
WebSocket upgrade goes to its `http_handler` as an `HttpExchange`. Responses
carry `Connection: close`: a catch-up request or a ticket is one round trip,
and an event stream lasts until either side ends it. A stream's body goes
through a `SocketWriter` (bounded, never blocking the caller), like a
WebSocket's frames.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs

import h11
import trio

from relay.ws.limits import WsLimits
from relay.ws.sockets import close_socket, discard_until_eof, recv_some, send_all
from relay.ws.writer import SocketWriter

__all__ = ["HttpExchange", "HttpHandler", "HttpRequest"]


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A request head, as a handler sees it."""

    method: str
    """Upper case: GET, POST, OPTIONS..."""
    path: str
    """The target without its query string."""
    query: str
    """The query string without '?' ("" when none)."""
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    """Names in lower case, in order, repeats kept."""
    peer: tuple[str, int]
    """The client's address (behind a trusted proxy: the one it named)."""

    def header(self, name: str) -> str | None:
        """The first value of header `name` (lower case), if any."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def params(self) -> dict[str, list[str]]:
        """The query parameters (a name may repeat)."""
        return parse_qs(self.query, keep_blank_values=True)


HttpHandler = Callable[["HttpExchange"], Awaitable[None]]
"""Answers one plain HTTP request; the server closes the socket when it returns."""


class HttpExchange:
    """One request and its response, on a socket the server owns."""

    __slots__ = ("_limits", "_nursery", "_parser", "_sock", "on_abort", "request", "writer")

    def __init__(
        self,
        sock: socket.socket,
        request: HttpRequest,
        parser: h11.Connection,
        *,
        limits: WsLimits,
        nursery: trio.Nursery,
    ) -> None:
        self._sock = sock
        self.request = request
        self._parser = parser
        self._limits = limits
        self._nursery = nursery
        self.writer: SocketWriter | None = None
        """The stream's writer, once `start_stream` was called."""
        self.on_abort: Callable[[int, str], None] | None = None
        """How the server ends a stream early (shutdown): set by the stream's owner."""

    async def read_body(self, max_bytes: int) -> bytes | None:
        """The request body, or None when it is longer than `max_bytes`."""
        body = bytearray()
        while True:
            event = self._parser.next_event()
            if event is h11.NEED_DATA:
                data = await recv_some(self._sock, self._limits.receive_chunk_bytes)
                self._parser.receive_data(data)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_bytes:
                    return None
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                return bytes(body)

    async def respond(
        self, status: int, headers: Sequence[tuple[str, str]], body: bytes = b""
    ) -> None:
        """Send a whole response and end the exchange (no keep-alive)."""
        head = self._head(status, [*headers, ("content-length", str(len(body)))])
        with trio.move_on_after(self._limits.close_timeout_s):
            await send_all(self._sock, head + (b"" if self.request.method == "HEAD" else body))
            self._sock.shutdown(socket.SHUT_WR)
            await discard_until_eof(self._sock, self._limits.receive_chunk_bytes)

    def start_stream(self, status: int, headers: Sequence[tuple[str, str]]) -> SocketWriter:
        """Send the head of a response whose body is written as it comes, until
        either side ends it (no length: the body ends when the connection does)."""
        writer = SocketWriter(
            self._sock,
            self._nursery,
            max_unsent_bytes=self._limits.max_unsent_bytes,
            drain_low_water_bytes=self._limits.drain_low_water_bytes,
        )
        writer.send_control(self._head(status, headers), droppable=False)
        self.writer = writer
        return writer

    async def wait_peer_gone(self) -> None:
        """Read and drop input until the client closes (EOF) or resets."""
        while await recv_some(self._sock, self._limits.receive_chunk_bytes):
            pass

    async def finish_stream(self) -> None:
        """End a stream: what waits goes out, then FIN; bounded by close_timeout_s."""
        writer = self.writer
        if writer is None:
            return
        writer.finish()
        with trio.move_on_after(self._limits.close_timeout_s):
            await writer.wait_finished()
        writer.drop()

    def abort(self, code: int, reason: str) -> None:
        """The server stops (e.g. shutting down): end a stream early."""
        if self.on_abort is not None:
            self.on_abort(code, reason)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.drop()
        close_socket(self._sock)

    def _head(self, status: int, headers: Sequence[tuple[str, str]]) -> bytes:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        lines = [f"HTTP/1.1 {status} {phrase}".rstrip()]
        lines += [f"{name}: {value}" for name, value in headers]
        lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
