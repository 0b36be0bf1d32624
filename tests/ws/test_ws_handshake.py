"""The opening handshake: pure checks, then over real sockets on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import socket

import h11
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from relay.ws import WsReject, WsRequest
from relay.ws.handshake import OriginPolicy, check_upgrade, reject_response
from relay.ws.sockets import configure_accepted
from tests.ws.support import (
    FAST,
    RawClient,
    http_exchange,
    masked_frame,
    serving,
    status_of,
    upgrade_request,
)

pytestmark = pytest.mark.timeout(10)

PEER = ("127.0.0.1", 50000)


def parse(raw: bytes) -> h11.Request:
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(raw)
    event = parser.next_event()
    assert isinstance(event, h11.Request)
    return event


def check(raw: bytes, origins: tuple[str, ...] = ()) -> WsRequest | WsReject:
    return check_upgrade(parse(raw), PEER, path="/v1", allowed_origins=origins)


# -- pure ------------------------------------------------------------------------
def test_a_good_request_is_accepted_with_its_headers() -> None:
    request = check(upgrade_request("/v1?x=1", (("Authorization", "Bearer t"),)))
    assert isinstance(request, WsRequest)
    assert (request.path, request.query, request.peer) == ("/v1", "x=1", PEER)
    assert request.authorization == "Bearer t"
    assert request.origin is None


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (upgrade_request("/v2"), 404),
        (upgrade_request("/"), 404),
        (upgrade_request().replace(b"GET", b"PUT", 1), 405),
        (b"GET /v1 HTTP/1.1\r\nHost: x\r\n\r\n", 426),
        (upgrade_request().replace(b"Version: 13", b"Version: 8"), 426),
        (upgrade_request().replace(b"Sec-WebSocket-Key", b"X-Key"), 400),
    ],
)
def test_bad_requests_are_refused(raw: bytes, status: int) -> None:
    reject = check(raw)
    assert isinstance(reject, WsReject)
    assert reject.status == status


def test_origin_allow_list() -> None:
    allowed = ("https://app.example",)
    good = check(upgrade_request(headers=(("Origin", "https://app.example"),)), allowed)
    assert isinstance(good, WsRequest)
    bad = check(upgrade_request(headers=(("Origin", "https://evil.example"),)), allowed)
    assert isinstance(bad, WsReject) and bad.status == 403
    near = check(upgrade_request(headers=(("Origin", "https://app.example:443"),)), allowed)
    assert isinstance(near, WsReject) and near.status == 403
    assert isinstance(check(upgrade_request(), allowed), WsRequest)  # native client


def test_reject_response_is_complete_http() -> None:
    raw = reject_response(WsReject(503, "not ready", (("retry-after", "5"),)))
    assert raw.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"retry-after: 5\r\n" in raw and raw.endswith(b"\r\n\r\nnot ready\n")


# -- over sockets ---------------------------------------------------------------
async def test_handshake_ok_and_the_handler_sees_the_request() -> None:
    async with serving() as served:
        headers = [(b"Authorization", b"Bearer abc"), (b"Origin", b"https://app.example")]
        async with open_websocket_url(served.url, extra_headers=headers) as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
        request = served.requests[0]
        assert request.path == "/v1"
        assert request.authorization == "Bearer abc"
        assert request.origin == "https://app.example"
        assert request.peer[0] == "127.0.0.1"


async def test_wrong_path_gets_404() -> None:
    async with serving() as served:
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(f"ws://127.0.0.1:{served.port}/v2"):
                pass
        assert rejected.value.status_code == 404
        assert not served.connections


async def test_origin_not_allowed_gets_403_and_no_upgrade() -> None:
    async with serving(allowed_origins=("https://app.example",)) as served:
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(
                served.url, extra_headers=[(b"Origin", b"https://evil.example")]
            ):
                pass
        assert rejected.value.status_code == 403
        assert not served.connections
        async with open_websocket_url(served.url) as ws:  # no Origin: a native client
            await ws.send_message("native")
            assert await ws.get_message() == "native"


async def test_slow_loris_is_dropped_within_the_deadline() -> None:
    async with serving() as served:
        client = await RawClient.connect(served.port)
        await client.send(upgrade_request()[:40])  # never finishes the head
        started = trio.current_time()
        with trio.fail_after(FAST.handshake_timeout_s + 2):
            assert await client.recv_is_eof()
        assert trio.current_time() - started < FAST.handshake_timeout_s + 0.5
        client.close()
        assert not served.connections


async def test_plain_http_gets_426() -> None:
    async with serving() as served:
        response = await http_exchange(served.port, b"GET /v1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(response) == 426
        assert b"upgrade: websocket" in response.lower()


async def test_garbage_gets_400_and_huge_head_431() -> None:
    async with serving() as served:
        assert status_of(await http_exchange(served.port, b"NOT HTTP AT ALL\r\n\r\n")) == 400
        huge = upgrade_request(headers=(("X-Pad", "a" * 20000),))
        assert status_of(await http_exchange(served.port, huge)) == 431


async def test_permessage_deflate_is_never_negotiated() -> None:
    async with serving() as served:
        client = await RawClient.connect(served.port)
        head = await client.upgrade(
            headers=(("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),)
        )
        assert b"sec-websocket-extensions" not in head.lower()
        await client.send_text("plain")
        event = await client.next_event()
        assert event is not None and getattr(event, "data", None) == "plain"
        client.close()


async def test_the_request_hook_can_refuse() -> None:
    def not_ready(request: WsRequest) -> WsReject | None:
        return WsReject(503, "not ready") if request.query == "" else None

    async with serving(on_request=not_ready) as served:
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(served.url):
                pass
        assert rejected.value.status_code == 503
        async with open_websocket_url(served.url + "?ok=1") as ws:
            await ws.send_message("in")
            assert await ws.get_message() == "in"


async def test_a_failing_request_hook_refuses_with_500() -> None:
    def broken(request: WsRequest) -> WsReject | None:
        raise RuntimeError("hook bug")

    async with serving(on_request=broken) as served:
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(served.url):
                pass
        assert rejected.value.status_code == 500


async def test_a_frame_sent_right_behind_the_request_is_not_lost() -> None:
    async with serving() as served:
        client = await RawClient.connect(served.port)
        await client.send(upgrade_request() + masked_frame(0x1, b"pipelined"))
        head = await client.read_head()
        assert head.startswith(b"HTTP/1.1 101 ")
        event = await client.next_event()
        assert event is not None and getattr(event, "data", None) == "pipelined"
        client.close()


def test_accepted_sockets_get_nodelay_and_a_small_send_buffer() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        configure_accepted(accepted, 64 * 1024)
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert 64 * 1024 <= accepted.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 128 * 1024
        assert not accepted.getblocking()
    finally:
        for sock in (accepted, client, listener):
            sock.close()


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example.com", True),
        ("https://a.b.example.com", True),
        ("HTTPS://App.Example.com", True),
        ("https://example.com", False),  # the pattern is for subdomains only
        ("https://evilexample.com", False),
        ("https://app.example.com:8443", False),  # another port
        ("http://app.example.com", False),  # another scheme
        ("https://app.example.com.evil.test", False),
        ("http://localhost:3000", True),
        ("http://[::1]:3000", True),
        ("null", False),
    ],
)
def test_origin_patterns(origin: str, allowed: bool) -> None:
    policy = OriginPolicy(["https://*.example.com", "http://localhost:3000", "http://[::1]:3000"])
    assert policy.allows(origin) is allowed


@pytest.mark.parametrize(
    "pattern",
    ["app.example.com", "https://app.*.example.com", "https://*example.com", "https://x/", "*"],
)
def test_origin_patterns_that_cannot_match_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="not an origin"):
        OriginPolicy([pattern])


async def test_handshakes_beyond_the_cap_wait_in_the_backlog_not_in_a_deadline() -> None:
    """With two silent connections holding both handshake slots, a third client is
    not accepted until a slot frees (a silent one times out), and its own
    handshake deadline starts then: it upgrades instead of being dropped."""
    limits = dataclasses.replace(FAST, max_handshakes=2, handshake_timeout_s=0.5)
    async with serving(limits=limits) as served:
        silent = [await RawClient.connect(served.port) for _ in range(2)]
        await trio.sleep(0.1)
        started = trio.current_time()
        late = await RawClient.connect(served.port)  # the kernel completes the TCP handshake
        await trio.sleep(0.3)  # ... then the request sits in the backlog, unread
        with trio.fail_after(5):
            await late.upgrade()
        waited = trio.current_time() - started
        assert 0.35 <= waited < 2.0, waited  # it waited for a slot, then got one
        for client in silent:
            client.close()
        late.close()
