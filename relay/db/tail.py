"""The live tail: exact, in commit order, gap-free (docs/architecture.md).

Two tasks:
- the *listener* (`relay.db.listener`) holds the dedicated LISTEN connection,
  rings the doorbell, proves with a probe that it still receives, and heals;
  it rings once more after every reconnect;
- the *tail loop* runs one step whenever the doorbell rings, and at the
  latest every ``poll_interval`` (the fallback timer, or the only trigger in
  poll mode, with the doorbell trigger disabled in SQL).

A step reads, on a pooled connection, the rows visible now (S) but not in
the previous snapshot P, page by page, hands each page to the hub, and only
then moves P to S. A failed step leaves P where it was, so a dropped
connection or a restarted server costs latency, never events. The content
of a notification is ignored: anyone who can connect can NOTIFY.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import psycopg
import structlog
import trio

from relay.core.cursor import Cursor, Snapshot, TailPosition
from relay.core.protocol import EventRow
from relay.db.listener import PROBE_INTERVAL_S, Backoff, Listener
from relay.db.migrate import schema_state
from relay.db.pool import Conn, Database, connect_listener
from relay.db.reads import PAGE_ROWS, TailRead, current_snapshot, database_epoch
from relay.server.metrics import Metrics

#: The database epoch is re-read at least this often (and after every reconnect).
EPOCH_CHECK_INTERVAL_S = 10.0
#: After a failed tail step, wait this long before the next try.
STEP_RETRY_S = 0.5

log = structlog.get_logger("pgrelay.tail")


class Sink(Protocol):
    """Where the tail delivers: the hub."""

    async def deliver(
        self, page: list[EventRow], since_cursor: str, head_cursor: str | None
    ) -> None:
        """A page of rows in id order. `since_cursor` is safe for every row; on the last
        page of a step, `head_cursor` is safe after an organization's last row."""

    def database_changed(self) -> None:
        """The database changed under us (see `Tailer.position`): every
        subscription must resync."""


