"""What one connection is about to send: the transport's direct path, and a
bounded outbox for when the socket falls behind.

`Output` is the only way frames leave a session. With nothing queued, a frame
goes straight to the `Transport` (the WebSocket connection: one non-blocking
`send()`, leftover bytes kept by the transport up to its own bound). Once the
transport refuses a frame (its bound would be exceeded), frames queue in the
`Outbox`, and `Output.drained` (called by the transport each time it has sent
most of its unsent bytes) moves them on, several frames per `send()`.

**The drain invariant**, kept in `Output.drained` and nowhere else: *the outbox
is not empty => the transport holds unsent bytes*, so the transport will call
`drained` again. `drained` moves frames until the outbox is empty or the
transport keeps some bytes unsent; it never leaves frames queued behind an
idle transport (which would stall the connection forever).

The outbox never grows past its bounds (frames and bytes). When a push would,
it, in order:

1. coalesces: pending events of the same org and key (event_type,
   entity_type, entity_id) collapse into the newest one, re-encoded with the
   summed `coalesced` count, at the newest one's (later) position, so frames
   of one org stay in cursor order;
2. collapses: the org with the most pending event bytes loses all its
   pending events to a single `resync` (reason overflow) appended at the end,
   carrying the newest cursor queued for that org; repeated while needed;
   later events of that org are absorbed into the queued resync (its cursor
   moves forward) until it is sent;
3. gives up: returns HOPELESS when even that is not enough (control frames
   alone fill it), or when overflows repeat (`max_overflows` within
   `overflow_window_s`). The session closes with 4008.

A client that stops reading is found by the stall deadline: frames waiting
with no progress for `max_stall_s` (progress: the transport drained, or a send
found nothing waiting). Overflow is always a returned value; the caller
decides (centrifuge's DisconnectSlow).
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from relay.core.coalesce import EventKey, event_key
from relay.core.codes import ResyncReason
from relay.core.protocol import EventRow, encode_event, encode_resync
from relay.core.stats import Stats

__all__ = ["Outbox", "OutboxLimits", "Output", "OutputLimits", "PushResult", "Transport"]

MAX_FRAME_BYTES = 16 * 1024
"""Upper bound of one server frame: the SQL CHECKs bound every field (2 KB
payload, 256-character ids, escaped to ASCII at most 12 bytes per character)
and a cursor is at most 4 KiB."""


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """Bounds of one connection's outbox."""

    max_frames: int = 1024
    """Most frames held."""
    max_bytes: int = 512 * 1024
    """Most bytes held."""
    max_overflows: int = 3
    """Overflows (resync collapses) tolerated within `overflow_window_s`."""
    overflow_window_s: float = 30.0
    """Window for counting overflows."""

    def __post_init__(self) -> None:
        if self.max_frames < 1 or self.max_bytes < 1:
            raise ValueError("an outbox must hold at least one frame")


class PushResult(StrEnum):
    """What a push did; only HOPELESS asks the caller to act (close 4008)."""

    QUEUED = "queued"
    COALESCED = "coalesced"
    RESYNCED = "resynced"
    HOPELESS = "hopeless"


class _Entry:
    __slots__ = ("count", "cursor", "frame", "org", "reason", "row")

    def __init__(
        self,
        frame: bytes,
        org: uuid.UUID | None = None,
        row: EventRow | None = None,
        cursor: str = "",
        count: int = 1,
    ) -> None:
        self.frame = frame
        self.org = org
        self.row = row
        self.reason: ResyncReason | None = None
        self.cursor = cursor
        self.count = count


def _as_is(message: bytes) -> bytes:
    return message


