"""The fan-out hub: the index of which connection follows which org, and the
delivery of tail pages to them.

Nothing here ever awaits a single client. Each event's frame is encoded once
(server frames are unmasked, so the bytes are the same for every recipient)
and offered to each follower through one narrow method, `Follower.offer`,
which sends with one non-blocking write or queues in the connection's bounded
outbox. A fan-out to thousands of connections yields to the scheduler every
FANOUT_CHUNK offers.

Connections reach the hub through the `Fanout` interface (follow, unfollow,
forget); the hub reaches them through `Follower`. Neither imports the other.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Hashable
from datetime import datetime
from typing import Protocol

import trio
import trio.lowlevel

from relay.core.cursor import Snapshot, TailPosition, tail_page_cursors
from relay.core.protocol import EventRow, encode_event
from relay.core.registry import Registry
from relay.core.subscription import Subscription
from relay.server.metrics import Metrics
from relay.ws import encode_text_frame

__all__ = ["FANOUT_CHUNK", "Fanout", "Follower", "Hub"]

FANOUT_CHUNK = 2000
"""Offers between two checkpoints of a fan-out."""


class Follower(Hashable, Protocol):
    """A connection as the hub sees it."""

    def offer(
        self, subscription: Subscription, row: EventRow, cursor: str, frame: bytes, now: float
    ) -> None:
        """A live row for `subscription` (never blocks, never raises). Between the
        first offer of a stretch and `flush`, the follower may hold what it got."""

    def flush(self, now: float) -> None:
        """The end of a stretch of offers: send what was held, in one write."""

    def database_changed(self, epoch: str, head: Snapshot, now: float) -> None:
        """The tail found another database: resync every subscription at `head`."""


class Fanout(Protocol):
    """The hub as a connection sees it."""

    def follow(self, follower: Follower, org: uuid.UUID, subscription: Subscription) -> None:
        """Offer `org`'s live rows to `follower` (replaces its previous subscription)."""

    def unfollow(self, follower: Follower, org: uuid.UUID) -> None:
        """Stop offering `org`'s rows to `follower`."""

    def forget(self, follower: Follower) -> None:
        """`follower` closed: stop offering it anything."""


def _age_s(created_at: str, now: float) -> float:
    """Seconds since `created_at` (the writing transaction's start), by the wall clock."""
    try:
        return max(0.0, now - datetime.fromisoformat(created_at).timestamp())
    except ValueError:
        return 0.0


def _flush(touched: dict[Follower, None], now: float) -> None:
    """Each follower sends what this stretch of the fan-out brought it, in one write."""
    for follower in touched:
        follower.flush(now)
    touched.clear()


class Hub:
    """Delivers the live tail to followers; implements `Fanout`."""

    def __init__(
        self, metrics: Metrics, position: TailPosition, clock: Callable[[], float] = time.time
    ) -> None:
        """`position` is where the tail stands (it writes, the hub reads)."""
        self.metrics = metrics
        self.position = position
        self.clock = clock
        self._registry: Registry[Follower, Subscription] = Registry()

    # -- Fanout ----------------------------------------------------------------------
    def follow(self, follower: Follower, org: uuid.UUID, subscription: Subscription) -> None:
        self._registry.add(follower, org, subscription)
        self.metrics.subscriptions.set(len(self._registry))

    def unfollow(self, follower: Follower, org: uuid.UUID) -> None:
        if self._registry.remove(follower, org):
            self.metrics.subscriptions.set(len(self._registry))

    def forget(self, follower: Follower) -> None:
        if self._registry.remove_connection(follower):
            self.metrics.subscriptions.set(len(self._registry))

    # -- delivery (called by the tail) ----------------------------------------------------
    async def deliver(
        self, page: list[EventRow], since_cursor: str, head_cursor: str | None
    ) -> None:
        """Offer one tail page to every follower, in id order (cursors: see
        `tail_page_cursors`)."""
        cursors = tail_page_cursors([row.org for row in page], since_cursor, head_cursor)
        now = self.clock()
        budget = FANOUT_CHUNK
        subscribers = self._registry.subscribers
        commit_to_send = self.metrics.commit_to_send
        touched: dict[Follower, None] = {}
        for row, cursor in zip(page, cursors, strict=True):
            followers = subscribers(row.org)
            if not followers:
                continue
            frame = encode_text_frame(encode_event(row, cursor))
            offered = 0
            for follower, subscription in followers:
                if subscription.filter.filtered and not subscription.filter.matches(row.event_type):
                    continue
                touched[follower] = None
                follower.offer(subscription, row, cursor, frame, now)
                offered += 1
            if offered:
                budget -= offered
                commit_to_send.observe(_age_s(row.created_at, now))
            if budget <= 0:
                budget = FANOUT_CHUNK
                _flush(touched, now)
                await trio.lowlevel.checkpoint()
                now = self.clock()
        _flush(touched, now)

    def database_changed(self) -> None:
        """The tail moved to another database's epoch (`position`): every follower
        resyncs at the new position."""
        snapshot = self.position.snapshot
        assert snapshot is not None
        now = self.clock()
        for follower in self._registry.followers():
            follower.database_changed(self.position.epoch, snapshot, now)
