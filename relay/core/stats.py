"""Counters the connections of one daemon share, kept as plain integers.

The fan-out and catch-up paths bump these for every frame; a Prometheus
counter per frame would cost a lock each time. The metrics module reads them
when scraped (a custom collector), so they cost nothing in between.
"""

from __future__ import annotations

from collections.abc import Callable

from relay.core.codes import ResyncReason

__all__ = ["Stats"]


class Stats:
    """Totals since the daemon started; only ever increased."""

    __slots__ = (
        "catch_up_events",
        "catch_up_rounds",
        "catch_ups",
        "events_sent",
        "on_catch_up",
        "outbox_overflows",
        "resyncs",
        "slow_closes",
    )

    def __init__(self) -> None:
        self.events_sent = 0
        """Event frames handed to a client's socket (live and replayed)."""
        self.catch_up_events = 0
        """Replayed event frames handed to a socket."""
        self.catch_ups = 0
        """Catch-ups completed (a `subscribed` sent after a replay)."""
        self.catch_up_rounds = 0
        """Extra catch-up rounds run to chase the head during a long catch-up."""
        self.outbox_overflows = 0
        """Times a slow client's outbox collapsed an org into `resync`."""
        self.slow_closes = 0
        """Clients closed with 4008."""
        self.resyncs: dict[ResyncReason, int] = dict.fromkeys(ResyncReason, 0)
        """`resync` frames sent, by reason."""
        self.on_catch_up: Callable[[float], object] = lambda _seconds: None
        """Told how long each completed catch-up took (subscribe to `subscribed`)."""
