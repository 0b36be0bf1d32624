"""deploy/: the alert rules and the Grafana dashboard an operator loads.

The rules pass `promtool check rules`, their unit tests (`promtool test
rules`: each alert fires on its series, not before its `for:`, and not on a
healthy neighbour) pass, every dashboard query is valid PromQL, and every
metric either uses exists on a real daemon's /metrics.

promtool comes from scripts/ensure-promtool.sh (run by `make test`; run here
when promtool is missing); these tests skip, with the reason, only when it
cannot be had.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import RelayProcess

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus-rules.yml"
RULE_TESTS = DEPLOY / "prometheus-rules.test.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
PROMTOOL_TIMEOUT_S = 120
INSTALL_TIMEOUT_S = 600

#: Series Prometheus makes itself, not the daemon.
SCRAPE_SERIES = frozenset({"up"})
#: The metric names of pgrelay and of the standard process collector.
METRIC_NAME = re.compile(r"\b((?:pgrelay|process)_[a-z0-9_]+)\b")
#: Grafana's variables, as a query would see them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$job": ".*", "$instance": ".*"}


@pytest.fixture(scope="module")
def promtool() -> Iterator[str]:
    venv_bin = REPO / ".venv" / "bin"  # where scripts/ensure-promtool.sh puts it

    def find() -> str | None:
        for local in (Path(sys.prefix) / "bin" / "promtool", venv_bin / "promtool"):
            if local.exists():
                return str(local)
        return shutil.which("promtool")

    found = find()
    why = ""
    if found is None:
        script = subprocess.run(
            [str(REPO / "scripts" / "ensure-promtool.sh"), str(venv_bin)],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            check=False,
        )
        why = (script.stderr or script.stdout).strip()
        found = find()
    if found is None:
        pytest.skip(f"promtool cannot be installed here: {why}")
    yield found


def run_promtool(promtool: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *argv],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
        cwd=DEPLOY,
    )


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    queries = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            queries.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return queries


# -- the rules ----------------------------------------------------------------


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    r = run_promtool(promtool, "check", "rules", RULES.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in r.stdout


def test_each_alert_fires_on_its_series_in_promtools_unit_tests(promtool: str) -> None:
    r = run_promtool(promtool, "test", "rules", RULE_TESTS.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_waits_has_a_severity_says_what_to_do_and_is_tested() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    checks = [check for test in tests for check in test["alert_rule_test"]]
    fires = {c["alertname"] for c in checks if c.get("exp_alerts")}
    stays_quiet = {c["alertname"] for c in checks if not c.get("exp_alerts")}
    for rule in alert_rules():
        name = rule["alert"]
        assert "for" in rule, name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert len(rule["annotations"]["summary"]) > 20, name
        assert len(rule["annotations"]["description"]) > 100, name
        assert name in fires, f"{name}: no unit test shows it firing"
        assert name in stays_quiet, f"{name}: no unit test shows it quiet"


# -- the dashboard ----------------------------------------------------------------


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule:
    promtool parses it as Prometheus would."""
    rules = []
    for n, query in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        assert "$" not in query, f"an unknown Grafana variable in {query}"
        rules.append({"record": f"dashboard:query_{n}", "expr": query})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = run_promtool(promtool, "check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_panels_import_cleanly() -> None:
    """Unique panel ids, every panel on the 24-column grid, every query on the
    dashboard's data source variable, and the panels an operator looks for."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
        for target in p.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", p["title"]
    titles = {p["title"] for p in panels}
    for wanted in (
        "Build", "Connections", "Subscriptions", "Events delivered and read", "Commit to send",
        "Tail step duration", "Listener", "Listener reconnects and probe failures",
        "NOTIFY queue usage", "Resyncs by reason", "Slow clients",
        "Rejected connections by reason", "Catch-ups", "Memory (RSS)", "CPU", "File descriptors",
    ):  # fmt: skip
        assert wanted in titles, wanted


# -- against a real daemon ------------------------------------------------------------


def exposed_names(text: str) -> set[str]:
    """Every series name a scrape of `text` can hold: the samples present, and
    those of every declared family (a labelled counter shows no sample until
    its first label value, a histogram is _bucket, _sum and _count)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            elif kind == "summary":
                names |= {name + "_sum", name + "_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def test_every_metric_the_rules_and_dashboard_use_exists_on_the_daemon(
    relay: RelayProcess,
) -> None:
    status, text = relay.admin_get("/metrics")
    assert status == 200
    exposed = exposed_names(text)
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in METRIC_NAME.findall(rule["expr"]):
            used.setdefault(name, set()).add(f"rule {rule['alert']}")
    for query in dashboard_queries():
        for name in METRIC_NAME.findall(query):
            used.setdefault(name, set()).add("dashboard")
    assert len(used) > 20  # the pattern still finds the names
    missing = {name: sorted(where) for name, where in used.items() if name not in exposed}
    assert missing == {}, "used but not exposed by pgrelay serve: " + json.dumps(
        missing, indent=1, sort_keys=True
    )
