"""The real `pgrelay serve` with real WebSocket clients: what app developers see."""

from __future__ import annotations

import json
import signal
import uuid

import pytest
import trio

from relay.core.cursor import Cursor, decode_cursor
from tests.e2e.conftest import Client, RelayProcess, connect
from tests.pgharness import BACKEND, Database

ORG_A = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
ORG_B = uuid.UUID("00000000-0000-4000-8000-0000000000b2")


async def test_live_events_arrive_in_order_with_every_field(relay: RelayProcess) -> None:
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        ready = await c.auth(relay.token([ORG_A]))
        assert ready["connection_id"] and ready["expires_at"] > 0
        frames = await c.subscribe(ORG_A)
        assert frames[-1]["type"] == "subscribed" and frames[-1]["replayed"] == 0
        ids = [
            relay.db.emit(ORG_A, entity_id=str(i), payload={"n": i}, actor_id="u7")
            for i in range(20)
        ]
        events = await c.events(20)
    assert [e["id"] for e in events] == ids
    first = events[0]
    assert first["org"] == str(ORG_A) and first["event_type"] == "job.updated"
    assert first["entity_type"] == "job" and first["entity_id"] == "0"
    assert first["actor_id"] == "u7" and first["payload"] == {"n": 0}
    assert first["created_at"].startswith("20") and first["cursor"]
    assert "coalesced" not in first


async def test_authorization_header_on_the_upgrade_replaces_the_auth_frame(
    relay: RelayProcess,
) -> None:
    token = relay.token([ORG_A])
    async with connect(relay.ws_url, extra_headers=[("Authorization", f"Bearer {token}")]) as ws:
        c = Client(ws)
        await c.expect("ready")
        frames = await c.subscribe(ORG_A)
        assert frames[-1]["type"] == "subscribed"


async def test_organizations_are_isolated(relay: RelayProcess) -> None:
    async with connect(relay.ws_url) as wa, connect(relay.ws_url) as wb:
        a, b = Client(wa), Client(wb)
        await a.auth(relay.token([ORG_A], sub="alice"))
        await b.auth(relay.token([ORG_B], sub="bob"))
        await a.subscribe(ORG_A)
        await b.subscribe(ORG_B)
        with relay.db.connect(BACKEND) as conn:
            conn.execute(
                "SELECT relay.emit(CASE WHEN g %% 2 = 0 THEN %s ELSE %s END::uuid, "
                "'job.updated', 'job', g::text) FROM generate_series(1, 400) AS g",
                (str(ORG_A), str(ORG_B)),
            )
        got_a = await a.events(200)
        got_b = await b.events(200)
        await a.nothing_for(0.3)
    assert {e["org"] for e in got_a} == {str(ORG_A)}
    assert {e["org"] for e in got_b} == {str(ORG_B)}


async def test_subscribing_to_a_foreign_organization_is_forbidden(relay: RelayProcess) -> None:
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        frames = await c.subscribe(ORG_B, ref="x")
        assert frames[-1]["type"] == "error"
        assert frames[-1]["code"] == "forbidden" and frames[-1]["ref"] == "x"
        relay.db.emit(ORG_B)
        await c.nothing_for(0.5)


async def test_spoofed_notify_delivers_nothing(relay: RelayProcess) -> None:
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        await c.subscribe(ORG_A)
        with relay.db.connect(BACKEND) as conn:
            fake = json.dumps({"org": str(ORG_A), "id": 1, "event_type": "job.updated"})
            conn.execute("SELECT pg_notify('relay_events', %s)", (fake,))
        await c.nothing_for(0.5)


async def test_ids_committed_out_of_order_both_arrive(relay: RelayProcess) -> None:
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        await c.subscribe(ORG_A)
        with relay.db.connect(BACKEND, autocommit=False) as slow:
            low = slow.execute(
                "SELECT relay.emit(%s, 'job.updated', 'job', 'low')", (ORG_A,)
            ).fetchone()
            high = relay.db.emit(ORG_A, entity_id="high")
            first = await c.events(1)
            assert first[0]["id"] == high
            slow.commit()
        second = await c.events(1)
    assert low is not None and second[0]["id"] == low[0] < high  # type: ignore[operator]


