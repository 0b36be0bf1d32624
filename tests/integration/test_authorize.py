"""Authorization in batches (relay.db.authorize) against a real server: each
question under its own claims, equal questions asked once, a question that
makes the DBA's function raise fails alone, horizons as retention left them."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio

from relay.db.authorize import MAX_BATCH, Authorizer
from relay.db.pool import AUTHORIZER_APPLICATION_NAME, connect_direct
from relay.errors import ReadFailed
from tests.pgharness import DAEMON, Database

ORG_A = uuid.UUID("00000000-0000-4000-8000-00000000a0a1")
ORG_B = uuid.UUID("00000000-0000-4000-8000-00000000a0b2")


def claims(*orgs: uuid.UUID, sub: str = "u") -> str:
    return json.dumps({"sub": sub, "org_ids": [str(o) for o in orgs]})


@asynccontextmanager
async def authorizer(db: Database) -> AsyncIterator[Authorizer]:
    auth = Authorizer(
        partial(connect_direct, db.dsn(DAEMON), AUTHORIZER_APPLICATION_NAME), "relay_subscriber"
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(auth.run)
        yield auth
        nursery.cancel_scope.cancel()


async def ask_all(auth: Authorizer, questions: list[tuple[str, uuid.UUID]]) -> list[object]:
    answers: list[object] = [None] * len(questions)

    async def one(i: int, claims_json: str, org: uuid.UUID) -> None:
        try:
            answers[i] = (await auth.ask(claims_json, org)).allowed
        except ReadFailed as exc:
            answers[i] = exc

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i, (c, o) in enumerate(questions):
                nursery.start_soon(one, i, c, o)
    return answers


async def test_many_questions_in_few_batches_each_under_its_own_claims(db: Database) -> None:
    questions = [
        (claims(ORG_A if i % 3 else ORG_B, sub=f"user-{i}"), ORG_A) for i in range(3 * MAX_BATCH)
    ]
    async with authorizer(db) as auth:
        answers = await ask_all(auth, questions)
        assert answers == [bool(i % 3) for i in range(len(questions))]
        assert auth.asked == len(questions)
        assert auth.batches <= 6  # not one round trip per question


async def test_equal_questions_are_asked_once(db: Database) -> None:
    async with authorizer(db) as auth:
        answers = await ask_all(auth, [(claims(ORG_A), ORG_A)] * 50 + [(claims(ORG_A), ORG_B)])
        assert answers == [True] * 50 + [False]
        assert auth.asked == 2


async def test_a_question_that_makes_the_function_raise_fails_alone(db: Database) -> None:
    db.user_organizations_raise_for("evil")
    questions = [(claims(ORG_A, sub=f"u{i}"), ORG_A) for i in range(40)]
    questions[17] = (claims(ORG_A, sub="evil"), ORG_A)
    # Quotes and backslashes in claims reach Postgres intact.
    questions[5] = (json.dumps({"sub": 'o\'brien \\ "x"', "org_ids": [str(ORG_A)]}), ORG_A)
    async with authorizer(db) as auth:
        answers = await ask_all(auth, questions)
        assert isinstance(answers[17], ReadFailed) and "no such user" in str(answers[17])
        assert answers[:17] + answers[18:] == [True] * 39
        assert (await auth.ask(claims(ORG_A), ORG_A)).allowed  # and the connection still works


async def test_horizons_come_with_the_answers(db: Database) -> None:
    with db.connect() as owner:
        owner.execute(
            "INSERT INTO relay.events (organization_id, event_type, entity_type, entity_id, "
            "created_at) VALUES (%s, 'job.updated', 'job', 'old', now() - interval '2 days')",
            (ORG_A,),
        )
        owner.execute("SELECT relay.cleanup_old_events()")
        row = owner.execute(
            "SELECT deleted_through::text FROM relay.retention_horizons WHERE organization_id = %s",
            (ORG_A,),
        ).fetchone()
    assert row is not None
    async with authorizer(db) as auth:
        a = await auth.ask(claims(ORG_A, ORG_B), ORG_A)
        b = await auth.ask(claims(ORG_A, ORG_B), ORG_B)
    assert (a.allowed, a.horizon) == (True, int(row[0]))
    assert (b.allowed, b.horizon) == (True, None)


async def test_a_dropped_connection_costs_a_reconnect_not_an_answer(db: Database) -> None:
    async with authorizer(db) as auth:
        assert (await auth.ask(claims(ORG_A), ORG_A)).allowed
        with db.connect(DAEMON) as same_role:  # may end its own role's backends
            killed = same_role.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (AUTHORIZER_APPLICATION_NAME,),
            ).fetchall()
        assert killed == [(True,)]
        assert (await auth.ask(claims(ORG_A, sub="again"), ORG_A)).allowed
        assert auth.batches == 2
