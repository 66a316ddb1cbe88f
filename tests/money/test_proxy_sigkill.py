"""A real `python -m proxy serve`, killed with SIGKILL under load, loses no row of a completed request."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from proxy.emulator import Fault
from proxy.money.ledger import Ledger
from tests.support.gateway import proxy_config_text
from tests.support.procs import free_port, start_proxy, wait_until_up

WORKERS = 24
MIN_COMPLETED = 150
LOAD_SECONDS = 4.0


class InFlight:
    count = 0


async def client(url: str, worker: int, completed: list[str], stop: asyncio.Event, in_flight: InFlight) -> None:
    """Send requests until stopped; record the id of every answer received in full."""
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        n = 0
        while not stop.is_set():
            n += 1
            streamed = (worker + n) % 2 == 0
            body = {
                "model": ("cheap", "balanced", "quality")[n % 3],
                "stream": streamed,
                "messages": [{"role": "user", "content": f"worker {worker} request {n}: say something"}],
            }
            in_flight.count += 1
            try:
                async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                    if response.status != 200:
                        continue
                    request_id = response.headers["x-request-id"]
                    if streamed:
                        text = await response.text()
                        if not text.endswith("data: [DONE]\n\n") or "stream_interrupted" in text:
                            continue
                    else:
                        payload = await response.json()
                        assert payload["choices"]
                    completed.append(request_id)
            except (TimeoutError, aiohttp.ClientError):
                if stop.is_set():
                    return
                await asyncio.sleep(0.01)
            finally:
                in_flight.count -= 1


@pytest.mark.slow
@pytest.mark.realtime  # a real server process under up to LOAD_SECONDS of real load, then SIGKILL
async def test_sigkill_under_load_loses_no_completed_row(emulator, tmp_path):
    emulator.state.faults.set("google/gemini-2.5-flash", Fault(chunk_delay_s=0.01))  # some streams stay in flight
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ledger_path = tmp_path / "ledger.sqlite3"
    config = tmp_path / "config.yaml"
    config.write_text(
        proxy_config_text(emulator.url).replace("access_log: true", "access_log: false")
        + f"ledger: {{path: '{ledger_path}'}}\n"
    )
    log = tmp_path / "proxy.log"
    proc = await start_proxy(config, log, port)
    completed: list[str] = []
    stop = asyncio.Event()
    workers: list[asyncio.Task] = []
    in_flight = InFlight()
    in_flight_at_kill = 0
    try:
        async with asyncio.timeout(20):
            await wait_until_up(url, proc, log)
            workers = [asyncio.create_task(client(url, i, completed, stop, in_flight)) for i in range(WORKERS)]
            deadline = time.monotonic() + LOAD_SECONDS
            while len(completed) < MIN_COMPLETED and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert completed, f"no request completed:\n{log.read_text()[-2000:]}"
            in_flight_at_kill = in_flight.count
            os.kill(proc.pid, signal.SIGKILL)  # mid-load: requests are in flight right now
            await proc.wait()
            stop.set()
            await asyncio.gather(*workers)
    finally:
        stop.set()
        for task in workers:
            task.cancel()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert in_flight_at_kill > 0

    ledger = await Ledger.open(ledger_path)
    try:
        rows = await ledger.rows()
    finally:
        await ledger.close()
    recorded = {row.request_id for row in rows}
    missing = [rid for rid in completed if rid not in recorded]
    assert not missing, f"{len(missing)} of {len(completed)} completed requests have no ledger row: {missing[:5]}"
    assert all(row.cost_usd > 0 for row in rows if row.request_id in set(completed))
