"""One subscription's life, pending -> catching_up -> live: exact catch-up at any
size, paced by the client's socket, with an exact handover to live rows.

Driven through the Session the way the shell drives it (tests/unit/support.py),
against a model of the events table; what the client received is the check.
"""

from __future__ import annotations

import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.codes import CloseCode
from relay.core.outbox import OutputLimits
from relay.core.protocol import is_valid_event_glob
from relay.core.session import Close, SessionLimits
from relay.core.subscription import CatchUpLimits, EventFilter, Phase, glob_matches
from tests.unit.support import Harness, Pipe, Table, snapshot_of

ORG = uuid.UUID("0b7e6d1c-2f4a-4c1e-9a53-3d6f0c2b8e11")
OTHER = uuid.UUID("5f0c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b")


def limits(**catch_up: int) -> SessionLimits:
    return SessionLimits(catch_up=CatchUpLimits(**catch_up))


def resumed(h: Harness, missed: int, **extra: object) -> list[int]:
    """Take a cursor, emit `missed` events, resume from the cursor."""
    cursor = h.table.cursor()
    rows = h.table.emit(ORG, missed)
    h.tail_at = h.table.snapshot()  # the tail is current
    h.ready()
    h.subscribe(ORG, cursor, **extra)
    return [r.id for r in rows]


def subscribed_frame(h: Harness) -> dict[str, object]:
    found = [f for f in h.frames() if f["type"] == "subscribed"]
    assert len(found) == 1, h.frames()
    return found[0]


# -- exact replay at any size ------------------------------------------------------


def test_a_fast_reader_gets_every_missed_event_once_then_subscribed() -> None:
    h = Harness(limits=limits(page_rows=500))
    expected = resumed(h, 5000)
    h.settle()
    assert h.events() == expected
    frame = subscribed_frame(h)
    assert frame["replayed"] == 5000
    assert [f["type"] for f in h.frames()][-1] == "subscribed"
    assert snapshot_of(str(frame["cursor"])) == h.table.snapshot()
    assert h.stats.outbox_overflows == 0 and h.stats.catch_up_events == 5000


def test_a_slow_reader_gets_the_whole_replay_and_memory_stays_about_one_page() -> None:
    # The kernel holds 8 KiB and the client reads 3 KiB at a time: a replay of
    # ~1.2 MB must go through without overflow, holding at most 1.5 pages.
    pipe = Pipe(kernel_bytes=8 * 1024, unsent_bound=64 * 1024)
    h = Harness(limits=limits(page_rows=400), pipe=pipe)
    expected = resumed(h, 3000)
    sub = h.followed[ORG]
    peak = 0
    for _ in range(100_000):
        h.answer()
        pipe.read(3 * 1024)
        peak = max(peak, len(sub._page))
        assert h.output.backlog_bytes <= 64 * 1024 + 32 * 1024
        if any(f["type"] == "subscribed" for f in h.frames()[-1:]):
            break
    assert h.events() == expected
    assert subscribed_frame(h)["replayed"] == 3000
    assert peak <= 600
    assert h.stats.outbox_overflows == 0 and not h.closed


def test_pages_are_read_only_when_the_socket_has_room() -> None:
    pipe = Pipe(kernel_bytes=4 * 1024)
    h = Harness(limits=limits(page_rows=100), pipe=pipe)
    resumed(h, 1000)
    h.answer()  # the first page: 100 rows, more than the kernel and the room take
    assert h.reads == [] and h.output.backlog_bytes >= 32 * 1024 - 1024
    assert not h.output.has_room()
    pipe.read(2 * 1024)  # the client reads a little: still no room, no read
    assert h.reads == []
    h.settle()
    assert len(h.events()) == 1000


def test_a_client_that_stops_reading_mid_replay_is_cut_off_4008_at_the_stall_deadline() -> None:
    pipe = Pipe(kernel_bytes=4 * 1024)
    h = Harness(
        limits=limits(page_rows=100),
        pipe=pipe,
        output_limits=OutputLimits(max_stall_s=30.0),
    )
    resumed(h, 1000)
    h.answer()
    assert h.ticks and min(t for t in h.ticks if t > 0) <= 30.0
    h.apply(h.session.tick(29.0))
    assert not h.closed
    h.apply(h.session.tick(30.0))
    assert h.closed == [Close(CloseCode.TOO_SLOW, "too slow to keep up")]
    assert h.stats.slow_closes == 1


