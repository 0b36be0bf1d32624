"""`pgrelay token`, `emit`, `check` and `tail` (relay.tools), run as real
subprocesses against a real Postgres, plus the tail client's cursor file and
protocol handling against an in-process WebSocket server.

The commands run through a shim that builds a `pgrelay` parser with
`relay.tools.register` only, the way relay/cli.py does once it calls it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from trio_websocket import WebSocketRequest, serve_websocket

from relay.db.migrate import load_migrations
from relay.server.jwt import AuthConfig, TokenVerifier
from relay.tools.tail import (
    TailSession,
    backoff_delay,
    read_cursor,
    tail,
    write_cursor,
)
from tests.pgharness import BACKEND, DAEMON, Database

REPO = Path(__file__).resolve().parents[2]
SECRET = "tools-test-secret-" + "k" * 32
ORG_A = "00000000-0000-4000-8000-00000000000a"
ORG_B = "00000000-0000-4000-8000-00000000000b"
COMMAND_TIMEOUT_S = 60


def pgrelay(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `pgrelay ARGV` with only these PGRELAY_* variables set."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PGRELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "relay", *argv],
        env=clean | env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


# -- token ----------------------------------------------------------------------


def test_token_round_trips_through_the_verifier() -> None:
    r = pgrelay(
        "token", "--org", ORG_A, "--org", ORG_B.upper(), "--sub", "user-7",
        "--lifetime", "15m", "--audience", "app", "--issuer", "https://auth.example",
        PGRELAY_JWT_SECRET=SECRET,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    token = r.stdout.strip()
    assert r.stdout == token + "\n"  # only the token
    verifier = TokenVerifier(
        AuthConfig(secret=SECRET, audience="app", issuer="https://auth.example")
    )
    claims = verifier.verify(token).claims
    assert claims["org_ids"] == [ORG_A, ORG_B]
    assert claims["sub"] == "user-7"
    assert claims["exp"] - claims["iat"] == 900


def test_token_flag_beats_environment_and_one_org_gives_org_id() -> None:
    flag_secret = "from-the-flag-" + "f" * 32
    r = pgrelay(
        "token", "--org", ORG_A, "--jwt-secret", flag_secret, "--lifetime", "3600",
        PGRELAY_JWT_SECRET=SECRET, PGRELAY_JWT_AUDIENCE="from-env",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    claims = (
        TokenVerifier(AuthConfig(secret=flag_secret, audience="from-env"))
        .verify(r.stdout.strip())
        .claims
    )
    assert claims["org_id"] == ORG_A
    assert "sub" not in claims
    assert claims["exp"] - claims["iat"] == 3600


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--org", "not-a-uuid"], {"PGRELAY_JWT_SECRET": SECRET}, "'not-a-uuid' is not a uuid"),
        (["--org", ORG_A, "--lifetime", "0"], {"PGRELAY_JWT_SECRET": SECRET}, "longer than 0"),
        (["--org", ORG_A, "--lifetime", "31d"], {"PGRELAY_JWT_SECRET": SECRET}, "30-day"),
        (["--org", ORG_A, "--lifetime", "1x"], {"PGRELAY_JWT_SECRET": SECRET}, "not a duration"),
        (["--org", ORG_A], {}, "PGRELAY_JWT_SECRET"),
        (["--org", ORG_A], {"PGRELAY_JWT_SECRET": "short"}, "shorter than 32 bytes"),
        ([], {"PGRELAY_JWT_SECRET": SECRET}, "give --org"),
    ],
)
def test_token_bad_input_exits_2_with_a_message(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    r = pgrelay("token", *argv, **env)
    assert r.returncode == 2, r
    assert message in r.stderr
    assert r.stdout == ""


# -- emit -----------------------------------------------------------------------


def emit(db: Database, *argv: str, role: str = BACKEND) -> subprocess.CompletedProcess[str]:
    return pgrelay(
        "emit", "--org", ORG_A, "--type", "job.updated", "--entity-type", "job",
        "--entity-id", "42", *argv, PGRELAY_DATABASE_URL=db.dsn(role),
    )  # fmt: skip


def stored(db: Database, event_id: int) -> dict[str, Any]:
    with db.connect() as owner:
        row = owner.execute(
            "SELECT organization_id::text, event_type, entity_id, actor_id, payload, dedupe_key "
            "FROM relay.events WHERE id = %s",
            (event_id,),
        ).fetchone()
    assert row is not None
    keys = ("org", "event_type", "entity_id", "actor_id", "payload", "dedupe_key")
    return dict(zip(keys, row, strict=True))


def test_emit_prints_the_new_id_and_stores_the_signal(db: Database) -> None:
    r = emit(db, "--payload", '{"status": "done"}', "--actor", "user-7", "--dedupe-key", "k1")
    assert r.returncode == 0, r.stderr
    event_id = int(r.stdout)
    assert stored(db, event_id) == {
        "org": ORG_A, "event_type": "job.updated", "entity_id": "42", "actor_id": "user-7",
        "payload": {"status": "done"}, "dedupe_key": "k1",
    }  # fmt: skip


def test_emit_repeated_dedupe_key_stores_nothing_and_exits_0(db: Database) -> None:
    first = emit(db, "--dedupe-key", "job-42-done")
    assert first.returncode == 0, first.stderr
    again = emit(db, "--dedupe-key", "job-42-done")
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""
    assert "duplicate dedupe_key: nothing stored" in again.stderr


def test_emit_oversized_payload_warns_on_stderr_and_stores_the_marker(db: Database) -> None:
    r = emit(db, "--payload", json.dumps({"blob": "x" * 3000}))
    assert r.returncode == 0, r.stderr
    assert "WARNING: relay.emit: payload of" in r.stderr
    assert "HINT:" in r.stderr
    payload = stored(db, int(r.stdout))["payload"]
    assert payload["_relay_truncated"] is True


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--payload", "{nope"], 2, "--payload is not valid JSON"),
        (["--payload", "[1, 2]"], 2, "must be a JSON object"),
        (["--payload", '{"x": NaN}'], 2, "NaN is not valid JSON"),
        (["--type", "Job Updated"], 2, "--type must be dotted lower-case words"),
        (["--org", "42"], 2, "'42' is not a uuid"),
    ],
)
def test_emit_bad_input_exits_2(db: Database, argv: list[str], code: int, message: str) -> None:
    r = emit(db, *argv)
    assert r.returncode == code, r
    assert message in r.stderr


def test_emit_as_the_daemons_login_never_advises_a_write_grant(db: Database) -> None:
    """PGRELAY_DATABASE_URL is the daemon's login: emitting with it must not end
    in advice that lets the daemon write."""
    r = emit(db, role=DAEMON)
    assert r.returncode == 1
    assert "GRANT" not in r.stderr
    assert "member of relay_daemon" in r.stderr
    assert "emit as your backend's role (a member of relay_service)" in r.stderr


def test_emit_as_a_role_outside_the_relay_roles_names_the_grant(db: Database) -> None:
    with login_role(db) as role:
        r = emit(db, role=role)
    assert r.returncode == 1
    assert f"GRANT relay_service TO {role};" in r.stderr


def test_emit_on_an_unmigrated_database_says_migrate(empty_db: Database) -> None:
    r = emit(empty_db, role="pgrelay_test_owner")
    assert r.returncode == 1
    assert "run `pgrelay migrate`" in r.stderr


# -- check ----------------------------------------------------------------------


def check(db: Database, *argv: str, role: str = DAEMON) -> subprocess.CompletedProcess[str]:
    return pgrelay("check", *argv, PGRELAY_DATABASE_URL=db.dsn(role))


def lines(r: subprocess.CompletedProcess[str], status: str) -> list[str]:
    return [line for line in r.stdout.splitlines() if line.startswith(status + " ")]


def test_check_on_a_healthy_database_is_all_ok(db: Database) -> None:
    r = check(db)
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines(r, "FAIL") == []
    for what in (
        "connected to database",
        "migrations up to date",
        f"{DAEMON} is a member of relay_daemon",
        f"{DAEMON} can SET ROLE relay_subscriber",
        "row-level security enabled and forced",
        "indexes events_xid_idx, events_org_xid_id_idx, events_org_dedupe_key_uidx present",
        "doorbell trigger events_doorbell enabled",
        "LISTEN/NOTIFY round trip in",
        "NOTIFY queue",
    ):
        assert what in r.stdout, r.stdout
    assert lines(r, "warn") == []


OLD_EVENT = (
    "INSERT INTO relay.events (organization_id, event_type, entity_type, entity_id, "
    "created_at) VALUES (%s, 'job.updated', 'job', 'old', now() - interval '3 days')"
)


def retention_line(r: subprocess.CompletedProcess[str]) -> str:
    [line] = [line for line in r.stdout.splitlines() if "retention" in line[:40]]
    return line


def test_check_says_retention_never_ran_until_it_removed_something(db: Database) -> None:
    r = check(db)
    assert r.returncode == 0, r.stdout
    line = retention_line(r)
    assert line.startswith("ok    retention never ran or had nothing to remove yet: "), line
    assert "relay.events is empty" in line
    assert "running" not in line

    db.emit(ORG_A)
    assert "retention never ran or had nothing to remove yet" in retention_line(check(db))

    with db.connect() as owner:  # the owner may set created_at; backends may not
        owner.execute(OLD_EVENT, (ORG_A,))
    r = check(db)
    assert r.returncode == 1
    assert retention_line(r).startswith("FAIL  retention never ran: the oldest event is 3 days")
    assert "pgrelay-retention.timer" in r.stdout

    with db.connect(DAEMON) as daemon:  # what the timer or pg_cron runs
        assert daemon.execute("SELECT relay.cleanup_old_events()").fetchone() == (1,)
    r = check(db)
    assert r.returncode == 0, r.stdout
    assert retention_line(r).startswith("ok    retention running: the oldest event is "), r.stdout

    with db.connect() as owner:
        owner.execute(OLD_EVENT, (ORG_A,))
    r = check(db)
    assert r.returncode == 1
    assert retention_line(r).startswith("FAIL  retention has stopped: the oldest event is 3 days")


def test_check_names_the_schema_version(db: Database) -> None:
    latest = max(load_migrations(), key=lambda m: m.version)
    r = check(db)
    assert (
        f"ok    schema version {latest.version}, the latest this pgrelay ships: migrations up "
        f"to date (through {latest.name})"
    ) in r.stdout


def test_check_on_a_schema_behind_names_the_versions_and_migrate_catches_up(
    db: Database,
) -> None:
    """A database migrated by the previous release: check says behind, which
    versions, and to run pgrelay migrate; after migrate it is up to date."""
    shipped = load_migrations()
    previous, latest = shipped[-2], shipped[-1]
    with db.connect() as owner:
        owner.execute("DELETE FROM relay.schema_migrations WHERE version = %s", (latest.version,))
    r = check(db)
    assert r.returncode == 1
    assert (
        f"FAIL  schema behind: the database is at version {previous.version} ({previous.name}), "
        f"this pgrelay ships version {latest.version}; not applied: {latest.name}"
    ) in r.stdout
    assert (
        "fix: run pgrelay migrate (as the role that owns the schema) to apply version "
        f"{latest.version};"
    ) in r.stdout

    m = pgrelay("migrate", PGRELAY_DATABASE_URL=db.dsn())
    assert m.returncode == 0, m.stderr
    assert f"applied {latest.name}" in m.stdout
    r = check(db)
    assert r.returncode == 0, r.stdout
    assert "migrations up to date" in r.stdout


def test_check_on_an_unmigrated_database_fails_with_migrate(empty_db: Database) -> None:
    r = check(empty_db)
    assert r.returncode == 1
    fails = lines(r, "FAIL")
    assert fails == ["FAIL  schema relay is missing: the schema is not installed"], r.stdout
    assert "fix: run pgrelay migrate" in r.stdout
    assert "LISTEN/NOTIFY round trip" in r.stdout  # the rest still runs


def test_check_as_a_role_outside_relay_daemon_names_the_grant(db: Database) -> None:
    r = check(db, role=BACKEND)
    assert r.returncode == 1
    assert f"FAIL  {BACKEND} is not a member of relay_daemon" in r.stdout
    assert f"GRANT relay_daemon TO {BACKEND};" in r.stdout
    assert f"FAIL  {BACKEND} cannot SET ROLE relay_subscriber" in r.stdout


@contextlib.contextmanager
def login_role(db: Database, *, login: bool = True) -> Iterator[str]:
    """A role of this test's own (roles are cluster-wide), dropped afterwards."""
    name = f"pgrelay_t_role_{uuid.uuid4().hex[:8]}"
    with db.server.admin() as admin:
        admin.execute(f"CREATE ROLE {name} {'LOGIN' if login else 'NOLOGIN'}")
    try:
        yield name
    finally:
        with psycopg.connect(db.server.dsn(dbname=db.name), autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {name} CASCADE")  # its grants in this database
        with db.server.admin() as admin:
            admin.execute(f"DROP ROLE {name}")


def fix_sql(r: subprocess.CompletedProcess[str], after: str) -> str:
    """The SQL of the first fix line that follows a finding containing `after`."""
    out = r.stdout.splitlines()
    i = next(n for n, line in enumerate(out) if after in line)
    fix = out[i + 1].split(" run: ", 1)[1]
    return fix.split(" (", 1)[0]


def test_check_advises_a_custom_subscriber_role_without_widening_the_daemon(
    db: Database,
) -> None:
    """On Supabase the subscriber role (`authenticated`) may write to the
    application's tables. Following check's advice lets the daemon SET ROLE to
    it, and never gives the daemon's login those rights."""
    with login_role(db, login=False) as role:
        with db.server.admin() as admin:
            admin.execute(f"GRANT relay_subscriber TO {role}")
        with db.connect() as owner:
            owner.execute("CREATE TABLE public.jobs (id int)")
            owner.execute(f"GRANT INSERT, UPDATE, DELETE ON public.jobs TO {role}")
        r = check(db, "--subscriber-role", role)
        assert r.returncode == 1
        assert f"FAIL  {DAEMON} cannot SET ROLE {role}" in r.stdout
        fix = fix_sql(r, f"cannot SET ROLE {role}")
        assert DAEMON not in fix, fix

        with db.server.admin() as admin:
            admin.execute(fix)
        r = check(db, "--subscriber-role", role)
        assert r.returncode == 0, r.stdout
        assert f"ok    {DAEMON} can SET ROLE {role} for per-client reads" in r.stdout
        assert lines(r, "warn") == []
        with db.connect(DAEMON) as daemon:
            assert daemon.execute(
                "SELECT has_table_privilege('public.jobs', 'INSERT, UPDATE, DELETE')"
            ).fetchone() == (False,)


def test_check_warns_when_the_daemon_holds_the_subscriber_roles_rights(db: Database) -> None:
    with login_role(db, login=False) as role:
        with db.server.admin() as admin:
            admin.execute(f"GRANT relay_subscriber TO {role}")
            admin.execute(f"GRANT {role} TO {DAEMON}")  # the advice of old: inherits its rights
        r = check(db, "--subscriber-role", role)
        assert f"warn  {DAEMON} holds the privileges of {role}, not only SET ROLE to it" in (
            r.stdout
        )
        fix = fix_sql(r, f"holds the privileges of {role}")
        with db.server.admin() as admin:
            admin.execute(fix)
        r = check(db, "--subscriber-role", role)
        assert r.returncode == 0, r.stdout
        assert lines(r, "warn") == []


def test_check_unknown_subscriber_role_fails(db: Database) -> None:
    r = check(db, "--subscriber-role", "authenticated")
    assert r.returncode == 1
    assert "FAIL  subscriber role authenticated does not exist" in r.stdout


def test_check_disabled_doorbell_warns_about_poll_mode(db: Database) -> None:
    with db.connect() as owner:
        owner.execute("ALTER TABLE relay.events DISABLE TRIGGER events_doorbell")
    r = check(db)
    assert r.returncode == 0, r.stdout
    assert "warn  doorbell trigger events_doorbell is disabled: the daemon runs in poll mode" in (
        r.stdout
    )
    assert "ENABLE TRIGGER events_doorbell" in r.stdout


def test_check_reports_weakened_security_and_missing_indexes(db: Database) -> None:
    with db.connect() as owner:
        owner.execute("ALTER TABLE relay.events NO FORCE ROW LEVEL SECURITY")
        owner.execute("DROP INDEX relay.events_org_xid_id_idx")
    r = check(db)
    assert r.returncode == 1
    assert "FAIL  row-level security is not forced on relay.events" in r.stdout
    assert "ALTER TABLE relay.events FORCE ROW LEVEL SECURITY;" in r.stdout
    assert "FAIL  index relay.events_org_xid_id_idx is missing" in r.stdout
    assert "CREATE INDEX CONCURRENTLY events_org_xid_id_idx" in r.stdout


def test_check_cannot_connect_fails_with_the_setting_to_fix() -> None:
    r = pgrelay("check", "--database-url", "postgresql://nobody@127.0.0.1:1/none")
    assert r.returncode == 1
    assert "FAIL  cannot connect to the database" in r.stdout
    assert "PGRELAY_DATABASE_URL" in r.stdout


# -- tail: cursor file ------------------------------------------------------------


def test_cursor_file_round_trips_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "org-a.cursor"
    assert read_cursor(path, ORG_A) is None
    write_cursor(path, ORG_A, "1.first")
    write_cursor(path, ORG_A, "1.second")
    assert read_cursor(path, ORG_A) == "1.second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["org-a.cursor"]


def test_cursor_file_of_another_org_or_malformed_is_refused(tmp_path: Path) -> None:
    from relay.errors import ConfigError

    path = tmp_path / "c"
    write_cursor(path, ORG_A, "1.x")
    with pytest.raises(ConfigError, match="one file per organization"):
        read_cursor(path, ORG_B)
    path.write_text("1.raw-cursor\n")
    with pytest.raises(ConfigError, match="delete it to start from now"):
        read_cursor(path, ORG_A)


def test_cursor_write_failure_keeps_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c"
    write_cursor(path, ORG_A, "1.old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_cursor(path, ORG_A, "1.new")
    monkeypatch.undo()
    assert read_cursor(path, ORG_A) == "1.old"
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_tail_bad_arguments_exit_2(tmp_path: Path) -> None:
    r = pgrelay("tail", "--org", ORG_A, "--token", "t", "--url", "http://x/v1")
    assert r.returncode == 2 and "not a ws:// or wss:// URL" in r.stderr
    r = pgrelay("tail", "--org", ORG_A)
    assert r.returncode == 2 and "PGRELAY_JWT_SECRET" in r.stderr
    r = pgrelay("tail", "--org", ORG_A, "--token", "t", "--event-types", "Job")
    assert r.returncode == 2 and "not an event type pattern" in r.stderr
    r = pgrelay("tail", "--org", ORG_A, "--token", "t", "--cursor-file", str(tmp_path / "no/c"))
    assert r.returncode == 2 and "does not exist" in r.stderr


# -- tail: the protocol session ---------------------------------------------------


def frame(**fields: Any) -> str:
    return json.dumps(fields)


def test_session_subscribes_with_the_saved_cursor_and_prints_events_once() -> None:
    s = TailSession(ORG_A, cursor="1.saved", event_types=["job.*"], can_mint=False)
    s.connected()
    step = s.receive(frame(type="ready", connection_id="c", expires_at=1))
    assert step.send is not None
    assert json.loads(step.send) == {
        "type": "subscribe", "ref": "1", "org": ORG_A, "cursor": "1.saved",
        "event_types": ["job.*"],
    }  # fmt: skip
    event = {"type": "event", "org": ORG_A, "id": 7, "cursor": "1.c7", "payload": {}}
    step = s.receive(json.dumps(event))
    assert step.stdout is not None and json.loads(step.stdout) == event
    assert step.cursor == "1.c7"
    assert s.receive(json.dumps(event)) == type(step)()  # a repeat is dropped
    step = s.receive(frame(type="subscribed", ref="1", org=ORG_A, cursor="1.c8", replayed=1))
    assert step.live and step.cursor == "1.c8" and "1 replayed" in (step.notice or "")
    step = s.receive(frame(type="resync", org=ORG_A, reason="cursor_expired", cursor="1.c9"))
    assert step.cursor == "1.c9" and "cursor_expired" in (step.notice or "")
    assert s.receive(frame(type="event", org=ORG_B, id=8, cursor="x")).stdout is None
    assert s.receive("not json").notice is not None


def test_session_stops_on_forbidden_and_retries_on_internal() -> None:
    s = TailSession(ORG_A, cursor=None, event_types=None, can_mint=False)
    assert s.receive(frame(type="error", ref="1", code="forbidden", message="")).exit_code == 1
    assert s.receive(frame(type="error", code="internal", message="db down")).retry
    assert s.receive(frame(type="unsubscribed", org=ORG_A, reason="forbidden")).exit_code == 1


def test_session_close_codes() -> None:
    given = TailSession(ORG_A, cursor=None, event_types=None, can_mint=False)
    assert given.closed(4001, "expired").exit_code == 1
    assert given.closed(1012, None).restart
    assert given.closed(None, None).exit_code is None
    assert given.closed(4008, None).exit_code is None
    assert given.closed(4029, None).exit_code == 1
    minted = TailSession(ORG_A, cursor=None, event_types=None, can_mint=True)
    assert minted.closed(4001, None).new_token
    assert minted.closed(4001, None).exit_code == 1  # twice without a ready: give up


def test_backoff_grows_and_is_capped() -> None:
    assert backoff_delay(1, lambda: 1.0) == 0.5
    assert backoff_delay(3, lambda: 1.0) == 2.0
    assert backoff_delay(50, lambda: 0.0) == 15.0


# -- tail: the trio shell, against a scripted server ------------------------------


async def test_tail_resumes_after_1012_and_stops_on_forbidden(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """First connection: two events, then 1012. Second: the subscribe carries
    the last cursor; the server repeats event 2 (dropped), sends 3, then says
    forbidden. The tail exits 1 with every event printed once."""
    cursor_file = tmp_path / "cursor"
    subscribes: list[dict[str, Any]] = []

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        auth = json.loads(await ws.get_message())
        assert auth == {"type": "auth", "token": "tok"}
        await ws.send_message(frame(type="ready", connection_id="c", expires_at=2**31))
        sub = json.loads(await ws.get_message())
        subscribes.append(sub)

        def event(n: int) -> str:
            return frame(type="event", org=ORG_A, id=n, event_type="job.updated", cursor=f"1.c{n}")

        if len(subscribes) == 1:
            await ws.send_message(frame(type="subscribed", ref=sub["ref"], org=ORG_A,
                                        cursor="1.c0", replayed=0))  # fmt: skip
            await ws.send_message(event(1))
            await ws.send_message(event(2))
            await ws.aclose(1012, "restarting")
        else:
            await ws.send_message(event(2))
            await ws.send_message(event(3))
            await ws.send_message(frame(type="subscribed", ref=sub["ref"], org=ORG_A,
                                        cursor="1.c3", replayed=2))  # fmt: skip
            await ws.send_message(frame(type="error", ref="x", code="forbidden", message="no"))
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        port = server.port
        session = TailSession(ORG_A, cursor=None, event_types=None, can_mint=False)
        with trio.fail_after(10):
            code = await tail(
                f"ws://127.0.0.1:{port}/v1", session, "tok", None, cursor_file, delay_scale=0.01
            )
        nursery.cancel_scope.cancel()

    assert code == 1
    out, err = capsys.readouterr()
    assert [json.loads(line)["id"] for line in out.splitlines()] == [1, 2, 3]
    assert [s["cursor"] for s in subscribes] == [None, "1.c2"]
    assert "server restarting (1012 restarting); reconnecting in" in err
    assert "forbidden" in err
    assert read_cursor(cursor_file, ORG_A) == "1.c3"


# -- tail: end to end, against the real daemon ------------------------------------


@pytest.fixture
def relay_url(db: Database, tmp_path: Path) -> Iterator[str]:
    from tests.e2e.conftest import start_relay

    relay = start_relay(db, tmp_path, jwt_secret=SECRET)
    try:
        yield relay.ws_url
    finally:
        relay.terminate()


def read_lines(proc: subprocess.Popen[str], n: int) -> list[dict[str, Any]]:
    assert proc.stdout is not None
    got = []
    for _ in range(n):
        line = proc.stdout.readline()
        assert line, "tail exited early"
        got.append(json.loads(line))
    return got


def start_tail(url: str, cursor_file: Path) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PGRELAY_")}
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "tail", "--org", ORG_A, "--url", url,
         "--cursor-file", str(cursor_file)],
        env=clean | {"PGRELAY_JWT_SECRET": SECRET},
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def wait_for_cursor(cursor_file: Path, wanted: str | None = None) -> str:
    """The saved cursor once there is one (and it equals `wanted`, if given)."""
    deadline = time.monotonic() + 10
    cursor = None
    while time.monotonic() < deadline:
        if cursor_file.exists():
            cursor = read_cursor(cursor_file, ORG_A)
            if cursor is not None and wanted in (None, cursor):
                return cursor
        time.sleep(0.05)
    raise AssertionError(f"the tail never saved cursor {wanted}; last {cursor}")


def test_tail_against_the_daemon_resumes_exactly_after_a_restart(
    db: Database, relay_url: str, tmp_path: Path
) -> None:
    cursor_file = tmp_path / "org-a.cursor"
    proc = start_tail(relay_url, cursor_file)
    try:
        wait_for_cursor(cursor_file)  # `subscribed` arrived: the tail is live
        ids = [db.emit(ORG_A, entity_id=str(n)) for n in range(3)]
        db.emit(ORG_B)  # another org: never printed
        events = read_lines(proc, 3)
        assert [e["id"] for e in events] == ids
        wait_for_cursor(cursor_file, events[-1]["cursor"])
    finally:
        err = stop(proc)
    assert f"subscribed to org {ORG_A} (0 replayed)" in err
    missed = [db.emit(ORG_A, entity_id=f"m{n}") for n in range(2)]  # while the tail is down
    proc = start_tail(relay_url, cursor_file)
    try:
        assert [e["id"] for e in read_lines(proc, 2)] == missed
    finally:
        stop(proc)
