"""Real processes for the tests: a free port, a proxy subprocess, waiting until something answers."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp
import pytest

from tests.support.gateway import ROOT, UPSTREAM_KEY


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_proxy(
    config: Path,
    log: Path,
    port: int | None = None,
    preexec: Callable[[], None] | None = None,
    extra: Sequence[str] = (),
) -> asyncio.subprocess.Process:
    """`python -m proxy serve` with the test upstream keys in its environment, output to `log`;
    `preexec` runs in the child before it starts (to lower its limits); `extra`: more options."""
    env = {**os.environ, "TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY}
    args = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
    if port is not None:
        args += ["--port", str(port)]
    args += extra
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, env=env, stdout=out, stderr=out, preexec_fn=preexec
        )


async def wait_until_up(
    url: str, proc: asyncio.subprocess.Process, log: Path, path: str = "/healthz", attempts: int = 200
) -> None:
    """Poll `url + path` until it answers 200; fail with the process's log if it exits or never does."""
    async with aiohttp.ClientSession() as session:
        for _ in range(attempts):
            if proc.returncode is not None:
                raise AssertionError(f"the process exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                async with session.get(f"{url}{path}") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url}{path} did not come up:\n{log.read_text()[-2000:]}")


def require_tool(name: str, package: str) -> str:
    """The binary's path; in CI (CI=true) its absence is a failure, elsewhere a skip that says how to get it."""
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}",) if os.access(p, os.X_OK)), None)
    if path:
        return path
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(
            f"{name} is not installed, and CI must run this test: .ci/run installs Debian's "
            f"`{package}` package when it is missing; check that step"
        )
    pytest.skip(f"{name} is not installed (apt-get install {package}); CI runs this test")
