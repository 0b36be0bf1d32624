"""Per-connection state machine: what a client notices."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.protocol import CloseCode
from relay.core.session import (
    Action,
    AuthorizeSubscription,
    ClaimsJson,
    Close,
    DropSubscription,
    RecheckSubscriptions,
    Send,
    Session,
    SessionLimits,
    SessionState,
    StartSubscription,
    VerifyToken,
    claims_json,
)

ORG = uuid.UUID("0b7e6d1c-2f4a-4c1e-9a53-3d6f0c2b8e11")
ORG2 = uuid.UUID("5f0c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b")
CLAIMS = {"sub": "user-1", "org_id": str(ORG)}
EXP = 10_000.0


def frames(actions: Sequence[Action]) -> list[dict[str, object]]:
    return [json.loads(a.data) for a in actions if isinstance(a, Send)]


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


def ready_session(now: float = 0.0, limits: SessionLimits | None = None) -> Session:
    s = Session("c1", now, limits)
    assert s.received_text(auth(), now) == [VerifyToken("tok")]
    out = s.token_verified(CLAIMS, EXP, now)
    assert frames(out) == [{"type": "ready", "connection_id": "c1", "expires_at": int(EXP)}]
    assert s.state is SessionState.READY
    return s


def authorize(s: Session, text: str, now: float = 1.0) -> AuthorizeSubscription:
    out = s.received_text(text, now)
    requests = [a for a in out if isinstance(a, AuthorizeSubscription)]
    assert len(requests) == 1
    return requests[0]


def subscribed(s: Session, org: uuid.UUID = ORG, ref: str = "1") -> AuthorizeSubscription:
    request = authorize(s, subscribe(ref, org))
    assert s.subscribe_result(request, allowed=True) == [StartSubscription(request)]
    return request


# -- authentication --


def test_subscribe_before_auth_is_refused_and_closes() -> None:
    s = Session("c1", 0.0)
    out = s.received_text(subscribe(), 0.0)
    assert frames(out) == [
        {"type": "error", "ref": "1", "code": "unauthorized", "message": "send auth first"}
    ]
    assert closes(out) == [Close(CloseCode.AUTH_TIMEOUT, "authenticate first")]
    assert s.state is SessionState.CLOSED
    assert s.received_text(auth(), 0.1) == []


def test_junk_before_auth_is_bad_request_and_closes() -> None:
    s = Session("c1", 0.0)
    out = s.received_text("{nope", 0.0)
    assert [f["code"] for f in frames(out)] == ["bad_request"]
    assert closes(out)[0].code == CloseCode.AUTH_TIMEOUT


def test_no_auth_in_time_closes_4002_at_the_deadline() -> None:
    s = Session("c1", 100.0)
    assert s.next_deadline() == 110.0
    assert s.tick(109.99) == []
    assert s.tick(110.0) == [Close(CloseCode.AUTH_TIMEOUT, "no auth in time")]
    assert s.next_deadline() is None


def test_auth_then_ready() -> None:
    s = ready_session()
    assert s.subject == "user-1"
    assert s.tick(5.0) == []


def test_bearer_header_replaces_the_auth_frame() -> None:
    s = Session("c1", 0.0)
    assert s.received_bearer("hdr", 0.0) == [VerifyToken("hdr")]
    assert frames(s.token_verified(CLAIMS, EXP, 0.1))[0]["type"] == "ready"


def test_rejected_token_closes_4001() -> None:
    s = Session("c1", 0.0)
    s.received_text(auth(), 0.0)
    out = s.token_rejected("signature invalid", 0.0)
    assert frames(out)[0] == {
        "type": "error",
        "ref": None,
        "code": "unauthorized",
        "message": "signature invalid",
    }
    assert closes(out) == [Close(CloseCode.TOKEN_INVALID, "token rejected")]


def test_already_expired_token_closes_4001() -> None:
    s = Session("c1", 0.0)
    s.received_text(auth(), 20_000.0)
    assert s.token_verified(CLAIMS, EXP, 20_000.0) == [
        Close(CloseCode.TOKEN_INVALID, "token expired")
    ]


def test_frames_sent_while_the_token_is_verified_are_handled_after_ready() -> None:
    s = Session("c1", 0.0)
    assert s.received_text(auth(), 0.0) == [VerifyToken("tok")]
    assert s.received_text(subscribe(), 0.0) == []
    assert s.received_text(ping(), 0.0) == []
    out = s.token_verified(CLAIMS, EXP, 0.01)
    assert [f["type"] for f in frames(out)] == ["ready", "pong"]
    requests = [a for a in out if isinstance(a, AuthorizeSubscription)]
    assert [(r.ref, r.org, r.claims) for r in requests] == [("1", ORG, CLAIMS)]


def test_deferred_frames_are_bounded() -> None:
    s = Session("c1", 0.0, SessionLimits(max_deferred_frames=2))
    s.received_text(auth(), 0.0)
    assert s.received_text(ping(), 0.0) == []
    assert s.received_text(ping(), 0.0) == []
    assert closes(s.received_text(ping(), 0.0))[0].code == CloseCode.TOO_MANY_BAD_FRAMES


def test_deferred_frames_dropped_when_token_rejected() -> None:
    s = Session("c1", 0.0)
    s.received_text(auth(), 0.0)
    s.received_text(subscribe(), 0.0)
    out = s.token_rejected("bad", 0.0)
    assert not any(isinstance(a, AuthorizeSubscription) for a in out)


def test_unrequested_verification_answer_is_a_shell_bug() -> None:
    s = Session("c1", 0.0)
    with pytest.raises(RuntimeError):
        s.token_verified(CLAIMS, EXP, 0.0)


def test_late_answers_after_close_are_ignored() -> None:
    s = Session("c1", 0.0)
    s.received_text(auth(), 0.0)
    s.tick(11.0)
    assert s.token_verified(CLAIMS, EXP, 11.0) == []
    assert s.token_rejected("x", 11.0) == []


# -- expiry and refresh --


def test_expiry_closes_4001_at_exp_plus_leeway_not_before() -> None:
    s = ready_session(limits=SessionLimits(token_leeway_s=5.0, recheck_interval_s=1e9))
    assert s.next_deadline() == EXP + 5.0
    assert s.tick(EXP) == []
    assert s.tick(EXP + 4.999) == []
    assert s.tick(EXP + 5.0) == [Close(CloseCode.TOKEN_INVALID, "token expired")]
    assert s.state is SessionState.CLOSED


def test_refresh_extends_expiry_and_rechecks_subscriptions() -> None:
    s = ready_session(limits=SessionLimits(token_leeway_s=0.0, recheck_interval_s=1e9))
    subscribed(s)
    assert s.received_text(auth("tok2"), 2.0) == [VerifyToken("tok2")]
    new_claims = {"sub": "user-1", "org_ids": [str(ORG)]}
    out = s.token_verified(new_claims, EXP + 3600, 2.0)
    assert frames(out) == [{"type": "ready", "connection_id": "c1", "expires_at": 13600}]
    rechecks = [a for a in out if isinstance(a, RecheckSubscriptions)]
    assert len(rechecks) == 1 and rechecks[0].orgs == (ORG,) and rechecks[0].claims == new_claims
    assert s.tick(EXP + 1) == []


def test_refresh_with_another_subject_closes_4001() -> None:
    s = ready_session()
    s.received_text(auth("other"), 1.0)
    out = s.token_verified({"sub": "user-2"}, EXP, 1.0)
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

    s = Session("c1", 0.0)
    s.received_text(auth(), 0.0)
    s.token_verified(as_json(CLAIMS), EXP, 0.0)
    assert s.subject == "user-1"
    (request,) = [
        a for a in s.received_text(subscribe(), 1.0) if isinstance(a, AuthorizeSubscription)
    ]
    assert claims_json(request.claims) == json.dumps(CLAIMS)
    s.received_text(auth("same"), 1.0)
    assert closes(s.token_verified(as_json(CLAIMS), EXP, 1.0)) == []
    s.received_text(auth("other"), 2.0)
    out = s.token_verified(as_json({"sub": "user-2"}), EXP, 2.0)
    assert closes(out) == [Close(CloseCode.TOKEN_INVALID, "token subject changed")]


def test_rejected_refresh_closes_4001() -> None:
    s = ready_session()
    s.received_text(auth("bad"), 1.0)
    assert closes(s.token_rejected("expired", 1.0))[0].code == CloseCode.TOKEN_INVALID


# -- subscriptions --


def test_subscribe_asks_sql_then_starts() -> None:
    s = ready_session()
    request = authorize(s, subscribe(cursor="1.x", event_types=["job.*"], coalesce_ms=250))
    assert (request.ref, request.org, request.cursor) == ("1", ORG, "1.x")
    assert (request.event_types, request.coalesce_ms, request.claims) == (("job.*",), 250, CLAIMS)
    assert s.active_orgs() == []
    assert s.subscribe_result(request, allowed=True) == [StartSubscription(request)]
    assert s.active_orgs() == [ORG]


def test_forbidden_subscribe_is_an_error_frame() -> None:
    s = ready_session()
    request = authorize(s, subscribe("7"))
    out = s.subscribe_result(request, allowed=False)
    assert frames(out) == [
        {"type": "error", "ref": "7", "code": "forbidden", "message": "not a member of this org"}
    ]
    assert s.subscription_count == 0


def test_failed_authorization_is_internal_error() -> None:
    s = ready_session()
    request = authorize(s, subscribe("7"))
    assert frames(s.subscribe_failed(request))[0]["code"] == "internal"
    assert s.subscription_count == 0
    assert s.subscribe_failed(request) == []


def test_too_many_subscriptions_counts_pending_ones() -> None:
    s = ready_session(limits=SessionLimits(max_subscriptions=2))
    authorize(s, subscribe("1", ORG))  # still pending
    subscribed(s, ORG2, "2")
    out = s.received_text(subscribe("3", uuid.uuid4()), 2.0)
    assert [(f["ref"], f["code"]) for f in frames(out)] == [("3", "too_many_subscriptions")]
    # Re-subscribing an org already held reuses its slot.
    assert any(isinstance(a, AuthorizeSubscription) for a in s.received_text(subscribe("4"), 3.0))


def test_resubscribe_replaces_and_stale_answers_are_ignored() -> None:
    s = ready_session()
    first = subscribed(s)
    out = s.received_text(subscribe("5", cursor="1.y"), 2.0)
    assert out[0] == DropSubscription(ORG)
    second = out[1]
    assert isinstance(second, AuthorizeSubscription) and second.ref == "5"
    assert s.subscribe_result(first, allowed=True) == []
    assert s.subscribe_result(second, allowed=True) == [StartSubscription(second)]


def test_unsubscribe_while_pending_discards_the_answer() -> None:
    s = ready_session()
    request = authorize(s, subscribe())
    out = s.received_text(unsubscribe(), 2.0)
    assert out == [
        Send(
            b'{"type":"unsubscribed","ref":"2","org":"%s","reason":"requested"}' % str(ORG).encode()
        )
    ]
    assert s.subscribe_result(request, allowed=True) == []


def test_unsubscribe_stops_delivery_first() -> None:
    s = ready_session()
    subscribed(s)
    out = s.received_text(unsubscribe("9"), 2.0)
    assert out[0] == DropSubscription(ORG)
    assert frames(out) == [
        {"type": "unsubscribed", "ref": "9", "org": str(ORG), "reason": "requested"}
    ]


def test_unsubscribe_unknown_org_still_answers_unsubscribed() -> None:
    s = ready_session()
    assert frames(s.received_text(unsubscribe("9", ORG2), 1.0))[0]["type"] == "unsubscribed"


def test_ping_pong() -> None:
    s = ready_session()
    assert frames(s.received_text(ping("p"), 1.0)) == [{"type": "pong", "ref": "p"}]


# -- periodic recheck --


def test_periodic_recheck_and_forbidden_drops() -> None:
    s = ready_session(limits=SessionLimits(recheck_interval_s=60.0))
    subscribed(s, ORG, "1")
    subscribed(s, ORG2, "2")
    assert s.next_deadline() == 60.0
    assert s.tick(59.0) == []
    out = s.tick(60.0)
    assert len(out) == 1 and isinstance(out[0], RecheckSubscriptions)
    assert set(out[0].orgs) == {ORG, ORG2}
    assert s.tick(61.0) == []
    assert s.recheck_result(ORG2, allowed=True) == []
    out = s.recheck_result(ORG, allowed=False)
    assert out[0] == DropSubscription(ORG)
    assert frames(out) == [
        {"type": "unsubscribed", "ref": "1", "org": str(ORG), "reason": "forbidden"}
    ]
    assert s.active_orgs() == [ORG2]
    assert s.recheck_result(ORG, allowed=False) == []


def test_recheck_without_subscriptions_does_nothing() -> None:
    s = ready_session()
    assert s.tick(61.0) == []


# -- rate limit and bad frames --


def test_bad_frames_get_bad_request_with_ref() -> None:
    s = ready_session()
    out = s.received_text(json.dumps({"type": "subscribe", "ref": "8", "org": "acme"}), 1.0)
    assert frames(out) == [
        {"type": "error", "ref": "8", "code": "bad_request", "message": "org must be a uuid string"}
    ]


def test_rate_limit_then_4029() -> None:
    s = ready_session(limits=SessionLimits(rate_per_s=20.0, rate_burst=40))
    now = 1.0
    for _ in range(40):
        assert frames(s.received_text(ping(), now))[0]["type"] == "pong"
    codes = []
    for _ in range(9):
        codes += [f["code"] for f in frames(s.received_text(ping(), now))]
    assert codes == ["rate_limited"] * 9
    assert s.received_text(ping(), now) == [
        Close(CloseCode.TOO_MANY_BAD_FRAMES, "too many bad frames")
    ]


def test_rate_limit_refills_and_good_frames_reset_the_count() -> None:
    s = ready_session(limits=SessionLimits(rate_per_s=10.0, rate_burst=1))
    assert frames(s.received_text(ping(), 1.0))[0]["type"] == "pong"
    for _ in range(5):
        assert frames(s.received_text(ping(), 1.0))[0]["code"] == "rate_limited"
    assert frames(s.received_text(ping(), 1.1))[0]["type"] == "pong"
    for _ in range(9):
        assert frames(s.received_text("junk", 1.1))[0]["code"] in ("rate_limited", "bad_request")
    assert closes(s.received_text("junk", 1.1))


def test_ten_bad_frames_in_a_row_close_4029() -> None:
    s = ready_session()
    for i in range(9):
        assert frames(s.received_text("[]", 1.0 + i))[0]["code"] == "bad_request"
    assert s.received_binary(20.0) == [Close(CloseCode.TOO_MANY_BAD_FRAMES, "too many bad frames")]


def test_frame_too_big_closes_1009() -> None:
    s = ready_session(limits=SessionLimits(max_frame_bytes=100))
    assert closes(s.received_text("é" * 51, 1.0)) == [
        Close(CloseCode.FRAME_TOO_BIG, "frame too big")
    ]
    s = ready_session(limits=SessionLimits(max_frame_bytes=100))
    text = '{"type":"ping","ref":"' + "é" * 30 + '"}'  # 84 bytes
    assert frames(s.received_text(text, 1.0))[0]["type"] == "pong"
    assert closes(s.received_text(text.replace("é", "éé", 1) + " " * 15, 1.0))


def test_server_close_and_connection_lost() -> None:
    s = ready_session()
    assert s.close(CloseCode.SERVER_RESTARTING, "restarting") == [
        Close(CloseCode.SERVER_RESTARTING, "restarting")
    ]
    assert s.close(CloseCode.TOO_SLOW, "again") == []
    s = ready_session()
    s.connection_lost()
    assert s.received_text(ping(), 1.0) == []
    assert s.tick(1e9) == []


def test_close_reason_must_fit_a_control_frame() -> None:
    with pytest.raises(ValueError):
        Close(CloseCode.NORMAL, "x" * 124)


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
    Send,
    Close,
    VerifyToken,
    AuthorizeSubscription,
    StartSubscription,
    RecheckSubscriptions,
    DropSubscription,
)


def make(state: str) -> Session:
    if state == "awaiting":
        return Session("c1", 0.0)
    if state == "verifying":
        s = Session("c1", 0.0)
        s.received_text(auth(), 0.0)
        return s
    s = ready_session()
    if state == "subscribed":
        subscribed(s)
    elif state == "closed":
        s.close(CloseCode.NORMAL, "bye")
    return s


@settings(max_examples=60)
@given(
    st.sampled_from(["awaiting", "verifying", "ready", "subscribed", "closed"]),
    st.lists(client_frames, max_size=15),
)
def test_any_frames_in_any_state_yield_defined_actions(state: str, texts: list[str]) -> None:
    s = make(state)
    for i, text in enumerate(texts):
        was_closed = s.state is SessionState.CLOSED
        out = s.received_text(text, 1.0 + i * 0.01)
        assert all(isinstance(a, ACTION_TYPES) for a in out)
        for action in out:
            if isinstance(action, Send):
                assert isinstance(json.loads(action.data), dict)
        if was_closed:
            assert out == []
        if closes(out):
            assert s.state is SessionState.CLOSED
            assert isinstance(out[-1], Close)
        for action in out:
            if isinstance(action, VerifyToken):
                s.token_verified(CLAIMS, EXP, 1.0)
    assert s.subscription_count <= s.limits.max_subscriptions
