"""End to end: the official openai SDK -> the proxy -> the OpenRouter emulator, all real sockets."""

from __future__ import annotations

import time

import openai
import pytest

from proxy.emulator import Fault
from tests.support.gateway import UPSTREAM_KEY, proxy_config_text

HELLO = [{"role": "user", "content": "Say hello in five words."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


async def test_cheap_is_answered_by_its_primary(proxy, emulator, schemas):
    raw = await proxy.client().chat.completions.with_raw_response.create(model="cheap", messages=HELLO)
    completion = raw.parse()
    schemas.validate("CreateChatCompletionResponse", completion.model_dump(exclude_unset=True))
    assert completion.model == "mistralai/mistral-7b-instruct"
    assert completion.choices[0].message.content
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    assert raw.headers["x-proxy-virtual-model"] == "cheap"
    assert raw.headers["x-proxy-model"] == "mistralai/mistral-7b-instruct"
    assert raw.headers["x-proxy-attempts"] == "1"
    assert len(raw.headers["x-request-id"]) >= 16
    assert raw.headers["x-proxy-route"] == "cheap: mistralai/mistral-7b-instruct=ok"
    assert [r.model for r in emulator.state.requests] == ["mistralai/mistral-7b-instruct"]


async def test_raw_response_is_openai_shaped(proxy, schemas, aiohttp_client):
    http = await aiohttp_client(proxy.server)
    response = await http.post(
        "/v1/chat/completions", json={"model": "quality", "messages": HELLO}, headers={"X-Request-ID": "trace-123"}
    )
    assert response.status == 200
    assert response.headers["x-request-id"] == "trace-123"
    body = await response.json()
    schemas.validate("CreateChatCompletionResponse", body)
    assert body["model"] == "anthropic/claude-sonnet-4.5"


async def test_every_client_field_passes_through_and_only_model_is_rewritten(proxy, emulator):
    fields = dict(
        temperature=0.3,
        n=1,
        stop=["\n\n"],
        seed=7,
        logprobs=False,
        user="u-42",
        top_p=0.9,
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        response_format={"type": "text"},
        max_tokens=64,
    )
    openrouter_fields = {"provider": {"order": ["Mistral"], "allow_fallbacks": False}, "transforms": ["middle-out"]}
    await proxy.client().chat.completions.create(model="cheap", messages=HELLO, extra_body=openrouter_fields, **fields)
    seen = emulator.state.requests[-1]
    expected = {**fields, **openrouter_fields, "messages": HELLO, "model": "mistralai/mistral-7b-instruct"}
    assert seen.body == expected
    assert seen.headers["HTTP-Referer"] == "https://example.com"
    assert seen.headers["X-Title"] == "Example App"


async def test_openrouter_only_fields_are_dropped_for_an_openai_upstream(make_proxy, emulator):
    proxy = await make_proxy("models: {oa: {chain: [{model: gpt-4o-mini, upstream: openai}]}}")
    await proxy.client().chat.completions.create(
        model="oa", messages=HELLO, temperature=0.1, extra_body={"provider": {"order": ["x"]}}
    )
    seen = emulator.state.requests[-1]
    assert seen.path.startswith("/v1/")
    assert seen.body == {"model": "gpt-4o-mini", "messages": HELLO, "temperature": 0.1}


async def test_tool_calls_pass_through(proxy, schemas):
    completion = await proxy.client().chat.completions.create(
        model="quality", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL]
    )
    schemas.validate("CreateChatCompletionResponse", completion.model_dump(exclude_unset=True))
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"


async def test_streamed_answer_chunks_match_the_schema(proxy, schemas):
    raw = await proxy.client().chat.completions.with_raw_response.create(
        model="balanced", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-proxy-model"] == "google/gemini-2.5-flash"
    stream = raw.parse()
    text, usage, models = "", None, set()
    async for chunk in stream:
        schemas.validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
        models.add(chunk.model)
        for choice in chunk.choices:
            text += choice.delta.content or ""
        usage = chunk.usage or usage
    assert text
    assert models == {"google/gemini-2.5-flash"}
    assert usage is not None and usage.completion_tokens > 0


async def test_streamed_tool_call(proxy, schemas):
    stream = await proxy.client().chat.completions.create(
        model="quality", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER_TOOL], stream=True
    )
    names, finish = [], None
    async for chunk in stream:
        schemas.validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                if call.function and call.function.name:
                    names.append(call.function.name)
            finish = choice.finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls"


async def test_auto_routes_by_task_header_and_metadata(proxy):
    client = proxy.client()
    raw = await client.chat.completions.with_raw_response.create(
        model="auto", messages=HELLO, extra_headers={"X-Task-Type": "code_generation"}
    )
    assert raw.headers["x-proxy-model"] == "x-ai/grok-code-fast-1"
    assert raw.headers["x-proxy-route"].startswith("auto>code: ")
    raw = await client.chat.completions.with_raw_response.create(
        model="auto", messages=HELLO, extra_body={"metadata": {"task": "complex_analysis"}}
    )
    assert raw.headers["x-proxy-model"] == "anthropic/claude-sonnet-4.5"
    raw = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "word " * 4000}]
    )
    assert raw.headers["x-proxy-model"] == "google/gemini-2.5-flash"
    raw = await client.chat.completions.with_raw_response.create(model="auto", messages=HELLO)
    assert raw.headers["x-proxy-model"] == "mistralai/mistral-7b-instruct"


