"""`pgrelay migrate`: ordered, once, locked, tamper-evident, and respectful of
what DBAs changed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from relay.db.migrate import Migration, load_migrations, migrate
from relay.errors import MigrationError
from tests.pgharness import Database

REPO = Path(__file__).resolve().parents[2]


def _applied(db: Database) -> list[str]:
    with db.connect() as conn:
        return [
            r[0] for r in conn.execute("SELECT name FROM relay.schema_migrations ORDER BY version")
        ]


def test_migrate_applies_every_file_in_order_then_is_a_no_op(empty_db: Database) -> None:
    files = load_migrations()
    first = migrate(empty_db.dsn())
    assert first.applied == tuple(m.name for m in files)
    assert _applied(empty_db) == [m.name for m in files]
    second = migrate(empty_db.dsn())
    assert second.applied == ()
    assert second.already_applied == len(files)


def test_shipped_files_are_numbered_and_explain_themselves() -> None:
    files = load_migrations()
    assert [m.version for m in files] == list(range(1, len(files) + 1))
    for m in files:
        first_line = m.text.lstrip().splitlines()[0]
        assert first_line.startswith(f"-- {m.name} — "), f"{m.name} must open with what it does"


def test_dry_run_lists_pending_files_and_changes_nothing(empty_db: Database) -> None:
    result = migrate(empty_db.dsn(), dry_run=True)
    assert len(result.applied) == len(load_migrations())
    with empty_db.connect() as conn:
        assert conn.execute("SELECT to_regclass('relay.events')").fetchone() == (None,)


def test_migrate_refuses_an_applied_file_that_was_edited(db: Database) -> None:
    files = load_migrations()
    edited = [
        Migration(m.version, m.name, m.text + "\n-- a sneaky edit\n") if m.version == 2 else m
        for m in files
    ]
    with pytest.raises(MigrationError, match=r"002_roles\.sql was edited after it was applied"):
        migrate(db.dsn(), migrations=edited)


def test_migrate_refuses_a_database_newer_than_this_pgrelay(db: Database) -> None:
    with db.connect() as conn:
        conn.execute(
            "INSERT INTO relay.schema_migrations (version, name, checksum) "
            "VALUES (999, '999_future.sql', 'x')"
        )
    with pytest.raises(MigrationError, match="upgrade pgrelay"):
        migrate(db.dsn())


def test_a_failing_file_is_rolled_back_and_reported(db: Database) -> None:
    broken = [
        *load_migrations(),
        Migration(900, "900_broken.sql", "CREATE TABLE relay.half_done (x int);\nSELECT 1/0;"),
    ]
    with pytest.raises(MigrationError, match=r"900_broken\.sql failed and was rolled back"):
        migrate(db.dsn(), migrations=broken)
    with db.connect() as conn:
        assert conn.execute("SELECT to_regclass('relay.half_done')").fetchone() == (None,)
        assert conn.execute(
            "SELECT count(*) FROM relay.schema_migrations WHERE version = 900"
        ).fetchone() == (0,)


def test_two_concurrent_runs_apply_each_file_once(empty_db: Database) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        try:
            barrier.wait()
            migrate(empty_db.dsn())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert _applied(empty_db) == [m.name for m in load_migrations()]


def test_a_dbas_own_user_organizations_made_before_install_survives(empty_db: Database) -> None:
    with empty_db.connect() as conn:
        conn.execute("CREATE SCHEMA relay")
        conn.execute("CREATE TABLE public.memberships (user_id text, org uuid)")
        conn.execute("""
            CREATE FUNCTION relay.user_organizations() RETURNS SETOF uuid
            LANGUAGE sql STABLE AS $$
                SELECT org FROM public.memberships
                WHERE user_id = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'
            $$""")
    migrate(empty_db.dsn())
    with empty_db.connect() as conn:
        src = conn.execute(
            "SELECT prosrc FROM pg_proc WHERE oid = 'relay.user_organizations()'::regprocedure"
        ).fetchone()
    assert src is not None and "public.memberships" in src[0]


def test_later_runs_keep_an_overridden_hook_and_a_disabled_doorbell(db: Database) -> None:
    with db.connect() as conn:
        conn.execute("""
            CREATE OR REPLACE FUNCTION relay.user_organizations() RETURNS SETOF uuid
            LANGUAGE sql STABLE AS $$ SELECT '00000000-0000-4000-8000-0000000000ff'::uuid $$""")
        conn.execute("ALTER TABLE relay.events DISABLE TRIGGER events_doorbell")
    migrate(db.dsn())
    # A later migration repeating the create-if-missing logic must not undo a DBA's choice.
    with db.connect() as conn:
        for m in load_migrations():
            if m.name.startswith(("003_", "005_")):
                conn.execute(m.text.encode())
        src = conn.execute(
            "SELECT prosrc FROM pg_proc WHERE oid = 'relay.user_organizations()'::regprocedure"
        ).fetchone()
        enabled = conn.execute(
            "SELECT tgenabled FROM pg_trigger WHERE tgname = 'events_doorbell'"
        ).fetchone()
    assert src is not None and "0000000000ff" in src[0]
    assert enabled == ("D",)


def test_cli_migrate_reads_the_database_url_from_the_environment(empty_db: Database) -> None:
    env = {**os.environ, "PGRELAY_DATABASE_URL": empty_db.dsn()}
    out = subprocess.run(
        [sys.executable, "-m", "relay", "migrate"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "applied 001_events.sql" in out.stdout
    again = subprocess.run(
        [sys.executable, "-m", "relay", "migrate", "--database-url", empty_db.dsn()],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert again.returncode == 0 and "up to date" in again.stdout


def test_cli_migrate_explains_a_connection_failure(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "migrate",
            "--database-url",
            "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 1
    assert "pgrelay migrate: cannot connect to the database" in out.stderr
    assert "Traceback" not in out.stderr