async def test_a_hundred_events_in_one_transaction_all_arrive(relay: RelayProcess) -> None:
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        await c.subscribe(ORG_A)
        with relay.db.connect(BACKEND, autocommit=False) as conn:
            for i in range(100):
                conn.execute("SELECT relay.emit(%s, 'job.updated', 'job', %s)", (ORG_A, str(i)))
            conn.commit()
        events = await c.events(100)
    assert [e["entity_id"] for e in events] == [str(i) for i in range(100)]


async def test_event_type_filter(relay: RelayProcess) -> None:
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        await c.subscribe(ORG_A, event_types=["evidence.*"])
        relay.db.emit(ORG_A, event_type="job.updated")
        wanted = relay.db.emit(ORG_A, event_type="evidence.uploaded", entity_type="evidence")
        events = await c.events(1)
        assert events[0]["id"] == wanted
        await c.nothing_for(0.3)


async def test_coalescing_collapses_updates_of_one_entity(relay: RelayProcess) -> None:
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        await c.subscribe(ORG_A, coalesce_ms=500)
        with relay.db.connect(BACKEND) as conn:
            conn.execute(
                "SELECT relay.emit(%s, 'job.updated', 'job', '42'), "
                "relay.emit(%s, 'job.updated', 'job', '42'), "
                "relay.emit(%s, 'job.updated', 'job', '42'), "
                "relay.emit(%s, 'job.updated', 'job', '43')",
                (ORG_A,) * 4,
            )
        events = await c.events(2)
        await c.nothing_for(0.7)
    by_entity = {e["entity_id"]: e for e in events}
    assert by_entity["42"]["coalesced"] == 3
    assert "coalesced" not in by_entity["43"]


async def test_unsubscribe_and_ping(relay: RelayProcess) -> None:
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        await c.subscribe(ORG_A)
        await c.send({"type": "ping", "ref": "p"})
        assert await c.expect("pong") == {"type": "pong", "ref": "p"}
        await c.send({"type": "unsubscribe", "ref": "u", "org": str(ORG_A)})
        frame = await c.expect("unsubscribed")
        assert frame["reason"] == "requested" and frame["ref"] == "u"
        relay.db.emit(ORG_A)
        await c.nothing_for(0.5)


# -- resume -------------------------------------------------------------------------


async def test_resume_replays_exactly_what_was_missed(relay: RelayProcess) -> None:
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        await c.subscribe(ORG_A)
        relay.db.emit(ORG_A, entity_id="seen")
        seen = await c.events(1)
    cursor = seen[0]["cursor"]
    missed = [relay.db.emit(ORG_A, entity_id=f"missed-{i}") for i in range(5)]
    relay.db.emit(ORG_B, entity_id="other org")
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        frames = await c.subscribe(ORG_A, cursor=cursor)
        replayed = [f for f in frames if f["type"] == "event"]
        # the batch in flight may repeat (same id); nothing may be skipped
        assert [e["id"] for e in replayed if e["id"] in missed] == missed
        assert all(e["id"] in missed or e["id"] == seen[0]["id"] for e in replayed)
        assert frames[-1]["type"] == "subscribed" and frames[-1]["replayed"] == len(replayed)
        live = relay.db.emit(ORG_A, entity_id="live")
        assert (await c.events(1))[0]["id"] == live


async def test_resume_from_the_subscribed_cursor_when_nothing_happened(relay: RelayProcess) -> None:
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        cursor = (await c.subscribe(ORG_A))[-1]["cursor"]
    missed = relay.db.emit(ORG_A)
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        frames = await c.subscribe(ORG_A, cursor=cursor)
    assert [f["id"] for f in frames if f["type"] == "event"] == [missed]


