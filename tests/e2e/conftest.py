"""End-to-end fixtures: the real `pgrelay serve` process, real sockets, real clients.

Localhost only; every port is picked free; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from relay.dev.embedded import free_port
from relay.server.jwt import mint_token
from tests.pgharness import DAEMON, Database, Server

REPO = Path(__file__).resolve().parents[2]
SECRET = "e2e-secret-" + "s" * 40
READY_TIMEOUT_S = 30


@dataclass
class RelayProcess:
    """A running `pgrelay serve`."""

    proc: subprocess.Popen[bytes]
    ws_url: str
    admin_url: str
    log_path: Path
    db: Database
    env: dict[str, str] = field(default_factory=dict)

    def token(
        self, orgs: list[uuid.UUID] | None, *, sub: str = "user-1", lifetime_s: int = 3600
    ) -> str:
        return mint_token(
            SECRET,
            orgs=[str(o) for o in orgs] if orgs is not None else None,
            sub=sub,
            lifetime_s=lifetime_s,
        )

    def admin_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"raw": line})
        return lines

    def terminate(self, timeout_s: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def start_relay(db: Database, tmp_path: Path, **settings: str) -> RelayProcess:
    ws_port, admin_port = free_port(), free_port()
    env = {
        **os.environ,
        "PGRELAY_DATABASE_URL": db.dsn(DAEMON),
        "PGRELAY_LISTEN": f"127.0.0.1:{ws_port}",
        "PGRELAY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "PGRELAY_JWT_SECRET": SECRET,
        "PGRELAY_LOG_FORMAT": "json",
        "PGRELAY_LOG_LEVEL": "debug",
    }
    env |= {"PGRELAY_" + k.upper(): v for k, v in settings.items()}
    log_path = tmp_path / f"relay-{ws_port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve"],
            env=env,
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    relay = RelayProcess(
        proc, f"ws://127.0.0.1:{ws_port}/v1", f"http://127.0.0.1:{admin_port}", log_path, db, env
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"pgrelay serve exited {proc.returncode}:\n"
                f"{log_path.read_text(errors='replace')[-4000:]}"
            )
        try:
            if relay.admin_get("/readyz")[0] == 200:
                return relay
        except OSError:
            pass
        time.sleep(0.05)
    relay.terminate()
    raise AssertionError(
        "pgrelay serve did not become ready:\n" + log_path.read_text(errors="replace")[-4000:]
    )


@pytest.fixture
def relay(db: Database, tmp_path: Path) -> Iterator[RelayProcess]:
    r = start_relay(db, tmp_path, poll_interval_ms="1000")
    try:
        yield r
    finally:
        r.terminate()


@pytest.fixture
def fault_relay(
    fault_server: tuple[Server, Database], tmp_path: Path
) -> Iterator[tuple[Server, RelayProcess]]:
    server, db = fault_server
    r = start_relay(db, tmp_path, poll_interval_ms="500")
    try:
        yield server, r
    finally:
        r.terminate()


class Client:
    """A WebSocket client speaking protocol v1, with deadlines on every wait."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(message))

    async def recv(self, timeout_s: float = 5) -> dict[str, Any]:
        with trio.fail_after(timeout_s):
            return json.loads(await self.ws.get_message())  # type: ignore[no-any-return]

    async def expect(self, type_: str, timeout_s: float = 5) -> dict[str, Any]:
        message = await self.recv(timeout_s)
        assert message["type"] == type_, message
        return message

    async def auth(self, token: str) -> dict[str, Any]:
        await self.send({"type": "auth", "token": token})
        return await self.expect("ready")

    async def subscribe(
        self, org: uuid.UUID, *, ref: str = "s1", cursor: str | None = None, **extra: Any
    ) -> list[dict[str, Any]]:
        """Subscribe; returns every frame up to and including `subscribed`."""
        await self.send(
            {"type": "subscribe", "ref": ref, "org": str(org), "cursor": cursor, **extra}
        )
        frames = []
        while True:
            frame = await self.recv()
            frames.append(frame)
            if frame["type"] in ("subscribed", "error"):
                return frames

    async def events(self, n: int, timeout_s: float = 10) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        with trio.fail_after(timeout_s):
            while len(got) < n:
                frame = await self.recv(timeout_s)
                if frame["type"] == "event":
                    got.append(frame)
        return got

    async def nothing_for(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            frame = await self.recv(seconds + 1)
            raise AssertionError(f"expected silence, got {frame}")

    async def close_code(self, timeout_s: float = 10) -> int | None:
        """Read until the server closes; the close code."""
        with trio.fail_after(timeout_s):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as exc:
                return exc.reason.code if exc.reason else None


def connect(url: str, **kwargs: Any) -> Any:
    return open_websocket_url(url, **kwargs)
