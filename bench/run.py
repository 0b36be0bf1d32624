"""`make bench`: the real `pgrelay serve` under load, on a throwaway durable cluster.

Scenarios (see bench/README.md): app_latency (real `websockets` clients and
their floor), latency, throughput (+ a py-spy profile of the relay under it),
ramp (the highest sustained rate within a p99), catchup, catchup10k,
catchup_many, storm (10,000 clients reconnecting and resuming at once), idle,
workers (the ramp with `--workers 1` and 2), write_cost. Writes
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
import random
import re
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
from typing import Any, Protocol

import psycopg
from psycopg import sql

from bench import appclient, dbload, loadgen
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

#: name -> (operator, target). The name is the dotted key of the value in the
#: results, unless SOURCE says otherwise; RELATIVE targets are that key's value plus
#: the number.
TARGETS = {
    "latency.p50_ms": ("<=", 3.0),
    "latency.p99_ms": ("<=", 12.0),
    "throughput.delivered_per_s": (">=", 100_000.0),
    "idle.kb_per_connection": ("<=", 15.0),
    "catchup.ms": ("<=", 100.0),
    "catchup10k.ms": ("<=", 250.0),
    # Issue 12: what users see.
    "app_latency.one.p50_ms": ("<=", 0.5),
    "app_latency.one.p99_ms": ("<=", 3.0),
    "app_latency.hundred.p50_ms": ("<=", 2.5),
    "app_latency.hundred.p99_ms": ("<=", 10.0),
    "ramp.max_rate_p99_50ms": (">=", 150_000.0),
    "storm.seconds": ("<=", 5.0),
    "storm.relay_cpu_ms_per_resume": ("<=", 0.5),
    "idle.kb_per_connection<=12": ("<=", 12.0),
}
RELATIVE = {"app_latency.one.p50_ms": "app_latency.one.floor_p50_ms"}
SOURCE = {"idle.kb_per_connection<=12": "idle.kb_per_connection"}
#: The ramp's target is for `--workers 2`: judged on that run when there is one.
RAMP_TARGET_WORKERS = "2"
#: The ramp's bound on the p99 (kernel arrival stamp) of a step.
RAMP_P99_MS = 50.0


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


def machine_irq_s() -> float:
    """CPU seconds all cores spent in interrupts and softirqs since boot: loopback TCP
    is largely softirq work, charged to no process (so it shows up in "other")."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    return (parts[5] + parts[6]) / TICK


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (one pass over /proc)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(_stat_fields(int(entry))[1])
            except (OSError, IndexError, ValueError):
                continue
    out: list[int] = []
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


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


def listen_drops() -> dict[str, int]:
    """The kernel's count of connections dropped at a full accept queue (whole machine,
    /proc/net/netstat TcpExt: ListenOverflows, ListenDrops)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            row = dict(zip(head.split()[1:], vals.split()[1:], strict=False))
            return {k: int(row.get(k, 0)) for k in ("ListenOverflows", "ListenDrops")}
    return {}


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


def relay_supports_workers() -> bool:
    """Whether this daemon has `pgrelay serve --workers` (it refuses unknown settings)."""
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return "--workers" in proc.stdout


class Relay:
    """`pgrelay serve` as a subprocess on free ports; with `workers`, started with
    PGRELAY_WORKERS (N processes under one parent: CPU and RSS are summed over the
    parent and every process below it, and the parent's /metrics is the sum)."""

    def __init__(
        self,
        cluster: Cluster,
        workdir: Path,
        argv: list[str] | None = None,
        *,
        workers: str | None = None,
    ) -> None:
        self.workers = workers
        self._tree: tuple[float, list[int]] = (0.0, [])
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
            # The storm holds 10,000 clients (the default limit) and the idle
            # scenario 5,050: neither is about the total limit either.
            "PGRELAY_MAX_CONNECTIONS": "20000",
        }
        env.pop("PGRELAY_WORKERS", None)
        if workers is not None:
            env["PGRELAY_WORKERS"] = workers
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

    def pids(self) -> list[int]:
        """The relay's processes: its own, and with workers every one below it (the
        list is refreshed at most once a second: RssSampler calls this often)."""
        if self.workers is None:
            return [self.pid]
        now = time.monotonic()
        if now - self._tree[0] > 1.0:
            self._tree = (now, descendants(self.pid))
        return [self.pid, *self._tree[1]]

    def cpu_s(self) -> float:
        if self.workers is None:
            return cpu_s(self.pid)
        # Reaped workers' time is in the parent's cutime/cstime.
        return cpu_s(self.pid, children=True) + sum(cpu_s(p) for p in self.pids()[1:])

    def rss_kb(self) -> int:
        total = 0
        for p in self.pids():
            with contextlib.suppress(OSError):
                total += rss_kb(p)
        return total

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


