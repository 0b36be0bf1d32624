"""Database-side load, each in its own process: the paced emitter (latency),
the rate emitter (the sustained-rate ramp),
the batched emitter (throughput), and a plain LISTEN client (the floor).

Every emitted payload carries `ts`, the `time.time()` taken just before the
statement that inserts (and, in autocommit, commits) the row.
"""

from __future__ import annotations

import threading
import time
from array import array
from typing import Any

import psycopg

EMIT_SQL = "SELECT relay.emit(%s, 'job.updated', 'job', %s, %s::jsonb)"

BATCH_SQL = """
INSERT INTO relay.events (organization_id, event_type, entity_type, entity_id, payload)
SELECT %(org)s, 'job.updated', 'job', g::text, jsonb_build_object('ts', %(ts)s::float8)
FROM generate_series(1, %(rows)s) AS g
"""


def paced_emitter(pipe: Any, dsn: str, org: str, rate: float, count: int) -> None:
    """`count` single-event transactions at `rate` per second (relay.emit, autocommit).
    Sends back the array of send timestamps, in commit order."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(EMIT_SQL, (org, "warm", '{"ts": 0}'), prepare=True)
        pipe.send("ready")
        pipe.recv()  # go
        stamps = array("d")
        interval = 1.0 / rate
        next_t = time.perf_counter()
        for i in range(count):
            next_t += interval
            delay = next_t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            ts = time.time()
            conn.execute(EMIT_SQL, (org, str(i), f'{{"ts": {ts:.6f}}}'), prepare=True)
            stamps.append(ts)
        pipe.send(stamps.tobytes())


def batch_emitter(
    pipe: Any,
    dsn: str,
    org: str,
    rows: int,
    threads: int,
    duration_s: float,
    subscribers: int,
    max_ahead_rows: int,
    delivered: Any,
) -> None:
    """Insert `rows`-row statements from `threads` connections for `duration_s`, as fast
    as the database allows, but never more than `max_ahead_rows` ahead of what the
    average subscriber has received (`delivered` is the load workers' shared count of
    received events; divided by `subscribers`). Without that bound the database would
    only take CPU from the relay and fill its backlog."""
    lock = threading.Lock()
    state = {"emitted": 0, "statements": 0, "waits": 0}
    stop_at = [0.0]
    base = [0]

    def behind() -> float:
        return float(state["emitted"] - (sum(delivered[:]) - base[0]) / subscribers)

    def run(conn: psycopg.Connection[Any]) -> None:
        while time.monotonic() < stop_at[0]:
            with lock:
                ahead = behind()
                if ahead + rows > max_ahead_rows:
                    state["waits"] += 1
                    wait = True
                else:
                    state["emitted"] += rows
                    wait = False
            if wait:
                time.sleep(0.001)
                continue
            conn.execute(BATCH_SQL, {"org": org, "ts": time.time(), "rows": rows}, prepare=True)
            with lock:
                state["statements"] += 1

    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(threads)]
    try:
        pipe.send("ready")
        pipe.recv()
        base[0] = sum(delivered[:])  # counts since the load workers started
        t0 = time.monotonic()
        stop_at[0] = t0 + duration_s
        workers = [threading.Thread(target=run, args=(c,)) for c in conns]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.monotonic() - t0
        pipe.send(
            {
                "rows": state["emitted"],
                "statements": state["statements"],
                "throttle_waits": state["waits"],
                "seconds": elapsed,
                "rows_per_s": state["emitted"] / elapsed,
            }
        )
    finally:
        for c in conns:
            c.close()


def listener(pipe: Any, dsn: str, channel: str) -> None:
    """A plain psycopg LISTEN session: timestamps every notification until told to
    stop, then sends the timestamps back."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"LISTEN {channel}")
        pipe.send("ready")
        stamps = array("d")
        while not pipe.poll():
            for _ in conn.notifies(timeout=0.2):
                stamps.append(time.time())
        pipe.recv()
        pipe.send(stamps.tobytes())


def rate_emitter(pipe: Any, dsn: str, org: str, tick_s: float, max_rows: int) -> None:
    """The ramp's emitter: on each ("step", {"rate", "seconds"}), inserts `rate` rows
    per second for `seconds`, one statement (BATCH_SQL, autocommit) every `tick_s`
    carrying the rows due by then, at most `max_rows`; every row of a statement has
    the `ts` taken just before it. A slow commit makes the next statement larger,
    not the rate lower. Replies with what it did; ("exit", {}) ends it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pipe.send("ready")
        while True:
            name, args = pipe.recv()
            if name != "step":
                return
            rate, seconds = float(args["rate"]), float(args["seconds"])
            emitted = statements = late = 0
            t0 = time.perf_counter()
            next_t = t0
            while True:
                now = time.perf_counter()
                if now - t0 >= seconds:
                    break
                due = min(int(rate * (now - t0)) + 1 - emitted, max_rows)
                if due > 0:
                    conn.execute(
                        BATCH_SQL, {"org": org, "ts": time.time(), "rows": due}, prepare=True
                    )
                    emitted += due
                    statements += 1
                next_t += tick_s
                delay = next_t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                else:
                    late += 1
                    next_t = time.perf_counter()
            elapsed = time.perf_counter() - t0
            pipe.send(
                {
                    "rows": emitted,
                    "statements": statements,
                    "late_ticks": late,
                    "seconds": elapsed,
                    "rows_per_s": emitted / elapsed,
                }
            )
