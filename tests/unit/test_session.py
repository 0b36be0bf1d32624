"""Per-connection state machine: what a client notices.

Catch-up and the handover to live are in test_subscription.py; this file covers
authentication, expiry, subscriptions' bookkeeping, rechecks, limits and junk.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.codes import CloseCode
from relay.core.outbox import Output
from relay.core.session import (
    Action,
    ClaimsJson,
    Close,
    Follow,
    ReadCatchUp,
    RecheckSubscriptions,
    ScheduleTick,
    Session,
    SessionLimits,
    SessionState,
    Unfollow,
    VerifyToken,
    claims_json,
)
from tests.unit.support import Pipe, Table, wrap

ORG = uuid.UUID("0b7e6d1c-2f4a-4c1e-9a53-3d6f0c2b8e11")
ORG2 = uuid.UUID("5f0c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b")
CLAIMS = {"sub": "user-1", "org_id": str(ORG)}
EXP = 10_000.0


class Client:
    """A session and the pipe its frames go through; `frames()` returns what the
    client received since the last call."""

    def __init__(self, now: float = 0.0, limits: SessionLimits | None = None) -> None:
        self.pipe = Pipe()
        self.s = Session("c1", now, Output(self.pipe, wrap=wrap), limits)
        self._seen = 0

    def frames(self) -> list[dict[str, Any]]:
        self.pipe.read()
        all_frames = self.pipe.frames()
        new, self._seen = all_frames[self._seen :], len(all_frames)
        return new


def acts(actions: Sequence[Action]) -> list[Action]:
    """The actions, without the tick requests (tested on their own)."""
    return [a for a in actions if not isinstance(a, ScheduleTick)]


def closes(actions: Sequence[Action]) -> list[Close]:
    return [a for a in actions if isinstance(a, Close)]


def auth(token: str = "tok") -> str:
    return json.dumps({"type": "auth", "token": token})


def subscribe(ref: str = "1", org: uuid.UUID = ORG, **extra: object) -> str:
    return json.dumps({"type": "subscribe", "ref": ref, "org": str(org), **extra})


def unsubscribe(ref: str = "2", org: uuid.UUID = ORG) -> str:
    return json.dumps({"type": "unsubscribe", "ref": ref, "org": str(org)})


def ping(ref: str = "3") -> str:
    return json.dumps({"type": "ping", "ref": ref})


def ready_client(now: float = 0.0, limits: SessionLimits | None = None) -> Client:
    c = Client(now, limits)
    assert acts(c.s.received_text(auth(), now)) == [VerifyToken("tok")]
    c.s.token_verified(CLAIMS, EXP, now)
    assert c.frames() == [{"type": "ready", "connection_id": "c1", "expires_at": int(EXP)}]
    assert c.s.state is SessionState.READY
    return c


def read_of(actions: Sequence[Action]) -> ReadCatchUp:
    reads = [a for a in actions if isinstance(a, ReadCatchUp)]
    assert len(reads) == 1, actions
    return reads[0]


def subscribed(c: Client, org: uuid.UUID = ORG, ref: str = "1") -> ReadCatchUp:
    read = read_of(c.s.received_text(subscribe(ref, org), 1.0))
    page = Table().read(read.query)
    c.s.catch_up_read(read.subscription, read.query, page, 1.0)
    assert c.frames()[-1]["type"] == "subscribed"
    return read


# -- authentication --


def test_subscribe_before_auth_is_refused_and_closes() -> None:
    c = Client()
    out = c.s.received_text(subscribe(), 0.0)
    assert c.frames() == [
        {"type": "error", "ref": "1", "code": "unauthorized", "message": "send auth first"}
    ]
    assert closes(out) == [Close(CloseCode.AUTH_TIMEOUT, "authenticate first")]
    assert c.s.state is SessionState.CLOSED
    assert c.s.received_text(auth(), 0.1) == []


def test_junk_before_auth_is_bad_request_and_closes() -> None:
    c = Client()
    out = c.s.received_text("{nope", 0.0)
    assert [f["code"] for f in c.frames()] == ["bad_request"]
    assert closes(out)[0].code == CloseCode.AUTH_TIMEOUT


def test_no_auth_in_time_closes_4002_at_the_deadline() -> None:
    c = Client(100.0)
    assert c.s.start(100.0) == [ScheduleTick(110.0)]
    assert acts(c.s.tick(109.99)) == []
    assert c.s.tick(110.0) == [Close(CloseCode.AUTH_TIMEOUT, "no auth in time")]
    assert c.s.next_deadline() is None


def test_auth_then_ready() -> None:
    c = ready_client()
    assert c.s.subject == "user-1"
    assert acts(c.s.tick(5.0)) == []


def test_bearer_header_replaces_the_auth_frame() -> None:
    c = Client()
    assert c.s.received_bearer("hdr", 0.0) == [VerifyToken("hdr")]
    c.s.token_verified(CLAIMS, EXP, 0.1)
    assert c.frames()[0]["type"] == "ready"


def test_rejected_token_closes_4001() -> None:
    c = Client()
    c.s.received_text(auth(), 0.0)
    out = c.s.token_rejected("signature invalid", 0.0)
    assert c.frames() == [
        {"type": "error", "ref": None, "code": "unauthorized", "message": "signature invalid"}
    ]
    assert closes(out) == [Close(CloseCode.TOKEN_INVALID, "token rejected")]


def test_already_expired_token_closes_4001() -> None:
    c = Client()
    c.s.received_text(auth(), 20_000.0)
    assert c.s.token_verified(CLAIMS, EXP, 20_000.0) == [
        Close(CloseCode.TOKEN_INVALID, "token expired")
    ]


def test_frames_sent_while_the_token_is_verified_are_handled_after_ready() -> None:
    c = Client()
    assert acts(c.s.received_text(auth(), 0.0)) == [VerifyToken("tok")]
    assert acts(c.s.received_text(subscribe(), 0.0)) == []
    assert acts(c.s.received_text(ping(), 0.0)) == []
    out = c.s.token_verified(CLAIMS, EXP, 0.01)
    assert [f["type"] for f in c.frames()] == ["ready", "pong"]
    read = read_of(out)
    assert (read.subscription.ref, read.query.org, read.claims) == ("1", ORG, CLAIMS)


def test_deferred_frames_are_bounded() -> None:
    c = Client(limits=SessionLimits(max_deferred_frames=2))
    c.s.received_text(auth(), 0.0)
    assert acts(c.s.received_text(ping(), 0.0)) == []
    assert acts(c.s.received_text(ping(), 0.0)) == []
    assert closes(c.s.received_text(ping(), 0.0))[0].code == CloseCode.TOO_MANY_BAD_FRAMES


def test_deferred_frames_dropped_when_token_rejected() -> None:
    c = Client()
    c.s.received_text(auth(), 0.0)
    c.s.received_text(subscribe(), 0.0)
    out = c.s.token_rejected("bad", 0.0)
    assert not any(isinstance(a, ReadCatchUp | Follow) for a in out)


def test_unrequested_verification_answer_is_a_shell_bug() -> None:
    c = Client()
    with pytest.raises(RuntimeError):
        c.s.token_verified(CLAIMS, EXP, 0.0)


def test_late_answers_after_close_are_ignored() -> None:
    c = Client()
    c.s.received_text(auth(), 0.0)
    c.s.tick(11.0)
    assert c.s.token_verified(CLAIMS, EXP, 11.0) == []
    assert c.s.token_rejected("x", 11.0) == []


# -- expiry and refresh --


def test_expiry_closes_4001_at_exp_plus_leeway_not_before() -> None:
    c = ready_client(limits=SessionLimits(token_leeway_s=5.0, recheck_interval_s=1e9))
    assert c.s.next_deadline() == EXP + 5.0
    assert acts(c.s.tick(EXP)) == []
    assert acts(c.s.tick(EXP + 4.999)) == []
    assert c.s.tick(EXP + 5.0) == [Close(CloseCode.TOKEN_INVALID, "token expired")]
    assert c.s.state is SessionState.CLOSED


def test_each_deadline_is_asked_for_once_and_again_after_its_tick() -> None:
    c = Client(0.0, SessionLimits(token_leeway_s=5.0, recheck_interval_s=1e9))
    assert c.s.start(0.0) == [ScheduleTick(10.0)]
    c.s.received_text(auth(), 0.0)
    out = c.s.token_verified(CLAIMS, EXP, 0.0)
    assert [a for a in out if isinstance(a, ScheduleTick)] == []  # 10.0 is earlier
    assert c.s.tick(10.0) == [ScheduleTick(EXP + 5.0)]
    assert acts(c.s.received_text(ping(), 11.0)) == [] and c.s.received_text(ping(), 11.0) == []


def test_refresh_extends_expiry_and_rechecks_subscriptions() -> None:
    c = ready_client(limits=SessionLimits(token_leeway_s=0.0, recheck_interval_s=1e9))
    subscribed(c)
    assert acts(c.s.received_text(auth("tok2"), 2.0)) == [VerifyToken("tok2")]
    new_claims = {"sub": "user-1", "org_ids": [str(ORG)]}
    out = c.s.token_verified(new_claims, EXP + 3600, 2.0)
    assert c.frames() == [{"type": "ready", "connection_id": "c1", "expires_at": 13600}]
    rechecks = [a for a in out if isinstance(a, RecheckSubscriptions)]
    assert len(rechecks) == 1 and rechecks[0].orgs == (ORG,) and rechecks[0].claims == new_claims
    assert acts(c.s.tick(EXP + 1)) == []


def test_refresh_with_another_subject_closes_4001() -> None:
    c = ready_client()
    c.s.received_text(auth("other"), 1.0)
    out = c.s.token_verified({"sub": "user-2"}, EXP, 1.0)
    assert closes(out) == [Close(CloseCode.TOKEN_INVALID, "token subject changed")]


def test_claims_kept_as_json_read_like_the_dict() -> None:
    text = json.dumps(CLAIMS, separators=(",", ":"))
    claims = ClaimsJson(text, "user-1")
    assert claims == CLAIMS and dict(claims) == CLAIMS and len(claims) == 2
    assert claims.get("sub") == "user-1" and claims["org_id"] == str(ORG)
    assert claims.get("exp") is None and ClaimsJson("{}", None).get("sub") is None
    assert claims_json(claims) is text
    assert claims_json(CLAIMS) == text


def test_claims_as_json_drive_the_session_like_a_dict() -> None:
    def as_json(claims: dict[str, object]) -> ClaimsJson:
        sub = claims.get("sub")
        return ClaimsJson(json.dumps(claims), sub if isinstance(sub, str) else None)

    c = Client()
    c.s.received_text(auth(), 0.0)
    c.s.token_verified(as_json(CLAIMS), EXP, 0.0)
    assert c.s.subject == "user-1"
    read = read_of(c.s.received_text(subscribe(), 1.0))
    assert claims_json(read.claims) == json.dumps(CLAIMS)
    c.s.received_text(auth("same"), 1.0)
    assert closes(c.s.token_verified(as_json(CLAIMS), EXP, 1.0)) == []
    c.s.received_text(auth("other"), 2.0)
    out = c.s.token_verified(as_json({"sub": "user-2"}), EXP, 2.0)
    assert closes(out) == [Close(CloseCode.TOKEN_INVALID, "token subject changed")]


def test_rejected_refresh_closes_4001() -> None:
    c = ready_client()
    c.s.received_text(auth("bad"), 1.0)
    assert closes(c.s.token_rejected("expired", 1.0))[0].code == CloseCode.TOKEN_INVALID


# -- subscriptions --


def test_subscribe_follows_the_org_before_it_reads() -> None:
    c = ready_client()
    out = acts(c.s.received_text(subscribe(event_types=["job.*"], coalesce_ms=250), 1.0))
    assert [type(a) for a in out] == [Follow, ReadCatchUp]
    follow, read = out
    assert isinstance(follow, Follow) and isinstance(read, ReadCatchUp)
    assert follow.org == ORG and follow.subscription is read.subscription
    sub = read.subscription
    assert (sub.ref, sub.org, sub.cursor, read.claims) == ("1", ORG, None, CLAIMS)
    assert sub.filter.event_types == ("job.*",) and sub.coalescer is not None
    assert read.query.head is None and read.query.since is None  # fresh: take S, no rows


def test_subscribe_with_a_bad_cursor_resyncs_bad_cursor_and_goes_live() -> None:
    c = ready_client()
    read = read_of(c.s.received_text(subscribe(cursor="1.garbage!"), 1.0))
    assert read.query.since is None
    c.s.catch_up_read(read.subscription, read.query, Table().read(read.query), 1.0)
    assert [(f["type"], f.get("reason")) for f in c.frames()] == [
        ("resync", "bad_cursor"),
        ("subscribed", None),
    ]


def test_forbidden_subscribe_is_an_error_frame_and_unfollows() -> None:
    c = ready_client()
    read = read_of(c.s.received_text(subscribe("7"), 1.0))
    page = Table(allowed=set()).read(read.query)
    out = c.s.catch_up_read(read.subscription, read.query, page, 1.0)
    assert acts(out) == [Unfollow(ORG)]
    assert c.frames() == [
        {"type": "error", "ref": "7", "code": "forbidden", "message": "not a member of this org"}
    ]
    assert c.s.subscription_count == 0


def test_failed_read_is_internal_error() -> None:
    c = ready_client()
    read = read_of(c.s.received_text(subscribe("7"), 1.0))
    assert acts(c.s.catch_up_failed(read.subscription, read.query, 1.0)) == [Unfollow(ORG)]
    assert c.frames()[0]["code"] == "internal"
    assert c.s.subscription_count == 0
    assert c.s.catch_up_failed(read.subscription, read.query, 1.0) == []


def test_too_many_subscriptions_counts_pending_ones() -> None:
    c = ready_client(limits=SessionLimits(max_subscriptions=2))
    c.s.received_text(subscribe("1", ORG), 1.0)  # still pending
    subscribed(c, ORG2, "2")
    c.s.received_text(subscribe("3", uuid.uuid4()), 2.0)
    assert [(f["ref"], f["code"]) for f in c.frames()] == [("3", "too_many_subscriptions")]
    # Re-subscribing an org already held reuses its slot.
    assert any(isinstance(a, ReadCatchUp) for a in c.s.received_text(subscribe("4"), 3.0))


def test_resubscribe_replaces_and_stale_answers_are_ignored() -> None:
    c = ready_client()
    first = subscribed(c)
    out = acts(c.s.received_text(subscribe("5"), 2.0))
    assert [type(a) for a in out] == [Follow, ReadCatchUp]
    second = out[1]
    assert isinstance(second, ReadCatchUp) and second.subscription.ref == "5"
    page = Table().read(first.query)
    assert c.s.catch_up_read(first.subscription, first.query, page, 2.0) == []
    c.s.catch_up_read(second.subscription, second.query, Table().read(second.query), 2.0)
    assert [(f["type"], f.get("ref")) for f in c.frames()] == [("subscribed", "5")]


def test_unsubscribe_while_pending_discards_the_answer() -> None:
    c = ready_client()
    read = read_of(c.s.received_text(subscribe(), 1.0))
    assert acts(c.s.received_text(unsubscribe(), 2.0)) == [Unfollow(ORG)]
    assert c.frames() == [
        {"type": "unsubscribed", "ref": "2", "org": str(ORG), "reason": "requested"}
    ]
    assert c.s.catch_up_read(read.subscription, read.query, Table().read(read.query), 2.0) == []
    assert c.frames() == []


def test_unsubscribe_unknown_org_still_answers_unsubscribed() -> None:
    c = ready_client()
    assert acts(c.s.received_text(unsubscribe("9", ORG2), 1.0)) == []
    assert c.frames()[0]["type"] == "unsubscribed"


def test_ping_pong() -> None:
    c = ready_client()
    c.s.received_text(ping("p"), 1.0)
    assert c.frames() == [{"type": "pong", "ref": "p"}]


# -- periodic recheck --


def test_periodic_recheck_and_forbidden_drops() -> None:
    c = ready_client(limits=SessionLimits(recheck_interval_s=60.0))
    subscribed(c, ORG, "1")
    subscribed(c, ORG2, "2")
    assert c.s.next_deadline() == 60.0
    assert acts(c.s.tick(59.0)) == []
    out = acts(c.s.tick(60.0))
    assert len(out) == 1 and isinstance(out[0], RecheckSubscriptions)
    assert set(out[0].orgs) == {ORG, ORG2}
    assert acts(c.s.tick(61.0)) == []
    assert c.s.recheck_result(out[0].orgs, {ORG2}, 61.0) == [Unfollow(ORG)]
    assert c.frames() == [
        {"type": "unsubscribed", "ref": "1", "org": str(ORG), "reason": "forbidden"}
    ]
    assert c.s.subscription(ORG) is None and c.s.subscription(ORG2) is not None
    assert c.s.recheck_result((ORG,), set(), 62.0) == []


def test_recheck_without_subscriptions_does_nothing() -> None:
    c = ready_client()
    assert acts(c.s.tick(61.0)) == []


# -- rate limit and bad frames --


def test_bad_frames_get_bad_request_with_ref() -> None:
    c = ready_client()
    c.s.received_text(json.dumps({"type": "subscribe", "ref": "8", "org": "acme"}), 1.0)
    assert c.frames() == [
        {"type": "error", "ref": "8", "code": "bad_request", "message": "org must be a uuid string"}
    ]


def test_rate_limit_then_4029() -> None:
    c = ready_client(limits=SessionLimits(rate_per_s=20.0, rate_burst=40))
    now = 1.0
    for _ in range(40):
        c.s.received_text(ping(), now)
    assert [f["type"] for f in c.frames()] == ["pong"] * 40
    for _ in range(9):
        c.s.received_text(ping(), now)
    assert [f["code"] for f in c.frames()] == ["rate_limited"] * 9
    assert c.s.received_text(ping(), now) == [
        Close(CloseCode.TOO_MANY_BAD_FRAMES, "too many bad frames")
    ]


def test_rate_limit_refills_and_good_frames_reset_the_count() -> None:
    c = ready_client(limits=SessionLimits(rate_per_s=10.0, rate_burst=1))
    c.s.received_text(ping(), 1.0)
    assert c.frames()[0]["type"] == "pong"
    for _ in range(5):
        c.s.received_text(ping(), 1.0)
    assert [f["code"] for f in c.frames()] == ["rate_limited"] * 5
    c.s.received_text(ping(), 1.1)
    assert c.frames()[0]["type"] == "pong"
    for _ in range(9):
        c.s.received_text("junk", 1.1)
    assert {f["code"] for f in c.frames()} <= {"rate_limited", "bad_request"}
    assert closes(c.s.received_text("junk", 1.1))


def test_ten_bad_frames_in_a_row_close_4029() -> None:
    c = ready_client()
    for i in range(9):
        c.s.received_text("[]", 1.0 + i)
    assert [f["code"] for f in c.frames()] == ["bad_request"] * 9
    assert c.s.received_binary(20.0) == [
        Close(CloseCode.TOO_MANY_BAD_FRAMES, "too many bad frames")
    ]


def test_server_close_and_connection_lost() -> None:
    c = ready_client()
    assert c.s.close(CloseCode.SERVICE_RESTART, "restarting") == [
        Close(CloseCode.SERVICE_RESTART, "restarting")
    ]
    assert c.s.close(CloseCode.TOO_SLOW, "again") == []
    c = ready_client()
    c.s.connection_lost()
    assert c.s.received_text(ping(), 1.0) == []
    assert c.s.tick(1e9) == []


def test_close_reason_must_fit_a_control_frame() -> None:
    with pytest.raises(ValueError):
        Close(CloseCode.NORMAL, "x" * 124)


# -- coalescing and the stall deadline are deadlines like the others --


def test_a_coalescing_window_is_a_deadline_of_the_session() -> None:
    c = ready_client(limits=SessionLimits(recheck_interval_s=1e9))
    read = read_of(c.s.received_text(subscribe(coalesce_ms=250), 1.0))
    table = Table()
    c.s.catch_up_read(read.subscription, read.query, table.read(read.query), 1.0)
    c.frames()
    rows = table.emit(ORG, 3)
    same_entity = [dataclasses.replace(row, entity_id="42") for row in rows[:2]]
    asked: list[Action] = []
    for row in [*same_entity, rows[2]]:
        asked += c.s.live_row(read.subscription, row, f"cur{row.id}", wrap(b"{}"), 2.0)
    assert asked == [ScheduleTick(2.25)]  # the window's end, asked for once
    assert c.frames() == []
    c.s.tick(2.25)
    got = c.frames()
    assert [(f["entity_id"], f.get("coalesced", 1)) for f in got] == [("42", 2), ("3", 1)]


# -- properties: a peer's junk never raises, in any state --

client_frames = st.one_of(
    st.text(max_size=200),
    st.sampled_from([auth(), subscribe(), unsubscribe(), ping(), subscribe(cursor=5), "[]"]),
    st.builds(
        json.dumps,
        st.dictionaries(
            st.sampled_from(
                ["type", "ref", "org", "token", "cursor", "event_types", "coalesce_ms"]
            ),
            st.none()
            | st.integers()
            | st.text(max_size=10)
            | st.sampled_from(["auth", "subscribe", "ping", str(ORG)])
            | st.lists(st.text(max_size=5), max_size=3),
        ),
    ),
)

ACTION_TYPES = (
    Close,
    VerifyToken,
    ReadCatchUp,
    RecheckSubscriptions,
    Follow,
    Unfollow,
    ScheduleTick,
)


def make(state: str) -> Client:
    if state == "awaiting":
        return Client()
    if state == "verifying":
        c = Client()
        c.s.received_text(auth(), 0.0)
        return c
    c = ready_client()
    if state == "subscribed":
        subscribed(c)
    elif state == "closed":
        c.s.close(CloseCode.NORMAL, "bye")
    return c


@settings(max_examples=60)
@given(
    st.sampled_from(["awaiting", "verifying", "ready", "subscribed", "closed"]),
    st.lists(client_frames, max_size=15),
)
def test_any_frames_in_any_state_yield_defined_actions(state: str, texts: list[str]) -> None:
    c = make(state)
    for i, text in enumerate(texts):
        was_closed = c.s.state is SessionState.CLOSED
        out = c.s.received_text(text, 1.0 + i * 0.01)
        assert all(isinstance(a, ACTION_TYPES) for a in out)
        assert all(isinstance(f, dict) for f in c.frames())
        if was_closed:
            assert out == []
        if closes(out):
            assert c.s.state is SessionState.CLOSED
            assert isinstance(out[-1], Close)
        for action in out:
            if isinstance(action, VerifyToken):
                c.s.token_verified(CLAIMS, EXP, 1.0)
    assert c.s.subscription_count <= c.s.limits.max_subscriptions
