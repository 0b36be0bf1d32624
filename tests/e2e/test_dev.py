"""`pgrelay dev` as a developer meets it: the real command, what it prints, the
demo page in a real headless Chromium, and a clean stop.

Localhost only; free ports; every wait has a deadline. The browser test needs
Debian's chromium and chromium-driver (`make test` installs them) and skips
without them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from relay.dev.demo import DEMO_ORG
from relay.dev.embedded import find_bindir, free_port
from tests.e2e.conftest import Client, connect
from tests.pgharness import Database

REPO = Path(__file__).resolve().parents[2]
#: `pgrelay dev` must be ready within this (the issue asks for a minute, fresh).
READY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: The demo page must show a committed event within this.
LIVE_LATENCY_LIMIT_S = 1.0

pytestmark = pytest.mark.skipif(
    find_bindir() is None, reason="pgrelay dev needs local PostgreSQL server binaries here"
)


@dataclass
class DevProcess:
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    admin_url: str

    def banner(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def field(self, name: str) -> str:
        match = re.search(rf"^  {name} +(\S+)", self.banner(), re.MULTILINE)
        assert match, f"no {name!r} line in:\n{self.banner()}"
        return match.group(1)

    @property
    def emit_command(self) -> str:
        lines = [ln.strip() for ln in self.banner().splitlines() if " emit --org " in ln]
        assert lines, f"no emit command in:\n{self.banner()}"
        return lines[0]

    @property
    def backend_url(self) -> str:
        argv = shlex.split(self.emit_command)
        return argv[argv.index("--database-url") + 1]

    @property
    def cluster_dir(self) -> Path:
        match = re.search(r"throwaway cluster in (\S+)", self.banner())
        assert match, self.banner()
        return Path(match.group(1))

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def diagnostics(self) -> str:
        return (
            f"--- stdout\n{self.banner()[-3000:]}\n"
            f"--- stderr\n{self.stderr_path.read_text(errors='replace')[-3000:]}"
        )

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def start_dev(tmp_path: Path, *args: str) -> DevProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    ws_port, admin_port = free_port(), free_port()
    env = {
        **os.environ,
        "PGRELAY_LISTEN": f"127.0.0.1:{ws_port}",
        "PGRELAY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "PGRELAY_LOG_FORMAT": "json",
    }
    env.pop("PGRELAY_DATABASE_URL", None)
    out, err = tmp_path / "dev.out", tmp_path / "dev.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "dev", *args],
            env=env,
            cwd=REPO,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
    dev = DevProcess(proc, out, err, f"http://127.0.0.1:{admin_port}")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pgrelay dev exited {proc.returncode}\n{dev.diagnostics()}")
        try:
            if dev.get("/readyz")[0] == 200 and "emit --org" in dev.banner():
                return dev
        except OSError:
            pass
        time.sleep(0.05)
    dev.stop(signal.SIGKILL)
    raise AssertionError(f"pgrelay dev not ready in {READY_TIMEOUT_S} s\n{dev.diagnostics()}")


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[DevProcess]:
    d = start_dev(tmp_path)
    try:
        yield d
    finally:
        d.stop()


async def test_dev_prints_what_works_and_sigint_removes_everything(tmp_path: Path) -> None:
    dev = start_dev(tmp_path)
    try:
        cluster = dev.cluster_dir
        assert cluster.is_dir()
        assert dev.field("org") == DEMO_ORG
        status, page = dev.get("/")
        assert status == 200 and "<title>pgrelay demo</title>" in page

        # The printed token and WebSocket URL work; the printed emit command reaches them.
        async with connect(dev.field("websocket")) as ws:
            client = Client(ws)
            await client.auth(dev.field("token"))
            frames = await client.subscribe(uuid.UUID(DEMO_ORG))
            assert frames[-1]["type"] == "subscribed", frames
            emitted = await trio.run_process(
                dev.emit_command, shell=True, capture_stdout=True, capture_stderr=True, check=False
            )
            assert emitted.returncode == 0, emitted.stderr.decode()
            new_id = int(emitted.stdout.decode().strip())
            [event] = await client.events(1)
        assert event["id"] == new_id and event["org"] == DEMO_ORG
        assert (event["event_type"], event["entity_type"], event["entity_id"]) == (
            "job.updated",
            "job",
            "42",
        )
        assert event["payload"] == {"status": "done"}

        code = dev.stop(signal.SIGINT)
        assert code == 0, dev.diagnostics()
        assert not cluster.exists(), f"{cluster} is still there"
    finally:
        dev.stop(signal.SIGKILL)


def test_sigterm_stops_it_too(dev: DevProcess) -> None:
    cluster = dev.cluster_dir
    assert dev.stop(signal.SIGTERM) == 0, dev.diagnostics()
    assert not cluster.exists()


def test_dev_on_a_given_database_migrates_it_and_can_run_again(
    empty_db: Database, tmp_path: Path
) -> None:
    """--database-url: migrated, login roles created (then found), nothing removed."""
    for attempt in range(2):
        dev = start_dev(tmp_path / f"run{attempt}", "--database-url", empty_db.dsn())
        try:
            assert "kept on exit" in dev.field("database") + dev.banner()
            emitted = subprocess.run(
                dev.emit_command, shell=True, capture_output=True, timeout=30, check=False
            )
            assert emitted.returncode == 0, emitted.stderr.decode()
        finally:
            assert dev.stop(signal.SIGINT) == 0, dev.diagnostics()
    with empty_db.connect() as conn:
        row = conn.execute("SELECT count(*) FROM relay.events").fetchone()
        assert row is not None and row[0] == 2


def test_dev_endpoints_refuse_foreign_pages(dev: DevProcess) -> None:
    def post(body: bytes, **headers: str) -> int:
        request = urllib.request.Request(
            dev.admin_url + "/dev/emit", data=body, headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    json_type = {"Content-Type": "application/json"}
    assert post(b"{}", **json_type) == 200
    assert post(b"{}", **json_type, Origin="https://evil.example") == 403
    assert post(b"{}", **{"Content-Type": "text/plain"}) == 415  # a cross-site form's type
    assert post(b"{" + b" " * 4096 + b"}", **json_type) == 413
    assert dev.get("/dev/emit")[0] == 405
    token = urllib.request.Request(dev.admin_url + "/dev/token", headers={"Host": "evil:80"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(token, timeout=5)
    assert refused.value.code == 403
    # The metrics stay where they were.
    assert dev.get("/metrics")[0] == 200


# -- the browser --------------------------------------------------------------------------


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is missing (Debian: apt-get install chromium chromium-driver)"
    return None


def _launch(profile: Path, log_path: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(str(CHROMEDRIVER), log_output=str(log_path))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(15)
    driver.set_script_timeout(5)
    return driver


_PAGE_STATE = """
const rows = (id) => Array.from(document.querySelectorAll('#' + id + ' tbody tr'));
return {
  state: document.getElementById('status').dataset.state,
  org: document.getElementById('org-state').dataset.state,
  jobs: Object.fromEntries(
    rows('jobs').map(tr => [tr.cells[1].textContent, Number(tr.dataset.version)])),
  events: rows('events').map(
    tr => ({id: Number(tr.dataset.id), replayed: tr.dataset.replayed === 'true'})),
  refreshes: Number(document.getElementById('refreshes').dataset.count),
  latency: document.getElementById('latency').dataset.ms,
  lag: document.getElementById('lag').dataset.ms,
  detail: document.getElementById('status-detail').textContent,
  notices: Array.from(document.querySelectorAll('#notices li')).map(li => li.textContent),
};
"""


def _wait(
    driver: Any, ok: Callable[[dict[str, Any]], bool], timeout_s: float, what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        page: dict[str, Any] = driver.execute_script(_PAGE_STATE)
        if ok(page):
            return page
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}; the page: {page}")
        time.sleep(0.01)


def live(page: dict[str, Any]) -> bool:
    return page["state"] == "connected" and page["org"] == "live"


def _console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _create_job(driver: Any, title: str) -> None:
    driver.find_element("id", "title").send_keys(title)
    driver.find_element("id", "create-button").click()


def test_demo_jobs_board_on_two_devices(
    dev: DevProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed's two-device check, on the demo page built on the web client SDK: a job
    created on one device appears on the other within a second; one device closed while
    three jobs are created sees all three (replayed) when it comes back; ten rapid
    updates of one job make one board refresh; the status and latency are on screen."""
    missing = _browser_missing()
    if missing:
        pytest.skip(f"browser test: {missing}")
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let selenium-manager download anything
    page_url = dev.field("demo page")
    # Two devices: two browser profiles (their own storage, their own connection).
    profile_a, profile_b = tmp_path / "device-a", tmp_path / "device-b"
    a = _launch(profile_a, tmp_path / "chromedriver-a.log")
    b = None
    try:
        a.get(page_url)
        b = _launch(profile_b, tmp_path / "chromedriver-b.log")
        b.get(page_url)
        _wait(a, live, 15, "device A is live")
        _wait(b, live, 15, "device B is live")

        started = time.monotonic()
        _create_job(a, "first")
        _wait(b, lambda p: "first" in p["jobs"], 5, "the job shows on device B")
        elapsed = time.monotonic() - started
        assert elapsed < LIVE_LATENCY_LIMIT_S, f"the job took {elapsed:.3f} s to reach device B"
        page_a = _wait(a, lambda p: p["latency"] not in ("", None), 5, "A shows its latency")
        assert int(page_a["latency"]) < 1000, page_a
        assert _wait(b, lambda p: p["lag"] not in ("", None), 5, "B shows the lag")["detail"]
        assert _console_errors(a) == [] and _console_errors(b) == []

        # Device B goes away; three jobs are created on A meanwhile.
        b.quit()
        b = None
        for title in ("second", "third", "fourth"):
            _create_job(a, title)
            _wait(a, lambda p, t=title: t in p["jobs"], 5, f"{title} on A")

        # Device B comes back: the board has them, and the three signals were replayed.
        b = _launch(profile_b, tmp_path / "chromedriver-b2.log")
        b.get(page_url)
        page_b = _wait(
            b,
            lambda p: live(p) and {"second", "third", "fourth"} <= set(p["jobs"]),
            15,
            "device B shows the three jobs created while it was away",
        )
        page_b = _wait(
            b,
            lambda p: sum(e["replayed"] for e in p["events"]) >= 3,
            5,
            "B replayed the three job.created signals it missed",
        )
        assert sum(e["replayed"] for e in page_b["events"]) == 3, page_b["events"]

        # Ten rapid updates of one job: one refresh of the board on each device.
        time.sleep(0.5)  # let earlier refreshes settle
        before_a, before_b = (_wait(d, live, 5, "live")["refreshes"] for d in (a, b))
        row = a.find_element("css selector", "#jobs tbody tr:last-child")
        assert row.find_element("css selector", "td:nth-child(2)").text == "first"
        row.find_element("css selector", "button.bump").click()
        for device in (a, b):
            _wait(device, lambda p: p["jobs"].get("first") == 11, 5, "version 11 shows")
        time.sleep(0.6)  # anything still batched would refresh by now
        after_a, after_b = (d.execute_script(_PAGE_STATE)["refreshes"] for d in (a, b))
        assert (after_a - before_a, after_b - before_b) == (1, 1), (
            before_a,
            after_a,
            before_b,
            after_b,
        )
        assert _console_errors(a) == [] and _console_errors(b) == []
    finally:
        a.quit()
        if b is not None:
            b.quit()


