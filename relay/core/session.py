"""Per-connection state machine. Everything that affects it lives here.

The shell feeds inputs (`received_text`, `token_verified`, `catch_up_read`,
`live_row`, `output_drained`, `tick`, ...) and carries out the returned
actions in order. Frames leave through the connection's `Output`, which the
session owns: the session decides what is sent and when (catch-up pacing,
the stall deadline), the output how (directly, or through the bounded
outbox). The session never raises on a peer's input; it raises RuntimeError
only when the shell misuses it (e.g. a `token_verified` nobody asked for).

States: AWAITING_AUTH -> READY -> CLOSED (CLOSED is final; every input is then
ignored and returns no actions). Each subscription has its own life
(`relay.core.subscription`: pending -> catching_up -> live). Rules the design
leaves open, decided here:

- Before `ready`, only `auth` is accepted (or a bearer token from the upgrade,
  `received_bearer`). Anything else gets an `error` (unauthorized, or
  bad_request for junk) and close 4002 ("authenticate first, in time").
  Frames that arrive while the first token is being verified are held (at
  most `max_deferred_frames`, else close 4029) and handled after `ready`,
  so a client may send auth and subscribe back to back.
- A rejected token closes with 4001, first or refresh alike. A refresh with
  a different `sub` closes with 4001. Each successful auth (refresh too)
  answers `ready` with the new `expires_at`; a refresh also rechecks every
  subscription. `token_verified`/`token_rejected` answer VerifyToken
  requests in the order they were made.
- `subscribe` for an org already subscribed (or pending) replaces it: the old
  one stops, the new one starts from scratch with the cursor it carries; its
  slot is reused, so replacing never hits too_many_subscriptions. A pending
  subscription counts toward the limit.
- A subscription follows its org (`Follow`) *before* its first read takes the
  catch-up snapshot, so no live row can fall between the two.
- `unsubscribe` always answers `unsubscribed` (reason requested), also when
  nothing was subscribed: the client's goal holds either way.
- Rate limit: a token bucket over all frames; a frame over the limit is not
  processed and gets `rate_limited`. Bad and rate-limited frames in a row
  are counted; the `max_consecutive_bad_frames`-th closes with 4029 instead
  of answering. Any processed valid frame resets the count.
- A recheck (or a later catch-up page) that finds the org forbidden drops the
  subscription: `unsubscribed` (reason forbidden) carrying the subscribe's
  `ref` (an `error` forbidden if nothing was sent for it yet). A recheck that
  could not run changes nothing; the next one decides.
- Deadlines, all served by `tick(now)`: auth timeout (4002), expiry at
  `exp + token_leeway_s` (4001), the periodic recheck, coalescing windows,
  and the output's stall deadline (4008: frames waited with no progress).
  The session asks for a tick with `ScheduleTick` whenever its next deadline
  moves earlier than the one it asked for.
- Catch-up is paced by the output: rows go out and pages are read only while
  the output has room; `output_drained` resumes them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Final

from relay.core.codes import CloseCode, ErrorCode, UnsubscribeReason
from relay.core.cursor import Snapshot, decode_cursor
from relay.core.outbox import Output
from relay.core.protocol import (
    Auth,
    BadMessage,
    ClientMessage,
    EventRow,
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
from relay.core.subscription import CatchUpLimits, CatchUpPage, CatchUpQuery, Phase, Subscription

__all__ = [
    "Action",
    "ClaimsJson",
    "Close",
    "Follow",
    "ReadCatchUp",
    "RecheckSubscriptions",
    "ScheduleTick",
    "Session",
    "SessionLimits",
    "SessionState",
    "Unfollow",
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
    """How often subscriptions are re-authorized."""
    max_subscriptions: int = 100
    """Subscriptions (live or pending) per connection."""
    rate_per_s: float = 20.0
    """Sustained client frames per second."""
    rate_burst: int = 40
    """Client frames allowed at once."""
    max_consecutive_bad_frames: int = 10
    """Bad or rate-limited frames in a row before closing with 4029."""
    max_deferred_frames: int = 16
    """Frames held while the first token is verified."""
    catch_up: CatchUpLimits = field(default_factory=CatchUpLimits)
    """Bounds of each subscription's catch-up."""


