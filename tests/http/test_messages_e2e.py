"""End to end: the official `anthropic` SDK (and Claude Code-style raw requests) -> the proxy ->
the emulator's `/api/v1/messages`, real sockets. Every answer, stream event and error is checked
against Anthropic's own schemas, and every row against the emulator's bill, to the nano-dollar."""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from proxy.core.apis.messages import measure_prompt
from proxy.emulator import Fault
from tests.support.audit import billed_nano, booked_nano, settled
from tests.support.gateway import _TLS, UPSTREAM_KEY, Proxy
from tests.support.timing import wait_for

HELLO = [{"role": "user", "content": "Say hello in five words."}]
SONNET, MINI, HAIKU = "anthropic/claude-sonnet-4.5", "openai/gpt-4o-mini", "anthropic/claude-3-haiku"
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
FAST = (0.02, 0.05, 0.1, 0.2, 0.5)  # reconciliation's lookup schedule, sped up


def client(proxy: Proxy, prefix: str = "", **kwargs: Any) -> anthropic.AsyncAnthropic:
    """The SDK as Claude Code-style apps configure it: `base_url` at the proxy's root."""
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("api_key", "client-key-unused")
    return anthropic.AsyncAnthropic(
        base_url=proxy.url + prefix, http_client=anthropic.DefaultAsyncHttpxClient(verify=_TLS), **kwargs
    )


