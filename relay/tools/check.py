"""`pgrelay check`: is this database ready for the daemon, and is it healthy?

Connects with the daemon's own settings (PGRELAY_DATABASE_URL,
PGRELAY_SUBSCRIBER_ROLE) and prints one line per check:

    ok    what was checked
    warn  what looks wrong, and does not stop the daemon
          fix: what to do
    FAIL  what stops the daemon or loses signals
          fix: what to do

Exit 1 when any check FAILed. Everything is read from the system catalogs,
which any role may read, or through functions granted to relay_daemon: the
daemon's role cannot read relay.events itself, by design.
"""

from __future__ import annotations

import argparse
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, Literal, LiteralString

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from relay.db.migrate import Migration, load_migrations
from relay.errors import ConfigError
from relay.tools.common import (
    EXIT_FAILURE,
    EXIT_OK,
    ToolFailure,
    add_database_url,
    database_url,
    environ,
    run_command,
    setting,
    sql_ident,
)

Status = Literal["ok", "warn", "FAIL"]
Conn = psycopg.Connection[tuple[Any, ...]]

#: How long a NOTIFY may take to come back on the LISTEN connection.
LISTEN_ROUND_TRIP_TIMEOUT_S: Final = 2.0
#: Above this share of the notification queue, warn.
NOTIFY_QUEUE_WARN_SHARE: Final = 0.5
#: Retention keeps 24 h and runs hourly: an older oldest row means it stopped.
RETENTION_MAX_AGE: Final = timedelta(hours=25)
CONNECT_TIMEOUT_S: Final = 10
MIN_SERVER_VERSION: Final = 130000
DEFAULT_SUBSCRIBER_ROLE: Final = "relay_subscriber"

#: Indexes the daemon's queries depend on, and how to recreate each.
REQUIRED_INDEXES: Final[Mapping[str, str]] = {
    "events_xid_idx": "CREATE INDEX CONCURRENTLY events_xid_idx ON relay.events (xid);",
    "events_org_xid_id_idx": "CREATE INDEX CONCURRENTLY events_org_xid_id_idx "
    "ON relay.events (organization_id, xid, id);",
    "events_org_dedupe_key_uidx": "CREATE UNIQUE INDEX CONCURRENTLY events_org_dedupe_key_uidx "
    "ON relay.events (organization_id, dedupe_key) WHERE dedupe_key IS NOT NULL;",
}

_MIGRATE_FIX: Final = "run pgrelay migrate as the role that should own the schema"
_POOLER_FIX: Final = (
    "LISTEN needs a direct connection or a session-mode pool; a transaction-mode pooler "
    "(PgBouncer pool_mode = transaction, Supabase/Supavisor port 6543) never delivers "
    "notifications: point PGRELAY_DATABASE_URL at the server or at a session-mode port"
)


@dataclass(frozen=True)
class Finding:
    """The outcome of one check."""

    status: Status
    what: str
    """What was checked, or what is wrong."""
    fix: str | None = None
    """What to do about a problem."""

    def lines(self) -> list[str]:
        out = [f"{self.status:<4}  {self.what}"]
        if self.fix is not None:
            out.append(f"      fix: {self.fix}")
        return out


@dataclass(frozen=True)
class _Catalog:
    """What the catalogs say about schema relay; oids are None when missing."""

    schema_oid: int | None
    events_oid: int | None
    row_security: bool
    force_row_security: bool


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser(
        "check",
        help="check the database is ready for (and healthy under) the daemon",
        description="Connect as the daemon would and check schema, migrations, roles, "
        "row-level security, indexes, the doorbell, LISTEN/NOTIFY and retention. "
        "Exit 1 when any check FAILs.",
    )
    add_database_url(p, "as the daemon connects: a member of relay_daemon")
    p.add_argument(
        "--subscriber-role",
        metavar="ROLE",
        help="role per-client reads run as (default: $PGRELAY_SUBSCRIBER_ROLE, "
        f"else {DEFAULT_SUBSCRIBER_ROLE}; authenticated on Supabase)",
    )
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    return run_command("check", lambda: run(args, environ()))


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    url = database_url(args.database_url, env)
    role = setting(args.subscriber_role, "subscriber_role", env) or DEFAULT_SUBSCRIBER_ROLE
    if len(role) > 63:
        raise ConfigError("--subscriber-role must be a role name of 1 to 63 characters")
    counts = {"ok": 0, "warn": 0, "FAIL": 0}
    try:
        for finding in checks(url, role):
            counts[finding.status] += 1
            for line in finding.lines():
                print(line, flush=True)
    except psycopg.Error as exc:
        raise ToolFailure(f"the checks stopped on a database error: {str(exc).strip()}") from None
    print(
        f"{counts['ok']} ok, {_plural(counts['warn'], 'warning')}, "
        f"{_plural(counts['FAIL'], 'failure')}"
    )
    return EXIT_FAILURE if counts["FAIL"] else EXIT_OK


