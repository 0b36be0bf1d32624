"""One process of soak clients: many protocol-v1 WebSocket clients (trio-websocket).

Run by the runner as ``python -m tests.soak.clients SPEC.json OUT.json``, it talks
to the runner one line at a time:

- it prints ``ready`` once every client has its first ``subscribed`` for every org;
- it reads ``go <t0>`` (unix seconds): time zero of the fault schedule;
- it reads ``drain <xids.json> <deadline_s>`` once the writers have stopped: it
  waits until every client's last cursor makes every row of its orgs visible
  (or the deadline passes), writes OUT.json, prints ``done <drained> <total>``
  and exits.

What a client does (protocol v1): auth, subscribe to each of its orgs with its
last cursor (null the first time), keep the last cursor per org from
``event``/``subscribed``/``resync`` frames, and resume with it after any
disconnect: 1012 after 0.5-5 s; 4001 mints a new token and reconnects at once;
4008 and 1011 reconnect at once; anything else (a reset, a refused connect)
backs off with jitter and, like a load balancer, tries the other instance.

What it records, per client and org: every event id with the connection number
it came on, every resync (reason, cursor, and whether the client had stopped
reading on that connection), the cursor of the first ``subscribed``, and a
short log of its connections. Latency samples are receive time minus the
writer's clock in the payload, for live single-commit events on connections
where the client never stopped reading.
"""

from __future__ import annotations

import json
import math
import random
import socket
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from relay.core.cursor import BadCursor, Snapshot, decode_cursor
from relay.server.jwt import mint_token

CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 3.0
#: The token minted after a 4001 (the expiry test happens once per client).
RENEWED_TOKEN_S = 6 * 3600
#: Examples kept of each anomaly, per client.
MAX_EXAMPLES = 20
#: How often the drain checks the cursors.
DRAIN_POLL_S = 0.25


class Timeline:
    """Time zero of the schedule, once the runner has said `go`."""

    def __init__(self) -> None:
        self.t0_trio: float | None = None
        self.t0_wall: float | None = None

    def start(self, t0_wall: float) -> None:
        self.t0_wall = t0_wall
        self.t0_trio = trio.current_time() - (time.time() - t0_wall)

    def at(self, t_rel: float) -> float:
        """trio time of schedule time `t_rel` (infinity before `go`)."""
        return math.inf if self.t0_trio is None else self.t0_trio + t_rel

    def now(self) -> float:
        """Seconds since time zero (negative before `go`)."""
        return time.time() - self.t0_wall if self.t0_wall is not None else -1.0


@dataclass
class Outcome:
    kind: str
    """closed | connect_failed | away | error | unsubscribed"""
    code: int | None = None
    seconds: float = 0.0
    why: str = ""


