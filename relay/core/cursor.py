"""Snapshots, resume cursors and the resume decision.

A `Snapshot` is Postgres' `pg_snapshot`: a row written by transaction `xid`
is visible in it when `xid < xmax` and `xid` is not in `xip` (rows of aborted
transactions do not exist, so "visible" here means "committed before").

A resume cursor is an opaque, url-safe string naming a database epoch and a
snapshot: `"1." + base64url(varint fields)`, no padding, one canonical spelling
per value. Decoding junk returns a `BadCursor` value; it never raises.

`plan_resume` turns the cursor a client sent with `subscribe` into what the
subscription does: start live (`Fresh`), replay rows not visible in the cursor
(`Replay`), or tell the client to refresh (`Resync`).

Every rule that decides which cursor a frame carries lives here too: the live
tail's page cursors (`tail_page_cursors`), the replay cursors of a catch-up
(`CatchUp`), and the handover from catch-up to live (`handed_over`). The
coalescer's rule (a collapsed event carries the oldest cursor still owed) is
stated in `coalesce`, where the held events are.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from relay.core.codes import ResyncReason

__all__ = [
    "CURSOR_VERSION",
    "MAX_CURSOR_CHARS",
    "MAX_CURSOR_XIP",
    "MAX_EPOCH_BYTES",
    "MAX_XID",
    "TOO_FAR_BEHIND",
    "BadCursor",
    "CatchUp",
    "Cursor",
    "Fresh",
    "Replay",
    "ResumePlan",
    "Resync",
    "Snapshot",
    "StreamPosition",
    "TailPosition",
    "decode_cursor",
    "expired",
    "handed_over",
    "plan_resume",
    "seen_through",
    "tail_page_cursors",
]

MAX_XID = 2**64 - 1
"""Largest xid8 value (64-bit, never wraps)."""

CURSOR_VERSION = "1"
"""Version prefix of the cursors this module writes."""

MAX_CURSOR_CHARS = 4096
"""Longest cursor string accepted or produced."""

MAX_CURSOR_XIP = 1024
"""Most in-progress xids a cursor carries; larger snapshots are narrowed."""

MAX_EPOCH_BYTES = 255
"""Longest epoch (UTF-8 bytes) a cursor can carry."""

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A Postgres `pg_snapshot` (xid8 values). Invalid values raise ValueError."""

    xmin: int
    """Lowest xid still in progress (every xid below it has finished)."""
    xmax: int
    """First xid not yet assigned; it and everything above are invisible."""
    xip: tuple[int, ...] = ()
    """In-progress xids, strictly increasing, each in [xmin, xmax)."""

    def __post_init__(self) -> None:
        if not (0 <= self.xmin <= self.xmax <= MAX_XID):
            raise ValueError(f"snapshot needs 0 <= xmin <= xmax <= 2^64-1: {self}")
        previous = self.xmin - 1
        for xid in self.xip:
            if not (previous < xid < self.xmax):
                raise ValueError(f"snapshot xip must increase within [xmin, xmax): {self}")
            previous = xid

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        """Parse the `pg_snapshot` text form `"xmin:xmax:xip1,xip2"`."""
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"not a pg_snapshot: {text!r}")
        xip = tuple(_parse_xid(x) for x in parts[2].split(",")) if parts[2] else ()
        return cls(_parse_xid(parts[0]), _parse_xid(parts[1]), xip)

    def visible(self, xid: int) -> bool:
        """Whether a row written by committed transaction `xid` is visible."""
        return xid < self.xmax and xid not in self.xip

    def sees_all_of(self, other: Snapshot) -> bool:
        """Whether every row visible in `other` is visible in this one too
        (conservative: False in the rare equal-content cases it cannot tell)."""
        if other.xmax > self.xmax:
            return False
        if not self.xip:
            return True
        theirs = other.xip
        return all(x >= other.xmax or x in theirs for x in self.xip)

    @property
    def first_invisible(self) -> int:
        """Smallest xid not visible in this snapshot."""
        return self.xip[0] if self.xip else self.xmax

    def meet(self, other: Snapshot) -> Snapshot:
        """The snapshot that sees exactly what both see (resuming from it repeats
        what either one would, and skips nothing either one would not)."""
        xmax = min(self.xmax, other.xmax)
        xip = sorted({x for x in (*self.xip, *other.xip) if x < xmax})
        return Snapshot(xip[0] if xip else xmax, xmax, tuple(xip))

    def narrowed(self, max_xip: int) -> Snapshot:
        """An equal or more conservative snapshot with at most `max_xip` xip entries.

        It sees a subset of what this one sees (xmax drops to the first
        dropped xip), so resuming from it may repeat rows but never skips one.
        """
        if len(self.xip) <= max_xip:
            return self
        return Snapshot(self.xmin, self.xip[max_xip], self.xip[:max_xip])

    def __str__(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(map(str, self.xip))}"


