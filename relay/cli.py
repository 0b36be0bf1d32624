"""The `pgrelay` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from relay.errors import ConfigError, PortUnavailable, RelayError, leaf


def _database_url(arg: str | None) -> str:
    """--database-url, else PGRELAY_DATABASE_URL, else "" when libpq's PG*
    variables name a database; ConfigError (exit 2) when nothing does."""
    from relay.tools.common import database_url

    return database_url(arg, os.environ)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from relay.db.migrate import migrate

    result = migrate(_database_url(args.database_url), dry_run=args.dry_run, log=print)
    if not result.applied:
        print(f"up to date ({result.already_applied} migrations applied)")
    elif args.dry_run:
        print(f"{len(result.applied)} pending migration(s); nothing applied (--dry-run)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import structlog
    import trio

    from relay import config, logs
    from relay.server import sdnotify, workers
    from relay.server.app import Daemon, tune_gc

    # Logging first, with defaults: a bad setting is reported like any other line.
    logs.configure()
    log = structlog.get_logger("pgrelay")
    worker = os.environ.get(workers.WORKER_ENV)
    if worker:  # started by `--workers N`'s supervisor, which checked the settings
        return _exit_2_when_it_cannot_start(log, lambda: workers.worker_main(worker))
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    deprecated: list[str] = []
    try:
        settings = config.load(flags, os.environ, args.config, warn=deprecated.append)
    except ConfigError as exc:
        log.error("cannot start: bad setting", error=str(exc), exit_status=2)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    for message in deprecated:
        log.warning("deprecated setting", detail=message)
    if settings.workers > 1:
        return _exit_2_when_it_cannot_start(log, lambda: workers.supervise(settings))

    def one_daemon() -> int:
        daemon = Daemon(settings, notify=sdnotify.notify)
        tune_gc()
        trio.run(daemon.run)
        return 0

    return _exit_2_when_it_cannot_start(log, one_daemon)


def _exit_2_when_it_cannot_start(log: Any, serve: Callable[[], int]) -> int:
    """`serve()`, or exit status 2 and one log line when a setting or a port
    stops the start (restarting cannot help)."""
    try:
        return serve()
    except BaseException as exc:
        failure = leaf(exc, (ConfigError, PortUnavailable))
        if failure is None:
            raise
        log.error("cannot start", error=str(failure), exit_status=2)
        return 2


def _cmd_dev(args: argparse.Namespace) -> int:
    from relay.dev import demo as dev

    return dev.run(args.database_url, os.environ)


def _version() -> str:
    """The installed package's version, else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("pgrelay")
    except metadata.PackageNotFoundError:
        from relay import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgrelay",
        description="Relay org-scoped signals from a Postgres events table to WebSocket clients.",
    )
    parser.add_argument(
        "--version", action="version", version=f"pgrelay {_version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="apply the SQL schema (idempotent)")
    p.add_argument(
        "--database-url",
        help="libpq URL or DSN (default: $PGRELAY_DATABASE_URL, else libpq's PG* variables)",
    )
    p.add_argument("--dry-run", action="store_true", help="list pending migrations, apply none")
    p.set_defaults(func=_cmd_migrate)

    p = sub.add_parser("serve", help="run the relay daemon")
    from relay import config

    config.add_arguments(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "dev",
        help="a throwaway relay with a demo page: database, roles, token, daemon",
        description="Start a throwaway PostgreSQL (local server binaries, else Docker), "
        "migrate it, create login roles, and run the relay with a demo page on the admin "
        "port. PGRELAY_LISTEN and PGRELAY_ADMIN_LISTEN choose the ports. Ctrl-C stops "
        "everything and removes the database.",
    )
    p.add_argument(
        "--database-url",
        metavar="URL",
        help="use this database instead (migrated; login roles pgrelay_dev_daemon and "
        "pgrelay_dev_backend created, their passwords reset; kept on exit). "
        "Never a production database.",
    )
    p.set_defaults(func=_cmd_dev)

    from relay import tools

    tools.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        print(f"pgrelay {args.command}: bad setting: {exc}", file=sys.stderr)
        return 2
    except RelayError as exc:
        print(f"pgrelay {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
