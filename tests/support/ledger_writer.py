"""Records ledger rows as fast as it can and prints each request id once `record()`
has returned, so a test can SIGKILL it and check that no printed id was lost.

usage: python tests/support/ledger_writer.py LEDGER_PATH [WORKERS]
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

# This checkout's package, whichever one the interpreter's environment installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proxy.money.ledger import Ledger, LedgerRow


def make_row(request_id: str) -> LedgerRow:
    return LedgerRow(
        ts=time.time(),
        request_id=request_id,
        key_name="load",
        requested_model="auto",
        virtual_model="auto",
        model="openai/gpt-4o-mini",
        upstream="openrouter",
        provider="OpenAI",
        prompt_tokens=120,
        completion_tokens=40,
        cost_usd=0.000042,
        cost_source="upstream",
        baseline_cost_usd=0.0012,
        latency_s=0.2,
        ttft_s=None,
        status=200,
        attempts=1,
        streamed=False,
    )


async def worker(ledger: Ledger, worker_id: int) -> None:
    n = 0
    while True:
        request_id = f"w{worker_id}-{n}"
        await ledger.record(make_row(request_id))
        sys.stdout.write(request_id + "\n")
        sys.stdout.flush()
        n += 1


async def main(path: str, workers: int) -> None:
    ledger = await Ledger.open(path)
    await asyncio.gather(*(worker(ledger, i) for i in range(workers)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8))
