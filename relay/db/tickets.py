"""Single-use tickets for event streams, kept in the database (sql/008): the one
place every daemon behind a load balancer can find a ticket another one made."""

from __future__ import annotations

import psycopg

from relay.db.pool import Conn, Database
from relay.errors import ReadFailed

__all__ = ["Tickets"]


def _create(conn: Conn, ticket: str, token: str, ttl_s: float) -> None:
    conn.execute(
        "SELECT relay.create_stream_ticket(%s, %s, make_interval(secs => %s))",
        (ticket, token, ttl_s),
    )


def _redeem(conn: Conn, ticket: str) -> str | None:
    row = conn.execute("SELECT relay.redeem_stream_ticket(%s)", (ticket,)).fetchone()
    return None if row is None or row[0] is None else str(row[0])


class Tickets:
    """Store a verified token under a ticket; redeem a ticket once for its token.
    Database failures become `ReadFailed`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, ticket: str, token: str, ttl_s: float) -> None:
        try:
            await self.db.run(_create, ticket, token, ttl_s)
        except psycopg.Error as exc:
            raise ReadFailed(str(exc).strip()) from exc

    async def redeem(self, ticket: str) -> str | None:
        """The token of a live, unused ticket (None otherwise); the ticket is spent."""
        try:
            return await self.db.run(_redeem, ticket)
        except psycopg.Error as exc:
            raise ReadFailed(str(exc).strip()) from exc
