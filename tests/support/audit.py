"""The auditor's tools: the emulator's own bill against the ledger, to the nano-dollar."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from proxy.money.ledger import Ledger, LedgerRow
from proxy.money.ledger_rows import to_nano
from tests.support.gateway import ROOT, Emulator, Proxy
from tests.support.timing import wait_for


def billed_nano(emulator: Emulator) -> dict[str, int]:
    """Generation id -> what the emulator billed for it, in nano-dollars."""
    return {gen_id: to_nano(bill.cost) for gen_id, bill in emulator.state.bills.items()}


def booked_nano(rows: list[LedgerRow]) -> dict[str, int]:
    """Generation id -> what the ledger holds for it, in nano-dollars (rows without one: none)."""
    booked: dict[str, int] = {}
    for row in rows:
        if row.generation_id is not None:
            assert row.generation_id not in booked, f"two rows for generation {row.generation_id}"
            booked[row.generation_id] = to_nano(row.cost_usd)
    return booked


async def settled(proxy: Proxy, timeout: float = 10.0) -> list[LedgerRow]:
    """The ledger once the proxy has nothing left to book or to look up: no upstream work in flight,
    no estimate left on an OpenRouter upstream, every row committed."""
    from proxy.http.appkeys import INFLIGHT, RECONCILER

    inflight, reconciler = proxy.app[INFLIGHT], proxy.app[RECONCILER]

    async def done() -> list[LedgerRow] | None:
        if len(inflight) or reconciler.pending:
            return None
        await proxy.ledger.flush()
        rows = await proxy.ledger.rows()
        pending = [r for r in rows if r.cost_source in ("estimate", "reserved") and r.upstream == "openrouter"]
        return None if pending else rows

    return await wait_for(done, timeout, interval=0.05, message="reconciliation did not finish")


async def report_json(config: Path, ledger: Path, *args: str) -> dict[str, Any]:
    """`orproxy report --json`, run as the operator runs it: a process of its own."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "report",
        "--config",
        str(config),
        "--ledger",
        str(ledger),
        "--json",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return orjson.loads(out)


async def read_rows(path: Path) -> list[LedgerRow]:
    ledger = await Ledger.open(path, prune=False)
    try:
        return await ledger.rows()
    finally:
        await ledger.close()
