"""What a newcomer reads and runs first: the links of README and docs/, the
contracts page against the code, `pgrelay --version`."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import urllib.parse
from dataclasses import fields
from pathlib import Path

import pytest

from relay import config
from relay.core.codes import UNSENDABLE_CLOSE_CODES, CloseCode, ErrorCode, ResyncReason

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text()))


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    found = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_at_files_and_headings_of_this_repository(doc: Path) -> None:
    """Users read README and docs/ in a checkout or on a package page: a link
    must lead to a file that ships with the repository, never outside it."""
    found = links(doc)
    assert found or doc.name == "CHANGELOG.md" or doc.parent.name == "docs"
    for target in found:
        parts = urllib.parse.urlsplit(target)
        if parts.scheme in ("http", "https", "mailto"):
            continue
        path = (doc.parent / urllib.parse.unquote(parts.path)).resolve() if parts.path else doc
        assert path.is_relative_to(REPO), f"{doc.name}: {target} leads outside the repository"
        assert path.exists(), f"{doc.name}: {target} does not exist"
        if parts.fragment:
            assert parts.fragment in anchors(path), f"{doc.name}: no heading for {target}"


def test_readme_links_the_docs_a_user_needs() -> None:
    readme = set(links(REPO / "README.md"))
    for wanted in ("docs/architecture.md", "docs/contracts.md", "CHANGELOG.md", "LICENSE"):
        assert wanted in readme, wanted


def test_contracts_name_every_setting_and_code_the_daemon_has() -> None:
    text = (REPO / "docs" / "contracts.md").read_text()
    for f in fields(config.Settings):
        assert f"`{config.env_name(f.name)}`" in text, f.name
    for old in config.RENAMED:
        assert config.env_name(old) in text, old
    sent = [c for c in CloseCode if c not in UNSENDABLE_CLOSE_CODES and c >= 1003]
    for code in sent:
        if code in (CloseCode.POLICY_VIOLATION,):
            continue  # RFC 6455's generic code: pgrelay never sends it
        assert re.search(rf"^\| {int(code)} \|", text, re.MULTILINE), code
    for error in ErrorCode:
        assert f"`{error.value}`" in text, error
    for reason in ResyncReason:
        assert f"`{reason.value}`" in text, reason


def test_version_is_the_packages() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "relay", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"pgrelay {version}\n"
