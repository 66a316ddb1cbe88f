"""`x-proxy-overhead-ms` on every answer of every API (streamed or not, errors included) and the
`orproxy_overhead_seconds{api}` histogram, through the official SDKs and the emulator."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import anthropic
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.emulator import Fault
from tests.support.gateway import _TLS, Proxy

SONNET, MISTRAL = "anthropic/claude-sonnet-4.5", "mistralai/mistral-7b-instruct"
MODELS = f"""
models:
  embed: {{kind: embeddings, chain: [openai/text-embedding-3-small]}}
  cheap: {{chain: [{MISTRAL}]}}
  quality: {{chain: [{SONNET}]}}
"""
HELLO = [{"role": "user", "content": "hello"}]
Headers = Mapping[str, str]  # the SDKs' response headers (case-insensitive)


@pytest.fixture
async def proxy(make_proxy):
    return await make_proxy(MODELS)


def claude(proxy: Proxy) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=proxy.url, api_key="unused", max_retries=0, http_client=anthropic.DefaultAsyncHttpxClient(verify=_TLS)
    )


async def overhead_counts(proxy: Proxy) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/metrics") as response:
        text = await response.text()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "orproxy_overhead_seconds":
            assert family.type == "histogram"
            for sample in family.samples:
                if sample.name == "orproxy_overhead_seconds_count":
                    counts[sample.labels["api"]] = sample.value
    return counts


def checked(headers: Headers, elapsed_s: float) -> float:
    """The header's value: present, a float, >= 0 and no more than the whole request took."""
    value = float(headers["x-proxy-overhead-ms"])
    assert 0.0 <= value <= elapsed_s * 1000, (value, elapsed_s)
    return value


Call = Callable[[Proxy], Awaitable[Headers]]


async def chat(proxy: Proxy) -> Headers:
    raw = await proxy.client().chat.completions.with_raw_response.create(model="cheap", messages=HELLO)
    assert raw.parse().choices[0].message.content
    return raw.headers


async def chat_stream(proxy: Proxy) -> Headers:
    async with proxy.client().chat.completions.with_streaming_response.create(
        model="cheap", messages=HELLO, stream=True
    ) as response:
        chunks = [chunk async for chunk in await response.parse()]
        assert chunks
        return response.headers


async def chat_cached(proxy: Proxy) -> Headers:
    client = proxy.client()
    await client.chat.completions.create(model="cheap", messages=HELLO, temperature=0)
    raw = await client.chat.completions.with_raw_response.create(model="cheap", messages=HELLO, temperature=0)
    assert raw.headers["x-proxy-cache"] == "hit"
    return raw.headers


async def responses(proxy: Proxy) -> Headers:
    raw = await proxy.client().responses.with_raw_response.create(model="cheap", input="hello")
    assert raw.parse().output_text
    return raw.headers


async def responses_stream(proxy: Proxy) -> Headers:
    async with proxy.client().responses.with_streaming_response.create(
        model="cheap", input="hello", stream=True
    ) as response:
        assert [event async for event in await response.parse()]
        return response.headers


async def messages(proxy: Proxy) -> Headers:
    raw = await claude(proxy).messages.with_raw_response.create(model="quality", max_tokens=64, messages=HELLO)
    assert (await raw.parse()).content
    return raw.headers


async def messages_stream(proxy: Proxy) -> Headers:
    async with claude(proxy).messages.with_streaming_response.create(
        model="quality", max_tokens=64, messages=HELLO, stream=True
    ) as response:
        assert [event async for event in await response.parse()]
        return response.headers


async def count_tokens(proxy: Proxy) -> Headers:
    raw = await claude(proxy).messages.with_raw_response.count_tokens(model="quality", messages=HELLO)
    assert (await raw.parse()).input_tokens > 0
    return raw.headers


async def embeddings(proxy: Proxy) -> Headers:
    raw = await proxy.client().embeddings.with_raw_response.create(model="embed", input="hello")
    assert raw.parse().data
    return raw.headers


