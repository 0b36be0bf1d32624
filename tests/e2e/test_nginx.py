"""Behind a reverse proxy: the shipped nginx configuration (deploy/nginx/) in front
of the real `pgrelay serve`, through Debian's nginx started here, as a child
process, on free loopback ports.

The configuration under test is derived from the shipped files, never written
anew: pgrelay.conf and pgrelay-stream.conf with TLS taken out (their `listen
... ssl` lines become one plain `listen` on a free port, their `ssl_*` lines go)
and the daemon's port put in, including pgrelay-locations.conf from the
repository. Every proxy directive is the shipped one, and nginx's buffering stays
at its default. The shipped files themselves, TLS included, pass `nginx -t`.

nginx comes from scripts/ensure-nginx.sh (run by `make test`; run here when nginx
is missing); these tests skip, with the reason, only when it cannot be had.
"""

from __future__ import annotations

import datetime
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
import trio
from trio_websocket import ConnectionRejected, WebSocketConnection, wrap_client_stream

from relay.dev.embedded import free_port
from relay.server.stream import KEEPALIVE_S
from relay.ws.limits import PING_INTERVAL_S, PONG_TIMEOUT_S
from tests.e2e.conftest import Client, RelayProcess, start_relay
from tests.e2e.http_support import Response, iter_pages, open_stream, request
from tests.e2e.test_http import emit, owed, snapshot
from tests.pgharness import BACKEND, Database

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "deploy" / "nginx"
SITE = SHIPPED / "pgrelay.conf"
LOCATIONS = SHIPPED / "pgrelay-locations.conf"
STREAM = SHIPPED / "pgrelay-stream.conf"
SHIPPED_UPSTREAM = "server 127.0.0.1:8765;"
SHIPPED_INCLUDE = "include /etc/nginx/snippets/pgrelay-locations.conf;"
INSTALL_TIMEOUT_S = 900
NGINX_START_TIMEOUT_S = 10
NGINX_STOP_TIMEOUT_S = 10
TRUSTED = "127.0.0.1/32"  # nginx connects to the daemon from 127.0.0.1

ORG = uuid.UUID("00000000-0000-4000-8000-0000000000e1")
OTHER_ORG = uuid.UUID("00000000-0000-4000-8000-0000000000e2")


# -- nginx ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NginxBinary:
    path: str
    stream_module: str | None
    """The stream module to load (None: none to load, or none at all)."""
    has_stream: bool


def find_nginx() -> NginxBinary | None:
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        return None
    built = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=10).stderr
    if "--with-stream=dynamic" in built:  # Debian: the package libnginx-mod-stream
        found = re.search(r"--modules-path=(\S+)", built)
        module = Path(found[1] if found else "/usr/lib/nginx/modules") / "ngx_stream_module.so"
        return NginxBinary(path, str(module) if module.exists() else None, module.exists())
    return NginxBinary(path, None, "--with-stream" in built)


@pytest.fixture(scope="module")
def nginx_binary() -> NginxBinary:
    found = find_nginx()
    why = ""
    if found is None or not found.has_stream:
        script = subprocess.run(
            [str(REPO / "scripts" / "ensure-nginx.sh")],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            check=False,
        )
        why = (script.stderr or script.stdout).strip()
        found = find_nginx()
    if found is None:
        pytest.skip(f"nginx cannot be installed here: {why}")
    return found


def _replace(text: str, pattern: str, replacement: str, what: str, count: int | None) -> str:
    """`re.subn` that fails when the shipped file no longer has what the test changes."""
    new, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert n == count if count is not None else n > 0, (
        f"{what}: {pattern!r} matched {n} times; the shipped file changed, update this test"
    )
    return new


def without_tls(path: Path, port: int, relay_port: int) -> str:
    """A shipped file for plain TCP on 127.0.0.1:port in front of the daemon at
    relay_port: the only changes made to it."""
    text = path.read_text()
    what = path.name
    text = _replace(text, r"^(\s*)listen 443 ssl\b[^;]*;", rf"\1listen 127.0.0.1:{port};", what, 1)
    text = _replace(text, r"^\s*listen \[::\]:443 ssl\b[^;]*;[^\n]*\n", "", what, 1)
    text = _replace(text, r"^\s*ssl_\w+\s[^\n]*\n", "", what, None)
    assert not re.search(r"^\s*[^#\s][^\n]*\bssl", text, re.MULTILINE), text
    return _replace(text, re.escape(SHIPPED_UPSTREAM), f"server 127.0.0.1:{relay_port};", what, 1)