async def test_resume_with_bad_foreign_or_expired_cursors_resyncs(relay: RelayProcess) -> None:
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        good = (await c.subscribe(ORG_A))[-1]["cursor"]
    decoded = decode_cursor(good)
    assert isinstance(decoded, Cursor)
    foreign = Cursor("another-database", decoded.snapshot).encode()
    # A row this cursor has not seen, old enough for retention to remove it:
    with relay.db.connect() as owner:
        owner.execute(
            "INSERT INTO relay.events (organization_id, event_type, entity_type, "
            "entity_id, created_at) VALUES (%s, 'job.updated', 'job', 'old', "
            "now() - interval '2 days')",
            (ORG_A,),
        )
        owner.execute("SELECT relay.cleanup_old_events()")
    cases = {
        "bad_cursor": "definitely-not-a-cursor",
        "epoch_changed": foreign,
        "cursor_expired": good,
    }
    for reason, cursor in cases.items():
        async with connect(relay.ws_url) as ws:
            c = Client(ws)
            await c.auth(relay.token([ORG_A]))
            frames = await c.subscribe(ORG_A, cursor=cursor)
            kinds = [f["type"] for f in frames]
            assert kinds == ["resync", "subscribed"], (reason, frames)
            assert frames[0]["reason"] == reason and frames[0]["cursor"]
            live = relay.db.emit(ORG_A)  # the subscription stays live
            assert (await c.events(1))[0]["id"] == live