async def test_direct_slug_passes_straight_through(proxy):
    completion = await proxy.client().chat.completions.create(model="anthropic/claude-3-haiku", messages=HELLO)
    assert completion.model == "anthropic/claude-3-haiku"


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=429, retry_after=0.05),
        Fault(status=502),
        Fault(drop=True),
        Fault(status=404, message="No endpoints found for mistralai/mistral-7b-instruct."),
    ],
    ids=["429", "502", "dropped-connection", "no-endpoints"],
)
async def test_falls_back_to_the_next_member(proxy, emulator, fault):
    emulator.state.faults.set("mistralai/mistral-7b-instruct", fault)
    raw = await proxy.client().chat.completions.with_raw_response.create(model="cheap", messages=HELLO)
    assert raw.parse().model == "meta-llama/llama-3.1-8b-instruct"
    assert raw.headers["x-proxy-model"] == "meta-llama/llama-3.1-8b-instruct"
    tried = [r.model for r in emulator.state.requests]
    retries = 1 if fault.status == 404 else 2  # a 404 moves on at once; transient failures are retried
    assert tried == ["mistralai/mistral-7b-instruct"] * retries + ["meta-llama/llama-3.1-8b-instruct"]
    assert raw.headers["x-proxy-attempts"] == str(retries + 1)


def with_upstream_timeout(emulator, seconds: float, retry: str) -> str:
    """The fixture's config with a shorter upstream timeout than its 2 s, so a timeout test waits less."""
    text = proxy_config_text(emulator.url, retry=retry)
    assert text.count("    timeout_s: 2\n") == 2
    return text.replace("    timeout_s: 2\n", f"    timeout_s: {seconds}\n")


@pytest.mark.realtime  # the upstream timeout fires on a latency the emulator produces over a real socket
async def test_timeout_falls_back(make_proxy, emulator):
    proxy = await make_proxy(
        config_text=with_upstream_timeout(emulator, 0.5, "retry: {attempts_per_model: 1, backoff_s: 0.01}")
    )
    emulator.state.faults.set("mistralai/mistral-7b-instruct", Fault(latency_s=3.0))
    started = time.monotonic()
    completion = await proxy.client().chat.completions.create(model="cheap", messages=HELLO)
    assert completion.model == "meta-llama/llama-3.1-8b-instruct"
    assert time.monotonic() - started < 2.9  # the 0.5 s upstream timeout cut the 3 s member off


