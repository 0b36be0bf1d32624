"""WebSocket load generator: one process holds many protocol-v1 clients.

A deliberately minimal RFC 6455 client over raw non-blocking sockets and one
epoll loop, so that the load generator costs a few microseconds per received
frame and is never the bottleneck:
- the upgrade response is only checked for status 101;
- client frames are masked with the all-zero key (legal: the mask bit is set,
  XOR with zero is the identity), so sending costs no XOR;
- server frames are walked by their headers; an event frame is recognised by
  its first bytes and only every `sample_every`-th one has its payload
  timestamp read (one regex search), never a full JSON parse;
- control frames (ready, subscribed, resync, error) are parsed with json.

The orchestrator (bench.run) drives a worker through a multiprocessing pipe:
commands are (name, args) tuples and each gets one reply. A worker also
publishes its running count of received events in a shared array, so that
an emitter can bound how far it runs ahead of delivery.

Resumes (catchup_many): `open` with `hold` authenticates clients without
subscribing; `resume` then subscribes every held client at once with a cursor
(from `cursors`, taken by an earlier subscribe), times each from its
`subscribe` to its `subscribed`, and keeps the replayed event frames (a slice
each, no parse) so that exactness is checked after the clock stops.

`BlockingClient` is the same client for one connection without a loop
(the catch-up scenarios); its `replay` only walks frames.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import re
import resource
import select
import socket
import struct
import time
from array import array
from typing import Any

#: Linux (asm-generic) SO_TIMESTAMPNS; SCM_TIMESTAMPNS has the same value. The kernel
#: stamps each packet as it reaches the client's socket; on loopback that is the moment
#: the relay's send() ran, so the measure leaves out this process's own queueing.
SO_TIMESTAMPNS = 35
ANC_BYTES = socket.CMSG_SPACE(16)
TIMESPEC = struct.Struct("qq")
TS_RE = re.compile(rb'"ts": ?([0-9.eE+-]+)')
EVENT_PREFIX = b'{"type":"event"'
RECV_BYTES = 64 * 1024

CONNECTING, HANDSHAKE, AUTH, SUBSCRIBING, LIVE, CLOSED, RESUMING = range(7)

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERRS = select.EPOLLERR | select.EPOLLHUP


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked client frame (mask key 0: the payload is sent as is)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def upgrade_request(host: str, port: int, path: str = "/v1") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Conn:
    __slots__ = (
        "allowed",
        "buf",
        "close_code",
        "cursor",
        "done_arrived",
        "done_read",
        "events",
        "fd",
        "kept",
        "notes",
        "org",
        "out",
        "replayed",
        "resume_sent",
        "sock",
        "started",
        "state",
        "storm_frame",
        "sub",
        "token",
    )

    def __init__(self, sock: socket.socket, sub: str, token: str, org: str | None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.sub = sub
        self.token = token
        self.org = org
        self.allowed: str | None = None
        """The org the token allows (a held client subscribes to it on `resume`)."""
        self.state = CONNECTING
        self.buf = b""
        self.out = b""
        self.events = 0
        self.cursor: str | None = None
        self.close_code: int | None = None
        # A resume (Worker.start_resume): event frames kept unparsed, control frames
        # other than `subscribed`, and the times (time.time()).
        self.kept: list[bytes] | None = None
        self.notes: list[str] = []
        self.replayed: int | None = None
        self.resume_sent = 0.0
        self.done_arrived = 0.0
        self.done_read = 0.0
        # A storm client (Worker.start_storm): when its connect began, and the
        # subscribe frame (with its cursor) it sends on `ready`.
        self.started = 0.0
        self.storm_frame: bytes | None = None


class Worker:
    def __init__(
        self, pipe: Any, worker_id: int, host: str, port: int, secret: str, shared: Any
    ) -> None:
        self.pipe = pipe
        self.worker_id = worker_id
        self.host = host
        self.port = port
        self.secret = secret
        self.shared = shared
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.events = 0
        self.frames = 0
        self.resyncs = 0
        self.errors: dict[str, int] = {}
        self.closes: dict[str, int] = {}
        self.samples = array("d")
        self.app_samples = array("d")
        self.sample_every = 1
        self.sample_tick = 0
        self.batch_wait_s = 0.0
        self.opening: dict[str, Any] | None = None
        self.resuming: dict[str, Any] | None = None
        self.resumed_conns: list[Conn] = []
        self.resumed_expect = 0
        self.storm: dict[str, Any] | None = None
        self.live = 0
        self.request = upgrade_request(host, port)

    # -- command side ---------------------------------------------------------------
    def command(self) -> bool:
        name, args = self.pipe.recv()
        if name == "open":
            self.start_open(args)
            return True  # replied when done
        if name == "snapshot":
            per_conn = [c.events for c in self.conns.values() if c.state == LIVE]
            reply = {
                "events": self.events,
                "frames": self.frames,
                "resyncs": self.resyncs,
                "errors": dict(self.errors),
                "closes": dict(self.closes),
                "live": self.live,
                "conns": len(self.conns),
                "per_conn_min": min(per_conn, default=0),
                "per_conn_max": max(per_conn, default=0),
                "samples": len(self.samples),
            }
            if args.get("reset_samples"):
                self.samples = array("d")
                self.app_samples = array("d")
                self.sample_every = int(args.get("sample_every", self.sample_every))
            if "batch_wait_s" in args:
                self.batch_wait_s = float(args["batch_wait_s"])
            self.pipe.send(reply)
        elif name == "samples":
            self.pipe.send((self.samples.tobytes(), self.app_samples.tobytes()))
            self.samples = array("d")
            self.app_samples = array("d")
        elif name == "cursors":
            self.pipe.send(
                [
                    [c.org, c.cursor]
                    for c in self.conns.values()
                    if c.state == LIVE and c.org is not None and c.cursor is not None
                ]
            )
        elif name == "resume":
            self.start_resume(args)
            return True  # replied when done
        elif name == "storm_prepare":
            self.storm_prepare(args)
        elif name == "storm_go":
            self.storm_go(args)
            return True  # replied when done
        elif name == "storm_check":
            self.pipe.send({"clients": [self.storm_result(c) for c in self.resumed_conns]})
            for c in self.resumed_conns:
                c.kept = None
            self.resumed_conns = []
        elif name == "resume_check":
            # After the clock stopped: check every replayed frame of the last resume.
            out = [self.resume_result(c, self.resumed_expect) for c in self.resumed_conns]
            for c in self.resumed_conns:
                c.kept = None
            self.resumed_conns = []
            self.pipe.send({"clients": out})
        elif name == "close_all":
            for c in list(self.conns.values()):
                self.close(c, None)
            self.pipe.send({"closed": True})
        elif name == "exit":
            for c in list(self.conns.values()):
                self.close(c, None)
            self.pipe.send({"bye": True})
            return False
        else:
            self.pipe.send({"error": f"unknown command {name}"})
        return True

    def start_open(self, args: dict[str, Any]) -> None:
        from relay.server.jwt import mint_token

        self.opening = {
            "want": int(args["count"]),
            "started": 0,
            "done": 0,
            "failed": 0,
            "org": args.get("org"),
            "orgs": args.get("orgs"),
            "prefix": args.get("sub_prefix", "bench"),
            "hold": bool(args.get("hold")),
            "concurrency": int(args.get("concurrency", 64)),
            "deadline": time.monotonic() + float(args.get("timeout_s", 60)),
            "t0": time.monotonic(),
            "mint": mint_token,
        }

    def pump_open(self) -> None:
        op = self.opening
        if op is None:
            return
        inflight = op["started"] - op["done"] - op["failed"]
        while op["started"] < op["want"] and inflight < op["concurrency"]:
            i = op["started"]
            op["started"] += 1
            inflight += 1
            sub = f"{op['prefix']}-w{self.worker_id}-{i}"
            # `orgs`: one org per client (the token allows it); `hold` with `org`
            # None: authenticated, not subscribed.
            org = op["orgs"][i] if op["orgs"] else op["org"]
            subscribe = org if not op["hold"] else None
            token = op["mint"](self.secret, orgs=[org] if org else [], sub=sub, lifetime_s=3600)
            c = self.connect(sub, token, subscribe)
            if c is None:
                op["failed"] += 1
                continue
            c.allowed = org
        if op["done"] + op["failed"] >= op["want"] or time.monotonic() > op["deadline"]:
            self.pipe.send(
                {
                    "live": op["done"],
                    "failed": op["failed"],
                    "pending": op["want"] - op["done"] - op["failed"],
                    "seconds": round(time.monotonic() - op["t0"], 3),
                    "errors": dict(self.errors),
                    "closes": dict(self.closes),
                }
            )
            self.opening = None

    def connect(self, sub: str, token: str, org: str | None) -> Conn | None:
        """A non-blocking connect, registered with the loop; None if it failed at once."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        c = Conn(sock, sub, token, org)
        err = sock.connect_ex((self.host, self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.note(self.errors, f"connect:{errno.errorcode.get(err, err)}")
            return None
        self.conns[c.fd] = c
        self.ep.register(c.fd, EPOLLOUT | EPOLLIN)
        return c

    # -- the reconnect storm ----------------------------------------------------------
    def storm_prepare(self, args: dict[str, Any]) -> None:
        """Tokens and subscribe frames for a storm, made before the clock starts:
        one client per [org, cursor] of `plan`, each with its own `sub`."""
        from relay.server.jwt import mint_token

        prefix = args["sub_prefix"]
        clients = []
        for i, (org, cursor) in enumerate(args["plan"]):
            sub = f"{prefix}-w{self.worker_id}-{i}"
            token = mint_token(self.secret, orgs=[org], sub=sub, lifetime_s=3600)
            frame = client_frame(
                json.dumps({"type": "subscribe", "ref": "r", "org": org, "cursor": cursor}).encode()
            )
            clients.append((sub, token, org, frame))
        offsets = sorted(float(x) for x in args["offsets"])
        self.storm = {"clients": clients, "offsets": offsets}
        self.pipe.send({"prepared": len(clients)})

    def storm_go(self, args: dict[str, Any]) -> None:
        """Start client i at t0 + offsets[i] (time.time()): connect, upgrade, auth,
        and on `ready` subscribe with its cursor; done at `subscribed` (or a close).
        Replied by pump_storm when every client is done or at the deadline."""
        st = self.storm
        if st is None:
            self.pipe.send({"error": "storm_go before storm_prepare"})
            return
        st |= {
            "t0": float(args["t0"]),
            "next": 0,
            "conns": [],
            "failed_connects": 0,
            "done": 0,
            "deadline": time.monotonic() + float(args["timeout_s"]),
        }
        self.resuming = None
        self.resumed_conns = []

    def storm_done(self, c: Conn) -> None:
        if self.storm is not None and "done" in self.storm:
            self.storm["done"] += 1

    def pump_storm(self) -> float:
        """Starts the clients whose time has come; returns the poll timeout."""
        st = self.storm
        if st is None or "t0" not in st:
            return 1.0
        clients: list[Any] = st["clients"]
        offsets: list[float] = st["offsets"]
        t0: float = st["t0"]
        now = time.time()
        while st["next"] < len(clients) and now >= t0 + offsets[st["next"]]:
            sub, token, org, frame = clients[st["next"]]
            st["next"] += 1
            started = time.time()
            c = self.connect(sub, token, org)
            if c is None:
                c = Conn(socket.socket(), sub, token, org)
                c.sock.close()
                c.state = CLOSED
                c.notes.append("connect failed at once")
                st["done"] += 1
            c.started = started
            c.storm_frame = frame
            c.kept = []
            st["conns"].append(c)
            now = time.time()
        if st["next"] < len(clients):
            return max(0.0, min(0.02, t0 + offsets[int(st["next"])] - now))
        if st["done"] < len(clients) and time.monotonic() < st["deadline"]:
            return 0.02
        self.resumed_conns = st["conns"]
        self.storm = None
        self.pipe.send(
            {
                "clients": [
                    {
                        "started": c.started,
                        "sent": c.resume_sent,
                        "arrived": c.done_arrived,
                        "read": c.done_read,
                        "replayed": c.replayed,
                    }
                    for c in self.resumed_conns
                ]
            }
        )
        return 1.0

    @staticmethod
    def storm_result(c: Conn) -> dict[str, Any]:
        """One storm client after the clock stopped: the event ids it was replayed,
        in order (checked against the table by the orchestrator), and what went wrong."""
        problems = list(c.notes)
        ids: list[int] = []
        for frame in c.kept or []:
            ev = json.loads(frame)
            if ev.get("org") != c.org:
                problems.append(f"event of org {ev.get('org')}")
            ids.append(int(ev["id"]))
        if c.replayed is None:
            problems.append(f"no subscribed (state {c.state}, close {c.close_code})")
        elif c.replayed != len(ids):
            problems.append(f"replayed {c.replayed}, {len(ids)} events")
        return {
            "org": c.org,
            "ids": ids,
            "replayed": c.replayed,
            "problems": problems[:5],
            "failed_after_s": round(c.done_read - c.started, 3) if c.replayed is None else None,
        }

    def start_resume(self, args: dict[str, Any]) -> None:
        """Subscribe held clients at once, one (org, cursor) of `plan` each."""
        plan = args["plan"]
        held: dict[str, list[Conn]] = {}
        for c in self.conns.values():
            if c.state == LIVE and c.org is None and c.allowed:
                held.setdefault(c.allowed, []).append(c)
        conns = []
        for org, _cursor in plan:
            if not held.get(org):
                self.pipe.send({"error": f"no held client whose token allows {org}"})
                return
            conns.append(held[org].pop())
        self.resuming = {
            "conns": conns,
            "done": 0,
            "expect": int(args["expect_events"]),
            "deadline": time.monotonic() + float(args.get("timeout_s", 60)),
        }
        for c, (org, cursor) in zip(conns, plan, strict=True):
            c.org = org
            c.state = RESUMING
            c.events = 0
            c.kept = []
            msg = {"type": "subscribe", "ref": "r", "org": org, "cursor": cursor}
            c.resume_sent = time.time()
            self.send(c, client_frame(json.dumps(msg).encode()))

    def pump_resume(self) -> None:
        rs = self.resuming
        if rs is None:
            return
        if rs["done"] < len(rs["conns"]) and time.monotonic() < rs["deadline"]:
            return
        self.resuming = None
        self.resumed_conns = rs["conns"]
        self.resumed_expect = rs["expect"]
        self.pipe.send(
            {
                "clients": [
                    {
                        "sent": c.resume_sent,
                        "arrived": c.done_arrived,
                        "read": c.done_read,
                        "replayed": c.replayed,
                    }
                    for c in rs["conns"]
                ]
            }
        )

    @staticmethod
    def resume_result(c: Conn, expect: int) -> dict[str, Any]:
        """One resumed client: its times, and whether it got exactly its org's
        `expect` events (entity_id 0 .. expect-1, each once), then `subscribed`
        with `replayed` = expect."""
        problems = list(c.notes)
        ids: list[int] = []
        for frame in c.kept or []:
            ev = json.loads(frame)
            if ev.get("org") != c.org:
                problems.append(f"event of org {ev.get('org')}")
                break
            ids.append(int(ev["entity_id"]))
        if c.replayed is None:
            problems.append(f"no subscribed (state {c.state}, close {c.close_code})")
        elif c.replayed != expect:
            problems.append(f"replayed {c.replayed}")
        if len(ids) != expect or sorted(ids) != list(range(expect)):
            problems.append(f"{len(ids)} events, {len(set(ids))} distinct entity ids")
        return {
            "org": c.org,
            "sent": c.resume_sent,
            "arrived": c.done_arrived,
            "read": c.done_read,
            "events": len(c.kept or ()),
            "replayed": c.replayed,
            "exact": not problems,
            "problems": problems[:5],
        }

    def opened(self, c: Conn) -> None:
        c.state = LIVE
        self.live += 1
        if self.opening is not None:
            self.opening["done"] += 1

    @staticmethod
    def note(d: dict[str, int], key: str) -> None:
        d[key] = d.get(key, 0) + 1

    # -- socket side --------------------------------------------------------------
    def send(self, c: Conn, data: bytes) -> None:
        if c.out:
            c.out += data
            return
        try:
            sent = c.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close(c, 1006)
            return
        if sent < len(data):
            c.out = data[sent:]
            self.ep.modify(c.fd, EPOLLIN | EPOLLOUT)

    def writable(self, c: Conn) -> None:
        if c.state == CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.note(self.errors, f"connect:{errno.errorcode.get(err, err)}")
                self.close(c, 1006)
                return
            c.state = HANDSHAKE
            self.ep.modify(c.fd, EPOLLIN)
            self.send(c, self.request)
            return
        if c.out:
            data, c.out = c.out, b""
            self.send(c, data)
            if not c.out:
                self.ep.modify(c.fd, EPOLLIN)

    def close(self, c: Conn, code: int | None) -> None:
        if c.state == CLOSED:
            return
        if c.state == RESUMING:
            c.notes.append(f"closed {code}")
            self.resumed(c)
        elif c.storm_frame is not None and c.state in (CONNECTING, HANDSHAKE, AUTH):
            stage = {CONNECTING: "connect", HANDSHAKE: "upgrade", AUTH: "auth"}[c.state]
            c.notes.append(f"closed {code} during {stage}")
            c.done_read = time.time()
            self.storm_done(c)
        if c.state == LIVE:
            self.live -= 1
        elif self.opening is not None and c.state != CLOSED:
            self.opening["failed"] += 1
        if code is not None:
            self.note(self.closes, str(code))
        c.state = CLOSED
        c.close_code = code
        self.conns.pop(c.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(c.fd)
        c.sock.close()

    def readable(self, c: Conn) -> None:
        try:
            data, anc, _flags, _addr = c.sock.recvmsg(RECV_BYTES, ANC_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(c, 1006)
            return
        if not data:
            self.close(c, c.close_code or 1006)
            return
        now = time.time()
        arrived = now
        if anc:
            sec, nsec = TIMESPEC.unpack_from(anc[0][2])
            arrived = sec + nsec * 1e-9
        buf = c.buf + data if c.buf else data
        if c.state == HANDSHAKE:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                c.buf = buf
                return
            if b" 101 " not in buf[: buf.find(b"\r\n")]:
                self.note(self.errors, "upgrade:" + buf[: buf.find(b"\r\n")].decode("latin-1"))
                self.close(c, None)
                return
            c.state = AUTH
            self.send(c, client_frame(json.dumps({"type": "auth", "token": c.token}).encode()))
            buf = buf[end + 4 :]
        # Walk the frames.
        n = len(buf)
        off = 0
        events = 0
        samples = self.samples
        app_samples = self.app_samples
        every = self.sample_every
        tick = self.sample_tick
        kept = c.kept
        while n - off >= 2:
            ln = buf[off + 1] & 0x7F
            if ln < 126:
                h = off + 2
            elif ln == 126:
                if n - off < 4:
                    break
                ln = (buf[off + 2] << 8) | buf[off + 3]
                h = off + 4
            else:
                if n - off < 10:
                    break
                ln = int.from_bytes(buf[off + 2 : off + 10], "big")
                h = off + 10
            end = h + ln
            if end > n:
                break
            op = buf[off] & 0x0F
            if op == 1 and buf.startswith(EVENT_PREFIX, h):
                events += 1
                if kept is not None:
                    kept.append(buf[h:end])
                tick += 1
                if tick >= every:
                    tick = 0
                    m = TS_RE.search(buf, h, end)
                    if m is not None:
                        sent = float(m.group(1))
                        samples.append(arrived - sent)
                        app_samples.append(now - sent)
            elif op == 1:
                if c.state == RESUMING:
                    # Frames before `subscribed` are the replay's: count them now.
                    c.events += events
                    self.events += events
                    events = 0
                    self.control(c, buf[h:end], arrived, now)
                    if c.state != RESUMING:
                        kept = None  # replay over; anything later is not counted
                else:
                    self.control(c, buf[h:end])
            elif op == 9:
                self.send(c, client_frame(buf[h:end], 0xA))
            elif op == 8:
                code = int.from_bytes(buf[h : h + 2], "big") if ln >= 2 else 1005
                c.close_code = code
                self.close(c, code)
                return
            self.frames += 1
            off = end
        self.sample_tick = tick
        c.buf = buf[off:] if off < n else b""
        if events:
            c.events += events
            self.events += events
            self.shared[self.worker_id] = self.events

    def resumed(self, c: Conn) -> None:
        """A resuming client is done (`subscribed`, or closed); its kept frames stay
        until the result is taken."""
        if c.state == RESUMING:
            c.state = LIVE
            if self.resuming is not None:
                self.resuming["done"] += 1
            if c.storm_frame is not None:
                self.live += 1
                self.storm_done(c)

    def control(self, c: Conn, payload: bytes, arrived: float = 0.0, now: float = 0.0) -> None:
        msg = json.loads(payload)
        kind = msg.get("type")
        if c.state == RESUMING:
            if kind == "subscribed":
                c.done_arrived, c.done_read = arrived, now
                c.replayed = msg.get("replayed")
                c.cursor = msg.get("cursor")
                self.resumed(c)
                return
            c.notes.append(f"{kind}: {payload[:200].decode(errors='replace')}")
        if kind == "ready":
            if c.state == AUTH and c.storm_frame is not None:
                c.state = RESUMING
                c.resume_sent = time.time()
                self.send(c, c.storm_frame)
            elif c.state == AUTH:
                if c.org:
                    c.state = SUBSCRIBING
                    self.send(
                        c,
                        client_frame(
                            json.dumps(
                                {"type": "subscribe", "ref": "s", "org": c.org, "cursor": None}
                            ).encode()
                        ),
                    )
                else:
                    self.opened(c)
        elif kind == "subscribed":
            c.cursor = msg.get("cursor")
            if c.state == SUBSCRIBING:
                self.opened(c)
        elif kind == "resync":
            self.resyncs += 1
            self.note(self.errors, "resync:" + str(msg.get("reason")))
        elif kind == "error":
            self.note(self.errors, "error:" + str(msg.get("code")))
        elif kind == "unsubscribed":
            self.note(self.errors, "unsubscribed:" + str(msg.get("reason")))

    # -- loop -----------------------------------------------------------------------
    def run(self) -> None:
        pipe_fd = self.pipe.fileno()
        self.ep.register(pipe_fd, EPOLLIN)
        conns = self.conns
        readable = self.readable
        while True:
            self.pump_open()
            self.pump_resume()
            timeout = self.pump_storm()
            if self.opening is not None or self.resuming is not None:
                timeout = min(timeout, 0.02)
            ready = self.ep.poll(timeout, 512)
            for fd, ev in ready:
                if fd == pipe_fd:
                    if not self.command():
                        return
                    continue
                c = conns.get(fd)
                if c is None:
                    continue
                if ev & EPOLLOUT:
                    self.writable(c)
                    if c.state == CLOSED:
                        continue
                if ev & (EPOLLIN | EPOLLERRS):
                    readable(c)
            if self.batch_wait_s and ready:
                # Throughput mode: let frames pile up so one recv() takes many (the
                # timestamps then read up to batch_wait_s late).
                time.sleep(self.batch_wait_s)


def worker_main(pipe: Any, worker_id: int, host: str, port: int, secret: str, shared: Any) -> None:
    raise_nofile()
    with contextlib.suppress(KeyboardInterrupt):
        Worker(pipe, worker_id, host, port, secret, shared).run()


class BlockingClient:
    """One protocol-v1 connection with blocking reads (catch-up timing)."""

    def __init__(self, host: str, port: int, timeout_s: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.sock.sendall(upgrade_request(host, port))
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"upgrade refused: {head[:200]!r}")

    def _fill(self) -> None:
        data = self.sock.recv(RECV_BYTES)
        if not data:
            raise ConnectionError("closed by the relay")
        self.buf += data

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(client_frame(json.dumps(message).encode()))

    def recv_raw(self) -> tuple[int, bytes]:
        while True:
            buf = self.buf
            if len(buf) >= 2:
                ln = buf[1] & 0x7F
                h = 2
                if ln == 126 and len(buf) >= 4:
                    ln, h = int.from_bytes(buf[2:4], "big"), 4
                elif ln == 127 and len(buf) >= 10:
                    ln, h = int.from_bytes(buf[2:10], "big"), 10
                if (ln < 126 or h > 2) and len(buf) >= h + ln:
                    self.buf = buf[h + ln :]
                    return buf[0] & 0x0F, buf[h : h + ln]
            self._fill()

    def recv(self) -> dict[str, Any]:
        while True:
            op, payload = self.recv_raw()
            if op == 1:
                return json.loads(payload)  # type: ignore[no-any-return]
            if op == 9:
                self.sock.sendall(client_frame(payload, 0xA))
            elif op == 8:
                raise ConnectionError(f"closed by the relay: {payload[:2].hex()}")

    def replay(self, deadline: float) -> tuple[list[bytes], dict[str, Any], list[dict[str, Any]]]:
        """Read until `subscribed` (or `deadline`, time.monotonic()): only walks
        frames. Event frames are kept as unparsed slices (checked by the caller
        after the clock stops); other text frames are parsed. Returns (event
        frames, the `subscribed` message, other messages before it)."""
        kept: list[bytes] = []
        others: list[dict[str, Any]] = []
        buf = self.buf
        sock = self.sock
        while True:
            n = len(buf)
            off = 0
            while n - off >= 2:
                ln = buf[off + 1] & 0x7F
                if ln < 126:
                    h = off + 2
                elif ln == 126:
                    if n - off < 4:
                        break
                    ln = (buf[off + 2] << 8) | buf[off + 3]
                    h = off + 4
                else:
                    if n - off < 10:
                        break
                    ln = int.from_bytes(buf[off + 2 : off + 10], "big")
                    h = off + 10
                end = h + ln
                if end > n:
                    break
                op = buf[off] & 0x0F
                if op == 1 and buf.startswith(EVENT_PREFIX, h):
                    kept.append(buf[h:end])
                elif op == 1:
                    msg = json.loads(buf[h:end])
                    if msg.get("type") == "subscribed":
                        self.buf = buf[end:]
                        return kept, msg, others
                    others.append(msg)
                elif op == 9:
                    sock.sendall(client_frame(buf[h:end], 0xA))
                elif op == 8:
                    raise ConnectionError(f"closed by the relay: {buf[h : h + 2].hex()}")
                off = end
            buf = buf[off:]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no subscribed: {len(kept)} events, others {others[:3]}")
            sock.settimeout(left)
            data = sock.recv(4 * RECV_BYTES)
            if not data:
                raise ConnectionError(f"closed by the relay after {len(kept)} events")
            buf = buf + data if buf else data

    def expect(self, kind: str) -> dict[str, Any]:
        msg = self.recv()
        if msg.get("type") != kind:
            raise RuntimeError(f"expected {kind}, got {msg}")
        return msg

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(client_frame(b"\x03\xe8", 0x8))
        self.sock.close()
