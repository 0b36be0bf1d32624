"""Test doubles for the pure core: a scripted socket, a model of the events table,
and a harness that drives one Session the way the shell does.

- `Pipe` is a `Transport` with a kernel buffer of a given size, an unsent
  bound like the WebSocket layer's, and a client that reads when told to:
  the kernel takes all, part or none of a send, exactly as scripted.
- `Table` models `relay.events` and Postgres snapshots: transactions with
  xids that commit (or not) in any order, `snapshot()` like
  pg_current_snapshot(), and `read(query)` answering a `CatchUpQuery` the way
  the SQL in relay.db.reads does (the integration tests check the SQL itself).
- `Harness` wires a Session to a Pipe and a Table, applies its actions like
  the shell (Follow/Unfollow/ScheduleTick/ReadCatchUp), and collects what
  the client received.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay.core.cursor import Cursor, Snapshot, decode_cursor, tail_page_cursors
from relay.core.outbox import Output, OutputLimits
from relay.core.protocol import EventRow, encode_event
from relay.core.session import (
    Action,
    Close,
    Follow,
    ReadCatchUp,
    RecheckSubscriptions,
    ScheduleTick,
    Session,
    SessionLimits,
    Unfollow,
    VerifyToken,
)
from relay.core.stats import Stats
from relay.core.subscription import CatchUpPage, CatchUpQuery, Subscription

EPOCH = "E1"
CLAIMS = {"sub": "user-1", "org_id": "0b7e6d1c-2f4a-4c1e-9a53-3d6f0c2b8e11"}
EXP = 1e9


def wrap(message: bytes) -> bytes:
    """The tests' 'WebSocket frame': one JSON message per line."""
    return message + b"\n"


class Pipe:
    """A scripted socket: a kernel buffer of `kernel_bytes` the client drains
    with `read`, and unsent bytes up to `unsent_bound` (the WebSocket layer)."""

    def __init__(
        self, *, kernel_bytes: int = 1 << 40, unsent_bound: int = 64 * 1024, low_water: int = 16384
    ) -> None:
        self.kernel_bytes = kernel_bytes
        self.unsent_bound = unsent_bound
        self.low_water = low_water
        self.kernel = bytearray()
        self.unsent = bytearray()
        self.received = bytearray()
        self.on_drain: Callable[[], None] = lambda: None
        self.sends = 0

    @property
    def unsent_bytes(self) -> int:
        return len(self.unsent)

    def send_nowait(self, data: bytes) -> bool:
        if self.unsent:
            if len(self.unsent) + len(data) > self.unsent_bound:
                return False
            self.unsent += data
            return True
        if len(data) > self.unsent_bound:
            return False
        self.sends += 1
        take = min(len(data), self.kernel_bytes - len(self.kernel))
        self.kernel += data[:take]
        self.unsent += data[take:]
        return True

    def read(self, n: int | None = None) -> None:
        """The client reads `n` bytes (all by default); the writer then flushes
        unsent bytes into the kernel and, at the low-water mark, calls back."""
        while True:
            take = len(self.kernel) if n is None else min(n, len(self.kernel))
            self.received += self.kernel[:take]
            del self.kernel[:take]
            if n is not None:
                n -= take
            if not self.unsent:
                return
            room = self.kernel_bytes - len(self.kernel)
            self.kernel += self.unsent[:room]
            del self.unsent[:room]
            if len(self.unsent) <= self.low_water:
                self.on_drain()
            if n == 0 or (not self.kernel and not self.unsent):
                return

    def frames(self) -> list[dict[str, Any]]:
        """Every complete message the client has received, decoded."""
        lines = bytes(self.received).split(b"\n")
        return [json.loads(line) for line in lines[:-1]]


@dataclass
class Table:
    """`relay.events` and Postgres' snapshots, modelled."""

    next_xid: int = 100
    next_id: int = 1
    rows: list[EventRow] = field(default_factory=list)
    open: dict[int, list[EventRow]] = field(default_factory=dict)
    horizon: dict[uuid.UUID, int] = field(default_factory=dict)
    epoch: str = EPOCH
    allowed: set[uuid.UUID] | None = None

    def begin(self) -> int:
        xid = self.next_xid
        self.next_xid += 1
        self.open[xid] = []
        return xid

    def insert(self, xid: int, org: uuid.UUID, n: int = 1, event_type: str = "job.updated") -> None:
        for _ in range(n):
            row = EventRow(
                self.next_id, org, event_type, "job", str(self.next_id), None, "{}", "t", xid
            )
            self.next_id += 1
            self.open[xid].append(row)

    def commit(self, xid: int) -> list[EventRow]:
        rows = self.open.pop(xid)
        self.rows += rows
        return rows

    def rollback(self, xid: int) -> None:
        del self.open[xid]

    def emit(self, org: uuid.UUID, n: int = 1, **kw: Any) -> list[EventRow]:
        """`n` single-row transactions, committed."""
        out = []
        for _ in range(n):
            xid = self.begin()
            self.insert(xid, org, 1, **kw)
            out += self.commit(xid)
        return out

    def snapshot(self) -> Snapshot:
        xip = tuple(sorted(self.open))
        return Snapshot(xip[0] if xip else self.next_xid, self.next_xid, xip)

    def cursor(self, snapshot: Snapshot | None = None) -> str:
        return Cursor(self.epoch, snapshot or self.snapshot()).encode()

    def tail(self, since: Snapshot) -> tuple[list[EventRow], Snapshot]:
        """One tail step: rows visible now but not in `since`, in id order."""
        now = self.snapshot()
        rows = [r for r in self.rows if now.visible(r.xid) and not since.visible(r.xid)]
        return sorted(rows, key=lambda r: r.id), now

    def read(self, query: CatchUpQuery) -> CatchUpPage:
        head = query.head if query.head is not None else self.snapshot()
        allowed = self.allowed is None or query.org in self.allowed
        rows: list[EventRow] = []
        count = 0
        if query.since is not None and allowed:
            since = query.since
            matching = sorted(
                (
                    r
                    for r in self.rows
                    if r.org == query.org and not since.visible(r.xid) and head.visible(r.xid)
                ),
                key=lambda r: (r.xid, r.id),
            )
            if query.head is None and query.count_limit:
                count = min(len(matching), query.count_limit)
            rows = [r for r in matching if (r.xid, r.id) > query.after][: query.page_rows]
        return CatchUpPage(allowed, self.epoch, head, self.horizon.get(query.org), count, rows)


