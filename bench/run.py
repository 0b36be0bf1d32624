"""`make bench`: the real `pgrelay serve` under load, on a throwaway durable cluster.

Scenarios (see bench/README.md): latency, throughput (+ a py-spy profile of
the relay under it), catchup, catchup10k, catchup_many, idle, write_cost. Writes
bench/results/latest.json and prints a table. Every load loop is bounded in
count and time; every process started here is stopped here, by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench import dbload, loadgen
from relay.dev.embedded import EmbeddedPostgres, free_port
from relay.dev.provision import provision
from relay.server.jwt import mint_token

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SECRET = "bench-secret-" + "b" * 40
HOST = "127.0.0.1"
DBNAME = "bench"
OWNER, BACKEND, DAEMON = "bench_owner", "bench_backend", "bench_daemon"
TICK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 30

TARGETS = {
    "latency.p50_ms": ("<=", 3.0),
    "latency.p99_ms": ("<=", 12.0),
    "throughput.delivered_per_s": (">=", 100_000.0),
    "idle.kb_per_connection": ("<=", 15.0),
    "catchup.ms": ("<=", 100.0),
    "catchup10k.ms": ("<=", 250.0),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- /proc ----------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2 :].split()


def cpu_s(pid: int, *, children: bool = False) -> float:
    """utime + stime of a process (all its threads); with `children`, plus the reaped
    children's (cutime + cstime)."""
    try:
        f = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    ticks = int(f[11]) + int(f[12])
    if children:
        ticks += int(f[13]) + int(f[14])
    return ticks / TICK


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle, iowait)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts[:8]) - idle) / TICK


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children_of(ppid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat_fields(int(entry))[1]) == ppid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def latency_stats(seconds: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in seconds)
    return {
        "samples": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "p999_ms": round(percentile(ms, 99.9), 3),
        "max_ms": round(ms[-1], 3) if ms else float("nan"),
    }


# -- the pieces -----------------------------------------------------------------------
class Cluster:
    """Throwaway durable cluster (fsync and synchronous_commit on), migrated, with a
    non-superuser schema owner and login roles for a backend and the daemon."""

    def __init__(self) -> None:
        self.pg = EmbeddedPostgres(durable=True)

    def start(self) -> None:
        self.pg.start()
        provision(
            self.pg.dsn(),
            DBNAME,
            owner=OWNER,
            logins={BACKEND: "relay_service", DAEMON: "relay_daemon"},
        )
        with psycopg.connect(self.pg.dsn(), autocommit=True) as conn:
            settings: dict[str, str] = dict(
                conn.execute(
                    "SELECT name, setting FROM pg_settings WHERE name IN "
                    "('fsync','synchronous_commit','server_version','wal_sync_method')"
                ).fetchall()
            )
        self.settings = settings

    def dsn(self, user: str) -> str:
        return self.pg.dsn(user, DBNAME)

    def postmaster_pid(self) -> int:
        return int((self.pg.datadir / "postmaster.pid").read_text().split()[0])

    def cpu_s(self) -> float:
        pm = self.postmaster_pid()
        return cpu_s(pm, children=True) + sum(cpu_s(p) for p in children_of(pm))

    def stop(self) -> None:
        self.pg.stop()


class Relay:
    """`pgrelay serve` as a subprocess on free ports."""

    def __init__(self, cluster: Cluster, workdir: Path, argv: list[str] | None = None) -> None:
        self.ws_port, self.admin_port = free_port(), free_port()
        env = {
            **os.environ,
            "PGRELAY_DATABASE_URL": cluster.dsn(DAEMON),
            "PGRELAY_LISTEN": f"{HOST}:{self.ws_port}",
            "PGRELAY_ADMIN_LISTEN": f"{HOST}:{self.admin_port}",
            "PGRELAY_JWT_SECRET": SECRET,
            "PGRELAY_LOG_FORMAT": "json",
            "PGRELAY_LOG_LEVEL": "info",
            # All load comes from 127.0.0.1; the per-IP limit (1000) is not under test.
            "PGRELAY_MAX_CONNECTIONS_PER_IP": "20000",
        }
        self.log_path = workdir / f"relay-{self.ws_port}.log"
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                argv or [sys.executable, "-m", "relay", "serve"],
                env=env,
                cwd=REPO,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=loadgen.raise_nofile,
            )
        self.pid = self.proc.pid
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgrelay serve exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.admin_get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("pgrelay serve did not become ready:\n" + self.tail())

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def admin_get(self, path: str) -> tuple[int, str]:
        url = f"http://{HOST}:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str) -> float:
        total = 0.0
        for line in self.admin_get("/metrics")[1].splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def histograms(self) -> dict[str, tuple[float, float]]:
        """(sum, count) of the relay's latency histograms, for averages over a window."""
        names = {
            "pgrelay_tail_query_seconds": "tail_step_avg_ms",
            "pgrelay_commit_to_send_seconds": "txn_start_to_fanout_avg_ms",
        }
        return {
            label: (self.metric(n + "_sum"), self.metric(n + "_count"))
            for n, label in names.items()
        }

    def cpu_s(self) -> float:
        return cpu_s(self.pid)

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class LoadWorkers:
    """The load generator: `n` processes, each an epoll loop holding many clients."""

    def __init__(self, ctx: Any, n: int, port: int) -> None:
        self.shared = ctx.RawArray("q", n)
        self.pipes = []
        self.procs = []
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=loadgen.worker_main,
                args=(child, i, HOST, port, SECRET, self.shared),
                daemon=True,
            )
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)

    def call(
        self, name: str, args: dict[str, Any] | None = None, timeout_s: float = 120
    ) -> list[Any]:
        for pipe in self.pipes:
            pipe.send((name, args or {}))
        replies = []
        for pipe in self.pipes:
            if not pipe.poll(timeout_s):
                raise RuntimeError(f"load worker did not answer {name!r} in {timeout_s} s")
            replies.append(pipe.recv())
        return replies

    def split(self, total: int) -> list[int]:
        """How many of `total` clients each worker holds."""
        n = len(self.pipes)
        return [total // n + (1 if i < total % n else 0) for i in range(n)]

    def open(
        self,
        total: int,
        org: str | None,
        prefix: str,
        timeout_s: float = 90,
        *,
        orgs: list[str] | None = None,
        hold: bool = False,
    ) -> dict[str, Any]:
        """Open `total` clients, each subscribed (fresh) to `org`, or to its own entry
        of `orgs` (client i: orgs[i]); with `hold`, authenticated but not subscribed
        (their tokens allow their org: see `resume`)."""
        start = 0
        for pipe, count in zip(self.pipes, self.split(total), strict=True):
            pipe.send(
                (
                    "open",
                    {
                        "count": count,
                        "org": org,
                        "orgs": orgs[start : start + count] if orgs else None,
                        "hold": hold,
                        "sub_prefix": prefix,
                        "concurrency": 100,
                        "timeout_s": timeout_s,
                    },
                )
            )
            start += count
        replies = []
        for pipe in self.pipes:
            if not pipe.poll(timeout_s + 30):
                raise RuntimeError("load worker did not finish opening connections")
            replies.append(pipe.recv())
        live = sum(r["live"] for r in replies)
        if live < total:
            raise RuntimeError(f"only {live} of {total} connections came up: {replies}")
        return {"live": live, "seconds": max(r["seconds"] for r in replies)}

    def snapshot(self, **args: Any) -> dict[str, Any]:
        replies = self.call("snapshot", args)
        errors: Counter[str] = Counter()
        closes: Counter[str] = Counter()
        for r in replies:
            errors.update(r["errors"])
            closes.update(r["closes"])
        return {
            "events": sum(r["events"] for r in replies),
            "live": sum(r["live"] for r in replies),
            "resyncs": sum(r["resyncs"] for r in replies),
            "per_conn_min": min(r["per_conn_min"] for r in replies),
            "per_conn_max": max(r["per_conn_max"] for r in replies),
            "errors": dict(errors),
            "closes": dict(closes),
        }

    def samples(self) -> tuple[list[float], list[float]]:
        """Latency samples: (kernel arrival at the client socket, read by the client)."""
        arrived: list[float] = []
        read: list[float] = []
        for raw_arrived, raw_read in self.call("samples"):
            for raw, out in ((raw_arrived, arrived), (raw_read, read)):
                a = array("d")
                a.frombytes(raw)
                out.extend(a)
        return arrived, read

    def cursors(self) -> list[list[list[str]]]:
        """Per worker: [org, cursor] of each subscribed client."""
        return self.call("cursors")

    def resume(
        self, plans: list[list[list[str]]], expect_events: int, timeout_s: float
    ) -> list[dict[str, Any]]:
        """Every worker subscribes its held clients at once, each with one
        [org, cursor] of its plan; returns each client's result (loadgen
        `Worker.resume_result`)."""
        for pipe, plan in zip(self.pipes, plans, strict=True):
            pipe.send(
                ("resume", {"plan": plan, "expect_events": expect_events, "timeout_s": timeout_s})
            )
        out: list[dict[str, Any]] = []
        for pipe in self.pipes:
            if not pipe.poll(timeout_s + 60):
                raise RuntimeError("load worker did not finish the resume")
            reply = pipe.recv()
            if "error" in reply:
                raise RuntimeError(f"resume: {reply['error']}")
            out.extend(reply["clients"])
        return out

    def resume_check(self) -> list[dict[str, Any]]:
        """After `resume`: per client, its org, events, `replayed` and whether it
        got exactly its org's events (checked by the workers, off the clock)."""
        return [c for r in self.call("resume_check") for c in r["clients"]]

    def cpu_s(self) -> float:
        return sum(cpu_s(p.pid) for p in self.procs if p.pid is not None)

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, OSError, EOFError):
            self.call("exit", timeout_s=10)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


