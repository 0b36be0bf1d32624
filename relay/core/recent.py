"""The recent rows: the last rows the tail delivered, kept in memory, so that a
resume from a recent cursor is answered without reading the events table.

A reconnect storm (a deploy's 1012, a network blip) brings thousands of
clients back at once, each having missed a few events. Read from SQL, each
resume costs a catch-up query on a pooled connection; answered here, it
costs a dictionary lookup. Authorization is not answered here: the shell
still asks SQL whether the org is allowed (`relay.user_organizations()`), so
a resume answered from memory shows a client exactly what the live path
would have shown it (the live path, too, filters by organization only).

What the ring knows: every row that is not visible in `start` (R0) but is
visible in `head` (the last completed step of the tail, H), grouped by
organization. A cursor C can be answered when R0 ⊆ C ⊆ H ("⊆": sees no more
than): the rows C misses are then exactly the ring's rows not visible in C,
and the rows after H come from the live tail as after any catch-up with S = H.
A cursor older than R0, from a newer tail than this one (another daemon), or
of another epoch, goes to SQL as before.

One more condition: H must come from a tail step that read its snapshot
after the subscription asked (`mark`; the tail is told to step at once).
Then S = H sees everything committed before the subscribe, as a snapshot
taken by SQL would, and, steps being fanned out one after the other, every
step whose fan-out began before the subscription followed the tail has
completed: its rows are in the ring, and every later row was offered to
the subscription live.

Bounded by rows (`capacity`): when a completed step brings the ring past it,
whole steps are dropped from the old end and R0 moves up to the newest
dropped step's head.
"""

from __future__ import annotations

import bisect
import uuid
from collections import deque
from collections.abc import Sequence

from relay.core.cursor import Snapshot
from relay.core.protocol import EventRow

__all__ = ["RecentRows"]


class _Step:
    __slots__ = ("counts", "head", "seq")

    def __init__(self, seq: int, head: Snapshot, counts: dict[uuid.UUID, int]) -> None:
        self.seq = seq
        self.head = head
        self.counts = counts
        """Rows per organization this step added."""


class RecentRows:
    """The tail's recent rows per organization (see the module docstring).

    The tail calls `reset` when it starts or the database changed, `add` with
    every page it delivers and `step_done` when a step ends; connections call
    `answer`. Pure: no I/O, no clock."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("RecentRows capacity must be >= 0")
        self.capacity = capacity
        """Most rows kept (0: keep none, answer nothing)."""
        self.epoch = ""
        self.start: Snapshot | None = None
        """R0: the ring holds every row not visible here (and visible in `head`)."""
        self.head: Snapshot | None = None
        """H: the last completed step."""
        self.rows = 0
        """Rows held (completed steps only)."""
        self._steps: deque[_Step] = deque()
        self._heads: list[Snapshot] = []
        """The steps' heads, oldest first (for the binary search in `answer`)."""
        self._first_seq = 0
        """The seq of `_heads[0]`."""
        self._by_org: dict[uuid.UUID, deque[tuple[int, EventRow]]] = {}
        self._pending: list[EventRow] = []
        self.steps_read = 0
        """Tail steps whose read began (the tail counts them; see `mark`)."""
        self.head_read = 0
        """The read number (`steps_read` at its start) of the step that gave `head`."""
        self._seq = 0

    def reset(self, epoch: str, start: Snapshot) -> None:
        """Empty, at `start` (the tail's first snapshot, or the new database's)."""
        self.epoch = epoch
        self.start = self.head = start
        self.rows = 0
        self._steps.clear()
        self._heads.clear()
        self._first_seq = self._seq + 1
        self._by_org.clear()
        self._pending.clear()
        self.head_read = self.steps_read

    def read_begins(self) -> int:
        """The tail begins a step's read; returns its read number."""
        self.steps_read += 1
        return self.steps_read

    def add(self, rows: Sequence[EventRow]) -> None:
        """Rows of the step in progress, before they are fanned out (kept apart
        until `step_done`)."""
        if self.capacity and self.start is not None:
            self._pending.extend(rows)

    def mark(self) -> int:
        """Taken when a subscription asks (it follows the tail from then on)."""
        return self.steps_read

    def fresh(self, mark: int) -> bool:
        """`head` comes from a step read after `mark` was taken."""
        return self.head_read > mark

    def step_done(self, head: Snapshot, read: int) -> None:
        """The step in progress (read number `read`) ended at `head`: its rows
        join the ring."""
        pending, self._pending = self._pending, []
        if self.start is None:
            return
        self.head_read = read
        if not self.capacity:
            self.start = self.head = head
            return
        self._seq += 1
        seq = self._seq
        counts: dict[uuid.UUID, int] = {}
        by_org = self._by_org
        for row in pending:
            org = row.org
            rows = by_org.get(org)
            if rows is None:
                rows = by_org[org] = deque()
            rows.append((seq, row))
            counts[org] = counts.get(org, 0) + 1
        if not self._steps:
            self._first_seq = seq
        self._steps.append(_Step(seq, head, counts))
        self._heads.append(head)
        self.rows += len(pending)
        self.head = head
        while self.rows > self.capacity and self._steps:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        step = self._steps.popleft()
        self._heads.pop(0)
        self._first_seq = step.seq + 1
        by_org = self._by_org
        for org, count in step.counts.items():
            rows = by_org[org]
            for _ in range(count):
                rows.popleft()
            if not rows:
                del by_org[org]
        self.rows -= sum(step.counts.values())
        self.start = step.head

    def covers(self, since: Snapshot | None) -> bool:
        """Whether `answer` can tell what a client at `since` missed (None: a
        fresh start, which needs only the head)."""
        start, head = self.start, self.head
        if start is None or head is None or not self.capacity:
            return False
        return since is None or (since.sees_all_of(start) and head.sees_all_of(since))

    def answer(
        self, epoch: str, org: uuid.UUID, since: Snapshot, limit: int
    ) -> list[EventRow] | None:
        """The rows of `org` that a client at `since` missed up to `head`, in
        (xid, id) order, or None when the ring cannot tell (see the module
        docstring) or they are `limit` or more (SQL pages those)."""
        head = self.head
        if epoch != self.epoch or head is None or not self.covers(since):
            return None
        rows = self._by_org.get(org)
        if not rows:
            return []
        # Steps up to the last head that `since` sees are wholly visible in it.
        heads = self._heads
        # (The heads grow: those `since` sees come first.)
        seen = bisect.bisect_left(heads, True, key=lambda h: not since.sees_all_of(h))
        newer_than = self._first_seq + seen - 1
        missed: list[EventRow] = []
        visible = since.visible
        for seq, row in reversed(rows):
            if seq <= newer_than:
                break
            if not visible(row.xid):
                missed.append(row)
                if len(missed) >= limit:
                    return None
        missed.sort(key=lambda r: (r.xid, r.id))
        return missed