def _readme_block_after_make_run() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- after-make-run -->", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_commands_after_make_run_work_as_printed(
    dev: DevProcess, tmp_path: Path
) -> None:
    """The export lines pgrelay dev prints, then the README's block, line by line."""
    exports = [ln.strip() for ln in dev.banner().splitlines() if ln.strip().startswith("export ")]
    assert {e.split("=", 1)[0] for e in exports} >= {
        "export PGRELAY_JWT_SECRET",
        "export PGRELAY_LISTEN",
        "export PGRELAY_DATABASE_URL",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGRELAY_", "PG"))}
    token_line, tail_line, emit_line = _readme_block_after_make_run()

    def run(line: str) -> subprocess.CompletedProcess[str]:
        script = "\n".join([*exports, line])
        return subprocess.run(
            ["bash", "-c", script],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    minted = run(token_line)
    assert minted.returncode == 0, minted.stderr
    assert minted.stdout.count(".") == 2  # a JWT

    tail_script = "\n".join([*exports, "exec " + tail_line.removesuffix("&").strip()])
    with open(tmp_path / "tail.out", "wb") as out:
        tail = subprocess.Popen(
            ["bash", "-c", tail_script], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (tmp_path / "demo.cursor").exists():
            time.sleep(0.1)  # subscribed: tail saved its first cursor
        emitted = run(emit_line)
        assert emitted.returncode == 0, emitted.stderr
        new_id = int(emitted.stdout.strip())
        while time.monotonic() < deadline:
            lines = (tmp_path / "tail.out").read_text().splitlines()
            events = [json.loads(ln) for ln in lines if ln.startswith("{")]
            if any(e.get("id") == new_id for e in events):
                break
            time.sleep(0.1)
        else:
            raise AssertionError((tmp_path / "tail.out").read_text())
    finally:
        tail.terminate()
        tail.wait(timeout=10)
