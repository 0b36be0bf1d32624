"""Fixtures shared by the whole suite. Database fixtures are lazy: the pure
unit tests never start a server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from psycopg import sql

from relay.dev.embedded import find_bindir
from tests.pgharness import (
    OWNER,
    Database,
    Server,
    create_template,
    drop_database,
    ensure_owner_role,
)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    server = Server.discover()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_template(pg_server: Server) -> Iterator[str]:
    name = create_template(pg_server)
    try:
        yield name
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def db(pg_server: Server, pg_template: str) -> Iterator[Database]:
    """A freshly migrated database of this test's own (copied from a template)."""
    name = f"pgrelay_t_{uuid.uuid4().hex[:12]}"
    with pg_server.admin() as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(pg_template), sql.Identifier(OWNER)
            )
        )
    try:
        yield Database(pg_server, name)
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def empty_db(pg_server: Server) -> Iterator[Database]:
    """An unmigrated database owned by the (non-superuser) owner role."""
    ensure_owner_role(pg_server)
    name = f"pgrelay_e_{uuid.uuid4().hex[:12]}"
    with pg_server.admin() as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(OWNER)
            )
        )
    try:
        yield Database(pg_server, name)
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def fault_server() -> Iterator[tuple[Server, Database]]:
    """A cluster of this test's own, which it may restart and whose backends it
    may kill, with one migrated database."""
    if find_bindir() is None:
        pytest.skip("fault tests need local PostgreSQL server binaries for a cluster of their own")
    server = Server.own_cluster()
    try:
        name = create_template(server)
        yield server, Database(server, name)
    finally:
        server.stop()
