"""`orproxy batches [list|show ID|cancel ID]` and `orproxy report --by batch`, run for real against
the ledger file of a proxy that is serving: what they print is what the proxy's API says, and a
cancel from the command line stops the running proxy's batch."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from proxy.emulator import Fault
from proxy.money.ledger_rows import to_nano
from tests.batch.test_batch_e2e import MISTRAL, chat_lines, jsonl, until_done
from tests.support.audit import billed_nano
from tests.support.gateway import ROOT
from tests.support.timing import wait_for

# Real `orproxy` processes, an interpreter start-up each (seconds on a busy 2-core machine).
pytestmark = pytest.mark.slow


async def orproxy(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(20):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_list_show_and_report_by_batch(make_proxy, emulator, tmp_path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    proxy = await make_proxy(ledger_path=ledger)
    client = proxy.client()
    uploaded = await client.files.create(file=("a.jsonl", jsonl(chat_lines(5))), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = await until_done(client, batch.id)
    await proxy.ledger.flush()

    code, out, err = await orproxy("batches", "list", "--ledger", str(ledger), "--json")
    assert code == 0, err
    (listed,) = json.loads(out)
    assert (listed["id"], listed["status"], listed["request_counts"]) == (
        batch.id,
        "completed",
        {"total": 5, "completed": 5, "failed": 0},
    )
    spent = sum(billed_nano(emulator).values())
    assert to_nano(listed["x_proxy"]["cost_usd"]) == spent

    code, out, err = await orproxy("batches", "show", batch.id, "--ledger", str(ledger))
    assert code == 0, err
    assert batch.id in out and "completed" in out and f"output_file_id: {done.output_file_id}" in out

    code, out, err = await orproxy("batches", "show", "batch_nope", "--ledger", str(ledger))
    assert code == 1 and "no batch batch_nope" in err

    config = tmp_path / "config.yaml"
    config.write_text(
        f"upstreams: {{openrouter: {{base_url: {emulator.url}/api/v1}}}}\nmodels: {{cheap: {{chain: [{MISTRAL}]}}}}\n"
    )
    code, out, err = await orproxy(
        "report", "--config", str(config), "--ledger", str(ledger), "--by", "batch", "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    (group,) = [g for g in report["rows"] if g["group"] == batch.id]
    assert group["requests"] == 5 and to_nano(group["cost_usd"]) == spent


async def test_cancel_from_the_command_line_stops_the_running_batch(make_proxy, emulator, tmp_path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    proxy = await make_proxy(ledger_path=ledger, extra="batches: {concurrency: 2}\n")
    emulator.state.faults.set(MISTRAL, Fault(latency_s=0.05, times=None))
    client = proxy.client()
    uploaded = await client.files.create(file=("slow.jsonl", jsonl(chat_lines(300, model=MISTRAL))), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await wait_for(lambda: len(emulator.state.requests) >= 2, 10, interval=0.02)

    code, out, err = await orproxy("batches", "cancel", batch.id, "--ledger", str(ledger), "--json")
    assert code == 0, err
    assert json.loads(out)["status"] == "cancelling"
    done = await until_done(client, batch.id)
    assert done.status == "cancelled" and done.request_counts.completed < 300

    code, _, err = await orproxy("batches", "cancel", batch.id, "--ledger", str(ledger))
    assert code == 0  # cancelling a cancelled batch says what it is, as the API does
