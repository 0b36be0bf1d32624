"""The soak's writers: what backends do to relay.events, as the BACKEND role.

Kinds (payload ``k``), each a task with a connection of its own:
- ``s`` single-row commits through relay.emit at a steady rate (the latency
  sample: payload ``t`` is the writer's clock just before the INSERT, ``d``
  whether the doorbell trigger was on);
- ``b`` 100-row transactions;
- ``l`` late commits: a few rows, then the transaction stays open 2-5 s, so
  their ids are lower than rows committed meanwhile;
- ``r`` rollbacks: rows inserted, then ROLLBACK (they must never be delivered);
- ``d`` dedupe: a row with a fresh dedupe_key, then relay.emit again with the
  same key in the same transaction and, later, in another one: both return
  NULL and create no row.

Every entity_id is unique, so no two events share a coalescing key: a
coalesced frame would stand for ids the oracle could not see. Every loop is
bounded by the run's deadline; a failed connection (server restart) is
reopened with a short backoff. Whether a commit that failed mid-way happened
does not matter: the oracle is the table.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import trio

#: Makes each event about 1.5 KB, so that a client that stops reading fills
#: the server's buffers within seconds (the payload limit is 2048 bytes).
PAD = "x" * 1200
CONNECT_TIMEOUT_S = 3
RECONNECT_S = (0.2, 0.6)
EMIT_SQL = "SELECT relay.emit(%s, %s, %s, %s, %s::jsonb, %s)"

_T = TypeVar("_T")


class Writer:
    def __init__(
        self,
        dsn: str,
        orgs: list[str],
        weights: list[int],
        rng: random.Random,
        *,
        single_rate: float = 50.0,
        batch_every_s: float = 5.0,
        late_writers: int = 2,
        rollback_every_s: float = 1.0,
        dedupe_every_s: float = 2.0,
    ) -> None:
        self.dsn = dsn
        self.orgs = orgs
        self.weights = weights
        self.rng = rng
        self.single_rate = single_rate
        self.batch_every_s = batch_every_s
        self.late_writers = late_writers
        self.rollback_every_s = rollback_every_s
        self.dedupe_every_s = dedupe_every_s
        self.doorbell = 1
        """1 while the doorbell trigger is on (the fault task flips it)."""
        self.counts: Counter[str] = Counter()
        self._seq = 0
        self._used_keys: list[tuple[str, str]] = []
        self._long_open = 0
        self._no_long_open = trio.Event()
        self._no_long_open.set()
        self._long_allowed = trio.Event()
        self._long_allowed.set()

    @contextlib.asynccontextmanager
    async def no_long_transactions(self, wait_s: float = 10.0) -> AsyncIterator[None]:
        """No late or rollback transaction is open inside (bounded wait for those open)."""
        self._long_allowed = trio.Event()
        try:
            with trio.move_on_after(wait_s):
                await self._no_long_open.wait()
            yield
        finally:
            self._long_allowed.set()

    @contextlib.asynccontextmanager
    async def _long_transaction(self) -> AsyncIterator[None]:
        await self._long_allowed.wait()
        if self._long_open == 0:
            self._no_long_open = trio.Event()
        self._long_open += 1
        try:
            yield
        finally:
            self._long_open -= 1
            if self._long_open == 0:
                self._no_long_open.set()

    def _org(self) -> str:
        return self.rng.choices(self.orgs, self.weights)[0]

    def _entity(self, kind: str) -> str:
        self._seq += 1
        return f"{kind}{self._seq}"

    async def run(self, seconds: float) -> None:
        deadline = trio.current_time() + seconds
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._loop, deadline, 1.0 / self.single_rate, self._single)
            nursery.start_soon(self._loop, deadline, self.batch_every_s, self._batch)
            nursery.start_soon(self._loop, deadline, self.rollback_every_s, self._rollback)
            nursery.start_soon(self._loop, deadline, self.dedupe_every_s, self._dedupe)
            for _ in range(self.late_writers):
                nursery.start_soon(self._loop, deadline, 0.5, self._late)

    async def _loop(
        self,
        deadline: float,
        interval: float,
        step: Callable[[Any], Awaitable[None]],
    ) -> None:
        conn: psycopg.Connection[Any] | None = None
        next_at = trio.current_time()
        try:
            while trio.current_time() < deadline:
                if conn is None or conn.closed or conn.broken:
                    try:
                        conn = await trio.to_thread.run_sync(self._connect)
                    except psycopg.Error:
                        self.counts["connect_failed"] += 1
                        await trio.sleep(self.rng.uniform(*RECONNECT_S))
                        continue
                c = conn

                async def in_thread(fn: Callable[[psycopg.Connection[Any]], _T], c: Any = c) -> _T:
                    return await trio.to_thread.run_sync(fn, c)

                try:
                    await step(in_thread)
                except psycopg.Error as exc:
                    self.counts["failed_" + type(exc).__name__] += 1
                    await trio.to_thread.run_sync(conn.close)
                    conn = None
                    await trio.sleep(self.rng.uniform(*RECONNECT_S))
                next_at = max(next_at + interval, trio.current_time())
                await trio.sleep_until(min(next_at, deadline))
        finally:
            if conn is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(conn.close)

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)

    # -- the kinds --------------------------------------------------------------------
    async def _single(self, run: Any) -> None:
        org, entity, doorbell = self._org(), self._entity("s"), self.doorbell

        def emit(conn: psycopg.Connection[Any]) -> Any:
            t = time.time()
            payload = json.dumps({"k": "s", "t": t, "d": doorbell, "pad": PAD})
            return conn.execute(
                EMIT_SQL, (org, "job.updated", "job", entity, payload, None)
            ).fetchone()

        self.counts["s_attempted"] += 1
        await run(emit)
        self.counts["s_committed"] += 1

    async def _batch(self, run: Any) -> None:
        org, entity = self._org(), self._entity("b")

        def emit(conn: psycopg.Connection[Any]) -> None:
            payload = json.dumps({"k": "b", "t": time.time(), "pad": PAD})
            with conn.transaction():
                conn.execute(
                    "SELECT relay.emit(%s, 'job.created', 'job', %s || '.' || g, %s::jsonb) "
                    "FROM generate_series(1, 100) AS g",
                    (org, entity, payload),
                )

        self.counts["b_attempted"] += 1
        await run(emit)
        self.counts["b_committed"] += 1

    async def _late(self, run: Any) -> None:
        rows = [(self._org(), self._entity("l")) for _ in range(self.rng.randint(1, 3))]
        hold = self.rng.uniform(2.0, 5.0)

        def begin(conn: psycopg.Connection[Any]) -> None:
            conn.execute("BEGIN")
            for org, entity in rows:
                payload = json.dumps({"k": "l", "t": time.time(), "pad": PAD})
                conn.execute(EMIT_SQL, (org, "job.updated", "job", entity, payload, None))

        def end(conn: psycopg.Connection[Any]) -> None:
            conn.execute("COMMIT")

        async with self._long_transaction():
            self.counts["l_attempted"] += 1
            try:
                await run(begin)
                await trio.sleep(hold)
            finally:
                with trio.CancelScope(shield=True):
                    await run(end)  # COMMIT, also when the run ends meanwhile
            self.counts["l_committed"] += 1

    async def _rollback(self, run: Any) -> None:
        org, entity, n = self._org(), self._entity("r"), self.rng.randint(1, 10)
        hold = self.rng.uniform(0.0, 1.5)

        def begin(conn: psycopg.Connection[Any]) -> None:
            conn.execute("BEGIN")
            payload = json.dumps({"k": "r", "t": time.time()})
            conn.execute(
                "SELECT relay.emit(%s, 'job.updated', 'job', %s || '.' || g, %s::jsonb) "
                "FROM generate_series(1, %s) AS g",
                (org, entity, payload, n),
            )

        def end(conn: psycopg.Connection[Any]) -> None:
            conn.execute("ROLLBACK")

        async with self._long_transaction():
            try:
                await run(begin)
                await trio.sleep(hold)
            finally:
                with trio.CancelScope(shield=True):
                    await run(end)
            self.counts["r_rolled_back"] += 1

    async def _dedupe(self, run: Any) -> None:
        org, entity = self._org(), self._entity("d")
        key = f"key-{entity}"
        old = self.rng.choice(self._used_keys) if self._used_keys else None

        def emit(conn: psycopg.Connection[Any]) -> tuple[Any, Any, Any]:
            payload = json.dumps({"k": "d", "t": time.time(), "pad": PAD})
            with conn.transaction():
                first = conn.execute(
                    EMIT_SQL, (org, "job.updated", "job", entity, payload, key)
                ).fetchone()
                again = conn.execute(
                    EMIT_SQL, (org, "job.updated", "job", entity + "-again", payload, key)
                ).fetchone()
            older = None
            if old is not None:
                older = conn.execute(
                    EMIT_SQL, (old[0], "job.updated", "job", entity + "-old", payload, old[1])
                ).fetchone()
            return first, again, older

        first, again, older = await run(emit)
        self._used_keys.append((org, key))
        self.counts["d_committed"] += 1
        for answer in (again, older):
            if answer is None:
                continue
            if answer[0] is None:
                self.counts["d_repeat_null"] += 1
            else:
                self.counts["d_repeat_made_a_row"] += 1  # relay.emit broke its contract
        if first is None or first[0] is None:
            self.counts["d_first_null"] += 1
