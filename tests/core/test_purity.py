"""`proxy.core` is the pure core: importing every module of it loads no IO library and nothing
from the packages that do IO. Checked in a fresh interpreter, so nothing imported by other tests
can hide a violation."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.gateway import ROOT

# Libraries that talk to sockets, files, databases or metrics registries, and our packages that do.
FORBIDDEN = (
    "aiohttp",
    "aiosqlite",
    "sqlite3",
    "prometheus_client",
    "redis",
    "asyncpg",
    "psycopg",
    "watchfiles",
    "proxy.upstream",
    "proxy.http",
    "proxy.ops",
    "proxy.money",
    "proxy.cache.store",
    "proxy.cache.response_cache",
    "proxy.cli",
    "proxy.emulator",
)

PROBE = """
import importlib, json, pkgutil, sys
import proxy.core
names = [m.name for m in pkgutil.walk_packages(proxy.core.__path__, "proxy.core.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(sys.modules)}))
"""


def test_importing_every_core_module_loads_no_io_library() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    assert len(report["modules"]) >= 10, report["modules"]  # the walk really found the core
    loaded = report["loaded"]
    offending = sorted(name for name in loaded if any(name == f or name.startswith(f + ".") for f in FORBIDDEN))
    assert offending == [], f"proxy.core imports IO: {offending}"
