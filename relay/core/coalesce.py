"""Per-subscription coalescing window (`coalesce_ms`).

The first event for a key (event_type, entity_type, entity_id) opens a window
of `window_s`; events for that key arriving before the window closes collapse
into the newest one, counted. When the window closes the newest row is
delivered with `count` = how many events it stands for. The window is not
extended by later events, so no event waits longer than `window_s`.

Events that come due together are ordered by the id of their newest row.

Cursors: a collapsed event is delivered later than some other events of the
same org, so it cannot simply carry its own cursor (a client resuming from it
would skip events still held here). Each delivered event carries the oldest
cursor among itself, the events delivered after it in the same flush, and
everything still held. Cursors are compared by arrival order, which the tail
guarantees is cursor order. Resuming from any delivered cursor therefore
repeats at worst, and never skips.

Bounded: at most `max_keys` keys are held; `add` for a new key when full
flushes everything held first and returns it for immediate delivery.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.core.protocol import EventRow

__all__ = ["MAX_COALESCE_KEYS", "CoalescedEvent", "Coalescer", "EventKey", "event_key"]

MAX_COALESCE_KEYS = 1024
"""Default bound on distinct keys one coalescer holds."""

EventKey = tuple[str, str, str]


def event_key(row: EventRow) -> EventKey:
    """The coalescing key of a row: (event_type, entity_type, entity_id)."""
    return (row.event_type, row.entity_type, row.entity_id)


@dataclass(frozen=True, slots=True)
class CoalescedEvent:
    """One event to deliver, standing for `count` events of the same key."""

    row: EventRow
    """The newest row of the key."""
    cursor: str
    """Cursor to put in the frame (see the module docstring)."""
    count: int
    """Number of events collapsed into this one (>= 1)."""


class _Entry:
    __slots__ = ("count", "cursor", "deadline", "row", "seq")

    def __init__(self, row: EventRow, cursor: str, seq: int, deadline: float) -> None:
        self.row = row
        self.cursor = cursor
        self.seq = seq
        self.deadline = deadline
        self.count = 1


class Coalescer:
    """Holds events of one subscription for up to `window_s` seconds."""

    __slots__ = ("_entries", "_max_keys", "_seq", "window_s")

    def __init__(self, window_s: float, *, max_keys: int = MAX_COALESCE_KEYS) -> None:
        if window_s <= 0 or max_keys < 1:
            raise ValueError("window_s must be > 0 and max_keys >= 1")
        self.window_s = window_s
        self._max_keys = max_keys
        self._entries: dict[EventKey, _Entry] = {}
        self._seq = 0

    def __len__(self) -> int:
        """Number of keys held."""
        return len(self._entries)

    def add(self, row: EventRow, cursor: str, now: float) -> list[CoalescedEvent]:
        """Take one event. Returns events to deliver now (only when full)."""
        self._seq += 1
        key = event_key(row)
        entry = self._entries.get(key)
        if entry is not None:
            entry.row = row
            entry.cursor = cursor
            entry.seq = self._seq
            entry.count += 1
            return []
        flushed = self._flush(len(self._entries)) if len(self._entries) >= self._max_keys else []
        self._entries[key] = _Entry(row, cursor, self._seq, now + self.window_s)
        return flushed

    def next_deadline(self) -> float | None:
        """When the next window closes, or None when nothing is held."""
        # Insertion order is deadline order (one window length for all keys).
        for entry in self._entries.values():
            return entry.deadline
        return None

    def due(self, now: float) -> list[CoalescedEvent]:
        """Events whose window has closed at `now`, ordered by newest row id."""
        count = 0
        for entry in self._entries.values():
            if entry.deadline > now:
                break
            count += 1
        return self._flush(count) if count else []

    def drain(self) -> list[CoalescedEvent]:
        """Everything held, as if every window had closed."""
        return self._flush(len(self._entries))

    def _flush(self, count: int) -> list[CoalescedEvent]:
        keys = list(self._entries)[:count]
        flushed = sorted((self._entries.pop(k) for k in keys), key=lambda e: e.row.id)
        # Oldest cursor among what stays held, then a suffix minimum.
        oldest: _Entry | None = min(self._entries.values(), key=lambda e: e.seq, default=None)
        out: list[CoalescedEvent] = []
        for entry in reversed(flushed):
            if oldest is None or entry.seq < oldest.seq:
                oldest = entry
            out.append(CoalescedEvent(entry.row, oldest.cursor, entry.count))
        out.reverse()
        return out