class AppClients:
    """App-level clients (bench/appclient.py): `n` processes, each an asyncio loop
    holding `websockets` clients that json.loads every frame."""

    def __init__(self, ctx: Any, n: int, port: int) -> None:
        self.pipes = []
        self.procs = []
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=appclient.app_main, args=(child, i, HOST, port, SECRET), daemon=True
            )
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)

    def call(self, name: str, args: list[dict[str, Any]] | None = None) -> list[Any]:
        for i, pipe in enumerate(self.pipes):
            pipe.send((name, args[i] if args else {}))
        replies = []
        for pipe in self.pipes:
            if not pipe.poll(90):
                raise RuntimeError(f"app client process did not answer {name!r}")
            replies.append(pipe.recv())
        return replies

    def open(self, counts: list[int], org: str, prefix: str) -> dict[str, Any]:
        replies = self.call("open", [{"count": c, "org": org, "prefix": prefix} for c in counts])
        live = sum(r["live"] for r in replies)
        if live < sum(counts):
            raise RuntimeError(f"only {live} of {sum(counts)} app clients came up: {replies}")
        return {"live": live, "seconds": max(r["seconds"] for r in replies)}

    def samples(self) -> tuple[list[float], int, dict[str, int]]:
        out: list[float] = []
        events = 0
        errors: Counter[str] = Counter()
        for r in self.call("samples"):
            a = array("d")
            a.frombytes(r["samples"])
            out.extend(a)
            events += r["events"]
            errors.update(r["errors"])
        return out, events, dict(errors)

    def cpu_s(self) -> float:
        return sum(cpu_s(p.pid) for p in self.procs if p.pid is not None)

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, OSError, EOFError):
            self.call("exit")
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


class HasCpu(Protocol):
    def cpu_s(self) -> float: ...


class CpuWindow:
    """CPU seconds of the relay, the load generator (or the app clients), the database
    and the emitters between `start` and `stop`."""

    def __init__(self, relay: Relay | None, workers: HasCpu | None, cluster: Cluster) -> None:
        self.relay, self.workers, self.cluster = relay, workers, cluster
        self.extra: list[int] = []

    def _read(self) -> dict[str, float]:
        return {
            "relay": self.relay.cpu_s() if self.relay else 0.0,
            "loadgen": self.workers.cpu_s() if self.workers else 0.0,
            "postgres": self.cluster.cpu_s(),
            "emitters": sum(cpu_s(pid) for pid in self.extra),
            "machine": machine_busy_s(),
            "irq": machine_irq_s(),
        }

    def start(self, *extra_pids: int) -> None:
        self.extra = list(extra_pids)
        self.t0 = time.monotonic()
        self.c0 = self._read()

    def stop(self) -> dict[str, float]:
        c1 = self._read()
        wall = time.monotonic() - self.t0
        out = {f"{k}_cpu_s": round(c1[k] - self.c0[k], 2) for k in c1}
        ours = sum(c1[k] - self.c0[k] for k in c1 if k not in ("machine", "irq"))
        # CPU that none of the processes above used: other work on the machine, and
        # interrupts/softirqs (irq_cpu_s, part of it: loopback TCP).
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


