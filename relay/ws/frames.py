"""Server frames as raw bytes (RFC 6455 section 5.2). Close codes are
`relay.core.codes.CloseCode`, shared with the protocol core.

Server frames are never masked, so one encoded frame is the same byte string
for every recipient: the fan-out encodes an event once and offers the same
bytes to each connection.
"""

from __future__ import annotations

import struct

from relay.core.codes import UNSENDABLE_CLOSE_CODES, CloseCode

__all__ = [
    "CloseCode",
    "encode_binary_frame",
    "encode_close_frame",
    "encode_text_frame",
]


_FIN_TEXT = 0x80 | 0x1
_FIN_BINARY = 0x80 | 0x2
_FIN_CLOSE = 0x80 | 0x8
_MAX_7BIT = 125
_MAX_16BIT = 0xFFFF
_HEADER_7 = struct.Struct("!BB")
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
_MAX_CLOSE_REASON_BYTES = _MAX_7BIT - 2


def _encode(first_byte: int, payload: bytes) -> bytes:
    length = len(payload)
    if length <= _MAX_7BIT:
        return _HEADER_7.pack(first_byte, length) + payload
    if length <= _MAX_16BIT:
        return _HEADER_16.pack(first_byte, 126, length) + payload
    return _HEADER_64.pack(first_byte, 127, length) + payload


def encode_text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked text frame carrying `payload` (UTF-8, not checked)."""
    return _encode(_FIN_TEXT, payload)


def encode_binary_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked binary frame carrying `payload`."""
    return _encode(_FIN_BINARY, payload)


def encode_close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with `code` and `reason` (cut to 123 bytes on a character boundary)."""
    if not 1000 <= code <= 4999 or code in UNSENDABLE_CLOSE_CODES:
        raise ValueError(f"close code {code} cannot be sent")
    raw = reason.encode("utf-8")
    if len(raw) > _MAX_CLOSE_REASON_BYTES:
        raw = raw[:_MAX_CLOSE_REASON_BYTES].decode("utf-8", errors="ignore").encode("utf-8")
    return _encode(_FIN_CLOSE, struct.pack("!H", code) + raw)
