"""Logging through a queue: the caller never waits on the stream, and no line is lost when it stops."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading

import aiohttp
import pytest

from proxy.ops.logs import queued_logging
from tests.support.gateway import ROOT, UPSTREAM_KEY, proxy_config_text
from tests.support.procs import free_port

LINES = 5_000  # ~100 bytes each: several times what a pipe buffers (64 kB)


def test_a_pipe_nobody_reads_never_blocks_the_caller_and_every_line_arrives() -> None:
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w", buffering=1)
    logger = logging.getLogger("orproxy.test-queue")
    received: list[bytes] = []
    try:
        with queued_logging(logging.INFO, stream):
            finished = threading.Event()

            def log_them() -> None:
                for number in range(LINES):
                    logger.info("line %05d %s", number, "x" * 64)
                finished.set()

            writer = threading.Thread(target=log_them, daemon=True)
            writer.start()
            # Nobody reads the pipe yet: the listener thread is stuck writing, the callers are not.
            assert finished.wait(timeout=30), "logging blocked on a full pipe"

            def drain() -> None:
                while chunk := os.read(read_end, 65536):
                    received.append(chunk)

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
        # Leaving the block stopped the listener after it wrote everything queued.
        stream.close()
        reader.join(timeout=30)
    finally:
        if not stream.closed:
            stream.close()
        os.close(read_end)
    lines = b"".join(received).decode().splitlines()
    numbers = [int(line.split("line ")[1].split()[0]) for line in lines if "orproxy.test-queue" in line]
    assert numbers == list(range(LINES))
    assert lines[0].split(" INFO orproxy.test-queue: ")[1].startswith("line 00000 xxx")  # formatted by the thread


def test_the_previous_handlers_come_back() -> None:
    root = logging.getLogger()
    before, level = root.handlers[:], root.level
    with queued_logging(logging.WARNING, sys.stderr):
        assert len(root.handlers) == 1 and root.handlers[0] not in before
    assert root.handlers == before and root.level == level


@pytest.mark.slow
@pytest.mark.realtime  # a real `orproxy serve` process, its stderr a pipe, stopped by SIGTERM
async def test_the_server_answers_while_nobody_reads_its_log_and_loses_no_line_at_shutdown(emulator, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(proxy_config_text(emulator.url) + f"ledger: {{path: '{tmp_path / 'ledger.db'}'}}\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,  # read by nobody until the end: it fills after ~400 lines
        limit=1 << 24,
    )
    request_ids: list[str] = []
    body = {"model": "cheap", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with asyncio.timeout(60), aiohttp.ClientSession() as session:
            for _ in range(400):  # until it listens
                try:
                    async with session.get(f"{url}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            for _ in range(1_500):  # ~200 bytes of access log each: 300 kB into a 64 kB pipe
                async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                    assert response.status == 200
                    request_ids.append(response.headers["x-request-id"])
            proc.send_signal(signal.SIGTERM)
            assert proc.stderr is not None
            log = (await proc.stderr.read()).decode()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    access = [line for line in log.splitlines() if " orproxy.access: " in line]
    assert [line.split(" orproxy.access: ")[1].split()[0] for line in access] == request_ids
    assert log.rstrip().endswith("orproxy stopped")