def checks(url: str, subscriber_role: str) -> Iterator[Finding]:
    """Run every check against the database at `url`, yielding as they finish."""
    try:
        conn = _connect(url)
    except psycopg.Error as exc:  # unreachable, refused, or a malformed connection string
        yield Finding(
            "FAIL",
            f"cannot connect to the database: {str(exc).strip()}",
            "set --database-url or PGRELAY_DATABASE_URL to the daemon's connection "
            "(a login role that is a member of relay_daemon)",
        )
        return
    with conn:
        yield from _check_server(conn)
        catalog = _read_catalog(conn)
        yield from _check_migrations(conn, catalog)
        yield from _check_daemon_role(conn, catalog)
        yield from _check_subscriber_role(conn, catalog, subscriber_role)
        if catalog.events_oid is not None:
            yield from _check_row_security(conn, catalog)
            yield from _check_indexes(conn, catalog.events_oid)
            yield from _check_doorbell(conn, catalog.events_oid)
        yield from _check_listen(conn, url)
        yield from _check_notify_queue(conn)
        if catalog.schema_oid is not None and catalog.events_oid is not None:
            yield from _check_retention(conn, catalog.schema_oid, catalog.events_oid)


def _connect(url: str) -> Conn:
    extra: dict[str, Any] = {}
    if "connect_timeout" not in conninfo_to_dict(url):
        extra["connect_timeout"] = CONNECT_TIMEOUT_S
    return psycopg.connect(url, autocommit=True, application_name="pgrelay-check", **extra)


