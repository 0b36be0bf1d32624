"""One server-side WebSocket connection: a trio shell over wsproto's frame protocol.

Writing. Server frames are encoded once by the caller (`encode_text_frame`)
and offered with `send_frame_nowait`, which never awaits: the write half is a
`SocketWriter` (one non-blocking `send()`, leftover bytes bounded by
`max_unsent_bytes` and sent by a writer task that exists only while bytes
wait, a drain callback at the low-water mark). A frame that would exceed the
bound is refused (`SendResult.OVERFLOW`), so the caller decides what to do with
a slow client. A reset peer marks the connection closed; nothing ever raises
into the caller.

Reading. `receive_message` (text only; binary closes with 1003) and
`receive_any` (text or binary) read the socket themselves, feed wsproto,
answer pings, reassemble fragments, enforce `max_message_bytes` as bytes
arrive (1009) and run the close handshake. They return None once the
connection is closing. Pongs are only seen while someone is receiving, so a
handler loops on `receive_message` for the connection's whole life.

Closing. `close` and `abort` queue a close frame behind what is pending; the
writer sends it and shuts the write side (FIN); the input is then read and
dropped until the peer's close frame or EOF, and only then is the socket
closed: closing with unread input would send a TCP RST that can destroy the
close frame in flight. Every step is bounded by `close_timeout_s`.

Tasks. The server runs each connection in one task (the handler runs in it).
Its `ConnectionGroup` holds what connections share: the nursery their writer
tasks are spawned in (on demand), and one heartbeat timer for all of them: a
ping every `ping_interval_s`, close 1011 when the pong is `pong_timeout_s`
late.
"""

from __future__ import annotations

import heapq
import itertools
import math
import socket
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any, Final

import structlog
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage

from relay.core.codes import UNSENDABLE_CLOSE_CODES, CloseCode
from relay.ws.frames import encode_binary_frame, encode_text_frame
from relay.ws.handshake import WsRequest
from relay.ws.limits import WsLimits
from relay.ws.sockets import close_socket, recv_now, recv_some
from relay.ws.writer import SendResult, SocketWriter

__all__ = ["ConnectionGroup", "Handler", "SendResult", "WsConnection", "WsState"]

_log = structlog.get_logger("relay.ws")

Handler = Callable[["WsConnection", WsRequest], Awaitable[None]]
"""Runs one upgraded connection; when it returns, the server closes the
connection with 1000 (1011 if it raised, 1001 if it was cancelled)."""


class WsState(Enum):
    """Everything that decides what a connection may still do."""

    OPEN = "open"
    """Messages flow both ways."""
    CLOSING = "closing"
    """A close frame is queued or sent; no data frames are accepted any more."""
    CLOSED = "closed"
    """No more I/O: the socket is closed, or the peer reset or vanished."""


class _Step(Enum):
    NEED_DATA = "need_data"


_NEED_DATA: Final = _Step.NEED_DATA


def _check_close_code(code: int) -> None:
    if not 1000 <= code <= 4999 or code in UNSENDABLE_CLOSE_CODES:
        raise ValueError(f"close code {code} cannot be sent")


HEARTBEAT_CHUNK = 2000
"""Heartbeats handled between two checkpoints of the heartbeat timer."""

_TimerEntry = list[Any]
"""[when, sequence number, connection or None once forgotten]: a heap entry."""


class ConnectionGroup:
    """What the connections of one server share: the nursery their writer tasks
    are spawned in, and one heartbeat timer for all of them (a heap of
    deadlines, instead of a sleeping task per connection)."""

    __slots__ = ("_changed", "_heap", "_seq", "nursery")

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        """Where writer tasks run; it must outlive every connection of the group."""
        self._heap: list[_TimerEntry] = []
        self._seq = itertools.count()
        self._changed = trio.Event()

    def watch(self, connection: WsConnection) -> None:
        """Start `connection`'s heartbeat (no-op when its ping interval is infinite)."""
        when = connection._heartbeat_due()
        if math.isfinite(when):
            self._push(connection, when)

    def forget(self, connection: WsConnection) -> None:
        """Drop `connection`'s heartbeat, so the heap no longer holds it."""
        entry = connection._timer
        if entry is not None:
            entry[2] = None
            connection._timer = None

    def _push(self, connection: WsConnection, when: float) -> None:
        entry: _TimerEntry = [when, next(self._seq), connection]
        connection._timer = entry
        heap = self._heap
        heapq.heappush(heap, entry)
        if heap[0] is entry:
            self._changed.set()

    async def run_heartbeats(self) -> None:
        """Ping each connection every `ping_interval_s`; close 1011 when a pong is
        `pong_timeout_s` late. Runs until cancelled."""
        heap = self._heap
        while True:
            self._changed = trio.Event()
            with trio.move_on_at(heap[0][0] if heap else math.inf):
                await self._changed.wait()
            now = trio.current_time()
            budget = HEARTBEAT_CHUNK
            while heap and heap[0][0] <= now:
                entry = heapq.heappop(heap)
                connection: WsConnection | None = entry[2]
                if connection is None:
                    continue  # forgotten
                connection._timer = None
                when = connection._heartbeat_tick(now)
                if math.isfinite(when):
                    self._push(connection, when)
                budget -= 1
                if budget <= 0:
                    budget = HEARTBEAT_CHUNK
                    await trio.lowlevel.checkpoint()
                    now = trio.current_time()