def test_replay_cursors_resume_from_the_page_the_client_was_on() -> None:
    h = Harness(limits=limits(page_rows=100))
    expected = resumed(h, 1000)
    h.settle()
    events = [f for f in h.frames() if f["type"] == "event"]
    # Resuming from the cursor of event 550 replays from that page's start, not from 1.
    page_start = snapshot_of(events[550]["cursor"])
    again = [r for r in h.table.rows if not page_start.visible(r.xid)]
    assert 450 <= len(again) <= 550
    assert set(expected[550:]) <= {r.id for r in again}
    # Resuming from the last event repeats at most its page; from subscribed, nothing.
    last = snapshot_of(events[-1]["cursor"])
    assert len([r for r in h.table.rows if not last.visible(r.xid)]) <= 100
    assert snapshot_of(str(subscribed_frame(h)["cursor"])) == h.table.snapshot()


def test_a_replay_of_whole_pages_ends_without_an_empty_read() -> None:
    h = Harness(limits=limits(page_rows=100))
    resumed(h, 300)
    reads = 0
    while h.reads:
        reads += h.answer(1)
        h.pipe.read()
    assert reads == 3  # the first read counted 300: no fourth, empty read
    assert subscribed_frame(h)["replayed"] == 300


def test_over_the_replay_limit_resyncs_too_far_behind() -> None:
    h = Harness(limits=limits(replay_limit=100))
    resumed(h, 101)
    h.settle()
    types = [f["type"] for f in h.frames()]
    assert types == ["ready", "resync", "subscribed"]
    assert h.frames()[1]["reason"] == "too_far_behind"
    assert subscribed_frame(h)["replayed"] == 0


def test_event_type_filter_applies_to_the_replay() -> None:
    h = Harness()
    cursor = h.table.cursor()
    h.table.emit(ORG, 3, event_type="job.updated")
    audit = h.table.emit(ORG, 2, event_type="audit.appended")
    h.ready()
    h.subscribe(ORG, cursor, event_types=["audit.*"])
    h.settle()
    assert h.events() == [r.id for r in audit]
    assert subscribed_frame(h)["replayed"] == 2


# -- the handover from catch-up to live ----------------------------------------------


def test_a_live_row_visible_in_s_is_dropped_and_one_not_in_s_follows_subscribed() -> None:
    h = Harness()
    cursor = h.table.cursor()
    h.table.emit(ORG, 3)
    h.ready()
    h.subscribe(ORG, cursor)  # the first read is asked for; S not taken yet
    before_s = h.table.emit(ORG, 1)  # commits before S
    h.answer()  # S taken now: it sees before_s
    h.step_tail()  # the tail offers the 3 rows and before_s: all visible in S
    after_s = h.table.emit(ORG, 1)
    h.step_tail()  # not visible in S: held, then after subscribed
    h.settle()
    ids = h.events()
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == 5
    types = [f["type"] for f in h.frames()]
    assert types.index("subscribed") == 5  # ready, 4 replayed, subscribed, the live one
    assert h.events()[-1] == after_s[0].id and before_s[0].id in ids


def test_rows_held_during_the_catch_up_follow_subscribed_in_order() -> None:
    pipe = Pipe(kernel_bytes=2 * 1024)
    h = Harness(limits=limits(page_rows=50), pipe=pipe)
    expected = resumed(h, 300)
    h.answer()  # the first page goes out, the catch-up is now paced by the client
    live = []
    for _ in range(40):
        live += h.table.emit(ORG, 1)
        h.step_tail()
        pipe.read(1024)
        h.answer()
    h.settle()
    frames = h.frames()
    ids = h.events()
    assert ids == expected + [r.id for r in live]
    assert [f["type"] for f in frames].index("subscribed") == 1 + len(expected)


def test_a_tail_lagging_behind_s_repeats_nothing() -> None:
    h = Harness()
    lagging_at = h.table.snapshot()  # the tail is stuck here (e.g. a slow step)
    h.table.emit(ORG, 5)
    h.ready()
    h.subscribe(ORG, None)  # fresh: S sees the 5 rows
    h.answer()
    h.tail_at = lagging_at
    h.step_tail()  # the lagging tail offers the 5 rows: all visible in S
    new = h.table.emit(ORG, 2)
    h.step_tail()
    h.settle()
    assert h.events() == [r.id for r in new]


def test_a_lagging_tail_after_a_resume_repeats_nothing_either() -> None:
    # Doorbell off, a long poll interval: the catch-up reads rows the tail will
    # only offer later. The 1,2,3,4,5,1,2,3,4,5.
    h = Harness()
    cursor = h.table.cursor()
    tail_at = h.table.snapshot()
    missed = h.table.emit(ORG, 5)
    h.ready()
    h.subscribe(ORG, cursor)
    h.settle()
    h.tail_at = tail_at
    h.step_tail()  # the timer step finally comes
    h.settle()
    assert h.events() == [r.id for r in missed]