class SoakClient:
    def __init__(
        self,
        spec: dict[str, Any],
        urls: list[str],
        secret: str,
        timeline: Timeline,
        latency: list[tuple[float, int, float, str]],
        rng: random.Random,
    ) -> None:
        self.name: str = spec["name"]
        self.orgs: list[str] = list(spec["orgs"])
        self.home: int = spec["home"]
        self.rcvbuf: int = spec["rcvbuf"]
        self.lifetime_s: int = spec["token_lifetime_s"]
        faults = [(at, "stop", dur) for at, dur in spec["stops"]]
        faults += [(at, "away", dur) for at, dur in spec["aways"]]
        self.faults = sorted(faults)
        self.urls = urls
        self.secret = secret
        self.timeline = timeline
        self.latency = latency
        self.rng = rng
        self.token: str | None = None
        self.url = ""

        self.cursor: dict[str, str | None] = dict.fromkeys(self.orgs)
        self.first_subscribed: dict[str, str | None] = dict.fromkeys(self.orgs)
        self.ids: dict[str, array[int]] = {o: array("q") for o in self.orgs}
        self.conns: dict[str, array[int]] = {o: array("i") for o in self.orgs}
        self.resyncs: list[dict[str, Any]] = []
        self.log: list[tuple[float, int, str]] = []
        self.codes: Counter[str] = Counter()
        self.conn = 0
        self.conn_events = 0
        self.seen_conn: set[int] = set()
        self.seen_all: set[int] = set()
        self.repeats_same_conn = 0
        self.repeats_after_reconnect = 0
        self.repeat_examples: list[dict[str, Any]] = []
        self.foreign: list[dict[str, Any]] = []
        """Events for an org this client did not subscribe to (cross-org)."""
        self.coalesced = 0
        self.errors: list[str] = []
        self.live: set[str] = set()
        self.subscribing: set[str] = set()
        self.stopped_this_conn = False
        self.stops_done = 0
        self.aways_done = 0
        self.expired = 0
        self.cut_after_stop = 0
        self.ready = trio.Event()

    # -- bookkeeping ---------------------------------------------------------------
    def note(self, text: str) -> None:
        self.log.append((round(self.timeline.now(), 3), self.conn, text))

    def _token(self) -> str:
        if self.token is None:
            self.token = mint_token(
                self.secret, orgs=self.orgs, sub=f"soak-{self.name}", lifetime_s=self.lifetime_s
            )
        return self.token

    def covered(self, xids: dict[str, set[int]], max_xid: dict[str, int]) -> bool:
        """Whether each org's last cursor makes every row of that org visible."""
        for org in self.orgs:
            cursor = self.cursor[org]
            if cursor is None:
                return False
            decoded = decode_cursor(cursor)
            if isinstance(decoded, BadCursor):
                return False
            snap: Snapshot = decoded.snapshot
            if max_xid.get(org, -1) >= snap.xmax:
                return False
            org_xids = xids.get(org, set())
            if any(x in org_xids for x in snap.xip):
                return False
        return True

    # -- the connection loop ------------------------------------------------------------
    async def run(self) -> None:
        attempt = 0
        while True:
            outcome = await self._one_connection(self.urls[self.home])
            self.codes[str(outcome.code) if outcome.kind == "closed" else outcome.kind] += 1
            if self.live:
                attempt = 0  # it worked: backoff starts over
            self.live = set()
            self.subscribing = set()
            delay = 0.0
            if outcome.kind == "away":
                self.note(f"away {outcome.seconds:.1f}s")
                await trio.sleep(outcome.seconds)
                self.home ^= 1  # resume on the other instance
                self.aways_done += 1
                self.note(f"back, to {self.urls[self.home]}")
                continue
            if outcome.kind == "closed":
                code = outcome.code
                self.note(f"closed {code} after {self.conn_events} events")
                if self.stopped_this_conn:
                    # Cut off after it stopped reading: 4008, or 1006 when the server
                    # could not even get its close frame through the full socket.
                    self.cut_after_stop += 1
                if code == 1012:
                    delay = self.rng.uniform(0.5, 5.0)
                elif code == 4001:
                    self.expired += 1
                    self.lifetime_s = RENEWED_TOKEN_S
                    self.token = None
                elif code in (4008, 1011):
                    pass  # reconnect at once
                else:
                    attempt += 1
                    delay = self._backoff(attempt)
            elif outcome.kind == "connect_failed":
                self.note(f"connect failed: {outcome.why}")
                attempt += 1
                delay = self._backoff(attempt)
                self.home ^= 1  # what a load balancer would do
            else:  # error, unsubscribed
                self.note(f"{outcome.kind} {outcome.why}")
                delay = self.rng.uniform(0.5, 1.5)
            await trio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** min(attempt - 1, 8))
        return ceiling * self.rng.uniform(0.5, 1.0)

    async def _one_connection(self, url: str) -> Outcome:
        host, _, rest = url.removeprefix("ws://").partition(":")
        port = int(rest.split("/", 1)[0])
        outcome: Outcome | None = None
        failure = ""
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    stream = await _open_stream(host, port, self.rcvbuf)
                    ws = await wrap_client_stream(
                        nursery, stream, f"{host}:{port}", "/v1", max_message_size=1 << 20
                    )
                try:
                    outcome = await self._converse(ws, url)
                finally:
                    with trio.CancelScope(shield=True) as scope:
                        scope.deadline = trio.current_time() + CLOSE_TIMEOUT_S
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        except* (OSError, trio.TooSlowError, HandshakeError, trio.BrokenResourceError) as group:
            failure = repr(group.exceptions[0])[:200]
        return outcome or Outcome("connect_failed", why=failure)

    async def _converse(self, ws: WebSocketConnection, url: str) -> Outcome:
        self.conn += 1
        self.conn_events = 0
        self.url = url
        self.seen_conn = set()
        self.stopped_this_conn = False
        self.note(f"open {url}")
        try:
            await ws.send_message(json.dumps({"type": "auth", "token": self._token()}))
            while True:
                fault = self.faults[0] if self.faults else None
                deadline = self.timeline.at(fault[0]) if fault else math.inf
                with trio.move_on_at(deadline) as scope:
                    text = await ws.get_message()
                if scope.cancelled_caught:
                    assert fault is not None
                    self.faults.pop(0)
                    _, kind, seconds = fault
                    if kind == "stop":
                        self.stopped_this_conn = True
                        self.stops_done += 1
                        self.note(f"stop reading {seconds:.1f}s")
                        await trio.sleep(seconds)
                        self.note("read again")
                        continue
                    return Outcome("away", seconds=seconds)
                received_at = time.time()
                frame = json.loads(text)
                outcome = await self._frame(ws, frame, received_at)
                if outcome is not None:
                    return outcome
        except ConnectionClosed as exc:
            return Outcome("closed", code=exc.reason.code if exc.reason else None)

    async def _frame(
        self, ws: WebSocketConnection, frame: dict[str, Any], received_at: float
    ) -> Outcome | None:
        kind = frame.get("type")
        org = frame.get("org")
        if kind == "event":
            self._event(frame, received_at)
        elif kind == "ready":
            if not self.subscribing and not self.live:
                for i, o in enumerate(self.orgs):
                    self.subscribing.add(o)
                    await ws.send_message(
                        json.dumps(
                            {"type": "subscribe", "ref": str(i), "org": o, "cursor": self.cursor[o]}
                        )
                    )
        elif kind == "subscribed" and org in self.cursor:
            assert isinstance(org, str)
            if self.first_subscribed[org] is None:
                self.first_subscribed[org] = frame.get("cursor")
            self._new_cursor(org, frame)
            self.subscribing.discard(org)
            self.live.add(org)
            self.note(
                f"subscribed {org[-4:]} replayed={frame.get('replayed')} "
                f"after {self.conn_events} events on this connection"
            )
            if all(self.first_subscribed[o] is not None for o in self.orgs):
                self.ready.set()
        elif kind == "resync" and org in self.cursor:
            assert isinstance(org, str)
            self.resyncs.append(
                {
                    "t": round(self.timeline.now(), 3),
                    "conn": self.conn,
                    "org": org,
                    "reason": frame.get("reason"),
                    "cursor": frame.get("cursor"),
                    "stopped": self.stopped_this_conn,
                    "after_ids": len(self.ids[org]),
                }
            )
            self._new_cursor(org, frame)
            self.note(f"resync {org[-4:]} {frame.get('reason')}")
        elif kind == "unsubscribed":
            self.errors.append(f"unsubscribed: {frame}")
            return Outcome("unsubscribed", why=str(frame.get("reason")))
        elif kind == "error":
            self.errors.append(f"error: {frame}")
            return Outcome("error", why=str(frame.get("code")))
        elif kind not in ("pong", "subscribed", "resync"):
            self.errors.append(f"unexpected frame: {str(frame)[:200]}")
        return None

    def _event(self, frame: dict[str, Any], received_at: float) -> None:
        org = frame.get("org")
        event_id = frame.get("id")
        if not isinstance(event_id, int):
            self.errors.append(f"event without an integer id: {str(frame)[:200]}")
            return
        if org not in self.ids:
            if len(self.foreign) < 10_000:
                self.foreign.append({"conn": self.conn, "org": org, "id": event_id})
            return
        assert isinstance(org, str)
        self.ids[org].append(event_id)
        self.conns[org].append(self.conn)
        self.conn_events += 1
        if event_id in self.seen_conn:
            self.repeats_same_conn += 1
            if len(self.repeat_examples) < MAX_EXAMPLES:
                self.repeat_examples.append(
                    {
                        "t": round(self.timeline.now(), 3),
                        "conn": self.conn,
                        "org": org,
                        "id": event_id,
                    }
                )
        elif event_id in self.seen_all:
            self.repeats_after_reconnect += 1
        self.seen_conn.add(event_id)
        self.seen_all.add(event_id)
        if "coalesced" in frame:
            self.coalesced += 1
        self._new_cursor(org, frame)
        payload = frame.get("payload")
        if (
            org in self.live
            and not self.stopped_this_conn
            and isinstance(payload, dict)
            and payload.get("k") == "s"
            and isinstance(payload.get("t"), float | int)
        ):
            self.latency.append(
                (
                    received_at - payload["t"],
                    int(payload.get("d", 1)),
                    self.timeline.now(),
                    self.url,
                )
            )

    def _new_cursor(self, org: str, frame: dict[str, Any]) -> None:
        cursor = frame.get("cursor")
        if isinstance(cursor, str) and cursor:
            self.cursor[org] = cursor
        else:
            self.errors.append(f"{frame.get('type')} frame without a cursor")

    def result(self, drained: bool) -> dict[str, Any]:
        return {
            "name": self.name,
            "orgs": self.orgs,
            "drained": drained,
            "ids": {o: a.tolist() for o, a in self.ids.items()},
            "conns": {o: a.tolist() for o, a in self.conns.items()},
            "first_subscribed": self.first_subscribed,
            "last_cursor": self.cursor,
            "resyncs": self.resyncs,
            "log": self.log,
            "codes": dict(self.codes),
            "connections": self.conn,
            "repeats_same_conn": self.repeats_same_conn,
            "repeats_after_reconnect": self.repeats_after_reconnect,
            "repeat_examples": self.repeat_examples,
            "foreign": self.foreign,
            "coalesced": self.coalesced,
            "errors": self.errors[:MAX_EXAMPLES],
            "stops": self.stops_done,
            "aways": self.aways_done,
            "expired": self.expired,
            "cut_after_stop": self.cut_after_stop,
        }


