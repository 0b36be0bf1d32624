"""Operator and developer commands: `pgrelay token`, `emit`, `check`, `tail`.

`register(subparsers)` adds them to the `pgrelay` parser. Each command reports
its own failures and returns its exit code, so the caller needs no special
handling:

    0  done
    1  failed (the database refused, a check FAILed, the server said no)
    2  bad usage or configuration (argparse errors, a malformed setting)
"""

from __future__ import annotations

import argparse
from typing import Any

from relay.tools import check, emit, tail, token

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add `token`, `emit`, `check` and `tail` to the `pgrelay` subcommands."""
    token.add_parser(subparsers)
    emit.add_parser(subparsers)
    check.add_parser(subparsers)
    tail.add_parser(subparsers)
