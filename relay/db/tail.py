"""The live tail: exact, in commit order, gap-free (DESIGN.md, "The tail").

Two tasks:
- the *listener* holds the dedicated LISTEN connection, waits on its socket
  with ``trio.lowlevel.wait_readable``, drains every pending notification and
  rings the doorbell; when the connection drops it reconnects with
  exponential backoff and jitter, and rings once more after every reconnect;
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

import random
from collections.abc import Callable
from typing import Protocol

import psycopg
import structlog
import trio

from relay.core.cursor import Cursor, Snapshot, TailPosition
from relay.core.protocol import EventRow
from relay.db.pool import Conn, Database, connect_listener
from relay.db.reads import PAGE_ROWS, TailRead, current_snapshot, database_epoch
from relay.server.metrics import Metrics

CHANNEL = "relay_events"
#: Listener reconnect backoff: first wait, cap, and the random share added.
RECONNECT_INITIAL_S = 0.1
RECONNECT_MAX_S = 10.0
RECONNECT_JITTER = 0.5
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


class Backoff:
    """Exponential backoff with jitter; `reset` after a success."""

    def __init__(
        self,
        initial_s: float = RECONNECT_INITIAL_S,
        max_s: float = RECONNECT_MAX_S,
        rng: random.Random | None = None,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.current_s = initial_s
        self.rng = rng or random.Random()

    def next(self) -> float:
        wait = self.current_s * (1 + RECONNECT_JITTER * self.rng.random())
        self.current_s = min(self.current_s * 2, self.max_s)
        return min(wait, self.max_s)

    def reset(self) -> None:
        self.current_s = self.initial_s


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
        connect: Callable[[str, str], Conn] = connect_listener,
    ) -> None:
        self.db = db
        self.sink = sink
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.page_rows = page_rows
        self._connect = connect
        self._doorbell = trio.Event()
        self.listening = False
        self.position = position
        """Where the tail stands: epoch and the last step's snapshot (shared with the hub)."""
        self._listener_conn: Conn | None = None
        self._epoch_due = True
        self._epoch_checked_at = 0.0
        self.heartbeat_at = 0.0
        """trio time of the tail loop's last turn (the systemd watchdog checks it)."""

    def ring(self) -> None:
        self._doorbell.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start order: LISTEN live, then the first snapshot, then `started()`."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._listen)
            position = self.position
            while position.snapshot is None:
                try:
                    position.epoch, position.snapshot = await self.db.run(_epoch_and_snapshot)
                except psycopg.Error as exc:
                    log.warning("first snapshot failed; retrying", error=str(exc))
                    await trio.sleep(STEP_RETRY_S)
            log.info("tail started", snapshot=str(position.snapshot))
            self.heartbeat_at = trio.current_time()
            task_status.started()
            await self._tail_loop()

    # -- the listener -------------------------------------------------------
    async def _listen(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        backoff = Backoff()
        started = False
        while True:
            try:
                conn = await trio.to_thread.run_sync(
                    self._connect, self.db.database_url, CHANNEL, abandon_on_cancel=True
                )
            except psycopg.Error as exc:
                wait = backoff.next()
                log.warning("listener cannot connect", error=str(exc).strip(), retry_in_s=wait)
                await trio.sleep(wait)
                continue
            backoff.reset()
            self._epoch_due = True  # a reconnect may mean a failover: re-check the epoch
            self._listener_conn = conn
            self.listening = True
            self.metrics.listener_up.set(1)
            if started:
                self.metrics.listener_reconnects.inc()
                log.info("listener reconnected")
            self.ring()  # a full re-read from the last snapshot after every (re)connect
            if not started:
                started = True
                task_status.started()
            try:
                await self._wait_for_notifications(conn)
            except psycopg.Error as exc:
                log.warning("listener connection lost", error=str(exc).strip())
            finally:
                self.listening = False
                self._listener_conn = None
                self.metrics.listener_up.set(0)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(conn.close)
            await trio.sleep(backoff.next())

    async def _wait_for_notifications(self, conn: Conn) -> None:
        while True:
            await trio.lowlevel.wait_readable(conn.fileno())
            # Drain everything pending without blocking; raises when the
            # connection is gone (the socket is readable at EOF too).
            rang = sum(1 for _ in conn.notifies(timeout=0))
            if conn.closed or conn.broken:
                raise psycopg.OperationalError("listener connection closed")
            if rang:
                self.ring()

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