class CpuWindow:
    """CPU seconds of the relay, the load generator, the database and the emitters
    between `start` and `stop`."""

    def __init__(self, relay: Relay | None, workers: LoadWorkers | None, cluster: Cluster) -> None:
        self.relay, self.workers, self.cluster = relay, workers, cluster
        self.extra: list[int] = []

    def _read(self) -> dict[str, float]:
        return {
            "relay": self.relay.cpu_s() if self.relay else 0.0,
            "loadgen": self.workers.cpu_s() if self.workers else 0.0,
            "postgres": self.cluster.cpu_s(),
            "emitters": sum(cpu_s(pid) for pid in self.extra),
            "machine": machine_busy_s(),
        }

    def start(self, *extra_pids: int) -> None:
        self.extra = list(extra_pids)
        self.t0 = time.monotonic()
        self.c0 = self._read()

    def stop(self) -> dict[str, float]:
        c1 = self._read()
        wall = time.monotonic() - self.t0
        out = {f"{k}_cpu_s": round(c1[k] - self.c0[k], 2) for k in c1}
        ours = sum(c1[k] - self.c0[k] for k in c1 if k != "machine")
        # CPU that none of the processes above used: other work on the machine.
        out["other_cpu_s"] = round(out["machine_cpu_s"] - ours, 2)
        out["wall_s"] = round(wall, 2)
        out["relay_cpu_util"] = round((c1["relay"] - self.c0["relay"]) / wall, 3)
        out["loadgen_cpu_util"] = round((c1["loadgen"] - self.c0["loadgen"]) / wall, 3)
        return out


def spawn(ctx: Any, target: Any, *args: Any) -> tuple[Any, Any]:
    parent, child = ctx.Pipe()
    p = ctx.Process(target=target, args=(child, *args), daemon=True)
    p.start()
    return p, parent


def expect(pipe: Any, timeout_s: float, what: str) -> Any:
    if not pipe.poll(timeout_s):
        raise RuntimeError(f"{what}: no answer within {timeout_s} s")
    return pipe.recv()


def reap(proc: Any) -> None:
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=5)