class SessionState(Enum):
    """Where a connection is in its life."""

    AWAITING_AUTH = "awaiting_auth"
    READY = "ready"
    CLOSED = "closed"


# -- actions for the shell ---------------------------------------------------


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
class ReadCatchUp:
    """Run `query` in SQL under `claims`, then call `catch_up_read` with the
    page, or `catch_up_failed` when the read could not run."""

    subscription: Subscription
    """Whose read it is (pass it back with the answer)."""
    query: CatchUpQuery
    """What to read."""
    claims: Mapping[str, object]
    """Verified claims, for `request.jwt.claims`."""


@dataclass(frozen=True, slots=True, eq=False)
class RecheckSubscriptions:
    """Ask SQL which of `orgs` the claims may still read, then call
    `recheck_result(orgs, allowed)`."""

    orgs: tuple[uuid.UUID, ...]
    """Subscriptions to recheck."""
    claims: Mapping[str, object]
    """Current verified claims."""


@dataclass(frozen=True, slots=True, eq=False)
class Follow:
    """Index `subscription` for live rows of `org` (replacing this connection's
    previous one for `org`): the fan-out then calls `live_row` with it."""

    org: uuid.UUID
    """The organization."""
    subscription: Subscription
    """Passed back with each live row."""


@dataclass(frozen=True, slots=True)
class Unfollow:
    """Stop live rows of `org` for this connection."""

    org: uuid.UUID
    """The organization no longer followed."""


@dataclass(frozen=True, slots=True)
class ScheduleTick:
    """Call `tick` at `at` (or soon after); an earlier request may be dropped."""

    at: float
    """When, on the clock the session is given."""


Action = Close | VerifyToken | ReadCatchUp | RecheckSubscriptions | Follow | Unfollow | ScheduleTick

