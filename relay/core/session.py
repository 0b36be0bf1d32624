"""Per-connection state machine. Everything that affects it lives here.

The shell feeds inputs (`received_text`, `token_verified`, `subscribe_result`,
`tick`, ...) and carries out the returned actions in order. The session never
raises on a peer's input; it raises RuntimeError only when the shell misuses
it (e.g. a `token_verified` nobody asked for).

States: AWAITING_AUTH -> READY -> CLOSED (CLOSED is final; every input is then
ignored and returns no actions). Rules the design leaves open, decided here:

- Before `ready`, only `auth` is accepted (or a bearer token from the upgrade,
  `received_bearer`). Anything else gets an `error` (unauthorized, or
  bad_request for junk) and close 4002 ("authenticate first, in time").
  Frames that arrive while the first token is being verified are held (at
  most `max_deferred_frames`, else close 4029) and handled after `ready`,
  so a client may send auth and subscribe back to back.
- A rejected token closes with 4001, first or refresh alike. A refresh with
  a different `sub` closes with 4001. Each successful auth (refresh too)
  answers `ready` with the new `expires_at`; a refresh also rechecks every
  live subscription. `token_verified`/`token_rejected` answer VerifyToken
  requests in the order they were made.
- `subscribe` for an org already subscribed (or pending) replaces it: the old
  one stops (DropSubscription), the new one is authorized from scratch; its
  slot is reused, so replacing never hits too_many_subscriptions. A pending
  authorization counts toward the limit.
- `unsubscribe` always answers `unsubscribed` (reason requested), also when
  nothing was subscribed: the client's goal holds either way.
- Rate limit: a token bucket over all frames; a frame over the limit is not
  processed and gets `rate_limited`. Bad and rate-limited frames in a row
  are counted; the `max_consecutive_bad_frames`-th closes with 4029 instead
  of answering. Any processed valid frame resets the count.
- A recheck that comes back forbidden drops the subscription and sends
  `unsubscribed` (reason forbidden) carrying the subscribe's `ref`. A recheck
  that could not run changes nothing; the next one decides.
- Expiry: close 4001 once `now >= expires_at + token_leeway_s`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any

from relay.core.protocol import (
    MAX_CLIENT_FRAME_BYTES,
    Auth,
    BadMessage,
    ClientMessage,
    CloseCode,
    ErrorCode,
    Ping,
    Subscribe,
    Unsubscribe,
    decode_client_message,
    encode_error,
    encode_pong,
    encode_ready,
    encode_unsubscribed,
)
from relay.core.ratelimit import TokenBucket

__all__ = [
    "Action",
    "AuthorizeSubscription",
    "ClaimsJson",
    "Close",
    "DropSubscription",
    "RecheckSubscriptions",
    "Send",
    "Session",
    "SessionLimits",
    "SessionState",
    "StartSubscription",
    "VerifyToken",
    "claims_json",
]

MAX_CLOSE_REASON_BYTES = 123
"""A WebSocket close reason must fit in a control frame."""


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Per-connection limits and timers."""

    auth_timeout_s: float = 10.0
    """Time from connect to a verified token before closing with 4002."""
    token_leeway_s: float = 30.0
    """Clock-skew allowance after `exp` before closing with 4001."""
    recheck_interval_s: float = 60.0
    """How often live subscriptions are re-authorized."""
    max_subscriptions: int = 100
    """Subscriptions (live or pending) per connection."""
    rate_per_s: float = 20.0
    """Sustained client frames per second."""
    rate_burst: int = 40
    """Client frames allowed at once."""
    max_consecutive_bad_frames: int = 10
    """Bad or rate-limited frames in a row before closing with 4029."""
    max_frame_bytes: int = MAX_CLIENT_FRAME_BYTES
    """Largest client frame; bigger closes with 1009."""
    max_deferred_frames: int = 16
    """Frames held while the first token is verified."""


class SessionState(Enum):
    """Where a connection is in its life."""

    AWAITING_AUTH = "awaiting_auth"
    READY = "ready"
    CLOSED = "closed"


# -- actions for the shell ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send one text frame."""

    data: bytes
    """The encoded frame (UTF-8 JSON)."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection; the session is CLOSED and ignores further input."""

    code: CloseCode
    """WebSocket close code."""
    reason: str
    """Short reason (at most 123 UTF-8 bytes)."""

    def __post_init__(self) -> None:
        if len(self.reason.encode("utf-8")) > MAX_CLOSE_REASON_BYTES:
            raise ValueError("close reason too long")


@dataclass(frozen=True, slots=True)
class VerifyToken:
    """Verify a JWT, then call `token_verified` or `token_rejected`."""

    token: str
    """The raw token (never log it)."""


