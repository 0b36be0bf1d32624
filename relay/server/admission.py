"""Who may connect: every connection count the daemon keeps, in one place.

- total connections (`max_connections`: 503 with Retry-After before the upgrade);
- connections per client address (`max_connections_per_ip`: 429);
- connections per token subject (`max_connections_per_user`: after the first
  `auth`, an `error` rate_limited and close 1013);
- stopping (503 while the daemon shuts down).

The WebSocket server asks `refusal` before answering an upgrade; a connection
then holds its address (`enter`/`leave`) and, once authenticated, its subject
(`admit_user`/`leave_user`) for its whole life.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from relay.server.metrics import Metrics
from relay.ws import WsReject

__all__ = ["Admission", "AdmissionLimits"]

RETRY_AFTER_S = 5
"""What a client refused for capacity is told to wait."""
REFUSAL_LOG_INTERVAL_S = 60.0
"""Each cause of refusing connections is logged at most this often (all are counted)."""
MAX_REFUSAL_CAUSES = 1000
"""Causes remembered for rate limiting (forgotten all at once beyond: bounded memory)."""

log = structlog.get_logger("pgrelay.admission")


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """Connection limits of one daemon."""

    max_connections: int = 10_000
    """WebSocket connections in total."""
    max_connections_per_ip: int = 1_000
    """WebSocket connections per client address."""
    max_connections_per_user: int = 20
    """WebSocket connections per token subject."""


class Admission:
    """Connection counts: total, per address, per subject, and whether stopping;
    and every refusal, counted by reason and logged (rate-limited)."""

    def __init__(
        self,
        limits: AdmissionLimits | None = None,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or AdmissionLimits()
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.stopping = False
        """Set when the daemon starts shutting down: new upgrades get 503."""
        self._per_ip: Counter[str] = Counter()
        self._per_user: dict[str, set[object]] = {}
        self._total = 0
        self._logged_at: dict[tuple[str, str], float] = {}
        self._suppressed: Counter[tuple[str, str]] = Counter()

    def refused(self, reason: str, cause: str = "", **detail: object) -> None:
        """A connection was refused for `reason` (`cause`: the particular problem,
        e.g. which origin, which token check): count it; log the first one of each
        (reason, cause), then at most one per REFUSAL_LOG_INTERVAL_S with how many
        were not logged in between. Never log a token."""
        self.metrics.rejected.labels(reason=reason).inc()
        key = (reason, cause)
        now = self.clock()
        last = self._logged_at.get(key)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL_S:
            self._suppressed[key] += 1
            return
        if len(self._logged_at) > MAX_REFUSAL_CAUSES:
            self._logged_at.clear()
        self._logged_at[key] = now
        log.info(
            "connection refused",
            reason=reason,
            cause=cause or None,
            not_logged_since=self._suppressed.pop(key, 0),
            **detail,
        )

    def refused_upgrade(self, peer: tuple[str, int], reject: WsReject) -> None:
        """`WsServer`'s refusal hook."""
        self.refused(reject.reason, reject.message, peer=peer[0], status=reject.status)

    @property
    def connections(self) -> int:
        """Open connections (those that `enter`ed and did not `leave`)."""
        return self._total

    def refusal(self, address: str) -> WsReject | None:
        """Whether to refuse a connection (or a request) from `address` now (None: let it in)."""
        if self.stopping:
            return WsReject(503, "server shutting down", reason="stopping")
        if self._total >= self.limits.max_connections:
            return WsReject(
                503,
                "too many connections",
                (("retry-after", str(RETRY_AFTER_S)),),
                reason="capacity",
            )
        if self._per_ip[address] >= self.limits.max_connections_per_ip:
            return WsReject(429, "too many connections from this address", reason="per_ip")
        return None

    def enter(self, address: str) -> None:
        """A connection from `address` opened."""
        self._total += 1
        self._per_ip[address] += 1

    def leave(self, address: str) -> None:
        """A connection from `address` ended."""
        self._total -= 1
        self._per_ip[address] -= 1
        if self._per_ip[address] <= 0:
            del self._per_ip[address]

    def admit_user(self, subject: str, connection: object) -> bool:
        """`connection` authenticated as `subject`: count it, unless that subject
        already holds `max_connections_per_user`."""
        held = self._per_user.setdefault(subject, set())
        if len(held) >= self.limits.max_connections_per_user:
            if not held:
                del self._per_user[subject]
            return False
        held.add(connection)
        return True

    def leave_user(self, subject: str, connection: object) -> None:
        """A connection counted by `admit_user` ended."""
        held = self._per_user.get(subject)
        if held is not None:
            held.discard(connection)
            if not held:
                del self._per_user[subject]

    def connections_of(self, subject: str) -> set[object]:
        """The open connections authenticated as `subject` (a copy)."""
        return set(self._per_user.get(subject, ()))
