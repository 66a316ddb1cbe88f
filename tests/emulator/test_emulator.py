"""The OpenRouter emulator over real sockets: wire format, faults, control endpoints."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest

from proxy.emulator import EMULATOR_STATE, Fault, FaultPlan, create_emulator_app, load_default_catalogue
from proxy.emulator.completions import split_words

SPEC = Path(__file__).resolve().parents[3] / "shared" / "spec" / "openai-chat-schemas.json"
AUTH = {"Authorization": "Bearer sk-or-v1-test"}
HELLO = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper and a cat"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
NOW = 1_790_000_000.0


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft202012Validator]:
    if not SPEC.exists():
        pytest.fail(f"OpenAI schemas not found at {SPEC}")
    defs = json.loads(SPEC.read_text())["$defs"]
    return {
        name: jsonschema.Draft202012Validator({"$defs": defs, "$ref": f"#/$defs/{name}"})
        for name in ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "ErrorResponse")
    }


@pytest.fixture
def app():
    return create_emulator_app(clock=lambda: NOW)


@pytest.fixture
def state(app):
    return app[EMULATOR_STATE]


@pytest.fixture
async def client(aiohttp_client, app):
    return await aiohttp_client(app)


def prices(model: str) -> tuple[float, float]:
    entry = next(m for m in load_default_catalogue()["data"] if m["id"] == model)
    return float(entry["pricing"]["prompt"]), float(entry["pricing"]["completion"])


async def chat(client, model: str = "openai/gpt-4o-mini", prefix: str = "/api/v1", headers=AUTH, **fields: Any):
    return await client.post(
        f"{prefix}/chat/completions", json={"model": model, "messages": HELLO, **fields}, headers=headers
    )


def parse_sse(raw: bytes) -> tuple[list[str], list[Any]]:
    """(comments, data payloads) of a complete SSE body; [DONE] stays a string."""
    assert raw.endswith(b"\n\n"), raw[-80:]
    comments, data = [], []
    for event in raw[:-2].split(b"\n\n"):
        if event.startswith(b":"):
            comments.append(event.decode())
        else:
            assert event.startswith(b"data: "), event
            payload = event[6:]
            data.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return comments, data


# ---------------------------------------------------------------- happy paths


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
async def test_completion_matches_openai_schema_and_openrouter_fields(client, validators, prefix):
    response = await chat(client, "anthropic/claude-sonnet-4.5", prefix)
    assert response.status == 200
    body = await response.json()
    validators["CreateChatCompletionResponse"].validate(body)
    assert body["id"].startswith(f"gen-{int(NOW)}-") and response.headers["X-Generation-Id"] == body["id"]
    assert (body["object"], body["created"], body["model"], body["provider"]) == (
        "chat.completion",
        int(NOW),
        "anthropic/claude-sonnet-4.5",
        "Anthropic",
    )
    choice = body["choices"][0]
    assert choice["message"]["content"].startswith("[anthropic/claude-sonnet-4.5] ")
    assert "lighthouse keeper" in choice["message"]["content"]
    assert choice["message"]["refusal"] is None and choice["message"]["reasoning"] is None
    assert (choice["finish_reason"], choice["native_finish_reason"]) == ("stop", "end_turn")
    usage = body["usage"]
    assert usage["is_byok"] is False and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0


async def test_reply_is_deterministic(client):
    first = await (await chat(client)).json()
    second = await (await chat(client)).json()
    assert first["choices"] == second["choices"] and first["usage"] == second["usage"]
    assert first["id"] != second["id"]


@pytest.mark.parametrize(
    "model", ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4.5", "mistralai/mistral-7b-instruct"]
)
async def test_cost_is_tokens_times_catalogue_price(client, state, model):
    usage = (await (await chat(client, model)).json())["usage"]
    prompt_price, completion_price = prices(model)
    expected = usage["prompt_tokens"] * prompt_price + usage["completion_tokens"] * completion_price
    assert usage["cost"] == pytest.approx(expected, rel=1e-12) and usage["cost"] > 0
    assert usage["prompt_tokens"] == -(-len(orjson.dumps(HELLO)) // 4)
    assert state.key_usage == pytest.approx(usage["cost"])


async def test_stream_framing_chunks_and_usage(client, validators):
    response = await chat(client, "google/gemini-2.5-flash", stream=True)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    raw = await response.read()
    assert raw.startswith(b": OPENROUTER PROCESSING\n\ndata: {")
    _, data = parse_sse(raw)
    assert data[-1] == "[DONE]"
    chunks = data[:-1]
    for chunk in chunks:
        validators["CreateChatCompletionStreamResponse"].validate(chunk)
        assert chunk["object"] == "chat.completion.chunk" and chunk["provider"] == "Google AI Studio"
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content_chunks = chunks[1:-2]
    assert len(content_chunks) >= 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-2]["choices"][0]["native_finish_reason"] == "STOP"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["cost"] > 0
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in content_chunks)
    whole = await (await chat(client, "google/gemini-2.5-flash")).json()
    assert streamed == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize("count", [1, 1000])
async def test_emulator_chunks_sets_the_length_of_a_stream(client, validators, count):
    """`emulator_chunks` (read by the emulator only, for benchmarks): exactly that many content chunks."""
    raw = await (await chat(client, "google/gemini-2.5-flash", stream=True, emulator_chunks=count)).read()
    _, data = parse_sse(raw)
    content_chunks = data[1:-3]  # after the opening chunk; before the finish and usage chunks and [DONE]
    assert len(content_chunks) == count
    for chunk in content_chunks:
        validators["CreateChatCompletionStreamResponse"].validate(chunk)
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in content_chunks)
    whole = await (await chat(client, "google/gemini-2.5-flash", emulator_chunks=count)).json()
    assert streamed == whole["choices"][0]["message"]["content"] == " ".join(["word"] * (3 * count))


async def test_max_tokens_truncates_with_finish_reason_length(client):
    body = await (await chat(client, max_tokens=3)).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert len(body["choices"][0]["message"]["content"]) == 12
    body = await (await chat(client, max_completion_tokens=2)).json()
    assert body["usage"]["completion_tokens"] == 2


async def test_tool_call_built_from_required_parameters(client, validators):
    body = await (await chat(client, tools=[WEATHER])).json()
    validators["CreateChatCompletionResponse"].validate(body)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "emulated", "days": 1}


async def test_named_tool_choice_and_none(client):
    other = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    named = {"type": "function", "function": {"name": "lookup"}}
    body = await (await chat(client, tools=[WEATHER, other], tool_choice=named)).json()
    assert body["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": "{}"}
    body = await (await chat(client, tools=[WEATHER], tool_choice="none")).json()
    assert body["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in body["choices"][0]["message"]


async def test_streamed_tool_call_deltas(client, validators):
    _, data = parse_sse(await (await chat(client, tools=[WEATHER], stream=True)).read())
    chunks = data[:-1]
    for chunk in chunks:
        validators["CreateChatCompletionStreamResponse"].validate(chunk)
    deltas = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert deltas[0]["index"] == 0 and deltas[0]["id"].startswith("call_") and deltas[0]["type"] == "function"
    assert deltas[0]["function"]["name"] == "get_weather"
    assert len(deltas) >= 3
    arguments = "".join(d["function"]["arguments"] for d in deltas)
    assert json.loads(arguments) == {"city": "emulated", "days": 1}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_json_object_response_format(client):
    body = await (await chat(client, response_format={"type": "json_object"})).json()
    content = json.loads(body["choices"][0]["message"]["content"])
    assert content["model"] == "openai/gpt-4o-mini"


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
async def test_models_lists_the_catalogue(client, prefix):
    body = await (await client.get(f"{prefix}/models")).json()
    ids = {m["id"] for m in body["data"]}
    assert {"anthropic/claude-sonnet-4.5", "x-ai/grok-code-fast-1", "gpt-4o-mini"} <= ids
    gpt = next(m for m in body["data"] if m["id"] == "openai/gpt-4o-mini")
    assert (gpt["pricing"]["prompt"], gpt["pricing"]["completion"]) == ("0.00000015", "0.0000006")


async def test_key_usage_grows_with_answered_requests(client, state):
    state.credit_limit = 5.0
    before = (await (await client.get("/api/v1/key", headers=AUTH)).json())["data"]
    assert before["usage"] == 0 and before["limit"] == 5.0 and before["limit_remaining"] == 5.0
    cost = (await (await chat(client, "anthropic/claude-sonnet-4.5")).json())["usage"]["cost"]
    after = (await (await client.get("/api/v1/key", headers=AUTH)).json())["data"]
    assert after["usage"] == pytest.approx(cost) and after["usage_daily"] == pytest.approx(cost)
    assert after["limit_remaining"] == pytest.approx(5.0 - cost)
    assert after["is_free_tier"] is False and set(after["rate_limit"]) == {"requests", "interval"}
    assert (await client.get("/api/v1/key")).status == 401


# ---------------------------------------------------------------- request errors


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer "}, {"Authorization": "Basic abc"}])
async def test_missing_credentials_are_401(client, headers):
    response = await chat(client, headers=headers)
    assert response.status == 401
    assert await response.json() == {"error": {"code": 401, "message": "No auth credentials found"}}


async def test_configured_key_must_match(aiohttp_client):
    client = await aiohttp_client(create_emulator_app(api_key="sk-right"))
    assert (await chat(client, headers={"Authorization": "Bearer sk-wrong"})).status == 401
    assert (await chat(client, headers={"Authorization": "Bearer sk-right"})).status == 200


async def test_unknown_model_is_400_like_openrouter(client):
    response = await chat(client, "acme/nonexistent-1")
    assert response.status == 400
    assert await response.json() == {"error": {"code": 400, "message": "acme/nonexistent-1 is not a valid model ID"}}


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b"[]", b'{"model": "openai/gpt-4o-mini"}', b'{"model": "openai/gpt-4o-mini", "messages": []}'],
)
async def test_malformed_requests_are_400(client, payload):
    response = await client.post("/api/v1/chat/completions", data=payload, headers=AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == 400


# ---------------------------------------------------------------- faults


async def test_status_fault_applies_to_every_request_of_that_model(client, state):
    state.faults.set("anthropic/claude-sonnet-4.5", Fault(status=503))
    for _ in range(3):
        response = await chat(client, "anthropic/claude-sonnet-4.5")
        assert response.status == 503
        error = (await response.json())["error"]
        assert error["code"] == 503 and error["message"] and error["metadata"]["provider_name"] == "Anthropic"
    assert (await chat(client, "openai/gpt-4o-mini")).status == 200


async def test_429_carries_retry_after_and_default_rate_limit_headers_then_exhausts(client, state):
    state.faults.set("openai/gpt-4o-mini", Fault(status=429, retry_after=2.0, times=1))
    response = await chat(client)
    assert response.status == 429
    assert response.headers["Retry-After"] == "2"
    assert response.headers["X-RateLimit-Limit"] == "20"
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert response.headers["X-RateLimit-Reset"] == str(int(NOW * 1000) + 2000)
    assert (await chat(client)).status == 200


async def test_times_n_fails_exactly_n_requests(client, state):
    state.faults.set("openai/gpt-4o-mini", Fault(status=502, times=2))
    assert [(await chat(client)).status for _ in range(4)] == [502, 502, 200, 200]


async def test_explicit_rate_limit_headers_on_error_and_success(client, state):
    reset = int(NOW * 1000) + 60_000
    state.faults.set("openai/gpt-4o-mini", Fault(status=429, rate_limit=(200, 0, reset), times=1))
    response = await chat(client)
    assert (response.headers["X-RateLimit-Limit"], response.headers["X-RateLimit-Reset"]) == ("200", str(reset))
    assert "Retry-After" not in response.headers
    state.faults.set("openai/gpt-4o-mini", Fault(rate_limit=(200, 150, reset)))
    response = await chat(client)
    assert response.status == 200 and response.headers["X-RateLimit-Remaining"] == "150"
    response = await chat(client, stream=True)
    assert response.status == 200 and response.headers["X-RateLimit-Remaining"] == "150"


async def test_custom_message_code_and_metadata(client, state):
    metadata = {"reasons": ["violence"], "flagged_input": "...", "provider_name": "OpenAI", "model_slug": "x"}
    state.faults.set("openai/gpt-4o-mini", Fault(status=403, message="flagged", error_metadata=metadata))
    assert await (await chat(client)).json() == {"error": {"code": 403, "message": "flagged", "metadata": metadata}}
    state.faults.set("openai/gpt-4o-mini", Fault(status=400, message="bad temperature", code="invalid_request"))
    assert (await (await chat(client)).json())["error"] == {"code": "invalid_request", "message": "bad temperature"}


async def test_wildcard_fault_applies_to_models_without_their_own(client, state):
    state.faults.set("*", Fault(status=503))
    state.faults.set("openai/gpt-4o", Fault(latency_s=0.01))
    assert (await chat(client, "anthropic/claude-3-haiku")).status == 503
    assert (await chat(client, "openai/gpt-4o")).status == 200


async def test_error_fault_on_a_stream_is_a_plain_json_error(client, state):
    state.faults.set("openai/gpt-4o-mini", Fault(status=503))
    response = await chat(client, stream=True)
    assert response.status == 503 and response.content_type == "application/json"


@pytest.mark.realtime  # the emulator's latency and pacing are real time
async def test_latency_delays_a_completion(client, state):
    state.faults.set("openai/gpt-4o-mini", Fault(latency_s=0.3))
    started = time.monotonic()
    assert (await chat(client)).status == 200
    assert time.monotonic() - started >= 0.3


@pytest.mark.realtime  # the emulator's latency and pacing are real time
async def test_latency_streams_processing_comments_until_the_first_chunk(client, state):
    state.faults.set("openai/gpt-4o-mini", Fault(latency_s=0.35))
    started = time.monotonic()
    response = await chat(client, stream=True)
    assert response.status == 200
    first = await response.content.readuntil(b"\n\n")
    assert first == b": OPENROUTER PROCESSING\n\n" and time.monotonic() - started < 0.2
    comments, data = parse_sse(first + await response.read())
    assert comments == [": OPENROUTER PROCESSING"] * len(comments) and len(comments) >= 3
    assert time.monotonic() - started >= 0.35 and data[-1] == "[DONE]"


async def test_drop_closes_the_connection_without_a_response(client, state):
    state.faults.set("openai/gpt-4o-mini", Fault(drop=True, times=1))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await chat(client)
    assert state.stats["drops"] == 1
    assert (await chat(client)).status == 200


async def test_midstream_error_chunk_ends_the_stream(client, state):
    state.faults.set("openai/gpt-4o-mini", Fault(midstream_error=True, after_chunks=2))
    response = await chat(client, stream=True)
    assert response.status == 200
    _, data = parse_sse(await response.read())
    assert "[DONE]" not in data  # OpenRouter terminates the stream at the error event
    role, first, second, error = data
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["delta"]["content"] and second["choices"][0]["delta"]["content"]
    assert error["error"] == {"code": "server_error", "message": "Provider disconnected unexpectedly"}
    assert error["choices"] == [
        {
            "index": 0,
            "delta": {"content": ""},
            "finish_reason": "error",
            "native_finish_reason": "error",
            "logprobs": None,
        }
    ]
    assert (error["id"], error["model"], error["provider"]) == (role["id"], "openai/gpt-4o-mini", "OpenAI")
    assert state.stats["streams_failed"] == 1
    sent = first["choices"][0]["delta"]["content"] + second["choices"][0]["delta"]["content"]
    assert_billed_for(state, role["id"], sent, cancelled=False)


async def test_drop_midstream_cuts_the_connection_after_n_chunks(client, state):
    state.faults.set("openai/gpt-4o-mini", Fault(drop_midstream=True, after_chunks=2))
    response = await chat(client, stream=True)
    assert response.status == 200
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for piece in response.content.iter_any():
            received += piece
    assert received.count(b"data: {") == 3  # the role chunk and two content chunks
    assert b"[DONE]" not in received


@pytest.mark.realtime  # the emulator's latency and pacing are real time
async def test_client_hanging_up_mid_stream_is_counted(state, aiohttp_server, app):
    server = await aiohttp_server(app)
    state.faults.set("openai/gpt-4o-mini", Fault(chunk_delay_s=0.05))
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            server.make_url("/api/v1/chat/completions"),
            headers=AUTH,
            json={"model": "openai/gpt-4o-mini", "messages": HELLO, "stream": True},
        )
        await response.content.readuntil(b"data: {")
        response.close()
    for _ in range(40):
        if state.stats["streams_cancelled"]:
            break
        await asyncio.sleep(0.05)
    assert state.stats["streams_cancelled"] == 1 and state.stats["streams_completed"] == 0


@pytest.mark.realtime  # the emulator's latency and pacing are real time
async def test_chunk_delay_spaces_the_chunks(client, state):
    state.faults.set("openai/gpt-4o-mini", Fault(chunk_delay_s=0.05))
    started = time.monotonic()
    _, data = parse_sse(await (await chat(client, stream=True)).read())
    assert time.monotonic() - started >= 0.05 * (len(data) - 1)


# ---------------------------------------------------------------- OpenAI's stream shape under /v1


async def v1_stream(client, validators, **fields: Any) -> list[Any]:
    """The data of a /v1 stream, each chunk checked against OpenAI's schema and OpenAI's habits."""
    raw = await (await chat(client, prefix="/v1", stream=True, **fields)).read()
    comments, data = parse_sse(raw)
    assert comments == [] and raw.startswith(b"data: {")  # OpenAI sends no processing comments
    for chunk in data:
        if chunk == "[DONE]":
            continue
        if "error" in chunk:
            validators["ErrorResponse"].validate(chunk)
            continue
        validators["CreateChatCompletionStreamResponse"].validate(chunk)
        assert "provider" not in chunk and chunk["service_tier"] == "default"
        assert all("native_finish_reason" not in choice for choice in chunk["choices"])
    return data


async def test_v1_stream_is_openai_shaped_with_usage_when_asked(client, state, validators):
    whole = await (await chat(client)).json()
    billed = state.key_usage
    data = await v1_stream(client, validators, stream_options={"include_usage": True})
    assert data[-1] == "[DONE]"
    first, *content, finish, last = data[:-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert len(content) >= 3 and all(c["choices"][0]["delta"].keys() == {"content"} for c in content)
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == whole["choices"][0]["message"]["content"]
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert all("usage" in chunk and chunk["usage"] is None for chunk in data[:-2])
    assert last["choices"] == [] and "cost" not in last["usage"]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [last["usage"][name] for name in counts] == [whole["usage"][name] for name in counts]
    assert all(chunk["obfuscation"] for chunk in data[:-1])
    assert state.key_usage - billed == pytest.approx(whole["usage"]["cost"])  # the key pays as for /api/v1
    assert state.stats["streams_completed"] == 1


@pytest.mark.parametrize("options", [None, {}, {"include_usage": False}])
async def test_v1_stream_without_include_usage_has_no_usage_at_all(client, state, validators, options):
    whole = await (await chat(client)).json()
    billed = state.key_usage
    data = await v1_stream(client, validators, **({} if options is None else {"stream_options": options}))
    assert data[-1] == "[DONE]" and all("usage" not in chunk for chunk in data[:-1])
    assert data[-2]["choices"][0]["finish_reason"] == "stop"
    assert state.key_usage - billed == pytest.approx(whole["usage"]["cost"])


async def test_v1_stream_obfuscation_can_be_turned_off(client, validators):
    data = await v1_stream(client, validators, stream_options={"include_usage": True, "include_obfuscation": False})
    assert all("obfuscation" not in chunk for chunk in data[:-1])


async def test_v1_streamed_tool_call_opens_with_the_role(client, validators):
    data = await v1_stream(client, validators, tools=[WEATHER], stream_options={"include_usage": True})
    first, *arguments, finish, _usage = data[:-1]
    delta = first["choices"][0]["delta"]
    assert (delta["role"], delta["content"], delta["refusal"]) == ("assistant", None, None)
    (opening,) = delta["tool_calls"]
    assert opening["id"].startswith("call_") and opening["function"] == {"name": "get_weather", "arguments": ""}
    assert len(arguments) >= 3 and all(c["choices"][0]["delta"].keys() == {"tool_calls"} for c in arguments)
    text = "".join(c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in arguments)
    assert json.loads(text) == {"city": "emulated", "days": 1}
    assert finish["choices"][0]["finish_reason"] == "tool_calls" and finish["choices"][0]["delta"] == {}


async def test_v1_latency_sends_no_comments(client, state, validators):
    state.faults.set("openai/gpt-4o-mini", Fault(latency_s=0.3))
    started = time.monotonic()
    data = await v1_stream(client, validators)
    assert time.monotonic() - started >= 0.3 and data[-1] == "[DONE]"


async def test_v1_midstream_error_is_openais_error_event(client, state, validators):
    state.faults.set("openai/gpt-4o-mini", Fault(midstream_error=True, after_chunks=2))
    data = await v1_stream(client, validators, stream_options={"include_usage": True})
    role, first, second, error = data  # no usage chunk, no [DONE]
    assert role["choices"][0]["delta"]["role"] == "assistant"
    assert first["choices"][0]["delta"].keys() == second["choices"][0]["delta"].keys() == {"content"}
    assert error == {
        "error": {
            "message": "Provider disconnected unexpectedly",
            "type": "server_error",
            "param": None,
            "code": "server_error",
        }
    }
    assert state.stats["streams_failed"] == 1
    sent = first["choices"][0]["delta"]["content"] + second["choices"][0]["delta"]["content"]
    assert_billed_for(state, role["id"], sent, cancelled=False)


async def test_v1_drop_midstream_cuts_the_connection_after_n_chunks(client, state):
    state.faults.set("openai/gpt-4o-mini", Fault(drop_midstream=True, after_chunks=2))
    response = await chat(client, prefix="/v1", stream=True, stream_options={"include_usage": True})
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for piece in response.content.iter_any():
            received += piece
    assert received.count(b"data: {") == 3 and received.count(b'"usage":null') == 3
    assert b"OPENROUTER" not in received and b"[DONE]" not in received
    assert state.stats["streams_failed"] == 1
    chunks = [orjson.loads(line[6:]) for line in received.split(b"\n\n") if line.startswith(b"data: {")]
    sent = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert_billed_for(state, chunks[0]["id"], sent, cancelled=False)


def assert_billed_for(state, gen_id: str, sent: str, *, cancelled: bool) -> None:
    """A stream cut short is billed for its prompt and the text it had sent (a token per 4 bytes)."""
    (bill,) = state.bills.values()
    assert bill.id == gen_id and bill.cancelled is cancelled and bill.streamed
    assert bill.completion_tokens == -(-len(sent.encode()) // 4) > 0 and bill.prompt_tokens > 0
    model = state.models[bill.model]
    expected = bill.prompt_tokens * model.prompt_price + bill.completion_tokens * model.completion_price
    assert bill.cost == pytest.approx(expected, rel=1e-12) and state.key_usage == bill.cost


async def test_api_v1_streams_keep_openrouters_shape_whatever_the_stream_options(client, validators):
    response = await chat(client, stream=True, stream_options={"include_usage": True, "include_obfuscation": True})
    raw = await response.read()
    assert raw.startswith(b": OPENROUTER PROCESSING\n\ndata: {")
    _, data = parse_sse(raw)
    chunks = data[:-1]
    for chunk in chunks:
        validators["CreateChatCompletionStreamResponse"].validate(chunk)
        assert chunk["provider"] == "OpenAI" and "obfuscation" not in chunk
    assert all(c["choices"][0]["delta"]["role"] == "assistant" for c in chunks[:-1])
    assert all("usage" not in c for c in chunks[:-1]) and chunks[-1]["usage"]["cost"] > 0


# ---------------------------------------------------------------- introspection and control


async def test_requests_are_recorded_and_redacted_over_http(client, state):
    await chat(client, temperature=0.2)
    (seen,) = state.requests
    assert (seen.path, seen.model, seen.body["temperature"]) == ("/api/v1/chat/completions", "openai/gpt-4o-mini", 0.2)
    assert seen.headers["Authorization"] == AUTH["Authorization"]
    (served,) = (await (await client.get("/_emulator/requests")).json())["data"]
    assert served["headers"]["Authorization"] == "Bearer [REDACTED]"
    assert served["body"] == seen.body and served["model"] == "openai/gpt-4o-mini"
    await client.delete("/_emulator/requests")
    assert state.requests == []


async def test_stats_count_requests_streams_and_models(client, state):
    await chat(client)
    await chat(client, "anthropic/claude-3-haiku", stream=True)
    await (await chat(client, "anthropic/claude-3-haiku", stream=True)).read()
    stats = await (await client.get("/_emulator/stats")).json()
    assert stats["requests"] == 3
    assert stats["streams_started"] == 2 and stats["streams_completed"] == 2
    assert stats["per_model"] == {"openai/gpt-4o-mini": 1, "anthropic/claude-3-haiku": 2}
    assert stats["key_usage"] == pytest.approx(state.key_usage) and stats["key_usage"] > 0


async def test_faults_can_be_set_and_cleared_over_http(client, state):
    response = await client.post(
        "/_emulator/faults",
        json={"model": "openai/gpt-4o-mini", "status": 429, "retry_after": 1.5, "rate_limit": [10, 0, 123], "times": 1},
    )
    assert response.status == 200
    armed = (await (await client.get("/_emulator/faults")).json())["faults"]["openai/gpt-4o-mini"]
    assert armed["status"] == 429 and armed["remaining"] == 1
    response = await chat(client)
    assert (response.status, response.headers["Retry-After"], response.headers["X-RateLimit-Reset"]) == (
        429,
        "1.5",
        "123",
    )
    await client.post("/_emulator/faults", json={"model": "openai/gpt-4o", "status": 500})
    await client.post("/_emulator/faults", json={"model": "openai/gpt-4o-mini", "status": 500})
    await client.delete("/_emulator/faults", params={"model": "openai/gpt-4o"})
    assert set(state.faults.snapshot()) == {"openai/gpt-4o-mini"}
    await client.delete("/_emulator/faults")
    assert len(state.faults) == 0 and (await chat(client)).status == 200


@pytest.mark.parametrize(
    "payload",
    [{"status": 500}, {"model": "m", "explode": True}, {"model": "m", "status": 200}, {"model": "m", "times": 0}],
)
async def test_bad_fault_requests_are_400(client, payload):
    response = await client.post("/_emulator/faults", json=payload)
    assert response.status == 400
    assert "Bad fault" in (await response.json())["error"]["message"]


# ---------------------------------------------------------------- pure parts


def test_fault_plan_counts_uses_per_model():
    plan = FaultPlan()
    plan.set("a", Fault(status=500, times=2))
    plan.set("b", Fault(status=503))
    assert [plan.take("a") is not None for _ in range(3)] == [True, True, False]
    assert plan.take("b") == Fault(status=503) and plan.take("c") is None
    plan.clear("b")
    assert plan.take("b") is None and len(plan) == 0


@pytest.mark.parametrize("text", ["", "one", "a b c d e f g", "  spaced  out  ", "[m] You said: hi there"])
def test_split_words_reassembles_exactly(text):
    assert "".join(split_words(text)) == text


def test_catalogue_snapshot_has_required_models_and_metadata():
    catalogue = load_default_catalogue()
    assert catalogue["snapshot_date"] == "2026-11-20"
    assert catalogue["source"] == "https://openrouter.ai/api/v1/models"
    required = {
        "mistralai/mistral-7b-instruct",
        "meta-llama/llama-3.1-8b-instruct",
        "google/gemini-2.5-flash",
        "deepseek/deepseek-v3.2",
        "anthropic/claude-3-haiku",
        "anthropic/claude-sonnet-4.5",
        "openai/gpt-4o-mini",
        "x-ai/grok-code-fast-1",
        "openai/gpt-4o",
        "anthropic/claude-3.5-haiku",
        "google/gemini-2.5-pro",
        "meta-llama/llama-3.3-70b-instruct",
        "qwen/qwen-2.5-coder-32b-instruct",
        "gpt-4o-mini",
    }
    entries = {m["id"]: m for m in catalogue["data"]}
    assert required <= set(entries)
    for entry in entries.values():
        assert {
            "id",
            "canonical_slug",
            "name",
            "created",
            "description",
            "context_length",
            "architecture",
            "pricing",
            "top_provider",
            "supported_parameters",
        } <= set(entry)
        assert float(entry["pricing"]["prompt"]) < 0.0001  # per token, not per million
    assert prices("anthropic/claude-sonnet-4.5") == (3e-06, 1.5e-05)


async def test_max_bills_keeps_the_newest_and_the_key_usage_whole(aiohttp_client):
    """A long benchmark (`--max-bills`): old bills go, the newest stay and can be looked up, and the
    key's usage still counts every generation."""
    app = create_emulator_app(clock=lambda: NOW, max_bills=4)
    client, state = await aiohttp_client(app), app[EMULATOR_STATE]
    answers = [await (await chat(client)).json() for _ in range(10)]
    assert len(state.bills) <= 4
    newest = answers[-1]["id"]
    assert newest in state.bills and answers[0]["id"] not in state.bills
    assert state.key_usage == pytest.approx(sum(a["usage"]["cost"] for a in answers), rel=1e-12)
    found = await client.get(f"/api/v1/generation?id={newest}", headers=AUTH)
    assert found.status == 200
    gone = await client.get(f"/api/v1/generation?id={answers[0]['id']}", headers=AUTH)
    assert gone.status == 404


async def test_max_recorded_bounds_the_requests_kept(aiohttp_client):
    app = create_emulator_app(clock=lambda: NOW, max_recorded=3)
    client, state = await aiohttp_client(app), app[EMULATOR_STATE]
    for i in range(8):
        await chat(client, user=f"u{i}")
    assert 1 <= len(state.requests) <= 3
    assert state.requests[-1].body["user"] == "u7"  # the newest is kept
