"""Helpers for the relay.ws tests: a server on 127.0.0.1 port 0, and a raw
client (a plain trio socket plus wsproto's client-side frame encoder) for
what trio-websocket cannot do: fragment, send invalid UTF-8, stay silent,
stop reading, reset."""

from __future__ import annotations

import base64
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Event, Message

from relay.ws import WsConnection, WsLimits, WsRequest, WsServer
from relay.ws.server import RequestHook

HOST = "127.0.0.1"
#: Limits that keep timing tests short.
FAST = WsLimits(handshake_timeout_s=0.5, close_timeout_s=1.0, ping_interval_s=60.0)


@dataclass
class Served:
    """A running server and what its handler saw."""

    server: WsServer
    port: int
    connections: list[WsConnection] = field(default_factory=list)
    requests: list[WsRequest] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)
    """Set when a handler starts."""
    finished: trio.Event = field(default_factory=trio.Event)
    """Set when a handler returns."""

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/v1"


Handler = Callable[[WsConnection, WsRequest], Awaitable[None]]


async def echo_text(connection: WsConnection, request: WsRequest) -> None:
    while (message := await connection.receive_message()) is not None:
        await connection.send_message(message)


@asynccontextmanager
async def serving(
    handler: Handler = echo_text,
    *,
    limits: WsLimits = FAST,
    allowed_origins: tuple[str, ...] = (),
    on_request: RequestHook | None = None,
) -> AsyncIterator[Served]:
    """Run a WsServer for the body; record each connection and request."""
    served: Served

    async def recording(connection: WsConnection, request: WsRequest) -> None:
        served.connections.append(connection)
        served.requests.append(request)
        served.arrived.set()
        try:
            await handler(connection, request)
        finally:
            served.finished.set()

    server = WsServer(
        recording, limits=limits, allowed_origins=allowed_origins, on_request=on_request
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, HOST, 0)
        served = Served(server, port)
        yield served
        nursery.cancel_scope.cancel()


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame (masked), built by hand so tests can send anything."""
    mask = os.urandom(4)
    length = len(payload)
    first = (0x80 if fin else 0) | opcode
    if length <= 125:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


def upgrade_request(
    path: str = "/v1", headers: tuple[tuple[str, str], ...] = (), *, host: str = HOST
) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawClient:
    """A TCP client that speaks WebSocket frames only when told to."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.ws = Connection(ConnectionType.CLIENT)
        self.response_head = b""

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None) -> RawClient:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((HOST, port))
        return cls(sock)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view) :]

    async def read_head(self) -> bytes:
        """Read an HTTP response head; keep any bytes after it for the frame parser."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await self.sock.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        self.response_head = head
        if rest:
            self.ws.receive_data(rest)
        return head

    async def upgrade(self, path: str = "/v1", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
        await self.send(upgrade_request(path, headers))
        head = await self.read_head()
        assert head.startswith(b"HTTP/1.1 101 "), head
        return head

    async def send_event(self, event: Event) -> None:
        await self.send(self.ws.send(event))

    async def send_text(self, text: str, *, fin: bool = True) -> None:
        await self.send_event(Message(data=text, message_finished=fin))

    async def next_event(self) -> Event | None:
        """The next event from the server, or None at EOF (control frames too)."""
        while True:
            for event in self.ws.events():
                return event
            try:
                data = await self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                return None
            self.ws.receive_data(data)

    async def read_until_close(self) -> tuple[list[Event], CloseConnection | None, bool]:
        """Events up to the server's close frame, that frame, and whether EOF followed."""
        events: list[Event] = []
        while True:
            event = await self.next_event()
            if event is None:
                return events, None, True
            if isinstance(event, CloseConnection):
                # No reply: watch whether the server closes TCP anyway.
                eof = await self.recv_is_eof()
                return events, event, eof
            events.append(event)

    async def recv_is_eof(self) -> bool:
        while True:
            try:
                data = await self.sock.recv(65536)
            except OSError:
                return True
            if not data:
                return True

    def reset(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


async def http_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, return everything until the server closes."""
    client = await RawClient.connect(port)
    try:
        await client.send(request)
        data = b""
        while chunk := await client.sock.recv(65536):
            data += chunk
        return data
    finally:
        client.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])
