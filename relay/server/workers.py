"""`pgrelay serve --workers N`: N processes serve one port; a supervisor watches them.

Each worker is a whole daemon (`relay.server.app.Daemon`) with its own pool,
LISTEN connection and tail; workers share nothing. A cursor describes the
database, not a process, so a client that reconnects to any worker resumes
exactly. Each worker listens on the WebSocket port with SO_REUSEPORT, and the
kernel spreads new connections over the workers that listen (by a hash of the
connection's addresses and ports). A worker listens only once it serves, and
its socket goes when it dies, so no connection ever waits on a worker that is
starting or gone.

The supervisor is the process `pgrelay serve` started (systemd's main pid):

- it checks what can be checked first, exactly as one daemon does (settings,
  token keys, both ports: a taken port is one log line and exit 2). It holds
  the WebSocket port with a bound socket that never listens (so no other user
  can take it, and no connection ever reaches it) and serves the admin port;
- it starts each worker as `python -m relay serve`, fresh (never a fork of a
  running trio), marked by ``_PGRELAY_WORKER`` and given the supervisor's
  settings over a socket pair. The workers' environment lacks systemd's
  variables: only the supervisor talks to systemd (NotifyAccess=main);
- each worker reports on that socket pair every `HEARTBEAT_S`, and at once when
  it starts or stops serving: whether it serves, whether its /readyz would be
  200, and whether its tail loop turns (the watchdog condition of one daemon).
  A worker that hears EOF there (the supervisor is gone) drains and exits;
- one READY=1 goes to systemd once every worker serves; WATCHDOG=1 only while
  every worker runs, was heard within `SILENT_S` and says its tail turns;
  /readyz is 200 only while every worker is ready;
- a worker that exits is started again after a backoff (`pgrelay_worker_
  restarts_total{worker}`, and a log line); one not heard from for `WEDGED_S`
  is killed first. A worker that fails its start with exit status 2 (a setting)
  before the supervisor is serving stops everything with status 2;
- SIGTERM or SIGINT: each worker is told (SIGTERM) and drains as one daemon
  does (1012 to its clients, `PGRELAY_SHUTDOWN_TIMEOUT_S`); the supervisor
  exits 0 once they are gone. A worker still running `KILL_GRACE_S` after the
  drain time, or when a second signal comes, is killed.

/metrics: the workers write prometheus-client's multiprocess files in a
private directory the supervisor creates and removes; the supervisor serves
their sum (`relay.server.metrics`), its own `pgrelay_build_info`,
`pgrelay_worker_ready{worker}`, `pgrelay_worker_restarts_total{worker}`, and
the process metrics of itself (no label) and of each worker (`worker`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace

import structlog
import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from relay import __version__, logs
from relay.config import HostPort, Settings
from relay.db.listener import Backoff
from relay.server import sdnotify
from relay.server.admin import Response, Route, serve_admin
from relay.server.app import WS_PATH, Daemon, _on_port, build_verifier, tune_gc
from relay.ws.sockets import bind_listener

__all__ = ["WORKER_ENV", "Supervisor", "supervise", "worker_main"]

WORKER_ENV = "_PGRELAY_WORKER"
"""Marks a worker process: ``<worker number>:<fd of its end of the socket pair>``."""
SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
"""Variables a worker never sees: only the supervisor talks to systemd."""

HEARTBEAT_S = 0.5
"""A worker reports (and copies its Stats into its counters) this often."""
SILENT_S = 3.0
"""A worker not heard from this long is not alive: no watchdog pets, /readyz 503."""
WEDGED_S = 60.0
"""A worker not heard from this long is killed (then started again)."""
RESTART_INITIAL_S = 0.5
"""The first restart's delay; it doubles on each exit in a row, up to RESTART_MAX_S."""
RESTART_MAX_S = 30.0
STABLE_S = 60.0
"""A worker that ran this long before it exited is restarted after the first delay again."""
KILL_GRACE_S = 5.0
"""After PGRELAY_SHUTDOWN_TIMEOUT_S, the time a stopping worker has to exit before it is killed."""
WATCHDOG_TICK_S = 0.25
"""How often the supervisor looks whether it may pet the watchdog."""

