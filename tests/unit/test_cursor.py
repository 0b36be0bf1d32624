"""Snapshots, cursors and plan_resume."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.cursor import (
    MAX_CURSOR_CHARS,
    MAX_CURSOR_XIP,
    MAX_XID,
    TOO_FAR_BEHIND,
    BadCursor,
    CatchUp,
    Cursor,
    Fresh,
    Replay,
    Resync,
    ResyncReason,
    Snapshot,
    StreamPosition,
    TailPosition,
    decode_cursor,
    handed_over,
    plan_resume,
    seen_through,
    tail_page_cursors,
)

EPOCH = "7301234567890123456:1"


# -- Snapshot --


def test_parse_and_format_pg_snapshot() -> None:
    snap = Snapshot.parse("742:745:742,744")
    assert snap == Snapshot(742, 745, (742, 744))
    assert str(snap) == "742:745:742,744"
    assert str(Snapshot.parse("100:100:")) == "100:100:"
    big = f"{MAX_XID - 1}:{MAX_XID}:{MAX_XID - 1}"
    assert str(Snapshot.parse(big)) == big


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1:2",
        "1:2:3:4",
        "a:2:",
        "2:1:",
        "1:5:0",
        "1:5:5",
        "1:5:3,2",
        "1:5:3,3",
        "-1:2:",
        f"0:{MAX_XID + 1}:",
        "1:5:3,",
        " 1:5:",
        "1:5:٣",
    ],
)
def test_parse_rejects_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        Snapshot.parse(text)


def test_visibility() -> None:
    snap = Snapshot(742, 745, (742, 744))
    assert snap.visible(700)  # finished before xmin
    assert not snap.visible(742)  # in progress
    assert snap.visible(743)  # committed between xmin and xmax
    assert not snap.visible(744)
    assert not snap.visible(745)  # not yet started
    assert not snap.visible(10**6)


def test_narrowed_sees_a_subset() -> None:
    snap = Snapshot(10, 100, (10, 20, 30, 40))
    narrow = snap.narrowed(2)
    assert narrow == Snapshot(10, 30, (10, 20))
    for xid in range(0, 120):
        assert not narrow.visible(xid) or snap.visible(xid)
    assert snap.narrowed(4) is snap


# -- Cursor encoding --


def test_cursor_round_trip_and_is_url_safe() -> None:
    cursor = Cursor(EPOCH, Snapshot(742, 745, (742, 744)))
    text = cursor.encode()
    assert text.startswith("1.")
    assert all(c.isalnum() or c in "-_." for c in text)
    assert decode_cursor(text) == cursor


def test_cursor_with_huge_xip_is_narrowed_to_fit() -> None:
    xip = tuple(range(1000, 1000 + 10 * (MAX_CURSOR_XIP + 50), 10))
    snap = Snapshot(1000, xip[-1] + 1, xip)
    text = Cursor(EPOCH, snap).encode()
    assert len(text) <= MAX_CURSOR_CHARS
    decoded = decode_cursor(text)
    assert isinstance(decoded, Cursor)
    assert len(decoded.snapshot.xip) <= MAX_CURSOR_XIP
    assert decoded.snapshot == snap.narrowed(len(decoded.snapshot.xip))


def test_cursor_with_huge_gaps_is_narrowed_to_fit_the_length_cap() -> None:
    xip = tuple(2**40 + i * 2**50 for i in range(MAX_CURSOR_XIP))
    snap = Snapshot(xip[0], MAX_XID, xip)
    text = Cursor(EPOCH, snap).encode()
    assert len(text) <= MAX_CURSOR_CHARS
    assert isinstance(decode_cursor(text), Cursor)


def test_epoch_too_long_is_our_bug() -> None:
    with pytest.raises(ValueError):
        Cursor("x" * 256, Snapshot(1, 1)).encode()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1.",
        "1",
        "2." + Cursor(EPOCH, Snapshot(1, 2)).encode()[2:],
        "1.!!!!",
        "1.A",
        "1.AAAA.x",
        "1." + "A" * 5000,
        Cursor(EPOCH, Snapshot(1, 2)).encode() + "A",
        Cursor(EPOCH, Snapshot(1, 2)).encode()[:-2],
        "1.____________",
        " " + Cursor(EPOCH, Snapshot(1, 2)).encode(),
    ],
)
def test_junk_cursors_are_values(text: str) -> None:
    assert isinstance(decode_cursor(text), BadCursor)


def test_non_canonical_spelling_is_rejected() -> None:
    text = Cursor("e", Snapshot(1, 2)).encode()
    # Flip the unused low bits of the last base64 character.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(text[-1])
    variants = {text[:-1] + alphabet[last ^ b] for b in (1, 2, 3)}
    assert any(isinstance(decode_cursor(v), BadCursor) for v in variants)


def test_non_string_cursor_is_a_value() -> None:
    assert isinstance(decode_cursor(5), BadCursor)
    assert isinstance(decode_cursor(None), BadCursor)


@given(st.text())
def test_decode_never_raises_on_text(text: str) -> None:
    assert isinstance(decode_cursor(text), Cursor | BadCursor)


@given(st.binary(max_size=64))
def test_decode_never_raises_on_any_payload(data: bytes) -> None:
    import base64

    text = "1." + base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    decoded = decode_cursor(text)
    if isinstance(decoded, Cursor):
        assert decoded.encode() == text


snapshots = st.builds(
    lambda xmin, span, offsets: Snapshot(
        xmin, xmin + span, tuple(sorted({xmin + o % span for o in offsets})) if span else ()
    ),
    st.integers(0, 2**63),
    st.integers(0, 2**20),
    st.lists(st.integers(0, 2**20), max_size=40),
)


@given(st.text(max_size=40), snapshots)
def test_round_trip_property(epoch: str, snap: Snapshot) -> None:
    if len(epoch.encode("utf-8", "surrogatepass")) > 255:
        return
    try:
        epoch.encode("utf-8")
    except UnicodeEncodeError:
        return
    cursor = Cursor(epoch, snap)
    assert decode_cursor(cursor.encode()) == cursor


# -- plan_resume --

HEAD = Snapshot(1000, 1010, (1000, 1005))


def plan(text: str | None, horizon: int | None = None, epoch: str = EPOCH) -> object:
    return plan_resume(text, epoch=epoch, head=HEAD, retention_horizon=horizon)


def cur(snap: Snapshot, epoch: str = EPOCH) -> str:
    return Cursor(epoch, snap).encode()


def test_no_cursor_starts_fresh() -> None:
    assert plan(None) == Fresh()


def test_valid_cursor_replays_from_its_snapshot() -> None:
    since = Snapshot(900, 950, (900, 920))
    assert plan(cur(since)) == Replay(since)
    assert plan(cur(HEAD)) == Replay(HEAD)


def test_bad_cursor() -> None:
    assert plan("garbage") == Resync(ResyncReason.BAD_CURSOR)
    assert plan("") == Resync("bad_cursor")  # type: ignore[arg-type]


def test_epoch_changed() -> None:
    assert plan(cur(Snapshot(900, 950), epoch="other:1")) == Resync(ResyncReason.EPOCH_CHANGED)


def test_cursor_from_the_future_is_bad() -> None:
    assert plan(cur(Snapshot(1011, 1011))) == Resync(ResyncReason.BAD_CURSOR)
    assert plan(cur(Snapshot(1000, 1010))) == Replay(Snapshot(1000, 1010))


def test_retention_exactly_at_the_edge() -> None:
    since = Snapshot(900, 950, (900, 920))
    # Everything below 900 was visible in the cursor: deleting it loses nothing.
    assert plan(cur(since), horizon=899) == Replay(since)
    # xid 900 was in progress in the cursor: its rows may be gone.
    assert plan(cur(since), horizon=900) == Resync(ResyncReason.CURSOR_EXPIRED)
    assert plan(cur(since), horizon=10**9) == Resync(ResyncReason.CURSOR_EXPIRED)
    assert plan(cur(since), horizon=None) == Replay(since)


def test_retention_with_no_in_progress_xids() -> None:
    since = Snapshot(950, 950)
    assert plan(cur(since), horizon=949) == Replay(since)
    assert plan(cur(since), horizon=950) == Resync(ResyncReason.CURSOR_EXPIRED)


@given(snapshots, st.integers(0, 2**64 - 1))
def test_retention_decision_is_exact(since: Snapshot, horizon: int) -> None:
    head = Snapshot(since.xmax, since.xmax)
    got = plan_resume(cur(since), epoch=EPOCH, head=head, retention_horizon=horizon)
    # Some deleted xid (<= horizon) invisible in the cursor <=> expired.
    lost = any(not since.visible(x) for x in (*since.xip, since.xmax) if x <= horizon)
    assert got == (Resync(ResyncReason.CURSOR_EXPIRED) if lost else Replay(since))


def test_too_far_behind_constant() -> None:
    assert Resync(ResyncReason.TOO_FAR_BEHIND) == TOO_FAR_BEHIND
    assert {r.value for r in ResyncReason} == {
        "cursor_expired",
        "too_far_behind",
        "overflow",
        "epoch_changed",
        "bad_cursor",
    }


# -- which cursor each frame carries --------------------------------------------------


@given(snapshots, st.integers(0, 2**20), st.integers(0, 2**20), st.lists(st.integers(0, 2**20)))
def test_seen_through_sees_exactly_the_since_rows_and_the_head_rows_below_the_bound(
    head: Snapshot, back: int, below_off: int, probes: list[int]
) -> None:
    # `since` is an older snapshot: what it sees, the head sees too.
    since = Snapshot(
        max(0, head.xmin - back),
        max(0, head.xmin - back) + (head.xmax - head.xmin) // 2,
        (),
    )
    since = Snapshot(since.xmin, min(since.xmax, head.xmin), ())
    below = head.xmin + below_off
    seen = seen_through(since, head, below)
    for xid in [*probes, *(head.xmin + p for p in probes), since.xmax, below, head.xmax]:
        expected = since.visible(xid) or (xid < below and head.visible(xid))
        assert seen.visible(xid) is expected, (since, head, below, xid)


def test_seen_through_the_head_is_the_head_and_before_anything_is_since() -> None:
    since = Snapshot(90, 100, (95,))
    head = Snapshot(100, 120, (100, 110))
    assert seen_through(since, head, head.xmax) == head
    nothing_yet = seen_through(since, head, 0)
    assert [x for x in range(80, 130) if nothing_yet.visible(x)] == [
        x for x in range(80, 130) if since.visible(x)
    ]
    mid = seen_through(since, head, 105)
    assert [x for x in range(80, 130) if mid.visible(x)] == [
        x for x in range(80, 130) if since.visible(x) or (x < 105 and head.visible(x))
    ]


def test_a_catch_up_page_cursor_covers_every_smaller_xid() -> None:
    catch_up = CatchUp(EPOCH, Snapshot(50, 60, (55,)), Snapshot(70, 80, (72,)))
    before = decode_cursor(catch_up.cursor_before(75))
    assert isinstance(before, Cursor)
    # 55 was in progress at since but committed before the head: replayed below 75.
    # 72 is in progress at the head: owed by live delivery.
    assert [x for x in range(40, 90) if not before.snapshot.visible(x)] == [72, *range(75, 90)]
    assert decode_cursor(catch_up.head_cursor) == Cursor(EPOCH, catch_up.head)


def test_the_tail_page_rule_gives_an_orgs_last_row_the_head() -> None:
    orgs = ["a", "b", "a", "c", "a"]
    assert tail_page_cursors(orgs, "P", "S") == ["P", "S", "P", "S", "S"]
    assert tail_page_cursors(orgs, "P", None) == ["P"] * 5  # not the step's last page


def test_the_handover_rule_drops_what_the_catch_up_snapshot_saw() -> None:
    head = Snapshot(100, 110, (104,))
    assert handed_over(head, 99) and handed_over(head, 103)
    assert not handed_over(head, 104) and not handed_over(head, 110)


def test_the_tail_position_is_a_cursor_once_started() -> None:
    position = TailPosition()
    with pytest.raises(RuntimeError):
        position.cursor()
    position.epoch, position.snapshot = EPOCH, HEAD
    assert decode_cursor(position.cursor()) == Cursor(EPOCH, HEAD)


@given(snapshots, snapshots, st.lists(st.integers(0, 2**63 + 2**21), max_size=30))
def test_meet_sees_exactly_what_both_see(a: Snapshot, b: Snapshot, probes: list[int]) -> None:
    m = a.meet(b)
    for xid in [*probes, a.xmax, b.xmax, *a.xip, *b.xip]:
        assert m.visible(xid) is (a.visible(xid) and b.visible(xid))


def test_a_stream_position_is_safe_for_every_org_of_the_stream() -> None:
    start = Cursor(EPOCH, Snapshot(100, 100))
    stream = StreamPosition(start, ["a", "b"])
    # org a moves ahead; b has not answered yet: the stream stays at b's start.
    first = stream.advance("a", Cursor(EPOCH, Snapshot(150, 150)).encode())
    assert first is not None and decode_cursor(first) == Cursor(EPOCH, Snapshot(100, 100))
    both = stream.advance("b", Cursor(EPOCH, Snapshot(120, 130, (120,))).encode())
    decoded = decode_cursor(both or "")
    assert isinstance(decoded, Cursor)
    assert decoded.snapshot == Snapshot(120, 130, (120,))  # the meet of 150:150 and b's
    # A fresh stream ignores orgs that have not received anything yet.
    fresh = StreamPosition(None, ["a", "b"])
    only_a = Cursor(EPOCH, Snapshot(10, 10)).encode()
    assert fresh.advance("a", only_a) == only_a
    # An epoch change half-way: the stream keeps an old-database cursor (a resume resyncs).
    moved = stream.advance("a", Cursor("other", Snapshot(5, 5)).encode())
    assert moved is not None and decode_cursor(moved).epoch == EPOCH  # type: ignore[union-attr]
    assert stream.advance("zzz", only_a) is None and stream.advance("a", "junk") is None
