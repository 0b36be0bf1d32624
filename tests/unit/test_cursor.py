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
    Cursor,
    Fresh,
    Replay,
    Resync,
    ResyncReason,
    Snapshot,
    decode_cursor,
    plan_resume,
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