def _parse_xid(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise ValueError(f"not an xid8: {text!r}")
    value = int(text)
    if value > MAX_XID:
        raise ValueError(f"xid8 out of range: {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class BadCursor:
    """A cursor string that could not be decoded."""

    message: str
    """Why, for logs (never echoed with the cursor itself)."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """A decoded resume cursor."""

    epoch: str
    """Identifies the database (e.g. system_identifier and timeline)."""
    snapshot: Snapshot
    """Rows not visible in it are the ones the client has not seen."""

    def encode(self) -> str:
        """The opaque, url-safe text form; never longer than MAX_CURSOR_CHARS.

        A snapshot with too many in-progress xids is narrowed first (see
        `Snapshot.narrowed`), which only ever costs repeated events.
        """
        epoch = self.epoch.encode("utf-8")
        if len(epoch) > MAX_EPOCH_BYTES:
            raise ValueError(f"epoch longer than {MAX_EPOCH_BYTES} bytes")
        snapshot = self.snapshot.narrowed(MAX_CURSOR_XIP)
        while True:
            text = _encode(epoch, snapshot)
            if len(text) <= MAX_CURSOR_CHARS:
                return text
            snapshot = snapshot.narrowed(len(snapshot.xip) // 2)


def _encode(epoch: bytes, snapshot: Snapshot) -> str:
    out = bytearray()
    _put_varint(out, len(epoch))
    out += epoch
    _put_varint(out, snapshot.xmin)
    _put_varint(out, snapshot.xmax - snapshot.xmin)
    _put_varint(out, len(snapshot.xip))
    previous = snapshot.xmin - 1
    for xid in snapshot.xip:
        _put_varint(out, xid - previous - 1)
        previous = xid
    body = base64.urlsafe_b64encode(out).rstrip(b"=").decode("ascii")
    return f"{CURSOR_VERSION}.{body}"


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def varint(self) -> int | None:
        value = 0
        for shift in range(0, 70, 7):
            if self.pos >= len(self.data):
                return None
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value if value <= MAX_XID else None
        return None

    def take(self, n: int) -> bytes | None:
        if n > len(self.data) - self.pos:
            return None
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def decode_cursor(text: object) -> Cursor | BadCursor:
    """Decode a cursor string. Any junk (any type, any text) gives BadCursor."""
    if not isinstance(text, str):
        return BadCursor("cursor must be a string")
    if len(text) > MAX_CURSOR_CHARS:
        return BadCursor("cursor too long")
    version, dot, body = text.partition(".")
    if not dot or version != CURSOR_VERSION:
        return BadCursor("unknown cursor version")
    if not _B64URL.fullmatch(body) or len(body) % 4 == 1:
        return BadCursor("cursor is not base64url")
    try:
        data = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        return BadCursor("cursor is not base64url")
    cursor = _decode_fields(_Reader(data))
    if isinstance(cursor, BadCursor):
        return cursor
    # One spelling per value: rejects overlong varints, stray bits, narrowing.
    if _encode(cursor.epoch.encode("utf-8"), cursor.snapshot) != text:
        return BadCursor("cursor is not canonical")
    return cursor


def _decode_fields(reader: _Reader) -> Cursor | BadCursor:
    epoch_len = reader.varint()
    if epoch_len is None or epoch_len > MAX_EPOCH_BYTES:
        return BadCursor("bad epoch length")
    raw_epoch = reader.take(epoch_len)
    xmin = reader.varint()
    span = reader.varint()
    count = reader.varint()
    if raw_epoch is None or xmin is None or span is None or count is None:
        return BadCursor("cursor truncated")
    if count > MAX_CURSOR_XIP:
        return BadCursor("too many xip entries")
    xip: list[int] = []
    previous = xmin - 1
    for _ in range(count):
        gap = reader.varint()
        if gap is None:
            return BadCursor("cursor truncated")
        previous += gap + 1
        xip.append(previous)
    if reader.pos != len(reader.data):
        return BadCursor("trailing bytes in cursor")
    try:
        epoch = raw_epoch.decode("utf-8")
        snapshot = Snapshot(xmin, xmin + span, tuple(xip))
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        return BadCursor(f"invalid cursor contents: {exc.__class__.__name__}")
    return Cursor(epoch, snapshot)


@dataclass(frozen=True, slots=True)
class Fresh:
    """No cursor: start live at the head snapshot; nothing is replayed."""


@dataclass(frozen=True, slots=True)
class Replay:
    """Replay the org's rows not visible in `since`, in order, then go live."""

    since: Snapshot
    """The client's cursor snapshot."""


@dataclass(frozen=True, slots=True)
class Resync:
    """Send `resync` with a fresh cursor; the subscription still goes live."""

    reason: ResyncReason
    """The `reason` field of the resync frame."""


ResumePlan = Fresh | Replay | Resync

TOO_FAR_BEHIND = Resync(ResyncReason.TOO_FAR_BEHIND)
"""The plan when a replay would exceed the replay limit."""


def plan_resume(
    cursor: str | Cursor | BadCursor | None,
    *,
    epoch: str,
    head: Snapshot,
    retention_horizon: int | None,
) -> ResumePlan:
    """Decide how a subscription starts from the cursor the client sent (its
    text, or already decoded).

    `head` must be a snapshot taken now (e.g. in the catch-up transaction),
    not an older one: a cursor issued by another daemon a moment ago must not
    look like it comes from the future. `retention_horizon` is the largest
    xid retention has deleted for the org (None: nothing deleted).
    """
    if cursor is None:
        return Fresh()
    if isinstance(cursor, str):
        cursor = decode_cursor(cursor)
    if isinstance(cursor, BadCursor):
        return Resync(ResyncReason.BAD_CURSOR)
    if cursor.epoch != epoch:
        return Resync(ResyncReason.EPOCH_CHANGED)
    since = cursor.snapshot
    if since.xmax > head.xmax:
        # From the future: another database, or a backup restored under us.
        return Resync(ResyncReason.BAD_CURSOR)
    if expired(since, retention_horizon):
        return Resync(ResyncReason.CURSOR_EXPIRED)
    return Replay(since)


def expired(seen: Snapshot, retention_horizon: int | None) -> bool:
    """Whether retention may have deleted a row that `seen` has not seen.

    Deleted rows all have xid <= horizon. One of them is lost to the client
    exactly when some xid <= horizon is invisible in `seen`."""
    return retention_horizon is not None and retention_horizon >= seen.first_invisible


# -- which cursor each frame carries ----------------------------------------------
#
# A cursor in a frame must be safe: resuming from it may repeat events, never
# skip one. Every rule that picks the cursor of a frame lives below.


def seen_through(since: Snapshot, head: Snapshot, below: int) -> Snapshot:
    """What a client has seen once a catch-up from `since` to `head` delivered
    every row whose xid is below `below`: the rows visible in `since`, plus the
    rows visible in `head` with xid < `below`.

    The catch-up reads rows in (xid, id) order, so at the start of each page
    every row of a smaller xid has gone out: this is the cursor of the page.
    """
    bound = min(below, head.xmax)
    xmax = max(since.xmax, bound)
    xip = sorted(
        {x for x in head.xip if x < bound and not since.visible(x)}
        | {x for x in since.xip if x >= bound}
    )
    return Snapshot(xip[0] if xip else xmax, xmax, tuple(xip))


@dataclass(frozen=True, slots=True)
class CatchUp:
    """One catch-up: the org's rows not visible in `since` but visible in
    `head`, read in (xid, id) order, page by page.

    The replay cursor rule: each replayed row carries `cursor_before(xid of
    the page's first row)` — everything of smaller xids has gone out — and the
    last row of the catch-up carries `head_cursor` (as does `subscribed`).
    Resuming from a page's cursor repeats at most that page.
    """

    epoch: str
    """The database epoch the snapshots belong to."""
    since: Snapshot
    """What the client had seen (its cursor)."""
    head: Snapshot
    """S: the snapshot the catch-up reads up to; live rows take over after it."""

    def cursor_before(self, xid: int) -> str:
        """The cursor once every row with a smaller xid went out."""
        return Cursor(self.epoch, seen_through(self.since, self.head, xid)).encode()

    @property
    def head_cursor(self) -> str:
        """The cursor once the whole catch-up went out."""
        return Cursor(self.epoch, self.head).encode()


def handed_over(head: Snapshot, xid: int) -> bool:
    """The handover rule: a live row visible in a subscription's catch-up
    snapshot `head` was replayed (or the client's cursor had seen it), so it is
    never sent again, whether it arrives during the catch-up or later from a tail
    that lags behind `head`. Every other live row follows `subscribed`, with the
    cursor the tail gave it (older than `head` at worst: a repeat, never a skip)."""
    return head.visible(xid)


_T = TypeVar("_T")


def tail_page_cursors(orgs: Sequence[_T], since: str, head: str | None) -> list[str]:
    """The page cursor rule of the live tail: which cursor each row of one page
    carries, given the orgs of the rows in order.

    A tail step reads the rows visible in its new snapshot (`head`) but not in
    the previous one (`since`). Every row carries `since`, except an org's
    last row on the step's last page (`head` given), which carries `head`: by
    then that org's whole step has gone out."""
    cursors = [since] * len(orgs)
    if head is not None:
        for i in {org: i for i, org in enumerate(orgs)}.values():
            cursors[i] = head
    return cursors


class StreamPosition:
    """The resume point of one event stream over several organizations (SSE's
    `id:`): a cursor safe for every org of the stream at once.

    Each org's latest cursor is kept (its frames' `cursor`); the stream's is their
    meet (`Snapshot.meet`), so resuming the whole stream from it repeats at worst.
    Orgs that have no cursor yet count with the stream's start cursor (a fresh
    stream: with none). While the orgs' cursors name different databases (an
    epoch change in progress), the stream's cursor is one of the old database's:
    resuming from it makes every org resync."""

    __slots__ = ("_latest", "_start")

    def __init__(self, start: Cursor | None, orgs: Sequence[str]) -> None:
        self._start = start
        self._latest: dict[str, Cursor | None] = dict.fromkeys(orgs, start)

    def fork(self) -> StreamPosition:
        """A copy to advance tentatively (kept only if what it described was sent)."""
        copy = StreamPosition(self._start, ())
        copy._latest = dict(self._latest)
        return copy

    def advance(self, org: str, cursor: str) -> str | None:
        """`org` received a frame carrying `cursor`; the stream's resume cursor now
        (None while no org has one)."""
        decoded = decode_cursor(cursor)
        if isinstance(decoded, BadCursor) or org not in self._latest:
            return None
        self._latest[org] = decoded
        known = [c for c in self._latest.values() if c is not None]
        stale = [c for c in known if c.epoch != decoded.epoch]
        if stale:
            return stale[0].encode()
        if len(known) == 1:
            return cursor
        snapshot = known[0].snapshot
        for other in known[1:]:
            snapshot = snapshot.meet(other.snapshot)
        return Cursor(decoded.epoch, snapshot).encode()


class TailPosition:
    """Where this daemon's live tail stands: the database epoch and the snapshot
    of its last completed step. Everything not visible in it will still be
    delivered live, so `cursor()` is safe at any moment. The tail writes it;
    the fan-out reads it."""

    __slots__ = ("epoch", "snapshot")

    def __init__(self) -> None:
        self.epoch = ""
        """The database epoch (as cursors carry it)."""
        self.snapshot: Snapshot | None = None
        """The last completed step's snapshot; None before the first one."""

    def cursor(self) -> str:
        """A cursor for the current position (the tail must have started)."""
        if self.snapshot is None:
            raise RuntimeError("the tail has not taken its first snapshot")
        return Cursor(self.epoch, self.snapshot).encode()
