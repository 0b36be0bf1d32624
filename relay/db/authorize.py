"""Authorization in batches: "may these claims read this org?" for many
subscribes at once, on a connection of its own.

A reconnect storm brings thousands of subscribes within a second. Asked one
by one on the pool, each costs a worker-thread hop and a round trip, and
they queue for the pool's few connections. Here every question asked while a
batch runs waits for the next batch; a batch is one simple-query string on
the authorizer's direct connection (`relay.db.direct`): one round trip, as
the subscriber role, each question under its own claims (and, as the
daemon, each org's retention horizon, which a resume must respect too):

    BEGIN READ ONLY;
    SELECT o, relay.retention_horizon(o)::text FROM unnest('{<orgs>}'::uuid[]) AS o;
    SET LOCAL ROLE relay_subscriber;
    SELECT set_config('request.jwt.claims', <claims 1>, true);
    SELECT '<org 1>'::uuid IN (SELECT relay.user_organizations());
    ... ; ROLLBACK

The same (claims, org) asked twice while waiting is asked once. A batch that
fails (say, one client's claims make the DBA's function raise) is split in
halves and retried, so a bad question fails alone; one that met a broken
connection is asked once more on a new one.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import psycopg
import structlog
import trio

from relay.db.direct import DirectConnection, quote_text
from relay.db.pool import Conn
from relay.errors import ReadFailed

__all__ = ["MAX_BATCH", "Answer", "Authorizer"]

log = structlog.get_logger("pgrelay.authorize")

#: Most questions in one batch (one query string of at most a few hundred KB).
MAX_BATCH = 500

_Key = tuple[str, uuid.UUID]


class Answer:
    __slots__ = ("allowed", "horizon")

    def __init__(self, allowed: bool, horizon: int | None) -> None:
        self.allowed = allowed
        """`org` is among `relay.user_organizations()` under the claims."""
        self.horizon = horizon
        """`relay.retention_horizon(org)`: the newest xid retention deleted, or None."""


class _Ask:
    __slots__ = ("answer", "done", "error", "transient")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer = Answer(False, None)
        self.error: str | None = None
        self.transient = False


class Authorizer:
    """Answers `ask(claims_json, org)` in batches; `run` does the work."""

    def __init__(self, connect: Callable[[], Conn], role: str) -> None:
        self.connection = DirectConnection(connect)
        self._set_role = 'SET LOCAL ROLE "' + role.replace('"', '""') + '"'
        self._waiting: dict[_Key, _Ask] = {}
        self._asking: list[tuple[_Key, _Ask]] = []
        """The batch in flight."""
        self._wake = trio.Event()
        self.batches = 0
        """Batches run (for tests and the bench)."""
        self.asked = 0
        """Questions answered by SQL (after the merging of equal ones)."""

    async def ask(self, claims_json: str, org: uuid.UUID) -> Answer:
        """Whether `org` is among `relay.user_organizations()` under `claims_json`,
        and its retention horizon. Raises ReadFailed when the database did not
        answer."""
        key = (claims_json, org)
        ask = self._waiting.get(key)
        if ask is None:
            ask = self._waiting[key] = _Ask()
            self._wake.set()
        await ask.done.wait()
        if ask.error is not None:
            raise ReadFailed(ask.error, transient=ask.transient)
        return ask.answer

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer what is asked, a batch at a time, until cancelled."""
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._waiting:
                    self._asking = self._take()
                    await self._answer(self._asking)
                    self._asking = []
        finally:
            self.connection.close()
            for _, ask in [*self._asking, *self._waiting.items()]:
                if not ask.done.is_set():
                    ask.error = "the daemon is stopping"
                    ask.done.set()

    def _take(self) -> list[tuple[_Key, _Ask]]:
        waiting = self._waiting
        if len(waiting) <= MAX_BATCH:
            batch = list(waiting.items())
            waiting.clear()
            return batch
        batch = []
        for key in list(waiting)[:MAX_BATCH]:
            batch.append((key, waiting.pop(key)))
        return batch

    async def _answer(self, batch: list[tuple[_Key, _Ask]], *, retry: bool = True) -> None:
        try:
            answers = await self._query([key for key, _ in batch])
        except psycopg.Error as exc:
            if retry and not self.connection.connected:
                # The connection broke (a restart, a failover): once more on a new one.
                await self._answer(batch, retry=False)
                return
            if len(batch) > 1 and self.connection.connected:
                half = len(batch) // 2
                await self._answer(batch[:half])
                await self._answer(batch[half:])
                return
            error = str(exc).strip()
            # Still without a connection after a new one was tried: the server is
            # away (restarting), and asking again in a moment may succeed.
            transient = not self.connection.connected
            log.warning("authorization failed", error=error, questions=len(batch))
            for _, ask in batch:
                ask.error = error
                ask.transient = transient
                ask.done.set()
            return
        for (_, ask), answer in zip(batch, answers, strict=True):
            ask.answer = answer
            ask.done.set()

    async def _query(self, keys: list[_Key]) -> list[Answer]:
        orgs = sorted({str(org) for _, org in keys})
        parts = [
            "BEGIN READ ONLY",
            "SELECT o::text, relay.retention_horizon(o)::text "
            f"FROM unnest('{{{','.join(orgs)}}}'::uuid[]) AS o",
            self._set_role,
        ]
        for claims_json, org in keys:
            claims = quote_text(claims_json)
            parts.append(f"SELECT set_config('request.jwt.claims', {claims}, true)")
            parts.append(f"SELECT '{org}'::uuid IN (SELECT relay.user_organizations())")
        text = "; ".join(parts).encode()
        connection = self.connection
        try:
            results = await connection.query(text)
        except psycopg.Error:
            if connection.connected:
                await connection.query(b"ROLLBACK")
            raise
        await connection.send_without_waiting(b"ROLLBACK")
        self.batches += 1
        self.asked += len(keys)
        # BEGIN, the horizons, SET; then a (set_config, check) pair per key.
        found = results[1]
        horizons: dict[str, int | None] = {}
        for i in range(found.ntuples):
            horizon = found.get_value(i, 1)
            horizons[(found.get_value(i, 0) or b"").decode()] = (
                None if horizon is None else int(horizon)
            )
        checks = results[4::2]
        if len(checks) != len(keys):
            raise psycopg.DatabaseError(f"expected {len(keys)} answers, got {len(checks)}")
        return [
            Answer(check.get_value(0, 0) == b"t", horizons.get(str(org)))
            for check, (_, org) in zip(checks, keys, strict=True)
        ]