# -- scenarios ------------------------------------------------------------------------
# Latency "received" = the kernel's arrival stamp on the client socket (SO_TIMESTAMPNS),
# so that the load generator's own queueing (one process reading 50 sockets that all
# became readable at once) is not charged to the relay. The time at which the load
# generator read the frame is reported beside it (app_read_*).
def scenario_latency(
    ctx: Any,
    cluster: Cluster,
    relay: Relay,
    workers: LoadWorkers,
    org: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    rate, duration, warmup = args.latency_rate, args.duration, 1.0
    count = int(rate * (duration + warmup))
    skip = int(rate * warmup)
    log(f"latency: {rate:.0f} events/s for {duration + warmup:.0f} s to {args.clients} clients")
    emitter, epipe = spawn(ctx, dbload.paced_emitter, cluster.dsn(BACKEND), org, rate, count)
    expect(epipe, 30, "paced emitter")
    floor, fpipe = spawn(ctx, dbload.listener, cluster.dsn(BACKEND), "relay_events")
    expect(fpipe, 30, "LISTEN client")
    window = CpuWindow(relay, workers, cluster)
    epipe.send("go")
    time.sleep(warmup)
    m0 = relay.histograms()
    snap0 = workers.snapshot(reset_samples=True, sample_every=1)
    window.start(emitter.pid, floor.pid)
    raw = expect(epipe, duration + 60, "paced emitter")
    time.sleep(0.5)  # the last events in flight
    cpu = window.stop()
    m1 = relay.histograms()
    snap1 = workers.snapshot()
    samples, read_samples = workers.samples()
    fpipe.send("stop")
    floor_raw = expect(fpipe, 10, "LISTEN client")
    reap(emitter)
    reap(floor)
    stamps, notes = array("d"), array("d")
    stamps.frombytes(raw)
    notes.frombytes(floor_raw)
    paired = min(len(stamps), len(notes))
    floor_lat = [notes[i] - stamps[i] for i in range(skip, paired)]
    fl = latency_stats(floor_lat)
    st = latency_stats(samples)
    rd = latency_stats(read_samples)
    received = snap1["events"] - snap0["events"]
    expected = (count - skip) * args.clients
    return {
        "p50_ms": st["p50_ms"],
        "p99_ms": st["p99_ms"],
        "floor_p50_ms": fl["p50_ms"],
        "floor_p99_ms": fl["p99_ms"],
        "relay_added_p50_ms": round(st["p50_ms"] - fl["p50_ms"], 3),
        "app_read_p50_ms": rd["p50_ms"],
        "app_read_p99_ms": rd["p99_ms"],
        "relay": st,
        "app_read": rd,
        "relay_metrics": {
            name: round((m1[name][0] - m0[name][0]) / max(m1[name][1] - m0[name][1], 1) * 1000, 3)
            for name in m1
        },
        "floor": fl | {"notifications": len(notes), "commits": len(stamps)},
        "events_emitted": count - skip,
        "rate_per_s": rate,
        "clients": args.clients,
        "received": received,
        "expected": expected,
        "resyncs": snap1["resyncs"] - snap0["resyncs"],
        "client_errors": snap1["errors"],
        "client_closes": snap1["closes"],
        **cpu,
    }


def scenario_throughput(
    ctx: Any,
    cluster: Cluster,
    relay: Relay,
    workers: LoadWorkers,
    org: str,
    args: argparse.Namespace,
    *,
    duration: float,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    warmup = 2.0
    label = "throughput (profiled)" if profile_to else "throughput"
    log(f"{label}: {args.batch_rows}-row statements, {duration:.0f} s, {args.clients} clients")
    emitter, epipe = spawn(
        ctx,
        dbload.batch_emitter,
        cluster.dsn(BACKEND),
        org,
        args.batch_rows,
        args.emit_threads,
        warmup + duration + 0.5,
        args.clients,
        args.max_ahead_rows,
        workers.shared,
    )
    expect(epipe, 30, "batch emitter")
    workers.snapshot(batch_wait_s=args.batch_wait_ms / 1000)
    window = CpuWindow(relay, workers, cluster)
    read0 = relay.metric("pgrelay_events_read_total")
    epipe.send("go")
    time.sleep(warmup)
    spy = None
    if profile_to is not None:
        spy = subprocess.Popen(
            [
                args.py_spy,
                "record",
                "-p",
                str(relay.pid),
                "-d",
                str(int(duration)),
                "-r",
                "100",
                "-f",
                "speedscope",
                "-o",
                str(profile_to),
                *([] if args.py_spy_blocking else ["--nonblocking"]),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    snap0 = workers.snapshot(reset_samples=True, sample_every=args.sample_every)
    window.start(emitter.pid)
    time.sleep(duration)
    snap1 = workers.snapshot()
    cpu = window.stop()
    samples, read_samples = workers.samples()
    emitted = expect(epipe, 30, "batch emitter")
    reap(emitter)
    # Let the backlog drain (bounded) so that the next scenario starts clean.
    deadline = time.monotonic() + 15
    last = -1
    while time.monotonic() < deadline:
        ev = workers.snapshot()["events"]
        if ev == last:
            break
        last = ev
        time.sleep(0.5)
    final = workers.snapshot(batch_wait_s=0)
    read1 = relay.metric("pgrelay_events_read_total")
    spy_err = ""
    if spy is not None:
        try:
            _, err = spy.communicate(timeout=30)
            spy_err = err.decode(errors="replace")[-500:] if spy.returncode else ""
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.communicate()
            spy_err = "py-spy timed out"
    window_s = cpu["wall_s"]
    delivered = snap1["events"] - snap0["events"]
    st = latency_stats(samples)
    out = {
        "delivered_per_s": round(delivered / window_s),
        "p50_ms": st["p50_ms"],
        "p99_ms": st["p99_ms"],
        "latency": st | {"sampled_every": args.sample_every},
        "app_read_latency": latency_stats(read_samples)
        | {"client_read_batching_ms": args.batch_wait_ms},
        "delivered": delivered,
        "clients": args.clients,
        "rows_emitted": emitted["rows"],
        "rows_per_s_emitted": round(emitted["rows_per_s"]),
        "rows_read_by_relay": int(read1 - read0),
        "emitter_throttle_waits": emitted["throttle_waits"],
        "batch_rows": args.batch_rows,
        "max_ahead_rows": args.max_ahead_rows,
        "all_delivered_after_drain": final["events"] - snap0["events"] >= 0
        and final["per_conn_min"] == final["per_conn_max"],
        "resyncs": final["resyncs"] - snap0["resyncs"],
        "client_errors": final["errors"],
        "client_closes": final["closes"],
        "relay_us_per_delivered": round(cpu["relay_cpu_s"] / max(delivered, 1) * 1e6, 2),
        "loadgen_us_per_delivered": round(cpu["loadgen_cpu_s"] / max(delivered, 1) * 1e6, 2),
        **cpu,
    }
    if spy_err:
        out["py_spy_error"] = spy_err
    return out


def scenario_catchup(cluster: Cluster, relay: Relay, args: argparse.Namespace) -> dict[str, Any]:
    n, reps = args.catchup_events, args.catchup_reps
    org = str(uuid.uuid4())
    log(f"catchup: resume {n} missed events, {reps} times")
    token = mint_token(SECRET, orgs=[org], sub="bench-catchup", lifetime_s=3600)
    c = loadgen.BlockingClient(HOST, relay.ws_port)
    c.send({"type": "auth", "token": token})
    c.expect("ready")
    c.send({"type": "subscribe", "ref": "0", "org": org, "cursor": None})
    cursor = c.expect("subscribed")["cursor"]
    c.close()
    times, replayed = [], []
    cpu0 = relay.cpu_s()
    with psycopg.connect(cluster.dsn(BACKEND), autocommit=True) as conn:
        for rep in range(reps):
            conn.execute(
                "SELECT count(relay.emit(%s, 'job.updated', 'job', g::text, '{\"n\": 1}'))"
                " FROM generate_series(1, %s) AS g",
                (org, n),
            )
            time.sleep(0.3)  # the live tail has seen them; nobody listens to this org
            c = loadgen.BlockingClient(HOST, relay.ws_port)
            c.send({"type": "auth", "token": token})
            c.expect("ready")
            t0 = time.perf_counter()
            c.send({"type": "subscribe", "ref": str(rep), "org": org, "cursor": cursor})
            events = 0
            while True:
                msg = c.recv()
                if msg["type"] == "event":
                    events += 1
                elif msg["type"] == "subscribed":
                    break
                else:
                    raise RuntimeError(f"catch-up: unexpected {msg}")
            times.append((time.perf_counter() - t0) * 1000)
            replayed.append(msg["replayed"])
            if events != n or msg["replayed"] != n:
                raise RuntimeError(f"catch-up replayed {events}/{msg['replayed']}, expected {n}")
            cursor = msg["cursor"]
            c.close()
    return {
        "events": n,
        "ms": round(statistics.median(times), 2),
        "runs_ms": [round(t, 2) for t in times],
        "min_ms": round(min(times), 2),
        "max_ms": round(max(times), 2),
        "relay_cpu_s": round(relay.cpu_s() - cpu0, 2),
    }


# -- catch-up at size -----------------------------------------------------------------
#: The missed events, written in the server by one DO block that commits after each
#: INSERT: `txns` turns in which every org of `orgs` writes `rows` rows (entity_id =
#: prefix || 0, 1, ...), each its own transaction, the orgs taking turns (so their
#: transactions interleave in xid order). A plain INSERT, as the throughput emitter
#: does: the rows (and the doorbell trigger) are those relay.emit writes, at a
#: fraction of the database's time, which keeps `make bench` short; and no round
#: trip per transaction.
EMIT_DO = """
DO $emit$
DECLARE
    org uuid;
BEGIN
    FOR t IN 0 .. {txns} - 1 LOOP
        FOREACH org IN ARRAY {orgs}::uuid[] LOOP
            INSERT INTO relay.events
                (organization_id, event_type, entity_type, entity_id, payload)
            SELECT org, 'job.updated', 'job', {prefix} || g, '{{"n": 1}}'::jsonb
            FROM generate_series(t * {rows}, t * {rows} + {rows} - 1) AS g;
            COMMIT;
        END LOOP;
    END LOOP;
END
$emit$
"""


def emit_turns(
    conn: psycopg.Connection[Any], orgs: list[str], prefix: str, txns: int, rows: int
) -> None:
    """`txns` transactions of `rows` rows for every org (see EMIT_DO); `distinct_xids`
    checks the shape."""
    conn.execute(
        sql.SQL(EMIT_DO).format(
            txns=sql.Literal(txns),
            orgs=sql.Literal(orgs),
            prefix=sql.Literal(prefix),
            rows=sql.Literal(rows),
        )
    )


def emit_session(cluster: Cluster) -> psycopg.Connection[Any]:
    """The backend role's autocommit session for catch-up data. synchronous_commit is
    off in it (WAL is flushed in the background, not per commit): only the number and
    shape of transactions matter here, and 10,000 fsyncs would take a minute."""
    conn = psycopg.connect(cluster.dsn(BACKEND), autocommit=True)
    conn.execute("SET synchronous_commit = off")
    return conn


def wait_tail(relay: Relay, total: float, timeout_s: float = 60) -> float:
    """Wait (bounded) until the relay's live tail has read `total` rows in all, so that
    a catch-up does not share the relay with the tail reading the same rows."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        read = relay.metric("pgrelay_events_read_total")
        if read >= total:
            return read
        time.sleep(0.05)
    raise RuntimeError(f"the relay's tail did not read {total} rows in {timeout_s} s")


def distinct_xids(cluster: Cluster, org: str, prefix: str) -> int:
    """Transactions that wrote the org's rows with this entity_id prefix (as the
    superuser: row-level security is forced for everyone else)."""
    with psycopg.connect(cluster.pg.dsn("postgres", DBNAME), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT xid) FROM relay.events "
            "WHERE organization_id = %s AND starts_with(entity_id, %s)",
            (org, prefix),
        ).fetchone()
    return int(row[0]) if row else 0


def parse_shapes(spec: str, n: int) -> list[tuple[int, int]]:
    shapes = []
    for part in spec.split(","):
        txns, rows = (int(x) for x in part.lower().split("x"))
        if txns * rows != n:
            raise SystemExit(f"--catchup10k-shapes: {part} is not {n} events")
        shapes.append((txns, rows))
    return shapes


SHAPE_KEYS = {"100x100": "ms", "1x10000": "one_txn_ms", "10000x1": "single_rows_ms"}


def check_replay(
    kept: list[bytes],
    sub: dict[str, Any],
    others: list[dict[str, Any]],
    org: str,
    prefix: str,
    n: int,
) -> list[str]:
    """Exactly the org's n events of this run (entity_id prefix0 .. prefix(n-1), each
    once), nothing else before `subscribed`, and `replayed` n."""
    problems = [f"before subscribed: {m}" for m in others[:3]]
    if sub.get("replayed") != n:
        problems.append(f"replayed {sub.get('replayed')}")
    ids = []
    for frame in kept:
        ev = json.loads(frame)
        if ev.get("org") != org or not str(ev.get("entity_id", "")).startswith(prefix):
            problems.append(f"foreign event {ev.get('org')} {ev.get('entity_id')}")
            break
        ids.append(int(ev["entity_id"][len(prefix) :]))
    if len(ids) != n or sorted(ids) != list(range(n)):
        problems.append(f"{len(kept)} events, {len(set(ids))} distinct")
    return problems


def scenario_catchup10k(cluster: Cluster, relay: Relay, args: argparse.Namespace) -> dict[str, Any]:
    n, reps = args.catchup10k_events, args.catchup10k_reps
    shapes = parse_shapes(args.catchup10k_shapes, n)
    log(
        f"catchup10k: resume {n} missed events, {reps} times per shape "
        + ", ".join(f"{t}x{r}" for t, r in shapes)
    )
    out: dict[str, Any] = {
        "events": n,
        "client": "raw socket reader (loadgen.BlockingClient.replay): walks frames by "
        "header, keeps event frames unparsed, checks them after the clock stops",
        "shapes": {},
    }
    conn = emit_session(cluster)
    try:
        for txns, rows in shapes:
            name = f"{txns}x{rows}"
            org = str(uuid.uuid4())
            token = mint_token(SECRET, orgs=[org], sub=f"bench-catchup10k-{name}", lifetime_s=3600)
            c = loadgen.BlockingClient(HOST, relay.ws_port)
            c.send({"type": "auth", "token": token})
            c.expect("ready")
            c.send({"type": "subscribe", "ref": "0", "org": org, "cursor": None})
            cursor = c.expect("subscribed")["cursor"]
            c.close()
            times: list[float] = []
            relay_cpu: list[float] = []
            client_cpu: list[float] = []
            pg_cpu: list[float] = []
            emit_s: list[float] = []
            xids: list[int] = []
            problems: list[str] = []
            rounds0 = relay.metric("pgrelay_catch_up_rounds_total")
            resyncs0 = relay.metric("pgrelay_resyncs_total")
            overflows0 = relay.metric("pgrelay_outbox_overflows_total")
            for rep in range(reps):
                prefix = f"{rep}:"
                read0 = relay.metric("pgrelay_events_read_total")
                e0 = time.monotonic()
                emit_turns(conn, [org], prefix, txns, rows)
                emit_s.append(time.monotonic() - e0)
                wait_tail(relay, read0 + n)
                xids.append(distinct_xids(cluster, org, prefix))
                if xids[-1] != txns:
                    problems.append(f"run {rep}: written in {xids[-1]} transactions, not {txns}")
                c = loadgen.BlockingClient(HOST, relay.ws_port)
                c.send({"type": "auth", "token": token})
                c.expect("ready")
                pg0 = cluster.cpu_s()
                cpu0 = relay.cpu_s()
                me0 = time.process_time()
                t0 = time.perf_counter()
                c.send({"type": "subscribe", "ref": str(rep), "org": org, "cursor": cursor})
                try:
                    kept, sub, others = c.replay(time.monotonic() + 30)
                except (TimeoutError, ConnectionError) as exc:
                    c.close()
                    problems.append(f"run {rep}: {exc}")
                    break
                t1 = time.perf_counter()
                client_cpu.append((time.process_time() - me0) * 1000)
                relay_cpu.append((relay.cpu_s() - cpu0) * 1000)
                pg_cpu.append((cluster.cpu_s() - pg0) * 1000)
                times.append((t1 - t0) * 1000)
                problems += [
                    f"run {rep}: {p}" for p in check_replay(kept, sub, others, org, prefix, n)
                ]
                cursor = sub["cursor"]
                c.close()
            wall = sum(times)
            shape: dict[str, Any] = {
                "transactions": txns,
                "rows_per_transaction": rows,
                "distinct_xids": xids,
                "exact": not problems and len(times) == reps,
                "ms": round(statistics.median(times), 2) if times else None,
                "runs_ms": [round(t, 2) for t in times],
                "min_ms": round(min(times), 2) if times else None,
                "max_ms": round(max(times), 2) if times else None,
                "relay_cpu_ms_runs": [round(x) for x in relay_cpu],
                "relay_cpu_util": round(sum(relay_cpu) / wall, 2) if wall else None,
                "postgres_cpu_ms_runs": [round(x) for x in pg_cpu],
                "client_cpu_ms_runs": [round(x, 1) for x in client_cpu],
                "emit_s_runs": [round(x, 2) for x in emit_s],
                "catch_up_rounds": int(relay.metric("pgrelay_catch_up_rounds_total") - rounds0),
                "resyncs": int(relay.metric("pgrelay_resyncs_total") - resyncs0),
                "outbox_overflows": int(
                    relay.metric("pgrelay_outbox_overflows_total") - overflows0
                ),
            }
            if problems:
                shape["problems"] = problems[:10]
                log(f"catchup10k {name}: NOT EXACT: {problems[:3]}")
            out["shapes"][name] = shape
            key = SHAPE_KEYS.get(name)
            if key:
                out[key] = shape["ms"]
                if key == "ms":
                    out["runs_ms"] = shape["runs_ms"]
                    out["relay_cpu_ms_runs"] = shape["relay_cpu_ms_runs"]
    finally:
        conn.close()
    out["exact"] = all(s["exact"] for s in out["shapes"].values())
    return out


class RssSampler:
    """VmRSS of one process every `every_s`, in a thread, between `start` and `stop`."""

    def __init__(self, pid: int, every_s: float = 0.01) -> None:
        self.pid, self.every_s = pid, every_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.samples.append(rss_kb(self.pid))
            self._stop.wait(self.every_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples


def scenario_catchup_many(
    cluster: Cluster, relay: Relay, workers: LoadWorkers, args: argparse.Namespace
) -> dict[str, Any]:
    clients, n_orgs, n = args.catchup_many_clients, args.catchup_many_orgs, args.catchup_many_events
    txn_rows = min(args.catchup_many_txn_rows, n)
    if n % txn_rows:
        raise SystemExit("--catchup-many-txn-rows must divide --catchup-many-events")
    orgs = [str(uuid.uuid4()) for _ in range(n_orgs)]
    client_orgs = [orgs[i % n_orgs] for i in range(clients)]
    log(f"catchup_many: {clients} clients ({n_orgs} orgs) each resume {n} missed events at once")
    # Cursors: every client subscribes fresh once, then goes away.
    workers.open(clients, None, "many", orgs=client_orgs)
    plans = workers.cursors()
    if sum(len(p) for p in plans) != clients:
        raise RuntimeError(f"catchup_many: {sum(len(p) for p in plans)} cursors for {clients}")
    workers.call("close_all")
    # The missed events: each org's n in transactions of txn_rows, the orgs taking
    # turns (their transactions interleave in xid order).
    read0 = relay.metric("pgrelay_events_read_total")
    e0 = time.monotonic()
    with emit_session(cluster) as conn:
        emit_turns(conn, orgs, "", n // txn_rows, txn_rows)
    emit_s = time.monotonic() - e0
    wait_tail(relay, read0 + n * n_orgs, timeout_s=120)
    xids = distinct_xids(cluster, orgs[0], "")
    workers.open(clients, None, "many-resume", orgs=client_orgs, hold=True)
    time.sleep(0.5)
    rss0 = relay.rss_kb()
    rounds0 = relay.metric("pgrelay_catch_up_rounds_total")
    resyncs0 = relay.metric("pgrelay_resyncs_total")
    overflows0 = relay.metric("pgrelay_outbox_overflows_total")
    slow0 = relay.metric("pgrelay_slow_client_closes_total")
    window = CpuWindow(relay, workers, cluster)
    sampler = RssSampler(relay.pid)
    sampler.start()
    window.start()
    times = workers.resume(plans, n, timeout_s=args.catchup_many_timeout)
    cpu = window.stop()
    rss = sampler.stop()
    results = [t | r for t, r in zip(times, workers.resume_check(), strict=True)]
    time.sleep(1.0)
    rss_after = relay.rss_kb()
    workers.call("close_all")
    sent = [r["sent"] for r in results]
    done = [r["arrived"] for r in results if r["replayed"] is not None]
    per_client = sorted(r["arrived"] - r["sent"] for r in results if r["replayed"] is not None)
    ms = [x * 1000 for x in per_client]
    inexact = [r for r in results if not r["exact"]]
    if inexact:
        log(f"catchup_many: {len(inexact)} clients NOT EXACT: {inexact[:2]}")
    return {
        "clients": clients,
        "orgs": n_orgs,
        "clients_per_org": clients / n_orgs,
        "events_per_client": n,
        "rows_per_transaction": txn_rows,
        "distinct_xids_first_org": xids,
        "exact": not inexact and len(results) == clients,
        "exact_clients": clients - len(inexact),
        "problems": [{"org": r["org"], "problems": r["problems"]} for r in inexact[:5]],
        "seconds": round(max(done) - min(sent), 3) if done else None,
        "last_read_seconds": round(
            max(r["read"] for r in results if r["replayed"] is not None) - min(sent), 3
        )
        if done
        else None,
        "p50_ms": round(percentile(ms, 50), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "min_ms": round(ms[0], 1) if ms else None,
        "max_ms": round(ms[-1], 1) if ms else None,
        "subscribes_sent_within_ms": round((max(sent) - min(sent)) * 1000, 1),
        "rss_before_kb": rss0,
        "rss_peak_kb": max(rss, default=0),
        "rss_peak_delta_kb": max(rss, default=rss0) - rss0,
        "rss_after_kb": rss_after,
        "rss_samples": len(rss),
        "catch_up_rounds": int(relay.metric("pgrelay_catch_up_rounds_total") - rounds0),
        "resyncs": int(relay.metric("pgrelay_resyncs_total") - resyncs0),
        "outbox_overflows": int(relay.metric("pgrelay_outbox_overflows_total") - overflows0),
        "slow_client_closes": int(relay.metric("pgrelay_slow_client_closes_total") - slow0),
        "emit_s": round(emit_s, 2),
        "relay_cpu_util_during": round(cpu["relay_cpu_s"] / (max(done) - min(sent)), 2)
        if done
        else None,
        "relay_us_per_event": round(cpu["relay_cpu_s"] / max(clients * n, 1) * 1e6, 2),
        **cpu,
    }


def scenario_idle(
    cluster: Cluster, relay: Relay, workers: LoadWorkers, args: argparse.Namespace
) -> dict[str, Any]:
    n = args.idle_connections
    org = str(uuid.uuid4())
    log(f"idle: {n} authenticated connections, each subscribed to one org")
    warm = workers.open(50, org, "idle-warm")
    time.sleep(1.0)
    rss0 = relay.rss_kb()
    window = CpuWindow(relay, workers, cluster)
    window.start()
    opened = workers.open(n, org, "idle")
    time.sleep(2.0)
    rss1 = relay.rss_kb()
    cpu = window.stop()
    conns = relay.metric("pgrelay_connections")
    subs = relay.metric("pgrelay_subscriptions")
    snap = workers.snapshot()
    return {
        "connections": n,
        "kb_per_connection": round((rss1 - rss0) / n, 2),
        "state": "authenticated and subscribed to one org",
        "rss_before_kb": rss0,
        "rss_after_kb": rss1,
        "relay_reports_connections": int(conns),
        "relay_reports_subscriptions": int(subs),
        "open_seconds": opened["seconds"],
        "opens_per_s": round(n / max(opened["seconds"], 1e-9)),
        "relay_cpu_s_to_open": cpu["relay_cpu_s"],
        "relay_us_per_open": round(cpu["relay_cpu_s"] / n * 1e6),
        "loadgen_cpu_s_to_open": cpu["loadgen_cpu_s"],
        "postgres_cpu_s_to_open": cpu["postgres_cpu_s"],
        "client_closes": snap["closes"],
        "warm_connections": warm["live"],
    }


def pgbench_tps(
    pgbench: str, cluster: Cluster, script: Path, seconds: int, clients: int
) -> dict[str, Any]:
    proc = subprocess.run(
        [
            pgbench,
            "-h",
            HOST,
            "-p",
            str(cluster.pg.port),
            "-U",
            BACKEND,
            "-n",
            "-M",
            "prepared",
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-T",
            str(seconds),
            "-f",
            str(script),
            DBNAME,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed: {proc.stderr[-2000:]}")
    tps = lat = None
    for line in proc.stdout.splitlines():
        if line.startswith("tps ="):
            tps = float(line.split()[2])
        if line.startswith("latency average ="):
            lat = float(line.split()[3])
    return {"tps": tps, "latency_avg_ms": lat}


def scenario_write_cost(
    ctx: Any, cluster: Cluster, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    pgbench = shutil.which("pgbench") or str(cluster.pg.bindir / "pgbench")
    org = str(uuid.uuid4())
    script = workdir / "insert.sql"
    script.write_text(
        "INSERT INTO relay.events (organization_id, event_type, entity_type, entity_id) "
        f"VALUES ('{org}', 'job.updated', 'job', '42');\n"
    )
    secs, clients = args.write_seconds, args.write_clients
    log(
        f"write_cost: single-row inserts, {clients} clients, {secs} s with and without "
        "the doorbell (relay stopped; one plain LISTEN session open)"
    )
    listener, lpipe = spawn(ctx, dbload.listener, cluster.dsn(BACKEND), "relay_events")
    expect(lpipe, 30, "LISTEN session")
    owner = psycopg.connect(cluster.dsn(OWNER), autocommit=True)
    # A-B-B-A in halves, so that drift (WAL growth, checkpoints, other load on the
    # machine) falls on both sides alike.
    half = max(1, secs // 2)
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    cpu = {True: 0.0, False: 0.0}
    try:
        for bell in (True, False, False, True):
            owner.execute(
                "ALTER TABLE relay.events "
                + ("ENABLE" if bell else "DISABLE")
                + " TRIGGER events_doorbell"
            )
            c0 = cluster.cpu_s()
            runs[bell].append(pgbench_tps(pgbench, cluster, script, half, clients))
            cpu[bell] += cluster.cpu_s() - c0
    finally:
        owner.execute("ALTER TABLE relay.events ENABLE TRIGGER events_doorbell")
        owner.close()
        lpipe.send("stop")
        notes = array("d")
        notes.frombytes(expect(lpipe, 30, "LISTEN session"))
        reap(listener)

    def mean(bell: bool, key: str) -> float:
        return statistics.fmean(r[key] for r in runs[bell])

    with_bell = {"tps": mean(True, "tps"), "latency_avg_ms": mean(True, "latency_avg_ms")}
    without = {"tps": mean(False, "tps"), "latency_avg_ms": mean(False, "latency_avg_ms")}
    w, wo = with_bell["tps"], without["tps"]
    return {
        "with_doorbell_tps": round(w, 1),
        "without_doorbell_tps": round(wo, 1),
        "doorbell_cost_pct": round((1 - w / wo) * 100, 1) if w and wo else None,
        "with_doorbell_latency_ms": with_bell["latency_avg_ms"],
        "without_doorbell_latency_ms": without["latency_avg_ms"],
        "clients": clients,
        "seconds_each": 2 * half,
        "order": "with, without, without, with (halves)",
        "runs_tps": {
            "with": [r["tps"] for r in runs[True]],
            "without": [r["tps"] for r in runs[False]],
        },
        "notifications_received": len(notes),
        "postgres_cpu_s_with": round(cpu[True], 2),
        "postgres_cpu_s_without": round(cpu[False], 2),
        "cluster": cluster.settings,
    }


# -- profile --------------------------------------------------------------------------
IDLE_LEAVES = ("wait (threading.py)", "_work (trio/_core/_thread_cache.py)")


def summarize_speedscope(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares per function (all lines of a function together), of
    the main (trio) thread's samples, plus each thread's share of all samples."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]

    def fname(i: int) -> str:
        f = frames[i]
        file = str(f.get("file", ""))
        for marker in ("/site-packages/", "/work/main/", "/lib/python3.11/", "/lib/python3"):
            if marker in file:
                file = file.split(marker, 1)[1]
                break
        return f"{f['name']} ({file})"

    names = [fname(i) for i in range(len(frames))]
    threads: dict[str, float] = {}
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    lines_c: Counter[str] = Counter()
    main_total = 0.0
    for prof in doc["profiles"]:
        weights = prof.get("weights") or [1] * len(prof["samples"])
        busy = 0.0
        is_main = "MainThread" in prof["name"]
        for stack, w in zip(prof["samples"], weights, strict=False):
            if not stack or names[stack[-1]] in IDLE_LEAVES:
                continue
            busy += w
            if not is_main:
                continue
            main_total += w
            self_c[names[stack[-1]]] += w
            f = frames[stack[-1]]
            lines_c[f"{names[stack[-1]]}:{f.get('line')}"] += w
            for n in {names[i] for i in stack}:
                incl_c[n] += w
        threads[prof["name"]] = round(busy, 2)

    def rows(c: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": k, "pct": round(100 * v / max(main_total, 1e-9), 1)}
            for k, v in c.most_common(top)
        ]

    return {
        "main_thread_busy_s": round(main_total, 2),
        "busy_s_by_thread": threads,
        "self": rows(self_c),
        "self_by_line": rows(lines_c),
        "inclusive": rows(incl_c),
    }


# -- report ---------------------------------------------------------------------------
def get(results: dict[str, Any], dotted: str) -> Any:
    cur: Any = results
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def judge(results: dict[str, Any]) -> dict[str, Any]:
    verdicts = {}
    for key, (op, target) in TARGETS.items():
        value = get(results, key)
        if value is None:
            continue
        met = value <= target if op == "<=" else value >= target
        verdicts[key] = {"value": value, "target": f"{op} {target:g}", "met": met}
        if get(results, key.split(".")[0] + ".exact") is False:
            verdicts[key] |= {"met": False, "note": "inexact replay: see the scenario's problems"}
    return verdicts


def print_table(results: dict[str, Any]) -> None:
    def f(v: Any, nd: int = 2) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.{nd}f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lat, thr, idle, cu, wc, cu10, many = (
        results.get(k, {})
        for k in (
            "latency",
            "throughput",
            "idle",
            "catchup",
            "write_cost",
            "catchup10k",
            "catchup_many",
        )
    )
    shapes = cu10.get("shapes", {})

    def shape_row(name: str, sh: dict[str, Any]) -> tuple[str, str, str]:
        return (
            f"catch-up 10k ({name} txn x rows) ms",
            f(sh.get("ms")),
            f"runs {sh.get('runs_ms')}; relay cpu ms {sh.get('relay_cpu_ms_runs')}"
            + ("" if sh.get("exact") else "; NOT EXACT"),
        )

    rows = [
        (
            "latency p50 / p99 (ms)",
            f"{f(lat.get('p50_ms'))} / {f(lat.get('p99_ms'))}",
            f"floor {f(lat.get('floor_p50_ms'))} / {f(lat.get('floor_p99_ms'))}; "
            f"read by client {f(lat.get('app_read_p50_ms'))} / {f(lat.get('app_read_p99_ms'))}; "
            f"relay cpu {f(lat.get('relay_cpu_util'))}, loadgen {f(lat.get('loadgen_cpu_util'))}",
        ),
        (
            "throughput delivered/s",
            f(thr.get("delivered_per_s")),
            f"p99 {f(thr.get('p99_ms'))} ms; relay {f(thr.get('relay_us_per_delivered'))} us/msg, "
            f"cpu {f(thr.get('relay_cpu_util'))}; loadgen cpu {f(thr.get('loadgen_cpu_util'))}",
        ),
        (
            "idle KB/connection",
            f(idle.get("kb_per_connection")),
            f"{f(idle.get('connections'))} conns, subscribed; "
            f"{f(idle.get('relay_us_per_open'))} us relay cpu per open",
        ),
        ("catch-up ms", f(cu.get("ms")), f"{f(cu.get('events'))} events; runs {cu.get('runs_ms')}"),
        *(shape_row(name, sh) for name, sh in shapes.items()),
        (
            "catch-up many: s to last subscribed",
            f(many.get("seconds"), 3),
            f"{f(many.get('clients'))} clients x {f(many.get('events_per_client'))} events "
            f"({f(many.get('orgs'))} orgs); per client p50 {f(many.get('p50_ms'), 1)} / "
            f"p99 {f(many.get('p99_ms'), 1)} ms; relay cpu {f(many.get('relay_cpu_s'))} s; "
            f"RSS {f(many.get('rss_before_kb'))} -> peak {f(many.get('rss_peak_kb'))} KB"
            + ("" if many.get("exact", True) else "; NOT EXACT"),
        ),
        (
            "write tps with / without doorbell",
            f"{f(wc.get('with_doorbell_tps'), 0)} / {f(wc.get('without_doorbell_tps'), 0)}",
            f"cost {f(wc.get('doorbell_cost_pct'), 1)} %, {f(wc.get('clients'))} clients, fsync on",
        ),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print()
    print(
        f"pgrelay bench  ({results['machine']['cpus']} cpus, "
        f"load {results['machine']['loadavg_start']} -> {results['machine']['loadavg_end']})"
    )
    for r in rows:
        print(f"  {r[0]:<{w0}}  {r[1]:>{w1}}   {r[2]}")
    print()
    print("targets:")
    for key, v in results.get("targets", {}).items():
        mark = "met   " if v["met"] else "MISSED"
        print(f"  {mark} {key} = {f(v['value'])} (target {v['target']})")
    prof = results.get("profile")
    if prof and prof.get("self"):
        print()
        print(
            f"relay profile under throughput (main thread, {prof['main_thread_busy_s']} s "
            "sampled busy; self time):"
        )
        for row in prof["self"][:10]:
            print(f"  {row['pct']:5.1f} %  {row['function']}")
    print()


# -- main -----------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument(
        "--only",
        default="latency,throughput,profile,catchup,catchup10k,catchup_many,idle,write_cost",
        help="comma-separated scenarios",
    )
    p.add_argument("--duration", type=float, default=15.0, help="latency/throughput seconds")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--workers", type=int, default=2, help="load generator processes")
    p.add_argument("--latency-rate", type=float, default=200.0)
    p.add_argument("--batch-rows", type=int, default=100, help="rows per throughput INSERT")
    p.add_argument("--emit-threads", type=int, default=2)
    p.add_argument(
        "--max-ahead-rows",
        type=int,
        default=400,
        help="how far the throughput emitter may run ahead of delivery",
    )
    p.add_argument(
        "--sample-every",
        type=int,
        default=4,
        help="throughput: read the timestamp of every Nth event",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="throughput: load workers sleep this long between reads, so that "
        "one recv() takes many frames (latency then reads up to this much late)",
    )
    p.add_argument("--profile-seconds", type=float, default=10.0)
    p.add_argument("--idle-connections", type=int, default=5000)
    p.add_argument("--catchup-events", type=int, default=1000)
    p.add_argument("--catchup-reps", type=int, default=5)
    p.add_argument("--catchup10k-events", type=int, default=10_000)
    p.add_argument("--catchup10k-reps", type=int, default=5, help="runs per shape")
    p.add_argument(
        "--catchup10k-shapes",
        default="100x100,1x10000,10000x1",
        help="how the missed events were written: TRANSACTIONSxROWS, comma-separated",
    )
    p.add_argument("--catchup-many-clients", type=int, default=100)
    p.add_argument("--catchup-many-orgs", type=int, default=100, help="clients share orgs evenly")
    p.add_argument("--catchup-many-events", type=int, default=1000, help="per org")
    p.add_argument("--catchup-many-txn-rows", type=int, default=100, help="rows per transaction")
    p.add_argument("--catchup-many-timeout", type=float, default=60.0)
    p.add_argument("--write-seconds", type=int, default=10)
    p.add_argument("--write-clients", type=int, default=4)
    p.add_argument(
        "--py-spy-blocking",
        action="store_true",
        help="pause the relay for each sample (py-spy's default; it charges "
        "nearly everything to the line of the send() syscall)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    p.add_argument(
        "--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(","))
    # SIGTERM unwinds like Ctrl-C, so that the cluster and the relay are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    loadgen.raise_nofile()
    ctx = multiprocessing.get_context("spawn")
    t_start = time.monotonic()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    workdir = Path(tempfile.mkdtemp(prefix="pgrelay-bench-"))
    # The cluster lives under our own directory, out of reach of anything that tidies
    # /tmp/pgrelay-pg-* (test runs on the same machine); the server's OS user must be
    # able to traverse it.
    workdir.chmod(0o755)
    tempfile.tempdir = str(workdir)
    cluster = Cluster()
    relay: Relay | None = None
    workers: LoadWorkers | None = None
    ok = False
    try:
        log("starting a throwaway durable cluster")
        cluster.start()
        results["machine"]["postgres"] = cluster.settings
        relay = Relay(cluster, workdir)
        log(f"pgrelay serve pid {relay.pid} on ws://{HOST}:{relay.ws_port}/v1")
        workers = LoadWorkers(ctx, args.workers, relay.ws_port)
        if only & {"latency", "throughput", "profile"}:
            org = str(uuid.uuid4())
            opened = workers.open(args.clients, org, "live")
            log(f"{opened['live']} clients subscribed in {opened['seconds']} s")
            if "latency" in only:
                results["latency"] = scenario_latency(ctx, cluster, relay, workers, org, args)
            if "throughput" in only:
                results["throughput"] = scenario_throughput(
                    ctx, cluster, relay, workers, org, args, duration=args.duration
                )
            if "profile" in only:
                if Path(args.py_spy).exists():
                    out = RESULTS / "profile-throughput.speedscope.json"
                    prof = scenario_throughput(
                        ctx,
                        cluster,
                        relay,
                        workers,
                        org,
                        args,
                        duration=args.profile_seconds,
                        profile_to=out,
                    )
                    summary = summarize_speedscope(out) if out.exists() else {}
                    results["profile"] = {
                        "tool": "py-spy record -r 100 -f speedscope"
                        + ("" if args.py_spy_blocking else " --nonblocking"),
                        "file": str(out.relative_to(REPO)),
                        "delivered_per_s_while_profiled": prof["delivered_per_s"],
                        "relay_cpu_util": prof["relay_cpu_util"],
                        **summary,
                    }
                    if "py_spy_error" in prof:
                        results["profile"]["error"] = prof["py_spy_error"]
                else:
                    results["profile"] = {"skipped": f"py-spy not found at {args.py_spy}"}
            workers.call("close_all")
            time.sleep(1.0)
        if "catchup" in only:
            results["catchup"] = scenario_catchup(cluster, relay, args)
        if "catchup10k" in only:
            results["catchup10k"] = scenario_catchup10k(cluster, relay, args)
        if "catchup_many" in only:
            # A fresh relay, so that its RSS is not hidden by memory earlier scenarios freed.
            relay.stop()
            relay = Relay(cluster, workdir)
            workers.stop()
            workers = LoadWorkers(ctx, args.workers, relay.ws_port)
            results["catchup_many"] = scenario_catchup_many(cluster, relay, workers, args)
        if "idle" in only:
            # A fresh relay: memory the earlier scenarios freed would hide the cost.
            relay.stop()
            relay = Relay(cluster, workdir)
            workers.stop()
            workers = LoadWorkers(ctx, args.workers, relay.ws_port)
            results["idle"] = scenario_idle(cluster, relay, workers, args)
            workers.call("close_all")
        workers.stop()
        workers = None
        relay.stop()
        relay = None
        if "write_cost" in only:
            if shutil.which("pgbench") or (cluster.pg.bindir / "pgbench").exists():
                results["write_cost"] = scenario_write_cost(ctx, cluster, workdir, args)
            else:
                results["write_cost"] = {"skipped": "pgbench not found (postgresql-client)"}
        ok = True
    finally:
        if workers is not None:
            workers.stop()
        if relay is not None:
            relay.stop()
            if not ok:
                log("relay log tail:\n" + relay.tail())
        cluster.stop()
        tempfile.tempdir = None
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir} (relay logs)")
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.monotonic() - t_start, 1)
    results["targets"] = judge(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    log(f"wrote {args.out} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
