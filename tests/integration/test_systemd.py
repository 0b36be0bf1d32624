"""Running under systemd: the shipped units, and the sd_notify client.

- The units in ``systemd/`` pass ``systemd-analyze verify`` and keep an
  exposure of at most 2.0 in ``systemd-analyze security --offline=true``
  (skipped when systemd-analyze is absent: ``apt-get install systemd``).
- The retention unit's exact command runs against a real database as the
  daemon's role.
- :mod:`relay.server.sdnotify` talks to real AF_UNIX datagram sockets owned by the
  test (a path socket and an abstract one).

Offline verification: ``systemd-analyze verify`` needs no running systemd, but it
refuses a unit whose ExecStart binary does not exist, and ``--root=`` would need a
whole unit tree. So the units are verified as temporary copies whose ExecStart
executables point at a stub; everything else is the shipped text.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest
import trio

from relay.config import Settings, env_name
from relay.server import sdnotify
from tests.pgharness import DAEMON, Database

REPO = Path(__file__).resolve().parents[2]
UNITS_DIR = REPO / "systemd"
UNITS = ("pgrelay.service", "pgrelay-retention.service", "pgrelay-retention.timer")
SERVICES = ("pgrelay.service", "pgrelay-retention.service")
#: `systemd-analyze security` scale: 0 (locked down) to 10 (unsafe).
MAX_EXPOSURE = 2.0
ANALYZE_TIMEOUT_S = 60


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return path


def _exec_start(unit_text: str) -> str:
    """The ExecStart= command line of a unit, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", unit_text)
    match = re.search(r"^ExecStart=(.+)$", joined, re.MULTILINE)
    assert match, "no ExecStart="
    return match.group(1).strip()


def _units_with_stub_executables(tmp_path: Path) -> Path:
    """Copies of the units whose ExecStart executables exist (a stub)."""
    stub = tmp_path / "stub-executable"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    out = tmp_path / "units"
    out.mkdir()
    for name in UNITS:
        text = (UNITS_DIR / name).read_text()
        if "ExecStart=" in text:
            binary = shlex.split(_exec_start(text))[0]
            assert binary.startswith("/"), f"{name}: ExecStart needs an absolute path"
            text = text.replace(f"ExecStart={binary}", f"ExecStart={stub}")
        (out / name).write_text(text)
    return out


# -- the units ----------------------------------------------------------------


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    units = _units_with_stub_executables(tmp_path)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *(str(units / name) for name in UNITS)],
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT_S,
        cwd=units,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Warnings (unknown keys, bad values) do not change the exit status.
    ours = [line for line in output.splitlines() if any(n in line for n in UNITS)]
    assert not ours, output