def test_too_many_live_rows_during_a_catch_up_chase_the_head_instead_of_dropping() -> None:
    pipe = Pipe(kernel_bytes=2 * 1024)
    h = Harness(limits=limits(page_rows=50, max_held_rows=10), pipe=pipe)
    expected = resumed(h, 200)
    h.answer()
    live = []
    for _ in range(30):  # 30 live rows arrive while the client is still catching up
        live += h.table.emit(ORG, 1)
        h.step_tail()
    sub = h.followed[ORG]
    assert sub._held is None  # over the bound: dropped, to be read again
    h.settle()
    assert h.events() == expected + [r.id for r in live]
    assert subscribed_frame(h)["replayed"] == 230
    assert h.stats.catch_up_rounds >= 1
    assert sub.phase is Phase.LIVE


def test_a_fresh_subscription_whose_held_rows_overflow_chases_too() -> None:
    h = Harness(limits=limits(max_held_rows=3))
    h.ready()
    h.subscribe(ORG, None)
    read = h.reads.pop()
    page = h.table.read(read.query)  # S is taken now; the answer comes late
    live = []
    for _ in range(10):  # meanwhile live rows pile up beyond the bound
        live += h.table.emit(ORG, 1)
        h.step_tail()
    h.apply(h.session.catch_up_read(read.subscription, read.query, page, h.now))
    h.settle()
    assert sorted(h.events()) == [r.id for r in live]  # nothing lost
    assert len(h.events()) == len(set(h.events()))


def test_a_transaction_committing_late_inside_the_replay_window_is_delivered_once() -> None:
    h = Harness(limits=limits(page_rows=10))
    cursor = h.table.cursor()
    late = h.table.begin()  # open at S: not in the catch-up
    h.table.insert(late, ORG, 3)
    early = h.table.emit(ORG, 30)
    h.tail_at = h.table.snapshot()
    h.ready()
    h.subscribe(ORG, cursor)
    h.answer()
    late_rows = h.table.commit(late)
    h.step_tail()
    h.settle()
    assert sorted(h.events()) == sorted(r.id for r in early + late_rows)
    assert len(h.events()) == 33


def test_retention_mid_catch_up_resyncs_cursor_expired() -> None:
    pipe = Pipe(kernel_bytes=2 * 1024)
    h = Harness(limits=limits(page_rows=20), pipe=pipe)
    resumed(h, 100)
    h.answer(1)  # rows 1-20 read and on their way
    h.table.horizon[ORG] = h.table.rows[4].xid  # retention deleted rows already sent: fine
    h.settle()
    assert "resync" not in [f["type"] for f in h.frames()]

    h = Harness(limits=limits(page_rows=20), pipe=Pipe(kernel_bytes=2 * 1024))
    resumed(h, 100)
    h.answer(1)
    h.table.horizon[ORG] = h.table.rows[49].xid  # ... and rows not yet read: lost to the client
    h.settle()
    types = [f["type"] for f in h.frames()]
    assert "resync" in types and types[-1] == "subscribed"
    assert [f["reason"] for f in h.frames() if f["type"] == "resync"] == ["cursor_expired"]


def test_a_membership_revoked_mid_catch_up_unsubscribes_forbidden() -> None:
    pipe = Pipe(kernel_bytes=2 * 1024)
    h = Harness(limits=limits(page_rows=20), pipe=pipe)
    resumed(h, 100)
    h.answer(1)
    h.table.allowed = set()
    h.settle()
    last = h.frames()[-1]
    assert last["type"] == "unsubscribed" and last["reason"] == "forbidden"
    assert ORG not in h.followed


def test_a_forbidden_first_read_is_an_error_and_unfollows() -> None:
    h = Harness(table=Table(allowed={OTHER}))
    h.ready()
    h.subscribe(ORG, None)
    assert ORG in h.followed
    h.settle()
    assert h.frames()[-1]["code"] == "forbidden" and ORG not in h.followed


def test_the_database_changing_mid_catch_up_resyncs_epoch_changed() -> None:
    pipe = Pipe(kernel_bytes=2 * 1024)
    h = Harness(limits=limits(page_rows=20), pipe=pipe)
    resumed(h, 100)
    h.answer(1)
    h.table.epoch = "E2"
    h.settle()
    resyncs = [f for f in h.frames() if f["type"] == "resync"]
    assert [f["reason"] for f in resyncs] == ["epoch_changed"]
    assert h.frames()[-1]["type"] == "subscribed"


def test_unsubscribe_during_the_catch_up_makes_its_answer_stale() -> None:
    h = Harness()
    resumed(h, 10)
    read = h.reads.pop()
    h.send({"type": "unsubscribe", "ref": "u", "org": str(ORG)})
    page = h.table.read(read.query)
    assert h.session.catch_up_read(read.subscription, read.query, page, 0.0) == []
    h.settle()
    assert h.events() == [] and ORG not in h.followed


