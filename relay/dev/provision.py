"""Provisioning a throwaway database: the one function `pgrelay dev`, the test
suite and the benchmark share.

On a server where we hold a superuser (a cluster we started, a container),
`provision` creates what a managed Postgres gives a team: a non-superuser
schema owner with CREATEROLE, its database, the migrations applied as that
owner, and login roles granted pgrelay's group roles (a backend in
relay_service, the daemon in relay_daemon, ...). Everything is created only if
missing, so running it twice is harmless. Never for production: it resets
the login roles' passwords.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from relay.db.migrate import migrate

__all__ = ["ensure_login_roles", "provision", "role_dsn"]

CONNECT_TIMEOUT_S = 5
"""libpq connect_timeout for provisioning connections."""


def role_dsn(admin_dsn: str, user: str, dbname: str, password: str | None = None) -> str:
    """`admin_dsn` with another user (and its password, if any) and database."""
    params: dict[str, Any] = {k: v for k, v in conninfo_to_dict(admin_dsn).items() if v}
    params.pop("password", None)
    params |= {"user": user, "dbname": dbname}
    if password is not None:
        params["password"] = password
    return make_conninfo(**params)


def ensure_login_roles(
    conn: psycopg.Connection[Any], logins: Mapping[str, str], password: str | None
) -> None:
    """Create each login role of `logins` (login -> group role) if missing, (re)set
    its password when one is given, and grant it its group role. Runs as a
    superuser or as a role with CREATEROLE (the schema owner)."""
    for login, group in logins.items():
        role = sql.Identifier(login)
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (login,)).fetchone():
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
        if password is not None:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(role, sql.Literal(password)))
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), role))


def provision(
    admin_dsn: str,
    dbname: str,
    *,
    owner: str,
    logins: Mapping[str, str],
    password: str | None = None,
    recreate: bool = False,
) -> None:
    """On the server of `admin_dsn` (a superuser): the non-superuser `owner` (with
    CREATEROLE), database `dbname` owned by it (dropped first with `recreate`),
    the migrations applied as `owner`, and the login roles of `logins`."""
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        role = sql.Identifier(owner)
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (owner,)).fetchone():
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER CREATEROLE").format(role))
        if password is not None:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(role, sql.Literal(password)))
        database = sql.Identifier(dbname)
        if recreate:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(database))
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(database, role))
    migrate(role_dsn(admin_dsn, owner, dbname, password))
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        ensure_login_roles(conn, logins, password)
