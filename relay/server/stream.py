"""Server-Sent Events: a `Channel` for `Connection`, over one HTTP response.

An event stream is a connection whose client never speaks after its request:
the stream's request becomes the client's first frames (one `subscribe` per
org, resuming from `Last-Event-ID`), and everything the session sends goes out
as SSE events — `id:` the stream's resume cursor, `event:` the frame type,
`data:` the frame. So the same session, output and slow-client rules as a
WebSocket's apply; only the framing differs.

The `id:` must be safe for every org of the stream at once (EventSource sends
one Last-Event-ID back): `StreamPosition` keeps each org's latest cursor and
gives their meet. It is computed when bytes are handed to the socket, never
earlier: frames still queued can be coalesced or collapsed into a resync, and
an id must not claim what the client never received.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence

import trio

from relay.core.cursor import Cursor, StreamPosition
from relay.ws import HttpExchange, SocketWriter

__all__ = ["KEEPALIVE_S", "EventStream", "sse_wrap"]

KEEPALIVE_S = 15.0
"""A comment line this often keeps proxies from timing an idle stream out."""
RETRY_MS = (1000, 5000)
"""Range of the `retry:` a stream tells EventSource (jittered per stream)."""


def sse_wrap(message: bytes) -> bytes:
    """The `Output` wrap of an event stream: one JSON message per line (JSON
    never contains a raw newline); framed as SSE when handed to the socket."""
    return message + b"\n"


class EventStream:
    """A `Channel` over an SSE response (see the module docstring)."""

    __slots__ = (
        "_exchange",
        "_frames",
        "_position",
        "_read_scope",
        "close_code",
        "closing",
        "writer",
    )

    def __init__(
        self,
        exchange: HttpExchange,
        writer: SocketWriter,
        *,
        orgs: Sequence[str],
        start: Cursor | None,
        resume_text: str | None,
    ) -> None:
        """`exchange` already sent the response head through `writer`; `start`
        is the decoded Last-Event-ID (`resume_text` as the client sent it)."""
        self._exchange = exchange
        self.writer = writer
        self._position = StreamPosition(start, orgs)
        self._frames = [
            json.dumps({"type": "subscribe", "ref": f"s{i}", "org": org, "cursor": resume_text})
            for i, org in enumerate(orgs)
        ]
        self._read_scope: trio.CancelScope | None = None
        self.closing = False
        self.close_code: int | None = None
        low, high = RETRY_MS
        writer.send_control(f"retry: {random.randint(low, high)}\n\n".encode(), droppable=False)

    @property
    def unsent_bytes(self) -> int:
        return self.writer.unsent_bytes

    def send_nowait(self, data: bytes) -> bool:
        """SSE-frame the JSON lines in `data` with their resume ids and hand them to
        the socket whole, or refuse them whole (nothing remembered)."""
        if self.closing or self.writer.broken:
            return True  # taken and dropped, like a closed WebSocket
        position = self._position.fork()
        out = bytearray()
        for line in data.split(b"\n"):
            if not line:
                continue
            frame = json.loads(line)
            kind = frame.get("type", "message")
            cursor = frame.get("cursor")
            org = frame.get("org")
            if isinstance(cursor, str) and isinstance(org, str):
                resume = position.advance(org, cursor)
                if resume is not None:
                    out += b"id: " + resume.encode() + b"\n"
            out += b"event: " + str(kind).encode() + b"\ndata: " + line + b"\n\n"
        if not self.writer.send(bytes(out)).accepted and not self.writer.broken:
            return False
        self._position = position
        return True

    async def receive_message(self) -> str | None:
        """The stream's request as frames (its subscribes), then nothing until the
        client goes away or the stream is closed: None."""
        if self._frames:
            return self._frames.pop(0)
        if self.closing:
            return None
        with trio.CancelScope() as scope:
            self._read_scope = scope
            try:
                await self._exchange.wait_peer_gone()
            except (OSError, trio.ClosedResourceError):
                pass
            finally:
                self._read_scope = None
        if self.close_code is None:
            self.close_code = 1006  # the client went away
        self.closing = True
        return None

    def abort(self, code: int, reason: str = "") -> None:
        """End the stream: a last `close` event says why and whether to come back
        (the WebSocket close codes), then the response ends."""
        if self.closing:
            return
        self.closing = True
        self.close_code = code
        close = json.dumps({"type": "close", "code": code, "reason": reason})
        self.writer.send_control(
            b"event: close\ndata: " + close.encode() + b"\n\n", droppable=False
        )
        self.writer.finish()
        if self._read_scope is not None:
            self._read_scope.cancel()

    def set_drain_callback(self, callback: Callable[[], None] | None) -> None:
        self.writer.on_drain = callback

    async def keep_alive(self) -> None:
        """A comment line every KEEPALIVE_S while nothing waits; until cancelled."""
        while not self.closing:
            await trio.sleep(KEEPALIVE_S)
            if not self.writer.unsent_bytes:
                self.writer.send(b": keepalive\n\n")
