"""`pgrelay dev`: a throwaway relay with a demo page, in one command.

1. A database: the one given with `--database-url` (migrated, login roles
   created or updated, nothing removed on exit), else a throwaway cluster from
   the local server binaries (relay.dev.embedded), else a testcontainers
   container when a Docker engine answers. A throwaway database gets a
   non-superuser owner that applies the migrations, as on managed Postgres.
2. Login roles: `pgrelay_dev_daemon` (member of relay_daemon) for the daemon,
   `pgrelay_dev_backend` (member of relay_service) for emitting.
3. A random HS256 secret, and the daemon in this process, with three extra
   routes on its admin port: the demo page (`/`), `GET /dev/token` (a fresh
   token for the demo organization, and where the WebSocket listens) and
   `POST /dev/emit` (one event, emitted as the backend login). The WebSocket
   only accepts the demo page's own origin.
4. The demo page is a small jobs board built on the web client SDK
   (clients/js, served as `/pgrelay-client.js`): `GET/POST /dev/jobs` and
   `POST /dev/jobs/update` write a `pgrelay_dev_jobs` row and `relay.emit` in the
   same transaction, on one long-lived backend connection (DemoJobs).

SIGINT/SIGTERM stop the daemon (it drains as in production), then the
throwaway database is removed, on errors too. Never point `--database-url`
at a production database: it creates login roles and resets their passwords.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import secrets
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any, Final
from urllib.parse import quote, urlencode

import psycopg
import structlog
import trio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from relay import config, logs
from relay.db.migrate import migrate
from relay.dev.embedded import EmbeddedPostgres, docker_answers, find_bindir, free_port
from relay.dev.provision import ensure_login_roles, provision
from relay.errors import RelayError
from relay.server.admin import Endpoint, Request, Response, Route
from relay.server.app import WS_PATH, Daemon
from relay.server.jwt import mint_token

#: The organization the demo page and the printed commands use.
DEMO_ORG: Final = "6f1c6f1c-0000-4000-8000-000000000001"
#: `sub` of the dev tokens.
DEMO_USER: Final = "dev-user"
#: Lifetime of the token printed at start, and of those the page fetches
#: (the page refreshes its token before it expires).
PRINTED_TOKEN_LIFETIME_S: Final = 24 * 3600
PAGE_TOKEN_LIFETIME_S: Final = 3600
#: The throwaway database and roles.
DEV_DATABASE: Final = "pgrelay_dev"
OWNER_ROLE: Final = "pgrelay_dev_owner"
DAEMON_LOGIN: Final = "pgrelay_dev_daemon"
BACKEND_LOGIN: Final = "pgrelay_dev_backend"
#: login role -> the group role it is granted.
LOGIN_ROLES: Final = {DAEMON_LOGIN: "relay_daemon", BACKEND_LOGIN: "relay_service"}
#: Largest body POST /dev/emit accepts.
EMIT_MAX_BODY_BYTES: Final = 1024
#: The demo's jobs board: its table (in the dev database), the rows a page lists,
#: the most updates one click may ask for, the longest title.
JOBS_TABLE: Final = "pgrelay_dev_jobs"
JOBS_LISTED: Final = 100
JOBS_MAX_UPDATES: Final = 50
JOBS_MAX_TITLE_CHARS: Final = 200
#: libpq connect_timeout for the dev endpoint's own connections.
CONNECT_TIMEOUT_S: Final = 5
#: How long a Docker engine may take to answer a ping.
DOCKER_PING_TIMEOUT_S: Final = 1.0
#: The image used when only a Docker engine is available.
CONTAINER_IMAGE: Final = "postgres:16-alpine"
#: Hosts that mean "this machine" to a browser on it.
_LOOPBACK: Final = ("127.0.0.1", "localhost", "[::1]")
_WILDCARD: Final = ("0.0.0.0", "::", "")

log = structlog.get_logger("pgrelay.dev")


@dataclass(frozen=True)
class DevDatabase:
    """Where the throwaway relay's data lives and how each role reaches it."""

    owner_url: str
    """The schema owner (who migrated)."""
    daemon_url: str
    """A login in relay_daemon: what `pgrelay serve` connects as."""
    backend_url: str
    """A login in relay_service: what a backend emits as."""
    description: str
    """One line for the banner."""
    cluster_dir: Path | None
    """The throwaway cluster's directory (removed on exit), if there is one."""


# -- the database ---------------------------------------------------------------------