class Outbox:
    """Frames waiting for one slow connection."""

    __slots__ = ("_bytes", "_entries", "_overflows", "_resyncs", "_wrap", "limits")

    def __init__(
        self, limits: OutboxLimits | None = None, *, wrap: Callable[[bytes], bytes] = _as_is
    ) -> None:
        """`wrap` turns an encoded message into the bytes that are queued (the shell
        passes its WebSocket frame encoder, since it queues whole frames); the
        outbox applies it to the frames it builds itself (coalesced events, resync)."""
        self.limits = limits or OutboxLimits()
        self._wrap = wrap
        self._entries: deque[_Entry] = deque()
        self._bytes = 0
        self._overflows: deque[float] = deque()
        self._resyncs: dict[uuid.UUID, _Entry] = {}

    def __len__(self) -> int:
        """Frames pending."""
        return len(self._entries)

    @property
    def pending_bytes(self) -> int:
        """Bytes pending."""
        return self._bytes

    def push_frame(self, frame: bytes, now: float) -> PushResult:
        """Queue a control frame (never coalesced or dropped while the connection lives)."""
        return self._push(_Entry(frame), now)

    def push_event(
        self, row: EventRow, cursor: str, frame: bytes, now: float, *, coalesced: int = 1
    ) -> PushResult:
        """Queue an event frame; `frame` is `wrap(encode_event(row, cursor, coalesced))`.

        While a `resync` for the org is still queued, the event is absorbed into it:
        the client will refetch everything after receiving the resync, which is
        after this event committed, so only the resync's cursor moves forward."""
        pending_resync = self._resyncs.get(row.org)
        if pending_resync is not None:
            self._absorb(pending_resync, cursor)
            return PushResult.COALESCED
        return self._push(_Entry(frame, row.org, row, cursor, coalesced), now)

    def _absorb(self, resync: _Entry, cursor: str) -> None:
        assert resync.org is not None and resync.reason is not None
        frame = self._wrap(encode_resync(resync.org, resync.reason, cursor))
        self._bytes += len(frame) - len(resync.frame)
        resync.frame = frame
        resync.cursor = cursor

    def pop_ready(self, max_bytes: int, *, at_least_one: bool = False) -> tuple[list[bytes], int]:
        """Frames to send in one write, in order, together at most `max_bytes`
        (or the first one alone, with `at_least_one`), and how many are events."""
        out: list[bytes] = []
        total = 0
        events = 0
        entries = self._entries
        while entries and (
            total + len(entries[0].frame) <= max_bytes or (at_least_one and not out)
        ):
            entry = entries.popleft()
            total += len(entry.frame)
            out.append(entry.frame)
            if entry.row is not None:
                events += 1
            elif entry.org is not None and self._resyncs.get(entry.org) is entry:
                del self._resyncs[entry.org]
        self._bytes -= total
        return out, events

    def _over(self, extra: _Entry | None = None) -> bool:
        frames = len(self._entries) + (extra is not None)
        size = self._bytes + (len(extra.frame) if extra is not None else 0)
        return frames > self.limits.max_frames or size > self.limits.max_bytes

    def _push(self, entry: _Entry, now: float) -> PushResult:
        if not self._over(entry):
            self._append(entry)
            return PushResult.QUEUED
        self._append(entry)
        self._coalesce()
        if not self._over():
            return PushResult.COALESCED
        before_collapse = (list(self._entries), dict(self._resyncs))
        while self._over():
            org = self._heaviest_org()
            if org is None:
                # Collapsing turns events into resyncs but cannot shrink control
                # frames: undo it, and take back the frame that did not fit, so the
                # bound holds. The caller closes the connection.
                entries, resyncs = before_collapse
                self._rebuild([e for e in entries if e is not entry])
                self._resyncs = {o: e for o, e in resyncs.items() if e in self._entries}
                return PushResult.HOPELESS
            self._collapse(org)
        self._overflows.append(now)
        while self._overflows and self._overflows[0] <= now - self.limits.overflow_window_s:
            self._overflows.popleft()
        if len(self._overflows) > self.limits.max_overflows:
            return PushResult.HOPELESS
        return PushResult.RESYNCED

    def _append(self, entry: _Entry) -> None:
        self._entries.append(entry)
        self._bytes += len(entry.frame)

    def _rebuild(self, entries: list[_Entry]) -> None:
        self._entries = deque(entries)
        self._bytes = sum(len(e.frame) for e in entries)

    def _coalesce(self) -> None:
        newest: dict[tuple[uuid.UUID, EventKey], _Entry] = {}
        counts: dict[tuple[uuid.UUID, EventKey], int] = {}
        for entry in self._entries:
            if entry.row is not None and entry.org is not None:
                key = (entry.org, event_key(entry.row))
                newest[key] = entry
                counts[key] = counts.get(key, 0) + entry.count
        if len(newest) == sum(1 for e in self._entries if e.row is not None):
            return
        kept: list[_Entry] = []
        for entry in self._entries:
            if entry.row is None or entry.org is None:
                kept.append(entry)
                continue
            key = (entry.org, event_key(entry.row))
            if newest[key] is not entry:
                continue
            if counts[key] != entry.count:
                entry.count = counts[key]
                entry.frame = self._wrap(encode_event(entry.row, entry.cursor, entry.count))
            kept.append(entry)
        self._rebuild(kept)

    def _heaviest_org(self) -> uuid.UUID | None:
        weights: dict[uuid.UUID, int] = {}
        for entry in self._entries:
            if entry.row is not None and entry.org is not None:
                weights[entry.org] = weights.get(entry.org, 0) + len(entry.frame)
        return max(weights, key=weights.__getitem__, default=None)

    def _collapse(self, org: uuid.UUID) -> None:
        cursor = ""
        for entry in self._entries:
            if entry.org == org and entry.row is not None:
                cursor = entry.cursor
        self._drop_org_events(org)
        self._append(self._resync_entry(org, ResyncReason.OVERFLOW, cursor))

    def _drop_org_events(self, org: uuid.UUID) -> None:
        previous = self._resyncs.pop(org, None)
        if previous is None and not any(e.org == org for e in self._entries):
            return
        self._rebuild(
            [e for e in self._entries if e.org != org or (e.row is None and e is not previous)]
        )

    def _resync_entry(self, org: uuid.UUID, reason: ResyncReason, cursor: str) -> _Entry:
        entry = _Entry(self._wrap(encode_resync(org, reason, cursor)), org, cursor=cursor)
        entry.reason = reason
        self._resyncs[org] = entry
        return entry