@dataclass(frozen=True, slots=True, eq=False)
class AuthorizeSubscription:
    """Ask SQL whether the claims may read `org` (and prepare the catch-up),
    then call `subscribe_result(this, allowed)` or `subscribe_failed(this)`."""

    request_id: int
    """Unique within the session; tells a current answer from a stale one."""
    ref: str
    """The subscribe's `ref`, for the `subscribed` frame."""
    org: uuid.UUID
    """The organization asked for."""
    cursor: str | None
    """The client's resume cursor, for `plan_resume`."""
    event_types: tuple[str, ...] | None
    """Event-type globs; None means all."""
    coalesce_ms: int | None
    """Coalescing window; None means off."""
    claims: Mapping[str, object]
    """Verified JWT claims, for `request.jwt.claims`."""


@dataclass(frozen=True, slots=True)
class StartSubscription:
    """Authorized and still wanted: send catch-up events, then `subscribed`
    (or `resync`), then register for live delivery."""

    request: AuthorizeSubscription
    """The request that was authorized."""


@dataclass(frozen=True, slots=True, eq=False)
class RecheckSubscriptions:
    """Re-ask SQL for each org, then call `recheck_result(org, allowed)`."""

    orgs: tuple[uuid.UUID, ...]
    """Live subscriptions to recheck."""
    claims: Mapping[str, object]
    """Current verified claims."""


@dataclass(frozen=True, slots=True)
class DropSubscription:
    """Stop live delivery for `org` (unregister it, discard pending events)."""

    org: uuid.UUID
    """The organization no longer followed."""


Action = (
    Send
    | Close
    | VerifyToken
    | AuthorizeSubscription
    | StartSubscription
    | RecheckSubscriptions
    | DropSubscription
)


class _Sub:
    __slots__ = ("active", "request")

    def __init__(self, request: AuthorizeSubscription) -> None:
        self.request = request
        self.active = False


_DEFERRED_BINARY = BadMessage(None, "binary frames are not supported")


class ClaimsJson(Mapping[str, object]):
    """Verified claims kept as the compact JSON that `request.jwt.claims` takes.

    A session holds its claims for the connection's whole life: this is far
    smaller than the decoded dict, and the shell needs no re-encoding per
    subscribe or recheck. `sub` is kept apart; other lookups decode the JSON
    each time."""

    __slots__ = ("json", "subject")

    def __init__(self, claims_json: str, subject: str | None) -> None:
        self.json = claims_json
        """The claims, as `TokenVerifier` encoded them."""
        self.subject = subject
        """The `sub` claim (None when absent)."""

    def _decoded(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.json)
        return decoded

    def __getitem__(self, key: str) -> object:
        if key == "sub":
            if self.subject is None:
                raise KeyError(key)
            return self.subject
        return self._decoded()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())


def claims_json(claims: Mapping[str, object]) -> str:
    """The JSON for `set_config('request.jwt.claims', ...)`."""
    if isinstance(claims, ClaimsJson):
        return claims.json
    return json.dumps(dict(claims), separators=(",", ":"))


_NO_CLAIMS: Mapping[str, object] = MappingProxyType({})


