"""Limits and hostile input against the real `pgrelay serve`: each gets a clear
error or close code, and nothing else is disturbed."""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from relay.server.jwt import mint_token
from tests.e2e.conftest import SECRET, Client, RelayProcess, connect, start_relay
from tests.pgharness import Database

ORG_A = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
ORG_B = uuid.UUID("00000000-0000-4000-8000-0000000000b2")


@pytest.fixture
def limited(db: Database, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A relay started with the settings in the test's `settings` marker."""
    marker = request.node.get_closest_marker("settings")
    relay = start_relay(db, tmp_path, **(marker.kwargs if marker else {}))
    yield relay
    relay.terminate()


def raw_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame, built by hand so that it can be wrong on purpose."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    header = bytes([0x80 | opcode])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    else:
        header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    return header + mask + masked


def raw_session(relay: RelayProcess, frames: list[bytes]) -> int | None:
    """Upgrade, send `frames`, read until the server closes: its close code."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import CloseConnection, Request

    host, port = relay.ws_url.removeprefix("ws://").split("/")[0].split(":")
    ws = WSConnection(ConnectionType.CLIENT)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(ws.send(Request(host=f"{host}:{port}", target="/v1")))
        ws.receive_data(sock.recv(4096))
        list(ws.events())
        for frame in frames:
            sock.sendall(frame)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                return None
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, CloseConnection):
                    return event.code
    raise AssertionError("the server did not close")


# -- frames ---------------------------------------------------------------------------


async def test_a_message_over_4_kib_closes_1009(limited: RelayProcess) -> None:
    async with connect(limited.ws_url) as ws:
        c = Client(ws)
        await c.auth(limited.token([ORG_A]))
        await c.send({"type": "ping", "ref": "x" * 5000})
        assert await c.close_code() == 1009


async def test_binary_closes_1003_and_invalid_utf8_closes_1007(limited: RelayProcess) -> None:
    assert (
        await trio.to_thread.run_sync(raw_session, limited, [raw_frame(0x2, b"\x00\x01")]) == 1003
    )
    assert (
        await trio.to_thread.run_sync(raw_session, limited, [raw_frame(0x1, b"\xff\xfe")]) == 1007
    )


async def test_junk_gets_bad_request_and_the_connection_stays_usable(limited: RelayProcess) -> None:
    junk: list[str] = [
        "{not json",
        "[1, 2]",
        json.dumps({"type": "dance", "ref": "1"}),
        json.dumps({"type": "subscribe", "ref": "2", "org": "not-a-uuid"}),
        json.dumps({"type": "subscribe", "ref": 3, "org": str(ORG_A)}),
        json.dumps({"type": "subscribe", "ref": "4", "org": str(ORG_A), "cursor": 7}),
        json.dumps({"type": "subscribe", "ref": "5", "org": str(ORG_A), "event_types": "job.*"}),
        json.dumps({"type": "subscribe", "ref": "6", "org": str(ORG_A), "coalesce_ms": "soon"}),
        json.dumps({"type": "unsubscribe", "ref": "7"}),
    ]
    async with connect(limited.ws_url) as ws:
        c = Client(ws)
        await c.auth(limited.token([ORG_A]))
        for text in junk:
            await ws.send_message(text)
            reply = await c.expect("error")
            assert reply["code"] == "bad_request", (text, reply)
            assert reply["message"]
        await c.send({"type": "ping", "ref": "still-here"})
        assert (await c.expect("pong"))["ref"] == "still-here"


async def test_a_flood_is_rate_limited_then_closed_4029(limited: RelayProcess) -> None:
    async with connect(limited.ws_url) as ws:
        c = Client(ws)
        await c.auth(limited.token([ORG_A]))
        for i in range(120):
            try:
                await c.send({"type": "ping", "ref": str(i)})
            except ConnectionClosed:
                break  # closed under us: expected
        codes = []
        with trio.fail_after(10):
            try:
                while True:
                    codes.append(json.loads(await ws.get_message()).get("code"))
            except ConnectionClosed:
                pass
        assert "rate_limited" in codes
        assert ws.closed is not None and ws.closed.code == 4029


@pytest.mark.settings(max_subscriptions="2")
async def test_too_many_subscriptions(limited: RelayProcess) -> None:
    orgs = [uuid.UUID(int=i + 1) for i in range(3)]
    async with connect(limited.ws_url) as ws:
        c = Client(ws)
        await c.auth(limited.token(orgs))
        assert (await c.subscribe(orgs[0], ref="1"))[-1]["type"] == "subscribed"
        assert (await c.subscribe(orgs[1], ref="2"))[-1]["type"] == "subscribed"
        refused = (await c.subscribe(orgs[2], ref="3"))[-1]
        assert refused["type"] == "error" and refused["code"] == "too_many_subscriptions"
        # re-subscribing an org already held is not a new slot
        assert (await c.subscribe(orgs[0], ref="4"))[-1]["type"] == "subscribed"


# -- connections ----------------------------------------------------------------------


async def _rejected_status(url: str, **kwargs: Any) -> int | None:
    try:
        async with connect(url, **kwargs):
            return None
    except ConnectionRejected as exc:
        return int(exc.status_code)


@pytest.mark.settings(max_connections="2")
async def test_connections_beyond_the_total_get_503(limited: RelayProcess) -> None:
    async with connect(limited.ws_url), connect(limited.ws_url):
        assert await _rejected_status(limited.ws_url) == 503
    await trio.sleep(0.2)
    assert await _rejected_status(limited.ws_url) is None  # room again


@pytest.mark.settings(max_connections_per_ip="1")
async def test_connections_beyond_the_per_address_limit_get_429(limited: RelayProcess) -> None:
    async with connect(limited.ws_url):
        assert await _rejected_status(limited.ws_url) == 429


@pytest.mark.settings(max_connections_per_user="1")
async def test_connections_beyond_the_per_user_limit_close_1013(limited: RelayProcess) -> None:
    async with (
        connect(limited.ws_url) as first,
        connect(limited.ws_url) as second,
        connect(limited.ws_url) as other_user,
    ):
        await Client(first).auth(limited.token([ORG_A], sub="dana"))
        c = Client(second)
        await c.send({"type": "auth", "token": limited.token([ORG_A], sub="dana")})
        error = await c.expect("error")
        assert error["code"] == "rate_limited"
        assert await c.close_code() == 1013
        await Client(other_user).auth(limited.token([ORG_A], sub="erin"))


@pytest.mark.settings(allowed_origins="https://app.example.com")
async def test_origin_allow_list(limited: RelayProcess) -> None:
    evil = [("Origin", "https://evil.example.com")]
    assert await _rejected_status(limited.ws_url, extra_headers=evil) == 403
    near_miss = [("Origin", "https://app.example.com.evil.net")]
    assert await _rejected_status(limited.ws_url, extra_headers=near_miss) == 403
    good = [("Origin", "https://app.example.com")]
    assert await _rejected_status(limited.ws_url, extra_headers=good) is None
    assert await _rejected_status(limited.ws_url) is None  # native clients send no Origin


# -- tokens ---------------------------------------------------------------------------


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "mallory",
        "org_id": str(ORG_A),
        "exp": now + 600,
        "aud": "pgrelay",
        "iss": "https://auth.example.com",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _hs256(claims: dict[str, Any], key: str = SECRET, headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(claims, key, algorithm="HS256", headers=headers)


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _alg_none(claims: dict[str, Any]) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


def _hs256_keyed_by_a_public_key(claims: dict[str, Any]) -> str:
    """The classic confusion attack, by hand (PyJWT refuses to sign it): HS256 with
    an RSA public key's PEM as the HMAC secret."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    signing_input = (
        _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        + "."
        + _b64(json.dumps(claims).encode())
    )
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


