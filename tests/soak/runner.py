"""The soak's conductor: a cluster of its own, two relays, client processes,
the writers, the fault schedule, the drain, and the verdict."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import trio

from tests.pgharness import BACKEND, DAEMON, OWNER, Database, Server, create_template
from tests.soak.oracle import Row, Verdict, judge, percentile
from tests.soak.plan import Plan, RelayFault, make_plan
from tests.soak.relays import REPO, Relay
from tests.soak.writer import Writer

SECRET = "soak-secret-" + "s" * 40
#: Settings of both relays (PGRELAY_*); the rest are the defaults. B adds a short poll
#: interval; A keeps the default timer. Short leeway and slow-client timeout, so that
#: expiring tokens and clients that stop reading are acted on within the run.
RELAY_SETTINGS = {
    "PGRELAY_JWT_SECRET": SECRET,
    "PGRELAY_JWT_LEEWAY_S": "1",
    "PGRELAY_SLOW_CLIENT_TIMEOUT_S": "5",
    "PGRELAY_LOG_FORMAT": "json",
    "PGRELAY_LOG_LEVEL": "info",
    "PGRELAY_SHUTDOWN_TIMEOUT_S": "3",
}
POLL_INTERVAL_B_MS = "300"
CLIENT_PROCESSES = 2
CLIENTS_READY_TIMEOUT_S = 90.0
SAMPLE_EVERY_S = 1.0
PROCESS_EXIT_TIMEOUT_S = 15.0
DOORBELL_LOCK_TIMEOUT = "300ms"
DOORBELL_TRIES = 20
LISTENER_TRIES = 50


@dataclass
class Options:
    seconds: float = 300.0
    clients: int = 300
    seed: int | None = None
    orgs: int = 20
    single_rate: float = 50.0
    drain_s: float | None = None
    """How long the drain may take (default: 30 s + 10 % of the run, at most 120 s)."""
    faults: bool = True
    """False: no fault of any kind (a check of the harness itself)."""
    relay_env: dict[str, str] = field(default_factory=dict)
    """PGRELAY_* settings for both relays, over RELAY_SETTINGS."""
    keep: bool = False
    """Keep the run directory (logs, client records) even when the run passes."""
    progress: bool = True


@dataclass
class Run:
    options: Options
    plan: Plan
    rundir: Path
    server: Server | None = None
    db: Database | None = None
    relays: list[Relay] = field(default_factory=list)
    client_procs: list[trio.Process] = field(default_factory=list)
    writer: Writer | None = None
    executed: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        if self.options.progress:
            print(f"soak: {text}", file=sys.stderr, flush=True)


def run_soak(options: Options) -> tuple[Verdict, Path]:
    """Run one soak; returns the verdict and the run directory (logs, records)."""
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(10**9)
    options.seed = seed
    plan = make_plan(seed, options.seconds, options.clients, options.orgs, faults=options.faults)
    rundir = Path(tempfile.mkdtemp(prefix="pgrelay-soak-"))
    run = Run(options, plan, rundir)
    verdict = trio.run(_main, run)
    if verdict.passed and not options.keep:
        shutil.rmtree(rundir, ignore_errors=True)
    return verdict, rundir


async def _main(run: Run) -> Verdict:
    run.say(f"seed={run.plan.seed} seconds={run.plan.seconds:g} run directory {run.rundir}")
    try:
        run.server = await trio.to_thread.run_sync(Server.own_cluster)
        name = await trio.to_thread.run_sync(create_template, run.server)
        run.db = Database(run.server, name)
        return await _soak(run)
    finally:
        with trio.CancelScope(shield=True):
            await _teardown(run)


async def _soak(run: Run) -> Verdict:
    assert run.db is not None and run.server is not None
    plan, options, db = run.plan, run.options, run.db
    env = RELAY_SETTINGS | options.relay_env | {"PGRELAY_DATABASE_URL": db.dsn(DAEMON)}
    run.relays = [
        Relay("A", env, run.rundir),
        Relay("B", env | {"PGRELAY_POLL_INTERVAL_MS": POLL_INTERVAL_B_MS}, run.rundir),
    ]
    for relay in run.relays:
        await relay.start()
    run.say("relays ready: " + " ".join(r.ws_url for r in run.relays))

    out_paths = await _start_clients(run)
    with trio.fail_after(CLIENTS_READY_TIMEOUT_S):
        for proc in run.client_procs:
            line = await _read_line(proc)
            if line != "ready":
                raise RuntimeError(f"client process said {line!r} instead of ready")
    run.say(f"{options.clients} clients subscribed; writing for {plan.seconds:g} s")

    run.writer = Writer(
        db.dsn(BACKEND),
        plan.orgs,
        plan.org_weights,
        random.Random(plan.seed + 1),
        single_rate=options.single_rate,
    )
    t0 = time.time()
    for proc in run.client_procs:
        await _send_line(proc, f"go {t0!r}")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sample, run)
        async with trio.open_nursery() as work:
            work.start_soon(run.writer.run, plan.seconds)
            work.start_soon(_faults, run, trio.current_time())
        run.say(f"writers stopped: {dict(run.writer.counts)}")

        # Quiet now: a fence row per org, then the final state of the table.
        await trio.to_thread.run_sync(_fence, db, plan.orgs)
        rows = await trio.to_thread.run_sync(_table, db)
        (run.rundir / "rows.json").write_text(json.dumps([astuple(r) for r in rows]))
        xids: dict[str, list[int]] = {}
        for row in rows:
            xids.setdefault(row.org, []).append(row.xid)
        xids_path = run.rundir / "xids.json"
        xids_path.write_text(json.dumps({o: sorted(set(v)) for o, v in xids.items()}))
        drain_s = options.drain_s or min(120.0, 30.0 + 0.1 * plan.seconds)
        run.say(f"{len(rows)} rows in the table; draining (at most {drain_s:g} s)")
        for proc in run.client_procs:
            await _send_line(proc, f"drain {xids_path} {drain_s}")
        with trio.fail_after(drain_s + 60):
            for proc in run.client_procs:
                line = await _read_line(proc)
                if not line.startswith("done"):
                    raise RuntimeError(f"client process said {line!r} instead of done")
                run.say(f"client process {proc.pid}: {line}")
        nursery.cancel_scope.cancel()

    results: list[dict[str, Any]] = []
    latency: list[tuple[float, int]] = []
    for path in out_paths:
        data = json.loads(path.read_text())
        results += data["clients"]
        latency += [(lat, d) for lat, d in data["latency"]]
    return _verdict(run, rows, results, latency)


def _verdict(
    run: Run, rows: list[Row], results: list[dict[str, Any]], latency: list[tuple[float, int]]
) -> Verdict:
    plan = run.plan
    bell = sorted(lat for lat, d in latency if d)
    poll = sorted(lat for lat, d in latency if not d)
    a, b = run.relays
    faults = {
        "listener_kill": run.executed["listener_kill"],
        "restart": run.executed["restart"],
        "kill9": run.executed["kill9"],
        "poll": run.executed["poll_on"],
        "stopped": sum(r["stops"] for r in results),
        "away": sum(r["aways"] for r in results),
        "expired": sum(r["expired"] for r in results),
        "cut_after_stop": sum(r["cut_after_stop"] for r in results),
    }
    verdict = Verdict(
        seconds=plan.seconds,
        seed=plan.seed,
        clients=len(plan.clients),
        orgs=len(plan.orgs),
        events=len(rows),
        p50_ms=percentile(bell, 0.5),
        p99_ms=percentile(bell, 0.99),
        poll_p50_ms=percentile(poll, 0.5),
        poll_p99_ms=percentile(poll, 0.99),
        rss_mb_max=(a.rss_kb_max / 1024, b.rss_kb_max / 1024),
        fds_max=(a.fds_max, b.fds_max),
        faults=faults,
    )
    roles = {}
    for spec in plan.clients:
        roles[spec.name] = (
            "stop"
            if spec.stops
            else "away"
            if spec.aways
            else "expire"
            if spec.token_lifetime_s < 3600
            else "plain"
        )
    judge(verdict, rows, results, roles)
    if len(results) != len(plan.clients):
        verdict.harness_errors.append(f"{len(results)} client records for {len(plan.clients)}")
    assert run.writer is not None
    if run.writer.counts["d_repeat_made_a_row"]:
        verdict.harness_errors.append("relay.emit made a row for a repeated dedupe_key")
    for kind in ("listener_kill", "restart", "kill9", "poll_on"):
        if run.executed[kind] != plan.fault_counts().get(kind, 0):
            verdict.harness_errors.append(
                f"fault {kind}: {run.executed[kind]} of {plan.fault_counts().get(kind, 0)} done"
            )
    verdict.harness_errors += run.notes
    (run.rundir / "verdict.json").write_text(
        json.dumps(verdict.as_json() | {"writer": dict(run.writer.counts)}, indent=1)
    )
    return verdict


# -- client processes -------------------------------------------------------------------


async def _start_clients(run: Run) -> list[Path]:
    plan = run.plan
    out_paths = []
    urls = [r.ws_url for r in run.relays]
    for k in range(CLIENT_PROCESSES):
        specs = plan.clients[k::CLIENT_PROCESSES]
        spec_path = run.rundir / f"clients-{k}.spec.json"
        out_path = run.rundir / f"clients-{k}.out.json"
        spec_path.write_text(
            json.dumps(
                {
                    "seed": plan.seed * 10 + k,
                    "urls": urls,
                    "secret": SECRET,
                    "clients": plan.client_json(specs),
                }
            )
        )
        stderr = (run.rundir / f"clients-{k}.stderr").open("wb")
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tests.soak.clients", str(spec_path), str(out_path)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        stderr.close()
        run.client_procs.append(proc)
        out_paths.append(out_path)
    return out_paths


_buffers: dict[int, bytearray] = {}


async def _read_line(proc: trio.Process) -> str:
    assert proc.stdout is not None
    buf = _buffers.setdefault(proc.pid, bytearray())
    while b"\n" not in buf:
        chunk = await proc.stdout.receive_some(4096)
        if not chunk:
            raise RuntimeError(f"client process {proc.pid} exited (status {proc.poll()})")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode().strip()


async def _send_line(proc: trio.Process, line: str) -> None:
    assert proc.stdin is not None
    await proc.stdin.send_all(line.encode() + b"\n")


# -- faults ---------------------------------------------------------------------------------


async def _faults(run: Run, t0: float) -> None:
    for fault in run.plan.faults:
        await trio.sleep_until(t0 + fault.at)
        late = trio.current_time() - t0 - fault.at
        try:
            await _fault(run, fault)
        except (psycopg.Error, OSError, RuntimeError, trio.TooSlowError) as exc:
            run.notes.append(f"fault {fault.kind} at {fault.at}: {exc!r}")
            run.say(f"fault {fault.kind} failed: {exc!r}")
            continue
        run.executed[fault.kind] += 1
        run.say(f"t={fault.at:.0f}s {fault.kind}" + (f" ({late:.1f} s late)" if late > 1 else ""))


async def _fault(run: Run, fault: RelayFault) -> None:
    assert run.server is not None and run.db is not None and run.writer is not None
    server = run.server
    if fault.kind == "listener_kill":
        # Right after a restart the listeners may still be reconnecting: wait for one.
        for _ in range(LISTENER_TRIES):
            if await trio.to_thread.run_sync(_kill_listeners, server):
                return
            await trio.sleep(0.2)
        raise RuntimeError(f"no pgrelay-listener to kill in {LISTENER_TRIES} tries")
    elif fault.kind == "restart":
        assert server.cluster is not None
        await trio.to_thread.run_sync(server.cluster.restart)
    elif fault.kind == "kill9":
        relay = run.relays[fault.instance]
        relay.kill9()
        await trio.sleep(fault.seconds)
        await relay.start()
    elif fault.kind in ("poll_on", "poll_off"):
        enable = fault.kind == "poll_off"
        # ALTER TABLE waits for every open writing transaction, and the writers would
        # queue behind it: hold the long (late, rollback) transactions back meanwhile.
        async with run.writer.no_long_transactions():
            if not enable:
                run.writer.doorbell = 0
            await trio.to_thread.run_sync(_set_doorbell, run.db, enable)
            if enable:
                run.writer.doorbell = 1
    else:
        raise AssertionError(fault.kind)


def _kill_listeners(server: Server) -> int:
    with server.admin() as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'pgrelay-listener'"
        ).fetchall()
    return sum(1 for (ok,) in rows if ok)


def _set_doorbell(db: Database, enable: bool) -> None:
    """Switch the doorbell trigger (poll mode while off). A short lock timeout, retried,
    so that waiting behind a late commit never stalls the writers for long."""
    verb = "ENABLE" if enable else "DISABLE"
    for attempt in range(DOORBELL_TRIES):
        try:
            with db.connect(OWNER) as conn:
                conn.execute(f"SET lock_timeout = '{DOORBELL_LOCK_TIMEOUT}'")
                conn.execute(f"ALTER TABLE relay.events {verb} TRIGGER events_doorbell")
            return
        except psycopg.errors.LockNotAvailable:
            time.sleep(0.2 + 0.1 * attempt)
    raise RuntimeError(f"could not {verb} the doorbell trigger")


async def _sample(run: Run) -> None:
    while True:
        for relay in run.relays:
            relay.sample()
        await trio.sleep(SAMPLE_EVERY_S)


# -- the table ---------------------------------------------------------------------------------


def _fence(db: Database, orgs: list[str]) -> None:
    """One last row per org, alone in its commit: it moves every client's cursor past
    the end (a tail page cut mid-org leaves the safe-but-older cursor on its rows)."""
    with db.connect(BACKEND) as conn:
        for org in orgs:
            conn.execute(
                "SELECT relay.emit(%s, 'job.updated', 'job', 'fence', '{\"k\": \"f\"}'::jsonb)",
                (org,),
            )


def _table(db: Database) -> list[Row]:
    with db.connect(OWNER) as conn:
        return [
            Row(r[0], r[1], int(r[2]), r[3] or "?")
            for r in conn.execute(
                "SELECT id, organization_id::text, xid::text, payload->>'k' "
                "FROM relay.events ORDER BY id"
            )
        ]


# -- teardown ---------------------------------------------------------------------------------


async def _teardown(run: Run) -> None:
    for proc in run.client_procs:
        if proc.poll() is None and proc.stdin is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await proc.stdin.aclose()  # a client process exits when its stdin ends
        if proc.poll() is None:
            with trio.move_on_after(PROCESS_EXIT_TIMEOUT_S):
                await proc.wait()
        if proc.poll() is None:
            proc.kill()  # our own child, by its PID
            with trio.move_on_after(PROCESS_EXIT_TIMEOUT_S):
                await proc.wait()
        if proc.stdout is not None:
            with contextlib.suppress(trio.ClosedResourceError, OSError):
                await proc.stdout.aclose()
    for relay in run.relays:
        await trio.to_thread.run_sync(relay.stop)
    if run.server is not None:
        await trio.to_thread.run_sync(run.server.stop)