@pytest.mark.realtime  # the executor sleeps Retry-After on the real clock (create_app has no seam for its sleep)
async def test_retry_after_is_honoured_on_the_same_member(proxy, emulator):
    emulator.state.faults.set("mistralai/mistral-7b-instruct", Fault(status=429, retry_after=0.6, times=1))
    started = time.monotonic()
    raw = await proxy.client().chat.completions.with_raw_response.create(model="cheap", messages=HELLO)
    assert time.monotonic() - started >= 0.6
    assert raw.headers["x-proxy-model"] == "mistralai/mistral-7b-instruct"
    assert raw.headers["x-proxy-attempts"] == "2"


@pytest.mark.realtime  # "at once" is measured on the real clock: the executor's sleep is not injectable here
async def test_retry_after_beyond_the_cap_moves_on_at_once(proxy, emulator):
    emulator.state.faults.set("mistralai/mistral-7b-instruct", Fault(status=429, retry_after=30))
    started = time.monotonic()
    completion = await proxy.client().chat.completions.create(model="cheap", messages=HELLO)
    assert completion.model == "meta-llama/llama-3.1-8b-instruct"
    assert time.monotonic() - started < 1.0
    assert [r.model for r in emulator.state.requests].count("mistralai/mistral-7b-instruct") == 1


async def test_second_upstream_catches_what_openrouter_drops(proxy, emulator):
    for model in ("mistralai/mistral-7b-instruct", "meta-llama/llama-3.1-8b-instruct"):
        emulator.state.faults.set(model, Fault(status=503))
    completion = await proxy.client().chat.completions.create(model="cheap", messages=HELLO)
    assert completion.model == "gpt-4o-mini"
    assert emulator.state.requests[-1].path.startswith("/v1/")


async def test_all_members_failing_gives_502_listing_each_attempt(proxy, emulator):
    for model in ("anthropic/claude-sonnet-4.5", "openai/gpt-4o-mini"):
        emulator.state.faults.set(model, Fault(status=503, message=f"{model} is overloaded"))
    with pytest.raises(openai.InternalServerError) as caught:
        await proxy.client().chat.completions.create(model="quality", messages=HELLO)
    error = caught.value
    assert error.status_code == 502
    message = error.body["message"]
    assert "anthropic/claude-sonnet-4.5: 503" in message and "openai/gpt-4o-mini: 503" in message
    assert "openai/gpt-4o-mini is overloaded" in message
    assert error.body["code"] == "upstream_failed"


async def test_all_members_rate_limited_gives_429_with_retry_after(proxy, emulator):
    emulator.state.faults.set("anthropic/claude-sonnet-4.5", Fault(status=429, retry_after=7))
    emulator.state.faults.set("openai/gpt-4o-mini", Fault(status=429, retry_after=4))
    with pytest.raises(openai.RateLimitError) as caught:
        await proxy.client().chat.completions.create(model="quality", messages=HELLO)
    assert caught.value.response.headers["retry-after"] == "4"


@pytest.mark.realtime  # upstream timeouts on latencies the emulator produces over real sockets
async def test_all_members_timing_out_gives_504(make_proxy, emulator):
    proxy = await make_proxy(config_text=with_upstream_timeout(emulator, 0.5, "retry: {attempts_per_model: 1}"))
    for model in ("anthropic/claude-sonnet-4.5", "openai/gpt-4o-mini"):
        emulator.state.faults.set(model, Fault(latency_s=2.5))
    with pytest.raises(openai.APIStatusError) as caught:
        await proxy.client().chat.completions.create(model="quality", messages=HELLO)
    assert caught.value.status_code == 504