class Session:
    """One WebSocket connection's protocol state (sans-IO)."""

    __slots__ = (
        "_auth_deadline",
        "_bad_streak",
        "_bucket",
        "_deferred",
        "_next_recheck",
        "_request_ids",
        "_subs",
        "_verifying",
        "claims",
        "connection_id",
        "expires_at",
        "limits",
        "state",
    )

    def __init__(self, connection_id: str, now: float, limits: SessionLimits | None = None) -> None:
        self.connection_id = connection_id
        self.limits = limits or SessionLimits()
        self.state = SessionState.AWAITING_AUTH
        self.claims: Mapping[str, object] = _NO_CLAIMS
        self.expires_at = 0.0
        self._auth_deadline = now + self.limits.auth_timeout_s
        self._next_recheck = 0.0
        self._verifying = 0
        self._deferred: list[ClientMessage | BadMessage] | None = None
        """Frames held while the first token is verified (None when none)."""
        self._bucket = TokenBucket(self.limits.rate_per_s, self.limits.rate_burst, now)
        self._bad_streak = 0
        self._subs: dict[uuid.UUID, _Sub] = {}
        self._request_ids = 0

    # -- read-only views --

    @property
    def subject(self) -> object:
        """The verified token's `sub` claim (None before auth or if absent)."""
        return self.claims.get("sub")

    @property
    def subscription_count(self) -> int:
        """Live plus pending subscriptions."""
        return len(self._subs)

    def active_orgs(self) -> list[uuid.UUID]:
        """Orgs with a live (authorized) subscription."""
        return [org for org, sub in self._subs.items() if sub.active]

    def next_deadline(self) -> float | None:
        """When `tick` next has something to do (None once closed)."""
        if self.state is SessionState.AWAITING_AUTH:
            return self._auth_deadline
        if self.state is SessionState.READY:
            return min(self.expires_at + self.limits.token_leeway_s, self._next_recheck)
        return None

    # -- inputs from the peer --

    def received_bearer(self, token: str, now: float) -> list[Action]:
        """The upgrade request carried `Authorization: Bearer <token>`."""
        if self.state is SessionState.CLOSED:
            return []
        return self._dispatch(Auth(token), now)

    def received_text(self, text: str, now: float) -> list[Action]:
        """One client text frame."""
        if self.state is SessionState.CLOSED:
            return []
        if len(text) > self.limits.max_frame_bytes or (
            4 * len(text) > self.limits.max_frame_bytes
            and len(text.encode("utf-8", "surrogatepass")) > self.limits.max_frame_bytes
        ):
            return self._close(CloseCode.FRAME_TOO_BIG, "frame too big")
        return self._received(decode_client_message(text), now)

    def received_binary(self, now: float) -> list[Action]:
        """One client binary frame (not part of the protocol)."""
        if self.state is SessionState.CLOSED:
            return []
        return self._received(_DEFERRED_BINARY, now)

    def _received(self, message: ClientMessage | BadMessage, now: float) -> list[Action]:
        if not self._bucket.take(now):
            ref = getattr(message, "ref", None)
            return self._bad(ref, ErrorCode.RATE_LIMITED, "too many frames; slow down")
        if self.state is SessionState.AWAITING_AUTH and self._verifying:
            if self._deferred is None:
                self._deferred = []
            if len(self._deferred) >= self.limits.max_deferred_frames:
                return self._close(CloseCode.TOO_MANY_BAD_FRAMES, "too many frames before ready")
            self._deferred.append(message)
            return []
        return self._dispatch(message, now)

    def _dispatch(self, message: ClientMessage | BadMessage, now: float) -> list[Action]:
        if self.state is SessionState.AWAITING_AUTH:
            if isinstance(message, Auth):
                self._verifying += 1
                return [VerifyToken(message.token)]
            if isinstance(message, BadMessage):
                error = encode_error(message.ref, ErrorCode.BAD_REQUEST, message.message)
            else:
                error = encode_error(message.ref, ErrorCode.UNAUTHORIZED, "send auth first")
            return [Send(error), *self._close(CloseCode.AUTH_TIMEOUT, "authenticate first")]
        if self.state is SessionState.CLOSED:
            return []
        if isinstance(message, BadMessage):
            return self._bad(message.ref, ErrorCode.BAD_REQUEST, message.message)
        self._bad_streak = 0
        if isinstance(message, Auth):
            self._verifying += 1
            return [VerifyToken(message.token)]
        if isinstance(message, Subscribe):
            return self._subscribe(message)
        if isinstance(message, Unsubscribe):
            return self._unsubscribe(message)
        if isinstance(message, Ping):
            return [Send(encode_pong(message.ref))]
        raise AssertionError(f"unhandled message {message!r}")  # pragma: no cover

    def _bad(self, ref: str | None, code: ErrorCode, message: str) -> list[Action]:
        self._bad_streak += 1
        if self._bad_streak >= self.limits.max_consecutive_bad_frames:
            return self._close(CloseCode.TOO_MANY_BAD_FRAMES, "too many bad frames")
        return [Send(encode_error(ref, code, message))]

    def _subscribe(self, message: Subscribe) -> list[Action]:
        previous = self._subs.get(message.org)
        if previous is None and len(self._subs) >= self.limits.max_subscriptions:
            return [
                Send(
                    encode_error(
                        message.ref,
                        ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                        f"at most {self.limits.max_subscriptions} subscriptions per connection",
                    )
                )
            ]
        actions: list[Action] = []
        if previous is not None and previous.active:
            actions.append(DropSubscription(message.org))
        self._request_ids += 1
        request = AuthorizeSubscription(
            request_id=self._request_ids,
            ref=message.ref,
            org=message.org,
            cursor=message.cursor,
            event_types=message.event_types,
            coalesce_ms=message.coalesce_ms,
            claims=self.claims,
        )
        self._subs[message.org] = _Sub(request)
        actions.append(request)
        return actions

    def _unsubscribe(self, message: Unsubscribe) -> list[Action]:
        sub = self._subs.pop(message.org, None)
        actions: list[Action] = []
        if sub is not None and sub.active:
            actions.append(DropSubscription(message.org))
        actions.append(Send(encode_unsubscribed(message.ref, message.org, "requested")))
        return actions

    # -- answers from the shell --

    def token_verified(
        self, claims: Mapping[str, object], expires_at: float, now: float
    ) -> list[Action]:
        """The oldest outstanding VerifyToken succeeded."""
        if self.state is SessionState.CLOSED:
            return []
        self._answered_verification()
        if self.state is SessionState.READY and claims.get("sub") != self.subject:
            return [
                Send(encode_error(None, ErrorCode.UNAUTHORIZED, "token subject changed")),
                *self._close(CloseCode.TOKEN_INVALID, "token subject changed"),
            ]
        first = self.state is SessionState.AWAITING_AUTH
        self.state = SessionState.READY
        self.claims = claims
        self.expires_at = expires_at
        if now >= expires_at + self.limits.token_leeway_s:
            return self._close(CloseCode.TOKEN_INVALID, "token expired")
        actions: list[Action] = [Send(encode_ready(self.connection_id, expires_at))]
        self._next_recheck = now + self.limits.recheck_interval_s
        if first:
            deferred, self._deferred = self._deferred or (), None
            for message in deferred:
                if self.state is SessionState.CLOSED:
                    break
                actions += self._dispatch(message, now)
        else:
            actions += self._recheck()
        return actions

    def token_rejected(self, message: str, now: float) -> list[Action]:
        """The oldest outstanding VerifyToken failed; `message` goes to the client."""
        if self.state is SessionState.CLOSED:
            return []
        self._answered_verification()
        return [
            Send(encode_error(None, ErrorCode.UNAUTHORIZED, message)),
            *self._close(CloseCode.TOKEN_INVALID, "token rejected"),
        ]

    def _answered_verification(self) -> None:
        if not self._verifying:
            raise RuntimeError("token verification answered but none was requested")
        self._verifying -= 1

    def subscribe_result(self, request: AuthorizeSubscription, allowed: bool) -> list[Action]:
        """SQL answered an AuthorizeSubscription. Stale answers return []."""
        sub = self._current(request)
        if sub is None:
            return []
        if allowed:
            sub.active = True
            return [StartSubscription(request)]
        del self._subs[request.org]
        return [Send(encode_error(request.ref, ErrorCode.FORBIDDEN, "not a member of this org"))]

    def subscribe_failed(self, request: AuthorizeSubscription) -> list[Action]:
        """An AuthorizeSubscription could not be answered (database error)."""
        sub = self._current(request)
        if sub is None:
            return []
        del self._subs[request.org]
        return [
            Send(encode_error(request.ref, ErrorCode.INTERNAL, "could not subscribe; retry later"))
        ]

    def _current(self, request: AuthorizeSubscription) -> _Sub | None:
        if self.state is SessionState.CLOSED:
            return None
        sub = self._subs.get(request.org)
        if sub is None or sub.active or sub.request.request_id != request.request_id:
            return None
        return sub

    def recheck_result(self, org: uuid.UUID, allowed: bool) -> list[Action]:
        """SQL answered a recheck for `org`; forbidden drops the subscription."""
        if self.state is SessionState.CLOSED or allowed:
            return []
        sub = self._subs.get(org)
        if sub is None or not sub.active:
            return []
        del self._subs[org]
        return [
            DropSubscription(org),
            Send(encode_unsubscribed(sub.request.ref, org, "forbidden")),
        ]

    # -- time and lifecycle --

    def tick(self, now: float) -> list[Action]:
        """Deadlines: auth timeout, token expiry, periodic recheck."""
        if self.state is SessionState.AWAITING_AUTH:
            if now >= self._auth_deadline:
                return self._close(CloseCode.AUTH_TIMEOUT, "no auth in time")
            return []
        if self.state is SessionState.READY:
            if now >= self.expires_at + self.limits.token_leeway_s:
                return self._close(CloseCode.TOKEN_INVALID, "token expired")
            if now >= self._next_recheck:
                self._next_recheck = now + self.limits.recheck_interval_s
                return self._recheck()
        return []

    def _recheck(self) -> list[Action]:
        orgs = tuple(self.active_orgs())
        return [RecheckSubscriptions(orgs, self.claims)] if orgs else []

    def close(self, code: CloseCode, reason: str) -> list[Action]:
        """The server closes (e.g. 1012 on shutdown, 4008 for a slow client)."""
        if self.state is SessionState.CLOSED:
            return []
        return self._close(code, reason)

    def connection_lost(self) -> None:
        """The peer went away; nothing more will be sent."""
        self.state = SessionState.CLOSED

    def _close(self, code: CloseCode, reason: str) -> list[Action]:
        self.state = SessionState.CLOSED
        self._deferred = None
        return [Close(code, reason)]