class Tailer:
    def __init__(
        self,
        db: Database,
        sink: Sink,
        metrics: Metrics,
        *,
        position: TailPosition,
        poll_interval_s: float,
        page_rows: int = PAGE_ROWS,
        probe_interval_s: float = PROBE_INTERVAL_S,
        membership_changed: Callable[[str], None] = lambda _subject: None,
        connect: Callable[[str, str], Conn] = connect_listener,
    ) -> None:
        self.db = db
        self.sink = sink
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.page_rows = page_rows
        self._doorbell = trio.Event()
        self.listener = Listener(
            db.database_url,
            ring=self.ring,
            metrics=metrics,
            membership_changed=membership_changed,
            probe_interval_s=probe_interval_s,
            connect=connect,
        )
        self.position = position
        """Where the tail stands: epoch and the last step's snapshot (shared with the hub)."""
        self._listen_generation = -1
        self._epoch_due = True
        self._epoch_checked_at = 0.0
        self.heartbeat_at = 0.0
        """trio time of the tail loop's last turn (the systemd watchdog checks it)."""

    @property
    def listening(self) -> bool:
        """LISTEN is live and its last probe came back: ready to serve."""
        return self.listener.listening and self.listener.healthy

    def ring(self) -> None:
        self._doorbell.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start order: LISTEN live, then the first snapshot, then `started()`.

        While the database cannot be reached or has no relay schema, both keep
        retrying with backoff and say why once per attempt (`/readyz` stays 503)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.listener.run)
            nursery.start_soon(self._epoch_after_reconnects)
            position = self.position
            backoff = Backoff(initial_s=STEP_RETRY_S)
            while position.snapshot is None:
                try:
                    position.epoch, position.snapshot = await self.db.run(_epoch_and_snapshot)
                except psycopg.Error as exc:
                    wait = backoff.next()
                    log.warning(
                        "cannot take the first snapshot",
                        error=str(exc).strip(),
                        hint=await self._schema_hint(),
                        retry_in_s=round(wait, 2),
                    )
                    await trio.sleep(wait)
            log.info("tail started", snapshot=str(position.snapshot))
            self.heartbeat_at = trio.current_time()
            task_status.started()
            await self._tail_loop()

    async def _epoch_after_reconnects(self) -> None:
        """A reconnect may mean a failover: re-check the epoch on the next step."""
        while True:
            await self.listener.reconnected.wait()
            self._epoch_due = True

    async def _schema_hint(self) -> str | None:
        """Why the daemon's queries fail, when the schema is the reason."""
        try:
            state = await self.db.run(schema_state)
        except psycopg.Error:
            return None
        return state.describe() if state.behind else None

    # -- the tail loop ------------------------------------------------------
    async def _tail_loop(self) -> None:
        while True:
            # Comes round at least once per poll interval, even while steps fail: a
            # stale heartbeat means a stuck step, not a database outage.
            self.heartbeat_at = trio.current_time()
            with trio.move_on_after(self.poll_interval_s):
                await self._doorbell.wait()
            # A new event before reading: a ring during the step means another step.
            self._doorbell = trio.Event()
            try:
                await self.step()
            except psycopg.Error as exc:
                log.warning("tail step failed; will retry", error=str(exc).strip())
                await trio.sleep(STEP_RETRY_S)
                self.ring()

    async def step(self) -> int:
        """Deliver every row committed since the last step; returns how many.

        A typical step is one hop to a worker thread and one pipelined round trip
        (see reads.TailRead). The database epoch is checked on the first step,
        after every listener reconnect, and every EPOCH_CHECK_INTERVAL_S."""
        position = self.position
        since = position.snapshot
        assert since is not None
        started_at = trio.current_time()
        with_epoch = self._epoch_due or started_at - self._epoch_checked_at > EPOCH_CHECK_INTERVAL_S
        read = await self.db.in_thread(self._open_step, since, with_epoch)
        delivered = 0
        try:
            if with_epoch:
                self._epoch_due = False
                self._epoch_checked_at = started_at
            if (with_epoch and read.epoch != position.epoch) or read.snapshot.xmax < since.xmax:
                self._database_changed(read.epoch or position.epoch, read.snapshot)
                return 0
            since_cursor = Cursor(position.epoch, since).encode()
            head_cursor = Cursor(position.epoch, read.snapshot).encode()
            page = read.first_page
            while True:
                if page:
                    delivered += len(page)
                    self.metrics.events_read.inc(len(page))
                    await self.sink.deliver(
                        page, since_cursor, None if not read.done else head_cursor
                    )
                if read.done:
                    break
                page = await self.db.in_thread(read.next_page)
            position.snapshot = read.snapshot
        finally:
            if not read.done:  # cancelled or failed mid-step: end it, give the connection back
                with trio.CancelScope(shield=True):
                    await self.db.in_thread(read.close)
            self.metrics.tail_query.observe(trio.current_time() - started_at)
        return delivered

    def _open_step(self, since: Snapshot, with_epoch: bool) -> TailRead:
        """In a worker thread: take a pooled connection and start a step on it."""
        pool = self.db.pool
        read = TailRead(pool.getconn(), since, page_rows=self.page_rows, release=pool.putconn)
        read.first_page = read.open(with_epoch=with_epoch)
        return read

    def _database_changed(self, epoch: str, snapshot: Snapshot) -> None:
        """Restored, failed over to a diverged replica, or a different database: what
        clients hold no longer describes it. Start over at its current snapshot and
        tell every subscription to resync."""
        log.error(
            "database epoch changed; every subscription resyncs",
            old_epoch=self.position.epoch,
            new_epoch=epoch,
        )
        self.position.epoch = epoch
        self.position.snapshot = snapshot
        self.sink.database_changed()


def _epoch_and_snapshot(conn: Conn) -> tuple[str, Snapshot]:
    return database_epoch(conn), current_snapshot(conn)
