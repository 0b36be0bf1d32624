"""One WebSocket client in the trio shell: carries out what its Session (the
pure state machine) asks for, and delivers events to it without ever making
the hub wait.

Per connection there is one reader task (this module's `serve`); the
WebSocket layer adds a writer task only while bytes are left over; the
hub's timer task drives deadlines; each subscribe and recheck runs as a short
task in the hub's nursery, doing its SQL in a worker thread, and is cancelled
when its connection ends. An idle connection holds no nursery, no outbox and
no task of its own beyond the reader.

Handover from catch-up to live (no gap, no duplicate but the batch in
flight): the subscription is registered *before* the catch-up snapshot S is
taken, and live rows arriving meanwhile are held. After the replay and the
`subscribed` frame, held rows already visible in S (so replayed) are dropped
and the rest are delivered.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import psycopg
import structlog
import trio

from relay.auth import AuthError, TokenVerifier
from relay.core.cursor import Cursor, Fresh, Replay, Resync, ResyncReason
from relay.core.outbox import Outbox, OutboxLimits, PushResult
from relay.core.protocol import (
    CloseCode,
    ErrorCode,
    EventRow,
    encode_error,
    encode_event,
    encode_resync,
    encode_subscribed,
)
from relay.core.registry import Subscription
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
    StartSubscription,
    VerifyToken,
    claims_json,
)
from relay.database import Database
from relay.hub import Hub
from relay.reads import SubscribeRead, authorized_orgs, subscribe_read
from relay.ws import CloseCode as WsCloseCode
from relay.ws import SendResult, WsConnection, WsState, encode_text_frame

#: Live rows held per subscription while its catch-up runs; beyond, it resyncs.
MAX_HANDOVER_ROWS = 10_000

log = structlog.get_logger("pgrelay.client")

_A = TypeVar("_A")


@dataclass(frozen=True)
class ClientConfig:
    subscriber_role: str
    replay_limit: int
    session: SessionLimits
    outbox: OutboxLimits
    max_pending_bytes: int
    max_connections_per_user: int
    """The WebSocket layer's bound on unsent bytes (WsLimits.max_pending_bytes)."""


class _Handover:
    """Live rows that arrived while a subscription's catch-up was running."""

    __slots__ = ("overflowed", "request_id", "rows")

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self.rows: list[tuple[EventRow, str, bytes]] = []
        self.overflowed = False


