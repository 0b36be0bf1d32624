"""The write half of a non-blocking socket, shared by the WebSocket connection
and the event-stream (SSE) connection.

`send` never awaits: with nothing waiting it makes one non-blocking `send()`;
whatever the kernel did not take waits in a bounded buffer, and a writer task
(the only task that waits for writability) sends everything waiting in one
`send()` when the socket drains. The writer exists only while bytes wait or a
finish is under way: an idle connection has no writer task. While bytes wait,
data that would push them over `max_unsent_bytes` is refused
(`SendResult.OVERFLOW`), so the caller decides what to do with a slow peer;
with nothing waiting, any one write is taken (so at most one write past the
bound ever waits, and a refusal always leaves a drain callback to come). After each send that leaves
at most `drain_low_water_bytes` waiting, the drain callback runs (in the writer
task), so the owner can move more from its own queue.

`finish` stops taking data: what waits goes out, then the write side is shut
(FIN). A reset peer marks the writer broken (`on_broken` tells the owner);
nothing ever raises into the caller.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from enum import Enum

import trio
import trio.lowlevel

from relay.ws.sockets import SEND_FLAGS

__all__ = ["SendResult", "SocketWriter"]


class SendResult(Enum):
    """What `send` did with the data."""

    SENT = "sent"
    """The kernel took every byte."""
    QUEUED = "queued"
    """Accepted; some bytes wait for the writer task."""
    OVERFLOW = "overflow"
    """Refused, nothing sent: waiting bytes would exceed `max_unsent_bytes`."""
    CLOSED = "closed"
    """Refused: the writer is finishing, finished or broken."""

    @property
    def accepted(self) -> bool:
        """True when the data will reach the kernel (SENT or QUEUED)."""
        return self is SendResult.SENT or self is SendResult.QUEUED


class SocketWriter:
    """Non-blocking, bounded writes to one socket (see the module docstring)."""

    __slots__ = (
        "_finishing",
        "_lot",
        "_nursery",
        "_pending",
        "_sock",
        "_writing",
        "broken",
        "drain_low_water_bytes",
        "max_unsent_bytes",
        "on_broken",
        "on_drain",
        "write_shut",
    )

    def __init__(
        self,
        sock: socket.socket,
        nursery: trio.Nursery,
        *,
        max_unsent_bytes: int,
        drain_low_water_bytes: int,
    ) -> None:
        """`nursery` is where the writer task is spawned when needed; it must
        outlive the writer."""
        self._sock = sock
        self._nursery = nursery
        self.max_unsent_bytes = max_unsent_bytes
        self.drain_low_water_bytes = drain_low_water_bytes
        self._pending = bytearray()
        self._writing = False
        self._finishing = False
        self._lot: trio.lowlevel.ParkingLot | None = None
        self.write_shut = False
        """Everything went out and the write side was shut (after `finish`)."""
        self.broken = False
        """The peer reset or vanished: nothing more is written."""
        self.on_drain: Callable[[], None] | None = None
        """Called after a send leaves at most `drain_low_water_bytes` waiting."""
        self.on_broken: Callable[[], None] | None = None
        """Called once when the peer turns out to be gone."""

    @property
    def unsent_bytes(self) -> int:
        """Bytes accepted but not yet taken by the kernel. While above 0, the
        writer task runs and calls `on_drain` once at most the low-water mark
        is left."""
        return len(self._pending)

    def send(self, data: bytes) -> SendResult:
        """Offer `data`; never awaits, never raises for a broken peer."""
        if self._finishing or self.broken:
            return SendResult.CLOSED
        pending = self._pending
        # Nothing waiting: any one write is taken (a caller sizes its writes by the
        # bound, but framing added after, as an event stream's, may pass it).
        if pending and len(pending) + len(data) > self.max_unsent_bytes:
            return SendResult.OVERFLOW
        if pending:
            pending += data
            return SendResult.QUEUED
        return self._send_now(data)

    def send_control(self, data: bytes, *, droppable: bool) -> None:
        """Queue a few bytes behind what waits, even while finishing (a protocol's
        control frame). They may exceed `max_unsent_bytes`, except droppable ones
        (answers a peer could make us pile up without reading)."""
        if self.broken or self.write_shut:
            return
        if not self._pending:
            self._send_now(data)
        elif not droppable or len(self._pending) + len(data) <= self.max_unsent_bytes:
            self._pending += data

    def finish(self) -> None:
        """Take no more data; send what waits, then shut the write side (FIN)."""
        if self._finishing or self.broken:
            return
        self._finishing = True
        self._start_writer()

    def drop(self) -> None:
        """Forget what waits and write nothing more (the socket is being closed)."""
        self._pending = bytearray()
        self.broken = True
        self._wake()

    async def wait_unsent_at_most(self, max_bytes: int) -> None:
        """Return once at most `max_bytes` wait, or nothing more can be written."""
        await trio.lowlevel.checkpoint()
        while not (self.broken or self.write_shut) and len(self._pending) > max_bytes:
            await self._parking_lot().park()

    async def wait_finished(self) -> None:
        """Return once `finish` completed (FIN sent) or the peer is gone."""
        await trio.lowlevel.checkpoint()
        while not (self.broken or self.write_shut):
            await self._parking_lot().park()

    # -- internals ------------------------------------------------------------------
    def _send_now(self, data: bytes) -> SendResult:
        try:
            sent = self._sock.send(data, SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._mark_broken()
            return SendResult.CLOSED
        if sent == len(data):
            return SendResult.SENT
        self._pending = bytearray(memoryview(data)[sent:])
        self._start_writer()
        return SendResult.QUEUED

    def _flush(self) -> None:
        """One send() of everything waiting (called once the socket is writable)."""
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
        self._wake()
        if (
            self.on_drain is not None
            and not self._finishing
            and len(self._pending) <= self.drain_low_water_bytes
        ):
            self.on_drain()

    def _start_writer(self) -> None:
        if not self._writing and not self.broken:
            self._writing = True
            self._nursery.start_soon(self._run_writer)

    async def _run_writer(self) -> None:
        """The only task that waits for writability; one at most per socket.

        Shielded: when its connection is cancelled, a closing message must still
        go out; the connection's own task always closes the socket (bounded),
        which ends it."""
        try:
            with trio.CancelScope(shield=True):
                while not self.broken:
                    if self._pending:
                        await trio.lowlevel.wait_writable(self._sock)
                        self._flush()
                    else:
                        if self._finishing and not self.write_shut:
                            self._shutdown_write()
                        return
        except trio.ClosedResourceError:
            pass  # closed under us by the teardown: nothing more to write
        finally:
            self._writing = False

    def _shutdown_write(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._mark_broken()
            return
        self.write_shut = True
        self._wake()

    def _mark_broken(self) -> None:
        if self.broken:
            return
        self.broken = True
        self._pending = bytearray()
        self._wake()
        if self.on_broken is not None:
            self.on_broken()

    def _parking_lot(self) -> trio.lowlevel.ParkingLot:
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        return self._lot

    def _wake(self) -> None:
        if self._lot is not None:
            self._lot.unpark_all()
