"""Apply the numbered SQL files in ``sql/`` in order, exactly once each.

Each file runs in its own transaction and is recorded in
``relay.schema_migrations`` with a SHA-256 checksum. A session-level advisory
lock serialises concurrent runs (two deploys starting at once must not race).
An applied file that was edited afterwards is refused: migrations are history,
fixes go into a new numbered file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg import sql

from relay.errors import MigrationError

#: Arbitrary but fixed: pg_advisory_lock key shared by every `pgrelay migrate`.
MIGRATION_LOCK_KEY = 0x70677265_6C617901  # "pgrelay" + 1
#: How long a run waits for another run's lock before giving up.
LOCK_TIMEOUT_S = 60

_FILE_NAME = re.compile(r"^(?P<version>\d{3})_(?P<name>[a-z0-9_]+)\.sql$")

_BOOKKEEPING = """
CREATE SCHEMA IF NOT EXISTS relay;
CREATE TABLE IF NOT EXISTS relay.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    applied_by text NOT NULL DEFAULT current_user
);
COMMENT ON TABLE relay.schema_migrations IS 'Applied by pgrelay migrate; never edit by hand.';
"""


@dataclass(frozen=True)
class Migration:
    """One numbered file of ``sql/``."""

    version: int
    """The number the file name starts with; files apply in this order."""
    name: str
    """The file name, e.g. ``001_events.sql``."""
    text: str
    """The SQL, executed as one transaction."""

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class MigrationResult:
    applied: tuple[str, ...]
    """Files applied by this run (or that would be, with dry_run)."""
    already_applied: int
    """How many files were applied before this run."""


def load_migrations() -> list[Migration]:
    """Read the shipped migration files, ordered by version."""
    found: list[Migration] = []
    for entry in resources.files("relay.sql").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match["version"]), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version number: {versions}")
    if not found:
        raise MigrationError("no migration files found in the relay.sql package")
    return found


def migrate(
    conninfo: str,
    *,
    dry_run: bool = False,
    migrations: Sequence[Migration] | None = None,
    log: Callable[[str], None] = lambda _line: None,
) -> MigrationResult:
    """Apply pending migrations to the database at ``conninfo``.

    Raises :class:`MigrationError` with a message meant for the operator.
    """
    files = list(migrations) if migrations is not None else load_migrations()
    try:
        conn = psycopg.connect(conninfo, autocommit=True, application_name="pgrelay-migrate")
    except psycopg.OperationalError as exc:
        raise MigrationError(f"cannot connect to the database: {exc}".strip()) from exc
    with conn:
        _lock(conn)
        try:
            return _apply(conn, files, dry_run=dry_run, log=log)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def _lock(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{LOCK_TIMEOUT_S}s")))
    # pg_advisory_lock honours lock_timeout: a run stuck behind another one
    # fails with lock_not_available instead of waiting forever.
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    except psycopg.errors.LockNotAvailable as exc:
        raise MigrationError(
            f"another `pgrelay migrate` has held the migration lock for over {LOCK_TIMEOUT_S} s"
        ) from exc
    conn.execute("RESET lock_timeout")


def _apply(
    conn: psycopg.Connection[tuple[object, ...]],
    files: list[Migration],
    *,
    dry_run: bool,
    log: Callable[[str], None],
) -> MigrationResult:
    applied_before: dict[int, tuple[str, str]] = {}
    exists = conn.execute("SELECT to_regclass('relay.schema_migrations') IS NOT NULL").fetchone()
    if exists and exists[0]:
        for version, name, checksum in conn.execute(
            "SELECT version, name, checksum FROM relay.schema_migrations ORDER BY version"
        ):
            applied_before[int(str(version))] = (str(name), str(checksum))

    known = {m.version: m for m in files}
    unknown = sorted(set(applied_before) - set(known))
    if unknown:
        names = ", ".join(applied_before[v][0] for v in unknown)
        raise MigrationError(
            f"the database has migrations this pgrelay does not ship ({names}); "
            "upgrade pgrelay before migrating"
        )
    for version, (name, checksum) in sorted(applied_before.items()):
        shipped = known[version]
        if shipped.checksum != checksum:
            raise MigrationError(
                f"sql/{name} was edited after it was applied "
                f"(recorded checksum {checksum[:12]}, file now {shipped.checksum[:12]}); "
                "never edit an applied migration: put the change in a new numbered file"
            )

    pending = [m for m in files if m.version not in applied_before]
    if dry_run:
        for m in pending:
            log(f"would apply {m.name}")
        return MigrationResult(tuple(m.name for m in pending), len(applied_before))

    for m in pending:
        try:
            with conn.transaction():
                conn.execute(_BOOKKEEPING)
                conn.execute(m.text.encode())
                conn.execute(
                    "INSERT INTO relay.schema_migrations (version, name, checksum) "
                    "VALUES (%s, %s, %s)",
                    (m.version, m.name, m.checksum),
                )
        except psycopg.Error as exc:
            diag = exc.diag.message_primary or str(exc)
            raise MigrationError(f"{m.name} failed and was rolled back: {diag}") from exc
        log(f"applied {m.name}")
    return MigrationResult(tuple(m.name for m in pending), len(applied_before))


@dataclass(frozen=True)
class SchemaState:
    """How a database's relay schema compares with the migrations this pgrelay ships."""

    applied: int | None
    """The highest applied migration; None when there is no relay schema at all."""
    shipped: int
    """The highest migration this pgrelay ships."""
    readable: bool = True
    """False when the bookkeeping exists but this role may not read it (before 006)."""

    @property
    def missing(self) -> bool:
        """No relay schema: `pgrelay migrate` has never run on this database."""
        return self.applied is None and self.readable

    @property
    def behind(self) -> bool:
        """Older than this pgrelay: run `pgrelay migrate`."""
        return not self.readable or self.applied is None or self.applied < self.shipped

    def describe(self) -> str:
        """One line for an operator, naming the fix when there is one."""
        shipped = f"{self.shipped:03d}"
        if self.missing:
            return (
                f"the relay schema is missing: run `pgrelay migrate` (this pgrelay ships {shipped})"
            )
        if not self.readable:
            return f"the relay schema is older than 006: run `pgrelay migrate` (to {shipped})"
        assert self.applied is not None
        if self.applied < self.shipped:
            return (
                f"the relay schema is behind: the database is at {self.applied:03d}, "
                f"this pgrelay ships {shipped}: run `pgrelay migrate`"
            )
        if self.applied > self.shipped:
            return (
                f"the relay schema ({self.applied:03d}) is newer than this pgrelay ({shipped}): "
                "upgrade pgrelay"
            )
        return f"the relay schema is current ({shipped})"


def schema_state(conn: psycopg.Connection[tuple[object, ...]]) -> SchemaState:
    """Read the applied migrations (any role that can see relay.schema_migrations;
    the daemon's can since 006). Leaves the connection as it found it."""
    shipped = load_migrations()[-1].version
    found = conn.execute("SELECT to_regclass('relay.schema_migrations') IS NOT NULL").fetchone()
    if not found or not found[0]:
        return SchemaState(None, shipped)
    try:
        with conn.transaction():
            row = conn.execute("SELECT max(version) FROM relay.schema_migrations").fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return SchemaState(None, shipped, readable=False)
    applied = row[0] if row else None
    return SchemaState(int(str(applied)) if applied is not None else None, shipped)
