"""Who the client is behind a reverse proxy (pure functions, no I/O).

Only peers in `TrustedProxies` are believed. From them, the client address
comes from the PROXY protocol header (v1 text or v2 binary, as HAProxy and
nginx's stream module send it) when the connection starts with one, else from
`X-Forwarded-For`: the rightmost address that is not itself a trusted proxy
(each proxy appends the address it saw, so everything left of the first
untrusted hop could have been written by the client). From any other peer,
the socket's address is the client's and these headers are ignored.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_PROXY_V1_BYTES",
    "NEED_MORE",
    "ProxyHeader",
    "TrustedProxies",
    "parse_proxy_header",
]

MAX_PROXY_V1_BYTES = 107
"""The longest PROXY v1 line, CRLF included (the spec's bound)."""
_V1_PREFIX = b"PROXY "
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_HEADER = struct.Struct("!12sBBH")
_IPV4_ADDRESSES = struct.Struct("!4s4sHH")
_IPV6_ADDRESSES = struct.Struct("!16s16sHH")


class _NeedMore:
    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = _NeedMore()
"""More bytes are needed to decide."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY protocol header."""

    source: tuple[str, int] | None
    """The client's address and port; None for LOCAL / UNKNOWN (the proxy's own
    connection, e.g. a health check: keep the socket's address)."""
    length: int
    """Bytes the header took at the start of the stream."""


def parse_proxy_header(data: bytes) -> ProxyHeader | _NeedMore | None:
    """The PROXY header at the start of `data`: a `ProxyHeader`, NEED_MORE, or None
    when `data` does not start with one. Raises ValueError for a malformed one."""
    if data.startswith(_V2_SIGNATURE[: len(data)]) and len(data) < len(_V2_SIGNATURE):
        return NEED_MORE
    if data.startswith(_V2_SIGNATURE):
        return _parse_v2(data)
    if _V1_PREFIX.startswith(data[: len(_V1_PREFIX)]) and len(data) < len(_V1_PREFIX):
        return NEED_MORE
    if data.startswith(_V1_PREFIX):
        return _parse_v1(data)
    return None


def _parse_v1(data: bytes) -> ProxyHeader | _NeedMore:
    end = data.find(b"\r\n", 0, MAX_PROXY_V1_BYTES)
    if end < 0:
        if len(data) >= MAX_PROXY_V1_BYTES:
            raise ValueError("PROXY v1 line too long")
        return NEED_MORE
    parts = data[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(None, end + 2)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ValueError("malformed PROXY v1 line")
    source = ipaddress.ip_address(parts[2])
    if (source.version == 4) != (parts[1] == "TCP4"):
        raise ValueError("PROXY v1 address family mismatch")
    port = int(parts[4])
    if not 0 <= port <= 65535:
        raise ValueError("PROXY v1 port out of range")
    return ProxyHeader((str(source), port), end + 2)


def _parse_v2(data: bytes) -> ProxyHeader | _NeedMore:
    if len(data) < _V2_HEADER.size:
        return NEED_MORE
    _, version_command, family, length = _V2_HEADER.unpack_from(data)
    if version_command >> 4 != 2:
        raise ValueError("unknown PROXY protocol version")
    total = _V2_HEADER.size + length
    if len(data) < total:
        return NEED_MORE
    command = version_command & 0x0F
    if command == 0x0:  # LOCAL: the proxy's own connection
        return ProxyHeader(None, total)
    if command != 0x1:
        raise ValueError("unknown PROXY v2 command")
    body = data[_V2_HEADER.size : total]
    if family == 0x11 and length >= _IPV4_ADDRESSES.size:  # TCP over IPv4
        src, _, sport, _ = _IPV4_ADDRESSES.unpack_from(body)
        return ProxyHeader((str(ipaddress.IPv4Address(src)), sport), total)
    if family == 0x21 and length >= _IPV6_ADDRESSES.size:  # TCP over IPv6
        src, _, sport, _ = _IPV6_ADDRESSES.unpack_from(body)
        return ProxyHeader((str(ipaddress.IPv6Address(src)), sport), total)
    return ProxyHeader(None, total)  # UNSPEC, UDP or UNIX: keep the socket's address


class TrustedProxies:
    """The networks whose peers may say who the client is."""

    __slots__ = ("_networks",)

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        """Raises ValueError naming the first entry that is not an address or CIDR."""
        networks = []
        for cidr in cidrs:
            try:
                networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP address or CIDR") from None
        self._networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: str) -> bool:
        """Whether `address` is one of the trusted proxies."""
        if not self._networks:
            return False  # (the common case, for every connection: no parsing)
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._networks)

    def client(self, peer: str, forwarded_for: Iterable[str]) -> str:
        """The client's address for a request from `peer` carrying these
        `X-Forwarded-For` header values (in order)."""
        if not self.trusts(peer):
            return peer
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
        nearest = peer
        for hop in reversed(hops):
            try:
                address = str(ipaddress.ip_address(hop.strip("[]")))
            except ValueError:
                return nearest  # junk: believe no further than the proxy that passed it
            if not self.trusts(address):
                return address
            nearest = address
        return nearest
