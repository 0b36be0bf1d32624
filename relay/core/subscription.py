"""One subscription's life: `pending -> catching_up -> live` (pure; owned by a Session).

Everything one subscription to one org needs is here: its filter, its
coalescer, the catch-up position, the current page, and the live rows that
arrive while it catches up. The session feeds it inputs and gives it the
connection's `Output`; SQL reads are asked for with `CatchUpQuery` values and
answered with `CatchUpPage` values.

    PENDING       the subscription follows the org (so live rows are seen) and
                  the first read is asked: authorize, take the snapshot S, plan
                  the resume, count, read the first page;
    CATCHING_UP   replaying the org's rows not visible in the cursor but
                  visible in S, in (xid, id) order, page by page;
    LIVE          `subscribed` was sent; live rows flow.

**Replay is pulled, not pushed.** Rows of a page go out only while the
connection has room (`Output.has_room`, a low-water mark on the bytes waiting
to be sent), and the next page is read only then. A client that keeps reading
gets everything up to the replay limit, whatever its size, while the
subscription holds about one page; a client that stops reading is cut off by
the output's stall deadline (4008), not by an overflow.

**Handover, exact both ways** (the rule is `cursor.handed_over`). A live row
visible in S was replayed or preceded the cursor: it is dropped, during the
catch-up and afterwards (a tail lagging behind S would offer it again). Every
other live row is held during the catch-up and follows `subscribed` in order,
itself paced like the replay. When more than `max_held_rows` arrive during a
catch-up, they are dropped and the subscription chases the head instead:
another catch-up round from S to a new snapshot reads them from the table.
Once `subscribed` went out, a client slower than the live rate gets the
outbox's treatment (coalescing, `resync` overflow, 4008): held rows beyond the
bound go to the output at once.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from relay.core.coalesce import Coalescer
from relay.core.codes import ErrorCode, ResyncReason, UnsubscribeReason
from relay.core.cursor import (
    TOO_FAR_BEHIND,
    BadCursor,
    CatchUp,
    Cursor,
    Fresh,
    Replay,
    Resync,
    Snapshot,
    expired,
    handed_over,
    plan_resume,
    seen_through,
)
from relay.core.outbox import Output
from relay.core.protocol import (
    EventRow,
    encode_error,
    encode_event,
    encode_resync,
    encode_subscribed,
    encode_unsubscribed,
)

__all__ = [
    "MATCH_CACHE_ENTRIES",
    "CatchUpLimits",
    "CatchUpPage",
    "CatchUpQuery",
    "EventFilter",
    "Phase",
    "Subscription",
    "glob_matches",
]

MATCH_CACHE_ENTRIES = 256
"""Event types whose filter verdict one subscription remembers."""


@dataclass(frozen=True, slots=True)
class CatchUpLimits:
    """Bounds of one subscription's catch-up."""

    replay_limit: int = 10_000
    """Most rows a resume replays (all rounds together); more resyncs (too_far_behind)."""
    page_rows: int = 1000
    """Rows per catch-up read."""
    max_held_rows: int = 1000
    """Live rows held while catching up; beyond, another round chases the head."""

    def __post_init__(self) -> None:
        if self.replay_limit < 1 or self.page_rows < 1 or self.max_held_rows < 1:
            raise ValueError("catch-up limits must be positive")


@dataclass(frozen=True, slots=True)
class CatchUpQuery:
    """One catch-up read for the shell to run in SQL, under the client's claims:
    the org's rows not visible in `since` but visible in `head`, after `after`
    in (xid, id) order, at most `page_rows`."""

    org: uuid.UUID
    """The organization."""
    since: Snapshot | None
    """What the client has seen; None reads no rows (a fresh start or a resync)."""
    head: Snapshot | None
    """S; None on a round's first read: take S now (REPEATABLE READ), and
    return the epoch, the retention horizon and, with `count_limit`, the count."""
    after: tuple[int, int]
    """(xid, id) of the last row already read; (0, 0) at the start."""
    page_rows: int
    """Most rows to return."""
    count_limit: int
    """On a first read with `since`: count the rows to replay, up to this many."""