def login_url(conninfo: str, user: str, password: str | None, dbname: str | None = None) -> str:
    """A postgresql:// URL for `user` on the server of `conninfo` (a URL or a
    key=value DSN); other connection parameters (sslmode...) are kept."""
    params = {k: str(v) for k, v in conninfo_to_dict(conninfo).items() if v is not None}
    for key in ("user", "password"):
        params.pop(key, None)
    database = dbname or params.pop("dbname", "")
    params.pop("dbname", None)
    host = params.pop("host", "")
    port = params.pop("port", "")
    if host.startswith("/") or "," in host:  # a socket directory, or several hosts
        params["host"] = host
        if port:
            params["port"] = port
        host = port = ""
    if ":" in host:
        host = f"[{host}]"
    userinfo = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    netloc = f"{userinfo}@{host}" + (f":{port}" if port else "")
    query = f"?{urlencode(params)}" if params else ""
    return f"postgresql://{netloc}/{quote(database, safe='')}{query}"


def prepare_given(url: str) -> DevDatabase:
    """--database-url: migrate it as its own user (the schema owner), then the login roles."""
    password = secrets.token_urlsafe(18)  # its pg_hba.conf may ask for one
    migrate(url)
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            ensure_login_roles(conn, LOGIN_ROLES, password)
            user = conn.info.user
    except psycopg.Error as exc:
        raise RelayError(
            f"cannot create the login roles {', '.join(LOGIN_ROLES)}: "
            f"{exc.diag.message_primary or exc}; the role in --database-url needs CREATEROLE"
        ) from exc
    return DevDatabase(
        owner_url=url,
        daemon_url=login_url(url, DAEMON_LOGIN, password),
        backend_url=login_url(url, BACKEND_LOGIN, password),
        description=f"--database-url (as {user}; kept on exit)",
        cluster_dir=None,
    )


def prepare_on_server(admin_url: str, password: str | None) -> tuple[str, str, str]:
    """On a throwaway server where `admin_url` is a superuser: a non-superuser
    owner, its database, the migrations, the login roles. The three URLs."""
    provision(admin_url, DEV_DATABASE, owner=OWNER_ROLE, logins=LOGIN_ROLES, password=password)
    return (
        login_url(admin_url, OWNER_ROLE, password, DEV_DATABASE),
        login_url(admin_url, DAEMON_LOGIN, password, DEV_DATABASE),
        login_url(admin_url, BACKEND_LOGIN, password, DEV_DATABASE),
    )


def provide(database_url: str | None, stack: contextlib.ExitStack) -> DevDatabase:
    """The database, in the order of preference; its removal is pushed on `stack`."""
    if database_url:
        return prepare_given(database_url)
    if find_bindir() is not None:
        cluster = EmbeddedPostgres()
        stack.callback(_uninterrupted, cluster.stop)
        with _interrupts_held():
            cluster.start()
        owner, daemon, backend = prepare_on_server(cluster.url(), None)
        return DevDatabase(
            owner,
            daemon,
            backend,
            f"throwaway cluster in {cluster.root} (PostgreSQL {cluster.bindir.parent.name}, "
            "removed on exit)",
            cluster.root,
        )
    if docker_answers(DOCKER_PING_TIMEOUT_S):
        try:
            from testcontainers.postgres import PostgresContainer
        except ImportError as exc:
            raise RelayError(
                "a Docker engine answers but testcontainers is not installed "
                "(pip install 'testcontainers[postgres]')"
            ) from exc
        container = PostgresContainer(CONTAINER_IMAGE, driver=None)
        stack.callback(_uninterrupted, container.stop)
        container.start()
        owner, daemon, backend = prepare_on_server(
            container.get_connection_url(), secrets.token_urlsafe(18)
        )
        return DevDatabase(
            owner, daemon, backend, f"container {CONTAINER_IMAGE} (removed on exit)", None
        )
    raise RelayError(
        "no PostgreSQL to run on: pass --database-url, install the server binaries "
        "(Debian: apt-get install postgresql; `make run` does), or start a Docker engine"
    )


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then raise
    KeyboardInterrupt if one came: starting a cluster (a few seconds) is not
    safely interruptible halfway."""
    received: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    previous_int = signal.signal(signal.SIGINT, hold)
    previous_term = signal.signal(signal.SIGTERM, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
    if received:
        raise KeyboardInterrupt


def _uninterrupted(stop: Callable[[], object]) -> None:
    """Run a cleanup step with SIGINT ignored: a second Ctrl-C must not leave a
    cluster behind half-removed."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop()
    finally:
        signal.signal(signal.SIGINT, previous)