class Client:
    """A connection's shell state. Hashable by identity (the registry's key)."""

    __slots__ = (
        "_tasks",
        "_timer_at",
        "close_code",
        "closing",
        "config",
        "db",
        "events_sent",
        "frames_received",
        "handovers",
        "hub",
        "id",
        "max_pending_bytes",
        "outbox",
        "peer",
        "session",
        "subject",
        "verifier",
        "ws",
    )

    def __init__(
        self,
        connection_id: str,
        ws: WsConnection,
        *,
        hub: Hub,
        db: Database,
        verifier: TokenVerifier,
        config: ClientConfig,
        peer: str,
    ) -> None:
        self.id = connection_id
        self.ws = ws
        self.hub = hub
        self.db = db
        self.verifier = verifier
        self.config = config
        self.peer = peer
        now = hub.clock()
        self.session = Session(connection_id, now, config.session)
        self.outbox: Outbox | None = None
        """Created on the first frame the socket could not take (`_outbox`)."""
        self.max_pending_bytes = config.max_pending_bytes
        self.handovers: dict[uuid.UUID, _Handover] | None = None
        """Subscriptions whose catch-up runs (None when there is none)."""
        self.closing = False
        self.close_code: int | None = None
        self._tasks: set[trio.CancelScope] | None = None
        """Scopes of this connection's running subscribe/recheck tasks."""
        self.events_sent = 0
        self.frames_received = 0
        self.subject: str | None = None
        """The first token's `sub` (a refresh for another subject is closed 4001)."""
        self._timer_at: float | None = None
        ws.set_drain_callback(self._drained)

    # -- lifecycle -------------------------------------------------------------
    async def serve(self, bearer: str | None) -> None:
        """Run until the connection ends; never raises for a peer's behaviour."""
        self.hub.add(self)
        started = self.hub.clock()
        try:
            self._reschedule()
            if bearer is not None:
                self.apply(self.session.received_bearer(bearer, self.hub.clock()))
            await self._read_loop()
        finally:
            self.closing = True
            if self._tasks:
                for scope in self._tasks:
                    scope.cancel()
            self.session.connection_lost()
            self.hub.remove(self)
            if self.subject is not None:
                self.hub.count_user(self.subject, -1)
            log.info(
                "connection closed",
                connection_id=self.id,
                peer=self.peer,
                sub=self.subject,
                close_code=self.close_code or self.ws.close_code,
                seconds=round(self.hub.clock() - started, 3),
                frames_in=self.frames_received,
                events_out=self.events_sent,
            )

    async def _read_loop(self) -> None:
        while not self.closing:
            # Binary (1003), invalid UTF-8 (1007) and oversized (1009) messages are
            # closed by the WebSocket layer; None means the connection is closing.
            message = await self.ws.receive_message()
            if message is None:
                return
            self.frames_received += 1
            self.apply(self.session.received_text(message, self.hub.clock()))

    def _start(self, task: Callable[[_A], Awaitable[None]], arg: _A) -> None:
        """Run `task(arg)` in the hub's nursery, cancelled when this connection ends."""
        self.hub.start_soon(self._run_task, task, arg)

    async def _run_task(self, task: Callable[[_A], Awaitable[None]], arg: _A) -> None:
        if self.closing:
            return
        with trio.CancelScope() as scope:
            tasks = self._tasks
            if tasks is None:
                tasks = self._tasks = set()
            tasks.add(scope)
            try:
                await task(arg)
            except Exception:
                # As if it had run inside the connection's handler: close 1011.
                log.exception("connection task failed", connection_id=self.id, peer=self.peer)
                self._close(WsCloseCode.INTERNAL_ERROR, "internal error")
            finally:
                tasks.discard(scope)
                if not tasks and self._tasks is tasks:
                    self._tasks = None

    def on_timer(self, when: float, now: float) -> None:
        if self.closing or when != self._timer_at:
            return  # stale entry: rescheduled since
        self._timer_at = None
        self.apply(self.session.tick(now))
        for org, subscription in list(self.hub.registry.subscriptions_of(self).items()):
            coalescer = subscription.coalescer
            if coalescer is not None and not (self.handovers and org in self.handovers):
                for event in coalescer.due(now):
                    self._send_event(
                        event.row,
                        event.cursor,
                        encode_text_frame(encode_event(event.row, event.cursor, event.count)),
                        now,
                    )
        self._reschedule()

    def _reschedule(self) -> None:
        if self.closing:
            return
        deadlines = [self.session.next_deadline()]
        for subscription in self.hub.registry.subscriptions_of(self).values():
            if subscription.coalescer is not None:
                deadlines.append(subscription.coalescer.next_deadline())
        when = min((d for d in deadlines if d is not None), default=None)
        if when is not None and when != self._timer_at:
            self._timer_at = when
            self.hub.schedule(self, when)

    # -- actions from the session ------------------------------------------------
    def apply(self, actions: Iterable[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send_control(action.data)
            elif isinstance(action, Close):
                self._close(action.code, action.reason)
            elif isinstance(action, VerifyToken):
                self._verify(action.token)
            elif isinstance(action, AuthorizeSubscription):
                self._begin_subscribe(action)
            elif isinstance(action, StartSubscription):
                raise AssertionError("StartSubscription is handled by the subscribe task")
            elif isinstance(action, RecheckSubscriptions):
                self._start(self._recheck, action)
            elif isinstance(action, DropSubscription):
                self._pop_handover(action.org)
                self.hub.unsubscribe(self, action.org)
        self._reschedule()

    def _verify(self, token: str) -> None:
        now = self.hub.clock()
        try:
            verified = self.verifier.verify(token)
        except AuthError as exc:
            self.hub.metrics.auth_failures.labels(reason=exc.reason).inc()
            log.info("token rejected", connection_id=self.id, peer=self.peer, reason=exc.reason)
            self.apply(self.session.token_rejected(f"token rejected: {exc.reason}", now))
            return
        if self.subject is None and verified.subject is not None:
            # First authentication: the per-user connection limit applies.
            if self.hub.connections_of(verified.subject) >= self.config.max_connections_per_user:
                log.info(
                    "too many connections for one user",
                    connection_id=self.id,
                    sub=verified.subject,
                    peer=self.peer,
                )
                self._send_control(
                    encode_error(None, ErrorCode.RATE_LIMITED, "too many connections for this user")
                )
                self.close(CloseCode.TRY_AGAIN_LATER, "too many connections for this user")
                return
            self.hub.count_user(verified.subject, +1)
            self.subject = verified.subject
        claims = ClaimsJson(verified.claims_json, verified.subject)
        self.apply(self.session.token_verified(claims, verified.expires_at, now))

    def close(self, code: int, reason: str) -> None:
        """Close from the server's side (e.g. 1012 on shutdown); never blocks."""
        self.apply(self.session.close(CloseCode(code), reason))

    def _close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.close_code = code
        self.ws.abort(code, reason)

    # -- subscribe, catch-up, handover ------------------------------------------------
    def _begin_subscribe(self, request: AuthorizeSubscription) -> None:
        # Register first, so live rows arriving during the catch-up are held.
        if self.handovers is None:
            self.handovers = {}
        self.handovers[request.org] = _Handover(request.request_id)
        self.hub.subscribe(
            self, request.org, Subscription(request.ref, request.event_types, request.coalesce_ms)
        )
        self._start(self._subscribe, request)

    async def _subscribe(self, request: AuthorizeSubscription) -> None:
        claims = claims_json(request.claims)
        try:
            read = await self.db.run(
                subscribe_read,
                self.config.subscriber_role,
                claims,
                request.org,
                request.cursor,
                replay_limit=self.config.replay_limit,
            )
        except psycopg.Error as exc:
            log.warning(
                "subscribe failed",
                connection_id=self.id,
                org=str(request.org),
                error=str(exc).strip(),
            )
            self._abandon(request)
            self.apply(self.session.subscribe_failed(request))
            return
        if self.closing:
            return  # the hub dropped the connection's subscriptions (or will)
        actions = self.session.subscribe_result(request, read.allowed)
        if not any(isinstance(a, StartSubscription) for a in actions):
            self._abandon(request)
            self.apply(actions)
            return
        self._go_live(request, read)

    def _abandon(self, request: AuthorizeSubscription) -> None:
        handover = self.handovers.get(request.org) if self.handovers else None
        if handover is not None and handover.request_id == request.request_id:
            self._pop_handover(request.org)
            self.hub.unsubscribe(self, request.org)

    def _pop_handover(self, org: uuid.UUID) -> _Handover | None:
        handovers = self.handovers
        if not handovers:
            return None
        handover = handovers.pop(org, None)
        if not handovers:
            self.handovers = None
        return handover

    def _go_live(self, request: AuthorizeSubscription, read: SubscribeRead) -> None:
        handover = self._pop_handover(request.org)
        if self.closing or handover is None or handover.request_id != request.request_id:
            return
        now = self.hub.clock()
        org = request.org
        head = Cursor(read.epoch, read.snapshot).encode()
        plan = read.plan
        if handover.overflowed:
            plan = Resync(ResyncReason.OVERFLOW)
            head = self.hub.cursor_now() or head
        replayed = 0
        if isinstance(plan, Resync):
            self.hub.metrics.resyncs.labels(reason=plan.reason.value).inc()
            self._send_control(encode_resync(org, plan.reason, head))
        elif isinstance(plan, Replay):
            since = Cursor(read.epoch, plan.since).encode()
            subscription = self.hub.registry.get(self, org)
            last = len(read.replay) - 1
            for i, row in enumerate(read.replay):
                if subscription is not None and not subscription.matches(row.event_type):
                    continue
                cursor = head if i == last else since
                self._send_event(row, cursor, encode_text_frame(encode_event(row, cursor)), now)
                replayed += 1
        else:
            assert isinstance(plan, Fresh)
        self._send_control(encode_subscribed(request.ref, org, head, replayed))
        if handover.overflowed:
            return
        subscription = self.hub.registry.get(self, org)
        if subscription is None:
            return
        for row, cursor, frame in handover.rows:
            if not read.snapshot.visible(row.xid):  # else it was replayed (or preceded the cursor)
                self._offer_live(subscription, row, cursor, frame, now)

    async def _recheck(self, action: RecheckSubscriptions) -> None:
        claims = claims_json(action.claims)
        try:
            allowed = await self.db.run(
                authorized_orgs, self.config.subscriber_role, claims, list(action.orgs)
            )
        except psycopg.Error as exc:
            log.warning(
                "recheck failed; keeping subscriptions until the next one",
                connection_id=self.id,
                error=str(exc).strip(),
            )
            return
        if self.closing:
            return
        for org in action.orgs:
            self.apply(self.session.recheck_result(org, org in allowed))

    def resync_everything(self, reason: ResyncReason, cursor: str) -> None:
        for org, subscription in list(self.hub.registry.subscriptions_of(self).items()):
            if subscription.coalescer is not None:
                subscription.coalescer.drain()
            self.hub.metrics.resyncs.labels(reason=reason.value).inc()
            self._send_control(encode_resync(org, reason, cursor))

    # -- delivery (called by the hub: must never block) ------------------------------
    def offer(
        self, subscription: Subscription, row: EventRow, cursor: str, frame: bytes, now: float
    ) -> None:
        if self.closing:
            return
        if self.handovers:
            handover = self.handovers.get(row.org)
            if handover is not None:
                if len(handover.rows) >= MAX_HANDOVER_ROWS:
                    handover.overflowed = True
                    handover.rows.clear()
                elif not handover.overflowed:
                    handover.rows.append((row, cursor, frame))
                return
        self._offer_live(subscription, row, cursor, frame, now)

    def _offer_live(
        self, subscription: Subscription, row: EventRow, cursor: str, frame: bytes, now: float
    ) -> None:
        coalescer = subscription.coalescer
        if coalescer is None:
            self._send_event(row, cursor, frame, now)
            return
        held_before = len(coalescer)
        for event in coalescer.add(row, cursor, now):
            self._send_event(
                event.row,
                event.cursor,
                encode_text_frame(encode_event(event.row, event.cursor, event.count)),
                now,
            )
        if held_before == 0:
            self._reschedule()

    def _send_event(self, row: EventRow, cursor: str, frame: bytes, now: float) -> None:
        """One non-blocking write (or an append to what the socket still holds); once
        the socket is behind, the outbox, which coalesces and then collapses."""
        if self.closing:
            return
        if not self.outbox and self.ws.send_frame_nowait(frame) is not SendResult.OVERFLOW:
            self.events_sent += 1
            return
        self._queued(self._outbox().push_event(row, cursor, frame, now))

    def _send_control(self, payload: bytes) -> None:
        if self.closing:
            return
        frame = encode_text_frame(payload)
        if not self.outbox and self.ws.send_frame_nowait(frame) is not SendResult.OVERFLOW:
            return
        self._queued(self._outbox().push_frame(frame, self.hub.clock()))

    def _outbox(self) -> Outbox:
        """The outbox, created when the socket first falls behind (then kept: it
        remembers recent overflows)."""
        outbox = self.outbox
        if outbox is None:
            outbox = self.outbox = Outbox(self.config.outbox, wrap=encode_text_frame)
        return outbox

    def _queued(self, result: PushResult) -> None:
        if result is PushResult.RESYNCED:
            self.hub.metrics.outbox_overflows.inc()
            self.hub.metrics.resyncs.labels(reason=ResyncReason.OVERFLOW.value).inc()
        elif result is PushResult.HOPELESS:
            self.hub.metrics.slow_closes.inc()
            log.info("client too slow", connection_id=self.id, pending=self._outbox().pending_bytes)
            self._close(CloseCode.TOO_SLOW, "too slow to keep up")

    def _drained(self) -> None:
        """The socket took most of what it held: move queued frames on, in one write."""
        outbox = self.outbox
        if not outbox or self.ws.state is not WsState.OPEN:
            return
        room = self.max_pending_bytes - self.ws.pending_bytes
        frames = outbox.pop_ready(max(room, 1), self.hub.clock())
        if frames:
            self.events_sent += len(frames)
            if self.ws.send_frame_nowait(b"".join(frames)) is SendResult.OVERFLOW:
                # Cannot happen while one frame is smaller than the room left at the
                # low-water mark; if it ever does, dropping frames silently would not do.
                self._close(CloseCode.TOO_SLOW, "too slow to keep up")
