"""pgrelay's own exceptions, for failures an operator must act on.

    RelayError
    ├── ConfigError         a setting is missing or malformed (names the key)
    ├── MigrationError      `pgrelay migrate` refused or failed (says why)
    ├── DatabaseUnavailable the database cannot be reached right now
    └── ReadFailed          a read for a client (catch-up, recheck) failed; the
                            database error is its message and its __cause__

A peer's junk (a bad frame, a bad token) is never an exception: the pure core
turns it into a value (an error frame or a close code).
"""


class RelayError(Exception):
    """Base class of pgrelay's own errors."""


class ConfigError(RelayError):
    """A setting is missing or malformed; the message names the setting."""


class MigrationError(RelayError):
    """A migration was refused or failed; the message says what to do."""


class DatabaseUnavailable(RelayError):
    """The database cannot be reached or refused the connection."""


class ReadFailed(RelayError):
    """A read for a client could not be answered (the database failed or went away)."""
