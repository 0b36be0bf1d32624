"""Wire protocol v1 codec: client messages in, server frames out."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.codes import CloseCode, ErrorCode, ResyncReason
from relay.core.protocol import (
    MAX_COALESCE_MS,
    MAX_EVENT_TYPES,
    MAX_TOKEN_CHARS,
    Auth,
    BadMessage,
    EventRow,
    Ping,
    Subscribe,
    Unsubscribe,
    decode_client_message,
    encode_error,
    encode_event,
    encode_pong,
    encode_ready,
    encode_resync,
    encode_subscribed,
    encode_unsubscribed,
)

ORG = uuid.UUID("0b7e6d1c-2f4a-4c1e-9a53-3d6f0c2b8e11")


def msg(**fields: object) -> str:
    return json.dumps(fields)


def sub(**extra: object) -> str:
    return msg(type="subscribe", ref="1", org=str(ORG), **extra)


# -- decoding valid messages --


def test_auth() -> None:
    assert decode_client_message(msg(type="auth", token="a.b.c")) == Auth("a.b.c")


def test_subscribe_minimal_defaults() -> None:
    assert decode_client_message(sub()) == Subscribe("1", ORG, None, None, None)


def test_subscribe_full() -> None:
    text = sub(cursor="1.abc", event_types=["job.*", "job.updated"], coalesce_ms=250)
    assert decode_client_message(text) == Subscribe(
        "1", ORG, "1.abc", ("job.*", "job.updated"), 250
    )


def test_subscribe_uppercase_uuid_is_normalised() -> None:
    text = msg(type="subscribe", ref="1", org=str(ORG).upper())
    decoded = decode_client_message(text)
    assert isinstance(decoded, Subscribe) and decoded.org == ORG


def test_subscribe_star_means_no_filter_and_duplicates_are_dropped() -> None:
    assert decode_client_message(sub(event_types=["job.*", "*"])) == Subscribe("1", ORG)
    decoded = decode_client_message(sub(event_types=["a.b", "a.b", "c"]))
    assert isinstance(decoded, Subscribe) and decoded.event_types == ("a.b", "c")


def test_subscribe_coalesce_zero_means_off() -> None:
    decoded = decode_client_message(sub(coalesce_ms=0))
    assert isinstance(decoded, Subscribe) and decoded.coalesce_ms is None


def test_unsubscribe_and_ping() -> None:
    assert decode_client_message(msg(type="unsubscribe", ref="2", org=str(ORG))) == Unsubscribe(
        "2", ORG
    )
    assert decode_client_message(msg(type="ping", ref="3")) == Ping("3")


def test_unknown_extra_fields_are_ignored() -> None:
    assert decode_client_message(msg(type="ping", ref="3", future=[1, 2])) == Ping("3")


# -- decoding junk: every case is a BadMessage value --


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("", None),
        ("{", None),
        ("not json", None),
        ("[1,2]", None),
        ('"auth"', None),
        ("null", None),
        ('{"type":"ping","ref":NaN}', None),
        ('{"type":"ping","ref":"1","x":Infinity}', None),
        ("[" * 100_000, None),
        (msg(ref="1"), "1"),
        (msg(type=7, ref="1"), "1"),
        (msg(type="publish", ref="1"), "1"),
        (msg(type="ping"), None),
        (msg(type="ping", ref=3), None),
        (msg(type="ping", ref=""), None),
        (msg(type="ping", ref="x" * 65), None),
        (msg(type="ping", ref=None), None),
        (msg(type="auth"), None),
        (msg(type="auth", token=""), None),
        (msg(type="auth", token=12), None),
        (msg(type="auth", token="x" * (MAX_TOKEN_CHARS + 1)), None),
        (msg(type="subscribe", ref="1"), "1"),
        (msg(type="subscribe", ref="1", org="acme"), "1"),
        (msg(type="subscribe", ref="1", org=ORG.hex), "1"),
        (msg(type="subscribe", ref="1", org="{" + str(ORG) + "}"), "1"),
        (msg(type="subscribe", ref="1", org=42), "1"),
        (sub(cursor=5), "1"),
        (sub(cursor={"a": 1}), "1"),
        (sub(event_types="job.*"), "1"),
        (sub(event_types=[]), "1"),
        (sub(event_types=[1]), "1"),
        (sub(event_types=["Job.Updated"]), "1"),
        (sub(event_types=["job..updated"]), "1"),
        (sub(event_types=["job.up*"]), "1"),
        (sub(event_types=[".job"]), "1"),
        (sub(event_types=["job."]), "1"),
        (sub(event_types=["a" * 129]), "1"),
        (sub(event_types=[f"t{i}" for i in range(MAX_EVENT_TYPES + 1)]), "1"),
        (sub(coalesce_ms=-1), "1"),
        (sub(coalesce_ms=MAX_COALESCE_MS + 1), "1"),
        (sub(coalesce_ms=2.5), "1"),
        (sub(coalesce_ms=True), "1"),
        (sub(coalesce_ms="250"), "1"),
        (msg(type="unsubscribe", ref="2"), "2"),
        ("x" * 40_000, None),
    ],
)
def test_junk_is_a_bad_message(text: str, ref: str | None) -> None:
    decoded = decode_client_message(text)
    assert isinstance(decoded, BadMessage)
    assert decoded.ref == ref
    assert decoded.message


def test_bad_message_says_what_is_wrong() -> None:
    decoded = decode_client_message(msg(type="ping", ref=3))
    assert isinstance(decoded, BadMessage) and "ref must be a" in decoded.message
    decoded = decode_client_message(sub(coalesce_ms=99_999))
    assert isinstance(decoded, BadMessage) and "coalesce_ms" in decoded.message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
message_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["auth", "subscribe", "unsubscribe", "ping", "x"]) | json_values,
        "ref": st.text(max_size=70) | json_values,
        "token": st.text() | json_values,
        "org": st.uuids().map(str) | st.text(max_size=40) | json_values,
        "cursor": st.text(max_size=20) | json_values,
        "event_types": st.lists(st.from_regex(r"[a-z*.]{1,12}", fullmatch=True), max_size=4)
        | json_values,
        "coalesce_ms": st.integers(-5, 20_000) | json_values,
    },
)

VALID = (Auth, Subscribe, Unsubscribe, Ping, BadMessage)


@given(st.text())
def test_arbitrary_text_never_raises(text: str) -> None:
    assert isinstance(decode_client_message(text), VALID)


@given(message_like)
def test_arbitrary_message_like_objects_never_raise(obj: dict[str, object]) -> None:
    decoded = decode_client_message(json.dumps(obj))
    assert isinstance(decoded, VALID)
    if isinstance(decoded, Subscribe | Unsubscribe | Ping):
        assert isinstance(decoded.ref, str) and decoded.ref
    if isinstance(decoded, BadMessage) and decoded.ref is not None:
        assert decoded.ref == obj.get("ref")


# -- encoding --

ROW = EventRow(
    id=123,
    org=ORG,
    event_type="job.updated",
    entity_type="job",
    entity_id='42 "quoted" \u00e9',
    actor_id=None,
    payload_json='{"status": "done", "n": [1, 2.50, {"deep": null}]}',
    created_at="2024-05-01T12:00:00.123456+00:00",
    xid=987654321,
)


def test_event_frame_has_exactly_the_design_fields() -> None:
    frame = encode_event(ROW, "1.CUR")
    assert isinstance(frame, bytes)
    parsed = json.loads(frame)
    assert parsed == {
        "type": "event",
        "org": str(ORG),
        "id": 123,
        "event_type": "job.updated",
        "entity_type": "job",
        "entity_id": '42 "quoted" \u00e9',
        "actor_id": None,
        "payload": {"status": "done", "n": [1, 2.5, {"deep": None}]},
        "created_at": "2024-05-01T12:00:00.123456+00:00",
        "cursor": "1.CUR",
    }
    assert "coalesced" not in parsed and "xid" not in parsed


def test_event_payload_is_embedded_verbatim() -> None:
    frame = encode_event(ROW, "c")
    # The raw jsonb text, spaces and "2.50" included: it was not re-serialised.
    assert b'"payload":' + ROW.payload_json.encode() + b',"created_at"' in frame


def test_event_coalesced_and_actor() -> None:
    row = EventRow(1, ORG, "a", "b", "c", "user-7", "{}", "t", 5)
    parsed = json.loads(encode_event(row, "c", coalesced=3))
    assert parsed["coalesced"] == 3
    assert parsed["actor_id"] == "user-7"


def test_control_frames() -> None:
    assert json.loads(encode_ready("c1", 1_700_000_000.9)) == {
        "type": "ready",
        "connection_id": "c1",
        "expires_at": 1_700_000_000,
    }
    assert json.loads(encode_subscribed("1", ORG, "cur", 7)) == {
        "type": "subscribed",
        "ref": "1",
        "org": str(ORG),
        "cursor": "cur",
        "replayed": 7,
    }
    assert json.loads(encode_resync(ORG, ResyncReason.OVERFLOW, "cur")) == {
        "type": "resync",
        "org": str(ORG),
        "reason": "overflow",
        "cursor": "cur",
    }
    assert json.loads(encode_unsubscribed("2", ORG, "forbidden")) == {
        "type": "unsubscribed",
        "ref": "2",
        "org": str(ORG),
        "reason": "forbidden",
    }
    assert json.loads(encode_pong("3")) == {"type": "pong", "ref": "3"}
    assert json.loads(encode_error(None, ErrorCode.RATE_LIMITED, "slow")) == {
        "type": "error",
        "ref": None,
        "code": "rate_limited",
        "message": "slow",
    }


def test_frames_are_compact() -> None:
    assert encode_pong("3") == b'{"type":"pong","ref":"3"}'


def test_unknown_unsubscribe_reason_is_our_bug() -> None:
    with pytest.raises(ValueError):
        encode_unsubscribed("2", ORG, "bored")  # type: ignore[arg-type]


@given(st.text())
def test_any_client_ref_round_trips_through_an_encoded_frame(ref: str) -> None:
    # Lone surrogates included: encoding escapes to ASCII and never fails.
    assert json.loads(encode_pong(ref))["ref"] == ref
    assert json.loads(encode_error(ref, ErrorCode.BAD_REQUEST, ref))["message"] == ref


def test_one_close_code_table_has_every_code_the_readme_promises() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    promised = {
        int(c) for c in re.findall(r"^\| (\d{4})(?: / (\d{4}))? \|", readme, re.M) for c in c if c
    }
    assert promised == {1003, 1007, 1009, 1011, 1012, 1013, 4001, 4002, 4008, 4029}
    assert promised <= {c.value for c in CloseCode}