# -- the output: direct path, outbox, drain ------------------------------------------


class Transport(Protocol):
    """The byte sink under an `Output`: the WebSocket connection in the shell,
    a scripted fake in tests."""

    @property
    def unsent_bytes(self) -> int:
        """Bytes accepted but not yet taken by the kernel. While it is above 0,
        the transport calls `Output.drained` again once it has sent most of them."""
        ...

    def send_nowait(self, data: bytes) -> bool:
        """Take `data` whole without blocking (send now, or keep it behind the
        unsent bytes) and return True, or refuse it whole (it would exceed the
        transport's bound) and return False. A closed transport takes and drops."""
        ...


@dataclass(frozen=True, slots=True)
class OutputLimits:
    """Bounds of one connection's output."""

    transport_bytes: int = 64 * 1024
    """The transport's bound on unsent bytes (`WsLimits.max_unsent_bytes`); at
    least MAX_FRAME_BYTES in production, so that any frame fits."""
    room_bytes: int = 32 * 1024
    """Catch-up frames go out only while less than this is waiting to be sent
    (the low-water mark that paces a replay by the client's socket)."""
    max_stall_s: float = 30.0
    """Frames waiting this long with no progress: the client stopped reading."""
    outbox: OutboxLimits = field(default_factory=OutboxLimits)
    """Bounds of the outbox behind the transport."""

    def __post_init__(self) -> None:
        # A frame larger than the transport's bound could never be sent: the shell's
        # bound (64 KiB) is far above MAX_FRAME_BYTES; tests use small ones.
        if self.transport_bytes < 1 or self.room_bytes < 1 or not self.max_stall_s > 0:
            raise ValueError("output limits must be positive")


