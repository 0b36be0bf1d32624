"""The LISTEN connection: the doorbell, and a probe that proves it still rings.

One dedicated connection, driven from trio without worker threads once it is
set up: libpq in non-blocking mode, `trio.lowlevel.wait_readable` on its
socket, then `consume_input` and the pending notifications. Any notification
on `relay_events` rings the doorbell (its content is ignored: anyone who can
connect can NOTIFY).

**The probe.** A LISTEN that silently stops receiving (a transaction-mode
pooler in between, a half-open TCP connection after a network blackhole)
would only show as the poll timer's extra latency. Every `probe_interval_s`
the listener sends `NOTIFY` on a channel of its own, on its own connection,
and expects its own notification back: a round trip through the server's
notification queue. No echo within `probe_interval_s` more means the
connection no longer delivers: it is closed and reconnected (counted, logged,
`/readyz` says so until the next echo). Detection therefore takes at most two
probe intervals after the connection went deaf.

Every (re)connect rings the doorbell once more: the tail re-reads from its
last snapshot, so a dropped or deaf LISTEN costs latency, never events.
Reconnects back off exponentially with jitter, logging the cause once per
attempt.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Callable

import psycopg
import structlog
import trio
import trio.lowlevel
from psycopg import pq, sql

from relay.db.pool import Conn, connect_listener
from relay.server.metrics import Metrics

__all__ = [
    "DOORBELL_CHANNEL",
    "MEMBERSHIP_CHANNEL",
    "PROBE_INTERVAL_S",
    "Backoff",
    "Listener",
]

DOORBELL_CHANNEL = "relay_events"
"""The channel the events table's trigger notifies."""
MEMBERSHIP_CHANNEL = "relay_membership"
"""Hints that a subject's memberships changed (relay.notify_membership_changed)."""
PROBE_INTERVAL_S = 5.0
"""How often the listener proves it still receives (and how long an echo may take)."""
RECONNECT_INITIAL_S = 0.1
RECONNECT_MAX_S = 10.0
RECONNECT_JITTER = 0.5
"""Reconnect backoff: first wait, cap, and the random share added."""

log = structlog.get_logger("pgrelay.listener")


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


class ListenerDeaf(Exception):
    """The probe's echo did not come back in time."""


class Listener:
    """Holds the LISTEN connection; `ring` is called for every doorbell."""

    def __init__(
        self,
        database_url: str,
        *,
        ring: Callable[[], None],
        metrics: Metrics,
        membership_changed: Callable[[str], None] = lambda _subject: None,
        probe_interval_s: float = PROBE_INTERVAL_S,
        connect: Callable[[str, str], Conn] = connect_listener,
    ) -> None:
        self.database_url = database_url
        self.ring = ring
        self.membership_changed = membership_changed
        """Told the subject of each membership hint (untrusted: anyone can NOTIFY)."""
        self.metrics = metrics
        self.probe_interval_s = probe_interval_s
        self._connect = connect
        self.probe_channel = f"pgrelay_probe_{uuid.uuid4().hex[:12]}"
        """This daemon's own probe channel (other daemons do not hear it)."""
        self._tokens = itertools.count(1)
        self.listening = False
        """Connected, with LISTEN in effect."""
        self.healthy = False
        """Listening, and the last probe came back in time (or none is due yet)."""
        self.reconnected = trio.Event()
        """Set (and replaced) after every successful (re)connect."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, listen, heal; `started()` once LISTEN is first live."""
        backoff = Backoff()
        started = False
        while True:
            try:
                conn = await trio.to_thread.run_sync(self._open, abandon_on_cancel=True)
            except psycopg.Error as exc:
                wait = backoff.next()
                log.warning(
                    "listener cannot connect",
                    error=str(exc).strip(),
                    retry_in_s=round(wait, 2),
                )
                await trio.sleep(wait)
                continue
            backoff.reset()
            self.listening = self.healthy = True
            self.metrics.listener_up.set(1)
            self.metrics.listener_healthy.set(1)
            if started:
                self.metrics.listener_reconnects.inc()
                log.info("listener reconnected")
            self.ring()  # a full re-read from the last snapshot after every (re)connect
            reconnected, self.reconnected = self.reconnected, trio.Event()
            reconnected.set()
            if not started:
                started = True
                task_status.started()
            try:
                await self._receive(conn)
            except ListenerDeaf:
                self.metrics.listener_probe_failures.inc()
                log.warning(
                    "listener stopped receiving: its probe did not come back; reconnecting",
                    waited_s=self.probe_interval_s,
                )
            except psycopg.Error as exc:
                log.warning("listener connection lost", error=str(exc).strip())
            finally:
                self.listening = self.healthy = False
                self.metrics.listener_up.set(0)
                self.metrics.listener_healthy.set(0)
                conn.close()  # libpq in non-blocking mode: never waits on a deaf socket
            await trio.sleep(backoff.next())

    def _open(self) -> Conn:
        """Blocking, in a worker thread: connect, LISTEN on the doorbell and the probe."""
        conn = self._connect(self.database_url, DOORBELL_CHANNEL)
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(MEMBERSHIP_CHANNEL)))
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.probe_channel)))
            conn.pgconn.nonblocking = 1
        except BaseException:
            conn.close()
            raise
        return conn

    async def _receive(self, conn: Conn) -> None:
        """Wait for notifications and probe, until the connection fails or goes deaf."""
        pg = conn.pgconn
        channel = self.probe_channel.encode()
        doorbell = DOORBELL_CHANNEL.encode()
        membership = MEMBERSHIP_CHANNEL.encode()
        probe_due = trio.current_time() + self.probe_interval_s
        waiting: tuple[bytes, float] | None = None  # (token, deadline) of the probe out
        while True:
            wake_at = waiting[1] if waiting is not None else probe_due
            with trio.move_on_at(wake_at):
                await trio.lowlevel.wait_readable(pg.socket)
                pg.consume_input()  # raises OperationalError when the connection is gone
                while not pg.is_busy() and pg.get_result() is not None:
                    pass  # the probe's own command result
                rang = False
                while (note := pg.notifies()) is not None:
                    if note.relname == doorbell:
                        rang = True
                    elif note.relname == membership:
                        self.membership_changed(note.extra.decode("utf-8", "replace"))
                    elif note.relname == channel and waiting and note.extra == waiting[0]:
                        waiting = None
                        self.healthy = True
                        self.metrics.listener_healthy.set(1)
                if rang:
                    self.ring()
                if pg.status != pq.ConnStatus.OK:
                    raise psycopg.OperationalError("listener connection closed")
                continue
            now = trio.current_time()
            if waiting is not None and now >= waiting[1]:
                raise ListenerDeaf
            if waiting is None and now >= probe_due:
                token = str(next(self._tokens)).encode()
                pg.send_query(b"NOTIFY " + channel + b", '" + token + b"'")
                if pg.flush():  # not all sent at once: the socket is full, i.e. stuck
                    raise ListenerDeaf
                waiting = (token, now + self.probe_interval_s)
                probe_due = now + self.probe_interval_s
