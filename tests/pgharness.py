"""Real PostgreSQL for the test suite: find or start a server, migrate a
template database once, and hand each test a fresh copy of it.

Server, in this order of preference:
1. ``PGRELAY_TEST_DSN`` — an admin DSN; tests create and drop their own databases;
2. a throwaway cluster started from the local server binaries (relay.dev.embedded);
3. testcontainers, when a Docker engine answers a ping within about a second.

The schema owner is a non-superuser role, as on managed Postgres. Login roles
stand in for the three kinds of client: a backend (relay_service), the daemon
(relay_daemon) and PostgREST's authenticator (relay_subscriber).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from relay.dev.embedded import EmbeddedPostgres, docker_answers, find_bindir
from relay.dev.provision import provision

OWNER = "pgrelay_test_owner"
BACKEND = "pgrelay_test_backend"
DAEMON = "pgrelay_test_daemon"
AUTHENTICATOR = "pgrelay_test_authenticator"
#: login role -> group role it is granted
LOGIN_ROLES = {BACKEND: "relay_service", DAEMON: "relay_daemon", AUTHENTICATOR: "relay_subscriber"}


class Server:
    """An admin connection string to a running server, and how to stop it."""

    def __init__(
        self,
        admin_dsn: str,
        kind: str,
        *,
        cluster: EmbeddedPostgres | None = None,
        container: Any = None,
    ) -> None:
        self.admin_dsn = admin_dsn
        self.kind = kind
        self.cluster = cluster
        self._container = container

    @classmethod
    def discover(cls) -> Server:
        env = os.environ.get("PGRELAY_TEST_DSN")
        if env:
            return cls(env, "PGRELAY_TEST_DSN")
        if find_bindir() is not None:
            return cls.own_cluster()
        if docker_answers():
            from testcontainers.postgres import PostgresContainer

            container = PostgresContainer("postgres:16-alpine", driver=None).start()
            return cls(container.get_connection_url(), "testcontainers", container=container)
        raise RuntimeError(
            "no PostgreSQL for the tests: set PGRELAY_TEST_DSN, install the server "
            "(`make test` does: apt-get install postgresql), or start a Docker engine"
        )

    @classmethod
    def own_cluster(cls) -> Server:
        cluster = EmbeddedPostgres().start()
        return cls(cluster.dsn(), f"local cluster ({cluster.bindir})", cluster=cluster)

    def dsn(self, user: str | None = None, dbname: str | None = None) -> str:
        params = conninfo_to_dict(self.admin_dsn)
        if user is not None:
            params["user"] = user
            params.pop("password", None)
        if dbname is not None:
            params["dbname"] = dbname
        return make_conninfo(**params)  # type: ignore[arg-type]

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_dsn, autocommit=True)

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        if self._container is not None:
            self._container.stop()


def ensure_owner_role(server: Server) -> None:
    with server.admin() as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (OWNER,)).fetchone()
        if not exists:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER CREATEROLE").format(sql.Identifier(OWNER))
            )


def create_template(server: Server) -> str:
    """A migrated database to copy for each test (`relay.dev.provision`, as `pgrelay
    dev` and the benchmark provision theirs)."""
    name = f"pgrelay_tpl_{os.getpid()}"
    provision(server.admin_dsn, name, owner=OWNER, logins=LOGIN_ROLES, recreate=True)
    return name


def drop_database(server: Server, name: str) -> None:
    with server.admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@dataclass
class Database:
    """One migrated database of the test's own, and ways to act in it."""

    server: Server
    name: str

    def dsn(self, user: str = OWNER) -> str:
        return self.server.dsn(user, self.name)

    def connect(self, user: str = OWNER, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(user), autocommit=autocommit)

    # -- the backend ----------------------------------------------------------
    def emit(
        self,
        org: uuid.UUID | str,
        event_type: str = "job.updated",
        entity_type: str = "job",
        entity_id: str = "42",
        payload: Any = None,
        dedupe_key: str | None = None,
        actor_id: str | None = None,
    ) -> int | None:
        with self.connect(BACKEND) as conn:
            row = conn.execute(
                "SELECT relay.emit(%s, %s, %s, %s, %s::jsonb, %s, %s)",
                (
                    str(org),
                    event_type,
                    entity_type,
                    entity_id,
                    json.dumps(payload if payload is not None else {}),
                    dedupe_key,
                    actor_id,
                ),
            ).fetchone()
            assert row is not None
            return row[0]  # type: ignore[no-any-return]

    # -- the DBA's hook ------------------------------------------------------------
    def user_organizations_raise_for(self, sub: str) -> None:
        """Replace relay.user_organizations() with one that raises 'no such user' for
        claims with this `sub` and otherwise reads claims org_id/org_ids."""
        with self.connect() as owner:
            owner.execute(
                sql.SQL(
                    """
                    CREATE OR REPLACE FUNCTION relay.user_organizations() RETURNS SETOF uuid
                        LANGUAGE plpgsql STABLE SECURITY DEFINER
                        SET search_path = pg_catalog, pg_temp
                    AS $$
                    DECLARE claims jsonb := current_setting('request.jwt.claims', true)::jsonb;
                    BEGIN
                        IF claims ->> 'sub' = {sub} THEN
                            RAISE EXCEPTION 'no such user';
                        END IF;
                        RETURN QUERY SELECT (e #>> '{{}}')::uuid FROM jsonb_array_elements(
                            coalesce(claims -> 'org_ids', jsonb_build_array(claims -> 'org_id'))
                        ) AS e;
                    END
                    $$
                    """
                ).format(sub=sql.Literal(sub))
            )

    # -- a subscriber, the way the daemon reads for a client ------------------
    @contextlib.contextmanager
    def as_subscriber(
        self, claims: dict[str, Any] | None, role: str = "relay_subscriber"
    ) -> Iterator[psycopg.Connection[Any]]:
        """A connection inside a transaction running as `role` with these JWT claims."""
        with self.connect(DAEMON, autocommit=False) as conn:
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            if claims is not None:
                conn.execute(
                    "SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),)
                )
            yield conn
            conn.rollback()

    def visible_org_ids(self, claims: dict[str, Any] | None) -> list[str]:
        with self.as_subscriber(claims) as conn:
            rows = conn.execute(
                "SELECT DISTINCT organization_id::text FROM relay.events ORDER BY 1"
            ).fetchall()
            return [r[0] for r in rows]