class Output:
    """Everything one connection is about to send (see the module docstring).

    Every method that queues returns False when the client is hopeless: the
    caller closes with 4008."""

    __slots__ = (
        "_corked",
        "_outbox",
        "_progress_at",
        "_wrap",
        "limits",
        "shared_frames",
        "stats",
        "transport",
    )

    def __init__(
        self,
        transport: Transport,
        limits: OutputLimits | None = None,
        *,
        stats: Stats | None = None,
        wrap: Callable[[bytes], bytes] = _as_is,
        shared_frames: bool = True,
    ) -> None:
        """`wrap` turns an encoded message into the bytes that are sent (the shell
        passes its WebSocket frame encoder). `shared_frames`: whether the frame the
        fan-out encoded once for every recipient fits this transport (WebSocket);
        if not (an event stream), each event is wrapped here."""
        self.transport = transport
        self.limits = limits or OutputLimits()
        self.stats = stats or Stats()
        self._wrap = wrap
        self.shared_frames = shared_frames
        self._outbox: Outbox | None = None
        """Created when the transport first refuses a frame, then kept (it
        remembers recent overflows)."""
        self._progress_at = 0.0
        self._corked: list[tuple[EventRow, str, bytes]] | None = None
        """Events held by `cork` until `uncork` (None: not corked)."""

    def wrap(self, message: bytes) -> bytes:
        """The bytes that carry `message` on the transport (a WebSocket frame)."""
        return self._wrap(message)

    @property
    def backlog_bytes(self) -> int:
        """Bytes waiting to be sent: the transport's unsent bytes and the outbox."""
        outbox = self._outbox
        return self.transport.unsent_bytes + (outbox.pending_bytes if outbox else 0)

    def has_room(self) -> bool:
        """Whether a catch-up may send more now (the backlog is under `room_bytes`)."""
        return self.backlog_bytes < self.limits.room_bytes

    def stall_deadline(self) -> float | None:
        """When a client that makes no progress is cut off (None: nothing waits)."""
        if not self.backlog_bytes:
            return None
        return self._progress_at + self.limits.max_stall_s

    def stalled(self, now: float) -> bool:
        """Whether frames have waited `max_stall_s` with no progress: close with 4008."""
        deadline = self.stall_deadline()
        return deadline is not None and now >= deadline

    def cork(self) -> None:
        """Hold events until `uncork`, so that what one tail page brings a
        connection goes out in one write (several frames, one `send()`)."""
        if self._corked is None:
            self._corked = []

    def uncork(self, now: float) -> bool:
        """Send what `cork` held, in one write when the transport takes it."""
        corked, self._corked = self._corked, None
        return self._events(corked, now) if corked else True

    def control(self, message: bytes, now: float) -> bool:
        """Send a control message (never coalesced or dropped while the connection lives)."""
        if self._corked:
            self.uncork(now)
        frame = self._wrap(message)
        outbox = self._outbox
        if not outbox:
            self._sending(now)
            if self.transport.send_nowait(frame):
                return True
            outbox = self._queue()
        return self._pushed(outbox.push_frame(frame, now), now)

    def event(self, row: EventRow, cursor: str, frame: bytes, now: float) -> bool:
        """Send one event; `frame` is the shared WebSocket frame of
        `encode_event(row, cursor)`, encoded once for every recipient."""
        if not self.shared_frames:
            frame = self._wrap(encode_event(row, cursor))
        corked = self._corked
        if corked is not None:
            corked.append((row, cursor, frame))
            return True
        outbox = self._outbox
        if not outbox:
            self._sending(now)
            if self.transport.send_nowait(frame):
                self.stats.events_sent += 1
                return True
            outbox = self._queue()
        return self._pushed(outbox.push_event(row, cursor, frame, now), now)

    def coalesced_event(self, row: EventRow, cursor: str, count: int, now: float) -> bool:
        """Send an event that stands for `count` events of its key."""
        if self._corked:
            self.uncork(now)
        frame = self._wrap(encode_event(row, cursor, count))
        outbox = self._outbox
        if not outbox:
            self._sending(now)
            if self.transport.send_nowait(frame):
                self.stats.events_sent += 1
                return True
            outbox = self._queue()
        return self._pushed(outbox.push_event(row, cursor, frame, now, coalesced=count), now)

    def replayed(self, batch: list[tuple[EventRow, str, bytes]], now: float) -> bool:
        """Send a batch of catch-up events (row, cursor, frame) in one write. The
        caller paces catch-ups by `has_room`, so a batch fits what the transport
        takes; if it ever does not, the events queue like live ones."""
        if self._corked:
            self.uncork(now)
        self.stats.catch_up_events += len(batch)
        return self._events(batch, now)

    def _events(self, batch: list[tuple[EventRow, str, bytes]], now: float) -> bool:
        """Events (row, cursor, frame): as few writes as the transport's bound
        allows (frames together up to what it may hold), the rest queued like
        live ones."""
        outbox = self._outbox
        sent = 0
        if not outbox:
            self._sending(now)
            transport = self.transport
            limit = self.limits.transport_bytes
            while sent < len(batch):
                unsent = transport.unsent_bytes
                room = limit - unsent
                end, size = sent, 0
                while end < len(batch) and (
                    size + len(batch[end][2]) <= room or (end == sent and not unsent)
                ):
                    size += len(batch[end][2])
                    end += 1
                if end == sent:
                    break
                data = (
                    batch[sent][2]
                    if end == sent + 1
                    else b"".join(f for _, _, f in batch[sent:end])
                )
                if not transport.send_nowait(data):
                    break
                self.stats.events_sent += end - sent
                sent = end
            if sent == len(batch):
                return True
            outbox = self._queue()
        ok = True
        for row, cursor, frame in batch[sent:]:
            ok = self._pushed(outbox.push_event(row, cursor, frame, now), now) and ok
        return ok

    def drained(self, now: float) -> None:
        """The transport sent most of its unsent bytes: move queued frames on.

        Keeps the drain invariant (module docstring): on return, the outbox is
        empty or the transport holds unsent bytes, so it calls this again."""
        if self._corked:
            self.uncork(now)
        self._progress_at = now
        outbox = self._outbox
        transport = self.transport
        while outbox:
            unsent = transport.unsent_bytes
            frames, events = outbox.pop_ready(
                self.limits.transport_bytes - unsent, at_least_one=not unsent
            )
            if not frames:
                break  # the next frame needs more room: unsent > 0, a drain follows
            if not transport.send_nowait(b"".join(frames)):
                raise RuntimeError("the transport refused a batch that fits its bound")
            self.stats.events_sent += events
            if transport.unsent_bytes:
                break
        assert not outbox or transport.unsent_bytes, "the drain invariant"

    def _sending(self, now: float) -> None:
        """A send with nothing waiting starts the stall clock afresh."""
        if not self.transport.unsent_bytes:
            self._progress_at = now

    def _queue(self) -> Outbox:
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = Outbox(self.limits.outbox, wrap=self._wrap)
        return outbox

    def _pushed(self, result: PushResult, now: float) -> bool:
        if result is PushResult.RESYNCED:
            self.stats.outbox_overflows += 1
            self.stats.resyncs[ResyncReason.OVERFLOW] += 1
        elif result is PushResult.HOPELESS:
            return False
        return not self.stalled(now)
