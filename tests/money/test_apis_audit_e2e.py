"""The auditor's run across APIs: chat, embeddings and legacy completions traffic (whole answers,
streams, fallbacks, a cut stream reconciled), then `orproxy report --by api` and `/admin/spend?by=api`
against the emulator's own bill: each API's spend equal to what was billed for it, to the nano-dollar."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import openai
import pytest

from proxy.emulator import Fault
from proxy.money.ledger_rows import to_nano
from tests.support.audit import billed_nano, booked_nano, report_json, settled
from tests.support.gateway import UPSTREAM_KEY, proxy_config_text

MODELS = """
models:
  cheap: {chain: [mistralai/mistral-7b-instruct, meta-llama/llama-3.1-8b-instruct]}
  quality: {chain: [anthropic/claude-3-haiku], prompt_cache: auto}
  embed: {kind: embeddings, chain: [openai/text-embedding-3-small, qwen/qwen3-embedding-8b]}
"""
FAST = (0.02, 0.05, 0.1, 0.2, 0.5)
SYSTEM = {"role": "system", "content": "You keep the lighthouse log, in full sentences. " * 8}


async def drain(stream) -> None:
    async for _ in stream:
        pass


async def test_each_apis_spend_is_what_the_emulator_billed_for_it(make_proxy, emulator, tmp_path, aiohttp_client):
    config, ledger = tmp_path / "config.yaml", tmp_path / "ledger.sqlite3"
    text = proxy_config_text(emulator.url, MODELS) + "admin: {key_env: ADMIN}\n"
    config.write_text(text)
    env = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY, "ADMIN": "admin-secret"}
    proxy = await make_proxy(config_text=text, env=env, ledger_path=ledger, reconcile_schedule=FAST)
    client = proxy.client()
    state = emulator.state

    await asyncio.gather(
        client.chat.completions.create(model="cheap", messages=[{"role": "user", "content": "灯台 🌊"}]),
        drain(await client.chat.completions.create(model="cheap", messages=[SYSTEM], stream=True)),
        client.embeddings.create(model="embed", input=["The lamp.", "灯台守", "🔦"]),
        client.embeddings.create(model="embed", input=[[101, 2023, 102]], encoding_format="float"),
        client.completions.create(model="cheap", prompt="Once upon a time", max_tokens=40),
        drain(await client.completions.create(model="cheap", prompt="The storm", stream=True)),
    )
    conversation = [SYSTEM]
    for question in ("At dusk?", "At dawn?"):  # prompt caching: cache-write, then cached-read tokens
        conversation.append({"role": "user", "content": question})
        reply = await client.chat.completions.create(model="quality", messages=conversation)
        conversation.append({"role": "assistant", "content": reply.choices[0].message.content})
    state.faults.set("openai/text-embedding-3-small", Fault(status=503, times=2))  # a fallback
    await client.embeddings.create(model="embed", input="fallback")
    state.faults.set("mistralai/mistral-7b-instruct", Fault(drop_midstream=True, after_chunks=2, times=1))
    with pytest.raises(openai.APIError):  # a cut stream: estimated, then reconciled
        await drain(await client.completions.create(model="cheap", prompt="A long tale", stream=True))

    rows = await settled(proxy, timeout=20)
    billed = billed_nano(emulator)
    assert booked_nano(rows) == billed and len(rows) == len(billed) == 10
    per_api: dict[str, int] = defaultdict(int)
    for row in rows:
        per_api[row.api] += billed[row.generation_id]
    assert {row.api for row in rows} == {"chat", "embeddings", "completions"}
    assert sum(r.cost_source == "reconciled" for r in rows) == 1 and any(r.cached_tokens for r in rows)

    report = await report_json(config, ledger, "--period", "month", "--by", "api")
    assert {row["group"]: to_nano(row["cost_usd"]) for row in report["rows"]} == per_api
    assert to_nano(report["total"]["cost_usd"]) == sum(billed.values())
    assert {row["group"]: row["requests"] for row in report["rows"]} == {"chat": 4, "embeddings": 3, "completions": 3}

    http = await aiohttp_client(proxy.server)
    spend = await http.get("/admin/spend?period=day&by=api", headers={"Authorization": "Bearer admin-secret"})
    admin = await spend.json()
    assert {row["group"]: to_nano(row["cost_usd"]) for row in admin["rows"]} == per_api
