"""The HTTP API on the WebSocket port: catch-up by plain GET, event streams, and
stream tickets.

- `GET /v1/events?org=&cursor=&limit=`: one page of an exact catch-up, the
  same authorization and RLS read as a WebSocket resume. Pages end on a
  transaction boundary, so the `cursor` of each answer is a snapshot past
  every event returned and before every event not returned: cursors strictly
  increase from page to page and nothing repeats. `complete` says whether
  the caller is now up to date.
- `GET /v1/stream?org=&org=`: Server-Sent Events (`relay.server.stream`),
  resuming from `Last-Event-ID` (or `?last_event_id=`).
- `POST /v1/tickets`: a single-use ticket (30 s) for `?ticket=` on a stream,
  for browsers' EventSource, which cannot send an Authorization header.

Tokens travel only in the Authorization header (a ticket stands in for one):
a token in the query string is refused. Errors are JSON `{"error": code,
"message": ...}` with 400, 401, 403, 404, 405, 429 or 503. CORS follows
PGRELAY_ALLOWED_ORIGINS (empty: any origin), with preflight.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from relay.core.codes import ResyncReason
from relay.core.cursor import (
    CatchUp,
    Cursor,
    Replay,
    Resync,
    decode_cursor,
    plan_resume,
    seen_through,
)
from relay.core.protocol import EventRow, encode_event
from relay.core.subscription import CatchUpPage, CatchUpQuery
from relay.db.tickets import Tickets
from relay.errors import ReadFailed
from relay.server.admission import Admission
from relay.server.connection import Connection, ConnectionServices, Reads
from relay.server.jwt import AuthError, TokenVerifier
from relay.server.stream import EventStream, sse_wrap
from relay.ws import HttpExchange, OriginPolicy

__all__ = ["DEFAULT_PAGE_EVENTS", "MAX_PAGE_EVENTS", "TICKET_TTL_S", "HttpApi"]

DEFAULT_PAGE_EVENTS = 500
"""Events per catch-up answer when `limit` is not given."""
MAX_PAGE_EVENTS = 1000
"""The largest `limit` accepted."""
TICKET_TTL_S = 30
"""How long a stream ticket is valid."""
MAX_STREAM_ORGS = 100
"""Organizations per event stream (as subscriptions per connection)."""
URL_TOKEN_PARAMS = frozenset({"token", "access_token", "jwt", "authorization", "bearer"})
"""Query parameters that would put a token in a URL: refused."""
CORS_MAX_AGE_S = 600

log = structlog.get_logger("pgrelay.http")


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class HttpApi:
    """The `http_handler` of the daemon's WebSocket server."""

    verifier: TokenVerifier
    reads: Reads
    tickets: Tickets
    admission: Admission
    services: ConnectionServices
    origins: OriginPolicy
    replay_limit: int

    async def __call__(self, exchange: HttpExchange) -> None:
        request = exchange.request
        address = request.peer[0]
        cors = self._cors(request.header("origin"))
        try:
            if cors is None:
                self.admission.refused("origin", request.header("origin") or "", peer=address)
                raise _Refused(403, "forbidden", "origin not allowed")
            route = _ROUTES.get(request.path)
            if route is None:
                raise _Refused(404, "not_found", f"no such endpoint: {request.path}")
            methods, handler = route
            if request.method == "OPTIONS":
                await self._preflight(exchange, methods, cors)
                return
            if request.method not in methods:
                raise _Refused(405, "method_not_allowed", f"use {' or '.join(methods)}")
            if URL_TOKEN_PARAMS & set(request.params()):
                raise _Refused(
                    401,
                    "unauthorized",
                    "tokens never travel in a URL: send Authorization: Bearer <token>",
                )
            refusal = self.admission.refusal(address)
            if refusal is not None:
                self.admission.refused(refusal.reason, peer=address, status=refusal.status)
                raise _Refused(refusal.status, "rate_limited", refusal.message)
            self.admission.enter(address)
            try:
                await handler(self, exchange, cors)
            finally:
                self.admission.leave(address)
        except _Refused as refused:
            await _json(
                exchange,
                refused.status,
                {"error": refused.code, "message": refused.message},
                cors or (),
            )

    # -- CORS ---------------------------------------------------------------------------
    def _cors(self, origin: str | None) -> tuple[tuple[str, str], ...] | None:
        """Response headers for this Origin (none without one), or None: refused."""
        if origin is None:
            return ()
        if not self.origins.allows(origin):
            return None
        return (("access-control-allow-origin", origin), ("vary", "Origin"))

    async def _preflight(
        self, exchange: HttpExchange, methods: Sequence[str], cors: Sequence[tuple[str, str]]
    ) -> None:
        headers = [
            *cors,
            ("access-control-allow-methods", ", ".join((*methods, "OPTIONS"))),
            ("access-control-allow-headers", "authorization, content-type, last-event-id"),
            ("access-control-max-age", str(CORS_MAX_AGE_S)),
        ]
        await exchange.respond(204, headers)

    # -- authentication -------------------------------------------------------------------
    def _bearer(self, exchange: HttpExchange) -> tuple[str, str]:
        """The request's bearer token and its verified claims as JSON (else 401)."""
        header = exchange.request.header("authorization")
        if header is None or header[:7].lower() != "bearer ":
            raise _Refused(401, "unauthorized", "send Authorization: Bearer <token>")
        token = header[7:].strip()
        return token, self._verify(token, exchange)

    def _verify(self, token: str, exchange: HttpExchange) -> str:
        """The token's claims as JSON, for `request.jwt.claims` (else 401)."""
        try:
            verified = self.verifier.verify(token)
        except AuthError as exc:
            self.services.metrics.auth_failures.labels(reason=exc.reason).inc()
            self.admission.refused("bad_token", exc.reason, peer=exchange.request.peer[0])
            raise _Refused(401, "unauthorized", f"token rejected: {exc.reason}") from None
        return verified.claims_json

    # -- GET /v1/events -------------------------------------------------------------------
    async def _events(self, exchange: HttpExchange, cors: Sequence[tuple[str, str]]) -> None:
        _, claims_json = self._bearer(exchange)
        params = exchange.request.params()
        org = _org(params)
        limit = _limit(params)
        cursor_text = _one(params, "cursor")
        answer = await self._catch_up_page(claims_json, org, cursor_text, limit)
        await _json(exchange, 200, answer, (*cors, ("cache-control", "no-store")), raw=True)

    async def _catch_up_page(
        self, claims_json: str, org: uuid.UUID, cursor_text: str | None, limit: int
    ) -> bytes:
        cursor = None if cursor_text is None else decode_cursor(cursor_text)
        since = cursor.snapshot if isinstance(cursor, Cursor) else None
        first = CatchUpQuery(org, since, None, (0, 0), limit, self.replay_limit + 1 if since else 0)
        page = await self._read(claims_json, first)
        head = Cursor(page.epoch, page.head)
        plan = plan_resume(cursor, epoch=page.epoch, head=page.head, retention_horizon=page.horizon)
        if isinstance(plan, Replay) and page.count > self.replay_limit:
            plan = Resync(ResyncReason.TOO_FAR_BEHIND)
        if isinstance(plan, Resync):
            return _resync(plan.reason, head.encode())
        if not isinstance(plan, Replay):  # no cursor: start from now
            return _page([], head.encode(), complete=True)
        catch_up = CatchUp(page.epoch, plan.since, page.head)
        rows = page.rows
        if page.count <= len(rows):
            return _page(_frames(rows, catch_up), catch_up.head_cursor, complete=True)
        last_xid = rows[-1].xid
        if rows[0].xid < last_xid:
            # End on a transaction boundary: the last transaction may go on.
            kept = [r for r in rows if r.xid < last_xid]
            return _page(_frames(kept, catch_up), catch_up.cursor_before(last_xid), complete=False)
        # One transaction fills the page: return all of it (bounded by the replay limit).
        more = await self._rest_of_transaction(claims_json, catch_up, org, rows, limit)
        complete = more[-1].xid == last_xid and len(more) == page.count
        through = seen_through(catch_up.since, catch_up.head, last_xid + 1)
        kept = [r for r in more if r.xid == last_xid]
        encoded = catch_up.head_cursor if complete else Cursor(page.epoch, through).encode()
        return _page(_frames(kept, catch_up), encoded, complete=complete)

    async def _rest_of_transaction(
        self, claims_json: str, catch_up: CatchUp, org: uuid.UUID, rows: list[EventRow], limit: int
    ) -> list[EventRow]:
        """Rows of the page's only transaction, read on in the same snapshot until
        another transaction starts (or everything was read)."""
        xid = rows[0].xid
        out = list(rows)
        while out[-1].xid == xid and len(out) <= self.replay_limit:
            after = (out[-1].xid, out[-1].id)
            query = CatchUpQuery(org, catch_up.since, catch_up.head, after, MAX_PAGE_EVENTS, 0)
            more = (await self._read(claims_json, query)).rows
            out += more
            if len(more) < MAX_PAGE_EVENTS:
                break
        return out

    async def _read(self, claims_json: str, query: CatchUpQuery) -> CatchUpPage:
        try:
            page = await self.reads.catch_up(claims_json, query)
        except ReadFailed as exc:
            log.warning("catch-up read failed", org=str(query.org), error=str(exc))
            raise _Refused(503, "internal", "the database did not answer; retry") from None
        if not page.allowed:
            raise _Refused(403, "forbidden", "not a member of this org")
        return page

    # -- POST /v1/tickets ------------------------------------------------------------------
    async def _ticket(self, exchange: HttpExchange, cors: Sequence[tuple[str, str]]) -> None:
        token, _ = self._bearer(exchange)
        ticket = secrets.token_urlsafe(24)
        try:
            await self.tickets.create(ticket, token, TICKET_TTL_S)
        except ReadFailed as exc:
            log.warning("ticket not stored", error=str(exc))
            raise _Refused(503, "internal", "the database did not answer; retry") from None
        body = {"ticket": ticket, "expires_in": TICKET_TTL_S}
        await _json(exchange, 200, body, (*cors, ("cache-control", "no-store")))

    # -- GET /v1/stream ------------------------------------------------------------------
    async def _stream(self, exchange: HttpExchange, cors: Sequence[tuple[str, str]]) -> None:
        request = exchange.request
        params = request.params()
        orgs = [str(o) for o in _orgs(params)]
        ticket = _one(params, "ticket")
        if ticket is not None:
            try:
                token = await self.tickets.redeem(ticket)
            except ReadFailed:
                raise _Refused(503, "internal", "the database did not answer; retry") from None
            if token is None:
                raise _Refused(401, "unauthorized", "unknown, used or expired ticket")
            self._verify(token, exchange)
        else:
            token, _ = self._bearer(exchange)
        resume = request.header("last-event-id") or _one(params, "last_event_id")
        start = decode_cursor(resume) if resume else None
        writer = exchange.start_stream(
            200,
            [
                *cors,
                ("content-type", "text/event-stream; charset=utf-8"),
                ("cache-control", "no-store"),
                ("x-accel-buffering", "no"),
            ],
        )
        stream = EventStream(
            exchange,
            writer,
            orgs=orgs,
            start=start if isinstance(start, Cursor) else None,
            resume_text=resume,
        )
        exchange.on_abort = stream.abort
        connection = Connection(
            uuid.uuid4().hex[:16],
            stream,
            services=self.services,
            peer=request.peer[0],
            wrap=sse_wrap,
            shared_frames=False,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.keep_alive)
            await connection.serve(token)
            nursery.cancel_scope.cancel()
        await exchange.finish_stream()