_NONE: Final[tuple[Action, ...]] = ()
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
        "_scheduled",
        "_subs",
        "_verifying",
        "claims",
        "connection_id",
        "expires_at",
        "limits",
        "output",
        "state",
    )

    def __init__(
        self, connection_id: str, now: float, output: Output, limits: SessionLimits | None = None
    ) -> None:
        self.connection_id = connection_id
        self.output = output
        """Where every frame of this connection goes."""
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
        self._subs: dict[uuid.UUID, Subscription] = {}
        self._scheduled: float | None = None
        """The tick asked for (ScheduleTick), if any."""

    # -- read-only views --

    @property
    def closed(self) -> bool:
        """Whether the session ended (every input is now ignored)."""
        return self.state is SessionState.CLOSED

    @property
    def subject(self) -> object:
        """The verified token's `sub` claim (None before auth or if absent)."""
        return self.claims.get("sub")

    @property
    def subscription_count(self) -> int:
        """Subscriptions in any phase."""
        return len(self._subs)

    def subscription(self, org: uuid.UUID) -> Subscription | None:
        """The subscription to `org`, if any."""
        return self._subs.get(org)

    def next_deadline(self) -> float | None:
        """When `tick` next has something to do (None once closed)."""
        if self.state is SessionState.CLOSED:
            return None
        if self.state is SessionState.AWAITING_AUTH:
            return self._auth_deadline
        deadline = min(self.expires_at + self.limits.token_leeway_s, self._next_recheck)
        for sub in self._subs.values():
            if sub.coalescer is not None:
                due = sub.next_deadline()
                if due is not None and due < deadline:
                    deadline = due
        stall = self.output.stall_deadline()
        if stall is not None and stall < deadline:
            deadline = stall
        return deadline

    def start(self, now: float) -> list[Action]:
        """The connection is open: ask for the first tick (the auth deadline)."""
        return self._schedule([])

    # -- inputs from the peer --

    def received_bearer(self, token: str, now: float) -> list[Action]:
        """The upgrade request carried `Authorization: Bearer <token>`."""
        if self.state is SessionState.CLOSED:
            return []
        return self._dispatch(Auth(token), now)

    def received_text(self, text: str, now: float) -> list[Action]:
        """One client text frame (its size was bounded by the WebSocket layer)."""
        if self.state is SessionState.CLOSED:
            return []
        return self._schedule(self._received(decode_client_message(text), now))

    def received_binary(self, now: float) -> list[Action]:
        """One client binary frame (not part of the protocol)."""
        if self.state is SessionState.CLOSED:
            return []
        return self._schedule(self._received(_DEFERRED_BINARY, now))

    def _received(self, message: ClientMessage | BadMessage, now: float) -> list[Action]:
        if not self._bucket.take(now):
            ref = getattr(message, "ref", None)
            return self._bad(ref, ErrorCode.RATE_LIMITED, "too many frames; slow down", now)
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
            self._send(error, now)
            return self._close(CloseCode.AUTH_TIMEOUT, "authenticate first")
        if self.state is SessionState.CLOSED:
            return []
        if isinstance(message, BadMessage):
            return self._bad(message.ref, ErrorCode.BAD_REQUEST, message.message, now)
        self._bad_streak = 0
        if isinstance(message, Auth):
            self._verifying += 1
            return [VerifyToken(message.token)]
        if isinstance(message, Subscribe):
            return self._subscribe(message, now)
        if isinstance(message, Unsubscribe):
            return self._unsubscribe(message, now)
        if isinstance(message, Ping):
            return self._send(encode_pong(message.ref), now)
        raise AssertionError(f"unhandled message {message!r}")  # pragma: no cover

    def _bad(self, ref: str | None, code: ErrorCode, message: str, now: float) -> list[Action]:
        self._bad_streak += 1
        if self._bad_streak >= self.limits.max_consecutive_bad_frames:
            return self._close(CloseCode.TOO_MANY_BAD_FRAMES, "too many bad frames")
        return self._send(encode_error(ref, code, message), now)

    def _subscribe(self, message: Subscribe, now: float) -> list[Action]:
        if message.org not in self._subs and len(self._subs) >= self.limits.max_subscriptions:
            return self._send(
                encode_error(
                    message.ref,
                    ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                    f"at most {self.limits.max_subscriptions} subscriptions per connection",
                ),
                now,
            )
        sub = Subscription(
            message.ref,
            message.org,
            None if message.cursor is None else decode_cursor(message.cursor),
            event_types=message.event_types,
            coalesce_ms=message.coalesce_ms,
            limits=self.limits.catch_up,
            started_at=now,
        )
        self._subs[message.org] = sub
        # Follow first: the first read's snapshot is taken after it.
        return [Follow(message.org, sub), ReadCatchUp(sub, sub.first_read(), self.claims)]

    def _unsubscribe(self, message: Unsubscribe, now: float) -> list[Action]:
        actions: list[Action] = []
        if self._subs.pop(message.org, None) is not None:
            actions.append(Unfollow(message.org))
        self._send(encode_unsubscribed(message.ref, message.org, UnsubscribeReason.REQUESTED), now)
        return actions

    def _send(self, message: bytes, now: float) -> list[Action]:
        """Send a control frame; [] or the close a hopeless client gets."""
        if self.output.control(message, now):
            return []
        return self._too_slow()

    # -- answers from the shell --

    def token_verified(
        self, claims: Mapping[str, object], expires_at: float, now: float
    ) -> list[Action]:
        """The oldest outstanding VerifyToken succeeded."""
        if self.state is SessionState.CLOSED:
            return []
        self._answered_verification()
        if self.state is SessionState.READY and claims.get("sub") != self.subject:
            self._send(encode_error(None, ErrorCode.UNAUTHORIZED, "token subject changed"), now)
            return self._close(CloseCode.TOKEN_INVALID, "token subject changed")
        first = self.state is SessionState.AWAITING_AUTH
        self.state = SessionState.READY
        self.claims = claims
        self.expires_at = expires_at
        if now >= expires_at + self.limits.token_leeway_s:
            return self._close(CloseCode.TOKEN_INVALID, "token expired")
        actions = self._send(encode_ready(self.connection_id, expires_at), now)
        self._next_recheck = now + self.limits.recheck_interval_s
        if first:
            deferred, self._deferred = self._deferred or (), None
            for message in deferred:
                if self.state is SessionState.CLOSED:
                    break
                actions += self._dispatch(message, now)
        else:
            actions += self._recheck()
        return self._schedule(actions)

    def token_rejected(self, message: str, now: float) -> list[Action]:
        """The oldest outstanding VerifyToken failed; `message` goes to the client."""
        if self.state is SessionState.CLOSED:
            return []
        self._answered_verification()
        self._send(encode_error(None, ErrorCode.UNAUTHORIZED, message), now)
        return self._close(CloseCode.TOKEN_INVALID, "token rejected")

    def _answered_verification(self) -> None:
        if not self._verifying:
            raise RuntimeError("token verification answered but none was requested")
        self._verifying -= 1

    def catch_up_read(
        self, sub: Subscription, query: CatchUpQuery, page: CatchUpPage, now: float
    ) -> list[Action]:
        """SQL answered a ReadCatchUp. Stale answers (the subscription was
        replaced, dropped, or restarted since) return []."""
        if not self._current(sub, query):
            return []
        if not page.allowed:
            return self._drop(sub, sub.refused(), now)
        actions: list[Action] = []
        follow_up = sub.read_done(query, page, self.output, now)
        if follow_up is not None:
            actions.append(ReadCatchUp(sub, follow_up, self.claims))
        return self._schedule(actions + self._pump(now))

    def catch_up_failed(self, sub: Subscription, query: CatchUpQuery, now: float) -> list[Action]:
        """A ReadCatchUp could not run (database error): the subscription ends with
        an `error` (internal); the client may subscribe again with its cursor."""
        if not self._current(sub, query):
            return []
        sub.read_failed(query)
        error = encode_error(sub.ref, ErrorCode.INTERNAL, "could not subscribe; retry later")
        return self._drop(sub, error, now)

    def wants(self, sub: Subscription, query: CatchUpQuery) -> bool:
        """Whether an answer to `query` for `sub` would still be used (the shell
        stops retrying a read nobody waits for)."""
        return self._current(sub, query)

    def _current(self, sub: Subscription, query: CatchUpQuery) -> bool:
        return (
            self.state is not SessionState.CLOSED
            and self._subs.get(sub.org) is sub
            and sub.answers(query)
        )

    def _drop(self, sub: Subscription, frame: bytes, now: float) -> list[Action]:
        del self._subs[sub.org]
        return self._schedule([Unfollow(sub.org), *self._send(frame, now)])

    def recheck_result(
        self, orgs: tuple[uuid.UUID, ...], allowed: set[uuid.UUID], now: float
    ) -> list[Action]:
        """SQL answered a recheck of `orgs`; those not `allowed` are dropped."""
        if self.state is SessionState.CLOSED:
            return []
        actions: list[Action] = []
        for org in orgs:
            sub = self._subs.get(org)
            if org in allowed or sub is None or sub.phase is Phase.PENDING:
                continue
            actions += self._drop(sub, sub.refused(), now)
            if self.closed:
                break
        return actions

    def recheck_now(self, now: float) -> list[Action]:
        """A hint that this user's memberships changed: recheck every subscription."""
        if self.state is not SessionState.READY:
            return []
        return self._recheck()

    # -- the fan-out and the socket --

    def live_row(
        self, sub: Subscription, row: EventRow, cursor: str, frame: bytes, now: float
    ) -> tuple[Action, ...] | list[Action]:
        """A live row for `sub` (Follow'ed). The fan-out's path: usually no action."""
        if self.state is SessionState.CLOSED:
            return _NONE
        if not sub.live(row, cursor, frame, self.output, now):
            return self._too_slow()
        if sub.coalescer is not None or self.output.transport.unsent_bytes:
            return self._schedule([])  # a coalescing window or the stall clock may start
        return _NONE

    def flush(self, now: float) -> list[Action]:
        """The fan-out finished a stretch of offers: send what `Output.cork` held
        (one write for the connection's share of a tail page)."""
        if self.state is SessionState.CLOSED:
            return []
        if not self.output.uncork(now):
            return self._too_slow()
        if self.output.transport.unsent_bytes:
            return self._schedule([])  # the stall clock may start
        return []

    def output_drained(self, now: float) -> list[Action]:
        """The socket took most of what waited: move queued frames on, and let
        catch-ups continue."""
        if self.state is SessionState.CLOSED:
            return []
        self.output.drained(now)
        return self._schedule(self._pump(now))

    def _pump(self, now: float) -> list[Action]:
        """Let each subscription send what it owes while the output has room."""
        actions: list[Action] = []
        output = self.output
        for sub in list(self._subs.values()):
            if self.closed:
                break
            ok, query = sub.pump(output, now)
            if query is not None:
                actions.append(ReadCatchUp(sub, query, self.claims))
            if not ok:
                return self._too_slow()
        return actions

    def database_changed(self, epoch: str, head: Snapshot, now: float) -> list[Action]:
        """The tail found another database (restored, failed over): every
        subscription past its first read resyncs at the tail's position."""
        if self.state is SessionState.CLOSED:
            return []
        for sub in self._subs.values():
            sub.database_changed(epoch, head, self.output, now)
        return self._schedule(self._pump(now))

    # -- time and lifecycle --

    def tick(self, now: float) -> list[Action]:
        """Deadlines: auth timeout, token expiry, recheck, coalescing windows, stall."""
        self._scheduled = None
        if self.state is SessionState.AWAITING_AUTH:
            if now >= self._auth_deadline:
                return self._close(CloseCode.AUTH_TIMEOUT, "no auth in time")
            return self._schedule([])
        if self.state is not SessionState.READY:
            return []
        if now >= self.expires_at + self.limits.token_leeway_s:
            return self._close(CloseCode.TOKEN_INVALID, "token expired")
        if self.output.stalled(now):
            return self._too_slow()
        actions: list[Action] = []
        if now >= self._next_recheck:
            self._next_recheck = now + self.limits.recheck_interval_s
            actions += self._recheck()
        for sub in self._subs.values():
            if not sub.flush_due(self.output, now):
                return self._too_slow()
        return self._schedule(actions)

    def _recheck(self) -> list[Action]:
        orgs = tuple(org for org, sub in self._subs.items() if sub.phase is not Phase.PENDING)
        return [RecheckSubscriptions(orgs, self.claims)] if orgs else []

    def _schedule(self, actions: list[Action]) -> list[Action]:
        """Append a ScheduleTick when the next deadline moved earlier than asked."""
        if self.state is SessionState.CLOSED:
            return actions
        deadline = self.next_deadline()
        if deadline is not None and (self._scheduled is None or deadline < self._scheduled):
            self._scheduled = deadline
            actions.append(ScheduleTick(deadline))
        return actions

    def close(self, code: CloseCode, reason: str) -> list[Action]:
        """The server closes (e.g. 1012 on shutdown)."""
        if self.state is SessionState.CLOSED:
            return []
        return self._close(code, reason)

    def connection_lost(self) -> None:
        """The peer went away; nothing more will be sent."""
        self.state = SessionState.CLOSED
        self._subs.clear()

    def _too_slow(self) -> list[Action]:
        if self.state is SessionState.CLOSED:
            return []
        self.output.stats.slow_closes += 1
        return self._close(CloseCode.TOO_SLOW, "too slow to keep up")

    def _close(self, code: CloseCode, reason: str) -> list[Action]:
        self.state = SessionState.CLOSED
        self._deferred = None
        return [Close(code, reason)]