async def test_client_errors_come_back_at_once(proxy, emulator):
    emulator.state.faults.set("mistralai/mistral-7b-instruct", Fault(status=400, message="temperature is out of range"))
    with pytest.raises(openai.BadRequestError) as caught:
        await proxy.client().chat.completions.create(model="cheap", messages=HELLO)
    assert "temperature is out of range" in caught.value.body["message"]
    assert len(emulator.state.requests) == 1


async def test_upstream_refusing_the_proxy_key_is_a_502_not_a_401(proxy, emulator):
    emulator.state.faults.set("anthropic/claude-sonnet-4.5", Fault(status=401, message="No auth credentials found"))
    emulator.state.faults.set("openai/gpt-4o-mini", Fault(status=401, message="No auth credentials found"))
    with pytest.raises(openai.APIStatusError) as caught:
        await proxy.client().chat.completions.create(model="quality", messages=HELLO)
    assert caught.value.status_code == 502
    assert "TEST_OPENROUTER_KEY" in caught.value.body["message"]
    assert caught.value.body["code"] == "upstream_auth_failed"
    assert len(emulator.state.requests) == 1  # the other member is on the same upstream: not tried


async def test_out_of_credits_moves_only_to_another_upstream(proxy, emulator):
    emulator.state.faults.set("mistralai/mistral-7b-instruct", Fault(status=402, message="Insufficient credits"))
    completion = await proxy.client().chat.completions.create(model="cheap", messages=HELLO)
    assert completion.model == "gpt-4o-mini"
    assert [r.model for r in emulator.state.requests] == ["mistralai/mistral-7b-instruct", "gpt-4o-mini"]


async def test_cooldown_skips_a_failing_member_without_calling_it(proxy, emulator):
    emulator.state.faults.set("mistralai/mistral-7b-instruct", Fault(status=503))
    client = proxy.client()
    for _ in range(3):  # 2 attempts each: the breaker opens once 3 distinct requests have failed on it
        await client.chat.completions.create(model="cheap", messages=HELLO)
    calls = [r.model for r in emulator.state.requests].count("mistralai/mistral-7b-instruct")
    assert calls == 6
    raw = await client.chat.completions.with_raw_response.create(model="cheap", messages=HELLO)
    assert [r.model for r in emulator.state.requests].count("mistralai/mistral-7b-instruct") == 6
    assert "mistralai/mistral-7b-instruct=skipped:cooldown" in raw.headers["x-proxy-route"]
    assert raw.headers["x-proxy-attempts"] == "1"


async def test_missing_upstream_key_gives_401_naming_the_variable(make_proxy, emulator):
    proxy = await make_proxy(env={})
    with pytest.raises(openai.AuthenticationError) as caught:
        await proxy.client().chat.completions.create(model="cheap", messages=HELLO)
    assert "TEST_OPENROUTER_KEY" in caught.value.body["message"]
    assert caught.value.body["code"] == "upstream_key_missing"
    assert emulator.state.requests == []


async def test_a_member_whose_upstream_has_no_key_is_skipped(make_proxy, emulator):
    proxy = await make_proxy(env={"TEST_OPENAI_KEY": UPSTREAM_KEY})
    completion = await proxy.client().chat.completions.create(model="cheap", messages=HELLO)
    assert completion.model == "gpt-4o-mini"


async def test_the_upstream_key_never_leaks(proxy, emulator, aiohttp_client, caplog):
    emulator.state.faults.set("anthropic/claude-sonnet-4.5", Fault(status=503, message=f"bad key {UPSTREAM_KEY}"))
    emulator.state.faults.set("openai/gpt-4o-mini", Fault(status=400, message=f"echo {UPSTREAM_KEY}"))
    http = await aiohttp_client(proxy.server)
    response = await http.post("/v1/chat/completions", json={"model": "quality", "messages": HELLO})
    text = await response.text()
    assert response.status == 400 and "[redacted]" in text
    assert UPSTREAM_KEY not in text and UPSTREAM_KEY not in caplog.text
