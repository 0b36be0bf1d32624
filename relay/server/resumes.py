"""A round's first catch-up read answered without the catch-up query: the
authorization from a batch (`relay.db.authorize`), S and the missed rows
from the tail's recent rows (`relay.core.recent`).

Only for subscriptions that follow the live tail (WebSocket, event stream):
there S may be the tail's position, because every row after it reaches the
subscription live. The HTTP API reads SQL, so that a page always includes
what committed before the request.
"""

from __future__ import annotations

from typing import Protocol

import trio

from relay.core.recent import RecentRows
from relay.core.subscription import CatchUpPage, CatchUpQuery
from relay.db.authorize import Authorizer
from relay.server.metrics import Metrics

__all__ = ["FRESH_WAIT_S", "RecentResumes"]

#: How long an answer waits for a tail step read after the subscribe before the
#: read goes to SQL instead (the tail steps within milliseconds when it is well).
FRESH_WAIT_S = 2.0


class Tail(Protocol):
    def ring(self) -> None:
        """Step now."""

    async def stepped(self) -> None:
        """Until the next step was delivered."""


class RecentResumes:
    def __init__(
        self, rows: RecentRows, tail: Tail, authorizer: Authorizer, metrics: Metrics
    ) -> None:
        self.rows = rows
        self.tail = tail
        self.authorizer = authorizer
        self.metrics = metrics

    def mark(self) -> int:
        """Called when a subscription asks (right after it began following the
        tail): the tail steps at once, and `read` waits for that step."""
        self.tail.ring()
        return self.rows.mark()

    def may_answer(self, query: CatchUpQuery) -> bool:
        """Whether `read` is worth trying (a first read the recent rows cover)."""
        return query.head is None and self.rows.covers(query.since)

    async def read(self, claims_json: str, query: CatchUpQuery, mark: int) -> CatchUpPage | None:
        """The first read's answer, or None when the recent rows cannot give it
        (the caller reads SQL). `mark`: `rows.mark()` when the subscription
        asked. Raises ReadFailed like SQL reads."""
        asked = await self.authorizer.ask(claims_json, query.org)
        rows = self.rows
        with trio.move_on_after(FRESH_WAIT_S):
            while not rows.fresh(mark):
                await self.tail.stepped()
        head, epoch = rows.head, rows.epoch
        since = query.since
        if head is None or not rows.fresh(mark) or not rows.covers(since):
            return None
        if not asked.allowed or since is None:
            missed = []
        else:
            answer = rows.answer(epoch, query.org, since, query.page_rows)
            if answer is None:
                return None
            missed = answer
        self.metrics.resumes_from_memory.inc()
        count = min(len(missed), query.count_limit) if query.count_limit else 0
        # The horizon, as in SQL: a cursor behind retention resyncs (cursor_expired)
        # even though the recent rows may still hold what retention deleted.
        return CatchUpPage(asked.allowed, epoch, head, asked.horizon, count, missed)