# -- the dev routes -------------------------------------------------------------------


def page_origins(admin_host: str, admin_port: int, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """Where a browser may load the demo page from: the admin address, and every
    loopback spelling of it (the WebSocket accepts exactly these origins)."""
    host = f"[{admin_host}]" if ":" in admin_host else admin_host
    hosts = [host]
    if host in _LOOPBACK or admin_host in _WILDCARD:
        hosts = [*_LOOPBACK]
    if admin_host in _WILDCARD:
        hosts.append(socket.gethostname())
    found = [f"http://{h}:{admin_port}" for h in hosts if h not in _WILDCARD]
    return tuple(dict.fromkeys([*found, *extra]))


def _json(status: int, value: object) -> Response:
    return Response(status, json.dumps(value).encode() + b"\n", "application/json")


class DevRoutes:
    """The demo page, a token for it, and an emit button's endpoint."""

    def __init__(
        self,
        *,
        secret: str,
        audience: str | None,
        issuer: str | None,
        backend_url: str,
        ws_host: str | None,
        ws_port: int,
        origins: Sequence[str],
    ) -> None:
        self.secret = secret
        self.audience = audience
        self.issuer = issuer
        self.backend_url = backend_url
        self.ws_host = ws_host
        self.ws_port = ws_port
        self.origins = frozenset(origins)
        self.hosts = frozenset(o.split("://", 1)[1] for o in origins)
        static = resources.files("relay.dev") / "static"
        self.page = (static / "demo.html").read_bytes()
        self.sdk = (static / "pgrelay-client.js").read_bytes()
        self.entity_ids = itertools.count(1)
        self.jobs = DemoJobs(backend_url)

    def routes(self) -> dict[str, Route]:
        page: Route = self._page
        return {
            "/": page,
            "/demo": page,
            "/dev/token": Endpoint(self._token),
            "/dev/emit": Endpoint(
                self._emit, methods=frozenset({"POST"}), max_body_bytes=EMIT_MAX_BODY_BYTES
            ),
            "/pgrelay-client.js": self._sdk,
            "/dev/jobs": Endpoint(
                self._jobs,
                methods=frozenset({"GET", "HEAD", "POST"}),
                max_body_bytes=EMIT_MAX_BODY_BYTES,
            ),
            "/dev/jobs/update": Endpoint(
                self._update_job, methods=frozenset({"POST"}), max_body_bytes=EMIT_MAX_BODY_BYTES
            ),
        }

    def close(self) -> None:
        self.jobs.close()

    def token(self, lifetime_s: int) -> str:
        return mint_token(
            self.secret,
            orgs=[DEMO_ORG],
            sub=DEMO_USER,
            lifetime_s=lifetime_s,
            audience=self.audience,
            issuer=self.issuer,
        )

    def _page(self) -> Response:
        return Response(200, self.page, "text/html; charset=utf-8")

    def _foreign(self, request: Request) -> Response | None:
        """Refuse a request that a foreign web page (or a DNS-rebound name) made."""
        if request.headers.get("host") not in self.hosts:
            return _json(403, {"error": "unknown Host; open the demo page by its printed URL"})
        origin = request.headers.get("origin")
        if origin is not None and origin not in self.origins:
            return _json(403, {"error": "foreign origin"})
        return None

    def _token(self, request: Request) -> Response:
        refused = self._foreign(request)
        if refused is not None:
            return refused
        return _json(
            200,
            {
                "token": self.token(PAGE_TOKEN_LIFETIME_S),
                "org": DEMO_ORG,
                "ws_host": self.ws_host,
                "ws_port": self.ws_port,
                "ws_path": WS_PATH,
                "lifetime_s": PAGE_TOKEN_LIFETIME_S,
            },
        )

    async def _emit(self, request: Request) -> Response:
        refused = self._foreign(request)
        if refused is not None:
            return refused
        # A cross-site form cannot send this type without a preflight, which 405s.
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _json(415, {"error": "send application/json"})
        try:
            body = json.loads(request.body or b"{}")
        except ValueError:
            return _json(400, {"error": "the body is not JSON"})
        sent_at = body.get("sent_at_ms") if isinstance(body, dict) else None
        payload: dict[str, object] = {"source": "demo page"}
        if isinstance(sent_at, int | float) and not isinstance(sent_at, bool):
            payload["sent_at_ms"] = sent_at
        entity_id = str(next(self.entity_ids))
        try:
            new_id = await trio.to_thread.run_sync(
                partial(_emit_as_backend, self.backend_url, entity_id, json.dumps(payload))
            )
        except psycopg.Error as exc:
            log.warning("dev emit failed", error=exc.diag.message_primary or str(exc))
            return _json(502, {"error": exc.diag.message_primary or "relay.emit failed"})
        return _json(200, {"id": new_id, "entity_id": entity_id})

    def _sdk(self) -> Response:
        return Response(200, self.sdk, "text/javascript; charset=utf-8")

    def _json_body(self, request: Request) -> dict[str, Any] | Response:
        """The JSON object a demo page POSTed, or the refusal."""
        refused = self._foreign(request)
        if refused is not None:
            return refused
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _json(415, {"error": "send application/json"})
        try:
            body = json.loads(request.body or b"{}")
        except ValueError:
            return _json(400, {"error": "the body is not JSON"})
        return body if isinstance(body, dict) else _json(400, {"error": "send a JSON object"})

    async def _jobs(self, request: Request) -> Response:
        """GET: the board; POST {title, sent_at_ms?}: a new job (and its job.created)."""
        if request.method != "POST":
            refused = self._foreign(request)
            if refused is not None:
                return refused
            return await self._jobs_call(self.jobs.list)
        body = self._json_body(request)
        if isinstance(body, Response):
            return body
        title = body.get("title")
        if not isinstance(title, str) or not 0 < len(title.strip()) <= JOBS_MAX_TITLE_CHARS:
            return _json(400, {"error": f"title: 1 to {JOBS_MAX_TITLE_CHARS} characters"})
        return await self._jobs_call(partial(self.jobs.create, title.strip(), _sent_at(body)))

    async def _update_job(self, request: Request) -> Response:
        """POST {id, times, sent_at_ms?}: `times` updates of one job, each its own transaction."""
        body = self._json_body(request)
        if isinstance(body, Response):
            return body
        job_id, times = body.get("id"), body.get("times", 1)
        if type(job_id) is not int or type(times) is not int or not 0 < times <= JOBS_MAX_UPDATES:
            return _json(400, {"error": f"id: an integer; times: 1 to {JOBS_MAX_UPDATES}"})
        return await self._jobs_call(partial(self.jobs.update, job_id, times, _sent_at(body)))

    async def _jobs_call(self, call: Callable[[], object]) -> Response:
        try:
            result = await trio.to_thread.run_sync(call)
        except psycopg.Error as exc:
            log.warning("dev jobs failed", error=exc.diag.message_primary or str(exc))
            return _json(502, {"error": exc.diag.message_primary or "the jobs board failed"})
        if result is None:
            return _json(404, {"error": "no such job"})
        return _json(200, result)


def _sent_at(body: dict[str, Any]) -> int | float | None:
    """The page's click time, carried in the payload so it can measure the latency."""
    sent_at = body.get("sent_at_ms")
    ok = isinstance(sent_at, int | float) and not isinstance(sent_at, bool)
    return sent_at if ok else None


def ensure_demo_jobs(owner_url: str) -> None:
    """The jobs board's table, created by the schema owner if missing; the backend
    login may read and write it."""
    with psycopg.connect(owner_url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                " organization_id uuid NOT NULL,"
                " title text NOT NULL,"
                " status text NOT NULL DEFAULT 'new',"
                " version integer NOT NULL DEFAULT 1,"
                " updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(JOBS_TABLE))
        )
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE ON {} TO {}").format(
                sql.Identifier(JOBS_TABLE), sql.Identifier(BACKEND_LOGIN)
            )
        )