def _one(conn: Conn, query: LiteralString, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def _user(conn: Conn) -> str:
    return sql_ident(str(_one(conn, "SELECT current_user")))


def _check_server(conn: Conn) -> Iterator[Finding]:
    version = conn.info.server_version
    shown = str(_one(conn, "SHOW server_version")).split()[0]
    where = f"database {conn.info.dbname} as {conn.info.user} (PostgreSQL {shown})"
    if version < MIN_SERVER_VERSION:
        yield Finding(
            "FAIL",
            f"connected to {where}: pgrelay needs PostgreSQL 13 or newer",
            "upgrade the server",
        )
    else:
        yield Finding("ok", f"connected to {where}")


def _read_catalog(conn: Conn) -> _Catalog:
    schema_oid = _one(conn, "SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = 'relay'")
    row = conn.execute(
        "SELECT c.oid, c.relrowsecurity, c.relforcerowsecurity FROM pg_catalog.pg_class AS c "
        "WHERE c.relnamespace = %s AND c.relname = 'events' AND c.relkind IN ('r', 'p')",
        (schema_oid,),
    ).fetchone()
    if row is None:
        return _Catalog(schema_oid, None, False, False)
    return _Catalog(schema_oid, int(row[0]), bool(row[1]), bool(row[2]))


def _check_migrations(conn: Conn, catalog: _Catalog) -> Iterator[Finding]:
    if catalog.schema_oid is None or catalog.events_oid is None:
        missing = "schema relay" if catalog.schema_oid is None else "table relay.events"
        yield Finding("FAIL", f"{missing} is missing: the schema is not installed", _MIGRATE_FIX)
        return
    try:
        rows = conn.execute(
            "SELECT version, name, checksum FROM relay.schema_migrations ORDER BY version"
        ).fetchall()
    except pg_errors.UndefinedTable:
        yield Finding("FAIL", "relay.schema_migrations is missing", _MIGRATE_FIX)
        return
    except pg_errors.InsufficientPrivilege:
        yield Finding(
            "warn",
            f"cannot tell whether migrations are up to date: {_user(conn)} may not read "
            "relay.schema_migrations",
            f"{_MIGRATE_FIX} (a newer pgrelay lets relay_daemon read it), or run "
            "pgrelay check as the schema owner",
        )
        return
    applied = {int(v): (str(n), str(c)) for v, n, c in rows}
    shipped = {m.version: m for m in load_migrations()}
    yield from _schema_version(applied, shipped)


def _schema_version(
    applied: Mapping[int, tuple[str, str]], shipped: Mapping[int, Migration]
) -> Iterator[Finding]:
    """The schema version line: the applied migrations against the shipped files.

    `applied` maps version -> (file name, checksum) from relay.schema_migrations."""
    latest = max(shipped)
    current = max(applied, default=0)
    at = f"version {current} ({applied[current][0]})" if applied else "no migration"
    unknown = [applied[v][0] for v in sorted(set(applied) - set(shipped))]
    if unknown:
        yield Finding(
            "FAIL",
            f"schema ahead: the database is at {at}, newer than this pgrelay "
            f"(version {latest}); it does not ship {', '.join(unknown)}",
            "upgrade pgrelay to the version that migrated this database",
        )
    edited = [
        name
        for v, (name, checksum) in sorted(applied.items())
        if v in shipped and shipped[v].checksum != checksum
    ]
    if edited:
        yield Finding(
            "FAIL",
            f"applied migrations differ from the files this pgrelay ships: {', '.join(edited)}",
            "run the pgrelay version that applied them; never edit an applied migration, "
            "put changes in a new numbered file",
        )
    pending = [m.name for v, m in sorted(shipped.items()) if v not in applied]
    if pending:
        yield Finding(
            "FAIL",
            f"schema behind: the database is at {at}, this pgrelay ships version {latest}; "
            f"not applied: {', '.join(pending)}",
            f"run pgrelay migrate (as the role that owns the schema) to apply "
            f"{_version_list(v for v in shipped if v not in applied)}; migrations are "
            "additive: running daemons keep working",
        )
    if not (unknown or edited or pending):
        yield Finding(
            "ok",
            f"schema version {current}, the latest this pgrelay ships: migrations up to date "
            f"(through {shipped[latest].name})",
        )


def _version_list(versions: Iterable[int]) -> str:
    numbers = sorted(versions)
    if len(numbers) == 1:
        return f"version {numbers[0]}"
    return "versions " + ", ".join(map(str, numbers))


def _check_daemon_role(conn: Conn, catalog: _Catalog) -> Iterator[Finding]:
    user = _user(conn)
    row = conn.execute(
        "SELECT r.rolsuper, "
        "       (SELECT pg_has_role(current_user, 'relay_daemon', 'MEMBER') FROM pg_roles "
        "        WHERE rolname = 'relay_daemon'), "
        "       (SELECT pg_has_role(current_user, 'relay_daemon', 'USAGE') FROM pg_roles "
        "        WHERE rolname = 'relay_daemon') "
        "FROM pg_catalog.pg_roles AS r WHERE r.rolname = current_user"
    ).fetchone()
    assert row is not None  # current_user always has a pg_roles row
    superuser, member, inherits = row
    if member is None:
        yield Finding("FAIL", "role relay_daemon does not exist", _MIGRATE_FIX)
        return
    if superuser:
        yield Finding(
            "warn",
            f"{user} is a superuser: it bypasses row-level security and every grant",
            "run the daemon as a dedicated login role: CREATE ROLE pgrelay LOGIN PASSWORD '...'; "
            "GRANT relay_daemon TO pgrelay;",
        )
    elif not member:
        yield Finding(
            "FAIL",
            f"{user} is not a member of relay_daemon: it cannot LISTEN for the tail, run the "
            "tail and retention functions, or SET ROLE for per-client reads",
            f"as the schema owner (or a role with CREATEROLE) run: GRANT relay_daemon TO {user};",
        )
    elif not inherits:
        grant = (
            f"GRANT relay_daemon TO {user} WITH INHERIT TRUE;"
            if conn.info.server_version >= 160000
            else f"ALTER ROLE {user} INHERIT;"
        )
        yield Finding(
            "FAIL",
            f"{user} is a member of relay_daemon but does not inherit its privileges",
            f"run: {grant}",
        )
    else:
        yield Finding("ok", f"{user} is a member of relay_daemon")
    if (
        not superuser
        and catalog.events_oid is not None
        and _one(conn, "SELECT has_table_privilege(%s::oid, 'SELECT')", (catalog.events_oid,))
    ):
        yield Finding(
            "warn",
            f"{user} may SELECT relay.events itself: a failed SET ROLE would not fail closed",
            "connect the daemon as a login role that holds only relay_daemon: not the schema "
            "owner, and neither a direct grant on relay.events nor relay_subscriber with INHERIT",
        )


def _check_subscriber_role(conn: Conn, catalog: _Catalog, role: str) -> Iterator[Finding]:
    user = _user(conn)
    quoted = sql_ident(role)
    if _one(conn, "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (role,)) is None:
        yield Finding(
            "FAIL",
            f"subscriber role {quoted} does not exist",
            "set --subscriber-role or PGRELAY_SUBSCRIBER_ROLE to the role clients read as "
            f"({DEFAULT_SUBSCRIBER_ROLE}; authenticated on Supabase), or {_MIGRATE_FIX}",
        )
        return
    can_select = can_execute = True
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            if catalog.events_oid is not None:
                can_select = bool(
                    _one(
                        conn, "SELECT has_table_privilege(%s::oid, 'SELECT')", (catalog.events_oid,)
                    )
                )
                hook = _function_oid(conn, catalog.schema_oid, "user_organizations")
                if hook is not None:
                    can_execute = bool(
                        _one(conn, "SELECT has_function_privilege(%s::oid, 'EXECUTE')", (hook,))
                    )
    except pg_errors.InsufficientPrivilege:
        if not _daemon_member(conn):
            fix = f"GRANT relay_daemon TO {user};"
            if role != DEFAULT_SUBSCRIBER_ROLE:
                fix += " " + _switch_grant(conn, role, quoted)
            else:
                fix += " (relay_daemon may SET ROLE relay_subscriber)"
        else:
            fix = _switch_grant(conn, role, quoted)
        yield Finding(
            "FAIL",
            f"{user} cannot SET ROLE {quoted}: per-client reads would fail",
            f"as the schema owner (or a role with CREATEROLE) run: {fix}",
        )
        return
    if not (can_select and can_execute):
        if role == str(_one(conn, "SELECT current_user")):
            yield Finding(
                "FAIL",
                f"the subscriber role {quoted} is the daemon's own login: per-client reads "
                "would run with the daemon's rights, not under RLS as a subscriber",
                f"set --subscriber-role or PGRELAY_SUBSCRIBER_ROLE to {DEFAULT_SUBSCRIBER_ROLE} "
                "(authenticated on Supabase)",
            )
            return
        missing = "SELECT on relay.events" if not can_select else ""
        if not can_execute:
            missing += (" and " if missing else "") + "EXECUTE on relay.user_organizations()"
        yield Finding(
            "FAIL",
            f"subscriber role {quoted} lacks {missing}: clients would read nothing",
            f"run: GRANT relay_subscriber TO {quoted};",
        )
        return
    yield Finding("ok", f"{user} can SET ROLE {quoted} for per-client reads")
    if role != DEFAULT_SUBSCRIBER_ROLE and _one(
        conn,
        "SELECT pg_has_role(current_user, %s, 'USAGE') AND NOT r.rolsuper "
        "FROM pg_catalog.pg_roles AS r WHERE r.rolname = current_user",
        (role,),
    ):
        # relay_subscriber's only right is SELECT on relay.events, which the
        # daemon-role check already reports; any other role may carry more.
        yield Finding(
            "warn",
            f"{user} holds the privileges of {quoted}, not only SET ROLE to it: whatever "
            f"{quoted} may read or write, the daemon's login may too",
            f"as a role with CREATEROLE run: REVOKE {quoted} FROM {user}; "
            + _switch_grant(conn, role, quoted),
        )


def _switch_grant(conn: Conn, role: str, quoted: str) -> str:
    """SQL that lets the daemon SET ROLE `role` without holding its privileges.

    relay_daemon is NOINHERIT (002): a role granted to it can be switched to by
    its members, and its rights (on Supabase, `authenticated` may write to
    application tables) are never theirs implicitly. Granting `role` to the
    daemon's login instead would hand it those rights on PostgreSQL 15 and
    older, where a grant has no INHERIT option."""
    inherits = _one(
        conn, "SELECT rolinherit FROM pg_catalog.pg_roles WHERE rolname = 'relay_daemon'"
    )
    grant = f"GRANT {quoted} TO relay_daemon;"
    if inherits and conn.info.server_version >= 160000:
        grant = f"GRANT {quoted} TO relay_daemon WITH INHERIT FALSE;"
    elif inherits:
        grant = f"ALTER ROLE relay_daemon NOINHERIT; {grant}"
    return f"{grant} (members of relay_daemon may then SET ROLE {quoted} but never hold its rights)"


def _daemon_member(conn: Conn) -> bool:
    return bool(
        _one(
            conn,
            "SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_catalog.pg_roles "
            "WHERE rolname = 'relay_daemon'",
        )
    )


def _function_oid(conn: Conn, schema_oid: int | None, name: str) -> int | None:
    """A function of schema relay without arguments, looked up in the catalogs."""
    if schema_oid is None:
        return None
    oid = _one(
        conn,
        "SELECT oid FROM pg_catalog.pg_proc "
        "WHERE pronamespace = %s AND proname = %s AND pronargs = 0",
        (schema_oid, name),
    )
    return None if oid is None else int(oid)


def _check_row_security(conn: Conn, catalog: _Catalog) -> Iterator[Finding]:
    if catalog.row_security and catalog.force_row_security:
        yield Finding("ok", "row-level security enabled and forced on relay.events")
    else:
        missing = [
            statement
            for on, statement in (
                (catalog.row_security, "ALTER TABLE relay.events ENABLE ROW LEVEL SECURITY;"),
                (catalog.force_row_security, "ALTER TABLE relay.events FORCE ROW LEVEL SECURITY;"),
            )
            if not on
        ]
        yield Finding(
            "FAIL",
            "row-level security is not "
            + ("enabled" if not catalog.row_security else "forced")
            + " on relay.events: reads are not limited to the client's organizations",
            "as the schema owner run: " + " ".join(missing),
        )
    if _function_oid(conn, catalog.schema_oid, "user_organizations") is None:
        yield Finding(
            "FAIL",
            "relay.user_organizations() is missing: no client can read any organization",
            "create it (README, 'Decide who sees what'), or " + _MIGRATE_FIX,
        )


def _check_indexes(conn: Conn, events_oid: int) -> Iterator[Finding]:
    present = {
        str(name): bool(valid)
        for name, valid in conn.execute(
            "SELECT c.relname, i.indisvalid FROM pg_catalog.pg_index AS i "
            "JOIN pg_catalog.pg_class AS c ON c.oid = i.indexrelid WHERE i.indrelid = %s",
            (events_oid,),
        )
    }
    problems = False
    for name, create in REQUIRED_INDEXES.items():
        if name not in present:
            problems = True
            yield Finding("FAIL", f"index relay.{name} is missing", f"run: {create}")
        elif not present[name]:
            problems = True
            yield Finding(
                "FAIL",
                f"index relay.{name} is invalid (an interrupted CREATE INDEX CONCURRENTLY?)",
                f"run: REINDEX INDEX CONCURRENTLY relay.{name};",
            )
    if not problems:
        yield Finding("ok", "indexes " + ", ".join(REQUIRED_INDEXES) + " present")


def _check_doorbell(conn: Conn, events_oid: int) -> Iterator[Finding]:
    enabled = _one(
        conn,
        "SELECT tgenabled FROM pg_catalog.pg_trigger "
        "WHERE tgrelid = %s AND tgname = 'events_doorbell'",
        (events_oid,),
    )
    poll = "the daemon runs in poll mode (events wait for its timer, PGRELAY_POLL_INTERVAL_MS)"
    enable = "ALTER TABLE relay.events ENABLE TRIGGER events_doorbell;"
    if enabled is None:
        yield Finding(
            "warn",
            f"doorbell trigger events_doorbell is missing: {poll}",
            "if that is not intended, run: CREATE TRIGGER events_doorbell AFTER INSERT ON "
            "relay.events FOR EACH STATEMENT EXECUTE FUNCTION relay.ring_doorbell();",
        )
    elif enabled in ("O", "A"):
        yield Finding("ok", "doorbell trigger events_doorbell enabled (NOTIFY relay_events)")
    else:
        state = "disabled" if enabled == "D" else "enabled only in replica mode"
        yield Finding(
            "warn",
            f"doorbell trigger events_doorbell is {state}: {poll}",
            f"fine on write-heavy databases; for millisecond latency run: {enable}",
        )


def _check_listen(conn: Conn, url: str) -> Iterator[Finding]:
    channel = f"pgrelay_check_{secrets.token_hex(8)}"
    payload = secrets.token_hex(8)
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    try:
        started = time.monotonic()
        try:
            with _connect(url) as sender:
                sender.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        except psycopg.Error as exc:
            yield Finding(
                "FAIL",
                f"LISTEN/NOTIFY: a second connection failed: {str(exc).strip()}",
                "the daemon needs PGRELAY_POOL_SIZE + 3 connections (per worker, with "
                "PGRELAY_WORKERS): "
                "check max_connections and the role's CONNECTION LIMIT",
            )
            return
        received = any(
            n.channel == channel and n.payload == payload
            for n in conn.notifies(timeout=LISTEN_ROUND_TRIP_TIMEOUT_S, stop_after=1)
        )
        elapsed_ms = (time.monotonic() - started) * 1000
    finally:
        conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))
    if received:
        yield Finding("ok", f"LISTEN/NOTIFY round trip in {elapsed_ms:.0f} ms")
    else:
        yield Finding(
            "FAIL",
            f"LISTEN/NOTIFY: no notification within {LISTEN_ROUND_TRIP_TIMEOUT_S:g} s",
            _POOLER_FIX,
        )


