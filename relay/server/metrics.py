"""Prometheus metrics of one daemon, in a registry of its own (no global state:
tests run several daemons in one process).

Counters bumped per frame (events sent, overflows, resyncs, slow closes) are
plain integers in `relay.core.stats.Stats`, read at scrape time by a collector,
so the fan-out never takes a metrics lock.

A worker of `pgrelay serve --workers N` (`Metrics(worker=...)`) writes its
metrics to prometheus-client's multiprocess files instead (the supervisor sets
PROMETHEUS_MULTIPROC_DIR before the worker starts, and serves /metrics from
them: `relay.server.workers`). Nothing is read from a worker at scrape time, so
it copies its `Stats` into counters every `STATS_SYNC_S` (`sync_stats`). Gauges
are summed over the live workers, or kept per worker with a `worker` label
where a sum means nothing (the listener's state).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from relay import __version__
from relay.core.stats import Stats

#: The `_created` series of every counter and histogram is noise for pgrelay's
#: users (process start time is in process_start_time_seconds).
disable_created_metrics()  # type: ignore[no-untyped-call]

# Commit-to-send latency: milliseconds matter, seconds are an incident.
_LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A catch-up: tens of milliseconds for a few thousand events, seconds for a slow reader.
_CATCH_UP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

STATS_SYNC_S = 1.0
"""How often a worker copies its `Stats` into its multiprocess counters."""

REJECT_REASONS = ("origin", "per_ip", "per_user", "capacity", "stopping", "bad_token", "handshake")
"""Why a connection was refused (`pgrelay_connections_rejected_total{reason}`)."""


class _StatsCollector(Collector):
    """Exposes `Stats` as counters."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        s = self.stats
        yield CounterMetricFamily(
            "pgrelay_events_delivered",
            "Event frames handed to client sockets (live and replayed)",
            value=s.events_sent,
        )
        yield CounterMetricFamily(
            "pgrelay_catch_up_events",
            "Replayed event frames handed to sockets",
            value=s.catch_up_events,
        )
        yield CounterMetricFamily(
            "pgrelay_catch_ups", "Resumes that replayed missed events", value=s.catch_ups
        )
        yield CounterMetricFamily(
            "pgrelay_catch_up_rounds",
            "Extra catch-up rounds run to chase the head during long catch-ups",
            value=s.catch_up_rounds,
        )
        yield CounterMetricFamily(
            "pgrelay_outbox_overflows",
            "Slow clients' outboxes that collapsed an org into resync",
            value=s.outbox_overflows,
        )
        yield CounterMetricFamily(
            "pgrelay_slow_client_closes", "Clients closed with 4008 (too slow)", value=s.slow_closes
        )
        resyncs = CounterMetricFamily("pgrelay_resyncs", "resync frames sent", labels=["reason"])
        for reason, count in s.resyncs.items():
            resyncs.add_metric([reason.value], count)
        yield resyncs


class _StatsCounters:
    """`Stats` as multiprocess counters (a worker's): the same names as
    `_StatsCollector`'s, brought up to date by `sync`."""

    _FIELDS = (
        ("events_sent", "pgrelay_events_delivered", "Event frames handed to client sockets"),
        ("catch_up_events", "pgrelay_catch_up_events", "Replayed event frames handed to sockets"),
        ("catch_ups", "pgrelay_catch_ups", "Resumes that replayed missed events"),
        ("catch_up_rounds", "pgrelay_catch_up_rounds", "Extra catch-up rounds run"),
        ("outbox_overflows", "pgrelay_outbox_overflows", "Outboxes collapsed into resync"),
        ("slow_closes", "pgrelay_slow_client_closes", "Clients closed with 4008 (too slow)"),
    )

    def __init__(self, stats: Stats, registry: CollectorRegistry) -> None:
        self.stats = stats
        self.counters = {
            field: Counter(name, help_text, registry=registry)
            for field, name, help_text in self._FIELDS
        }
        resyncs = Counter("pgrelay_resyncs", "resync frames sent", ["reason"], registry=registry)
        self.resyncs = {reason: resyncs.labels(reason=reason.value) for reason in stats.resyncs}
        self.synced: dict[object, int] = {}

    def sync(self) -> None:
        for field, counter in self.counters.items():
            self._add(field, counter, getattr(self.stats, field))
        for reason, counter in self.resyncs.items():
            self._add(reason, counter, self.stats.resyncs[reason])

    def _add(self, key: object, counter: Counter, total: int) -> None:
        delta = total - self.synced.get(key, 0)
        if delta > 0:
            counter.inc(delta)
            self.synced[key] = total


