"""Settings of `pgrelay serve`, read once at start and validated.

Each setting has one name in each place it can be given: a `--flag`, a
`PGRELAY_*` environment variable, and a key of the optional TOML file
(`--config`). Precedence: flag > environment > file > default. A malformed
value stops the start with an error naming the setting. Nothing else in the
package reads ``os.environ``.
"""

from __future__ import annotations

import argparse
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from relay.core.outbox import MAX_FRAME_BYTES, OutboxLimits, OutputLimits
from relay.core.session import SessionLimits
from relay.core.subscription import CatchUpLimits
from relay.errors import ConfigError
from relay.server.admission import AdmissionLimits
from relay.ws import OriginPolicy, TrustedProxies, WsLimits


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_host_port(text: str) -> HostPort:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8765")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range")
    return HostPort(host, number)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, as taskset and cgroups set it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return usable_cores()
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a number nor auto") from None
    if value < 1:
        raise ValueError("must be at least 1, or auto")
    return value


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"must be from {low} to {high}")
        return value

    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError("must be a finite number > 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a finite number >= 0")
    return value


def _origins(text: str) -> tuple[str, ...]:
    items = tuple(o.strip() for o in text.split(",") if o.strip())
    OriginPolicy(items)  # raises ValueError naming the first entry that is not an origin
    return items


def _cidrs(text: str) -> tuple[str, ...]:
    items = tuple(c.strip() for c in text.split(",") if c.strip())
    TrustedProxies(items)  # raises ValueError naming the first entry that is not a CIDR
    return items


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text

    return parse


def _role_name(text: str) -> str:
    if not text or len(text) > 63:
        raise ValueError("must be a role name of 1 to 63 characters")
    return text


def _text(text: str) -> str:
    return text


MIN_MESSAGE_BYTES = 256
"""Smallest accepted PGRELAY_MAX_MESSAGE_BYTES: an auth frame with a token must fit."""
MAX_MESSAGE_BYTES = 1 << 20
"""Largest accepted PGRELAY_MAX_MESSAGE_BYTES."""

#: Settings renamed, old name -> new name. The old name still works (flag,
#: environment, file) with a deprecation warning.
RENAMED: dict[str, str] = {"max_pending_bytes": "max_outbox_bytes"}


@dataclass(frozen=True)
class Settings:
    """Everything `pgrelay serve` can be told. Field name = TOML key;
    PGRELAY_<FIELD NAME IN UPPER CASE> = environment variable; --field-name = flag."""

    database_url: str = ""
    listen: HostPort = HostPort("127.0.0.1", 8765)
    admin_listen: HostPort = HostPort("127.0.0.1", 8766)
    workers: int = 1
    jwt_secret: str | None = None
    jwt_public_key_file: str | None = None
    jwt_jwks_file: str | None = None
    jwt_algorithms: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: float = 30.0
    subscriber_role: str = "relay_subscriber"
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    poll_interval_ms: int = 1000
    listener_probe_s: float = 5.0
    recheck_interval_s: float = 60.0
    auth_timeout_s: float = 10.0
    replay_limit: int = 10_000
    recent_events: int = 20_000
    pool_size: int = 4
    max_connections: int = 10_000
    max_connections_per_ip: int = 1_000
    max_connections_per_user: int = 20
    max_subscriptions: int = 100
    max_message_bytes: int = 4096
    max_outbox_bytes: int = 524_288
    slow_client_timeout_s: float = 30.0
    shutdown_timeout_s: float = 10.0
    log_level: str = "info"
    log_format: str = "auto"

    # -- each component's limits, built from the settings ----------------------------
    def session_limits(self) -> SessionLimits:
        return SessionLimits(
            auth_timeout_s=self.auth_timeout_s,
            token_leeway_s=self.jwt_leeway_s,
            recheck_interval_s=self.recheck_interval_s or math.inf,
            max_subscriptions=self.max_subscriptions,
            catch_up=CatchUpLimits(replay_limit=self.replay_limit),
        )

    def ws_limits(self) -> WsLimits:
        return WsLimits(max_message_bytes=self.max_message_bytes)

    def output_limits(self) -> OutputLimits:
        ws = self.ws_limits()
        return OutputLimits(
            transport_bytes=ws.max_unsent_bytes,
            max_stall_s=self.slow_client_timeout_s or math.inf,
            outbox=OutboxLimits(max_bytes=self.max_outbox_bytes),
        )

    def admission_limits(self) -> AdmissionLimits:
        return AdmissionLimits(
            max_connections=self.max_connections,
            max_connections_per_ip=self.max_connections_per_ip,
            max_connections_per_user=self.max_connections_per_user,
        )


