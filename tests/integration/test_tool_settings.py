"""Which database and which daemon the tools reach, in a clean environment.

A tool that needs a database (`check`, `emit`, `migrate`) is told which one by
`--database-url`, `PGRELAY_DATABASE_URL` or libpq's variables naming a server,
database, role or service; with none of them it stops (exit 2) instead of
letting libpq reach whatever server runs on this machine as the OS user.
`pgrelay tail` finds the daemon where `PGRELAY_LISTEN` says it listens.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.pgharness import DAEMON, OWNER, Database

REPO = Path(__file__).resolve().parents[2]
SECRET = "tool-settings-secret-" + "k" * 32
ORG = "00000000-0000-4000-8000-00000000000a"
COMMAND_TIMEOUT_S = 60

EMIT_ARGS = ("--org", ORG, "--type", "job.updated", "--entity-type", "job", "--entity-id", "1")


def clean_environment(**env: str) -> dict[str, str]:
    """The process environment without any PGRELAY_* or libpq PG* variable, plus `env`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")} | env


def pgrelay(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *argv],
        env=clean_environment(**env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def libpq_variables(dsn: str) -> dict[str, str]:
    """PGHOST, PGPORT, PGUSER, PGDATABASE (and PGPASSWORD) for a connection string."""
    params = conninfo_to_dict(dsn)
    names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE"}
    names["password"] = "PGPASSWORD"
    return {var: str(params[key]) for key, var in names.items() if params.get(key)}


@pytest.mark.parametrize(
    "argv",
    [("check",), ("emit", *EMIT_ARGS), ("migrate",), ("migrate", "--dry-run")],
    ids=["check", "emit", "migrate", "migrate-dry-run"],
)
def test_a_tool_without_a_database_setting_stops_and_names_the_three_ways(
    argv: tuple[str, ...],
) -> None:
    r = pgrelay(*argv)
    assert r.returncode == 2, r
    assert r.stdout == ""
    [line] = r.stderr.splitlines()  # one line, nothing from libpq
    assert line.startswith(f"pgrelay {argv[0]}: ")
    for way in ("--database-url", "PGRELAY_DATABASE_URL", "PGHOST", "PGDATABASE", "PGSERVICE"):
        assert way in line, line


def test_a_password_alone_does_not_choose_a_database() -> None:
    r = pgrelay("check", PGPASSWORD="secret", PGSSLMODE="require", PGCONNECT_TIMEOUT="1")
    assert r.returncode == 2, r
    assert "no database given" in r.stderr


def test_libpq_variables_choose_the_database(db: Database) -> None:
    r = pgrelay("check", **libpq_variables(db.dsn(DAEMON)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"connected to database {db.name} as {DAEMON}" in r.stdout


def test_migrate_applies_to_the_database_libpq_variables_name(empty_db: Database) -> None:
    r = pgrelay("migrate", **libpq_variables(empty_db.dsn(OWNER)))
    assert r.returncode == 0, r.stderr
    assert "applied 001_events.sql" in r.stdout
    r = pgrelay("migrate", PGRELAY_DATABASE_URL=empty_db.dsn(OWNER))
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout


def test_token_needs_no_database() -> None:
    r = pgrelay("token", "--org", ORG, PGRELAY_JWT_SECRET=SECRET)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(".") == 2  # header.claims.signature


# -- pgrelay tail finds the daemon where PGRELAY_LISTEN says ----------------------


@pytest.fixture
def relay_port(db: Database, tmp_path: Path) -> Iterator[int]:
    from tests.e2e.conftest import start_relay

    relay = start_relay(db, tmp_path, jwt_secret=SECRET)
    try:
        port = urllib.parse.urlsplit(relay.ws_url).port
        assert port is not None
        yield port
    finally:
        relay.terminate()


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_tail_connects_to_the_daemon_at_pgrelay_listen(
    relay_port: int, tmp_path: Path, host: str
) -> None:
    """No --url: the tail reaches the daemon at PGRELAY_LISTEN (a wildcard
    address means this machine), not at the built-in 127.0.0.1:8765."""
    cursor_file = tmp_path / "cursor"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "tail", "--org", ORG, "--cursor-file", str(cursor_file)],
        env=clean_environment(PGRELAY_JWT_SECRET=SECRET, PGRELAY_LISTEN=f"{host}:{relay_port}"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not cursor_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert cursor_file.exists(), err
    assert f"subscribed to org {ORG}" in err


def test_tail_with_a_malformed_pgrelay_listen_exits_2() -> None:
    r = pgrelay("tail", "--org", ORG, "--token", "t", PGRELAY_LISTEN="localhost")
    assert r.returncode == 2, r
    assert "PGRELAY_LISTEN" in r.stderr
