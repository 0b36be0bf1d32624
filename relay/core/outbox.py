"""Bounded per-connection outbox, used only while a client's socket is behind.

The shell tries one non-blocking send per frame; when bytes are left over it
queues further frames here and the connection's writer task drains them with
`pop_ready`. Pushing never grows the outbox past its bounds (frames and
bytes). When a push would, the outbox, in order:

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
   `overflow_window_s`). The caller closes with 4008 and drops the frame.

`stalled(now)` tells the caller the client stopped reading: frames pending
and no progress for `max_stall_s`. Progress is a pop (the writer pops only
after its previous write went out) or a push into an empty outbox.

Overflow is always a returned value; the caller decides (centrifuge's
DisconnectSlow).
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from relay.core.coalesce import EventKey, event_key
from relay.core.cursor import ResyncReason
from relay.core.protocol import EventRow, encode_event, encode_resync

__all__ = ["Outbox", "OutboxLimits", "PushResult"]


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
    max_stall_s: float = 30.0
    """How long frames may wait with no progress before the client is hopeless."""


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

    __slots__ = (
        "_bytes",
        "_entries",
        "_overflows",
        "_progress_at",
        "_resyncs",
        "_wrap",
        "limits",
        "resynced_orgs",
    )

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
        self._progress_at = 0.0
        self._resyncs: dict[uuid.UUID, _Entry] = {}
        self.resynced_orgs = 0
        """Total org collapses into resync (for metrics)."""

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
            if self.stalled(now):
                return PushResult.HOPELESS
            self._absorb(pending_resync, cursor)
            return PushResult.COALESCED
        return self._push(_Entry(frame, row.org, row, cursor, coalesced), now)

    def _absorb(self, resync: _Entry, cursor: str) -> None:
        assert resync.org is not None and resync.reason is not None
        frame = self._wrap(encode_resync(resync.org, resync.reason, cursor))
        self._bytes += len(frame) - len(resync.frame)
        resync.frame = frame
        resync.cursor = cursor

    def push_resync(
        self, org: uuid.UUID, reason: ResyncReason, cursor: str, now: float
    ) -> PushResult:
        """Queue a `resync`, dropping the org's pending events (they are superseded)."""
        self._drop_org_events(org)
        return self._push(self._resync_entry(org, reason, cursor), now)

    def pop_ready(self, max_bytes: int, now: float) -> list[bytes]:
        """Frames to send in one write: at least one if any, then up to `max_bytes`."""
        self._progress_at = now
        out: list[bytes] = []
        total = 0
        entries = self._entries
        while entries and (not out or total + len(entries[0].frame) <= max_bytes):
            entry = entries.popleft()
            total += len(entry.frame)
            out.append(entry.frame)
            if entry.org is not None and self._resyncs.get(entry.org) is entry:
                del self._resyncs[entry.org]
        self._bytes -= total
        return out

    def stalled(self, now: float) -> bool:
        """Whether frames have waited `max_stall_s` with no progress: close with 4008."""
        return bool(self._entries) and now - self._progress_at >= self.limits.max_stall_s

    def _over(self, extra: _Entry | None = None) -> bool:
        frames = len(self._entries) + (extra is not None)
        size = self._bytes + (len(extra.frame) if extra is not None else 0)
        return frames > self.limits.max_frames or size > self.limits.max_bytes

    def _push(self, entry: _Entry, now: float) -> PushResult:
        if not self._entries:
            self._progress_at = now
        if not self._over(entry):
            self._append(entry)
            return PushResult.QUEUED
        if self.stalled(now):
            return PushResult.HOPELESS
        self._append(entry)
        self._coalesce()
        if not self._over():
            return PushResult.COALESCED
        before_collapse = (list(self._entries), dict(self._resyncs))
        collapsed = 0
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
            collapsed += 1
        self.resynced_orgs += collapsed
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
