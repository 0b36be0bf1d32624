"""One client connection in the trio shell (a WebSocket, or an event stream
that looks like one: `Channel`): it carries out what its Session (the pure
state machine) asks for, and nothing else.

The shell only does I/O: the read loop, SQL in worker threads (through
`SubscriberReads`), handing the session's output to the socket, closing.
Every decision (what to send, when to read a catch-up page, when a client is
too slow, every deadline) is the session's.

Per connection there is one reader task (`serve`); the WebSocket layer adds
a writer task only while bytes wait to be sent, and calls `_drained` when it
has sent most of them; the scheduler's timer task calls `on_timer`; each
catch-up read and recheck runs as a short task in the scheduler's nursery and
is cancelled when its connection ends. An idle connection holds no task of
its own beyond the reader.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import structlog
import trio

from relay.core.codes import CloseCode, ErrorCode
from relay.core.cursor import Snapshot
from relay.core.outbox import Output, OutputLimits
from relay.core.protocol import EventRow, encode_error
from relay.core.session import (
    Action,
    ClaimsJson,
    Close,
    Follow,
    ReadCatchUp,
    RecheckSubscriptions,
    ScheduleTick,
    Session,
    SessionLimits,
    Unfollow,
    VerifyToken,
    claims_json,
)
from relay.core.stats import Stats
from relay.core.subscription import CatchUpPage, CatchUpQuery, Subscription
from relay.errors import ReadFailed
from relay.server.admission import Admission
from relay.server.hub import Fanout
from relay.server.jwt import AuthError, TokenVerifier
from relay.server.metrics import Metrics
from relay.server.resumes import RecentResumes
from relay.server.scheduler import Scheduler
from relay.ws import encode_text_frame

__all__ = ["Connection", "ConnectionServices", "Reads"]

log = structlog.get_logger("pgrelay.connection")

_A = TypeVar("_A")
_T = TypeVar("_T")

#: A subscription's read that failed for want of a connection (Postgres restarting,
#: a failover, no pooled connection in time) is tried again, with jittered backoff
#: from READ_RETRY_FIRST_S up to READ_RETRY_MAX_S, for this long; only then does the
#: client get `error` `internal`. A brief outage costs a subscribe a wait, not an error.
READ_RETRY_S = 10.0
READ_RETRY_FIRST_S = 0.1
READ_RETRY_MAX_S = 2.0


class Channel(Protocol):
    """What a connection talks through: `relay.ws.WsConnection`, or the event
    stream of `relay.server.stream`. Also the session's output transport."""

    @property
    def unsent_bytes(self) -> int: ...

    @property
    def close_code(self) -> int | None: ...

    def send_nowait(self, data: bytes) -> bool: ...

    async def receive_message(self) -> str | None:
        """The next client message, or None once the channel is closing."""
        ...

    def abort(self, code: int, reason: str = "") -> None:
        """Start closing with `code`, without awaiting."""
        ...

    def set_drain_callback(self, callback: Callable[[], None] | None) -> None: ...


class Reads(Protocol):
    """The SQL a connection runs, under its client's claims (`SubscriberReads`)."""

    async def catch_up(self, claims_json: str, query: CatchUpQuery) -> CatchUpPage:
        """One catch-up read; raises ReadFailed when the database cannot answer."""
        ...

    async def authorized(self, claims_json: str, orgs: list[uuid.UUID]) -> set[uuid.UUID]:
        """Which of `orgs` the claims may read; raises ReadFailed."""
        ...


@dataclass(frozen=True)
class ConnectionServices:
    """What every connection of a daemon shares."""

    fanout: Fanout
    scheduler: Scheduler
    reads: Reads
    verifier: TokenVerifier
    admission: Admission
    session_limits: SessionLimits
    output_limits: OutputLimits
    stats: Stats
    metrics: Metrics
    resumes: RecentResumes | None = None
    """First reads from the recent rows (None: every read in SQL)."""