_ROUTES: dict[str, tuple[tuple[str, ...], Any]] = {
    "/v1/events": (("GET", "HEAD"), HttpApi._events),
    "/v1/stream": (("GET",), HttpApi._stream),
    "/v1/tickets": (("POST",), HttpApi._ticket),
}


def _one(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise _Refused(400, "bad_request", f"{name} given more than once")
    return values[0]


def _org(params: dict[str, list[str]]) -> uuid.UUID:
    text = _one(params, "org")
    if text is None:
        raise _Refused(400, "bad_request", "org is required")
    return _uuid(text)


def _orgs(params: dict[str, list[str]]) -> list[uuid.UUID]:
    texts = params.get("org") or []
    if not texts:
        raise _Refused(400, "bad_request", "at least one org is required")
    if len(texts) > MAX_STREAM_ORGS:
        raise _Refused(400, "bad_request", f"at most {MAX_STREAM_ORGS} orgs per stream")
    return list(dict.fromkeys(_uuid(t) for t in texts))


def _uuid(text: str) -> uuid.UUID:
    try:
        value = uuid.UUID(text)
    except ValueError:
        raise _Refused(400, "bad_request", "org must be a uuid") from None
    if str(value) != text.lower():
        raise _Refused(400, "bad_request", "org must be a uuid")
    return value


def _limit(params: dict[str, list[str]]) -> int:
    text = _one(params, "limit")
    if text is None:
        return DEFAULT_PAGE_EVENTS
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE_EVENTS:
        raise _Refused(400, "bad_request", f"limit must be an integer from 1 to {MAX_PAGE_EVENTS}")
    return int(text)


def _frames(rows: list[EventRow], catch_up: CatchUp) -> list[bytes]:
    if not rows:
        return []
    cursor = catch_up.cursor_before(rows[0].xid)
    return [encode_event(row, cursor) for row in rows]


def _page(frames: list[bytes], cursor: str, *, complete: bool) -> bytes:
    return (
        b'{"events":['
        + b",".join(frames)
        + b'],"cursor":'
        + json.dumps(cursor).encode()
        + b',"complete":'
        + (b"true" if complete else b"false")
        + b"}"
    )


def _resync(reason: ResyncReason, cursor: str) -> bytes:
    return json.dumps({"resync": {"reason": reason.value, "cursor": cursor}}).encode()


async def _json(
    exchange: HttpExchange,
    status: int,
    body: object,
    headers: Sequence[tuple[str, str]],
    *,
    raw: bool = False,
) -> None:
    data = body if raw and isinstance(body, bytes) else json.dumps(body).encode()
    await exchange.respond(status, [*headers, ("content-type", "application/json")], data + b"\n")
