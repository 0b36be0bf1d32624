"""Logging, configured once by the entry point: JSON when stderr is not a TTY,
a readable console line when it is. The standard library's loggers (psycopg,
psycopg-pool, trio) go through the same renderer, so every line of a daemon's
log has one format. Never pass a token to a logger."""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure"]

#: Libraries whose own warnings repeat what pgrelay already says once per retry
#: (psycopg-pool logs every failed connection attempt of its workers).
QUIET_LIBRARIES = {"psycopg.pool": logging.ERROR}


def configure(
    level: str = "info", fmt: str = "auto", *, fields: dict[str, object] | None = None
) -> None:
    """(Re)configure structlog and the standard library's root logger. `fields`
    go into every line (a worker's number, `pgrelay serve --workers`).

    Each line leaves in one write(), so that lines of several processes sharing
    stderr (a supervisor and its workers) never interleave, even unbuffered
    (PYTHONUNBUFFERED, as the systemd unit sets it)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    extra = dict(fields or {})

    def add_fields(
        _logger: object, _method: str, event: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        for key, value in extra.items():
            event.setdefault(key, value)
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_fields,
            timestamper,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        # Configured twice (defaults first, then the settings): no caching.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                add_fields,
                timestamper,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric)
    for name, floor in QUIET_LIBRARIES.items():
        logging.getLogger(name).setLevel(max(floor, numeric))