@dataclass(frozen=True, slots=True)
class CatchUpPage:
    """What SQL answered to a `CatchUpQuery`."""

    allowed: bool
    """Whether the org is among `relay.user_organizations()` for the claims."""
    epoch: str
    """The database epoch (as cursors carry it)."""
    head: Snapshot
    """S: the snapshot taken by a first read, else the query's."""
    horizon: int | None
    """The org's retention horizon (newest deleted xid), or None."""
    count: int
    """Rows to replay in this round, counted up to `count_limit` (first reads)."""
    rows: list[EventRow]
    """The page, in (xid, id) order; fewer than `page_rows`: the round is complete."""


class Phase(Enum):
    """Where a subscription is in its life."""

    PENDING = "pending"
    CATCHING_UP = "catching_up"
    LIVE = "live"


def glob_matches(glob: tuple[str, ...], segments: list[str]) -> bool:
    """Whether a glob (split on dots) matches an event type (split on dots).

    A `*` segment stands for one or more segments. Runs in O(len(glob) *
    len(segments)) whatever the input: a client's globs cannot make the
    fan-out loop backtrack.
    """
    n = len(segments)
    reachable = {0}
    for part in glob:
        if part == "*":
            reachable = set(range(min(reachable) + 1, n + 1))
        else:
            reachable = {p + 1 for p in reachable if p < n and segments[p] == part}
        if not reachable:
            return False
    return n in reachable


class EventFilter:
    """A subscription's `event_types`: which event types it delivers."""

    __slots__ = ("_globs", "_verdicts", "event_types")

    def __init__(self, event_types: Sequence[str] | None) -> None:
        self.event_types = None if event_types is None else tuple(event_types)
        """The globs as given; None delivers every type."""
        types = self.event_types
        self._globs = (
            None if types is None or "*" in types else tuple(tuple(g.split(".")) for g in types)
        )
        self._verdicts: dict[str, bool] = {}

    @property
    def filtered(self) -> bool:
        """Whether only some event types are delivered."""
        return self._globs is not None

    def matches(self, event_type: str) -> bool:
        """Whether an event of `event_type` is delivered."""
        globs = self._globs
        if globs is None:
            return True
        verdict = self._verdicts.get(event_type)
        if verdict is None:
            segments = event_type.split(".")
            verdict = any(glob_matches(glob, segments) for glob in globs)
            if len(self._verdicts) >= MATCH_CACHE_ENTRIES:
                self._verdicts.clear()
            self._verdicts[event_type] = verdict
        return verdict


_Held = tuple[EventRow, str, bytes]
"""A live row held for later: the row, the cursor the tail gave it, its frame."""


