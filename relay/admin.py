"""The admin HTTP endpoint: GET /healthz, /readyz, /metrics.

A few lines of trio around h11 (the sans-IO HTTP/1.1 library wsproto is built
on). One request per connection, a deadline on each, small limits: this port
is for probes and scrapers, not for the public.
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

log = structlog.get_logger("pgrelay.admin")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Route = Callable[[], Awaitable[Response] | Response]


async def serve_admin(
    listen: HostPort,
    routes: dict[str, Route],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve GET routes until cancelled; reports the bound port to `nursery.start`."""
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
    path = event.target.decode("ascii", "replace").split("?", 1)[0]
    route = routes.get(path)
    if event.method not in (b"GET", b"HEAD"):
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
