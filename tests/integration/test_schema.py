"""The SQL contract a DBA relies on, checked against a real server.

Each test gets its own freshly migrated database; the schema owner is a
non-superuser. Roles: a backend (relay_service), the daemon (relay_daemon),
and subscribers reading under their JWT claims (relay_subscriber).
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from relay.db.reads import current_snapshot, read_tail
from tests.pgharness import AUTHENTICATOR, BACKEND, DAEMON, Database

ORG_A = uuid.UUID("00000000-0000-4000-8000-00000000000a")
ORG_B = uuid.UUID("00000000-0000-4000-8000-00000000000b")
ORG_C = uuid.UUID("00000000-0000-4000-8000-00000000000c")


def _insert_direct(conn: psycopg.Connection[Any], payload: str, org: uuid.UUID = ORG_A) -> None:
    conn.execute(
        "INSERT INTO relay.events (organization_id, event_type, entity_type, entity_id, payload) "
        "VALUES (%s, 'job.updated', 'job', '1', %s::jsonb)",
        (org, payload),
    )


# -- writing ------------------------------------------------------------------


def test_direct_insert_over_2kb_fails_with_the_named_constraint(db: Database) -> None:
    big = json.dumps({"blob": "x" * 2100})
    with db.connect(BACKEND) as conn:
        with pytest.raises(errors.CheckViolation) as exc:
            _insert_direct(conn, big)
        assert exc.value.diag.constraint_name == "events_payload_max_2kb"
        _insert_direct(conn, json.dumps({"blob": "x" * 1900}))  # just under: fine


def test_emit_turns_an_oversized_payload_into_a_marker_and_warns(db: Database) -> None:
    notices: list[str] = []
    big = {"blob": "y" * 5000}
    with db.connect(BACKEND, autocommit=False) as conn:
        conn.add_notice_handler(lambda d: notices.append(f"{d.severity}: {d.message_primary}"))
        new_id = conn.execute(
            "SELECT relay.emit(%s, 'job.updated', 'job', '7', %s::jsonb)", (ORG_A, json.dumps(big))
        ).fetchone()
        assert new_id is not None and new_id[0] is not None
        # The caller's transaction is still usable and commits its own work.
        conn.execute("SELECT relay.emit(%s, 'job.created', 'job', '8')", (ORG_A,))
        conn.commit()
    assert any(n.startswith("WARNING") and "exceeds 2048 bytes" in n for n in notices), notices
    with db.connect() as owner:
        stored = owner.execute("SELECT payload FROM relay.events WHERE entity_id = '7'").fetchone()
    assert stored is not None
    assert stored[0] == {"_relay_truncated": True, "original_bytes": len(json.dumps(big))}


def test_emit_dedupe_returns_null_and_keeps_the_transaction_usable(db: Database) -> None:
    with db.connect(BACKEND, autocommit=False) as conn:
        first = conn.execute(
            "SELECT relay.emit(%s, 'job.updated', 'job', '1', '{}', 'k1')", (ORG_A,)
        ).fetchone()
        again = conn.execute(
            "SELECT relay.emit(%s, 'job.updated', 'job', '1', '{}', 'k1')", (ORG_A,)
        ).fetchone()
        other_org = conn.execute(
            "SELECT relay.emit(%s, 'job.updated', 'job', '1', '{}', 'k1')", (ORG_B,)
        ).fetchone()
        conn.execute("SELECT relay.emit(%s, 'job.updated', 'job', '2')", (ORG_A,))
        conn.commit()
    assert first is not None and isinstance(first[0], int)
    assert again == (None,)
    assert other_org is not None and isinstance(other_org[0], int)  # keys are per organization
    with db.connect() as owner:
        n = owner.execute("SELECT count(*) FROM relay.events").fetchone()
    assert n == (3,)


def test_emit_rejects_malformed_event_types(db: Database) -> None:
    with db.connect(BACKEND) as conn:
        for bad in ("JobUpdated", "job", "job..updated", "job.Updated", "job updated"):
            with pytest.raises(errors.CheckViolation):
                conn.execute("SELECT relay.emit(%s, %s, 'job', '1')", (ORG_A, bad))
        conn.execute("SELECT relay.emit(%s, 'evidence.uploaded', 'evidence', 'e1')", (ORG_A,))


def test_service_role_can_insert_but_not_read_or_set_system_columns(db: Database) -> None:
    with db.connect(BACKEND) as conn:
        _insert_direct(conn, "{}")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM relay.events")
        for column, value in (("xid", "'1'::xid8"), ("created_at", "now()")):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(
                    f"INSERT INTO relay.events (organization_id, event_type, entity_type, "
                    f"entity_id, {column}) VALUES (%s, 'job.updated', 'job', '1', {value})",
                    (ORG_A,),
                )
        with pytest.raises(errors.GeneratedAlways):
            conn.execute(
                "INSERT INTO relay.events (id, organization_id, event_type, entity_type, "
                "entity_id) VALUES (1, %s, 'job.updated', 'job', '1')",
                (ORG_A,),
            )


def test_rows_are_immutable_even_for_the_owner(db: Database) -> None:
    db.emit(ORG_A)
    with db.connect() as owner, pytest.raises(errors.InsufficientPrivilege, match="immutable"):
        owner.execute("UPDATE relay.events SET entity_id = 'changed'")


# -- reading under row-level security -----------------------------------------


def test_subscriber_sees_only_the_organizations_in_its_claims(db: Database) -> None:
    for org in (ORG_A, ORG_B, ORG_C):
        db.emit(org)
    assert db.visible_org_ids({"org_id": str(ORG_A)}) == [str(ORG_A)]
    assert db.visible_org_ids({"org_ids": [str(ORG_B), str(ORG_C)]}) == [str(ORG_B), str(ORG_C)]
    assert db.visible_org_ids({"org_id": str(ORG_A), "org_ids": [str(ORG_C)]}) == [
        str(ORG_A),
        str(ORG_C),
    ]


@pytest.mark.parametrize(
    "claims",
    [
        None,  # no claims set at all
        {},  # no org claims
        {"org_id": ""},  # empty
        {"org_id": "not-a-uuid"},  # malformed
        {"org_id": 42},  # wrong type
        {"org_ids": "00000000-0000-4000-8000-00000000000a"},  # string where an array belongs
        {"org_ids": [None, 7, "nope", ["x"]]},  # junk entries
    ],
)
def test_subscriber_without_valid_claims_sees_nothing_and_gets_no_error(
    db: Database, claims: dict[str, Any] | None
) -> None:
    db.emit(ORG_A)
    assert db.visible_org_ids(claims) == []


def test_malformed_claims_json_means_no_organizations(db: Database) -> None:
    db.emit(ORG_A)
    with db.connect(DAEMON, autocommit=False) as conn:
        conn.execute("SET LOCAL ROLE relay_subscriber")
        conn.execute("SELECT set_config('request.jwt.claims', '{not json', true)")
        assert conn.execute("SELECT count(*) FROM relay.events").fetchone() == (0,)


def test_junk_entries_do_not_hide_the_valid_ones(db: Database) -> None:
    db.emit(ORG_A)
    assert db.visible_org_ids({"org_ids": ["junk", str(ORG_A), 3]}) == [str(ORG_A)]


def test_subscriber_cannot_insert_update_or_delete(db: Database) -> None:
    db.emit(ORG_A)
    claims = {"org_id": str(ORG_A)}
    statements = [
        "INSERT INTO relay.events (organization_id, event_type, entity_type, entity_id) "
        f"VALUES ('{ORG_A}', 'job.updated', 'job', '1')",
        "UPDATE relay.events SET entity_id = 'x'",
        "DELETE FROM relay.events",
        f"SELECT relay.emit('{ORG_A}', 'job.updated', 'job', '1')",
    ]
    for stmt in statements:
        with db.as_subscriber(claims) as conn, pytest.raises(errors.InsufficientPrivilege):
            conn.execute(stmt)


def test_authenticator_login_reads_under_rls_like_postgrest(db: Database) -> None:
    db.emit(ORG_A)
    db.emit(ORG_B)
    with db.connect(AUTHENTICATOR, autocommit=False) as conn:
        conn.execute(
            "SELECT set_config('request.jwt.claims', %s, true)",
            (json.dumps({"org_id": str(ORG_B)}),),
        )
        rows = conn.execute("SELECT organization_id FROM relay.events").fetchall()
    assert rows == [(ORG_B,)]


# -- the daemon ---------------------------------------------------------------


def test_daemon_cannot_read_the_table_directly(db: Database) -> None:
    db.emit(ORG_A)
    with db.connect(DAEMON) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM relay.events")


def test_daemon_sees_every_organization_through_the_tail(db: Database) -> None:
    with db.connect(DAEMON) as conn:
        start = current_snapshot(conn)
    ids = [db.emit(org, entity_id=str(i)) for i, org in enumerate((ORG_A, ORG_B, ORG_C))]
    with db.connect(DAEMON) as conn:
        rows, after = read_tail(conn, start)
        assert [r.id for r in rows] == ids
        assert {r.org for r in rows} == {ORG_A, ORG_B, ORG_C}
        again, _ = read_tail(conn, after)
        assert again == []  # nothing new since


def test_tail_reads_a_large_burst_in_pages_in_id_order(db: Database) -> None:
    with db.connect(DAEMON) as conn:
        start = current_snapshot(conn)
    with db.connect(BACKEND) as conn:
        conn.execute(
            "SELECT relay.emit(%s, 'job.updated', 'job', g::text) "
            "FROM generate_series(1, 1234) AS g",
            (ORG_A,),
        )
    with db.connect(DAEMON) as conn:
        rows, _ = read_tail(conn, start, page_rows=100)
    assert len(rows) == 1234
    assert [r.id for r in rows] == sorted(r.id for r in rows)


def test_out_of_order_commit_is_returned_by_the_next_tail_call(db: Database) -> None:
    with db.connect(DAEMON) as daemon:
        p0 = current_snapshot(daemon)
        with db.connect(BACKEND, autocommit=False) as slow, db.connect(BACKEND) as fast:
            low = slow.execute(
                "SELECT relay.emit(%s, 'job.updated', 'job', 'low')", (ORG_A,)
            ).fetchone()
            high = fast.execute(
                "SELECT relay.emit(%s, 'job.updated', 'job', 'high')", (ORG_A,)
            ).fetchone()
            assert low and high and low[0] < high[0]
            rows, p1 = read_tail(daemon, p0)
            assert [r.id for r in rows] == [high[0]]  # the lower id is not committed yet
            slow.commit()
        rows, _ = read_tail(daemon, p1)
        assert [r.id for r in rows] == [low[0]]  # "id > last_seen" would have lost it


def test_daemon_runs_retention_which_deletes_only_old_rows(db: Database) -> None:
    with db.connect() as owner:  # only the owner may backdate created_at
        owner.execute(
            "INSERT INTO relay.events (organization_id, event_type, entity_type, entity_id, "
            "created_at) SELECT %s, 'job.updated', 'job', g::text, now() - interval '25 hours' "
            "FROM generate_series(1, 30) AS g",
            (ORG_A,),
        )
    fresh = db.emit(ORG_A, entity_id="fresh")
    with db.connect(DAEMON) as conn:
        deleted = conn.execute("SELECT relay.cleanup_old_events(batch_rows => 7)").fetchone()
        assert deleted == (30,)
        horizon = conn.execute("SELECT relay.retention_horizon(%s)", (ORG_A,)).fetchone()
        assert horizon is not None and horizon[0] is not None
        assert conn.execute("SELECT relay.retention_horizon(%s)", (ORG_B,)).fetchone() == (None,)
        assert conn.execute("SELECT relay.cleanup_old_events()").fetchone() == (0,)
        with pytest.raises(errors.RaiseException):
            conn.execute("SELECT relay.cleanup_old_events('-1 hour')")
    with db.connect() as owner:
        left = owner.execute("SELECT id FROM relay.events").fetchall()
    assert left == [(fresh,)]


def test_only_the_granted_roles_may_execute_the_functions(db: Database) -> None:
    with db.connect(BACKEND) as conn:
        for call in (
            "relay.cleanup_old_events()",
            "relay.database_epoch()",
            "relay.tail_events('1', '{}', 0, 1)",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(f"SELECT {call}")
    with db.connect(DAEMON) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute("SELECT relay.emit(%s, 'job.updated', 'job', '1')", (ORG_A,))


# -- the doorbell -------------------------------------------------------------


def _notifications_after(db: Database, statement: str) -> int:
    with db.connect(DAEMON) as listener:
        listener.execute("LISTEN relay_events")
        with db.connect(BACKEND) as conn:
            conn.execute(statement)
        # A round trip flushes every notification that arrived before it.
        listener.execute("SELECT 1")
        return sum(1 for _ in listener.notifies(timeout=0.5))


def test_one_notification_per_insert_statement(db: Database) -> None:
    n = _notifications_after(
        db,
        f"INSERT INTO relay.events (organization_id, event_type, entity_type, entity_id) "
        f"SELECT '{ORG_A}', 'job.updated', 'job', g::text FROM generate_series(1, 100) g",
    )
    assert n == 1
    with db.connect() as owner:
        assert owner.execute("SELECT count(*) FROM relay.events").fetchone() == (100,)


def test_disabled_doorbell_rings_nothing(db: Database) -> None:
    with db.connect() as owner:
        owner.execute("ALTER TABLE relay.events DISABLE TRIGGER events_doorbell")
    assert _notifications_after(db, f"SELECT relay.emit('{ORG_A}', 'job.updated', 'job', '1')") == 0


# -- query plans ----------------------------------------------------------------


def _fill_for_plans(db: Database) -> None:
    """20,000 rows from 200 transactions across 50 organizations: a table where an
    index is worth using (one transaction would give every row the same xid)."""
    with db.connect() as owner:
        for _ in range(200):
            owner.execute(
                "INSERT INTO relay.events (organization_id, event_type, entity_type, entity_id) "
                "SELECT ('00000000-0000-4000-8000-' || lpad((g % 50)::text, 12, '0'))::uuid, "
                "'job.updated', 'job', g::text FROM generate_series(1, 100) AS g"
            )
        owner.execute("ANALYZE relay.events")


def test_tail_query_uses_the_xid_index(db: Database) -> None:
    _fill_for_plans(db)
    with db.connect() as owner:
        body = owner.execute(
            "SELECT prosrc FROM pg_proc WHERE oid = "
            "'relay.tail_events(xid8, xid8[], bigint, integer)'::regprocedure"
        ).fetchone()
        assert body is not None
        query = body[0].split("$tail$")[1]
        owner.execute(f"PREPARE tail(xid8, xid8[], bigint, integer) AS {query}")
        owner.execute("SET plan_cache_mode = force_custom_plan")  # as EXECUTE ... USING plans
        snap = current_snapshot(owner)
        plan = "\n".join(
            r[0]
            for r in owner.execute(
                sql.SQL("EXPLAIN EXECUTE tail({}, {}::xid8[], 0, 2000)").format(
                    sql.Literal(str(snap.xmax - 3)), sql.Literal([str(snap.xmax - 5)])
                )
            )
        )
    assert "events_xid_idx" in plan, plan
    assert "Seq Scan" not in plan, plan


@pytest.mark.parametrize("query", ["CATCH_UP_SQL", "CATCH_UP_FIRST_SQL", "CATCH_UP_COUNT_SQL"])
def test_catch_up_queries_use_an_xid_index_under_rls(db: Database, query: str) -> None:
    from relay.db import reads

    _fill_for_plans(db)
    org = uuid.UUID("00000000-0000-4000-8000-000000000007")
    with db.as_subscriber({"org_id": str(org)}) as conn:
        snap = current_snapshot(conn)
        since_xmax = snap.xmax - 150  # most of the table is missed
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN " + getattr(reads, query),
                {
                    "org": org,
                    "since_xmax": str(since_xmax),
                    "since_xip": [str(since_xmax - 5)],
                    "low": str(since_xmax),
                    "after_xid": "0",
                    "after_id": 0,
                    "head_xmax": str(snap.xmax),
                    "head_xip": [],
                    "limit": 1000,
                    "count_limit": 10_001,
                },
            )
        )
    assert "events_org_xid_id_idx" in plan or "events_xid_idx" in plan, plan
    assert "Seq Scan" not in plan, plan


# -- concurrency of writers and dedupe ------------------------------------------


def test_concurrent_emits_with_one_dedupe_key_store_one_row(db: Database) -> None:
    results: list[Any] = []
    barrier = threading.Barrier(4)

    def writer() -> None:
        with db.connect(BACKEND) as conn:
            barrier.wait()
            row = conn.execute(
                "SELECT relay.emit(%s, 'job.updated', 'job', '1', '{}', 'same')", (ORG_A,)
            ).fetchone()
            results.append(row[0] if row else "missing")

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len([r for r in results if r is not None]) == 1
    assert results.count(None) == 3
