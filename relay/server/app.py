"""`pgrelay serve`: wire the pieces together, in the order that keeps promises.

Start: pool, then LISTEN live and the first snapshot (the tail), then the
admin endpoint, then — only then — the WebSocket listener accepts sockets.
Stop (SIGTERM/SIGINT): refuse new upgrades, close every client with 1012
("server restarting: reconnect with jitter"), give them `shutdown_timeout_s`
to finish, then cancel what is left and exit 0.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import TypeVar

import psycopg
import structlog
import trio

from relay import __version__
from relay.config import HostPort, Settings
from relay.core.codes import CloseCode
from relay.core.cursor import TailPosition
from relay.core.recent import RecentRows
from relay.db.authorize import Authorizer
from relay.db.migrate import SchemaState, schema_state
from relay.db.pool import AUTHORIZER_APPLICATION_NAME, Database, connect_direct
from relay.db.reads import SubscriberReads
from relay.db.tail import Tailer
from relay.db.tickets import Tickets
from relay.errors import ConfigError, PortUnavailable
from relay.server import sdnotify
from relay.server.admin import Response, Route, serve_admin
from relay.server.admission import Admission
from relay.server.connection import Connection, ConnectionServices, Reads
from relay.server.http import HttpApi
from relay.server.hub import Hub
from relay.server.jwt import AuthConfig, TokenVerifier
from relay.server.membership import MembershipHints
from relay.server.metrics import Metrics
from relay.server.resumes import RecentResumes
from relay.server.scheduler import Scheduler
from relay.ws import OriginPolicy, TrustedProxies, WsConnection, WsRequest, WsServer

#: A tail loop that has not turned for this long is wedged: stop petting the watchdog.
HEARTBEAT_MAX_AGE_S = 60.0
#: How often the notification queue usage is sampled.
STATS_INTERVAL_S = 15.0
#: Path of protocol v1.
WS_PATH = "/v1"

log = structlog.get_logger("pgrelay.daemon")

_T = TypeVar("_T")

ShutdownTrigger = Callable[[], Awaitable[object]]
"""Returns when the daemon should stop (hypercorn's `shutdown_trigger`)."""


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


#: Collect the youngest generation every 50,000 net allocations instead of 700,
#: the older ones every 20 and 100 of those. A daemon holds thousands of
#: long-lived objects per thousand clients, and CPython's defaults walked them
#: over and over during a reconnect storm: 10,000 resumes cost 0.83-0.85 ms of
#: relay CPU each with the defaults, 0.55-0.61 ms with these (`make bench`,
#: storm). Reference counting still frees everything that is not a cycle at once.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """For the daemon's process: fewer collections (GC_THRESHOLDS), and none that
    walk what start-up made (imports, the pool): frozen out of the collector."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        notify: Callable[[str], object] = lambda _m: None,
        admin_routes: dict[str, Route] | None = None,
        reads: Callable[[Database, str], Reads] = SubscriberReads,
        clock: Callable[[], float] = time.time,
        worker: str | None = None,
    ) -> None:
        """`admin_routes`: extra routes for the admin port (`pgrelay dev`'s demo);
        they cannot replace /healthz, /readyz or /metrics. `reads`: makes the SQL
        a connection runs for its client from the pool and the subscriber role
        (a test seam). `worker`: this daemon is that worker of `pgrelay serve
        --workers N` (`relay.server.workers`): its supervisor serves the admin
        port and has checked the WebSocket port, which the worker shares with
        the others (SO_REUSEPORT) and starts listening on only once it serves, so
        that the kernel never hands a connection to a worker still starting."""
        self.settings = s = settings
        self.notify = notify
        self.extra_admin_routes = dict(admin_routes or {})
        self.worker = worker
        self.metrics = Metrics(worker=worker)
        self.position = TailPosition()
        self.hub = Hub(self.metrics, self.position, clock)
        self.db = Database(s.database_url, size=s.pool_size)
        self.scheduler = Scheduler(clock)
        self.admission = Admission(s.admission_limits(), metrics=self.metrics)
        self.recent = RecentRows(s.recent_events)
        self.authorizer = Authorizer(
            partial(connect_direct, s.database_url, AUTHORIZER_APPLICATION_NAME),
            s.subscriber_role,
        )
        self.hints = MembershipHints(self.admission.connections_of)
        self.tailer = Tailer(
            self.db,
            self.hub,
            self.metrics,
            position=self.position,
            poll_interval_s=s.poll_interval_ms / 1000,
            probe_interval_s=s.listener_probe_s,
            membership_changed=self.hints.hint,
            recent=self.recent,
        )
        self.services = ConnectionServices(
            fanout=self.hub,
            scheduler=self.scheduler,
            reads=reads(self.db, s.subscriber_role),
            verifier=build_verifier(s),
            admission=self.admission,
            session_limits=s.session_limits(),
            output_limits=s.output_limits(),
            stats=self.metrics.stats,
            metrics=self.metrics,
            resumes=(
                RecentResumes(self.recent, self.tailer, self.authorizer, self.metrics)
                if s.recent_events
                else None
            ),
        )
        self.http_api = HttpApi(
            verifier=self.services.verifier,
            reads=self.services.reads,
            tickets=Tickets(self.db),
            admission=self.admission,
            services=self.services,
            origins=OriginPolicy(s.allowed_origins),
            replay_limit=s.replay_limit,
        )
        self.ws_server = WsServer(
            self._handle,
            limits=s.ws_limits(),
            path=WS_PATH,
            allowed_origins=s.allowed_origins,
            on_request=lambda request: self.admission.refusal(request.peer[0]),
            on_refused=self.admission.refused_upgrade,
            http_handler=self.http_api,
            trusted_proxies=TrustedProxies(s.trusted_proxies),
            reuse_port=worker is not None,
        )
        self.connections: set[Connection] = set()
        self.serving = False
        """Accepting connections (start-up done)."""
        self.ws_port = 0
        self.admin_port = 0

    # -- admin routes -------------------------------------------------------------
    def _healthz(self) -> Response:
        return Response(200, b"ok\n")

    def _readyz(self) -> Response:
        if self.admission.stopping:
            return Response(503, b"shutting down\n")
        if not self.serving:
            return Response(503, b"starting: waiting for the database (see the log)\n")
        if not self.tailer.listening:
            return Response(503, b"not ready: the database listener is down or deaf\n")
        return Response(200, b"ready\n")

    def _metrics(self) -> Response:
        return Response(200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    # -- websocket ------------------------------------------------------------------
    async def _handle(self, ws: WsConnection, request: WsRequest) -> None:
        bearer = None
        auth = request.authorization
        if auth is not None and auth[:7].lower() == "bearer ":
            bearer = auth[7:].strip()
        host = request.peer[0]
        connection = Connection(uuid.uuid4().hex[:16], ws, services=self.services, peer=host)
        self.admission.enter(host)
        self.connections.add(connection)
        self.metrics.set_connections(self.admission.connections)
        try:
            await connection.serve(bearer)
        finally:
            self.connections.discard(connection)
            self.admission.leave(host)
            self.metrics.set_connections(self.admission.connections)

    # -- run --------------------------------------------------------------------------
    async def run(
        self,
        *,
        shutdown_trigger: ShutdownTrigger | None = None,
        task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `shutdown_trigger` returns (default: SIGTERM or SIGINT; a
        second one cuts the drain short), then drain and return. Started with
        `nursery.start`, it returns this daemon once it accepts connections."""
        if shutdown_trigger is not None:
            await self._serve(shutdown_trigger, None, task_status)
            log.info("stopped")
            return
        # Signals are ours from the first moment to the last: one arriving during
        # start-up is handled once serving. trio re-delivers signals still queued
        # when the receiver closes (a second SIGTERM during the final cleanup) to
        # the handler it restores, so that handler is SIG_IGN, not the default one
        # that would kill the process with a non-zero status.
        stop_signals = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stop_signals}
        try:
            with trio.open_signal_receiver(*stop_signals) as signals:
                await self._serve(partial(_next_signal, signals), signals, task_status)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("stopped")

    async def _serve(
        self,
        shutdown_trigger: ShutdownTrigger,
        hurry: AsyncIterator[int] | None,
        task_status: trio.TaskStatus[Daemon],
    ) -> None:
        """Start in the order that keeps promises, stopping at once if told to
        during start-up: ports bound (a taken port fails now, exit 2); the admin
        endpoint up (/readyz 503 until ready); the database reached and its schema
        found (retried with backoff, saying why); LISTEN live and the first
        snapshot taken; then connections are accepted and systemd hears READY."""
        s = self.settings
        stop = trio.Event()
        try:
            async with trio.open_nursery() as nursery:

                async def watch_for_shutdown() -> None:
                    await shutdown_trigger()
                    stop.set()
                    if not self.serving:
                        log.info("stopping during start-up")
                        nursery.cancel_scope.cancel()

                nursery.start_soon(watch_for_shutdown)
                routes: dict[str, Route] = {
                    **self.extra_admin_routes,
                    "/healthz": self._healthz,
                    "/readyz": self._readyz,
                    "/metrics": self._metrics,
                }
                if self.worker is None:
                    self.admin_port = await _on_port(
                        "PGRELAY_ADMIN_LISTEN",
                        s.admin_listen,
                        nursery.start(serve_admin, s.admin_listen, routes),
                    )
                    self.ws_port = await _on_port(
                        "PGRELAY_LISTEN",
                        s.listen,
                        self.ws_server.bind(s.listen.host, s.listen.port),
                    )
                await self.db.open()
                await nursery.start(self.tailer.run)
                await self._check_schema()
                await nursery.start(self.scheduler.run)
                await nursery.start(self.authorizer.run)
                nursery.start_soon(self._sample_stats)
                nursery.start_soon(self.hints.run)
                self.ws_port = await _on_port(
                    "PGRELAY_LISTEN",
                    s.listen,
                    nursery.start(self.ws_server.serve, s.listen.host, s.listen.port),
                )
                where = {"websocket": f"ws://{s.listen.host}:{self.ws_port}{WS_PATH}"}
                if self.worker is None:
                    where["admin"] = f"http://{s.admin_listen.host}:{self.admin_port}"
                log.info("serving", **where, version=__version__)
                self.serving = True
                self.notify("READY=1")
                nursery.start_soon(partial(sdnotify.watchdog_loop, alive=self.alive))
                task_status.started(self)
                await stop.wait()
                await self._drain(hurry)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.db.close()

    async def _check_schema(self) -> None:
        """Say once, at start, whether the schema is behind (the daemon still runs:
        migrations are additive); the gauges follow it afterwards."""
        try:
            state = await self.db.run(schema_state)
        except psycopg.Error as exc:
            log.warning("cannot read the schema version", error=str(exc).strip())
            return
        self._schema_gauges(state)
        if state.behind:
            log.warning("schema behind", hint=state.describe())
        elif state.applied is not None and state.applied > state.shipped:
            log.info("schema newer than this pgrelay", detail=state.describe())

    def _schema_gauges(self, state: SchemaState) -> None:
        self.metrics.schema_version.set(state.applied or 0)
        self.metrics.schema_behind.set(1 if state.behind else 0)

    def ready(self) -> bool:
        """What /readyz answers 200 to: serving, LISTEN live and heard, not stopping."""
        return self._readyz().status == 200

    def alive(self) -> bool:
        """For the systemd watchdog: the tail loop keeps turning."""
        limit = max(HEARTBEAT_MAX_AGE_S, 5 * self.settings.poll_interval_ms / 1000)
        return trio.current_time() - self.tailer.heartbeat_at < limit

    async def _drain(self, hurry: AsyncIterator[int] | None) -> None:
        """Stop accepting, close every client with 1012, wait for them (bounded by
        `shutdown_timeout_s`, or until `hurry` yields: a second signal)."""
        self.admission.stopping = True
        self.notify("STOPPING=1")
        open_before = len(self.connections)
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                await self.ws_server.shutdown(
                    CloseCode.SERVICE_RESTART,
                    "server restarting",
                    self.settings.shutdown_timeout_s,
                )
                nursery.cancel_scope.cancel()

            nursery.start_soon(drain)
            if hurry is not None:
                async for signum in hurry:
                    log.warning("stopping now", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
        log.info("clients closed", count=open_before, cut=len(self.connections))

    async def _sample_stats(self) -> None:
        while True:
            try:
                usage, oldest_age_s = await self.db.run(_health_sample)
                self.metrics.notification_queue_usage.set(usage)
                self.metrics.oldest_event_age.set(oldest_age_s)
                self._schema_gauges(await self.db.run(schema_state))
            except psycopg.Error:
                pass  # the tail reports database trouble; these are only gauges
            await trio.sleep(STATS_INTERVAL_S)


async def _on_port(setting: str, where: HostPort, binding: Awaitable[_T]) -> _T:
    """Await a bind; a taken (or forbidden) address becomes PortUnavailable."""
    try:
        return await binding
    except OSError as exc:
        raise PortUnavailable(
            f"cannot listen on {where} ({setting}): {exc.strerror or exc}; "
            f"stop what holds it or choose another address with {setting}"
        ) from exc


async def _next_signal(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        log.info("stopping", signal=signal.Signals(signum).name)
        return


async def serve(
    settings: Settings,
    *,
    shutdown_trigger: ShutdownTrigger | None = None,
    notify: Callable[[str], object] = lambda _m: None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `pgrelay serve` in this trio run until `shutdown_trigger` returns
    (default: SIGTERM/SIGINT). `nursery.start(serve, ...)` returns the daemon
    once it accepts connections."""
    await Daemon(settings, notify=notify).run(
        shutdown_trigger=shutdown_trigger, task_status=task_status
    )


def _health_sample(conn: psycopg.Connection[tuple[float, float]]) -> tuple[float, float]:
    """pg_notification_queue_usage(), and the oldest retained event's age in seconds
    (0 when the table is empty) through relay.oldest_event_age() (006)."""
    row = conn.execute(
        "SELECT pg_notification_queue_usage(), "
        "coalesce(extract(epoch FROM relay.oldest_event_age()), 0)::float8"
    ).fetchone()
    return (float(row[0]), float(row[1])) if row else (0.0, 0.0)
