"""The fan-out index: which connections follow which org.

A plain index, nothing more: `Registry[K, V]` maps org -> {connection: value}
(the shell stores each connection's `Subscription` as the value) and keeps
the reverse index so that a closing connection is removed in one call.
`subscribers(org)` returns a cached tuple, so the fan-out loop costs one dict
lookup per event and may add or remove entries (e.g. close a slow client)
while iterating over it.
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Registry"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Registry(Generic[K, V]):
    """org -> {connection: value}, plus the reverse index."""

    __slots__ = ("_by_conn", "_by_org", "_count", "_fanout")

    def __init__(self) -> None:
        self._by_org: dict[uuid.UUID, dict[K, V]] = {}
        self._by_conn: dict[K, set[uuid.UUID]] = {}
        self._fanout: dict[uuid.UUID, tuple[tuple[K, V], ...]] = {}
        self._count = 0

    def add(self, conn: K, org: uuid.UUID, value: V) -> None:
        """Index `conn` for `org`, replacing its previous entry for `org`."""
        members = self._by_org.setdefault(org, {})
        if conn not in members:
            self._count += 1
        members[conn] = value
        self._by_conn.setdefault(conn, set()).add(org)
        self._fanout.pop(org, None)

    def remove(self, conn: K, org: uuid.UUID) -> bool:
        """Drop `conn`'s entry for `org`; whether there was one."""
        orgs = self._by_conn.get(conn)
        if orgs is None or org not in orgs:
            return False
        orgs.discard(org)
        if not orgs:
            del self._by_conn[conn]
        self._discard(org, conn)
        return True

    def remove_connection(self, conn: K) -> int:
        """Drop every entry of `conn`; how many there were."""
        orgs = self._by_conn.pop(conn, set())
        for org in orgs:
            self._discard(org, conn)
        return len(orgs)

    def _discard(self, org: uuid.UUID, conn: K) -> None:
        members = self._by_org[org]
        del members[conn]
        if not members:
            del self._by_org[org]
        self._fanout.pop(org, None)
        self._count -= 1

    def subscribers(self, org: uuid.UUID) -> tuple[tuple[K, V], ...]:
        """(connection, value) pairs for `org`; a snapshot, safe to mutate under."""
        cached = self._fanout.get(org)
        if cached is None:
            members = self._by_org.get(org)
            if members is None:
                return ()
            cached = self._fanout[org] = tuple(members.items())
        return cached

    def followers(self) -> list[K]:
        """Every connection with at least one entry."""
        return list(self._by_conn)

    def __len__(self) -> int:
        """Entries in all (live subscriptions)."""
        return self._count
