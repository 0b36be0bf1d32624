"""`python -m tests.soak --seconds 300 [--clients N] [--seed S] [--json out.json]`"""

from __future__ import annotations

import argparse
import json
import sys

from tests.soak.runner import Options, run_soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak",
        description="The pgrelay soak: two relays, hundreds of clients, a writer and "
        "faults; judged against relay.events. Prints one line; exit 1 on failure.",
    )
    parser.add_argument("--seconds", type=float, default=300.0, help="how long the writers run")
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--orgs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    parser.add_argument("--rate", type=float, default=50.0, help="single-row commits per second")
    parser.add_argument(
        "--no-faults", action="store_true", help="no faults at all: a check of the harness"
    )
    parser.add_argument(
        "--relay-env",
        action="append",
        default=[],
        metavar="PGRELAY_X=V",
        help="a setting for both relays (repeatable), e.g. PGRELAY_MAX_OUTBOX_BYTES=524288",
    )
    parser.add_argument("--json", metavar="FILE", help="write the verdict as JSON to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the run directory on success")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    relay_env = {}
    for item in args.relay_env:
        key, eq, value = item.partition("=")
        if not eq or not key.startswith("PGRELAY_"):
            parser.error(f"--relay-env {item!r}: expected PGRELAY_NAME=VALUE")
        relay_env[key] = value
    options = Options(
        seconds=args.seconds,
        clients=args.clients,
        orgs=args.orgs,
        seed=args.seed,
        single_rate=args.rate,
        faults=not args.no_faults,
        relay_env=relay_env,
        keep=args.keep,
        progress=not args.quiet,
    )
    verdict, rundir = run_soak(options)
    print(verdict.line(), flush=True)
    if not verdict.passed:
        for detail in verdict.details + verdict.harness_errors[:10]:
            print(detail)
        print(f"logs and client records: {rundir}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(verdict.as_json() | {"rundir": str(rundir)}, f, indent=1)
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
