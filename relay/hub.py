"""The fan-out hub: every live connection, the subscription registry, and the
delivery of tail pages to subscribers.

Nothing here ever awaits a single client. Each event's frame is encoded once
(server frames are unmasked, so the bytes are the same for every recipient)
and offered to each subscriber, whose connection sends it with one
non-blocking write or queues it in its bounded outbox. A fan-out to
thousands of connections yields to the scheduler every FANOUT_CHUNK sends.

Times are wall-clock seconds (`time.time`), because token expiry is. One
timer task serves every connection's deadlines (auth timeout, token
expiry, rechecks, coalescing windows) from a heap, instead of a sleeping
task per connection. The short tasks of connections (subscribe, recheck) run
in one nursery that the timer task holds, instead of a nursery per
connection.
"""

from __future__ import annotations

import heapq
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import trio
import trio.lowlevel

from relay.core.cursor import ResyncReason
from relay.core.protocol import EventRow, encode_event
from relay.core.registry import Registry, Subscription
from relay.metrics import Metrics
from relay.ws import encode_text_frame

if TYPE_CHECKING:
    from relay.client import Client

#: Sends between two checkpoints of a fan-out.
FANOUT_CHUNK = 2000


def _age_s(created_at: str) -> float:
    """Seconds since `created_at` (the writing transaction's start), by the wall clock."""
    try:
        return max(0.0, time.time() - datetime.fromisoformat(created_at).timestamp())
    except ValueError:
        return 0.0


class Hub:
    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.clock = clock
        self.registry: Registry[Client] = Registry()
        self.clients: set[Client] = set()
        self.cursor_now: Callable[[], str] = lambda: ""
        """A cursor that is safe at any moment: the tail's current snapshot P.
        Everything not visible in it will still be delivered live."""
        self._timers: list[tuple[float, int, Client]] = []
        self._timer_seq = itertools.count()
        self._timer_changed = trio.Event()
        self._per_user: dict[str, int] = {}
        self._emptied = trio.Event()
        self._tasks: trio.Nursery | None = None

    # -- connections ----------------------------------------------------------
    def add(self, client: Client) -> None:
        self.clients.add(client)
        self.metrics.connections.set(len(self.clients))

    async def wait_until_empty(self) -> None:
        """Return once no connection is left (shutdown drain)."""
        while self.clients:
            self._emptied = trio.Event()
            await self._emptied.wait()

    def connections_of(self, subject: str) -> int:
        """Open connections authenticated as `subject` (the per-user limit)."""
        return self._per_user.get(subject, 0)

    def count_user(self, subject: str, delta: int) -> None:
        count = self._per_user.get(subject, 0) + delta
        if count > 0:
            self._per_user[subject] = count
        else:
            self._per_user.pop(subject, None)

    def remove(self, client: Client) -> None:
        self.clients.discard(client)
        if not self.clients:
            self._emptied.set()
        removed = self.registry.remove_connection(client)
        self.metrics.connections.set(len(self.clients))
        if removed:
            self._count_subscriptions()

    def subscribe(self, client: Client, org: uuid.UUID, subscription: Subscription) -> None:
        self.registry.add(client, org, subscription)
        self._count_subscriptions()

    def unsubscribe(self, client: Client, org: uuid.UUID) -> None:
        self.registry.remove(client, org)
        self._count_subscriptions()

    def _count_subscriptions(self) -> None:
        self.metrics.subscriptions.set(len(self.registry))

    # -- delivery ---------------------------------------------------------------
    async def deliver(
        self, page: list[EventRow], since_cursor: str, head_cursor: str | None
    ) -> None:
        """Offer one tail page to every subscriber, in id order."""
        last_of_org: dict[uuid.UUID, int] = {}
        if head_cursor is not None:
            last_of_org = {row.org: i for i, row in enumerate(page)}
        now = self.clock()
        budget = FANOUT_CHUNK
        registry = self.registry
        for i, row in enumerate(page):
            subscribers = registry.subscribers(row.org)
            if not subscribers:
                continue
            cursor = head_cursor if last_of_org.get(row.org) == i else since_cursor
            assert cursor is not None
            frame = encode_text_frame(encode_event(row, cursor))
            offered = 0
            for client, subscription in subscribers:
                if subscription.filtered and not subscription.matches(row.event_type):
                    continue
                client.offer(subscription, row, cursor, frame, now)
                offered += 1
            if offered:
                budget -= offered
                self.metrics.events_delivered.inc(offered)
                self.metrics.commit_to_send.observe(_age_s(row.created_at))
            if budget <= 0:
                budget = FANOUT_CHUNK
                await trio.lowlevel.checkpoint()
                now = self.clock()

    def resync_all(self, reason: ResyncReason, cursor_for: Callable[[], str]) -> None:
        cursor = cursor_for()
        for client in list(self.clients):
            client.resync_everything(reason, cursor)

    # -- timers -------------------------------------------------------------------
    def schedule(self, client: Client, when: float) -> None:
        """Call ``client.on_timer(now)`` at `when` (it returns its next deadline)."""
        first = self._timers[0][0] if self._timers else None
        heapq.heappush(self._timers, (when, next(self._timer_seq), client))
        if first is None or when < first:
            self._timer_changed.set()

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Start a connection's short task in the hub's nursery (`run_timers`
        must be running). The task must not raise, and must check whether its
        connection is still open after each await."""
        if self._tasks is None:
            raise RuntimeError("Hub.run_timers is not running")
        self._tasks.start_soon(fn, *args)

    async def run_timers(self) -> None:
        """Serve every connection's deadlines, and hold the nursery of their
        short tasks (`start_soon`); runs until cancelled."""
        try:
            async with trio.open_nursery() as tasks:
                self._tasks = tasks
                await self._run_timers()
        finally:
            self._tasks = None

    async def _run_timers(self) -> None:
        while True:
            self._timer_changed = trio.Event()
            # Deadlines are on the wall clock (token expiry is); sleep on trio's.
            delay = self._timers[0][0] - self.clock() if self._timers else float("inf")
            with trio.move_on_after(max(0.0, delay)):
                await self._timer_changed.wait()
            now = self.clock()
            budget = FANOUT_CHUNK
            while self._timers and self._timers[0][0] <= now:
                when, _, client = heapq.heappop(self._timers)
                client.on_timer(when, now)
                budget -= 1
                if budget <= 0:
                    budget = FANOUT_CHUNK
                    await trio.lowlevel.checkpoint()
