"""Prometheus metrics of one daemon, in a registry of its own (no global state:
tests run several daemons in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Commit-to-send latency: milliseconds matter, seconds are an incident.
_LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge("pgrelay_connections", "Open WebSocket connections", registry=r)
        self.subscriptions = Gauge("pgrelay_subscriptions", "Live subscriptions", registry=r)
        self.events_delivered = Counter(
            "pgrelay_events_delivered", "Event frames handed to client sockets", registry=r
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
        self.listener_up = Gauge("pgrelay_listener_up", "1 while LISTEN is live", registry=r)
        self.outbox_overflows = Counter(
            "pgrelay_outbox_overflows", "Client outboxes that overflowed", registry=r
        )
        self.resyncs = Counter("pgrelay_resyncs", "resync frames sent", ["reason"], registry=r)
        self.slow_closes = Counter(
            "pgrelay_slow_client_closes", "Clients closed with 4008 (too slow)", registry=r
        )
        self.auth_failures = Counter(
            "pgrelay_auth_failures", "Rejected tokens", ["reason"], registry=r
        )
        self.notification_queue_usage = Gauge(
            "pgrelay_notification_queue_usage",
            "pg_notification_queue_usage() (0..1); near 1, NOTIFY starts failing",
            registry=r,
        )
        self.oldest_event_age = Gauge(
            "pgrelay_oldest_event_age_seconds",
            "Age of the oldest retained event: above retention + 1 h, retention has stopped",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