def sse_events(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    """(event name, data) of each event of a stream as it came over the wire; comments skipped."""
    events = []
    for block in raw.decode().split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            events.append((name, orjson.loads("\n".join(data))))
    return events


def check_stream(raw: bytes, anthropic_schemas) -> list[dict[str, Any]]:
    """Each event named after its type and valid by Anthropic's schemas; pings as Anthropic sends them."""
    events = sse_events(raw)
    for name, data in events:
        assert name == data["type"], (name, data)
        if name == "ping":
            assert data == {"type": "ping"}
        elif name == "error":
            anthropic_schemas.validate("ErrorResponse", data)
        else:
            anthropic_schemas.validate("RawMessageStreamEvent", data)
    assert b"[DONE]" not in raw  # OpenRouter's own end marker is not Anthropic's: never forwarded
    return [data for _, data in events]


async def post(proxy: Proxy, body: dict[str, Any], headers: dict[str, str] | None = None, path: str = "/v1/messages"):
    async with aiohttp.ClientSession() as session, session.post(proxy.url + path, json=body, headers=headers) as r:
        return r.status, r.headers.copy(), await r.read()


async def test_create_through_the_sdk_is_anthropic_shaped_and_billed_to_the_nano_dollar(
    proxy, emulator, anthropic_schemas
):
    sdk = client(proxy)
    raw = await sdk.messages.with_raw_response.create(model="quality", max_tokens=200, messages=HELLO)
    anthropic_schemas.validate("Message", await raw.json())
    message = await raw.parse()
    assert message.model == SONNET and message.content[0].type == "text" and message.stop_reason == "end_turn"
    assert raw.headers["x-proxy-route"] == f"quality: {SONNET}=ok"
    assert raw.headers["x-proxy-model"] == SONNET and raw.headers["x-proxy-attempts"] == "1"
    (row,) = await settled(proxy)
    assert (row.api, row.virtual_model, row.model, row.cost_source, row.streamed) == (
        "messages",
        "quality",
        SONNET,
        "upstream",
        False,
    )
    assert (row.generation_id, row.provider) == (message.id, "Anthropic")
    assert (row.prompt_tokens, row.completion_tokens) == (message.usage.input_tokens, message.usage.output_tokens)
    assert booked_nano([row]) == billed_nano(emulator) and row.cost_usd > 0
    (sent,) = emulator.state.requests
    assert sent.path == "/api/v1/messages" and sent.body["model"] == SONNET
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"  # the proxy's key, not the client's
    assert sent.headers["anthropic-version"] == sdk.default_headers["anthropic-version"]  # the SDK's, passed on


async def test_a_stream_through_the_sdk_and_on_the_wire(proxy, emulator, anthropic_schemas):
    body = {"model": "quality", "max_tokens": 200, "messages": HELLO, "stream": True}
    status, headers, raw = await post(proxy, body, {"anthropic-version": "2023-06-01"})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = check_stream(raw, anthropic_schemas)
    assert [e["type"] for e in events][:3] == ["message_start", "content_block_start", "ping"]
    assert [e["type"] for e in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")

    async with client(proxy).messages.stream(model="quality", max_tokens=200, messages=HELLO) as stream:
        streamed = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert streamed == text == final.content[0].text
    assert final.usage.output_tokens > 0 and final.stop_reason == "end_turn"
    rows = await settled(proxy)
    assert [(r.api, r.streamed, r.cost_source) for r in rows] == [("messages", True, "upstream")] * 2
    assert all(r.ttft_s is not None and r.generation_id == events[0]["message"]["id"] for r in rows[:1])
    assert booked_nano(rows) == billed_nano(emulator)


@pytest.mark.parametrize(
    ("extra", "routed_to"),
    [
        ({"extra_headers": {"X-Task-Type": "code_generation"}}, "code"),
        ({"extra_body": {"metadata": {"task": "complex_analysis"}}}, "quality"),
        ({"system": "Context: " + "lorem ipsum dolor " * 300}, "balanced"),  # prompt_tokens_over: 4000
        ({}, "cheap"),
    ],
)
async def test_rules_route_a_message_by_its_own_features(proxy, extra, routed_to):
    raw = await client(proxy).messages.with_raw_response.create(model="auto", max_tokens=50, messages=HELLO, **extra)
    assert raw.headers["x-proxy-route"].startswith(f"auto>{routed_to}: ")


async def test_count_tokens_is_answered_by_the_proxy_and_costs_nothing(proxy, emulator, anthropic_schemas):
    sdk = client(proxy)
    body = {"model": "quality", "messages": HELLO, "system": "Be brief.", "tools": [WEATHER]}
    raw = await sdk.messages.with_raw_response.count_tokens(**body)
    anthropic_schemas.validate("MessageTokensCount", await raw.json())
    counted = await raw.parse()
    assert counted.input_tokens == measure_prompt(body).estimate > 0
    assert (await client(proxy, "/api").messages.count_tokens(**body)).input_tokens == counted.input_tokens
    with pytest.raises(anthropic.NotFoundError) as missing:
        await sdk.messages.count_tokens(model="no-such-model", messages=HELLO)
    anthropic_schemas.validate("ErrorResponse", missing.value.body)
    assert "no-such-model" in missing.value.message
    with pytest.raises(anthropic.BadRequestError):
        await sdk.messages.count_tokens(model="quality", messages=[])
    await proxy.ledger.flush()
    assert emulator.state.requests == [] and await proxy.ledger.rows() == []  # nothing upstream, nothing booked


@pytest.mark.parametrize("stream", [False, True])
async def test_a_503_falls_back_to_the_next_member_and_only_the_answer_is_billed(
    proxy, emulator, anthropic_schemas, stream
):
    emulator.state.faults.set(SONNET, Fault(status=503))
    sdk = client(proxy)
    if stream:
        async with sdk.messages.stream(model="quality", max_tokens=100, messages=HELLO) as answer:
            message = await answer.get_final_message()
            route = answer.response.headers["x-proxy-route"]
    else:
        raw = await sdk.messages.with_raw_response.create(model="quality", max_tokens=100, messages=HELLO)
        anthropic_schemas.validate("Message", await raw.json())
        message, route = await raw.parse(), raw.headers["x-proxy-route"]
    assert message.model == MINI
    assert route == f"quality: {SONNET}=http_503,http_503 {MINI}=ok"
    rows = await settled(proxy)
    assert [(r.model, r.attempts, r.api) for r in rows] == [(MINI, 3, "messages")]
    assert booked_nano(rows) == billed_nano(emulator) and len(emulator.state.bills) == 1


async def test_a_budget_refusal_is_anthropic_shaped(make_proxy, emulator, anthropic_schemas):
    proxy = await make_proxy(extra="budget: {daily_usd: 0.000001, on_exhausted: reject}\n")
    for stream in (False, True):
        with pytest.raises(anthropic.RateLimitError) as refused:
            await client(proxy).messages.create(model="quality", max_tokens=1000, messages=HELLO, stream=stream)
        anthropic_schemas.validate("ErrorResponse", refused.value.body)
        assert refused.value.body["error"]["type"] == "rate_limit_error"
        assert "daily budget" in refused.value.message and "$0.000001" in refused.value.message
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert refused.value.body["request_id"] == refused.value.response.headers["x-request-id"]
    assert emulator.state.requests == []


KEYED = """
keys:
  - {name: bot, key_env: BOT_KEY}
  - {name: narrow, key_env: NARROW_KEY, models: [cheap]}
"""
ENV = {"TEST_OPENROUTER_KEY": UPSTREAM_KEY, "TEST_OPENAI_KEY": UPSTREAM_KEY, "BOT_KEY": "bot-secret"}


async def test_the_client_key_may_come_as_x_api_key_and_never_reaches_the_upstream(
    make_proxy, emulator, anthropic_schemas
):
    proxy = await make_proxy(extra=KEYED, env={**ENV, "NARROW_KEY": "narrow-secret"})
    body = {"model": "quality", "max_tokens": 50, "messages": HELLO}
    claude_code = {
        "x-api-key": "bot-secret",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "context-1m-2025-08-07",
    }
    status, _, raw = await post(proxy, body, claude_code)
    assert status == 200
    anthropic_schemas.validate("Message", orjson.loads(raw))
    assert (await client(proxy, api_key="bot-secret").messages.create(**body)).model == SONNET  # as a bearer token
    (sent, _) = emulator.state.requests
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}" and "x-api-key" not in sent.headers
    assert sent.headers["anthropic-beta"] == "context-1m-2025-08-07"
    for headers in [{"x-api-key": "wrong"}, {"x-api-key": ""}, {}]:
        status, _, raw = await post(proxy, body, headers)
        assert status == 401
        anthropic_schemas.validate("ErrorResponse", orjson.loads(raw))
        assert orjson.loads(raw)["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        await client(proxy, api_key="narrow-secret").messages.create(**body)
    anthropic_schemas.validate("ErrorResponse", refused.value.body)
    status, _, raw = await post(proxy, body, {"x-api-key": "narrow-secret"}, "/v1/messages/count_tokens")
    assert status == 403 and orjson.loads(raw)["error"]["type"] == "permission_error"
    rows = await settled(proxy)
    assert [r.key_name for r in rows if r.status == 200] == ["bot", "bot"]


async def test_openrouter_fallback_lists_are_not_stacked_on_the_chain(proxy, emulator):
    fallbacks = {"fallbacks": [{"model": "x-ai/grok-code-fast-1"}], "models": ["deepseek/deepseek-v3.2"]}
    emulator.state.faults.set(SONNET, Fault(status=503))
    message = await client(proxy).messages.create(model="quality", max_tokens=50, messages=HELLO, extra_body=fallbacks)
    assert message.model == MINI  # the proxy's own chain, not the client's list
    assert [(r.body["model"], "fallbacks" in r.body or "models" in r.body) for r in emulator.state.requests] == [
        (SONNET, False),
        (SONNET, False),
        (MINI, False),
    ]


MIXED = """
models:
  mixed: {chain: [{model: gpt-4o-mini, upstream: openai}, anthropic/claude-3-haiku]}
  openai_only: {chain: [{model: gpt-4o-mini, upstream: openai}]}
"""


async def test_members_on_an_upstream_without_the_messages_api_are_skipped(make_proxy, emulator, anthropic_schemas):
    proxy = await make_proxy(MIXED)
    raw = await client(proxy).messages.with_raw_response.create(model="mixed", max_tokens=50, messages=HELLO)
    assert (await raw.parse()).model == HAIKU
    assert raw.headers["x-proxy-route"] == f"mixed: {HAIKU}=ok gpt-4o-mini@openai=skipped:unsupported_api"
    with pytest.raises(anthropic.APIStatusError) as refused:
        await client(proxy).messages.create(model="openai_only", max_tokens=50, messages=HELLO)
    anthropic_schemas.validate("ErrorResponse", refused.value.body)
    assert "upstream does not serve messages" in refused.value.message
    assert "unsupported_api" in refused.value.response.headers["x-proxy-route"]
    assert [r.path for r in emulator.state.requests] == ["/api/v1/messages"]  # nothing went to /v1/messages


async def test_an_upstream_client_error_comes_back_in_anthropic_shape(proxy, emulator, anthropic_schemas):
    emulator.state.faults.set(SONNET, Fault(status=400, message="messages.0.content: Input should be a valid list"))
    with pytest.raises(anthropic.BadRequestError) as refused:
        await client(proxy).messages.create(model="quality", max_tokens=50, messages=HELLO)
    anthropic_schemas.validate("ErrorResponse", refused.value.body)
    assert "Input should be a valid list" in refused.value.message
    assert len(emulator.state.requests) == 1  # the request's own fault: no fallback, no retry
    with pytest.raises(anthropic.BadRequestError) as invalid:
        await client(proxy).messages.create(model="quality", max_tokens=50, messages=[])
    assert invalid.value.body["error"] == {
        "type": "invalid_request_error",
        "message": invalid.value.body["error"]["message"],
    }
    assert "messages" in invalid.value.message


async def test_paths_under_v1_messages_answer_in_anthropic_shape(proxy, anthropic_schemas):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/v1/messages") as response:
            assert response.status == 405 and response.headers["Allow"] == "POST"
            anthropic_schemas.validate("ErrorResponse", await response.json())
        async with session.post(f"{proxy.url}/api/v1/messages/batches", json={}) as response:
            assert response.status == 404
            anthropic_schemas.validate("ErrorResponse", await response.json())
        async with session.post(f"{proxy.url}/v1/chat/nothing", json={}) as response:
            assert (await response.json())["error"]["type"] == "invalid_request_error"  # OpenAI's shape stays


@pytest.mark.parametrize("fault", ["midstream_error", "drop_midstream"])
async def test_a_stream_broken_upstream_is_estimated_then_reconciled_to_the_bill(
    make_proxy, emulator, anthropic_schemas, fault
):
    proxy = await make_proxy(reconcile_schedule=FAST)
    emulator.state.faults.set(SONNET, Fault(**{fault: True}, after_chunks=2))
    body = {"model": "quality", "max_tokens": 200, "messages": HELLO, "stream": True}
    status, _, raw = await post(proxy, body)
    events = check_stream(raw, anthropic_schemas)
    assert status == 200 and events[-1]["type"] == "error"  # the upstream's error event, or the proxy's
    with pytest.raises(anthropic.APIStatusError):
        async with client(proxy).messages.stream(model="quality", max_tokens=200, messages=HELLO) as stream:
            async for _ in stream:
                pass
    rows = await settled(proxy)
    error = "upstream_stream_error" if fault == "midstream_error" else "stream_interrupted"
    assert [(r.error, r.cost_source) for r in rows] == [(error, "reconciled")] * 2
    assert all(r.estimate_usd is not None and r.estimate_usd > 0 for r in rows)  # booked as an estimate first
    assert booked_nano(rows) == billed_nano(emulator)
    assert all(bill.completion_tokens > 0 for bill in emulator.state.bills.values())


@pytest.mark.realtime  # the emulator's real pauses between events keep the stream going when the client leaves
async def test_a_client_gone_midstream_is_reconciled_to_the_partial_bill(make_proxy, emulator):
    proxy = await make_proxy(reconcile_schedule=FAST)
    emulator.state.faults.set(SONNET, Fault(chunk_delay_s=0.05))
    body = {"model": "quality", "max_tokens": 200, "messages": HELLO, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{proxy.url}/v1/messages", json=body)
        while b"content_block_delta" not in await response.content.readuntil(b"\n\n"):
            pass
        response.close()
    await wait_for(lambda: emulator.state.bills, message="the cancelled stream was never billed")
    (row,) = await settled(proxy)
    (bill,) = emulator.state.bills.values()
    assert bill.cancelled and bill.completion_tokens > 0
    assert (row.api, row.status, row.error, row.cost_source) == ("messages", 499, "client_disconnected", "reconciled")
    assert booked_nano([row]) == billed_nano(emulator)


async def test_tools_in_a_stream_and_the_answer_to_their_result(proxy, emulator, anthropic_schemas):
    sdk = client(proxy)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    async with sdk.messages.stream(model="quality", max_tokens=200, messages=ask, tools=[WEATHER]) as stream:
        called = await stream.get_final_message()
    (use,) = called.content
    assert (use.type, use.name, use.input, called.stop_reason) == (
        "tool_use",
        "get_weather",
        {"city": "emulated"},
        "tool_use",
    )
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 24 degrees"}
    turn = [*ask, {"role": "assistant", "content": [use.model_dump()]}, {"role": "user", "content": [result]}]
    raw = await sdk.messages.with_raw_response.create(model="quality", max_tokens=200, messages=turn, tools=[WEATHER])
    anthropic_schemas.validate("Message", await raw.json())
    answer = await raw.parse()
    assert answer.stop_reason == "end_turn" and "Sunny" in answer.content[0].text
    assert booked_nano(await settled(proxy)) == billed_nano(emulator)


LONG_SYSTEM = "You are a meticulous assistant for a shipping company. " * 12  # cached by the emulator (>= 64 tokens)


async def test_cached_input_is_recorded_and_priced_as_billed(proxy, emulator):
    sdk = client(proxy)
    first = await sdk.messages.create(model="quality", max_tokens=50, system=LONG_SYSTEM, messages=HELLO)
    async with sdk.messages.stream(model="quality", max_tokens=50, system=LONG_SYSTEM, messages=HELLO) as stream:
        second = await stream.get_final_message()
    assert first.usage.cache_creation_input_tokens > 0 and first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    rows = await settled(proxy)
    assert [(r.cache_write_tokens, r.cached_tokens) for r in rows] == [
        (first.usage.cache_creation_input_tokens, 0),
        (0, second.usage.cache_read_input_tokens),
    ]
    assert [r.prompt_tokens for r in rows] == [b.prompt_tokens for b in emulator.state.bills.values()]
    assert booked_nano(rows) == billed_nano(emulator)
