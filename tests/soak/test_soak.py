"""The short soak inside `make test`: the same run as `make soak`, for about a minute.

It needs a PostgreSQL cluster of its own (it restarts the server and kills
backends), so it runs only where the local server binaries are installed.
PGRELAY_SOAK_SEED replays a given schedule; otherwise the seed is random and
printed with the summary line.
"""

from __future__ import annotations

import os

import pytest

from relay.dev.embedded import find_bindir
from tests.soak.runner import Options, run_soak

SHORT_SECONDS = 60.0
SHORT_CLIENTS = 200


@pytest.mark.fault
@pytest.mark.soak
@pytest.mark.timeout(360)
@pytest.mark.skipif(
    find_bindir() is None,
    reason="the soak needs local PostgreSQL server binaries for a cluster of its own",
)
def test_short_soak_loses_nothing_and_leaks_nothing_across_orgs() -> None:
    seed = os.environ.get("PGRELAY_SOAK_SEED")
    verdict, rundir = run_soak(
        Options(
            seconds=SHORT_SECONDS,
            clients=SHORT_CLIENTS,
            seed=int(seed) if seed else None,
            progress=False,
        )
    )
    print(verdict.line())
    report = "\n".join(
        [verdict.line(), *verdict.details, *verdict.harness_errors[:10], f"run directory: {rundir}"]
    )
    assert not verdict.harness_errors, report
    assert verdict.lost == 0, report
    assert verdict.cross_org == 0, report
    assert verdict.rolled_back_delivered == 0, report