# -- app-level latency ----------------------------------------------------------------
# What an application sees: `websockets` clients that json.loads every frame, timed
# after the parse; beside them, in the same run and on the same commits, the floor: a
# plain psycopg LISTEN session on the doorbell, timed when psycopg hands it the
# notification.
def scenario_app_latency(
    ctx: Any, cluster: Cluster, relay: Relay, args: argparse.Namespace
) -> dict[str, Any]:
    from importlib.metadata import version

    apps = AppClients(ctx, args.app_processes, relay.ws_port)
    out: dict[str, Any] = {
        "client": f"websockets {version('websockets')} (asyncio, defaults), json.loads per frame",
        "processes": args.app_processes,
    }
    try:
        for name, total in (("one", 1), ("hundred", args.clients)):
            org = str(uuid.uuid4())
            n = args.app_processes
            counts = (
                [1] + [0] * (n - 1)
                if total == 1
                else [total // n + (1 if i < total % n else 0) for i in range(n)]
            )
            opened = apps.open(counts, org, f"app-{name}")
            log(
                f"app_latency {name}: {opened['live']} websockets clients "
                f"({'/'.join(str(c) for c in counts)} per process), "
                f"{args.latency_rate:.0f} events/s for {args.app_duration + 1:.0f} s"
            )
            out[name] = app_latency_run(ctx, cluster, relay, apps, org, total, args)
            apps.call("close_all")
            time.sleep(0.3)
    finally:
        apps.stop()
    return out


def app_latency_run(
    ctx: Any,
    cluster: Cluster,
    relay: Relay,
    apps: AppClients,
    org: str,
    clients: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    rate, duration, warmup = args.latency_rate, args.app_duration, 1.0
    count = int(rate * (duration + warmup))
    skip = int(rate * warmup)
    emitter, epipe = spawn(ctx, dbload.paced_emitter, cluster.dsn(BACKEND), org, rate, count)
    expect(epipe, 30, "paced emitter")
    floor, fpipe = spawn(ctx, dbload.listener, cluster.dsn(BACKEND), "relay_events")
    expect(fpipe, 30, "LISTEN client")
    window = CpuWindow(relay, apps, cluster)
    try:
        epipe.send("go")
        time.sleep(warmup)
        apps.call("reset")
        window.start(emitter.pid, floor.pid)
        raw = expect(epipe, duration + 60, "paced emitter")
        time.sleep(0.5)  # the last events in flight
        cpu = window.stop()
        samples, events, errors = apps.samples()
        fpipe.send("stop")
        floor_raw = expect(fpipe, 10, "LISTEN client")
    finally:
        reap(emitter)
        reap(floor)
    stamps, notes = array("d"), array("d")
    stamps.frombytes(raw)
    notes.frombytes(floor_raw)
    paired = min(len(stamps), len(notes))
    fl = latency_stats([notes[i] - stamps[i] for i in range(skip, paired)])
    st = latency_stats(samples)
    expected = (count - skip) * clients
    return {
        "p50_ms": st["p50_ms"],
        "p99_ms": st["p99_ms"],
        "floor_p50_ms": fl["p50_ms"],
        "floor_p99_ms": fl["p99_ms"],
        "relay_added_p50_ms": round(st["p50_ms"] - fl["p50_ms"], 3),
        "app": st,
        "floor": fl
        | {
            "notifications": len(notes),
            "commits": len(stamps),
            "matched_by_order": len(notes) == len(stamps),
        },
        "clients": clients,
        "rate_per_s": rate,
        "deliveries_per_s": rate * clients,
        "received": events,
        "expected_about": expected,
        "client_errors": errors,
        "relay_us_per_delivered": round(cpu["relay_cpu_s"] / max(events, 1) * 1e6, 2),
        "app_clients_cpu_s": cpu["loadgen_cpu_s"],
        "app_clients_cpu_util": cpu["loadgen_cpu_util"],
        **{k: v for k, v in cpu.items() if not k.startswith("loadgen")},
    }


# -- sustained-rate ramp --------------------------------------------------------------
def parse_steps(spec: str) -> list[int]:
    """START:STOP:STEP (deliveries/s, STOP included) or a comma-separated list."""
    if ":" in spec:
        a, b, c = (int(float(x)) for x in spec.split(":"))
        return list(range(a, b + 1, c))
    return [int(float(x)) for x in spec.split(",")]


def drain(workers: LoadWorkers, want_events: int, bound_s: float) -> tuple[bool, float]:
    """Wait (bounded) until the load workers have received `want_events` in all and
    every client the same number; returns (done, seconds waited)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound_s:
        snap = workers.snapshot()
        if snap["events"] >= want_events and snap["per_conn_min"] == snap["per_conn_max"]:
            return True, round(time.monotonic() - t0, 2)
        time.sleep(0.05)
    return False, round(time.monotonic() - t0, 2)


def ramp_run(
    ctx: Any,
    cluster: Cluster,
    relay: Relay,
    workers: LoadWorkers,
    org: str,
    args: argparse.Namespace,
    label: str = "ramp",
) -> dict[str, Any]:
    """Raise the delivered rate step by step (the same 100 raw clients, reading at
    once: no batching); a step passes when its p99 (kernel arrival stamp) is within
    50 ms and at least 90 % of its rate was delivered. A step that fails is run again
    (--ramp-retries, 1: one stall on a shared machine fails a 4 s window's p99); the
    ramp stops at a step that fails every attempt, or at --ramp-max-seconds."""
    clients = args.clients
    steps = parse_steps(args.ramp_steps)
    settle, measure = args.ramp_settle_s, args.ramp_step_s
    bound = RAMP_P99_MS
    log(
        f"{label}: {clients} clients, steps of {steps[1] - steps[0] if len(steps) > 1 else 0:,} "
        f"deliveries/s from {steps[0]:,} ({settle + measure:.0f} s each), "
        f"until p99 > {bound:g} ms"
    )
    emitter, epipe = spawn(
        ctx,
        dbload.rate_emitter,
        cluster.dsn(BACKEND),
        org,
        args.ramp_tick_ms / 1000,
        args.ramp_max_rows,
    )
    expect(epipe, 30, "rate emitter")
    workers.snapshot(batch_wait_s=0)
    out_steps: list[dict[str, Any]] = []
    best: int | None = None
    stopped = "all steps passed"
    t_end = time.monotonic() + args.ramp_max_seconds
    try:
        plan = [(target, attempt) for target in steps for attempt in range(1 + args.ramp_retries)]
        for target, attempt in plan:
            if best is not None and best >= target:
                continue  # passed at an earlier attempt
            if time.monotonic() > t_end:
                stopped = f"--ramp-max-seconds {args.ramp_max_seconds:g} reached"
                break
            ev_rate = target / clients
            base = workers.snapshot()["events"]
            window = CpuWindow(relay, workers, cluster)
            epipe.send(("step", {"rate": ev_rate, "seconds": settle + measure}))
            time.sleep(settle)
            snap0 = workers.snapshot(reset_samples=True, sample_every=args.ramp_sample_every)
            window.start(emitter.pid)
            time.sleep(measure)
            snap1 = workers.snapshot()
            cpu = window.stop()
            samples, read_samples = workers.samples()
            em = expect(epipe, settle + measure + 60, "rate emitter")
            drained, drain_s = drain(workers, base + em["rows"] * clients, args.ramp_drain_s)
            final = workers.snapshot()
            delivered = snap1["events"] - snap0["events"]
            per_s = delivered / cpu["wall_s"]
            st = latency_stats(samples)
            rd = latency_stats(read_samples)
            ok = (
                st["p99_ms"] <= bound
                and per_s >= 0.9 * target
                and drained
                and final["resyncs"] == snap0["resyncs"]
            )
            step = {
                "target_per_s": target,
                "delivered_per_s": round(per_s),
                "events_per_s": round(ev_rate, 1),
                "p50_ms": st["p50_ms"],
                "p99_ms": st["p99_ms"],
                "max_ms": st["max_ms"],
                "app_read_p99_ms": rd["p99_ms"],
                "samples": st["samples"],
                "relay_us_per_delivered": round(cpu["relay_cpu_s"] / max(delivered, 1) * 1e6, 2),
                "relay_cpu_util": cpu["relay_cpu_util"],
                "loadgen_cpu_util": cpu["loadgen_cpu_util"],
                "postgres_cpu_s": cpu["postgres_cpu_s"],
                "other_cpu_s": cpu["other_cpu_s"],
                "statements": em["statements"],
                "emitter_late_ticks": em["late_ticks"],
                "rows_per_s_emitted": round(em["rows_per_s"]),
                "drained": drained,
                "drain_s": drain_s,
                "resyncs": final["resyncs"] - snap0["resyncs"],
                "attempt": attempt + 1,
                "passed": ok,
            }
            out_steps.append(step)
            log(
                f"  {target:>7,}/s: delivered {per_s:>9,.0f}/s  p50 {st['p50_ms']:7.2f}  "
                f"p99 {st['p99_ms']:8.2f} ms  relay {step['relay_us_per_delivered']:5.2f} us "
                f"({cpu['relay_cpu_util']:.2f} cpu)  {'ok' if ok else 'FAIL'}"
                + (f" (attempt {attempt + 1})" if attempt else "")
            )
            if ok:
                best = target
            elif attempt == args.ramp_retries:
                stopped = f"step {target:,}/s did not pass ({attempt + 1} attempts)"
                break
    finally:
        with contextlib.suppress(OSError, EOFError):
            epipe.send(("exit", {}))
        reap(emitter)
    return {
        "max_rate_p99_50ms": best or 0,
        "latency": "kernel arrival stamp at the client socket (SO_TIMESTAMPNS)",
        "p99_bound_ms": bound,
        "clients": clients,
        "relay_workers": relay.workers or "default (unset)",
        "stopped": stopped,
        "steps": out_steps,
    }


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


# -- reconnect storm ------------------------------------------------------------------
def scenario_storm(
    ctx: Any, cluster: Cluster, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """10,000 clients, each with a cursor for one org that then missed a few events,
    reconnect and resume with starts spread over one second (as after a deploy's
    1012). Pass 1 is measured; pass 2 (the same clients again, from the cursors pass
    1 gave them) is profiled with py-spy when it is there."""
    n, n_orgs = args.storm_clients, args.storm_orgs
    orgs = [str(uuid.uuid4()) for _ in range(n_orgs)]
    relay = Relay(cluster, workdir, workers=args.relay_workers)
    workers = LoadWorkers(ctx, args.load_processes, relay.ws_port)
    out: dict[str, Any] = {}
    try:
        log(f"storm: {n:,} clients over {n_orgs:,} orgs; cursors first (one subscribe per org)")
        # A cursor per org: one fresh subscribe each (a cursor is a snapshot of the
        # database; every client of the org holds the one its org got).
        workers.open(n_orgs, None, "storm-cursor", orgs=orgs, timeout_s=120)
        by_org = {org: cur for plan in workers.cursors() for org, cur in plan}
        if len(by_org) != n_orgs:
            raise RuntimeError(f"storm: {len(by_org)} cursors for {n_orgs} orgs")
        workers.call("close_all")
        client_plan = [[orgs[i % n_orgs], by_org[orgs[i % n_orgs]]] for i in range(n)]
        splits = workers.split(n)
        plans, start = [], 0
        for count in splits:
            plans.append(client_plan[start : start + count])
            start += count
        passes = max(1, args.storm_passes)
        for k in range(passes):
            last = k == passes - 1 and passes > 1
            profile = last and Path(args.py_spy).exists() and not args.no_profile
            res = storm_pass(ctx, cluster, relay, workers, orgs, plans, k, args, profile=profile)
            if k == 0:
                out |= res
            else:
                out.setdefault("passes", []).append(res)
            # The next pass resumes from the cursors this one ended with.
            plans = workers.cursors()
        if passes > 1 and not Path(args.py_spy).exists():
            out["profile"] = {"skipped": f"py-spy not found at {args.py_spy}"}
    finally:
        workers.stop()
        relay.stop()
    return out


def storm_pass(
    ctx: Any,
    cluster: Cluster,
    relay: Relay,
    workers: LoadWorkers,
    orgs: list[str],
    plans: list[list[list[str]]],
    k: int,
    args: argparse.Namespace,
    *,
    profile: bool,
) -> dict[str, Any]:
    n = sum(len(p) for p in plans)
    missed, jitter = args.storm_missed, args.storm_jitter_s
    # Everyone gone (the deploy's 1012), then each org gets its missed events.
    workers.call("close_all")
    deadline = time.monotonic() + 20
    while relay.metric("pgrelay_connections") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    prefix = f"storm{k}:"
    read0 = relay.metric("pgrelay_events_read_total")
    with emit_session(cluster) as conn:
        emit_turns(conn, orgs, prefix, missed, 1)
    wait_tail(relay, read0 + missed * len(orgs), timeout_s=60)
    expected = storm_expected(cluster, orgs, prefix)
    rng = random.Random(12 + k)
    for pipe, plan in zip(workers.pipes, plans, strict=True):
        pipe.send(
            (
                "storm_prepare",
                {
                    "plan": plan,
                    "offsets": [rng.uniform(0, jitter) for _ in plan],
                    "sub_prefix": f"storm{k}",
                },
            )
        )
    for pipe in workers.pipes:
        expect(pipe, 120, "storm_prepare")
    metrics0 = {m: relay.metric(m) for m in STORM_METRICS}
    snap0 = workers.snapshot()
    drops0 = listen_drops()
    spy, spy_out = None, RESULTS / "profile-storm.speedscope.json"
    if profile:
        # Sampled for the whole pass: stopped (SIGINT: it writes its file) when the
        # pass ends; -d only bounds it.
        spy = start_py_spy(relay, spy_out, args, seconds=args.storm_timeout_s + 30)
        time.sleep(1.0)  # py-spy attaches
    label = "storm (profiled)" if profile else "storm"
    log(f"{label} pass {k + 1}: {n:,} clients reconnect and resume {missed} missed events each")
    window = CpuWindow(relay, workers, cluster)
    window.start()
    t0 = time.time() + 0.2
    for pipe in workers.pipes:
        pipe.send(("storm_go", {"t0": t0, "timeout_s": args.storm_timeout_s}))
    times: list[dict[str, Any]] = []
    for pipe in workers.pipes:
        times.extend(expect(pipe, args.storm_timeout_s + 60, "storm")["clients"])
    cpu = window.stop()
    checks = [c for r in workers.call("storm_check") for c in r["clients"]]
    snap1 = workers.snapshot()
    metrics = {m: int(relay.metric(m) - metrics0[m]) for m in STORM_METRICS}
    drops = {k: v - drops0.get(k, 0) for k, v in listen_drops().items()}
    prof: dict[str, Any] = {}
    if spy is not None:
        prof = finish_py_spy(spy, spy_out, args)
    results = [t | c for t, c in zip(times, checks, strict=True)]
    inexact = []
    for r in results:
        want = expected.get(r["org"], [])
        if r["ids"] != want:
            r["problems"].append(f"ids {r['ids'][:6]} != table {want[:6]}")
        if r["replayed"] is not None and r["replayed"] != len(want):
            r["problems"].append(f"replayed {r['replayed']}, table {len(want)}")
        if r["problems"]:
            inexact.append(r)
    done = [r for r in results if r["replayed"] is not None]
    fails = sorted(r["failed_after_s"] for r in results if r["failed_after_s"])
    per_client = sorted((r["arrived"] - r["started"]) * 1000 for r in done)
    sub_ms = sorted((r["arrived"] - r["sent"]) * 1000 for r in done)
    first = min(r["started"] for r in results)
    seconds = max(r["arrived"] for r in done) - first if done else None
    problem_kinds: Counter[str] = Counter(
        re.sub(r"[0-9a-f-]{8,}|\d+", "N", r["problems"][0])[:60] for r in inexact
    )
    if inexact:
        log(f"storm: {len(inexact)} clients NOT EXACT, e.g. {inexact[0]['problems']}")
    res: dict[str, Any] = {
        "clients": n,
        "orgs": len(orgs),
        "missed_per_client": missed,
        "jitter_s": jitter,
        "exact": not inexact and len(results) == n,
        "exact_clients": n - len(inexact),
        "failures": len(inexact),
        "failure_kinds": dict(problem_kinds.most_common(5)),
        "problems": [
            {"org": r["org"], "problems": r["problems"], "failed_after_s": r["failed_after_s"]}
            for r in inexact[:5]
        ],
        "failed_after_s": {
            "min": min(fails, default=None),
            "p50": round(percentile(fails, 50), 3) if fails else None,
            "max": max(fails, default=None),
        },
        "seconds": round(seconds, 3) if seconds is not None else None,
        "starts_spread_s": round(max(r["started"] for r in results) - first, 3),
        "p50_ms": round(percentile(per_client, 50), 1),
        "p99_ms": round(percentile(per_client, 99), 1),
        "max_ms": round(per_client[-1], 1) if per_client else None,
        "subscribe_p50_ms": round(percentile(sub_ms, 50), 1),
        "subscribe_p99_ms": round(percentile(sub_ms, 99), 1),
        "relay_cpu_ms_per_resume": round(cpu["relay_cpu_s"] / n * 1000, 3),
        "postgres_cpu_ms_per_resume": round(cpu["postgres_cpu_s"] / n * 1000, 3),
        "loadgen_cpu_ms_per_client": round(cpu["loadgen_cpu_s"] / n * 1000, 3),
        "client_errors": {
            k2: v - snap0["errors"].get(k2, 0)
            for k2, v in snap1["errors"].items()
            if v != snap0["errors"].get(k2, 0)
        },
        "client_closes": {
            k2: v - snap0["closes"].get(k2, 0)
            for k2, v in snap1["closes"].items()
            if v != snap0["closes"].get(k2, 0)
        },
        "relay_metrics": metrics,
        "kernel_accept_queue_drops": drops,
        "relay_rss_kb_after": relay.rss_kb(),
        **cpu,
    }
    if profile:
        res["profile"] = prof
    return res


STORM_METRICS = (
    "pgrelay_catch_up_rounds_total",
    "pgrelay_resyncs_total",
    "pgrelay_outbox_overflows_total",
    "pgrelay_slow_client_closes_total",
)


def storm_expected(cluster: Cluster, orgs: list[str], prefix: str) -> dict[str, list[int]]:
    """From the table (as the superuser: row-level security is forced for everyone
    else): per org, the ids of this pass's rows in (xid, id) order, the order a
    catch-up replays them in."""
    with psycopg.connect(cluster.pg.dsn("postgres", DBNAME), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT organization_id::text, array_agg(id ORDER BY xid, id) FROM relay.events "
            "WHERE organization_id = ANY(%s::uuid[]) AND starts_with(entity_id, %s) GROUP BY 1",
            (orgs, prefix),
        ).fetchall()
    return {org: [int(i) for i in ids] for org, ids in rows}


def start_py_spy(
    relay: Relay, out: Path, args: argparse.Namespace, *, seconds: float
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            args.py_spy,
            "record",
            "-p",
            str(relay.pid),
            "-d",
            str(max(1, int(seconds))),
            "-r",
            "100",
            "-f",
            "speedscope",
            "-o",
            str(out),
            *([] if args.py_spy_blocking else ["--nonblocking"]),
            *(["--subprocesses"] if relay.workers else []),
            *args.py_spy_extra.split(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finish_py_spy(
    spy: subprocess.Popen[bytes], out: Path, args: argparse.Namespace
) -> dict[str, Any]:
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)
    try:
        _, err = spy.communicate(timeout=60)
        error = err.decode(errors="replace")[-500:] if spy.returncode else ""
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.communicate()
        error = "py-spy timed out"
    prof: dict[str, Any] = {
        "tool": "py-spy record -r 100 -f speedscope"
        + ("" if args.py_spy_blocking else " --nonblocking")
        + (f" {args.py_spy_extra}" if args.py_spy_extra else ""),
        "file": str(out.relative_to(REPO)),
    }
    if error:
        prof["error"] = error
    if out.exists():
        prof |= summarize_speedscope(out)
    return prof


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


# -- relay workers --------------------------------------------------------------------
def scenario_workers(
    ctx: Any,
    cluster: Cluster,
    workdir: Path,
    args: argparse.Namespace,
    results: dict[str, Any],
) -> dict[str, Any]:
    """The sustained-rate ramp against `pgrelay serve --workers 1` and `--workers 2`
    (fresh relays, the same 100 clients and steps)."""
    if not relay_supports_workers():
        return {
            "skipped": "`pgrelay serve --help` lists no --workers: this daemon has no "
            "worker processes yet (it would refuse PGRELAY_WORKERS)"
        }
    out: dict[str, Any] = {}
    for n in ("1", "2"):
        ramp = results.get("ramp")
        if n == args.relay_workers and ramp and "steps" in ramp:
            out[f"w{n}"] = ramp | {"reused": "the ramp scenario of this run"}
            continue
        relay = Relay(cluster, workdir, workers=n)
        workers = LoadWorkers(ctx, args.load_processes, relay.ws_port)
        try:
            org = str(uuid.uuid4())
            workers.open(args.clients, org, f"workers{n}")
            out[f"w{n}"] = ramp_run(
                ctx, cluster, relay, workers, org, args, label=f"workers {n}: ramp"
            )
        finally:
            workers.stop()
            relay.stop()
    one, two = out["w1"]["max_rate_p99_50ms"], out["w2"]["max_rate_p99_50ms"]
    out["max_rate_p99_50ms"] = {"1": one, "2": two}
    out["speedup"] = round(two / one, 2) if one else None
    return out


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
        for marker in (f"{REPO}/", "/site-packages/", "/lib/python3.11/", "/lib/python3"):
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


def ramp_for_target(results: dict[str, Any]) -> tuple[Any, str]:
    """The ramp the target is judged on: the `--workers 2` one when this run has it
    (the workers scenario, or the ramp itself run with --workers 2), else the ramp as
    run, with a note."""
    w2 = get(results, f"workers.w{RAMP_TARGET_WORKERS}.max_rate_p99_50ms")
    if w2 is not None:
        return w2, f"from workers.w{RAMP_TARGET_WORKERS}"
    ramp = results.get("ramp") or {}
    ran = str(ramp.get("relay_workers"))
    note = (
        ""
        if ran == RAMP_TARGET_WORKERS
        else f"measured with relay workers {ran}; the target is for --workers {RAMP_TARGET_WORKERS}"
    )
    return ramp.get("max_rate_p99_50ms"), note


def judge(results: dict[str, Any]) -> dict[str, Any]:
    verdicts = {}
    for name, (op, number) in TARGETS.items():
        key = SOURCE.get(name, name)
        note = ""
        value = get(results, key)
        if name == "ramp.max_rate_p99_50ms":
            value, note = ramp_for_target(results)
        if value is None:
            continue
        target = number
        shown = f"{op} {number:g}"
        if name in RELATIVE:
            base = get(results, RELATIVE[name])
            if base is None:
                continue
            target = base + number
            shown = f"{op} {RELATIVE[name]} ({base:g}) + {number:g} = {target:g}"
        met = value <= target if op == "<=" else value >= target
        verdicts[name] = {"value": value, "target": shown, "met": met}
        if note:
            verdicts[name]["note"] = note
        if get(results, key.split(".")[0] + ".exact") is False:
            verdicts[name] |= {"met": False, "note": "inexact replay: see the scenario's problems"}
        if name.startswith("app_latency.hundred"):
            rate = get(results, "app_latency.hundred.deliveries_per_s")
            if rate != 20_000:
                verdicts[name]["note"] = f"measured at {rate} deliveries/s; the target is at 20,000"
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
    app, ramp, storm, wk = (results.get(k, {}) for k in ("app_latency", "ramp", "storm", "workers"))

    def app_row(name: str, a: dict[str, Any]) -> tuple[str, str, str]:
        return (
            f"app latency, {f(a.get('clients'))} client(s) p50 / p99 (ms)",
            f"{f(a.get('p50_ms'))} / {f(a.get('p99_ms'))}",
            f"floor {f(a.get('floor_p50_ms'))} / {f(a.get('floor_p99_ms'))}; "
            f"{f(a.get('deliveries_per_s'), 0)} deliveries/s; relay cpu "
            f"{f(a.get('relay_cpu_util'))} ({f(a.get('relay_us_per_delivered'))} us each), "
            f"clients {f(a.get('app_clients_cpu_util'))}",
        )

    def ramp_rows(label: str, r: dict[str, Any]) -> list[tuple[str, str, str]]:
        if not r.get("steps"):
            return []
        steps = r["steps"]
        return [
            (
                f"{label}: max rate, p99 <= 50 ms",
                f(r.get("max_rate_p99_50ms")),
                f"workers {r.get('relay_workers')}; {r.get('stopped')}; per step "
                + ", ".join(
                    f"{st['target_per_s'] // 1000}k: p99 {st['p99_ms']:.1f} ms "
                    f"{st['relay_us_per_delivered']:.1f} us" + ("" if st["passed"] else " FAIL")
                    for st in steps
                ),
            )
        ]

    storm_rows: list[tuple[str, str, str]] = []
    if storm.get("clients"):
        storm_rows.append(
            (
                "storm: s until all resumed",
                f(storm.get("seconds"), 3),
                f"{f(storm.get('clients'))} clients x {f(storm.get('missed_per_client'))} "
                f"missed; {f(storm.get('failures'))} failures; per client p50 "
                f"{f(storm.get('p50_ms'), 1)} / p99 {f(storm.get('p99_ms'), 1)} ms; relay "
                f"{f(storm.get('relay_cpu_ms_per_resume'), 3)} ms cpu per resume"
                + ("" if storm.get("exact") else "; NOT EXACT"),
            )
        )
        for i, ps in enumerate(storm.get("passes", []), start=2):
            storm_rows.append(
                (
                    f"storm pass {i}" + (" (profiled)" if ps.get("profile") else ""),
                    f(ps.get("seconds"), 3),
                    f"{f(ps.get('failures'))} failures; p50 {f(ps.get('p50_ms'), 1)} / p99 "
                    f"{f(ps.get('p99_ms'), 1)} ms; relay "
                    f"{f(ps.get('relay_cpu_ms_per_resume'), 3)} ms cpu per resume",
                )
            )

    def shape_row(name: str, sh: dict[str, Any]) -> tuple[str, str, str]:
        return (
            f"catch-up 10k ({name} txn x rows) ms",
            f(sh.get("ms")),
            f"runs {sh.get('runs_ms')}; relay cpu ms {sh.get('relay_cpu_ms_runs')}"
            + ("" if sh.get("exact") else "; NOT EXACT"),
        )

    rows = [
        *(app_row(name, app[name]) for name in ("one", "hundred") if name in app),
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
        *ramp_rows("ramp", ramp),
        *ramp_rows("workers 1", wk.get("w1", {})),
        *ramp_rows("workers 2", wk.get("w2", {})),
        *([("workers", "skipped", str(wk["skipped"]))] if "skipped" in wk else []),
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
        *storm_rows,
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
        note = f"  [{v['note']}]" if v.get("note") else ""
        print(f"  {mark} {key} = {f(v['value'])} (target {v['target']}){note}")
    prof = results.get("profile")
    if prof and prof.get("self"):
        print()
        print(
            f"relay profile under throughput (main thread, {prof['main_thread_busy_s']} s "
            "sampled busy; self time):"
        )
        for row in prof["self"][:10]:
            print(f"  {row['pct']:5.1f} %  {row['function']}")
    sprof = next((p["profile"] for p in storm.get("passes", []) if p.get("profile")), None)
    if sprof and sprof.get("self"):
        print()
        print(
            f"relay profile during the storm (main thread, {sprof['main_thread_busy_s']} s "
            "sampled busy; self time):"
        )
        for row in sprof["self"][:10]:
            print(f"  {row['pct']:5.1f} %  {row['function']}")
    print()


# -- main -----------------------------------------------------------------------------
SCENARIOS = (
    "app_latency",
    "latency",
    "throughput",
    "profile",
    "ramp",
    "catchup",
    "catchup10k",
    "catchup_many",
    "storm",
    "idle",
    "workers",
    "write_cost",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios, of: {','.join(SCENARIOS)}",
    )
    p.add_argument(
        "--workers",
        dest="relay_workers",
        default=None,
        metavar="N|auto",
        help="relay worker processes: PGRELAY_WORKERS for every relay started "
        "(default: unset, the daemon's own default)",
    )
    p.add_argument(
        "--load-processes",
        type=int,
        default=2,
        help="load generator processes (this was --workers before the relay had workers)",
    )
    p.add_argument("--duration", type=float, default=15.0, help="latency/throughput seconds")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--latency-rate", type=float, default=200.0)
    p.add_argument(
        "--app-duration", type=float, default=10.0, help="app_latency seconds, per client count"
    )
    p.add_argument("--app-processes", type=int, default=2, help="app client processes")
    p.add_argument(
        "--ramp-steps",
        default="20000:300000:20000",
        help="deliveries/s per step: START:STOP:STEP or a comma-separated list",
    )
    p.add_argument("--ramp-step-s", type=float, default=4.0, help="measured seconds per step")
    p.add_argument("--ramp-settle-s", type=float, default=1.0, help="unmeasured start of a step")
    p.add_argument("--ramp-drain-s", type=float, default=10.0, help="bound on a step's drain")
    p.add_argument("--ramp-max-seconds", type=float, default=100.0, help="bound on the ramp")
    p.add_argument(
        "--ramp-retries",
        type=int,
        default=1,
        help="a failing step is run again this many times before the ramp stops",
    )
    p.add_argument("--ramp-tick-ms", type=float, default=10.0, help="ramp: one INSERT per tick")
    p.add_argument("--ramp-max-rows", type=int, default=5000, help="ramp: rows per INSERT, at most")
    p.add_argument(
        "--ramp-sample-every", type=int, default=4, help="ramp: read the ts of every Nth event"
    )
    p.add_argument("--storm-clients", type=int, default=10_000)
    p.add_argument("--storm-orgs", type=int, default=1000, help="storm clients share orgs evenly")
    p.add_argument("--storm-missed", type=int, default=3, help="events each org missed")
    p.add_argument("--storm-jitter-s", type=float, default=1.0, help="starts spread over this")
    p.add_argument("--storm-timeout-s", type=float, default=60.0, help="bound on one pass")
    p.add_argument(
        "--storm-passes",
        type=int,
        default=2,
        help="storm passes (the same clients again, from their new cursors); the first "
        "is reported, the last profiled when there are two or more",
    )
    p.add_argument("--no-profile", action="store_true", help="no py-spy in the storm")
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
    p.add_argument(
        "--py-spy-extra",
        default="",
        help="more py-spy record arguments for the storm's profile (e.g. --gil)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    p.add_argument(
        "--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"--only: unknown {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.relay_workers is not None and not relay_supports_workers():
        raise SystemExit(
            "--workers: `pgrelay serve --help` lists no --workers; this daemon has no "
            "worker processes (run without --workers)"
        )
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
        relay = Relay(cluster, workdir, workers=args.relay_workers)
        log(f"pgrelay serve pid {relay.pid} on ws://{HOST}:{relay.ws_port}/v1")
        if "app_latency" in only:
            results["app_latency"] = scenario_app_latency(ctx, cluster, relay, args)
        workers = LoadWorkers(ctx, args.load_processes, relay.ws_port)
        if only & {"latency", "throughput", "profile", "ramp"}:
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
            if "ramp" in only:
                results["ramp"] = ramp_run(ctx, cluster, relay, workers, org, args)
            workers.call("close_all")
            time.sleep(1.0)
        if "catchup" in only:
            results["catchup"] = scenario_catchup(cluster, relay, args)
        if "catchup10k" in only:
            results["catchup10k"] = scenario_catchup10k(cluster, relay, args)
        if "catchup_many" in only:
            # A fresh relay, so that its RSS is not hidden by memory earlier scenarios freed.
            relay.stop()
            relay = Relay(cluster, workdir, workers=args.relay_workers)
            workers.stop()
            workers = LoadWorkers(ctx, args.load_processes, relay.ws_port)
            results["catchup_many"] = scenario_catchup_many(cluster, relay, workers, args)
        workers.stop()
        workers = None
        relay.stop()
        relay = None
        if "storm" in only:
            # Its own relay and load generator (10,000 connections), stopped after.
            results["storm"] = scenario_storm(ctx, cluster, workdir, args)
        if "idle" in only:
            # A fresh relay: memory the earlier scenarios freed would hide the cost.
            relay = Relay(cluster, workdir, workers=args.relay_workers)
            workers = LoadWorkers(ctx, args.load_processes, relay.ws_port)
            results["idle"] = scenario_idle(cluster, relay, workers, args)
            workers.call("close_all")
            workers.stop()
            workers = None
            relay.stop()
            relay = None
        if "workers" in only:
            results["workers"] = scenario_workers(ctx, cluster, workdir, args, results)
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
