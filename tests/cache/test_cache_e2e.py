"""The response cache on the real request path: SDK -> proxy -> emulator."""

from __future__ import annotations

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.emulator import Fault
from tests.support.timing import Clock, cache_writes_settled

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


async def rows(proxy):
    ledger = proxy.ledger
    await ledger.flush()
    return await ledger.rows()


async def test_temperature_zero_is_cached_and_a_hit_costs_nothing(proxy, emulator, aiohttp_client, schemas):
    client = proxy.client()
    first = await client.chat.completions.with_raw_response.create(model="cheap", messages=QUESTION, temperature=0)
    assert first.headers["x-proxy-cache"] == "miss"
    paid = first.parse()
    await proxy.ledger.flush()
    await cache_writes_settled()  # the store happens after the answer went out
    second = await client.chat.completions.with_raw_response.create(model="cheap", messages=QUESTION, temperature=0)
    assert second.headers["x-proxy-cache"] == "hit"
    assert second.headers["x-proxy-attempts"] == "0"
    hit = second.parse()
    schemas.validate("CreateChatCompletionResponse", hit.model_dump(exclude_unset=True))
    assert hit.choices[0].message.content == paid.choices[0].message.content
    upstream_calls = len(emulator.state.requests)
    await client.chat.completions.create(model="cheap", messages=QUESTION, temperature=0)
    assert len(emulator.state.requests) == upstream_calls  # hits never reach the upstream
    ledger = await rows(proxy)
    cached = [r for r in ledger if r.cached]
    assert cached and all(r.cost_usd == 0 and r.cost_source == "cached" for r in cached)
    assert cached[0].saved_usd == pytest.approx(paid.usage.model_extra["cost"])
    http = await aiohttp_client(proxy.server)
    metrics = await (await http.get("/metrics")).text()
    samples = {s.name: s.value for family in text_string_to_metric_families(metrics) for s in family.samples}
    assert samples["orproxy_cache_hits_total"] == len(cached)
    assert samples["orproxy_cache_misses_total"] >= 1


async def test_the_header_switches_the_cache_on_and_off(proxy, emulator):
    client = proxy.client()
    off = await client.chat.completions.with_raw_response.create(
        model="cheap", messages=QUESTION, temperature=0, extra_headers={"X-Proxy-Cache": "off"}
    )
    assert "x-proxy-cache" not in off.headers
    on = await client.chat.completions.with_raw_response.create(
        model="cheap", messages=QUESTION, temperature=0.7, extra_headers={"X-Proxy-Cache": "on"}
    )
    assert on.headers["x-proxy-cache"] == "miss"
    plain = await client.chat.completions.with_raw_response.create(model="cheap", messages=QUESTION)
    assert "x-proxy-cache" not in plain.headers


async def test_a_streamed_hit_is_replayed_as_sse(proxy, emulator, schemas):
    client = proxy.client()
    paid = await client.chat.completions.create(model="balanced", messages=QUESTION, temperature=0)
    await cache_writes_settled()
    raw = await client.chat.completions.with_raw_response.create(
        model="balanced", messages=QUESTION, temperature=0, stream=True
    )
    assert raw.headers["x-proxy-cache"] == "hit"
    assert raw.headers["content-type"].startswith("text/event-stream")
    text = ""
    async for chunk in raw.parse():
        schemas.validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
        text += "".join(choice.delta.content or "" for choice in chunk.choices)
    assert text == paid.choices[0].message.content


async def test_errors_are_never_cached(proxy, emulator):
    for model in ("mistralai/mistral-7b-instruct", "meta-llama/llama-3.1-8b-instruct", "gpt-4o-mini"):
        emulator.state.faults.set(model, Fault(status=400, message="bad request from upstream"))
    client = proxy.client()
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="cheap", messages=QUESTION, temperature=0)
    emulator.state.faults.clear()
    answer = await client.chat.completions.with_raw_response.create(model="cheap", messages=QUESTION, temperature=0)
    assert answer.headers["x-proxy-cache"] == "miss"
    assert answer.parse().choices[0].message.content


async def test_entries_expire_after_the_ttl(make_proxy, emulator):
    clock = Clock()
    proxy = await make_proxy(extra="cache: {ttl_s: 60}\n", clock=clock)
    client = proxy.client()
    await client.chat.completions.create(model="cheap", messages=QUESTION, temperature=0)
    await cache_writes_settled()
    raw = await client.chat.completions.with_raw_response.create(model="cheap", messages=QUESTION, temperature=0)
    assert raw.headers["x-proxy-cache"] == "hit"
    clock.advance(61)
    raw = await client.chat.completions.with_raw_response.create(model="cheap", messages=QUESTION, temperature=0)
    assert raw.headers["x-proxy-cache"] == "miss"


async def test_a_streamed_answer_is_cached_too(proxy, emulator, schemas):
    client = proxy.client()
    streamed = ""
    stream = await client.chat.completions.create(model="quality", messages=QUESTION, temperature=0, stream=True)
    async for chunk in stream:
        streamed += "".join(choice.delta.content or "" for choice in chunk.choices)
    calls = len(emulator.state.requests)
    await cache_writes_settled()
    raw = await client.chat.completions.with_raw_response.create(model="quality", messages=QUESTION, temperature=0)
    assert raw.headers["x-proxy-cache"] == "hit"
    hit = raw.parse()
    schemas.validate("CreateChatCompletionResponse", hit.model_dump(exclude_unset=True))
    assert hit.choices[0].message.content == streamed
    assert hit.usage.completion_tokens > 0
    assert len(emulator.state.requests) == calls


async def test_a_broken_stream_is_not_cached(proxy, emulator):
    emulator.state.faults.set("anthropic/claude-sonnet-4.5", Fault(midstream_error=True, after_chunks=1, times=1))
    client = proxy.client()
    stream = await client.chat.completions.create(model="quality", messages=QUESTION, temperature=0, stream=True)
    with pytest.raises(openai.APIError):
        async for _chunk in stream:
            pass
    await cache_writes_settled()  # so a wrongly started store would have landed before the check
    raw = await client.chat.completions.with_raw_response.create(model="quality", messages=QUESTION, temperature=0)
    assert raw.headers["x-proxy-cache"] == "miss"