# -- the whole handover under random schedules ----------------------------------------

OPS = ["emit", "emit_other", "batch", "open", "commit", "tail", "read", "answer"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["emit", "emit_other", "batch", "open", "commit", "tail", "read", "answer"]
        ),
        max_size=80,
    ),
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=1, max_value=6),
    st.booleans(),
)
def test_any_interleaving_delivers_each_missed_and_live_row_exactly_once(
    ops: list[str], page_rows: int, max_held: int, with_cursor: bool
) -> None:
    pipe = Pipe(kernel_bytes=1500)
    h = Harness(limits=limits(page_rows=page_rows, max_held_rows=max_held), pipe=pipe)
    t = h.table
    t.emit(ORG, 2)
    opened: list[int] = []
    cursor = t.cursor() if with_cursor else None
    t.emit(ORG, 3)
    t.emit(OTHER, 2)
    h.ready()
    h.subscribe(ORG, cursor)
    baseline = snapshot_of(cursor) if cursor else None
    for op in ops:
        if op == "emit":
            t.emit(ORG, 1)
        elif op == "emit_other":
            t.emit(OTHER, 1)
        elif op == "batch":
            xid = t.begin()
            t.insert(xid, ORG, 3)
            t.commit(xid)
        elif op == "open":
            xid = t.begin()
            t.insert(xid, ORG, 2)
            opened.append(xid)
        elif op == "commit" and opened:
            t.commit(opened.pop(0))
        elif op == "tail":
            h.step_tail()
        elif op == "read":
            pipe.read(700)
        elif op == "answer":
            h.answer(1)
    for xid in opened:
        t.commit(xid)
    h.step_tail()
    h.settle()
    ids = h.events()
    assert len(ids) == len(set(ids)), "a repeat on one connection"
    first_s = h.frames()
    subscribed = [f for f in first_s if f["type"] == "subscribed"]
    assert len(subscribed) == 1
    # Fresh: everything not visible in S1 (the first read's snapshot).
    start = baseline if baseline is not None else h.first_heads[0]
    owed = {r.id for r in t.rows if r.org == ORG and not start.visible(r.xid)}
    assert set(ids) == owed
    assert all(f["org"] == str(ORG) for f in first_s if f["type"] == "event")


# -- event-type filters --------------------------------------------------------------


@pytest.mark.parametrize(
    ("globs", "event_type", "expected"),
    [
        (None, "anything.at.all", True),
        (("*",), "job", True),
        (("job.*",), "job.updated", True),
        (("job.*",), "job.step.done", True),
        (("job.*",), "job", False),
        (("job.*",), "jobs.updated", False),
        (("*.created",), "job.created", True),
        (("*.created",), "a.b.created", True),
        (("*.created",), "created", False),
        (("job.updated",), "job.updated", True),
        (("job.updated",), "job.updated.x", False),
        (("job.*.done",), "job.a.b.done", True),
        (("job.*.done",), "job.done", False),
        (("a.b", "c.*"), "c.d", True),
        (("a.b", "c.*"), "a.c", False),
    ],
)
def test_event_type_filters(globs: tuple[str, ...] | None, event_type: str, expected: bool) -> None:
    f = EventFilter(globs)
    assert f.matches(event_type) is expected
    assert f.matches(event_type) is expected  # cached verdict agrees
    assert f.filtered is (globs is not None and "*" not in globs)


def test_hostile_globs_do_not_backtrack() -> None:
    glob = ".".join(["*"] * 40 + ["x"])
    assert is_valid_event_glob(glob[:128])
    f = EventFilter((glob,))
    started = time.perf_counter()
    assert not f.matches(".".join(["a"] * 200))
    assert time.perf_counter() - started < 0.1


def test_verdict_cache_is_bounded() -> None:
    f = EventFilter(("job.*",))
    for i in range(1000):
        assert f.matches(f"job.t{i}")
    assert len(f._verdicts) <= 256


segments = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=6)


def reference_match(glob: list[str], parts: list[str]) -> bool:
    if not glob:
        return not parts
    if glob[0] == "*":
        return any(reference_match(glob[1:], parts[i:]) for i in range(1, len(parts) + 1))
    return bool(parts) and parts[0] == glob[0] and reference_match(glob[1:], parts[1:])


@given(st.lists(st.sampled_from(["a", "b", "*"]), min_size=1, max_size=5), segments)
def test_glob_matcher_agrees_with_a_reference(glob: list[str], parts: list[str]) -> None:
    assert glob_matches(tuple(glob), parts) is reference_match(glob, parts)
