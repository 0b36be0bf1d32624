"""`pgrelay serve`: wire the pieces together, in the order that keeps promises.

Start: pool, then LISTEN live and the first snapshot (the tail), then the
admin endpoint, then — only then — the WebSocket listener accepts sockets.
Stop (SIGTERM/SIGINT): refuse new upgrades, close every client with 1012
("server restarting: reconnect with jitter"), give them `shutdown_timeout_s`
to finish, then cancel what is left and exit 0.
"""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from functools import partial

import psycopg
import structlog
import trio

from relay import sdnotify
from relay.admin import Response, Route, serve_admin
from relay.auth import AuthConfig, TokenVerifier
from relay.client import Client, ClientConfig
from relay.config import Settings
from relay.core.outbox import OutboxLimits
from relay.core.protocol import CloseCode
from relay.core.session import SessionLimits
from relay.database import Database
from relay.errors import ConfigError
from relay.hub import Hub
from relay.metrics import Metrics
from relay.tailer import Tailer
from relay.ws import WsConnection, WsLimits, WsReject, WsRequest, WsServer

#: A tail loop that has not turned for this long is wedged: stop petting the watchdog.
HEARTBEAT_MAX_AGE_S = 60.0
#: How often the notification queue usage is sampled.
STATS_INTERVAL_S = 15.0
#: Path of protocol v1.
WS_PATH = "/v1"
#: Unsent bytes one client may hold in the WebSocket layer; beyond, its outbox
#: (which coalesces, then collapses into resync) takes over.
WS_MAX_PENDING_BYTES = 64 * 1024

log = structlog.get_logger("pgrelay.daemon")


