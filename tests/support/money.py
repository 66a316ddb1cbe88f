"""Shared by the money tests: a small model set, a budget block, ledger seeding, reading costs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from proxy.money.ledger import Ledger, LedgerRow

# One model per chain, so the answering model says which chain served a request.
MODELS = """
models:
  tiny:     {chain: [meta-llama/llama-3.1-8b-instruct]}
  cheap:    {chain: [openai/gpt-4o-mini]}
  balanced: {chain: [google/gemini-2.5-flash]}
  quality:  {chain: [anthropic/claude-sonnet-4.5]}
"""
CHAIN_MODEL = {
    "tiny": "meta-llama/llama-3.1-8b-instruct",
    "cheap": "openai/gpt-4o-mini",
    "balanced": "google/gemini-2.5-flash",
    "quality": "anthropic/claude-sonnet-4.5",
}
HELLO = [{"role": "user", "content": "Say hello in five words."}]


def budget_block(
    daily: float, on_exhausted: str = "reject", *, monthly: float | None = None, timezone: str = "UTC"
) -> str:
    """The issue's example steps, scaled to a small daily budget."""
    return f"""
budget:
  daily_usd: {daily}
{f"  monthly_usd: {monthly}" if monthly else ""}
  timezone: {timezone}
  on_exhausted: {on_exhausted}
  downgrade:
    - {{at: 0.4, map: {{quality: balanced}}}}
    - {{at: 0.6, map: {{quality: cheap, balanced: cheap}}}}
    - {{at: 0.8, map: {{"*": cheap}}}}
"""


def seed_row(
    request_id: str,
    cost: float,
    *,
    key: str | None = None,
    ts: float | None = None,
    model: str = "anthropic/claude-sonnet-4.5",
    virtual: str | None = "quality",
) -> LedgerRow:
    return LedgerRow(
        ts=time.time() if ts is None else ts,
        request_id=request_id,
        key_name=key,
        requested_model=virtual or model,
        virtual_model=virtual,
        model=model,
        upstream="openrouter",
        provider="Anthropic",
        prompt_tokens=100,
        completion_tokens=10,
        cost_usd=cost,
        cost_source="upstream",
        baseline_cost_usd=0.0,
        latency_s=0.1,
        ttft_s=None,
        status=200,
        attempts=1,
        streamed=False,
    )


async def seed_ledger(path: Path, *rows: LedgerRow) -> None:
    """Spend recorded before the proxy starts, as an earlier run of it would have left it."""
    ledger = await Ledger.open(path)
    try:
        for row in rows:
            await ledger.record(row)
    finally:
        await ledger.close()


async def ledger_rows(path: Path) -> list[LedgerRow]:
    ledger = await Ledger.open(path)
    try:
        return await ledger.rows()
    finally:
        await ledger.close()


def usage_cost(usage: Any) -> float:
    """OpenRouter's `usage.cost`, an extra field the openai SDK keeps."""
    assert usage is not None, "no usage in the answer"
    cost = (usage.model_extra or {}).get("cost")
    assert isinstance(cost, (int, float)), f"no usage.cost in {usage}"
    return float(cost)
