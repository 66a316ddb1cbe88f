"""The default (`state.backend: local`) does not pay for Redis: the client library is imported only
when a config asks for it, so `orproxy serve` and every other command start as fast as before."""

from __future__ import annotations

import subprocess
import sys

from tests.support.gateway import ROOT


def test_the_proxy_and_its_commands_load_without_the_redis_client() -> None:
    code = (
        "import sys, proxy.http.app, proxy.cli.main, proxy.state.backend\n"
        "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith(('redis.', 'hiredis'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout
