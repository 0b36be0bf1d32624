"""`pgrelay tail`: a terminal client that prints one organization's events.

Each event is one JSON line on stdout; notices (subscribed, resync,
reconnecting) go to stderr. With --cursor-file, the cursor of every frame
that carries one is written to the file (temporary file + os.replace, after
the event is printed and flushed), and the next run resumes from it: nothing
is skipped, and at most the batch in flight repeats (its ids are dropped).

The protocol decisions live in `TailSession`, which does no I/O; `tail`
is the trio shell around it (trio-websocket).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, open_websocket_url

from relay import config
from relay.core.codes import CloseCode, ErrorCode
from relay.core.protocol import MAX_EVENT_TYPE_CHARS, is_valid_event_glob
from relay.errors import ConfigError
from relay.tools import token as token_tool
from relay.tools.common import (
    EXIT_FAILURE,
    EXIT_OK,
    ToolFailure,
    environ,
    non_empty,
    org_id,
    run_command,
    setting,
)

DEFAULT_URL: Final = "ws://127.0.0.1:8765/v1"
#: Lifetime of a token the tail mints itself; it re-authenticates before expiry.
MINTED_TOKEN_LIFETIME_S: Final = 3600
#: Re-authenticate after this share of a minted token's lifetime.
REFRESH_AT_SHARE: Final = 0.75
#: Ids remembered to drop repeats of the batch in flight after a resume.
SEEN_IDS_LIMIT: Final = 10_000
#: Reconnect delays after a lost connection: exponential, with jitter.
BACKOFF_FIRST_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0
#: After 1012 (server restarting), as the protocol asks.
RESTART_DELAY_MIN_S: Final = 0.5
RESTART_DELAY_MAX_S: Final = 5.0
CONNECT_TIMEOUT_S: Final = 10.0
#: Largest frame accepted from the server.
MAX_SERVER_FRAME_BYTES: Final = 1024 * 1024

_CLOSE_MEANING: Final[Mapping[int, str]] = {
    CloseCode.MESSAGE_TOO_BIG: "a frame was too big for the server",
    CloseCode.TOKEN_INVALID: "token invalid or expired",
    CloseCode.AUTH_TIMEOUT: "no auth in time",
    CloseCode.TOO_MANY_BAD_FRAMES: "too many bad frames",
}


# -- the cursor file ------------------------------------------------------------


def read_cursor(path: Path, org: str) -> str | None:
    """The cursor saved for `org` in `path`, or None when there is no file.

    ConfigError when the file is unreadable, malformed, or for another org."""
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--cursor-file {path}: cannot read it: {exc}") from None
    try:
        saved = json.loads(text)
    except ValueError:
        saved = None
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("org"), str)
        or not isinstance(saved.get("cursor"), str)
        or not saved["cursor"]
    ):
        raise ConfigError(
            f'--cursor-file {path}: not a pgrelay tail cursor file (expected {{"org": ..., '
            '"cursor": ...}); delete it to start from now'
        )
    if saved["org"] != org:
        raise ConfigError(
            f"--cursor-file {path} holds the cursor of org {saved['org']}, not {org}: "
            "use one file per organization"
        )
    cursor: str = saved["cursor"]
    return cursor


def write_cursor(path: Path, org: str, cursor: str) -> None:
    """Replace `path` atomically: a crash leaves the old cursor or the new one."""
    data = json.dumps({"org": org, "cursor": cursor}) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_cursor_path(path: Path) -> None:
    """ConfigError unless a cursor file can be written at `path`."""
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"--cursor-file {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--cursor-file {path}: directory {parent} is not writable")
    if path.is_dir():
        raise ConfigError(f"--cursor-file {path} is a directory")


# -- the pure session -------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """What the shell does after one server frame."""

    send: str | None = None
    """A frame to send to the server."""
    stdout: str | None = None
    """One line for stdout (an event)."""
    notice: str | None = None
    """One line for stderr."""
    cursor: str | None = None
    """A new cursor to save, after stdout is flushed."""
    live: bool = False
    """Subscribed: the connection works, so reconnect delays start over."""
    retry: bool = False
    """Drop this connection and reconnect after a backoff."""
    exit_code: int | None = None
    """Stop with this exit code."""


@dataclass(frozen=True)
class CloseDecision:
    """What to do after the connection closed or could not be opened."""

    notice: str
    exit_code: int | None = None
    """Stop with this exit code; None: reconnect."""
    restart: bool = False
    """The server is restarting: wait RESTART_DELAY_*, not the backoff."""
    new_token: bool = False
    """Reconnect at once with a freshly minted token."""


class TailSession:
    """The protocol side of `pgrelay tail`; survives reconnects. No I/O, no clock."""

    def __init__(
        self,
        org: str,
        *,
        cursor: str | None,
        event_types: list[str] | None,
        can_mint: bool,
    ) -> None:
        self.org = org
        self.cursor = cursor
        self.event_types = event_types
        self.can_mint = can_mint
        self._seen: deque[int] = deque(maxlen=SEEN_IDS_LIMIT)
        self._seen_set: set[int] = set()
        self._ref = 0
        self._ready = False
        self._minted_again = False

    def connected(self) -> None:
        """A new connection is open; the next frame to send is `auth_frame`."""
        self._ready = False

    @staticmethod
    def auth_frame(token: str) -> str:
        return json.dumps({"type": "auth", "token": token})

    def _subscribe_frame(self) -> str:
        self._ref += 1
        frame: dict[str, Any] = {
            "type": "subscribe",
            "ref": str(self._ref),
            "org": self.org,
            "cursor": self.cursor,
        }
        if self.event_types:
            frame["event_types"] = self.event_types
        return json.dumps(frame)

    def receive(self, text: str) -> Step:
        try:
            frame = json.loads(text)
        except ValueError:
            frame = None
        if not isinstance(frame, dict):
            return Step(notice="ignored a server frame that is not a JSON object")
        kind = frame.get("type")
        if kind == "ready":
            if self._ready:
                return Step()  # the answer to a token refresh
            self._ready = True
            self._minted_again = False
            return Step(send=self._subscribe_frame())
        if kind == "event":
            return self._event(frame)
        if kind == "subscribed" and frame.get("org") == self.org:
            return self._new_cursor(
                frame,
                Step(
                    notice=f"subscribed to org {self.org} ({frame.get('replayed', 0)} replayed)",
                    live=True,
                ),
            )
        if kind == "resync" and frame.get("org") == self.org:
            return self._new_cursor(
                frame,
                Step(
                    notice=f"resync for org {self.org} ({frame.get('reason')}): events were "
                    "missed, refetch everything"
                ),
            )
        if kind == "unsubscribed" and frame.get("org") == self.org:
            return Step(
                notice=f"unsubscribed from org {self.org} ({frame.get('reason')})",
                exit_code=EXIT_FAILURE,
            )
        if kind == "error":
            return self._error(frame)
        return Step()  # pong, frames for other orgs, types added later

    def _event(self, frame: dict[str, Any]) -> Step:
        event_id = frame.get("id")
        if frame.get("org") != self.org or not isinstance(event_id, int):
            return Step()
        if event_id in self._seen_set:
            return Step()  # a repeat of the batch in flight after a resume
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(event_id)
        self._seen_set.add(event_id)
        return self._new_cursor(frame, Step(stdout=json.dumps(frame, separators=(",", ":"))))

    def _new_cursor(self, frame: dict[str, Any], step: Step) -> Step:
        cursor = frame.get("cursor")
        if not isinstance(cursor, str) or not cursor or cursor == self.cursor:
            return step
        self.cursor = cursor
        return dataclasses.replace(step, cursor=cursor)

    def _error(self, frame: dict[str, Any]) -> Step:
        code = frame.get("code")
        message = f"server error {code}: {frame.get('message', '')}".rstrip(": ")
        if code == ErrorCode.FORBIDDEN:
            return Step(
                notice=f"not allowed to read org {self.org} (forbidden): the token's claims "
                "must name it (pgrelay token --org ...)",
                exit_code=EXIT_FAILURE,
            )
        if code in (ErrorCode.RATE_LIMITED, ErrorCode.INTERNAL):
            return Step(notice=message, retry=True)
        return Step(notice=message, exit_code=EXIT_FAILURE)

    def closed(self, code: int | None, reason: str | None) -> CloseDecision:
        """The connection closed with `code` (None: lost without a close frame)."""
        said = f"{code}" + (f" {reason}" if reason else "") if code is not None else "lost"
        if code == CloseCode.SERVICE_RESTART:
            return CloseDecision(f"server restarting ({said})", restart=True)
        if code == CloseCode.TOKEN_INVALID:
            if self.can_mint and not self._minted_again:
                self._minted_again = True
                return CloseDecision(f"token rejected ({said}); minting a new one", new_token=True)
            return CloseDecision(
                f"token invalid or expired ({said}): get a new token, then run again",
                exit_code=EXIT_FAILURE,
            )
        meaning = _CLOSE_MEANING.get(code) if code is not None else None
        if meaning is not None:
            return CloseDecision(
                f"server closed the connection: {meaning} ({said})",
                exit_code=EXIT_FAILURE,
            )
        return CloseDecision(f"connection {said}")


def backoff_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before reconnect `attempt` (1, 2, ...): the ceiling doubles
    from BACKOFF_FIRST_S up to BACKOFF_MAX_S; the delay is random in its upper half."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** min(attempt - 1, 16))
    return float(ceiling * (0.5 + rand() / 2))


# -- the command ------------------------------------------------------------------


def _event_glob(text: str) -> str:
    if not is_valid_event_glob(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an event type pattern (dotted lower-case words, * for one or "
            f"more words: job.*, evidence.uploaded; at most {MAX_EVENT_TYPE_CHARS} characters)"
        )
    return text


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser(
        "tail",
        help="print one organization's events as JSON lines",
        description="Connect to pgrelay serve, subscribe to one organization and print each "
        "event as a JSON line. With --cursor-file, a restart resumes exactly. Without "
        "--token, a token is minted with the daemon's HS256 secret.",
    )
    p.add_argument("--org", required=True, type=org_id, metavar="UUID", help="organization id")
    p.add_argument(
        "--url",
        help=f"WebSocket URL (default: ws://${config.env_name('listen')}/v1, the daemon's "
        f"own address, else {DEFAULT_URL})",
    )
    p.add_argument(
        "--cursor-file", type=Path, metavar="FILE", help="resume from, and save cursors to, FILE"
    )
    p.add_argument(
        "--event-types",
        nargs="+",
        action="extend",
        type=_event_glob,
        metavar="GLOB",
        help="only these event types, e.g. job.* evidence.uploaded",
    )
    p.add_argument("--token", type=non_empty, metavar="JWT", help="token to present")
    p.add_argument(
        "--sub", type=non_empty, default="pgrelay-tail", help="sub claim of a minted token"
    )
    token_tool.add_jwt_arguments(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    return run_command("tail", lambda: run(args, environ()))


#: A daemon listening on every address is reached on this machine's loopback.
_WILDCARD_TO_LOOPBACK: Final[Mapping[str, str]] = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def default_url(env: Mapping[str, str]) -> str:
    """ws://PGRELAY_LISTEN/v1, the address `pgrelay serve` listens on with the
    same settings (a wildcard address means this machine's loopback), else
    DEFAULT_URL. ConfigError when PGRELAY_LISTEN is malformed."""
    listen = setting(None, "listen", env)
    if listen is None:
        return DEFAULT_URL
    try:
        where = config.parse_host_port(listen)
    except ValueError as exc:
        raise ConfigError(f"{config.env_name('listen')}: {exc}") from None
    host = _WILDCARD_TO_LOOPBACK.get(where.host, where.host)
    if ":" in host:
        host = f"[{host}]"
    return f"ws://{host}:{where.port}/v1"


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    url = args.url if args.url is not None else default_url(env)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(f"--url {url!r} is not a ws:// or wss:// URL")
    cursor = None
    if args.cursor_file is not None:
        check_cursor_path(args.cursor_file)
        cursor = read_cursor(args.cursor_file, args.org)

    mint: Callable[[], str] | None = None
    if args.token is None:

        def mint() -> str:
            return token_tool.mint(
                env,
                orgs=[args.org],
                sub=args.sub,
                lifetime=MINTED_TOKEN_LIFETIME_S,
                secret=args.jwt_secret,
                audience=args.audience,
                issuer=args.issuer,
            )

        mint()  # a missing or short secret is a usage error: say so before connecting

    session = TailSession(
        args.org, cursor=cursor, event_types=args.event_types, can_mint=mint is not None
    )
    return trio.run(tail, url, session, args.token, mint, args.cursor_file)


async def tail(
    url: str,
    session: TailSession,
    token: str | None,
    mint: Callable[[], str] | None,
    cursor_file: Path | None,
    *,
    delay_scale: float = 1.0,
) -> int:
    """Run until the server refuses for good; returns the exit code.

    `delay_scale` multiplies every reconnect delay (a test seam)."""
    attempt = 0
    while True:
        if mint is not None:
            token = mint()
        assert token is not None
        decision: CloseDecision | None = None
        try:
            async with open_websocket_url(
                url, connect_timeout=CONNECT_TIMEOUT_S, max_message_size=MAX_SERVER_FRAME_BYTES
            ) as ws:
                session.connected()
                await ws.send_message(session.auth_frame(token))
                refresh_at = (
                    trio.current_time() + MINTED_TOKEN_LIFETIME_S * REFRESH_AT_SHARE
                    if mint is not None
                    else math.inf
                )
                while True:
                    with trio.move_on_at(refresh_at) as refresh:
                        text = await ws.get_message()
                    if refresh.cancelled_caught and mint is not None:
                        await ws.send_message(session.auth_frame(mint()))
                        refresh_at = (
                            trio.current_time() + MINTED_TOKEN_LIFETIME_S * REFRESH_AT_SHARE
                        )
                        continue
                    step = session.receive(
                        text if isinstance(text, str) else text.decode(errors="replace")
                    )
                    code = await _apply(step, ws.send_message, session.org, cursor_file)
                    if step.live:
                        attempt = 0
                    if code is not None:
                        return code
                    if step.retry:
                        break
        except ConnectionClosed as exc:
            reason = exc.reason
            decision = session.closed(
                reason.code if reason is not None else None,
                reason.reason if reason is not None else None,
            )
        except ConnectionRejected as exc:
            if 400 <= exc.status_code < 500 and exc.status_code != 429:
                _notice(
                    f"the server refused the WebSocket upgrade: HTTP {exc.status_code} "
                    f"(is {url} the pgrelay endpoint, and is this origin allowed?)"
                )
                return EXIT_FAILURE
            decision = CloseDecision(f"the server refused the upgrade: HTTP {exc.status_code}")
        except (HandshakeError, OSError) as exc:
            cause = exc.__cause__ or exc
            why = str(cause) or type(cause).__name__
            decision = CloseDecision(f"cannot connect to {url}: {why}")
        if decision is not None and decision.exit_code is not None:
            _notice(decision.notice)
            return decision.exit_code
        if decision is not None and decision.new_token:
            _notice(decision.notice)
            continue
        attempt += 1
        if decision is not None and decision.restart:
            delay = random.uniform(RESTART_DELAY_MIN_S, RESTART_DELAY_MAX_S)
        else:
            delay = backoff_delay(attempt)
        delay *= delay_scale
        why = decision.notice + "; " if decision is not None else ""
        _notice(f"{why}reconnecting in {delay:.1f} s")
        await trio.sleep(delay)


async def _apply(
    step: Step,
    send: Callable[[str], Awaitable[None]],
    org: str,
    cursor_file: Path | None,
) -> int | None:
    if step.stdout is not None:
        try:
            sys.stdout.write(step.stdout + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, as other tools do.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
    if step.notice is not None:
        _notice(step.notice)
    if step.cursor is not None and cursor_file is not None:
        try:
            await trio.to_thread.run_sync(write_cursor, cursor_file, org, step.cursor)
        except OSError as exc:
            raise ToolFailure(f"cannot save the cursor to {cursor_file}: {exc}") from None
    if step.send is not None:
        await send(step.send)
    return step.exit_code


def _notice(text: str) -> None:
    print(f"pgrelay tail: {text}", file=sys.stderr, flush=True)
