"""The two `pgrelay serve` instances of a soak: start, kill -9, restart on the
same ports, stop, and sample their RSS and open file descriptors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import trio

from relay.dev.embedded import free_port

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


class Relay:
    """One instance slot: a fixed pair of ports and the process currently on them."""

    def __init__(self, name: str, env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.ws_port = free_port()
        self.admin_port = free_port()
        self.env = {
            **os.environ,
            **env,
            "PGRELAY_LISTEN": f"127.0.0.1:{self.ws_port}",
            "PGRELAY_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
        }
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnation = 0
        self.rss_kb_max = 0
        self.fds_max = 0
        self.exits: list[int] = []
        """Exit statuses of earlier incarnations (-9 after a kill -9)."""

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/v1"

    @property
    def log_paths(self) -> list[Path]:
        return [self.logdir / f"relay-{self.name}-{i}.log" for i in range(1, self.incarnation + 1)]

    def spawn(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.incarnation += 1
        with open(self.logdir / f"relay-{self.name}-{self.incarnation}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve"],
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def ready(self) -> bool:
        url = f"http://127.0.0.1:{self.admin_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    async def start(self) -> None:
        """Spawn and wait (bounded) until /readyz answers 200."""
        self.spawn()
        assert self.proc is not None
        with trio.fail_after(READY_TIMEOUT_S):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"relay {self.name} exited {self.proc.returncode}:\n{self.tail_log()}"
                    )
                if await trio.to_thread.run_sync(self.ready):
                    return
                await trio.sleep(0.1)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.exits.append(self.proc.wait(timeout=STOP_TIMEOUT_S))

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S. Only our own process, by PID."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        self.exits.append(proc.returncode)
        return proc.returncode

    def sample(self) -> None:
        """Fold the current process's RSS and open fds into the maxima."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        self.rss_kb_max = max(self.rss_kb_max, int(line.split()[1]))
                        break
            self.fds_max = max(self.fds_max, len(os.listdir(f"/proc/{proc.pid}/fd")))
        except (OSError, ValueError):
            pass  # exited between the poll and the read

    def tail_log(self, chars: int = 3000) -> str:
        paths = self.log_paths
        if not paths:
            return ""
        try:
            return paths[-1].read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def error_lines(self) -> list[str]:
        """Log lines at level error or above, over every incarnation."""
        found = []
        for path in self.log_paths:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if '"level": "error"' in line or '"level":"error"' in line or "Traceback" in line:
                    found.append(line[:400])
        return found