class WsConnection:
    """An upgraded connection; created by `WsServer`, handed to the handler."""

    __slots__ = (
        "_close_code",
        "_close_reason",
        "_group",
        "_limits",
        "_message_bytes",
        "_next_ping_at",
        "_parts",
        "_ping_sent_at",
        "_progress_lot",
        "_read_scope",
        "_reading",
        "_sock",
        "_state",
        "_timer",
        "_writer",
        "_ws",
        "request",
    )

    def __init__(
        self,
        sock: socket.socket,
        request: WsRequest,
        limits: WsLimits,
        trailing_data: bytes = b"",
        *,
        group: ConnectionGroup,
    ) -> None:
        """Wrap an upgraded, non-blocking socket; `trailing_data` is input read
        past the upgrade request; `group` is the server's (writer nursery,
        heartbeat timer)."""
        self._sock = sock
        self._group = group
        self.request: Final = request
        """The upgrade request this connection came from."""
        self._limits = limits
        self._ws = Connection(ConnectionType.SERVER, extensions=None, trailing_data=trailing_data)
        self._state = WsState.OPEN
        self._writer = SocketWriter(
            sock,
            group.nursery,
            max_unsent_bytes=limits.max_unsent_bytes,
            drain_low_water_bytes=limits.drain_low_water_bytes,
        )
        self._writer.on_broken = self._mark_broken
        self._progress_lot: trio.lowlevel.ParkingLot | None = None
        self._reading = False
        self._read_scope: trio.CancelScope | None = None
        self._close_code: int | None = None
        self._close_reason = ""
        self._parts: list[Any] | None = None
        self._message_bytes = 0
        self._ping_sent_at: float | None = None
        self._next_ping_at = trio.current_time() + limits.ping_interval_s
        self._timer: _TimerEntry | None = None

    # -- state ------------------------------------------------------------------
    @property
    def state(self) -> WsState:
        """OPEN, CLOSING or CLOSED."""
        return self._state

    @property
    def unsent_bytes(self) -> int:
        """Bytes accepted but not yet taken by the kernel. While above 0, a writer
        task runs and calls the drain callback once at most
        `drain_low_water_bytes` are left."""
        return self._writer.unsent_bytes

    @property
    def close_code(self) -> int | None:
        """The close code once closing: ours, the peer's, or 1006 if it vanished."""
        return self._close_code

    @property
    def close_reason(self) -> str:
        """The reason sent with `close_code` ("" when none)."""
        return self._close_reason

    # -- sending ----------------------------------------------------------------
    def send_frame_nowait(self, frame: bytes) -> SendResult:
        """Offer one encoded frame; never awaits, never raises for a broken peer.

        With nothing pending this is one non-blocking `send()`; leftover bytes
        are queued for a writer task. With bytes pending the frame is
        appended, so queued frames go out together in one `send()`.
        """
        if self._state is not WsState.OPEN:
            return SendResult.CLOSED
        return self._writer.send(frame)

    def send_nowait(self, frame: bytes) -> bool:
        """`send_frame_nowait` for `relay.core.outbox.Transport`: False only when
        the frame was refused (OVERFLOW); a closed connection takes and drops."""
        return self.send_frame_nowait(frame) is not SendResult.OVERFLOW

    async def send_message(self, message: str | bytes) -> SendResult:
        """Send a text (str) or binary (bytes) message, waiting for room.

        Returns SENT, QUEUED or CLOSED, never OVERFLOW. Raises ValueError
        when the frame could never fit in `max_unsent_bytes`.
        """
        if isinstance(message, str):
            frame = encode_text_frame(message.encode("utf-8"))
        else:
            frame = encode_binary_frame(message)
        room_needed = self._limits.max_unsent_bytes - len(frame)
        if room_needed < 0:
            raise ValueError("message larger than max_unsent_bytes")
        await self.wait_unsent_at_most(room_needed)
        return self.send_frame_nowait(frame)

    async def wait_unsent_at_most(self, max_bytes: int) -> None:
        """Return once at most `max_bytes` are pending, or nothing more can be sent."""
        await self._writer.wait_unsent_at_most(max_bytes)

    def set_drain_callback(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` each time a writer task's send leaves at most
        `drain_low_water_bytes` pending while open (so the owner can move more
        frames from its own outbox). It runs in the writer task; it must not
        block or raise."""
        self._writer.on_drain = callback

    # -- receiving --------------------------------------------------------------
    async def receive_message(self) -> str | None:
        """The next text message, or None once the connection is closing.

        A binary message closes the connection with 1003; invalid UTF-8 with
        1007; a message over `max_message_bytes` with 1009.
        """
        message = await self._receive(allow_binary=False)
        assert not isinstance(message, bytes)
        return message

    async def receive_any(self) -> str | bytes | None:
        """Like `receive_message`, but binary messages are returned as bytes."""
        return await self._receive(allow_binary=True)

    # -- closing ----------------------------------------------------------------
    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close gracefully, bounded by `close_timeout_s`.

        Pending frames go out first, then the close frame; the write side is
        shut, input is dropped until the peer's close frame or EOF, and the
        socket is closed.
        A no-op beyond waiting if a close is already under way.
        """
        _check_close_code(code)
        self._begin_close(code, reason)
        await self._finish()

    def abort(self, code: int, reason: str = "") -> None:
        """Start closing with `code` without awaiting (e.g. 4008 from the fan-out).

        Frames already accepted still go out before the close frame. A pending
        `receive_message` returns None; when the handler returns, the server
        finishes the close.
        """
        _check_close_code(code)
        self._begin_close(code, reason)

    # -- internals: writing -------------------------------------------------------
    def _send_control(self, frame: bytes, *, droppable: bool) -> None:
        """Queue a ping, pong or close frame behind pending data (pongs are
        droppable: a client flooding pings without reading cannot grow them)."""
        if self._state is not WsState.CLOSED:
            self._writer.send_control(frame, droppable=droppable)

    def _heartbeat_due(self) -> float:
        if self._state is not WsState.OPEN:
            return math.inf
        if self._ping_sent_at is None:
            return self._next_ping_at
        return self._ping_sent_at + self._limits.pong_timeout_s

    def _heartbeat_tick(self, now: float) -> float:
        """The heartbeat timer's call at or after the due time: ping, or close
        1011 when the pong is late. Returns the next due time (inf: none)."""
        if self._heartbeat_due() <= now:
            if self._ping_sent_at is not None:
                self._begin_close(CloseCode.INTERNAL_ERROR, "ping timeout")
            elif self._ws.state is ConnectionState.OPEN:
                self._ping_sent_at = now
                self._send_control(self._ws.send(Ping()), droppable=False)
        return self._heartbeat_due()

    def _progress(self) -> trio.lowlevel.ParkingLot:
        """Where tasks wait for the writer's progress or for the read side to be
        free (created on first use; waiters re-check their condition)."""
        if self._progress_lot is None:
            self._progress_lot = trio.lowlevel.ParkingLot()
        return self._progress_lot

    # -- internals: reading -------------------------------------------------------
    async def _receive(self, *, allow_binary: bool) -> str | bytes | None:
        await self._acquire_reading()
        try:
            while self._state is WsState.OPEN:
                for event in self._ws.events():
                    result = self._on_event(event, allow_binary)
                    if result is not _NEED_DATA:
                        return result
                if not await self._read_some():
                    break
            return None
        finally:
            self._release_reading()

    async def _acquire_reading(self) -> None:
        """One reader at a time (a lock without a lock object per connection)."""
        await trio.lowlevel.checkpoint()
        while self._reading:
            await self._progress().park()
        self._reading = True

    def _release_reading(self) -> None:
        self._reading = False
        if self._progress_lot is not None:
            self._progress_lot.unpark_all()

    async def _read_some(self) -> bool:
        """Feed the next input to wsproto; False when reading must stop."""
        sock = self._sock
        data = b""
        with trio.CancelScope() as scope:
            self._read_scope = scope
            try:
                # recv_ready inlined: an idle connection waits with one frame less.
                chunk = self._limits.receive_chunk_bytes
                await trio.lowlevel.checkpoint_if_cancelled()
                got = recv_now(sock, chunk)
                if got is not None:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                while got is None:
                    await trio.lowlevel.wait_readable(sock)
                    got = recv_now(sock, chunk)
                data = got
            except trio.ClosedResourceError:
                return False
            except OSError:
                self._mark_broken()
                return False
            finally:
                self._read_scope = None
        if scope.cancelled_caught or self._state is not WsState.OPEN:
            return False
        if not data:
            self._mark_broken()  # EOF without a close frame
            return False
        self._ws.receive_data(data)
        return True

    def _on_event(self, event: Event, allow_binary: bool) -> str | bytes | _Step | None:
        if isinstance(event, TextMessage | BytesMessage):
            return self._on_data(event, allow_binary)
        if isinstance(event, Ping):
            if self._ws.state is ConnectionState.OPEN:
                self._send_control(self._ws.send(event.response()), droppable=True)
            return _NEED_DATA
        if isinstance(event, Pong):
            self._ping_sent_at = None
            self._next_ping_at = trio.current_time() + self._limits.ping_interval_s
            return _NEED_DATA
        if isinstance(event, CloseConnection):
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                # The peer's close frame: echo its code (wsproto sends an empty
                # close frame for 1005, "no status").
                self._begin_close(event.code, "")
            else:
                # wsproto found a protocol violation and tells us the code.
                self._begin_close(event.code, event.reason or "")
            return None
        return _NEED_DATA

    def _on_data(
        self, event: TextMessage | BytesMessage, allow_binary: bool
    ) -> str | bytes | _Step | None:
        text = isinstance(event, TextMessage)
        chunk: str | bytes
        if isinstance(event, TextMessage):
            chunk = event.data
            size = len(chunk) if chunk.isascii() else len(chunk.encode("utf-8"))
        else:
            if self._parts is None and not allow_binary:
                self._begin_close(CloseCode.UNSUPPORTED_DATA, "binary messages are not supported")
                return None
            chunk = bytes(event.data)
            size = len(chunk)
        if self._parts is None:
            self._message_bytes = 0
        self._message_bytes += size
        if self._message_bytes > self._limits.max_message_bytes:
            self._parts = None
            self._begin_close(CloseCode.MESSAGE_TOO_BIG, "message too big")
            return None
        if self._parts is None:
            if event.message_finished:
                return chunk
            self._parts = [chunk]
            return _NEED_DATA
        self._parts.append(chunk)
        if not event.message_finished:
            return _NEED_DATA
        parts, self._parts = self._parts, None
        return "".join(parts) if text else b"".join(parts)

    # -- internals: closing -------------------------------------------------------
    def _begin_close(self, code: int, reason: str) -> None:
        """Queue our close frame (or the reply to the peer's) and stop reading."""
        if self._state is not WsState.OPEN:
            return
        self._state = WsState.CLOSING
        self._close_code = int(code)
        self._close_reason = reason
        if self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self._send_control(
                self._ws.send(CloseConnection(code=code, reason=reason or None)),
                droppable=False,
            )
        self._writer.finish()  # what is pending goes out, then the write side is shut
        self._wake_all()

    def _mark_broken(self) -> None:
        """The peer reset or vanished: no more I/O except closing the socket."""
        if self._state is WsState.CLOSED:
            return
        self._state = WsState.CLOSED
        if self._close_code is None:
            self._close_code = CloseCode.ABNORMAL
        self._writer.drop()
        self._wake_all()

    def _wake_all(self) -> None:
        if self._progress_lot is not None:
            self._progress_lot.unpark_all()
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def _finish(self) -> None:
        """After `_begin_close`: wait for the close frame to go out, read until
        EOF, close the socket. Bounded by `close_timeout_s`."""
        try:
            with trio.move_on_after(self._limits.close_timeout_s):
                await self._writer.wait_finished()
                if self._state is WsState.CLOSING:
                    await self._acquire_reading()
                    try:
                        await self._read_until_peer_closed()
                    finally:
                        self._release_reading()
        finally:
            self._close_socket()

    async def _read_until_peer_closed(self) -> None:
        """Drop input until the peer's close frame (or EOF) has been read.

        After both close frames nothing more may arrive, so the socket can be
        closed without a reset. If the peer breaks the protocol while we close,
        fall back to reading until EOF.
        """
        ws = self._ws
        parsing = True
        while not self._both_close_frames_seen():
            data = await recv_some(self._sock, self._limits.receive_chunk_bytes)
            if not data:
                return
            if parsing:
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, CloseConnection) and not self._both_close_frames_seen():
                        parsing = False  # a protocol error, not the peer's close frame

    def _both_close_frames_seen(self) -> bool:
        return self._ws.state is ConnectionState.CLOSED

    def _close_socket(self) -> None:
        close_socket(self._sock)
        if self._close_code is None:
            self._close_code = CloseCode.ABNORMAL
        self._state = WsState.CLOSED
        self._writer.drop()
        self._wake_all()

    async def _run(self, handler: Handler) -> None:
        """Run `handler`, then finish the close (server use)."""
        code, reason = CloseCode.GOING_AWAY, "going away"
        self._group.watch(self)
        try:
            await handler(self, self.request)
            code, reason = CloseCode.NORMAL, ""
        except Exception:
            _log.exception("ws_handler_failed", peer=self.request.peer)
            code, reason = CloseCode.INTERNAL_ERROR, "internal error"
        finally:
            self._group.forget(self)
            with trio.move_on_after(self._limits.close_timeout_s, shield=True):
                self._begin_close(code, reason)
                await self._finish()
            self._close_socket()
