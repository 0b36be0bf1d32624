"""What the tool commands share: argument types, settings, and how a command
turns its failures into an exit code and one line on stderr."""

from __future__ import annotations

import argparse
import os
import re
import sys
import uuid
from collections.abc import Callable, Mapping
from typing import Final

from relay import config
from relay.errors import ConfigError, RelayError

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

#: The longest token `pgrelay token` mints: 30 days.
MAX_TOKEN_LIFETIME_S: Final = 30 * 24 * 3600

_DURATION = re.compile(r"^\s*(?P<number>\d+)\s*(?P<unit>[smhd]?)\s*$")
_UNIT_S: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ToolFailure(RelayError):
    """The command ran but could not do its job; exit 1 with this message."""


def org_id(text: str) -> str:
    """argparse type: an organization id, returned in canonical form."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a uuid (expected e.g. 6f1c6f1c-0000-4000-8000-000000000001)"
        ) from None


def lifetime_s(text: str) -> int:
    """argparse type: a token lifetime like 3600, 90s, 15m, 1h or 7d, in seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (expected seconds or a number with s, m, h or d: 1h)"
        )
    seconds = int(match["number"]) * _UNIT_S[match["unit"]]
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be longer than 0 seconds")
    if seconds > MAX_TOKEN_LIFETIME_S:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than the 30-day maximum")
    return seconds


def non_empty(text: str) -> str:
    """argparse type: any string but the empty one."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def setting(flag: str | None, name: str, environ: Mapping[str, str]) -> str | None:
    """A setting of relay.config by its field name: the flag, else the
    PGRELAY_* variable (empty counts as unset), else None."""
    if flag is not None:
        return flag
    value = environ.get(config.env_name(name))
    return value if value else None


#: libpq variables that say which server, database or role to use. Any one of
#: them counts as the user choosing a database. Variables that only add to a
#: connection chosen elsewhere (PGPASSWORD, PGPASSFILE, PGSERVICEFILE, PGSSL*,
#: PGCONNECT_TIMEOUT, PGAPPNAME, PGOPTIONS...) do not: alone, libpq would fill
#: in its defaults (the local socket, the OS user's name).
LIBPQ_TARGET_VARIABLES: Final = (
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGSERVICE",
)

NO_DATABASE_MESSAGE: Final = (
    f"no database given: pass --database-url, set {config.env_name('database_url')}, "
    f"or set libpq's variables ({', '.join(LIBPQ_TARGET_VARIABLES)})"
)


def database_url(flag: str | None, environ: Mapping[str, str]) -> str:
    """The connection string a tool uses: --database-url, else
    PGRELAY_DATABASE_URL, else "" when a libpq target variable is set (libpq
    reads them). ConfigError when none is given: never libpq's defaults, which
    reach whatever server runs on this machine as the OS user."""
    url = setting(flag or None, "database_url", environ)
    if url is not None:
        return url
    if any(environ.get(name) for name in LIBPQ_TARGET_VARIABLES):
        return ""
    raise ConfigError(NO_DATABASE_MESSAGE)


def add_database_url(parser: argparse.ArgumentParser, role_hint: str) -> None:
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help=f"libpq URL or DSN, {role_hint} "
        f"(default: ${config.env_name('database_url')}, else libpq's PG* variables; "
        "one of the three is required)",
    )


_PLAIN_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
_RESERVED_ROLE_WORDS: Final = frozenset(
    {"all", "current_role", "current_user", "group", "public", "role", "session_user", "user"}
)


def sql_ident(name: str) -> str:
    """A role name quoted only where SQL needs it, for fix-it text."""
    if _PLAIN_IDENT.match(name) and name not in _RESERVED_ROLE_WORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


def run_command(name: str, body: Callable[[], int]) -> int:
    """Run one command: ConfigError -> exit 2, other RelayError -> exit 1,
    each as one line on stderr; Ctrl-C -> exit 130, quietly."""
    try:
        return body()
    except ConfigError as exc:
        print(f"pgrelay {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RelayError as exc:
        print(f"pgrelay {name}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def environ() -> Mapping[str, str]:
    """The process environment; read here, by the command entry points only."""
    return os.environ
