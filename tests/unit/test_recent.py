"""The recent rows (relay.core.recent) against the modelled events table: every
answer is exactly what a catch-up in SQL would read, and recent cursors are
answered at all."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.cursor import Snapshot
from relay.core.protocol import EventRow
from relay.core.recent import RecentRows
from tests.unit.support import EPOCH, Table

ORGS = [uuid.UUID(int=i + 1) for i in range(3)]


def missed(table: Table, org: uuid.UUID, since: Snapshot, head: Snapshot) -> list[EventRow]:
    """The oracle: what the catch-up SQL reads for `since` up to `head`."""
    return sorted(
        (
            r
            for r in table.rows
            if r.org == org and head.visible(r.xid) and not since.visible(r.xid)
        ),
        key=lambda r: (r.xid, r.id),
    )


class World:
    """A table, a tail stepping over it into a ring, and cursors taken along the way."""

    def __init__(self, capacity: int) -> None:
        self.table = Table()
        self.ring = RecentRows(capacity)
        self.position = self.table.snapshot()
        self.ring.reset(EPOCH, self.position)
        self.cursors: list[Snapshot] = [self.position]

    def step(self, pages: int = 1) -> None:
        read = self.ring.read_begins()
        rows, head = self.table.tail(self.position)
        size = max(1, -(-len(rows) // pages))
        for i in range(0, len(rows), size):
            self.ring.add(rows[i : i + size])
        self.ring.step_done(head, read)
        self.position = head


operations = st.lists(
    st.one_of(
        st.tuples(st.just("begin"), st.integers(0, 2), st.integers(1, 4)),
        st.tuples(st.just("commit"), st.integers(0, 5)),
        st.tuples(st.just("rollback"), st.integers(0, 5)),
        st.tuples(st.just("step"), st.integers(1, 3)),
        st.tuples(st.just("cursor"), st.integers(0, 1)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=operations, capacity=st.integers(0, 12), limit=st.integers(1, 8))
def test_every_answer_is_exactly_the_catch_up(
    ops: list[tuple[object, ...]], capacity: int, limit: int
) -> None:
    w = World(capacity)
    for op in ops:
        kind = op[0]
        if kind == "begin":
            xid = w.table.begin()
            w.table.insert(xid, ORGS[int(op[1])], int(op[2]))  # type: ignore[call-overload]
        elif kind in ("commit", "rollback") and w.table.open:
            xids = sorted(w.table.open)
            xid = xids[int(op[1]) % len(xids)]  # type: ignore[call-overload]
            w.table.commit(xid) if kind == "commit" else w.table.rollback(xid)
        elif kind == "step":
            w.step(int(op[1]))  # type: ignore[call-overload]
        elif kind == "cursor":
            # A client's cursor: the tail's position, or any snapshot of the moment.
            w.cursors.append(w.position if op[1] else w.table.snapshot())
        for since in w.cursors:
            for org in ORGS:
                answer = w.ring.answer(EPOCH, org, since, limit)
                if answer is None:
                    continue
                head = w.ring.head
                assert head is not None and head == w.position
                assert answer == missed(w.table, org, since, head)
                assert len(answer) < limit


def test_a_recent_cursor_is_answered_and_an_old_one_is_not() -> None:
    w = World(capacity=6)
    org = ORGS[0]
    w.table.emit(org, 2)
    w.step()
    at = w.position
    w.table.emit(org, 2)
    w.table.emit(ORGS[1], 1)
    w.step()
    assert [r.id for r in w.ring.answer(EPOCH, org, at, 100) or []] == [3, 4]
    assert w.ring.answer(EPOCH, ORGS[2], at, 100) == []
    assert w.ring.answer("another-epoch", org, at, 100) is None
    assert w.ring.answer(EPOCH, org, at, 2) is None  # as many as the limit: SQL pages them
    w.table.emit(org, 3)
    w.step()  # 8 rows > 6: the oldest step (2 rows) goes, R0 moves to `at`
    assert w.ring.rows == 6
    assert w.ring.start == at
    assert [r.id for r in w.ring.answer(EPOCH, org, at, 100) or []] == [3, 4, 6, 7, 8]
    first = w.cursors[0]
    assert w.ring.answer(EPOCH, org, first, 100) is None  # older than R0


def test_a_cursor_newer_than_the_tail_goes_to_sql() -> None:
    w = World(capacity=100)
    w.table.emit(ORGS[0], 1)
    ahead = w.table.snapshot()  # another daemon's tail already saw it
    assert w.ring.answer(EPOCH, ORGS[0], ahead, 100) is None
    w.step()
    assert w.ring.answer(EPOCH, ORGS[0], ahead, 100) == []


def test_a_transaction_in_progress_at_the_cursor_is_replayed_when_it_commits() -> None:
    w = World(capacity=100)
    org = ORGS[0]
    slow = w.table.begin()
    w.table.insert(slow, org, 2)
    w.table.emit(org, 1)
    w.step()
    cursor = w.position  # sees the single row, not `slow`
    w.table.emit(org, 1)
    w.table.commit(slow)
    w.step()
    answer = w.ring.answer(EPOCH, org, cursor, 100)
    assert answer is not None
    assert [(r.xid, r.id) for r in answer] == sorted((r.xid, r.id) for r in answer)
    assert {r.id for r in answer} == {1, 2, 4}


def test_capacity_zero_answers_nothing_and_a_huge_step_empties_the_ring() -> None:
    off = World(capacity=0)
    off.table.emit(ORGS[0], 1)
    off.step()
    assert off.ring.answer(EPOCH, ORGS[0], off.cursors[0], 100) is None
    small = World(capacity=3)
    small.table.emit(ORGS[0], 5)
    small.step()
    assert small.ring.rows == 0
    assert small.ring.start == small.position
    assert small.ring.answer(EPOCH, ORGS[0], small.position, 100) == []


def test_a_cursor_taken_between_steps_gets_only_what_it_did_not_see() -> None:
    w = World(capacity=100)
    org = ORGS[0]
    w.table.emit(org, 1)
    between = w.table.snapshot()  # a catch-up's S, taken while the tail had not stepped
    w.table.emit(org, 1)
    w.step()  # one step brings both rows
    assert [r.id for r in w.ring.answer(EPOCH, org, between, 100) or [-1]] == [2]


def test_an_answer_needs_a_step_read_after_the_ask() -> None:
    w = World(capacity=100)
    org = ORGS[0]
    w.table.emit(org, 1)
    read = w.ring.read_begins()  # a step's read began...
    rows, head = w.table.tail(w.position)
    mark = w.ring.mark()  # ...then a subscription asked
    w.table.emit(org, 1)  # (committed before the subscribe was read: S must see it)
    w.ring.add(rows)
    w.ring.step_done(head, read)
    w.position = head
    assert not w.ring.fresh(mark)
    w.step()
    assert w.ring.fresh(mark)
    assert [r.id for r in w.ring.answer(EPOCH, org, w.cursors[0], 100) or []] == [1, 2]
