"""One replica's start-up against a PostgreSQL ledger, timed to race others: waits until the
wall-clock time given, applies the schema as `PgLedger.open` does, prints the version it found,
then opens the ledger and records one row.

usage: python tests/support/pg_migrate.py DSN START_AT NAME
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import asyncpg

from proxy.money.ledger_pg import PgLedger
from proxy.money.ledger_pg_schema import migrate
from proxy.money.ledger_rows import LedgerRow


async def main(dsn: str, start_at: float, name: str) -> None:
    conn = await asyncpg.connect(dsn)  # connected before the start line, so all three race the lock
    await asyncio.sleep(max(0.0, start_at - time.time()))
    try:
        found = await migrate(conn, dsn)
    finally:
        await conn.close()
    ledger = await PgLedger.open(dsn)
    try:
        await ledger.record(
            LedgerRow(
                ts=time.time(), request_id=name, key_name=None, requested_model="cheap", virtual_model="cheap",
                model="m/a", upstream="openrouter", provider=None, prompt_tokens=1, completion_tokens=1,
                cost_usd=0.000001, cost_source="upstream", baseline_cost_usd=0.0, latency_s=0.1, ttft_s=None,
                status=200, attempts=1, streamed=False,
            )
        )  # fmt: skip
    finally:
        await ledger.close()
    print(found, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), sys.argv[3]))
