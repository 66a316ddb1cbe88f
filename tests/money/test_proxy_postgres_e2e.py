"""A real `python -m proxy serve` on `ledger.backend: postgres`: what the emulator billed equals
what PostgreSQL holds, generation by generation, to the nano-dollar; then, SIGKILLed under load,
every response a client received in full is in PostgreSQL (mirrors test_proxy_sigkill.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import asyncpg
import pytest

from proxy.emulator import Fault
from proxy.money.ledger_pg import PgLedger
from proxy.money.ledger_pg_schema import TABLE
from tests.money.test_proxy_sigkill import LOAD_SECONDS, MIN_COMPLETED, WORKERS, InFlight, client
from tests.support.audit import billed_nano, booked_nano
from tests.support.gateway import proxy_config_text
from tests.support.procs import free_port, start_proxy, wait_until_up


@pytest.mark.slow
@pytest.mark.realtime  # a real server process under real load, then SIGKILL
async def test_postgres_ledger_equals_the_bill_and_survives_sigkill(emulator, tmp_path, pg_dsn, monkeypatch) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "config.yaml"
    config.write_text(
        proxy_config_text(emulator.url).replace("access_log: true", "access_log: false")
        + "ledger: {backend: postgres, dsn_env: ORPROXY_TEST_LEDGER_DSN}\n"
    )
    log = tmp_path / "proxy.log"
    monkeypatch.setenv("ORPROXY_TEST_LEDGER_DSN", pg_dsn)  # start_proxy hands the child this environment
    proc = await start_proxy(config, log, port)
    completed: list[str] = []
    stop = asyncio.Event()
    workers: list[asyncio.Task] = []
    in_flight = InFlight()
    try:
        async with asyncio.timeout(30):
            await wait_until_up(url, proc, log)
            # 1. A burst that finishes: the ledger holds exactly what the upstream billed.
            burst = [asyncio.create_task(client(url, i, completed, stop, in_flight)) for i in range(WORKERS)]
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*burst)
            assert completed, f"no request completed:\n{log.read_text()[-2000:]}"
            ledger = await PgLedger.open(pg_dsn, prune=False)
            try:
                rows = await ledger.rows()
            finally:
                await ledger.close()
            assert booked_nano(rows) == billed_nano(emulator)  # generation by generation, to the nano-dollar
            assert {r.request_id for r in rows} >= set(completed)

            # 2. Load with streams held open, and SIGKILL in the middle of it.
            emulator.state.faults.set("google/gemini-2.5-flash", Fault(chunk_delay_s=0.01))
            before = len(completed)
            stop = asyncio.Event()
            workers = [asyncio.create_task(client(url, i, completed, stop, in_flight)) for i in range(WORKERS)]
            deadline = time.monotonic() + LOAD_SECONDS
            while len(completed) < before + MIN_COMPLETED and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            in_flight_at_kill = in_flight.count
            os.kill(proc.pid, signal.SIGKILL)
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
    assert in_flight_at_kill > 0 and len(completed) > before

    conn = await asyncpg.connect(pg_dsn)
    try:
        found = await conn.fetch(f"SELECT request_id, generation_id, cost_nusd FROM {TABLE}")
    finally:
        await conn.close()
    recorded = {r["request_id"] for r in found}
    missing = [rid for rid in completed if rid not in recorded]
    assert not missing, f"{len(missing)} of {len(completed)} delivered responses are not in PostgreSQL: {missing[:5]}"
    billed = billed_nano(emulator)
    delivered = set(completed)
    for r in found:  # what a delivered response's row says it cost is what the upstream billed
        if r["request_id"] in delivered and r["generation_id"] is not None:
            assert r["cost_nusd"] == billed[r["generation_id"]], r["request_id"]
    assert sum(r["cost_nusd"] for r in found) <= sum(billed.values())  # killed calls: billed, maybe not booked
    assert all(r["cost_nusd"] > 0 for r in found if r["request_id"] in delivered)
