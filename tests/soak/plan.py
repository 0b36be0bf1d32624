"""The soak's schedule, all drawn from one seeded RNG: organizations, clients
(which orgs, which instance, which faults) and the relay-side faults.

Times are seconds after time zero (the moment the writers start). Every
client-side fault ends by `CLIENT_FAULTS_END` of the run and every relay-side
fault starts by `RELAY_FAULTS_END`, so that the end of the run is quiet and
the drain measures recovery, not a fault still in progress.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

#: Share of the run by which client faults (stops, away periods) are over.
CLIENT_FAULTS_END = 0.8
#: Share of the run in which relay faults are scheduled.
RELAY_FAULTS_START = 0.1
RELAY_FAULTS_END = 0.75
#: Runs shorter than this are the "short" version (away 20-40 s instead of 1-3 min).
SHORT_RUN_S = 240
#: Receive buffer of the clients that will stop reading: small, so that the
#: server's unsent bytes pile up within seconds instead of filling megabytes of
#: kernel buffers first.
STOPPER_RCVBUF = 4096
#: A token that is not meant to expire during the run.
LONG_TOKEN_S = 6 * 3600
#: Relative write weights of the first organizations (the rest weigh 1): the
#: clients that stop reading subscribe to the two hottest ones.
HOT_WEIGHTS = (5, 3)


@dataclass(frozen=True)
class ClientSpec:
    name: str
    orgs: tuple[str, ...]
    home: int
    """0 or 1: which instance it connects to first."""
    token_lifetime_s: int
    """Lifetime of its first token; a token minted after a 4001 is long-lived."""
    rcvbuf: int
    """SO_RCVBUF before connect (0: the kernel's default)."""
    stops: tuple[tuple[float, float], ...] = ()
    """(at, seconds): stop reading the current connection for that long."""
    aways: tuple[tuple[float, float], ...] = ()
    """(at, seconds): close, stay away that long, resume on the other instance."""


@dataclass(frozen=True)
class RelayFault:
    at: float
    kind: str
    """listener_kill | restart | kill9 | poll_on | poll_off"""
    instance: int = 0
    """kill9: which instance."""
    seconds: float = 0.0
    """kill9: how long the instance stays down."""


@dataclass
class Plan:
    seed: int
    seconds: float
    orgs: list[str]
    org_weights: list[int]
    clients: list[ClientSpec]
    faults: list[RelayFault] = field(default_factory=list)

    @property
    def short(self) -> bool:
        return self.seconds < SHORT_RUN_S

    def client_json(self, specs: list[ClientSpec]) -> list[dict[str, Any]]:
        return [asdict(s) for s in specs]

    def fault_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for f in self.faults:
            counts[f.kind] = counts.get(f.kind, 0) + 1
        return counts


def org_uuid(seed: int, i: int) -> str:
    return str(uuid.UUID(f"{seed % 16**8:08x}-0000-4000-8000-{i:012x}"))


def make_plan(
    seed: int, seconds: float, n_clients: int, n_orgs: int = 20, *, faults: bool = True
) -> Plan:
    """The schedule. Without `faults` (a check of the harness itself): the same
    clients and writers, and no fault of any kind."""
    if n_orgs < 3:
        raise ValueError("the soak needs at least 3 organizations")
    if n_clients < 20:
        raise ValueError("the soak needs at least 20 clients")
    rng = random.Random(seed)
    short = seconds < SHORT_RUN_S
    orgs = [org_uuid(seed, i) for i in range(n_orgs)]
    weights = [HOT_WEIGHTS[i] if i < len(HOT_WEIGHTS) else 1 for i in range(n_orgs)]

    away_range = (20.0, 40.0) if short else (60.0, 180.0)
    stop_range = (10.0, 20.0) if short else (15.0, 45.0)
    lifetime_range = (max(10.0, 0.2 * seconds), max(15.0, 0.5 * seconds))
    client_end = CLIENT_FAULTS_END * seconds

    n_stop = max(4, n_clients // 25)
    n_away = max(6, n_clients // 15)
    n_expire = max(4, n_clients // 40)
    roles = ["stop"] * n_stop + ["away"] * n_away + ["expire"] * n_expire
    roles += ["plain"] * (n_clients - len(roles))
    rng.shuffle(roles)
    if not faults:
        roles = ["plain"] * n_clients

    lo = 0.05 * seconds

    def window(duration: float) -> float:
        """A start such that [start, start + duration] ends by client_end."""
        return rng.uniform(lo, max(lo, client_end - duration))

    clients = []
    for i, role in enumerate(roles):
        primary = orgs[i % n_orgs]
        chosen = [primary]
        if rng.random() < 0.3:
            chosen.append(rng.choice([o for o in orgs if o != primary]))
        spec = ClientSpec(
            name=f"c{i:04d}",
            orgs=tuple(chosen),
            home=i % 2,
            token_lifetime_s=LONG_TOKEN_S,
            rcvbuf=0,
        )
        if role == "stop":
            dur = min(rng.uniform(*stop_range), client_end - lo)
            spec = ClientSpec(
                spec.name,
                (orgs[0], orgs[1]),
                spec.home,
                LONG_TOKEN_S,
                STOPPER_RCVBUF,
                stops=((round(window(dur), 2), round(dur, 2)),),
            )
        elif role == "away":
            dur = min(rng.uniform(*away_range), client_end - lo)
            spec = ClientSpec(
                spec.name,
                spec.orgs,
                spec.home,
                LONG_TOKEN_S,
                0,
                aways=((round(window(dur), 2), round(dur, 2)),),
            )
        elif role == "expire":
            lifetime = int(rng.uniform(*lifetime_range))
            spec = ClientSpec(spec.name, spec.orgs, spec.home, lifetime, 0)
        clients.append(spec)

    if not faults:
        return Plan(seed, seconds, orgs, weights, clients)
    relay_faults: list[RelayFault] = []
    lo, hi = RELAY_FAULTS_START * seconds, RELAY_FAULTS_END * seconds

    def at() -> float:
        return round(rng.uniform(lo, hi), 2)

    for _ in range(max(2, round(seconds / 75))):
        relay_faults.append(RelayFault(at(), "listener_kill"))
    for _ in range(max(1, round(seconds / 300))):
        relay_faults.append(RelayFault(at(), "restart"))
    for k in range(max(1, round(seconds / 300))):
        relay_faults.append(
            RelayFault(at(), "kill9", instance=(seed + k) % 2, seconds=round(rng.uniform(2, 5), 2))
        )
    # Poll mode (the doorbell trigger disabled): windows that never overlap.
    n_poll = max(1, round(seconds / 300))
    segment = (hi - lo) / n_poll
    poll_len = min(0.15 * seconds, 0.6 * segment)
    for k in range(n_poll):
        start = round(lo + k * segment + rng.uniform(0, segment - poll_len), 2)
        relay_faults.append(RelayFault(start, "poll_on"))
        relay_faults.append(RelayFault(round(start + poll_len, 2), "poll_off"))
    relay_faults.sort(key=lambda f: f.at)
    return Plan(seed, seconds, orgs, weights, clients, relay_faults)
