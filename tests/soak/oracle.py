"""The verdict: what every client received, judged against relay.events.

See the package docstring (tests/soak/__init__.py) for the rules.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from relay.core.cursor import BadCursor, Snapshot, decode_cursor

#: Lost rows shown in detail on failure.
SHOWN_LOST = 5


@dataclass(frozen=True)
class Row:
    id: int
    org: str
    xid: int
    kind: str


@dataclass
class Verdict:
    seconds: float
    seed: int
    clients: int
    orgs: int
    events: int
    lost: int = 0
    lost_pairs: int = 0
    """(client, org) pairs with at least one lost row."""
    cross_org: int = 0
    rolled_back_delivered: int = 0
    repeats_same_conn: int = 0
    repeats_after_reconnect: int = 0
    resyncs: Counter[str] = field(default_factory=Counter)
    resyncs_while_reading: int = 0
    """Resyncs received on a connection where the client never stopped reading."""
    p50_ms: float | None = None
    p99_ms: float | None = None
    poll_p50_ms: float | None = None
    poll_p99_ms: float | None = None
    rss_mb_max: tuple[float, float] = (0.0, 0.0)
    fds_max: tuple[int, int] = (0, 0)
    undrained: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    lost_by_kind: Counter[str] = field(default_factory=Counter)
    lost_by_role: Counter[str] = field(default_factory=Counter)
    harness_errors: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            self.lost == 0
            and self.cross_org == 0
            and self.rolled_back_delivered == 0
            and not self.harness_errors
        )

    def line(self) -> str:
        def ms(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.1f}"

        resyncs = sum(self.resyncs.values())
        reasons = ",".join(f"{k}:{v}" for k, v in sorted(self.resyncs.items()))
        faults = ",".join(f"{k}:{v}" for k, v in self.faults.items())
        parts = [
            f"soak: {self.seconds:g}s seed={self.seed} clients={self.clients} orgs={self.orgs}",
            f"events={self.events} lost={self.lost} cross_org={self.cross_org}",
            f"rolled_back_delivered={self.rolled_back_delivered}",
            f"repeats_same_conn={self.repeats_same_conn}",
            f"repeats_after_reconnect={self.repeats_after_reconnect}",
            f"resyncs={resyncs}"
            + (f"({reasons};reading:{self.resyncs_while_reading})" if resyncs else ""),
            f"p50_ms={ms(self.p50_ms)} p99_ms={ms(self.p99_ms)}",
            f"poll_p50_ms={ms(self.poll_p50_ms)} poll_p99_ms={ms(self.poll_p99_ms)}",
            f"rss_mb_max={self.rss_mb_max[0]:.0f}/{self.rss_mb_max[1]:.0f}",
            f"fds_max={self.fds_max[0]}/{self.fds_max[1]}",
            f"undrained={self.undrained}",
            f"faults={faults}",
        ]
        if self.harness_errors:
            parts.append(f"harness_errors={len(self.harness_errors)}")
        parts.append("PASS" if self.passed else "FAIL")
        return " ".join(parts)

    def as_json(self) -> dict[str, Any]:
        return {
            "line": self.line(),
            "passed": self.passed,
            "seconds": self.seconds,
            "seed": self.seed,
            "clients": self.clients,
            "orgs": self.orgs,
            "events": self.events,
            "lost": self.lost,
            "lost_pairs": self.lost_pairs,
            "lost_by_kind": dict(self.lost_by_kind),
            "lost_by_role": dict(self.lost_by_role),
            "cross_org": self.cross_org,
            "rolled_back_delivered": self.rolled_back_delivered,
            "repeats_same_conn": self.repeats_same_conn,
            "repeats_after_reconnect": self.repeats_after_reconnect,
            "resyncs": dict(self.resyncs),
            "resyncs_while_reading": self.resyncs_while_reading,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "poll_p50_ms": self.poll_p50_ms,
            "poll_p99_ms": self.poll_p99_ms,
            "rss_mb_max": list(self.rss_mb_max),
            "fds_max": list(self.fds_max),
            "undrained": self.undrained,
            "faults": self.faults,
            "harness_errors": self.harness_errors,
            "details": self.details,
        }


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _snapshot(cursor: Any, what: str, errors: list[str]) -> Snapshot | None:
    if cursor is None:
        return None
    decoded = decode_cursor(cursor)
    if isinstance(decoded, BadCursor):
        errors.append(f"{what}: undecodable cursor ({decoded.message})")
        return None
    return decoded.snapshot


def judge(
    verdict: Verdict,
    rows: list[Row],
    results: list[dict[str, Any]],
    roles: dict[str, str],
) -> Verdict:
    """Fill `verdict` from the table's rows and the clients' records."""
    by_id = {r.id: r for r in rows}
    by_org: dict[str, list[Row]] = {}
    for r in rows:
        by_org.setdefault(r.org, []).append(r)
    for org_rows in by_org.values():
        org_rows.sort(key=lambda r: r.id)

    shown: list[str] = []
    for result in results:
        name = result["name"]
        verdict.repeats_same_conn += result["repeats_same_conn"]
        verdict.repeats_after_reconnect += result["repeats_after_reconnect"]
        if not result["drained"]:
            verdict.undrained += 1
        for foreign in result["foreign"]:
            verdict.cross_org += 1
            if len(verdict.details) < 20:
                verdict.details.append(
                    f"cross-org: {name} (orgs {result['orgs']}) got event {foreign}"
                )
        for resync in result["resyncs"]:
            verdict.resyncs[str(resync["reason"])] += 1
            if not resync["stopped"]:
                verdict.resyncs_while_reading += 1
        for error in result["errors"]:
            verdict.harness_errors.append(f"{name}: {error}")

        for org in result["orgs"]:
            ids: list[int] = result["ids"][org]
            conns: list[int] = result["conns"][org]
            for event_id in ids:
                row = by_id.get(event_id)
                if row is None:
                    verdict.rolled_back_delivered += 1
                    if len(verdict.details) < 20:
                        verdict.details.append(
                            f"not in the table (rolled back?): {name} org {org} id {event_id}"
                        )
                elif row.org != org:
                    verdict.cross_org += 1
                    if len(verdict.details) < 20:
                        verdict.details.append(
                            f"cross-org: {name} got id {event_id} of org {row.org} "
                            f"in a frame for org {org}"
                        )
            org_resyncs = [r for r in result["resyncs"] if r["org"] == org]
            if org_resyncs:
                baseline_cursor = org_resyncs[-1]["cursor"]
                baseline_from = f"resync {org_resyncs[-1]['reason']}"
            else:
                baseline_cursor = result["first_subscribed"].get(org)
                baseline_from = "first subscribed"
            baseline = _snapshot(baseline_cursor, f"{name} {baseline_from}", verdict.harness_errors)
            received = set(ids)
            lost = [
                r
                for r in by_org.get(org, [])
                if (baseline is None or not baseline.visible(r.xid)) and r.id not in received
            ]
            if not lost:
                continue
            verdict.lost += len(lost)
            verdict.lost_pairs += 1
            verdict.lost_by_role[roles.get(name, "?")] += len(lost)
            for r in lost:
                verdict.lost_by_kind[r.kind] += 1
            if len(shown) < SHOWN_LOST:
                shown.append(
                    _describe_loss(
                        name,
                        org,
                        lost,
                        ids,
                        conns,
                        result,
                        baseline,
                        baseline_from,
                        roles.get(name, "?"),
                    )
                )
    verdict.details = shown + verdict.details
    return verdict


def _describe_loss(
    name: str,
    org: str,
    lost: list[Row],
    ids: list[int],
    conns: list[int],
    result: dict[str, Any],
    baseline: Snapshot | None,
    baseline_from: str,
    role: str,
) -> str:
    first = lost[0]
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    sorted_ids = [ids[i] for i in order]
    at = bisect.bisect_left(sorted_ids, first.id)
    around = [f"{ids[i]}@c{conns[i]}" for i in order[max(0, at - 4) : at + 4]]
    kinds = Counter(r.kind for r in lost)
    lines = [
        f"LOST {len(lost)} rows: client {name} ({role}, drained={result['drained']}) org {org}; "
        f"first id={first.id} xid={first.xid} kind={first.kind}; "
        f"lost ids {lost[0].id}..{lost[-1].id} by kind {dict(kinds)}",
        f"  baseline ({baseline_from}): {baseline}; last cursor: "
        f"{_snapshot(result['last_cursor'].get(org), 'last', [])}",
        f"  received {len(ids)} events for this org on {len(set(conns))} connections; "
        f"around id {first.id}: {' '.join(around) or '-'}",
    ]
    resyncs = [r for r in result["resyncs"] if r["org"] == org]
    if resyncs:
        lines.append(f"  resyncs: {resyncs[-3:]}")
    log = result["log"]
    lines.append(
        "  connection log (t, conn, what): "
        + "; ".join(f"{t:.1f} c{c} {w}" for t, c, w in log[-14:])
    )
    return "\n".join(lines)