async def _open_stream(host: str, port: int, rcvbuf: int) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


# -- the process -----------------------------------------------------------------------


def _read_json(path: str) -> Any:
    return json.loads(Path(path).read_text())


def _write_json(path: str, data: Any) -> None:
    Path(path).write_text(json.dumps(data, separators=(",", ":")))


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _read_line() -> str:
    line: str = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
    if not line:
        raise SystemExit("soak clients: the runner went away")
    return line.strip()


async def main(spec_path: str, out_path: str) -> None:
    spec = _read_json(spec_path)
    timeline = Timeline()
    latency: list[tuple[float, int, float, str]] = []
    rng = random.Random(spec["seed"])
    clients = [
        SoakClient(c, spec["urls"], spec["secret"], timeline, latency, random.Random(rng.random()))
        for c in spec["clients"]
    ]
    async with trio.open_nursery() as nursery:
        for i, client in enumerate(clients):
            nursery.start_soon(client.run)
            if i % 20 == 19:
                await trio.sleep(0.05)  # do not open hundreds of handshakes at once
        for client in clients:
            await client.ready.wait()
        _say("ready")

        command = (await _read_line()).split()
        if command[0] != "go":
            raise SystemExit(f"soak clients: expected go, got {command}")
        timeline.start(float(command[1]))

        command = (await _read_line()).split()
        if command[0] != "drain":
            raise SystemExit(f"soak clients: expected drain, got {command}")
        rows = _read_json(command[1])
        xids = {org: set(values) for org, values in rows.items()}
        max_xid = {org: max(values) for org, values in rows.items() if values}
        drained: set[str] = set()
        with trio.move_on_after(float(command[2])):
            while len(drained) < len(clients):
                for client in clients:
                    if client.name not in drained and client.covered(xids, max_xid):
                        drained.add(client.name)
                await trio.sleep(DRAIN_POLL_S)
        out = {
            "clients": [c.result(c.name in drained) for c in clients],
            "latency": [(round(lat * 1000, 3), d) for lat, d, _, _ in latency],
            # For diagnosis: (ms, doorbell, seconds after time zero, instance URL).
            "latency_detail": [
                (round(lat * 1000, 1), d, round(t, 2), url) for lat, d, t, url in latency
            ],
        }
        _write_json(out_path, out)
        _say(f"done {len(drained)} {len(clients)}")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])
