"""Every code pgrelay puts on the wire, in one place.

- `CloseCode`: WebSocket close codes (RFC 6455 section 7.4.1 and protocol v1's
  own 4xxx codes); each tells the client whether and how to reconnect.
- `ErrorCode`: the `code` of an `error` frame, a per-request failure after
  which the connection stays open.
- `ResyncReason`: the `reason` of a `resync` frame.
- `UnsubscribeReason`: the `reason` of an `unsubscribed` frame.

The WebSocket shell (`relay.ws`) and the protocol core both use these enums,
so a code is named once.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

__all__ = ["UNSENDABLE_CLOSE_CODES", "CloseCode", "ErrorCode", "ResyncReason", "UnsubscribeReason"]


class CloseCode(IntEnum):
    """WebSocket close codes the server sends (or sees), with what they tell a client."""

    NORMAL = 1000
    """Normal closure (the handler ended)."""
    GOING_AWAY = 1001
    """The handler was cancelled."""
    PROTOCOL_ERROR = 1002
    """The peer broke RFC 6455 (found by wsproto)."""
    UNSUPPORTED_DATA = 1003
    """A binary frame: protocol v1 is text JSON only. A client bug."""
    NO_STATUS = 1005
    """Local only: the peer's close frame carried no code."""
    ABNORMAL = 1006
    """Local only: the connection dropped without a close frame."""
    INVALID_PAYLOAD = 1007
    """A text frame that is not UTF-8. A client bug."""
    POLICY_VIOLATION = 1008
    """Generic policy violation (RFC 6455)."""
    MESSAGE_TOO_BIG = 1009
    """A client message over the size limit. A client bug."""
    INTERNAL_ERROR = 1011
    """No pong to the server's ping in time, or an internal error: reconnect and resume."""
    SERVICE_RESTART = 1012
    """The server is restarting: reconnect after a random 0.5-5 s and resume."""
    TRY_AGAIN_LATER = 1013
    """Too many connections for this user: close others, retry later."""
    TOKEN_INVALID = 4001
    """Token invalid or expired: get a new token, then reconnect."""
    AUTH_TIMEOUT = 4002
    """No auth in time (or something other than auth first)."""
    TOO_SLOW = 4008
    """The client could not keep up: reconnect and resume; read faster."""
    TOO_MANY_BAD_FRAMES = 4029
    """Too many bad or rate-limited frames in a row. A client bug."""


UNSENDABLE_CLOSE_CODES = frozenset({CloseCode.NO_STATUS, CloseCode.ABNORMAL, 1015})
"""Codes that must never appear in a close frame (RFC 6455 section 7.4.1)."""


class ErrorCode(StrEnum):
    """`code` of an `error` frame: per-request failures; the connection stays."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"


class ResyncReason(StrEnum):
    """Why a client must do a full refresh (the `reason` of a `resync` frame)."""

    CURSOR_EXPIRED = "cursor_expired"
    TOO_FAR_BEHIND = "too_far_behind"
    OVERFLOW = "overflow"
    EPOCH_CHANGED = "epoch_changed"
    BAD_CURSOR = "bad_cursor"


class UnsubscribeReason(StrEnum):
    """`reason` of an `unsubscribed` frame."""

    REQUESTED = "requested"
    FORBIDDEN = "forbidden"