class Connection:
    """A connection's shell. Hashable by identity (the fan-out index's key)."""

    __slots__ = (
        "_tasks",
        "channel",
        "close_code",
        "closing",
        "frames_received",
        "id",
        "peer",
        "services",
        "session",
        "subject",
    )

    def __init__(
        self,
        connection_id: str,
        channel: Channel,
        *,
        services: ConnectionServices,
        peer: str,
        wrap: Callable[[bytes], bytes] = encode_text_frame,
        shared_frames: bool = True,
    ) -> None:
        """`wrap` and `shared_frames` describe the channel's framing (see `Output`);
        the defaults are the WebSocket's."""
        self.id = connection_id
        self.channel = channel
        self.services = services
        self.peer = peer
        output = Output(
            channel,
            services.output_limits,
            stats=services.stats,
            wrap=wrap,
            shared_frames=shared_frames,
        )
        self.session = Session(
            connection_id, services.scheduler.clock(), output, services.session_limits
        )
        self.closing = False
        self.close_code: int | None = None
        self._tasks: set[trio.CancelScope] | None = None
        """Scopes of this connection's running reads (None when there is none)."""
        self.frames_received = 0
        self.subject: str | None = None
        """The first token's `sub`, counted by admission (a refresh for another
        subject is closed 4001)."""
        channel.set_drain_callback(self._drained)

    def _now(self) -> float:
        return self.services.scheduler.clock()

    # -- lifecycle -------------------------------------------------------------
    async def serve(self, bearer: str | None) -> None:
        """Run until the connection ends; never raises for a peer's behaviour."""
        started = self._now()
        try:
            self._apply(self.session.start(started))
            if bearer is not None:
                self._apply(self.session.received_bearer(bearer, self._now()))
            while not self.closing:
                # Binary (1003), invalid UTF-8 (1007) and oversized (1009) messages
                # are closed by the WebSocket layer; None means it is closing.
                message = await self.channel.receive_message()
                if message is None:
                    break
                self.frames_received += 1
                self._apply(self.session.received_text(message, self._now()))
        finally:
            self.closing = True
            if self._tasks:
                for scope in self._tasks:
                    scope.cancel()
            self.session.connection_lost()
            self.services.fanout.forget(self)
            if self.subject is not None:
                self.services.admission.leave_user(self.subject, self)
            log.info(
                "connection closed",
                connection_id=self.id,
                peer=self.peer,
                sub=self.subject,
                close_code=self.close_code or self.channel.close_code,
                seconds=round(self._now() - started, 3),
                frames_in=self.frames_received,
            )

    def close(self, code: CloseCode, reason: str) -> None:
        """Close from the server's side; never blocks."""
        self._apply(self.session.close(code, reason))

    # -- from the hub, the scheduler and the socket ------------------------------------
    def offer(
        self, subscription: Subscription, row: EventRow, cursor: str, frame: bytes, now: float
    ) -> None:
        session = self.session
        session.output.cork()  # until `flush`: one write for this stretch of the fan-out
        actions = session.live_row(subscription, row, cursor, frame, now)
        if actions:
            self._apply(actions)

    def flush(self, now: float) -> None:
        actions = self.session.flush(now)
        if actions:
            self._apply(actions)

    def recheck_now(self) -> None:
        """A hint that this user's memberships changed (`relay_membership`)."""
        if not self.closing:
            self._apply(self.session.recheck_now(self._now()))

    def database_changed(self, epoch: str, head: Snapshot, now: float) -> None:
        self._apply(self.session.database_changed(epoch, head, now))

    def on_timer(self, now: float) -> None:
        if not self.closing:
            self._apply(self.session.tick(now))

    def _drained(self) -> None:
        """The socket sent most of what waited (called by the WebSocket writer)."""
        if not self.closing:
            self._apply(self.session.output_drained(self._now()))

    # -- actions from the session ------------------------------------------------
    def _apply(self, actions: Iterable[Action]) -> None:
        services = self.services
        for action in actions:
            if isinstance(action, Follow):
                services.fanout.follow(self, action.org, action.subscription)
            elif isinstance(action, Unfollow):
                services.fanout.unfollow(self, action.org)
            elif isinstance(action, ScheduleTick):
                services.scheduler.schedule(self, action.at)
            elif isinstance(action, ReadCatchUp):
                resumes = services.resumes
                if resumes is not None and resumes.may_answer(action.query):
                    # Marked now, right after the Follow that precedes it.
                    self._start(self._read_recent, (action, resumes.mark()))
                else:
                    self._start(self._read_catch_up, action)
            elif isinstance(action, RecheckSubscriptions):
                self._start(self._recheck, action)
            elif isinstance(action, VerifyToken):
                self._verify(action.token)
            elif isinstance(action, Close):
                self._close(action.code, action.reason)

    def _close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.close_code = code
        if code == CloseCode.TOO_SLOW:
            log.info("client too slow", connection_id=self.id, peer=self.peer)
        self.channel.abort(code, reason)

    def _verify(self, token: str) -> None:
        services = self.services
        try:
            verified = services.verifier.verify(token)
        except AuthError as exc:
            services.metrics.auth_failures.labels(reason=exc.reason).inc()
            services.admission.refused(
                "bad_token", exc.reason, connection_id=self.id, peer=self.peer
            )
            self._apply(self.session.token_rejected(f"token rejected: {exc.reason}", self._now()))
            return
        if self.subject is None and verified.subject is not None:
            # First authentication: the per-user connection limit applies.
            if not services.admission.admit_user(verified.subject, self):
                services.admission.refused(
                    "per_user", connection_id=self.id, sub=verified.subject, peer=self.peer
                )
                refusal = encode_error(
                    None, ErrorCode.RATE_LIMITED, "too many connections for this user"
                )
                self.session.output.control(refusal, self._now())
                self.close(CloseCode.TRY_AGAIN_LATER, "too many connections for this user")
                return
            self.subject = verified.subject
        claims = ClaimsJson(verified.claims_json, verified.subject)
        self._apply(self.session.token_verified(claims, verified.expires_at, self._now()))

    # -- short tasks: SQL in worker threads ----------------------------------------------
    def _start(self, task: Callable[[_A], Awaitable[None]], arg: _A) -> None:
        """Run `task(arg)` in the scheduler's nursery, cancelled when this connection ends."""
        self.services.scheduler.start_soon(self._run_task, task, arg)

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
                self._close(CloseCode.INTERNAL_ERROR, "internal error")
            finally:
                tasks.discard(scope)
                if not tasks and self._tasks is tasks:
                    self._tasks = None

    async def _read_recent(self, marked: tuple[ReadCatchUp, int]) -> None:
        action, mark = marked
        resumes = self.services.resumes
        assert resumes is not None
        claims = claims_json(action.claims)
        try:
            page = await self._retrying(action, lambda: resumes.read(claims, action.query, mark))
        except ReadFailed as exc:
            self._read_failed(action, exc)
            return
        if page is None:
            await self._read_catch_up(action)
        elif not self.closing:
            self._apply(
                self.session.catch_up_read(action.subscription, action.query, page, self._now())
            )

    async def _read_catch_up(self, action: ReadCatchUp) -> None:
        reads, claims = self.services.reads, claims_json(action.claims)
        try:
            page = await self._retrying(action, lambda: reads.catch_up(claims, action.query))
        except ReadFailed as exc:
            self._read_failed(action, exc)
            return
        if not self.closing:
            self._apply(
                self.session.catch_up_read(action.subscription, action.query, page, self._now())
            )

    async def _retrying(self, action: ReadCatchUp, read: Callable[[], Awaitable[_T]]) -> _T:
        """`read()`, tried again while it fails transiently, for READ_RETRY_S, as
        long as the session still wants its answer."""
        deadline = trio.current_time() + READ_RETRY_S
        delay = READ_RETRY_FIRST_S
        while True:
            try:
                return await read()
            except ReadFailed as exc:
                if (
                    not exc.transient
                    or self.closing
                    or trio.current_time() + delay > deadline
                    or not self.session.wants(action.subscription, action.query)
                ):
                    raise
                log.debug("read failed; retrying", connection_id=self.id, error=str(exc))
            # Jittered: a restart fails many subscribes at once; their retries spread.
            await trio.sleep(random.uniform(delay / 2, delay))
            delay = min(2 * delay, READ_RETRY_MAX_S)

    def _read_failed(self, action: ReadCatchUp, exc: ReadFailed) -> None:
        log.warning(
            "catch-up read failed",
            connection_id=self.id,
            org=str(action.query.org),
            error=str(exc),
        )
        if not self.closing:
            self._apply(
                self.session.catch_up_failed(action.subscription, action.query, self._now())
            )

    async def _recheck(self, action: RecheckSubscriptions) -> None:
        try:
            allowed = await self.services.reads.authorized(
                claims_json(action.claims), list(action.orgs)
            )
        except ReadFailed as exc:
            log.warning(
                "recheck failed; keeping subscriptions until the next one",
                connection_id=self.id,
                error=str(exc),
            )
            return
        if not self.closing:
            self._apply(self.session.recheck_result(action.orgs, allowed, self._now()))
