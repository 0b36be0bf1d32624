"""Coalescing window (coalesce_ms)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.coalesce import CoalescedEvent, Coalescer
from relay.core.protocol import EventRow

ORG = uuid.UUID(int=7)


def row(id: int, entity_id: str = "42", event_type: str = "job.updated") -> EventRow:
    return EventRow(id, ORG, event_type, "job", entity_id, None, "{}", "t", id)


def test_three_updates_of_job_42_collapse_and_job_43_stays_separate() -> None:
    c = Coalescer(0.25)
    assert c.add(row(1, "42"), "c1", 0.00) == []
    assert c.add(row(2, "43"), "c1", 0.05) == []
    assert c.add(row(3, "42"), "c2", 0.10) == []
    assert c.add(row(4, "42"), "c3", 0.20) == []
    assert c.next_deadline() == 0.25
    assert c.due(0.24) == []
    out = c.due(0.30)
    assert [(e.row.id, e.row.entity_id, e.count) for e in out] == [(2, "43", 1), (4, "42", 3)]
    assert len(c) == 0 and c.next_deadline() is None


def test_window_is_not_extended_by_later_events() -> None:
    c = Coalescer(1.0)
    for i in range(10):
        c.add(row(i + 1), "c", i * 0.09)
    assert c.next_deadline() == 1.0
    assert [e.count for e in c.due(1.0)] == [10]


def test_different_event_types_are_different_keys() -> None:
    c = Coalescer(0.1)
    c.add(row(1, event_type="job.updated"), "c", 0.0)
    c.add(row(2, event_type="job.deleted"), "c", 0.0)
    assert [e.count for e in c.due(1.0)] == [1, 1]


def test_only_closed_windows_are_due() -> None:
    c = Coalescer(0.5)
    c.add(row(1, "a"), "c1", 0.0)
    c.add(row(2, "b"), "c2", 0.4)
    assert [e.row.id for e in c.due(0.5)] == [1]
    assert c.next_deadline() == pytest.approx(0.9)
    assert [e.row.id for e in c.due(0.9)] == [2]


def test_a_delivered_cursor_never_skips_held_events() -> None:
    # Job 42 at cursor c1, job 43 at c2, job 42 again at c3: job 42 comes due
    # first but job 43 (seen at c2) is still held, so 42 must carry c2 at most.
    c = Coalescer(0.3)
    c.add(row(1, "42"), "c1", 0.0)
    c.add(row(5, "43"), "c2", 0.2)
    c.add(row(9, "42"), "c3", 0.25)
    assert c.due(0.3) == [CoalescedEvent(row(9, "42"), "c2", 2)]
    assert c.due(0.5) == [CoalescedEvent(row(5, "43"), "c2", 1)]


def test_flush_order_is_newest_id_and_cursors_are_suffix_minimum() -> None:
    c = Coalescer(1.0)
    c.add(row(10, "a"), "c1", 0.0)
    c.add(row(3, "b"), "c2", 0.0)  # lower id, later batch
    out = c.due(1.0)
    assert [(e.row.id, e.cursor) for e in out] == [(3, "c1"), (10, "c1")]


def test_bounded_full_coalescer_flushes_before_taking_a_new_key() -> None:
    c = Coalescer(10.0, max_keys=2)
    c.add(row(1, "a"), "c", 0.0)
    c.add(row(2, "b"), "c", 0.0)
    assert c.add(row(3, "a"), "c", 0.0) == []  # existing key: no growth
    out = c.add(row(4, "z"), "c", 0.0)
    assert [(e.row.id, e.count) for e in out] == [(2, 1), (3, 2)]
    assert len(c) == 1
    assert [e.row.id for e in c.drain()] == [4]


def test_invalid_window_is_our_bug() -> None:
    with pytest.raises(ValueError):
        Coalescer(0)


@given(
    st.lists(st.tuples(st.sampled_from("abcd"), st.floats(0, 0.2)), min_size=1, max_size=40),
    st.floats(0.01, 0.5),
)
def test_every_event_is_accounted_for_and_cursors_never_skip(
    events: list[tuple[str, float]], window: float
) -> None:
    # Event number n has id n + 1 and cursor n: cursors grow with arrival.
    c = Coalescer(window, max_keys=3)
    now = 0.0
    delivered: list[CoalescedEvent] = []
    for n, (key, dt) in enumerate(events):
        now += dt
        delivered += c.due(now)
        delivered += c.add(row(n + 1, key), str(n), now)
    delivered += c.drain()
    assert sum(e.count for e in delivered) == len(events)
    # Resuming from any delivered cursor replays every event delivered after it.
    for i, event in enumerate(delivered):
        for later in delivered[i:]:
            assert int(event.cursor) <= later.row.id - 1