async def completions(proxy: Proxy) -> Headers:
    raw = await proxy.client().completions.with_raw_response.create(model="cheap", prompt="hello", max_tokens=16)
    assert raw.parse().choices[0].text
    return raw.headers


async def completions_stream(proxy: Proxy) -> Headers:
    async with proxy.client().completions.with_streaming_response.create(
        model="cheap", prompt="hello", max_tokens=16, stream=True
    ) as response:
        assert [chunk async for chunk in await response.parse()]
        return response.headers


async def refused_model(proxy: Proxy) -> Headers:
    with pytest.raises(openai.NotFoundError) as caught:
        await proxy.client().chat.completions.create(model="no-such-model", messages=HELLO)
    return caught.value.response.headers


async def refused_body(proxy: Proxy) -> Headers:
    with pytest.raises(anthropic.BadRequestError) as caught:
        await claude(proxy).messages.create(model="quality", max_tokens=64, messages=[])
    return caught.value.response.headers


async def upstream_failed(proxy: Proxy) -> Headers:
    with pytest.raises(openai.APIStatusError) as caught:
        await proxy.client().chat.completions.create(model="cheap", messages=HELLO)
    assert caught.value.status_code >= 500
    return caught.value.response.headers


CASES: list[tuple[str, Call, str | None]] = [
    ("chat", chat, "chat"),
    ("chat stream", chat_stream, "chat"),
    ("chat cache hit", chat_cached, "chat"),
    ("responses", responses, "responses"),
    ("responses stream", responses_stream, "responses"),
    ("messages", messages, "messages"),
    ("messages stream", messages_stream, "messages"),
    ("count_tokens", count_tokens, None),  # answered by the proxy itself: no upstream, not in the histogram
    ("embeddings", embeddings, "embeddings"),
    ("completions", completions, "completions"),
    ("completions stream", completions_stream, "completions"),
    ("404 unknown model", refused_model, "chat"),
    ("400 bad body", refused_body, "messages"),
]


@pytest.mark.parametrize(("name", "call", "api"), CASES, ids=[case[0] for case in CASES])
async def test_every_answer_carries_its_overhead_and_the_histogram_counts_it(proxy, name, call, api) -> None:
    before = await overhead_counts(proxy)
    began = time.perf_counter()
    headers = await call(proxy)
    checked(headers, time.perf_counter() - began)
    after = await overhead_counts(proxy)
    requests = 2 if name == "chat cache hit" else 1
    expected = dict(before)
    if api is not None:
        expected[api] = before.get(api, 0) + requests
    assert after == expected


@pytest.mark.realtime  # the upstream answers after a real 0.3 s delay, which the overhead must leave out
async def test_the_wait_on_the_upstream_is_left_out(proxy, emulator) -> None:
    emulator.state.faults.set(MISTRAL, Fault(latency_s=0.3))
    began = time.perf_counter()
    headers = await chat(proxy)
    elapsed = time.perf_counter() - began
    overhead = checked(headers, elapsed)
    assert elapsed >= 0.3 and overhead < (elapsed - 0.3) * 1000 + 0.001  # the 300 ms wait is not in it
    began = time.perf_counter()
    headers = await chat_stream(proxy)
    overhead = checked(headers, time.perf_counter() - began)
    assert overhead < 300


async def test_an_upstream_failure_answers_with_its_overhead(proxy, emulator) -> None:
    emulator.state.faults.set(MISTRAL, Fault(status=503))
    before = await overhead_counts(proxy)
    began = time.perf_counter()
    headers = await upstream_failed(proxy)
    checked(headers, time.perf_counter() - began)
    assert (await overhead_counts(proxy))["chat"] == before.get("chat", 0) + 1


def test_the_cases_cover_every_api() -> None:
    from proxy.core.apis import APIS

    assert {api.name for api in APIS} <= {case[2] for case in CASES}
