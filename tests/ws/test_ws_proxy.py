"""Who the client is behind a reverse proxy: PROXY protocol v1/v2 and X-Forwarded-For."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.ws.proxy import NEED_MORE, ProxyHeader, TrustedProxies, parse_proxy_header

V2 = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2 + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


def test_v1_tcp4_and_tcp6() -> None:
    data = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n"
    header = parse_proxy_header(data)
    assert header == ProxyHeader(("203.0.113.7", 51234), data.index(b"GET"))
    six = parse_proxy_header(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n")
    assert isinstance(six, ProxyHeader) and six.source == ("2001:db8::1", 4000)


def test_v1_unknown_keeps_the_socket_address() -> None:
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == ProxyHeader(None, 15)


def test_v2_proxy_local_and_families() -> None:
    body = ipaddress.IPv4Address("198.51.100.9").packed + bytes(4) + struct.pack("!HH", 7, 8)
    assert parse_proxy_header(v2(1, 0x11, body) + b"GET") == ProxyHeader(
        ("198.51.100.9", 7), 16 + len(body)
    )
    six = ipaddress.IPv6Address("2001:db8::7").packed + bytes(16) + struct.pack("!HH", 9, 1)
    header = parse_proxy_header(v2(1, 0x21, six + b"\x04\x00\x01x"))  # with a TLV
    assert isinstance(header, ProxyHeader) and header.source == ("2001:db8::7", 9)
    assert parse_proxy_header(v2(0, 0x00, b"")) == ProxyHeader(None, 16)


def test_a_plain_request_is_not_a_proxy_header() -> None:
    assert parse_proxy_header(b"GET /v1 HTTP/1.1\r\n") is None
    assert parse_proxy_header(b"POST") is None


@pytest.mark.parametrize(
    "partial",
    [b"PRO", b"PROXY TCP4 1.2.3.4", V2[:5], V2 + b"\x21\x11\x00"],
)
def test_partial_headers_ask_for_more(partial: bytes) -> None:
    assert parse_proxy_header(partial) is NEED_MORE


@pytest.mark.parametrize(
    "junk",
    [
        b"PROXY TCP4 not-an-ip 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 ::1 ::2 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.5 99999 2\r\n",
        b"PROXY SCTP 1.2.3.4\r\n",
        b"PROXY " + b"x" * 200,
        V2 + b"\x31\x11\x00\x00",
    ],
)
def test_malformed_headers_are_errors(junk: bytes) -> None:
    with pytest.raises(ValueError):
        parse_proxy_header(junk)


@given(st.binary(max_size=300))
def test_parsing_never_fails_otherwise(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_proxy_header(data)


TRUSTED = TrustedProxies(["10.0.0.0/8", "127.0.0.1"])


@pytest.mark.parametrize(
    ("peer", "xff", "client"),
    [
        ("203.0.113.7", ["1.1.1.1"], "203.0.113.7"),  # not from a proxy: ignored
        ("10.0.0.5", [], "10.0.0.5"),
        ("10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.5", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # the client wrote 6.6.6.6
        ("10.0.0.5", ["198.51.100.1, 10.0.0.9"], "198.51.100.1"),  # two proxies
        ("10.0.0.5", ["198.51.100.1", "10.0.0.9"], "198.51.100.1"),  # two headers
        ("10.0.0.5", ["10.0.0.8, 10.0.0.9"], "10.0.0.8"),  # all trusted: the leftmost
        ("10.0.0.5", ["junk, 10.0.0.9"], "10.0.0.9"),
        ("127.0.0.1", ["[2001:db8::1]"], "2001:db8::1"),
        ("::ffff:10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
    ],
)
def test_forwarded_for_believes_only_trusted_hops(peer: str, xff: list[str], client: str) -> None:
    assert TRUSTED.client(peer, xff) == client


def test_trusted_proxies_refuse_what_is_not_a_network() -> None:
    with pytest.raises(ValueError, match="not an IP address or CIDR"):
        TrustedProxies(["10.0.0.0/33"])
    assert not TrustedProxies() and TrustedProxies(["::1"]).trusts("::1")
