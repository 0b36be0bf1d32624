"""The admin HTTP endpoint: GET /healthz, /readyz, /metrics.

A few lines of trio around h11 (the sans-IO HTTP/1.1 library wsproto is built
on). One request per connection, a deadline on each, small limits: this port
is for probes and scrapers, not for the public. A route is a plain callable
(GET and HEAD), or an :class:`Endpoint` that sees the request and may accept
other methods and a small body (`pgrelay dev` uses one for its demo).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import structlog
import trio

from relay.config import HostPort

#: A probe or scrape must finish within this.
REQUEST_TIMEOUT_S = 10
#: Largest request head we read.
MAX_REQUEST_BYTES = 16 * 1024
#: Largest request body an Endpoint may accept, whatever it asks for.
MAX_BODY_BYTES = 16 * 1024

log = structlog.get_logger("pgrelay.admin")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Request:
    """What an :class:`Endpoint` sees of a request."""

    method: str
    """Upper case: GET, HEAD, POST..."""
    path: str
    """The target without its query string."""
    query: str
    """The query string, without the '?' ("" when none)."""
    headers: dict[str, str]
    """Header names in lower case; a repeated header keeps its last value."""
    body: bytes
    """At most the endpoint's `max_body_bytes`."""


@dataclass(frozen=True)
class Endpoint:
    """A route that reads the request (method, headers, a small body)."""

    handler: Callable[[Request], Awaitable[Response] | Response]
    methods: frozenset[str] = frozenset({"GET", "HEAD"})
    """Methods answered; any other gets 405."""
    max_body_bytes: int = 0
    """A longer body gets 413 (capped at MAX_BODY_BYTES)."""


Route = Callable[[], Awaitable[Response] | Response] | Endpoint


async def serve_admin(
    listen: HostPort,
    routes: dict[str, Route],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the routes until cancelled; reports the bound port to `nursery.start`."""
    listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    port: int = listeners[0].socket.getsockname()[1]
    task_status.started(port)

    async def handle(stream: trio.SocketStream) -> None:
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            # The peer went away or spoke junk: nothing to answer.
            with contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError
            ):
                await _handle(stream, routes)
        await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners)


async def _handle(stream: trio.SocketStream, routes: dict[str, Route]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            break
        return  # connection closed, or anything but a request
    target = event.target.decode("ascii", "replace")
    path, _, query = target.partition("?")
    method = event.method.decode("ascii", "replace")
    route = routes.get(path)
    if isinstance(route, Endpoint):
        if method not in route.methods:
            response = Response(405, b"method not allowed\n")
        else:
            body = await _read_body(conn, stream, min(route.max_body_bytes, MAX_BODY_BYTES))
            if body is None:
                response = Response(413, b"request body too large\n")
            else:
                headers_in = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
                result = route.handler(Request(method, path, query, headers_in, body))
                response = result if isinstance(result, Response) else await result
    elif method not in ("GET", "HEAD"):
        response = Response(405, b"method not allowed\n")
    elif route is None:
        response = Response(404, b"not found\n")
    else:
        result = route()
        response = result if isinstance(result, Response) else await result
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("connection", "close"),
        ("cache-control", "no-store"),
    ]
    await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers)))
    if event.method != b"HEAD":
        await stream.send_all(conn.send(h11.Data(data=response.body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def _read_body(conn: h11.Connection, stream: trio.SocketStream, limit: int) -> bytes | None:
    """The request body, or None when it is longer than `limit` bytes."""
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(4096))
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:
                return None
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:
            raise h11.RemoteProtocolError("the request ended without its body")
