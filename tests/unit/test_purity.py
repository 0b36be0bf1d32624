"""The core stays pure: no trio, psycopg, sockets, asyncio, or clock reads."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import relay.core

CORE_DIR = Path(relay.core.__file__).parent
MODULES = sorted(f"relay.core.{m.name}" for m in pkgutil.iter_modules([str(CORE_DIR)]))
FORBIDDEN_LOADED = ("trio", "psycopg", "psycopg_pool", "socket", "asyncio", "selectors")
FORBIDDEN_IMPORTS = {*FORBIDDEN_LOADED, "time", "datetime", "threading", "os", "random"}


def test_core_modules_exist() -> None:
    expected = {
        "protocol",
        "codes",
        "cursor",
        "registry",
        "session",
        "subscription",
        "coalesce",
        "outbox",
    }
    assert expected <= {m.rsplit(".", 1)[1] for m in MODULES}


def test_importing_the_core_loads_no_io_modules() -> None:
    script = (
        "import importlib, json, sys\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in {FORBIDDEN_LOADED!r} if m in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(result.stdout) == []


def test_core_source_imports_no_clock_or_io() -> None:
    for path in sorted(CORE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN_IMPORTS, f"{path.name} imports {name}"