@pytest.mark.parametrize("service", SERVICES)
def test_service_sandbox_exposure_is_at_most_2(service: str) -> None:
    analyze = _systemd_analyze()
    result = subprocess.run(
        [analyze, "security", "--offline=true", str(UNITS_DIR / service)],
        capture_output=True,
        text=True,
        timeout=ANALYZE_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0 and "offline" in output.lower():
        pytest.skip(f"this systemd-analyze cannot review unit files offline: {output.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, output
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, output


def test_daemon_unit_keeps_the_promises_the_daemon_relies_on() -> None:
    text = (UNITS_DIR / "pgrelay.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.MULTILINE))
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["ExecStart"] == "/usr/local/bin/pgrelay serve"
    # The drain must finish before systemd resorts to SIGKILL.
    assert float(settings["TimeoutStopSec"]) > Settings().shutdown_timeout_s
    assert int(settings["LimitNOFILE"]) > Settings().max_connections
    # sd_notify needs AF_UNIX.
    assert "AF_UNIX" in settings["RestrictAddressFamilies"].split()


def test_env_example_documents_every_setting_with_its_default() -> None:
    text = (UNITS_DIR / "pgrelay.env.example").read_text()
    documented = set(re.findall(r"^#?(PGRELAY_[A-Z0-9_]+)=", text, re.MULTILINE))
    assert documented == {env_name(f.name) for f in fields(Settings)}
    # A commented-out line shows the default.
    shown = dict(re.findall(r"^#(PGRELAY_[A-Z0-9_]+)=(.*)$", text, re.MULTILINE))
    for f in fields(Settings):
        if env_name(f.name) in shown:
            default = getattr(Settings(), f.name)
            if isinstance(default, tuple):
                default = ",".join(default)
            expected = "" if default is None else str(default)
            assert shown[env_name(f.name)] in (expected, expected.removesuffix(".0")), f.name


def test_retention_unit_command_runs_as_the_daemon_role(db: Database) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed (apt-get install postgresql-client)")
    with db.connect() as owner:  # only the owner may backdate created_at
        owner.execute(
            "INSERT INTO relay.events (organization_id, event_type, entity_type, entity_id, "
            "created_at) SELECT %s, 'job.updated', 'job', g::text, now() - interval '25 hours' "
            "FROM generate_series(1, 3) AS g",
            (str(uuid.uuid4()),),
        )
    command = _exec_start((UNITS_DIR / "pgrelay-retention.service").read_text())
    argv = shlex.split(command.replace("${PGRELAY_DATABASE_URL}", db.dsn(DAEMON)))
    assert argv[0] == "/usr/bin/psql"
    result = subprocess.run(
        [psql, *argv[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PGAPPNAME": "pgrelay-retention"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "deleted 3 events older than 24 hours"


# -- relay.server.sdnotify against real sockets ---------------------------------------


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A datagram socket at a path, receiving credentials like systemd does."""
    address = tmp_path / "notify.sock"
    assert len(str(address)) < 100, "AF_UNIX paths are limited to 107 bytes"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(str(address))
        sock.settimeout(5)
        yield sock, {"NOTIFY_SOCKET": str(address)}


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, dict[str, str]]]:
    name = f"pgrelay-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        yield sock, {"NOTIFY_SOCKET": "@" + name}


def _receive_with_sender_pid(sock: socket.socket) -> tuple[bytes, int]:
    data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid, _uid, _gid = struct.unpack("iII", payload[:12])
            return data, pid
    raise AssertionError("no SCM_CREDENTIALS: is SO_PASSCRED set?")


def test_notify_sends_the_exact_bytes_to_a_path_socket(
    path_socket: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, environ = path_socket
    assert sdnotify.notify("READY=1\nSTATUS=serving", environ=environ) is True
    data, pid = _receive_with_sender_pid(sock)
    assert data == b"READY=1\nSTATUS=serving"
    assert pid == os.getpid()  # what NotifyAccess=main checks


def test_notify_sends_the_exact_bytes_to_an_abstract_socket(
    abstract_socket: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, environ = abstract_socket
    assert sdnotify.notify("STOPPING=1", environ=environ) is True
    assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"NOTIFY_SOCKET": ""},
        {"NOTIFY_SOCKET": "@"},
        {"NOTIFY_SOCKET": "relative/path"},
        {"NOTIFY_SOCKET": "vsock:2:1234"},
        {"NOTIFY_SOCKET": "/nonexistent/pgrelay/notify.sock"},
    ],
)
def test_notify_without_a_usable_socket_is_a_no_op_returning_false(
    environ: dict[str, str],
) -> None:
    assert sdnotify.notify("READY=1", environ=environ) is False


@pytest.mark.parametrize(
    ("environ", "expected_s"),
    [
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4243"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval_is_half_the_period_for_this_process_only(
    environ: dict[str, str], expected_s: float | None
) -> None:
    assert sdnotify.watchdog_interval(environ, pid=4242) == expected_s


def test_watchdog_interval_defaults_to_this_process() -> None:
    environ = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert sdnotify.watchdog_interval(environ) == 0.5


async def test_watchdog_loop_returns_at_once_without_a_watchdog(
    path_socket: tuple[socket.socket, dict[str, str]],
) -> None:
    _sock, environ = path_socket
    with trio.fail_after(1):
        await sdnotify.watchdog_loop(environ=environ)  # no WATCHDOG_USEC
        await sdnotify.watchdog_loop(environ={"WATCHDOG_USEC": "200000"})  # no socket
        await sdnotify.watchdog_loop(0.05, environ={})  # an interval, but no socket


async def test_watchdog_loop_pets_every_half_period_while_alive(
    abstract_socket: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, environ = abstract_socket
    sock.setblocking(False)
    receiver = trio.socket.from_stdlib_socket(sock)
    environ = {**environ, "WATCHDOG_USEC": "200000"}  # pet every 0.1 s
    healthy = True
    pets: list[float] = []

    async def receive() -> None:
        while True:
            data = await receiver.recv(4096)
            assert data == b"WATCHDOG=1"
            pets.append(trio.current_time())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(
                lambda: sdnotify.watchdog_loop(alive=lambda: healthy, environ=environ)
            )
            start = trio.current_time()
            await trio.sleep(0.55)
            # The first pet goes out at once, then one every 0.1 s.
            assert pets and pets[0] - start < 0.05
            assert 4 <= len(pets) <= 7, pets
            gaps = [b - a for a, b in itertools.pairwise(pets)]
            assert 0.08 <= statistics.median(gaps) <= 0.15, gaps

            healthy = False  # the daemon is wedged: systemd must stop hearing from us
            wedged_at = trio.current_time()
            await trio.sleep(0.45)
            late = [t for t in pets if t > wedged_at + 0.02]
            assert late == [], "petted the watchdog while not alive"

            healthy = True  # recovered before WatchdogSec ran out: petting resumes
            recovered_at = trio.current_time()
            await trio.sleep(0.25)
            assert [t for t in pets if t > recovered_at], "did not resume petting"
            nursery.cancel_scope.cancel()


async def test_watchdog_loop_refuses_a_nonsensical_interval(
    abstract_socket: tuple[socket.socket, dict[str, str]],
) -> None:
    _sock, environ = abstract_socket
    with pytest.raises(ValueError, match="interval"):
        await sdnotify.watchdog_loop(0, environ=environ)


# -- the real daemon under a fake systemd --------------------------------------

JWT_SECRET = "systemd-test-secret-" + "s" * 40
READY_TIMEOUT_S = 30


def _serve_under_systemd(
    db: Database, environ: dict[str, str], tmp_path: Path, **settings: str
) -> tuple[subprocess.Popen[bytes], Path, int]:
    """`pgrelay serve` with systemd's notify environment `environ` and a 1 s
    watchdog (pet every 0.5 s): the process, its log file and its admin port."""
    from relay.dev.embedded import free_port

    admin_port = free_port()
    env = {
        **os.environ,
        **environ,
        "WATCHDOG_USEC": "1000000",
        **settings,
        "PGRELAY_DATABASE_URL": db.dsn(DAEMON),
        "PGRELAY_JWT_SECRET": JWT_SECRET,
        "PGRELAY_LISTEN": f"127.0.0.1:{free_port()}",
        "PGRELAY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "PGRELAY_LOG_FORMAT": "json",
    }
    env.pop("WATCHDOG_PID", None)
    log_path = tmp_path / "relay.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve"],
            env=env,
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return proc, log_path, admin_port


def test_daemon_notifies_systemd(
    db: Database,
    path_socket: tuple[socket.socket, dict[str, str]],
    tmp_path: Path,
) -> None:
    """READY=1 once serving, WATCHDOG=1 every half period, STOPPING=1 on SIGTERM,
    exit 0; every message from the main pid (NotifyAccess=main)."""

    sock, environ = path_socket
    proc, log_path, admin_port = _serve_under_systemd(db, environ, tmp_path)
    messages: list[str] = []

    def wait_for(line: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while line not in messages:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {line} within {timeout_s} s; got {messages}; log:\n"
                    + log_path.read_text(errors="replace")[-4000:]
                )
            sock.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
            try:
                data, pid = _receive_with_sender_pid(sock)
            except TimeoutError:
                assert proc.poll() is None, log_path.read_text(errors="replace")[-4000:]
                continue
            assert pid == proc.pid, f"{data!r} came from pid {pid}, not the main pid"
            messages.extend(data.decode().splitlines())

    try:
        wait_for("READY=1", READY_TIMEOUT_S)
        # READY=1 means serving: readyz answers 200 already.
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=5) as resp:
            assert resp.status == 200
        messages.clear()
        wait_for("WATCHDOG=1", 2)
        messages.clear()
        wait_for("WATCHDOG=1", 2)
        proc.send_signal(signal.SIGTERM)
        wait_for("STOPPING=1", 10)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_a_supervisor_of_two_workers_notifies_systemd_alone_and_once(
    db: Database,
    path_socket: tuple[socket.socket, dict[str, str]],
    tmp_path: Path,
) -> None:
    """`--workers 2`: one READY=1 once both workers serve, never again (not after a
    worker's restart); WATCHDOG=1 only while every worker reports that it is alive
    (none while one is frozen); STOPPING=1, exit 0. Every message from the main
    pid: the workers never see NOTIFY_SOCKET."""
    from relay.server.workers import SILENT_S

    sock, environ = path_socket
    proc, log_path, admin_port = _serve_under_systemd(db, environ, tmp_path, PGRELAY_WORKERS="2")
    received: list[tuple[float, str]] = []

    def listen(seconds: float) -> list[str]:
        """Every message within `seconds`; each from the main pid."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, pid = _receive_with_sender_pid(sock)
            except TimeoutError:
                break
            assert pid == proc.pid, f"{data!r} came from pid {pid}, not the main pid"
            for line in data.decode().splitlines():
                got.append(line)
                received.append((time.monotonic(), line))
        return got

    def until(line: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while line not in listen(min(0.5, deadline - time.monotonic())):
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-4000:]
            assert proc.poll() is None, log_path.read_text(errors="replace")[-4000:]

    def worker_pid(number: int) -> int:
        pids = [
            line["pid"]
            for line in map(json.loads, log_path.read_text().splitlines())
            if line.get("event") == "worker started" and line["worker"] == number
        ]
        return int(pids[-1])

    try:
        until("READY=1", READY_TIMEOUT_S)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=5) as resp:
            assert resp.status == 200
        until("WATCHDOG=1", 2)
        frozen = worker_pid(0)
        os.kill(frozen, signal.SIGSTOP)  # wedged: it stops reporting
        try:
            listen(SILENT_S + 0.5)
            assert "WATCHDOG=1" not in listen(1.5), "petted while a worker was silent"
        finally:
            os.kill(frozen, signal.SIGCONT)
        until("WATCHDOG=1", 2)
        os.kill(worker_pid(1), signal.SIGKILL)
        until("WATCHDOG=1", 10)  # once it is back
        assert worker_pid(1) != frozen
        proc.send_signal(signal.SIGTERM)
        until("STOPPING=1", 10)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert [line for _, line in received].count("READY=1") == 1
