"""`pgrelay emit`: call relay.emit(...) once, as a backend would, and print
the new event's id. For trying out clients and for scripts.

The database owns every rule about what may be stored (the CHECKs of
sql/001_events.sql): this command only checks locally what it must parse
itself (the JSON payload) and translates the database's refusals.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any, Final

import psycopg
from psycopg import errors as pg_errors

from relay.errors import ConfigError
from relay.tools.common import (
    EXIT_OK,
    ToolFailure,
    add_database_url,
    database_url,
    environ,
    non_empty,
    org_id,
    run_command,
    sql_ident,
)

#: What each CHECK of relay.events means, for a refusal that names it.
_CONSTRAINT_TEXT: Final[Mapping[str, str]] = {
    "events_event_type_format": "--type must be dotted lower-case words of at most 100 "
    "characters, e.g. job.updated",
    "events_entity_type_format": "--entity-type must be one lower-case word of at most 64 "
    "characters ([a-z][a-z0-9_]*), e.g. job",
    "events_entity_id_length": "--entity-id must be 1 to 256 characters",
    "events_actor_id_length": "--actor must be at most 256 characters",
    "events_dedupe_key_length": "--dedupe-key must be 1 to 256 characters",
    "events_payload_is_object": "--payload must be a JSON object",
    "events_payload_max_2kb": "--payload is larger than 2 KB",
}


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser(
        "emit",
        help="emit one signal with relay.emit (as a member of relay_service)",
        description="Call relay.emit(...) and print the new event id. A repeated "
        "--dedupe-key stores nothing (exit 0); an oversized payload is stored as a "
        "truncation marker and Postgres' WARNING is shown on stderr.",
    )
    p.add_argument("--org", required=True, type=org_id, metavar="UUID", help="organization id")
    p.add_argument(
        "--type", dest="event_type", required=True, metavar="TYPE", help="e.g. job.updated"
    )
    p.add_argument("--entity-type", required=True, metavar="TYPE", help="e.g. job")
    p.add_argument("--entity-id", required=True, metavar="ID", help="e.g. 42")
    p.add_argument(
        "--payload",
        metavar="JSON",
        help='a JSON object, at most 2 KB, e.g. \'{"status":"done"}\' (default: {})',
    )
    p.add_argument(
        "--dedupe-key", type=non_empty, metavar="K", help="a repeat in this org stores nothing"
    )
    p.add_argument("--actor", type=non_empty, metavar="A", help="actor_id: who did it")
    add_database_url(p, "as a member of relay_service")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    return run_command("emit", lambda: run(args, environ()))


def parse_payload(text: str | None) -> str:
    """The payload as JSON text Postgres will accept; ConfigError saying why not."""
    if text is None:
        return "{}"

    def no_constant(name: str) -> object:
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--payload is not valid JSON: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"--payload: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(
            f'--payload must be a JSON object like {{"status": "done"}}, '
            f"not a JSON {type(value).__name__.replace('dict', 'object')}"
        )
    return text


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    payload = parse_payload(args.payload)
    url = database_url(args.database_url, env)
    try:
        conn = psycopg.connect(url, autocommit=True, application_name="pgrelay-emit")
    except psycopg.OperationalError as exc:
        raise ToolFailure(f"cannot connect to the database: {exc}".strip()) from None
    with conn:
        conn.add_notice_handler(_show_notice)
        user = conn.info.user
        try:
            row = conn.execute(
                "SELECT relay.emit(%s::uuid, %s, %s, %s, %s::jsonb, %s, %s)",
                (
                    args.org,
                    args.event_type,
                    args.entity_type,
                    args.entity_id,
                    payload,
                    args.dedupe_key,
                    args.actor,
                ),
            ).fetchone()
        except pg_errors.CheckViolation as exc:
            name = exc.diag.constraint_name or ""
            raise ConfigError(_CONSTRAINT_TEXT.get(name, _primary(exc))) from None
        except (pg_errors.InvalidSchemaName, pg_errors.UndefinedFunction):
            raise ToolFailure(
                "relay.emit does not exist in this database: run `pgrelay migrate` "
                "as the schema owner"
            ) from None
        except pg_errors.InsufficientPrivilege:
            raise ToolFailure(_may_not_emit(conn, user)) from None
        except psycopg.DataError as exc:
            raise ConfigError(f"the database refused a value: {_primary(exc)}") from None
        except psycopg.Error as exc:
            raise ToolFailure(f"relay.emit failed: {_primary(exc)}") from None
    new_id = row[0] if row is not None else None
    if new_id is None:
        print("duplicate dedupe_key: nothing stored", file=sys.stderr)
    else:
        print(new_id)
    return EXIT_OK


def _may_not_emit(conn: psycopg.Connection[Any], user: str) -> str:
    """Why `user` may not emit, and the least-privilege way out."""
    reader = conn.execute(
        "SELECT r.rolname FROM pg_catalog.pg_roles AS r "
        "WHERE r.rolname IN ('relay_daemon', 'relay_subscriber') "
        "AND pg_has_role(current_user, r.oid, 'MEMBER') ORDER BY r.rolname"
    ).fetchone()
    if reader is not None:
        # Usually PGRELAY_DATABASE_URL, the daemon's own login: it only reads.
        return (
            f"role {user} may not call relay.emit, and should not: it is a member of "
            f"{reader[0]}, which only reads signals; emit as your backend's role (a member "
            "of relay_service) with --database-url"
        )
    return (
        f"role {user} may not call relay.emit: as the schema owner run "
        f"GRANT relay_service TO {sql_ident(user)};"
    )


def _show_notice(diag: psycopg.errors.Diagnostic) -> None:
    print(f"{diag.severity or 'NOTICE'}: {diag.message_primary}", file=sys.stderr)
    if diag.message_hint:
        print(f"HINT: {diag.message_hint}", file=sys.stderr)


def _primary(exc: psycopg.Error) -> str:
    return exc.diag.message_primary or str(exc).strip()
