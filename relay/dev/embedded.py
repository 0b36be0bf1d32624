"""A throwaway PostgreSQL cluster started from the local server binaries.

Used by ``pgrelay dev`` and by the test suite. The cluster lives in a
temporary directory, listens on 127.0.0.1 on a free port (never the machine's
own 5432), trusts local connections, and is removed by :meth:`stop`. As root,
initdb and pg_ctl run as the ``postgres`` user through ``runuser``, since the
server refuses to run as root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from relay.errors import RelayError

#: How long pg_ctl may take to start or stop the server.
START_TIMEOUT_S = 60
#: Run the server as this OS user when we are root.
SERVER_OS_USER = "postgres"


class EmbeddedPostgresError(RelayError):
    """The throwaway cluster could not be created, started or stopped."""


def find_bindir() -> Path | None:
    """Where initdb and pg_ctl live: $PGRELAY_PG_BINDIR, `pg_config --bindir`,
    else the newest /usr/lib/postgresql/*/bin. None when no server is installed."""
    candidates: list[str] = []
    if os.environ.get("PGRELAY_PG_BINDIR"):
        candidates.append(os.environ["PGRELAY_PG_BINDIR"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(out.stdout.strip())
        except (subprocess.SubprocessError, OSError):
            pass
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: _version_key(Path(p).parent.name),
        reverse=True,
    )
    for cand in candidates:
        if cand and (Path(cand) / "initdb").exists() and (Path(cand) / "pg_ctl").exists():
            return Path(cand)
    return None


def _version_key(name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in name.split("."))
    except ValueError:
        return (0,)


def docker_answers(timeout_s: float = 1.0) -> bool:
    """A Docker engine answers a ping within about `timeout_s` (the docker package
    comes with testcontainers)."""
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=timeout_s).ping()
        return True
    except Exception:  # not installed, no engine, no permission: all mean "no"
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedPostgres:
    """One throwaway cluster. Use as a context manager, or start()/stop()."""

    def __init__(
        self,
        *,
        bindir: Path | None = None,
        durable: bool = False,
        settings: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise EmbeddedPostgresError(
                "no PostgreSQL server binaries found (initdb, pg_ctl); install the server "
                "(Debian: apt-get install postgresql) or set PGRELAY_PG_BINDIR"
            )
        self.bindir = found
        self.port = port or free_port()
        self.durable = durable
        self.settings = dict(settings or {})
        self.root = Path(tempfile.mkdtemp(prefix="pgrelay-pg-"))
        self.datadir = self.root / "data"
        self.sockdir = self.root / "sock"
        self.logfile = self.root / "server.log"
        self._as_root = os.geteuid() == 0
        self._started = False

    # -- connection strings -------------------------------------------------
    def dsn(self, user: str = "postgres", dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={user} dbname={dbname}"

    def url(self, user: str = "postgres", dbname: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> EmbeddedPostgres:
        try:
            self._initdb()
            self.unpause()
        except BaseException:
            self._remove()
            raise
        self._started = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server and remove the cluster's directory."""
        try:
            if self._started:
                self._pg_ctl("stop", "-w", "-t", str(START_TIMEOUT_S), "-m", mode, check=False)
                self._started = False
        finally:
            self._remove()

    def pause(self, mode: str = "fast") -> None:
        """Stop the server but keep the cluster (fault tests); `unpause` starts it again."""
        self._pg_ctl("stop", "-w", "-t", str(START_TIMEOUT_S), "-m", mode)

    def unpause(self) -> None:
        """Start the server of an initialised cluster."""
        self._pg_ctl(
            "start",
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "-l",
            str(self.logfile),
            "-o",
            self._server_options(),
        )

    def restart(self, mode: str = "fast") -> None:
        """Restart the server in place (fault tests): every connection drops."""
        self._pg_ctl(
            "restart",
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "-m",
            mode,
            "-l",
            str(self.logfile),
            "-o",
            self._server_options(),
        )

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def server_log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    # -- internals ----------------------------------------------------------
    def _server_options(self) -> str:
        opts = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.sockdir),
            "max_connections": "200",
            "shared_buffers": "128MB",
        }
        if not self.durable:
            # A throwaway cluster: crash safety buys nothing, speed does.
            opts |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        opts |= self.settings
        return " ".join(f"-c {k}={v}" for k, v in opts.items())

    def _initdb(self) -> None:
        self.sockdir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            shutil.chown(self.root, user=SERVER_OS_USER)
            shutil.chown(self.sockdir, user=SERVER_OS_USER)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args], check=check)

    def _run(self, argv: Sequence[str], check: bool = True) -> None:
        cmd = ["runuser", "-u", SERVER_OS_USER, "--", *argv] if self._as_root else list(argv)
        # A process group of its own: an interrupt or a timeout must stop runuser
        # *and* its child (initdb, pg_ctl), or an orphan keeps writing into a
        # directory we are removing, or leaves a server on a deleted directory.
        with subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=START_TIMEOUT_S + 30)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        if check and proc.returncode != 0:
            raise EmbeddedPostgresError(
                f"{Path(argv[0]).name} failed ({proc.returncode}): "
                f"{(stderr or stdout).strip()[-2000:]}\n{self.server_log()[-2000:]}"
            )

    def _remove(self) -> None:
        for _ in range(3):
            try:
                shutil.rmtree(self.root)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.2)
