"""Batches yield to live traffic: interactive requests sent while a large batch runs keep their
latency (p50 within 20% of an idle proxy's).

Measured as an operator would see it: real processes (the emulator apart, so its work for batch
lines is on no proxy's event loop), the official SDK as the client. Two proxies of the same config
on the same machine: one runs a large batch, the other is idle; interactive requests go to each in
turn, one after the other, so a machine that gets busier or quieter meanwhile (other jobs on a
shared 2-core box) weighs on both alike, sample by sample. The batch proxy's own work for its
lines is what it must keep out of the interactive requests' way."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from openai import AsyncOpenAI

from tests.batch.test_batch_e2e import MISTRAL, chat_lines, jsonl
from tests.support.gateway import ROOT, proxy_config_text
from tests.support.procs import free_port, start_proxy, wait_until_up
from tests.support.timing import wait_for

PAIRS = 200
BATCH_LINES, LINE_LATENCY_S = 5_000, 0.5  # a large batch: it runs through the whole measurement
HELLO = [{"role": "user", "content": "hello"}]


async def timed(client: AsyncOpenAI) -> float:
    started = time.perf_counter()
    reply = await client.chat.completions.create(model="balanced", messages=HELLO)
    took = time.perf_counter() - started
    assert reply.choices
    return took


async def proxy_process(emulator_url: str, where: Path) -> tuple[asyncio.subprocess.Process, str, Path]:
    where.mkdir()
    port = free_port()
    config = where / "config.yaml"
    config.write_text(
        proxy_config_text(emulator_url).replace("access_log: true", "access_log: false")
        + f"ledger: {{path: '{where / 'ledger.sqlite3'}'}}\n"
    )
    log = where / "proxy.log"
    return await start_proxy(config, log, port), f"http://127.0.0.1:{port}", log


@pytest.mark.slow
@pytest.mark.realtime  # latency over real sockets between real processes, against batch lines held 0.5 s
async def test_interactive_latency_holds_during_a_large_batch(tmp_path) -> None:
    emulator_port = free_port()
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    emulator_log = tmp_path / "emulator.log"
    with emulator_log.open("wb") as out:
        emulator = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.emulator", "--port", str(emulator_port), cwd=ROOT, stdout=out, stderr=out
        )
    busy_proc, busy_url, busy_log = await proxy_process(emulator_url, tmp_path / "busy")
    idle_proc, idle_url, idle_log = await proxy_process(emulator_url, tmp_path / "idle")
    busy = AsyncOpenAI(base_url=f"{busy_url}/v1", api_key="unused", max_retries=0)
    idle = AsyncOpenAI(base_url=f"{idle_url}/v1", api_key="unused", max_retries=0)
    on_busy: list[float] = []
    on_idle: list[float] = []
    try:
        await wait_until_up(emulator_url, emulator, emulator_log, path="/api/v1/models")
        await wait_until_up(busy_url, busy_proc, busy_log)
        await wait_until_up(idle_url, idle_proc, idle_log)
        async with aiohttp.ClientSession() as session:
            fault = {"model": MISTRAL, "latency_s": LINE_LATENCY_S}
            async with session.post(f"{emulator_url}/_emulator/faults", json=fault) as response:
                assert response.status == 200
        for _ in range(10):  # warm up both: connections, first-use costs
            await timed(busy)
            await timed(idle)
        uploaded = await busy.files.create(
            file=("bulk.jsonl", jsonl(chat_lines(BATCH_LINES, model=MISTRAL))), purpose="batch"
        )
        batch = await busy.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        async def flowing() -> bool:  # lines are finishing: the batch is in full swing
            return (await busy.batches.retrieve(batch.id)).request_counts.completed >= 10

        await wait_for(flowing, 20, interval=0.05)
        before = (await busy.batches.retrieve(batch.id)).request_counts.completed
        for pair in range(PAIRS):
            first, second = (busy, idle) if pair % 2 else (idle, busy)
            a, b = await timed(first), await timed(second)
            (on_busy if first is busy else on_idle).append(a)
            (on_busy if second is busy else on_idle).append(b)
        current = await busy.batches.retrieve(batch.id)
        assert current.status == "in_progress", "the batch must run through the whole measurement"
        progressed = current.request_counts.completed - before
    finally:
        for process in (busy_proc, idle_proc, emulator):
            if process.returncode is None:
                os.kill(process.pid, signal.SIGTERM)
                await process.wait()
    busy_p50, idle_p50 = statistics.median(on_busy), statistics.median(on_idle)
    print(f"p50: idle proxy {idle_p50 * 1e3:.2f} ms, during a batch {busy_p50 * 1e3:.2f} ms ({progressed} lines)")
    assert progressed >= 20, f"the batch hardly ran beside the samples ({progressed} lines)"
    assert busy_p50 <= idle_p50 * 1.2, f"p50 {busy_p50 * 1e3:.2f} ms during a batch vs {idle_p50 * 1e3:.2f} ms idle"