def nginx_conf(prefix: Path, http: str, stream: str | None, binary: NginxBinary) -> str:
    """The whole nginx.conf: a main context of the test's own (its files under
    `prefix`, one worker), then the shipped blocks."""
    lines = [
        f"pid {prefix}/nginx.pid;",
        f"error_log {prefix}/error.log info;",
        "worker_processes 1;",
    ]
    if os.geteuid() == 0:
        # The workers write buffered responses under prefix, in pytest's tmp
        # directory that only its owner may enter; nginx's default is `nobody`.
        lines.append("user root;")
    if stream is not None and binary.stream_module:
        lines.append(f"load_module {binary.stream_module};")
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/temp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    lines += [
        "events { worker_connections 256; }",
        "http {",
        '    log_format pgrelay \'$remote_addr xff="$http_x_forwarded_for" "$request" '
        "$status $body_bytes_sent up=$upstream_addr rt=$request_time';",
        f"    access_log {prefix}/access.log pgrelay;",
        temp,
        http,
        "}",
    ]
    if stream is not None:
        lines.append(stream)
    return "\n".join(lines) + "\n"


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    prefix: Path
    http_port: int
    stream_port: int | None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def error_log(self) -> str:
        return (self.prefix / "error.log").read_text(errors="replace")

    def access_log(self) -> str:
        path = self.prefix / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown: the master stops its worker, then exits
            try:
                self.proc.wait(timeout=NGINX_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own group: master and worker
                self.proc.wait(timeout=5)
        broken = [
            line
            for line in self.error_log().splitlines()
            if re.search(r"\[(crit|alert|emerg)\]", line)
        ]
        assert not broken, "\n".join(broken)


def start_nginx(
    binary: NginxBinary,
    tmp_path: Path,
    relay: RelayProcess,
    *,
    stream: bool = False,
    extra_http: str = "",
) -> Nginx:
    """nginx in front of `relay`: the shipped pgrelay.conf on a free port, and with
    `stream` the shipped pgrelay-stream.conf on another."""
    relay_port = int(relay.ws_url.removeprefix("ws://").split("/")[0].rsplit(":", 1)[1])
    http_port = free_port()
    stream_port = free_port() if stream else None
    prefix = tmp_path / f"nginx-{http_port}"
    (prefix / "temp").mkdir(parents=True)
    site = without_tls(SITE, http_port, relay_port)
    site = _replace(site, re.escape(SHIPPED_INCLUDE), f"include {LOCATIONS};", SITE.name, 1)
    http = extra_http + "\n" + site
    stream_conf = None if stream_port is None else without_tls(STREAM, stream_port, relay_port)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, http, stream_conf, binary))
    error_log = prefix / "error.log"
    with open(prefix / "stderr.log", "wb") as stderr:
        proc = subprocess.Popen(
            [
                binary.path,
                *("-p", f"{prefix}/", "-e", str(error_log), "-c", str(conf)),
                *("-g", "daemon off;"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    nginx = Nginx(proc, prefix, http_port, stream_port)
    deadline = time.monotonic() + NGINX_START_TIMEOUT_S
    while time.monotonic() < deadline:
        # The master binds every port before it starts its worker.
        if error_log.exists() and "start worker process" in error_log.read_text():
            return nginx
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    nginx.stop()
    raise AssertionError(
        f"nginx did not start (exit {proc.returncode}):\n"
        + (prefix / "stderr.log").read_text(errors="replace")
        + (error_log.read_text(errors="replace") if error_log.exists() else "")
        + "\n"
        + conf.read_text()
    )


@pytest.fixture
def behind_nginx(
    nginx_binary: NginxBinary, db: Database, tmp_path: Path
) -> Iterator[tuple[RelayProcess, Nginx]]:
    relay = start_relay(db, tmp_path, trusted_proxies=TRUSTED)
    try:
        nginx = start_nginx(nginx_binary, tmp_path, relay)
        try:
            yield relay, nginx
        finally:
            nginx.stop()
    finally:
        relay.terminate()


@asynccontextmanager
async def ws_from(
    source: str, port: int, headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket to ws://127.0.0.1:port/v1 from the local address `source`."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    with trio.fail_after(5):
        await sock.connect(("127.0.0.1", port))
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(5):
                ws = await wrap_client_stream(
                    nursery,
                    trio.SocketStream(sock),
                    f"127.0.0.1:{port}",
                    "/v1",
                    extra_headers=headers,
                )
            try:
                yield ws
            finally:
                with trio.move_on_after(5):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except* ConnectionRejected as group:  # the refusal itself, not its nursery's group
        refused: BaseException = group
        while isinstance(refused, BaseExceptionGroup):
            refused = refused.exceptions[0]
        raise refused from None


def commit_one(db: Database, org: uuid.UUID) -> tuple[int, float]:
    """One event, committed: its id and the monotonic time the commit started."""
    with db.connect(BACKEND, autocommit=False) as conn:
        row = conn.execute("SELECT relay.emit(%s, 'job.updated', 'job', 'x')", (org,)).fetchone()
        assert row is not None
        committing = time.monotonic()
        conn.commit()
    return row[0], committing


def auth(relay: RelayProcess, orgs: list[uuid.UUID], sub: str = "user-1") -> dict[str, str]:
    return {"Authorization": f"Bearer {relay.token(orgs, sub=sub)}"}


# -- the shipped files ------------------------------------------------------------------


def directives(block: str, name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]*);", block, re.MULTILINE)


def seconds(value: str) -> float:
    found = re.fullmatch(r"(\d+)(ms|s|m)?", value.strip())
    assert found, value
    return int(found[1]) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[found[2]]


def uncommented(path: Path) -> str:
    return re.sub(r"#[^\n]*", "", path.read_text())


def test_the_shipped_timeouts_outlast_the_heartbeats_and_buffering_is_nginxs_default() -> None:
    text = uncommented(LOCATIONS)
    blocks = dict(re.findall(r"location\s+=\s+(\S+)\s*\{([^}]*)\}", text))
    assert set(blocks) == {"/v1", "/v1/events", "/v1/tickets", "/v1/stream"}
    for block in blocks.values():
        assert directives(block, "proxy_pass") == ["http://pgrelay"]
        assert "X-Forwarded-For $proxy_add_x_forwarded_for" in directives(block, "proxy_set_header")
    websocket = blocks["/v1"]
    assert directives(websocket, "proxy_http_version") == ["1.1"]
    assert {"Upgrade $http_upgrade", 'Connection "upgrade"'} <= set(
        directives(websocket, "proxy_set_header")
    )
    # A quiet WebSocket carries a ping (and its pong) every PING_INTERVAL_S, a quiet
    # stream a comment every KEEPALIVE_S: nginx must wait well beyond either.
    quiet_ws = PING_INTERVAL_S + PONG_TIMEOUT_S
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        (timeout,) = directives(websocket, name)
        assert seconds(timeout) >= 2 * quiet_ws, (name, timeout)
    (timeout,) = directives(blocks["/v1/stream"], "proxy_read_timeout")
    assert seconds(timeout) >= 2 * max(KEEPALIVE_S, quiet_ws)
    (timeout,) = directives(uncommented(STREAM), "proxy_timeout")
    assert seconds(timeout) >= 2 * max(KEEPALIVE_S, quiet_ws)
    assert directives(uncommented(STREAM), "proxy_protocol") == ["on"]
    for path in (SITE, LOCATIONS, STREAM):
        # The stream is unbuffered by the daemon's X-Accel-Buffering alone.
        assert "proxy_buffering" not in uncommented(path), path
        assert "proxy_ignore_headers" not in uncommented(path), path


def self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_the_shipped_files_with_tls_pass_nginx_t(nginx_binary: NginxBinary, tmp_path: Path) -> None:
    """pgrelay.conf and pgrelay-stream.conf as shipped, but for a certificate made
    here in place of the placeholders (and the snippet's path)."""
    cert, key = self_signed(tmp_path)

    placeholders = {
        "/etc/letsencrypt/live/relay.example.com/fullchain.pem": str(cert),
        "/etc/letsencrypt/live/relay.example.com/privkey.pem": str(key),
    }

    def installed(path: Path) -> Path:
        text = path.read_text()
        for placeholder, made in placeholders.items():
            text = _replace(text, re.escape(placeholder), made, path.name, 1)
        if path == SITE:
            text = _replace(text, re.escape(SHIPPED_INCLUDE), f"include {LOCATIONS};", "site", 1)
        out = tmp_path / path.name
        out.write_text(text)
        return out

    stream = f"include {installed(STREAM)};" if nginx_binary.has_stream else None
    (tmp_path / "temp").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(tmp_path, f"include {installed(SITE)};", stream, nginx_binary))
    checked = subprocess.run(
        [
            nginx_binary.path,
            *("-t", "-p", f"{tmp_path}/", "-e", str(tmp_path / "error.log"), "-c", str(conf)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr


# -- through nginx: WebSocket, catch-up, event streams -------------------------------------


async def test_a_websocket_through_nginx(behind_nginx: tuple[RelayProcess, Nginx]) -> None:
    relay, nginx = behind_nginx
    async with ws_from("127.0.0.4", nginx.http_port) as ws:
        c = Client(ws)
        await c.auth(relay.token([ORG]))
        assert (await c.subscribe(ORG))[-1]["type"] == "subscribed"
        ids = await trio.to_thread.run_sync(lambda: emit(relay.db, ORG, 3))
        assert [e["id"] for e in await c.events(3)] == ids
        await c.send({"type": "ping", "ref": "p"})
        assert (await c.expect("pong"))["ref"] == "p"
    async with ws_from("127.0.0.4", nginx.http_port) as ws:
        c = Client(ws)
        await c.send({"type": "auth", "token": "not-a-token"})
        assert await c.close_code() == 4001  # close codes pass unchanged
    # The daemon saw the client, not nginx.
    deadline = time.monotonic() + 5
    while True:
        closed = [ln for ln in relay.logs() if ln.get("event") == "connection closed"]
        if len(closed) == 2 or time.monotonic() > deadline:
            break
        await trio.sleep(0.05)
    assert [ln["peer"] for ln in closed] == ["127.0.0.4", "127.0.0.4"], closed
    assert "127.0.0.4" in nginx.access_log()


def test_catch_up_pages_through_nginx_are_exact(
    behind_nginx: tuple[RelayProcess, Nginx],
) -> None:
    relay, nginx = behind_nginx
    token = relay.token([ORG])
    first = request(
        "GET", nginx.base + "/v1/events", params=[("org", str(ORG))], headers=auth(relay, [ORG])
    )
    assert first.status == 200, first.body
    assert first.headers["content-type"] == "application/json"
    assert first.headers["cache-control"] == "no-store"
    cursor = first.json()["cursor"]
    late = relay.db.connect(BACKEND, autocommit=False)
    late.execute("SELECT relay.emit(%s, 'job.updated', 'job', 'late')", (ORG,))
    emit(relay.db, ORG, 300)
    emit(relay.db, ORG, 1500, per_txn=100)
    emit(relay.db, OTHER_ORG, 50)
    emit(relay.db, ORG, 1100, per_txn=1100)  # one transaction bigger than a page
    got: list[int] = []
    cursors = [cursor]
    for n, page in enumerate(iter_pages(nginx.base, token, str(ORG), cursor, 1000)):
        assert "resync" not in page
        got += [e["id"] for e in page["events"]]
        cursors.append(page["cursor"])
        if n == 1:  # a late transaction commits mid-paging, then more rows
            late.commit()
            late.close()
            emit(relay.db, ORG, 30)
    assert len(got) == len(set(got)), "a repeat across pages"
    assert set(got) == owed(relay.db, ORG, cursor)
    for before, after in itertools.pairwise(cursors):
        a, b = snapshot(before), snapshot(after)
        assert b != a and all(b.visible(x) for x in range(a.xmin, a.xmax) if a.visible(x))
    # A client that reads slowly, through nginx's default buffering: the same page.
    params = [("org", str(ORG)), ("cursor", cursor), ("limit", "1000")]
    fast = request("GET", nginx.base + "/v1/events", params=params, headers=auth(relay, [ORG]))
    slow = slow_request(nginx.base + "/v1/events?" + urlencode(params), auth(relay, [ORG]))
    assert slow.status == 200 and len(fast.json()["events"]) > 500
    assert slow.body == fast.body


def slow_request(url: str, headers: dict[str, str]) -> Response:
    """GET with a small receive buffer, read only after a second."""
    parts = urlsplit(url)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect((parts.hostname or "", parts.port or 80))
        head = [f"GET {parts.path}?{parts.query} HTTP/1.1", "Host: pgrelay", "Connection: close"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        time.sleep(1)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    return Response(status, {}, body)


def test_an_event_stream_through_nginx_delivers_each_event_within_a_second(
    behind_nginx: tuple[RelayProcess, Nginx],
) -> None:
    relay, nginx = behind_nginx
    stream = open_stream(nginx.base, [str(ORG)], token=relay.token([ORG]))
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-store"
    assert "x-accel-buffering" not in stream.headers  # nginx obeyed it and kept it to itself
    stream.events(1, kind="subscribed")
    for _ in range(5):
        event_id, committing = commit_one(relay.db, ORG)
        (event,) = stream.events(1, timeout_s=5)
        took = time.monotonic() - committing
        assert event.data["id"] == event_id
        assert took < 1.0, f"the event came {took:.2f} s after the commit"
    # Resuming through nginx: Last-Event-ID reaches the daemon.
    seen = {event.data["id"]}
    resume = stream.last_id
    stream.close()
    missed = emit(relay.db, ORG, 20, per_txn=5)
    again = open_stream(nginx.base, [str(ORG)], token=relay.token([ORG]), last_event_id=resume)
    ids = [e.data["id"] for e in again.events(len(missed), timeout_s=10)]
    assert [i for i in ids if i not in seen] == missed
    again.close()
    # A ticket, for EventSource, through nginx.
    issued = request("POST", nginx.base + "/v1/tickets", headers=auth(relay, [ORG]))
    assert issued.status == 200, issued.body
    ticketed = open_stream(nginx.base, [str(ORG)], ticket=issued.json()["ticket"])
    assert ticketed.status == 200
    ticketed.events(1, kind="subscribed")
    event_id, committing = commit_one(relay.db, ORG)
    assert [e.data["id"] for e in ticketed.events(1)] == [event_id]
    assert time.monotonic() - committing < 1.0
    ticketed.close()


def test_without_the_daemons_header_nginx_would_hold_the_stream(
    nginx_binary: NginxBinary, db: Database, tmp_path: Path
) -> None:
    """The control: nginx told to ignore X-Accel-Buffering buffers the same stream
    (its head included), so the second the test above allows is a real bound."""
    relay = start_relay(db, tmp_path, trusted_proxies=TRUSTED)
    try:
        nginx = start_nginx(
            nginx_binary, tmp_path, relay, extra_http="proxy_ignore_headers X-Accel-Buffering;"
        )
        try:
            with socket.create_connection(("127.0.0.1", nginx.http_port), timeout=5) as sock:
                sock.sendall(
                    f"GET /v1/stream?org={ORG} HTTP/1.1\r\nHost: pgrelay\r\n"
                    f"Authorization: Bearer {relay.token([ORG])}\r\n\r\n".encode()
                )
                time.sleep(0.5)  # subscribed by now
                event_id, _ = commit_one(relay.db, ORG)
                received = b""
                deadline = time.monotonic() + 2
                while (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        break
                    if not chunk:
                        break
                    received += chunk
            assert f'"id":{event_id},'.encode() not in received, received
        finally:
            nginx.stop()
    finally:
        relay.terminate()


# -- the per-IP limit counts the real client --------------------------------------------------


def test_a_request_that_follows_the_proxy_header_later_is_answered(
    nginx_binary: NginxBinary, db: Database, tmp_path: Path
) -> None:
    """Through the stream config, a client that sends its request a moment after
    connecting (as every TLS client does, after its handshake with nginx)."""
    if not nginx_binary.has_stream:
        pytest.skip("this nginx has no stream module (Debian: libnginx-mod-stream)")
    relay = start_relay(db, tmp_path, trusted_proxies=TRUSTED)
    try:
        nginx = start_nginx(nginx_binary, tmp_path, relay, stream=True)
        try:
            assert nginx.stream_port is not None
            with socket.create_connection(("127.0.0.1", nginx.stream_port), timeout=5) as sock:
                time.sleep(0.3)
                sock.sendall(
                    f"GET /v1/events?org={ORG} HTTP/1.1\r\nHost: pgrelay\r\n"
                    f"Authorization: Bearer {relay.token([ORG])}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 "), (answer, nginx.error_log())
        finally:
            nginx.stop()
    finally:
        relay.terminate()


@pytest.mark.parametrize(
    "via",
    [
        "x-forwarded-for",
        "proxy-protocol",
    ],
)
async def test_the_per_ip_limit_counts_the_client_behind_nginx(
    nginx_binary: NginxBinary, db: Database, tmp_path: Path, via: str
) -> None:
    """Two clients, 127.0.0.2 and 127.0.0.3, and nginx connecting to the daemon
    from 127.0.0.1: the limit of 2 per address refuses 127.0.0.2's third
    connection (a WebSocket, or an event stream; a forged X-Forwarded-For does not
    help) while 127.0.0.3 still gets in."""
    if via == "proxy-protocol" and not nginx_binary.has_stream:
        pytest.skip("this nginx has no stream module (Debian: libnginx-mod-stream)")
    relay = start_relay(db, tmp_path, trusted_proxies=TRUSTED, max_connections_per_ip="2")
    try:
        nginx = start_nginx(nginx_binary, tmp_path, relay, stream=via == "proxy-protocol")
        try:
            port = nginx.http_port if via == "x-forwarded-for" else nginx.stream_port
            assert port is not None
            await per_ip_limit(relay, port)
        finally:
            nginx.stop()
    finally:
        relay.terminate()


async def per_ip_limit(relay: RelayProcess, port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    forged = [(b"X-Forwarded-For", b"127.0.0.3")]
    async with (
        ws_from("127.0.0.2", port) as one,
        ws_from("127.0.0.2", port, forged) as two,
    ):
        await Client(one).auth(relay.token([ORG], sub="u1"))
        await Client(two).auth(relay.token([ORG], sub="u2"))
        for headers in (None, forged):
            with pytest.raises(ConnectionRejected) as refused:
                async with ws_from("127.0.0.2", port, headers):
                    pass
            assert refused.value.status_code == 429
        stream = await trio.to_thread.run_sync(
            lambda: open_stream(base, [str(ORG)], token=relay.token([ORG]), source="127.0.0.2")
        )
        assert stream.status == 429, stream.buffer
        stream.close()
        async with ws_from("127.0.0.3", port) as three:
            await Client(three).auth(relay.token([ORG], sub="u3"))
        other = await trio.to_thread.run_sync(
            lambda: open_stream(base, [str(ORG)], token=relay.token([ORG]), source="127.0.0.3")
        )
        assert other.status == 200
        await trio.to_thread.run_sync(lambda: other.events(1, kind="subscribed"))
        other.close()
    # Once nginx passed the two closes on, 127.0.0.2 gets in again.
    with trio.fail_after(5):
        while True:
            try:
                async with ws_from("127.0.0.2", port) as again:
                    await Client(again).auth(relay.token([ORG], sub="u1"))
                break
            except ConnectionRejected:
                await trio.sleep(0.1)
    refusals = [ln for ln in relay.logs() if ln.get("event") == "connection refused"]
    assert refusals and {ln["peer"] for ln in refusals} == {"127.0.0.2"}, refusals
    closed = [ln["peer"] for ln in relay.logs() if ln.get("event") == "connection closed"]
    assert "127.0.0.1" not in closed and "127.0.0.3" in closed, closed
    metrics = relay.admin_get("/metrics")[1]
    assert 'pgrelay_connections_rejected_total{reason="per_ip"} 3.0' in metrics
