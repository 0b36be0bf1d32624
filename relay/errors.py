"""pgrelay's own exceptions, for failures an operator must act on.

    RelayError
    ├── ConfigError         a setting is missing or malformed (names the key)
    ├── MigrationError      `pgrelay migrate` refused or failed (says why)
    ├── PortUnavailable     `pgrelay serve` cannot listen where it was told (exit 2)
    ├── DatabaseUnavailable the database cannot be reached right now
    └── ReadFailed          a read for a client (catch-up, recheck) failed; the
                            database error is its message and its __cause__

A peer's junk (a bad frame, a bad token) is never an exception: the pure core
turns it into a value (an error frame or a close code).
"""

from __future__ import annotations

from typing import TypeVar

_E = TypeVar("_E", bound=BaseException)


class RelayError(Exception):
    """Base class of pgrelay's own errors."""


class ConfigError(RelayError):
    """A setting is missing or malformed; the message names the setting."""


class MigrationError(RelayError):
    """A migration was refused or failed; the message says what to do."""


class PortUnavailable(RelayError):
    """A listen address is taken or not allowed; restarting cannot help (exit 2)."""


class DatabaseUnavailable(RelayError):
    """The database cannot be reached or refused the connection."""


class ReadFailed(RelayError):
    """A read for a client could not be answered (the database failed or went away).

    `transient`: the connection failed (a restart, a failover, no pooled
    connection in time), so the same read may well succeed in a moment. Not
    transient: the database answered with an error (a missing grant, an
    exception in relay.user_organizations(), a statement timeout)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def leaf(exc: BaseException, kinds: type[_E] | tuple[type[_E], ...]) -> _E | None:
    """`exc` itself or the first exception of `kinds` inside it (trio nurseries wrap
    what their tasks raise in exception groups)."""
    if isinstance(exc, kinds):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = leaf(inner, kinds)
            if found is not None:
                return found
    return None
