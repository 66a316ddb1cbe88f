"""A real `python -m proxy serve`, SIGKILLed mid-batch and started again, finishes the batch with no
line sent (so billed) twice. Audited against the emulator's own record: what it received, by the
line's prompt, and what it billed, by generation, against the ledger.

The emulator bills a non-streamed request when it arrives (as OpenRouter does: the model runs
whether or not the client waits), and answers 50 ms later: the lines in flight at the kill were
billed upstream but never answered. The proxy cannot know what they cost (a generation id comes
with the answer), so it never sends them again: they come back in the error file as `interrupted`.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter

import orjson
import pytest
from openai import AsyncOpenAI

from proxy.emulator import Fault
from proxy.money.ledger import Ledger
from proxy.money.ledger_rows import to_nano
from tests.batch.test_batch_e2e import MISTRAL, chat_lines, jsonl
from tests.support.audit import billed_nano
from tests.support.gateway import proxy_config_text
from tests.support.procs import free_port, start_proxy, wait_until_up
from tests.support.timing import wait_for

LINES, CONCURRENCY = 80, 4


@pytest.mark.slow
@pytest.mark.realtime  # two real server processes, a real SIGKILL, lines answered after a real 50 ms
async def test_sigkill_mid_batch_then_restart_completes_with_no_line_billed_twice(emulator, tmp_path) -> None:
    emulator.state.faults.set(MISTRAL, Fault(latency_s=0.05, times=None))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ledger_path = tmp_path / "ledger.sqlite3"
    config = tmp_path / "config.yaml"
    config.write_text(
        proxy_config_text(emulator.url).replace("access_log: true", "access_log: false")
        + f"ledger: {{path: '{ledger_path}'}}\nbatches: {{concurrency: {CONCURRENCY}}}\n"
    )
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    lines = chat_lines(LINES, model=MISTRAL)
    log = tmp_path / "proxy.log"
    proc = await start_proxy(config, log, port)
    try:
        async with asyncio.timeout(30):
            await wait_until_up(url, proc, log)
            uploaded = await client.files.create(file=("kill.jsonl", jsonl(lines)), purpose="batch")
            batch = await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )

            async def a_fifth_done() -> bool:
                return (await client.batches.retrieve(batch.id)).request_counts.completed >= LINES // 5

            await wait_for(a_fifth_done, 20, interval=0.02)
            os.kill(proc.pid, signal.SIGKILL)  # lines are in flight right now: the emulator holds them 50 ms
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    sent_before = len(emulator.state.requests)
    assert LINES // 5 <= sent_before < LINES

    log2 = tmp_path / "proxy-again.log"
    proc = await start_proxy(config, log2, port)
    try:
        async with asyncio.timeout(60):
            await wait_until_up(url, proc, log2)

            async def finished():
                current = await client.batches.retrieve(batch.id)
                return current if current.status in ("completed", "failed", "expired", "cancelled") else None

            done = await wait_for(finished, 40, interval=0.05, message=lambda: log2.read_text()[-2000:])
            output = (await client.files.content(done.output_file_id)).content if done.output_file_id else b""
            errors = (await client.files.content(done.error_file_id)).content if done.error_file_id else b""
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    assert done.status == "completed", done

    answered = {orjson.loads(x)["custom_id"] for x in output.splitlines()}
    cut = [orjson.loads(x) for x in errors.splitlines()]
    assert {line["error"]["code"] for line in cut} <= {"interrupted"}
    assert len(cut) <= CONCURRENCY, "only the lines in flight at the kill may be cut off"
    assert answered | {line["custom_id"] for line in cut} == {line["custom_id"] for line in lines}

    # The emulator's record: no line's prompt reached it twice, so none was billed twice.
    received = Counter(r.body["messages"][0]["content"] for r in emulator.state.requests)
    assert received and max(received.values()) == 1, received.most_common(3)
    assert len(received) == len(answered) + len(cut)

    # Every ledger row is a generation the emulator billed, at its figure; what the emulator billed
    # beyond the ledger is only the cut-off lines' (their answers never came back to be booked).
    ledger = await Ledger.open(ledger_path, prune=False)
    try:
        rows = [row for row in await ledger.rows() if row.batch_id == batch.id]
    finally:
        await ledger.close()
    billed = billed_nano(emulator)
    assert len({row.custom_id for row in rows}) == len(rows) == len(answered)
    assert all(to_nano(row.cost_usd) == billed[row.generation_id] for row in rows if row.generation_id)
    unbooked = set(billed) - {row.generation_id for row in rows}
    assert len(unbooked) == len(cut)
