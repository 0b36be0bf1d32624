"""Membership hints: `relay.notify_membership_changed(subject)` makes every daemon
recheck that subject's subscriptions in SQL within about a second.

A hint is only a hint (anyone who can connect can NOTIFY on any channel): it
never grants or revokes anything by itself, it only moves a recheck earlier.
Each subject is rechecked at most once per `MIN_INTERVAL_S`; hints that come
faster are folded into one recheck at the end of the interval; hints for a
subject with no connection here cost a dictionary lookup. A flood of forged
hints therefore costs at most a few rechecks per second per connected subject.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import trio

__all__ = ["MIN_INTERVAL_S", "MembershipHints"]

MIN_INTERVAL_S = 0.25
"""At most one recheck per subject this often."""
MAX_SUBJECT_CHARS = 256
"""Longer payloads are not a subject (relay.notify_membership_changed refuses them)."""


class Rechecked(Protocol):
    def recheck_now(self) -> None:
        """Recheck every subscription of this connection in SQL now."""


class MembershipHints:
    """Throttled rechecks by subject (see the module docstring)."""

    def __init__(
        self,
        connections_of: Callable[[str], Iterable[Any]],
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.connections_of = connections_of
        self.clock = clock
        self._last: dict[str, float] = {}
        self._waiting: set[str] = set()
        self._wake = trio.Event()

    def hint(self, subject: str) -> None:
        """A notification named `subject` (from the listener)."""
        if len(subject) > MAX_SUBJECT_CHARS:
            return
        connections: list[Rechecked] = list(self.connections_of(subject))
        if not connections:
            return
        now = self.clock()
        if now - self._last.get(subject, -math.inf) >= MIN_INTERVAL_S:
            self._recheck(subject, connections, now)
        elif subject not in self._waiting:
            self._waiting.add(subject)
            self._wake.set()

    def _recheck(self, subject: str, connections: list[Rechecked], now: float) -> None:
        self._last[subject] = now
        for connection in connections:
            connection.recheck_now()
        if len(self._last) > 10_000:  # bounded: forget those not seen lately
            self._last = {s: t for s, t in self._last.items() if now - t < MIN_INTERVAL_S}

    async def run(self) -> None:
        """Serve the folded hints at the end of their interval; until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._waiting:
                now = self.clock()
                due = min(self._last.get(s, -math.inf) + MIN_INTERVAL_S for s in self._waiting)
                if due > now:
                    await trio.sleep(due - now)
                    continue
                now = self.clock()
                for subject in [s for s in self._waiting if now - self._last[s] >= MIN_INTERVAL_S]:
                    self._waiting.discard(subject)
                    self._recheck(subject, list(self.connections_of(subject)), now)