class Subscription:
    """One connection's subscription to one org (see the module docstring).

    Methods that send take the connection's `Output` and return False when the
    client is hopeless (the session closes with 4008)."""

    __slots__ = (
        "_after",
        "_catch_up",
        "_complete",
        "_counted",
        "_forced",
        "_held",
        "_inflight",
        "_page",
        "_round_left",
        "announced",
        "coalescer",
        "cursor",
        "filter",
        "head",
        "limits",
        "org",
        "phase",
        "ref",
        "replayed",
        "started_at",
    )

    def __init__(
        self,
        ref: str,
        org: uuid.UUID,
        cursor: Cursor | BadCursor | None,
        *,
        event_types: Sequence[str] | None = None,
        coalesce_ms: int | None = None,
        limits: CatchUpLimits | None = None,
        started_at: float = 0.0,
    ) -> None:
        self.ref = ref
        """The `ref` of the subscribe (echoed by `subscribed` and server unsubscribes)."""
        self.org = org
        """The organization followed."""
        self.cursor = cursor
        """What the client sent (decoded); None: start live."""
        self.filter = EventFilter(event_types)
        """Which event types are delivered."""
        self.coalescer = Coalescer(coalesce_ms / 1000) if coalesce_ms else None
        """The `coalesce_ms` window for live events, if asked for."""
        self.limits = limits or CatchUpLimits()
        self.started_at = started_at
        """When the subscribe arrived (for the catch-up's duration)."""
        self.phase = Phase.PENDING
        self.head: Snapshot | None = None
        """S of the current round (None while pending); live rows visible in it are dropped."""
        self._inflight: CatchUpQuery | None = None
        """The catch-up read in flight (at most one); other answers are stale."""
        self.announced = False
        """`subscribed` went out."""
        self.replayed = 0
        """Catch-up events sent (the `replayed` of `subscribed`)."""
        self._catch_up: CatchUp | None = None
        self._after = (0, 0)
        self._page: deque[tuple[EventRow, str]] = deque()
        self._complete = False
        self._counted = 0
        self._round_left: int | None = None
        """Rows of this round not read yet, when the first read counted them
        (saves the empty read that would otherwise end a round of full pages)."""
        self._held: list[_Held] | None = []
        """Live rows waiting for their turn; None while a chase drops them."""
        self._forced: ResyncReason | None = None
        """A round restarted from scratch must resync for this reason."""

    # -- reads ------------------------------------------------------------------------
    @property
    def reading(self) -> bool:
        """A catch-up read is in flight."""
        return self._inflight is not None

    def first_read(self) -> CatchUpQuery:
        """The query that starts a round: authorize, take S, plan, count, first page."""
        since = self._round_cursor()
        snapshot = since.snapshot if isinstance(since, Cursor) else None
        budget = self.limits.replay_limit - self._counted
        query = CatchUpQuery(
            self.org, snapshot, None, (0, 0), self.limits.page_rows, budget + 1 if snapshot else 0
        )
        self._inflight = query
        return query

    def _round_cursor(self) -> Cursor | BadCursor | None:
        """Where the next round starts: nothing after a restart, the previous
        round's S when chasing, else the client's cursor."""
        if self._forced is not None:
            return None
        if self._catch_up is not None:
            return Cursor(self._catch_up.epoch, self._catch_up.head)
        return self.cursor

    def next_read(self, out: Output) -> CatchUpQuery | None:
        """The next page's query, when one is due: a replay with more rows to
        read, no read in flight, at most half a page left to send, and room."""
        catch_up = self._catch_up
        if (
            self.phase is not Phase.CATCHING_UP
            or catch_up is None
            or self._complete
            or self.reading
            or len(self._page) > self.limits.page_rows // 2
            or not out.has_room()
        ):
            return None
        query = CatchUpQuery(
            self.org, catch_up.since, catch_up.head, self._after, self.limits.page_rows, 0
        )
        self._inflight = query
        return query

    def answers(self, query: CatchUpQuery) -> bool:
        """Whether `query` is the read in flight (else its answer is stale)."""
        return query is self._inflight

    def read_failed(self, query: CatchUpQuery) -> None:
        """The read could not run; the caller drops the subscription."""
        if query is self._inflight:
            self._inflight = None

    def read_done(
        self, query: CatchUpQuery, page: CatchUpPage, out: Output, now: float
    ) -> CatchUpQuery | None:
        """SQL answered `query` (the read in flight: see `answers`), and it is
        `allowed` (else the caller drops the subscription; see `refused`).
        Returns a query to run next (a restarted round), if any."""
        self._inflight = None
        if query.head is None:
            return self._planned(page, out, now)
        catch_up = self._catch_up
        assert catch_up is not None, "a page answer without a catch-up"
        if page.epoch != catch_up.epoch:
            return self._restart(ResyncReason.EPOCH_CHANGED)
        if expired(seen_through(catch_up.since, catch_up.head, self._after[0]), page.horizon):
            return self._restart(ResyncReason.CURSOR_EXPIRED)
        self._take(page.rows, catch_up)
        return None

    def refused(self) -> bytes:
        """The org is not (or no longer) allowed: the frame that tells the client."""
        if self.announced or self.replayed:
            return encode_unsubscribed(self.ref, self.org, UnsubscribeReason.FORBIDDEN)
        return encode_error(self.ref, ErrorCode.FORBIDDEN, "not a member of this org")

    def _planned(self, page: CatchUpPage, out: Output, now: float) -> CatchUpQuery | None:
        """A round's first read: decide how it goes."""
        head = page.head
        self.head = head
        plan = plan_resume(
            self._round_cursor(), epoch=page.epoch, head=head, retention_horizon=page.horizon
        )
        if self._forced is not None:
            plan = Resync(self._forced)
            self._forced = None
        elif isinstance(plan, Replay):
            if page.count > self.limits.replay_limit - self._counted:
                plan = TOO_FAR_BEHIND
            else:
                self._counted += page.count
                self._round_left = page.count
        held = self._held
        if held:
            self._held = [h for h in held if not handed_over(head, h[0].xid)]
        if isinstance(plan, Replay):
            catch_up = CatchUp(page.epoch, plan.since, head)
            self._catch_up = catch_up
            self.phase = Phase.CATCHING_UP
            self._after = (0, 0)
            self._complete = False
            self._take(page.rows, catch_up)
            return None
        self._page.clear()
        self.phase = Phase.CATCHING_UP
        self._complete = True
        head_cursor = Cursor(page.epoch, head).encode()
        if isinstance(plan, Resync):
            out.stats.resyncs[plan.reason] += 1
            out.control(encode_resync(self.org, plan.reason, head_cursor), now)
        else:
            assert isinstance(plan, Fresh)
        if self._held is None:
            # Live rows were dropped while pending: chase from S (an empty round).
            self._catch_up = CatchUp(page.epoch, head, head)
            return None
        self._catch_up = None
        self._round_done(head_cursor, out, now)
        return None

    def _take(self, rows: list[EventRow], catch_up: CatchUp) -> None:
        left = self._round_left
        if left is not None:
            left = self._round_left = left - len(rows)
        if len(rows) < self.limits.page_rows or (left is not None and left <= 0):
            self._complete = True
        if rows:
            cursor = catch_up.cursor_before(rows[0].xid)
            self._page.extend((row, cursor) for row in rows)
            self._after = (rows[-1].xid, rows[-1].id)

    def _restart(self, reason: ResyncReason) -> CatchUpQuery:
        """Start over with a fresh snapshot and tell the client to resync."""
        self._forced = reason
        self._round_left = None
        self._catch_up = None
        self._page.clear()
        self.phase = Phase.PENDING
        if self._held is None:
            self._held = []
        return self.first_read()

    # -- sending, paced by the output -----------------------------------------------------
    def pump(self, out: Output, now: float) -> tuple[bool, CatchUpQuery | None]:
        """Send what this subscription owes while the output has room: replayed
        rows, `subscribed`, held live rows. Returns (not hopeless, a read to run)."""
        ok = True
        if self.phase is Phase.CATCHING_UP:
            ok = self._send_page(out, now)
            if self._page or not self._complete or self.reading:
                return ok, self.next_read(out)
            catch_up = self._catch_up
            assert catch_up is not None, "a complete round without its catch-up"
            if self._held is None:
                # Live rows were dropped during this round: chase the head.
                out.stats.catch_up_rounds += 1
                self._held = []
                return ok, self.first_read()
            self._round_done(catch_up.head_cursor, out, now)
        if self.phase is Phase.LIVE and self._held:
            ok = self._send_held(out, now) and ok
        return ok, None

    def _send_page(self, out: Output, now: float) -> bool:
        """Replayed rows, in batches of one write each, while there is room."""
        page = self._page
        catch_up = self._catch_up
        if catch_up is None:
            return True
        matches = self.filter.matches
        ok = True
        while page:
            room = out.limits.room_bytes - out.backlog_bytes
            if room <= 0:
                break
            last = self._complete and not self.reading
            batch: list[tuple[EventRow, str, bytes]] = []
            size = 0
            while page and size < room:
                row, cursor = page.popleft()
                if not matches(row.event_type):
                    continue
                if last and not page:
                    cursor = catch_up.head_cursor
                frame = out.wrap(encode_event(row, cursor))
                batch.append((row, cursor, frame))
                size += len(frame)
            if batch:
                self.replayed += len(batch)
                ok = out.replayed(batch, now) and ok
        return ok

    def _round_done(self, head_cursor: str, out: Output, now: float) -> None:
        """The catch-up reached S: `subscribed`, then held rows, then live."""
        self.phase = Phase.LIVE
        self._catch_up = None
        if self._held is None:
            self._held = []
        if not self.announced:
            self.announced = True
            if isinstance(self.cursor, Cursor) and self.replayed:
                out.stats.catch_ups += 1
                out.stats.on_catch_up(now - self.started_at)
            out.control(encode_subscribed(self.ref, self.org, head_cursor, self.replayed), now)

    def _send_held(self, out: Output, now: float) -> bool:
        held = self._held
        assert held
        ok = True
        taken = 0
        while taken < len(held) and out.has_room():
            row, cursor, frame = held[taken]
            taken += 1
            ok = self._deliver(row, cursor, frame, out, now) and ok
        del held[:taken]
        return ok

    # -- live rows --------------------------------------------------------------------------
    def live(self, row: EventRow, cursor: str, frame: bytes, out: Output, now: float) -> bool:
        """A live row from the tail (its org's, already past `filter` when filtered).
        Returns False when the client is hopeless."""
        head = self.head
        if head is not None and handed_over(head, row.xid):
            return True
        held = self._held
        if self.phase is not Phase.LIVE:
            if held is not None:
                if len(held) < self.limits.max_held_rows:
                    held.append((row, cursor, frame))
                else:
                    self._held = None  # chase: the next round reads them from the table
            return True
        if held:
            if len(held) < self.limits.max_held_rows:
                held.append((row, cursor, frame))
                return self._send_held(out, now)
            # Slower than the live rate: let the outbox coalesce, resync or give up.
            self._held = []
            ok = True
            for h_row, h_cursor, h_frame in held:
                ok = self._deliver(h_row, h_cursor, h_frame, out, now) and ok
            return self._deliver(row, cursor, frame, out, now) and ok
        return self._deliver(row, cursor, frame, out, now)

    def _deliver(self, row: EventRow, cursor: str, frame: bytes, out: Output, now: float) -> bool:
        if not self.filter.matches(row.event_type):
            return True
        coalescer = self.coalescer
        if coalescer is None:
            return out.event(row, cursor, frame, now)
        ok = True
        for event in coalescer.add(row, cursor, now):
            ok = out.coalesced_event(event.row, event.cursor, event.count, now) and ok
        return ok

    def flush_due(self, out: Output, now: float) -> bool:
        """Deliver coalesced events whose window closed."""
        coalescer = self.coalescer
        if coalescer is None:
            return True
        ok = True
        for event in coalescer.due(now):
            ok = out.coalesced_event(event.row, event.cursor, event.count, now) and ok
        return ok

    def next_deadline(self) -> float | None:
        """When `flush_due` next has something to do."""
        return self.coalescer.next_deadline() if self.coalescer is not None else None

    @property
    def backlog(self) -> bool:
        """Whether it owes the client frames that wait for room."""
        return bool(self._page) or bool(self._held and self.phase is Phase.LIVE)

    # -- the database changed under us -------------------------------------------------
    def database_changed(self, epoch: str, head: Snapshot, out: Output, now: float) -> bool:
        """Restored, failed over or replaced: what the client holds no longer
        describes the database. Resync at the tail's new position, then live.
        Returns whether it acted (a pending subscription resolves on its own:
        its first read carries the new epoch)."""
        if self.phase is Phase.PENDING:
            return False
        self._page.clear()
        self._catch_up = None
        self._held = []
        self._inflight = None
        if self.coalescer is not None:
            self.coalescer.drain()
        self.head = head
        cursor = Cursor(epoch, head).encode()
        out.stats.resyncs[ResyncReason.EPOCH_CHANGED] += 1
        out.control(encode_resync(self.org, ResyncReason.EPOCH_CHANGED, cursor), now)
        self._round_done(cursor, out, now)
        return True