def build_verifier(s: Settings) -> TokenVerifier:
    try:
        return TokenVerifier(
            AuthConfig(
                secret=s.jwt_secret,
                public_key_file=s.jwt_public_key_file,
                jwks_file=s.jwt_jwks_file,
                algorithms=s.jwt_algorithms,
                audience=s.jwt_audience,
                issuer=s.jwt_issuer,
                leeway_s=s.jwt_leeway_s,
            )
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        notify: Callable[[str], object] = lambda _m: None,
        admin_routes: dict[str, Route] | None = None,
    ) -> None:
        """`admin_routes`: extra routes for the admin port (`pgrelay dev`'s demo);
        they cannot replace /healthz, /readyz or /metrics."""
        self.settings = s = settings
        self.notify = notify
        self.extra_admin_routes = dict(admin_routes or {})
        self.metrics = Metrics()
        self.hub = Hub(self.metrics)
        self.db = Database(s.database_url, size=s.pool_size)
        self.verifier = build_verifier(s)
        self.tailer = Tailer(
            self.db, self.hub, self.metrics, poll_interval_s=s.poll_interval_ms / 1000
        )
        self.client_config = ClientConfig(
            subscriber_role=s.subscriber_role,
            replay_limit=s.replay_limit,
            session=SessionLimits(
                auth_timeout_s=s.auth_timeout_s,
                token_leeway_s=s.jwt_leeway_s,
                recheck_interval_s=s.recheck_interval_s or float("inf"),
                max_subscriptions=s.max_subscriptions,
                max_frame_bytes=s.max_message_bytes,
            ),
            outbox=OutboxLimits(max_bytes=s.max_pending_bytes, max_stall_s=s.slow_client_timeout_s),
            max_pending_bytes=WS_MAX_PENDING_BYTES,
            max_connections_per_user=s.max_connections_per_user,
        )
        self.ws_limits = WsLimits(
            max_message_bytes=s.max_message_bytes, max_pending_bytes=WS_MAX_PENDING_BYTES
        )
        self.ws_server = WsServer(
            self._handle,
            limits=self.ws_limits,
            path=WS_PATH,
            allowed_origins=s.allowed_origins,
            on_request=self._admit,
        )
        self.stopping = False
        self.per_ip: Counter[str] = Counter()
        self.ws_port = 0
        self.admin_port = 0

    # -- admin routes -------------------------------------------------------------
    def _healthz(self) -> Response:
        return Response(200, b"ok\n")

    def _readyz(self) -> Response:
        if self.stopping:
            return Response(503, b"shutting down\n")
        if not self.tailer.listening:
            return Response(503, b"not ready: the database listener is down\n")
        return Response(200, b"ready\n")

    def _metrics(self) -> Response:
        return Response(200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    # -- websocket ------------------------------------------------------------------
    def _admit(self, request: WsRequest) -> WsReject | None:
        """Path and Origin are checked by the WebSocket server; this adds the limits."""
        s = self.settings
        if len(self.hub.clients) >= s.max_connections:
            return WsReject(503, "too many connections", (("retry-after", "5"),))
        if self.per_ip[request.peer[0]] >= s.max_connections_per_ip:
            return WsReject(429, "too many connections from this address")
        return None

    async def _handle(self, ws: WsConnection, request: WsRequest) -> None:
        bearer = None
        auth = request.authorization
        if auth is not None and auth[:7].lower() == "bearer ":
            bearer = auth[7:].strip()
        host = request.peer[0]
        client = Client(
            uuid.uuid4().hex[:16],
            ws,
            hub=self.hub,
            db=self.db,
            verifier=self.verifier,
            config=self.client_config,
            peer=host,
        )
        self.per_ip[host] += 1
        try:
            await client.serve(bearer)
        finally:
            self.per_ip[host] -= 1
            if not self.per_ip[host]:
                del self.per_ip[host]

    # -- run --------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        # Signals are ours from the first moment to the last: one arriving during
        # start-up is handled once serving. trio re-delivers signals still queued
        # when the receiver closes (a second SIGTERM during the final cleanup) to
        # the handler it restores, so that handler is SIG_IGN, not the default one
        # that would kill the process with a non-zero status.
        stop_signals = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stop_signals}
        try:
            with trio.open_signal_receiver(*stop_signals) as signals:
                await self._serve(s, signals, task_status)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("stopped")

    async def _serve(
        self, s: Settings, signals: AsyncIterator[int], task_status: trio.TaskStatus[None]
    ) -> None:
        await self.db.open()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.tailer.run)
                self.hub.cursor_now = lambda: self.tailer.head_cursor
                nursery.start_soon(self.hub.run_timers)
                nursery.start_soon(self._sample_stats)
                routes: dict[str, Route] = {
                    **self.extra_admin_routes,
                    "/healthz": self._healthz,
                    "/readyz": self._readyz,
                    "/metrics": self._metrics,
                }
                self.admin_port = await nursery.start(serve_admin, s.admin_listen, routes)
                self.ws_port = await nursery.start(
                    self.ws_server.serve, s.listen.host, s.listen.port
                )
                log.info(
                    "serving",
                    websocket=f"ws://{s.listen.host}:{self.ws_port}{WS_PATH}",
                    admin=f"http://{s.admin_listen.host}:{self.admin_port}",
                )
                self.notify("READY=1")
                nursery.start_soon(partial(sdnotify.watchdog_loop, alive=self._alive))
                task_status.started()
                await self._until_signalled_then_drain(signals)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.db.close()

    def _alive(self) -> bool:
        """For the systemd watchdog: the tail loop keeps turning."""
        limit = max(HEARTBEAT_MAX_AGE_S, 5 * self.settings.poll_interval_ms / 1000)
        return trio.current_time() - self.tailer.heartbeat_at < limit

    async def _until_signalled_then_drain(self, signals: AsyncIterator[int]) -> None:
        """First SIGTERM/SIGINT: drain gracefully. A second one: stop draining now."""
        async for signum in signals:
            log.info("stopping", signal=signal.Signals(signum).name)
            break
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                await self._drain()
                nursery.cancel_scope.cancel()

            nursery.start_soon(drain)
            async for signum in signals:
                log.warning("stopping now", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break

    async def _drain(self) -> None:
        """Stop accepting, close every client with 1012, wait for them (bounded)."""
        self.stopping = True
        self.notify("STOPPING=1")
        open_before = len(self.hub.clients)
        await self.ws_server.shutdown(
            CloseCode.SERVER_RESTARTING, "server restarting", self.settings.shutdown_timeout_s
        )
        log.info("clients closed", count=open_before, cut=len(self.hub.clients))

    async def _sample_stats(self) -> None:
        while True:
            try:
                usage, oldest_age_s = await self.db.run(_health_sample)
                self.metrics.notification_queue_usage.set(usage)
                self.metrics.oldest_event_age.set(oldest_age_s)
            except psycopg.Error:
                pass  # the tail reports database trouble; these are only gauges
            await trio.sleep(STATS_INTERVAL_S)


def _health_sample(conn: psycopg.Connection[tuple[float, float]]) -> tuple[float, float]:
    """pg_notification_queue_usage(), and the oldest retained event's age in seconds
    (0 when the table is empty) through relay.oldest_event_age() (006)."""
    row = conn.execute(
        "SELECT pg_notification_queue_usage(), "
        "coalesce(extract(epoch FROM relay.oldest_event_age()), 0)::float8"
    ).fetchone()
    return (float(row[0]), float(row[1])) if row else (0.0, 0.0)