class Harness:
    """One session, its pipe and the table, driven like the shell drives them."""

    def __init__(
        self,
        *,
        table: Table | None = None,
        limits: SessionLimits | None = None,
        pipe: Pipe | None = None,
        output_limits: OutputLimits | None = None,
        now: float = 0.0,
    ) -> None:
        self.table = table or Table()
        self.pipe = pipe or Pipe()
        self.stats = Stats()
        self.now = now
        self.output = Output(
            self.pipe,
            output_limits or OutputLimits(transport_bytes=self.pipe.unsent_bound),
            stats=self.stats,
            wrap=wrap,
        )
        self.session = Session("c1", now, self.output, limits)
        self.pipe.on_drain = lambda: self.apply(self.session.output_drained(self.now))
        self.followed: dict[uuid.UUID, Subscription] = {}
        self.reads: list[ReadCatchUp] = []
        self.rechecks: list[RecheckSubscriptions] = []
        self.closed: list[Close] = []
        self.ticks: list[float] = []
        self.verify: list[VerifyToken] = []
        self.tail_at = self.table.snapshot()
        """The tail's position (P): what it delivered so far."""
        self.first_heads: list[Snapshot] = []
        """S of every round's first read, in order."""

    def apply(self, actions: Sequence[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, Follow):
                self.followed[action.org] = action.subscription
            elif isinstance(action, Unfollow):
                self.followed.pop(action.org, None)
            elif isinstance(action, ReadCatchUp):
                self.reads.append(action)
            elif isinstance(action, RecheckSubscriptions):
                self.rechecks.append(action)
            elif isinstance(action, ScheduleTick):
                self.ticks.append(action.at)
            elif isinstance(action, Close):
                self.closed.append(action)
            elif isinstance(action, VerifyToken):
                self.verify.append(action)
        return list(actions)

    # -- the client ---------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> list[Action]:
        return self.apply(self.session.received_text(json.dumps(message), self.now))

    def ready(self, claims: dict[str, Any] | None = None) -> None:
        self.send({"type": "auth", "token": "tok"})
        self.apply(self.session.token_verified(claims or CLAIMS, EXP, self.now))

    def subscribe(self, org: uuid.UUID, cursor: str | None = None, **extra: Any) -> None:
        self.send({"type": "subscribe", "ref": "s", "org": str(org), "cursor": cursor, **extra})

    def frames(self) -> list[dict[str, Any]]:
        return self.pipe.frames()

    def events(self) -> list[int]:
        return [f["id"] for f in self.frames() if f["type"] == "event"]

    # -- the database -----------------------------------------------------------
    def answer(self, n: int | None = None) -> int:
        """Answer the oldest `n` pending reads from the table (all by default)."""
        answered = 0
        while self.reads and (n is None or answered < n):
            read = self.reads.pop(0)
            page = self.table.read(read.query)
            if read.query.head is None:
                self.first_heads.append(page.head)
            self.apply(self.session.catch_up_read(read.subscription, read.query, page, self.now))
            answered += 1
        return answered

    def step_tail(self) -> list[EventRow]:
        """One tail step delivered to this session's followed subscriptions."""
        rows, head = self.table.tail(self.tail_at)
        cursors = tail_page_cursors(
            [r.org for r in rows], self.table.cursor(self.tail_at), self.table.cursor(head)
        )
        for row, cursor in zip(rows, cursors, strict=True):
            sub = self.followed.get(row.org)
            if sub is not None and sub.filter.matches(row.event_type):
                frame = wrap(encode_event(row, cursor))
                self.apply(self.session.live_row(sub, row, cursor, frame, self.now))
        self.tail_at = head
        return rows

    def settle(self, rounds: int = 10_000) -> None:
        """Answer reads and let the client read everything until nothing moves."""
        for _ in range(rounds):
            before = (len(self.pipe.received), len(self.reads))
            self.answer()
            self.pipe.read()
            if (len(self.pipe.received), len(self.reads)) == before and not self.reads:
                return
        raise AssertionError("the session never settled")


def snapshot_of(cursor: str) -> Snapshot:
    decoded = decode_cursor(cursor)
    assert isinstance(decoded, Cursor), decoded
    return decoded.snapshot