def _check_notify_queue(conn: Conn) -> Iterator[Finding]:
    usage = float(_one(conn, "SELECT pg_notification_queue_usage()"))
    if usage > NOTIFY_QUEUE_WARN_SHARE:
        yield Finding(
            "warn",
            f"the NOTIFY queue is {usage:.0%} full; when full, every commit that "
            "NOTIFYs (each relay.emit with the doorbell on) fails",
            "a listening session is stuck in a long transaction: find it with SELECT pid, "
            "application_name, xact_start FROM pg_stat_activity WHERE state LIKE 'idle in "
            "transaction%' ORDER BY xact_start; and end it with SELECT pg_terminate_backend(pid);",
        )
    else:
        yield Finding("ok", f"NOTIFY queue {usage:.1%} used")


def _check_retention(conn: Conn, schema_oid: int, events_oid: int) -> Iterator[Finding]:
    if _function_oid(conn, schema_oid, "oldest_event_age") is None:
        yield Finding(
            "warn", "cannot check retention (relay.oldest_event_age() missing; run pgrelay migrate)"
        )
        return
    try:
        age = _one(conn, "SELECT relay.oldest_event_age()")
    except pg_errors.InsufficientPrivilege:
        yield Finding(
            "warn",
            f"cannot check retention: {_user(conn)} may not run relay.oldest_event_age()",
            f"GRANT relay_daemon TO {_user(conn)};",
        )
        return
    # Rows are only ever deleted by retention (only the owner has a DELETE
    # policy, for relay.cleanup_old_events()), so rows deleted from relay.events
    # mean retention ran. The statistics, which any role may read, count since
    # their last reset (pg_stat_reset(), or a crash).
    removed = int(
        _one(
            conn,
            "SELECT coalesce(n_tup_del, 0) FROM pg_catalog.pg_stat_all_tables WHERE relid = %s",
            (events_oid,),
        )
        or 0
    )
    stats_reset = _one(
        conn,
        "SELECT stats_reset FROM pg_catalog.pg_stat_database WHERE datname = current_database()",
    )
    oldest = "relay.events is empty" if age is None else f"the oldest event is {_human(age)} old"
    if age is not None and age > RETENTION_MAX_AGE:
        if removed:
            what = "retention has stopped"
        elif stats_reset is None:
            what = "retention never ran"
        else:
            what = "retention is not running"
        yield Finding(
            "FAIL",
            f"{what}: {oldest} (rows are kept 24 h and removed hourly)",
            "run SELECT relay.cleanup_old_events() hourly as a member of relay_daemon: "
            "pg_cron (README, 'Retention') or systemctl enable --now pgrelay-retention.timer",
        )
    elif removed:
        yield Finding("ok", f"retention running: {oldest}")
    else:
        since = "" if stats_reset is None else " since the statistics were reset"
        yield Finding(
            "ok",
            f"retention never ran or had nothing to remove yet{since}: {oldest}, and events "
            "are kept 24 h; make sure relay.cleanup_old_events() is scheduled hourly "
            "(README, 'Retention')",
        )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _human(age: timedelta) -> str:
    seconds = max(0, int(age.total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 2 * 3600:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days {seconds % 86400 // 3600} h"
