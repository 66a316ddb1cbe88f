"""The auditor's run: mixed hostile traffic through the official SDK, the proxy and the emulator
on real sockets, then the emulator's own bill against `orproxy report --json`, to the nano-dollar.

The traffic: prompts a character count misjudges (CJK, emoji, JSON-escaped control characters,
images), tools, cached prompt tokens and response-cache hits, whole streams in both wire shapes,
streams cut by the upstream in both shapes, mid-stream errors in both, and clients that hang up
(before a non-streamed answer, mid-stream, before a stream opened)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
import openai
import pytest

from proxy.emulator import Fault
from proxy.money.ledger_rows import to_nano
from tests.support.audit import billed_nano, booked_nano, report_json, settled
from tests.support.gateway import UPSTREAM_KEY, proxy_config_text
from tests.support.money import CHAIN_MODEL, MODELS
from tests.support.timing import cache_writes_settled, wait_for

FAST = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
BODY = (
    MODELS + "  oa: {chain: [{model: gpt-4o-mini, upstream: openai}]}\n  haiku: {chain: [anthropic/claude-3-haiku]}\n"
)
SYSTEM = {"role": "system", "content": "You keep the lighthouse's log; answer as the log would. " * 10}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "iVBORw0KGgo" * 500}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "log_weather",
            "parameters": {"type": "object", "properties": {"wind": {"type": "string"}}, "required": ["wind"]},
        },
    }
]


def user(text: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def drain(stream: Any) -> None:
    async for _ in stream:
        pass


async def broken(stream_call: Any) -> None:
    with pytest.raises(openai.APIError):
        await drain(await stream_call)


@pytest.mark.slow  # a heavy scenario: every kind of traffic, reconciliation, and the report as a process
@pytest.mark.realtime  # hang-ups are SDK timeouts and client disconnects against the emulator's real pauses
async def test_the_ledger_matches_the_upstreams_bill_to_the_nano_dollar(make_proxy, emulator, tmp_path):
    config = tmp_path / "config.yaml"
    ledger = tmp_path / "ledger.sqlite3"
    text = proxy_config_text(emulator.url, BODY)
    config.write_text(text)
    proxy = await make_proxy(config_text=text, ledger_path=ledger, reconcile_schedule=FAST)
    client = proxy.client(timeout=10)
    chat = client.chat.completions.create
    state = emulator.state

    # Whole answers, both upstreams, both stream shapes.
    await asyncio.gather(
        chat(model="balanced", messages=user("灯台守と嵐の物語を聞かせてください。" * 5)),
        chat(model="cheap", messages=user("🌊⛈️🏝️🔦 what a night " * 8), stream=True),
        chat(model="tiny", messages=user("\x01\x02\x1b log entry \x7f" * 10)),
        chat(model="quality", messages=user([{"type": "text", "text": "What ship is this?"}, IMAGE])),
        chat(model="cheap", messages=user("Record the wind."), tools=TOOLS),
        chat(model="oa", messages=user("Is the lamp lit? ✨"), tools=TOOLS),
        drain(await chat(model="oa", messages=user("Describe the storm."), stream=True)),
    )
    # Cached prompt tokens (a system prompt read again) on both upstreams, and response-cache hits.
    for question in ("Any ships tonight?", "Is the fog lifting?", "How high are the waves?"):
        await chat(model="haiku", messages=[SYSTEM, *user(question)])
        await drain(await chat(model="oa", messages=[SYSTEM, *user(question)], stream=True))
    for _ in range(3):
        await chat(model="balanced", messages=user("Same question, same answer?"), temperature=0)
        await cache_writes_settled()

    # Streams cut by the upstream, and mid-stream errors, in both shapes.
    for model, fault in [
        (CHAIN_MODEL["balanced"], Fault(drop_midstream=True, after_chunks=2, times=1)),
        (CHAIN_MODEL["tiny"], Fault(midstream_error=True, after_chunks=1, times=1)),
        ("gpt-4o-mini", Fault(drop_midstream=True, after_chunks=3, times=1)),
        ("gpt-4o-mini", Fault(midstream_error=True, after_chunks=2, times=1)),
    ]:
        state.faults.set(model, fault)
        virtual = {"gpt-4o-mini": "oa", CHAIN_MODEL["tiny"]: "tiny"}.get(model, "balanced")
        await broken(chat(model=virtual, messages=user("Tell the whole story of the wreck, please."), stream=True))

    # Clients that hang up: before a non-streamed answer, mid-stream, before a stream opened.
    state.faults.set(CHAIN_MODEL["quality"], Fault(latency_s=0.3, times=1))
    with pytest.raises(openai.APITimeoutError):
        await proxy.client(timeout=0.1).chat.completions.create(model="quality", messages=user("Quick, the log!"))
    state.faults.set(CHAIN_MODEL["balanced"], Fault(chunk_delay_s=0.1, times=1))
    async with aiohttp.ClientSession() as session:
        body = {"model": "balanced", "stream": True, "messages": user("A long story about the keeper's cat.")}
        response = await session.post(f"{proxy.url}/v1/chat/completions", json=body)
        for _ in range(3):
            await response.content.readuntil(b"\n\n")
        response.close()
    state.faults.set("gpt-4o-mini", Fault(latency_s=0.3, chunk_delay_s=0.3, times=1))
    with pytest.raises(openai.APITimeoutError):
        await proxy.client(timeout=0.1).chat.completions.create(model="oa", messages=user("Hello?"), stream=True)
    await wait_for(lambda: sum(bill.cancelled for bill in state.bills.values()) == 2, message="hang-ups not billed")

    rows = await settled(proxy, timeout=20)
    billed = billed_nano(emulator)
    assert booked_nano(rows) == billed  # generation by generation, to the nano-dollar
    report = await report_json(config, ledger, "--period", "month")
    assert to_nano(report["total"]["cost_usd"]) == sum(billed.values())  # and in total, as the operator sees it
    assert report["total"]["requests"] == len(rows) == len(billed) + 2  # the two response-cache hits
    assert report["total"]["cache_hits"] == 2 and report["total"]["cache_saved_usd"] > 0

    sources = Counter(row.cost_source for row in rows)
    assert sources["reconciled"] == 3  # OpenRouter: the cut stream, the mid-stream error, the client gone mid-stream
    assert sources["estimate"] == 3  # OpenAI-shaped: cut, error, gone before opening (no lookup exists there)
    assert sources["cached"] == 2 and sources["upstream"] > 0 and sources["catalogue"] > 0
    assert sum(row.status == 499 for row in rows) == 3
    assert sum(row.cached_tokens > 0 for row in rows) == 4 and any(row.cache_write_tokens for row in rows)
    assert UPSTREAM_KEY not in (tmp_path / "config.yaml").read_text()