BAD_TOKENS = {
    "alg_none": lambda: _alg_none(_claims()),
    "wrong_secret": lambda: _hs256(_claims(), key="another-secret-" + "x" * 40),
    "hs256_keyed_by_a_public_key": lambda: _hs256_keyed_by_a_public_key(_claims()),
    "unknown_kid": lambda: _hs256(_claims(), headers={"kid": "who-knows"}) + "tampered",
    "missing_exp": lambda: _hs256(_claims(exp=None)),
    "exp_as_string": lambda: _hs256(_claims(exp=str(int(time.time()) + 600))),
    "future_nbf": lambda: _hs256(_claims(nbf=int(time.time()) + 600)),
    "expired_beyond_leeway": lambda: _hs256(_claims(exp=int(time.time()) - 120)),
    "wrong_aud": lambda: _hs256(_claims(aud="someone-else")),
    "wrong_iss": lambda: _hs256(_claims(iss="https://evil.example.com")),
    "garbage": lambda: "definitely.not.ajwt",
}


@pytest.mark.settings(
    jwt_audience="pgrelay", jwt_issuer="https://auth.example.com", jwt_leeway_s="30"
)
async def test_every_bad_token_is_rejected_with_4001_and_never_logged(
    limited: RelayProcess,
) -> None:
    tokens = {name: make() for name, make in BAD_TOKENS.items()}
    for name, token in tokens.items():
        async with connect(limited.ws_url) as ws:
            c = Client(ws)
            await c.send({"type": "auth", "token": token})
            error = await c.expect("error")
            assert error["code"] == "unauthorized", name
            assert token not in json.dumps(error)
            assert await c.close_code() == 4001, name
    # A 16 KB token does not even fit in a frame (4 KiB): 1009 before any JWT work.
    # (relay.server.jwt rejects tokens over 8 KiB too: tests/unit/test_auth.py.)
    async with connect(limited.ws_url) as ws:
        c = Client(ws)
        await c.send({"type": "auth", "token": _hs256(_claims(pad="p" * 16_000))})
        assert await c.close_code() == 1009
    # Just inside the leeway is still accepted.
    async with connect(limited.ws_url) as ws:
        await Client(ws).auth(_hs256(_claims(exp=int(time.time()) - 10)))
    await trio.sleep(0.3)  # let the last log lines land
    lines = limited.logs()
    rejected = [
        line
        for line in lines
        if line.get("event") == "connection refused" and line.get("reason") == "bad_token"
    ]
    # Logged once per distinct problem (the rest counted), never with the token.
    causes = [line["cause"] for line in rejected]
    assert len(causes) == len(set(causes)) and 3 <= len(causes) <= len(tokens), causes
    metrics = limited.admin_get("/metrics")[1]
    assert f'pgrelay_connections_rejected_total{{reason="bad_token"}} {len(tokens)}.0' in metrics
    text = "\n".join(json.dumps(line) for line in lines)
    for name, token in tokens.items():
        for part in {p for p in token.split(".") if len(p) > 8}:
            assert part not in text, f"{name}: token text in the log"


async def test_a_token_for_another_subject_cannot_refresh(limited: RelayProcess) -> None:
    async with connect(limited.ws_url) as ws:
        c = Client(ws)
        await c.auth(mint_token(SECRET, orgs=[str(ORG_A)], sub="alice", lifetime_s=600))
        await c.send(
            {
                "type": "auth",
                "token": mint_token(SECRET, orgs=[str(ORG_B)], sub="bob", lifetime_s=600),
            }
        )
        assert (await c.expect("error"))["code"] == "unauthorized"
        assert await c.close_code() == 4001