#: How each field is parsed from text (flag, environment) and what it means.
_PARSERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "database_url": (_text, "libpq URL or DSN of the database (else libpq's PG* variables)"),
    "listen": (parse_host_port, "WebSocket HOST:PORT"),
    "admin_listen": (parse_host_port, "admin HTTP HOST:PORT (/healthz, /readyz, /metrics)"),
    "workers": (
        _workers,
        "processes serving the WebSocket port (SO_REUSEPORT), each with its own pool, LISTEN "
        "and tail; auto: one per usable core",
    ),
    "jwt_secret": (_text, "HS256 secret (at least 32 bytes)"),
    "jwt_public_key_file": (_text, "PEM file with the RS*/ES* public key"),
    "jwt_jwks_file": (_text, "JWKS file with RS*/ES* public keys, selected by kid"),
    "jwt_algorithms": (_text, "comma-separated allowed algorithms (default: from the keys)"),
    "jwt_audience": (_text, "required `aud` claim"),
    "jwt_issuer": (_text, "required `iss` claim"),
    "jwt_leeway_s": (_non_negative_float, "clock-skew allowance for exp/nbf, seconds"),
    "subscriber_role": (_role_name, "role for per-client reads (Supabase: authenticated)"),
    "allowed_origins": (
        _origins,
        "comma-separated allowed origins; https://*.example.com allows its subdomains (empty: any)",
    ),
    "trusted_proxies": (
        _cidrs,
        "comma-separated CIDRs of reverse proxies whose PROXY header or X-Forwarded-For "
        "names the client (empty: none)",
    ),
    "poll_interval_ms": (_positive_int, "tail timer: fallback with the doorbell, poll without"),
    "listener_probe_s": (
        _positive_float,
        "probe the LISTEN connection this often; no echo within as long again reconnects it",
    ),
    "recheck_interval_s": (_non_negative_float, "re-authorize subscriptions this often"),
    "auth_timeout_s": (_non_negative_float, "close with 4002 when no valid auth arrives by then"),
    "replay_limit": (_positive_int, "max events a resume replays before resync"),
    "recent_events": (
        _int_between(0, 10_000_000),
        "newest events kept in memory to answer resumes without a catch-up query (0: none)",
    ),
    "pool_size": (
        _positive_int,
        "pooled connections for catch-ups and rechecks "
        "(plus one each for the listener, the tail and batched authorization)",
    ),
    "max_connections": (_positive_int, "WebSocket connections in total"),
    "max_connections_per_ip": (_positive_int, "WebSocket connections per client IP"),
    "max_connections_per_user": (_positive_int, "WebSocket connections per token subject"),
    "max_subscriptions": (_positive_int, "subscriptions per connection"),
    "max_message_bytes": (
        _int_between(MIN_MESSAGE_BYTES, MAX_MESSAGE_BYTES),
        "largest client message in bytes; bigger closes with 1009",
    ),
    "max_outbox_bytes": (
        _int_between(MAX_FRAME_BYTES, 1 << 30),
        "bytes queued for a slow client before its events collapse into resync",
    ),
    "slow_client_timeout_s": (
        _non_negative_float,
        "a client whose queue made no progress this long is closed with 4008",
    ),
    "shutdown_timeout_s": (_non_negative_float, "drain time on SIGTERM"),
    "log_level": (_choice("debug", "info", "warning", "error"), "log level"),
    "log_format": (_choice("auto", "json", "console"), "auto: JSON unless on a TTY"),
}


def env_name(field: str) -> str:
    return "PGRELAY_" + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per setting; defaults stay None so that precedence can be applied."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings")
    for f in fields(Settings):
        _, help_text = _PARSERS[f.name]
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            default=None,
            metavar="VALUE",
            help=f"{help_text} [{env_name(f.name)}]",
        )
    for old in RENAMED:
        parser.add_argument(flag_name(old), dest=old, default=None, help=argparse.SUPPRESS)


def _given(
    name: str,
    flags: Mapping[str, str | None],
    environ: Mapping[str, str],
    file_values: Mapping[str, Any],
    config_file: str | None,
) -> list[tuple[int, str, Any]]:
    """Where `name` is given: (precedence rank, source, raw value); 0 = flag."""
    found: list[tuple[int, str, Any]] = []
    flag = flags.get(name)
    if flag is not None:
        found.append((0, flag_name(name), flag))
    env = environ.get(env_name(name))
    if env:
        found.append((1, env_name(name), env))
    if name in file_values:
        found.append((2, f"{name} (in {config_file})", file_values[name]))
    return found


def load(
    flags: Mapping[str, str | None],
    environ: Mapping[str, str],
    config_file: str | None = None,
    *,
    warn: Callable[[str], object] | None = None,
) -> Settings:
    """Settings from flags > environment > TOML file > defaults, validated.
    A setting given under its old name (`RENAMED`) still counts, below the new
    name at the same level; `warn` hears about it."""
    file_values: dict[str, Any] = {}
    if config_file:
        try:
            file_values = tomllib.loads(Path(config_file).read_text("utf-8"))
        except OSError as exc:
            raise ConfigError(f"--config {config_file}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config {config_file}: {exc}") from exc
        unknown = set(file_values) - set(_PARSERS) - set(RENAMED)
        if unknown:
            raise ConfigError(f"--config {config_file}: unknown keys {sorted(unknown)}")
    values: dict[str, Any] = {}
    old_names = {new: old for old, new in RENAMED.items()}
    for f in fields(Settings):
        parse, _ = _PARSERS[f.name]
        found = _given(f.name, flags, environ, file_values, config_file)
        old = old_names.get(f.name)
        if old is not None:
            for rank, source, raw in _given(old, flags, environ, file_values, config_file):
                found.append((rank, source, raw))
                if warn is not None:
                    instead = (flag_name(f.name), env_name(f.name), f.name)[rank]
                    warn(f"{source} is deprecated: use {instead}")
        if not found:
            continue
        _, source, raw = min(found, key=lambda item: item[0])
        if isinstance(raw, list) and f.name in ("allowed_origins", "trusted_proxies"):
            raw = ",".join(str(x) for x in raw)
        raw = str(raw) if not isinstance(raw, str) else raw
        try:
            values[f.name] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    settings = Settings(**values)
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    if not (s.jwt_secret or s.jwt_public_key_file or s.jwt_jwks_file):
        raise ConfigError(
            f"no way to verify tokens: set {env_name('jwt_secret')} (HS256), "
            f"{env_name('jwt_public_key_file')} or {env_name('jwt_jwks_file')}"
        )
    if s.listen == s.admin_listen and s.listen.port != 0:
        raise ConfigError(
            f"{env_name('listen')} and {env_name('admin_listen')} are both {s.listen}"
        )
