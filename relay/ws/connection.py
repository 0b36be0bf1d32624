"""One server-side WebSocket connection: a trio shell over wsproto's frame protocol.

Writing. Server frames are encoded once by the caller (`encode_text_frame`)
and offered with `send_frame_nowait`, which never awaits: with nothing
pending it makes one non-blocking `send()`; whatever the kernel did not take
goes to a bounded pending buffer, and the connection's writer task (the only
task that waits for writability) sends everything pending in one `send()`
when the socket drains. A frame that would push the pending bytes over
`max_pending_bytes` is refused (`SendResult.OVERFLOW`), so the caller decides
what to do with a slow client. A reset peer marks the connection closed;
nothing ever raises into the caller.

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

Tasks. The server runs each connection in one task (the handler runs in it)
plus the writer task, which also runs the heartbeat: a ping every
`ping_interval_s`, close 1011 when the pong is `pong_timeout_s` late.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any, Final

import structlog
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage

from relay.ws.frames import CloseCode, encode_binary_frame, encode_text_frame
from relay.ws.handshake import WsRequest
from relay.ws.limits import WsLimits
from relay.ws.sockets import SEND_FLAGS, close_socket, recv_some

__all__ = ["Handler", "SendResult", "WsConnection", "WsState"]

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


class SendResult(Enum):
    """What `send_frame_nowait` did with a frame."""

    SENT = "sent"
    """The kernel took every byte."""
    QUEUED = "queued"
    """Accepted; some bytes wait in the pending buffer for the writer task."""
    OVERFLOW = "overflow"
    """Refused, nothing sent: pending bytes would exceed `max_pending_bytes`."""
    CLOSED = "closed"
    """Refused: the connection is closing or closed."""

    @property
    def accepted(self) -> bool:
        """True when the frame will reach the kernel (SENT or QUEUED)."""
        return self is SendResult.SENT or self is SendResult.QUEUED


class _Step(Enum):
    NEED_DATA = "need_data"


_NEED_DATA: Final = _Step.NEED_DATA
_UNSENDABLE_CODES = frozenset({CloseCode.NO_STATUS, CloseCode.ABNORMAL, 1015})


def _check_close_code(code: int) -> None:
    if not 1000 <= code <= 4999 or code in _UNSENDABLE_CODES:
        raise ValueError(f"close code {code} cannot be sent")


class WsConnection:
    """An upgraded connection; created by `WsServer`, handed to the handler."""

    __slots__ = (
        "_close_code",
        "_close_reason",
        "_limits",
        "_message_bytes",
        "_next_ping_at",
        "_on_drain",
        "_parts",
        "_pending",
        "_ping_sent_at",
        "_progress_lot",
        "_read_lock",
        "_read_scope",
        "_sock",
        "_state",
        "_write_shut",
        "_writer_lot",
        "_ws",
        "request",
    )

    def __init__(
        self,
        sock: socket.socket,
        request: WsRequest,
        limits: WsLimits,
        trailing_data: bytes = b"",
    ) -> None:
        """Wrap an upgraded, non-blocking socket; `trailing_data` is input read
        past the upgrade request."""
        self._sock = sock
        self.request: Final = request
        """The upgrade request this connection came from."""
        self._limits = limits
        self._ws = Connection(ConnectionType.SERVER, extensions=None, trailing_data=trailing_data)
        self._state = WsState.OPEN
        self._pending = bytearray()
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._progress_lot: trio.lowlevel.ParkingLot | None = None
        self._read_lock = trio.Lock()
        self._read_scope: trio.CancelScope | None = None
        self._write_shut = False
        self._close_code: int | None = None
        self._close_reason = ""
        self._on_drain: Callable[[], None] | None = None
        self._parts: list[Any] | None = None
        self._message_bytes = 0
        self._ping_sent_at: float | None = None
        self._next_ping_at = trio.current_time() + limits.ping_interval_s

    # -- state ------------------------------------------------------------------
    @property
    def state(self) -> WsState:
        """OPEN, CLOSING or CLOSED."""
        return self._state

    @property
    def pending_bytes(self) -> int:
        """Bytes accepted but not yet taken by the kernel."""
        return len(self._pending)

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
        are queued for the writer task. With bytes pending the frame is
        appended, so queued frames go out together in one `send()`.
        """
        if self._state is not WsState.OPEN:
            return SendResult.CLOSED
        pending = self._pending
        if len(pending) + len(frame) > self._limits.max_pending_bytes:
            return SendResult.OVERFLOW
        if pending:
            pending += frame
            return SendResult.QUEUED
        return self._send_now(frame)

    async def send_message(self, message: str | bytes) -> SendResult:
        """Send a text (str) or binary (bytes) message, waiting for room.

        Returns SENT, QUEUED or CLOSED, never OVERFLOW. Raises ValueError
        when the frame could never fit in `max_pending_bytes`.
        """
        if isinstance(message, str):
            frame = encode_text_frame(message.encode("utf-8"))
        else:
            frame = encode_binary_frame(message)
        room_needed = self._limits.max_pending_bytes - len(frame)
        if room_needed < 0:
            raise ValueError("message larger than max_pending_bytes")
        await self.wait_pending_at_most(room_needed)
        return self.send_frame_nowait(frame)

    async def wait_pending_at_most(self, max_bytes: int) -> None:
        """Return once at most `max_bytes` are pending, or the connection is not open."""
        await trio.lowlevel.checkpoint()
        while self._state is WsState.OPEN and len(self._pending) > max_bytes:
            await self._progress().park()

    def set_drain_callback(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` each time the writer task's send leaves at most
        `drain_low_water_bytes` pending while open (so the owner can move more
        frames from its own outbox). It runs in the writer task; it must not
        block or raise."""
        self._on_drain = callback

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
    def _send_now(self, frame: bytes) -> SendResult:
        """One non-blocking send() while nothing is pending; queue the rest."""
        try:
            sent = self._sock.send(frame, SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._mark_broken()
            return SendResult.CLOSED
        if sent == len(frame):
            return SendResult.SENT
        self._pending = bytearray(memoryview(frame)[sent:])
        self._writer_lot.unpark_all()
        return SendResult.QUEUED

    def _send_control(self, frame: bytes, *, droppable: bool) -> None:
        """Queue a ping, pong or close frame behind pending data.

        Control frames may exceed `max_pending_bytes` by their few bytes, except
        droppable ones (pongs), which a client flooding pings without reading
        would otherwise grow without bound.
        """
        if self._state is WsState.CLOSED:
            return
        if not self._pending:
            self._send_now(frame)
        elif not droppable or (len(self._pending) + len(frame) <= self._limits.max_pending_bytes):
            self._pending += frame

    def _flush(self) -> None:
        """One send() of everything pending (called once the socket is writable)."""
        pending = self._pending
        if not pending:
            return
        try:
            sent = self._sock.send(pending, SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._mark_broken()
            return
        if sent == len(pending):
            self._pending = bytearray()  # drop the capacity, not just the bytes
        else:
            del pending[:sent]
        if self._progress_lot is not None:
            self._progress_lot.unpark_all()
        if (
            self._on_drain is not None
            and self._state is WsState.OPEN
            and len(self._pending) <= self._limits.drain_low_water_bytes
        ):
            self._on_drain()

    def _heartbeat_due(self) -> float:
        if self._state is not WsState.OPEN:
            return math.inf
        if self._ping_sent_at is None:
            return self._next_ping_at
        return self._ping_sent_at + self._limits.pong_timeout_s

    def _heartbeat(self) -> None:
        if self._ping_sent_at is not None:
            self._begin_close(CloseCode.INTERNAL_ERROR, "ping timeout")
        elif self._ws.state is ConnectionState.OPEN:
            self._ping_sent_at = trio.current_time()
            self._send_control(self._ws.send(Ping()), droppable=False)

    async def _run_writer(self, scope: trio.CancelScope) -> None:
        """The only task that waits for writability; it also runs the heartbeat.

        `scope` shields it: when the connection is cancelled, the close frame
        must still go out. It ends by itself once the write side is shut or the
        socket closed, and `_run` cancels `scope` after closing the socket.
        """
        with scope:
            try:
                while self._state is not WsState.CLOSED:
                    if self._pending:
                        with trio.move_on_at(self._heartbeat_due()):
                            await trio.lowlevel.wait_writable(self._sock)
                            self._flush()
                    elif self._state is WsState.CLOSING:
                        self._shutdown_write()
                        return
                    else:
                        with trio.move_on_at(self._heartbeat_due()):
                            await self._writer_lot.park()
                    if trio.current_time() >= self._heartbeat_due():
                        self._heartbeat()
            except trio.ClosedResourceError:
                return  # closed under us by the teardown: nothing more to write

    def _shutdown_write(self) -> None:
        """Everything including the close frame is out: send FIN."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._mark_broken()
            return
        self._write_shut = True
        if self._progress_lot is not None:
            self._progress_lot.unpark_all()

    def _progress(self) -> trio.lowlevel.ParkingLot:
        """Where tasks wait for the writer's progress (created on first use)."""
        if self._progress_lot is None:
            self._progress_lot = trio.lowlevel.ParkingLot()
        return self._progress_lot

    # -- internals: reading -------------------------------------------------------
    async def _receive(self, *, allow_binary: bool) -> str | bytes | None:
        async with self._read_lock:
            while self._state is WsState.OPEN:
                for event in self._ws.events():
                    result = self._on_event(event, allow_binary)
                    if result is not _NEED_DATA:
                        return result
                if not await self._read_some():
                    break
            return None

    async def _read_some(self) -> bool:
        """Feed the next input to wsproto; False when reading must stop."""
        sock = self._sock
        data = b""
        with trio.CancelScope() as scope:
            self._read_scope = scope
            try:
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    try:
                        data = sock.recv(self._limits.receive_chunk_bytes)
                    except (BlockingIOError, InterruptedError):
                        continue
                    break
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
        self._wake_all()

    def _mark_broken(self) -> None:
        """The peer reset or vanished: no more I/O except closing the socket."""
        if self._state is WsState.CLOSED:
            return
        self._state = WsState.CLOSED
        if self._close_code is None:
            self._close_code = CloseCode.ABNORMAL
        self._pending = bytearray()
        self._wake_all()

    def _wake_all(self) -> None:
        self._writer_lot.unpark_all()
        if self._progress_lot is not None:
            self._progress_lot.unpark_all()
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def _finish(self) -> None:
        """After `_begin_close`: wait for the close frame to go out, read until
        EOF, close the socket. Bounded by `close_timeout_s`."""
        try:
            with trio.move_on_after(self._limits.close_timeout_s):
                while self._state is WsState.CLOSING and not self._write_shut:
                    await self._progress().park()
                if self._state is WsState.CLOSING:
                    async with self._read_lock:
                        await self._read_until_peer_closed()
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
        self._pending = bytearray()
        self._wake_all()

    async def _run(self, handler: Handler) -> None:
        """Run `handler` beside the writer task, then finish the close (server use)."""
        code, reason = CloseCode.GOING_AWAY, "going away"
        writer_scope = trio.CancelScope(shield=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run_writer, writer_scope)
            try:
                await handler(self, self.request)
                code, reason = CloseCode.NORMAL, ""
            except Exception:
                _log.exception("ws_handler_failed", peer=self.request.peer)
                code, reason = CloseCode.INTERNAL_ERROR, "internal error"
            finally:
                with trio.move_on_after(self._limits.close_timeout_s, shield=True):
                    self._begin_close(code, reason)
                    await self._finish()
                self._close_socket()
                writer_scope.cancel()