class Metrics:
    def __init__(self, stats: Stats | None = None, *, worker: str | None = None) -> None:
        """`worker`: this daemon is that worker of a supervisor (multiprocess files;
        see the module's docstring); None: a daemon on its own."""
        self.stats = stats or Stats()
        """Per-frame counters, shared with every connection's output."""
        self.worker = worker
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._stats_counters: _StatsCounters | None = None
        if worker is None:
            r.register(_StatsCollector(self.stats))
            ProcessCollector(registry=r)  # resident memory, open fds, CPU, start time
            build = Gauge(
                "pgrelay_build_info", "pgrelay's version (always 1)", ["version"], registry=r
            )
            build.labels(version=__version__).set(1)
        else:  # the supervisor has build_info and every process's process_* metrics
            self._stats_counters = _StatsCounters(self.stats, r)
        self.rejected = Counter(
            "pgrelay_connections_rejected",
            "Connections refused, by reason (origin, per_ip, per_user, capacity, stopping, "
            "bad_token, handshake)",
            ["reason"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        self.catch_up_seconds = Histogram(
            "pgrelay_catch_up_seconds",
            "A resume that replayed missed events: from the subscribe to `subscribed`",
            buckets=_CATCH_UP_BUCKETS_S,
            registry=r,
        )
        self.stats.on_catch_up = self.catch_up_seconds.observe
        self.resumes_from_memory = Counter(
            "pgrelay_subscribes_from_memory",
            "Subscribes whose first read came from the recent rows, without a catch-up query",
            registry=r,
        )
        self.connections = Gauge(
            "pgrelay_connections",
            "Open WebSocket connections",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.worker_connections: Gauge | None = None
        if worker is not None:
            self.worker_connections = Gauge(
                "pgrelay_worker_connections",
                "Open WebSocket connections of one worker",
                ["worker"],
                registry=r,
                multiprocess_mode="livesum",
            ).labels(worker=worker)
            self.worker_connections.set(0)
        self.subscriptions = Gauge(
            "pgrelay_subscriptions", "Subscriptions", registry=r, multiprocess_mode="livesum"
        )
        self.events_read = Counter("pgrelay_events_read", "Rows read by the live tail", registry=r)
        self.commit_to_send = Histogram(
            "pgrelay_commit_to_send_seconds",
            "From the row's created_at (the writing transaction's start) to the send",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tail_query = Histogram(
            "pgrelay_tail_query_seconds", "Duration of one tail step (all pages)", registry=r
        )
        self.listener_reconnects = Counter(
            "pgrelay_listener_reconnects", "Reconnects of the LISTEN connection", registry=r
        )
        self.listener_up = self._per_worker(
            Gauge(
                "pgrelay_listener_up",
                "1 while LISTEN is live",
                self._worker_label,
                registry=r,
                multiprocess_mode="livesum",
            )
        )
        self.listener_healthy = self._per_worker(
            Gauge(
                "pgrelay_listener_healthy",
                "1 while LISTEN is live and its last probe notification came back in time",
                self._worker_label,
                registry=r,
                multiprocess_mode="livesum",
            )
        )
        self.listener_probe_failures = Counter(
            "pgrelay_listener_probe_failures",
            "Probe notifications that did not come back in time (the listener was reconnected)",
            registry=r,
        )
        self.schema_version = Gauge(
            "pgrelay_schema_version",
            "The highest migration applied to the database",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.schema_behind = Gauge(
            "pgrelay_schema_behind",
            "1 when the database's schema is older than this pgrelay: run pgrelay migrate",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.auth_failures = Counter(
            "pgrelay_auth_failures", "Rejected tokens", ["reason"], registry=r
        )
        self.notification_queue_usage = Gauge(
            "pgrelay_notification_queue_usage",
            "pg_notification_queue_usage() (0..1); near 1, NOTIFY starts failing",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.oldest_event_age = Gauge(
            "pgrelay_oldest_event_age_seconds",
            "Age of the oldest retained event: above retention + 1 h, retention has stopped",
            registry=r,
            multiprocess_mode="livemax",
        )

    @property
    def _worker_label(self) -> list[str]:
        return [] if self.worker is None else ["worker"]

    def _per_worker(self, gauge: Gauge) -> Gauge:
        """`gauge` itself, or a worker's child of it (labelled with its number)."""
        return gauge if self.worker is None else gauge.labels(worker=self.worker)

    def set_connections(self, count: int) -> None:
        """Open WebSocket connections of this daemon (or worker)."""
        self.connections.set(count)
        if self.worker_connections is not None:
            self.worker_connections.set(count)

    def sync_stats(self) -> None:
        """A worker's `Stats` into its counters (a daemon on its own: nothing to do,
        its collector reads them when scraped)."""
        if self._stats_counters is not None:
            self._stats_counters.sync()

    def render(self) -> bytes:
        return generate_latest(self.registry)