class DemoJobs:
    """The demo's backend: one long-lived connection as the backend login, so that a
    click costs a transaction, not a new connection (the page shows that latency).
    Blocking; called from worker threads, one at a time."""

    _COLUMNS = "id, title, status, version, updated_at::text AS updated_at"

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def _with_conn(self, work: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self.url,
                    autocommit=True,
                    connect_timeout=CONNECT_TIMEOUT_S,
                    application_name="pgrelay-dev-jobs",
                )
            try:
                return work(self._conn)
            except psycopg.OperationalError:
                self._conn.close()  # a broken connection: the next click opens another
                self._conn = None
                raise

    def list(self) -> dict[str, Any]:
        def work(conn: psycopg.Connection[Any]) -> dict[str, Any]:
            cur = conn.cursor(row_factory=dict_row)
            rows = cur.execute(
                sql.SQL(
                    "SELECT " + self._COLUMNS + " FROM {} WHERE organization_id = %s"
                    " ORDER BY id DESC LIMIT %s"
                ).format(sql.Identifier(JOBS_TABLE)),
                (DEMO_ORG, JOBS_LISTED),
            ).fetchall()
            return {"jobs": rows}

        result: dict[str, Any] = self._with_conn(work)
        return result

    def create(self, title: str, sent_at: float | None) -> dict[str, Any]:
        def work(conn: psycopg.Connection[Any]) -> dict[str, Any]:
            with conn.transaction():
                cur = conn.cursor(row_factory=dict_row)
                job = cur.execute(
                    sql.SQL(
                        "INSERT INTO {} (organization_id, title) VALUES (%s, %s) RETURNING "
                        + self._COLUMNS
                    ).format(sql.Identifier(JOBS_TABLE)),
                    (DEMO_ORG, title),
                ).fetchone()
                assert job is not None
                event_id = _emit_job(conn, "job.created", job, sent_at)
            return {"job": job, "event_id": event_id}

        result: dict[str, Any] = self._with_conn(work)
        return result

    def update(self, job_id: int, times: int, sent_at: float | None) -> dict[str, Any] | None:
        def work(conn: psycopg.Connection[Any]) -> dict[str, Any] | None:
            job: dict[str, Any] | None = None
            event_ids = []
            for _ in range(times):
                with conn.transaction():
                    cur = conn.cursor(row_factory=dict_row)
                    job = cur.execute(
                        sql.SQL(
                            "UPDATE {} SET version = version + 1, updated_at = now(),"
                            " status = CASE WHEN status = 'new' THEN 'running' ELSE status END"
                            " WHERE organization_id = %s AND id = %s RETURNING " + self._COLUMNS
                        ).format(sql.Identifier(JOBS_TABLE)),
                        (DEMO_ORG, job_id),
                    ).fetchone()
                    if job is None:
                        return None
                    event_ids.append(_emit_job(conn, "job.updated", job, sent_at))
            return {"job": job, "event_ids": event_ids}

        result: dict[str, Any] | None = self._with_conn(work)
        return result

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _emit_job(
    conn: psycopg.Connection[Any], event_type: str, job: dict[str, Any], sent_at: float | None
) -> int:
    """relay.emit for a job, inside the caller's transaction."""
    payload: dict[str, object] = {"title": job["title"], "version": job["version"]}
    if sent_at is not None:
        payload["sent_at_ms"] = sent_at
    row = conn.execute(
        "SELECT relay.emit(%s::uuid, %s, 'job', %s, %s::jsonb)",
        (DEMO_ORG, event_type, str(job["id"]), json.dumps(payload)),
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _emit_as_backend(url: str, entity_id: str, payload: str) -> int:
    """Blocking: relay.emit(...) once, as the backend login."""
    with psycopg.connect(
        url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name="pgrelay-dev"
    ) as conn:
        row = conn.execute(
            "SELECT relay.emit(%s::uuid, 'job.updated', 'job', %s, %s::jsonb)",
            (DEMO_ORG, entity_id, payload),
        ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


# -- the command ----------------------------------------------------------------------


def command_prefix(argv0: str, executable: str) -> str:
    """How the user can run this same pgrelay again, for the printed command."""
    if Path(argv0).name == "__main__.py":
        return f"{shlex.quote(executable)} -m relay"
    on_path = shutil.which("pgrelay")
    if on_path and Path(on_path).resolve() == Path(argv0).resolve():
        return "pgrelay"
    return shlex.quote(str(Path(argv0).absolute()))


def _banner(
    db: DevDatabase, daemon: Daemon, routes: DevRoutes, prefix: str, startup_s: float
) -> str:
    s = daemon.settings
    ws_host = routes.ws_host or "127.0.0.1"
    admin_host = s.admin_listen.host if s.admin_listen.host not in _WILDCARD else "127.0.0.1"
    page = f"http://{admin_host}:{daemon.admin_port}/"
    emit = (
        f"{prefix} emit --org {DEMO_ORG} --type job.updated --entity-type job --entity-id 42 "
        f'--payload \'{{"status":"done"}}\' --database-url {shlex.quote(db.backend_url)}'
    )
    return "\n".join(
        [
            f"pgrelay dev: ready in {startup_s:.1f} s. Ctrl-C stops it.",
            "",
            f"  database    {db.description}",
            f"  websocket   ws://{ws_host}:{daemon.ws_port}{WS_PATH}",
            f"  demo page   {page}",
            f"  metrics     http://{admin_host}:{daemon.admin_port}/metrics",
            f"  org         {DEMO_ORG}",
            f"  token       {routes.token(PRINTED_TOKEN_LIFETIME_S)}",
            f"              (HS256, sub {DEMO_USER}, org_id the demo org, valid 24 h)",
            "",
            "Emit a signal as a backend would (it shows up on the demo page):",
            f"  {emit}",
            "",
            "or in SQL, as the backend login:",
            f"  psql {shlex.quote(db.backend_url)} -c "
            f"\"SELECT relay.emit('{DEMO_ORG}', 'job.updated', 'job', '42')\"",
            "",
            "In another shell, these make the README's pgrelay token, emit and tail work:",
            *(f"  {line}" for line in export_lines(daemon, db, routes.secret)),
            "",
        ]
    )


def export_lines(daemon: Daemon, db: DevDatabase, secret: str) -> list[str]:
    """`export` lines for another shell: the dev secret (pgrelay token, tail), where
    the WebSocket listens (tail), the backend's database (emit), and `pgrelay`
    on PATH when it is not already."""
    s = daemon.settings
    host = s.listen.host if s.listen.host not in _WILDCARD else "127.0.0.1"
    lines = [
        f"export PGRELAY_JWT_SECRET={shlex.quote(secret)}",
        f"export PGRELAY_LISTEN={shlex.quote(f'{host}:{daemon.ws_port}')}",
        f"export PGRELAY_DATABASE_URL={shlex.quote(db.backend_url)}",
    ]
    scripts = Path(sys.executable).parent
    found = shutil.which("pgrelay")
    if (scripts / "pgrelay").exists() and (
        found is None or Path(found).resolve() != (scripts / "pgrelay").resolve()
    ):
        lines.append(f'export PATH={shlex.quote(str(scripts))}:"$PATH"')
    return lines


def _term_as_interrupt(_signum: int, frame: FrameType | None) -> None:
    """SIGTERM outside the daemon's own handler: do what SIGINT would do now
    (raise KeyboardInterrupt; under trio, trio's handler; nothing while a
    cleanup step ignores SIGINT)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    elif handler != signal.SIG_IGN:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _stoppable_by_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM interrupt the setup and the teardown too (so the
    cleanup runs), even when started with SIGINT ignored (a background job)."""
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, _term_as_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def run(
    database_url: str | None,
    environ: Mapping[str, str],
    *,
    argv0: str | None = None,
    out: Callable[[str], None] | None = None,
) -> int:
    """`pgrelay dev`. Returns the exit status; RelayError on failure. `out`
    prints the banner (default: stdout, flushed)."""
    say = out or partial(print, flush=True)
    started = time.monotonic()
    secret = secrets.token_urlsafe(32)
    # The environment may set ports, limits and the log format; dev owns the rest.
    base = config.load({"jwt_secret": secret}, environ)
    listen, admin = base.listen, base.admin_listen
    if listen.port == 0:
        listen = dataclasses.replace(listen, port=free_port())
    if admin.port == 0:
        admin = dataclasses.replace(admin, port=free_port())
    origins = page_origins(admin.host, admin.port, base.allowed_origins)
    logs.configure(base.log_level, base.log_format)

    with _stoppable_by_signals(), contextlib.ExitStack() as stack:
        db = provide(database_url, stack)
        settings = dataclasses.replace(
            base,
            database_url=db.daemon_url,
            listen=listen,
            admin_listen=admin,
            jwt_secret=secret,
            jwt_public_key_file=None,
            jwt_jwks_file=None,
            jwt_algorithms=None,
            allowed_origins=origins,
        )
        routes = DevRoutes(
            secret=secret,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            backend_url=db.backend_url,
            ws_host=None if listen.host in _WILDCARD else listen.host,
            ws_port=listen.port,
            origins=origins,
        )
        ensure_demo_jobs(db.owner_url)
        stack.callback(routes.close)  # before the database goes away
        daemon = Daemon(settings, admin_routes=routes.routes())
        prefix = command_prefix(argv0 or sys.argv[0], sys.executable)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                say(_banner(db, daemon, routes, prefix, time.monotonic() - started))

        try:
            trio.run(main)
        except BaseExceptionGroup as group:
            # Ctrl-C while the daemon was starting (before its own signal handling).
            interrupted, rest = group.split(KeyboardInterrupt)
            if interrupted is not None and rest is None:
                raise KeyboardInterrupt from None
            raise
        if db.cluster_dir is not None:
            say(f"pgrelay dev: stopped; removing {db.cluster_dir}")
    return 0
