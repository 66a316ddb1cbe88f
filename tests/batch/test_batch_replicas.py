"""Two replicas (real `python -m proxy serve` processes) on one PostgreSQL ledger run one batch: both
run lines of it, every line reaches the emulator once and is booked once, at the emulator's own
figure; a batch created through one replica is read and cancelled through the other, and through
`orproxy batches` on the same config."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path

import asyncpg
import orjson
import pytest
from openai import AsyncOpenAI

from proxy.emulator import Fault
from proxy.money.batch_store_pg import LINES
from proxy.money.ledger_pg import PgLedger
from proxy.money.ledger_rows import to_nano
from tests.batch.test_batch_e2e import MISTRAL, TERMINAL, chat_lines, jsonl
from tests.cli.test_batches_cli import orproxy
from tests.support.audit import billed_nano, booked_nano
from tests.support.gateway import proxy_config_text
from tests.support.postgres import scratch_schema
from tests.support.procs import free_port, start_proxy, wait_until_up
from tests.support.timing import wait_for

LINES_RUN, CONCURRENCY = 120, 4


async def finished(client: AsyncOpenAI, batch_id: str, log: Path) -> object:
    async def done() -> object:
        batch = await client.batches.retrieve(batch_id)
        return batch if batch.status in TERMINAL else None

    return await wait_for(done, 60, interval=0.05, message=lambda: log.read_text()[-2000:])


@pytest.mark.slow
@pytest.mark.realtime  # two real server processes sharing one PostgreSQL, lines answered after a real 30 ms
async def test_two_replicas_run_one_batch_each_line_once_billed_once(emulator, tmp_path) -> None:
    emulator.state.faults.set(MISTRAL, Fault(latency_s=0.03, times=None))
    async with scratch_schema() as (_, dsn):
        config = tmp_path / "config.yaml"
        config.write_text(
            proxy_config_text(emulator.url).replace("access_log: true", "access_log: false")
            + f"ledger: {{backend: postgres, dsn: '{dsn}'}}\nbatches: {{concurrency: {CONCURRENCY}}}\n"
        )
        ports = [free_port(), free_port()]
        logs = [tmp_path / "one.log", tmp_path / "two.log"]
        procs = [await start_proxy(config, log, port) for log, port in zip(logs, ports, strict=True)]
        one, two = (AsyncOpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key="unused", max_retries=0) for p in ports)
        try:
            async with asyncio.timeout(90):
                for proc, log, port in zip(procs, logs, ports, strict=True):
                    await wait_until_up(f"http://127.0.0.1:{port}", proc, log)
                lines = chat_lines(LINES_RUN, model=MISTRAL)
                uploaded = await one.files.create(file=("shared.jsonl", jsonl(lines)), purpose="batch")
                batch = await one.batches.create(
                    input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
                )
                done = await finished(two, batch.id, logs[1])  # polled through the other replica
                output = (await two.files.content(done.output_file_id)).content  # type: ignore[attr-defined]

                # A second batch, created through replica two, cancelled through replica one.
                slow = await two.files.create(
                    file=("slow.jsonl", jsonl(chat_lines(400, MISTRAL, "s"))), purpose="batch"
                )
                second = await two.batches.create(
                    input_file_id=slow.id, endpoint="/v1/chat/completions", completion_window="24h"
                )
                await wait_for(lambda: len(emulator.state.requests) >= LINES_RUN + 4, 10, interval=0.02)
                assert (await one.batches.cancel(second.id)).status == "cancelling"
                cancelled = await finished(two, second.id, logs[1])

                # `orproxy batches` on the same config reads the same database.
                code, out, err = await orproxy("batches", "list", "--config", str(config), "--json")
                assert code == 0, err
                listed = {view["id"]: view for view in json.loads(out)}
                code, out, err = await orproxy("batches", "show", batch.id, "--config", str(config))
                assert code == 0 and f"output_file_id: {done.output_file_id}" in out, err  # type: ignore[attr-defined]
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                await proc.wait()

        assert done.status == "completed", done  # type: ignore[attr-defined]
        assert cancelled.status == "cancelled", cancelled  # type: ignore[attr-defined]
        assert cancelled.request_counts.completed < 400  # type: ignore[attr-defined]
        assert listed[batch.id]["status"] == "completed" and listed[second.id]["status"] == "cancelled"
        answers = [orjson.loads(x) for x in output.splitlines()]
        assert sorted(a["custom_id"] for a in answers) == sorted(x["custom_id"] for x in lines)

        # The emulator's record: each line of the first batch reached it once.
        received = Counter(r.body["messages"][0]["content"] for r in emulator.state.requests)
        assert max(received.values()) == 1, received.most_common(3)
        first = [text for text in received if text.startswith("rewrite item ")]
        assert len(first) == LINES_RUN

        conn = await asyncpg.connect(dsn)
        try:
            owners = await conn.fetch(
                f"SELECT owner, count(*) FROM {LINES} WHERE batch_id = $1 GROUP BY owner", batch.id
            )
        finally:
            await conn.close()
        assert len(owners) == 2, owners  # both replicas ran lines of it
        ledger = await PgLedger.open(dsn, prune=False)
        try:
            rows = await ledger.rows()
        finally:
            await ledger.close()
        # Every generation the emulator billed (both batches) is booked once, at its figure.
        assert booked_nano(rows) == billed_nano(emulator)
        mine = [row for row in rows if row.batch_id == batch.id]
        assert len(mine) == len({row.custom_id for row in mine}) == LINES_RUN
        assert to_nano(listed[batch.id]["x_proxy"]["cost_usd"]) == sum(to_nano(row.cost_usd) for row in mine) > 0
