"""The soak's oracle on hand-made records: it must see a loss where there is
one, and only there (no database needed)."""

from __future__ import annotations

from typing import Any

from relay.core.cursor import Cursor, Snapshot
from tests.soak.oracle import Row, Verdict, judge

ORG_A = "00000000-0000-4000-8000-0000000000a1"
ORG_B = "00000000-0000-4000-8000-0000000000b2"


def cursor(xmin: int, xmax: int, xip: tuple[int, ...] = ()) -> str:
    return Cursor("epoch", Snapshot(xmin, xmax, xip)).encode()


def client(
    ids: list[int],
    *,
    first: str,
    org: str = ORG_A,
    conns: list[int] | None = None,
    resyncs: list[dict[str, Any]] | None = None,
    foreign: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "name": "c1",
        "orgs": [org],
        "drained": True,
        "ids": {org: ids},
        "conns": {org: conns or [1] * len(ids)},
        "first_subscribed": {org: first},
        "last_cursor": {org: cursor(200, 200)},
        "resyncs": resyncs or [],
        "log": [],
        "repeats_same_conn": 0,
        "repeats_after_reconnect": 0,
        "foreign": foreign or [],
        "errors": [],
    }


# Row 1 committed before the client subscribed (xid 100 visible in its first
# cursor); rows 2 and 3 after; row 4 is a late commit: a lower xid than row 3's,
# in progress when the client subscribed.
ROWS = [
    Row(1, ORG_A, 100, "s"),
    Row(2, ORG_A, 110, "s"),
    Row(3, ORG_A, 120, "s"),
    Row(4, ORG_A, 105, "l"),
    Row(5, ORG_B, 121, "s"),
]
FIRST = cursor(105, 106, (105,))  # sees xid 100, not 105 nor anything >= 106


def verdict(results: list[dict[str, Any]]) -> Verdict:
    return judge(Verdict(1, 1, 1, 2, len(ROWS)), ROWS, results, {"c1": "plain"})


def test_everything_after_the_first_cursor_received_passes() -> None:
    v = verdict([client([2, 3, 4], first=FIRST)])
    assert v.passed and v.lost == 0, v.details


def test_a_late_commit_that_never_arrived_is_lost() -> None:
    v = verdict([client([2, 3], first=FIRST)])
    assert v.lost == 1 and v.lost_by_kind == {"l": 1} and not v.passed
    assert "id=4 xid=105" in v.details[0]


def test_a_resync_excuses_what_its_cursor_covers_and_nothing_more() -> None:
    resync = {"t": 1, "conn": 2, "org": ORG_A, "reason": "overflow", "stopped": False}
    covered = verdict([client([3], first=FIRST, resyncs=[resync | {"cursor": cursor(111, 111)}])])
    assert covered.lost == 0 and covered.resyncs == {"overflow": 1}
    assert covered.resyncs_while_reading == 1
    short = verdict([client([], first=FIRST, resyncs=[resync | {"cursor": cursor(111, 111)}])])
    assert short.lost == 1  # row 3 (xid 120) is not visible in the resync cursor


def test_rows_of_another_org_and_rows_not_in_the_table_are_counted() -> None:
    v = verdict([client([2, 3, 4, 5, 99], first=FIRST)])
    assert v.cross_org == 1 and v.rolled_back_delivered == 1 and v.lost == 0
    v = verdict([client([2, 3, 4], first=FIRST, foreign=[{"conn": 1, "org": ORG_B, "id": 5}])])
    assert v.cross_org == 1 and not v.passed


def test_a_client_that_never_subscribed_owes_every_row_of_its_org() -> None:
    record = client([], first=FIRST)
    record["first_subscribed"] = {ORG_A: None}
    assert verdict([record]).lost == 4
