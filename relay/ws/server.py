"""The listening side: accept, handshake, run one handler per connection, shut down.

    server = WsServer(handler, limits=WsLimits(), path="/v1")
    port = await server.bind("127.0.0.1", 0)   # optional: fail early if the port is taken
    await nursery.start(server.serve)           # binds here if `bind` was not called
    ...
    await server.shutdown(CloseCode.SERVICE_RESTART, "server restarting")

Every connection task, and every writer task a connection spawns while it has
bytes pending, lives in the server's connection nursery; one heartbeat task
pings them all. `serve` returns only after all of them ended. `shutdown`
stops accepting (new TCP connections are refused), closes every open
connection with the given code, gives them `timeout_s` to finish, then
cancels the rest.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Collection

import h11
import structlog
import trio

from relay.core.codes import CloseCode
from relay.ws.connection import ConnectionGroup, Handler, WsConnection
from relay.ws.handshake import (
    OriginPolicy,
    WsReject,
    WsRequest,
    accept_response,
    check_upgrade,
    reject_response,
)
from relay.ws.http import HttpExchange, HttpHandler, HttpRequest
from relay.ws.limits import WsLimits
from relay.ws.proxy import NEED_MORE, ProxyHeader, TrustedProxies, parse_proxy_header
from relay.ws.sockets import (
    ACCEPT_RESOURCE_ERRNOS,
    ACCEPT_SKIP_ERRNOS,
    bind_listener,
    close_socket,
    configure_accepted,
    discard_until_eof,
    recv_some,
    send_all,
)

__all__ = ["RefusalHook", "RequestHook", "WsServer"]

_log = structlog.get_logger("relay.ws")

RequestHook = Callable[[WsRequest], WsReject | None]
"""Called with each checked upgrade request before the 101; return a
`WsReject` to refuse it (503 not ready, 429 too many connections, 401...)."""

RefusalHook = Callable[[tuple[str, int], WsReject], None]
"""Called with the peer address and the refusal of every upgrade refused (for
counting and logging); it must not raise."""

ACCEPT_BATCH = 64
"""Connections accepted per wake-up before yielding to other tasks."""
ACCEPT_RETRY_S = 0.1
"""Pause after accept() ran out of file descriptors or memory."""


class WsServer:
    """A WebSocket server on one TCP port; one `handler` task per connection."""

    def __init__(
        self,
        handler: Handler,
        *,
        limits: WsLimits | None = None,
        path: str = "/v1",
        allowed_origins: Collection[str] = (),
        on_request: RequestHook | None = None,
        on_refused: RefusalHook | None = None,
        http_handler: HttpHandler | None = None,
        trusted_proxies: TrustedProxies | None = None,
        reuse_port: bool = False,
    ) -> None:
        """`path`: the only path upgraded (others get 404). `allowed_origins`:
        when not empty, a request whose Origin header matches none of them gets
        403 (no Origin header: allowed; see `OriginPolicy` for patterns).
        `on_request`: see `RequestHook`; `on_refused`: see `RefusalHook`.
        `http_handler`: answers every request that is not a WebSocket upgrade
        (without it they get 426/404). `trusted_proxies`: peers whose PROXY
        protocol header or X-Forwarded-For names the client (`relay.ws.proxy`).
        `reuse_port`: listen with SO_REUSEPORT, beside other processes on the port."""
        self._handler = handler
        self._limits = limits or WsLimits()
        self._path = path
        self._origins = OriginPolicy(allowed_origins)
        self._on_request = on_request
        self._on_refused = on_refused
        self._http_handler = http_handler
        self._trusted = trusted_proxies or TrustedProxies()
        self._reuse_port = reuse_port
        self._listener: socket.socket | None = None
        self._connections: set[WsConnection | HttpExchange] = set()
        self._group: ConnectionGroup | None = None
        self._port: int | None = None
        self._accept_scope: trio.CancelScope | None = None
        self._handshakes = trio.Semaphore(1)
        """Upgrade requests being read (see `_accept_loop`)."""
        self._stopping = False
        self._stop_deadline = math.inf
        self._stopped: trio.Event | None = None

    @property
    def port(self) -> int | None:
        """The bound port once listening."""
        return self._port

    @property
    def connection_count(self) -> int:
        """Upgraded connections and event streams not yet closed."""
        return len(self._connections)

    async def bind(self, host: str, port: int) -> int:
        """Bind and listen on host:port (port 0: any free port) without accepting
        yet; returns the port. Raises OSError (EADDRINUSE...) at once, so that a
        daemon can fail before it does anything else."""
        if self._listener is None:
            self._listener = await bind_listener(
                host, port, self._limits.accept_backlog, reuse_port=self._reuse_port
            )
        return int(self._listener.getsockname()[1])

    async def serve(
        self,
        host: str = "",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on the socket `bind` made (or bind host:port now), report the
        port through `task_status`, and serve until `shutdown` or cancellation."""
        if self._stopped is not None:
            raise RuntimeError("WsServer.serve runs once")
        self._stopped = trio.Event()
        await self.bind(host, port)
        listener = self._listener
        assert listener is not None
        try:
            self._port = int(listener.getsockname()[1])
            async with trio.open_nursery() as heartbeat:
                async with trio.open_nursery() as connections:
                    self._group = ConnectionGroup(connections)
                    if math.isfinite(self._limits.ping_interval_s):
                        heartbeat.start_soon(self._group.run_heartbeats)
                    with trio.CancelScope() as accept_scope:
                        self._accept_scope = accept_scope
                        if self._stopping:
                            accept_scope.cancel()
                        task_status.started(self._port)
                        await self._accept_loop(listener, connections)
                    close_socket(listener)
                    # shutdown(): connections were asked to close; cut off the rest.
                    connections.cancel_scope.deadline = self._stop_deadline
                heartbeat.cancel_scope.cancel()
        finally:
            close_socket(listener)
            self._stopped.set()

    async def shutdown(
        self,
        code: int = CloseCode.SERVICE_RESTART,
        reason: str = "server restarting",
        timeout_s: float = 10.0,
    ) -> None:
        """Stop accepting, close every connection with `code`, and return once
        `serve` has returned (connections still open after `timeout_s` are
        cancelled)."""
        self._stopping = True
        self._stop_deadline = trio.current_time() + timeout_s
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for connection in list(self._connections):
            connection.abort(code, reason)
        if self._stopped is not None:
            await self._stopped.wait()
        else:
            await trio.lowlevel.checkpoint()

    async def _accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        # An overloaded server (a reconnect storm) accepts no faster than it reads
        # upgrade requests: the rest wait in the kernel's backlog rather than run
        # out their handshake deadline here.
        handshakes = self._handshakes = trio.Semaphore(self._limits.max_handshakes)
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(ACCEPT_BATCH):
                if not handshakes.value:
                    await handshakes.acquire()
                    handshakes.release()
                try:
                    sock, address = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno in ACCEPT_RESOURCE_ERRNOS:
                        _log.warning("ws_accept_failed", error=str(exc))
                        await trio.sleep(ACCEPT_RETRY_S)
                        break
                    if exc.errno in ACCEPT_SKIP_ERRNOS:
                        continue
                    raise
                handshakes.acquire_nowait()
                nursery.start_soon(self._handle_client, sock, address)

    async def _handle_client(self, sock: socket.socket, address: tuple[object, ...]) -> None:
        peer = (str(address[0]), int(str(address[1])))
        limits = self._limits
        handshaking = True
        try:
            configure_accepted(sock, limits.send_buffer_bytes)
            outcome: tuple[WsRequest, bytes] | HttpExchange | WsReject | None = None
            with trio.move_on_after(limits.handshake_timeout_s):
                outcome = await self._read_upgrade(sock, peer)
            handshaking = False
            self._handshakes.release()
            if outcome is None:
                return  # the peer left or was too slow (slow-loris): just drop it
            if isinstance(outcome, HttpExchange):
                await self._run_http(outcome)
                return
            if isinstance(outcome, tuple):
                request, trailing = outcome
                peer = request.peer
                refusal = self._refusal(request)
                if refusal is None:
                    await send_all(sock, accept_response(request))
                    await self._run_connection(sock, request, trailing)
                    return
                outcome = refusal
            if self._on_refused is not None:
                self._on_refused(peer, outcome)
            with trio.move_on_after(limits.close_timeout_s):
                await send_all(sock, reject_response(outcome))
                sock.shutdown(socket.SHUT_WR)
                await discard_until_eof(sock, limits.receive_chunk_bytes)
        except OSError as exc:  # the peer reset during the handshake
            _log.debug("ws_handshake_failed", peer=peer, error=str(exc))
        finally:
            if handshaking:
                self._handshakes.release()
            close_socket(sock)

    def _refusal(self, request: WsRequest) -> WsReject | None:
        if self._stopping:
            return WsReject(503, "server shutting down", reason="stopping")
        if self._on_request is not None:
            try:
                return self._on_request(request)
            except Exception:
                _log.exception("ws_request_hook_failed", peer=request.peer)
                return WsReject(500)
        return None

    async def _read_upgrade(
        self, sock: socket.socket, peer: tuple[str, int]
    ) -> tuple[WsRequest, bytes] | HttpExchange | WsReject | None:
        """Read one request head: the checked upgrade request and the bytes after
        it, a plain HTTP exchange (with an `http_handler`), an HTTP refusal, or
        None if the peer went away. From a trusted proxy, the client's address
        is taken from a PROXY protocol header or from X-Forwarded-For."""
        parser = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self._limits.max_handshake_bytes
        )
        proxied = False
        if self._trusted.trusts(peer[0]):
            found = await self._read_proxy_header(sock, parser)
            if isinstance(found, WsReject):
                return found
            if found is not None:
                peer, proxied = found, True
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                return WsReject(exc.error_status_hint, "bad request", reason="handshake")
            if event is h11.NEED_DATA:
                parser.receive_data(await recv_some(sock, self._limits.receive_chunk_bytes))
                continue
            if not isinstance(event, h11.Request):
                return None
            if not proxied and self._trusted.trusts(peer[0]):
                forwarded = [
                    v.decode("latin-1") for k, v in event.headers if k == b"x-forwarded-for"
                ]
                if forwarded:
                    peer = (self._trusted.client(peer[0], forwarded), 0)
            if self._http_handler is not None and not _is_upgrade(event):
                return self._exchange(sock, event, parser, peer)
            checked = check_upgrade(event, peer, path=self._path, allowed_origins=self._origins)
            if isinstance(checked, WsReject):
                return checked
            return checked, parser.trailing_data[0]

    async def _read_proxy_header(
        self, sock: socket.socket, parser: h11.Connection
    ) -> tuple[str, int] | WsReject | None:
        """From a trusted proxy: the client's address from a PROXY header at the
        start of the stream (None: no header, or LOCAL); the rest goes to `parser`."""
        data = b""
        while True:
            try:
                found = parse_proxy_header(data)
            except ValueError as exc:
                return WsReject(400, f"bad PROXY protocol header: {exc}", reason="handshake")
            if found is not NEED_MORE:
                break
            chunk = await recv_some(sock, self._limits.receive_chunk_bytes)
            if not chunk:
                break
            data += chunk
        if isinstance(found, ProxyHeader):
            rest = data[found.length :]
            if rest:  # (empty would tell h11 the stream ended: a proxy sends its
                parser.receive_data(rest)  # header before the client's request)
            return found.source
        parser.receive_data(data)
        return None

    def _exchange(
        self,
        sock: socket.socket,
        event: h11.Request,
        parser: h11.Connection,
        peer: tuple[str, int],
    ) -> HttpExchange:
        assert self._group is not None
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers)
        request = HttpRequest(event.method.decode("ascii", "replace"), path, query, headers, peer)
        return HttpExchange(sock, request, parser, limits=self._limits, nursery=self._group.nursery)

    async def _run_http(self, exchange: HttpExchange) -> None:
        assert self._http_handler is not None
        self._connections.add(exchange)
        if self._stopping:
            exchange.abort(CloseCode.SERVICE_RESTART, "server restarting")
        try:
            await self._http_handler(exchange)
        except Exception:
            _log.exception("http_handler_failed", peer=exchange.request.peer)
        finally:
            self._connections.discard(exchange)
            exchange.close()

    async def _run_connection(
        self, sock: socket.socket, request: WsRequest, trailing: bytes
    ) -> None:
        assert self._group is not None
        connection = WsConnection(sock, request, self._limits, trailing, group=self._group)
        started = trio.current_time()
        self._connections.add(connection)
        if self._stopping:  # shutdown() began while this one was upgrading
            connection.abort(CloseCode.SERVICE_RESTART, "server restarting")
        try:
            await connection._run(self._handler)
        finally:
            self._connections.discard(connection)
            _log.debug(
                "ws_connection_closed",
                peer=request.peer,
                close_code=connection.close_code,
                close_reason=connection.close_reason,
                duration_s=round(trio.current_time() - started, 3),
            )


def _is_upgrade(request: h11.Request) -> bool:
    """Whether a request asks for a WebSocket (the Upgrade header names it)."""
    return any(k == b"upgrade" and b"websocket" in v.lower() for k, v in request.headers)