log = structlog.get_logger("pgrelay.supervisor")


# -- the supervisor ----------------------------------------------------------------------


@dataclass
class _Worker:
    """One worker slot; its process changes on each restart."""

    number: int
    process: trio.Process | None = None
    pid: int = 0
    serving: bool = False
    """This process has served (its READY)."""
    ready: bool = False
    alive: bool = False
    heard_at: float = -math.inf
    """trio time of the last report."""
    started_at: float = 0.0
    restarts: int = 0
    backoff: Backoff = field(
        default_factory=lambda: Backoff(initial_s=RESTART_INITIAL_S, max_s=RESTART_MAX_S)
    )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def heard(self, now: float) -> bool:
        return self.running and now - self.heard_at < SILENT_S


class Supervisor:
    """Starts, watches and stops the workers of `pgrelay serve --workers N`."""

    def __init__(
        self,
        settings: Settings,
        *,
        notify: Callable[[str], object] = lambda _m: None,
        metrics_dir: str,
    ) -> None:
        self.settings = settings
        self.notify = notify
        self.metrics_dir = metrics_dir
        self.workers = [_Worker(n) for n in range(settings.workers)]
        self.worker_settings = settings
        """What the workers run with: the port the supervisor holds (an ephemeral
        port 0 resolved)."""
        self.serving = False
        """Every worker served once, READY=1 sent."""
        self.stopping = False
        self.exit_status = 0
        self._stop = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._where: dict[str, str] = {}
        # No auto_describe: the collectors below are read only when scraped, in trio.
        self.registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(self.registry, path=metrics_dir)  # type: ignore[no-untyped-call]
        self.registry.register(_Processes(self))
        self.registry.register(_WorkerStates(self))
        build = Gauge(
            "pgrelay_build_info",
            "pgrelay's version (always 1)",
            ["version"],
            registry=self.registry,
        )
        build.labels(version=__version__).set(1)
        self.restarts = Counter(
            "pgrelay_worker_restarts",
            "Workers started again after they exited (or were killed, not heard from)",
            ["worker"],
            registry=self.registry,
        )
        for w in self.workers:
            self.restarts.labels(worker=str(w.number))

    # -- admin routes ---------------------------------------------------------------------
    def _healthz(self) -> Response:
        return Response(200, b"ok\n")

    def _readyz(self) -> Response:
        if self.stopping:
            return Response(503, b"shutting down\n")
        now = trio.current_time()
        waiting = [w.number for w in self.workers if not (w.heard(now) and w.ready)]
        if waiting:
            numbers = ", ".join(str(n) for n in waiting)
            return Response(503, f"not ready: worker {numbers} (see the log)\n".encode())
        return Response(200, b"ready\n")

    def _metrics(self) -> Response:
        return Response(
            200, generate_latest(self.registry), "text/plain; version=0.0.4; charset=utf-8"
        )

    def all_alive(self) -> bool:
        """The watchdog condition: every worker runs, talks, and its tail turns."""
        now = trio.current_time()
        return all(w.heard(now) and w.alive for w in self.workers)

    # -- run ------------------------------------------------------------------------------
    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then stop the workers; the exit status."""
        stop_signals = (signal.SIGTERM, signal.SIGINT)
        # As Daemon.run: a signal that comes while the receiver closes is ignored.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stop_signals}
        try:
            with trio.open_signal_receiver(*stop_signals) as signals:
                await self._run(signals)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("stopped", exit_status=self.exit_status)
        return self.exit_status

    async def _run(self, signals: AsyncIterator[int]) -> None:
        s = self.settings
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            routes: dict[str, Route] = {
                "/healthz": self._healthz,
                "/readyz": self._readyz,
                "/metrics": self._metrics,
            }
            admin_port = await _on_port(
                "PGRELAY_ADMIN_LISTEN",
                s.admin_listen,
                nursery.start(serve_admin, s.admin_listen, routes),
            )
            held = await _on_port("PGRELAY_LISTEN", s.listen, hold_port(s.listen))
            try:
                ws_port = int(held.getsockname()[1])
                self.worker_settings = replace(s, listen=HostPort(s.listen.host, ws_port))
                self._where = {
                    "websocket": f"ws://{s.listen.host}:{ws_port}{WS_PATH}",
                    "admin": f"http://{s.admin_listen.host}:{admin_port}",
                }
                async with trio.open_nursery() as workers:
                    for w in self.workers:
                        workers.start_soon(self._keep_running, w)
                    workers.start_soon(self._kill_the_wedged)
                    await self._wait_for_stop(signals)
                    await self._stop_workers(signals)
                    workers.cancel_scope.cancel()
            finally:
                held.close()
            nursery.cancel_scope.cancel()

    async def _wait_for_stop(self, signals: AsyncIterator[int]) -> None:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for signum in signals:
                    log.info("stopping", signal=signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()

            async def on_stop() -> None:
                await self._stop.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            nursery.start_soon(on_stop)

    async def _stop_workers(self, signals: AsyncIterator[int]) -> None:
        """Tell every worker to drain (SIGTERM) and wait for them, killing those left
        after the drain time and `KILL_GRACE_S`, or at once on a second signal."""
        self.stopping = True
        self.notify("STOPPING=1")
        for w in self.workers:
            _send_signal(w, signal.SIGTERM)
        with trio.move_on_after(self.settings.shutdown_timeout_s + KILL_GRACE_S):
            async with trio.open_nursery() as nursery:

                async def hurry() -> None:
                    async for signum in signals:
                        log.warning("stopping now", signal=signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        break

                async def all_exited() -> None:
                    for w in self.workers:
                        if w.process is not None:
                            await w.process.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(hurry)
                nursery.start_soon(all_exited)
        for w in self.workers:
            if w.running:
                log.warning("worker killed: still running", worker=w.number, pid=w.pid)
                _send_signal(w, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            for w in self.workers:
                if w.process is not None:
                    await w.process.wait()

    async def _keep_running(self, w: _Worker) -> None:
        """Run worker `w`, and run it again after a backoff each time it exits."""
        while not self.stopping:
            status = await self._run_worker(w)
            if self.stopping:
                return
            ran_s = trio.current_time() - w.started_at
            if ran_s >= STABLE_S:
                w.backoff.reset()
            if status == 2 and not self.serving:
                log.error(
                    "cannot start: a worker failed its start (see its line above)",
                    worker=w.number,
                    exit_status=2,
                )
                self.exit_status = 2
                self._stop.set()
                return
            wait = w.backoff.next()
            log.error(
                "worker exited",
                worker=w.number,
                pid=w.pid,
                status=_describe(status),
                ran_s=round(ran_s, 1),
                restart_in_s=round(wait, 2),
            )
            await trio.sleep(wait)
            if self.stopping:
                return
            w.restarts += 1
            self.restarts.labels(worker=str(w.number)).inc()

    async def _run_worker(self, w: _Worker) -> int:
        """Start worker `w`, follow its reports until it exits; its exit status."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_ENV and k != WORKER_ENV}
            env[WORKER_ENV] = f"{w.number}:{theirs.fileno()}"
            env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
            w.serving = w.ready = w.alive = False
            w.started_at = w.heard_at = trio.current_time()
            try:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "relay", "serve"],
                    env=env,
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                )
            except OSError as exc:  # out of processes or memory: try again later
                log.error("cannot start a worker", worker=w.number, error=str(exc))
                return 1
            theirs.close()
            w.process, w.pid = process, process.pid
            log.info("worker started", worker=w.number, pid=w.pid)
            if self.stopping:  # began while it was being started
                _send_signal(w, signal.SIGTERM)
            _send_settings(ours, self.worker_settings)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow_reports, w, trio.socket.from_stdlib_socket(ours))
                await process.wait()
                nursery.cancel_scope.cancel()
            return process.returncode if process.returncode is not None else 1
        finally:
            theirs.close()
            ours.close()
            if w.pid:
                mark_process_dead(w.pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    async def _follow_reports(self, w: _Worker, channel: trio.socket.SocketType) -> None:
        buffer = b""
        while True:
            try:
                data = await channel.recv(4096)
            except OSError:
                return
            if not data:
                return
            lines = (buffer + data).split(b"\n")
            buffer = lines.pop()
            for line in lines:
                try:
                    report = json.loads(line)
                except ValueError:
                    continue
                w.heard_at = trio.current_time()
                w.serving = w.serving or bool(report.get("serving"))
                w.ready = bool(report.get("ready"))
                w.alive = bool(report.get("alive"))
            if not self.serving and all(w.serving for w in self.workers):
                self._now_serving()

    def _now_serving(self) -> None:
        """Every worker serves: say so, once."""
        self.serving = True
        log.info(
            "serving",
            **self._where,
            workers=len(self.workers),
            pids=[w.pid for w in self.workers],
            version=__version__,
        )
        self.notify("READY=1")
        assert self._nursery is not None
        self._nursery.start_soon(self._watchdog)

    async def _watchdog(self) -> None:
        """WATCHDOG=1 every half WatchdogSec while `all_alive`; when a pet was
        skipped, the next one goes out as soon as the condition holds again."""
        interval = sdnotify.watchdog_interval(os.environ)
        if interval is None or sdnotify.notify_address(os.environ) is None:
            return
        petted_at = -math.inf
        while True:
            now = trio.current_time()
            if now - petted_at >= interval and self.all_alive():
                self.notify("WATCHDOG=1")
                petted_at = now
            await trio.sleep(min(interval, WATCHDOG_TICK_S))

    async def _kill_the_wedged(self) -> None:
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            for w in self.workers:
                if w.running and now - w.heard_at > WEDGED_S and not self.stopping:
                    log.error(
                        "worker not heard from: killing it",
                        worker=w.number,
                        pid=w.pid,
                        silent_s=round(now - w.heard_at, 1),
                    )
                    _send_signal(w, signal.SIGKILL)


def _send_signal(w: _Worker, signum: signal.Signals) -> None:
    if w.process is not None and w.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            w.process.send_signal(signum)


def _describe(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


async def hold_port(where: HostPort) -> socket.socket:
    """A socket that holds the WebSocket port for the workers: bound with
    SO_REUSEPORT, never listening (so it never receives a connection).

    A plain bind first: with SO_REUSEPORT alone, a port that another process of
    this user listens on with SO_REUSEPORT (a pgrelay left running) would be
    shared with it instead of refused."""
    probe = await bind_listener(where.host, where.port, 1)
    port = int(probe.getsockname()[1])
    probe.close()
    return await bind_listener(where.host, port, 1, reuse_port=True, listen=False)


class _WorkerStates(Collector):
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily(
            "pgrelay_worker_ready",
            "1 while the worker runs, reports and would answer /readyz with 200",
            labels=["worker"],
        )
        now = trio.current_time()
        for w in self.supervisor.workers:
            ready.add_metric([str(w.number)], 1.0 if w.heard(now) and w.ready else 0.0)
        yield ready


class _Processes(Collector):
    """process_* of the supervisor (no label) and of each worker (label `worker`),
    in one family per metric."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.own = ProcessCollector(registry=None)

    def collect(self) -> Iterator[Metric]:
        families = {m.name: m for m in self.own.collect()}
        for w in self.supervisor.workers:
            if not w.running:
                continue
            for m in ProcessCollector(pid=_constant(w.pid), registry=None).collect():
                family = families.get(m.name)
                if family is None:
                    continue
                family.samples.extend(
                    s._replace(labels={**s.labels, "worker": str(w.number)}) for s in m.samples
                )
        yield from families.values()


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


def supervise(settings: Settings) -> int:
    """`pgrelay serve` with settings.workers > 1; the exit status. Raises
    ConfigError or PortUnavailable (exit 2) as one daemon does."""
    build_verifier(settings)  # bad keys: ConfigError before anything starts
    metrics_dir = tempfile.mkdtemp(prefix="pgrelay-metrics-")
    try:
        supervisor = Supervisor(settings, notify=sdnotify.notify, metrics_dir=metrics_dir)
        return trio.run(supervisor.run)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


# -- the settings, over the socket pair --------------------------------------------------

_LENGTH = struct.Struct("!I")


def _send_settings(sock: socket.socket, settings: Settings) -> None:
    data = pickle.dumps(settings)
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _receive_settings(sock: socket.socket) -> Settings:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError("the supervisor closed the socket pair")
            data += chunk
        return data

    (length,) = _LENGTH.unpack(exactly(_LENGTH.size))
    settings = pickle.loads(exactly(length))  # from our own parent, over a private socket
    if not isinstance(settings, Settings):
        raise TypeError(f"expected Settings, got {type(settings).__name__}")
    return settings


# -- a worker --------------------------------------------------------------------------


class _Reporter:
    """A worker's side of the socket pair: reports to the supervisor, hears it go."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.daemon: Daemon | None = None
        self.gone = trio.Event()

    def report(self) -> None:
        """Send the daemon's state now (never blocks; a report that does not fit
        is dropped: another follows within HEARTBEAT_S)."""
        d = self.daemon
        if d is None:
            return
        # Starting up, the loop that sends this turns: alive. Serving: the tail turns.
        alive = d.alive() if d.serving else True
        state = {"serving": d.serving, "ready": d.ready(), "alive": alive}
        try:
            self.channel.send(
                json.dumps(state).encode() + b"\n", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
            )
        except BlockingIOError:
            pass
        except OSError:
            self.gone.set()

    async def run(self) -> None:
        """Report and copy the Stats into the counters every HEARTBEAT_S."""
        assert self.daemon is not None
        while True:
            self.daemon.metrics.sync_stats()
            self.report()
            await trio.sleep(HEARTBEAT_S)

    async def watch(self) -> None:
        """Returns once the supervisor is gone (EOF on the socket pair)."""
        while not self.gone.is_set():
            await trio.lowlevel.wait_readable(self.channel)
            try:
                data = self.channel.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                break
            if not data:
                break
        self.gone.set()


def worker_main(marker: str) -> int:
    """A worker process (`_PGRELAY_WORKER` set): read the settings from the
    supervisor, serve until told to stop; the exit status. Raises ConfigError or
    PortUnavailable (exit 2) as one daemon does."""
    number_text, fd_text = marker.split(":", 1)
    channel = socket.socket(fileno=int(fd_text))
    settings = _receive_settings(channel)
    logs.configure(settings.log_level, settings.log_format, fields={"worker": int(number_text)})
    reporter = _Reporter(channel)
    daemon = Daemon(settings, notify=lambda _message: reporter.report(), worker=number_text)
    reporter.daemon = daemon
    tune_gc()
    trio.run(_serve_worker, daemon, reporter)
    daemon.metrics.sync_stats()
    return 0


async def _serve_worker(daemon: Daemon, reporter: _Reporter) -> None:
    """Serve until SIGTERM/SIGINT or until the supervisor is gone. Further signals
    are ignored: the supervisor forwards the one systemd or a terminal may also
    have sent here, and kills a worker that takes too long."""
    stop_signals = (signal.SIGTERM, signal.SIGINT)
    for sig in stop_signals:
        signal.signal(sig, signal.SIG_IGN)
    with trio.open_signal_receiver(*stop_signals) as signals:

        async def stop_when() -> None:
            async with trio.open_nursery() as race:

                async def on_signal() -> None:
                    async for signum in signals:
                        log.info("stopping", signal=signal.Signals(signum).name)
                        break
                    race.cancel_scope.cancel()

                async def on_supervisor_gone() -> None:
                    await reporter.watch()
                    log.warning("the supervisor is gone: stopping")
                    race.cancel_scope.cancel()

                race.start_soon(on_signal)
                race.start_soon(on_supervisor_gone)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reporter.run)
            await daemon.run(shutdown_trigger=stop_when)
            reporter.report()
            nursery.cancel_scope.cancel()
