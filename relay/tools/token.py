"""`pgrelay token`: mint an HS256 JWT that the daemon accepts, for tests,
scripts and `pgrelay tail`. Prints only the token."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from relay import config
from relay.errors import ConfigError
from relay.server import jwt as auth
from relay.tools.common import (
    EXIT_OK,
    environ,
    lifetime_s,
    non_empty,
    org_id,
    run_command,
    setting,
)


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    p = subparsers.add_parser(
        "token",
        help="mint an HS256 token for one or more organizations",
        description="Mint an HS256 JWT signed with the daemon's secret and print it. "
        "One --org gives claim org_id, several give org_ids.",
    )
    p.add_argument(
        "--org",
        dest="orgs",
        action="append",
        type=org_id,
        metavar="UUID",
        help="organization the token may read (repeat for several)",
    )
    p.add_argument("--sub", type=non_empty, metavar="S", help="subject claim (user id)")
    p.add_argument(
        "--lifetime",
        type=lifetime_s,
        default=auth.DEFAULT_TOKEN_LIFETIME_S,
        metavar="DURATION",
        help="seconds, or 90s, 15m, 1h, 7d; at most 30 days (default: 1h)",
    )
    add_jwt_arguments(p)
    p.set_defaults(func=_main)


def add_jwt_arguments(p: argparse.ArgumentParser) -> None:
    """--jwt-secret, --audience, --issuer: the daemon's JWT settings."""
    p.add_argument(
        "--jwt-secret",
        metavar="SECRET",
        help=f"HS256 secret (default: ${config.env_name('jwt_secret')}; prefer the "
        "variable: a flag is visible to other users in ps)",
    )
    p.add_argument(
        "--audience",
        type=non_empty,
        metavar="A",
        help=f"aud claim (default: ${config.env_name('jwt_audience')})",
    )
    p.add_argument(
        "--issuer",
        type=non_empty,
        metavar="I",
        help=f"iss claim (default: ${config.env_name('jwt_issuer')})",
    )


def _main(args: argparse.Namespace) -> int:
    return run_command("token", lambda: run(args, environ()))


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    if not args.orgs and args.sub is None:
        raise ConfigError(
            "give --org (claims org_id/org_ids) or --sub (for a relay.user_organizations() "
            "that looks up the subject)"
        )
    print(
        mint(
            env,
            orgs=args.orgs,
            sub=args.sub,
            lifetime=args.lifetime,
            secret=args.jwt_secret,
            audience=args.audience,
            issuer=args.issuer,
        )
    )
    return EXIT_OK


def mint(
    env: Mapping[str, str],
    *,
    orgs: Sequence[str] | None,
    sub: str | None,
    lifetime: int,
    secret: str | None,
    audience: str | None,
    issuer: str | None,
) -> str:
    """A token from the flags, else the PGRELAY_JWT_* variables; ConfigError
    when no usable secret is configured."""
    key = setting(secret, "jwt_secret", env)
    if key is None:
        raise ConfigError(
            f"no HS256 secret: set {config.env_name('jwt_secret')} (or --jwt-secret) "
            "to the daemon's secret"
        )
    try:
        return auth.mint_token(
            key,
            orgs=orgs or None,
            sub=sub,
            lifetime_s=lifetime,
            audience=setting(audience, "jwt_audience", env),
            issuer=setting(issuer, "jwt_issuer", env),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