async def test_resume_too_far_behind_resyncs(db: Database, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.e2e.conftest import start_relay

    relay = start_relay(db, tmp_path, replay_limit="10")
    try:
        async with connect(relay.ws_url) as ws:
            c = Client(ws)
            await c.auth(relay.token([ORG_A]))
            cursor = (await c.subscribe(ORG_A))[-1]["cursor"]
        with db.connect(BACKEND) as conn:
            conn.execute(
                "SELECT relay.emit(%s, 'job.updated', 'job', g::text) "
                "FROM generate_series(1, 11) AS g",
                (ORG_A,),
            )
        async with connect(relay.ws_url) as ws:
            c = Client(ws)
            await c.auth(relay.token([ORG_A]))
            frames = await c.subscribe(ORG_A, cursor=cursor)
        assert [f["type"] for f in frames] == ["resync", "subscribed"]
        assert frames[0]["reason"] == "too_far_behind"
    finally:
        relay.terminate()


# -- tokens -------------------------------------------------------------------------


async def test_bad_token_closes_4001(relay: RelayProcess) -> None:
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.send({"type": "auth", "token": "not.a.jwt"})
        assert await c.close_code() == 4001
    assert not any("not.a.jwt" in json.dumps(line) for line in relay.logs())


async def test_no_auth_in_time_closes_4002(db: Database, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.e2e.conftest import start_relay

    relay = start_relay(db, tmp_path, auth_timeout_s="1")
    try:
        async with connect(relay.ws_url) as ws:
            assert await Client(ws).close_code(timeout_s=5) == 4002
    finally:
        relay.terminate()


async def test_token_expiry_closes_4001_and_refresh_extends(db: Database, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.e2e.conftest import start_relay

    relay = start_relay(db, tmp_path, jwt_leeway_s="0")
    try:
        async with connect(relay.ws_url) as w1, connect(relay.ws_url) as w2:
            expiring, refreshed = Client(w1), Client(w2)
            await expiring.auth(relay.token([ORG_A], lifetime_s=2))
            await refreshed.auth(relay.token([ORG_A], lifetime_s=2))
            await refreshed.subscribe(ORG_A)
            await trio.sleep(1)
            await refreshed.auth(relay.token([ORG_A], lifetime_s=60))
            assert await expiring.close_code(timeout_s=5) == 4001
            await trio.sleep(1.5)  # past the first token's expiry
            live = relay.db.emit(ORG_A)
            assert (await refreshed.events(1))[0]["id"] == live
    finally:
        relay.terminate()


async def test_revoked_membership_stops_delivery(db: Database, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.e2e.conftest import start_relay

    with db.connect() as owner:
        owner.execute("CREATE TABLE public.memberships (user_id text, org uuid)")
        owner.execute("INSERT INTO public.memberships VALUES ('carol', %s)", (ORG_A,))
        owner.execute("""
            CREATE OR REPLACE FUNCTION relay.user_organizations() RETURNS SETOF uuid
            LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
                SELECT org FROM public.memberships WHERE user_id =
                    nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'
            $$""")
    relay = start_relay(db, tmp_path, recheck_interval_s="1")
    try:
        async with connect(relay.ws_url) as ws:
            c = Client(ws)
            await c.auth(relay.token(None, sub="carol"))
            assert (await c.subscribe(ORG_A))[-1]["type"] == "subscribed"
            with db.connect() as owner:
                owner.execute("DELETE FROM public.memberships")
            frame = await c.expect("unsubscribed", timeout_s=5)
            assert frame["reason"] == "forbidden" and frame["org"] == str(ORG_A)
            relay.db.emit(ORG_A)
            await c.nothing_for(0.5)
    finally:
        relay.terminate()


# -- operations ---------------------------------------------------------------------


async def test_health_ready_and_metrics(relay: RelayProcess) -> None:
    assert relay.admin_get("/healthz")[0] == 200
    assert relay.admin_get("/readyz")[0] == 200
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        await c.subscribe(ORG_A)
        relay.db.emit(ORG_A)
        await c.events(1)
        status, body = relay.admin_get("/metrics")
    assert status == 200
    for name in (
        "pgrelay_connections 1.0",
        "pgrelay_subscriptions 1.0",
        "pgrelay_events_delivered_total 1.0",
        "pgrelay_commit_to_send_seconds_bucket",
        "pgrelay_listener_up 1.0",
        "pgrelay_notification_queue_usage",
    ):
        assert name in body, name


async def test_the_oldest_event_age_tells_when_retention_stopped(db: Database, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.e2e.conftest import start_relay

    with db.connect() as owner:  # retention has not run for two days
        owner.execute(
            "INSERT INTO relay.events (organization_id, event_type, entity_type, "
            "entity_id, created_at) VALUES (%s, 'job.updated', 'job', 'old', "
            "now() - interval '2 days')",
            (ORG_A,),
        )
    relay = start_relay(db, tmp_path)
    try:
        age = 0.0
        with trio.fail_after(5):  # the first sample is taken at start, in a worker thread
            while age == 0.0:
                body = relay.admin_get("/metrics")[1]
                line = next(
                    x
                    for x in body.splitlines()
                    if x.startswith("pgrelay_oldest_event_age_seconds ")
                )
                age = float(line.split()[1])
                await trio.sleep(0.05)
        assert 2 * 86400 - 60 < age < 2 * 86400 + 600
    finally:
        relay.terminate()


async def test_sigterm_closes_clients_with_1012_and_exits_0(relay: RelayProcess) -> None:
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        relay.proc.send_signal(signal.SIGTERM)
        assert await c.close_code(timeout_s=10) == 1012
    assert relay.terminate() == 0


def test_listener_is_findable_by_application_name(relay: RelayProcess) -> None:
    with relay.db.connect() as owner:
        rows = owner.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgrelay-listener'"
        ).fetchone()
    assert rows == (1,)


@pytest.mark.fault
async def test_listener_killed_and_postgres_restarted_lose_nothing(fault_relay) -> None:  # type: ignore[no-untyped-def]
    server, relay = fault_relay
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        await c.subscribe(ORG_A)
        expected = [relay.db.emit(ORG_A, entity_id="before")]
        with server.admin() as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'pgrelay-listener'"
            ).fetchall()
        assert killed == [(True,)]
        expected.append(relay.db.emit(ORG_A, entity_id="listener down"))
        got = await c.events(2, timeout_s=10)
        server.cluster.restart()
        expected.append(relay.db.emit(ORG_A, entity_id="after restart"))
        got += await c.events(1, timeout_s=20)
    assert [e["id"] for e in got] == expected


@pytest.mark.fault
async def test_the_tails_connection_killed_under_load_loses_nothing(fault_relay) -> None:  # type: ignore[no-untyped-def]
    """The tail reads on its own connection; killed between and during steps, it
    reconnects and reads from where it stood: every event, once, in order."""
    server, relay = fault_relay
    async with connect(relay.ws_url) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG_A]))
        await c.subscribe(ORG_A)
        expected: list[int] = []
        killed_any = False
        for round_ in range(6):
            expected += [relay.db.emit(ORG_A, entity_id=f"r{round_}-{i}") for i in range(200)]
            with server.admin() as admin:
                killed = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'pgrelay-tail'"
                ).fetchall()
            killed_any = killed_any or killed == [(True,)]
        got = await c.events(len(expected), timeout_s=30)
    assert killed_any
    assert [e["id"] for e in got] == expected


