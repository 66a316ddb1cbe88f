"""Real processes for the tests: a free port, a proxy subprocess, waiting until something answers."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp

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
