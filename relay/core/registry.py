"""Subscription registry: which connections follow which org, for fan-out.

`Registry[K]` is keyed by whatever the shell uses to name a connection (an id
or the connection object itself). `subscribers(org)` returns a cached tuple,
so the fan-out loop costs one dict lookup per event and may add or remove
subscriptions (e.g. close a slow client) while iterating.
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from relay.core.coalesce import Coalescer

__all__ = ["MATCH_CACHE_ENTRIES", "Registry", "Subscription", "glob_matches"]

K = TypeVar("K", bound=Hashable)


MATCH_CACHE_ENTRIES = 256
"""Event types whose filter verdict one subscription remembers."""


def glob_matches(glob: tuple[str, ...], segments: list[str]) -> bool:
    """Whether a glob (split on dots) matches an event type (split on dots).

    A `*` segment stands for one or more segments. Runs in O(len(glob) *
    len(segments)) whatever the input: a client's globs cannot make the
    fan-out loop backtrack.
    """
    n = len(segments)
    reachable = {0}
    for part in glob:
        if part == "*":
            reachable = set(range(min(reachable) + 1, n + 1))
        else:
            reachable = {p + 1 for p in reachable if p < n and segments[p] == part}
        if not reachable:
            return False
    return n in reachable


@dataclass(frozen=True, slots=True, eq=False)
class Subscription:
    """One connection's live subscription to one org."""

    ref: str
    """The `ref` of the subscribe that created it (echoed in server unsubscribes)."""
    event_types: tuple[str, ...] | None = None
    """Event-type globs; None delivers every type."""
    coalesce_ms: int | None = None
    """Coalescing window; None or 0 delivers each event as it comes."""
    coalescer: Coalescer | None = field(init=False, repr=False)
    """Per-subscription coalescing state, present when `coalesce_ms` > 0."""
    _globs: tuple[tuple[str, ...], ...] | None = field(init=False, repr=False)
    _verdicts: dict[str, bool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        types = self.event_types
        globs = None if types is None or "*" in types else tuple(tuple(g.split(".")) for g in types)
        object.__setattr__(self, "_globs", globs)
        object.__setattr__(self, "_verdicts", {})
        window = Coalescer(self.coalesce_ms / 1000) if self.coalesce_ms else None
        object.__setattr__(self, "coalescer", window)

    @property
    def filtered(self) -> bool:
        """Whether only some event types are delivered."""
        return self._globs is not None

    def matches(self, event_type: str) -> bool:
        """Whether an event of `event_type` is delivered on this subscription."""
        globs = self._globs
        if globs is None:
            return True
        verdict = self._verdicts.get(event_type)
        if verdict is None:
            segments = event_type.split(".")
            verdict = any(glob_matches(glob, segments) for glob in globs)
            if len(self._verdicts) >= MATCH_CACHE_ENTRIES:
                self._verdicts.clear()
            self._verdicts[event_type] = verdict
        return verdict


class Registry(Generic[K]):
    """org -> {connection: Subscription}, plus the reverse index."""

    __slots__ = ("_by_conn", "_by_org", "_count", "_fanout")

    def __init__(self) -> None:
        self._by_org: dict[uuid.UUID, dict[K, Subscription]] = {}
        self._by_conn: dict[K, dict[uuid.UUID, Subscription]] = {}
        self._fanout: dict[uuid.UUID, tuple[tuple[K, Subscription], ...]] = {}
        self._count = 0

    def add(self, conn: K, org: uuid.UUID, subscription: Subscription) -> Subscription | None:
        """Register; replaces and returns the connection's previous one for `org`."""
        previous = self._by_org.setdefault(org, {}).get(conn)
        self._by_org[org][conn] = subscription
        self._by_conn.setdefault(conn, {})[org] = subscription
        self._fanout.pop(org, None)
        if previous is None:
            self._count += 1
        return previous

    def remove(self, conn: K, org: uuid.UUID) -> Subscription | None:
        """Unregister one subscription; returns it, or None if absent."""
        subs = self._by_conn.get(conn)
        if subs is None or org not in subs:
            return None
        removed = subs.pop(org)
        if not subs:
            del self._by_conn[conn]
        self._discard(org, conn)
        return removed

    def remove_connection(self, conn: K) -> dict[uuid.UUID, Subscription]:
        """Unregister everything of one connection; returns what was removed."""
        subs = self._by_conn.pop(conn, {})
        for org in subs:
            self._discard(org, conn)
        return subs

    def _discard(self, org: uuid.UUID, conn: K) -> None:
        members = self._by_org[org]
        del members[conn]
        if not members:
            del self._by_org[org]
        self._fanout.pop(org, None)
        self._count -= 1

    def subscribers(self, org: uuid.UUID) -> tuple[tuple[K, Subscription], ...]:
        """(connection, subscription) pairs for `org`; a snapshot, safe to mutate under."""
        cached = self._fanout.get(org)
        if cached is None:
            members = self._by_org.get(org)
            if members is None:
                return ()
            cached = self._fanout[org] = tuple(members.items())
        return cached

    def get(self, conn: K, org: uuid.UUID) -> Subscription | None:
        """The connection's subscription to `org`, if any."""
        subs = self._by_conn.get(conn)
        return None if subs is None else subs.get(org)

    def subscriptions_of(self, conn: K) -> dict[uuid.UUID, Subscription]:
        """A copy of one connection's subscriptions by org."""
        return dict(self._by_conn.get(conn, {}))

    def __len__(self) -> int:
        """Total subscriptions."""
        return self._count

    def __contains__(self, org: object) -> bool:
        """Whether any connection follows `org`."""
        return org in self._by_org

    @property
    def org_count(self) -> int:
        """Orgs with at least one subscriber."""
        return len(self._by_org)

    @property
    def connection_count(self) -> int:
        """Connections with at least one subscription."""
        return len(self._by_conn)

    def orgs(self) -> list[uuid.UUID]:
        """Orgs with at least one subscriber."""
        return list(self._by_org)