# -- a client that stops reading ----------------------------------------------------


class StalledClient:
    """A raw client with a tiny receive buffer that authenticates, subscribes, then
    stops reading, so that the server's bytes for it pile up."""

    def __init__(self, url: str, token: str, org: uuid.UUID) -> None:
        import socket as socket_module

        from wsproto import ConnectionType, WSConnection
        from wsproto.events import Request, TextMessage

        host, port = url.removeprefix("ws://").split("/")[0].split(":")
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock = socket_module.socket()
        self.sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_RCVBUF, 4096)
        self.sock.settimeout(5)
        self.sock.connect((host, int(port)))
        self.sock.sendall(self.ws.send(Request(host=f"{host}:{port}", target="/v1")))
        self.ws.receive_data(self.sock.recv(4096))
        list(self.ws.events())  # AcceptConnection
        for message in (
            {"type": "auth", "token": token},
            {"type": "subscribe", "ref": "1", "org": str(org)},
        ):
            self.sock.sendall(self.ws.send(TextMessage(json.dumps(message))))

    def read_all(self, timeout_s: float = 15) -> tuple[list[dict[str, object]], int | None]:
        """Now read everything the server sends until it closes: (frames, close code)."""
        from wsproto.events import CloseConnection, TextMessage

        frames: list[dict[str, object]] = []
        text = ""
        self.sock.settimeout(timeout_s)
        while True:
            data = self.sock.recv(65536)
            if not data:
                return frames, None
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    text += event.data
                    if event.message_finished:
                        frames.append(json.loads(text))
                        text = ""
                elif isinstance(event, CloseConnection):
                    return frames, event.code


async def test_a_client_that_stops_reading_is_cut_off_without_slowing_the_others(
    db: Database, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from tests.e2e.conftest import start_relay

    relay = start_relay(db, tmp_path, slow_client_timeout_s="1", max_outbox_bytes="200000")
    per_burst, bursts = 300, 12

    def burst() -> None:
        with relay.db.connect(BACKEND) as conn:
            conn.execute(
                "SELECT relay.emit(%s, 'job.updated', 'job', g::text, "
                "jsonb_build_object('pad', repeat('x', 200))) "
                "FROM generate_series(1, %s) AS g",
                (ORG_A, per_burst),
            )

    try:
        stalled = StalledClient(relay.ws_url, relay.token([ORG_A]), ORG_A)
        async with connect(relay.ws_url) as ws:
            fast = Client(ws)
            await fast.auth(relay.token([ORG_A]))
            await fast.subscribe(ORG_A)
            await trio.sleep(0.3)  # the stalled client's subscription is live too
            got: list[dict[str, object]] = []
            for _ in range(bursts):  # ~90 KB every 0.25 s
                started = trio.current_time()
                burst()
                got += await fast.events(per_burst, timeout_s=10)
                elapsed = trio.current_time() - started
                assert elapsed < 2, f"the reading client took {elapsed:.1f} s for a burst"
                await trio.sleep(0.25)
        assert len({e["id"] for e in got}) == per_burst * bursts  # the reader misses nothing
        frames, code = await trio.to_thread.run_sync(stalled.read_all)
        # Cut off as hopeless (4008: reconnect and resume), never fed a silently
        # partial stream. A resync queued before the cut may or may not get out.
        assert code == 4008, ([f["type"] for f in frames][-5:], code)
        assert len([f for f in frames if f["type"] == "event"]) < per_burst * bursts
        metrics = relay.admin_get("/metrics")[1]
        assert "pgrelay_slow_client_closes_total 1.0" in metrics
    finally:
        relay.terminate()
