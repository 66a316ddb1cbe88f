"""2,000 slow connections do not stop a normal client: a real `orproxy serve` process, limited to
1,024 open files as in the attack run (`ulimit -n 1024`), while 2,000 connections trickle their
headers a byte at a time and reconnect as soon as they are dropped."""

from __future__ import annotations

import asyncio
import resource
import statistics
import time

import aiohttp
import pytest

from tests.support.gateway import proxy_config_text
from tests.support.procs import free_port, start_proxy, wait_until_up
from tests.support.timing import wait_for

SLOW_CONNECTIONS = 2000
HELLO = [{"role": "user", "content": "hi"}]


def limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


async def trickle(port: int, stop: asyncio.Event, opened: list[int]) -> None:
    """One slow client: a request line and then a header byte a second, again when dropped."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        opened[0] += 1
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nX-Slow: ")
            while not stop.is_set() and not reader.at_eof():
                await asyncio.sleep(1.0)
                writer.write(b"a")
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.mark.slow
@pytest.mark.realtime  # a real server process, real sockets held open for seconds
async def test_slow_connections_do_not_stop_a_normal_client(emulator, tmp_path):
    port = free_port()
    config = tmp_path / "config.yaml"
    # The emulator shares this test's event loop with the 2,000 trickling clients: on a busy machine
    # it may answer late, and an upstream timeout (504) is not what this test is about.
    config.write_text(
        proxy_config_text(emulator.url, "models:\n  cheap: {chain: [mistralai/mistral-7b-instruct]}\n").replace(
            "timeout_s: 2", "timeout_s: 10"
        )
        + f"ledger: {{path: '{tmp_path / 'ledger.sqlite3'}'}}\nwatch_config: false\n"
    )
    log = tmp_path / "proxy.log"
    proc = await start_proxy(config, log, port, preexec=limit_open_files)
    url = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    opened = [0]
    attackers: list[asyncio.Task[None]] = []
    try:
        await wait_until_up(url, proc, log)
        attackers = [asyncio.create_task(trickle(port, stop, opened)) for _ in range(SLOW_CONNECTIONS)]
        # All 2,000 connected and trickling (a few seconds; longer on a busy machine).
        await wait_for(lambda: opened[0] >= SLOW_CONNECTIONS, timeout=30, interval=0.1)
        latencies, statuses = [], []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            deadline = time.monotonic() + 12  # past the 10 s header deadline: the slow ones are cut and come back
            while time.monotonic() < deadline:
                started = time.monotonic()
                async with session.post(
                    f"{url}/v1/chat/completions", json={"model": "cheap", "messages": HELLO}
                ) as response:
                    await response.read()
                    statuses.append(response.status)
                latencies.append(time.monotonic() - started)
        assert opened[0] > SLOW_CONNECTIONS  # the proxy dropped slow ones (they reconnected)
        assert statuses and set(statuses) == {200}, statuses
        assert len(statuses) >= 50
        assert statistics.median(latencies) < 0.5 and max(latencies) < 5, (statistics.median(latencies), max(latencies))
        assert proc.returncode is None
        text = log.read_text()
        assert "Traceback" not in text
        assert "carries 480 client connections" in text  # the cap, lowered to what 1,024 files allow
    finally:
        stop.set()
        for task in attackers:
            task.cancel()
        await asyncio.gather(*attackers, return_exceptions=True)
        proc.terminate()
        await proc.wait()
